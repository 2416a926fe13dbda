"""Fine-tuning a pretrained transformers model with ours (model=hf) and with Hugging Face's own `Trainer`:
the same model folder, the same tokens, batch, AdamW (torch's fused kernel on both sides), cosine
schedule, gradient clipping and precision. Needs the `hf` and `bench` extras.

    python benchmarks/vs_hf_trainer.py                        # a 4-layer GPT-2 made here, a generated corpus
    python benchmarks/vs_hf_trainer.py --model gpt2 --corpus input.txt --block-size 256
    python benchmarks/vs_hf_trainer.py --task classification  # a BERT-class classifier, labelled sentences
    python benchmarks/vs_hf_trainer.py --lora                 # LoRA adapters on both sides (peft)

Each side trains in a fresh process (its memory its own), the two alternating for --rounds rounds, which
goes first alternating too. Ours is `Trainer.train_epoch()` per epoch, timed by fit()'s "train" phase
(every step, the data wait, the on-device metrics, the non-finite check); the HF Trainer's is its
`train()`'s own train_runtime, with evaluation, saving and logging off. Each side then evaluates its
model on the same validation windows (sentences) with its own evaluation. Prints each round, the
median tokens/s (sentences/s) ratio, both validation losses, both peak memories (proportional set
size of the process, sampled every 100 ms), and a JSON line.

The language-model sides differ by one position a window: ours learns all block_size next tokens of a
window of block_size + 1; the HF model, given the window's first block_size tokens as input_ids and
labels, shifts them itself and learns block_size - 1.
"""

import argparse
import json
import random
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

import torch
from measure import PeakMemory

WORDS = "the king and queen of a far land would ride to the sea where old ships lay in the sun".split()
LR, CLIP = 5e-4, 1.0


def generated_corpus(path: Path, size: int) -> Path:
    rng, lines, length = random.Random(0), [], 0
    while length < size:
        lines.append(" ".join(rng.choice(WORDS) for _ in range(rng.randint(4, 12))).capitalize() + ".")
        length += len(lines[-1]) + 1
    path.write_text("\n".join(lines))
    return path


