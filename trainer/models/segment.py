"""Segmentation models: each maps (N, C, H, W) images to (N, num_classes, H, W) logits."""

import torch
from torch import Tensor, nn

from trainer.core.errors import UserError
from trainer.core.registry import MODELS


def _block(cin: int, cout: int) -> nn.Sequential:
    return nn.Sequential(
        nn.Conv2d(cin, cout, 3, padding=1, bias=False),
        nn.BatchNorm2d(cout),
        nn.ReLU(inplace=True),
        nn.Conv2d(cout, cout, 3, padding=1, bias=False),
        nn.BatchNorm2d(cout),
        nn.ReLU(inplace=True),
    )


class UNet(nn.Module):
    """A small U-Net (Ronneberger et al., 2015): an encoder that halves the resolution at each width, a
    decoder that doubles it back and joins the encoder's features of the same size. Inputs whose sides
    are multiples of 2^(len(widths) - 1)."""

    def __init__(self, num_classes: int, in_channels: int, widths: list[int]) -> None:
        super().__init__()
        self.down = nn.ModuleList(_block(cin, cout) for cin, cout in zip([in_channels, *widths], widths))
        self.up = nn.ModuleList(
            nn.ConvTranspose2d(cin, cout, 2, stride=2) for cin, cout in zip(widths[:0:-1], widths[-2::-1])
        )
        self.merge = nn.ModuleList(_block(2 * cout, cout) for cout in widths[-2::-1])
        self.head = nn.Conv2d(widths[0], num_classes, 1)
        self.pool = nn.MaxPool2d(2)

    def forward(self, x: Tensor) -> Tensor:
        skips = []
        for i, block in enumerate(self.down):
            x = block(x if i == 0 else self.pool(x))
            skips.append(x)
        for up, merge, skip in zip(self.up, self.merge, reversed(skips[:-1])):
            x = merge(torch.cat([up(x), skip], dim=1))
        return self.head(x)


@MODELS.register("unet")
def unet(*, num_classes: int, in_channels: int = 3, widths: list[int]) -> nn.Module:  # type: ignore[assignment]
    if len(widths) < 2 or min(widths) < 1:
        raise UserError(f"model.widths: needs two or more positive widths, got {list(widths)}")
    return UNet(num_classes, in_channels, list(widths))


class OutputOnly(nn.Module):
    """torchvision's segmentation models answer a dict ({"out": logits, "aux": ...}): the logits alone,
    so the loop, the tasks and the exports see one tensor."""

    def __init__(self, model: nn.Module) -> None:
        super().__init__()
        self.model = model

    def forward(self, x: Tensor) -> Tensor:
        return self.model(x)["out"]


SEGMENTATION_ARCHS = (
    "fcn_resnet50",
    "fcn_resnet101",
    "deeplabv3_resnet50",
    "deeplabv3_resnet101",
    "deeplabv3_mobilenet_v3_large",
    "lraspp_mobilenet_v3_large",
)


@MODELS.register("tvseg")
def torchvision_segmentation(*, num_classes: int, arch: str, in_channels: int = 3) -> nn.Module:
    """torchvision's segmentation architectures (FCN, DeepLabV3, LR-ASPP), untrained."""
    if arch not in SEGMENTATION_ARCHS:
        raise UserError(
            f"model.arch: '{arch}' is not a torchvision segmentation model; choose one of "
            f"{', '.join(SEGMENTATION_ARCHS)}"
        )
    if in_channels != 3:
        raise UserError(
            f"model.in_channels: torchvision's segmentation models take 3 channels, got {in_channels}"
        )
    import torchvision

    return OutputOnly(
        torchvision.models.get_model(arch, weights=None, weights_backbone=None, num_classes=num_classes)
    )
