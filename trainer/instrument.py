"""The decorators the framework is built around (timing, reporting, guarding, retrying) and the
metric sinks they write to. Each decorator is small and acts on what the wrapped function returns."""
import contextlib
import functools
import logging
import random
import signal
import threading
import time
from collections import defaultdict
from collections.abc import Callable, Iterable, Iterator
from pathlib import Path
from typing import Any, TypeVar

import torch
from torch import Tensor

from trainer import distributed
from trainer.distributed import all_reduce

log = logging.getLogger("trainer")
F = TypeVar("F", bound=Callable[..., Any])


class PhaseTimer:
    """Wall-clock seconds per phase. Whole phases (an epoch, an evaluation) synchronise on CUDA before
    reading the clock, so the GPU's queued work counts in the phase that queued it; per-step sections
    (forward+backward, optimizer) record CUDA events instead, read once the epoch has synchronised."""

    SECTIONS = {"train": ("data wait", "forward+backward", "optimizer")}  # shown under their phase

    def __init__(self, device: torch.device) -> None:
        self.device = device
        self.seconds: dict[str, float] = defaultdict(float)
        self.calls: dict[str, int] = defaultdict(int)
        self._events: list[tuple[str, Any, Any]] = []

    def now(self) -> float:
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)  # deliberate sync: once per timed phase, never per step
        return time.perf_counter()

    def add(self, phase: str, seconds: float) -> None:
        self.seconds[phase] += seconds
        self.calls[phase] += 1

    @contextlib.contextmanager
    def section(self, phase: str) -> Iterator[None]:
        """Times a part of a step without synchronising: CUDA events on a GPU, the clock on a CPU
        (where the work is done by the time the call returns)."""
        if self.device.type != "cuda":
            start = time.perf_counter()
            yield
            self.add(phase, time.perf_counter() - start)
            return
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        yield
        end.record()
        self._events.append((phase, start, end))

    def settle(self) -> None:
        """Reads the recorded CUDA events; call after a synchronisation (the end of a timed phase)."""
        for phase, start, end in self._events:
            self.add(phase, start.elapsed_time(end) / 1000)
        self._events.clear()

    def table(self) -> str:
        nested = {s for sections in self.SECTIONS.values() for s in sections}
        total = sum(s for p, s in self.seconds.items() if p not in nested) or 1.0
        rows = [f"{'phase':<20}{'total s':>10}{'calls':>8}{'mean ms':>10}{'share':>8}"]

        def row(name: str, seconds: float, calls: int | None) -> str:
            mean = f"{1000 * seconds / calls:>10.1f}" if calls else f"{'':>10}"
            return f"{name:<20}{seconds:>10.2f}{calls or '':>8}{mean}{100 * seconds / total:>7.1f}%"
        phases = sorted(((p, s) for p, s in self.seconds.items() if p not in nested), key=lambda kv: -kv[1])
        for phase, seconds in phases:
            rows.append(row(phase, seconds, self.calls[phase]))
            parts = [s for s in self.SECTIONS.get(phase, ()) if s in self.seconds]
            for part in parts:
                rows.append(row(f"  {part}", self.seconds[part], self.calls[part]))
            if parts:
                rows.append(row("  other", max(seconds - sum(self.seconds[s] for s in parts), 0.0), None))
        return "\n".join(rows)


def timed(phase: str) -> Callable[[F], F]:
    """Times a method into `self.timer`; when it returns a metrics dict, adds `{phase}_time_s`, and
    `images_per_sec` where the dict counts the images it processed under "images"."""
    def decorate(fn: F) -> F:
        @functools.wraps(fn)
        def wrapper(self, *args, **kwargs):
            start = self.timer.now()
            result = fn(self, *args, **kwargs)
            elapsed = self.timer.now() - start
            self.timer.settle()  # the per-step sections inside it, now that the device has caught up
            self.timer.add(phase, elapsed)
            if isinstance(result, dict):
                result[f"{phase}_time_s"] = elapsed
                if "images" in result:
                    result["images_per_sec"] = result["images"] / max(elapsed, 1e-9)
            return result
        return wrapper  # type: ignore[return-value]
    return decorate


def timed_step(section: str) -> Callable[[F], F]:
    """Times a method called every step into `self.timer`'s `section`, without a host sync."""
    def decorate(fn: F) -> F:
        @functools.wraps(fn)
        def wrapper(self, *args, **kwargs):
            with self.timer.section(section):
                return fn(self, *args, **kwargs)
        return wrapper  # type: ignore[return-value]
    return decorate


def timed_iter(items: Iterable, timer: PhaseTimer, phase: str = "data wait") -> Iterator:
    """Yields from `items`, charging the time spent waiting for each one to `phase`. No sync here:
    on a GPU the wait for data overlaps queued compute, which is what it should measure."""
    iterator = iter(items)
    while True:
        start = time.perf_counter()
        try:
            item = next(iterator)
        except StopIteration:
            return
        timer.add(phase, time.perf_counter() - start)
        yield item


