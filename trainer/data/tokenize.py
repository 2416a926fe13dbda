"""`python -m trainer.data.tokenize <inputs...> <out> [--tokenizer byte|bpe|hf:<model>] [--vocab-size N]
[--tokenizer-file tokenizer.json] [--field text]`: a corpus as one memory-mapped array of token ids
(trainer/data/corpus.py, which the text dataset imports; this module is only the command, so that
`python -m` finds it not yet imported)."""

import argparse
import sys
from pathlib import Path

from trainer.core.cli import exit_codes
from trainer.core.errors import UserError
from trainer.data.corpus import TOKENS, tokenize


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(
        prog="python -m trainer.data.tokenize", description=__doc__.split("\n")[0]
    )
    parser.add_argument(
        "paths", nargs="+", help="the inputs (.txt, .jsonl, folders, globs), then the output folder"
    )
    parser.add_argument(
        "--tokenizer",
        default="byte",
        help="byte, bpe (trained here), or hf:<folder or hub name> (a pretrained model's own; the hf extra)",
    )
    parser.add_argument("--vocab-size", type=int, default=8192, help="bpe: the vocabulary to train")
    parser.add_argument("--tokenizer-file", help="bpe: a tokenizer.json to use instead of training one")
    parser.add_argument("--field", default="text", help="JSONL: the key holding each document")
    args = parser.parse_args(argv)
    with exit_codes():
        if len(args.paths) < 2:
            raise UserError("usage: python -m trainer.data.tokenize <inputs...> <output folder>")
        index = tokenize(
            args.paths[:-1],
            Path(args.paths[-1]),
            args.tokenizer,
            args.vocab_size,
            args.tokenizer_file,
            args.field,
        )
        print(
            f"{index['tokens']:,} tokens ({index['tokenizer']['kind']}, vocabulary "
            f"{index['tokenizer']['vocab_size']:,}) from {len(index['documents'])} document(s) -> "
            f"{Path(args.paths[-1]) / TOKENS}",
            file=sys.stderr,
        )


if __name__ == "__main__":
    main()
