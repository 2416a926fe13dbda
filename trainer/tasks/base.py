"""What a task is: everything about a supervised problem that the Trainer must not know.

A task turns a batch (a tuple or dict of tensors, already on the device) into the model's input, a loss
and metrics; it says which metrics `checkpoint.monitor` may name (with their modes), what a dataset
must hold for it, and how the model's outputs are turned into answers for evaluation, TTA, export,
predict and serve. The Trainer moves batches and asks the task; it names no loss and no metric.

Metrics accumulate on the device as sums (no host synchronisation per step) and are reduced over
processes when read, so a split's value is exact, not an average of batch averages.
"""

from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import Tensor, nn

from trainer.core import distributed
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
    """What a dataset declares it holds (the `DataBundle` fields a task reads)."""

    target: str  # "class" (an int), "labels" (a multi-hot vector), "values" (floats), "mask" (H x W ints)
    classes: list[str]  # class, label or target names
    name: str = "the dataset"
    train_targets: Tensor | None = None  # every training target, when the dataset can give them cheaply
    extra: dict[str, Any] = field(default_factory=dict)


class Evaluation:
    """Metric state over one split: `update` per batch on the device, `compute` once (reduced over
    processes). It keeps the sums the task gives for each batch (`Task.eval_sums`) and hands their totals to
    `Task.from_eval_sums`; a task whose metric needs every sample subclasses it (multilabel's mAP)."""

    def __init__(self, task: "Task", device: torch.device) -> None:
        self.task, self.device = task, device
        self.dtype = torch.float32 if device.type == "mps" else torch.float64  # MPS has no float64
        self.sums: Tensor | None = None

    @torch.no_grad()
    def update(self, outputs: Tensor, batch: Batch) -> None:
        sums = self.task.eval_sums(outputs, batch).to(self.dtype)
        self.sums = sums if self.sums is None else self.sums.add_(sums)

    def totals(self) -> list[float]:
        """The sums over the whole split and every process; a host synchronisation."""
        sums = (
            self.sums
            if self.sums is not None
            else torch.zeros(self.task.eval_sums_size(), device=self.device, dtype=self.dtype)
        )
        return distributed.all_reduce(sums.clone()).tolist()

    def compute(self) -> dict[str, float]:
        return self.task.from_eval_sums(self.totals())


