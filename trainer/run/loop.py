"""The training loop. `fit` trains epoch by epoch, validates, reports and checkpoints; `train_epoch` and
`train_step` say the rest, with their timing, logging and stop handling written where they happen. It
never knows which model, dataset or task it runs: batches go to the device whole, and the task gives
the loss and the metrics. What it trains is built by the recipe (trainer/run/recipe.py)."""

import contextlib
import itertools
import logging
import signal
from pathlib import Path
from typing import Any

from torch import Tensor, nn
from tqdm import tqdm

from trainer.core import distributed
from trainer.core.checkpoint import CheckpointWriter
from trainer.run import health
from trainer.run.devices import autocast, evaluate_model
from trainer.run.plan import RunPlan
from trainer.run.progress import Progress
from trainer.run.running import RunningLoss
from trainer.run.signals import Stop, StopRequested, stop_on_signals
from trainer.run.state import TrainingState
from trainer.run.timing import PhaseTimer, profiled_iter, timed_iter
from trainer.tasks.base import Batch, move
from trainer.tasks.metrics import MetricSet

log = logging.getLogger("trainer")


class Trainer:
    def __init__(self, state: TrainingState, plan: RunPlan, run_dir: Path, metric_log: Any) -> None:
        self.s, self.plan, self.run_dir, self.log = state, plan, run_dir, metric_log
        self.progress = Progress()
        self.timer = PhaseTimer(state.device)
        self.stop = Stop()  # the stop signal received (stop_on_signals, while fitting), checked between steps
        self.train_metrics = MetricSet(state.task.train_metrics(), state.device, with_loss=False)
        # Once a checkpoint has landed, the trackers may have the points it covers (MetricLog).
        if state.sharded:  # every process writes its shards (trainer.strategy=fsdp)
            from trainer.core.sharded_checkpoint import ShardedCheckpointWriter
            from trainer.run.sharding import checkpoint_group

            self.writer: Any = ShardedCheckpointWriter(
                run_dir / "checkpoints", plan.keep_last, metric_log.checkpointed, checkpoint_group()
            )
        else:
            self.writer = CheckpointWriter(
                run_dir / "checkpoints", plan.keep_last, on_saved=metric_log.checkpointed
            )

    def fit(self) -> None:
        p, plan = self.progress, self.plan
        with stop_on_signals(self.save_on_stop) as self.stop:
            try:
                while not plan.finished(p.epoch, p.step) and not plan.reached(p.metrics.get(plan.monitor)):
                    with self.timer.phase("train"):
                        train = self.train_epoch()
                    val = {}
                    if plan.validates_after(p.epoch + 1, p.step):
                        with self.timer.phase("eval"):
                            val = self.evaluate(self.s.loaders.val, plan.limit_val_batches, "val")
                        health.check_finite_validation(val, train, p.epoch)
                    self.log.write(self.end_epoch(train, val), step=p.step)  # before a checkpoint covers it
                    self.save_epoch_checkpoints()
                    if health.stop_agreed(self.stop, self.s.device, at_check=True):
                        raise StopRequested(self.stop.signum)
                self.writer.settle()  # every process's part of the last checkpoint is written
            finally:
                self.writer.wait()  # whatever happens, the checkpoint in flight lands before fit returns

    def train_epoch(self) -> dict[str, float]:
        p, s, plan = self.progress, self.s, self.plan
        s.train_mode(p.epoch)
        s.loaders.sampler.set_epoch(p.epoch, start=p.batches_in_epoch)
        # The loss and the task's training metrics accumulate on the device; a resumed epoch starts from
        # the checkpoint's sums (the whole job's: rank 0 carries them, the others start at 0).
        mine = distributed.is_main()
        running = RunningLoss(
            s.device, plan.log_every_n_steps * plan.accumulate, *(p.epoch_loss if mine else ())
        )
        metrics = self.train_metrics
        metrics.load_state_dict(p.epoch_metrics)  # reset, or a resumed epoch's sums
        samples_before, units = running.samples, 0
        bar = tqdm(
            total=plan.batches_per_epoch,
            initial=p.batches_in_epoch,
            unit="batch",
            leave=False,
            desc=f"epoch {p.epoch + 1}/{plan.max_epochs}",
            disable=None if plan.progress_bar and mine else True,
        )
        batches = timed_iter(s.loaders.train, self.timer)
        if plan.profile and not p.profiled:
            batches, p.profiled = (
                profiled_iter(batches, self.run_dir / "tensorboard", plan.profile_steps),
                True,
            )
        for batch in itertools.islice(batches, plan.batches_per_epoch - p.batches_in_epoch):
            batch = move(batch, s.device, plan.channels_last)  # non_blocking from pinned memory
            p.batches_in_epoch += 1
            step_now = (
                p.batches_in_epoch % plan.accumulate == 0 or p.batches_in_epoch == plan.batches_per_epoch
            )
            samples, units = s.task.count(batch), units + s.task.units(batch)
            loss, outputs = self.train_step(
                batch, step_now, health.loss_weight(s.loaders.sampler, p.batches_in_epoch, samples)
            )
            if loss is not None:  # None: skipped (trainer.on_nonfinite=skip_batch)
                running.add(loss, samples, step=p.step + 1)
                metrics.update(s.task, outputs, batch)  # the unmixed batch's targets
            bar.update()
            if not step_now:
                continue
            p.step += 1
            at_check = p.step % plan.log_every_n_steps == 0
            if at_check:
                health.check_finite_loss(running, p.epoch)  # deliberate sync, once per log interval
                if not bar.disable:
                    bar.set_postfix(loss=f"{running.mean():.4f}", refresh=False)
            if (plan.every_n_steps and p.step % plan.every_n_steps == 0) or health.stop_agreed(
                self.stop, s.device, at_check
            ):
                health.check_finite_loss(running, p.epoch)
                p.epoch_loss, p.epoch_metrics = running.totals(), metrics.state_dict()  # deliberate syncs
                if self.stop.signum:
                    raise StopRequested(self.stop.signum)  # stop_on_signals saves the checkpoint
                self.save_checkpoint()
            if p.step >= plan.total_steps:
                break
        bar.close()
        health.check_finite_loss(running, p.epoch)
        loss_sum, samples = running.totals()  # deliberate sync: once per epoch
        p.epoch_loss, p.epoch_metrics, p.batches_in_epoch = (0.0, 0), {}, 0
        found = {
            "train/loss": loss_sum / max(samples, 1),
            **{f"train/{k}": v for k, v in metrics.compute().items()},
        }
        return found | {"samples": samples - samples_before, "units": units}

    def train_step(self, batch: Batch, step_now: bool, weight: float = 1.0) -> tuple[Tensor | None, Any]:
        """Forward and backward; an optimizer step when `step_now`. Returns the loss (None when the batch
        was skipped) and the outputs, as device tensors: nothing here waits for the device."""
        ddp = getattr(self.s.model, "_orig_mod", self.s.model)  # under torch.compile's wrapper
        accumulating = isinstance(ddp, nn.parallel.DistributedDataParallel) and not step_now
        if self.s.sharded:  # FSDP: no reduce-scatter until the batch that steps
            self.s.plain.set_requires_gradient_sync(step_now)
        with ddp.no_sync() if accumulating else contextlib.nullcontext():  # no all-reduce until the step
            with self.timer.section("forward+backward"):
                loss, outputs = self.forward_backward(self.s.task.mix(batch), weight)
        if step_now:
            with self.timer.section("optimizer"):
                self.optimizer_step()
        return loss, outputs

    def forward_backward(self, batch: Batch, weight: float = 1.0) -> tuple[Tensor | None, Any]:
        s = self.s
        with autocast(s.device, self.plan.autocast_dtype):
            outputs = s.model(s.task.inputs(batch))
            loss = s.task.loss(outputs, batch)
        if self.plan.on_nonfinite == "skip_batch" and not loss.isfinite().item():  # a sync, in this mode only
            health.skip_batch(self.progress, self.plan.max_skipped_batches)
            return None, outputs
        scale = weight / self.plan.accumulate
        s.scaler.scale(loss * scale if scale != 1 else loss).backward()
        return loss, outputs

    def optimizer_step(self) -> None:
        s = self.s
        if self.plan.gradient_clip_val > 0:
            s.scaler.unscale_(s.optimizer)
            nn.utils.clip_grad_norm_(s.model.parameters(), self.plan.gradient_clip_val)
        s.scaler.step(s.optimizer)
        s.scaler.update()
        s.optimizer.zero_grad(set_to_none=True)
        s.scheduler.step()
        if s.ema is not None:
            s.ema.update(s.plain, self.progress.step + 1)

    def evaluate(self, loader: Any, limit: int | None, split: str) -> dict[str, float]:
        model = self.s.evaluated(tta=split != "val" or self.plan.val_tta)
        found = evaluate_model(
            model,
            loader,
            self.s.device,
            self.plan.autocast_dtype,
            self.s.task,
            limit,
            self.plan.channels_last,
        )
        return {f"{split}/{key}": value for key, value in found.items()}

    def end_epoch(self, train: dict[str, float], val: dict[str, float]) -> dict[str, float]:
        """The epoch's report, and best.pt's bookkeeping: what is logged and checkpointed."""
        p = self.progress
        p.epoch += 1
        train_seconds = self.timer.last["train"]  # this epoch's
        p.samples_trained += int(train["samples"])
        p.units_trained += int(train["units"])
        p.train_time_s += train_seconds
        p.metrics = {
            "epoch": p.epoch,
            **{k: v for k, v in train.items() if k not in ("samples", "units")},
            **val,
            "lr": self.s.optimizer.param_groups[0]["lr"],
            f"{self.s.task.unit}s_per_sec": train["units"] / max(train_seconds, 1e-9),
            "epoch_time_s": train_seconds + (self.timer.last["eval"] if val else 0.0),
        }
        if self.plan.improved(
            p.metrics.get(self.plan.monitor), p.best
        ):  # missing after an epoch not validated
            p.best, p.best_epoch = p.metrics[self.plan.monitor], p.epoch
        return p.metrics

    def save_epoch_checkpoints(self) -> None:
        """last.pt every checkpoint.every_n_epochs and at the end; best.pt when the monitor improved."""
        p, plan = self.progress, self.plan
        due = (
            p.epoch % plan.every_n_epochs == 0
            or plan.finished(p.epoch, p.step)
            or plan.reached(p.metrics.get(plan.monitor))
        )
        if due or p.best_epoch == p.epoch:
            self.save_checkpoint(last=due, best=p.best_epoch == p.epoch)

    def save_checkpoint(self, last: bool = True, best: bool = False, wait: bool = False) -> Path:
        """Copies the state and hands it to the background writer; the time charged to "checkpoint" is
        what the loop waits for (the copy, and any write still in flight). Rank 0 writes; sharded, every
        process writes its shards."""
        path = self.run_dir / "checkpoints" / ("last.pt" if last else "best.pt")
        if not (distributed.is_main() or self.s.sharded):
            return path
        with self.timer.phase("checkpoint"):
            state = self.s.state_dict(self.progress, self.log, best=best)
            health.check_finite_weights(state, self.progress.step)
            path = self.writer.save(state, self.progress.step, last=last, best=best) or path
            if wait:
                self.writer.settle()
        return path

    def save_on_stop(self, signum: int) -> None:
        """A stop signal's checkpoint, whole before the process exits (stop_on_signals)."""
        name = signal.Signals(signum).name
        log.warning("received %s: stopped at step %d, saving a checkpoint", name, self.progress.step)
        path = self.save_checkpoint(wait=True)
        if distributed.is_main():
            launcher = (
                f"torchrun --nproc_per_node={distributed.world_size()}" if distributed.active() else "python"
            )
            log.warning(
                "saved %s after %s; resume with: %s -m trainer resume=%s",
                path,
                name,
                launcher,
                path.parent.parent,
            )
