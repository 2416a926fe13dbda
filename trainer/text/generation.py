"""Sampling from a language model, one token at a time.

With the key/value cache, the prompt is run once and each new token is computed from itself and the
cached keys and values of the tokens before it; without it (or once the text no longer fits the block
size, whose position embeddings end there) the last block_size tokens are run again for every token,
as nanoGPT does. Both give the same tokens for a seed."""
from collections.abc import Iterator

import torch
from torch import Tensor, nn


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
