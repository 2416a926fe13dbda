"""The Trainer: setup in __init__, then fit() reads top to bottom: train an epoch, validate, report,
checkpoint. It never knows which model, dataset, optimizer or task it runs: batches are moved to the
device whole and the task (trainer/tasks/) says what the model takes, the loss and the metrics.

Longer than 300 lines: it is one class, and its parts (the epoch, the step, evaluation, the checkpoint
state) read best beside each other; the step plan, devices, timing and metrics live elsewhere."""

import contextlib
import itertools
import logging
import math
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import torch
from omegaconf import DictConfig, OmegaConf
from torch import Tensor, nn
from torch.optim import Optimizer
from torch.optim.lr_scheduler import LambdaLR
from torch.utils.data import DataLoader
from tqdm import tqdm

from trainer.core import distributed
from trainer.core.checkpoint import CheckpointWriter, rng_state, set_rng_state
from trainer.core.errors import UserError
from trainer.data import Loaders
from trainer.optim import load_optimizer_state, plan_steps, rates_from_config
from trainer.run.devices import AUTOCAST_DTYPES, autocast, evaluate_model, unwrap
from trainer.run.guard import StopRequested, guarded
from trainer.run.metrics import MetricLog, RunningMetrics, reports
from trainer.run.progress import NONFINITE_CAUSES, NonFiniteLoss, Progress
from trainer.run.speed import WeightAverage
from trainer.run.timing import PhaseTimer, profiled_iter, timed, timed_iter, timed_step
from trainer.tasks.base import Batch, Task, move, resolve_monitor, take

log = logging.getLogger("trainer")


def plain(section: Any) -> Any:
    """A config section as a plain object (its schema dataclass when it has one)."""
    if not isinstance(section, DictConfig):
        return section
    value = OmegaConf.to_object(section)
    return SimpleNamespace(**value) if isinstance(value, dict) else value


