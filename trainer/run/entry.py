"""The run a config names: what `python -m trainer` and `trainer.fit` both do with a composed config."""

from pathlib import Path

from omegaconf import DictConfig

from trainer.config import validate
from trainer.core.cli import import_user_modules


def run_config(cfg: DictConfig, run_dir: Path) -> float | None:
    """The user's modules imported, the config checked, then the recipe `cfg.recipe` names, run in
    `run_dir`. Returns the best value of checkpoint.monitor (what sweeps optimise)."""
    import_user_modules(list(cfg.imports))
    validate(cfg)
    if cfg.recipe == "ppo":
        from trainer.run.ppo import PPO

        return PPO(cfg, run_dir).run()
    from trainer.run.recipe import Supervised

    return Supervised(cfg, run_dir).run()
