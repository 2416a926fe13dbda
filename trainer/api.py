"""The Python API to build and fit a run, as `python -m trainer` does from a shell:

    import trainer
    cfg = trainer.compose("model=cnn", "dataset=synthetic", "trainer.max_epochs=1")
    metrics = trainer.fit(cfg, "runs/first")       # the run dir: checkpoints/, export/, metrics.json

`compose` takes the command line's overrides (groups and keys; no `hydra.*` keys, no `-m`); `fit` runs the
recipe the config names, in this process, and returns what metrics.json holds. A mistake raises
`trainer.core.errors.UserError` with the one-line message the command would print."""

import json
from pathlib import Path

from omegaconf import DictConfig

from trainer.config import register_configs
from trainer.core.registry import CONF
from trainer.sweep.search import register_resolvers


def compose(*overrides: str, config_dir: str | Path | None = None) -> DictConfig:
    """The run's config from the package's config groups (and `config_dir`'s, searched first, as
    `hydra.searchpath=[file://...]` adds them), with `overrides` applied as on the command line."""
    from hydra import compose as hydra_compose
    from hydra import initialize_config_dir

    register_configs()
    register_resolvers()
    extra = [f"hydra.searchpath=[file://{Path(config_dir).resolve()}]"] if config_dir else []
    with initialize_config_dir(config_dir=str(CONF), version_base="1.3"):
        return hydra_compose(config_name="config", overrides=[*extra, *overrides])


def fit(cfg: DictConfig, run_dir: str | Path) -> dict:
    """Train, test the best checkpoint and export, into `run_dir` (with `resume=auto` among the overrides,
    continuing from its newest checkpoint), and return the final metrics (metrics.json)."""
    from trainer.run.entry import run_config

    run_dir = Path(run_dir)
    run_dir.mkdir(parents=True, exist_ok=True)
    run_config(cfg, run_dir)
    return json.loads((run_dir / "metrics.json").read_text())
