"""`python -m trainer.serve run=<run dir> [serve.port=8000] [serve.max_batch_size=32] ...`: the run's
exported model behind an HTTP API (aiohttp; the `serve` extra).

    POST /v1/predict   an image (PNG, JPEG, WebP or GIF bytes, raw or as multipart form files), or JSON
                       {"inputs": <a [C, H, W] tensor or an [N, C, H, W] batch, as nested lists>}
                       -> {"predictions": [<one answer per input, as the run's task gives it>, ...]}:
                       classification {"top_k": [{"class", "index", "probability"}, ...]} (?topk=N),
                       multilabel {"labels": [...], "scores"} (?threshold=T), regression {"values"},
                       segmentation {"pixels": {class: count}} (or, with ?format=png, the mask as a PNG);
                       text models take text/plain (one text) or JSON {"texts": [...]}: text classification
                       answers as classification, a language model {"next": [{"id", "token", "probability"}]}
    GET  /v1/metadata  the model, classes, input spec, preprocessing and exported formats
    POST /v1/generate  language models: {"prompt", "max_new_tokens", "temperature", "top_k", "seed"} -> the
                       continuation as server-sent events, a piece of text each, as it is made
    GET  /healthz      {"status": "ok"} and the number of requests waiting; 503 if the batcher has stopped

A client's mistake is a 4xx with a JSON {"error"} and nothing in the log: 400 malformed JSON, form or
body, an undecodable image or one whose bytes are not the declared type; 408 a body slower than
serve.body_timeout_s; 413 a body over serve.max_body_bytes or an image over serve.max_image_pixels
(read from its header, before decoding); 415 another content type; 422 a tensor of the wrong shape,
type or values, or more than serve.max_batch_size inputs. A request aiohttp cannot parse (a bad
Content-Length, a header over 8 KiB, an unknown method) is a JSON 400 too. 503 (with Retry-After) when
serve.max_queue inputs are waiting, when a request waited serve.request_timeout_s for the model, and for
a connection past serve.max_connections while every open one has a request being handled (otherwise
the oldest idle or slow connection is closed to make room). A connection idle between requests has
serve.idle_timeout_s to start the next one, and a request head serve.head_timeout_s to arrive whole.

Inputs are read on the event loop and parsed, decoded and checked in worker threads before they join a
batch (serving/); the model runs in one more thread. SIGTERM or Ctrl-C: stop accepting connections,
close the idle ones, answer every request whose head has arrived (up to serve.drain_timeout_s), exit 0.
"""

import asyncio
import functools
import hashlib
import logging
import signal
import sys
from collections import OrderedDict
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import torch
from omegaconf import OmegaConf

from trainer.core.cli import exit_codes
from trainer.core.errors import UserError, require
from trainer.core.fields import check_fields
from trainer.serving.predictor import Predictor
from trainer.serving.settings import ServeConfig, ServeSettings

log = logging.getLogger("trainer.serve")


def error(status: int, message: str, **headers: str):
    from aiohttp import web

    return web.json_response({"error": message}, status=status, headers=headers or None)


