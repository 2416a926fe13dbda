"""MODELS: every entry takes num_classes and in_channels (interpolated from the dataset config)."""

from trainer.models import fastnet, gpt, resnet, segment, small, text_encoder, timm_model, tv  # noqa: F401  (registers the built-in models)
from trainer.registry import MODELS

__all__ = ["MODELS"]
