"""Config schemas, registered once with Hydra's ConfigStore, and the checks composition cannot do.

The fixed parts (trainer, loader, checkpoint, export) are typed dataclasses, so a misspelled key or a
wrong type fails while Hydra composes. The swappable parts (model, dataset, task, optimizer, scheduler)
hold the parameters of whichever registry entry is named, so they are checked against that entry's
signature in `validate`, still before any data is read.
"""

import dataclasses
import difflib
from dataclasses import dataclass, field
from typing import Any, Optional

from hydra.core.config_store import ConfigStore
from omegaconf import DictConfig, OmegaConf

from trainer.core.errors import UserError

DEVICES = ("auto", "cpu", "cuda", "mps")
PRECISIONS = ("32", "bf16", "16")
EXPORT_FORMATS = ("torchscript", "torch_export", "onnx")
COMPILE_MODES = ("default", "reduce-overhead", "max-autotune", "max-autotune-no-cudagraphs")


@dataclass
class TrainerConfig:
    max_epochs: int = 30
    max_steps: int = -1  # -1: no limit; otherwise stop after this many optimizer steps
    stop_at: Optional[float] = None  # stop once checkpoint.monitor reaches this value (time-to-accuracy)
    limit_train_batches: Optional[int] = None  # None: every batch
    limit_val_batches: Optional[int] = None
    val_every_n_epochs: int = 1  # validate every N epochs, and after the last (best.pt and stop_at follow it)
    val_tta: bool = True  # false: validate without the task's test-time augmentation (the test keeps it)
    limit_test_batches: Optional[int] = None
    device: str = "auto"
    precision: str = "32"
    accumulate_grad_batches: int = 1
    gradient_clip_val: float = 0.0  # 0: no clipping
    log_every_n_steps: int = 20
    progress_bar: bool = True
    on_nonfinite: str = "stop"  # stop, or skip_batch (costs one host sync per step)
    max_skipped_batches: int = 10
    channels_last: bool = False  # NHWC memory format for model and inputs (faster convolutions on GPUs)
    compile: bool = False  # torch.compile the model, warmed up before training, outside any timing
    compile_mode: str = "default"
    cudnn_benchmark: bool = True  # on CUDA: let cuDNN pick the fastest algorithms for the fixed shapes
    ema_decay: float = 0.0  # 0: off; else evaluate, test and export an EMA of the weights
    ema_every: int = 1  # update the EMA every N optimizer steps
    ema_decay_power: float = 0.0  # > 0: the decay grows over training, ema_decay * (step / total) ** this
    ema_lookahead: bool = False  # after each EMA update the model continues from the average (Lookahead)
    unfreeze_at_epoch: int = 0  # model.freeze's parameters train from this epoch (1-based) on; 0: never
    profile: bool = False  # a torch.profiler trace of a few steps into the run's tensorboard/ folder
    profile_steps: int = 5
    threads: Optional[int] = None  # torch's intra-op threads (None: torch's default, one per core)
    keep_cpu_memory: bool = (
        False  # glibc: freed memory stays in the process for the next step (no page faults)
    )
    sync_batchnorm: bool = False  # with several processes (CUDA): BatchNorm statistics over the global batch


@dataclass
class LoaderConfig:
    batch_size: int = 128
    num_workers: int = 2
    pin_memory: Optional[bool] = None  # None: on when training on CUDA
    prefetch_factor: int = 2
    persistent_workers: bool = True
    shuffle: bool = True
    drop_last: bool = False
    on_device: bool = False  # hold the dataset on the device and augment whole batches there


@dataclass
class CheckpointConfig:
    every_n_epochs: int = 1
    every_n_steps: int = 0  # 0: only at epoch ends
    monitor: Optional[str] = None  # None: the task's default (val/acc for classification)
    mode: Optional[str] = None  # max or min; None: the monitored metric's own
    keep_last: int = 2  # the newest N checkpoints kept as step-N.pt, to fall back on if last.pt is damaged
    reset_optimizer: bool = False  # on resume: fresh optimizer state instead of the checkpoint's
    reset_scheduler: bool = False  # on resume: the learning-rate schedule restarts at the current step


@dataclass
class ExportConfig:
    formats: list[str] = field(default_factory=lambda: ["torchscript", "torch_export"])
    tolerance: float = 1e-4  # max abs difference from the eager model that still counts as parity
    max_batch: int = 1024  # upper bound of the exported program's dynamic batch dimension


@dataclass
class Config:
    model: Any = None
    dataset: Any = None
    task: Any = None
    logger: Any = None  # {name: options} of each logger chosen (logger=[tensorboard,mlflow])
    optimizer: Any = None
    scheduler: Any = None
    trainer: TrainerConfig = field(default_factory=TrainerConfig)
    loader: LoaderConfig = field(default_factory=LoaderConfig)
    checkpoint: CheckpointConfig = field(default_factory=CheckpointConfig)
    export: ExportConfig = field(default_factory=ExportConfig)
    seed: int = 42
    resume: Optional[str] = None
    imports: list[str] = field(default_factory=list)


