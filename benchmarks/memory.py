"""Peak memory of the memory-mapped `numpy` dataset as DataLoader workers are added, against the same
arrays loaded whole into memory, in one run.

    python benchmarks/memory.py                  # 400 MB of images; 0, 2 and 4 workers
    python benchmarks/memory.py --mb 20 --workers 0 2   # small, for the test suite

Each configuration runs in its own process and reads every image once (batch 256, no augmentation);
memory is sampled every 100 ms: the PSS of the process and its workers (shared pages counted once),
and the main process's anonymous memory (its heap). Memory-mapped pages that were read count in PSS
too, but they are the page cache's: shared by every worker, never copied, dropped by the kernel under
pressure. Loaded whole, the arrays sit in the main process's heap.
"""

import argparse
import json
import tempfile
from pathlib import Path

import numpy as np
import torch
from measure import (
    SAME_PROCESS_HELP,
    PeakMemory,
    run_configuration,
)  # benchmarks/measure.py, beside this script


def write_arrays(folder: Path, megabytes: int) -> int:
    n = megabytes * 2**20 // (32 * 32 * 3)
    images = np.lib.format.open_memmap(
        folder / "train_images.npy", mode="w+", dtype=np.uint8, shape=(n, 32, 32, 3)
    )
    for start in range(0, n, 65536):  # written in pieces: this process stays small too
        images[start : start + 65536] = np.random.default_rng(start).integers(
            0, 256, images[start : start + 65536].shape, dtype=np.uint8
        )
    images.flush()
    np.save(folder / "train_labels.npy", np.arange(n) % 10)
    np.save(folder / "test_images.npy", np.zeros((8, 32, 32, 3), np.uint8))
    np.save(folder / "test_labels.npy", np.zeros(8, np.int64))
    return n


def run_one(folder: Path, workers: int, mmap: bool) -> dict:
    from trainer import DATASETS
    from trainer.data import build_loaders

    memory = PeakMemory()
    bundle = DATASETS.build("numpy", root=str(folder), num_classes=10, image_size=32)
    if not mmap:  # the alternative: the whole array read into this process
        bundle.train.images = torch.from_numpy(np.load(folder / "train_images.npy")).permute(0, 3, 1, 2)
    loaders = build_loaders(
        bundle,
        batch_size=256,
        num_workers=workers,
        pin_memory=False,
        prefetch_factor=2,
        persistent_workers=False,
        shuffle=True,
        drop_last=False,
        seed=0,
    )
    images = sum(len(y) for _, y in loaders.train)
    return {
        "mmap": mmap,
        "workers": workers,
        "images": images,
        "peak_pss_mb": memory.stop(),
        "peak_anonymous_mb": memory.peak_anonymous,
    }


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--mb", type=int, default=400, help="size of the image array")
    parser.add_argument("--workers", type=int, nargs="+", default=[0, 2, 4])
    parser.add_argument("--one", nargs=3, help=argparse.SUPPRESS)  # folder, workers, mmap: a child's run
    parser.add_argument("--same-process", action="store_true", help=SAME_PROCESS_HELP)
    args = parser.parse_args(argv)
    if args.one:
        print(json.dumps(run_one(Path(args.one[0]), int(args.one[1]), args.one[2] == "1")))
        return {}
    with tempfile.TemporaryDirectory() as tmp:
        n = write_arrays(Path(tmp), args.mb)
        runs = []
        for mmap in (True, False):
            for workers in args.workers:
                runs.append(
                    run_configuration(
                        __file__,
                        ["--one", tmp, str(workers), "1" if mmap else "0"],
                        args.same_process,
                        lambda workers=workers, mmap=mmap: run_one(Path(tmp), workers, mmap),
                    )
                )
                r = runs[-1]
                print(
                    f"{'memory-mapped' if mmap else 'loaded whole':<14} {workers} workers: peak PSS "
                    f"{r['peak_pss_mb']:,.0f} MB (workers included); main process heap "
                    f"{r['peak_anonymous_mb']:,.0f} "
                    f"MB ({args.mb} MB of images)"
                )
    result = {"benchmark": "memory", "array_mb": args.mb, "images": n, "runs": runs}
    print(json.dumps(result))
    return result


if __name__ == "__main__":
    main()
