"""A split's metrics, kept on the device: the loss (the mean over the split's samples) and a task's
named metric objects (torchmetrics). Updating costs a few small kernels and never a host sync; `compute`
is the one sync, and reduces over processes, so a split's value is exact (float64 sums where the device
has them), not an average of batch averages."""

import math
import warnings
from collections.abc import Mapping
from typing import Any

import torch
from torch import Tensor
from torchmetrics import Metric
from torchmetrics.regression import MeanSquaredError

from trainer.core import distributed


class MetricSet:
    def __init__(self, metrics: Mapping[str, Any], device: torch.device, with_loss: bool = True) -> None:
        self.device, self.with_loss = device, with_loss
        self.dtype = torch.float32 if device.type == "mps" else torch.float64  # MPS has no float64
        self.metrics = {name: metric.to(device) for name, metric in metrics.items()}
        for metric in self.metrics.values():
            metric.set_dtype(self.dtype)  # float sums in float64: exact up to the order of additions
        self.loss_sum = torch.zeros((), dtype=self.dtype, device=device)
        self.samples = 0

    def update(self, task: Any, outputs: Any, batch: Any, loss: Tensor | None = None, count: int = 0) -> None:
        """One batch: its mean loss (weighted by its `count` samples) and the task's metrics."""
        if loss is not None:
            self.loss_sum.add_(loss.detach().to(self.dtype) * count)
            self.samples += count
        if self.metrics:
            task.update(self.metrics, outputs.detach() if isinstance(outputs, Tensor) else outputs, batch)

    def compute(self) -> dict[str, float]:
        """{"loss": ..., name: ...} over the whole split and every process; every process must call it."""
        found: dict[str, float] = {}
        if self.with_loss:
            totals = torch.stack(
                [self.loss_sum, torch.tensor(float(self.samples), dtype=self.dtype, device=self.device)]
            )
            loss_sum, samples = distributed.all_reduce(totals).tolist()
            found["loss"] = loss_sum / max(samples, 1)
        with warnings.catch_warnings():  # a process whose share of a split was empty: it still reduces
            warnings.filterwarnings("ignore", message=".*was called before the ``update`` method.*")
            for name, metric in self.metrics.items():
                found[name] = float(metric.compute())
        return found

    def state_dict(self) -> dict[str, dict[str, Any]]:
        """Each metric's state summed over every process (every process must call it): what a checkpoint
        taken mid-epoch holds, for the resumed epoch to go on from."""
        states = {}
        for name, metric in self.metrics.items():
            with metric.sync_context(should_sync=distributed.active(), should_unsync=True):
                states[name] = {key: _copy(value) for key, value in metric.metric_state.items()}
        return states

    def load_state_dict(self, states: Mapping[str, Mapping[str, Any]]) -> None:
        """A checkpoint's states (the whole job's sums): one process carries them, the others start from
        zero, so the sums reduced at compute are the job's."""
        for name, metric in self.metrics.items():
            metric.reset()
            if distributed.is_main() and name in states:
                for key, value in states[name].items():
                    setattr(metric, key, _to(value, self.device))


def _copy(value: Any) -> Any:
    if isinstance(value, Tensor):
        return value.detach().clone()
    return [_copy(v) for v in value] if isinstance(value, list) else value


def _to(value: Any, device: torch.device) -> Any:
    if isinstance(value, Tensor):
        return value.to(device)
    return [_to(v, device) for v in value] if isinstance(value, list) else value


class RunningRatio(Metric):
    """A ratio of two sums, `hits / total`, for the training metrics reported every epoch: updated in
    place, 10 us a batch on a CPU where a torchmetrics classification metric's update takes 36 (measured),
    paid on every training step. Evaluation's metrics are torchmetrics' own."""

    full_state_update = False
    higher_is_better = True

    def __init__(self) -> None:
        super().__init__(compute_with_cache=False)
        self.add_state("hits", default=torch.zeros((), dtype=torch.float64), dist_reduce_fx="sum")
        self.add_state("total", default=torch.zeros((), dtype=torch.float64), dist_reduce_fx="sum")
        # torchmetrics wraps update() to count calls and drop a cached result, setting two attributes of
        # an nn.Module per call (a third of the cost here); neither matters for these in-place sums.
        self.update = self._add  # type: ignore[method-assign]

    def counts(self, outputs: Tensor, targets: Tensor) -> tuple[Tensor, Tensor | int]:
        raise NotImplementedError

    def update(self, outputs: Tensor, targets: Tensor) -> None:
        self._add(outputs, targets)

    def _add(self, outputs: Tensor, targets: Tensor) -> None:
        hits, total = self.counts(outputs, targets)
        self.hits.add_(hits)
        self.total.add_(total)

    def compute(self) -> Tensor:
        return self.hits / self.total.clamp(min=1)


class Accuracy(RunningRatio):
    """The share of samples (or pixels: targets of any shape) whose argmax over dim 1 is the target;
    targets equal to `ignore_index` count for nothing."""

    def __init__(self, ignore_index: int | None = None) -> None:
        super().__init__()
        self.ignore_index = ignore_index

    def counts(self, outputs: Tensor, targets: Tensor) -> tuple[Tensor, Tensor | int]:
        right = outputs.argmax(1) == targets
        if self.ignore_index is None:
            return right.sum(), targets.numel()
        counted = targets != self.ignore_index
        return (right & counted).sum(), counted.sum()


class ExactMatch(RunningRatio):
    """The share of samples whose every label is right at the score threshold (scores in [0, 1])."""

    def __init__(self, threshold: float) -> None:
        super().__init__()
        self.threshold = threshold

    def counts(self, outputs: Tensor, targets: Tensor) -> tuple[Tensor, Tensor | int]:
        return ((outputs > self.threshold) == (targets > 0.5)).all(1).sum(), len(targets)


class MeanAbsoluteError(RunningRatio):
    higher_is_better = False

    def counts(self, outputs: Tensor, targets: Tensor) -> tuple[Tensor, Tensor | int]:
        return (outputs - targets).abs().sum(), targets.numel()


class NatsPerToken(Metric):
    """Cross-entropy summed over tokens (float64) and the token count; `compute` gives perplexity, or
    bits per byte with `bytes_per_token`. Ours, not torchmetrics' Perplexity: the task computes the
    tokens' cross-entropy once per batch for both metrics (`update(nats, tokens)`), and bits per byte
    has no torchmetrics counterpart."""

    higher_is_better = False
    full_state_update = False

    def __init__(self, bytes_per_token: float | None = None) -> None:
        super().__init__()
        self.bytes_per_token = bytes_per_token
        self.add_state("nats", default=torch.zeros((), dtype=torch.float64), dist_reduce_fx="sum")
        self.add_state("tokens", default=torch.zeros((), dtype=torch.float64), dist_reduce_fx="sum")

    def update(self, nats: Tensor, tokens: int) -> None:
        self.nats += nats.to(self.nats.dtype)
        self.tokens += tokens

    def compute(self) -> Tensor:
        loss = self.nats / self.tokens.clamp(min=1)
        if self.bytes_per_token is None:
            return loss.clamp(max=700).exp()
        return loss / math.log(2) / self.bytes_per_token


class TargetsRMSE(MeanSquaredError):
    """Each target's root mean squared error, averaged over the targets."""

    def compute(self) -> Tensor:
        return super().compute().mean()
