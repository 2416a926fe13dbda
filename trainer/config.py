"""The config schema: every framework key with its default, its range and one line of meaning, written
once (a `setting` field; conf/ holds no copy), registered with Hydra's ConfigStore so a misspelled key
or a wrong type fails while Hydra composes. The swappable parts (model, dataset, task, optimizer,
scheduler, logger) hold the parameters of whichever registry entry is named; their defaults live in
their config files and their ranges in the entries' signatures, checked in `validate`, still before
any data is read. Nothing here reads a file or the network while the config composes.

Longer than 300 lines: it is the one place every framework key is written (each section's keys with
their default, range and meaning), and the validation that reads them; splitting it would scatter the
reference the documentation's configuration page is generated from.
"""

import dataclasses
import difflib
from dataclasses import dataclass, field
from typing import Any, Optional

from hydra.core.config_store import ConfigStore
from omegaconf import DictConfig, OmegaConf

from trainer.core.errors import UserError
from trainer.core.fields import POSITIVE, Check, at_least, check_fields, one_of, optional, setting
from trainer.core.registry import register_resolvers

DEVICES = ("auto", "cpu", "cuda", "mps")
PRECISIONS = ("32", "bf16", "16")
EXPORT_FORMATS = ("torchscript", "torch_export", "onnx")
COMPILE_MODES = ("default", "reduce-overhead", "max-autotune", "max-autotune-no-cudagraphs")
ALL_BATCHES = optional(at_least(1), "all")


@dataclass
class TrainerConfig:
    max_epochs: int = setting(30, "stop after this many epochs", at_least(1))
    max_steps: int = setting(
        -1,
        "stop after this many optimizer steps",
        Check(lambda v: v == -1 or v >= 1, "-1 (no limit) or 1 or more"),
    )
    stop_at: Optional[float] = setting(
        None, "stop once checkpoint.monitor reaches this value (time-to-accuracy)"
    )
    limit_train_batches: Optional[int] = setting(
        None, "use only the first N training batches of an epoch", ALL_BATCHES
    )
    limit_val_batches: Optional[int] = setting(None, "use only the first N validation batches", ALL_BATCHES)
    limit_test_batches: Optional[int] = setting(None, "use only the first N test batches", ALL_BATCHES)
    val_every_n_epochs: int = setting(
        1, "validate every N epochs and after the last (best.pt and stop_at see only those)", at_least(1)
    )
    val_tta: bool = setting(True, "validate under the task's test-time augmentation (the test always is)")
    device: str = setting(
        "auto", "auto (CUDA, then Apple MPS, then the CPU), cpu, cuda or mps", one_of(*DEVICES)
    )
    precision: str = setting(
        "32", "32, bf16 (autocast) or 16 (CUDA only, with loss scaling)", one_of(*PRECISIONS)
    )
    accumulate_grad_batches: int = setting(1, "an optimizer step every N batches", at_least(1))
    gradient_clip_val: float = setting(0.0, "clip the gradients' global norm to this", at_least(0, "off"))
    log_every_n_steps: int = setting(
        20, "the loss is checked for NaN/Inf, and the bar refreshed, this often", at_least(1)
    )
    progress_bar: bool = setting(True, "a progress bar per epoch (on a terminal only)")
    on_nonfinite: str = setting(
        "stop",
        "a NaN/Inf loss: stop (no checkpoint overwritten), or skip_batch (a host sync per step)",
        one_of("stop", "skip_batch"),
    )
    max_skipped_batches: int = setting(10, "with skip_batch: stop after this many", at_least(0))
    channels_last: bool = setting(
        False, "NHWC memory format for the model and inputs (faster convolutions on GPUs)"
    )
    compile: bool = setting(
        False, "torch.compile the model, warmed up before training and outside its timing"
    )
    compile_mode: str = setting("default", "torch.compile's mode", one_of(*COMPILE_MODES))
    sync_batchnorm: bool = setting(
        False, "with several processes on GPUs: BatchNorm statistics of the global batch"
    )
    strategy: str = setting(
        "auto",
        "auto or ddp (one process, or DDP under torchrun), fsdp (FSDP2: parameters, gradients and "
        "optimizer state sharded over the processes; checkpoints with torch.distributed.checkpoint)",
        one_of("auto", "ddp", "fsdp"),
    )
    activation_checkpointing: bool = setting(
        False, "recompute each block's activations in the backward pass (less memory, more compute)"
    )
    cpu_offload: bool = setting(False, "with fsdp on CUDA: the sharded parameters live in CPU memory")
    profile: bool = setting(False, "a torch.profiler trace of a few steps, beside the TensorBoard events")
    profile_steps: int = setting(5, "how many steps the trace records", at_least(1))


