"""Tokenizers: text <-> token ids. `byte` is built in (UTF-8 bytes, a vocabulary of 256, nothing to
download); `bpe` is Hugging Face `tokenizers` (the `text` extra), trained on a corpus or read from a
local tokenizer.json; `hf:<folder or hub name>` is a pretrained model's own tokenizer (`transformers`'
AutoTokenizer, the `hf` extra). A tokenizer is saved as a folder's tokenizer.json (a pretrained one as
its save_pretrained folder; bytes are only named in the index), so the run dir and the export decode
with exactly the training tokenizer."""

import json
import shutil
from collections.abc import Iterable
from pathlib import Path
from typing import Protocol

from trainer.core.errors import UserError, require


class Tokenizer(Protocol):
    kind: str
    vocab_size: int
    eos_id: int | None  # the end-of-text token put between a corpus's documents; None: nothing between

    def encode(self, text: str) -> list[int]: ...

    def decode(self, ids: list[int]) -> str: ...

    def save(self, folder: Path) -> dict: ...


class ByteTokenizer:
    """UTF-8 bytes as tokens: any text, a vocabulary of 256, and decode(encode(text)) == text."""

    kind, vocab_size, eos_id = "byte", 256, None

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

    kind, eos_id = "bpe", None

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


HF_FOLDER = "hf_tokenizer"


class PretrainedTokenizer:
    """A pretrained model's tokenizer (`transformers.AutoTokenizer`): `special_tokens` adds the model's
    own around each text (BERT's [CLS] ... [SEP]; a classifier's input), else the ids of the text alone
    (a language model's corpus, with `eos_id` between documents). `pad_id` pads a batch of texts: the
    tokenizer's pad token, else its end-of-text token."""

    kind = "hf"

    def __init__(self, tokenizer, special_tokens: bool) -> None:
        self.tokenizer, self.special_tokens = tokenizer, special_tokens
        self.vocab_size = len(tokenizer)
        self.eos_id = tokenizer.eos_token_id
        self.pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else self.eos_id

    @classmethod
    def load(cls, source: str, special_tokens: bool, key: str = "dataset.tokenizer") -> "PretrainedTokenizer":
        """From a folder written by save_pretrained, or a hub name through the library's cache."""
        from trainer.core.hub import not_available, offline_unless_reachable, transformers_library

        transformers = transformers_library(f"{key}=hf:...")
        folder = Path(source)
        if folder.is_dir() and not any(
            (folder / f).is_file() for f in ("tokenizer.json", "tokenizer_config.json")
        ):
            raise UserError(
                f"{key}: {folder} holds no tokenizer (tokenizer.json or tokenizer_config.json); give "
                f"the folder a tokenizer's save_pretrained wrote"
            )
        if not folder.exists():
            offline_unless_reachable()
        try:
            tokenizer = transformers.AutoTokenizer.from_pretrained(source)
        except Exception as e:  # noqa: BLE001 - offline, an unknown name, a damaged folder: one line
            raise not_available(key, source, e, "one a tokenizer's save_pretrained wrote") from None
        return cls(tokenizer, special_tokens)

    def encode(self, text: str) -> list[int]:
        return self.tokenizer(text, add_special_tokens=self.special_tokens)["input_ids"]

    def decode(self, ids: list[int]) -> str:
        return self.tokenizer.decode(ids)

    def save(self, folder: Path) -> dict:
        self.tokenizer.save_pretrained(str(folder / HF_FOLDER))
        return self.spec()

    def spec(self) -> dict:
        return {
            "kind": "hf",
            "vocab_size": self.vocab_size,
            "folder": HF_FOLDER,
            "special_tokens": self.special_tokens,
            "eos_id": self.eos_id,
            "pad_id": self.pad_id,
        }


def load_tokenizer(spec: dict, folder: Path) -> Tokenizer:
    """The tokenizer an index (or a manifest) names, its file read from `folder`."""
    if spec.get("kind") == "byte":
        return ByteTokenizer()
    if spec.get("kind") == "bpe":
        return BPETokenizer.load(folder / spec.get("file", "tokenizer.json"))
    if spec.get("kind") == "hf":
        return PretrainedTokenizer.load(str(folder / spec["folder"]), spec["special_tokens"], "tokenizer")
    raise UserError(f"tokenizer: unknown kind {spec.get('kind')!r} in {folder}; byte, bpe or hf")


def named_tokenizer(name: str, vocab_size: int | None, special_tokens: bool) -> Tokenizer:
    """dataset.tokenizer's tokenizer, for a name that needs no corpus to train it: byte, or hf:<source>."""
    if name == "byte":
        return ByteTokenizer()
    if name.startswith("hf:"):
        return PretrainedTokenizer.load(name.removeprefix("hf:"), special_tokens)
    raise UserError(f"dataset.tokenizer: {name!r} is not byte, bpe or hf:<folder or hub name>")


def tokenizer_files(spec: dict, folder: Path) -> list[Path]:
    """The files that hold the tokenizer `spec` names (none for bytes)."""
    if spec.get("file"):
        return [folder / spec["file"]]
    if spec.get("folder"):
        return sorted(p for p in (folder / spec["folder"]).rglob("*") if p.is_file())
    return []


def save_tokenizer(tokenizer: Tokenizer, target: Path) -> dict:
    """A tokenizer's own files into `target` (a run dir's, an export's tokenizer folder), and its spec."""
    target.mkdir(parents=True, exist_ok=True)
    spec = tokenizer.save(target)
    (target / "tokenizer_spec.json").write_text(json.dumps(spec))
    return spec


def copy_tokenizer(spec: dict, source: Path, target: Path) -> dict:
    """The tokenizer's files from one folder into another (a run dir, an export), and its spec."""
    target.mkdir(parents=True, exist_ok=True)
    if spec.get("file"):
        (target / spec["file"]).write_bytes((source / spec["file"]).read_bytes())
    if spec.get("folder") and (source / spec["folder"]).resolve() != (target / spec["folder"]).resolve():
        shutil.copytree(source / spec["folder"], target / spec["folder"], dirs_exist_ok=True)
    (target / "tokenizer_spec.json").write_text(json.dumps(spec))
    return spec
