"""Datasets held as one uint8 tensor: decoded once, augmented per sample with transforms.v2."""

from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Annotated, Any

import numpy as np
import torch
from torch import Tensor
from torch.utils.data import Dataset

from trainer.core.errors import UserError
from trainer.core.fields import Check, at_least, one_of


@dataclass
class TextInfo:
    """How a text dataset's inputs are token ids: the tokenizer (its spec and the folder of its files),
    the model's vocabulary, and how long an input is."""

    tokenizer: dict[str, Any]  # the tokenizer's spec (trainer.text.tokenizers: kind, vocab_size, file)
    tokenizer_dir: str  # the folder its files are in
    vocab_size: int  # the model's vocabulary: at least the tokenizer's
    max_length: int  # tokens per input: a language model's context (block size), a classifier's padded length
    pad_id: int | None = None  # None: inputs are not padded (a causal model answers at a text's last token)
    bytes_per_token: float = 1.0  # of the training text, for bits per byte
    saved_by: Any = None  # a tokenizer that saves itself (a pretrained one), instead of tokenizer_dir's files


# Parameters many datasets take, with their ranges (checked before any data is read; registry.check).
ValSplit = Annotated[float, Check(lambda v: 0 <= v < 1, "in [0, 1)")]
OnError = Annotated[str, one_of("skip", "error")]
Channels = Annotated[int, one_of(1, 3)]
Count = Annotated[int, at_least(1)]

# What a dataset tells the model builder (an argument of these names is filled from the data); the last
# two are what an environment tells a policy (recipe=ppo).
DATA_FACTS = (
    "num_classes",
    "in_channels",
    "image_size",
    "vocab_size",
    "block_size",
    "max_length",
    "pad_id",
    "target",
    "classes",
    "obs_dim",
    "n_actions",
)


@dataclass
class DataBundle:
    """What a DATASETS entry returns; the rest of the framework reads only this.

    Each split is a Dataset of samples the task understands (built-in datasets: (input, target)
    tuples). `target` declares what the targets are: "class" (an int), "labels" (a multi-hot float
    vector), "values" (floats), "mask" (an H x W tensor of class indices), "tokens", or a custom task's
    own word; `classes` names the classes, labels or targets. The image fields are optional: without
    them the run trains, and only the image-file side of predict and serve (and the TensorBoard preview)
    is unavailable. A split may offer `preview(n)` (n inputs, for TensorBoard) and `targets()` (every
    target, read cheaply; tasks that need statistics of the training targets use it)."""

    train: Dataset
    val: Dataset
    test: Dataset
    classes: list[str]
    in_channels: int | None = None
    image_size: int | None = None
    mean: list[float] | None = None
    std: list[float] | None = None
    target: str = "class"
    text: TextInfo | None = None  # text datasets: how texts become token ids
    mask_values: dict[int, str] = field(default_factory=dict)  # segmentation: each mask value, its first file

    def facts(self) -> dict[str, Any]:
        """What the model builder may take from the data (DATA_FACTS), as far as this dataset has them."""
        text = self.text
        found = {
            "num_classes": len(self.classes) if self.classes else None,
            "in_channels": self.in_channels,
            "image_size": self.image_size,
            "vocab_size": text.vocab_size if text else None,
            "block_size": text.max_length if text else None,
            "max_length": text.max_length if text else None,
            "pad_id": text.pad_id if text else None,
            "target": self.target,  # what the targets are: "class", "labels", "tokens"...
            "classes": list(self.classes) or None,  # their names
        }
        return {key: value for key, value in found.items() if value is not None}

    def preprocessing(self) -> dict[str, Any] | None:
        """How a raw input becomes this dataset's model input, for predict and serve (or anyone): a text's
        tokenizer and length, an image file's decoding, resize, crop and normalisation; None for inputs
        that are neither (then the export takes tensors only)."""
        if self.text is not None:
            return {
                "decode": "text",
                "tokenizer": self.text.tokenizer,
                "max_length": self.text.max_length,
                "pad_id": self.text.pad_id,
            }
        if self.image_size is None or self.mean is None or self.in_channels not in (1, 3):
            return None
        return {
            "decode": "RGB" if self.in_channels == 3 else "L",
            "resize_shorter_side": self.image_size,
            "center_crop": [self.image_size, self.image_size],
            "scale": 1 / 255,
            "mean": self.mean,
            "std": self.std,
            "layout": "NCHW",
            "dtype": "float32",
        }

    def keep_input_files(self, folder: Path) -> None:
        """The files `preprocessing` needs (a text dataset's tokenizer), copied into `folder`/tokenizer."""
        if self.text is not None:
            from trainer.text.tokenizers import copy_tokenizer, save_tokenizer

            if self.text.saved_by is not None:
                save_tokenizer(self.text.saved_by, folder / "tokenizer")
            else:
                copy_tokenizer(self.text.tokenizer, Path(self.text.tokenizer_dir), folder / "tokenizer")


class ArrayDataset(Dataset):
    def __init__(self, images: Tensor, labels: Tensor, indices: Tensor | None, transform: Callable) -> None:
        self.images, self.labels, self.transform = images, labels, transform
        self.indices = indices if indices is not None else torch.arange(len(labels))

    def __len__(self) -> int:
        return len(self.indices)

    def __getitem__(self, i: int) -> tuple[Tensor, int | Tensor]:
        j = int(self.indices[i])
        image = self.images[j]
        if not isinstance(image, Tensor):  # a memory-mapped array: read this one image, and only it
            image = torch.from_numpy(np.array(image))  # a copy of one image: writable, contiguous
        label = self.labels[j]
        return self.transform(image), (
            int(label) if label.ndim == 0 and not label.is_floating_point() else label
        )

    def targets(self) -> Tensor:
        """Every target of this split, in order (no image is read)."""
        return self.labels[self.indices]

    def preview(self, n: int) -> Tensor:
        """The first n images through this split's transform (for TensorBoard)."""
        return torch.stack([self[i][0] for i in range(min(n, len(self)))])

    def all_images(self) -> Tensor:
        """Every image of this split as one tensor (read whole, for the device-resident loader)."""
        if isinstance(self.images, Tensor):
            return self.images[self.indices]
        return torch.from_numpy(np.ascontiguousarray(self.images[self.indices.numpy()]))


