"""`text`: a corpus of token ids, read as windows of dataset.block_size + 1 tokens (inputs and the
next-token targets) from a memory-mapped array, for task=language_model.

dataset.root is either a folder written by `python -m trainer.data.tokenize` (index.json, tokens.bin)
or the text itself: a .txt or .jsonl file, a folder or a glob, tokenized once (dataset.tokenizer) into
dataset.cache and reused while the inputs are unchanged. The validation (and test) split is the last
dataset.val_fraction of the token stream, or, split by file, dataset.val_root (the same kinds of input,
tokenized with the training corpus's tokenizer). A training epoch is every block_size-th window start, each
shifted by a random offset drawn from the sample's own seed: random windows, the same for a seed
whatever the worker count, and a resume restarts at any batch, as for images.
"""

import hashlib
import json
import logging
from pathlib import Path
from typing import Annotated

import numpy as np
import torch
from torch import Tensor
from torch.utils.data import Dataset

from trainer.core import distributed
from trainer.core.errors import UserError
from trainer.core.fields import at_least, optional
from trainer.core.registry import DATASETS
from trainer.data.arrays import DataBundle, TextInfo
from trainer.data.corpus import INDEX, TOKENS, input_files, tokenize
from trainer.text.tokenizers import tokenizer_files

log = logging.getLogger("trainer")


class TextWindows(Dataset):
    """(inputs, targets) = tokens[s : s + block], tokens[s + 1 : s + block + 1] for window starts s in
    [start, stop - block - 1]; the file is opened in each process that reads it."""

    def __init__(self, path: Path, dtype: str, start: int, stop: int, block_size: int, shift: bool) -> None:
        self.path, self.dtype, self.start, self.stop = path, dtype, start, stop
        self.block_size, self.shift = block_size, shift
        self._tokens: np.ndarray | None = None

    def __len__(self) -> int:
        return (self.stop - self.start - 1) // self.block_size

    @property
    def tokens(self) -> np.ndarray:
        if self._tokens is None:
            self._tokens = np.memmap(self.path, dtype=self.dtype, mode="r")
        return self._tokens

    def __getstate__(self) -> dict:
        return {**self.__dict__, "_tokens": None}  # a worker maps the file itself

    def __getitem__(self, i: int) -> tuple[Tensor, Tensor]:
        begin = self.start + i * self.block_size
        if self.shift:  # under the sample's seed (SeededSamples): random, and the same for a seed
            room = self.stop - self.block_size - 1 - begin
            begin += int(torch.randint(min(self.block_size, room) + 1, ()))
        window = torch.from_numpy(self.tokens[begin : begin + self.block_size + 1].astype(np.int64))
        return window[:-1], window[1:]


def _stamp(files: list[Path]) -> list:
    return [(str(p.resolve()), p.stat().st_size, p.stat().st_mtime_ns) for p in files]


def _cache_key(inputs: str, tokenizer: str, vocab_size: int | None, like: str) -> str:
    """The cache folder's name: the inputs as they are now, and the tokenizer (a local pretrained one's
    files as they are now too)."""
    local = Path(tokenizer.removeprefix("hf:"))
    tokenizer_files = _stamp(sorted(f for f in local.rglob("*") if f.is_file())) if local.is_dir() else []
    key = [_stamp(input_files([inputs])), tokenizer, tokenizer_files, vocab_size, like]
    return hashlib.sha1(json.dumps(key).encode()).hexdigest()[:16]


def _tokenizer_identity(folder: Path) -> str:
    """What makes two folders' token ids mean the same text: the spec, and the tokenizer's own files."""
    spec = json.loads((folder / INDEX).read_text())["tokenizer"]
    content = b"".join(f.read_bytes() for f in tokenizer_files(spec, folder))
    return hashlib.sha1(json.dumps(spec, sort_keys=True).encode() + content).hexdigest()


