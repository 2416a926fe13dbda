"""`text_encoder`: a small bidirectional transformer for text classification: token and position
embeddings, pre-LayerNorm blocks of self-attention (`scaled_dot_product_attention`, padding masked out)
and an MLP, then the mean of the non-padding positions and a linear head. Its input is token ids padded
with the id vocab_size (dataset=text_classification)."""

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from trainer.core.errors import UserError
from trainer.core.registry import MODELS


class EncoderBlock(nn.Module):
    def __init__(self, n_embd: int, n_head: int, dropout: float) -> None:
        super().__init__()
        self.n_head, self.dropout = n_head, dropout
        self.ln_1, self.ln_2 = nn.LayerNorm(n_embd), nn.LayerNorm(n_embd)
        self.qkv, self.proj = nn.Linear(n_embd, 3 * n_embd), nn.Linear(n_embd, n_embd)
        self.mlp = nn.Sequential(
            nn.Linear(n_embd, 4 * n_embd), nn.GELU(), nn.Linear(4 * n_embd, n_embd), nn.Dropout(dropout)
        )

    def forward(self, x: Tensor, attend: Tensor) -> Tensor:
        b, t, c = x.shape
        q, k, v = (
            part.view(b, t, self.n_head, c // self.n_head).transpose(1, 2)
            for part in self.qkv(self.ln_1(x)).split(c, dim=2)
        )
        y = F.scaled_dot_product_attention(
            q, k, v, attn_mask=attend[:, None, None, :], dropout_p=self.dropout if self.training else 0.0
        )
        x = x + self.proj(y.transpose(1, 2).reshape(b, t, c))
        return x + self.mlp(self.ln_2(x))


class TextEncoder(nn.Module):
    def __init__(
        self,
        vocab_size: int,
        num_classes: int,
        max_length: int,
        n_layer: int,
        n_head: int,
        n_embd: int,
        dropout: float,
    ) -> None:
        super().__init__()
        self.pad_id = vocab_size
        self.tokens = nn.Embedding(vocab_size + 1, n_embd, padding_idx=vocab_size)
        self.positions = nn.Embedding(max_length, n_embd)
        self.blocks = nn.ModuleList(EncoderBlock(n_embd, n_head, dropout) for _ in range(n_layer))
        self.ln_f = nn.LayerNorm(n_embd)
        self.head = nn.Linear(n_embd, num_classes)

    def forward(self, ids: Tensor) -> Tensor:
        keep = ids != self.pad_id
        # The first position is always attended to, so an empty text attends to something (its padding).
        attend = keep | (torch.arange(ids.shape[1], device=ids.device) == 0)
        x = self.tokens(ids) + self.positions(torch.arange(ids.shape[1], device=ids.device))
        for block in self.blocks:
            x = block(x, attend)
        x = self.ln_f(x) * keep[..., None]
        return self.head(x.sum(1) / keep.sum(1, keepdim=True).clamp(min=1))


@MODELS.register("text_encoder")
def text_encoder(
    *,
    vocab_size: int,
    num_classes: int,
    max_length: int,
    n_layer: int,
    n_head: int,
    n_embd: int,
    dropout: float,
) -> nn.Module:
    if n_embd % n_head:
        raise UserError(f"model.n_embd: {n_embd} must be a multiple of model.n_head={n_head}")
    for key, value in (("n_layer", n_layer), ("n_head", n_head), ("max_length", max_length)):
        if value < 1:
            raise UserError(f"model.{key}: must be 1 or more, got {value}")
    return TextEncoder(vocab_size, num_classes, max_length, n_layer, n_head, n_embd, dropout)
