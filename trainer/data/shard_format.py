"""The shard format the streaming dataset reads (`python -m trainer.data.shard` writes it): what a split's
shards are (index.json, or the files under root/<split>/), and how one shard is read sample by sample,
lazily: tar files in the WebDataset layout (`<key>.jpg|png|webp|gif` next to `<key>.cls`), JSONL
manifests of `{"path": ..., "label": ...}` lines, or an Arrow table (tables.py)."""

import itertools
import json
import logging
import tarfile
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path

from trainer.core.errors import UserError
from trainer.data.tables import iter_table_rows

log = logging.getLogger("trainer")
IMAGE_SUFFIXES = ("jpg", "jpeg", "png", "webp", "gif")
INDEX = "index.json"


@dataclass(frozen=True)
class Shard:
    path: str
    count: int  # samples
    columns: tuple[str, str] | None = None  # a table's (image, label) columns (tables.py); None: tar or JSONL


# ---- reading shards ---------------------------------------------------------------------------------
def _key_and_suffix(name: str) -> tuple[str, str]:
    """WebDataset's convention: the key is the path up to the first dot of the file name."""
    folder, _, base = name.rpartition("/")
    stem, _, suffix = base.partition(".")
    return f"{folder}/{stem}", suffix.lower()


def _read_tar_sample(tar: tarfile.TarFile, members: dict[str, tarfile.TarInfo]) -> tuple[bytes, int]:
    image = next((members[s] for s in IMAGE_SUFFIXES if s in members), None)
    if image is None or "cls" not in members:
        raise ValueError(f"sample {next(iter(members.values())).name} lacks an image or a .cls label")
    return tar.extractfile(image).read(), int(tar.extractfile(members["cls"]).read().decode().strip())


def iter_shard(
    shard: Shard, start: int, stop: int, wanted: Callable[[int], bool], classes: Sequence[str]
) -> Iterator[tuple[int, Callable[[], tuple[bytes, int]]]]:
    """(index in shard, read) for the wanted samples with start <= index < stop; `read()` returns
    (encoded image, label) and must be called before the caller asks for the next sample."""
    if shard.columns is not None:  # an Arrow table (a Hugging Face dataset's file)
        yield from iter_table_rows(shard.path, shard.columns, start, stop, wanted, classes)
        return
    if shard.path.endswith(".jsonl"):
        folder = Path(shard.path).parent
        with open(shard.path, encoding="utf-8") as lines:
            for index, line in enumerate(itertools.islice(lines, stop)):
                if index >= start and wanted(index):
                    yield index, lambda line=line: _read_jsonl_sample(line, folder, classes)
        return
    with tarfile.open(shard.path, mode="r:") as tar:
        for index, members in enumerate(itertools.islice(_tar_samples(tar), stop)):
            if index >= start and wanted(index):
                yield index, lambda members=members: _read_tar_sample(tar, members)


def _tar_samples(tar: tarfile.TarFile) -> Iterator[dict[str, tarfile.TarInfo]]:
    """Each sample's members by suffix. Only headers are read: the tar is opened seekable, so moving
    on to the next header skips a member's data."""
    key, members = None, {}
    for member in iter(tar.next, None):
        if not member.isfile():
            continue
        member_key, suffix = _key_and_suffix(member.name)
        if member_key != key and members:
            yield members
            members = {}
        key, members[suffix] = member_key, member
    if members:
        yield members


def _read_jsonl_sample(line: str, folder: Path, classes: Sequence[str]) -> tuple[bytes, int]:
    record = json.loads(line)
    label = record["label"]
    if isinstance(label, str):
        label = classes.index(label) if label in classes else int(label)
    return (folder / record["path"]).read_bytes(), int(label)


def count_samples(path: str) -> int:
    if path.endswith(".jsonl"):
        with open(path, encoding="utf-8") as lines:
            return sum(1 for line in lines if line.strip())
    with tarfile.open(path, mode="r:") as tar:
        return sum(1 for _ in _tar_samples(tar))


# ---- finding shards ---------------------------------------------------------------------------------
def read_index(root: Path) -> dict:
    path = root / INDEX
    if not path.is_file():
        return {}
    try:
        return json.loads(path.read_text())
    except json.JSONDecodeError as e:
        raise UserError(
            f"dataset.root: {path} is not valid JSON ({e}); write it again with python -m trainer.data.shard"
        ) from None


def find_shards(root: Path, split: str) -> list[Shard]:
    """The split's shards: as index.json lists them (with counts), else root/<split>/*.tar or *.jsonl,
    or root/<split>.jsonl, counted now (headers and lines only)."""
    listed = read_index(root).get("splits", {}).get(split)
    if listed is not None:
        return [Shard(str(root / s["file"]), int(s["count"])) for s in listed["shards"]]
    folder = root / split
    paths = sorted(folder.glob("*.tar")) or sorted(folder.glob("*.jsonl")) if folder.is_dir() else []
    if not paths and (root / f"{split}.jsonl").is_file():
        paths = [root / f"{split}.jsonl"]
    shards = [Shard(str(p), count_samples(str(p))) for p in paths]
    if shards:
        log.info(
            "counted %d %s samples in %d shard(s) under %s (an index.json would skip this)",
            sum(s.count for s in shards),
            split,
            len(shards),
            root,
        )
    return [s for s in shards if s.count > 0]
