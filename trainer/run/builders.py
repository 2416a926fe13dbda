"""One small builder per component, each reading its own part of the config and, on resume, handed its
own slice of the checkpoint."""

import inspect
import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from omegaconf import DictConfig, OmegaConf
from torch import nn

from trainer.config import params_of
from trainer.core import distributed
from trainer.core.errors import UserError
from trainer.core.hooks import initialises_from_data
from trainer.core.registry import LOGGERS, TASKS, preprocessing
from trainer.data import DATA_FACTS, DATASETS, DataBundle, Loaders, build_loaders
from trainer.loggers.metric_log import MetricLog, NullMetricLog
from trainer.models import MODELS, ModelHooks
from trainer.optim import OPTIMIZERS, SCHEDULERS
from trainer.run.ema import WeightAverage
from trainer.run.plan import RunPlan
from trainer.run.process import compile_model
from trainer.tasks.base import DataInfo, Task, move

log = logging.getLogger("trainer")


@dataclass
class Data:
    bundle: DataBundle
    loaders: Loaders


def build_data(cfg: DictConfig, device: torch.device) -> Data:
    bundle = DATASETS.build(cfg.dataset.name, **params_of(cfg.dataset))
    ld = cfg.loader
    loaders = build_loaders(
        bundle,
        batch_size=ld.batch_size,
        num_workers=ld.num_workers,
        pin_memory=device.type == "cuda" if ld.pin_memory is None else ld.pin_memory,
        prefetch_factor=ld.prefetch_factor,
        persistent_workers=ld.persistent_workers,
        shuffle=ld.shuffle,
        drop_last=ld.drop_last,
        seed=cfg.seed,
        on_device=device if ld.on_device else None,
        rank=distributed.rank(),
        world_size=distributed.world_size(),
    )
    if preprocessing(cfg.model, cfg.finetune) and bundle.mean is not None:
        log.info(
            "preprocessing: mean %s, std %s, image size %s (pretrained weights: theirs, unless the config "
            "gives its own)",
            bundle.mean,
            bundle.std,
            bundle.image_size,
        )
    if len(loaders.train) == 0:
        raise UserError(
            f"loader.batch_size: {ld.batch_size} with loader.drop_last=true leaves no training batch "
            f"({len(bundle.train)} samples); lower the batch size"
        )
    return Data(bundle, loaders)


def build_task(cfg: DictConfig, bundle: DataBundle, saved: dict[str, Any] | None = None) -> Task:
    """The task, checked against what the dataset holds; a checkpoint's task state (a regression's
    target statistics) replaces what the data would give."""
    task = TASKS.build(cfg.task.name, **params_of(cfg.task))
    train_targets = bundle.train.targets() if callable(getattr(bundle.train, "targets", None)) else None
    task.bind(
        DataInfo(
            target=bundle.target,
            classes=list(bundle.classes),
            name=f"dataset={cfg.dataset.name}",
            train_targets=train_targets,
            text=bundle.text,
            mask_values=dict(bundle.mask_values),
        )
    )
    if saved:
        task.load_state_dict(saved)
    return task


def model_args(cfg: DictConfig, bundle: DataBundle) -> dict[str, Any]:
    """The model's registry name and every argument its builder gets: its config section's, and what
    the data gives (num_classes, in_channels, ... by name); saved in every checkpoint, so evaluate,
    generate and serve rebuild the same model without the data."""
    name, params = cfg.model.name, params_of(cfg.model)
    signature = inspect.signature(MODELS.get(name)).parameters
    facts = bundle.facts()
    wanted = [key for key in DATA_FACTS if key in signature and key not in params]
    missing = [
        key for key in wanted if key not in facts and signature[key].default is inspect.Parameter.empty
    ]
    if missing:
        gives = ", ".join(facts) or "nothing of the kind"
        raise UserError(
            f"model={name} needs {', '.join(missing)}, which dataset={cfg.dataset.name} does not give (it "
            f"gives {gives}); choose a model and dataset that fit (model=gpt with dataset=text, image "
            f"models with image datasets)"
        )
    return {"name": name, **params, **{key: facts[key] for key in wanted if key in facts}}


