"""`POST /v1/generate` for a language-model run: {"prompt", "max_new_tokens", "temperature", "top_k",
"seed"} -> server-sent events, one `data: {"text": ...}` per decoded piece as the tokens are made, then
`data: {"done": true, "tokens": N}`.

The eager GPT is loaded from the run's best checkpoint (an exported program has no key/value cache)
with the run's own tokenizer. Each generation runs in a thread of its own, at most
serve.max_generations at once (503 past it); a prompt longer than serve.max_prompt_tokens (at most the
block size) or more than serve.max_new_tokens is a 422; a client that goes away stops its generation
at the next token."""

import asyncio
import json
import threading
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import torch
from aiohttp import web

from trainer.core.errors import UserError
from trainer.serving.bodies import ClientError


def _json_error(status: int, message: str, **headers: str) -> web.Response:
    return web.json_response({"error": message}, status=status, headers=headers or None)


class Generation:
    def __init__(
        self, run_dir: Path, max_prompt_tokens: int, max_new_tokens: int, max_generations: int
    ) -> None:
        from trainer.text.sampling import load_run

        self.model, self.tokenizer = load_run(run_dir, "best")
        self.max_prompt_tokens = min(max_prompt_tokens or self.model.block_size, self.model.block_size)
        self.max_new_tokens, self.max_generations = max_new_tokens, max_generations
        self.threads = ThreadPoolExecutor(max_workers=max_generations, thread_name_prefix="generate")
        self.running = 0

    def options(self, body: Any) -> dict[str, Any]:
        """The request's options, checked: ClientError with the 4xx status and message."""
        if not isinstance(body, dict) or not isinstance(body.get("prompt"), str):
            raise ClientError(400, 'the body must be JSON {"prompt": "...", "max_new_tokens": N, ...}')
        ids = self.tokenizer.encode(body["prompt"]) or self.tokenizer.encode("\n")
        if len(ids) > self.max_prompt_tokens:
            raise ClientError(
                422, f"the prompt is {len(ids)} tokens, over serve.max_prompt_tokens={self.max_prompt_tokens}"
            )
        wanted = {
            "max_new_tokens": (int, 64),
            "temperature": (float, 0.8),
            "top_k": (int, None),
            "seed": (int, 0),
        }
        found: dict[str, Any] = {"ids": ids}
        for key, (kind, default) in wanted.items():
            value = body.get(key, default)
            if value is not None and (
                isinstance(value, bool)
                or not isinstance(value, (int, float))
                or (kind is int and not float(value).is_integer())
            ):
                raise ClientError(
                    400,
                    f"{key} must be {'an integer' if kind is int else 'a number'}, got {str(value)[:20]!r}",
                )
            found[key] = None if value is None else kind(value)
        if not 1 <= found["max_new_tokens"] <= self.max_new_tokens:
            raise ClientError(
                422,
                f"max_new_tokens must be 1 to serve.max_new_tokens={self.max_new_tokens}, got "
                f"{found['max_new_tokens']}",
            )
        if found["temperature"] < 0 or (found["top_k"] is not None and found["top_k"] < 1):
            raise ClientError(422, "temperature must be 0 or more and top_k 1 or more")
        return found

    def run(self, options: dict[str, Any], send: Any, stopped: threading.Event) -> int:
        """In a worker thread: generates, handing each decodable piece of text to `send`."""
        from trainer.text.sampling import generate

        made: list[int] = []
        shown = ""
        for token in generate(
            self.model,
            torch.tensor(options["ids"]),
            options["max_new_tokens"],
            temperature=options["temperature"],
            top_k=options["top_k"],
            seed=options["seed"],
        ):
            if stopped.is_set():
                break
            made.append(token)
            text = self.tokenizer.decode(made)
            if not text.endswith("\ufffd"):  # a character whose bytes are not all there yet waits
                send(text[len(shown) :])
                shown = text
        rest = self.tokenizer.decode(made)[len(shown) :]
        if rest and not stopped.is_set():
            send(rest)
        return len(made)

    async def handle(self, request: web.Request) -> web.StreamResponse:
        try:
            body = json.loads(await request.read() or b"null")
        except (ValueError, RecursionError):
            return _json_error(400, 'malformed JSON; send {"prompt": "...", "max_new_tokens": N, ...}')
        try:
            options = self.options(body)
        except ClientError as e:
            return _json_error(e.status, str(e))
        if self.running >= self.max_generations:
            return _json_error(
                503,
                f"busy: serve.max_generations={self.max_generations} generations are running; try again",
                **{"Retry-After": "1"},
            )
        self.running += 1
        loop, pieces, stopped = asyncio.get_running_loop(), asyncio.Queue(), threading.Event()
        response = web.StreamResponse(
            headers={"Content-Type": "text/event-stream", "Cache-Control": "no-cache"}
        )
        try:
            await response.prepare(request)
            work = loop.run_in_executor(
                self.threads,
                self.run,
                options,
                lambda text: loop.call_soon_threadsafe(pieces.put_nowait, text),
                stopped,
            )
            while not work.done() or not pieces.empty():
                getter = asyncio.ensure_future(pieces.get())
                await asyncio.wait([getter, work], return_when=asyncio.FIRST_COMPLETED)
                if getter.done():
                    await response.write(f"data: {json.dumps({'text': getter.result()})}\n\n".encode())
                else:
                    getter.cancel()
            await response.write(f"data: {json.dumps({'done': True, 'tokens': await work})}\n\n".encode())
            await response.write_eof()
        except ConnectionError:
            stopped.set()  # the client went away: the thread stops at its next token
        except asyncio.CancelledError:
            stopped.set()
            raise
        finally:
            self.running -= 1
        return response


def generation_for(run_dir: Path, task_name: str, settings: Any) -> Generation | None:
    """The /v1/generate handler for a language-model run; None for other tasks."""
    if task_name != "language_model":
        return None
    try:
        return Generation(
            run_dir, settings.max_prompt_tokens, settings.max_new_tokens, settings.max_generations
        )
    except FileNotFoundError as e:
        raise UserError(
            f"run: {run_dir} lacks what generation needs ({e}); serve a finished language-model run"
        ) from None
