"""`python -m trainer.serve run=<run dir> [serve.port=8000] [serve.max_batch_size=32] ...`: the run's
exported model behind an HTTP API (aiohttp; the `serve` extra).

    POST /v1/predict   an image (PNG, JPEG or WebP bytes, raw or as multipart form files), or JSON
                       {"inputs": <a [C, H, W] tensor or an [N, C, H, W] batch, as nested lists>}
                       -> {"predictions": [{"top_k": [{"class", "index", "probability"}, ...]}, ...]}
    GET  /v1/metadata  the model, classes, input spec, preprocessing and exported formats
    GET  /healthz      {"status": "ok"} and the number of requests waiting

Requests are checked, and images decoded, before they join a batch, so a bad request fails alone:
400 malformed JSON or an undecodable image, 413 a body over serve.max_body_bytes, 415 another content
type, 422 a tensor of the wrong shape or type, 503 when serve.max_queue inputs are already waiting.
Dynamic micro-batching: inputs wait at most serve.max_wait_ms for others, up to serve.max_batch_size
per forward pass, which runs in a worker thread so the event loop never blocks. SIGTERM or Ctrl-C: stop
accepting connections, answer every request already received, then exit 0.
"""
import asyncio
import contextlib
import hashlib
import json
import logging
import signal
import sys
import time
from collections import OrderedDict, deque
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Optional

import torch
from omegaconf import MISSING, OmegaConf

from trainer.cli import exit_codes
from trainer.errors import UserError
from trainer.inference import InputError, Predictor

log = logging.getLogger("trainer.serve")
IMAGE_TYPES = {"image/png", "image/jpeg", "image/webp", "application/octet-stream"}


@dataclass
class ServeSettings:
    host: str = "127.0.0.1"
    port: int = 8000  # 0: any free port (printed when serving)
    format: Optional[str] = None  # torch_export, torchscript, onnx; default: the first that passed parity
    topk: int = 5
    max_batch_size: int = 32  # inputs per forward pass; 1 turns micro-batching off
    max_wait_ms: float = 5.0  # how long an input waits for others to batch with
    max_body_bytes: int = 10 * 2**20
    max_queue: int = 1024  # inputs waiting or running; past this, 503
    cache_size: int = 0  # an LRU of predictions keyed by the request's hash; 0: off
    decode_threads: int = 2
    drain_timeout_s: float = 30.0  # on SIGTERM, how long to wait for requests already received


@dataclass
class ServeConfig:
    run: str = MISSING
    serve: ServeSettings = field(default_factory=ServeSettings)


class QueueFull(Exception):
    pass


@dataclass
class Waiting:
    inputs: torch.Tensor
    future: asyncio.Future
    arrived: float


class Batcher:
    """Collects inputs into batches (up to max_batch, or whatever arrived within max_wait of the first)
    and runs each batch in one worker thread."""

    def __init__(self, predictor: Predictor, max_batch: int, max_wait_s: float, max_queue: int) -> None:
        self.predictor, self.max_batch, self.max_wait_s, self.max_queue = predictor, max_batch, max_wait_s, max_queue
        self.waiting: deque[Waiting] = deque()
        self.waiting_inputs = 0
        self.pending = 0  # inputs received and not yet answered
        self.wakeup = asyncio.Event()
        self.model_thread = ThreadPoolExecutor(max_workers=1, thread_name_prefix="model")
        self.batches = 0

    async def predict(self, inputs: torch.Tensor) -> torch.Tensor:
        """Probabilities for a batch of inputs, computed together with whatever else is waiting."""
        if self.pending + len(inputs) > self.max_queue:
            raise QueueFull
        self.pending += len(inputs)
        try:
            future = asyncio.get_running_loop().create_future()
            self.waiting.append(Waiting(inputs, future, time.monotonic()))
            self.waiting_inputs += len(inputs)
            self.wakeup.set()
            return await future
        finally:
            self.pending -= len(inputs)

    async def run(self) -> None:
        loop = asyncio.get_running_loop()
        while True:
            while not self.waiting:
                self.wakeup.clear()
                await self.wakeup.wait()
            deadline = self.waiting[0].arrived + self.max_wait_s
            while self.waiting_inputs < self.max_batch and (left := deadline - time.monotonic()) > 0:
                self.wakeup.clear()
                with contextlib.suppress(asyncio.TimeoutError):
                    await asyncio.wait_for(self.wakeup.wait(), left)
            taken = [self.waiting.popleft()]
            while self.waiting and sum(len(w.inputs) for w in taken) + len(self.waiting[0].inputs) <= self.max_batch:
                taken.append(self.waiting.popleft())
            self.waiting_inputs -= sum(len(w.inputs) for w in taken)
            batch = torch.cat([w.inputs for w in taken])
            self.batches += 1
            try:
                probabilities = await loop.run_in_executor(self.model_thread, self.predictor.probabilities, batch)
            except Exception as e:  # the model itself failed: every request of this batch learns why
                for w in taken:
                    if not w.future.done():
                        w.future.set_exception(e)
                continue
            for w, part in zip(taken, probabilities.split([len(w.inputs) for w in taken])):
                if not w.future.done():
                    w.future.set_result(part)


