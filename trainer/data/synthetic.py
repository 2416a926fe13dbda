"""Seeded, learnable images that need no download: each class is a smooth template plus noise."""

from collections.abc import Sequence

import torch
import torch.nn.functional as F

from trainer.core.errors import UserError
from trainer.core.registry import DATASETS
from trainer.data.arrays import DataBundle, ValSplit, bundle_from_arrays


def synthetic_images(
    n: int, num_classes: int, in_channels: int, image_size: int, noise: float, seed: int
) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    # Templates come from a fixed generator so the train and test splits share them; smooth templates
    # (upsampled 4x4) survive the crop and flip augmentation, like real objects do.
    templates = torch.rand(num_classes, in_channels, 4, 4, generator=torch.Generator().manual_seed(1234))
    templates = F.interpolate(templates, size=image_size, mode="bilinear", align_corners=False)
    labels = torch.randint(num_classes, (n,), generator=g)
    images = templates[labels] + noise * torch.randn(n, in_channels, image_size, image_size, generator=g)
    return (images.clamp(0, 1) * 255).round().to(torch.uint8), labels


def _check_sizes(**sizes: int) -> None:
    for key, value in sizes.items():
        if value < 1:
            raise UserError(f"dataset.{key}: must be 1 or more, got {value}")


@DATASETS.register("synthetic")
def synthetic(
    *,
    num_classes: int,
    in_channels: int,
    image_size: int,
    train_size: int,
    test_size: int,
    noise: float,
    seed: int,
    val_split: ValSplit,
    augment: Sequence[dict],
    mean: Sequence[float],
    std: Sequence[float],
) -> DataBundle:
    _check_sizes(train_size=train_size, test_size=test_size, image_size=image_size, in_channels=in_channels)
    if noise < 0:
        raise UserError(f"dataset.noise: must be 0 or more, got {noise}")
    train = synthetic_images(train_size, num_classes, in_channels, image_size, noise, seed)
    test = synthetic_images(test_size, num_classes, in_channels, image_size, noise, seed + 1)
    return bundle_from_arrays(
        train,
        test,
        [f"class_{i}" for i in range(num_classes)],
        val_split=val_split,
        augment=augment,
        mean=mean,
        std=std,
        image_size=image_size,
    )


def synthetic_labelled(
    n: int, num_classes: int, in_channels: int, image_size: int, noise: float, seed: int
) -> tuple[torch.Tensor, torch.Tensor]:
    """Images holding any subset of `num_classes` patterns (each present with probability 0.35): a
    pattern is a coloured square at its own place, so labels are independent of each other."""
    g = torch.Generator().manual_seed(seed)
    colours = (
        torch.rand(num_classes, in_channels, 1, 1, generator=torch.Generator().manual_seed(4321)) * 0.6 + 0.4
    )
    side = max(image_size // 4, 2)
    places = torch.randint(
        image_size - side + 1, (num_classes, 2), generator=torch.Generator().manual_seed(4322)
    )
    labels = (torch.rand(n, num_classes, generator=g) < 0.35).float()
    images = 0.2 + noise * torch.randn(n, in_channels, image_size, image_size, generator=g)
    for k, (row, col) in enumerate(places.tolist()):
        present = labels[:, k].view(-1, 1, 1, 1)
        images[:, :, row : row + side, col : col + side] += present * colours[k]
    return (images.clamp(0, 1) * 255).round().to(torch.uint8), labels


@DATASETS.register("synthetic_multilabel")
def synthetic_multilabel(
    *,
    num_classes: int,
    in_channels: int,
    image_size: int,
    train_size: int,
    test_size: int,
    noise: float,
    seed: int,
    val_split: ValSplit,
    augment: Sequence[dict],
    mean: Sequence[float],
    std: Sequence[float],
) -> DataBundle:
    _check_sizes(
        train_size=train_size,
        test_size=test_size,
        image_size=image_size,
        in_channels=in_channels,
        num_classes=num_classes,
    )
    train = synthetic_labelled(train_size, num_classes, in_channels, image_size, noise, seed)
    test = synthetic_labelled(test_size, num_classes, in_channels, image_size, noise, seed + 1)
    return bundle_from_arrays(
        train,
        test,
        [f"label_{i}" for i in range(num_classes)],
        val_split=val_split,
        augment=augment,
        mean=mean,
        std=std,
        image_size=image_size,
        target="labels",
    )


def synthetic_measured(
    n: int, in_channels: int, image_size: int, noise: float, seed: int
) -> tuple[torch.Tensor, torch.Tensor]:
    """Images of one bright disc on a dark background; the targets are the disc's brightness and its
    horizontal position (0 left, 1 right)."""
    g = torch.Generator().manual_seed(seed)
    brightness, x, y = (
        torch.rand(n, generator=g) * 0.7 + 0.3,
        torch.rand(n, generator=g),
        torch.rand(n, generator=g),
    )
    grid = torch.linspace(0, 1, image_size)
    radius = 0.18
    inside = (
        (grid.view(1, 1, -1) - x.view(-1, 1, 1)) ** 2 + (grid.view(1, -1, 1) - y.view(-1, 1, 1)) ** 2
    ) < radius**2
    images = 0.1 + (inside.float() * brightness.view(-1, 1, 1)).unsqueeze(1).expand(n, in_channels, -1, -1)
    images = images + noise * torch.randn(n, in_channels, image_size, image_size, generator=g)
    return (images.clamp(0, 1) * 255).round().to(torch.uint8), torch.stack([brightness, x], dim=1)


@DATASETS.register("synthetic_regression")
def synthetic_regression(
    *,
    num_classes: int,
    in_channels: int,
    image_size: int,
    train_size: int,
    test_size: int,
    noise: float,
    seed: int,
    val_split: ValSplit,
    augment: Sequence[dict],
    mean: Sequence[float],
    std: Sequence[float],
) -> DataBundle:
    _check_sizes(train_size=train_size, test_size=test_size, image_size=image_size, in_channels=in_channels)
    if num_classes != 2:
        raise UserError(
            f"dataset.num_classes: synthetic_regression has 2 targets (brightness, x), got {num_classes}"
        )
    train = synthetic_measured(train_size, in_channels, image_size, noise, seed)
    test = synthetic_measured(test_size, in_channels, image_size, noise, seed + 1)
    return bundle_from_arrays(
        train,
        test,
        ["brightness", "x"],
        val_split=val_split,
        augment=augment,
        mean=mean,
        std=std,
        image_size=image_size,
        target="values",
    )