class Trainer:
    def __init__(
        self,
        model: nn.Module,
        optimizer: Optimizer,
        scheduler: LambdaLR,
        loaders: Loaders,
        *,
        settings: Any,
        checkpoint: Any,
        task: Task,
        device: torch.device,
        run_dir: Path,
        metrics: MetricLog,
        config: dict[str, Any],
        ema: WeightAverage | None = None,
        freezer: Any = None,
    ) -> None:
        """`freezer` (trainer.run.finetune.Freezer): which parameters train in each epoch; None: all of them."""
        self.model, self.optimizer, self.scheduler, self.loaders = model, optimizer, scheduler, loaders
        # Plain Python objects: read on every step, and a DictConfig attribute costs microseconds.
        self.settings, self.checkpointing = plain(settings), plain(checkpoint)
        self.device, self.metrics = device, metrics
        self.config = config  # resolved, plain: saved in every checkpoint
        self.ema, self.run_dir, self.task, self.freezer = ema, run_dir, task, freezer
        self.checkpointing.monitor, self.checkpointing.mode = resolve_monitor(
            task, checkpoint.monitor, checkpoint.mode
        )
        self.checkpoint_dir = run_dir / "checkpoints"
        # Once a checkpoint has landed, the trackers may have the points it covers (MetricLog).
        self.writer = CheckpointWriter(
            self.checkpoint_dir, checkpoint.keep_last, on_saved=metrics.checkpointed
        )
        self.autocast_dtype = AUTOCAST_DTYPES[str(settings.precision)]
        if self.autocast_dtype is torch.float16 and device.type != "cuda":
            raise UserError(
                "trainer.precision=16: float16 with loss scaling needs a CUDA device; use bf16 here"
            )
        self.scaler = torch.amp.GradScaler(device.type, enabled=self.autocast_dtype is torch.float16)
        self.batch_size = loaders.batch_size
        self.batches_per_epoch, _, self.total_steps = plan_steps(
            len(loaders.train),
            settings.limit_train_batches,
            settings.accumulate_grad_batches,
            settings.max_epochs,
            settings.max_steps,
        )
        self.progress = Progress()
        self.timer = PhaseTimer(device)
        self.stop_signal: int | None = None
        self.profiled = False

    # ---- the loop -------------------------------------------------------------------------------
    @guarded
    def fit(self) -> dict[str, float]:
        p = self.progress
        if p.step == 0:
            self.init_from_data()
        if self.settings.compile:
            self.warm_up()
        try:
            while (
                p.epoch < self.settings.max_epochs and p.step < self.total_steps and not self.target_reached()
            ):
                train = self.train_epoch()
                val = (
                    self.evaluate(self.loaders.val, self.settings.limit_val_batches, "val")
                    if self.validation_due()
                    else {}
                )
                if val and not math.isfinite(
                    val["val/loss"]
                ):  # diverged: finite training losses, overflowing weights
                    raise NonFiniteLoss(
                        f"trainer: the validation loss is NaN or Inf after epoch {p.epoch + 1} "
                        f"(training loss {train['train/loss']:.4g}); stopped without saving, the "
                        f"last good checkpoint is kept. {NONFINITE_CAUSES}"
                    )
                self.end_epoch(
                    train, val
                )  # reported before it is checkpointed: a resume never loses the point
                self.save_epoch_checkpoints()
                if self._stop_agreed(at_check=True):
                    raise StopRequested(self.stop_signal)
        finally:
            self.writer.wait()  # whatever happens, the checkpoint in flight lands before fit returns
        return p.metrics

    @timed("train")
    def train_epoch(self) -> dict[str, float]:
        p, accumulate = self.progress, self.settings.accumulate_grad_batches
        self.train_mode(p.epoch)
        self.loaders.sampler.set_epoch(p.epoch, start=p.batches_in_epoch)
        # Metrics accumulate on the device; the window covers the batches between two finiteness checks.
        # A resumed epoch's partial sums are the whole job's: rank 0 carries them, the others start at 0.
        metrics = RunningMetrics(
            self.device,
            self.task.train_sums_size,
            p.epoch_sums if distributed.is_main() else None,
            window=self.settings.log_every_n_steps * accumulate,
        )
        samples_before = p.epoch_sums[-1] if p.epoch_sums else 0
        bar = tqdm(
            total=self.batches_per_epoch,
            initial=p.batches_in_epoch,
            unit="batch",
            leave=False,
            desc=f"epoch {p.epoch + 1}/{self.settings.max_epochs}",
            disable=None if self.settings.progress_bar and distributed.is_main() else True,
        )
        batches = timed_iter(self.loaders.train, self.timer)
        if self.settings.profile and not self.profiled:
            batches = profiled_iter(batches, self.run_dir / "tensorboard", self.settings.profile_steps)
            self.profiled = True
        for batch in itertools.islice(batches, self.batches_per_epoch - p.batches_in_epoch):
            # non_blocking copies overlap with compute when the loader pins memory
            batch = move(batch, self.device, self.settings.channels_last)
            p.batches_in_epoch += 1
            step_now = p.batches_in_epoch % accumulate == 0 or p.batches_in_epoch == self.batches_per_epoch
            samples = self.task.count(batch)
            loss, outputs = self.train_step(batch, step_now, self._loss_weight(samples))
            if loss is not None:  # None: skipped (trainer.on_nonfinite=skip_batch)
                metrics.add(loss, self.task.train_sums(outputs, batch), samples, step=p.step + 1)
            bar.update()
            if not step_now:
                continue
            p.step += 1
            at_check = p.step % self.settings.log_every_n_steps == 0
            if at_check:
                self._check_finite(metrics)  # deliberate sync, once per log interval
                self._show_progress(bar, metrics)
            every = self.checkpointing.every_n_steps
            if (every and p.step % every == 0) or self._stop_agreed(at_check):
                self._check_finite(metrics)
                p.epoch_sums = metrics.totals()  # deliberate sync: a checkpoint needs the values
                if self.stop_signal:
                    raise StopRequested(self.stop_signal)  # the guard saves the checkpoint
                self.save_checkpoint()
            if p.step >= self.total_steps:
                break
        bar.close()
        self._check_finite(metrics)
        totals = metrics.totals()  # deliberate sync: once per epoch
        p.epoch_sums, p.batches_in_epoch = [], 0
        return self._train_report(totals) | {"samples": totals[-1] - samples_before}

    def train_mode(self, epoch: int, warming_up: bool = False) -> None:
        """The model as it trains in `epoch` (0-based): train mode, and the parameters that train then
        (model.freeze until trainer.unfreeze_at_epoch; a model's own start_epoch, e.g. fastnet's whitening bias)."""
        self.model.train()
        if self.freezer is not None:
            self.freezer.apply(epoch, quiet=warming_up)
        if hasattr(model := unwrap(self.model), "start_epoch"):
            model.start_epoch(epoch)

    def _train_report(self, totals: list[float]) -> dict[str, float]:
        seen = max(totals[-1], 1)
        task_metrics = self.task.from_train_sums(totals[1:-1], totals[-1])
        return {"train/loss": totals[0] / seen, **{f"train/{k}": v for k, v in task_metrics.items()}}

    def train_step(self, batch: Batch, step_now: bool, weight: float = 1.0) -> tuple[Tensor | None, Tensor]:
        """Forward and backward; an optimizer step when `step_now`. Returns the loss (None when the
        batch was skipped) and the outputs, as device tensors: nothing here waits for the device."""
        batch = self.task.mix(batch)
        ddp = getattr(self.model, "_orig_mod", self.model)
        # Accumulating: no gradient all-reduce until the batch that steps.
        with ddp.no_sync() if hasattr(ddp, "no_sync") and not step_now else contextlib.nullcontext():
            loss, outputs = self.forward_backward(batch, weight)
        if step_now:
            self.optimizer_step()
        return loss, outputs

    @timed_step("forward+backward")
    def forward_backward(self, batch: Batch, weight: float = 1.0) -> tuple[Tensor | None, Tensor]:
        return self._forward_backward(batch, weight)

    def _forward_backward(self, batch: Batch, weight: float = 1.0) -> tuple[Tensor | None, Tensor]:
        with autocast(self.device, self.autocast_dtype):
            outputs = self.model(self.task.inputs(batch))
            loss = self.task.loss(outputs, batch)
        if (
            self.settings.on_nonfinite == "skip_batch" and not loss.isfinite().item()
        ):  # a sync, in this mode only
            self._skip_batch()
            return None, outputs
        scale = weight / self.settings.accumulate_grad_batches
        self.scaler.scale(loss * scale if scale != 1 else loss).backward()
        return loss, outputs

    def _loss_weight(self, batch: int) -> float:
        """With several processes, DDP averages their gradients; weighting each process's mean loss by
        its share of the global batch makes that the global batch's mean even when shares differ."""
        if not distributed.active():
            return 1.0
        start, end = self.loaders.sampler.plan.bounds(self.progress.batches_in_epoch - 1)
        return batch * distributed.world_size() / (end - start)

    def _stop_agreed(self, at_check: bool) -> bool:
        """Whether to stop for a signal. One process stops at the next step; several agree first, at the
        next check (a log interval, an epoch's end), so that all of them stop at the same step."""
        if not distributed.active():
            return bool(self.stop_signal)
        if not at_check:
            return False
        flag = distributed.all_reduce(torch.tensor([float(self.stop_signal or 0)], device=self.device), "max")
        agreed = int(flag.item())
        # A signal can land while this process waits in the all-reduce: keep it for the next check,
        # never overwrite it with the "no" the others answered before it came.
        self.stop_signal = self.stop_signal or agreed or None
        return bool(agreed)

    @timed_step("optimizer")
    def optimizer_step(self) -> None:
        if self.settings.gradient_clip_val > 0:
            self.scaler.unscale_(self.optimizer)
            nn.utils.clip_grad_norm_(self.model.parameters(), self.settings.gradient_clip_val)
        self.scaler.step(self.optimizer)
        self.scaler.update()
        self.optimizer.zero_grad(set_to_none=True)
        self.scheduler.step()
        if self.ema is not None:
            self.ema.update(unwrap(self.model), self.progress.step + 1)

    def _skip_batch(self) -> None:
        p = self.progress
        p.skipped_batches += 1
        log.warning("non-finite loss at step %d: batch skipped (%d so far)", p.step + 1, p.skipped_batches)
        if p.skipped_batches > self.settings.max_skipped_batches:
            raise NonFiniteLoss(
                f"trainer.max_skipped_batches: {p.skipped_batches} batches had a non-finite loss "
                f"(by step {p.step + 1}); {NONFINITE_CAUSES}"
            )

    def _check_finite(self, metrics: RunningMetrics) -> None:
        step = metrics.first_nonfinite_step()
        if step is not None:
            epoch = self.progress.epoch + 1
            raise NonFiniteLoss(
                f"trainer: the loss became NaN or Inf at step {step} (epoch {epoch}); "
                f"stopped without saving, the last good checkpoint is kept. {NONFINITE_CAUSES}"
            )

    def validation_due(self) -> bool:
        """After the epoch just trained: every trainer.val_every_n_epochs epochs, and always after the last."""
        p, settings = self.progress, self.settings
        epoch = p.epoch + 1
        return (
            epoch % settings.val_every_n_epochs == 0
            or epoch >= settings.max_epochs
            or p.step >= self.total_steps
        )

    @timed("eval")
    def evaluate(self, loader: DataLoader, limit: int | None, split: str) -> dict[str, float]:
        tta = split != "val" or self.settings.val_tta
        found = evaluate_model(
            self.evaluator(tta=tta),
            loader,
            self.device,
            self.autocast_dtype,
            self.task,
            limit,
            self.settings.channels_last,
        )
        return {f"{split}/{key}": value for key, value in found.items()}

    def evaluator(self, plain: bool = False, tta: bool = True) -> nn.Module:
        """What is evaluated, tested and exported: the weights' EMA when on, under the task's TTA (unless
        `tta` is false: validation with trainer.val_tta=false). `plain`: the module itself, not its
        compiled or DDP wrapper (for export)."""
        if self.ema is not None:
            model = self.ema.module
        else:  # each process evaluates its share; DDP's forward would only add a buffer broadcast
            model = unwrap(self.model) if plain or distributed.active() else self.model
        return self.task.evaluated(model) if tta else model

    def init_from_data(self) -> None:
        """A model with a data-dependent initialisation (fastnet's whitening layer) gets the first
        training batch, before the first step."""
        model = unwrap(self.model)
        if hasattr(model, "init_from_data"):
            batch = move(next(iter(self.loaders.train)), self.device, self.settings.channels_last)
            model.init_from_data(self.task.inputs(batch))
            distributed.broadcast_module(model)  # every process starts from rank 0's initialisation
            if self.ema is not None:
                self.ema.reset(model)

    @timed("compile warm-up")
    def warm_up(self) -> None:
        """Compiles every graph training will run (a forward and backward per batch size, an eval
        forward; for the first epoch's trained parameters and the last one's, when an unfreeze or
        fastnet's whitening bias changes them), before training and outside its timing; the weights,
        statistics, gradients and random state are restored afterwards, so the run is the one it
        would have been."""
        model = unwrap(self.model)
        saved, rng = {k: v.clone() for k, v in model.state_dict().items()}, torch.get_rng_state()
        plan, rank = self.loaders.sampler.plan, getattr(self.loaders.sampler, "rank", 0)
        sizes = {len(plan.share(0, rank)), len(plan.share(len(plan) - 1, rank))}
        first = move(next(iter(self.loaders.train)), self.device, self.settings.channels_last)
        epochs = sorted({self.progress.epoch, max(self.settings.max_epochs - 1, self.progress.epoch)})
        try:
            for epoch, size in itertools.product(
                epochs, sorted(sizes)
            ):  # a real batch's samples, to each size
                batch = take(first, torch.arange(size) % self.task.count(first))
                self.train_mode(epoch, warming_up=True)  # not through forward_backward: not training's time
                self._forward_backward(batch)
                with torch.no_grad(), autocast(self.device, self.autocast_dtype):
                    self.model.eval()(self.task.inputs(batch))
        except Exception as e:  # the compiler's own failure (no C++ compiler, unsupported op...)
            first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
            raise UserError(
                f"trainer.compile: torch.compile failed here ({type(e).__name__}: {first}); "
                f"set trainer.compile=false"
            ) from e
        finally:
            self.optimizer.zero_grad(set_to_none=True)
            model.load_state_dict(saved)
            torch.set_rng_state(rng)

    @reports
    def end_epoch(self, train: dict[str, float], val: dict[str, float]) -> dict[str, float]:
        p = self.progress
        p.epoch += 1
        train_seconds = self.timer.last["train"]  # this epoch's
        eval_seconds = (
            self.timer.last["eval"] if val else 0.0
        )  # (the last evaluation's, if this epoch had none)
        p.images_trained += int(train["samples"])
        p.train_time_s += train_seconds
        p.metrics = {
            "epoch": p.epoch,
            **{k: v for k, v in train.items() if k != "samples"},
            **val,
            "lr": self.optimizer.param_groups[0]["lr"],
            "images_per_sec": train["samples"] / max(train_seconds, 1e-9),
            "epoch_time_s": train_seconds + eval_seconds,
        }
        value = p.metrics.get(
            self.checkpointing.monitor
        )  # a val/ metric is missing after an epoch not validated
        improved = (
            value is not None
            and math.isfinite(value)
            and (p.best is None or (value > p.best if self.checkpointing.mode == "max" else value < p.best))
        )
        if improved:
            p.best, p.best_epoch = value, p.epoch
        return p.metrics

    def save_epoch_checkpoints(self) -> None:
        """last.pt every checkpoint.every_n_epochs and at the end; best.pt when the monitor improved."""
        p = self.progress
        due = (
            p.epoch % self.checkpointing.every_n_epochs == 0
            or p.epoch == self.settings.max_epochs
            or p.step >= self.total_steps
            or self.target_reached()
        )
        if due or p.best_epoch == p.epoch:
            self.save_checkpoint(last=due, best=p.best_epoch == p.epoch)

    def target_reached(self) -> bool:
        """trainer.stop_at: the monitored metric has reached the target (time-to-accuracy runs)."""
        target, value = self.settings.stop_at, self.progress.metrics.get(self.checkpointing.monitor)
        if target is None or value is None:
            return False
        return value >= target if self.checkpointing.mode == "max" else value <= target

    def _show_progress(self, bar: tqdm, metrics: RunningMetrics) -> None:
        if bar.disable:
            return
        report = self._train_report(metrics.totals())  # deliberate sync, once per log interval
        rate = bar.format_dict.get("rate") or 0.0
        shown = {key.removeprefix("train/"): f"{value:.4f}" for key, value in report.items()}
        bar.set_postfix(**shown, img_s=f"{rate * self.batch_size:,.0f}", refresh=False)

    # ---- state ----------------------------------------------------------------------------------
    @timed("checkpoint")
    def save_checkpoint(self, last: bool = True, best: bool = False, wait: bool = False) -> Path:
        """Copies the state and hands it to the background writer; the time charged to "checkpoint" is
        what the loop waits for (the copy, and any previous write still in flight). Rank 0 writes."""
        if not distributed.is_main():
            return self.checkpoint_dir / ("last.pt" if last else "best.pt")
        state = self.state_dict()
        floats = [t.isfinite().all() for t in state["model"].values() if t.is_floating_point()]
        if not torch.stack(floats).all():  # one host-device sync for the whole model, not one per tensor
            raise NonFiniteLoss(
                f"trainer: the weights became NaN or Inf by step {self.progress.step}; stopped "
                f"without saving, the last good checkpoint is kept. {NONFINITE_CAUSES}"
            )
        self.writer.save(state, self.progress.step, last=last, best=best)
        if wait:
            self.writer.wait()
        return self.checkpoint_dir / ("last.pt" if last else "best.pt")

    def state_dict(self) -> dict[str, Any]:
        from trainer import __version__

        return {
            "model": unwrap(self.model).state_dict(),
            "optimizer": self.optimizer.state_dict(),
            "scheduler": self.scheduler.state_dict(),
            "scaler": self.scaler.state_dict(),
            "progress": self.progress.state_dict(),
            "rng": rng_state(),
            "config": self.config,
            "ema": None if self.ema is None else self.ema.module.state_dict(),
            "task": self.task.state_dict(),
            "loggers": self.metrics.state_dict(),
            "version": __version__,
        }

    def load_state_dict(
        self, state: dict[str, Any], reset_optimizer: bool = False, reset_scheduler: bool = False
    ) -> None:
        """Restores a checkpoint. The current config's optimizer hyperparameters win over the saved ones
        (with a warning when they differ), so an override given on resume is never ignored."""
        self.load_weights(state)
        self.progress.load_state_dict(state["progress"])
        if reset_optimizer:
            log.warning("checkpoint.reset_optimizer: optimizer state (momentum, moments) starts fresh")
        else:
            load_optimizer_state(self.optimizer, state["optimizer"])
        if reset_scheduler:
            self.progress.schedule_start = self.progress.step
            log.warning(
                "checkpoint.reset_scheduler: the learning-rate schedule restarts at step %d",
                self.progress.step,
            )
        else:
            self.scheduler.load_state_dict(state["scheduler"])
        rates_from_config(self.scheduler, self.optimizer)
        self.scaler.load_state_dict(state["scaler"])
        set_rng_state(state["rng"])

    def load_weights(self, state: dict[str, Any]) -> None:
        unwrap(self.model).load_state_dict(state["model"])
        if self.ema is not None:
            if state.get("ema") is None:  # a checkpoint from before trainer.ema_decay was set
                self.ema.reset(unwrap(self.model))
            else:
                self.ema.module.load_state_dict(state["ema"])
