"""Sampling from a language model, one token at a time, and loading a language-model run for it
(`python -m trainer.generate`, serve's /v1/generate).

With the key/value cache (the model's `new_cache()`), the prompt is run once and each new token is
computed from itself and the cached keys and values of the tokens before it; without it (or once the
text no longer fits the block size, where the position embeddings end) the last block_size tokens are
run again for every token, as nanoGPT does. Both give the same tokens for a seed."""

import json
from collections.abc import Iterator
from pathlib import Path

import torch
from torch import Tensor, nn

from trainer.core.checkpoint import load_checkpoint
from trainer.core.cli import import_user_modules
from trainer.core.errors import UserError
from trainer.core.hooks import ModelHooks
from trainer.text.tokenizers import Tokenizer, load_tokenizer


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
def generate(
    model: nn.Module,
    prompt: Tensor,
    max_new_tokens: int,
    *,
    temperature: float = 1.0,
    top_k: int | None = None,
    seed: int = 0,
    use_cache: bool = True,
) -> Iterator[int]:
    """Yields each new token id of the continuation of `prompt` (a 1-D tensor of ids), as it is made."""
    model.eval()
    block = model.block_size
    generator = torch.Generator(device=prompt.device).manual_seed(seed)
    ids = prompt.view(1, -1)
    cache = model.new_cache() if use_cache else None
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


def load_run(run: Path, checkpoint: str) -> tuple[nn.Module, Tokenizer]:
    """(model, tokenizer) of a language-model run: its config and weights, its tokenizer folder."""
    from trainer.core.registry import MODELS

    if checkpoint not in ("best", "last"):
        raise UserError(f"checkpoint: '{checkpoint}' is not one of best, last")
    path = run / "checkpoints" / f"{checkpoint}.pt"
    if not path.is_file():
        raise UserError(
            f"run: {run} has no checkpoints/{checkpoint}.pt; give the folder of a language-model run"
        )
    config = load_checkpoint(path)["config"]  # resolved, plain
    task = config.get("task", {}).get("name", "classification")
    if task != "language_model" or not (run / "tokenizer").is_dir():
        raise UserError(f"run: {run} is a task={task} run; generate needs a task=language_model run")
    import_user_modules(list(config.get("imports", [])))
    state = load_checkpoint(path)
    args = dict(state["model_args"])  # the model's name, parameters and what the data gave it
    model = MODELS.build(args.pop("name"), **args)
    model.load_state_dict(state.get("ema") or state["model"])
    if isinstance(model, ModelHooks):
        model = model.for_export()  # LoRA's adapters merged: one plain model, faster to run
    spec = json.loads((run / "tokenizer" / "tokenizer_spec.json").read_text())
    return model.eval(), load_tokenizer(spec, run / "tokenizer")