@dataclass
class LoaderConfig:
    batch_size: int = setting(128, "samples per batch, per process", at_least(1))
    num_workers: int = setting(2, "DataLoader worker processes", at_least(0, "load in the main process"))
    pin_memory: Optional[bool] = setting(
        None, "page-locked batches for faster copies (null: when training on CUDA)"
    )
    prefetch_factor: int = setting(2, "batches each worker prepares ahead", at_least(1))
    persistent_workers: bool = setting(True, "keep the workers from one epoch to the next")
    shuffle: bool = setting(True, "a new order every epoch, from (seed, epoch)")
    drop_last: bool = setting(False, "drop the last, smaller training batch")
    on_device: bool = setting(
        False, "the whole dataset on the training device, batches augmented as tensor ops"
    )


@dataclass
class CheckpointConfig:
    every_n_epochs: int = setting(1, "last.pt every N epochs (and at the end)", at_least(1))
    every_n_steps: int = setting(0, "also every N optimizer steps, mid-epoch", at_least(0, "off"))
    monitor: Optional[str] = setting(
        None, "what makes best.pt best (null: the task's default, val/acc for classification)"
    )
    mode: Optional[str] = setting(None, "max or min", optional(one_of("max", "min"), "the metric's own"))
    keep_last: int = setting(
        2, "the newest N checkpoints kept as step-N.pt, the fallback if last.pt is damaged", at_least(1)
    )
    reset_optimizer: bool = setting(False, "on resume: fresh optimizer state (momentum, moments)")
    reset_scheduler: bool = setting(
        False, "on resume: the learning-rate schedule restarts at the current step"
    )


@dataclass
class ExportConfig:
    formats: list[str] = setting(
        ["torchscript", "torch_export"],
        "what export/ holds",
        Check(lambda v: set(v) <= set(EXPORT_FORMATS), f"a list of {', '.join(EXPORT_FORMATS)}"),
    )
    tolerance: float = setting(
        1e-4, "the largest difference from the eager model that still counts as parity", POSITIVE
    )
    max_batch: int = setting(1024, "the exported program's largest batch", at_least(1))


@dataclass
class EmaConfig:
    decay: float = setting(
        0.0,
        "evaluate, test and export a moving average of the weights with this decay",
        Check(lambda v: 0 <= v < 1, "in [0, 1) (0: off)"),
    )
    every: int = setting(1, "update the average every N optimizer steps", at_least(1))
    power: float = setting(
        0.0,
        "> 0: the decay grows over training, decay * (step / total) ** power",
        at_least(0, "a constant decay"),
    )
    lookahead: bool = setting(False, "after each update the model continues from the average (Lookahead)")


@dataclass
class PPOConfig:
    """recipe=ppo: Proximal Policy Optimization's settings, PPO's published defaults for CartPole."""

    total_timesteps: int = setting(
        500_000, "environment steps to train for, over all environments", at_least(1)
    )
    num_steps: int = setting(128, "steps each environment takes per rollout", at_least(1))
    gamma: float = setting(0.99, "the discount", Check(lambda v: 0 <= v <= 1, "in [0, 1]"))
    gae_lambda: float = setting(0.95, "GAE's lambda", Check(lambda v: 0 <= v <= 1, "in [0, 1]"))
    update_epochs: int = setting(4, "passes over each rollout", at_least(1))
    num_minibatches: int = setting(4, "minibatches each pass is cut into", at_least(1))
    clip_coef: float = setting(0.2, "how far the probability ratio may move", at_least(0, "no clipping"))
    clip_vloss: bool = setting(True, "clip the value loss around the rollout's values too")
    norm_adv: bool = setting(True, "normalise the advantages in each minibatch")
    ent_coef: float = setting(0.01, "the entropy bonus's weight", at_least(0))
    vf_coef: float = setting(0.5, "the value loss's weight", at_least(0))
    target_kl: Optional[float] = setting(
        None, "stop a rollout's updates once the approximate KL passes this", optional(at_least(0), "none")
    )
    eval_every: int = setting(
        10, "play eval_episodes greedy episodes every N rollouts (and at the end)", at_least(1)
    )
    eval_episodes: int = setting(10, "greedy episodes per evaluation, seeded", at_least(1))


@dataclass
class FinetuneConfig:
    checkpoint: Optional[str] = setting(
        None,
        "a local state dict (ours, timm's, torchvision's, .safetensors) to start from: what fits is loaded",
    )
    freeze: list[str] = setting([], "parameter-name patterns kept fixed, e.g. ['conv1.*', 'layer1.*']")
    unfreeze_at_epoch: int = setting(
        0, "the frozen parameters train from this epoch (1-based) on", at_least(0, "never")
    )


@dataclass
class ProcessConfig:
    threads: Optional[int] = setting(
        None,
        "torch's intra-op threads; cap it when jobs share a machine",
        optional(at_least(1), "one per core"),
    )
    keep_cpu_memory: bool = setting(
        False, "glibc keeps freed memory for the next step: no page faults, more peak RSS"
    )
    cudnn_benchmark: bool = setting(True, "on CUDA: cuDNN picks the fastest algorithms for the fixed shapes")


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
    ema: EmaConfig = field(default_factory=EmaConfig)
    env: Any = None  # recipe=ppo: the environment (env=cartpole), from the ENVS registry
    ppo: PPOConfig = field(default_factory=PPOConfig)
    finetune: FinetuneConfig = field(default_factory=FinetuneConfig)
    process: ProcessConfig = field(default_factory=ProcessConfig)
    recipe: str = setting(
        "supervised",
        "what trains: supervised (a model on a dataset for a task) or ppo (a policy in an environment)",
        one_of("supervised", "ppo"),
    )
    seed: int = setting(42, "initial weights, data order, augmentation")
    resume: Optional[str] = setting(
        None, "a run dir, a checkpoint file, or auto (this run dir's newest, if any)"
    )
    imports: list[str] = setting([], "your modules to import first (their registrations), e.g. [my_models]")


