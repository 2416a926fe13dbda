"""`imagefolder`: a person's own images, root/train/<class>/*, root/val/<class>/*, root/test/<class>/*.

Images are decoded once (JPEG, PNG, WebP, GIF; trainer/images.py, which fails safely on damaged
files and refuses images over dataset.max_image_pixels), resized on the shorter side and
centre-cropped to dataset.image_size, and held as one uint8 tensor, so the per-step cost is the
augmentation alone. That suits folders that fit in memory at the training size (10^5 images at
32x32 are 300 MB); bigger collections want the streaming dataset.
"""

import logging
from collections.abc import Callable, Sequence
from pathlib import Path

import torch
from tqdm import tqdm

from trainer.core.errors import UserError
from trainer.core.images import SUFFIXES, ImageError, decode_image
from trainer.core.registry import DATASETS
from trainer.data.arrays import Channels, Count, DataBundle, OnError, ValSplit, bundle_from_arrays

log = logging.getLogger("trainer")


def class_names(root: str | Path) -> list[str]:
    """The class folders under root/train, sorted: their order is the label order."""
    train = Path(root) / "train"
    if not train.is_dir():
        raise UserError(
            f"dataset.root: {Path(root).resolve()} has no train/ folder; imagefolder expects "
            f"root/train/<class>/<image> (and optionally val/ and test/ alike)"
        )
    names = sorted(p.name for p in train.iterdir() if p.is_dir())
    if len(names) < 2:
        raise UserError(f"dataset.root: {train} needs two or more class folders, found {len(names)}")
    return names


def _load_split(
    folder: Path, classes: list[str], size: int, channels: int, on_error: str, max_pixels: int
) -> tuple[torch.Tensor, torch.Tensor]:
    """Every image of one split; unreadable ones are skipped with a warning and a count, or an error."""
    unknown = sorted(p.name for p in folder.iterdir() if p.is_dir() and p.name not in classes)
    if unknown:
        raise UserError(f"dataset.root: {folder} has class folders that train/ lacks: {', '.join(unknown)}")
    files = [
        (path, label)
        for label, name in enumerate(classes)
        if (folder / name).is_dir()
        for path in sorted((folder / name).iterdir())
        if path.suffix.lower() in SUFFIXES
    ]
    if not files:
        raise UserError(f"dataset.root: no .jpg, .png, .webp or .gif images under {folder}/<class>/")
    images, kept = decode_files(
        [path for path, _ in files], size, channels, on_error, max_pixels, folder.name
    )
    return images, torch.tensor([files[i][1] for i in kept])


def decode_files(
    paths: list[Path], size: int, channels: int, on_error: str, max_pixels: int, split: str
) -> tuple[torch.Tensor, list[int]]:
    """The images at `paths` as one uint8 tensor, and the positions of those that were read."""
    return decode_all(
        [(str(path), path.read_bytes) for path in paths], size, channels, on_error, max_pixels, split
    )


def decode_all(
    sources: Sequence[tuple[str, Callable[[], bytes]]],
    size: int,
    channels: int,
    on_error: str,
    max_pixels: int,
    split: str,
    key: str = "dataset.root",
) -> tuple[torch.Tensor, list[int]]:
    """Each (name, read) source's image, as one uint8 tensor, and the positions of those that were read;
    an unreadable one is skipped with a warning and a count (on_error=skip), or is an error."""
    images, kept, bad = [], [], []
    for i, (name, read) in enumerate(
        tqdm(sources, desc=f"decoding {split}/", unit="img", leave=False, disable=None)
    ):
        try:
            images.append(decode_image(read(), size, channels, max_pixels, "dataset.max_image_pixels"))
            kept.append(i)
        except (ImageError, OSError, ValueError) as e:
            if on_error == "error":
                raise UserError(
                    f"dataset.on_error=error: cannot decode {name} ({e}); fix or remove it, or set "
                    f"dataset.on_error=skip"
                ) from None
            bad.append(name)
    if bad:
        log.warning("skipped %d unreadable image(s) in %s, e.g. %s", len(bad), split, bad[0])
    if not images:
        raise UserError(
            f"{key}: none of the {len(sources)} images of {split} could be read, e.g. {sources[0][0]}"
        )
    return torch.stack(images), kept


@DATASETS.register("imagefolder")
def imagefolder(
    *,
    root: str,
    image_size: Count,
    in_channels: Channels,
    val_split: ValSplit,
    augment: Sequence[dict],
    mean: Sequence[float],
    std: Sequence[float],
    on_error: OnError,
    max_image_pixels: Count,
) -> DataBundle:
    """The classes are the folders under root/train, sorted."""
    classes = class_names(root)
    splits = {
        name: _load_split(Path(root) / name, classes, image_size, in_channels, on_error, max_image_pixels)
        for name in ("train", "val", "test")
        if (Path(root) / name).is_dir()
    }
    if "val" not in splits and val_split == 0:
        raise UserError(
            f"dataset.val_split: {root} has no val/ folder; hold out part of train, e.g. "
            f"dataset.val_split=0.1"
        )
    if "val" in splits and val_split > 0:
        raise UserError(f"dataset.val_split: {root} has a val/ folder already; set dataset.val_split=0")
    return bundle_from_arrays(
        splits["train"],
        splits.get("test", splits.get("val")),
        classes,
        val=splits.get("val"),
        val_split=val_split,
        augment=augment,
        mean=mean,
        std=std,
        image_size=image_size,
    )
