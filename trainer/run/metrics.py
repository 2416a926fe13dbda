"""Training metrics: running sums kept on the device (no host sync per step), and the sinks they are
reported to (train.log and the loggers of `logger=[...]` on rank 0, nothing on the others), with the
decorator that sends a method's returned metrics there."""

import functools
import json
import logging
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any, TypeVar

import torch
from torch import Tensor

from trainer.core.atomic import write_text
from trainer.core.distributed import all_reduce

log = logging.getLogger("trainer")
F = TypeVar("F", bound=Callable[..., Any])


def reports(fn: F) -> F:
    """Sends the metrics dict a method returns to `self.metrics` at the current step."""

    @functools.wraps(fn)
    def wrapper(self, *args, **kwargs):
        result = fn(self, *args, **kwargs)
        self.metrics.write(result, step=self.progress.step)
        return result

    return wrapper  # type: ignore[return-value]


class RunningMetrics:
    """The training loss sum, the task's running sums (e.g. correct predictions) and the sample count,
    accumulated on the device: a few small kernels a step and no host synchronisation until `totals()`
    or `first_nonfinite_step()`. The last `window` losses are kept, so when a periodic check finds the
    sum non-finite it can name the exact step."""

    def __init__(
        self, device: torch.device, size: int = 1, sums: list[float] | None = None, window: int = 1
    ) -> None:
        """`size`: how many sums the task keeps; `sums`: [loss sum, *task sums, count] to start from."""
        sums = list(sums) if sums else [0.0] * (size + 2)
        if len(sums) != size + 2:
            raise ValueError(f"expected {size + 2} running sums, got {len(sums)}")
        self.loss_sum = torch.tensor(float(sums[0]), device=device)
        self.task_sums = torch.tensor([float(v) for v in sums[1:-1]], device=device)
        self.keeps_task_sums = size > 0
        self.samples = int(sums[-1])
        self.recent = torch.zeros(window, device=device)
        self.recent_steps = [0] * window
        self.count = 0

    def add(self, loss: Tensor, task_sums: Tensor, samples: int, step: int = 0) -> None:
        """`loss`: the batch's mean loss (a device scalar); `task_sums`: the batch's share of the task's sums."""
        loss = loss.detach()
        self.loss_sum.add_(loss, alpha=samples)
        if self.keeps_task_sums:
            self.task_sums.add_(task_sums)
        slot = self.count % len(self.recent)
        self.recent[slot] = loss
        self.recent_steps[slot] = step
        self.count += 1
        self.samples += samples

    def totals(self) -> list[float]:
        """[loss sum, *task sums, samples], summed over all processes; a host synchronisation."""
        sums = all_reduce(
            torch.cat(
                [
                    self.loss_sum.view(1),
                    self.task_sums,
                    torch.tensor([float(self.samples)], device=self.loss_sum.device),
                ]
            )
        )
        values = sums.tolist()
        return [*values[:-1], int(values[-1])]

    def first_nonfinite_step(self) -> int | None:
        """The step of the first non-finite loss since the sum was last finite, over all processes (they
        agree, so they stop together); a host synchronisation."""
        bad_here = not bool(self.loss_sum.isfinite())
        step = self._first_bad_step() if bad_here else None
        found = all_reduce(
            torch.tensor([float(step if step is not None else 2**53)], device=self.loss_sum.device), "min"
        ).item()
        return None if found >= 2**53 else int(found)

    def _first_bad_step(self) -> int:
        window = min(self.count, len(self.recent))
        slots = [(self.count - window + i) % len(self.recent) for i in range(window)]
        bad = (~self.recent.isfinite()).tolist()
        return next(
            (self.recent_steps[s] for s in slots if bad[s]), self.recent_steps[slots[0]] if slots else 0
        )


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
    if key.endswith("time_s"):
        return f"{value:.1f} s"
    return f"{key} {value:.4f}"
