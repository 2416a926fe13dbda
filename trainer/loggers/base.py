"""The one small interface every logger keeps (metric_log.MetricLog says when each is called)."""

from pathlib import Path
from types import ModuleType
from typing import Any

from trainer.core.errors import not_installed, require


class Logger:
    """A sink for a run's metrics.

    `rewinds`: whether it can drop what a killed run logged after its last checkpoint (TensorBoard's
    purge_step, a CSV file rewritten): such a logger gets each point at once. A tracker that cannot
    (MLflow, W&B) gets a point only once a checkpoint covers its step, so a resumed run never sends a
    step twice; what it has not got when the process is killed, the resumed run sends."""

    name = "logger"
    rewinds = True
    needs: tuple[str, str] | None = None  # (the client module, the extra that installs it)

    def write(self, metrics: dict[str, float], step: int, at: int | None = None) -> None:
        """`at`: when the point was made (ms since the epoch), for a tracker that records it."""
        raise NotImplementedError

    def images(self, tag: str, grid: Any) -> None:
        """A (3, H, W) image grid in [0, 1]; a logger that shows no images ignores it."""

    def hparams(self, params: dict[str, Any], final: dict[str, float]) -> None:
        """The run's hyperparameters and final metrics, once it has finished."""

    def artifacts(self, run_dir: Path) -> None:
        """The finished run's export and best checkpoint, where the logger is asked to keep them."""

    def state_dict(self) -> dict[str, Any]:
        """What a resumed run needs to continue the same tracked run (saved in each checkpoint)."""
        return {}

    def close(self, finished: bool) -> None:
        """`finished`: the run completed (else it stopped on a signal or an error, to be resumed)."""


def needs_library(logger: "type[Logger]") -> str | None:
    """Why `logger` cannot run here (its client library is not installed), or None."""
    import importlib.util

    if logger.needs is None or importlib.util.find_spec(logger.needs[0]) is not None:
        return None
    return not_installed(
        f"logger={logger.name}", *logger.needs, hint=f"or leave {logger.name} out of logger=[...]"
    )


def require_library(logger: "type[Logger]") -> ModuleType:
    """The logger's client library, imported, or a one-line error naming the extra to install."""
    assert logger.needs is not None
    return require(
        logger.needs[0],
        f"logger={logger.name}",
        logger.needs[1],
        hint=f"or leave {logger.name} out of logger=[...]",
    )


def flatten(config: dict[str, Any], prefix: str = "") -> dict[str, Any]:
    """{"optimizer": {"lr": 0.1}} -> {"optimizer.lr": 0.1}: a tracker's flat parameter names."""
    flat: dict[str, Any] = {}
    for key, value in config.items():
        name = f"{prefix}{key}"
        if isinstance(value, dict) and value:
            flat.update(flatten(value, f"{name}."))
        else:
            flat[name] = value
    return flat
