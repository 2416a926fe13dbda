"""Peak memory while reading one epoch of datasets of growing size: the streaming dataset (shards read
lazily through a bounded shuffle buffer) against the same images decoded into memory (what the
imagefolder dataset does), in one run.

    python benchmarks/streaming.py                       # 4,000 / 16,000 / 64,000 JPEGs of 64x64, buffer 500
    python benchmarks/streaming.py --sizes 1000 4000 --shuffle-buffer 250

The images are written as tar shards (the streaming dataset's own format) in a temporary folder.
Each (configuration, size) runs in its own process, so its peak is its own: the proportional set size
(PSS) of the process and its DataLoader workers, sampled every 100 ms. Streaming memory should stay
flat as the dataset grows; in-memory grows with it. Prints one line per run and a JSON line.
"""

import argparse
import io
import json
import tarfile
import tempfile
import time
from pathlib import Path

import numpy as np
from measure import (
    SAME_PROCESS_HELP,
    PeakMemory,
    run_configuration,
)  # benchmarks/measure.py, beside this script

CONFIGS = ["streaming", "in-memory"]


def write_shards(out: Path, count: int, image_size: int, shard_size: int = 1000) -> None:
    """`count` JPEGs (a few hundred distinct ones, repeated) as tar shards plus index.json."""
    from PIL import Image

    rng = np.random.default_rng(0)
    encoded = []
    for _ in range(min(count, 256)):
        pixels = rng.integers(0, 256, (image_size, image_size, 3), dtype=np.uint8)
        buffer = io.BytesIO()
        Image.fromarray(pixels).save(buffer, "JPEG", quality=90)
        encoded.append(buffer.getvalue())
    shards = []
    (out / "train").mkdir(parents=True)
    for number, first in enumerate(range(0, count, shard_size)):
        name = f"train/shard-{number:06d}.tar"
        with tarfile.open(out / name, "w") as tar:
            for i in range(first, min(first + shard_size, count)):
                for suffix, data in (("jpg", encoded[i % len(encoded)]), ("cls", str(i % 10).encode())):
                    info = tarfile.TarInfo(f"{i:09d}.{suffix}")
                    info.size = len(data)
                    tar.addfile(info, io.BytesIO(data))
        shards.append({"file": name, "count": min(shard_size, count - first)})
    split = {"count": count, "shards": shards}
    (out / "index.json").write_text(
        json.dumps({"classes": [str(c) for c in range(10)], "splits": {"train": split, "val": split}})
    )


def run_one(config: str, root: Path, image_size: int, buffer: int, workers: int, batch_size: int) -> dict:
    import torch

    from trainer import DATASETS
    from trainer.data import build_loaders
    from trainer.data.arrays import bundle_from_arrays

    memory = PeakMemory()
    start = time.perf_counter()
    augment = [{"name": "RandomCrop", "size": image_size, "padding": 4}, {"name": "RandomHorizontalFlip"}]
    bundle = DATASETS.build(
        "streaming",
        root=str(root),
        num_classes=10,
        image_size=image_size,
        shuffle_buffer=buffer,
        augment=augment,
    )
    if config == "in-memory":  # decode everything up front, as the imagefolder dataset does
        from trainer.data.shard_format import iter_shard

        images, labels = [], []
        for shard in bundle.train.shards:
            for _, read in iter_shard(shard, 0, shard.count, lambda i: True, bundle.classes):
                data, label = read()
                images.append(bundle.train.decode(data))
                labels.append(label)
        arrays = (torch.stack(images), torch.tensor(labels))
        bundle = bundle_from_arrays(
            arrays,
            arrays,
            bundle.classes,
            val_split=0.0,
            augment=augment,
            mean=bundle.mean,
            std=bundle.std,
            image_size=image_size,
        )
    loaders = build_loaders(
        bundle,
        batch_size=batch_size,
        num_workers=workers,
        pin_memory=False,
        prefetch_factor=2,
        persistent_workers=False,
        shuffle=True,
        drop_last=False,
        seed=0,
    )
    seen = sum(len(labels) for _, labels in loaders.train)
    seconds = time.perf_counter() - start
    return {
        "config": config,
        "images": seen,
        "seconds": seconds,
        "images_per_sec": seen / seconds,
        "peak_pss_mb": memory.stop(),
    }


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument(
        "--sizes", type=int, nargs="+", default=[4000, 16000, 64000], help="images per dataset"
    )
    parser.add_argument("--image-size", type=int, default=64)
    parser.add_argument("--shuffle-buffer", type=int, default=500)
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument("--batch-size", type=int, default=128)
    parser.add_argument("--one", choices=CONFIGS, help=argparse.SUPPRESS)  # a child process's configuration
    parser.add_argument("--root", type=Path, help=argparse.SUPPRESS)
    parser.add_argument("--same-process", action="store_true", help=SAME_PROCESS_HELP)
    args = parser.parse_args(argv)
    if args.one:
        print(
            json.dumps(
                run_one(
                    args.one, args.root, args.image_size, args.shuffle_buffer, args.workers, args.batch_size
                )
            )
        )
        return {}
    runs = []
    with tempfile.TemporaryDirectory() as tmp:
        for size in args.sizes:
            root = Path(tmp) / str(size)
            write_shards(root, size, args.image_size)
            for config in CONFIGS:
                child = [
                    "--one",
                    config,
                    "--root",
                    str(root),
                    "--image-size",
                    str(args.image_size),
                    "--shuffle-buffer",
                    str(args.shuffle_buffer),
                    "--workers",
                    str(args.workers),
                    "--batch-size",
                    str(args.batch_size),
                ]
                run = {
                    "size": size,
                    **run_configuration(
                        __file__,
                        child,
                        args.same_process,
                        lambda config=config, root=root: run_one(
                            config, root, args.image_size, args.shuffle_buffer, args.workers, args.batch_size
                        ),
                    ),
                }
                runs.append(run)
                print(
                    f"{config:<10} {size:>8,} images ({size / args.shuffle_buffer:>5.0f}x the buffer)  peak "
                    f"{run['peak_pss_mb']:>7,.0f} MB  {run['images_per_sec']:>7,.0f} img/s",
                    flush=True,
                )
    by_config = {c: [r["peak_pss_mb"] for r in runs if r["config"] == c] for c in CONFIGS}
    growth = {c: peaks[-1] / peaks[0] for c, peaks in by_config.items()}
    print(
        f"peak memory, largest / smallest dataset ({args.sizes[-1] / args.sizes[0]:.0f}x the images): "
        "streaming "
        f"{growth['streaming']:.2f}x, in-memory {growth['in-memory']:.2f}x"
    )
    summary = {
        "benchmark": "streaming",
        "image_size": args.image_size,
        "shuffle_buffer": args.shuffle_buffer,
        "workers": args.workers,
        "batch_size": args.batch_size,
        "runs": runs,
        "peak_growth": growth,
    }
    print(json.dumps(summary))
    return summary


if __name__ == "__main__":
    main()
