"""Tokens/s of our language-model training against a one-file nanoGPT-style loop: the same GPT (built
from the same seed), the same batch, block size, AdamW settings and gradient clipping, on the same
token file, in one process, alternating.

    python benchmarks/gpt.py --corpus input.txt                 # tiny Shakespeare, bytes
    python benchmarks/gpt.py                                    # a generated corpus
    python benchmarks/gpt.py --n-layer 6 --n-head 6 --n-embd 384 --block-size 256 --batch-size 64  # nanoGPT's
    python benchmarks/gpt.py --memory                           # memory for a corpus and one 16x larger

Ours is `Trainer.train_epoch()` over `--steps` batches (its data loader cutting windows from the
memory-mapped tokens under each sample's seed, the task's loss, on-device metrics, the non-finite
check, the schedule), timed by fit()'s "train" phase. The one-file loop is what nanoGPT's train.py does
per step: random offsets into the memory-mapped array, a forward and backward, clipping, an AdamW step,
timed from its first step to its last. Prints each round's ratio, the median, both models' validation
loss after the same steps from the same weights (the same windows, the same code), and a JSON line.

With --memory, it trains our loop (2 loader workers) for --steps batches on a corpus and on the same
corpus 16 times over, each in a fresh process, and reports the peak proportional set size (the main
process and its workers, sampled every 50 ms): windows are read from the memory-mapped tokens, so the
larger corpus should cost no more memory.
"""

import argparse
import json
import random
import statistics
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from frameworks import build_ours
from measure import SAME_PROCESS_HELP, memory_mb, run_configuration

LR, BETAS, WEIGHT_DECAY, CLIP = 1e-3, (0.9, 0.99), 0.1, 1.0


def generated_corpus(path: Path, size: int) -> Path:
    words = "the king and queen of a far land would ride to the sea where old ships lay in the sun".split()
    rng, lines, length = random.Random(0), [], 0
    while length < size:
        lines.append(" ".join(rng.choice(words) for _ in range(rng.randint(4, 12))).capitalize() + ".")
        length += len(lines[-1]) + 1
    path.write_text("\n".join(lines))
    return path


class OneFileLoop:
    """nanoGPT's step, written out: get_batch, forward, loss, backward, clip, step."""

    def __init__(self, model: torch.nn.Module, tokens: np.ndarray, batch_size: int, block_size: int) -> None:
        self.model, self.tokens, self.batch_size, self.block_size = model, tokens, batch_size, block_size
        embeddings = {id(m.weight) for m in model.modules() if isinstance(m, torch.nn.Embedding)}
        decay = [p for p in model.parameters() if p.dim() >= 2 and id(p) not in embeddings]
        other = [p for p in model.parameters() if p.dim() < 2 or id(p) in embeddings]
        self.optimizer = torch.optim.AdamW(
            [{"params": decay, "weight_decay": WEIGHT_DECAY}, {"params": other, "weight_decay": 0.0}],
            lr=LR,
            betas=BETAS,
        )
        self.generator = torch.Generator().manual_seed(0)

    def batch(self) -> tuple[torch.Tensor, torch.Tensor]:
        starts = torch.randint(
            len(self.tokens) - self.block_size - 1, (self.batch_size,), generator=self.generator
        )
        x = torch.stack(
            [torch.from_numpy(self.tokens[i : i + self.block_size].astype(np.int64)) for i in starts]
        )
        y = torch.stack(
            [torch.from_numpy(self.tokens[i + 1 : i + 1 + self.block_size].astype(np.int64)) for i in starts]
        )
        return x, y

    def run(self, steps: int) -> dict:
        self.model.train()
        started = time.perf_counter()
        for _ in range(steps):
            x, y = self.batch()
            logits = self.model(x)
            loss = F.cross_entropy(logits.view(-1, logits.size(-1)), y.view(-1))
            loss.backward()
            torch.nn.utils.clip_grad_norm_(self.model.parameters(), CLIP)
            self.optimizer.step()
            self.optimizer.zero_grad(set_to_none=True)
        return {"tokens": steps * self.batch_size * self.block_size, "seconds": time.perf_counter() - started}


