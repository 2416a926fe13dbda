"""A corpus as one memory-mapped array of token ids (`python -m trainer.data.tokenize` is its command).

Inputs are .txt files, JSONL files (each line an object whose `--field` holds a document), folders
(searched for both) or globs. A tokenizer with an end-of-text token (a pretrained model's, `hf:<name>`)
puts it after every document, so a window that spans two never reads them as one text. The output
folder gets tokens.bin (uint16 when the vocabulary fits, else
uint32), index.json (the tokenizer, the dtype, the token count, each document's span, the corpus's
bytes) and the tokenizer's own file for BPE. Training reads windows of it (dataset=text), so a corpus
bigger than memory trains with flat memory."""

import glob
import json
from collections.abc import Iterator
from pathlib import Path

import numpy as np

from trainer.core.atomic import temporary_name, write_text
from trainer.core.errors import UserError
from trainer.data.jsonl import json_lines
from trainer.text.tokenizers import BPETokenizer, Tokenizer, named_tokenizer

INDEX = "index.json"
TOKENS = "tokens.bin"


def input_files(inputs: list[str]) -> list[Path]:
    files: list[Path] = []
    for item in inputs:
        path = Path(item)
        if path.is_dir():
            files += sorted(p for p in path.rglob("*") if p.suffix in (".txt", ".jsonl"))
        elif path.is_file():
            files.append(path)
        else:
            matched = sorted(Path(p) for p in glob.glob(item, recursive=True) if Path(p).is_file())
            if not matched:
                raise UserError(
                    f"inputs: {item} is no file, folder or glob that matches; give .txt or .jsonl files"
                )
            files += matched
    if not files:
        raise UserError(f"inputs: no .txt or .jsonl files in {', '.join(inputs)}")
    return files


def documents(files: list[Path], field: str) -> Iterator[tuple[str, str]]:
    """(where, text) for every document: a .txt file is one, a JSONL line with `field` another."""
    for path in files:
        try:
            content = path.read_text(encoding="utf-8")
        except UnicodeDecodeError as e:
            raise UserError(f"inputs: {path} is not UTF-8 text (byte {e.start}); convert it first") from None
        if path.suffix != ".jsonl":
            yield str(path), content
            continue
        for number, row in json_lines(path, "inputs", content):
            if not isinstance(row.get(field), str):
                raise UserError(
                    f"inputs: {path} line {number} has no text field {field!r}; name it with --field"
                )
            yield f"{path}:{number}", row[field]


def tokenize(
    inputs: list[str],
    out: Path,
    tokenizer: str = "byte",
    vocab_size: int = 8192,
    tokenizer_file: str | None = None,
    field: str = "text",
) -> dict:
    files = input_files(inputs)  # read a document at a time: the corpus need not fit in memory
    out.mkdir(parents=True, exist_ok=True)
    tok: Tokenizer
    if tokenizer == "bpe":
        tok = (
            BPETokenizer.load(Path(tokenizer_file))
            if tokenizer_file
            else BPETokenizer.train((text for _, text in documents(files, field)), vocab_size)
        )
    else:
        tok = named_tokenizer(tokenizer, vocab_size, special_tokens=False)
    dtype = np.uint16 if tok.vocab_size <= 2**16 else np.uint32
    spans, total, corpus_bytes = [], 0, 0
    partial = temporary_name(out / TOKENS)  # this process's: another may tokenize the same corpus at once
    with open(partial, "wb") as f:
        for where, text in documents(files, field):
            ids = tok.encode(text)
            ids = np.asarray(ids if tok.eos_id is None else [*ids, tok.eos_id], dtype=dtype)
            ids.tofile(f)
            spans.append([where, total, total + len(ids)])
            total += len(ids)
            corpus_bytes += len(text.encode("utf-8"))
    if total == 0:
        partial.unlink()
        raise UserError(f"inputs: the corpus ({len(files)} file(s)) holds no text")
    partial.replace(out / TOKENS)
    index = {
        "tokenizer": tok.save(out),
        "dtype": np.dtype(dtype).name,
        "tokens": total,
        "bytes": corpus_bytes,
        "documents": spans,
    }
    write_text(out / INDEX, json.dumps(index, indent=1))
    return index