class Task:
    """The base of every task. Subclasses set `name`, `target`, `metrics` and implement `loss`, the
    sums (`train_sums`, `eval_sums`) and `answer`; the rest has defaults that suit (input, target)
    tuples."""

    name = "task"
    target = "class"  # what a dataset's samples must hold (DataInfo.target)
    metrics: dict[str, str] = {"loss": "min"}  # what evaluation reports -> the mode a monitor of it takes
    train_metrics: dict[str, str] = {}  # what training reports besides its loss (from train_sums)
    monitor = "loss"  # the default checkpoint.monitor, on the validation split
    train_sums_size = 0  # how many running sums train_sums returns

    def __init__(self, tta: str = "none") -> None:
        if tta not in TTA_MODES:
            raise UserError(f"task.tta: must be one of {', '.join(TTA_MODES)}, got {tta!r}")
        self.tta = tta
        self.classes: list[str] = []
        self.options: dict[str, Any] = {}  # the config's task section, set by whoever builds the task

    # ---- data ---------------------------------------------------------------------------------------
    def bind(self, data: DataInfo) -> None:
        """Checks that the dataset holds what this task needs and learns its names."""
        if data.target != self.target:
            example = f" (e.g. dataset={EXAMPLES[self.target]})" if self.target in EXAMPLES else ""
            raise UserError(
                f"task={self.name}: {data.name} holds {TARGET_WORDS.get(data.target, data.target)} "
                f"targets, but {self.name} needs {TARGET_WORDS.get(self.target, self.target)} ones; "
                f"choose a dataset that holds them{example}, or another task"
            )
        self.classes = list(data.classes)

    def inputs(self, batch: Batch) -> Any:
        """What the model is called with."""
        return batch["inputs"] if isinstance(batch, dict) else batch[0]

    def targets(self, batch: Batch) -> Any:
        return batch["targets"] if isinstance(batch, dict) else batch[1]

    def count(self, batch: Batch) -> int:
        return len(self.targets(batch))

    def with_inputs(self, batch: Batch, inputs: Tensor, targets: Any) -> Batch:
        if isinstance(batch, dict):
            return {**batch, "inputs": inputs, "targets": targets}
        return type(batch)((inputs, targets, *batch[2:]))

    def check_outputs(self, outputs: Tensor, batch: Batch) -> str | None:
        """What makes the model's outputs for `batch` unusable for this task (their shape, say), as the
        end of a sentence that names what the task needs; None when they fit. Checked on one small batch
        before training, after which the loss must also accept them."""
        return None

    # ---- training -----------------------------------------------------------------------------------
    def mix(self, batch: Batch) -> Batch:
        """A training-only transform of the whole batch (MixUp, CutMix); the loss sees its result."""
        return batch

    def loss(self, outputs: Tensor, batch: Batch) -> Tensor:
        raise NotImplementedError

    def train_sums(self, outputs: Tensor, batch: Batch) -> Tensor:
        """This batch's contribution to the running training metrics (a 1-D device tensor of
        train_sums_size values); `batch` is the unmixed batch."""
        return torch.zeros(0, device=outputs.device)

    def from_train_sums(self, sums: list[float], count: int) -> dict[str, float]:
        return {}

    # ---- evaluation ---------------------------------------------------------------------------------
    def evaluation(self, device: torch.device) -> Evaluation:
        return Evaluation(self, device)

    def eval_sums(self, outputs: Tensor, batch: Batch) -> Tensor:
        """This batch's contribution to the evaluation sums: a 1-D device tensor of eval_sums_size()."""
        raise NotImplementedError

    def eval_sums_size(self) -> int:
        raise NotImplementedError

    def from_eval_sums(self, sums: list[float]) -> dict[str, float]:
        """The metrics (with "loss") from the split's totals."""
        raise NotImplementedError

    def evaluated(self, model: nn.Module) -> nn.Module:
        """The model as evaluated, tested and exported: under this task's test-time augmentation."""
        return {"flip": FlipAverage, "flip_translate": FlipTranslateAverage}.get(self.tta, lambda m: m)(model)

    def exported(self, model: nn.Module) -> nn.Module:
        """What the export holds (e.g. with the targets' standardisation undone)."""
        return model

    def dynamic_dims(self) -> dict[int, tuple[str, int]]:
        """Input dimensions besides the batch that the export must take at any size: {dim: (name, max)}."""
        return {}

    # ---- state saved with checkpoints and exports -----------------------------------------------------
    def state_dict(self) -> dict[str, Any]:
        return {}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        pass

    def manifest(self) -> dict[str, Any]:
        """What predict and serve need to rebuild this task from an export: its options (the config's
        task section), names and state."""
        return {
            "name": self.name,
            "options": self.options,
            "classes": self.classes,
            "state": self.state_dict(),
        }

    # ---- answers ------------------------------------------------------------------------------------
    def answer(self, outputs: Tensor, options: Mapping[str, str]) -> list[dict[str, Any]]:
        """The exported model's outputs for a batch as one JSON-able answer per input. `options` are
        the request's (predict's keys, serve's query): each task reads the ones it knows."""
        raise NotImplementedError

    def monitors(self) -> dict[str, str]:
        """Every metric checkpoint.monitor may name, with its default mode."""
        return {
            **{f"val/{k}": m for k, m in self.metrics.items()},
            **{f"train/{k}": m for k, m in {"loss": "min", **self.train_metrics}.items()},
        }


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


TTA_MODES = ("none", "flip", "flip_translate")


class FlipAverage(nn.Module):
    """Test-time augmentation: the mean of the outputs for an input and for its mirror image."""

    def __init__(self, model: nn.Module, flip_back: bool = False) -> None:
        super().__init__()
        self.model, self.flip_back = model, flip_back

    def forward(self, x: Tensor) -> Tensor:
        mirrored = self.model(x.flip(-1))
        return (self.model(x) + (mirrored.flip(-1) if self.flip_back else mirrored)) / 2


class FlipTranslateAverage(nn.Module):
    """The speed records' test-time augmentation (airbench's): the flip average of the image, weighted
    1/2, and of two copies shifted by one pixel (up-left and down-right, the border reflected), 1/4 each."""

    def __init__(self, model: nn.Module) -> None:
        super().__init__()
        self.flips = FlipAverage(model)

    def forward(self, x: Tensor) -> Tensor:
        height, width = x.shape[-2], x.shape[-1]
        padded = torch.nn.functional.pad(x, (1, 1, 1, 1), mode="reflect")
        shifted = self.flips(padded[..., :height, :width]) + self.flips(padded[..., 2:, 2:])
        return self.flips(x) / 2 + shifted / 4


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


def resolve_monitor(task: Task, monitor: str | None, mode: str | None) -> tuple[str, str]:
    """checkpoint.monitor and checkpoint.mode: the task's default monitor when null, the metric's own
    mode when null; a metric the task does not report is the user's mistake."""
    monitors = task.monitors()
    monitor = monitor or f"val/{task.monitor}"
    if monitor not in monitors:
        raise UserError(
            f"checkpoint.monitor: task={task.name} does not report {monitor!r}; choose one of "
            f"{', '.join(monitors)}"
        )
    return monitor, mode or monitors[monitor]