class Cutout(torch.nn.Module):
    """Cutout (DeVries and Taylor, 2017): a size x size square, centred on a random pixel and clipped at
    the border, set to 0 after normalisation, i.e. to the dataset's mean colour."""

    def __init__(self, size: int) -> None:
        super().__init__()
        if size < 1:
            raise ValueError(f"size must be 1 or more, got {size}")
        self.size = size

    def forward(self, image: Tensor) -> Tensor:
        height, width = image.shape[-2:]
        row, col = int(torch.randint(height, ())), int(torch.randint(width, ()))
        top, left = max(row - self.size // 2, 0), max(col - self.size // 2, 0)
        image = image.clone()
        image[..., top : row - self.size // 2 + self.size, left : col - self.size // 2 + self.size] = 0
        return image


OUR_TRANSFORMS = {"Cutout": Cutout}  # augment steps that torchvision lacks; applied after Normalize


SIZED_STEPS = ("RandomCrop", "CenterCrop", "RandomResizedCrop")  # their `size` is the image size unless given


def sized(spec: dict[str, Any], size: int | None) -> dict[str, Any]:
    """An augment step's options, with a crop's size the image size when the config leaves it out."""
    if spec.get("name") in SIZED_STEPS and "size" not in spec and size is not None:
        return {**spec, "size": size}
    return dict(spec)


def build_transform(
    augment: Sequence[dict[str, Any]],
    mean: Sequence[float],
    std: Sequence[float],
    resize: int | None,
    size: int | None = None,
) -> Callable[[Tensor], Tensor]:
    """uint8 CHW image -> optional resize -> augmentation steps by name -> float, normalised -> ours
    (a transforms.v2.Compose). `size`: the image size a crop without a size of its own takes."""
    from torchvision.transforms import v2  # here: registering a dataset must not cost torchvision's import

    steps: list[Callable] = [v2.Resize(resize, antialias=True)] if resize else []
    after: list[Callable] = []
    for spec in augment:
        spec = sized(spec, size or resize)
        name = spec.pop("name", None)
        step = OUR_TRANSFORMS.get(str(name)) or getattr(v2, str(name), None)
        if not (isinstance(step, type) and issubclass(step, (v2.Transform, *OUR_TRANSFORMS.values()))):
            raise UserError(
                f"dataset.augment: '{name}' is not a torchvision.transforms.v2 transform "
                f"(e.g. RandomCrop, RandomHorizontalFlip, ColorJitter) or Cutout"
            )
        try:
            (after if name in OUR_TRANSFORMS else steps).append(step(**spec))
        except (TypeError, ValueError) as e:
            raise UserError(f"dataset.augment: {name}({spec}) is invalid: {e}") from None
    steps += [v2.ToDtype(torch.float32, scale=True), v2.Normalize(list(mean), list(std)), *after]
    return v2.Compose(steps)


def bundle_from_arrays(
    train: tuple[Tensor, Tensor],
    test: tuple[Tensor, Tensor] | None,
    classes: list[str],
    *,
    val_split: float,
    augment: Sequence[dict],
    mean: Sequence[float],
    std: Sequence[float],
    image_size: int,
    split_seed: int = 0,
    val: tuple[Tensor, Tensor] | None = None,
    target: str = "class",
) -> DataBundle:
    """The validation set is `val` when the data has one; otherwise a `val_split` fraction of train
    (fixed by split_seed, so every run seed validates on the same images), or else the test split.
    Data without a test split is tested on its validation images. The train transform goes to the
    training part only."""
    images, labels = train
    channels, native_size = images.shape[1], images.shape[-1]
    for key, values in (("mean", mean), ("std", std)):
        if len(values) != channels:
            raise UserError(f"dataset.{key}: needs {channels} values (one per channel), got {list(values)}")
    resize = image_size if image_size != native_size else None
    train_tf = build_transform(augment, mean, std, resize, image_size)
    eval_tf = build_transform([], mean, std, resize, image_size)
    order = torch.randperm(len(labels), generator=torch.Generator().manual_seed(split_seed))
    n_val = int(round(val_split * len(labels)))
    if val_split > 0:
        if n_val == 0 or n_val == len(labels):
            raise UserError(f"dataset.val_split: {val_split} of {len(labels)} images leaves an empty split")
        val_set = ArrayDataset(images, labels, order[:n_val].sort().values, eval_tf)
        train_set = ArrayDataset(images, labels, order[n_val:].sort().values, train_tf)
    elif val is None and test is None:
        raise UserError(
            "dataset.val_split: the data has only a training split; hold out part of it for validation, "
            "e.g. dataset.val_split=0.1"
        )
    else:
        val_set = ArrayDataset(*(val or test), None, eval_tf)
        train_set = ArrayDataset(images, labels, None, train_tf)
    return DataBundle(
        train=train_set,
        val=val_set,
        test=ArrayDataset(*test, None, eval_tf) if test is not None else val_set,
        classes=classes,
        in_channels=channels,
        image_size=image_size,
        mean=list(mean),
        std=list(std),
        target=target,
    )
