"""`experiment=cifar10_fast` against the speed record's recipe (record_recipe.py, airbench94 ported to a
CPU), on the same images, at the same number of epochs: training time per epoch and final accuracy.

    python benchmarks/vs_record.py --data ../shared/data/cifar10-mini --epochs 10 --seeds 0 1 2

Both sides train eagerly in bf16 autocast with channels_last (on a CPU the experiment does not compile;
--compile makes it), at batch 1,024 and the record's widths. Each side trains in a process of its own,
forked (so a process-wide setting such as trainer.keep_cpu_memory stays ours, and neither side finds the
other's warm caches); seeds alternate which side goes first. Ours validates
every epoch as configured; the time per epoch compares training alone (ours: its timer's train phase,
the record: its steps), and the evaluation time is reported apart (ours: every epoch's and the final
one). Accuracy is each side's validation accuracy after the last epoch, each with its own test-time
augmentation (ours: task.tta, whatever trainer.val_tta says for the per-epoch validation).
"""

import argparse
import json
import statistics
import tempfile
from pathlib import Path

from frameworks import build_ours, in_child
from record_recipe import train as train_record


def run_ours(args: argparse.Namespace, seed: int, run_dir: Path) -> dict:
    overrides = [
        "experiment=cifar10_fast",
        "dataset=imagefolder",
        f"dataset.root={args.data}",
        f"trainer.max_epochs={args.epochs}",
        *(["trainer.compile=true"] if args.compile else []),
        "trainer.progress_bar=false",
        "export.formats=[]",
        f"seed={seed}",
        *args.ours,
    ]
    trainer, _, _ = build_ours(overrides, run_dir)
    trainer.fit()
    final = trainer.evaluate(
        trainer.s.loaders.val, None, "final"
    )  # under task.tta, as the record's last evaluation
    p, seconds = trainer.progress, trainer.timer.seconds
    return {
        "val_acc": final["final/acc"],
        "epochs": p.epoch,
        "train_seconds": seconds["train"],
        "eval_seconds": seconds["eval"],
    }


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data", type=Path, required=True, help="an image folder with train/ and val/")
    parser.add_argument("--epochs", type=int, default=10)
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument(
        "--compile", action="store_true", help="torch.compile ours (the record's port is eager)"
    )
    parser.add_argument(
        "--ours", nargs="*", default=[], help="more overrides for ours, e.g. task.tta=flip_translate"
    )
    args = parser.parse_args(argv)
    runs = []
    with tempfile.TemporaryDirectory() as tmp:
        for seed in args.seeds:
            sides = [
                ("ours", lambda seed=seed: in_child(run_ours, args, seed, Path(tmp) / f"seed-{seed}")),
                ("record", lambda seed=seed: in_child(train_record, args.data, float(args.epochs), seed)),
            ]
            results = {}
            for name, side in sides if seed % 2 == 0 else sides[::-1]:  # which goes first alternates
                results[name] = side()  # each in a process of its own
            runs.append({"seed": seed, **results})
            for name in ("ours", "record"):
                r = results[name]
                print(
                    f"seed {seed}: {name:<6} val/acc {r['val_acc']:.4f} after {args.epochs} epochs, "
                    f"{r['train_seconds'] / args.epochs:.2f} s per epoch training, {r['eval_seconds']:.1f} s "
                    f"evaluating",
                    flush=True,
                )
    per_epoch = {
        side: statistics.median(r[side]["train_seconds"] / args.epochs for r in runs)
        for side in ("ours", "record")
    }
    accuracy = {side: statistics.mean(r[side]["val_acc"] for r in runs) for side in ("ours", "record")}
    ratio = per_epoch["record"] / per_epoch["ours"]
    print(
        f"vs the record's recipe: ours trains at {ratio:.2f}x its speed per epoch ({per_epoch['ours']:.2f} "
        "s vs "
        f"{per_epoch['record']:.2f} s, median of {len(runs)} seeds); val/acc after {args.epochs} epochs "
        f"{accuracy['ours']:.4f} vs {accuracy['record']:.4f} (mean), "
        f"{100 * (accuracy['ours'] - accuracy['record']):+.2f} points"
    )
    summary = {
        "benchmark": "vs_record",
        "epochs": args.epochs,
        "per_epoch_ratio": ratio,
        "seconds_per_epoch": per_epoch,
        "mean_val_acc": accuracy,
        "runs": runs,
    }
    print(json.dumps(summary))
    return summary


if __name__ == "__main__":
    main()
