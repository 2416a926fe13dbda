"""The run, read top to bottom. `Recipe.run` is the skeleton every kind of training shares: the resume
state read once, the parts built (each from its slice of it), training under the stop-signal guard, the
best checkpoint tested and exported, metrics.json written, the trackers closed. What it trains and how
is a recipe's own `setup`, `fit` and `finish`; `Supervised` is the one `python -m trainer` runs."""

import json
import logging
import time
from pathlib import Path
from typing import Any

import torch
from omegaconf import DictConfig, OmegaConf

from trainer.core import distributed
from trainer.core.atomic import write_text
from trainer.core.checkpoint import load_checkpoint, remove_stale_temporaries
from trainer.core.devices import pick_device
from trainer.core.hooks import initialises_from_data
from trainer.data import sample_batch
from trainer.run import builders
from trainer.run.export import export_run
from trainer.run.loop import Trainer
from trainer.run.plan import RunPlan
from trainer.run.process import configure_process
from trainer.run.resume import Resume
from trainer.run.state import TrainingState

log = logging.getLogger("trainer")


class Recipe:
    def __init__(self, cfg: DictConfig, run_dir: Path) -> None:
        self.cfg, self.run_dir = cfg, run_dir
        self.metric_log: Any = None
        self.resume = Resume()

    def run(self) -> float | None:
        """The whole run, in order. Returns the best value of checkpoint.monitor (what sweeps optimise)."""
        started = time.perf_counter()
        self.resume = Resume.load(self.cfg, self.run_dir)  # the checkpoint to continue from, read once
        try:
            self.setup()  # every part, each from its slice of the resume state; the loggers opened
            self.fit()  # a stop signal saves a checkpoint there and exits 130/143
            distributed.barrier()  # rank 0 has written best.pt
            results = self.finish()  # the best checkpoint's test metrics; the export (rank 0)
            if distributed.is_main():
                metrics = self.final_metrics(results, started)
                write_text(self.run_dir / "metrics.json", json.dumps(metrics, indent=2))
            self.metric_log.close(finished=True, run_dir=self.run_dir)
            self.after()
            return self.best()
        except BaseException:
            # a signal's exit, an error: the trackers end their run as stopped, to be resumed
            if self.metric_log is not None:
                self.metric_log.close(finished=False)
            raise
        finally:
            self.close()  # the loader workers end with the run, however it ends (an error, a sweep)

    # ---- what each recipe says ---------------------------------------------------------------------
    def setup(self) -> None:
        raise NotImplementedError

    def fit(self) -> None:
        raise NotImplementedError

    def finish(self) -> dict[str, Any]:
        """The test metrics, once training is over (every process); rank 0 also exports."""
        raise NotImplementedError

    def final_metrics(self, results: dict[str, Any], started: float) -> dict[str, Any]:
        raise NotImplementedError

    def best(self) -> float | None:
        raise NotImplementedError

    def after(self) -> None:
        """What comes once everything is written (an export that failed: exit 1)."""

    def close(self) -> None:
        pass


