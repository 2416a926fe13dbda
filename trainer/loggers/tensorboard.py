"""`logger=tensorboard` (the default): event files in the run's tensorboard/ folder."""

from pathlib import Path
from typing import Any

from trainer.core.registry import LOGGERS
from trainer.loggers.base import Logger


@LOGGERS.register("tensorboard")
class TensorBoard(Logger):
    name = "tensorboard"

    def __init__(
        self, *, run_dir: Path, resume_step: int | None, state: dict[str, Any], config: dict[str, Any]
    ) -> None:
        from torch.utils.tensorboard import SummaryWriter  # imports TensorFlow-lite bits: only when used

        # purge_step drops the events a killed run wrote after its last checkpoint: no duplicate points.
        self.writer = SummaryWriter(
            str(run_dir / "tensorboard"), purge_step=None if resume_step is None else resume_step + 1
        )

    def write(self, metrics: dict[str, float], step: int, at: int | None = None) -> None:
        for key, value in metrics.items():
            self.writer.add_scalar(key, value, step)

    def images(self, tag: str, grid: Any) -> None:
        self.writer.add_image(tag, grid, 0)

    def hparams(self, params: dict[str, Any], final: dict[str, float]) -> None:
        self.writer.add_hparams(params, {f"hparam/{k}": v for k, v in final.items()}, run_name=".")

    def close(self, finished: bool) -> None:
        self.writer.close()
