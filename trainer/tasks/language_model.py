"""`task=language_model`: next-token prediction at every position. Cross-entropy over every token;
metrics perplexity and bits per byte (the loss in bits, per byte of text: comparable across tokenizers),
exact over the split from token-level sums. Generation is `python -m trainer.generate`."""

from collections.abc import Mapping
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor

from trainer.core.registry import TASKS
from trainer.tasks.abilities import Answers, NamesTokens, SequenceInputs
from trainer.tasks.base import Batch, DataInfo, Task, option


@TASKS.register("language_model")
class LanguageModel(Task, Answers, SequenceInputs, NamesTokens):
    target, monitor, unit = "tokens", "loss", "token"

    def __init__(self) -> None:
        super().__init__()
        self.extra: dict[str, Any] = {}
        self.tokenizer: Any = None

    def bind(self, data: DataInfo) -> None:
        super().bind(data)
        text = data.text
        self.extra = {
            "block_size": text.max_length,
            "vocab_size": text.vocab_size,
            "bytes_per_token": text.bytes_per_token,
        }

    def loss(self, outputs: Tensor, batch: Batch) -> Tensor:
        return F.cross_entropy(outputs.flatten(0, 1), self.targets(batch).flatten())

    def metrics(self) -> dict[str, Any]:
        from trainer.tasks.metrics import NatsPerToken

        return {
            "perplexity": NatsPerToken(),
            "bits_per_byte": NatsPerToken(bytes_per_token=self.extra.get("bytes_per_token", 1.0)),
        }

    def update(self, metrics: Mapping[str, Any], outputs: Tensor, batch: Batch) -> None:
        targets = self.targets(batch)
        nats = F.cross_entropy(outputs.float().flatten(0, 1), targets.flatten(), reduction="sum")
        for metric in metrics.values():
            metric.update(nats, targets.numel())

    def units(self, batch: Batch) -> int:
        return self.targets(batch).numel()

    def check_outputs(self, outputs: Tensor, batch: Batch) -> str | None:
        targets = self.targets(batch)
        vocabulary = int(self.extra.get("vocab_size", 0))
        if outputs.ndim != 3 or outputs.shape[:2] != targets.shape or outputs.shape[-1] < vocabulary:
            return (
                f"task={self.name} needs [N, {targets.shape[-1]}, {vocabulary or 'vocabulary'}] logits (a "
                "score "
                f"per token of the vocabulary at every position), e.g. from model=gpt"
            )
        return None

    def dynamic_dims(self) -> dict[int, tuple[str, int]]:
        """The export takes any sequence length up to the block size, not just the example's."""
        return {1: ("length", int(self.extra.get("block_size", 1024)))}

    def state_dict(self) -> dict[str, Any]:
        return dict(self.extra)

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.extra.update(state or {})

    def use_tokenizer(self, tokenizer: Any) -> None:
        self.tokenizer = tokenizer

    def answer(self, outputs: Tensor, options: Mapping[str, Any]) -> list[dict[str, Any]]:
        """The most likely next tokens after each input sequence (its last position)."""
        k = option(options, "topk", 5, int, low=1)
        probabilities = torch.softmax(outputs[:, -1].float(), dim=-1)
        values, ids = probabilities.topk(min(k, probabilities.shape[-1]), dim=-1)
        tokenizer = self.tokenizer
        return [
            {
                "next": [
                    {"id": i, **({"token": tokenizer.decode([i])} if tokenizer else {}), "probability": p}
                    for p, i in zip(ps, row)
                ]
            }
            for ps, row in zip(values.tolist(), ids.tolist())
        ]
