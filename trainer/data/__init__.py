"""DATASETS entries return a DataBundle; `build_loaders` turns one into DataLoaders."""
from trainer.data import folder, hf, manifest, mapped, segmentation, streaming, synthetic, text, textclass, vision  # noqa: F401  (registers the built-in datasets)
from trainer.data.arrays import DataBundle
from trainer.data.loader import Loaders, build_loaders, sample_batch
from trainer.registry import DATASETS

__all__ = ["DATASETS", "DataBundle", "Loaders", "build_loaders", "sample_batch"]
