"""`numpy`: images and labels in .npy files, opened with mmap_mode='r'.

The images are never read whole: each sample is read from the file when it is used, through the
page cache, which DataLoader workers share with the main process instead of each holding a copy.

    root/train_images.npy  (N, H, W, C) uint8 (dataset.layout=NHWC), or (N, C, H, W) with layout=NCHW
    root/train_labels.npy  (N,) integers in [0, num_classes) (task=classification), (N, labels) of 0/1
                           (multi-hot, task=multilabel), or floats (N,) / (N, targets) (task=regression)
    root/test_images.npy, root/test_labels.npy, and optionally root/val_images.npy, root/val_labels.npy
"""

from collections.abc import Sequence
from pathlib import Path

import numpy as np
import torch

from trainer.core.errors import UserError
from trainer.core.registry import DATASETS
from trainer.data.arrays import DataBundle, ValSplit, bundle_from_arrays


def target_kind(labels: np.ndarray) -> str:
    """What the labels file holds: floats are regression targets, a 2-D integer array multi-hot labels."""
    if np.issubdtype(labels.dtype, np.floating):
        return "values"
    return "labels" if labels.ndim == 2 else "class"


def _open(root: Path, split: str, layout: str, num_classes: int) -> tuple[np.ndarray, torch.Tensor]:
    images_path, labels_path = root / f"{split}_images.npy", root / f"{split}_labels.npy"
    for path in (images_path, labels_path):
        if not path.is_file():
            raise UserError(
                f"dataset.root: {path} is missing; the numpy dataset needs {split}_images.npy and "
                f"{split}_labels.npy under {root}"
            )
    try:
        images = np.load(images_path, mmap_mode="r")
        raw = np.load(labels_path)  # small: read whole
        kind = target_kind(raw)
        labels = torch.from_numpy(raw.astype(np.int64 if kind == "class" else np.float32))
    except ValueError as e:
        raise UserError(f"dataset.root: cannot read {images_path} or {labels_path} as .npy ({e})") from None
    if images.dtype != np.uint8 or images.ndim != 4 or len(images) != len(labels):
        raise UserError(
            f"dataset.root: {images_path} must be uint8 (N, H, W, C) or (N, C, H, W) with one label "
            f"per image; it is {images.dtype} {images.shape} with {len(labels)} labels"
        )
    outputs = (
        1 if labels.ndim == 1 and kind == "values" else labels.shape[1] if labels.ndim == 2 else num_classes
    )
    if kind != "class" and outputs != num_classes:
        raise UserError(
            f"dataset.num_classes: {labels_path} holds {outputs} {kind} per sample, the config says "
            f"{num_classes}"
        )
    if kind == "class" and len(labels) and (labels.min() < 0 or labels.max() >= num_classes):
        raise UserError(
            f"dataset.num_classes: {labels_path} has labels from {labels.min()} to {labels.max()}, "
            f"outside [0, {num_classes})"
        )
    return (images.transpose(0, 3, 1, 2) if layout == "NHWC" else images), labels  # a view: nothing is read


@DATASETS.register("numpy")
def numpy_arrays(
    *,
    root: str,
    num_classes: int,
    image_size: int,
    in_channels: int,
    layout: str,
    val_split: ValSplit,
    augment: Sequence[dict],
    mean: Sequence[float],
    std: Sequence[float],
) -> DataBundle:
    if layout not in ("NHWC", "NCHW"):
        raise UserError(f"dataset.layout: must be NHWC or NCHW, got {layout!r}")
    folder = Path(root)
    splits = {
        split: _open(folder, split, layout, num_classes)
        for split in ("train", "val", "test")
        if split != "val" or (folder / "val_images.npy").is_file()
    }
    if splits["train"][0].shape[1] != in_channels:
        raise UserError(
            f"dataset.in_channels: {folder / 'train_images.npy'} has {splits['train'][0].shape[1]} "
            f"channels in layout {layout}, the config says {in_channels}"
        )
    return bundle_from_arrays(
        splits["train"],
        splits["test"],
        [str(i) for i in range(num_classes)],
        val=splits.get("val"),
        val_split=val_split,
        augment=augment,
        mean=mean,
        std=std,
        image_size=image_size,
        target=target_kind(np.load(folder / "train_labels.npy")),
    )