def build(args: argparse.Namespace, corpus: Path, folder: Path, workers: int = 0):
    overrides = [
        "task=language_model",
        "dataset=text",
        f"dataset.root={corpus}",
        f"dataset.cache={folder / 'tokens'}",
        f"dataset.block_size={args.block_size}",
        "model=gpt",
        f"model.n_layer={args.n_layer}",
        f"model.n_head={args.n_head}",
        f"model.n_embd={args.n_embd}",
        "model.dropout=0.0",
        "optimizer=adamw",
        f"optimizer.lr={LR}",
        f"optimizer.betas=[{BETAS[0]},{BETAS[1]}]",
        f"optimizer.weight_decay={WEIGHT_DECAY}",
        "scheduler=constant",
        f"trainer.gradient_clip_val={CLIP}",
        f"loader.batch_size={args.batch_size}",
        f"loader.num_workers={workers}",
        f"trainer.limit_train_batches={args.steps}",
        "trainer.progress_bar=false",
        "trainer.device=cpu",
        f"seed={args.seed}",
    ]
    trainer, bundle, cfg = build_ours(overrides, folder / "run")
    from frameworks import same_model

    theirs = same_model(cfg)  # the same network, from the same seed
    tokens = np.memmap(bundle.train.path, dtype=bundle.train.dtype, mode="r")[: bundle.train.stop]
    return trainer, OneFileLoop(theirs, tokens, args.batch_size, args.block_size), bundle.val


@torch.no_grad()
def val_loss(model: torch.nn.Module, windows, batch_size: int, max_batches: int = 50) -> float:
    """Mean next-token loss (nats) over the first validation windows, the same for both sides."""
    model.eval()
    nats, count = 0.0, 0
    for first in range(0, min(len(windows), batch_size * max_batches), batch_size):
        x, y = (
            torch.stack(t)
            for t in zip(*(windows[i] for i in range(first, min(first + batch_size, len(windows)))))
        )
        logits = model(x)
        nats += float(F.cross_entropy(logits.flatten(0, 1).float(), y.flatten(), reduction="sum"))
        count += y.numel()
    model.train()
    return nats / count


def ours_round(trainer, block_size: int) -> dict:
    with trainer.timer.phase("train"):  # as Trainer.fit times it
        result = trainer.train_epoch()
    return {"tokens": result["samples"] * block_size, "seconds": trainer.timer.last["train"]}


def memory_run(args: argparse.Namespace, corpus: Path) -> dict:
    """Our loop on `corpus` with loader workers: the peak PSS while it trains."""
    import threading

    with tempfile.TemporaryDirectory() as tmp:
        trainer, _, _ = build(args, corpus, Path(tmp), workers=2)
        peak, done = [memory_mb()], threading.Event()

        def sample() -> None:
            while not done.wait(0.05):
                peak.append(memory_mb())

        sampler = threading.Thread(target=sample, daemon=True)
        sampler.start()
        result = ours_round(trainer, args.block_size)
        done.set()
        sampler.join()
    return {"corpus_bytes": corpus.stat().st_size, "tokens": result["tokens"], "peak_pss_mb": max(peak)}


