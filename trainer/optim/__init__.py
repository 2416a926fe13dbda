"""The OPTIMIZERS and SCHEDULERS registries' built-in entries (importing this package registers them)."""

from trainer.core.registry import OPTIMIZERS, SCHEDULERS
from trainer.optim.optimizers import load_optimizer_state, param_groups
from trainer.optim.schedulers import plan_steps, rates_from_config

__all__ = [
    "OPTIMIZERS",
    "SCHEDULERS",
    "load_optimizer_state",
    "param_groups",
    "plan_steps",
    "rates_from_config",
]
