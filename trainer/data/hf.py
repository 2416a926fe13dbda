"""`hf`: a Hugging Face `datasets` dataset (the `hf` extra): a folder written by `save_to_disk`, a local
folder of data files, or a hub name, fetched through the library's own download and cache.

`datasets` finds the splits, the columns and the class names (a ClassLabel's names; else the label
values, sorted); the image bytes go through our decoder (trainer/images.py: damaged files are skipped
or refused, never a crash), not the library's. Two ways to train, as with image files:
- held in memory (the default): every image decoded once at dataset.image_size, like `imagefolder`;
- `dataset.streaming=true`: the dataset's Arrow files are the shards of our streaming plan (streaming.py):
  rows read lazily from the memory-mapped files, the same batches for any number of workers and
  processes, a mid-epoch resume exact. A hub dataset is downloaded to datasets' cache first (disk,
  not memory); the plan needs every file's row count before the first batch.
"""

import functools
import logging
import os
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from trainer.core.errors import UserError, require
from trainer.core.registry import DATASETS
from trainer.data.arrays import DataBundle, ValSplit, bundle_from_arrays
from trainer.data.folder import decode_all
from trainer.data.shard_format import Shard
from trainer.data.streaming import check_options, streaming_bundle
from trainer.data.tables import count_rows, image_bytes, label_index

log = logging.getLogger("trainer")
VAL_NAMES = ("validation", "valid", "val")


@functools.lru_cache(maxsize=4)
def open_splits(path: str) -> Any:
    """The dataset's splits (a DatasetDict; a single saved Dataset is its "train")."""
    datasets = require("datasets", "dataset=hf", "hf")
    folder = Path(path)
    try:
        if (folder / "dataset_dict.json").is_file() or (folder / "state.json").is_file():
            loaded = datasets.load_from_disk(str(folder))
        else:
            from trainer.core.hub import offline_unless_reachable

            offline_unless_reachable()  # no network: datasets' cache at once, not a minute of retries
            loaded = datasets.load_dataset(path)
    except Exception as e:  # noqa: BLE001 - not found, offline, a damaged folder: one line, exit 2
        reason = (
            f"{type(e).__name__}: {str(e).strip().splitlines()[0][:160]}"
            if str(e).strip()
            else type(e).__name__
        )
        if folder.is_dir():
            raise UserError(
                f"dataset.path: cannot load the folder {path} ({reason}); write it again with "
                f"save_to_disk, or give a folder of data files"
            ) from None
        cache = (
            os.environ.get("HF_DATASETS_CACHE")
            or Path(os.environ.get("HF_HOME", Path.home() / ".cache" / "huggingface")) / "datasets"
        )
        raise UserError(
            f"dataset.path: cannot load '{path}' ({reason}); give a folder written by save_to_disk, a "
            f"folder of data files, or a hub name (offline: load it once on a machine with network to "
            f"fill {cache}, or set HF_DATASETS_CACHE)"
        ) from None
    return loaded if isinstance(loaded, datasets.DatasetDict) else datasets.DatasetDict({"train": loaded})


def column(split: Any, name: str, key: str, where: str) -> Any:
    """The feature of a column, or a one-line error listing the columns there are."""
    if name not in split.features:
        raise UserError(
            f"dataset.{key}: '{name}' is not a column of {where} (its columns: "
            f"{', '.join(split.features)}); set dataset.{key}=<one of them>"
        )
    return split.features[name]


def class_names(path: str, label_column: str, split_train: str) -> list[str]:
    """A ClassLabel's names; else the training labels' values (class names, or indices 0..max)."""
    import datasets

    splits = open_splits(path)
    train = pick(splits, split_train, "split_train", path)
    feature = column(train, label_column, "label_column", f"{path}'s {split_train} split")
    if isinstance(feature, datasets.ClassLabel):
        return list(feature.names)
    values = train.unique(label_column)
    if all(isinstance(v, int) and not isinstance(v, bool) for v in values) and values:
        return [str(i) for i in range(max(values) + 1)]
    if all(isinstance(v, str) for v in values) and values:
        return sorted(values)
    raise UserError(
        f"dataset.label_column: '{label_column}' holds {feature}, not class indices or names; choose "
        f"a column of labels"
    )


def pick(splits: Any, name: str, key: str, path: str) -> Any:
    if name not in splits:
        raise UserError(f"dataset.{key}: '{name}' is not a split of {path} (its splits: {', '.join(splits)})")
    return splits[name]


def choose_splits(
    splits: Any, path: str, train: str, val: str | None, test: str | None, val_split: float
) -> dict[str, str]:
    """{"train", "val"?, "test"?: split name}: the named ones, else validation/valid/val and test when
    the dataset has them; validation held out of train (val_split) replaces a val split."""
    chosen = {"train": train}
    pick(splits, train, "split_train", path)
    if val is not None:
        pick(splits, val, "split_val", path)
        chosen["val"] = val
    elif val_split == 0:
        found = next((name for name in VAL_NAMES if name in splits and name != train), None)
        if found:
            chosen["val"] = found
    if val is not None and val_split > 0:
        raise UserError(
            f"dataset.val_split: dataset.split_val={val} is the validation split already; set "
            f"dataset.val_split=0"
        )
    if test is not None:
        pick(splits, test, "split_test", path)
        chosen["test"] = test
    elif "test" in splits and train != "test":
        chosen["test"] = "test"
    if "val" not in chosen and "test" not in chosen and val_split == 0:
        raise UserError(
            f"dataset.val_split: {path} has only {', '.join(splits)} to train on and nothing to validate "
            f"on; hold out part of it, e.g. dataset.val_split=0.1, or name one with dataset.split_val"
        )
    return chosen


