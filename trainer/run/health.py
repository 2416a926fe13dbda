"""The checks that keep a run sound: losses and weights that stop being finite, and processes that
agree on when to stop. Each sync here is deliberate: once per log interval, epoch or checkpoint."""

import logging
import math
from typing import Any

import torch

from trainer.core import distributed
from trainer.run.progress import NONFINITE_CAUSES, NonFiniteLoss, Progress
from trainer.run.running import RunningLoss

log = logging.getLogger("trainer")


def check_finite_loss(running: RunningLoss, epoch: int) -> None:
    step = running.first_nonfinite_step()
    if step is not None:
        raise NonFiniteLoss(
            f"trainer: the loss became NaN or Inf at step {step} (epoch {epoch + 1}); stopped "
            f"without saving, the last good checkpoint is kept. {NONFINITE_CAUSES}"
        )


def check_finite_validation(val: dict[str, float], train: dict[str, float], epoch: int) -> None:
    """Diverged: finite training losses, overflowing weights."""
    if not math.isfinite(val["val/loss"]):
        raise NonFiniteLoss(
            f"trainer: the validation loss is NaN or Inf after epoch {epoch + 1} (training loss "
            f"{train['train/loss']:.4g}); stopped without saving, the last good checkpoint is kept. "
            f"{NONFINITE_CAUSES}"
        )


def check_finite_weights(state: dict[str, Any], step: int) -> None:
    tensors = (getattr(t, "_local_tensor", t) for t in state["model"].values())  # a shard: this process's
    floats = [t.isfinite().all() for t in tensors if isinstance(t, torch.Tensor) and t.is_floating_point()]
    if floats and not bool(torch.stack(floats).all()):  # one host sync for the whole model
        raise NonFiniteLoss(
            f"trainer: the weights became NaN or Inf by step {step}; stopped without saving, the "
            f"last good checkpoint is kept. {NONFINITE_CAUSES}"
        )


def skip_batch(progress: Progress, most: int) -> None:
    """trainer.on_nonfinite=skip_batch: this batch's loss was not finite; counted, and past `most` a stop."""
    progress.skipped_batches += 1
    log.warning(
        "non-finite loss at step %d: batch skipped (%d so far)", progress.step + 1, progress.skipped_batches
    )
    if progress.skipped_batches > most:
        raise NonFiniteLoss(
            f"trainer.max_skipped_batches: {progress.skipped_batches} batches had a non-finite "
            f"loss (by step {progress.step + 1}); {NONFINITE_CAUSES}"
        )


def stop_agreed(stop: Any, device: torch.device, at_check: bool) -> bool:
    """Whether to stop for a signal. One process stops at the next step; several agree first, at the next
    check (a log interval, an epoch's end), so that all of them stop at the same step."""
    if not distributed.active():
        return bool(stop.signum)
    if not at_check:
        return False
    flag = distributed.all_reduce(torch.tensor([float(stop.signum or 0)], device=device), "max")
    agreed = int(flag.item())
    # A signal can land while this process waits in the all-reduce: keep it for the next check, never
    # overwrite it with the "no" the others answered before it came.
    stop.signum = stop.signum or agreed or None
    return bool(agreed)


def loss_weight(sampler: Any, batches_in_epoch: int, samples: int) -> float:
    """With several processes, DDP averages their gradients; weighting each process's mean loss by its
    share of the global batch makes that the global batch's mean even when shares differ."""
    if not distributed.active():
        return 1.0
    start, end = sampler.plan.bounds(batches_in_epoch - 1)
    return samples * distributed.world_size() / (end - start)