def memory(args: argparse.Namespace) -> dict:
    with tempfile.TemporaryDirectory() as tmp:
        base = (
            Path(args.corpus)
            if args.corpus
            else generated_corpus(Path(tmp) / "corpus.txt", args.corpus_bytes)
        )
        text = base.read_text()
        big = Path(tmp) / "corpus16.txt"
        big.write_text("\n".join([text] * 16))
        figures = [
            run_configuration(
                __file__,
                [*args.passed, "--memory-run", str(path)],
                args.same_process,
                lambda path=path: memory_run(args, path),
            )
            for path in (base, big)
        ]
    small, large = figures
    print(
        f"gpt memory: {small['peak_pss_mb']:,.0f} MB for {small['corpus_bytes']:,} bytes of text, "
        f"{large['peak_pss_mb']:,.0f} MB for {large['corpus_bytes']:,} "
        f"({large['peak_pss_mb'] / small['peak_pss_mb']:.3f}x)"
    )
    result = {
        "benchmark": "gpt_memory",
        "runs": figures,
        "ratio": large["peak_pss_mb"] / small["peak_pss_mb"],
    }
    print(json.dumps(result))
    return result


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--corpus", help="a text file (default: a generated one of --corpus-bytes)")
    parser.add_argument("--corpus-bytes", type=int, default=300_000)
    parser.add_argument("--n-layer", type=int, default=4)
    parser.add_argument("--n-head", type=int, default=4)
    parser.add_argument("--n-embd", type=int, default=128)
    parser.add_argument("--block-size", type=int, default=64)
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--steps", type=int, default=30, help="optimizer steps a round, each side")
    parser.add_argument("--rounds", type=int, default=6)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--memory", action="store_true", help="peak memory on a corpus and on one 16x larger")
    parser.add_argument("--memory-run", help=argparse.SUPPRESS)  # one measurement, in a fresh process
    parser.add_argument("--same-process", action="store_true", help=SAME_PROCESS_HELP)
    args = parser.parse_args(argv)
    args.passed = [a for a in (argv if argv is not None else __import__("sys").argv[1:]) if a != "--memory"]
    if args.memory_run:
        result = memory_run(args, Path(args.memory_run))
        print(json.dumps(result))
        return result
    if args.memory:
        return memory(args)
    with tempfile.TemporaryDirectory() as tmp:
        corpus = (
            Path(args.corpus)
            if args.corpus
            else generated_corpus(Path(tmp) / "corpus.txt", args.corpus_bytes)
        )
        trainer, loop, windows = build(args, corpus, Path(tmp))
        ours_round(trainer, args.block_size), loop.run(args.steps)  # warm-up: allocator, thread pools
        rounds = []
        for k in range(1, args.rounds + 1):
            if k % 2:
                ours, theirs = ours_round(trainer, args.block_size), loop.run(args.steps)
            else:
                theirs, ours = loop.run(args.steps), ours_round(trainer, args.block_size)
            ratio = (ours["tokens"] / ours["seconds"]) / (theirs["tokens"] / theirs["seconds"])
            rounds.append({"ours": ours, "one_file": theirs, "ratio": ratio})
            print(
                f"round {k}: ours {ours['tokens'] / ours['seconds']:,.0f} tok/s, one-file loop "
                f"{theirs['tokens'] / theirs['seconds']:,.0f} tok/s, ratio {ratio:.3f}",
                flush=True,
            )
        # Both have taken the same number of steps from the same weights: how well each learnt.
        losses = {
            "ours": val_loss(trainer.s.model, windows, args.batch_size),
            "one_file": val_loss(loop.model, windows, args.batch_size),
        }
    ratio = statistics.median(r["ratio"] for r in rounds)
    steps = (args.rounds + 1) * args.steps
    print(
        f"gpt: ours runs at {ratio:.3f}x the one-file loop's tokens/s (median of {args.rounds}; n_layer "
        f"{args.n_layer}, n_embd {args.n_embd}, block {args.block_size}, batch {args.batch_size}, cpu)"
    )
    print(
        f"gpt: validation loss after {steps} steps each: ours {losses['ours']:.4f}, one-file loop "
        f"{losses['one_file']:.4f} nats/token"
    )
    result = {
        **{k: v for k, v in vars(args).items() if k != "passed"},
        "benchmark": "gpt",
        "ratio": ratio,
        "rounds": rounds,
        "steps": steps,
        "val_loss": losses,
    }
    print(json.dumps(result))
    return result


if __name__ == "__main__":
    main()
