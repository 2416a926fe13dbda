"""More than one process: `torchrun --nproc_per_node=N -m trainer ...` trains with torch.distributed.

Every rank composes the same config; `SharedRunDir` makes them agree on one run dir (rank 0's) before
Hydra creates it, and leaves the writing to rank 0: ranks above 0 write no .hydra/ folder and log
only warnings, to the console. Everything else reads `rank()` and `world_size()` from here.
"""

import atexit
import contextlib
import io
import logging
import os
import sys
from collections.abc import Iterator
from datetime import timedelta
from typing import Any

import torch
import torch.distributed as dist
from hydra.experimental.callback import Callback
from omegaconf import DictConfig, OmegaConf, open_dict, read_write
from torch import nn

from trainer.core.errors import UserError

log = logging.getLogger("trainer")


def launched() -> bool:
    """Started by torchrun (or another launcher that sets the env:// variables) with several processes."""
    return int(os.environ.get("WORLD_SIZE", "1")) > 1


def init() -> None:
    """Joins the process group: NCCL between GPUs, gloo on CPUs. Called before Hydra composes."""
    if not launched() or dist.is_initialized():
        return
    cuda = torch.cuda.is_available()
    if cuda:
        torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", "0")))
    dist.init_process_group("nccl" if cuda else "gloo", timeout=timedelta(minutes=30))
    atexit.register(_leave)  # however the process ends: an exit with the group alive can abort in C++


@contextlib.contextmanager
def submitit_tasks() -> Iterator[None]:
    """A sweep job that submitit runs as several tasks (hydra.launcher.nodes or tasks_per_node above 1,
    on Slurm or submitit_local) is one torch.distributed job: submitit names each task's rank and the
    first node, which become the env:// variables torchrun would set. Rank 0 writes the job's records
    and log; the others log warnings to their own stderr. Anything else: nothing to do."""
    tasks = 1
    if not launched() and os.environ.get("SUBMITIT_EXECUTOR"):
        from submitit import JobEnvironment

        tasks = JobEnvironment().num_tasks
    if tasks <= 1:
        yield
        return
    from submitit.helpers import TorchDistributedEnvironment

    TorchDistributedEnvironment().export(set_cuda_visible_devices=False)
    init()
    if not is_main():
        root = logging.getLogger()
        for handler in [h for h in root.handlers if isinstance(h, logging.FileHandler)]:
            root.removeHandler(handler)  # rank 0's train.log
        root.setLevel(logging.WARNING)
    try:
        yield
    finally:
        shutdown()


def shutdown() -> None:
    """The end of a run: wait for every process (rank 0 may still be exporting), then leave the group.
    Processes that exit at once with the group still open can race in its teardown (seen: gloo's
    "terminate called without an active exception", SIGABRT, when two ranks ended together)."""
    if active():
        try:
            dist.barrier()
        except RuntimeError:  # a peer has already failed and gone: its error is what the launcher reports
            pass
    _leave()


def end_process() -> None:
    """The end of a successful `python -m trainer`: `shutdown()`, and a process of several then exits at
    once (exit code 0), its logs and streams flushed. The interpreter's finalisation is skipped: gloo's
    threads can still hold finished work with tensors in it (DDP's gradient buckets), and freeing them
    while the interpreter is torn down aborts the process now and then ("terminate called without an
    active exception", SIGABRT: pytorch/pytorch#179291), which torchrun reports as a failed run."""
    several = active()
    shutdown()
    if several:
        logging.shutdown()
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(0)


def _leave() -> None:
    if dist.is_available() and dist.is_initialized():
        try:
            dist.destroy_process_group()
        except Exception:  # already torn down by the launcher, or a failed peer: nothing left to do
            pass


def active() -> bool:
    return dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1


def rank() -> int:
    return dist.get_rank() if active() else 0


def world_size() -> int:
    return dist.get_world_size() if active() else 1


def is_main() -> bool:
    return rank() == 0


def device_for(device: torch.device) -> torch.device:
    """Each rank's own GPU (LOCAL_RANK); the CPU stays the CPU."""
    if active() and device.type == "cuda":
        return torch.device("cuda", int(os.environ.get("LOCAL_RANK", "0")))
    return device


def all_reduce(values: torch.Tensor, op: str = "sum") -> torch.Tensor:
    """Sums (or takes the max or min of) a tensor across ranks, in place; a no-op in one process."""
    if active():
        dist.all_reduce(
            values, op={"sum": dist.ReduceOp.SUM, "max": dist.ReduceOp.MAX, "min": dist.ReduceOp.MIN}[op]
        )
    return values


