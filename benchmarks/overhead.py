"""Images/s of our training loop against a minimal hand-written PyTorch loop: the same model, data,
batch size, precision, optimizer and schedule, in one process, epoch for epoch.

    python benchmarks/overhead.py                                   # cnn (width 32), 4,096 images, batch 128
    python benchmarks/overhead.py --model resnet --precision bf16   # on a GPU, when there is one

Both read the same synthetic uint8 images held on the device (ours through `loader.on_device=true`, the
hand-written loop through an equivalent permute-gather-normalise), so the loops are all that differ.
Both are built once; after one unrecorded warm-up epoch each, they alternate single epochs (which goes
first alternates too), so each pair runs seconds apart on a machine whose speed drifts. Ours is
`Trainer.train_epoch()`, the framework's loop, timed by fit()'s "train" phase (every step, the data
wait, its on-device metrics, the non-finite check, progress); the hand-written loop is timed from its
first step to a device synchronisation after its last. Prints each round's ratio, the median, and a
JSON line.

On a shared machine whose speed drifts by 10-30% from one second to the next, the ratio of two
100 ms steps cannot resolve a 3% difference in a few rounds. So the same pairing is also run with a
model that costs almost nothing (an MLP with one hidden unit on 4x4 images), where each loop's time
per step is its own cost; the difference is our loop's overhead per step, and the ratio it implies
for the real model (its hand-written step time over that plus the overhead) is reported beside the
measured one.
"""

import argparse
import json
import statistics
import tempfile
from pathlib import Path

from frameworks import DeviceBatches, HandWritten, build_ours

LR = 0.05


NEAR_ZERO_MODEL = [
    "model=mlp",
    "model.hidden=[1]",
    "dataset.image_size=4",
    "dataset.in_channels=1",
    "dataset.mean=[0.5]",
    "dataset.std=[0.25]",
]


def overrides(args: argparse.Namespace, near_zero: bool = False) -> list[str]:
    if near_zero:
        return [*overrides(argparse.Namespace(**{**vars(args), "model": "mlp"})), *NEAR_ZERO_MODEL]
    return [
        f"model={args.model}",
        *([f"model.width={args.width}"] if args.model in ("cnn", "resnet") else []),
        "dataset=synthetic",
        f"dataset.train_size={args.images}",
        "dataset.test_size=256",
        "dataset.val_split=0",
        "dataset.augment=[]",
        f"loader.batch_size={args.batch_size}",
        "loader.on_device=true",
        f"trainer.max_epochs={args.rounds + 1}",
        f"trainer.precision={args.precision}",
        f"trainer.device={args.device}",
        "trainer.progress_bar=false",
        f"optimizer.lr={LR}",
        "scheduler=cosine",
        "scheduler.warmup_epochs=0",
        "export.formats=[]",
        f"seed={args.seed}",
    ]


def build_both(args: argparse.Namespace, run_dir: Path, near_zero: bool = False):
    """Our Trainer and the hand-written loop, with the same network and initial weights."""
    from frameworks import same_model

    trainer, bundle, cfg = build_ours(overrides(args, near_zero), run_dir)
    batches = DeviceBatches(
        bundle.train.all_images(),
        bundle.train.labels[bundle.train.indices],
        args.batch_size,
        bundle.mean,
        bundle.std,
        trainer.s.device,
        seed=args.seed,
    )
    hand = HandWritten(same_model(cfg), batches, args.precision, LR, args.rounds + 1, trainer.s.device)
    return trainer, hand, cfg


def ours_epoch(trainer) -> dict:
    with trainer.timer.phase("train"):  # as Trainer.fit times it
        result = trainer.train_epoch()
    return {"images": result["samples"], "seconds": trainer.timer.last["train"]}


def paired_rounds(trainer, hand, cfg, rounds: int, show: bool) -> list[dict]:
    """After a warm-up epoch each, `rounds` pairs of epochs, alternating which loop goes first."""
    ours_epoch(trainer), hand.epoch()  # warm-up: thread pools, allocator, first-touch pages
    results = []
    for k in range(1, rounds + 1):
        if k % 2:
            ours, theirs = ours_epoch(trainer), hand.epoch()
        else:
            theirs, ours = hand.epoch(), ours_epoch(trainer)
        ratio = (ours["images"] / ours["seconds"]) / (theirs["images"] / theirs["seconds"])
        results.append({"ours": ours, "hand_written": theirs, "ratio": ratio})
        if show:
            print(
                f"round {k}: ours {ours['images'] / ours['seconds']:,.0f} img/s, hand-written "
                f"{theirs['images'] / theirs['seconds']:,.0f} img/s, ratio {ratio:.3f}",
                flush=True,
            )
    return results


def step_seconds(results: list[dict], side: str, batch_size: int) -> float:
    return statistics.median(r[side]["seconds"] / (r[side]["images"] / batch_size) for r in results)


def loop_arguments(description: str) -> argparse.ArgumentParser:
    """The settings both loop benchmarks take: the same model, data, batch and precision on each side."""
    parser = argparse.ArgumentParser(description=description)
    parser.add_argument("--model", default="cnn")
    parser.add_argument("--width", type=int, default=32)
    parser.add_argument("--images", type=int, default=4096)
    parser.add_argument("--batch-size", type=int, default=128)
    parser.add_argument("--rounds", type=int, default=10)
    parser.add_argument("--precision", default="32", choices=["32", "bf16", "16"])
    parser.add_argument("--device", default="auto")
    parser.add_argument("--seed", type=int, default=0)
    return parser


def main(argv: list[str] | None = None) -> dict:
    args = loop_arguments(__doc__.splitlines()[0]).parse_args(argv)
    with tempfile.TemporaryDirectory() as tmp:
        rounds = paired_rounds(*build_both(args, Path(tmp) / "model"), args.rounds, show=True)
        near_zero = paired_rounds(
            *build_both(args, Path(tmp) / "near-zero", near_zero=True), args.rounds, show=False
        )
    ratio = statistics.median(r["ratio"] for r in rounds)
    hand_step = step_seconds(rounds, "hand_written", args.batch_size)
    overhead = step_seconds(near_zero, "ours", args.batch_size) - step_seconds(
        near_zero, "hand_written", args.batch_size
    )
    implied = hand_step / (hand_step + max(overhead, 0.0))
    device = (
        "cuda"
        if args.device == "cuda" or (args.device == "auto" and __import__("torch").cuda.is_available())
        else "cpu"
    )
    print(
        f"overhead: our loop runs at {ratio:.3f}x the hand-written loop's images/s (median of {args.rounds}; "
        f"{args.model}, batch {args.batch_size}, precision {args.precision}, {device}); its own cost is "
        f"{overhead * 1e6:,.0f} us a step, which for this model's {hand_step * 1e3:,.1f} ms step is "
        f"{implied:.3f}x"
    )
    summary = {
        "benchmark": "overhead",
        "device": device,
        "model": args.model,
        "batch_size": args.batch_size,
        "precision": args.precision,
        "images": args.images,
        "ratio": ratio,
        "loop_overhead_s": overhead,
        "hand_written_step_s": hand_step,
        "implied_ratio": implied,
        "rounds": rounds,
        "near_zero_rounds": near_zero,
    }
    print(json.dumps(summary))
    return summary


if __name__ == "__main__":
    main()
