"""What a task is: a loss and named metrics.

A task turns a batch (a tuple or dict of tensors, already on the device) and the model's outputs into
a loss, and names the metrics evaluation reports. Those two methods, `loss(outputs, batch)` and
`metrics()`, are all a task must have; the rest below has defaults that suit (inputs, targets) batches.
What predict and serve answer, test-time augmentation and export wrappers are optional abilities a task
declares by also inheriting from the classes in trainer/tasks/abilities.py.

Metrics are torchmetrics objects (or any object with the same `update`/`compute`/`reset` and a
`higher_is_better`): they keep their state on the device, are updated every batch without a host
synchronisation, and reduce over processes when computed. The framework adds the loss (the mean over
the split), and checkpoint.monitor may name any of them: val/<name>, train/<name>.
"""

from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import Tensor

from trainer.core.errors import UserError

Batch = Any  # a tuple/list or a dict of tensors


def move(batch: Batch, device: torch.device, channels_last: bool = False) -> Batch:
    """Every tensor of a batch to the device (asynchronously from pinned memory); 4-D floating tensors
    (image batches) in channels_last when asked."""
    if type(batch) is list and len(batch) == 2 and not channels_last:  # the common (inputs, targets): fast
        return (
            [batch[0].to(device, non_blocking=True), batch[1].to(device, non_blocking=True)]
            if isinstance(batch[0], Tensor) and isinstance(batch[1], Tensor)
            else [move(v, device) for v in batch]
        )
    if isinstance(batch, Tensor):
        batch = batch.to(device, non_blocking=True)
        if channels_last and batch.ndim == 4 and batch.is_floating_point():
            batch = batch.contiguous(memory_format=torch.channels_last)
        return batch
    if isinstance(batch, Mapping):
        return {key: move(value, device, channels_last) for key, value in batch.items()}
    if isinstance(batch, (list, tuple)):
        return type(batch)(move(value, device, channels_last) for value in batch)
    return batch


def take(batch: Batch, index: Tensor) -> Batch:
    """The samples `index` of a batch (rows of every tensor)."""
    if isinstance(batch, Tensor):
        return batch[index.to(batch.device)]
    if isinstance(batch, Mapping):
        return {key: take(value, index) for key, value in batch.items()}
    if isinstance(batch, (list, tuple)):
        return type(batch)(take(value, index) for value in batch)
    return batch


@dataclass
class DataInfo:
    """What a dataset declares it holds (the DataBundle fields a task reads)."""

    target: str  # "class" (an int), "labels" (a multi-hot vector), "values" (floats), "mask", "tokens"
    classes: list[str]  # class, label or target names
    name: str = "the dataset"
    train_targets: Tensor | None = None  # every training target, when the dataset can give them cheaply
    text: Any = None  # a text dataset's TextInfo (its tokenizer, vocabulary, input length)
    mask_values: dict[int, str] = field(default_factory=dict)  # segmentation: each mask value's first file


