"""Request bodies to a checked batch of inputs. Every byte here is the client's, and hostile until
checked: each mistake becomes a ClientError (a 4xx with a message for the client), never a 500, and
none of the client's bytes is logged.

Two steps, so the event loop never parses: `read_body` (on the loop) only collects bytes, within
serve.max_body_bytes and serve.max_batch_size parts; `to_batch` (in a worker thread) parses JSON or
decodes images and checks the result's shape, type and values before it may join a batch."""

import hashlib
import json
import re
from dataclasses import dataclass

import torch
from aiohttp import BodyPartReader, hdrs, web
from aiohttp.http_exceptions import HttpProcessingError
from aiohttp.web_protocol import RequestPayloadError

from trainer.core.images import MEDIA_TYPES, ImageError, ImageTooLarge
from trainer.serving.predictor import InputError, Predictor

IMAGE_TYPES = set(MEDIA_TYPES) | {"application/octet-stream"}
PLAIN_ENCODINGS = {"", "identity", "binary", "7bit", "8bit"}
CHUNK = 1 << 16


class ClientError(Exception):
    """The client's mistake: its HTTP status and a one-line message for it."""

    def __init__(self, status: int, message: str) -> None:
        super().__init__(message)
        self.status = status


@dataclass
class Body:
    kind: str  # "json", "images" or "text"
    parts: list[tuple[bytes, str | None]]  # (bytes, the image format the client declared, if any)


async def read_body(request: web.Request, max_bytes: int, max_inputs: int, takes_text: bool = False) -> Body:
    """The request's bytes, collected; nothing is parsed or decoded here. `takes_text`: the model
    classifies text, sent as text/plain (one text) or JSON {"texts": [...]}."""
    kind = request.content_type
    if takes_text and kind not in ("text/plain", "application/json"):
        raise ClientError(
            415,
            f"content type {kind!r}: this model classifies text; send text/plain or "
            f'application/json {{"texts": [...]}}',
        )
    if (
        not takes_text
        and kind != "application/json"
        and not kind.startswith("multipart/")
        and kind not in IMAGE_TYPES
    ):
        raise ClientError(
            415,
            f"content type {kind!r}: send image/png, image/jpeg, image/webp, image/gif, "
            f"multipart form files or application/json",
        )
    check_declared_length(request, max_bytes)
    try:
        if kind.startswith("multipart/"):
            return Body("images", await _read_parts(request, max_bytes, max_inputs))
        data = await request.read()  # aiohttp stops at client_max_size (= max_bytes), also for chunked bodies
    except web.HTTPRequestEntityTooLarge:
        raise ClientError(413, f"the body is over serve.max_body_bytes={max_bytes:,}") from None
    except (HttpProcessingError, RequestPayloadError) as e:  # a broken chunked or compressed body
        raise ClientError(400, f"the body could not be read ({_short(e)})") from None
    if not data:
        raise ClientError(400, "the body is empty; send an image, multipart form files or JSON")
    if kind == "application/json":
        return Body("json", [(data, None)])
    if kind == "text/plain":
        return Body("text", [(data, None)])
    return Body("images", [(data, MEDIA_TYPES.get(kind))])


def check_declared_length(request: web.Request, max_bytes: int) -> None:
    """A Content-Length over the limit is refused before any of the body is read (or, with `Expect:
    100-continue`, sent)."""
    if request.content_length is not None and request.content_length > max_bytes:
        raise ClientError(
            413, f"the body of {request.content_length:,} bytes is over serve.max_body_bytes={max_bytes:,}"
        )


