"""The sharded checkpoint format (trainer.strategy=fsdp): one folder per checkpoint,
`checkpoints/step-<step>-<epoch>.dcp/`, that every process writes its part of.

    state.pt           rank 0: what is not sharded (progress, schedule, config, task, loggers), the
                       single-file format's checks (CRC-32 per record, weights_only)
    rng-<rank>.pt      each process's random generators
    __<rank>_0.distcp  each process's shards of the model, optimizer and average
                       (torch.distributed.checkpoint, saved in the background)
    .metadata          torch.distributed.checkpoint's index, written by rank 0 once every shard is
    checksums-<rank>.json  CRC-32 and size of each of the process's shard files, written once they are

A folder is complete when all of these are there and every shard matches its checksum; resuming takes
the newest complete one and says which it passed over and why, as the single-file format does.
"""

import json
import logging
import shutil
import zlib
from collections.abc import Callable
from pathlib import Path
from typing import Any

from trainer.core import distributed
from trainer.core.atomic import write_text
from trainer.core.checkpoint import CheckpointWriter, load_checkpoint, save_checkpoint, snapshot
from trainer.core.errors import UserError

log = logging.getLogger("trainer")
SUFFIX = ".dcp"


def folder_name(step: int, epoch: int) -> str:
    """By step, then epoch: the end of an epoch can fall on the step a mid-epoch checkpoint saved."""
    return f"step-{step:09d}-{epoch:05d}{SUFFIX}"


def folders(checkpoints: Path) -> list[Path]:
    """Every sharded checkpoint folder, newest first."""
    return sorted((p for p in checkpoints.glob(f"step-*{SUFFIX}") if p.is_dir()), reverse=True)


def _crc(path: Path) -> int:
    crc = 0
    with open(path, "rb") as f:
        while chunk := f.read(2**22):
            crc = zlib.crc32(chunk, crc)
    return crc


def write_checksums(folder: Path, rank: int) -> None:
    sums = {p.name: [p.stat().st_size, _crc(p)] for p in sorted(folder.glob(f"__{rank}_*.distcp"))}
    write_text(folder / f"checksums-{rank}.json", json.dumps(sums))


def load_folder(folder: Path, verify: bool = True) -> dict[str, Any]:
    """The non-sharded state of a complete folder, with `sharded` naming the folder; `verify`: every
    shard read and checked against its checksum too. Any problem is a UserError that names the folder."""
    state = load_checkpoint(folder / "state.pt")
    if not (folder / ".metadata").is_file():
        raise UserError(f"{folder}: incomplete (no .metadata: the processes never finished writing it)")
    for rank in range(state["world_size"]):
        sums = folder / f"checksums-{rank}.json"
        if not sums.is_file():
            raise UserError(f"{folder}: incomplete (process {rank} never finished writing its shards)")
        for name, (size, crc) in json.loads(sums.read_text()).items():
            shard = folder / name
            if not shard.is_file() or shard.stat().st_size != size or (verify and _crc(shard) != crc):
                raise UserError(f"{folder}: corrupt shard {name} (size or checksum mismatch)")
    return {**state, "sharded": str(folder)}


def rng_of(folder: Path, rank: int) -> dict[str, Any] | None:
    path = folder / f"rng-{rank}.pt"
    return load_checkpoint(path)["rng"] if path.is_file() else None


def is_complete(folder: Path) -> bool:
    """Every file there and of its size (the shards are not read again)."""
    try:
        load_folder(folder, verify=False)
    except UserError:
        return False
    return True


class ShardedCheckpointWriter(CheckpointWriter):
    """Writes sharded checkpoints: every process its own files, the shards in the background.

    `save` is called by every process at the same points. It returns once the state is staged (copied);
    the shards are written by torch.distributed.checkpoint's background save, and each process then
    writes its checksums from a thread of ours. `settle()`, again on every process (at the next save,
    and at the end of training), waits for the write, agrees that every process has finished, then lets
    rank 0 remove older folders (keeping checkpoint.keep_last complete ones) and tell the trackers."""

    def __init__(
        self, folder: Path, keep_last: int, on_saved: Callable[[int], None] | None, group: Any
    ) -> None:
        super().__init__(folder, keep_last, on_saved)  # its thread, and wait(): this process's write landed
        self.group = group
        self._unsettled: int | None = None  # the step of the last folder not yet agreed complete

    def save(self, state: dict[str, Any], step: int, last: bool, best: bool) -> Path:
        """`state`: the sharded parts ("model", "optimizer", "ema"), this process's "rng", and the rest;
        with `best`, "full_model" and "full_ema" gathered on rank 0 for best.pt."""
        import torch.distributed.checkpoint as dcp

        self.settle()
        sharded = {key: state.pop(key) for key in ("model", "optimizer", "ema") if key in state}
        rng, full_model, full_ema = (
            state.pop("rng"),
            state.pop("full_model", None),
            state.pop("full_ema", None),
        )
        rank = distributed.rank()
        path = self.folder / folder_name(step, state["progress"]["epoch"])
        kept = path.exists() and is_complete(path)  # the same step and epoch, complete: the same state
        if last and not kept:
            if distributed.is_main() and path.exists():
                shutil.rmtree(path)  # a folder a killed run left unfinished
            distributed.barrier()
            path.mkdir(parents=True, exist_ok=True)
            small = {**snapshot(state), "world_size": distributed.world_size()}
            save_checkpoint({"rng": rng}, path / f"rng-{rank}.pt")
            if distributed.is_main():
                save_checkpoint(small, path / "state.pt")  # TRAINER_TEST_PAUSE_IN_SAVE stops it here
            future = dcp.async_save(sharded, checkpoint_id=str(path), process_group=self.group)
            self._pending = self._pool.submit(self._finish, future, path, rank)
            self._unsettled = step
        if best and distributed.is_main():
            best_state = {**snapshot(state), "model": full_model, "ema": full_ema, "optimizer": None}
            best_state["rng"] = rng
            save_checkpoint(best_state, self.folder / "best.pt")
        return path

    @staticmethod
    def _finish(future: Any, path: Path, rank: int) -> None:
        future.result()
        write_checksums(path, rank)

    def settle(self) -> None:
        """Every process's write landed: rank 0 prunes and reports. Only where every process calls it."""
        self.wait()
        if self._unsettled is None:
            return
        distributed.barrier()
        step, self._unsettled = self._unsettled, None
        if not distributed.is_main():
            return
        complete = [f for f in folders(self.folder) if is_complete(f)]
        newest = complete[0] if complete else None
        for old in folders(self.folder):
            if (
                newest is not None
                and old < newest
                and (old not in complete or complete.index(old) >= self.keep_last)
            ):
                shutil.rmtree(old, ignore_errors=True)
        if self.on_saved is not None:
            self.on_saved(step)


def newest_valid_folder(checkpoints: Path) -> tuple[Path, dict[str, Any]]:
    """The newest complete sharded checkpoint, each one passed over logged with the reason."""
    problems = []
    for folder in folders(checkpoints):
        try:
            state = load_folder(folder)
        except UserError as e:
            problems.append(str(e))
            continue
        if problems:
            log.warning(
                "skipped %s; resuming from %s (step %d), the newest valid checkpoint",
                "; ".join(problems), folder, state["progress"]["step"],
            )  # fmt: skip
        return folder, state
    raise UserError(
        f"resume: no valid checkpoint in {checkpoints} ({'; '.join(problems) or 'none saved yet'}); "
        f"start the run again"
    )


def has_sharded(checkpoints: Path) -> bool:
    return bool(folders(checkpoints))
