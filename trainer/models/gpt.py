"""`gpt`: a decoder-only transformer (GPT-2 style): token and position embeddings, pre-LayerNorm
blocks of causal self-attention through `scaled_dot_product_attention` (flash attention on a GPU) and
an MLP, a final LayerNorm, and the output layer tied to the token embedding. GPT-2's initialisation:
normal(0, 0.02), residual projections scaled by 1/sqrt(2 * n_layer).

`forward(ids)` gives logits for every position (training, evaluation, export); `forward(ids, cache)`
with a `KVCache` attends to the cached keys and values of earlier positions and appends the new ones,
so generation computes each new token from itself alone."""

import math

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from trainer.core.errors import UserError
from trainer.core.registry import MODELS


class KVCache:
    """The keys and values of every layer for the positions seen so far: [batch, heads, length, head dim]."""

    def __init__(self, n_layer: int) -> None:
        self.keys: list[Tensor | None] = [None] * n_layer
        self.values: list[Tensor | None] = [None] * n_layer

    def seen(self, layer: int = 0) -> int:
        """How many positions `layer` holds (layer 0's, before a forward pass: the positions seen)."""
        return 0 if self.keys[layer] is None else self.keys[layer].shape[2]

    @property
    def length(self) -> int:
        return self.seen(0)

    def extend(self, layer: int, k: Tensor, v: Tensor) -> tuple[Tensor, Tensor]:
        if self.keys[layer] is not None:
            k, v = torch.cat([self.keys[layer], k], dim=2), torch.cat([self.values[layer], v], dim=2)
        self.keys[layer], self.values[layer] = k, v
        return k, v


class CausalSelfAttention(nn.Module):
    def __init__(self, n_embd: int, n_head: int, dropout: float, bias: bool) -> None:
        super().__init__()
        self.n_head, self.dropout = n_head, dropout
        self.qkv = nn.Linear(n_embd, 3 * n_embd, bias=bias)
        self.proj = nn.Linear(n_embd, n_embd, bias=bias)
        self.resid_dropout = nn.Dropout(dropout)

    def forward(self, x: Tensor, cache: KVCache | None = None, layer: int = 0) -> Tensor:
        b, t, c = x.shape
        q, k, v = (
            part.view(b, t, self.n_head, c // self.n_head).transpose(1, 2)
            for part in self.qkv(x).split(c, dim=2)
        )
        if cache is None:
            y = F.scaled_dot_product_attention(
                q, k, v, dropout_p=self.dropout if self.training else 0.0, is_causal=True
            )
        else:  # the new positions see every cached one and, causally, each other
            past = cache.seen(layer)
            k, v = cache.extend(layer, k, v)
            mask = torch.ones(t, past + t, dtype=torch.bool, device=x.device).tril(diagonal=past)
            y = F.scaled_dot_product_attention(q, k, v, attn_mask=mask)
        return self.resid_dropout(self.proj(y.transpose(1, 2).reshape(b, t, c)))


class Block(nn.Module):
    def __init__(self, n_embd: int, n_head: int, dropout: float, bias: bool) -> None:
        super().__init__()
        self.ln_1, self.ln_2 = nn.LayerNorm(n_embd, bias=bias), nn.LayerNorm(n_embd, bias=bias)
        self.attn = CausalSelfAttention(n_embd, n_head, dropout, bias)
        self.mlp = nn.Sequential(
            nn.Linear(n_embd, 4 * n_embd, bias=bias),
            nn.GELU(),
            nn.Linear(4 * n_embd, n_embd, bias=bias),
            nn.Dropout(dropout),
        )

    def forward(self, x: Tensor, cache: KVCache | None = None, layer: int = 0) -> Tensor:
        x = x + self.attn(self.ln_1(x), cache, layer)
        return x + self.mlp(self.ln_2(x))


class GPT(nn.Module):
    def __init__(
        self,
        vocab_size: int,
        block_size: int,
        n_layer: int,
        n_head: int,
        n_embd: int,
        dropout: float,
        bias: bool,
        tie_weights: bool,
    ) -> None:
        super().__init__()
        self.block_size, self.n_layer = block_size, n_layer
        self.tokens = nn.Embedding(vocab_size, n_embd)
        self.positions = nn.Embedding(block_size, n_embd)
        self.drop = nn.Dropout(dropout)
        self.blocks = nn.ModuleList(Block(n_embd, n_head, dropout, bias) for _ in range(n_layer))
        self.ln_f = nn.LayerNorm(n_embd, bias=bias)
        self.head = nn.Linear(n_embd, vocab_size, bias=False)
        if tie_weights:
            self.head.weight = self.tokens.weight
        self.apply(self._init)
        for name, p in self.named_parameters():
            if name.endswith("proj.weight") or name.endswith("mlp.2.weight"):  # the residual projections
                nn.init.normal_(p, mean=0.0, std=0.02 / math.sqrt(2 * n_layer))

    @staticmethod
    def _init(module: nn.Module) -> None:
        if isinstance(module, (nn.Linear, nn.Embedding)):
            nn.init.normal_(module.weight, mean=0.0, std=0.02)
        if isinstance(module, nn.Linear) and module.bias is not None:
            nn.init.zeros_(module.bias)

    def new_cache(self) -> KVCache:
        return KVCache(self.n_layer)

    def forward(self, ids: Tensor, cache: KVCache | None = None) -> Tensor:
        start = 0 if cache is None else cache.length
        positions = torch.arange(start, start + ids.shape[1], device=ids.device)
        x = self.drop(self.tokens(ids) + self.positions(positions))
        for layer, block in enumerate(self.blocks):
            x = block(x, cache, layer)
        return self.head(self.ln_f(x))


@MODELS.register("gpt")
def gpt(
    *,
    vocab_size: int,
    block_size: int,
    n_layer: int,
    n_head: int,
    n_embd: int,
    dropout: float,
    bias: bool,
    tie_weights: bool,
) -> nn.Module:
    for key, value in (
        ("vocab_size", vocab_size),
        ("block_size", block_size),
        ("n_layer", n_layer),
        ("n_head", n_head),
        ("n_embd", n_embd),
    ):
        if value < 1:
            raise UserError(f"model.{key}: must be 1 or more, got {value}")
    if n_embd % n_head:
        raise UserError(f"model.n_embd: {n_embd} must be a multiple of model.n_head={n_head}")
    if not 0 <= dropout < 1:
        raise UserError(f"model.dropout: must be in [0, 1), got {dropout}")
    return GPT(vocab_size, block_size, n_layer, n_head, n_embd, dropout, bias, tie_weights)
