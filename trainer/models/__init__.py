"""MODELS: every entry takes num_classes and in_channels (interpolated from the dataset config)."""
from trainer.registry import Registry

MODELS: Registry = Registry("model")

from trainer.models import fastnet, resnet, small, tv  # noqa: E402,F401  (registers the built-in models)