# The groups that name a registry entry, and what the framework hands each builder itself.
GROUPS = {
    "model": (),  # and what the data gives (num_classes, in_channels, ...): checked once the data is built
    "dataset": (),
    "task": (),
    "optimizer": ("model",),
    "scheduler": ("optimizer", "total_steps", "steps_per_epoch"),
}


def register_configs() -> None:
    ConfigStore.instance().store(name="base_config", node=Config)
    # `compile: ${on_cuda:${trainer.device}}`: a setting that pays on a GPU and not on a CPU
    OmegaConf.register_new_resolver("on_cuda", _on_cuda, replace=True)
    register_resolvers()  # `mean: ${pretrained:mean,[0.5,0.5,0.5]}`: a pretrained model's, else the default


def _on_cuda(device: str) -> bool:
    """Whether trainer.device is (or, for auto, picks) a CUDA device."""
    from trainer.core.devices import pick_device  # torch, only when a config asks

    return pick_device(device).type == "cuda"


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
    """Every check that needs more than a type, before any data is read: the registry entries'
    parameters (types and ranges), the framework keys' ranges, the monitor, the loggers."""
    from trainer.core.registry import DATASETS, ENVS, MODELS, OPTIMIZERS, SCHEDULERS, TASKS

    refuse_unknown_keys(cfg)
    registries = {
        "model": MODELS,
        "dataset": DATASETS,
        "task": TASKS,
        "optimizer": OPTIMIZERS,
        "scheduler": SCHEDULERS,
        "env": ENVS,
    }
    rl = cfg.recipe == "ppo"
    groups = {**GROUPS, "env": ("seed",)} if rl else GROUPS
    for group, provided in groups.items():
        if rl and group in ("dataset", "task"):
            continue  # a policy learns from its environment
        section = cfg[group]
        if not (isinstance(section, DictConfig) and "name" in section):
            raise UserError(
                f"{group}: missing; choose one with {group}=<name> ({', '.join(registries[group].names())})"
            )
        for key in section:
            if OmegaConf.is_missing(section, key):  # `???` in the group file: no default can do
                raise UserError(f"{group}.{key}: {group}={section.name} needs it; give {group}.{key}=<value>")
        from trainer.data import DATA_FACTS  # what the data gives a model: only known once it is built

        facts = ("obs_dim", "n_actions") if rl else DATA_FACTS
        registries[group].check(section.name, params_of(section), provided, facts if group == "model" else ())
    sections = [f.name for f in dataclasses.fields(Config) if dataclasses.is_dataclass(f.type)]
    schema = OmegaConf.to_object(
        OmegaConf.merge(OmegaConf.structured(Config), OmegaConf.masked_copy(cfg, sections))
    )
    for name in sections:
        check_fields(getattr(schema, name), f"{name}.")
    _check_loggers(cfg)
    if rl:
        return
    from trainer.tasks.base import resolve_monitor

    task = TASKS.build(cfg.task.name, **params_of(cfg.task))  # its own checks of its options
    resolve_monitor(task, cfg.checkpoint.monitor, cfg.checkpoint.mode)  # what it can tell before the data
    if "onnx" in cfg.export.formats:
        import importlib.util

        missing = [m for m in ("onnx", "onnxscript", "onnxruntime") if importlib.util.find_spec(m) is None]
        if missing:
            raise UserError(
                f'export.formats: onnx needs {", ".join(missing)}: pip install -e ".[onnx]", or '
                f"leave onnx out of export.formats"
            )


def _check_loggers(cfg: DictConfig) -> None:
    """Each logger's options, and its client library installed, before any data is read."""
    from trainer.core.registry import LOGGERS
    from trainer.loggers.base import needs_library

    section = cfg.get("logger")
    for name in section.keys() if section else []:
        options = section[name]
        if not (options is None or isinstance(options, DictConfig)):
            raise UserError(f"logger.{name}: must be a mapping of options, got {options!r}")
        LOGGERS.check(
            str(name),
            OmegaConf.to_container(options, resolve=True) if options else {},
            ("run_dir", "resume_step", "state", "config"),
        )
        problem = needs_library(LOGGERS.get(str(name)))
        if problem is not None:
            raise UserError(problem)


def params_of(section: DictConfig | dict[str, Any]) -> dict[str, Any]:
    """A group's parameters for its builder: everything but the registry name, as plain Python."""
    params = (
        OmegaConf.to_container(section, resolve=True) if isinstance(section, DictConfig) else dict(section)
    )
    params.pop("name")
    return params