def profiled_iter(items: Iterable, logdir: Path, steps: int) -> Iterator:
    """Yields from `items` under torch.profiler: skips one step, warms up one, records `steps`, and
    writes the trace next to the run's TensorBoard events (open it there, or in Perfetto)."""
    from torch.profiler import ProfilerActivity, profile, schedule, tensorboard_trace_handler
    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if torch.cuda.is_available() else [])
    with profile(activities=activities, schedule=schedule(wait=1, warmup=1, active=steps, repeat=1),
                 on_trace_ready=tensorboard_trace_handler(str(logdir)), record_shapes=True) as profiler:
        for item in items:
            yield item
            profiler.step()


def reports(fn: F) -> F:
    """Sends the metrics dict a method returns to `self.metrics` at the current step."""
    @functools.wraps(fn)
    def wrapper(self, *args, **kwargs):
        result = fn(self, *args, **kwargs)
        self.metrics.write(result, step=self.progress.step)
        return result
    return wrapper  # type: ignore[return-value]


class StopRequested(Exception):
    """Raised at a step boundary after a stop signal, so the guard can checkpoint and exit."""

    def __init__(self, signum: int) -> None:
        super().__init__(signal.Signals(signum).name)
        self.signum = signum


# SIGUSR1/SIGUSR2: what Slurm (--signal) and submitit send before a time limit or a preemption.
EXIT_CODES = {signal.SIGINT: 130, signal.SIGTERM: 143, signal.SIGUSR1: 143, signal.SIGUSR2: 143}


def guarded(fn: F) -> F:
    """Turns Ctrl-C, SIGTERM, SIGUSR1 and SIGUSR2 into "finish this step, save a checkpoint, exit 130/143".

    When a scheduler had installed its own handler for the signal (submitit requeues the job on
    SIGUSR2), that handler runs after the checkpoint is saved, so the requeued job resumes from it.
    The handlers only set `self.stop_signal`; the loop checks it between optimizer steps and raises
    StopRequested, which lands here, where `self.save_checkpoint(wait=True)` runs before the exit."""
    @functools.wraps(fn)
    def wrapper(self, *args, **kwargs):
        if threading.current_thread() is not threading.main_thread():
            return fn(self, *args, **kwargs)
        def request_stop(signum, frame):
            log.warning("received %s: stopping at the next step boundary", signal.Signals(signum).name)
            self.stop_signal = signum
        previous = {s: signal.signal(s, request_stop) for s in EXIT_CODES}
        try:
            return fn(self, *args, **kwargs)
        except StopRequested as stop:
            path = self.save_checkpoint(wait=True)
            if distributed.is_main():
                launcher = f"torchrun --nproc_per_node={distributed.world_size()}" if distributed.active() else "python"
                log.warning("saved %s after %s; resume with: %s -m trainer resume=%s", path, stop, launcher,
                            path.parent.parent)
            handler = previous.get(stop.signum)
            if callable(handler) and stop.signum != signal.SIGINT:  # a scheduler's: requeue, then exit
                handler(stop.signum, None)
            raise SystemExit(EXIT_CODES[stop.signum]) from None
        finally:
            for s, handler in previous.items():
                signal.signal(s, handler)
    return wrapper  # type: ignore[return-value]


def retry(attempts: int, base_delay: float, exceptions: tuple[type[BaseException], ...]) -> Callable[[F], F]:
    """Retries with exponential backoff and full jitter; the last failure propagates."""
    def decorate(fn: F) -> F:
        @functools.wraps(fn)
        def wrapper(*args, **kwargs):
            for attempt in range(1, attempts + 1):
                try:
                    return fn(*args, **kwargs)
                except exceptions as e:
                    if attempt == attempts:
                        raise
                    delay = random.uniform(0, base_delay * 2 ** (attempt - 1))
                    log.warning("%s failed (%s); try %d of %d in %.1f s", fn.__name__, e, attempt + 1,
                                attempts, delay)
                    time.sleep(delay)
        return wrapper  # type: ignore[return-value]
    return decorate


class RunningMetrics:
    """Loss sum, correct predictions and images, accumulated on the device: a few small kernels a step
    and no host synchronisation until `totals()` or `first_nonfinite_step()`. The last `window` losses
    are kept, so when a periodic check finds the sum non-finite it can name the exact step."""

    def __init__(self, device: torch.device, sums: list[float] | None = None, window: int = 1) -> None:
        loss_sum, correct, images = sums or (0.0, 0.0, 0)
        self.loss_sum = torch.tensor(float(loss_sum), device=device)
        self.correct = torch.tensor(float(correct), device=device)
        self.images = int(images)
        self.recent = torch.zeros(window, device=device)
        self.recent_steps = [0] * window
        self.count = 0

    def add(self, loss: Tensor, logits: Tensor, labels: Tensor, step: int = 0) -> None:
        """`loss`: the batch's mean loss (a device scalar)."""
        loss = loss.detach()
        self.loss_sum.add_(loss, alpha=len(labels))
        self.correct.add_((logits.detach().argmax(1) == labels).sum())
        slot = self.count % len(self.recent)
        self.recent[slot] = loss
        self.recent_steps[slot] = step
        self.count += 1
        self.images += len(labels)

    def totals(self) -> list[float]:
        """[loss sum, correct, images], summed over all processes; a host synchronisation."""
        sums = all_reduce(torch.stack([self.loss_sum, self.correct,
                                       torch.tensor(float(self.images), device=self.loss_sum.device)]))
        loss_sum, correct, images = sums.tolist()
        return [loss_sum, correct, int(images)]

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
