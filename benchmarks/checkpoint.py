"""Our checkpoint save and load against a plain torch.save / torch.load of the same state, in one run.

    python benchmarks/checkpoint.py                 # ResNet-18 with SGD momentum, 7 rounds
    python benchmarks/checkpoint.py --tiny          # a small model, for the test suite

Ours is the Trainer's path: CheckpointWriter copies the state and writes it in a background thread,
durably (temporary file, fsync, rename, fsync of the folder); a load verifies the zip's CRC-32 of
every record, then unpickles with weights_only. Plain is torch.save to the final path, which returns
once the bytes are in the page cache, and torch.load(weights_only=True). Reported for a save:
  blocking  what the training loop waits for (the copy; the write goes on in the background)
  durable   until the checkpoint is on disk (blocking + the background write)
and, to separate what durability costs on this disk from what our format costs, plain + fsync.
Prints a one-line summary and a JSON line with the medians and ratios.
"""

import argparse
import json
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch

from trainer import MODELS, OPTIMIZERS
from trainer.core.checkpoint import CheckpointWriter, load_checkpoint, rng_state


def training_state(tiny: bool) -> dict:
    """What the Trainer saves: model, optimizer with momentum buffers, progress and RNG states."""
    model = MODELS.build("cnn", num_classes=10, width=8) if tiny else MODELS.build("resnet", num_classes=10)
    optimizer = OPTIMIZERS.build("sgd", model=model, lr=0.1)
    model(torch.randn(4, 3, 32, 32)).sum().backward()
    optimizer.step()  # fills the momentum buffers, as in any checkpoint after step 1
    return {
        "model": model.state_dict(),
        "optimizer": optimizer.state_dict(),
        "progress": {"epoch": 1, "step": 1},
        "rng": rng_state(),
    }


def save_and_fsync(state: dict, path: Path) -> None:
    with open(path, "wb") as f:
        torch.save(state, f)
        f.flush()
        os.fsync(f.fileno())


def save_with(writer: CheckpointWriter, state: dict) -> None:
    writer.save(state, step=1, last=True, best=False)
    writer.wait()


def seconds(fn) -> float:
    start = time.perf_counter()
    fn()
    return time.perf_counter() - start


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--tiny", action="store_true", help="a small model and 2 rounds (for tests)")
    parser.add_argument("--rounds", type=int, default=7)
    parser.add_argument("--dir", type=Path, default=None, help="where to write (default: a temporary folder)")
    args = parser.parse_args(argv)
    rounds = 2 if args.tiny else args.rounds
    state = training_state(args.tiny)
    with tempfile.TemporaryDirectory(dir=args.dir) as folder:
        plain = Path(folder) / "plain.pt"
        # Rounds alternate between the two, so that drift on a shared machine hits both alike.
        writer = CheckpointWriter(Path(folder), keep_last=1)
        timings: dict[str, list[float]] = {
            "save_ours": [],
            "save_plain": [],
            "save_plain_fsync": [],
            "load_ours": [],
            "load_plain": [],
            "blocking_ours": [],
        }
        for _ in range(rounds):
            timings["blocking_ours"].append(
                seconds(lambda: writer.save(state, step=1, last=True, best=False))
            )
            writer.wait()
            for name, fn in (
                ("save_ours", lambda: save_with(writer, state)),
                ("save_plain", lambda: torch.save(state, plain)),
                ("save_plain_fsync", lambda: save_and_fsync(state, plain)),
                ("load_ours", lambda: load_checkpoint(Path(folder) / "last.pt")),
                ("load_plain", lambda: torch.load(plain, weights_only=True)),
            ):
                timings[name].append(seconds(fn))
        save_ours, save_plain, save_fsync, load_ours, load_plain, blocking = (
            statistics.median(timings[k]) for k in timings
        )
        ours = Path(folder) / "last.pt"
        result = {
            "benchmark": "checkpoint",
            "model": "cnn" if args.tiny else "resnet18",
            "rounds": rounds,
            "bytes_ours": ours.stat().st_size,
            "bytes_plain": plain.stat().st_size,
            "save_blocking_s_ours": blocking,
            "save_s_ours": save_ours,
            "save_s_plain": save_plain,
            "save_s_plain_fsync": save_fsync,
            "save_blocking_ratio": blocking / save_plain,
            "save_ratio": save_ours / save_plain,
            "save_ratio_vs_fsync": save_ours / save_fsync,
            "load_s_ours": load_ours,
            "load_s_plain": load_plain,
            "load_ratio": load_ours / load_plain,
        }
    print(
        f"checkpoint ({result['model']}, {result['bytes_ours'] / 2**20:.1f} MiB) vs plain torch.save "
        f"{save_plain * 1000:.0f} ms: training blocked {blocking * 1000:.0f} ms "
        f"({result['save_blocking_ratio']:.2f}x), durable after {save_ours * 1000:.0f} ms "
        f"({result['save_ratio']:.2f}x; torch.save+fsync {save_fsync * 1000:.0f} ms, "
        f"{result['save_ratio_vs_fsync']:.2f}x); verified load {load_ours * 1000:.0f} ms vs torch.load "
        f"{load_plain * 1000:.0f} ms ({result['load_ratio']:.2f}x)"
    )
    print(json.dumps(result))
    return result


if __name__ == "__main__":
    sys.exit(0 if main() else 1)
