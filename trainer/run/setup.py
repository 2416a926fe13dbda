"""One small builder per component, each reading only its own part of the config."""

import logging
from pathlib import Path
from typing import Any

import torch
from omegaconf import DictConfig, OmegaConf
from torch import nn

from trainer.config import model_params, params_of, upgrade_legacy
from trainer.core import distributed
from trainer.core.checkpoint import load_checkpoint, newest_valid, remove_stale_temporaries
from trainer.core.errors import UserError
from trainer.core.registry import LOGGERS, TASKS
from trainer.data import DATASETS, DataBundle, Loaders, build_loaders, sample_batch
from trainer.models import MODELS
from trainer.optim import OPTIMIZERS, SCHEDULERS, plan_steps
from trainer.run.loop import Trainer
from trainer.run.metrics import MetricLog, NullMetricLog
from trainer.run.speed import WeightAverage, compile_model, configure_backends
from trainer.tasks.base import DataInfo, Task, move

log = logging.getLogger("trainer")
# Keys of the dataset config that do not change what a checkpoint's model was trained to do.
DATASET_LOCATION_KEYS = {"root", "download", "verify_checksum"}


def build_data(cfg: DictConfig, device: torch.device) -> tuple[DataBundle, Loaders]:
    bundle = DATASETS.build(cfg.dataset.name, **params_of(cfg.dataset))
    ld = cfg.loader
    pin = device.type == "cuda" if ld.pin_memory is None else ld.pin_memory
    loaders = build_loaders(
        bundle,
        batch_size=ld.batch_size,
        num_workers=ld.num_workers,
        pin_memory=pin,
        prefetch_factor=ld.prefetch_factor,
        persistent_workers=ld.persistent_workers,
        shuffle=ld.shuffle,
        drop_last=ld.drop_last,
        seed=cfg.seed,
        on_device=device if ld.on_device else None,
        rank=distributed.rank(),
        world_size=distributed.world_size(),
    )
    if len(loaders.train) == 0:
        raise UserError(
            f"loader.batch_size: {ld.batch_size} with loader.drop_last=true leaves no training batch "
            f"({len(bundle.train)} images); lower the batch size"
        )
    return bundle, loaders


def build_model(cfg: DictConfig, initial_weights: bool = True) -> nn.Module:
    """The model, built by its registry entry from the seed, then given model.checkpoint's weights
    (unless `initial_weights` is false: a resumed or evaluated run's own weights replace them anyway,
    and the file need not be there any more)."""
    torch.manual_seed(cfg.seed)  # the same seed gives the same initial weights
    model = MODELS.build(cfg.model.name, **model_params(cfg.model))
    checkpoint = cfg.model.get("checkpoint")
    if checkpoint and initial_weights:
        from trainer.models.pretrained import load_weights_file

        load_weights_file(model, Path(checkpoint))
    return model


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


def build_task(cfg: DictConfig, bundle: DataBundle, state: dict[str, Any] | None = None) -> Task:
    """The task, checked against what the dataset holds; a checkpoint's task state (e.g. a regression's
    target statistics) replaces what the data would give."""
    task = TASKS.build(cfg.task.name, **params_of(cfg.task))
    task.options = params_of(cfg.task)
    train_targets = bundle.train.targets() if hasattr(bundle.train, "targets") else None
    task.bind(
        DataInfo(
            target=bundle.target,
            classes=list(bundle.classes),
            name=f"dataset={cfg.dataset.name}",
            train_targets=train_targets,
            extra=dict(bundle.extra),
        )
    )
    if state is not None and state.get("task"):
        task.load_state_dict(state["task"])
    return task


def build_trainer(
    cfg: DictConfig,
    run_dir: Path,
    device: torch.device,
    loaders: Loaders,
    state: dict[str, Any] | None,
    task: Task,
) -> Trainer:
    """Builds the model, optimizer, schedule and metric log, and restores `state` when resuming."""
    t, ck = cfg.trainer, cfg.checkpoint
    configure_backends(device, t.cudnn_benchmark, str(t.precision), t.threads, t.keep_cpu_memory)
    # On the device before the optimizer sees the parameters, so it can pick the device's kernels. The
    # memory format only when asked: it inspects every parameter, which lazy modules cannot answer yet.
    model = build_model(cfg, initial_weights=state is None).to(device)
    check_model_fits(cfg, model, task, sample_batch(loaders.train_split), device)
    if t.channels_last:
        model = model.to(memory_format=torch.channels_last)
    optimizer = OPTIMIZERS.build(cfg.optimizer.name, model=model, **params_of(cfg.optimizer))
    _, steps_per_epoch, total_steps = plan_steps(
        len(loaders.train), t.limit_train_batches, t.accumulate_grad_batches, t.max_epochs, t.max_steps
    )
    ema = (
        WeightAverage(model, t.ema_decay, t.ema_every, t.ema_decay_power, total_steps, t.ema_lookahead)
        if t.ema_decay > 0
        else None
    )
    resumed_step = None if state is None else state["progress"]["step"]
    schedule_start = (
        0
        if state is None
        else resumed_step
        if ck.reset_scheduler
        else state["progress"].get("schedule_start", 0)
    )
    scheduler = SCHEDULERS.build(
        cfg.scheduler.name,
        optimizer=optimizer,
        total_steps=total_steps - schedule_start,
        steps_per_epoch=steps_per_epoch,
        **params_of(cfg.scheduler),
    )
    freezer, first_epoch = None, 0 if state is None else state["progress"]["epoch"]
    if cfg.model.get("freeze"):  # checked before a tracker opens a run for a run that is refused
        from trainer.run.finetune import Freezer

        freezer = Freezer(model, list(cfg.model.freeze), t.unfreeze_at_epoch)
        if distributed.active() and t.unfreeze_at_epoch:
            raise UserError(
                "trainer.unfreeze_at_epoch: with several processes DDP fixes the trained parameters when "
                "it wraps the model; unfreeze in a resumed run instead (model.freeze=[] on resume)"
            )
        freezer.apply(first_epoch)  # before DDP sees which ones train
    if hasattr(model, "start_epoch"):  # the same: what trains in the first epoch, before DDP wraps the model
        model.start_epoch(first_epoch)
    if distributed.active() and cfg.model.get("whiten_bias_epochs", 0) > first_epoch:
        raise UserError(
            "model.whiten_bias_epochs: with several processes DDP fixes the trained parameters when it "
            "wraps the model; set model.whiten_bias_epochs=0 (or resume after that epoch)"
        )
    config = OmegaConf.to_container(
        cfg, resolve=True
    )  # plain: in every checkpoint, and the trackers' parameters
    if distributed.is_main():
        metrics = build_metric_log(cfg, config, run_dir, state)
        remove_stale_temporaries(run_dir / "checkpoints")
    else:
        metrics = NullMetricLog()  # rank 0 logs the reduced metrics for all
    stepped = distributed.wrap(model, device, t.sync_batchnorm)  # DDP when several processes
    trainer = Trainer(
        compile_model(stepped, t.compile_mode) if t.compile else stepped,
        optimizer,
        scheduler,
        loaders,
        settings=t,
        checkpoint=ck,
        task=task,
        device=device,
        run_dir=run_dir,
        metrics=metrics,
        ema=ema,
        config=config,
        freezer=freezer,
    )
    if state is not None:
        trainer.load_state_dict(state, reset_optimizer=ck.reset_optimizer, reset_scheduler=ck.reset_scheduler)
    return trainer


