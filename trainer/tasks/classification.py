"""`task=classification` (the default): one class per sample, cross-entropy; accuracy, and top-5 accuracy
with more than five classes (torchmetrics). Label smoothing, MixUp/CutMix and flip TTA are its options."""

from collections.abc import Mapping
from typing import Annotated, Any

import torch
import torch.nn.functional as F
from torch import Tensor

from trainer.core.fields import Check, at_least
from trainer.core.registry import TASKS
from trainer.tasks.abilities import Answers, TestTimeAugmentation
from trainer.tasks.base import Batch, DataInfo, Task, option

MixAlpha = Annotated[float, at_least(0, "off")]


@TASKS.register("classification")
class Classification(Task, Answers, TestTimeAugmentation):
    target, monitor = "class", "acc"

    def __init__(
        self,
        *,
        label_smoothing: Annotated[float, Check(lambda v: 0 <= v < 1, "in [0, 1)")],
        mixup_alpha: MixAlpha,
        cutmix_alpha: MixAlpha,
        tta: str,
    ) -> None:
        super().__init__()
        self.tta = self.check_tta(tta)
        self.label_smoothing, self.mixup_alpha, self.cutmix_alpha = label_smoothing, mixup_alpha, cutmix_alpha
        self.batch_mix: Any = None

    def bind(self, data: DataInfo) -> None:
        super().bind(data)
        if len(self.classes) < 2:
            from trainer.core.errors import UserError

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

    def loss(self, outputs: Tensor, batch: Batch) -> Tensor:
        return F.cross_entropy(outputs, self.targets(batch), label_smoothing=self.label_smoothing)

    def metrics(self) -> dict[str, Any]:
        from torchmetrics.classification import MulticlassAccuracy

        # Before the data is seen (no classes yet) the names are what counts: top-5 may be reported.
        classes = len(self.classes) or 6
        found = {"acc": MulticlassAccuracy(classes, average="micro", validate_args=False)}
        if classes > 5:
            found["top5"] = MulticlassAccuracy(classes, top_k=5, average="micro", validate_args=False)
        return found

    def train_metrics(self) -> dict[str, Any]:
        from trainer.tasks.metrics import Accuracy

        return {"acc": Accuracy()}

    def check_outputs(self, outputs: Tensor, batch: Batch) -> str | None:
        if outputs.ndim != 2 or outputs.shape[1] != len(self.classes):
            return f"task={self.name} needs [N, {len(self.classes)}] logits (one per class)"
        return None

    def mix(self, batch: Batch) -> Batch:
        if self.batch_mix is None:
            return batch
        inputs, targets = self.batch_mix(self.inputs(batch), self.targets(batch))
        if isinstance(batch, dict):
            return {**batch, "inputs": inputs, "targets": targets}
        return type(batch)((inputs, targets, *batch[2:]))

    def answer(self, outputs: Tensor, options: Mapping[str, Any]) -> list[dict[str, Any]]:
        k = option(options, "topk", 5, int, low=1)
        probabilities = torch.softmax(outputs.float(), dim=1)
        values, indices = probabilities.topk(min(k, probabilities.shape[1]), dim=1)
        return [
            {"top_k": [{"class": self.classes[i], "index": i, "probability": p} for p, i in zip(ps, ids)]}
            for ps, ids in zip(values.tolist(), indices.tolist())
        ]
