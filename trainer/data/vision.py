"""The torchvision datasets, downloaded with retries and verified, then held as uint8 tensors."""

import logging
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING

import torch

from trainer.core.errors import UserError
from trainer.core.registry import DATASETS
from trainer.core.retry import retry
from trainer.data.arrays import Count, DataBundle, ValSplit, bundle_from_arrays

if TYPE_CHECKING:
    from torchvision.datasets import VisionDataset

log = logging.getLogger(__name__)

# What a person who cannot download should place under dataset.root, per dataset.
EXPECTED_FILES = {
    "cifar10": "cifar-10-batches-py/ (from cifar-10-python.tar.gz)",
    "cifar100": "cifar-100-python/ (from cifar-100-python.tar.gz)",
    "mnist": "MNIST/raw/ (the four *-ubyte files)",
    "fashion_mnist": "FashionMNIST/raw/ (the four *-ubyte files)",
}


def without_checksums(cls: type) -> type:
    """The same dataset class, checking that CIFAR's files exist but not their MD5: for copies made
    by hand or by tests. torchvision skips the MD5 comparison when the expected value is None."""
    return type(
        cls.__name__,
        (cls,),
        {
            "train_list": [[name, None] for name, _ in cls.train_list],
            "test_list": [[name, None] for name, _ in cls.test_list],
            "meta": {**cls.meta, "md5": None},
        },
    )


def _open(name: str, cls: type, root: str, train: bool, download: bool) -> "VisionDataset":
    fetch = retry(attempts=3, base_delay=2.0, exceptions=(OSError,))(cls)  # URLError is an OSError
    try:
        return fetch(root, train=train, download=download)
    except OSError as e:
        raise UserError(
            f"dataset={name}: could not download to {Path(root).resolve()} after 3 tries ({e}); "
            f"check the network, or download it elsewhere and put {EXPECTED_FILES[name]} "
            f"under dataset.root"
        ) from None
    except RuntimeError as e:  # torchvision's "not found or corrupted"
        hint = (
            "check the network and run again (partial files are replaced), or put "
            if download
            else "set dataset.download=true, or put "
        )
        raise UserError(
            f"dataset={name}: no valid data under {Path(root).resolve()} ({e.args[0].rstrip('.')}); "
            f"{hint}{EXPECTED_FILES[name]} under dataset.root"
        ) from None


def _arrays(ds: "VisionDataset") -> tuple[torch.Tensor, torch.Tensor]:
    images = torch.as_tensor(ds.data)
    images = images.unsqueeze(1) if images.ndim == 3 else images.permute(0, 3, 1, 2)  # grey NHW / colour NHWC
    return images.contiguous(), torch.as_tensor(ds.targets, dtype=torch.long)


def _torchvision_dataset(
    name: str,
    cls: type,
    *,
    root: str,
    download: bool,
    val_split: ValSplit,
    augment: Sequence[dict],
    mean: Sequence[float],
    std: Sequence[float],
    image_size: int,
    verify_checksum: bool,
) -> DataBundle:
    if not verify_checksum and hasattr(cls, "train_list"):
        cls = without_checksums(cls)
    train, test = (_open(name, cls, root, split, download) for split in (True, False))
    return bundle_from_arrays(
        _arrays(train),
        _arrays(test),
        list(train.classes),
        val_split=val_split,
        augment=augment,
        mean=mean,
        std=std,
        image_size=image_size,
    )


def _register(name: str, class_name: str) -> None:
    def build(
        *,
        root: str,
        mean: Sequence[float],
        std: Sequence[float],
        image_size: Count,
        download: bool,
        val_split: ValSplit,
        augment: Sequence[dict],
        verify_checksum: bool,
    ) -> DataBundle:
        from torchvision import datasets  # here: registering must not cost torchvision's import

        return _torchvision_dataset(
            name,
            getattr(datasets, class_name),
            root=root,
            download=download,
            val_split=val_split,
            augment=augment,
            mean=mean,
            std=std,
            image_size=image_size,
            verify_checksum=verify_checksum,
        )

    build.__name__ = name
    DATASETS.register(name)(build)


for _name, _class in (
    ("cifar10", "CIFAR10"),
    ("cifar100", "CIFAR100"),
    ("mnist", "MNIST"),
    ("fashion_mnist", "FashionMNIST"),
):
    _register(_name, _class)
