"""`task=segmentation`: a class per pixel. Per-pixel cross-entropy that skips `task.ignore_index`; mIoU
and pixel accuracy (torchmetrics, from a confusion matrix kept on the device; classes neither present
nor predicted count for nothing); flip TTA flips the prediction back. Predict writes mask PNGs
(`masks=<folder>`); serve answers per-class pixel counts as JSON, or the mask as a PNG (`?format=png`)."""

import io
from collections.abc import Mapping
from typing import Annotated, Any

import torch
import torch.nn.functional as F
from torch import Tensor

from trainer.core.errors import UserError
from trainer.core.fields import at_least
from trainer.core.registry import TASKS
from trainer.tasks.abilities import Answers, MaskAnswers, TestTimeAugmentation
from trainer.tasks.base import Batch, DataInfo, Task


@TASKS.register("segmentation")
class Segmentation(Task, Answers, MaskAnswers, TestTimeAugmentation):
    target, monitor = "mask", "miou"
    flip_back = True  # the outputs are masks: the mirror image's prediction is flipped back

    def __init__(self, *, ignore_index: Annotated[int, at_least(0)], tta: str) -> None:
        super().__init__()
        # a shifted mask would have to be shifted back, pixel for pixel: flips only
        self.tta = self.check_tta(tta, ("none", "flip"))
        self.ignore_index = ignore_index

    def bind(self, data: DataInfo) -> None:
        super().bind(data)
        classes = len(self.classes)
        for value, where in sorted(data.mask_values.items()):
            if value >= classes and value != self.ignore_index:
                raise UserError(
                    f"task=segmentation: the mask {where} holds the value {value}, but {data.name} has "
                    f"{classes} classes (0 to {classes - 1}) and task.ignore_index is "
                    f"{self.ignore_index}; fix the mask, raise dataset.num_classes, or set "
                    f"task.ignore_index={value}"
                )

    def loss(self, outputs: Tensor, batch: Batch) -> Tensor:
        return F.cross_entropy(outputs, self.targets(batch), ignore_index=self.ignore_index)

    def metrics(self) -> dict[str, Any]:
        from torchmetrics.classification import MulticlassAccuracy, MulticlassJaccardIndex

        classes = len(self.classes) or 2
        return {
            "miou": MulticlassJaccardIndex(classes, ignore_index=self.ignore_index, validate_args=False),
            "pixel_acc": MulticlassAccuracy(
                classes, average="micro", ignore_index=self.ignore_index, validate_args=False
            ),
        }

    def train_metrics(self) -> dict[str, Any]:
        from trainer.tasks.metrics import Accuracy

        return {"pixel_acc": Accuracy(self.ignore_index)}

    def check_outputs(self, outputs: Tensor, batch: Batch) -> str | None:
        masks = self.targets(batch)
        wanted = [len(masks), len(self.classes), *masks.shape[-2:]]
        if list(outputs.shape) != wanted:
            return (
                f"task={self.name} needs [N, {len(self.classes)}, {masks.shape[-2]}, {masks.shape[-1]}] "
                f"logits (a score per class and pixel), e.g. from model=unet or model=tvseg"
            )
        return None

    def answer(self, outputs: Tensor, options: Mapping[str, Any]) -> list[dict[str, Any]]:
        classes = outputs.float().argmax(1)
        answers = []
        for mask in classes:
            counts = torch.bincount(mask.flatten(), minlength=len(self.classes)).tolist()
            answers.append(
                {"pixels": {name: n for name, n in zip(self.classes, counts) if n}, "size": list(mask.shape)}
            )
        return answers

    def png(self, outputs: Tensor) -> list[bytes]:
        """Each input's mask of class indices as a greyscale PNG (the format the masks were read in)."""
        from PIL import Image

        encoded = []
        for mask in outputs.float().argmax(1).to(torch.uint8).cpu().numpy():
            buffer = io.BytesIO()
            Image.fromarray(mask, mode="L").save(buffer, format="PNG")
            encoded.append(buffer.getvalue())
        return encoded