def register_configs() -> None:
    ConfigStore.instance().store(name="base_config", node=Config)
    # `num_classes: ${class_count:${.root}}` counts an image folder's classes when the config resolves.
    OmegaConf.register_new_resolver("class_count", _count_classes, replace=True)
    OmegaConf.register_new_resolver("stream_class_count", _stream_class_count, replace=True)
    OmegaConf.register_new_resolver("manifest_count", _manifest_count, replace=True)
    OmegaConf.register_new_resolver("text_class_count", _text_class_count, replace=True)
    OmegaConf.register_new_resolver("hf_class_count", _hf_class_count, replace=True)
    # `compile: ${on_cuda:${trainer.device}}`: a setting that pays on a GPU and not on a CPU
    OmegaConf.register_new_resolver("on_cuda", _on_cuda, replace=True)


def monitored(task: str, monitor: str | None, mode: str | None) -> tuple[str, str]:
    """checkpoint.monitor and checkpoint.mode as the run reads them, before any data: a null monitor is
    the task's default, a null mode the metric's own."""
    from trainer.core.registry import TASKS

    cls = TASKS.get(task)
    monitor = monitor or f"val/{cls.monitor}"
    split, _, metric = monitor.partition("/")
    modes = cls.metrics if split == "val" else {"loss": "min", **cls.train_metrics}
    return monitor, mode or modes.get(metric, "max")


def _on_cuda(device: str) -> bool:
    """Whether trainer.device is (or, for auto, picks) a CUDA device."""
    from trainer.run.devices import pick_device  # torch, only when a config asks

    return pick_device(device).type == "cuda"


def _count_classes(root: str) -> int:
    from trainer.data.folder import count_classes  # the data package, only when a config asks

    return count_classes(root)


def _manifest_count(root: str, targets: Any = None, separator: str = "|") -> int:
    from trainer.data.manifest import count_outputs

    return count_outputs(root, list(targets) if targets else None, separator)


def _text_class_count(root: str) -> int:
    from trainer.data.textclass import count_labels

    return count_labels(root)


def _hf_class_count(path: str, label_column: str = "label", split_train: str = "train") -> int:
    from trainer.data.hf import count_classes

    return count_classes(path, label_column, split_train)


def _stream_class_count(root: str) -> int:
    from trainer.data.streaming import stream_class_count

    return stream_class_count(root)


def _require(ok: bool, message: str) -> None:
    if not ok:
        raise UserError(message)


def _at_least(n: int):
    return lambda v: v >= n


# (key, test, what a valid value is): checked in order, the first failure is reported.
RULES = [
    ("trainer.device", lambda v: v in DEVICES, f"one of {', '.join(DEVICES)}"),
    ("trainer.precision", lambda v: str(v) in PRECISIONS, f"one of {', '.join(PRECISIONS)}"),
    ("trainer.max_epochs", _at_least(1), "1 or more"),
    ("trainer.max_steps", lambda v: v == -1 or v >= 1, "-1 (no limit) or 1 or more"),
    ("trainer.limit_train_batches", lambda v: v is None or v >= 1, "null (all) or 1 or more"),
    ("trainer.limit_val_batches", lambda v: v is None or v >= 1, "null (all) or 1 or more"),
    ("trainer.limit_test_batches", lambda v: v is None or v >= 1, "null (all) or 1 or more"),
    ("trainer.accumulate_grad_batches", _at_least(1), "1 or more"),
    ("trainer.gradient_clip_val", _at_least(0), "0 (off) or positive"),
    ("trainer.log_every_n_steps", _at_least(1), "1 or more"),
    ("trainer.val_every_n_epochs", _at_least(1), "1 or more"),
    ("trainer.on_nonfinite", lambda v: v in ("stop", "skip_batch"), "one of stop, skip_batch"),
    ("trainer.max_skipped_batches", _at_least(0), "0 or more"),
    ("trainer.compile_mode", lambda v: v in COMPILE_MODES, f"one of {', '.join(COMPILE_MODES)}"),
    ("trainer.ema_decay", lambda v: 0 <= v < 1, "in [0, 1) (0: off)"),
    ("trainer.ema_every", _at_least(1), "1 or more"),
    ("trainer.ema_decay_power", lambda v: v >= 0, "0 (a constant decay) or more"),
    ("trainer.profile_steps", _at_least(1), "1 or more"),
    ("trainer.threads", lambda v: v is None or v >= 1, "null (one per core) or 1 or more"),
    ("checkpoint.keep_last", _at_least(1), "1 or more"),
    ("loader.batch_size", _at_least(1), "1 or more"),
    ("loader.num_workers", _at_least(0), "0 (load in the main process) or more"),
    ("loader.prefetch_factor", _at_least(1), "1 or more"),
    ("checkpoint.every_n_epochs", _at_least(1), "1 or more"),
    ("checkpoint.every_n_steps", _at_least(0), "0 (off) or more"),
    ("checkpoint.mode", lambda v: v in (None, "max", "min"), "one of max, min, or null (the metric's own)"),
    ("export.formats", lambda v: set(v) <= set(EXPORT_FORMATS), f"a list of {', '.join(EXPORT_FORMATS)}"),
    ("dataset.num_classes", lambda v: v is None or v >= 1, "1 or more (the model's outputs)"),
    ("dataset.val_split", lambda v: v is None or 0 <= v < 1, "in [0, 1)"),
    ("optimizer.lr", lambda v: v > 0, "positive"),
]


