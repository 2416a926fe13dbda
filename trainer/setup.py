"""One small builder per component, each reading only its own part of the config."""
import logging
from pathlib import Path
from typing import Any

import torch
from omegaconf import DictConfig, OmegaConf
from torch import nn

from trainer.checkpoint import load_checkpoint
from trainer.config import params_of
from trainer.data import DATASETS, DataBundle, Loaders, build_loaders
from trainer.errors import UserError
from trainer.instrument import MetricLog
from trainer.loop import Trainer, plan_steps
from trainer.models import MODELS
from trainer.optim import OPTIMIZERS, SCHEDULERS

log = logging.getLogger("trainer")
# Keys of the dataset config that do not change what a checkpoint's model was trained to do.
DATASET_LOCATION_KEYS = {"root", "download", "verify_checksum"}


def build_data(cfg: DictConfig, device: torch.device) -> tuple[DataBundle, Loaders]:
    bundle = DATASETS.build(cfg.dataset.name, **params_of(cfg.dataset))
    ld = cfg.loader
    pin = device.type == "cuda" if ld.pin_memory is None else ld.pin_memory
    loaders = build_loaders(bundle, batch_size=ld.batch_size, num_workers=ld.num_workers, pin_memory=pin,
                            prefetch_factor=ld.prefetch_factor, persistent_workers=ld.persistent_workers,
                            shuffle=ld.shuffle, drop_last=ld.drop_last, seed=cfg.seed)
    if len(loaders.train) == 0:
        raise UserError(f"loader.batch_size: {ld.batch_size} with loader.drop_last=true leaves no training batch "
                        f"({len(bundle.train)} images); lower the batch size")
    return bundle, loaders


def build_model(cfg: DictConfig) -> nn.Module:
    torch.manual_seed(cfg.seed)  # the same seed gives the same initial weights
    return MODELS.build(cfg.model.name, **params_of(cfg.model))


def build_trainer(cfg: DictConfig, run_dir: Path, device: torch.device, loaders: Loaders,
                  resume_step: int | None) -> Trainer:
    model = build_model(cfg)
    optimizer = OPTIMIZERS.build(cfg.optimizer.name, model=model, **params_of(cfg.optimizer))
    t = cfg.trainer
    _, steps_per_epoch, total_steps = plan_steps(len(loaders.train), t.limit_train_batches,
                                                 t.accumulate_grad_batches, t.max_epochs, t.max_steps)
    scheduler = SCHEDULERS.build(cfg.scheduler.name, optimizer=optimizer, total_steps=total_steps,
                                 steps_per_epoch=steps_per_epoch, **params_of(cfg.scheduler))
    # Purge what a killed run logged after its checkpoint, so resumed curves have no duplicate points.
    metrics = MetricLog(run_dir / "tensorboard", purge_step=None if resume_step is None else resume_step + 1)
    return Trainer(model, optimizer, scheduler, loaders, settings=t, checkpoint=cfg.checkpoint,
                   label_smoothing=cfg.loss.label_smoothing, device=device, run_dir=run_dir, metrics=metrics,
                   config=OmegaConf.to_container(cfg, resolve=True))


def find_checkpoint(resume: str | None, run_dir: Path) -> Path | None:
    """The checkpoint `resume` points at: a file, a run dir's last.pt, or with `auto` this run dir's
    last.pt when there is one."""
    if resume is None:
        return None
    if resume == "auto":
        last = run_dir / "checkpoints" / "last.pt"
        if last.is_file():
            return last
        log.info("resume=auto: no checkpoint in %s yet, starting fresh", run_dir)
        return None
    path = Path(resume)
    if path.is_dir():
        path = path / "checkpoints" / "last.pt"
        if not path.is_file():
            raise UserError(f"resume: {resume} has no checkpoints/last.pt; the run saved none yet, start it again")
    return path


def check_compatible(saved: dict[str, Any], current: dict[str, Any]) -> None:
    """A checkpoint's model only fits the architecture and data it was trained for."""
    differences = [f"{group}.{key}: {saved[group].get(key)!r} -> {current[group].get(key)!r}"
                   for group in ("model", "dataset")
                   for key in sorted(set(saved[group]) | set(current[group]))
                   if saved[group].get(key) != current[group].get(key)
                   and not (group == "dataset" and key in DATASET_LOCATION_KEYS)]
    if differences:
        raise UserError(f"resume: the checkpoint was trained with another model or dataset ({'; '.join(differences)}); "
                        f"resume with the original settings, or start a new run")
    if saved["optimizer"]["name"] != current["optimizer"]["name"]:
        raise UserError(f"optimizer.name: the checkpoint's optimizer is {saved['optimizer']['name']}; resume with "
                        f"optimizer={saved['optimizer']['name']}, or start a new run")


def load_resume_state(path: Path | None, cfg: DictConfig) -> dict[str, Any] | None:
    if path is None:
        return None
    state = load_checkpoint(path)
    check_compatible(state["config"], OmegaConf.to_container(cfg, resolve=True))
    return state
