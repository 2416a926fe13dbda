"""`task=multilabel`: any number of labels per sample (targets are multi-hot vectors): binary
cross-entropy on the logits (optional `pos_weight`); metrics mAP (macro), F1 at `task.threshold`
(macro over labels) and the exact-match ratio; predict and serve answer the labels above the threshold
with their scores."""

from collections.abc import Mapping
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor

from trainer.core import distributed
from trainer.core.errors import UserError
from trainer.core.registry import TASKS
from trainer.tasks.base import Batch, DataInfo, Evaluation, Task, option


def average_precision(scores: Tensor, targets: Tensor) -> Tensor:
    """Per label (column): the mean, over its positives, of the precision at each positive's rank
    when samples are sorted by score; NaN for a label without positives."""
    order = scores.argsort(dim=0, descending=True, stable=True)
    hits = targets.gather(0, order).double()
    precision = (
        hits.cumsum(0) / torch.arange(1, len(hits) + 1, device=hits.device, dtype=torch.float64)[:, None]
    )
    positives = hits.sum(0)
    return (precision * hits).sum(0) / positives.where(positives > 0, torch.nan)


class MultiLabelEvaluation(Evaluation):
    """mAP needs every score, not a sum: scores and targets are kept on the device (N x labels, small
    next to the images) and gathered from every process once, at the end."""

    def __init__(self, task: "MultiLabel", device: torch.device) -> None:
        super().__init__(task, device)
        self.scores: list[Tensor] = []
        self.targets: list[Tensor] = []

    @torch.no_grad()
    def update(self, outputs: Tensor, batch: Batch) -> None:
        super().update(outputs, batch)
        self.scores.append(outputs.float())
        self.targets.append(self.task.targets(batch) > 0.5)

    def compute(self) -> dict[str, float]:
        found = self.task.from_eval_sums(self.totals())
        labels = len(self.task.classes)
        scores = distributed.all_gather_rows(
            torch.cat(self.scores) if self.scores else torch.zeros(0, labels, device=self.device)
        )
        targets = distributed.all_gather_rows(
            torch.cat(self.targets)
            if self.targets
            else torch.zeros(0, labels, dtype=torch.bool, device=self.device)
        )
        ap = average_precision(scores, targets)
        found["map"] = float(ap.nanmean()) if bool(ap.isfinite().any()) else 0.0
        return found


@TASKS.register("multilabel")
class MultiLabel(Task):
    name, target, monitor = "multilabel", "labels", "map"
    metrics = {"loss": "min", "map": "max", "f1": "max", "exact_match": "max"}
    train_metrics = {"exact_match": "max"}
    train_sums_size = 1  # samples whose every label is right at the threshold

    def __init__(
        self, threshold: float = 0.5, pos_weight: float | list[float] | None = None, tta: str = "none"
    ) -> None:
        super().__init__(tta)
        if not 0 < threshold < 1:
            raise UserError(f"task.threshold: must be in (0, 1), got {threshold}")
        weights = [pos_weight] if isinstance(pos_weight, (int, float)) else list(pos_weight or [])
        if any(w <= 0 for w in weights):
            raise UserError(f"task.pos_weight: must be positive, got {pos_weight}")
        self.threshold, self.pos_weight_values = threshold, weights
        self.logit_threshold = float(torch.logit(torch.tensor(threshold, dtype=torch.float64)))
        self.pos_weight: Tensor | None = None

    def bind(self, data: DataInfo) -> None:
        super().bind(data)
        if len(self.pos_weight_values) not in (0, 1, len(self.classes)):
            raise UserError(
                f"task.pos_weight: one value, or one per label ({len(self.classes)} in {data.name}), "
                f"got {len(self.pos_weight_values)}"
            )

    def check_outputs(self, outputs: Tensor, batch: Batch) -> str | None:
        if outputs.ndim != 2 or outputs.shape[1] != len(self.classes):
            return f"task={self.name} needs [N, {len(self.classes)}] logits (one per label)"
        return None

    def _weights(self, device: torch.device) -> Tensor | None:
        if not self.pos_weight_values:
            return None
        if self.pos_weight is None or self.pos_weight.device != device:
            self.pos_weight = torch.tensor(self.pos_weight_values, device=device)
        return self.pos_weight

    def _right(self, outputs: Tensor, targets: Tensor) -> Tensor:
        return ((outputs.detach().float() > self.logit_threshold) == (targets > 0.5)).all(1)

    def loss(self, outputs: Tensor, batch: Batch) -> Tensor:
        targets = self.targets(batch).to(outputs.dtype)
        return F.binary_cross_entropy_with_logits(outputs, targets, pos_weight=self._weights(outputs.device))

    def train_sums(self, outputs: Tensor, batch: Batch) -> Tensor:
        return self._right(outputs, self.targets(batch)).sum().float().view(1)

    def from_train_sums(self, sums: list[float], count: int) -> dict[str, float]:
        return {"exact_match": sums[0] / max(count, 1)}

    def evaluation(self, device: torch.device) -> Evaluation:
        return MultiLabelEvaluation(self, device)

    def eval_sums_size(self) -> int:
        return 3 + 3 * len(self.classes)  # loss, exact matches, samples; per label: tp, fp, fn

    def eval_sums(self, outputs: Tensor, batch: Batch) -> Tensor:
        targets, outputs = self.targets(batch), outputs.float()
        loss = F.binary_cross_entropy_with_logits(
            outputs, targets.float(), pos_weight=self._weights(outputs.device)
        )
        predicted, actual = outputs > self.logit_threshold, targets > 0.5
        counts = torch.stack(
            [(predicted & actual).sum(0), (predicted & ~actual).sum(0), (~predicted & actual).sum(0)]
        )
        n = torch.tensor([float(len(targets))], device=outputs.device)
        return torch.cat(
            [
                (loss * len(targets)).view(1),
                self._right(outputs, targets).sum().float().view(1),
                n,
                counts.flatten().float(),
            ]
        )

    def from_eval_sums(self, sums: list[float]) -> dict[str, float]:
        loss, exact, count = sums[:3]
        tp, fp, fn = torch.tensor(sums[3:], dtype=torch.float64).view(3, -1)
        seen = (tp + fp + fn) > 0  # a label never present nor predicted has no F1
        f1 = (2 * tp / (2 * tp + fp + fn).clamp(min=1))[seen]
        count = max(count, 1)
        return {
            "loss": loss / count,
            "f1": float(f1.mean()) if len(f1) else 0.0,
            "exact_match": exact / count,
        }

    def answer(self, outputs: Tensor, options: Mapping[str, Any]) -> list[dict[str, Any]]:
        threshold = option(options, "threshold", self.threshold, float, low=0)
        if threshold >= 1:
            raise ValueError(f"threshold must be below 1, got {threshold}")
        scores = torch.sigmoid(outputs.float())
        answers = []
        for row in scores.tolist():
            above = sorted(((s, i) for i, s in enumerate(row) if s >= threshold), reverse=True)
            answers.append(
                {
                    "labels": [{"class": self.classes[i], "index": i, "score": s} for s, i in above],
                    "threshold": threshold,
                }
            )
        return answers