async def _read_parts(
    request: web.Request, max_bytes: int, max_inputs: int
) -> list[tuple[bytes, str | None]]:
    """Every part of a multipart form is one image (its field name does not matter)."""
    parts: list[tuple[bytes, str | None]] = []
    total = 0
    try:
        reader = await request.multipart()
        while (part := await reader.next()) is not None:
            if not isinstance(part, BodyPartReader):
                raise ClientError(400, "nested multipart forms are not supported; send the files in one form")
            if len(parts) == max_inputs:
                raise ClientError(
                    422,
                    f"at most serve.max_batch_size={max_inputs} images per request; the form has more parts",
                )
            encoding = {
                part.headers.get(h, "").lower()
                for h in (hdrs.CONTENT_ENCODING, hdrs.CONTENT_TRANSFER_ENCODING)
            }
            if not encoding <= PLAIN_ENCODINGS:
                raise ClientError(
                    415,
                    "encoded form parts (Content-Encoding, Content-Transfer-Encoding) are not "
                    "supported; send the files' bytes as they are",
                )
            data = bytearray()
            while chunk := await part.read_chunk(CHUNK):
                data += chunk
                total += len(chunk)
                if total > max_bytes:
                    raise ClientError(413, f"the form is over serve.max_body_bytes={max_bytes:,}")
            if not data:
                raise ClientError(400, f"form part {len(parts) + 1} is empty; attach the image's bytes")
            declared = part.headers.get(hdrs.CONTENT_TYPE, "").split(";")[0].strip().lower()
            parts.append((bytes(data), MEDIA_TYPES.get(declared)))
    except (ValueError, AssertionError, LookupError) as e:  # aiohttp's multipart parser on malformed input
        raise ClientError(400, f"malformed multipart form ({_short(e)})") from None
    if not parts:
        raise ClientError(400, "the multipart form holds no file")
    return parts


def to_batch(body: Body, predictor: Predictor) -> tuple[torch.Tensor, bytes]:
    """The body's inputs as one checked batch, and the bytes that identify them (the cache key). Runs
    in a worker thread: JSON parsing and image decoding stay off the event loop."""
    try:
        if body.kind == "json":
            return _tensor_from_json(body.parts[0][0], predictor), body.parts[0][0]
        if body.kind == "text":
            try:
                text = body.parts[0][0].decode("utf-8")
            except UnicodeDecodeError:
                raise ClientError(400, "the text is not UTF-8") from None
            return predictor.encode_texts([text]), body.parts[0][0]
        images = []
        for i, (data, declared) in enumerate(body.parts):
            which = f"image {i + 1}: " if len(body.parts) > 1 else ""
            try:
                images.append(predictor.decode(data, declared))
            except ImageTooLarge as e:
                raise ClientError(413, which + str(e)) from None
            except ImageError as e:
                raise ClientError(400, which + str(e)) from None
        identity = b"".join(hashlib.sha256(data).digest() for data, _ in body.parts)
        return predictor.check(torch.stack(images)), identity
    except InputError as e:
        raise ClientError(422, str(e)) from None


def _tensor_from_json(data: bytes, predictor: Predictor) -> torch.Tensor:
    try:
        payload = json.loads(data)
    except RecursionError:
        raise ClientError(400, "malformed JSON: nested too deeply") from None
    except ValueError as e:  # JSONDecodeError, UnicodeDecodeError, an integer of thousands of digits
        raise ClientError(400, f"malformed JSON: {_short(e)}") from None
    if predictor.takes_text:
        texts = payload.get("texts") if isinstance(payload, dict) else None
        if not isinstance(texts, list) or not texts or not all(isinstance(t, str) for t in texts):
            raise InputError('JSON must be an object with "texts": a list of strings')
        return predictor.encode_texts(texts)
    if not isinstance(payload, dict) or "inputs" not in payload:
        raise InputError('JSON must be an object with "inputs": a [C, H, W] tensor or an [N, C, H, W] batch')
    if payload.get("dtype", "float32") != "float32":
        raise InputError(f"dtype must be float32, got {str(payload['dtype'])[:20]!r}")
    inputs, dims = payload["inputs"], len(predictor.input_shape)
    if _depth(inputs, dims + 2) not in (dims, dims + 1):
        shape = ", ".join(map(str, predictor.input_shape))
        raise InputError(f"inputs must have shape [{shape}] or [N, {shape}] (nested lists of numbers)")
    try:
        tensor = torch.tensor(inputs, dtype=torch.float32)
    except (TypeError, ValueError, OverflowError, RuntimeError):
        raise InputError(
            "inputs must be a rectangular array of numbers, each within float32's range"
        ) from None
    return predictor.check(tensor)


def _depth(value: object, limit: int) -> int:
    """How deeply lists nest, following first elements, counted up to `limit`."""
    depth = 0
    while isinstance(value, list) and depth < limit:
        depth += 1
        value = value[0] if value else None
    return depth


def _short(error: Exception) -> str:
    """The parser's reason on one line (aiohttp's read "400, message:" and the reason below it)."""
    text = re.sub(r"^\d{3}, message:\s*", "", " ".join(str(error).split())) or type(error).__name__
    return text[:120]
