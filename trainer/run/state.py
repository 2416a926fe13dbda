"""Everything a run trains and holds, built by the recipe and read by the loop: the model (as stepped,
and plain), its optimizer, schedule, loss scaler and weights' average, the data, the task; and how it
all becomes a checkpoint's state and back."""

import logging
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn
from torch.optim import Optimizer
from torch.optim.lr_scheduler import LambdaLR

from trainer.core.checkpoint import rng_state, set_rng_state
from trainer.core.hooks import ModelHooks
from trainer.data import Loaders
from trainer.optim import load_optimizer_state, rates_from_config
from trainer.run.ema import WeightAverage
from trainer.run.progress import Progress
from trainer.tasks.abilities import TestTimeAugmentation
from trainer.tasks.base import Task

log = logging.getLogger("trainer")


@dataclass
class TrainingState:
    model: nn.Module  # what steps: the plain model, or its DDP or compiled wrapper
    plain: nn.Module  # the model itself: what checkpoints and exports hold
    optimizer: Optimizer
    scheduler: LambdaLR
    scaler: torch.amp.GradScaler
    loaders: Loaders
    task: Task
    device: torch.device
    config: dict[str, Any]  # the resolved config, plain: in every checkpoint
    model_args: dict[str, Any]  # what the model was built with (its name, parameters and the data's facts)
    ema: WeightAverage | None = None
    freezer: Any = None  # trainer.run.finetune.Freezer: which parameters train in each epoch; None: all

    def train_mode(self, epoch: int, quiet: bool = False) -> None:
        """The model as it trains in `epoch` (0-based): train mode, and the parameters that train then
        (finetune.freeze until finetune.unfreeze_at_epoch; the model's own start_epoch hook)."""
        self.model.train()
        if self.freezer is not None:
            self.freezer.apply(epoch, quiet=quiet)
        if isinstance(self.plain, ModelHooks):
            self.plain.start_epoch(epoch)

    def evaluated(self, tta: bool = True, plain: bool = False) -> nn.Module:
        """What is evaluated, tested and exported: the weights' average when there is one, under the
        task's test-time augmentation (unless `tta` is false: validation with trainer.val_tta=false).
        `plain`: never a compiled or DDP wrapper, and as the model exports itself (LoRA merged; for the
        export; with several processes each evaluates its share, and DDP's forward would only add a
        buffer broadcast)."""
        from trainer.core import distributed

        if self.ema is not None:
            model = self.ema.module
        else:
            model = self.plain if plain or distributed.active() else self.model
        if plain and isinstance(model, ModelHooks):
            model = model.for_export()
        return self.task.evaluated(model) if tta and isinstance(self.task, TestTimeAugmentation) else model

    # ---- checkpoints --------------------------------------------------------------------------------
    def state_dict(self, progress: Progress, metric_log: Any) -> dict[str, Any]:
        from trainer import __version__

        return {
            "model": self.plain.state_dict(),
            "optimizer": self.optimizer.state_dict(),
            "scheduler": self.scheduler.state_dict(),
            "scaler": self.scaler.state_dict(),
            "progress": progress.state_dict(),
            "rng": rng_state(),
            "config": self.config,
            "model_args": self.model_args,
            "ema": None if self.ema is None else self.ema.module.state_dict(),
            "task": self.task.state_dict(),
            "loggers": metric_log.state_dict(),
            "version": __version__,
        }

    def load_training(self, state: dict[str, Any], progress: Progress, checkpoint: Any) -> None:
        """Restores a checkpoint's training state (checkpoint.reset_optimizer and reset_scheduler say what
        starts fresh). The current config's optimizer hyperparameters win over the saved ones (with a
        warning when they differ), so an override given on resume is never ignored."""
        self.load_weights(state)
        progress.load_state_dict(state["progress"])
        if checkpoint.reset_optimizer:
            log.warning("checkpoint.reset_optimizer: optimizer state (momentum, moments) starts fresh")
        else:
            load_optimizer_state(self.optimizer, state["optimizer"])
        if checkpoint.reset_scheduler:
            progress.schedule_start = progress.step
            log.warning(
                "checkpoint.reset_scheduler: the learning-rate schedule restarts at step %d", progress.step
            )
        else:
            self.scheduler.load_state_dict(state["scheduler"])
        rates_from_config(self.scheduler, self.optimizer)
        self.scaler.load_state_dict(state["scaler"])
        set_rng_state(state["rng"])
        log.info(
            "resumed at epoch %d, batch %d, step %d", progress.epoch, progress.batches_in_epoch, progress.step
        )

    def load_weights(self, state: dict[str, Any]) -> None:
        self.plain.load_state_dict(state["model"])
        if self.ema is not None:
            if state.get("ema") is None:  # a checkpoint from before ema.decay was set
                self.ema.reset(self.plain)
            else:
                self.ema.module.load_state_dict(state["ema"])