def build_model(cfg: DictConfig, args: dict[str, Any], weights: dict[str, Any] | None = None) -> nn.Module:
    """The model, built from the seed (the same seed, the same initial weights), then given its
    checkpoint's weights on resume, or finetune.checkpoint's on a fresh run."""
    torch.manual_seed(cfg.seed)
    model = MODELS.build(args["name"], **{k: v for k, v in args.items() if k != "name"})
    if weights is not None:
        model.load_state_dict(weights)
    elif cfg.finetune.checkpoint:
        from trainer.models.pretrained import load_weights_file

        load_weights_file(model, Path(cfg.finetune.checkpoint))
    return model


def build_optimizer(cfg: DictConfig, model: nn.Module) -> torch.optim.Optimizer:
    return OPTIMIZERS.build(cfg.optimizer.name, model=model, **params_of(cfg.optimizer))


def build_scheduler(
    cfg: DictConfig, optimizer: torch.optim.Optimizer, plan: RunPlan, progress: dict[str, Any] | None
) -> Any:
    """The schedule over the run's steps; after checkpoint.reset_scheduler it counts from that step."""
    start = 0
    if progress is not None:
        start = progress["step"] if cfg.checkpoint.reset_scheduler else progress.get("schedule_start", 0)
    return SCHEDULERS.build(
        cfg.scheduler.name,
        optimizer=optimizer,
        total_steps=plan.total_steps - start,
        steps_per_epoch=plan.steps_per_epoch,
        **params_of(cfg.scheduler),
    )


def build_ema(cfg: DictConfig, model: nn.Module, plan: RunPlan) -> WeightAverage | None:
    e = cfg.ema
    return (
        WeightAverage(model, e.decay, e.every, e.power, plan.total_steps, e.lookahead)
        if e.decay > 0
        else None
    )


def build_freezer(cfg: DictConfig, model: nn.Module, first_epoch: int) -> Any:
    """What trains in the first epoch, set now, before DDP sees which parameters train: finetune.freeze
    until finetune.unfreeze_at_epoch (the freezer, None when nothing is frozen), and the model's own
    start_epoch hook."""
    f = cfg.finetune
    refuse_changing_parameters(
        model, cfg.model.name, f.unfreeze_at_epoch if f.freeze else 0, first_epoch, cfg.trainer.strategy
    )
    freezer = None
    if f.freeze:
        from trainer.run.finetune import Freezer

        freezer = Freezer(model, list(f.freeze), f.unfreeze_at_epoch)
        freezer.apply(first_epoch)
    if isinstance(model, ModelHooks):
        model.start_epoch(first_epoch)
    return freezer


def wrap(cfg: DictConfig, model: nn.Module, device: torch.device, plan: RunPlan, sharded: bool) -> nn.Module:
    """What steps: the model in DDP with several processes (already sharded with fsdp), compiled when
    trainer.compile asks."""
    stepped = model if sharded else distributed.wrap(model, device, cfg.trainer.sync_batchnorm)
    return compile_model(stepped, plan.compile_mode) if plan.compile else stepped


def shard(cfg: DictConfig, model: nn.Module, ema: WeightAverage | None, device: torch.device) -> bool:
    """trainer.activation_checkpointing on the model's blocks; trainer.strategy=fsdp: the model and its
    average sharded over the processes (FSDP2). Returns whether they are."""
    from trainer.run import sharding

    t = cfg.trainer
    if t.activation_checkpointing:
        sharding.checkpoint_activations(model, cfg.model.name)
    if t.strategy != "fsdp":
        if t.cpu_offload:
            raise UserError(
                "trainer.cpu_offload: offloads FSDP's shards; set trainer.strategy=fsdp, or drop it"
            )
        return False
    if initialises_from_data(model):
        raise UserError(
            f"trainer.strategy=fsdp: model={cfg.model.name} initialises itself from the first batch, which "
            f"sharded weights cannot take; set trainer.strategy=ddp"
        )
    for module in [model] if ema is None else [model, ema.module]:
        sharding.shard(module, device, str(t.precision), t.cpu_offload, cfg.model.name)
    return True


