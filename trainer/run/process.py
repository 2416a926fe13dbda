"""Process tuning, set up once before anything is built (the `process` config section): torch's threads,
glibc's allocator, cuDNN's algorithm search; and torch.compile."""

import logging
from typing import Any

import torch
from torch import nn

from trainer.core.errors import UserError

log = logging.getLogger("trainer")


def configure_process(device: torch.device, process: Any, precision: str) -> None:
    """The `process` section (threads, keep_cpu_memory, cudnn_benchmark), before anything is built."""
    if process.threads:
        torch.set_num_threads(process.threads)
    if process.keep_cpu_memory:
        keep_freed_memory()
    if device.type == "cpu" and precision == "bf16" and not torch.ops.mkldnn._is_mkldnn_bf16_supported():
        log.warning(
            "trainer.precision=bf16: this CPU has no native bfloat16, so it is emulated and much slower "
            "(16x for fastnet, measured); trainer.precision=32 is faster here"
        )
    if device.type == "cuda":
        # The shapes are fixed for a whole run: benchmarking the algorithms once pays back within steps.
        torch.backends.cudnn.benchmark = process.cudnn_benchmark
        torch.set_float32_matmul_precision("high")  # TF32 matmuls where fp32 is asked for


def keep_freed_memory() -> bool:
    """Makes glibc's malloc keep the memory tensors free for the next ones instead of handing it back to
    the OS. By default every block over 32 MiB is a fresh mmap and goes back with munmap when freed, so
    each training step on a CPU faults in (and the kernel zeroes) its activations' pages again: 234,000
    page faults a step for fastnet at batch 1,024. With mmap off the blocks come from the heap, and with
    trimming off the heap keeps them: that step went from 1,067 to 822 ms. The price: the process's
    memory stays at its peak, and the heap's fragments add to it (+13% peak RSS there). Returns False
    (and says so) where the C library is not glibc."""
    import ctypes
    import ctypes.util

    m_trim_threshold, m_mmap_max = -1, -4  # glibc's <malloc.h>
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
        kept = bool(libc.mallopt(m_mmap_max, 0)) and bool(libc.mallopt(m_trim_threshold, 2**31 - 1))
    except (OSError, AttributeError):  # no such library, or one without mallopt (macOS, musl)
        kept = False
    if not kept:
        log.warning(
            "process.keep_cpu_memory: this C library has no glibc mallopt; freed memory goes back to the "
            "OS as usual"
        )
    return kept


def compile_model(model: nn.Module, mode: str) -> nn.Module:
    if not hasattr(torch, "compile"):
        raise UserError("trainer.compile: this torch has no torch.compile; set trainer.compile=false")
    return torch.compile(model, mode=mode)
