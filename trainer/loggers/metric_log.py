"""Where reported metrics go: one readable line per epoch in train.log, and every logger of
`logger=[...]` (trainer/loggers), on rank 0; the other processes get a NullMetricLog (rank 0 reports the
reduced metrics of all)."""

import json
import logging
import threading
import time
from pathlib import Path
from typing import Any

import torch

from trainer.core.atomic import write_text

log = logging.getLogger("trainer")


class NullMetricLog:
    """The metric sink of processes other than rank 0: rank 0 writes the metrics of all."""

    def write(self, metrics: dict[str, Any], step: int) -> None:
        pass

    def images(self, *args: Any) -> None:
        pass

    def hparams(self, *args: Any) -> None:
        pass

    def checkpointed(self, step: int) -> None:
        pass

    def state_dict(self) -> dict[str, Any]:
        return {}

    def close(self, finished: bool = True, run_dir: Path | None = None) -> None:
        pass


class MetricLog:
    """One readable line per report in train.log, and every logger of `logger=[...]` (trainer.loggers).

    A logger that can rewind (TensorBoard, CSV) gets each point at once. A tracker that cannot (MLflow,
    W&B) gets a point once a durable checkpoint covers its step: the checkpoint writer calls
    `checkpointed(step)` when a file has landed. Until then the point is held, with the time it was
    made, and every checkpoint carries the held points. Once sent, the newest step sent is written to
    `sent_record`; a resumed run sends those of its checkpoint's points that the record does not cover (a
    process killed between a checkpoint landing and its points being sent), and later steps come from
    the resumed training. So no step reaches a tracker twice or never (W&B keeps every copy of a step)."""

    def __init__(
        self,
        loggers: list[Any],
        held: list[list[Any]] | None = None,
        resume_step: int | None = None,
        sent_record: Path | None = None,
    ) -> None:
        self.loggers = loggers
        self.trackers = [logger for logger in loggers if not logger.rewinds]
        self.lock = threading.Lock()  # the checkpoint writer's thread sends too
        self.sent_record = sent_record
        sent = read_sent_step(sent_record)
        # [step, time in ms, {metric: value}] not yet sent to the trackers
        self.held: list[list[Any]] = [
            list(point) for point in held or [] if resume_step is not None and sent < point[0] <= resume_step
        ]
        self.failed: set[str] = set()
        self.closed = False
        if resume_step is not None:
            self.checkpointed(resume_step)

    def write(self, metrics: dict[str, Any], step: int) -> None:
        scalars = {k: float(v) for k, v in metrics.items() if k != "epoch" and isinstance(v, (int, float))}
        for logger in self.loggers:
            if logger.rewinds:
                self._call(logger, "write", scalars, step)
        if self.trackers:
            with self.lock:
                self.held.append([step, int(time.time() * 1000), scalars])
        if "epoch" in metrics:
            log.info("epoch %d | %s", metrics["epoch"], "  ".join(_fmt(k, v) for k, v in scalars.items()))

    def checkpointed(self, step: float) -> None:
        """The trackers get the held points up to `step`, which a durable checkpoint covers."""
        with self.lock:
            ready = [point for point in self.held if point[0] <= step]
            self.held = [point for point in self.held if point[0] > step]
            for point_step, at, scalars in ready:
                for tracker in self.trackers:
                    self._call(tracker, "write", scalars, point_step, at)
            if ready and self.sent_record is not None:
                write_text(self.sent_record, json.dumps({"step": max(point[0] for point in ready)}))

    def _call(self, logger: Any, method: str, *args: Any) -> None:
        """A logger that fails (a tracking server down) is reported once and skipped; training goes on."""
        if logger.name in self.failed:
            return
        try:
            getattr(logger, method)(*args)
        except Exception as e:  # noqa: BLE001 - a tracker's error must not stop the run
            self.failed.add(logger.name)
            log.warning(
                "logger %s failed (%s: %s); the run goes on without it",
                logger.name,
                type(e).__name__,
                str(e)[:200],
            )

    def images(self, tag: str, images: torch.Tensor, mean: list[float], std: list[float]) -> None:
        """A grid of normalised images, shown as the model sees them before normalisation."""
        from torchvision.utils import make_grid

        images = images * torch.tensor(std).view(-1, 1, 1) + torch.tensor(mean).view(-1, 1, 1)
        grid = make_grid(images.clamp(0, 1), nrow=8)
        for logger in self.loggers:
            self._call(logger, "images", tag, grid)

    def hparams(self, params: dict[str, Any], final: dict[str, float]) -> None:
        for logger in self.loggers:
            self._call(logger, "hparams", params, final)

    def state_dict(self) -> dict[str, Any]:
        """Each logger's own (a tracker's run id) and the points not yet sent: saved in every checkpoint."""
        with self.lock:
            return {
                "state": {logger.name: logger.state_dict() for logger in self.loggers},
                "held": [list(point) for point in self.held],
            }

    def close(self, finished: bool = True, run_dir: Path | None = None) -> None:
        """A finished run sends everything (and the artifacts asked for); a stopped one keeps what no
        durable checkpoint covers, for the resumed run to send."""
        if self.closed:
            return
        self.closed = True
        if finished:
            self.checkpointed(float("inf"))
        for logger in self.loggers:
            if finished and run_dir is not None:
                self._call(logger, "artifacts", run_dir)
            self._call(logger, "close", finished)


def read_sent_step(record: Path | None) -> float:
    """The newest step the trackers have been sent, from its record (-1: none, or no record)."""
    try:
        return float(json.loads(record.read_text())["step"]) if record is not None else -1
    except (OSError, ValueError, KeyError, TypeError):
        return -1


def _fmt(key: str, value: float) -> str:
    if key == "lr":
        return f"lr {value:.3g}"
    if key == "images_per_sec":
        return f"{value:,.0f} img/s"
    if key.endswith("s_per_sec"):  # tokens_per_sec, a task's own unit
        return f"{value:,.0f} {key.removesuffix('s_per_sec')}s/s"
    if key.endswith("time_s"):
        return f"{value:.1f} s"
    if isinstance(value, int):  # a count: env_steps
        return f"{key} {value:,}"
    return f"{key} {value:.4f}"
