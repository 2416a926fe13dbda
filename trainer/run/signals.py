"""Stop signals: Ctrl-C, SIGTERM, SIGUSR1 and SIGUSR2 become "finish this step, save a checkpoint, exit
130/143", written where the loop runs: `with stop_on_signals(save) as stop:`."""

import contextlib
import signal
import threading
from collections.abc import Callable, Iterator

# SIGUSR1/SIGUSR2: what Slurm (--signal) and submitit send before a time limit or a preemption.
EXIT_CODES = {signal.SIGINT: 130, signal.SIGTERM: 143, signal.SIGUSR1: 143, signal.SIGUSR2: 143}


class StopRequested(Exception):
    """Raised by the loop at a step boundary after a stop signal; stop_on_signals turns it into the exit."""

    def __init__(self, signum: int) -> None:
        super().__init__(signal.Signals(signum).name)
        self.signum = signum


class Stop:
    """The stop signal received, if any: `signum` is None until one arrives."""

    signum: int | None = None


@contextlib.contextmanager
def stop_on_signals(on_stop: Callable[[int], None]) -> Iterator[Stop]:
    """Installs handlers that only record the signal in the yielded `Stop` (a handler runs between any
    two bytecodes of the main thread, even inside the log's write, so it must do nothing else). The loop
    checks `stop.signum` between optimizer steps and raises StopRequested; here `on_stop(signum)` saves
    the checkpoint, then a scheduler's own handler for the signal runs (submitit requeues the job on
    SIGUSR2, to resume from that checkpoint), then the process exits 130 (Ctrl-C) or 143."""
    stop = Stop()
    if threading.current_thread() is not threading.main_thread():  # signals reach the main thread only
        yield stop
        return

    def record(signum: int, frame: object) -> None:
        stop.signum = signum

    previous = {s: signal.signal(s, record) for s in EXIT_CODES}
    try:
        yield stop
    except StopRequested as requested:
        on_stop(requested.signum)
        handler = previous.get(requested.signum)
        if callable(handler) and requested.signum != signal.SIGINT:  # a scheduler's: requeue, then exit
            handler(requested.signum, None)
        raise SystemExit(EXIT_CODES[requested.signum]) from None
    finally:
        for s, handler in previous.items():
            signal.signal(s, handler)