def build_app(predictor: Predictor, settings: ServeSettings, guard: Any = None):
    from aiohttp import web

    from trainer.serving.batcher import Batcher, BatchFailed, NotRunning, QueueFull
    from trainer.serving.bodies import ClientError, check_declared_length, read_body, to_batch

    batcher = Batcher(predictor, settings.max_batch_size, settings.max_wait_ms / 1000, settings.max_queue)
    decode_threads = ThreadPoolExecutor(max_workers=settings.decode_threads, thread_name_prefix="decode")
    cache: OrderedDict[str, torch.Tensor] = OrderedDict()

    async def read_inputs(request: web.Request) -> tuple[torch.Tensor, bytes]:
        try:
            body = await asyncio.wait_for(
                read_body(request, settings.max_body_bytes, settings.max_batch_size, predictor.takes_text),
                settings.body_timeout_s,
            )
        except TimeoutError:
            raise ClientError(
                408,
                f"the body did not arrive within serve.body_timeout_s={settings.body_timeout_s:g} seconds",
            ) from None
        inputs, identity = await asyncio.get_running_loop().run_in_executor(
            decode_threads, to_batch, body, predictor
        )
        if len(inputs) > settings.max_batch_size:
            raise ClientError(
                422,
                f"at most serve.max_batch_size={settings.max_batch_size} inputs per request, "
                f"got {len(inputs)}",
            )
        return inputs, identity

    async def outputs_of(inputs: torch.Tensor, identity: bytes) -> torch.Tensor:
        key = hashlib.sha256(identity).hexdigest()
        if settings.cache_size and key in cache:
            cache.move_to_end(key)
            return cache[key]
        outputs = await batcher.predict(inputs, settings.request_timeout_s)
        if settings.cache_size:
            cache[key] = outputs
            if len(cache) > settings.cache_size:
                cache.popitem(last=False)
        return outputs

    async def predict(request: web.Request) -> web.StreamResponse:
        options = {"topk": settings.topk, **request.query}  # each task reads the options it knows
        try:
            predictor.answer(predictor.example_outputs, options)  # a bad option is refused before any work
        except ValueError as e:
            return error(400, str(e))
        try:
            outputs = await outputs_of(*await read_inputs(request))
        except ClientError as e:
            return error(e.status, str(e))
        except QueueFull:
            return error(
                503, f"busy: {settings.max_queue} inputs are waiting; try again", **{"Retry-After": "1"}
            )
        except TimeoutError:
            return error(
                503,
                f"the model did not answer within serve.request_timeout_s="
                f"{settings.request_timeout_s:g} seconds; try again",
                **{"Retry-After": "1"},
            )
        except NotRunning:
            return error(503, "the batcher is not running; the server is unhealthy")
        except BatchFailed as e:
            return error(500, str(e))
        if request.query.get("format") == "png" and predictor.answers_masks:
            if len(outputs) != 1:
                return error(422, "format=png answers one input per request; send one image")
            return web.Response(body=predictor.task.png(outputs)[0], content_type="image/png")
        return web.json_response({"predictions": predictor.answer(outputs, options)})

    async def metadata(request: web.Request) -> web.Response:
        m = predictor.manifest
        return web.json_response(
            {
                "model": m.get("model"),
                "task": m.get("task", {"name": "classification"}),
                "classes": predictor.classes,
                "input": m["input"],
                "preprocess": m.get("preprocess"),
                "format": predictor.format,
                "formats": m["formats"],
                "ema": m.get("ema"),
                "tta": m.get("tta"),
                "max_batch_size": settings.max_batch_size,
            }
        )

    async def healthz(request: web.Request) -> web.Response:
        status = "ok" if batcher.running else "unhealthy: the batcher is not running"
        return web.json_response(
            {"status": status, "waiting": batcher.pending, "batches": batcher.batches},
            status=200 if batcher.running else 503,
        )

    async def expect_continue(request: web.Request) -> web.StreamResponse | None:
        """`Expect: 100-continue`: refuse a body that is announced too large before the client sends it."""
        try:
            check_declared_length(request, settings.max_body_bytes)
        except ClientError as e:
            return error(e.status, str(e))
        if request.headers.get("Expect", "").lower() != "100-continue":
            return error(417, "the only Expect this server knows is 100-continue")
        await request.writer.write(b"HTTP/1.1 100 Continue\r\n\r\n")
        request.writer.output_size = 0  # what aiohttp's own handler does: the response has not started
        return None

    async def run_batcher(app: web.Application) -> Any:
        batcher.start()
        yield
        await batcher.stop()  # after every request received has been answered
        decode_threads.shutdown(wait=False)

    @web.middleware
    async def json_errors(request: web.Request, handler: Any) -> web.StreamResponse:
        """aiohttp's own errors (404, 405) as JSON, like ours; a client that left is no error of ours; a
        bug of ours is logged with its traceback and answered 500."""
        try:
            return await handler(request)
        except web.HTTPException as e:
            if e.status < 400 or e.content_type == "application/json":
                raise
            return error(e.status, e.reason)
        except ConnectionError:  # the client went away while we read its body
            log.info("a client disconnected before its request was read")
            return error(400, "the connection was closed")
        except asyncio.CancelledError:
            raise
        except Exception:
            log.exception("unexpected error answering a %s request", request.method)  # no path: the client's
            return error(500, "internal error; the server's log has the details")

    middlewares = ([guard.middleware] if guard is not None else []) + [json_errors]
    app = web.Application(client_max_size=settings.max_body_bytes, middlewares=middlewares)

    async def no_generation(request: web.Request) -> web.Response:
        return error(404, f"this run's task is {predictor.task.name}; /v1/generate serves language models")

    from trainer.serving.generation import generation_for

    generation = generation_for(predictor.run_dir, predictor.task.name, settings)
    app.add_routes(
        [
            web.post("/v1/predict", predict, expect_handler=expect_continue),
            web.post("/v1/generate", generation.handle if generation else no_generation),
            web.get("/v1/metadata", metadata),
            web.get("/healthz", healthz),
        ]
    )
    app.cleanup_ctx.append(run_batcher)
    app[batcher_key()] = batcher  # for tests and embedding applications
    return app


