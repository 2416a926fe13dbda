"""MODELS: each entry takes its own parameters (conf/model/<name>.yaml) and, by name, what the data gives
(num_classes, in_channels, image_size, vocab_size, block_size, max_length). A model may declare hooks
for the training run by inheriting trainer.core.hooks.ModelHooks."""

# ruff: noqa: F401  (importing the modules below registers the built-in models)
from trainer.core.hooks import ModelHooks
from trainer.core.registry import MODELS
from trainer.models import (
    actor_critic,
    fastnet,
    gpt,
    hf,
    resnet,
    segment,
    small,
    text_encoder,
    timm_model,
    tv,
)

__all__ = ["MODELS", "ModelHooks"]
