"""Time to a target validation accuracy: `experiment=cifar10_fast` in our framework against the same
recipe as one hand-written script (fast_recipe_script.py), on the same images, in one run.

    python benchmarks/fast_recipe.py --data ../shared/data/cifar10-mini         # CPU: narrow fastnet, fp32
    python benchmarks/fast_recipe.py --data /data/cifar10-folder --full --target 0.94  # GPU: the whole recipe

--data is an image folder with train/<class>/* and val/<class>/* (CIFAR-10's test set as val/ for the
records' protocol). Every hyperparameter is read from the composed experiment config, so the script
trains exactly the recipe the framework runs. The clock counts training and the per-epoch evaluation
(for ours also its checkpoint), with the data already on the device and torch.compile warmed up
beforehand, as the speed records time it. On a CPU (the default) the recipe is shrunk to fit:
fastnet widths 32/64/64, batch 256, fp32 (this CPU emulates bf16) and no compile.

The script draws the same random numbers as the framework (see fast_recipe_script.py), so both learn
identically and reach the target in the same epoch: the ratio is one of speed. Each side runs once
per seed (--seeds), the side that goes first alternating, and the median times are compared.
"""

import argparse
import json
import statistics
import tempfile
from pathlib import Path

import torch
from fast_recipe_script import train as train_script
from frameworks import build_ours, compose, in_child


def overrides(args: argparse.Namespace) -> list[str]:
    """The experiment on the given images; on a CPU, shrunk (see the module's docstring)."""
    shrink = (
        []
        if args.full
        else [
            "model.widths=[32,64,64]",
            "loader.batch_size=256",
            "trainer.precision=32",
            "trainer.compile=false",
        ]
    )
    return [
        "experiment=cifar10_fast",
        "dataset=imagefolder",
        f"dataset.root={args.data}",
        *shrink,
        f"trainer.stop_at={args.target}",
        f"trainer.max_epochs={args.epochs}",
        "trainer.progress_bar=false",
        "export.formats=[]",
        f"seed={args.seed}",
    ]


def run_ours(args: argparse.Namespace, run_dir: Path) -> dict:
    trainer, _, _ = build_ours(overrides(args), run_dir)
    trainer.fit()
    seconds = sum(trainer.timer.seconds[phase] for phase in ("train", "eval", "checkpoint"))
    p = trainer.progress
    return {
        "seconds": seconds,
        "epochs": p.epoch,
        "val_acc": p.metrics["val/acc"],
        "reached": p.metrics["val/acc"] >= args.target,
    }


def run_script(args: argparse.Namespace, cfg) -> dict:
    from frameworks import same_model

    from trainer.core.devices import pick_device

    crop = next(step for step in cfg.dataset.augment if step.name == "RandomCrop")
    return train_script(
        Path(args.data),
        model=same_model(cfg, num_classes=10, in_channels=3),
        target=args.target,
        epochs=args.epochs,
        batch_size=cfg.loader.batch_size,
        lr=cfg.optimizer.lr,
        momentum=cfg.optimizer.momentum,
        weight_decay=cfg.optimizer.weight_decay,
        bias_scale=cfg.optimizer.norm_and_bias_lr_scale,
        label_smoothing=cfg.task.label_smoothing,
        warmup_epochs=cfg.scheduler.warmup_epochs,
        final_lr_ratio=cfg.scheduler.final_lr_ratio,
        ema_decay=cfg.ema.decay,
        ema_every=cfg.ema.every,
        padding=crop.padding,
        mean=list(cfg.dataset.mean),
        std=list(cfg.dataset.std),
        precision=str(cfg.trainer.precision),
        compile=cfg.trainer.compile,
        device=pick_device(cfg.trainer.device),
        seed=args.seed,
        tta=cfg.task.tta if cfg.trainer.val_tta else "none",  # as ours validates
        start_lr_ratio=cfg.scheduler.start_lr_ratio,
        padding_mode=crop.get("padding_mode", "constant"),
        ema_decay_power=cfg.ema.power,
        lookahead=cfg.ema.lookahead,
        biases_as_weights=cfg.optimizer.get("biases_as_weights", False),
    )


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data", type=Path, required=True, help="an image folder with train/ and val/")
    parser.add_argument("--target", type=float, default=0.6)
    parser.add_argument("--epochs", type=int, default=12, help="the most epochs either may take")
    parser.add_argument("--full", action="store_true", help="the recipe as configured (for a GPU)")
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    args = parser.parse_args(argv)
    runs = []
    with tempfile.TemporaryDirectory() as tmp:
        for seed in args.seeds:
            args.seed = seed
            # Each side in a process of its own (see frameworks.in_child); which goes first alternates: the
            # machine's speed drifts.
            cfg = compose(overrides(args))
            if seed % 2 == 0:
                ours = in_child(run_ours, args, Path(tmp) / f"seed-{seed}")
                script = in_child(run_script, args, cfg)
            else:
                script = in_child(run_script, args, cfg)
                ours = in_child(run_ours, args, Path(tmp) / f"seed-{seed}")
            runs.append({"seed": seed, "ours": ours, "script": script})
            for name, r in (("ours", ours), ("script", script)):
                status = f"reached {args.target:.2f}" if r["reached"] else f"did NOT reach {args.target:.2f}"
                print(
                    f"seed {seed}: {name:<7} {status} in {r['seconds']:5.1f} s ({r['epochs']} epochs, "
                    f"{r['seconds'] / r['epochs']:.2f} s each, val/acc {r['val_acc']:.4f})",
                    flush=True,
                )
    median = {side: statistics.median(r[side]["seconds"] for r in runs) for side in ("ours", "script")}
    per_epoch = {
        side: statistics.median(r[side]["seconds"] / r[side]["epochs"] for r in runs)
        for side in ("ours", "script")
    }
    ratio, epoch_ratio = median["script"] / median["ours"], per_epoch["script"] / per_epoch["ours"]
    reached = all(r[side]["reached"] for r in runs for side in ("ours", "script"))
    device = "cuda" if torch.cuda.is_available() else "cpu"
    print(
        f"fast recipe: ours runs at {ratio:.2f}x the hand-written script's speed to val/acc {args.target} "
        f"(median of {len(runs)} seeds: {median['ours']:.1f} s vs {median['script']:.1f} s), "
        f"{epoch_ratio:.2f}x "
        f"per epoch ({device}{'' if args.full else ', shrunk for a CPU'}"
        f"{'' if reached else '; some runs missed the target within --epochs'})"
    )
    summary = {
        "benchmark": "fast_recipe",
        "device": device,
        "full": args.full,
        "target": args.target,
        "ratio": ratio,
        "per_epoch_ratio": epoch_ratio,
        "median_seconds": median,
        "runs": runs,
    }
    print(json.dumps(summary))
    return summary


if __name__ == "__main__":
    main()
