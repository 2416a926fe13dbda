"""The Hydra entry: compose, validate, build, fit, test the best checkpoint, export, report."""

import json
import logging
import os
import sys
import time
from pathlib import Path
from typing import TYPE_CHECKING

import hydra
from hydra.core.hydra_config import HydraConfig
from hydra.types import RunMode
from omegaconf import DictConfig

from trainer.config import register_configs, validate
from trainer.core import distributed
from trainer.core.atomic import write_text
from trainer.core.cli import (
    exit_codes,
    import_user_modules,
    override_key,
    refuse_moved_keys,
    resume_argv,
    usage,
)
from trainer.core.registry import CONF
from trainer.sweep.search import register_resolvers

if TYPE_CHECKING:
    from trainer.run.loop import Trainer

# The training parts (loop, data, models, export) are imported inside run(): `--help`, `--cfg job`
# and a config error answer without them (benchmarks/startup.py measures it).
log = logging.getLogger("trainer")
register_configs()
register_resolvers()


# An absolute path: Hydra resolves a relative one against the calling module, which differs between
# `python -m trainer` and the `trainer` console script.
CONFIG_DIR = str(CONF)


@hydra.main(config_path=CONFIG_DIR, config_name="config", version_base="1.3")
def train(cfg: DictConfig) -> float | None:
    """Returns the best value of checkpoint.monitor, which Hydra's sweepers optimise."""
    if HydraConfig.get().mode == RunMode.MULTIRUN:
        from trainer.sweep.jobs import run_sweep_job

        return run_sweep_job(cfg, run)  # a failed job is recorded and the sweep goes on
    # Errors are turned into exit codes here, inside the job: past this point Hydra would add its
    # own report of a failed job to our one-line message.
    with exit_codes():
        return run(cfg)


def run(cfg: DictConfig) -> float | None:
    started = time.perf_counter()
    run_dir = Path(HydraConfig.get().runtime.output_dir)
    import_user_modules(list(cfg.imports))
    validate(cfg)
    from trainer.models.pretrained import follow_data_config

    follow_data_config(cfg, {override_key(o) for o in HydraConfig.get().overrides.task})
    from trainer.run.devices import pick_device
    from trainer.run.setup import build_data, load_resume_state

    device = distributed.device_for(pick_device(cfg.trainer.device))
    state = load_resume_state(cfg.resume, run_dir, cfg)
    bundle, loaders = build_data(cfg, device)
    try:
        return _train_and_finish(cfg, run_dir, device, state, bundle, loaders, started)
    finally:
        loaders.close()  # the workers end with the run, however it ends (a sweep's next job, an error)


def _train_and_finish(cfg, run_dir, device, state, bundle, loaders, started) -> float | None:
    from trainer.run.setup import build_task, build_trainer

    task = build_task(cfg, bundle, state)
    if (
        "tokenizer" in bundle.extra and distributed.is_main()
    ):  # generation decodes with the training tokenizer
        from trainer.text.tokenizers import copy_tokenizer

        copy_tokenizer(bundle.extra["tokenizer"], Path(bundle.extra["tokenizer_dir"]), run_dir / "tokenizer")
    trainer = build_trainer(cfg, run_dir, device, loaders, state, task)
    if state is None:
        if hasattr(bundle.train, "preview") and bundle.mean is not None:  # images: a grid in TensorBoard
            trainer.metrics.images("train/samples", bundle.train.preview(64), bundle.mean, bundle.std)
    else:
        p = trainer.progress
        log.info(
            "resumed (resume=%s) at epoch %d, batch %d, step %d",
            cfg.resume,
            p.epoch,
            p.batches_in_epoch,
            p.step,
        )
    log.info(
        "training %s for %s on %s (%d train / %d val samples) on %s%s, run dir %s",
        cfg.model.name,
        cfg.task.name,
        cfg.dataset.name,
        len(bundle.train),
        len(bundle.val),
        device,
        f" x {distributed.world_size()} processes" if distributed.active() else "",
        run_dir,
    )
    try:
        trainer.fit()
        finish(cfg, trainer, bundle, run_dir, started)
    except BaseException:  # a signal's exit, an error: the trackers end their run as stopped, to be resumed
        trainer.metrics.close(finished=False)
        raise
    return trainer.progress.best


