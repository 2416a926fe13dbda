"""`python -m trainer.generate run=<run dir> prompt="..." [max_new_tokens=200] [temperature=0.8] [top_k=200]
[seed=0] [checkpoint=best|last] [cache=true]`: text from a finished (or running) language-model run,
with its own tokenizer, printed as it is made (trainer/text/sampling.py). The same seed gives the same
text.

The prompt is taken as given, not parsed as a config value (`prompt=ROMEO:` is the text "ROMEO:");
quotes around the whole of it are dropped, so `prompt="ROMEO:"` and `'prompt="  def "'` work as a
shell leaves them. `prompt_file=<file>` reads the prompt from a file, as it is."""

import logging
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Optional

import torch
from omegaconf import MISSING, OmegaConf

from trainer.core.cli import exit_codes
from trainer.core.errors import UserError
from trainer.text.sampling import generate, load_run


@dataclass
class GenerateConfig:
    run: str = MISSING
    prompt: str = ""
    prompt_file: Optional[str] = None  # read the prompt from this file, exactly (spaces, newlines), instead
    max_new_tokens: int = 200
    temperature: float = 0.8  # 0: always the most likely token
    top_k: Optional[int] = 200  # sample among the k most likely tokens (null: all)
    seed: int = 0
    checkpoint: str = "best"
    cache: bool = True  # the key/value cache (false: recompute the context for every token)


def _free_text(key: str, argv: list[str]) -> tuple[list[str], str | None]:
    """`key=<text>` taken out of argv as it is: OmegaConf would read `ROMEO:` as a mapping."""
    rest, text = [], None
    for arg in argv:
        if not arg.startswith(f"{key}="):
            rest.append(arg)
            continue
        text = arg[len(key) + 1 :]
        if len(text) >= 2 and text[0] == text[-1] and text[0] in "\"'":
            text = text[1:-1]
    return rest, text


def main(argv: list[str] | None = None) -> None:
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(message)s")
    with exit_codes():
        args, prompt = _free_text("prompt", argv if argv is not None else sys.argv[1:])
        cfg = OmegaConf.merge(OmegaConf.structured(GenerateConfig), OmegaConf.from_dotlist(args))
        if prompt is not None:
            cfg.prompt = prompt
        if OmegaConf.is_missing(cfg, "run"):
            raise UserError('run: missing; usage: python -m trainer.generate run=<run dir> prompt="..."')
        cfg = OmegaConf.to_object(cfg)
        for key, ok, need in (
            ("max_new_tokens", cfg.max_new_tokens >= 1, "1 or more"),
            ("temperature", cfg.temperature >= 0, "0 or more"),
            ("top_k", cfg.top_k is None or cfg.top_k >= 1, "null or 1 or more"),
        ):
            if not ok:
                raise UserError(f"{key}: must be {need}, got {getattr(cfg, key)!r}")
        if cfg.prompt_file is not None:
            if cfg.prompt:
                raise UserError("prompt_file: give the prompt or a prompt_file, not both")
            try:
                cfg.prompt = Path(cfg.prompt_file).read_text(encoding="utf-8")
            except (OSError, UnicodeDecodeError) as e:
                raise UserError(f"prompt_file: cannot read {cfg.prompt_file} as UTF-8 text ({e})") from None
        model, tokenizer = load_run(Path(cfg.run), cfg.checkpoint)
        ids = tokenizer.encode(cfg.prompt) or tokenizer.encode("\n")  # an empty prompt starts a new line
        if len(ids) > model.block_size:
            raise UserError(
                f"prompt: {len(ids)} tokens, longer than the model's block size {model.block_size}; "
                f"shorten it"
            )
        sys.stdout.write(cfg.prompt)
        made: list[int] = []
        shown = ""
        for token in generate(
            model,
            torch.tensor(ids),
            cfg.max_new_tokens,
            temperature=cfg.temperature,
            top_k=cfg.top_k,
            seed=cfg.seed,
            use_cache=cfg.cache,
        ):
            made.append(token)
            text = tokenizer.decode(made)
            if not text.endswith("\ufffd"):  # a character whose bytes are not all there yet waits
                sys.stdout.write(text[len(shown) :])
                sys.stdout.flush()
                shown = text
        sys.stdout.write(tokenizer.decode(made)[len(shown) :] + "\n")


if __name__ == "__main__":
    main()
