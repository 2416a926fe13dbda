"""Small models for quick runs and smoke tests."""

from torch import nn

from trainer.core.errors import UserError
from trainer.core.registry import MODELS


def _conv_bn(cin: int, cout: int) -> list[nn.Module]:
    return [nn.Conv2d(cin, cout, 3, padding=1, bias=False), nn.BatchNorm2d(cout), nn.ReLU(inplace=True)]


@MODELS.register("cnn")
def cnn(*, num_classes: int, in_channels: int = 3, width: int, dropout: float) -> nn.Module:
    """Three conv-BN-ReLU stages with pooling: learns CIFAR-like data in seconds on a CPU."""
    return nn.Sequential(
        *_conv_bn(in_channels, width),
        nn.MaxPool2d(2),
        *_conv_bn(width, 2 * width),
        nn.MaxPool2d(2),
        *_conv_bn(2 * width, 4 * width),
        nn.AdaptiveAvgPool2d(1),
        nn.Flatten(),
        nn.Dropout(dropout),
        nn.Linear(4 * width, num_classes),
    )


@MODELS.register("mlp")
def mlp(
    *, num_classes: int, in_channels: int = 3, image_size: int = 32, hidden: tuple[int, ...]
) -> nn.Module:
    if not hidden or min(hidden) < 1:
        raise UserError(f"model.hidden: needs one or more positive layer widths, got {list(hidden)}")
    widths = [in_channels * image_size * image_size, *hidden]
    layers: list[nn.Module] = [nn.Flatten()]
    for cin, cout in zip(widths, widths[1:]):
        layers += [nn.Linear(cin, cout), nn.ReLU(inplace=True)]
    layers.append(nn.Linear(widths[-1], num_classes))
    return nn.Sequential(*layers)
