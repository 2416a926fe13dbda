"""`text_classification`: texts with a label each, for task=classification.

    root/train.jsonl ({"text": ..., "label": ...} a line) or root/train.csv (text,label columns),
    root/val.* (or dataset.val_split), root/test.* (optional)

Texts are tokenized once (dataset.tokenizer: byte, a BPE tokenizer.json in dataset.tokenizer_file, or
hf:<model>, a pretrained model's own, with its special tokens), cut to dataset.max_length tokens and
padded: with the id dataset.vocab_size (one past the vocabulary), which model=text_encoder masks out, or
with a pretrained tokenizer's pad token, which model=hf masks out. Labels are the training file's,
sorted.
"""

import csv
from pathlib import Path
from typing import Annotated, Any

import torch
from torch.utils.data import TensorDataset

from trainer.core.errors import UserError
from trainer.core.fields import at_least, optional
from trainer.core.registry import DATASETS
from trainer.data.arrays import DataBundle, TextInfo, ValSplit
from trainer.data.jsonl import json_lines
from trainer.text.tokenizers import BPETokenizer, PretrainedTokenizer, Tokenizer, named_tokenizer


def split_file(root: Path, split: str) -> Path | None:
    found = [
        root / f"{split}.{suffix}" for suffix in ("jsonl", "csv") if (root / f"{split}.{suffix}").is_file()
    ]
    return found[0] if found else None


def read_examples(path: Path) -> list[tuple[str, str]]:
    """(text, label) rows; a row without either names the file and line."""
    if path.suffix == ".csv":
        with path.open(newline="", encoding="utf-8") as f:
            rows: list[Any] = list(csv.DictReader(f))
    else:
        rows = [row for _, row in json_lines(path, "dataset.root")]
    examples = []
    for number, row in enumerate(rows, start=1):
        if (
            not isinstance(row, dict)
            or not isinstance(row.get("text"), str)
            or row.get("label") in (None, "")
        ):
            raise UserError(f"dataset.root: {path} row {number} needs a text and a label")
        examples.append((row["text"], str(row["label"])))
    if not examples:
        raise UserError(f"dataset.root: {path} holds no examples")
    return examples


def label_names(root: str) -> list[str]:
    path = split_file(Path(root), "train")
    if path is None:
        raise UserError(f"dataset.root: {Path(root).resolve()} has no train.jsonl or train.csv")
    return sorted({label for _, label in read_examples(path)})


def encode(
    examples: list[tuple[str, str]],
    tokenizer: Tokenizer,
    classes: list[str],
    max_length: int,
    pad_id: int,
    path: Path,
) -> TensorDataset:
    ids = torch.full((len(examples), max_length), pad_id, dtype=torch.long)
    labels = torch.zeros(len(examples), dtype=torch.long)
    index = {name: i for i, name in enumerate(classes)}
    for row, (text, label) in enumerate(examples):
        if label not in index:
            raise UserError(
                f"dataset.root: {path} row {row + 1} has the label {label!r}, which train never uses"
            )
        tokens = tokenizer.encode(text)[:max_length] or [pad_id]
        ids[row, : len(tokens)] = torch.tensor(tokens)
        labels[row] = index[label]
    return TensorDataset(ids, labels)


@DATASETS.register("text_classification")
def text_classification(
    *,
    root: str,
    max_length: Annotated[int, at_least(1)],
    vocab_size: Annotated[int | None, optional(at_least(1), "the tokenizer's")],
    tokenizer: str,
    tokenizer_file: str | None,
    val_split: ValSplit,
) -> DataBundle:
    """The classes are the labels of the training file, sorted."""
    folder = Path(root)
    classes = label_names(root)
    spec_folder = None
    if tokenizer == "bpe" and tokenizer_file:
        tok: Tokenizer = BPETokenizer.load(Path(tokenizer_file))
        spec_folder = Path(tokenizer_file).parent
    elif tokenizer != "bpe":
        tok = named_tokenizer(tokenizer, vocab_size, special_tokens=True)
    else:
        raise UserError(
            "dataset.tokenizer: byte, bpe with dataset.tokenizer_file=<tokenizer.json>, or hf:<model>"
        )
    if vocab_size is not None and tok.vocab_size > vocab_size:
        raise UserError(
            f"dataset.vocab_size: the tokenizer has {tok.vocab_size:,} tokens, more than "
            f"dataset.vocab_size={vocab_size:,}; set dataset.vocab_size={tok.vocab_size}"
        )
    vocab_size = vocab_size or tok.vocab_size
    pad_id = tok.pad_id if isinstance(tok, PretrainedTokenizer) else vocab_size
    splits = {}
    for split in ("train", "val", "test"):
        path = split_file(folder, split)
        if path is not None:
            splits[split] = encode(read_examples(path), tok, classes, max_length, pad_id, path)
    if "val" not in splits:
        if not 0 < val_split < 1:
            raise UserError(
                f"dataset.val_split: {root} has no val file; hold out part of train, e.g. "
                f"dataset.val_split=0.1"
            )
        ids, labels = splits["train"].tensors
        order = torch.randperm(len(labels), generator=torch.Generator().manual_seed(0))
        n_val = max(1, int(round(val_split * len(labels))))
        splits["val"] = TensorDataset(ids[order[:n_val]], labels[order[:n_val]])
        splits["train"] = TensorDataset(ids[order[n_val:]], labels[order[n_val:]])
    pretrained = isinstance(tok, PretrainedTokenizer)
    spec = tok.spec() if pretrained else {
        "kind": tok.kind,
        "vocab_size": tok.vocab_size,
        **({"file": Path(tokenizer_file).name} if tokenizer_file and tok.kind == "bpe" else {}),
    }  # fmt: skip
    text = TextInfo(
        tokenizer=spec,
        tokenizer_dir=str(spec_folder or folder),
        vocab_size=vocab_size,
        max_length=max_length,
        pad_id=pad_id,
        saved_by=tok if pretrained else None,  # a pretrained tokenizer writes its own folder
    )
    return DataBundle(
        train=splits["train"],
        val=splits["val"],
        test=splits.get("test", splits["val"]),
        classes=classes,
        target="class",
        text=text,
    )
