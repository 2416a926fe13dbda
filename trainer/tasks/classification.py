"""`task=classification` (the default): one class per sample, cross-entropy, accuracy (and top-5 with
more than five classes); label smoothing, MixUp/CutMix and flip TTA are its options."""

from collections.abc import Mapping
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor

from trainer.core.errors import UserError
from trainer.core.registry import TASKS
from trainer.tasks.base import Batch, DataInfo, Task, option


@TASKS.register("classification")
class Classification(Task):
    name, target, monitor = "classification", "class", "acc"
    metrics = {"loss": "min", "acc": "max", "top5": "max"}
    train_metrics = {"acc": "max"}
    train_sums_size = 1  # correct predictions

    def __init__(
        self,
        label_smoothing: float = 0.0,
        mixup_alpha: float = 0.0,
        cutmix_alpha: float = 0.0,
        tta: str = "none",
    ) -> None:
        super().__init__(tta)
        for key, value, ok in (
            ("label_smoothing", label_smoothing, 0 <= label_smoothing < 1),
            ("mixup_alpha", mixup_alpha, mixup_alpha >= 0),
            ("cutmix_alpha", cutmix_alpha, cutmix_alpha >= 0),
        ):
            if not ok:
                raise UserError(
                    f"task.{key}: must be {'in [0, 1)' if key == 'label_smoothing' else '0 (off) or positive'}"
                    f", got {value}"
                )
        self.label_smoothing, self.mixup_alpha, self.cutmix_alpha = label_smoothing, mixup_alpha, cutmix_alpha
        self.batch_mix = None

    def bind(self, data: DataInfo) -> None:
        super().bind(data)
        if len(self.classes) < 2:
            raise UserError(
                f"dataset.num_classes: classification needs 2 or more classes, {data.name} has "
                f"{len(self.classes)}"
            )
        self.batch_mix = self._build_mix(len(self.classes))

    def _build_mix(self, num_classes: int) -> Any:
        """MixUp and/or CutMix from transforms.v2, on whole batches on the device; None when off. They draw
        from the global generator, whose state checkpoints restore, so resumes stay exact."""
        if self.mixup_alpha == 0 and self.cutmix_alpha == 0:
            return None
        from torchvision.transforms import v2

        mixes = (
            [v2.MixUp(alpha=self.mixup_alpha, num_classes=num_classes)] if self.mixup_alpha > 0 else []
        ) + ([v2.CutMix(alpha=self.cutmix_alpha, num_classes=num_classes)] if self.cutmix_alpha > 0 else [])
        return mixes[0] if len(mixes) == 1 else v2.RandomChoice(mixes)

    def has_top5(self) -> bool:
        return len(self.classes) > 5

    def monitors(self) -> dict[str, str]:
        found = super().monitors()
        if self.classes and not self.has_top5():
            found.pop("val/top5")
        return found

    def check_outputs(self, outputs: Tensor, batch: Batch) -> str | None:
        if outputs.ndim != 2 or outputs.shape[1] != len(self.classes):
            return f"task={self.name} needs [N, {len(self.classes)}] logits (one per class)"
        return None

    def mix(self, batch: Batch) -> Batch:
        if self.batch_mix is None:
            return batch
        return self.with_inputs(batch, *self.batch_mix(self.inputs(batch), self.targets(batch)))

    def loss(self, outputs: Tensor, batch: Batch) -> Tensor:
        return F.cross_entropy(outputs, self.targets(batch), label_smoothing=self.label_smoothing)

    def train_sums(self, outputs: Tensor, batch: Batch) -> Tensor:
        return (outputs.detach().argmax(1) == self.targets(batch)).sum()  # 0-d: added into the running sums

    def from_train_sums(self, sums: list[float], count: int) -> dict[str, float]:
        return {"acc": sums[0] / max(count, 1)}

    def eval_sums_size(self) -> int:
        return 4

    def eval_sums(self, outputs: Tensor, batch: Batch) -> Tensor:
        labels, outputs = self.targets(batch), outputs.float()
        loss = F.cross_entropy(outputs, labels) * len(labels)
        correct = (outputs.argmax(1) == labels).sum()
        top5 = (
            (outputs.topk(5, dim=1).indices == labels[:, None]).any(1).sum() if self.has_top5() else correct
        )
        return torch.stack(
            [loss, correct.float(), top5.float(), torch.tensor(float(len(labels)), device=loss.device)]
        )

    def from_eval_sums(self, sums: list[float]) -> dict[str, float]:
        loss, correct, top5, count = sums
        count = max(count, 1)
        return {
            "loss": loss / count,
            "acc": correct / count,
            **({"top5": top5 / count} if self.has_top5() else {}),
        }

    def answer(self, outputs: Tensor, options: Mapping[str, Any]) -> list[dict[str, Any]]:
        k = option(options, "topk", 5, int, low=1)
        probabilities = torch.softmax(outputs.float(), dim=1)
        values, indices = probabilities.topk(min(k, probabilities.shape[1]), dim=1)
        return [
            {"top_k": [{"class": self.classes[i], "index": i, "probability": p} for p, i in zip(ps, ids)]}
            for ps, ids in zip(values.tolist(), indices.tolist())
        ]