def logger_names(cfg: DictConfig) -> list[str]:
    """The loggers `logger=[...]` chose (each file of conf/logger/ holds its options under its name)."""
    section = cfg.get("logger")
    return list(section.keys()) if section else ["tensorboard"]


def build_metric_log(
    cfg: DictConfig, config: dict[str, Any], run_dir: Path, state: dict[str, Any] | None
) -> MetricLog:
    """The loggers, each told where a resumed run stands: what it drops (a rewinding one) or which
    tracked run it continues (a tracker, from the checkpoint)."""
    saved = (state or {}).get("loggers") or {}
    resume_step = None if state is None else state["progress"]["step"]
    loggers = []
    for name in logger_names(cfg):
        options = OmegaConf.to_container(cfg.logger[name], resolve=True) if cfg.get("logger") else {}
        loggers.append(
            LOGGERS.build(
                name,
                run_dir=run_dir,
                resume_step=resume_step,
                state=saved.get("state", {}).get(name, {}),
                config=config,
                **(options or {}),
            )
        )
    return MetricLog(
        loggers,
        held=saved.get("held"),
        resume_step=resume_step,
        sent_record=run_dir / "checkpoints" / "trackers_sent.json",
    )


def load_resume_state(resume: str | None, run_dir: Path, cfg: DictConfig) -> dict[str, Any] | None:
    """The state `resume` points at: a checkpoint file (verified, no fallback), a run dir's newest valid
    checkpoint, or with `auto` this run dir's newest valid checkpoint when there is one."""
    if resume is None:
        return None
    if resume == "auto":
        try:
            _, state = newest_valid(run_dir / "checkpoints")
        except UserError as e:
            log.warning("resume=auto: %s; starting fresh", str(e).removeprefix("resume: "))
            return None
    elif Path(resume).is_dir():
        _, state = newest_valid(Path(resume) / "checkpoints")
    else:
        state = load_checkpoint(Path(resume))
    state["config"] = upgrade_legacy(state["config"])  # a run from before tasks
    check_compatible(state["config"], OmegaConf.to_container(cfg, resolve=True))
    return state


def check_compatible(saved: dict[str, Any], current: dict[str, Any]) -> None:
    """A checkpoint's model only fits the architecture and data it was trained for; changes to the
    optimizer or schedule are allowed, and said."""
    differences = [
        f"{group}.{key}: {saved[group].get(key)!r} -> {current[group].get(key)!r}"
        for group in ("model", "dataset")
        for key in sorted(set(saved[group]) | set(current[group]))
        if saved[group].get(key) != current[group].get(key)
        and not (group == "dataset" and key in DATASET_LOCATION_KEYS)
    ]
    if differences:
        raise UserError(
            f"resume: the checkpoint was trained with another model or dataset ({'; '.join(differences)}); "
            f"resume with the original settings, or start a new run"
        )
    if saved["task"]["name"] != current["task"]["name"]:
        raise UserError(
            f"task.name: the checkpoint was trained for task={saved['task']['name']}; resume with "
            f"task={saved['task']['name']}, or start a new run"
        )
    if (
        saved["optimizer"]["name"] != current["optimizer"]["name"]
        and not current["checkpoint"]["reset_optimizer"]
    ):
        raise UserError(
            f"optimizer.name: the checkpoint's optimizer is {saved['optimizer']['name']}; resume with "
            f"optimizer={saved['optimizer']['name']}, or add checkpoint.reset_optimizer=true"
        )
    for key in sorted(set(saved["scheduler"]) | set(current["scheduler"])):
        if saved["scheduler"].get(key) != current["scheduler"].get(key):
            log.warning(
                "scheduler.%s changed on resume: %r -> %r (applied)",
                key,
                saved["scheduler"].get(key),
                current["scheduler"].get(key),
            )
