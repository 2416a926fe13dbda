"""A config-driven PyTorch training framework on Hydra."""

__version__ = "0.2.0"

import importlib
from typing import Any

# Loaded on first use: `import trainer` (and every `python -m trainer.<command>`) stays cheap, and no
# part of the package has to import the package's whole public surface.
_EXPORTS = {
    "MODELS": "trainer.core.registry",
    "DATASETS": "trainer.core.registry",
    "OPTIMIZERS": "trainer.core.registry",
    "SCHEDULERS": "trainer.core.registry",
    "TASKS": "trainer.core.registry",
    "Task": "trainer.tasks.base",
    "Trainer": "trainer.run.loop",
    "compose": "trainer.api",
    "fit": "trainer.api",
}
__all__ = [*_EXPORTS, "__version__"]


def __getattr__(name: str) -> Any:
    if name in _EXPORTS:
        return getattr(importlib.import_module(_EXPORTS[name]), name)
    raise AttributeError(f"module 'trainer' has no attribute {name!r}")