def finish(cfg: DictConfig, trainer: "Trainer", bundle, run_dir: Path, started: float) -> None:
    """Test the best checkpoint, export it, and write metrics.json and the hparams summary (rank 0)."""
    from trainer.core.checkpoint import load_checkpoint
    from trainer.run.export import export_model

    distributed.barrier()  # rank 0 has written best.pt
    best = run_dir / "checkpoints" / "best.pt"
    if best.is_file():
        trainer.load_weights(load_checkpoint(best))
    else:
        log.warning(
            "no best checkpoint (%s was never finite); testing the last weights", cfg.checkpoint.monitor
        )
    test = trainer.evaluate(
        trainer.loaders.test, cfg.trainer.limit_test_batches, "test"
    )  # every rank's share
    if not distributed.is_main():
        return
    inputs = trainer.task.inputs(next(iter(trainer.loaders.test)))[:8].cpu()  # real test inputs
    export_started = time.perf_counter()
    manifest = export_model(
        trainer.task.exported(trainer.evaluator(plain=True)),
        inputs,
        run_dir / "export",
        list(cfg.export.formats),
        tolerance=cfg.export.tolerance,
        max_batch=cfg.export.max_batch,
        dims=trainer.task.dynamic_dims(),
        metadata={
            "model": cfg.model.name,
            "checkpoint": "checkpoints/best.pt",
            "ema": cfg.trainer.ema_decay > 0,
            "tta": trainer.task.tta,
            "task": trainer.task.manifest(),
            "imports": list(cfg.imports),
            "classes": bundle.classes,
            "image_size": bundle.image_size,
            "normalization": {"mean": bundle.mean, "std": bundle.std},
            "preprocess": preprocess_spec(bundle),
        },
    )
    trainer.timer.add("export", time.perf_counter() - export_started)
    if (run_dir / "tokenizer").is_dir():
        from trainer.text.tokenizers import copy_tokenizer

        spec = json.loads((run_dir / "tokenizer" / "tokenizer_spec.json").read_text())
        copy_tokenizer(spec, run_dir / "tokenizer", run_dir / "export" / "tokenizer")
    p = trainer.progress
    metrics = {key: value for key, value in p.metrics.items() if key.startswith(("train/", "val/"))}
    metrics.update(
        {
            **test,
            "epochs": p.epoch,
            "steps": p.step,
            "images_per_sec": p.images_trained / max(p.train_time_s, 1e-9),
            "train_time_s": p.train_time_s,
            "wall_time_s": time.perf_counter() - started,
            "best": {"monitor": trainer.checkpointing.monitor, "value": p.best, "epoch": p.best_epoch},
        }
    )
    write_text(run_dir / "metrics.json", json.dumps(metrics, indent=2))
    trainer.metrics.write(test, step=p.step)
    trainer.metrics.hparams(_hparams(cfg), {k: v for k, v in metrics.items() if isinstance(v, float)})
    trainer.metrics.close(finished=True, run_dir=run_dir)
    log.info(
        "%s  (best %s %.4f at epoch %d)",
        "  ".join(f"{k} {v:.4f}" for k, v in test.items()),
        trainer.checkpointing.monitor,
        p.best if p.best is not None else float("nan"),
        p.best_epoch,
    )
    log.info("time per phase:\n%s", trainer.timer.table())
    failed = [fmt for fmt, r in manifest["formats"].items() if "error" in r]
    if failed:
        print(
            f"error: export: {', '.join(failed)} failed (see train.log); the other formats, the checkpoints "
            f"and metrics.json are written",
            file=sys.stderr,
        )
        raise SystemExit(1)


def preprocess_spec(bundle) -> dict | None:
    """How an image file becomes the exported model's input: what predict and serve (or anyone) apply;
    None for a dataset that is not images (then the export takes tensors only)."""
    if "text" in bundle.extra:  # text classification: how a text becomes token ids
        return {"decode": "text", "tokenizer": bundle.extra["tokenizer"], **bundle.extra["text"]}
    if bundle.image_size is None or bundle.mean is None or bundle.in_channels not in (1, 3):
        return None
    return {
        "decode": "RGB" if bundle.in_channels == 3 else "L",
        "resize_shorter_side": bundle.image_size,
        "center_crop": [bundle.image_size, bundle.image_size],
        "scale": 1 / 255,
        "mean": bundle.mean,
        "std": bundle.std,
        "layout": "NCHW",
        "dtype": "float32",
    }


def _hparams(cfg: DictConfig) -> dict[str, str | float | int | bool]:
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


def main() -> None:
    # Hydra would print its own multi-line report and exit 1; we want exceptions back, to exit 2 with
    # one line for the user's mistakes and 1 with a traceback for the rest.
    os.environ.setdefault("HYDRA_FULL_ERROR", "1")
    if any(arg in ("--help", "-h") for arg in sys.argv[1:]):
        print(usage(Path(CONFIG_DIR)))  # Hydra's own help deep-copies its config repository ~100 times (~1 s)
        return
    with exit_codes():
        distributed.init()  # torchrun: join the process group before Hydra composes (see distributed.py)
        refuse_moved_keys(sys.argv[1:])
        sys.argv = resume_argv(sys.argv)
        train()
        distributed.shutdown()


if __name__ == "__main__":
    main()