@functools.cache
def batcher_key() -> Any:
    """The application key the batcher is kept under (aiohttp is imported only when serving)."""
    from aiohttp import web

    from trainer.serving.batcher import Batcher

    return web.AppKey("batcher", Batcher)


async def serve(predictor: Predictor, settings: ServeSettings, run: str) -> None:
    from aiohttp import web

    from trainer.serving.connections import (
        ConnectionGuard,
        QuietServerLog,
        fit_to_file_limit,
        quiet_accept_errors,
    )

    asyncio.get_running_loop().set_exception_handler(quiet_accept_errors)
    max_connections, backlog = fit_to_file_limit(settings.max_connections)
    guard = ConnectionGuard(max_connections, settings.idle_timeout_s, settings.head_timeout_s)
    app = build_app(predictor, settings, guard)
    runner = web.AppRunner(
        app,
        access_log=None,
        shutdown_timeout=settings.drain_timeout_s,
        keepalive_timeout=settings.idle_timeout_s,
        logger=QuietServerLog(),
    )
    await runner.setup()
    guard.attach(runner.server)
    site = web.TCPSite(runner, settings.host, settings.port, backlog=backlog)
    try:
        await site.start()
    except OSError as e:
        await runner.cleanup()
        raise UserError(
            f"serve.port: cannot listen on {settings.host}:{settings.port} ({e.strerror}); choose "
            f"another serve.port, or 0 for any free one"
        ) from None
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for signum in (signal.SIGTERM, signal.SIGINT):  # before the announcement: a stop from then on drains
        loop.add_signal_handler(signum, stop.set)
    port = runner.addresses[0][1]
    classes = f", {len(predictor.classes)} classes" if predictor.classes else ""
    print(
        f"serving {run} ({predictor.task.name}, {predictor.format}{classes}) on http://{settings.host}:{port}",
        flush=True,
    )
    await stop.wait()
    log.warning("stopping: answering the requests already received, then exiting")
    await site.stop()  # no new connections
    left = await guard.drain(settings.drain_timeout_s)
    if left:
        log.warning(
            "%d request(s) still unanswered after serve.drain_timeout_s=%g; closing them",
            left,
            settings.drain_timeout_s,
        )
    await runner.cleanup()  # the batcher stops


def main(argv: list[str] | None = None) -> None:
    logging.basicConfig(
        level=logging.WARNING, format="[%(asctime)s][%(levelname)s] %(message)s", datefmt="%H:%M:%S"
    )
    with exit_codes():
        require("aiohttp", "serve", "serve")
        cfg = OmegaConf.merge(OmegaConf.structured(ServeConfig), OmegaConf.from_dotlist(argv or sys.argv[1:]))
        if OmegaConf.is_missing(cfg, "run"):
            raise UserError("run: missing; usage: python -m trainer.serve run=<run dir> [serve.port=8000]")
        cfg = OmegaConf.to_object(cfg)
        s = cfg.serve
        check_fields(s, "serve.")
        predictor = Predictor(Path(cfg.run), s.format, s.max_image_pixels, "serve.max_image_pixels")
        asyncio.run(serve(predictor, s, cfg.run))


if __name__ == "__main__":
    main()
