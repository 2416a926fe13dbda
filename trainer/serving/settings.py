"""`python -m trainer.serve`'s settings (serve.*): each with its default, its range and its meaning."""

from dataclasses import dataclass, field
from typing import Optional

from omegaconf import MISSING

from trainer.core.fields import POSITIVE, Check, at_least, one_of, optional, setting
from trainer.core.images import DEFAULT_MAX_PIXELS

FORMATS = ("torch_export", "torchscript", "onnx")


@dataclass
class ServeSettings:
    host: str = setting("127.0.0.1", "the address to listen on (0.0.0.0: every interface)")
    port: int = setting(
        8000, "the port (0: any free one, printed)", Check(lambda v: 0 <= v <= 65535, "in 0..65535")
    )
    format: Optional[str] = setting(
        None, "the exported format to serve", optional(one_of(*FORMATS), "the first that passed parity")
    )
    topk: int = setting(5, "classification: classes per answer (a request may ask ?topk=N)", at_least(1))
    max_batch_size: int = setting(
        32, "inputs per forward pass and per request (1: no micro-batching)", at_least(1)
    )
    max_wait_ms: float = setting(5.0, "how long an input waits for others to batch with", at_least(0))
    max_body_bytes: int = setting(10 * 2**20, "the largest request body (413 past it)", at_least(1))
    max_image_pixels: int = setting(
        DEFAULT_MAX_PIXELS, "width x height, read from the header before decoding (413 past it)", at_least(1)
    )
    max_queue: int = setting(1024, "inputs waiting or running; past this, 503", at_least(1))
    max_connections: int = setting(
        0,
        "open connections; at the cap, idle ones are closed first",
        at_least(0, "as many as the file limit allows"),
    )
    idle_timeout_s: float = setting(
        15.0, "a connection that starts no request this long after its last: closed", POSITIVE
    )
    head_timeout_s: float = setting(
        5.0, "a request head not complete this long after its first byte: closed", POSITIVE
    )
    body_timeout_s: float = setting(30.0, "a request body that takes longer to arrive: 408", POSITIVE)
    request_timeout_s: float = setting(30.0, "an input that waits longer for the model: 503", POSITIVE)
    cache_size: int = setting(0, "an LRU of predictions keyed by the request's hash", at_least(0, "off"))
    decode_threads: int = setting(2, "threads that parse and decode request bodies", at_least(1))
    drain_timeout_s: float = setting(
        30.0, "on SIGTERM, how long to wait for requests already received", POSITIVE
    )
    max_prompt_tokens: int = setting(
        0, "/v1/generate: the longest prompt", at_least(0, "the model's block size")
    )
    max_new_tokens: int = setting(512, "/v1/generate: the most tokens one request may ask for", at_least(1))
    max_generations: int = setting(4, "/v1/generate: generations at once; past this, 503", at_least(1))


@dataclass
class ServeConfig:
    run: str = MISSING
    serve: ServeSettings = field(default_factory=ServeSettings)
