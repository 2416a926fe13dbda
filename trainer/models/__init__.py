"""MODELS: every entry takes num_classes and in_channels (interpolated from the dataset config)."""

from trainer.core.registry import MODELS
from trainer.models import fastnet, gpt, resnet, segment, small, text_encoder, timm_model, tv  # noqa: F401  (registers the built-in models)

__all__ = ["MODELS"]
