"""Images/s of our training loop against PyTorch Lightning's Trainer: the same model, data, batch size,
precision, optimizer and schedule, in one process, epoch for epoch. Needs the `bench` extra
(`pip install -e ".[bench]"`).

    python benchmarks/vs_lightning.py                     # cnn (width 32), 4,096 images, batch 128, CPU
    python benchmarks/vs_lightning.py --precision bf16    # on a GPU, when there is one

Lightning runs with its defaults (TensorBoard logger, a checkpoint every epoch) except the progress
bar, which is off as ours is when not on a terminal; its LightningModule logs the epoch's training
loss and accuracy, as ours does. Both read the same uint8 images held on the device (see
frameworks.py). Lightning's epochs are timed by a callback from on_train_epoch_start to
on_train_epoch_end (its checkpoint is written after that), and at each epoch's end the callback runs
one epoch of ours (`Trainer.train_epoch()`, timed by fit()'s "train" phase), so each pair runs seconds
apart. The first epoch of each is a warm-up and not recorded. As in overhead.py, a second pass with a
near-zero model measures each framework's own cost per step, which is where the difference comes
from; the hand-written loop of overhead.py is the zero point.
"""

import argparse
import json
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch
from frameworks import DeviceBatches, synchronize
from overhead import LR, build_both, loop_arguments, ours_epoch, step_seconds


def lightning_module(model: torch.nn.Module, steps: int):
    import lightning as L

    class Classifier(L.LightningModule):
        def __init__(self) -> None:
            super().__init__()
            self.model = model

        def training_step(self, batch, batch_idx):
            x, y = batch
            logits = self.model(x)
            loss = torch.nn.functional.cross_entropy(logits, y)
            self.log("train/loss", loss, on_step=False, on_epoch=True)
            self.log("train/acc", (logits.argmax(1) == y).float().mean(), on_step=False, on_epoch=True)
            return loss

        def configure_optimizers(self):
            optimizer = torch.optim.SGD(
                self.parameters(), lr=LR, momentum=0.9, nesterov=True, weight_decay=5e-4
            )
            schedule = torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, T_max=steps)
            return {"optimizer": optimizer, "lr_scheduler": {"scheduler": schedule, "interval": "step"}}

    return Classifier()


def run(args: argparse.Namespace, run_dir: Path, near_zero: bool) -> list[dict]:
    """Lightning's epochs, each followed by one of ours and one of the hand-written loop's."""
    import lightning as L
    from frameworks import same_model

    trainer, hand, cfg = build_both(args, run_dir / "ours", near_zero)
    batches: DeviceBatches = hand.batches
    results: list[dict] = []

    class Interleave(L.Callback):
        def on_train_epoch_start(self, lt, module) -> None:
            synchronize(trainer.s.device)
            self.start = time.perf_counter()

        def on_train_epoch_end(self, lt, module) -> None:
            synchronize(trainer.s.device)
            theirs = {"images": len(batches.labels), "seconds": time.perf_counter() - self.start}
            results.append({"lightning": theirs, "ours": ours_epoch(trainer), "hand_written": hand.epoch()})

    precision = {"32": "32-true", "bf16": "bf16-mixed", "16": "16-mixed"}[args.precision]
    lt = L.Trainer(
        max_epochs=args.rounds + 1,
        accelerator=trainer.s.device.type,
        devices=1,
        precision=precision,
        enable_progress_bar=False,
        enable_model_summary=False,
        default_root_dir=str(run_dir / "lightning"),
        limit_val_batches=0,
        num_sanity_val_steps=0,
        callbacks=[Interleave()],
    )
    lt.fit(lightning_module(same_model(cfg), (args.rounds + 1) * len(batches)), train_dataloaders=batches)
    return results[1:]  # the first epoch of each is a warm-up


def rate(r: dict) -> float:
    return r["images"] / r["seconds"]


def main(argv: list[str] | None = None) -> dict:
    args = loop_arguments(__doc__.splitlines()[0]).parse_args(argv)
    try:
        import lightning  # noqa: F401
    except ImportError:
        sys.exit('error: vs_lightning needs PyTorch Lightning: pip install -e ".[bench]"')
    with tempfile.TemporaryDirectory() as tmp:
        rounds = run(args, Path(tmp) / "model", near_zero=False)
        near_zero = run(args, Path(tmp) / "near-zero", near_zero=True)
    for k, r in enumerate(rounds, start=1):
        r["ratio"] = rate(r["ours"]) / rate(r["lightning"])
        print(
            f"round {k}: ours {rate(r['ours']):,.0f} img/s, Lightning {rate(r['lightning']):,.0f} img/s, "
            f"ratio {r['ratio']:.3f}"
        )
    ratio = statistics.median(r["ratio"] for r in rounds)
    cost = {
        side: 1e6 * step_seconds(near_zero, side, args.batch_size)  # µs a step
        for side in ("ours", "lightning", "hand_written")
    }
    own = {side: cost[side] - cost["hand_written"] for side in ("ours", "lightning")}
    device = "cuda" if torch.cuda.is_available() and args.device in ("auto", "cuda") else "cpu"
    print(
        f"vs Lightning: ours runs at {ratio:.3f}x Lightning's images/s (median of {args.rounds}; "
        f"{args.model}, "
        f"batch {args.batch_size}, precision {args.precision}, {device}). Each framework's own cost per "
        "step, "
        f"beyond a hand-written loop: ours {own['ours']:,.0f} us, Lightning {own['lightning']:,.0f} us"
    )
    summary = {
        "benchmark": "vs_lightning",
        "device": device,
        "model": args.model,
        "batch_size": args.batch_size,
        "precision": args.precision,
        "ratio": ratio,
        "step_overhead_us": own,
        "rounds": rounds,
        "near_zero_rounds": near_zero,
        "lightning_version": lightning.__version__,
    }
    print(json.dumps(summary))
    return summary


if __name__ == "__main__":
    main()