def generated_sentences(folder: Path, n: int) -> Path:
    """Labelled sentences: each holds "sea" or "land" once among other words, and is labelled so."""
    rng, others = random.Random(0), [w for w in WORDS if w not in ("sea", "land")]
    folder.mkdir(parents=True, exist_ok=True)
    for split, count in (("train", n), ("val", max(n // 8, 16))):
        with (folder / f"{split}.jsonl").open("w") as f:
            for _ in range(count):
                label, words = rng.choice(["sea", "land"]), rng.choices(others, k=rng.randint(8, 30))
                words.insert(rng.randrange(len(words)), label)
                f.write(json.dumps({"text": " ".join(words), "label": label}) + "\n")
    return folder


def prepare(args: argparse.Namespace, tmp: Path) -> None:
    """The model folder and the data, made once for every round (unless given)."""
    if args.task == "language_model":
        args.corpus = args.corpus or str(generated_corpus(tmp / "corpus.txt", args.corpus_bytes))
        if not args.model:
            from hf_models import tiny_gpt2

            texts = Path(args.corpus).read_text().splitlines()[:2000]
            sizes = {"n_layer": args.layers, "n_head": 4, "n_embd": args.width, "tokenizer_size": 2048}
            args.model = str(tiny_gpt2(tmp / "gpt2", texts, n_positions=max(args.block_size, 128), **sizes))
    else:
        args.sentences = args.sentences or str(generated_sentences(tmp / "sentences", args.samples))
        if not args.model:
            from hf_models import tiny_bert

            texts = [json.loads(line)["text"] for line in (Path(args.sentences) / "train.jsonl").open()]
            sizes = {"hidden_size": args.width, "num_hidden_layers": args.layers, "num_attention_heads": 4}
            args.model = str(
                tiny_bert(tmp / "bert", texts, vocab_size=1024, max_position_embeddings=128, **sizes)
            )


def our_overrides(args: argparse.Namespace, tmp: Path) -> list[str]:
    data = (
        [
            "dataset=text",
            f"dataset.root={args.corpus}",
            f"dataset.block_size={args.block_size}",
            f"dataset.cache={tmp / 'tokens'}",
            "task=language_model",
        ]
        if args.task == "language_model"
        else [
            "dataset=text_classification",
            f"dataset.root={args.sentences}",
            f"dataset.max_length={args.max_length}",
        ]
    )
    return [
        "model=hf",
        f"model.pretrained={args.model}",
        *([] if args.lora else ["model.lora=null"]),
        *data,
        f"loader.batch_size={args.batch_size}",
        "loader.num_workers=0",
        "optimizer=adamw",
        f"optimizer.lr={LR}",
        "optimizer.weight_decay=0",
        "optimizer.fused=true",
        "scheduler=cosine",
        "scheduler.warmup_epochs=0",
        f"trainer.gradient_clip_val={CLIP}",
        f"trainer.max_epochs={args.epochs}",
        f"trainer.precision={args.precision}",
        "trainer.progress_bar=false",
        "export.formats=[]",
        "logger=[csv]",
        "seed=0",
    ]


def run_ours(args: argparse.Namespace, tmp: Path) -> dict:
    from frameworks import build_ours

    trainer, _, _ = build_ours(our_overrides(args, tmp), Path(tempfile.mkdtemp(dir=tmp)) / "ours")
    seconds, units = 0.0, 0
    for _ in range(args.epochs):
        with trainer.timer.phase("train"):  # as Trainer.fit times it
            result = trainer.train_epoch()
        seconds, units = seconds + trainer.timer.last["train"], units + result["units"]
    val = trainer.evaluate(trainer.s.loaders.val, None, "val")
    return {"seconds": seconds, "units": units, "val_loss": val["val/loss"], "steps": trainer.progress.step}


class WindowsAsDicts(torch.utils.data.Dataset):
    """Our dataset's samples as the HF Trainer takes them: the same tokens."""

    def __init__(self, samples, pad_id: int | None) -> None:
        self.samples, self.pad_id = samples, pad_id

    def __len__(self) -> int:
        return len(self.samples)

    def __getitem__(self, i: int) -> dict:
        inputs, target = self.samples[i]
        if self.pad_id is None:  # a language model's window: it shifts the labels itself
            return {"input_ids": inputs, "labels": inputs}
        return {"input_ids": inputs, "attention_mask": (inputs != self.pad_id).long(), "labels": target}


def run_hf(args: argparse.Namespace, tmp: Path) -> dict:
    import transformers

    from trainer.core.registry import DATASETS

    transformers.utils.logging.set_verbosity_error()
    if args.task == "language_model":  # our tokens (the model's tokenizer), read by our dataset code
        bundle = DATASETS.build(
            "text", root=args.corpus, block_size=args.block_size, cache=str(tmp / "tokens"),
            tokenizer=f"hf:{args.model}", vocab_size=None,
        )  # fmt: skip
        model = transformers.AutoModelForCausalLM.from_pretrained(args.model)
    else:
        bundle = DATASETS.build(
            "text_classification", root=args.sentences, max_length=args.max_length,
            tokenizer=f"hf:{args.model}", vocab_size=None,
        )  # fmt: skip
        model = transformers.AutoModelForSequenceClassification.from_pretrained(
            args.model, num_labels=len(bundle.classes)
        )
    if args.lora:
        import peft

        model = peft.get_peft_model(model, peft.LoraConfig(r=8, lora_alpha=16, lora_dropout=0.05))
    pad = bundle.text.pad_id
    settings = transformers.TrainingArguments(
        output_dir=str(tmp / "hf"), per_device_train_batch_size=args.batch_size,
        per_device_eval_batch_size=args.batch_size, num_train_epochs=args.epochs, learning_rate=LR,
        lr_scheduler_type="cosine", warmup_steps=0, weight_decay=0.0, optim="adamw_torch_fused",
        max_grad_norm=CLIP, bf16=args.precision == "bf16", fp16=args.precision == "16",
        eval_strategy="no", save_strategy="no", logging_strategy="no", report_to=[],
        dataloader_num_workers=0, disable_tqdm=True, seed=0, use_cpu=not torch.cuda.is_available(),
    )  # fmt: skip
    trainer = transformers.Trainer(
        model=model,
        args=settings,
        train_dataset=WindowsAsDicts(bundle.train, pad),
        eval_dataset=WindowsAsDicts(bundle.val, pad),
    )
    out = trainer.train()
    per_sample = args.block_size if args.task == "language_model" else 1
    units = out.global_step * args.batch_size * per_sample  # (the last batch of an epoch may be short)
    units = min(units, len(bundle.train) * args.epochs * per_sample)
    return {
        "seconds": out.metrics["train_runtime"],
        "units": units,
        "val_loss": trainer.evaluate()["eval_loss"],
        "steps": out.global_step,
    }


def side(args: argparse.Namespace) -> None:
    """One side's run in this process; prints its figures as a JSON line."""
    memory = PeakMemory()
    with tempfile.TemporaryDirectory() as tmp:
        found = (run_ours if args.side == "ours" else run_hf)(args, Path(args.work or tmp))
    found["peak_mb"] = memory.stop()
    print(json.dumps(found))


def arguments(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--task", default="language_model", choices=["language_model", "classification"])
    parser.add_argument("--model", help="a save_pretrained folder or hub name (default: one made here)")
    parser.add_argument("--corpus", help="language_model: a text file (default: a generated one)")
    parser.add_argument("--corpus-bytes", type=int, default=400_000)
    parser.add_argument(
        "--sentences", help="classification: a folder of train/val.jsonl (default: generated)"
    )
    parser.add_argument("--samples", type=int, default=4096, help="generated sentences")
    parser.add_argument("--layers", type=int, default=4, help="the model made here: its layers")
    parser.add_argument("--width", type=int, default=256, help="the model made here: its width")
    parser.add_argument("--block-size", type=int, default=128)
    parser.add_argument("--max-length", type=int, default=48)
    parser.add_argument("--batch-size", type=int, default=16)
    parser.add_argument("--epochs", type=int, default=1)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--precision", default="32", choices=["32", "bf16", "16"])
    parser.add_argument("--lora", action="store_true", help="LoRA adapters (r=8) on both sides")
    parser.add_argument("--side", choices=["ours", "hf"], help=argparse.SUPPRESS)
    parser.add_argument("--work", help=argparse.SUPPRESS)
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> dict:
    args = arguments(argv)
    if args.side:
        side(args)
        return {}
    with tempfile.TemporaryDirectory() as tmp:
        prepare(args, Path(tmp))
        common = [
            *("--task", args.task, "--model", args.model, "--work", tmp, "--epochs", str(args.epochs)),
            *("--block-size", str(args.block_size), "--max-length", str(args.max_length)),
            *("--batch-size", str(args.batch_size), "--precision", args.precision),
            *(["--lora"] if args.lora else []),
            *(
                ["--corpus", args.corpus]
                if args.task == "language_model"
                else ["--sentences", args.sentences]
            ),
        ]
        rounds = []
        for k in range(args.rounds):
            order = ("ours", "hf") if k % 2 == 0 else ("hf", "ours")
            found = {name: run_side(common, name) for name in order}
            rate = {name: found[name]["units"] / found[name]["seconds"] for name in found}
            rounds.append({**found, "ratio": rate["ours"] / rate["hf"]})
            print(f"round {k + 1}: ours {rate['ours']:,.0f}/s, HF Trainer {rate['hf']:,.0f}/s, "
                  f"ratio {rounds[-1]['ratio']:.3f}", flush=True)  # fmt: skip
    unit = "tokens" if args.task == "language_model" else "sentences"
    last = rounds[-1]
    summary = {
        "benchmark": "vs_hf_trainer",
        "task": args.task,
        "lora": args.lora,
        "unit": unit,
        "ratio": statistics.median(r["ratio"] for r in rounds),
        "ours_per_sec": statistics.median(r["ours"]["units"] / r["ours"]["seconds"] for r in rounds),
        "hf_per_sec": statistics.median(r["hf"]["units"] / r["hf"]["seconds"] for r in rounds),
        "val_loss": {"ours": last["ours"]["val_loss"], "hf": last["hf"]["val_loss"]},
        "peak_mb": {
            "ours": max(r["ours"]["peak_mb"] for r in rounds),
            "hf": max(r["hf"]["peak_mb"] for r in rounds),
        },
        "steps": {"ours": last["ours"]["steps"], "hf": last["hf"]["steps"]},
        "rounds": args.rounds,
    }
    loss, peak = summary["val_loss"], summary["peak_mb"]
    print(
        f"vs HF Trainer ({args.task}{', LoRA' if args.lora else ''}): ours runs at {summary['ratio']:.3f}x "
        f"its {unit}/s (median of {args.rounds}: {summary['ours_per_sec']:,.0f} vs "
        f"{summary['hf_per_sec']:,.0f}); validation loss {loss['ours']:.4f} vs {loss['hf']:.4f}; peak memory "
        f"{peak['ours']:,.0f} MB vs {peak['hf']:,.0f} MB"
    )
    print(json.dumps(summary))
    return summary


def run_side(common: list[str], name: str) -> dict:
    out = subprocess.run(
        [sys.executable, __file__, *common, "--side", name],
        capture_output=True,
        text=True,
        cwd=Path(__file__).parents[1],
    )
    if out.returncode != 0:
        raise SystemExit(f"error: the {name} side failed:\n{out.stderr[-3000:]}")
    return json.loads(out.stdout.strip().splitlines()[-1])


if __name__ == "__main__":
    main()
