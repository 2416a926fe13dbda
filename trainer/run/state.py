"""Everything a run trains and holds, built by the recipe and read by the loop: the model (as stepped,
and plain), its optimizer, schedule, loss scaler and weights' average, the data, the task; and how it
all becomes a checkpoint's state and back."""

import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn
from torch.optim import Optimizer
from torch.optim.lr_scheduler import LambdaLR

from trainer.core.checkpoint import rng_state, set_rng_state
from trainer.core.errors import UserError
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
    sharded: bool = False  # trainer.strategy=fsdp: the model (and average) sharded over the processes

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
    def state_dict(self, progress: Progress, metric_log: Any, best: bool = False) -> dict[str, Any]:
        """Everything a checkpoint holds. Sharded: each process's shards of the model, optimizer and
        average (torch.distributed.checkpoint's state dicts), and for `best` the whole model gathered on
        rank 0 too (every process calls this then: gathering is a collective)."""
        from trainer import __version__

        state = {
            "scheduler": self.scheduler.state_dict(),
            "scaler": self.scaler.state_dict(),
            "progress": progress.state_dict(),
            "rng": rng_state(),
            "config": self.config,
            "model_args": self.model_args,
            "task": self.task.state_dict(),
            "loggers": metric_log.state_dict(),
            "version": __version__,
        }
        ema = None if self.ema is None else self.ema.module
        if not self.sharded:
            return {
                **state,
                "model": self.plain.state_dict(),
                "optimizer": self.optimizer.state_dict(),
                "ema": None if ema is None else ema.state_dict(),
            }
        from trainer.run import sharding

        state.update(sharding.sharded_state(self.plain, self.optimizer, ema))
        if best:
            state["full_model"] = sharding.full_model_state(self.plain)
            state["full_ema"] = None if ema is None else sharding.full_model_state(ema)
        return state

    def load_training(self, state: dict[str, Any], progress: Progress, checkpoint: Any) -> None:
        """Restores a checkpoint's training state (checkpoint.reset_optimizer and reset_scheduler say what
        starts fresh). The current config's optimizer hyperparameters win over the saved ones (with a
        warning when they differ), so an override given on resume is never ignored."""
        progress.load_state_dict(state["progress"])
        if "sharded" in state:
            self.load_sharded(state, load_optimizer=not checkpoint.reset_optimizer)
        else:
            self.load_weights(state)
            if state["optimizer"] is None and not checkpoint.reset_optimizer:
                raise UserError(
                    "resume: this checkpoint holds no optimizer state (an fsdp run's best.pt: the whole "
                    "model only); resume from the run dir, or add checkpoint.reset_optimizer=true"
                )
            if self.sharded and not checkpoint.reset_optimizer:
                raise UserError(
                    "trainer.strategy=fsdp: this checkpoint is a single file (trainer.strategy=auto or ddp), "
                    "whose optimizer state is not sharded; resume it with trainer.strategy=ddp, or add "
                    "checkpoint.reset_optimizer=true to go on from its weights"
                )
        if checkpoint.reset_optimizer:
            log.warning("checkpoint.reset_optimizer: optimizer state (momentum, moments) starts fresh")
        elif "sharded" not in state:
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
        if state.get("rng") is not None:
            set_rng_state(state["rng"])
        log.info(
            "resumed at epoch %d, batch %d, step %d", progress.epoch, progress.batches_in_epoch, progress.step
        )

    def load_weights(self, state: dict[str, Any]) -> None:
        """A single-file checkpoint's whole weights (into the shards, when sharded)."""

        def load(module: nn.Module, weights: dict[str, Any]) -> None:
            if self.sharded:
                from trainer.run.sharding import load_full_model_state

                load_full_model_state(module, weights)
            else:
                module.load_state_dict(weights)

        load(self.plain, state["model"])
        if self.ema is not None:
            if state.get("ema") is None:  # a checkpoint from before ema.decay was set
                self.ema.reset(self.plain)
            else:
                load(self.ema.module, state["ema"])

    def load_sharded(self, state: dict[str, Any], load_optimizer: bool) -> None:
        """A sharded checkpoint folder's model, optimizer and average, resharded to this run's processes
        (or whole, for a run that is not sharded); each process's random generators when the number of
        processes is the same, so the run continues bit for bit."""
        from trainer.core import distributed
        from trainer.core.sharded_checkpoint import rng_of
        from trainer.run.sharding import load_sharded

        folder, ema = state["sharded"], None if self.ema is None else self.ema.module

        def load(optimizer: bool = True) -> None:
            load_sharded(folder, self.plain, self.optimizer, ema, optimizer)

        if load_optimizer:
            load_optimizer_state(self.optimizer, None, load=load)
        else:
            load(optimizer=False)
        state["rng"] = None
        if state["world_size"] == distributed.world_size():
            state["rng"] = rng_of(Path(folder), distributed.rank())
        else:
            log.warning(
                "resumed on %d processes a checkpoint written by %d: the weights, optimizer and schedule "
                "continue, resharded; the random generators start from the seed and the current epoch's "
                "remaining batches are dealt anew, so the run continues correctly, not bit for bit",
                distributed.world_size(), state["world_size"],
            )  # fmt: skip
