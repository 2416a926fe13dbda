"""Segmentation data: an image and a mask of class indices per sample, augmented together.

`segfolder`: root/train/images/<name>.jpg|png|webp and root/train/masks/<name>.png (a greyscale or
palette PNG of class indices, as VOC's SegmentationClass), likewise val/ and test/. `synthetic_shapes`:
seeded squares and discs on a noisy background, no download. Both are held in memory as uint8 tensors,
decoded once at dataset.image_size (the mask nearest-neighbour, with the image's geometry).

Augmentation is transforms.v2 on the image and a `tv_tensors.Mask` together, so a crop or a flip moves
both; padding fills the mask with dataset.pad_value (keep it equal to task.ignore_index, 255 by default,
so padded pixels count for nothing). Each dataset reports every mask value it holds and the first file
that holds it, so the task can name the first bad file.
"""

from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch
from torch import Tensor
from torch.utils.data import Dataset

from trainer.core.errors import UserError
from trainer.core.images import SUFFIXES, ImageError, decode_mask
from trainer.core.registry import DATASETS
from trainer.data.arrays import DataBundle, sized
from trainer.data.folder import decode_files


def build_joint_transform(
    augment: Sequence[dict[str, Any]], mean: Sequence[float], std: Sequence[float], pad_value: int, size: int
) -> Any:
    """transforms.v2 steps by name, applied to (image, Mask) together, then scaling and Normalize (which
    touch the image only); steps that pad fill the mask with `pad_value`."""
    from torchvision import tv_tensors
    from torchvision.transforms import v2

    steps: list[Any] = []
    for spec in augment:
        spec = sized(spec, size)
        name = str(spec.pop("name", None))
        step = getattr(v2, name, None)
        if not (isinstance(step, type) and issubclass(step, v2.Transform)):
            raise UserError(
                f"dataset.augment: '{name}' is not a torchvision.transforms.v2 transform (segmentation "
                f"augments image and mask together, e.g. RandomCrop, RandomHorizontalFlip)"
            )
        if "fill" in step.__init__.__code__.co_varnames and "fill" not in spec:
            spec["fill"] = {tv_tensors.Mask: pad_value, "others": 0}
        try:
            steps.append(step(**spec))
        except (TypeError, ValueError) as e:
            raise UserError(f"dataset.augment: {name}({spec}) is invalid: {e}") from None
    steps += [v2.ToDtype(torch.float32, scale=True), v2.Normalize(list(mean), list(std))]
    return v2.Compose(steps)


class SegmentationDataset(Dataset):
    """(normalised image (C, H, W) float, mask (H, W) int64) samples from uint8 tensors."""

    def __init__(self, images: Tensor, masks: Tensor, transform: Any) -> None:
        self.images, self.masks, self.transform = images, masks, transform

    def __len__(self) -> int:
        return len(self.images)

    def __getitem__(self, i: int) -> tuple[Tensor, Tensor]:
        from torchvision import tv_tensors

        image, mask = self.transform(tv_tensors.Image(self.images[i]), tv_tensors.Mask(self.masks[i]))
        return image.as_subclass(Tensor), mask.as_subclass(Tensor).long()

    def preview(self, n: int) -> Tensor:
        return torch.stack([self[i][0] for i in range(min(n, len(self)))])


def mask_values(masks: Tensor, names: Sequence[str]) -> dict[int, str]:
    """Every value the masks hold -> the first sample (file) holding it."""
    present = torch.zeros(256, dtype=torch.bool)
    found: dict[int, str] = {}
    for mask, name in zip(masks, names):
        values = mask.unique()
        new = values[~present[values.long()]]
        for value in new.tolist():
            found[value] = name
        present[values.long()] = True
    return found


def segmentation_bundle(
    splits: dict[str, tuple[Tensor, Tensor, list[str]]],
    classes: list[str],
    *,
    augment: Sequence[dict],
    mean: Sequence[float],
    std: Sequence[float],
    pad_value: int,
    image_size: int,
) -> DataBundle:
    train_tf = build_joint_transform(augment, mean, std, pad_value, image_size)
    eval_tf = build_joint_transform([], mean, std, pad_value, image_size)
    train, val, test = splits["train"], splits["val"], splits.get("test", splits["val"])
    channels = train[0].shape[1]
    for key, values in (("mean", mean), ("std", std)):
        if len(values) != channels:
            raise UserError(f"dataset.{key}: needs {channels} values (one per channel), got {list(values)}")
    bundle = DataBundle(
        train=SegmentationDataset(train[0], train[1], train_tf),
        val=SegmentationDataset(val[0], val[1], eval_tf),
        test=SegmentationDataset(test[0], test[1], eval_tf),
        classes=classes,
        in_channels=channels,
        image_size=image_size,
        mean=list(mean),
        std=list(std),
        target="mask",
    )
    found: dict[int, str] = {}
    for _, masks, names in (train, val, test):
        for value, name in mask_values(masks, names).items():
            found.setdefault(value, name)
    bundle.mask_values = found  # checked by task=segmentation against its classes
    return bundle


