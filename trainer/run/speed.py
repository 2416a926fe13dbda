"""What makes a step fast, set up once: backend flags, memory format, torch.compile and its warm-up,
and an exponential moving average of the weights."""

import copy
import logging

import torch
from torch import Tensor, nn

from trainer.core.errors import UserError

log = logging.getLogger("trainer")


def configure_backends(
    device: torch.device,
    cudnn_benchmark: bool,
    precision: str,
    threads: int | None,
    keep_cpu_memory: bool = False,
) -> None:
    if threads:
        torch.set_num_threads(threads)
    if keep_cpu_memory:
        keep_freed_memory()
    if device.type == "cpu" and precision == "bf16" and not torch.ops.mkldnn._is_mkldnn_bf16_supported():
        log.warning(
            "trainer.precision=bf16: this CPU has no native bfloat16, so it is emulated and much slower "
            "(16x for fastnet, measured); trainer.precision=32 is faster here"
        )
    if device.type == "cuda":
        # The shapes are fixed for a whole run: benchmarking the algorithms once pays back within steps.
        torch.backends.cudnn.benchmark = cudnn_benchmark
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
            "trainer.keep_cpu_memory: this C library has no glibc mallopt; freed memory goes back to the "
            "OS as usual"
        )
    return kept


def compile_model(model: nn.Module, mode: str) -> nn.Module:
    if not hasattr(torch, "compile"):
        raise UserError("trainer.compile: this torch has no torch.compile; set trainer.compile=false")
    return torch.compile(model, mode=mode)


class WeightAverage:
    """An exponential moving average of a model's parameters and floating-point buffers, kept as a
    module of its own to evaluate, test and export. Updated with foreach kernels on the device and
    no host synchronisation (torch's AveragedModel compares a device counter on the host each update).

    `power` > 0 ramps the decay up over training, `decay * (step / total_steps) ** power`: early weights
    are soon forgotten, late ones averaged over more steps (the speed record's schedule, power 3).
    `lookahead`: after each update the model itself continues from the average (Lookahead: the fast
    weights are pulled back to the slow ones), as the speed record does; without it the average only
    watches."""

    def __init__(
        self,
        model: nn.Module,
        decay: float,
        every: int,
        power: float = 0.0,
        total_steps: int = 1,
        lookahead: bool = False,
    ) -> None:
        self.decay, self.every, self.power, self.lookahead = decay, every, power, lookahead
        self.total_steps = total_steps
        self.module = copy.deepcopy(model).eval().requires_grad_(False)

    def _pairs(self, model: nn.Module) -> tuple[list[Tensor], list[Tensor]]:
        ours = [*self.module.parameters(), *(b for b in self.module.buffers() if b.is_floating_point())]
        theirs = [*model.parameters(), *(b for b in model.buffers() if b.is_floating_point())]
        return ours, theirs

    def decay_at(self, step: int) -> float:
        return self.decay * min(step / self.total_steps, 1.0) ** self.power if self.power else self.decay

    @torch.no_grad()
    def update(self, model: nn.Module, step: int) -> None:
        if step % self.every == 0:
            ours, theirs = self._pairs(model)
            torch._foreach_lerp_(ours, theirs, 1 - self.decay_at(step))
            if self.lookahead:
                torch._foreach_copy_(theirs, ours)

    @torch.no_grad()
    def reset(self, model: nn.Module) -> None:
        """Start the average over from the model's current weights (after a data-dependent init)."""
        self.module.load_state_dict(model.state_dict())
