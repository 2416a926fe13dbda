"""A config-driven PyTorch training framework on Hydra."""
__version__ = "0.1.0"

from trainer.data import DATASETS  # noqa: E402
from trainer.loop import Trainer  # noqa: E402
from trainer.models import MODELS  # noqa: E402
from trainer.optim import OPTIMIZERS, SCHEDULERS  # noqa: E402

__all__ = ["DATASETS", "MODELS", "OPTIMIZERS", "SCHEDULERS", "Trainer", "__version__"]
