"""`python -m trainer.data.shard <image folder> <out> --shard-size N [--format tar|jsonl]`: an image
folder (root/train/<class>/*, val/, test/) as shards for the `streaming` dataset.

tar: out/<split>/shard-000000.tar in the WebDataset layout: `<key>.<jpg|png|webp>` holds the image file's
own bytes (not re-encoded), `<key>.cls` the label as text. jsonl: out/<split>/shard-000000.jsonl, one
`{"path": ..., "label": ...}` line per image, paths relative to the manifest. Either way out/index.json
lists the classes and every shard with its sample count, so training never has to count them.
Samples are shuffled (--seed) before sharding: a shard then holds every class, which the bounded
shuffle buffer needs for well-mixed batches.
"""

import argparse
import io
import json
import os
import random
import sys
import tarfile
from pathlib import Path

from tqdm import tqdm

from trainer.core.atomic import atomic_file, write_text
from trainer.core.cli import exit_codes
from trainer.core.errors import UserError
from trainer.core.images import SUFFIXES
from trainer.data.folder import class_names
from trainer.data.shard_format import INDEX


def list_split(folder: Path, classes: list[str]) -> list[tuple[Path, int]]:
    return [
        (path, label)
        for label, name in enumerate(classes)
        if (folder / name).is_dir()
        for path in sorted((folder / name).iterdir())
        if path.suffix.lower() in SUFFIXES
    ]


def _add(tar: tarfile.TarFile, name: str, data: bytes) -> None:
    info = tarfile.TarInfo(name)
    info.size, info.mode = len(data), 0o644
    tar.addfile(info, io.BytesIO(data))


def write_tar(path: Path, samples: list[tuple[Path, int]], first_key: int) -> None:
    with atomic_file(path, "wb") as f, tarfile.open(fileobj=f, mode="w") as tar:
        for i, (image, label) in enumerate(samples, start=first_key):
            suffix = image.suffix.lower().lstrip(".").replace("jpeg", "jpg")
            _add(tar, f"{i:09d}.{suffix}", image.read_bytes())
            _add(tar, f"{i:09d}.cls", str(label).encode())


def write_jsonl(path: Path, samples: list[tuple[Path, int]], first_key: int) -> None:
    with atomic_file(path, "w") as f:
        for image, label in samples:
            relative = os.path.relpath(image.resolve(), path.parent.resolve())
            f.write(json.dumps({"path": relative, "label": label}) + "\n")


def write_shards(source: Path, out: Path, shard_size: int, fmt: str = "tar", seed: int = 0) -> dict:
    """Writes every split of `source` as shards under `out` and returns the index it wrote."""
    if shard_size < 1:
        raise UserError(f"--shard-size: must be 1 or more, got {shard_size}")
    if (out / INDEX).exists():
        raise UserError(f"{out / INDEX} exists: {out} holds shards already; choose another output folder")
    classes = class_names(source)
    index: dict = {"format": f"trainer-shards/{fmt}", "classes": classes, "splits": {}}
    writer = write_tar if fmt == "tar" else write_jsonl
    for split in ("train", "val", "test"):
        if not (source / split).is_dir():
            continue
        samples = list_split(source / split, classes)
        random.Random(seed).shuffle(samples)
        (out / split).mkdir(parents=True, exist_ok=True)
        shards = []
        with tqdm(total=len(samples), desc=f"sharding {split}/", unit="img", disable=None) as bar:
            for number, first in enumerate(range(0, len(samples), shard_size)):
                chunk = samples[first : first + shard_size]
                name = f"{split}/shard-{number:06d}.{fmt}"
                writer(out / name, chunk, first)
                shards.append({"file": name, "count": len(chunk)})
                bar.update(len(chunk))
        index["splits"][split] = {"count": len(samples), "shards": shards}
    write_text(out / INDEX, json.dumps(index, indent=1))
    return index


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m trainer.data.shard", description=__doc__.splitlines()[0])
    parser.add_argument(
        "source", type=Path, help="an image folder: train/<class>/*, optionally val/ and test/"
    )
    parser.add_argument("out", type=Path, help="the folder to write the shards and index.json to")
    parser.add_argument("--shard-size", type=int, default=10_000, help="samples per shard (default 10000)")
    parser.add_argument("--format", choices=["tar", "jsonl"], default="tar")
    parser.add_argument("--seed", type=int, default=0, help="the shuffle before sharding")
    args = parser.parse_args(argv)
    with exit_codes():
        index = write_shards(args.source, args.out, args.shard_size, args.format, args.seed)
        for split, info in index["splits"].items():
            print(f"{split}: {info['count']} samples in {len(info['shards'])} shard(s)")
        print(f"train with: python -m trainer dataset=streaming dataset.root={args.out}", file=sys.stderr)


if __name__ == "__main__":
    main()