def check_image_column(split: Any, image_column: str, where: str) -> None:
    import datasets

    feature = column(split, image_column, "image_column", where)
    if isinstance(feature, datasets.Image) or (
        isinstance(feature, datasets.Value) and feature.dtype in ("binary", "large_binary", "string")
    ):
        return
    images = [name for name, f in split.features.items() if isinstance(f, datasets.Image)]
    raise UserError(
        f"dataset.image_column: '{image_column}' holds {feature}, not images"
        + (f"; the image columns: {', '.join(images)}" if images else "")
    )


def decode_split(
    split: Any,
    name: str,
    image_column: str,
    label_column: str,
    classes: list[str],
    image_size: int,
    in_channels: int,
    on_error: str,
    max_pixels: int,
) -> tuple:
    """The split's images as one uint8 tensor (decoded by trainer/images.py) and their labels."""
    import datasets
    import torch

    raw = split.select_columns([image_column, label_column])
    if isinstance(raw.features[image_column], datasets.Image):
        raw = raw.cast_column(image_column, datasets.Image(decode=False))  # the bytes: our decoder reads them
    cells, labels = [], []
    for batch in raw.with_format("arrow").iter(batch_size=1024):
        cells += batch.column(image_column).to_pylist()
        labels += batch.column(label_column).to_pylist()
    sources = [
        (f"{name}[{i}]", functools.partial(image_bytes, cell, f"{name}[{i}]")) for i, cell in enumerate(cells)
    ]
    images, kept = decode_all(
        sources, image_size, in_channels, on_error, max_pixels, name, key="dataset.path"
    )
    try:
        targets = [label_index(labels[i], classes) for i in kept]
    except ValueError as e:
        raise UserError(
            f"dataset.label_column: {name}: {e}; the classes come from {label_column} of the training split"
        ) from None
    return images, torch.tensor(targets)


def table_shards(split: Any, name: str, columns: tuple[str, str]) -> list[Shard]:
    """The split's Arrow files as shards of the streaming plan."""
    files = [entry["filename"] for entry in split.cache_files]
    if not files or getattr(split, "_indices", None) is not None:
        raise UserError(
            f"dataset.streaming: the {name} split is not a plain set of files on disk (held in memory, or "
            f"a selection of rows); write it with save_to_disk and give that folder as dataset.path"
        )
    return [Shard(path, count_rows(path), columns=columns) for path in files]


@DATASETS.register("hf")
def hugging_face(
    *,
    path: str,
    image_column: str,
    label_column: str,
    split_train: str,
    split_val: str | None,
    split_test: str | None,
    val_split: ValSplit,
    streaming: bool,
    image_size: int,
    in_channels: int,
    shuffle_buffer: int,
    epoch_length: int | None,
    augment: Sequence[dict],
    mean: Sequence[float],
    std: Sequence[float],
    on_error: str,
    max_image_pixels: int,
) -> DataBundle:
    check_options(
        shuffle_buffer=shuffle_buffer,
        epoch_length=epoch_length,
        on_error=on_error,
        in_channels=in_channels,
        max_image_pixels=max_image_pixels,
    )
    splits = open_splits(path)
    classes = class_names(path, label_column, split_train)
    chosen = choose_splits(splits, path, split_train, split_val, split_test, val_split)
    for name in chosen.values():
        check_image_column(splits[name], image_column, f"{path}'s {name} split")
        column(splits[name], label_column, "label_column", f"{path}'s {name} split")
    log.info(
        "dataset=hf: %s, %s",
        path,
        ", ".join(f"{role} = {name} ({len(splits[name])} rows)" for role, name in chosen.items()),
    )
    if streaming:
        if val_split > 0:
            raise UserError(
                "dataset.val_split: streaming reads the splits as they are; name a validation split with "
                "dataset.split_val, or set dataset.streaming=false"
            )
        shards = {
            role: table_shards(splits[name], name, (image_column, label_column))
            for role, name in chosen.items()
        }
        return streaming_bundle(
            {"train": shards["train"], "val": shards.get("val", []), "test": shards.get("test", [])},
            classes,
            image_size=image_size,
            in_channels=in_channels,
            shuffle_buffer=shuffle_buffer,
            epoch_length=epoch_length,
            augment=augment,
            mean=mean,
            std=std,
            on_error=on_error,
            max_image_pixels=max_image_pixels,
        )
    decoded = {
        role: decode_split(
            splits[name],
            name,
            image_column,
            label_column,
            classes,
            image_size,
            in_channels,
            on_error,
            max_image_pixels,
        )
        for role, name in chosen.items()
    }
    return bundle_from_arrays(
        decoded["train"],
        decoded.get("test", decoded.get("val")),
        classes,
        val=decoded.get("val"),
        val_split=val_split,
        augment=augment,
        mean=mean,
        std=std,
        image_size=image_size,
    )
