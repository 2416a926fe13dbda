"""`task=language_model`: next-token prediction at every position. Cross-entropy over every token;
metrics loss, perplexity and bits per byte (the loss in bits, per byte of text: comparable across
tokenizers), exact over the split from token-level sums. Generation is `python -m trainer.generate`."""

import math
from collections.abc import Mapping
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor

from trainer.core.errors import UserError
from trainer.core.registry import TASKS
from trainer.tasks.base import Batch, DataInfo, Task, option


@TASKS.register("language_model")
class LanguageModel(Task):
    name, target, monitor = "language_model", "tokens", "loss"
    metrics = {"loss": "min", "perplexity": "min", "bits_per_byte": "min"}

    def __init__(self, tta: str = "none") -> None:
        if tta != "none":
            raise UserError(
                f"task.tta: a language model has no test-time augmentation; set task.tta=none, got {tta!r}"
            )
        super().__init__(tta)
        self.extra: dict[str, Any] = {}

    def bind(self, data: DataInfo) -> None:
        super().bind(data)
        self.extra = {
            key: data.extra[key]
            for key in ("tokenizer", "block_size", "vocab_size", "bytes_per_token")
            if key in data.extra
        }

    def check_outputs(self, outputs: Tensor, batch: Batch) -> str | None:
        targets = self.targets(batch)
        vocabulary = int(self.extra.get("vocab_size", 0))
        if outputs.ndim != 3 or outputs.shape[:2] != targets.shape or outputs.shape[-1] < vocabulary:
            return (
                f"task={self.name} needs [N, {targets.shape[-1]}, {vocabulary or 'vocabulary'}] logits (a score per "
                f"token of the vocabulary at every position), e.g. from model=gpt"
            )
        return None

    def loss(self, outputs: Tensor, batch: Batch) -> Tensor:
        return F.cross_entropy(outputs.flatten(0, 1), self.targets(batch).flatten())

    def eval_sums_size(self) -> int:
        return 2  # nats summed over every predicted token; tokens

    def eval_sums(self, outputs: Tensor, batch: Batch) -> Tensor:
        targets = self.targets(batch)
        nats = F.cross_entropy(outputs.float().flatten(0, 1), targets.flatten(), reduction="sum")
        return torch.stack([nats, torch.tensor(float(targets.numel()), device=outputs.device)])

    def from_eval_sums(self, sums: list[float]) -> dict[str, float]:
        nats, tokens = sums[0], max(sums[1], 1)
        loss = nats / tokens
        bytes_per_token = self.extra.get("bytes_per_token", 1.0)
        return {
            "loss": loss,
            "perplexity": math.exp(min(loss, 700)),
            "bits_per_byte": loss / math.log(2) / bytes_per_token,
        }

    def dynamic_dims(self) -> dict[int, tuple[str, int]]:
        """The export takes any sequence length up to the block size, not just the example's."""
        return {1: ("length", int(self.extra.get("block_size", 1024)))}

    def state_dict(self) -> dict[str, Any]:
        return dict(self.extra)

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.extra.update(state or {})

    def use_tokenizer(self, tokenizer) -> None:
        """Answers name each token's text too (predict and serve hand over the run's tokenizer)."""
        self.tokenizer = tokenizer

    def answer(self, outputs: Tensor, options: Mapping[str, Any]) -> list[dict[str, Any]]:
        """The most likely next tokens after each input sequence (its last position)."""
        k = option(options, "topk", 5, int, low=1)
        probabilities = torch.softmax(outputs[:, -1].float(), dim=-1)
        values, ids = probabilities.topk(min(k, probabilities.shape[-1]), dim=-1)
        tokenizer = getattr(self, "tokenizer", None)
        return [
            {
                "next": [
                    {"id": i, **({"token": tokenizer.decode([i])} if tokenizer else {}), "probability": p}
                    for p, i in zip(ps, row)
                ]
            }
            for ps, row in zip(values.tolist(), ids.tolist())
        ]
