"""`manifest`: image files listed with their targets in a CSV or JSONL file per split, for multi-label
and regression tasks (and single labels: a `labels` cell with one label each).

    root/train.csv (or train.jsonl), root/val.csv (or dataset.val_split), root/test.csv (optional)

CSV: a header row with a `path` column (relative to root, or absolute) and either a `labels` column
(labels separated by dataset.separator, e.g. `cat|dog`; an empty cell is no label) for task=multilabel,
or numeric columns named in dataset.targets for task=regression. JSONL: one object per line with `path`
and `labels` (a list) or the target keys. Images are decoded once (trainer/images.py) to
dataset.image_size, as imagefolder does.
"""

import csv
import math
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch

from trainer.core.errors import UserError
from trainer.core.registry import DATASETS
from trainer.data.arrays import DataBundle, ValSplit, bundle_from_arrays
from trainer.data.folder import decode_files
from trainer.data.jsonl import json_lines


def manifest_file(root: Path, split: str) -> Path | None:
    found = [
        root / f"{split}.{suffix}" for suffix in ("csv", "jsonl") if (root / f"{split}.{suffix}").is_file()
    ]
    if len(found) > 1:
        raise UserError(f"dataset.root: {root} has both {split}.csv and {split}.jsonl; keep one")
    return found[0] if found else None


def read_rows(path: Path) -> list[dict[str, Any]]:
    """The manifest's rows as dicts; a line that is not one names the file and line."""
    if path.suffix == ".csv":
        with path.open(newline="") as f:
            rows = list(csv.DictReader(f))
        if rows and "path" not in rows[0]:
            raise UserError(f"dataset.root: {path} has no `path` column (its header: {', '.join(rows[0])})")
        return rows
    rows = []
    for number, row in json_lines(path, "dataset.root"):
        if "path" not in row:
            raise UserError(f"dataset.root: {path} line {number} needs an object with a `path` key")
        rows.append(row)
    return rows


def row_labels(row: dict[str, Any], separator: str) -> list[str]:
    labels = row.get("labels")
    if labels is None:
        return []
    if isinstance(labels, str):
        return [label.strip() for label in labels.split(separator) if label.strip()]
    return [str(label) for label in labels]


def label_names(root: str, separator: str = "|") -> list[str]:
    """Every label the training manifest uses, sorted: their order is the output order."""
    path = manifest_file(Path(root), "train")
    if path is None:
        raise UserError(
            f"dataset.root: {Path(root).resolve()} has no train.csv or train.jsonl; the manifest dataset "
            f"expects root/train.csv with a path column"
        )
    rows = read_rows(path)
    if rows and "labels" not in rows[0]:
        raise UserError(
            f"dataset.targets: {path} has no `labels` column; for regression name the target columns, "
            f"e.g. dataset.targets=[age]"
        )
    return sorted({label for row in rows for label in row_labels(row, separator)})


def _targets(
    rows: list[dict[str, Any]], path: Path, names: list[str], targets: Sequence[str] | None, separator: str
) -> torch.Tensor:
    if not targets:  # multi-hot over the training labels
        index = {name: i for i, name in enumerate(names)}
        hot = torch.zeros(len(rows), len(names))
        for r, row in enumerate(rows):
            for label in row_labels(row, separator):
                if label not in index:
                    raise UserError(
                        f"dataset.root: {path} row {r + 1} has the label {label!r}, which train never "
                        f"uses; add it to a training row or drop it"
                    )
                hot[r, index[label]] = 1
        return hot
    values = torch.zeros(len(rows), len(targets))
    for r, row in enumerate(rows):
        for t, name in enumerate(targets):
            if name not in row:
                raise UserError(
                    f"dataset.targets: {path} row {r + 1} has no {name!r} (it has "
                    f"{', '.join(k for k in row if k != 'path')}); name existing columns in dataset.targets"
                )
            try:
                values[r, t] = float(row[name])
            except (TypeError, ValueError):
                raise UserError(
                    f"dataset.targets: {path} row {r + 1}: {name}={str(row[name])[:30]!r} is not a number"
                ) from None
            if not math.isfinite(values[r, t]):
                raise UserError(f"dataset.targets: {path} row {r + 1}: {name} is NaN or infinite")
    return values


def _load(
    root: Path,
    split: str,
    names: list[str],
    targets: Sequence[str] | None,
    separator: str,
    size: int,
    channels: int,
    on_error: str,
    max_pixels: int,
) -> tuple[torch.Tensor, torch.Tensor] | None:
    path = manifest_file(root, split)
    if path is None:
        return None
    rows = read_rows(path)
    if not rows:
        raise UserError(f"dataset.root: {path} lists no images")
    values = _targets(rows, path, names, targets, separator)
    files = [Path(row["path"]) if Path(row["path"]).is_absolute() else root / row["path"] for row in rows]
    images, kept = decode_files(files, size, channels, on_error, max_pixels, f"{root.name}/{split}")
    return images, values[kept]


@DATASETS.register("manifest")
def manifest(
    *,
    root: str,
    targets: list[str] | None,
    separator: str,
    image_size: int,
    in_channels: int,
    val_split: ValSplit,
    augment: Sequence[dict],
    mean: Sequence[float],
    std: Sequence[float],
    on_error: str,
    max_image_pixels: int,
) -> DataBundle:
    if on_error not in ("skip", "error"):
        raise UserError(f"dataset.on_error: must be one of skip, error, got {on_error!r}")
    if in_channels not in (1, 3):
        raise UserError(
            f"dataset.in_channels: manifest images decode to 1 (grey) or 3 (RGB) channels, got {in_channels}"
        )
    folder = Path(root)
    names = list(targets) if targets else label_names(root, separator)  # the model's outputs
    splits = {
        split: _load(
            folder, split, names, targets, separator, image_size, in_channels, on_error, max_image_pixels
        )
        for split in ("train", "val", "test")
    }
    if splits["val"] is None and val_split == 0:
        raise UserError(
            f"dataset.val_split: {root} has no val.csv or val.jsonl; hold out part of train, e.g. "
            f"dataset.val_split=0.1"
        )
    if splits["val"] is not None and val_split > 0:
        raise UserError(f"dataset.val_split: {root} has a val manifest already; set dataset.val_split=0")
    test = splits["test"] or splits["val"]
    if test is None:
        raise UserError(
            f"dataset.root: {root} has neither test nor val manifest; the best checkpoint is tested on one "
            f"(add test.csv)"
        )
    return bundle_from_arrays(
        splits["train"],
        test,
        names,
        val=splits["val"],
        val_split=val_split,
        augment=augment,
        mean=mean,
        std=std,
        image_size=image_size,
        target="values" if targets else "labels",
    )