def _load_split(
    folder: Path, size: int, channels: int, on_error: str, max_pixels: int
) -> tuple[Tensor, Tensor, list[str]]:
    images_dir, masks_dir = folder / "images", folder / "masks"
    if not images_dir.is_dir() or not masks_dir.is_dir():
        raise UserError(
            f"dataset.root: {folder} needs images/ and masks/ folders (segfolder expects "
            f"<split>/images/<name>.jpg and <split>/masks/<name>.png)"
        )
    files = sorted(p for p in images_dir.iterdir() if p.suffix.lower() in SUFFIXES)
    missing = [p.name for p in files if not (masks_dir / f"{p.stem}.png").is_file()]
    if missing:
        raise UserError(
            f"dataset.root: {masks_dir} has no mask for {len(missing)} image(s), e.g. {missing[0]} "
            f"(expected {Path(missing[0]).stem}.png)"
        )
    if not files:
        raise UserError(f"dataset.root: no .jpg, .png, .webp or .gif images in {images_dir}")
    images, kept = decode_files(files, size, channels, on_error, max_pixels, f"{folder.name}/images")
    masks, names = [], []
    for i in kept:
        path = masks_dir / f"{files[i].stem}.png"
        try:
            masks.append(decode_mask(path.read_bytes(), size, max_pixels, "dataset.max_image_pixels"))
        except (ImageError, OSError) as e:
            raise UserError(
                f"dataset.root: cannot read the mask {path} ({e}); fix or remove it with its image"
            ) from None
        names.append(str(path))
    return images, torch.stack(masks), names


@DATASETS.register("segfolder")
def segfolder(
    *,
    root: str,
    num_classes: int,
    class_names: list[str] | None,
    image_size: int,
    in_channels: int,
    augment: Sequence[dict],
    mean: Sequence[float],
    std: Sequence[float],
    pad_value: int,
    on_error: str,
    max_image_pixels: int,
) -> DataBundle:
    if on_error not in ("skip", "error"):
        raise UserError(f"dataset.on_error: must be one of skip, error, got {on_error!r}")
    names = list(class_names) if class_names else [f"class_{i}" for i in range(num_classes)]
    if len(names) != num_classes:
        raise UserError(f"dataset.class_names: {len(names)} names for dataset.num_classes={num_classes}")
    folder = Path(root)
    splits = {
        split: _load_split(folder / split, image_size, in_channels, on_error, max_image_pixels)
        for split in ("train", "val", "test")
        if (folder / split).is_dir()
    }
    for split in ("train", "val"):
        if split not in splits:
            raise UserError(
                f"dataset.root: {folder.resolve()} has no {split}/ folder (segfolder expects "
                f"train/ and val/, and optionally test/, each with images/ and masks/)"
            )
    return segmentation_bundle(
        splits, names, augment=augment, mean=mean, std=std, pad_value=pad_value, image_size=image_size
    )


def synthetic_scenes(n: int, image_size: int, noise: float, seed: int) -> tuple[Tensor, Tensor]:
    """Images of up to three shapes (class 1 squares, class 2 discs) on a noisy background (class 0);
    a shape's colour varies, its form tells its class."""
    g = torch.Generator().manual_seed(seed)
    grid = torch.arange(image_size).float()
    masks = torch.zeros(n, image_size, image_size, dtype=torch.uint8)
    images = 0.3 + noise * torch.randn(n, 3, image_size, image_size, generator=g)
    for i in range(n):
        for _ in range(int(torch.randint(1, 4, (1,), generator=g))):
            kind = int(torch.randint(1, 3, (1,), generator=g))
            half = float(torch.randint(image_size // 8, image_size // 4 + 1, (1,), generator=g))
            cy, cx = (torch.rand(2, generator=g) * image_size).tolist()
            if kind == 1:
                inside = ((grid.view(-1, 1) - cy).abs() <= half) & ((grid.view(1, -1) - cx).abs() <= half)
            else:
                inside = (grid.view(-1, 1) - cy) ** 2 + (grid.view(1, -1) - cx) ** 2 <= half**2
            colour = torch.rand(3, 1, 1, generator=g) * 0.5 + 0.5
            images[i] = torch.where(inside, colour, images[i])
            masks[i][inside] = kind
    return (images.clamp(0, 1) * 255).round().to(torch.uint8), masks


@DATASETS.register("synthetic_shapes")
def synthetic_shapes(
    *,
    num_classes: int,
    in_channels: int,
    image_size: int,
    train_size: int,
    val_size: int,
    test_size: int,
    noise: float,
    seed: int,
    augment: Sequence[dict],
    mean: Sequence[float],
    std: Sequence[float],
    pad_value: int,
) -> DataBundle:
    if num_classes != 3:
        raise UserError(
            f"dataset.num_classes: synthetic_shapes has 3 classes (background, square, disc), got "
            f"{num_classes}"
        )
    if in_channels != 3:
        raise UserError(f"dataset.in_channels: synthetic_shapes are RGB (3), got {in_channels}")
    for key, value in (
        ("train_size", train_size),
        ("val_size", val_size),
        ("test_size", test_size),
        ("image_size", image_size),
    ):
        if value < 1:
            raise UserError(f"dataset.{key}: must be 1 or more, got {value}")
    splits = {}
    for offset, (split, size) in enumerate((("train", train_size), ("val", val_size), ("test", test_size))):
        images, masks = synthetic_scenes(size, image_size, noise, seed + offset)
        splits[split] = (images, masks, [f"synthetic {split} sample {i}" for i in range(size)])
    return segmentation_bundle(
        splits,
        ["background", "square", "disc"],
        augment=augment,
        mean=mean,
        std=std,
        pad_value=pad_value,
        image_size=image_size,
    )
