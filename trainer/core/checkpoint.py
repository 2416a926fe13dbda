"""The checkpoint format: atomic, durable writes and verified, safe loads.

A checkpoint is a torch.save zip of tensors and plain Python values only, so it loads with
`weights_only=True`. The zip format stores a CRC-32 of every record, which `load_checkpoint` checks
before unpickling: torch.load alone accepts a file with flipped bytes in a tensor.
"""

import logging
import os
import pickle
import random
import time
import zipfile
from collections.abc import Callable
from concurrent.futures import Future, ThreadPoolExecutor
from pathlib import Path
from typing import Any

import numpy as np
import torch

from trainer.core.atomic import atomic_file, fsync_folder, temporary_name
from trainer.core.errors import UserError

log = logging.getLogger("trainer")
FORMAT = "trainer-checkpoint/1"


def _pause_for_tests(state: dict[str, Any]) -> None:
    """Test hook: TRAINER_TEST_PAUSE_IN_SAVE=<step>:<marker file> stops the process while it saves the
    checkpoint of that step, written but not yet renamed into place, so a test can kill it at the
    worst instant. Unset, it costs one dictionary look-up per save."""
    hook = os.environ.get("TRAINER_TEST_PAUSE_IN_SAVE")
    if hook:
        step, marker = hook.split(":", 1)
        if state.get("progress", {}).get("step") == int(step):
            Path(marker).touch()
            time.sleep(600)


def save_checkpoint(state: dict[str, Any], path: Path) -> Path:
    """Writes to a temporary file in the same folder, fsyncs, renames over `path`, fsyncs the folder:
    a crash at any instant leaves either the old complete file or the new complete file."""
    try:
        with atomic_file(path, "wb", before_rename=lambda: _pause_for_tests(state)) as f:
            torch.save({"format": FORMAT, **state}, f)
    except OSError as e:  # a full disk, a read-only or vanished folder
        raise UserError(
            f"{path}: could not write the checkpoint ({e.strerror or e}); the previous one is intact. "
            f"Free space or fix the folder, then resume"
        ) from None
    return path


def snapshot(obj: Any) -> Any:
    """A copy of a state dict's tensors on the CPU, so training can go on changing the originals while
    the copy is written."""
    if isinstance(obj, torch.Tensor):
        return obj.detach().to("cpu", copy=True)
    if isinstance(obj, dict):
        return {key: snapshot(value) for key, value in obj.items()}
    if isinstance(obj, (list, tuple)):
        return type(obj)(snapshot(value) for value in obj)
    return obj


class CheckpointWriter:
    """Writes checkpoints in a background thread: the training loop waits only for a copy of the state.

    One write is in flight at most; the next save, or `wait()`, blocks until it is durable and re-raises
    its error. The write itself is save_checkpoint's (temporary file, fsync, rename), so a crash at any
    instant still leaves the previous checkpoint whole."""

    def __init__(self, folder: Path, keep_last: int, on_saved: Callable[[int], None] | None = None) -> None:
        """`on_saved(step)` runs in the writer's thread once the `last` checkpoint of `step` is durable."""
        self.folder, self.keep_last, self.on_saved = folder, keep_last, on_saved
        self._pool = ThreadPoolExecutor(max_workers=1, thread_name_prefix="checkpoint")
        self._pending: Future | None = None

    def save(self, state: dict[str, Any], step: int, last: bool, best: bool) -> None:
        self.wait()
        self._pending = self._pool.submit(self._write, snapshot(state), step, last, best)

    def wait(self) -> None:
        pending, self._pending = self._pending, None
        if pending is not None:
            pending.result()

    def settle(self) -> None:
        """The write landed (one writer: rank 0's, so nothing to agree on with the others)."""
        self.wait()

    def _write(self, state: dict[str, Any], step: int, last: bool, best: bool) -> None:
        if last:
            path = save_checkpoint(state, self.folder / "last.pt")
            keep_history(path, step, self.keep_last)
            if best:
                copy_checkpoint(path, self.folder / "best.pt")  # the same state: a link, not a second write
            if self.on_saved is not None:
                self.on_saved(step)
        elif best:
            save_checkpoint(state, self.folder / "best.pt")


def copy_checkpoint(source: Path, path: Path) -> Path:
    """Makes `path` a durable copy of `source` without serialising again (a hard link where the
    file system allows it; replacing `source` later gives it a new inode and leaves this one)."""
    tmp = temporary_name(path)
    tmp.unlink(missing_ok=True)
    try:
        os.link(source, tmp)
    except OSError:
        import shutil

        shutil.copyfile(source, tmp)
    os.replace(tmp, path)
    fsync_folder(path.parent)
    return path


def load_checkpoint(path: Path) -> dict[str, Any]:
    """Loads and verifies a checkpoint; any problem is a UserError that names the file."""
    if not path.is_file():
        raise UserError(f"{path}: no such checkpoint file")
    try:
        with zipfile.ZipFile(path) as archive:
            bad = archive.testzip()  # reads every record and checks its CRC-32
    except (zipfile.BadZipFile, OSError, EOFError) as e:
        raise UserError(
            f"{path}: truncated or not a checkpoint ({e}); resume from another checkpoint"
        ) from None
    if bad is not None:
        raise UserError(
            f"{path}: corrupt checkpoint (checksum mismatch in {bad}); resume from another checkpoint"
        )
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as e:
        first = str(e).strip().splitlines()[0]
        raise UserError(
            f"{path}: refused, it needs arbitrary unpickling, which could run code ({first}); "
            f"only checkpoints of tensors and plain values are loaded"
        ) from None
    except (RuntimeError, EOFError) as e:
        raise UserError(f"{path}: unreadable checkpoint ({e})") from None
    if not isinstance(state, dict) or state.get("format") != FORMAT:
        raise UserError(f"{path}: not a checkpoint written by this framework (no '{FORMAT}' marker)")
    return state


def history_name(step: int) -> str:
    return f"step-{step:09d}.pt"


def keep_history(last: Path, step: int, keep: int) -> None:
    """Keeps the newest `keep` checkpoints as step-N.pt (hard links: the newest costs no space), and
    removes older ones only now that the new one is durable."""
    if keep <= 1:
        return
    copy_checkpoint(last, last.with_name(history_name(step)))
    for old in sorted(last.parent.glob("step-*.pt"))[:-keep]:
        old.unlink()


def remove_stale_temporaries(folder: Path) -> None:
    """A process killed while saving leaves its temporary file; the complete checkpoints are intact."""
    for tmp in folder.glob(".*.tmp"):
        tmp.unlink(missing_ok=True)


def newest_valid(folder: Path) -> tuple[Path, dict[str, Any]]:
    """The newest checkpoint in a run's checkpoints/ folder that passes verification: last.pt, then the
    step-N.pt history newest first, then best.pt. Each one passed over is logged with the reason."""
    candidates = [folder / "last.pt", *sorted(folder.glob("step-*.pt"), reverse=True), folder / "best.pt"]
    problems = []
    for path in (c for c in candidates if c.is_file()):
        try:
            state = load_checkpoint(path)
        except UserError as e:
            problems.append(str(e))
            continue
        for problem in problems:
            log.warning("skipped a checkpoint: %s", problem)
        if problems:
            log.warning(
                "resuming from %s (step %d), the newest valid checkpoint", path, state["progress"]["step"]
            )
        return path, state
    raise UserError(
        f"resume: no valid checkpoint in {folder} "
        f"({'; '.join(problems) or 'none saved yet'}); start the run again"
    )


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
