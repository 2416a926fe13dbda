"""Dynamic micro-batching: inputs wait at most `max_wait_s` for others, up to `max_batch` per forward
pass, which runs in one worker thread so the event loop stays free.

The batcher must outlive any one request: every input is checked before it joins (so joining cannot
fail on a shape), a batch that fails anyway fails its own requests only, and the loop itself catches
everything but its cancellation. `running` says whether it is alive, for /healthz."""

import asyncio
import contextlib
import logging
import time
from collections import deque
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass

import torch

from trainer.serving.predictor import Predictor

log = logging.getLogger("trainer.serve")


class QueueFull(Exception):
    pass


class NotRunning(Exception):
    pass


class BatchFailed(Exception):
    """The model failed on a batch: every request of that batch gets this, the others are unaffected."""


@dataclass
class Waiting:
    inputs: torch.Tensor
    future: asyncio.Future
    arrived: float


class Batcher:
    def __init__(self, predictor: Predictor, max_batch: int, max_wait_s: float, max_queue: int) -> None:
        self.predictor, self.max_batch, self.max_wait_s, self.max_queue = (
            predictor,
            max_batch,
            max_wait_s,
            max_queue,
        )
        self.waiting: deque[Waiting] = deque()
        self.pending = 0  # inputs received and not yet answered
        self.wakeup = asyncio.Event()
        self.model_thread = ThreadPoolExecutor(max_workers=1, thread_name_prefix="model")
        self.batches = 0
        self.task: asyncio.Task | None = None

    @property
    def running(self) -> bool:
        return self.task is not None and not self.task.done()

    def start(self) -> None:
        self.task = asyncio.create_task(self.run())

    async def stop(self) -> None:
        if self.task is not None:
            self.task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self.task
        self.model_thread.shutdown(wait=False)

    async def predict(self, inputs: torch.Tensor, timeout_s: float) -> torch.Tensor:
        """Probabilities for a checked batch of inputs, computed together with whatever else is waiting.
        asyncio.TimeoutError after `timeout_s`; the input is then dropped if it has not run yet."""
        if not self.running:
            raise NotRunning
        if self.pending + len(inputs) > self.max_queue:
            raise QueueFull
        self.pending += len(inputs)
        try:
            future = asyncio.get_running_loop().create_future()
            self.waiting.append(Waiting(inputs, future, time.monotonic()))
            self.wakeup.set()
            return await asyncio.wait_for(future, timeout_s)  # on a timeout the future is cancelled
        finally:
            self.pending -= len(inputs)

    async def run(self) -> None:
        while True:
            try:
                taken = await self._next_batch()
                if taken:
                    await self._run_batch(taken)
            except asyncio.CancelledError:
                raise
            except Exception:  # a bug of ours: keep serving, and say so loudly
                log.exception("the batcher hit an error; it goes on with the next batch")

    async def _next_batch(self) -> list[Waiting]:
        """Waits for a first input, then up to max_wait_s for the batch to fill; drops inputs whose
        request has gone (timed out, disconnected)."""
        while not self.waiting:
            self.wakeup.clear()
            await self.wakeup.wait()
        deadline = self.waiting[0].arrived + self.max_wait_s
        while self._queued() < self.max_batch and (left := deadline - time.monotonic()) > 0:
            self.wakeup.clear()
            with contextlib.suppress(asyncio.TimeoutError):
                await asyncio.wait_for(self.wakeup.wait(), left)
        taken, size = [], 0
        while self.waiting:
            item = self.waiting[0]
            if not item.future.done():
                if taken and size + len(item.inputs) > self.max_batch:
                    break
                taken.append(item)
                size += len(item.inputs)
            self.waiting.popleft()
        return taken

    def _queued(self) -> int:
        return sum(len(w.inputs) for w in self.waiting)

    async def _run_batch(self, taken: list[Waiting]) -> None:
        self.batches += 1
        try:
            batch = torch.cat([w.inputs for w in taken])
            outputs = await asyncio.get_running_loop().run_in_executor(
                self.model_thread, self.predictor.outputs, batch
            )
            parts = outputs.split([len(w.inputs) for w in taken])
        except Exception as e:
            log.error("a batch of %d request(s) failed in the model: %s", len(taken), e)
            for w in taken:
                if not w.future.done():
                    w.future.set_exception(
                        BatchFailed(f"the model failed on this request's batch ({type(e).__name__})")
                    )
            return
        for w, part in zip(taken, parts):
            if not w.future.done():
                w.future.set_result(part)
