"""One way to write a file the framework promises (checkpoints, metrics.json, the export manifest, a
sweep's records, shards): into a temporary file beside it, flushed to disk, renamed over it, and the
folder flushed, so a reader or a crash at any instant finds the old complete file or the new one."""

import contextlib
import os
from collections.abc import Iterator
from pathlib import Path
from typing import IO


def temporary_name(path: Path) -> Path:
    """Hidden, beside the file, unique per process: `.<name>.<pid>.tmp` (resume removes stale ones)."""
    return path.with_name(f".{path.name}.{os.getpid()}.tmp")


def fsync_folder(folder: Path) -> None:
    fd = os.open(folder, os.O_RDONLY)
    try:
        os.fsync(fd)  # makes the rename itself durable, not only the file's bytes
    finally:
        os.close(fd)


@contextlib.contextmanager
def atomic_file(path: Path, mode: str = "wb", before_rename=None) -> Iterator[IO]:
    """`with atomic_file(path) as f: ...` writes `path` whole or not at all. `before_rename`: called
    once the bytes are durable, just before the rename (a test hook)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = temporary_name(path)
    try:
        with open(tmp, mode, **({} if "b" in mode else {"encoding": "utf-8"})) as f:
            yield f
            f.flush()
            os.fsync(f.fileno())
        if before_rename is not None:
            before_rename()
        os.replace(tmp, path)
        fsync_folder(path.parent)
    finally:
        tmp.unlink(missing_ok=True)


def write_text(path: Path, text: str) -> None:
    with atomic_file(path, "w") as f:
        f.write(text)


def write_bytes(path: Path, data: bytes) -> None:
    with atomic_file(path, "wb") as f:
        f.write(data)
