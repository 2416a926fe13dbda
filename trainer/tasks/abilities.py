"""The optional abilities of a task, declared by inheriting from these classes (the framework checks
`isinstance`, never an attribute's presence):

    class Ordinal(Task, Answers): ...

- `Answers`: predict and serve answer each input as the task says (else they answer its raw outputs).
- `MaskAnswers`: the answers include a mask image (segmentation: predict's masks=, serve's ?format=png).
- `TestTimeAugmentation`: the test, the export (and validation, unless trainer.val_tta=false) run the
  model under an augmentation, `task.tta`.
- `ExportWrapper`: the export holds the model wrapped (a regression's standardisation undone).
- `SequenceInputs`: inputs whose length varies (tokens): the export takes any length up to a maximum.
- `NamesTokens`: answers that name tokens get the run's tokenizer.
"""

from collections.abc import Mapping
from typing import Any

import torch
from torch import Tensor, nn

from trainer.core.errors import UserError


class Answers:
    def answer(self, outputs: Tensor, options: Mapping[str, Any]) -> list[dict[str, Any]]:
        """The exported model's outputs for a batch as one JSON-able answer per input. `options` are the
        request's (predict's keys, serve's query): each task reads the ones it knows; ValueError for one
        it cannot take."""
        raise NotImplementedError


class MaskAnswers:
    def png(self, outputs: Tensor) -> list[bytes]:
        """Each input's mask, as a PNG."""
        raise NotImplementedError


TTA_MODES = ("none", "flip", "flip_translate")


class TestTimeAugmentation:
    """`tta`: none; flip, the mean of the outputs for an input and its mirror image; flip_translate, also
    of two copies shifted by one pixel (the CIFAR-10 speed records')."""

    tta: str = "none"
    flip_back = False  # the outputs are images too (segmentation): the mirror's are flipped back

    def check_tta(self, tta: str, allowed: tuple[str, ...] = TTA_MODES) -> str:
        if tta not in allowed:
            raise UserError(f"task.tta: must be one of {', '.join(allowed)}, got {tta!r}")
        return tta

    def evaluated(self, model: nn.Module) -> nn.Module:
        """The model as tested and exported: under this task's test-time augmentation."""
        if self.tta == "flip":
            return FlipAverage(model, self.flip_back)
        if self.tta == "flip_translate":
            return FlipTranslateAverage(model)
        return model


class ExportWrapper:
    def exported(self, model: nn.Module) -> nn.Module:
        """What the export holds (e.g. the model with the targets' standardisation undone)."""
        raise NotImplementedError


class SequenceInputs:
    def dynamic_dims(self) -> dict[int, tuple[str, int]]:
        """Input dimensions besides the batch that the export must take at any size: {dim: (name, max)}."""
        raise NotImplementedError


class NamesTokens:
    def use_tokenizer(self, tokenizer: Any) -> None:
        """Predict and serve hand over the run's tokenizer, so that answers can name tokens."""
        raise NotImplementedError


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
