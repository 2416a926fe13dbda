"""DATASETS entries return a DataBundle; `build_loaders` turns one into DataLoaders."""
from trainer.registry import Registry

DATASETS: Registry = Registry("dataset")

from trainer.data import folder, mapped, streaming, synthetic, vision  # noqa: E402,F401  (registers the built-in datasets)
from trainer.data.arrays import DataBundle  # noqa: E402
from trainer.data.loader import Loaders, build_loaders  # noqa: E402

__all__ = ["DATASETS", "DataBundle", "Loaders", "build_loaders"]
