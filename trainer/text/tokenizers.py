"""Tokenizers: text <-> token ids. `byte` is built in (UTF-8 bytes, a vocabulary of 256, nothing to
download); `bpe` is Hugging Face `tokenizers` (the `text` extra), trained on a corpus or read from a
local tokenizer.json. A tokenizer is saved as a folder's tokenizer.json (or, for bytes, named in its
index), so the run dir and the export decode with exactly the training tokenizer."""

import json
from collections.abc import Iterable
from pathlib import Path
from typing import Protocol

from trainer.core.errors import UserError, require


class Tokenizer(Protocol):
    kind: str
    vocab_size: int

    def encode(self, text: str) -> list[int]: ...

    def decode(self, ids: list[int]) -> str: ...

    def save(self, folder: Path) -> dict: ...


class ByteTokenizer:
    """UTF-8 bytes as tokens: any text, a vocabulary of 256, and decode(encode(text)) == text."""

    kind, vocab_size = "byte", 256

    def encode(self, text: str) -> list[int]:
        return list(text.encode("utf-8"))

    def decode(self, ids: list[int]) -> str:
        return bytes(ids).decode("utf-8", errors="replace")  # a cut inside a character shows as U+FFFD

    def save(self, folder: Path) -> dict:
        return {"kind": "byte", "vocab_size": 256}


def _hf():
    return require("tokenizers", "tokenizer=bpe", "text")


class BPETokenizer:
    """Byte-level BPE (GPT-2 style) through Hugging Face `tokenizers`."""

    kind = "bpe"

    def __init__(self, tokenizer) -> None:
        self.tokenizer = tokenizer
        self.vocab_size = tokenizer.get_vocab_size()

    @classmethod
    def train(cls, texts: Iterable[str], vocab_size: int) -> "BPETokenizer":
        tk = _hf()
        if vocab_size < 257:
            raise UserError(f"--vocab-size: a byte-level BPE needs more than 256 tokens, got {vocab_size}")
        tokenizer = tk.Tokenizer(tk.models.BPE())
        tokenizer.pre_tokenizer = tk.pre_tokenizers.ByteLevel(add_prefix_space=False)
        tokenizer.decoder = tk.decoders.ByteLevel()
        trainer = tk.trainers.BpeTrainer(
            vocab_size=vocab_size,
            show_progress=False,
            initial_alphabet=tk.pre_tokenizers.ByteLevel.alphabet(),
        )
        tokenizer.train_from_iterator(texts, trainer=trainer)
        return cls(tokenizer)

    @classmethod
    def load(cls, path: Path) -> "BPETokenizer":
        tk = _hf()
        try:
            return cls(tk.Tokenizer.from_file(str(path)))
        except Exception as e:
            raise UserError(
                f"tokenizer: cannot read {path} as a Hugging Face tokenizer.json ({str(e)[:100]})"
            ) from None

    def encode(self, text: str) -> list[int]:
        return self.tokenizer.encode(text).ids

    def decode(self, ids: list[int]) -> str:
        return self.tokenizer.decode(ids)

    def save(self, folder: Path) -> dict:
        self.tokenizer.save(str(folder / "tokenizer.json"))
        return {"kind": "bpe", "vocab_size": self.vocab_size, "file": "tokenizer.json"}


def load_tokenizer(spec: dict, folder: Path) -> Tokenizer:
    """The tokenizer an index (or a manifest) names, its file read from `folder`."""
    if spec.get("kind") == "byte":
        return ByteTokenizer()
    if spec.get("kind") == "bpe":
        return BPETokenizer.load(folder / spec.get("file", "tokenizer.json"))
    raise UserError(f"tokenizer: unknown kind {spec.get('kind')!r} in {folder}; byte or bpe")


def copy_tokenizer(spec: dict, source: Path, target: Path) -> dict:
    """The tokenizer's files from one folder into another (a run dir, an export), and its spec."""
    target.mkdir(parents=True, exist_ok=True)
    if spec.get("file"):
        (target / spec["file"]).write_bytes((source / spec["file"]).read_bytes())
    (target / "tokenizer_spec.json").write_text(json.dumps(spec))
    return spec