class Supervised(Recipe):
    """A model, a dataset and a task: python -m trainer's run."""

    data: Any = None
    export_failures: tuple[str, ...] = ()

    def setup(self) -> None:
        """Every part, in order, each built from its slice of the resume state."""
        cfg, resume = self.cfg, self.resume
        device = distributed.device_for(pick_device(cfg.trainer.device))
        configure_process(device, cfg.process, str(cfg.trainer.precision))
        self.data = data = builders.build_data(cfg, device)
        task = builders.build_task(cfg, data.bundle, resume.part("task"))
        model_args = resume.part("model_args") or builders.model_args(cfg, data.bundle)
        # On the device before the optimizer sees the parameters, so it can pick the device's kernels.
        model = builders.build_model(cfg, model_args, resume.part("model")).to(device)
        builders.check_model_fits(cfg, model, task, sample_batch(data.bundle.train), device)
        plan = RunPlan.resolve(cfg, len(data.loaders.train), task, device)
        if plan.channels_last:  # only when asked: it inspects every parameter (a lazy one cannot answer)
            model = model.to(memory_format=torch.channels_last)
        ema = builders.build_ema(cfg, model, plan)  # a copy of the whole model, sharded beside it with fsdp
        sharded = builders.shard(cfg, model, ema, device)  # fsdp; activation checkpointing
        optimizer = builders.build_optimizer(cfg, model)  # every parameter (of the shards, when sharded)
        progress = resume.part("progress", {})
        freezer = builders.build_freezer(cfg, model, progress.get("epoch", 0))  # before DDP wraps the model
        self.metric_log = builders.build_metric_log(
            cfg, self.run_dir, resume.part("loggers"), progress.get("step")
        )
        state = TrainingState(
            model=builders.wrap(cfg, model, device, plan, sharded), plain=model, optimizer=optimizer,
            scheduler=builders.build_scheduler(cfg, optimizer, plan, resume.part("progress")),
            scaler=torch.amp.GradScaler(device.type, enabled=plan.autocast_dtype is torch.float16),
            loaders=data.loaders, task=task, device=device, config=OmegaConf.to_container(cfg, resolve=True),
            model_args=model_args, ema=ema, freezer=freezer, sharded=sharded,
        )  # fmt: skip
        self.trainer = Trainer(state, plan, self.run_dir, self.metric_log)
        self.start_or_resume()
        self.announce()

    def start_or_resume(self) -> None:
        """A fresh run starts from the first batch; a resumed one loads its training state."""
        if distributed.is_main():
            remove_stale_temporaries(self.run_dir / "checkpoints")
            self.data.bundle.keep_input_files(self.run_dir)  # generate reads a running run's tokenizer
        if self.resume.fresh:
            self.start_fresh()
            return
        self.trainer.s.load_training(self.resume.state, self.trainer.progress, self.cfg.checkpoint)
        p = self.trainer.progress
        log.info("resumed (resume=%s) at epoch %d, batch %d, step %d", self.resume.source, p.epoch,
                 p.batches_in_epoch, p.step)  # fmt: skip

    def announce(self) -> None:
        cfg, bundle = self.cfg, self.data.bundle
        processes = f" x {distributed.world_size()} processes" if distributed.active() else ""
        log.info("training %s for %s on %s (%d train / %d val samples) on %s%s, run dir %s", cfg.model.name,
                 cfg.task.name, cfg.dataset.name, len(bundle.train), len(bundle.val), self.trainer.s.device,
                 processes, self.run_dir)  # fmt: skip

    def start_fresh(self) -> None:
        """A fresh run: a model with a data-dependent initialisation gets the first training batch (every
        process starts from rank 0's); TensorBoard gets a grid of training images."""
        state, bundle = self.trainer.s, self.data.bundle
        if initialises_from_data(state.plain):
            from trainer.tasks.base import move

            batch = move(next(iter(state.loaders.train)), state.device, self.trainer.plan.channels_last)
            state.plain.init_from_data(state.task.inputs(batch))
            distributed.broadcast_module(state.plain)
            if state.ema is not None:
                state.ema.reset(state.plain)
        preview = getattr(bundle.train, "preview", None)
        if callable(preview) and bundle.mean is not None:
            self.metric_log.images("train/samples", preview(64), bundle.mean, bundle.std)

    def fit(self) -> None:
        if self.trainer.plan.compile:
            from trainer.run.compile import warm_up

            with self.trainer.timer.phase("compile warm-up"):
                warm_up(self.trainer)
        self.trainer.fit()

    def finish(self) -> dict[str, Any]:
        """Tests the best checkpoint (each process its share), and exports it (rank 0)."""
        trainer, cfg = self.trainer, self.cfg
        best = self.run_dir / "checkpoints" / "best.pt"
        weights = load_checkpoint(best) if best.is_file() else None
        if weights is not None:
            trainer.s.load_weights(weights)
        else:
            log.warning(
                "no best checkpoint (%s was never finite); testing the last weights", trainer.plan.monitor
            )
        with trainer.timer.phase("eval"):
            test = trainer.evaluate(trainer.s.loaders.test, cfg.trainer.limit_test_batches, "test")
        exported = self.unsharded(weights) if trainer.s.sharded else trainer.s  # a collective without best.pt
        if distributed.is_main():
            with trainer.timer.phase("export"):
                manifest = export_run(cfg, exported, self.data.bundle, self.run_dir)
            failed = tuple(fmt for fmt, r in manifest["formats"].items() if "error" in r)
            if failed and manifest.get("saved_pretrained"):  # the model's own folder is the deliverable
                log.warning(
                    "export: %s failed for this model (see train.log); export/%s (save_pretrained) and the "
                    "checkpoints are its export", ", ".join(failed), manifest["saved_pretrained"],
                )  # fmt: skip
            else:
                self.export_failures = failed
            trainer.log.write(test, step=trainer.progress.step)
            trainer.log.hparams(hparams(cfg), {k: v for k, v in test.items() if isinstance(v, float)})
        return test

    def unsharded(self, weights: dict[str, Any] | None) -> TrainingState:
        """What the export sees under fsdp: the whole model, unsharded, on rank 0 (others: unchanged),
        from best.pt, or gathered from the shards when there is none (every process calls this)."""
        from dataclasses import replace

        from trainer.run.sharding import full_model_state

        s = self.trainer.s
        if weights is None:
            weights = {"model": full_model_state(s.plain)}
            weights["ema"] = None if s.ema is None else full_model_state(s.ema.module)
        if not distributed.is_main():
            return s
        chosen = weights["model"] if s.ema is None else weights["ema"]  # what evaluated() gives
        model = builders.build_model(self.cfg, s.model_args, chosen).to(s.device).eval()
        return replace(s, model=model, plain=model, ema=None, sharded=False)

    def final_metrics(self, test: dict[str, Any], started: float) -> dict[str, Any]:
        p, plan, unit = self.trainer.progress, self.trainer.plan, self.trainer.s.task.unit
        found = {key: value for key, value in p.metrics.items() if key.startswith(("train/", "val/"))}
        found.update(
            {
                **test,
                "epochs": p.epoch,
                "steps": p.step,
                f"{unit}s_per_sec": p.units_trained / max(p.train_time_s, 1e-9),
                "train_time_s": p.train_time_s,
                "wall_time_s": time.perf_counter() - started,
                "best": {"monitor": plan.monitor, "value": p.best, "epoch": p.best_epoch},
            }
        )
        log.info(
            "%s  (best %s %.4f at epoch %d)",
            "  ".join(f"{k} {v:.4f}" for k, v in test.items()),
            plan.monitor,
            p.best if p.best is not None else float("nan"),
            p.best_epoch,
        )
        log.info("time per phase:\n%s", self.trainer.timer.table())
        return found

    def best(self) -> float | None:
        return self.trainer.progress.best

    def after(self) -> None:
        if self.export_failures:
            import sys

            failed = ", ".join(self.export_failures)
            print(
                f"error: export: {failed} failed (see train.log); the other formats, the checkpoints "
                "and metrics.json are written",
                file=sys.stderr,
            )
            raise SystemExit(1)

    def close(self) -> None:
        if self.data is not None:
            self.data.loaders.close()


def hparams(cfg: DictConfig) -> dict[str, str | float | int | bool]:
    """The run's headline hyperparameters, for the trackers' comparison views."""
    return {
        "model": cfg.model.name,
        "dataset": cfg.dataset.name,
        "task": cfg.task.name,
        "optimizer": cfg.optimizer.name,
        "scheduler": cfg.scheduler.name,
        "lr": cfg.optimizer.lr,
        "batch_size": cfg.loader.batch_size,
        "max_epochs": cfg.trainer.max_epochs,
        "precision": str(cfg.trainer.precision),
        "seed": cfg.seed,
    }
