"""hparams_search=optuna: the config resolvers a search needs (registered by the entry point)."""

import logging

from hydra.core.hydra_config import HydraConfig
from omegaconf import OmegaConf

from trainer.core.errors import UserError

log = logging.getLogger("trainer")


def register_resolvers() -> None:
    """The study's direction follows checkpoint.mode; trials get short, stable folders."""
    OmegaConf.register_new_resolver("optuna_direction", optuna_direction, replace=True)
    OmegaConf.register_new_resolver("trial_dirname", trial_dirname, replace=True)


def optuna_direction(mode: str | None, monitor: str | None = None, task: str = "classification") -> str:
    """The study's direction: the monitored metric's mode (checkpoint.mode, or the metric's own)."""
    from trainer.core.registry import TASKS
    from trainer.tasks.base import resolve_monitor

    monitor, mode = resolve_monitor(TASKS.build(task), monitor, mode)
    if mode is None:
        raise UserError(
            f"checkpoint.mode: task={task} cannot name its metrics before it sees the data; set "
            f"checkpoint.mode=max or min for the search's direction"
        )
    return "maximize" if mode == "max" else "minimize"


def trial_dirname() -> str:
    """A search trial's folder: its searched values, then a hash of all its overrides (the same trial
    gets the same folder when the search runs again; Hydra's override_dirname outgrows file names)."""
    import hashlib

    hydra = HydraConfig.get()
    searched = set(OmegaConf.select(hydra, "sweeper.params") or {})
    task = list(hydra.overrides.task)

    def short(value: str) -> str:
        try:
            return f"{float(value):.4g}"
        except ValueError:
            return value.replace("/", "_")

    named = [
        f"{key.split('.')[-1]}={short(value)}"
        for key, value in (o.split("=", 1) for o in task if "=" in o)
        if key in searched
    ]
    return ",".join([*named, hashlib.sha1("\n".join(sorted(task)).encode()).hexdigest()[:8]])
