"""`task=segmentation`: a class per pixel. Per-pixel cross-entropy that skips `task.ignore_index`; mIoU
and pixel accuracy from a confusion matrix kept on the device (exact over the split and every process);
flip TTA flips the prediction back. Predict writes mask PNGs (`masks=<folder>`); serve answers per-class
pixel counts as JSON, or the mask as a PNG (`?format=png`)."""

import io
from collections.abc import Mapping
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from trainer.core.errors import UserError
from trainer.core.registry import TASKS
from trainer.tasks.base import Batch, DataInfo, FlipAverage, Task


@TASKS.register("segmentation")
class Segmentation(Task):
    name, target, monitor = "segmentation", "mask", "miou"
    metrics = {"loss": "min", "miou": "max", "pixel_acc": "max"}
    train_metrics = {"pixel_acc": "max"}
    train_sums_size = 2  # right pixels, counted pixels

    def __init__(self, ignore_index: int = 255, tta: str = "none") -> None:
        super().__init__(tta)
        if tta == "flip_translate":  # a shifted mask would have to be shifted back, pixel for pixel
            raise UserError("task.tta: segmentation averages flips only; set task.tta=flip or none")
        if ignore_index < 0:
            raise UserError(f"task.ignore_index: must be 0 or more, got {ignore_index}")
        self.ignore_index = ignore_index

    def bind(self, data: DataInfo) -> None:
        super().bind(data)
        classes = len(self.classes)
        for value, where in sorted(data.extra.get("mask_values", {}).items()):
            if value >= classes and value != self.ignore_index:
                raise UserError(
                    f"task=segmentation: the mask {where} holds the value {value}, but {data.name} has "
                    f"{classes} classes (0 to {classes - 1}) and task.ignore_index is "
                    f"{self.ignore_index}; fix the mask, raise dataset.num_classes, or set "
                    f"task.ignore_index={value}"
                )

    def check_outputs(self, outputs: Tensor, batch: Batch) -> str | None:
        masks = self.targets(batch)
        wanted = [len(masks), len(self.classes), *masks.shape[-2:]]
        if list(outputs.shape) != wanted:
            return (
                f"task={self.name} needs [N, {len(self.classes)}, {masks.shape[-2]}, {masks.shape[-1]}] logits "
                f"(a score per class and pixel), e.g. from model=unet or model=tvseg"
            )
        return None

    def evaluated(self, model: nn.Module) -> nn.Module:
        return FlipAverage(model, flip_back=True) if self.tta == "flip" else model

    def loss(self, outputs: Tensor, batch: Batch) -> Tensor:
        return F.cross_entropy(outputs, self.targets(batch), ignore_index=self.ignore_index)

    def _counted(self, outputs: Tensor, batch: Batch) -> tuple[Tensor, Tensor]:
        """(predicted, actual) classes of the pixels that count (not ignore_index), flattened."""
        masks = self.targets(batch)
        predicted = outputs.detach().argmax(1)
        keep = masks != self.ignore_index
        return predicted[keep], masks[keep]

    def train_sums(self, outputs: Tensor, batch: Batch) -> Tensor:
        predicted, actual = self._counted(outputs, batch)
        return torch.stack(
            [(predicted == actual).sum().float(), torch.tensor(float(actual.numel()), device=outputs.device)]
        )

    def from_train_sums(self, sums: list[float], count: int) -> dict[str, float]:
        return {"pixel_acc": sums[0] / max(sums[1], 1)}

    def eval_sums_size(self) -> int:
        return 1 + len(self.classes) ** 2  # the loss summed over counted pixels; the confusion matrix

    def eval_sums(self, outputs: Tensor, batch: Batch) -> Tensor:
        classes, outputs = len(self.classes), outputs.float()
        loss = F.cross_entropy(outputs, self.targets(batch), ignore_index=self.ignore_index, reduction="sum")
        predicted, actual = self._counted(outputs, batch)
        confusion = torch.bincount(actual * classes + predicted, minlength=classes * classes).float()
        return torch.cat([loss.view(1), confusion])  # the counted pixels are the confusion matrix's sum

    def from_eval_sums(self, sums: list[float]) -> dict[str, float]:
        classes = len(self.classes)
        confusion = torch.tensor(sums[1:], dtype=torch.float64).view(classes, classes)
        loss = sums[0] / max(float(confusion.sum()), 1)  # per counted pixel, over the whole split
        right = confusion.diagonal()
        union = confusion.sum(0) + confusion.sum(1) - right
        iou = (right / union.clamp(min=1))[union > 0]  # a class neither present nor predicted: no IoU
        return {
            "loss": loss,
            "miou": float(iou.mean()) if len(iou) else 0.0,
            "pixel_acc": float(right.sum() / confusion.sum().clamp(min=1)),
        }

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
