"""The checkpoint format: atomic, durable writes and verified, safe loads.

A checkpoint is a torch.save zip of tensors and plain Python values only, so it loads with
`weights_only=True`. The zip format stores a CRC-32 of every record, which `load_checkpoint` checks
before unpickling: torch.load alone accepts a file with flipped bytes in a tensor.
"""
import os
import pickle
import random
import zipfile
from pathlib import Path
from typing import Any

import numpy as np
import torch

from trainer.errors import UserError

FORMAT = "trainer-checkpoint/1"


def _fsync_dir(folder: Path) -> None:
    fd = os.open(folder, os.O_RDONLY)
    try:
        os.fsync(fd)  # makes the rename itself durable, not only the file's bytes
    finally:
        os.close(fd)


def save_checkpoint(state: dict[str, Any], path: Path) -> Path:
    """Writes to a temporary file in the same folder, fsyncs, renames over `path`, fsyncs the folder:
    a crash at any instant leaves either the old complete file or the new complete file."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    try:
        with open(tmp, "wb") as f:
            torch.save({"format": FORMAT, **state}, f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)
    _fsync_dir(path.parent)
    return path


def copy_checkpoint(source: Path, path: Path) -> Path:
    """Makes `path` a durable copy of `source` without serialising again (a hard link where the
    file system allows it; replacing `source` later gives it a new inode and leaves this one)."""
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    tmp.unlink(missing_ok=True)
    try:
        os.link(source, tmp)
    except OSError:
        import shutil
        shutil.copyfile(source, tmp)
    os.replace(tmp, path)
    _fsync_dir(path.parent)
    return path


def load_checkpoint(path: Path) -> dict[str, Any]:
    """Loads and verifies a checkpoint; any problem is a UserError that names the file."""
    if not path.is_file():
        raise UserError(f"{path}: no such checkpoint file")
    try:
        with zipfile.ZipFile(path) as archive:
            bad = archive.testzip()  # reads every record and checks its CRC-32
    except (zipfile.BadZipFile, OSError, EOFError) as e:
        raise UserError(f"{path}: truncated or not a checkpoint ({e}); resume from another checkpoint") from None
    if bad is not None:
        raise UserError(f"{path}: corrupt checkpoint (checksum mismatch in {bad}); resume from another checkpoint")
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as e:
        first = str(e).strip().splitlines()[0]
        raise UserError(f"{path}: refused, it needs arbitrary unpickling, which could run code ({first}); "
                        f"only checkpoints of tensors and plain values are loaded") from None
    except (RuntimeError, EOFError) as e:
        raise UserError(f"{path}: unreadable checkpoint ({e})") from None
    if not isinstance(state, dict) or state.get("format") != FORMAT:
        raise UserError(f"{path}: not a checkpoint written by this framework (no '{FORMAT}' marker)")
    return state


def rng_state() -> dict[str, Any]:
    """Every random generator a run may draw from, as tensors and plain values (weights_only-safe)."""
    kind, keys, pos, has_gauss, cached = np.random.get_state()
    return {
        "torch": torch.get_rng_state(),
        "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_initialized() else [],
        "numpy": [kind, torch.from_numpy(keys.copy()), pos, has_gauss, cached],
        "python": random.getstate(),
    }


def set_rng_state(state: dict[str, Any]) -> None:
    torch.set_rng_state(state["torch"])
    if state["cuda"] and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])
    kind, keys, pos, has_gauss, cached = state["numpy"]
    np.random.set_state((kind, keys.numpy(), pos, has_gauss, cached))
    random.setstate(state["python"])