def refuse_unknown_keys(cfg: DictConfig, schema: type | None = None, prefix: str = "") -> None:
    """Keys the schema does not know. Composition refuses a misspelled `trainer.max_epoch=3`, but Hydra
    adds `+trainer.max_epoch=3` past the schema (a `+` override bypasses struct mode), and the run would
    ignore it."""
    schema = schema or Config
    known = {f.name: f.type for f in dataclasses.fields(schema)}
    for key in cfg.keys():
        if key not in known:
            close = difflib.get_close_matches(str(key), known, n=1)
            hint = f"did you mean {prefix}{close[0]}?" if close else f"its keys: {', '.join(sorted(known))}"
            raise UserError(
                f"{prefix}{key}: not a key of {prefix.rstrip('.') or 'the config'} ({hint}); fix the "
                f"spelling, or drop the override"
            )
        if dataclasses.is_dataclass(known[key]):
            refuse_unknown_keys(cfg[key], known[key], f"{prefix}{key}.")


def validate(cfg: DictConfig) -> None:
    """Every check that needs more than a type: the registry entries' parameters, ranges, choices."""
    from trainer.core.registry import DATASETS, MODELS, OPTIMIZERS, SCHEDULERS, TASKS

    refuse_unknown_keys(cfg)

    for group, registry, provided in (
        ("model", MODELS, ()),
        ("dataset", DATASETS, ()),
        ("task", TASKS, ()),
        ("optimizer", OPTIMIZERS, ("model",)),
        ("scheduler", SCHEDULERS, ("optimizer", "total_steps", "steps_per_epoch")),
    ):
        section = cfg[group]
        _require(
            isinstance(section, DictConfig) and "name" in section,
            f"{group}: missing; choose one with {group}=<name> ({', '.join(registry.names())})",
        )
        params = model_params(section) if group == "model" else params_of(section)
        registry.check(section.name, params, provided)  # types too: the rules below compare
    for key, ok, requirement in RULES:
        value = OmegaConf.select(cfg, key)
        _require(ok(value), f"{key}: must be {requirement}, got {value!r}")
    from trainer.tasks.base import resolve_monitor

    task = TASKS.build(cfg.task.name, **params_of(cfg.task))  # its own checks of its options
    resolve_monitor(task, cfg.checkpoint.monitor, cfg.checkpoint.mode)  # before any data is read
    _check_loggers(cfg)
    if "onnx" in cfg.export.formats:
        import importlib.util

        missing = [m for m in ("onnx", "onnxscript", "onnxruntime") if importlib.util.find_spec(m) is None]
        _require(
            not missing,
            f'export.formats: onnx needs {", ".join(missing)}: pip install -e ".[onnx]", or '
            f"leave onnx out of export.formats",
        )


def _check_loggers(cfg: DictConfig) -> None:
    """Each logger's options, and its client library installed, before any data is read."""
    from trainer.core.registry import LOGGERS
    from trainer.loggers.base import needs_library

    section = cfg.get("logger")
    for name in section.keys() if section else []:
        options = section[name]
        _require(
            options is None or isinstance(options, DictConfig),
            f"logger.{name}: must be a mapping of options, got {options!r}",
        )
        LOGGERS.check(
            str(name),
            OmegaConf.to_container(options, resolve=True) if options else {},
            ("run_dir", "resume_step", "state", "config"),
        )
        problem = needs_library(LOGGERS.get(str(name)))
        _require(problem is None, problem or "")


def params_of(section: DictConfig) -> dict[str, Any]:
    """A group's parameters for its builder: everything but the registry name, as plain Python."""
    params = OmegaConf.to_container(section, resolve=True)
    params.pop("name")
    return params


def model_params(section: DictConfig) -> dict[str, Any]:
    """The model builder's parameters (registry.builder_params of the resolved model section)."""
    from trainer.core.registry import builder_params

    return builder_params(OmegaConf.to_container(section, resolve=True))


def upgrade_legacy(config: dict[str, Any]) -> dict[str, Any]:
    """A run's config (plain, resolved) from before tasks, with a `loss` section and trainer.tta, as it
    reads now: the options of task=classification. Newer configs are returned as they are."""
    if "task" in config:
        return config
    upgraded = {key: value for key, value in config.items() if key != "loss"}
    trainer = dict(config.get("trainer") or {})
    upgraded["task"] = {
        "name": "classification",
        **dict(config.get("loss") or {}),
        "tta": trainer.pop("tta", "none"),
    }
    upgraded["trainer"] = trainer
    return upgraded