def error(status: int, message: str):
    from aiohttp import web
    return web.json_response({"error": message}, status=status)


def http_error(kind: type, message: str) -> Exception:
    """An aiohttp HTTP exception carrying our JSON error body."""
    return kind(text=json.dumps({"error": message}), content_type="application/json")


def build_app(predictor: Predictor, settings: ServeSettings):
    from aiohttp import web

    batcher = Batcher(predictor, settings.max_batch_size, settings.max_wait_ms / 1000, settings.max_queue)
    decode_threads = ThreadPoolExecutor(max_workers=settings.decode_threads, thread_name_prefix="decode")
    cache: OrderedDict[str, torch.Tensor] = OrderedDict()

    async def read_inputs(request: web.Request) -> tuple[torch.Tensor, bytes]:
        """The request's inputs as one batch, checked, and the bytes that identify them (the cache key)."""
        loop = asyncio.get_running_loop()
        if request.content_type == "application/json":
            body = await request.read()
            try:
                payload = json.loads(body)
            except (json.JSONDecodeError, UnicodeDecodeError) as e:
                raise http_error(web.HTTPBadRequest, f"malformed JSON: {e}") from None
            if not isinstance(payload, dict) or "inputs" not in payload:
                raise InputError('JSON must be an object with "inputs": a [C, H, W] tensor or an [N, C, H, W] batch')
            if payload.get("dtype", "float32") != "float32":
                raise InputError(f"dtype must be float32, got {payload['dtype']!r}")
            try:
                tensor = torch.tensor(payload["inputs"], dtype=torch.float32)
            except (TypeError, ValueError) as e:
                raise InputError(f"inputs must be a rectangular array of numbers ({e})") from None
            batch = predictor.check(tensor)
            return batch, body
        if request.content_type.startswith("multipart/"):
            form = await request.post()
            files = [f.file.read() for f in form.values() if hasattr(f, "file")]
            if not files:
                raise InputError("the multipart form holds no file")
        elif request.content_type in IMAGE_TYPES:
            files = [await request.read()]
        else:
            raise http_error(web.HTTPUnsupportedMediaType, f"content type {request.content_type!r}: send image/png, "
                                                           f"image/jpeg, image/webp, multipart form files or JSON")
        try:
            images = [await loop.run_in_executor(decode_threads, predictor.decode, data) for data in files]
        except InputError as e:  # an undecodable image: a bad request, not a bad tensor
            raise http_error(web.HTTPBadRequest, str(e)) from None
        return torch.stack(images), b"".join(hashlib.sha256(f).digest() for f in files)

    async def predict(request: web.Request) -> web.Response:
        try:
            topk = int(request.query.get("topk", settings.topk))
        except ValueError:
            return error(400, f"topk must be an integer, got {request.query['topk']!r}")
        if topk < 1:
            return error(400, f"topk must be 1 or more, got {topk}")
        try:
            inputs, identity = await read_inputs(request)
        except InputError as e:
            return error(422, str(e))
        if len(inputs) > settings.max_batch_size:
            return error(422, f"at most serve.max_batch_size={settings.max_batch_size} inputs per request, "
                              f"got {len(inputs)}")
        key = hashlib.sha256(identity).hexdigest()
        probabilities = cache.get(key) if settings.cache_size else None
        if probabilities is None:
            try:
                probabilities = await batcher.predict(inputs)
            except QueueFull:
                return web.json_response({"error": f"busy: {settings.max_queue} inputs are waiting; try again"},
                                         status=503, headers={"Retry-After": "1"})
            if settings.cache_size:
                cache[key] = probabilities
                if len(cache) > settings.cache_size:
                    cache.popitem(last=False)
        else:
            cache.move_to_end(key)
        return web.json_response({"predictions": [{"top_k": t} for t in predictor.top_k(probabilities, topk)]})

    async def metadata(request: web.Request) -> web.Response:
        m = predictor.manifest
        return web.json_response({"model": m.get("model"), "classes": predictor.classes, "input": m["input"],
                                  "preprocess": m.get("preprocess"), "format": predictor.format,
                                  "formats": m["formats"], "ema": m.get("ema"), "tta": m.get("tta"),
                                  "max_batch_size": settings.max_batch_size})

    async def healthz(request: web.Request) -> web.Response:
        return web.json_response({"status": "ok", "waiting": batcher.pending, "batches": batcher.batches})

    async def start_batcher(app: web.Application) -> Any:
        task = asyncio.create_task(batcher.run())
        yield
        task.cancel()  # after every request received has been answered
        with contextlib.suppress(asyncio.CancelledError):
            await task
        decode_threads.shutdown(wait=False)
        batcher.model_thread.shutdown(wait=False)

    @web.middleware
    async def json_errors(request: web.Request, handler: Any) -> web.StreamResponse:
        """aiohttp's own errors (413 for a body over client_max_size, 404, 405) as JSON, like ours."""
        try:
            return await handler(request)
        except web.HTTPException as e:
            if e.status < 400 or e.content_type == "application/json":
                raise
            reason = f"the body is over serve.max_body_bytes={settings.max_body_bytes}" if e.status == 413 else e.reason
            return web.json_response({"error": reason}, status=e.status)

    app = web.Application(client_max_size=settings.max_body_bytes, middlewares=[json_errors])  # larger bodies: 413
    app.add_routes([web.post("/v1/predict", predict), web.get("/v1/metadata", metadata),
                    web.get("/healthz", healthz)])
    app.cleanup_ctx.append(start_batcher)
    app["batcher"] = batcher
    return app


