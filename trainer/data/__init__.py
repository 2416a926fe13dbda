"""DATASETS entries return a DataBundle; `build_loaders` turns one into DataLoaders."""
# ruff: noqa: F401  (importing the modules below registers the built-in datasets)

from trainer.core.registry import DATASETS
from trainer.data import (
    folder,
    hf,
    manifest,
    mapped,
    segmentation,
    streaming,
    synthetic,
    text,
    textclass,
    vision,
)
from trainer.data.arrays import DATA_FACTS, DataBundle, TextInfo
from trainer.data.loader import Loaders, build_loaders, sample_batch

__all__ = ["DATA_FACTS", "DATASETS", "DataBundle", "Loaders", "TextInfo", "build_loaders", "sample_batch"]
