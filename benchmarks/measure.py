"""Memory measurement shared by the benchmarks (they run as scripts: `python benchmarks/<name>.py`)."""

import json
import os
import subprocess
import sys
import threading
import time
from collections.abc import Callable
from pathlib import Path

SAME_PROCESS_HELP = (
    "run every configuration in this process (the test suite's tiny mode: it checks what is "
    "measured and saves an interpreter start per configuration; memory figures then overlap)"
)


def run_configuration(script: str, args: list[str], same_process: bool, run: Callable[[], dict]) -> dict:
    """One configuration's figures: from a fresh `python <script> <args>` (its memory its own, nothing
    left over from the others), or, with --same-process, from `run()` here."""
    if same_process:
        return run()
    out = subprocess.run([sys.executable, script, *args], capture_output=True, text=True)
    if out.returncode != 0:
        raise SystemExit(f"error: {Path(script).name} {' '.join(args)} failed:\n{out.stderr[-2000:]}")
    return json.loads(out.stdout.strip().splitlines()[-1])


def memory_mb(field: str = "Pss", workers: bool = True) -> float:
    """A /proc smaps_rollup field of this process, plus its worker processes. Pss splits shared pages
    between the processes that map them, so workers sharing the parent's data are not counted twice;
    Anonymous is memory no file backs (the heap), which the kernel cannot simply drop."""
    pids, total_kb = [os.getpid()], 0
    for task in Path("/proc/self/task").iterdir() if workers else ():
        pids += [int(pid) for pid in (task / "children").read_text().split()]
    for pid in pids:
        try:
            rollup = Path(f"/proc/{pid}/smaps_rollup").read_text()
        except OSError:  # a worker that just ended
            continue
        total_kb += next(int(line.split()[1]) for line in rollup.splitlines() if line.startswith(f"{field}:"))
    return total_kb / 1024


class PeakMemory:
    """Samples every 100 ms in a thread: `peak` is the highest PSS of the process and its workers,
    `peak_anonymous` the highest anonymous memory of the main process."""

    def __init__(self) -> None:
        self.peak, self.peak_anonymous, self.running = (
            memory_mb(),
            memory_mb("Anonymous", workers=False),
            True,
        )
        self.thread = threading.Thread(target=self._sample, daemon=True)
        self.thread.start()

    def _sample(self) -> None:
        while self.running:
            self.peak = max(self.peak, memory_mb())
            self.peak_anonymous = max(self.peak_anonymous, memory_mb("Anonymous", workers=False))
            time.sleep(0.1)

    def stop(self) -> float:
        self.running = False
        self.thread.join()
        return self.peak
