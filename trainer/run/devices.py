"""Where and how a model runs: the device, mixed precision, the plain module under torch.compile and
DDP wrappers, and an evaluation pass; shared by training, `python -m trainer.evaluate` and the
benchmarks."""

import contextlib
import itertools
from collections.abc import Iterable

import torch
from torch import nn

from trainer.tasks.base import Task, move
from trainer.tasks.metrics import MetricSet

AUTOCAST_DTYPES = {"32": None, "bf16": torch.bfloat16, "16": torch.float16}


def unwrap(model: nn.Module) -> nn.Module:
    """The plain module under torch.compile or DDP wrappers: checkpoints hold its state, no prefixes."""
    model = getattr(model, "_orig_mod", model)
    return getattr(model, "module", model)


@torch.no_grad()
def evaluate_model(
    model: nn.Module,
    loader: Iterable,
    device: torch.device,
    autocast_dtype: torch.dtype | None,
    task: Task,
    limit: int | None = None,
    channels_last: bool = False,
) -> dict[str, float]:
    """The loss and the task's metrics over the loader's first `limit` batches (all when None), exact
    over the split and every process."""
    model.eval()
    metrics = MetricSet(task.metrics(), device)
    for batch in itertools.islice(loader, limit):
        batch = move(batch, device, channels_last)
        with autocast(device, autocast_dtype):
            outputs = model(task.inputs(batch))
        outputs = outputs.float()
        metrics.update(task, outputs, batch, task.loss(outputs, batch), task.count(batch))
    return metrics.compute()  # deliberate sync: once per evaluation


def autocast(device: torch.device, dtype: torch.dtype | None) -> contextlib.AbstractContextManager:
    """Mixed precision when a dtype is set; otherwise no context at all (it costs even when disabled)."""
    return torch.autocast(device.type, dtype=dtype) if dtype is not None else contextlib.nullcontext()
