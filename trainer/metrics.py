"""Training metrics: running sums kept on the device (no host sync per step), and the sinks they are
reported to (TensorBoard and train.log on rank 0, nothing on the others), with the decorator that sends
a method's returned metrics there."""
import functools
import logging
from collections.abc import Callable
from pathlib import Path
from typing import Any, TypeVar

import torch
from torch import Tensor

from trainer.distributed import all_reduce

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

    def __init__(self, device: torch.device, size: int = 1, sums: list[float] | None = None, window: int = 1) -> None:
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
        sums = all_reduce(torch.cat([self.loss_sum.view(1), self.task_sums,
                                     torch.tensor([float(self.samples)], device=self.loss_sum.device)]))
        values = sums.tolist()
        return [*values[:-1], int(values[-1])]

    def first_nonfinite_step(self) -> int | None:
        """The step of the first non-finite loss since the sum was last finite, over all processes (they
        agree, so they stop together); a host synchronisation."""
        bad_here = not bool(self.loss_sum.isfinite())
        step = self._first_bad_step() if bad_here else None
        found = all_reduce(torch.tensor([float(step if step is not None else 2**53)], device=self.loss_sum.device),
                           "min").item()
        return None if found >= 2**53 else int(found)

    def _first_bad_step(self) -> int:
        window = min(self.count, len(self.recent))
        slots = [(self.count - window + i) % len(self.recent) for i in range(window)]
        bad = (~self.recent.isfinite()).tolist()
        return next((self.recent_steps[s] for s in slots if bad[s]), self.recent_steps[slots[0]] if slots else 0)


class NullMetricLog:
    """The metric sink of processes other than rank 0: rank 0 writes the metrics of all."""

    def write(self, metrics: dict[str, Any], step: int) -> None:
        pass

    def images(self, *args: Any) -> None:
        pass

    def hparams(self, *args: Any) -> None:
        pass

    def close(self) -> None:
        pass


class MetricLog:
    """TensorBoard events plus one readable line per report in train.log."""

    def __init__(self, logdir: Path, purge_step: int | None) -> None:
        from torch.utils.tensorboard import (
            SummaryWriter,  # imports TensorFlow-lite bits: load only when used
        )
        # purge_step drops the events a killed run wrote after its last checkpoint, so resumed curves
        # carry no duplicate points.
        self.writer = SummaryWriter(str(logdir), purge_step=purge_step)

    def write(self, metrics: dict[str, Any], step: int) -> None:
        scalars = {k: v for k, v in metrics.items() if k != "epoch" and isinstance(v, (int, float))}
        for key, value in scalars.items():
            self.writer.add_scalar(key, value, step)
        if "epoch" in metrics:
            log.info("epoch %d | %s", metrics["epoch"], "  ".join(_fmt(k, v) for k, v in scalars.items()))

    def images(self, tag: str, images: torch.Tensor, mean: list[float], std: list[float]) -> None:
        """A grid of normalised images, shown as the model sees them before normalisation."""
        from torchvision.utils import make_grid
        images = images * torch.tensor(std).view(-1, 1, 1) + torch.tensor(mean).view(-1, 1, 1)
        self.writer.add_image(tag, make_grid(images.clamp(0, 1), nrow=8), 0)

    def hparams(self, params: dict[str, Any], final: dict[str, float]) -> None:
        self.writer.add_hparams(params, {f"hparam/{k}": v for k, v in final.items()}, run_name=".")

    def close(self) -> None:
        self.writer.close()


def _fmt(key: str, value: float) -> str:
    if key == "lr":
        return f"lr {value:.3g}"
    if key == "images_per_sec":
        return f"{value:,.0f} img/s"
    if key.endswith("time_s"):
        return f"{value:.1f} s"
    return f"{key} {value:.4f}"