async def serve(predictor: Predictor, settings: ServeSettings, run: str) -> None:
    from aiohttp import web
    app = build_app(predictor, settings)
    runner = web.AppRunner(app, access_log=None, shutdown_timeout=settings.drain_timeout_s)
    await runner.setup()
    site = web.TCPSite(runner, settings.host, settings.port)
    try:
        await site.start()
    except OSError as e:
        await runner.cleanup()
        raise UserError(f"serve.port: cannot listen on {settings.host}:{settings.port} ({e.strerror}); choose "
                        f"another serve.port, or 0 for any free one") from None
    port = runner.addresses[0][1]
    print(f"serving {run} ({predictor.format}, {len(predictor.classes)} classes) on http://{settings.host}:{port}",
          flush=True)
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for signum in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(signum, stop.set)
    await stop.wait()
    log.warning("stopping: answering the requests already received, then exiting")
    await runner.cleanup()  # stops listening, waits for requests in flight, then the batcher stops


def main(argv: list[str] | None = None) -> None:
    logging.basicConfig(level=logging.WARNING, format="[%(asctime)s][%(levelname)s] %(message)s", datefmt="%H:%M:%S")
    with exit_codes():
        try:
            import aiohttp  # noqa: F401
        except ImportError:
            raise UserError('serve: needs aiohttp: pip install -e ".[serve]"') from None
        cfg = OmegaConf.merge(OmegaConf.structured(ServeConfig), OmegaConf.from_dotlist(argv or sys.argv[1:]))
        if OmegaConf.is_missing(cfg, "run"):
            raise UserError("run: missing; usage: python -m trainer.serve run=<run dir> [serve.port=8000]")
        cfg = OmegaConf.to_object(cfg)
        s = cfg.serve
        for key, value, ok in (("max_batch_size", s.max_batch_size, s.max_batch_size >= 1),
                               ("max_wait_ms", s.max_wait_ms, s.max_wait_ms >= 0),
                               ("max_queue", s.max_queue, s.max_queue >= 1),
                               ("max_body_bytes", s.max_body_bytes, s.max_body_bytes >= 1),
                               ("cache_size", s.cache_size, s.cache_size >= 0), ("topk", s.topk, s.topk >= 1),
                               ("port", s.port, 0 <= s.port <= 65535)):
            if not ok:
                raise UserError(f"serve.{key}: out of range, got {value!r}")
        predictor = Predictor(Path(cfg.run), s.format)
        asyncio.run(serve(predictor, s, cfg.run))


if __name__ == "__main__":
    main()