def refuse_changing_parameters(
    model: nn.Module, model_name: str, unfreeze_at_epoch: int, first_epoch: int, strategy: str = "auto"
) -> None:
    """DDP fixes the trained parameters when it wraps the model, and would then silently skip the
    gradient reduction of any that start or stop training (FSDP fixes them when it shards): refused
    while that can still happen."""
    if not distributed.active() and strategy != "fsdp":
        return
    if unfreeze_at_epoch:
        fixes = (
            "with trainer.strategy=fsdp FSDP fixes the trained parameters when it shards"
            if strategy == "fsdp"
            else "with several processes DDP fixes the trained parameters when it wraps"
        )
        raise UserError(
            f"finetune.unfreeze_at_epoch: {fixes} the model; unfreeze in a resumed run instead "
            "(finetune.freeze=[] on resume)"
        )
    if isinstance(model, ModelHooks) and model.changes_trained_parameters_until() > first_epoch:
        raise UserError(
            f"model={model_name}: it changes which parameters train until epoch "
            f"{model.changes_trained_parameters_until()}, which DDP cannot follow with several processes; "
            f"train that part in one process, or resume after that epoch"
        )


def build_metric_log(
    cfg: DictConfig, run_dir: Path, saved: dict[str, Any] | None, resume_step: int | None
) -> Any:
    """The loggers (rank 0; the others report nothing), each told where a resumed run stands: what it
    drops (a rewinding one) or which tracked run it continues (a tracker, from the checkpoint)."""
    if not distributed.is_main():
        return NullMetricLog()  # rank 0 logs the reduced metrics for all
    saved = saved or {}
    config = OmegaConf.to_container(cfg, resolve=True)  # the trackers' parameters
    section = cfg.get("logger")
    loggers = []
    for name in list(section.keys()) if section else ["tensorboard"]:
        options = OmegaConf.to_container(section[name], resolve=True) if section and section[name] else {}
        loggers.append(
            LOGGERS.build(
                name,
                run_dir=run_dir,
                resume_step=resume_step,
                state=saved.get("state", {}).get(name, {}),
                config=config,
                **options,
            )
        )
    return MetricLog(
        loggers,
        held=saved.get("held"),
        resume_step=resume_step,
        sent_record=run_dir / "checkpoints" / "trackers_sent.json",
    )


def check_model_fits(cfg: DictConfig, model: nn.Module, task: Task, batch: Any, device: torch.device) -> None:
    """One forward pass of two training samples before anything trains: a model that cannot take the
    dataset's inputs, or whose outputs the task cannot use, is refused in one line that names both. The
    model is evaluated (no statistics change) and the random state is restored."""
    batch = move(batch, device)
    inputs = task.inputs(batch)
    model_name, task_name, data_name = (
        f"model={cfg.model.name}",
        f"task={cfg.task.name}",
        f"dataset={cfg.dataset.name}",
    )
    was_training = model.training
    model.eval()
    try:
        with torch.no_grad(), torch.random.fork_rng(devices=[device] if device.type == "cuda" else []):
            try:
                outputs = model(inputs)
            except Exception as e:  # noqa: BLE001 - whatever the model raises on inputs it was not made for
                raise UserError(
                    f"{model_name} cannot take the inputs of {data_name} ({describe(inputs)}): "
                    f"{first_line(e)}; choose a model made for this data"
                ) from None
            problem = task.check_outputs(outputs, batch)
            if problem is None:
                try:
                    task.loss(outputs, batch)
                except Exception as e:  # noqa: BLE001 - the same, from the task's loss
                    problem = f"its loss fails on them ({first_line(e)})"
    finally:
        model.train(was_training)
    if problem is not None:
        raise UserError(
            f"{model_name} does not fit {task_name}: for inputs {describe(inputs)} of {data_name} it "
            f"outputs {describe(outputs)}, and {problem}; choose a model and task that fit"
        )


def describe(value: Any) -> str:
    """A tensor (or a dict or tuple of them) as its dtype and shape, for messages."""
    if isinstance(value, torch.Tensor):
        return f"{str(value.dtype).removeprefix('torch.')} {list(value.shape)}"
    if isinstance(value, dict):
        return "{" + ", ".join(f"{k}: {describe(v)}" for k, v in value.items()) + "}"
    if isinstance(value, (list, tuple)):
        return "(" + ", ".join(describe(v) for v in value) + ")"
    return type(value).__name__


def first_line(error: BaseException) -> str:
    text = str(error).strip()
    return f"{type(error).__name__}: {text.splitlines()[0][:200]}" if text else type(error).__name__
