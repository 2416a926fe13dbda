"""Where and how a model runs: the device, mixed precision, the plain module under torch.compile and
DDP wrappers, and an evaluation pass; shared by training, `python -m trainer.evaluate` and the
benchmarks."""

import contextlib
import itertools
from collections.abc import Iterable
from typing import TYPE_CHECKING

import torch
from torch import nn

from trainer.core.errors import UserError
from trainer.tasks.base import move

if TYPE_CHECKING:
    from trainer.tasks.base import Task

AUTOCAST_DTYPES = {"32": None, "bf16": torch.bfloat16, "16": torch.float16}


def pick_device(name: str) -> torch.device:
    if name == "auto":
        if torch.cuda.is_available():
            return torch.device("cuda")
        return torch.device("mps" if torch.backends.mps.is_available() else "cpu")
    if name == "cuda" and not torch.cuda.is_available():
        raise UserError("trainer.device=cuda: no CUDA device is visible here; use trainer.device=auto or cpu")
    if name == "mps" and not torch.backends.mps.is_available():
        raise UserError(
            "trainer.device=mps: Apple's MPS is not available here; use trainer.device=auto or cpu"
        )
    return torch.device(name)


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
    task: "Task",
    limit: int | None = None,
    channels_last: bool = False,
) -> dict[str, float]:
    """The task's metrics (with "loss") over the loader's first `limit` batches (all when None), exact
    over the split and every process."""
    model.eval()
    evaluation = task.evaluation(device)
    for batch in itertools.islice(loader, limit):
        batch = move(batch, device, channels_last)
        with autocast(device, autocast_dtype):
            outputs = model(task.inputs(batch))
        evaluation.update(outputs, batch)
    return evaluation.compute()  # deliberate sync: once per evaluation


def autocast(device: torch.device, dtype: torch.dtype | None) -> contextlib.AbstractContextManager:
    """Mixed precision when a dtype is set; otherwise no context at all (it costs even when disabled)."""
    return torch.autocast(device.type, dtype=dtype) if dtype is not None else contextlib.nullcontext()
