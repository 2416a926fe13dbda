"""`task=multilabel`: any number of labels per sample (targets are multi-hot vectors): binary
cross-entropy on the logits (optional `pos_weight`); metrics mAP, F1 at `task.threshold` (both macro over
the labels) and the exact-match ratio (torchmetrics); predict and serve answer the labels above the
threshold with their scores."""

from collections.abc import Mapping
from typing import Annotated, Any

import torch
import torch.nn.functional as F
from torch import Tensor

from trainer.core.errors import UserError
from trainer.core.fields import Check
from trainer.core.registry import TASKS
from trainer.tasks.abilities import Answers, TestTimeAugmentation
from trainer.tasks.base import Batch, DataInfo, Task, option


@TASKS.register("multilabel")
class MultiLabel(Task, Answers, TestTimeAugmentation):
    target, monitor = "labels", "map"

    def __init__(
        self,
        *,
        threshold: Annotated[float, Check(lambda v: 0 < v < 1, "in (0, 1)")],
        pos_weight: float | list[float] | None,
        tta: str,
    ) -> None:
        super().__init__()
        self.tta = self.check_tta(tta)
        weights = [pos_weight] if isinstance(pos_weight, (int, float)) else list(pos_weight or [])
        if any(w <= 0 for w in weights):
            raise UserError(f"task.pos_weight: must be positive, got {pos_weight}")
        self.threshold, self.pos_weight_values = threshold, weights
        self.pos_weight: Tensor | None = None

    def bind(self, data: DataInfo) -> None:
        super().bind(data)
        if len(self.pos_weight_values) not in (0, 1, len(self.classes)):
            raise UserError(
                f"task.pos_weight: one value, or one per label ({len(self.classes)} in {data.name}), "
                f"got {len(self.pos_weight_values)}"
            )

    def _weights(self, device: torch.device) -> Tensor | None:
        if not self.pos_weight_values:
            return None
        if self.pos_weight is None or self.pos_weight.device != device:
            self.pos_weight = torch.tensor(self.pos_weight_values, device=device)
        return self.pos_weight

    def loss(self, outputs: Tensor, batch: Batch) -> Tensor:
        targets = self.targets(batch).to(outputs.dtype)
        return F.binary_cross_entropy_with_logits(outputs, targets, pos_weight=self._weights(outputs.device))

    def metrics(self) -> dict[str, Any]:
        from torchmetrics.classification import (
            MultilabelAveragePrecision,
            MultilabelExactMatch,
            MultilabelF1Score,
        )

        labels = len(self.classes) or 2
        return {
            "map": MultilabelAveragePrecision(labels, average="macro", validate_args=False),
            "f1": MultilabelF1Score(labels, threshold=self.threshold, average="macro", validate_args=False),
            "exact_match": MultilabelExactMatch(labels, threshold=self.threshold, validate_args=False),
        }

    def train_metrics(self) -> dict[str, Any]:
        from trainer.tasks.metrics import ExactMatch

        return {"exact_match": ExactMatch(self.threshold)}

    def update(self, metrics: Mapping[str, Any], outputs: Tensor, batch: Batch) -> None:
        # Probabilities, not logits: torchmetrics takes scores already in [0, 1] as probabilities.
        scores, targets = outputs.float().sigmoid(), (self.targets(batch) > 0.5).long()
        for metric in metrics.values():
            metric.update(scores, targets)

    def check_outputs(self, outputs: Tensor, batch: Batch) -> str | None:
        if outputs.ndim != 2 or outputs.shape[1] != len(self.classes):
            return f"task={self.name} needs [N, {len(self.classes)}] logits (one per label)"
        return None

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
