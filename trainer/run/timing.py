"""Where the time goes: a per-phase timer, written where the work is (`with timer.phase("train"):`,
`with timer.section("optimizer"):`), and the iterators that feed it. On a GPU the whole phases
synchronise (once each) and the per-step sections record CUDA events, so no step waits for the device
just to be timed."""

import contextlib
import time
from collections import defaultdict
from collections.abc import Iterable, Iterator
from pathlib import Path
from typing import Any

import torch


class PhaseTimer:
    """Wall-clock seconds per phase. Whole phases (an epoch, an evaluation) synchronise on CUDA before
    reading the clock, so the GPU's queued work counts in the phase that queued it; per-step sections
    (forward+backward, optimizer) record CUDA events instead, read once the epoch has synchronised."""

    SECTIONS = {"train": ("data wait", "forward+backward", "optimizer")}  # shown under their phase

    def __init__(self, device: torch.device) -> None:
        self.device = device
        self.seconds: dict[str, float] = defaultdict(float)
        self.calls: dict[str, int] = defaultdict(int)
        self.last: dict[str, float] = {}  # each phase's most recent duration
        self._events: list[tuple[str, Any, Any]] = []

    def now(self) -> float:
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)  # deliberate sync: once per timed phase, never per step
        return time.perf_counter()

    @contextlib.contextmanager
    def phase(self, name: str) -> Iterator[None]:
        """Times a whole phase (an epoch's training, an evaluation) into `name`, and `last[name]`."""
        start = self.now()
        try:
            yield
        finally:
            elapsed = self.now() - start
            self.settle()  # the per-step sections inside it, now that the device has caught up
            self.add(name, elapsed)

    def add(self, phase: str, seconds: float) -> None:
        self.seconds[phase] += seconds
        self.calls[phase] += 1
        self.last[phase] = seconds

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
    with profile(
        activities=activities,
        schedule=schedule(wait=1, warmup=1, active=steps, repeat=1),
        on_trace_ready=tensorboard_trace_handler(str(logdir)),
        record_shapes=True,
    ) as profiler:
        for item in items:
            yield item
            profiler.step()