def all_gather_rows(rows: torch.Tensor) -> torch.Tensor:
    """Every rank's rows (dim 0, any count per rank) concatenated in rank order, on every rank; the
    tensor itself in one process. For metrics that need every sample (mAP), not just sums."""
    if not active():
        return rows
    counts = [torch.zeros(1, dtype=torch.long, device=rows.device) for _ in range(world_size())]
    dist.all_gather(counts, torch.tensor([len(rows)], device=rows.device))
    most = max(int(c) for c in counts)
    padded = torch.zeros(most, *rows.shape[1:], dtype=rows.dtype, device=rows.device)
    padded[: len(rows)] = rows
    gathered = [torch.empty_like(padded) for _ in range(world_size())]
    dist.all_gather(gathered, padded)
    return torch.cat([g[: int(c)] for g, c in zip(gathered, counts)])


def average_gradients(model: torch.nn.Module) -> None:
    """The mean of every process's gradients, in one all-reduce of them all flattened."""
    from torch._utils import _flatten_dense_tensors, _unflatten_dense_tensors

    grads = [p.grad for p in model.parameters() if p.grad is not None]
    flat = all_reduce(_flatten_dense_tensors(grads)) / world_size()
    for grad, mean in zip(grads, _unflatten_dense_tensors(flat, grads), strict=True):
        grad.copy_(mean)


def mean_over_processes(value: torch.Tensor) -> float:
    return float(all_reduce(value.detach().float().cpu().clone()) / world_size())


def gathered(mine: Any) -> list[Any]:
    """Every process's `mine`, in rank order (on every process); [mine] in one process."""
    if not active():
        return [mine]
    # As torch.save's bytes: all_gather_object's own pickling of tensors fails in torch 2.14
    # ("UntypedStorage has no attribute dtype"), and these are tensors and plain values only.
    buffer = io.BytesIO()
    torch.save(mine, buffer)
    found: list[Any] = [None] * world_size()
    dist.all_gather_object(found, buffer.getvalue())
    return [torch.load(io.BytesIO(data), weights_only=True) for data in found]


def barrier() -> None:
    if active():
        dist.barrier()


def wrap(model: nn.Module, device: torch.device, sync_batchnorm: bool) -> nn.Module:
    """DistributedDataParallel: gradients all-reduced in the backward pass, buffers from rank 0."""
    if not active():
        return model
    if sync_batchnorm:
        if device.type != "cuda":
            raise UserError(
                "trainer.sync_batchnorm: needs CUDA (SyncBatchNorm has no CPU kernels); set "
                "trainer.sync_batchnorm=false"
            )
        model = nn.SyncBatchNorm.convert_sync_batchnorm(model)
    return nn.parallel.DistributedDataParallel(
        model, device_ids=[device.index] if device.type == "cuda" else None
    )


def broadcast_module(model: nn.Module) -> None:
    """Rank 0's parameters and buffers on every rank (after a data-dependent initialisation)."""
    if active():
        for tensor in [*model.parameters(), *model.buffers()]:
            dist.broadcast(tensor.data, src=0)


CONSOLE_WARNINGS = {  # the logging of ranks above 0: warnings, to the console, no train.log
    "version": 1,
    "formatters": {
        "rank": {
            "format": "[%(asctime)s][rank %(process)d][%(levelname)s] %(message)s",
            "datefmt": "%H:%M:%S",
        }
    },
    "handlers": {
        "console": {"class": "logging.StreamHandler", "formatter": "rank", "stream": "ext://sys.stderr"}
    },
    "root": {"level": "WARNING", "handlers": ["console"]},
    "disable_existing_loggers": False,
}


class SharedRunDir(Callback):
    """One run dir for all ranks, rank 0's; written by rank 0 alone."""

    def on_run_start(self, config: DictConfig, **kwargs: Any) -> None:
        if not active():
            return
        chosen = [OmegaConf.select(config, "hydra.run.dir") if is_main() else None]
        dist.broadcast_object_list(chosen, src=0)  # ${now:...} may differ by a second between ranks
        with read_write(config), open_dict(config):
            config.hydra.run.dir = chosen[0]
            if not is_main():
                config.hydra.output_subdir = None
                config.hydra.job_logging = CONSOLE_WARNINGS

    def on_multirun_start(self, config: DictConfig, **kwargs: Any) -> None:
        if active():  # SystemExit: Hydra turns a callback's exceptions into warnings
            print(
                "error: torchrun with -m/--multirun: every process would run the whole sweep; sweep without "
                "torchrun (one process per job), or torchrun one run at a time",
                file=sys.stderr,
            )
            raise SystemExit(2)
