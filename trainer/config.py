"""Config schemas, registered once with Hydra's ConfigStore, and the checks composition cannot do.

The fixed parts (trainer, loader, checkpoint, export) are typed dataclasses, so a misspelled key or a
wrong type fails while Hydra composes. The swappable parts (model, dataset, optimizer, scheduler) hold
the parameters of whichever registry entry is named, so they are checked against that entry's
signature in `validate`, still before any data is read.
"""
from dataclasses import dataclass, field
from typing import Any, Optional

from hydra.core.config_store import ConfigStore
from omegaconf import DictConfig, OmegaConf

from trainer.errors import UserError

DEVICES = ("auto", "cpu", "cuda", "mps")
PRECISIONS = ("32", "bf16", "16")
MONITORS = ("val/acc", "val/loss", "train/acc", "train/loss")
EXPORT_FORMATS = ("torchscript", "torch_export")


@dataclass
class TrainerConfig:
    max_epochs: int = 10
    max_steps: int = -1  # -1: no limit; otherwise stop after this many optimizer steps
    limit_train_batches: Optional[int] = None  # None: every batch
    limit_val_batches: Optional[int] = None
    limit_test_batches: Optional[int] = None
    device: str = "auto"
    precision: str = "32"
    accumulate_grad_batches: int = 1
    gradient_clip_val: float = 0.0  # 0: no clipping
    log_every_n_steps: int = 20
    progress_bar: bool = True


@dataclass
class LoaderConfig:
    batch_size: int = 128
    num_workers: int = 2
    pin_memory: Optional[bool] = None  # None: on when training on CUDA
    prefetch_factor: int = 2
    persistent_workers: bool = True
    shuffle: bool = True
    drop_last: bool = False


@dataclass
class LossConfig:
    label_smoothing: float = 0.0


@dataclass
class CheckpointConfig:
    every_n_epochs: int = 1
    every_n_steps: int = 0  # 0: only at epoch ends
    monitor: str = "val/acc"
    mode: str = "max"


@dataclass
class ExportConfig:
    formats: list[str] = field(default_factory=lambda: list(EXPORT_FORMATS))
    tolerance: float = 1e-4  # max abs difference from the eager model that still counts as parity
    max_batch: int = 1024  # upper bound of the exported program's dynamic batch dimension


@dataclass
class Config:
    model: Any = None
    dataset: Any = None
    optimizer: Any = None
    scheduler: Any = None
    trainer: TrainerConfig = field(default_factory=TrainerConfig)
    loader: LoaderConfig = field(default_factory=LoaderConfig)
    loss: LossConfig = field(default_factory=LossConfig)
    checkpoint: CheckpointConfig = field(default_factory=CheckpointConfig)
    export: ExportConfig = field(default_factory=ExportConfig)
    seed: int = 42
    resume: Optional[str] = None
    imports: list[str] = field(default_factory=list)


def register_configs() -> None:
    ConfigStore.instance().store(name="base_config", node=Config)


def _require(ok: bool, message: str) -> None:
    if not ok:
        raise UserError(message)


def validate(cfg: DictConfig) -> None:
    """Every check that needs more than a type: ranges, choices, and the registry entries' parameters."""
    from trainer import DATASETS, MODELS, OPTIMIZERS, SCHEDULERS

    t, ld, ck = cfg.trainer, cfg.loader, cfg.checkpoint
    _require(t.device in DEVICES, f"trainer.device: '{t.device}' is not one of {', '.join(DEVICES)}")
    _require(str(t.precision) in PRECISIONS,
             f"trainer.precision: '{t.precision}' is not one of {', '.join(PRECISIONS)}")
    for key in ("max_epochs", "accumulate_grad_batches", "log_every_n_steps"):
        _require(t[key] >= 1, f"trainer.{key}: must be 1 or more, got {t[key]}")
    _require(t.max_steps == -1 or t.max_steps >= 1, f"trainer.max_steps: must be -1 (no limit) or 1 or more, got {t.max_steps}")
    for key in ("limit_train_batches", "limit_val_batches", "limit_test_batches"):
        _require(t[key] is None or t[key] >= 1, f"trainer.{key}: must be null (all) or 1 or more, got {t[key]}")
    _require(t.gradient_clip_val >= 0, f"trainer.gradient_clip_val: must be 0 (off) or positive, got {t.gradient_clip_val}")
    _require(ld.batch_size >= 1, f"loader.batch_size: must be 1 or more, got {ld.batch_size}")
    _require(ld.num_workers >= 0, f"loader.num_workers: must be 0 (load in the main process) or more, got {ld.num_workers}")
    _require(ld.prefetch_factor >= 1, f"loader.prefetch_factor: must be 1 or more, got {ld.prefetch_factor}")
    _require(0 <= cfg.loss.label_smoothing < 1, f"loss.label_smoothing: must be in [0, 1), got {cfg.loss.label_smoothing}")
    _require(ck.every_n_epochs >= 1, f"checkpoint.every_n_epochs: must be 1 or more, got {ck.every_n_epochs}")
    _require(ck.every_n_steps >= 0, f"checkpoint.every_n_steps: must be 0 (off) or more, got {ck.every_n_steps}")
    _require(ck.monitor in MONITORS, f"checkpoint.monitor: '{ck.monitor}' is not one of {', '.join(MONITORS)}")
    _require(ck.mode in ("max", "min"), f"checkpoint.mode: '{ck.mode}' is not one of max, min")
    for fmt in cfg.export.formats:
        _require(fmt in EXPORT_FORMATS, f"export.formats: '{fmt}' is not one of {', '.join(EXPORT_FORMATS)}")
    for group, registry, provided in ((("model", MODELS, ())), ("dataset", DATASETS, ()),
                                       ("optimizer", OPTIMIZERS, ("model",)),
                                       ("scheduler", SCHEDULERS, ("optimizer", "total_steps", "steps_per_epoch"))):
        section = cfg[group]
        _require(isinstance(section, DictConfig) and "name" in section,
                 f"{group}: missing; choose one with {group}=<name> ({', '.join(registry.names())})")
        registry.check(section.name, params_of(section), provided)
    _require(cfg.dataset.num_classes >= 2, f"dataset.num_classes: must be 2 or more, got {cfg.dataset.num_classes}")
    _require(0 <= cfg.dataset.val_split < 1, f"dataset.val_split: must be in [0, 1), got {cfg.dataset.val_split}")
    _require(cfg.optimizer.lr > 0, f"optimizer.lr: must be positive, got {cfg.optimizer.lr}")


def params_of(section: DictConfig) -> dict[str, Any]:
    """A group's parameters for its builder: everything but the registry name, as plain Python."""
    params = OmegaConf.to_container(section, resolve=True)
    params.pop("name")
    return params
