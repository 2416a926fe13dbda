"""The stop-signal guard: Ctrl-C, SIGTERM, SIGUSR1 and SIGUSR2 become "finish this step, save a
checkpoint, exit 130/143"."""

import functools
import logging
import signal
import threading
from collections.abc import Callable
from typing import Any, TypeVar

from trainer.core import distributed

log = logging.getLogger("trainer")
F = TypeVar("F", bound=Callable[..., Any])


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
    The handlers only set `self.stop_signal` (they log nothing: see request_stop); the loop checks it between optimizer steps and raises
    StopRequested, which lands here, where `self.save_checkpoint(wait=True)` runs before the exit."""

    @functools.wraps(fn)
    def wrapper(self, *args, **kwargs):
        if threading.current_thread() is not threading.main_thread():
            return fn(self, *args, **kwargs)

        def request_stop(signum, frame):
            # Only a flag: a handler runs between any two bytecodes of the main thread, which may be
            # inside the log handler's write; logging here again raised "reentrant call" there.
            self.stop_signal = signum

        previous = {s: signal.signal(s, request_stop) for s in EXIT_CODES}
        try:
            return fn(self, *args, **kwargs)
        except StopRequested as stop:
            log.warning("received %s: stopped at step %d, saving a checkpoint", stop, self.progress.step)
            path = self.save_checkpoint(wait=True)
            if distributed.is_main():
                launcher = (
                    f"torchrun --nproc_per_node={distributed.world_size()}"
                    if distributed.active()
                    else "python"
                )
                log.warning(
                    "saved %s after %s; resume with: %s -m trainer resume=%s",
                    path,
                    stop,
                    launcher,
                    path.parent.parent,
                )
            handler = previous.get(stop.signum)
            if callable(handler) and stop.signum != signal.SIGINT:  # a scheduler's: requeue, then exit
                handler(stop.signum, None)
            raise SystemExit(EXIT_CODES[stop.signum]) from None
        finally:
            for s, handler in previous.items():
                signal.signal(s, handler)

    return wrapper  # type: ignore[return-value]
