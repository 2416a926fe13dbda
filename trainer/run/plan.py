"""What the run derives from its config, resolved once into one typed object that every part reads: the
step plan, the precision, compilation, the monitor and its mode, the validation rhythm."""

import math
from dataclasses import dataclass

import torch
from omegaconf import DictConfig

from trainer.core.errors import UserError
from trainer.run.devices import AUTOCAST_DTYPES
from trainer.tasks.base import Task, resolve_monitor


@dataclass(frozen=True)
class RunPlan:
    max_epochs: int
    batches_per_epoch: int  # training batches an epoch takes (trainer.limit_train_batches applied)
    steps_per_epoch: int  # optimizer steps an epoch takes (gradient accumulation applied)
    total_steps: int  # optimizer steps the whole run takes (trainer.max_steps applied)
    accumulate: int  # batches per optimizer step
    autocast_dtype: torch.dtype | None  # None: full precision, no autocast
    compile: bool
    compile_mode: str
    channels_last: bool
    monitor: str  # what makes best.pt best (checkpoint.monitor, or the task's default)
    mode: str  # max or min (checkpoint.mode, or the monitored metric's own)
    stop_at: float | None
    val_every_n_epochs: int
    val_tta: bool
    # read every step, so plain attributes (a DictConfig read costs microseconds)
    limit_val_batches: int | None
    gradient_clip_val: float
    log_every_n_steps: int
    progress_bar: bool
    on_nonfinite: str
    max_skipped_batches: int
    profile: bool
    profile_steps: int
    every_n_epochs: int  # checkpoint.*
    every_n_steps: int
    keep_last: int

    @classmethod
    def resolve(cls, cfg: DictConfig, train_batches: int, task: Task, device: torch.device) -> "RunPlan":
        t, ck = cfg.trainer, cfg.checkpoint
        batches = min(train_batches, t.limit_train_batches) if t.limit_train_batches else train_batches
        steps_per_epoch = math.ceil(batches / t.accumulate_grad_batches)
        total = steps_per_epoch * t.max_epochs
        dtype = AUTOCAST_DTYPES[str(t.precision)]
        if dtype is torch.float16 and device.type != "cuda":
            raise UserError(
                "trainer.precision=16: float16 with loss scaling needs a CUDA device; use bf16 here"
            )
        monitor, mode = resolve_monitor(task, ck.monitor, ck.mode)
        return cls(
            max_epochs=t.max_epochs,
            batches_per_epoch=batches,
            steps_per_epoch=steps_per_epoch,
            total_steps=min(total, t.max_steps) if t.max_steps > 0 else total,
            accumulate=t.accumulate_grad_batches,
            autocast_dtype=dtype,
            compile=bool(t.compile),
            compile_mode=t.compile_mode,
            channels_last=t.channels_last,
            monitor=monitor,
            mode=mode or "max",
            stop_at=t.stop_at,
            val_every_n_epochs=t.val_every_n_epochs,
            val_tta=t.val_tta,
            limit_val_batches=t.limit_val_batches,
            gradient_clip_val=t.gradient_clip_val,
            log_every_n_steps=t.log_every_n_steps,
            progress_bar=t.progress_bar,
            on_nonfinite=t.on_nonfinite,
            max_skipped_batches=t.max_skipped_batches,
            profile=t.profile,
            profile_steps=t.profile_steps,
            every_n_epochs=ck.every_n_epochs,
            every_n_steps=ck.every_n_steps,
            keep_last=ck.keep_last,
        )

    def improved(self, value: float | None, best: float | None) -> bool:
        """Whether the monitored metric's `value` beats `best` (a missing or non-finite value never does)."""
        if value is None or not math.isfinite(value):
            return False
        return best is None or (value > best if self.mode == "max" else value < best)

    def reached(self, value: float | None) -> bool:
        """trainer.stop_at: the monitored metric has reached the target (time-to-accuracy runs)."""
        if self.stop_at is None or value is None:
            return False
        return value >= self.stop_at if self.mode == "max" else value <= self.stop_at

    def validates_after(self, epoch: int, step: int) -> bool:
        """Whether the epoch just trained (1-based `epoch`) is validated: every val_every_n_epochs, and
        always the last."""
        return epoch % self.val_every_n_epochs == 0 or epoch >= self.max_epochs or step >= self.total_steps

    def finished(self, epoch: int, step: int) -> bool:
        return epoch >= self.max_epochs or step >= self.total_steps
