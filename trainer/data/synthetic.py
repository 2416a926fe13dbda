"""Seeded, learnable images that need no download: each class is a smooth template plus noise."""
from collections.abc import Sequence

import torch
import torch.nn.functional as F

from trainer.registry import DATASETS
from trainer.data.arrays import DataBundle, bundle_from_arrays
from trainer.errors import UserError


def synthetic_images(n: int, num_classes: int, in_channels: int, image_size: int, noise: float,
                     seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    # Templates come from a fixed generator so the train and test splits share them; smooth templates
    # (upsampled 4x4) survive the crop and flip augmentation, like real objects do.
    templates = torch.rand(num_classes, in_channels, 4, 4, generator=torch.Generator().manual_seed(1234))
    templates = F.interpolate(templates, size=image_size, mode="bilinear", align_corners=False)
    labels = torch.randint(num_classes, (n,), generator=g)
    images = templates[labels] + noise * torch.randn(n, in_channels, image_size, image_size, generator=g)
    return (images.clamp(0, 1) * 255).round().to(torch.uint8), labels


@DATASETS.register("synthetic")
def synthetic(num_classes: int = 10, in_channels: int = 3, image_size: int = 32, train_size: int = 2048,
              test_size: int = 512, noise: float = 0.25, seed: int = 0, val_split: float = 0.1,
              augment: Sequence[dict] = (), mean: Sequence[float] = (0.5, 0.5, 0.5),
              std: Sequence[float] = (0.25, 0.25, 0.25)) -> DataBundle:
    for key, value in (("train_size", train_size), ("test_size", test_size), ("image_size", image_size),
                       ("in_channels", in_channels)):
        if value < 1:
            raise UserError(f"dataset.{key}: must be 1 or more, got {value}")
    if noise < 0:
        raise UserError(f"dataset.noise: must be 0 or more, got {noise}")
    train = synthetic_images(train_size, num_classes, in_channels, image_size, noise, seed)
    test = synthetic_images(test_size, num_classes, in_channels, image_size, noise, seed + 1)
    return bundle_from_arrays(train, test, [f"class_{i}" for i in range(num_classes)], val_split=val_split,
                              augment=augment, mean=mean, std=std, image_size=image_size)