class Task:
    """A loss and named metrics: subclass it, implement `loss` and `metrics`, and register it with
    `@TASKS.register("name")`; its constructor's parameters are its config keys (task.<key>)."""

    target: str | None = None  # what a dataset's samples must hold (DataInfo.target); None: anything
    monitor: str = "loss"  # the default checkpoint.monitor: val/<monitor>
    unit: str = "image"  # what training speed is counted in (<unit>s_per_sec): `units(batch)` of them

    def __init__(self) -> None:
        self.classes: list[str] = []  # the dataset's class, label or target names (set by bind)

    # ---- what every task has ------------------------------------------------------------------------
    def loss(self, outputs: Any, batch: Batch) -> Tensor:
        """The batch's mean loss, a scalar tensor on the device."""
        raise NotImplementedError(f"{type(self).__name__} must define loss(outputs, batch)")

    def metrics(self) -> dict[str, Any]:
        """The metrics evaluation reports, by name, each a new torchmetrics object (the loss is added).
        Also called before the data is seen (self.classes empty), to learn their names and directions."""
        return {}

    # ---- defaults that suit (inputs, targets) batches -------------------------------------------------
    def train_metrics(self) -> dict[str, Any]:
        """Cheap metrics reported while training (train/<name>), beside the loss."""
        return {}

    def update(self, metrics: Mapping[str, Any], outputs: Any, batch: Batch) -> None:
        """Feeds one batch to the metrics: each gets (outputs, targets). `batch` is the unmixed batch."""
        targets = self.targets(batch)
        for metric in metrics.values():
            metric.update(outputs, targets)

    def bind(self, data: DataInfo) -> None:
        """Checks that the dataset holds what this task needs and learns its names."""
        if self.target is not None and data.target != self.target:
            example = f" (e.g. dataset={EXAMPLES[self.target]})" if self.target in EXAMPLES else ""
            raise UserError(
                f"task={self.name}: {data.name} holds {TARGET_WORDS.get(data.target, data.target)} "
                f"targets, but {self.name} needs {TARGET_WORDS.get(self.target, self.target)} ones; "
                f"choose a dataset that holds them{example}, or another task"
            )
        self.classes = list(data.classes)

    @property
    def name(self) -> str:
        return getattr(type(self), "registered_name", type(self).__name__)

    def inputs(self, batch: Batch) -> Any:
        """What the model is called with."""
        return batch["inputs"] if isinstance(batch, dict) else batch[0]

    def targets(self, batch: Batch) -> Any:
        return batch["targets"] if isinstance(batch, dict) else batch[1]

    def count(self, batch: Batch) -> int:
        """Samples in the batch: the loss is their mean."""
        return len(self.targets(batch))

    def units(self, batch: Batch) -> int:
        """How much of `unit` the batch holds (training speed): its samples, unless a task counts tokens."""
        return self.count(batch)

    def check_outputs(self, outputs: Any, batch: Batch) -> str | None:
        """What makes the model's outputs for `batch` unusable for this task (their shape, say), as the
        end of a sentence that names what the task needs; None when they fit. Checked on one small batch
        before training, after which the loss must also accept them."""
        return None

    def mix(self, batch: Batch) -> Batch:
        """A training-only transform of the whole batch (MixUp, CutMix); the loss sees its result."""
        return batch

    def state_dict(self) -> dict[str, Any]:
        """What the task learnt from the data (a regression's target statistics): saved with checkpoints
        and exports."""
        return {}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        pass


EXAMPLES = {
    "tokens": "text",
    "class": "synthetic, imagefolder or cifar10",
    "labels": "synthetic_multilabel, or manifest",
    "values": "synthetic_regression, or manifest with dataset.targets=[...]",
    "mask": "synthetic_shapes, or segfolder",
}
TARGET_WORDS = {
    "tokens": "next-token",
    "class": "single-class",
    "labels": "multi-label",
    "values": "regression (float)",
    "mask": "segmentation-mask",
}


def option(options: Mapping[str, Any], key: str, default: Any, kind: type, low: float | None = None) -> Any:
    """A request option (predict's key, serve's query) of the given type, or ValueError naming it."""
    if key not in options or options[key] is None:
        return default
    try:
        value = kind(options[key])
    except (TypeError, ValueError):
        raise ValueError(
            f"{key} must be {'an integer' if kind is int else 'a number'}, got {str(options[key])[:20]!r}"
        ) from None
    if low is not None and value < low:
        raise ValueError(f"{key} must be {low:g} or more, got {value}")
    return value


def metric_modes(metrics: Mapping[str, Any]) -> dict[str, str]:
    """Each metric's mode for checkpoint.monitor: "max" where higher is better, else "min"."""
    return {
        name: "max" if getattr(metric, "higher_is_better", True) else "min"
        for name, metric in metrics.items()
    }


def monitors(task: Task) -> dict[str, str] | None:
    """Every metric checkpoint.monitor may name, with its default mode: val/loss and val/<each of
    metrics()>, train/loss and train/<each of train_metrics()>. None when the task cannot name its
    metrics before it has seen the data (its metrics() failed unbound)."""
    try:
        evaluated, trained = task.metrics(), task.train_metrics()
    except Exception:  # noqa: BLE001 - a user's metrics() that needs the data: checked once it is bound
        if task.classes:
            raise
        return None
    return {
        **{f"val/{name}": mode for name, mode in {"loss": "min", **metric_modes(evaluated)}.items()},
        **{f"train/{name}": mode for name, mode in {"loss": "min", **metric_modes(trained)}.items()},
    }


def resolve_monitor(task: Task, monitor: str | None, mode: str | None) -> tuple[str, str | None]:
    """checkpoint.monitor and checkpoint.mode as the run uses them: the task's default monitor when
    null, the metric's own mode when null; a metric the task does not report is the user's mistake.
    The mode is None only for a task that cannot name its metrics yet (not bound to its data)."""
    monitor = monitor or f"val/{task.monitor}"
    found = monitors(task)
    if found is None:
        return monitor, mode
    if monitor not in found:
        raise UserError(
            f"checkpoint.monitor: task={task.name} does not report {monitor!r}; choose one of "
            f"{', '.join(found)}"
        )
    return monitor, mode or found[monitor]