def tokenized(
    root: str, tokenizer: str, vocab_size: int | None, cache: str, like: Path | None = None
) -> Path:
    """The folder of token ids for `root`: itself when it is one, else the cache's (made once). With
    `like` (the training corpus's folder), tokenized with that folder's tokenizer."""
    folder = Path(root)
    if (folder / INDEX).is_file():
        return folder
    identity = _tokenizer_identity(like) if like else ""
    target = Path(cache) / _cache_key(root, tokenizer, vocab_size, identity)
    if not (target / INDEX).is_file() and distributed.is_main():  # with torchrun: rank 0, the others wait
        log.info("tokenizing %s (%s) into %s, once", root, tokenizer, target)
        if like is None:
            tokenize([root], target, tokenizer, vocab_size or 8192)
        else:
            spec = json.loads((like / INDEX).read_text())["tokenizer"]
            tokenize(
                [root],
                target,
                f"hf:{like / spec['folder']}" if spec["kind"] == "hf" else spec["kind"],
                vocab_size or spec["vocab_size"],
                tokenizer_file=str(like / spec["file"]) if spec.get("file") else None,
            )
    distributed.barrier()
    return target


@DATASETS.register("text")
def text(
    *,
    root: str,
    block_size: Annotated[int, at_least(1)],
    vocab_size: Annotated[int | None, optional(at_least(1), "the tokenizer's")],
    val_fraction: float,
    tokenizer: str,
    cache: str,
    val_root: str | None,
) -> DataBundle:
    if not val_root and not 0 < val_fraction < 1:
        raise UserError(f"dataset.val_fraction: must be in (0, 1), got {val_fraction}")
    folder = tokenized(root, tokenizer, vocab_size, cache)
    index = json.loads((folder / INDEX).read_text())
    spec = index["tokenizer"]
    if vocab_size is not None and spec["vocab_size"] > vocab_size:
        raise UserError(
            f"dataset.vocab_size: the tokenizer of {folder} has {spec['vocab_size']:,} tokens, more than "
            f"dataset.vocab_size={vocab_size:,} (the model's); set dataset.vocab_size={spec['vocab_size']}"
        )
    total = int(index["tokens"])
    if val_root:  # split by file: all of root trains, val_root validates
        val_folder = tokenized(val_root, tokenizer, vocab_size, cache, like=folder)
        if _tokenizer_identity(val_folder) != _tokenizer_identity(folder):
            same = (
                f"--tokenizer hf:{folder / spec['folder']}"
                if spec["kind"] == "hf"
                else f"--tokenizer-file {folder / spec.get('file', 'tokenizer.json')}"
            )
            raise UserError(
                f"dataset.val_root: {val_folder} was tokenized with another tokenizer than {folder}; "
                f"tokenize it with {same}, or give the raw text"
            )
        val_index = json.loads((val_folder / INDEX).read_text())
        split, n_val = total, int(val_index["tokens"])
        val = TextWindows(val_folder / TOKENS, val_index["dtype"], 0, n_val, block_size, shift=False)
    else:  # the held-out tail of the stream
        n_val = int(total * val_fraction)
        split = total - n_val
        val = TextWindows(folder / TOKENS, index["dtype"], split, total, block_size, shift=False)
    for name, size in (("training", split), ("validation", n_val)):
        if size < block_size + 1:
            raise UserError(
                f"dataset.block_size: the {name} split has {size:,} tokens, fewer than block_size + 1 = "
                f"{block_size + 1}; lower dataset.block_size, or use a bigger corpus"
            )
    train = TextWindows(folder / TOKENS, index["dtype"], 0, split, block_size, shift=True)
    # predict/serve read a text's last block_size tokens, unpadded (the answer is at its last token)
    text = TextInfo(
        tokenizer=spec,
        tokenizer_dir=str(folder),
        vocab_size=vocab_size or spec["vocab_size"],
        max_length=block_size,
        pad_id=None,
        bytes_per_token=index["bytes"] / max(total, 1),
    )
    return DataBundle(train=train, val=val, test=val, classes=[], target="tokens", text=text)
