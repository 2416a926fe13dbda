"""SCHEDULERS: every scheduler is a LambdaLR over optimizer steps: the learning rate is a pure function
of the step count, so a resumed run recomputes it exactly, and a run extended to more epochs
recomputes the schedule for the new horizon."""

import math

from torch.optim import Optimizer
from torch.optim.lr_scheduler import LambdaLR

from trainer.core.errors import UserError
from trainer.core.registry import SCHEDULERS


def plan_steps(
    train_batches: int, limit: int | None, accumulate: int, max_epochs: int, max_steps: int
) -> tuple[int, int, int]:
    """(batches per epoch, optimizer steps per epoch, total optimizer steps) for the schedule."""
    batches = min(train_batches, limit) if limit else train_batches
    steps_per_epoch = math.ceil(batches / accumulate)
    total = steps_per_epoch * max_epochs
    return batches, steps_per_epoch, min(total, max_steps) if max_steps > 0 else total


def _warmup_steps(warmup_epochs: float, steps_per_epoch: int, total_steps: int) -> int:
    if warmup_epochs < 0:
        raise UserError(f"scheduler.warmup_epochs: must be 0 or more, got {warmup_epochs}")
    return min(int(round(warmup_epochs * steps_per_epoch)), max(total_steps - 1, 0))


@SCHEDULERS.register("cosine")
def cosine(
    *,
    optimizer: Optimizer,
    total_steps: int,
    steps_per_epoch: int,
    warmup_epochs: float,
    min_lr_ratio: float,
) -> LambdaLR:
    """Linear warmup from ~0, then cosine decay to min_lr_ratio * lr at the last step."""
    warmup = _warmup_steps(warmup_epochs, steps_per_epoch, total_steps)

    def factor(step: int) -> float:
        if step < warmup:
            return (step + 1) / (warmup + 1)
        progress = min((step - warmup) / max(total_steps - warmup, 1), 1.0)
        return min_lr_ratio + (1 - min_lr_ratio) * 0.5 * (1 + math.cos(math.pi * progress))

    return LambdaLR(optimizer, factor)


@SCHEDULERS.register("onecycle")
def onecycle(
    *,
    optimizer: Optimizer,
    total_steps: int,
    steps_per_epoch: int,
    pct_start: float,
    div_factor: float,
    final_div_factor: float,
) -> LambdaLR:
    """Leslie Smith's one-cycle learning rate (cosine up to lr, then down), without momentum cycling."""
    if not 0 < pct_start < 1:
        raise UserError(f"scheduler.pct_start: must be in (0, 1), got {pct_start}")
    peak = max(int(pct_start * total_steps), 1)
    start, end = 1 / div_factor, 1 / (div_factor * final_div_factor)

    def factor(step: int) -> float:
        if step < peak:
            return start + (1 - start) * 0.5 * (1 - math.cos(math.pi * step / peak))
        progress = min((step - peak) / max(total_steps - peak, 1), 1.0)
        return end + (1 - end) * 0.5 * (1 + math.cos(math.pi * progress))

    return LambdaLR(optimizer, factor)


@SCHEDULERS.register("linear")
def linear(
    *,
    optimizer: Optimizer,
    total_steps: int,
    steps_per_epoch: int,
    warmup_epochs: float,
    final_lr_ratio: float,
    start_lr_ratio: float,
) -> LambdaLR:
    """Linear warmup from start_lr_ratio * lr (0: from ~0), then a straight line down to
    final_lr_ratio * lr at the last step."""
    if not 0 <= start_lr_ratio <= 1:
        raise UserError(f"scheduler.start_lr_ratio: must be in [0, 1], got {start_lr_ratio}")
    warmup = _warmup_steps(warmup_epochs, steps_per_epoch, total_steps)

    def factor(step: int) -> float:
        if step < warmup:
            return start_lr_ratio + (1 - start_lr_ratio) * (step + 1) / (warmup + 1)
        progress = min((step - warmup) / max(total_steps - warmup, 1), 1.0)
        return 1 - (1 - final_lr_ratio) * progress

    return LambdaLR(optimizer, factor)


@SCHEDULERS.register("step")
def step(
    *, optimizer: Optimizer, total_steps: int, steps_per_epoch: int, step_epochs: int, gamma: float
) -> LambdaLR:
    """Multiplies the learning rate by gamma every step_epochs epochs."""
    if step_epochs < 1:
        raise UserError(f"scheduler.step_epochs: must be 1 or more, got {step_epochs}")
    return LambdaLR(optimizer, lambda s: gamma ** (s // (step_epochs * steps_per_epoch)))


@SCHEDULERS.register("constant")
def constant(
    *, optimizer: Optimizer, total_steps: int, steps_per_epoch: int, warmup_epochs: float
) -> LambdaLR:
    warmup = _warmup_steps(warmup_epochs, steps_per_epoch, total_steps)
    return LambdaLR(optimizer, lambda s: (s + 1) / (warmup + 1) if s < warmup else 1.0)


def rates_from_config(scheduler: LambdaLR, optimizer: Optimizer) -> None:
    """The schedule is a function of the step: the current rates, from the configured base rates."""
    scheduler.base_lrs = [g["initial_lr"] for g in optimizer.param_groups]
    rates = [base * f(scheduler.last_epoch) for base, f in zip(scheduler.base_lrs, scheduler.lr_lambdas)]
    for group, rate in zip(optimizer.param_groups, rates):
        group["lr"] = rate
    scheduler._last_lr = rates
