"""Images per second delivered to the training loop, and peak memory, by four ways of loading the
same images, in one run:

  standard     torchvision's CIFAR-10 recipe: CIFAR10 + Compose([RandomCrop(32, 4), RandomHorizontalFlip(),
               ToTensor(), Normalize]) + DataLoader, 2 workers (as in PyTorch's CIFAR-10 tutorial)
  ours-0w      our default loader (uint8 tensors, transforms.v2 per sample, seeded sampler), no workers
  ours-2w      the same with 2 workers
  on-device    loader.on_device=true: the dataset on the device, augmentation batched (here: the CPU)

    python benchmarks/loader.py --data ../shared/data/cifar10-mini

--data is an image folder (train/<class>/*); its training images are also written in CIFAR-10's
on-disk format for the standard recipe, so every configuration reads the same pixels. Each
configuration runs in its own process, so that its peak memory is its own: the proportional set
size (PSS) of the process and its workers, sampled every 100 ms, which counts pages the workers share
with the parent once rather than once per process. Prints one line per configuration, the ratios to
`standard`, and a JSON line.
"""

import argparse
import json
import pickle
import tempfile
import time
from pathlib import Path

import torch
from measure import (
    SAME_PROCESS_HELP,
    PeakMemory,
    run_configuration,
)  # benchmarks/measure.py, beside this script

CONFIGS = ["standard", "ours-0w", "ours-2w", "on-device"]
MEAN, STD = [0.4914, 0.4822, 0.4465], [0.2470, 0.2435, 0.2616]


def load_folder(data: Path):
    from trainer import DATASETS

    return DATASETS.build(
        "imagefolder",
        root=str(data),
        image_size=32,
        val_split=0.0 if (data / "val").is_dir() else 0.1,
        mean=MEAN,
        std=STD,
        augment=[{"name": "RandomCrop", "size": 32, "padding": 4}, {"name": "RandomHorizontalFlip"}],
    )


def write_cifar_format(bundle, root: Path) -> None:
    """The training images as CIFAR-10's python batches (N x 3072 uint8 rows, a label list)."""
    folder = root / "cifar-10-batches-py"
    folder.mkdir(parents=True)
    images = bundle.train.images[bundle.train.indices].flatten(1).numpy()
    labels = bundle.train.labels[bundle.train.indices].tolist()
    chunks = [(images[i::5], labels[i::5]) for i in range(5)]
    for k, (data, targets) in enumerate(chunks, start=1):
        with open(folder / f"data_batch_{k}", "wb") as f:
            pickle.dump({"data": data, "labels": targets}, f)
    with open(folder / "test_batch", "wb") as f:
        pickle.dump({"data": images[:10], "labels": labels[:10]}, f)
    with open(folder / "batches.meta", "wb") as f:
        pickle.dump({"label_names": bundle.classes}, f)


def build(config: str, data: Path, cifar_root: Path, batch_size: int):
    if config == "standard":
        from torch.utils.data import DataLoader
        from torchvision import datasets
        from torchvision import transforms as T

        from trainer.data.vision import (
            without_checksums,  # the files are ours: skip the official MD5s
        )

        recipe = T.Compose(
            [T.RandomCrop(32, padding=4), T.RandomHorizontalFlip(), T.ToTensor(), T.Normalize(MEAN, STD)]
        )
        dataset = without_checksums(datasets.CIFAR10)(str(cifar_root), train=True, transform=recipe)
        return DataLoader(dataset, batch_size=batch_size, shuffle=True, num_workers=2), None
    from trainer.data import build_loaders

    bundle = load_folder(data)
    loaders = build_loaders(
        bundle,
        batch_size=batch_size,
        num_workers=2 if config == "ours-2w" else 0,
        pin_memory=False,
        prefetch_factor=2,
        persistent_workers=True,
        shuffle=True,
        drop_last=False,
        seed=0,
        on_device=torch.device("cpu") if config == "on-device" else None,
    )
    return loaders.train, loaders.sampler


def run_one(config: str, data: Path, cifar_root: Path, epochs: int, batch_size: int) -> dict:
    memory = PeakMemory()
    loader, sampler = build(config, data, cifar_root, batch_size)
    images, start = 0, time.perf_counter()
    for epoch in range(epochs):
        if sampler is not None:
            sampler.set_epoch(epoch)
        for batch, _ in loader:
            images += len(batch)
    seconds = time.perf_counter() - start
    return {
        "config": config,
        "images": images,
        "seconds": seconds,
        "images_per_sec": images / seconds,
        "peak_pss_mb": memory.stop(),
    }


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data", type=Path, required=True, help="an image folder: train/<class>/*")
    parser.add_argument("--epochs", type=int, default=2)
    parser.add_argument("--batch-size", type=int, default=128)
    parser.add_argument("--one", choices=CONFIGS, help=argparse.SUPPRESS)  # a child process's configuration
    parser.add_argument("--cifar-root", type=Path, help=argparse.SUPPRESS)
    parser.add_argument("--same-process", action="store_true", help=SAME_PROCESS_HELP)
    args = parser.parse_args(argv)
    if args.one:
        print(json.dumps(run_one(args.one, args.data, args.cifar_root, args.epochs, args.batch_size)))
        return {}
    with tempfile.TemporaryDirectory() as tmp:
        write_cifar_format(load_folder(args.data), Path(tmp))
        results = {}
        for config in CONFIGS:
            child = [
                "--data",
                str(args.data),
                "--one",
                config,
                "--cifar-root",
                tmp,
                "--epochs",
                str(args.epochs),
                "--batch-size",
                str(args.batch_size),
            ]
            results[config] = run_configuration(
                __file__,
                child,
                args.same_process,
                lambda config=config: run_one(config, args.data, Path(tmp), args.epochs, args.batch_size),
            )
    base = results["standard"]["images_per_sec"]
    for config, r in results.items():
        r["ratio_to_standard"] = r["images_per_sec"] / base
        print(
            f"{config:<10} {r['images_per_sec']:>9,.0f} img/s  {r['ratio_to_standard']:>5.2f}x standard  "
            f"peak memory {r['peak_pss_mb']:,.0f} MB (PSS, workers included)"
        )
    summary = {
        "benchmark": "loader",
        "data": str(args.data),
        "epochs": args.epochs,
        "batch_size": args.batch_size,
        "results": results,
    }
    print(json.dumps(summary))
    return summary


if __name__ == "__main__":
    main()
