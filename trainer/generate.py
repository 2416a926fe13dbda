"""`python -m trainer.generate run=<run dir> prompt="..." [max_new_tokens=200] [temperature=0.8] [top_k=200]
[seed=0] [checkpoint=best|last] [cache=true]`: text from a finished (or running) language-model run,
with its own tokenizer, printed as it is made. The same seed gives the same text.

Sampling is one token at a time. With the key/value cache, the prompt is run once and each new token is
computed from itself and the cached keys and values of the tokens before it; without it (or once the
text no longer fits the block size, where the position embeddings end) the last block_size tokens are
run again for every token, as nanoGPT does. Both give the same tokens for a seed."""
from collections.abc import Iterator
import json
import logging
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Optional

import torch
from omegaconf import MISSING, OmegaConf
from torch import Tensor, nn

from trainer.checkpoint import load_checkpoint
from trainer.cli import exit_codes, import_user_modules
from trainer.config import params_of, upgrade_legacy
from trainer.errors import UserError


def next_token(logits: Tensor, temperature: float, top_k: int | None, generator: torch.Generator) -> Tensor:
    """One token per row from the last position's logits: greedy at temperature 0, else sampled from the
    softmax of logits / temperature, restricted to the top_k most likely when set."""
    logits = logits.float()
    if temperature == 0:
        return logits.argmax(-1, keepdim=True)
    logits = logits / temperature
    if top_k is not None and top_k < logits.shape[-1]:
        kth = logits.topk(top_k, dim=-1).values[..., -1:]
        logits = logits.masked_fill(logits < kth, float("-inf"))
    return torch.multinomial(torch.softmax(logits, dim=-1), 1, generator=generator)


@torch.no_grad()
def generate(model: nn.Module, prompt: Tensor, max_new_tokens: int, *, temperature: float = 1.0,
             top_k: int | None = None, seed: int = 0, use_cache: bool = True) -> Iterator[int]:
    """Yields each new token id of the continuation of `prompt` (a 1-D tensor of ids), as it is made."""
    from trainer.models.gpt import KVCache
    model.eval()
    block = model.block_size
    generator = torch.Generator(device=prompt.device).manual_seed(seed)
    ids = prompt.view(1, -1)
    cache = KVCache(model.n_layer) if use_cache else None
    logits = model(ids[:, -block:], cache)[:, -1]
    for made in range(max_new_tokens):
        token = next_token(logits, temperature, top_k, generator)
        yield int(token)
        if made + 1 == max_new_tokens:
            return
        ids = torch.cat([ids, token], dim=1)
        if cache is not None and cache.length < block:
            logits = model(token, cache)[:, -1]  # one position, attending to the cached ones
        else:  # no cache, or past the block size: the last block_size tokens again
            cache = None
            logits = model(ids[:, -block:])[:, -1]


@dataclass
class GenerateConfig:
    run: str = MISSING
    prompt: str = ""
    max_new_tokens: int = 200
    temperature: float = 0.8  # 0: always the most likely token
    top_k: Optional[int] = 200  # sample among the k most likely tokens (null: all)
    seed: int = 0
    checkpoint: str = "best"
    cache: bool = True  # the key/value cache (false: recompute the context for every token)


def load_run(run: Path, checkpoint: str):
    """(model, tokenizer) of a language-model run: its config and weights, its tokenizer folder."""
    from trainer.registry import MODELS
    from trainer.text.tokenizers import load_tokenizer
    if checkpoint not in ("best", "last"):
        raise UserError(f"checkpoint: '{checkpoint}' is not one of best, last")
    path = run / "checkpoints" / f"{checkpoint}.pt"
    if not path.is_file():
        raise UserError(f"run: {run} has no checkpoints/{checkpoint}.pt; give the folder of a language-model run")
    state = load_checkpoint(path)
    config = OmegaConf.create(upgrade_legacy(state["config"]))
    if config.task.name != "language_model" or not (run / "tokenizer").is_dir():
        raise UserError(f"run: {run} is a task={config.task.name} run; generate needs a task=language_model run")
    import_user_modules(list(config.imports))
    model = MODELS.build(config.model.name, **params_of(config.model))
    model.load_state_dict(state.get("ema") or state["model"])
    spec = json.loads((run / "tokenizer" / "tokenizer_spec.json").read_text())
    return model.eval(), load_tokenizer(spec, run / "tokenizer")


def main(argv: list[str] | None = None) -> None:
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(message)s")
    with exit_codes():
        cfg = OmegaConf.merge(OmegaConf.structured(GenerateConfig),
                              OmegaConf.from_dotlist(argv if argv is not None else sys.argv[1:]))
        if OmegaConf.is_missing(cfg, "run"):
            raise UserError('run: missing; usage: python -m trainer.generate run=<run dir> prompt="..."')
        cfg = OmegaConf.to_object(cfg)
        for key, ok, need in (("max_new_tokens", cfg.max_new_tokens >= 1, "1 or more"),
                              ("temperature", cfg.temperature >= 0, "0 or more"),
                              ("top_k", cfg.top_k is None or cfg.top_k >= 1, "null or 1 or more")):
            if not ok:
                raise UserError(f"{key}: must be {need}, got {getattr(cfg, key)!r}")
        model, tokenizer = load_run(Path(cfg.run), cfg.checkpoint)
        ids = tokenizer.encode(cfg.prompt) or tokenizer.encode("\n")  # an empty prompt starts a new line
        if len(ids) > model.block_size:
            raise UserError(f"prompt: {len(ids)} tokens, longer than the model's block size {model.block_size}; "
                            f"shorten it")
        sys.stdout.write(cfg.prompt)
        made: list[int] = []
        shown = ""
        for token in generate(model, torch.tensor(ids), cfg.max_new_tokens, temperature=cfg.temperature,
                              top_k=cfg.top_k, seed=cfg.seed, use_cache=cfg.cache):
            made.append(token)
            text = tokenizer.decode(made)
            if not text.endswith("\ufffd"):  # a character whose bytes are not all there yet waits
                sys.stdout.write(text[len(shown):])
                sys.stdout.flush()
                shown = text
        sys.stdout.write(tokenizer.decode(made)[len(shown):] + "\n")


if __name__ == "__main__":
    main()
