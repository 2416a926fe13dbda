"""Bytes from outside are hostile: mutated and truncated PNG, JPEG, GIF and WebP files through every
path that decodes images (the decoder, predict, serve, the image-folder and streaming loaders), tiny
files that declare huge images, and the HTTP requests a careless or malicious client sends. Nothing
may crash or hang the process, a client's mistake is a 4xx with a JSON error, the server's log holds
no traceback and none of the client's bytes, and memory stays within the pixel limit."""

import asyncio
import io
import json
import random
import re
import signal
import socket
import struct
import threading
import time
import zlib
from contextlib import contextmanager
from pathlib import Path

import forkrun
import numpy as np
import pytest
import torch
from conftest import ROOT, TINY_RUN, run_trainer, write_imagefolder
from PIL import Image

from trainer import DATASETS
from trainer.core.images import ImageError, ImageTooLarge, decode_image
from trainer.data import build_loaders
from trainer.data.shard import write_shards

MARKER = b"CLIENT-BYTES-7f3a"  # sent inside hostile requests; must never reach the server's log


def originals() -> dict[str, bytes]:
    pixels = np.random.default_rng(0).integers(0, 256, (24, 20, 3), dtype=np.uint8)
    encoded = {}
    for fmt in ("PNG", "JPEG", "GIF", "WEBP"):
        buffer = io.BytesIO()
        Image.fromarray(pixels).save(buffer, fmt)
        encoded[fmt] = buffer.getvalue()
    return encoded


def mutants(data: bytes, n: int, seed: int) -> list[bytes]:
    """n copies with 1-4 random bytes replaced, then truncations (libpng's "Not enough image data")."""
    rng = random.Random(seed)
    out = []
    for _ in range(n):
        copy = bytearray(data)
        for _ in range(rng.randint(1, 4)):
            copy[rng.randrange(len(copy))] = rng.randrange(256)
        out.append(bytes(copy))
    return out + [data[:cut] for cut in (8, 16, 33, len(data) // 2, len(data) - 12, len(data) - 1)]


def huge_png(side: int = 12000) -> bytes:
    """A valid greyscale PNG of side x side zero pixels: ~150 KB on disk, side² bytes decoded."""
    raw = zlib.compress(b"\x00" * (side + 1) * side, 9)  # each row: filter byte 0, then the pixels

    def chunk(kind: bytes, body: bytes) -> bytes:
        return struct.pack(">I", len(body)) + kind + body + struct.pack(">I", zlib.crc32(kind + body))

    return (
        b"\x89PNG\r\n\x1a\n"
        + chunk(b"IHDR", struct.pack(">IIBBBBB", side, side, 8, 0, 0, 0, 0))
        + chunk(b"IDAT", raw)
        + chunk(b"IEND", b"")
    )


def huge_gif() -> bytes:
    """35 bytes: a 65535 x 65535 canvas (12 GiB as RGB) holding one 1 x 1 frame."""
    return (
        b"GIF89a"
        + struct.pack("<HHBBB", 65535, 65535, 0, 0, 0)
        + b"\x2c"
        + struct.pack("<HHHHB", 0, 0, 1, 1, 0)
        + b"\x02\x02\x44\x01\x00"
        + b"\x3b"
    )


def animated_gif() -> bytes:
    frames = [Image.fromarray(np.full((20, 20, 3), 60 * i, np.uint8)) for i in range(3)]
    buffer = io.BytesIO()
    frames[0].save(buffer, "GIF", save_all=True, append_images=frames[1:])
    return buffer.getvalue()


FUZZ = [
    (fmt, i, data) for fmt, original in originals().items() for i, data in enumerate(mutants(original, 60, 1))
]


def test_the_decoder_answers_every_mutant_with_an_image_or_an_image_error():
    outcomes = {"ok": 0, "error": 0}
    for fmt, i, data in FUZZ:
        try:
            assert decode_image(data, 32, 3).shape == (3, 32, 32), (fmt, i)
            outcomes["ok"] += 1
        except ImageError:
            outcomes["error"] += 1
    assert outcomes["error"] > 50 and outcomes["ok"] > 50  # both kinds occur: the mutants do damage
    with pytest.raises(ImageTooLarge, match="12000x12000 = 144,000,000 pixels is over max_image_pixels"):
        decode_image(huge_png(), 32, 3, max_pixels=40_000_000)
    with pytest.raises(ImageTooLarge, match="an image of 4,294,836,225 pixels is over max_image_pixels"):
        decode_image(huge_gif(), 32, 1)  # 65535 x 65535
    assert decode_image(animated_gif(), 32, 3).shape == (3, 32, 32)  # the first frame only
    with pytest.raises(ImageError, match="not JPEG as declared"):
        decode_image(originals()["PNG"], 32, 3, expect="JPEG")


def test_a_png_whose_pixel_data_ends_early_is_an_error_not_zero_filled():
    """71 bytes: an 8 x 8 greyscale header with two rows of pixel data, in a zlib stream that closes
    properly. Pillow decodes it and fills the other six rows with zeros; it is a damaged image."""

    def chunk(kind: bytes, body: bytes) -> bytes:
        return struct.pack(">I", len(body)) + kind + body + struct.pack(">I", zlib.crc32(kind + body))

    rows = zlib.compress(b"".join(b"\x00" + bytes([200] * 8) for _ in range(2)), 9)
    short = (
        b"\x89PNG\r\n\x1a\n"
        + chunk(b"IHDR", struct.pack(">IIBBBBB", 8, 8, 8, 0, 0, 0, 0))
        + chunk(b"IDAT", rows)
        + chunk(b"IEND", b"")
    )
    with pytest.raises(ImageError, match="pixel data holds 18 of the 72 bytes its 8x8 header needs"):
        decode_image(short, 8, 1)
    assert decode_image(huge_png(64), 8, 1).shape == (1, 8, 8)  # a whole PNG still decodes


@pytest.fixture(scope="module")
def fuzz_folder(tmp_path_factory) -> Path:
    """An image folder whose train/ holds every mutant beside good images, and a few huge ones."""
    root = tmp_path_factory.mktemp("fuzz") / "images"
    write_imagefolder(root, per_class=6)
    for fmt, i, data in FUZZ:
        suffix = {"JPEG": "jpg"}.get(fmt, fmt.lower())
        (root / "train" / "cat" / f"mutant-{fmt}-{i}.{suffix}").write_bytes(data)
    (root / "train" / "dog" / "huge.png").write_bytes(huge_png())
    (root / "train" / "dog" / "huge.gif").write_bytes(huge_gif())
    return root


def test_the_imagefolder_loader_skips_every_bad_file(fuzz_folder):
    bundle = DATASETS.build("imagefolder", root=str(fuzz_folder), max_image_pixels=1_000_000)
    good = sum(1 for _, _, data in FUZZ if _decodes(data))
    assert len(bundle.train) == 18 + good  # the written images, and exactly the mutants that decode


def _decodes(data: bytes) -> bool:
    try:
        decode_image(data, 32, 3, max_pixels=1_000_000)
        return True
    except ImageError:
        return False


def test_the_streaming_loader_skips_every_bad_sample_in_its_workers(fuzz_folder, tmp_path):
    write_shards(fuzz_folder, tmp_path / "shards", shard_size=64)
    bundle = DATASETS.build(
        "streaming",
        root=str(tmp_path / "shards"),
        num_classes=3,
        shuffle_buffer=32,
        max_image_pixels=1_000_000,
    )
    loaders = build_loaders(
        bundle,
        batch_size=16,
        num_workers=2,
        pin_memory=False,
        prefetch_factor=2,
        persistent_workers=False,
        shuffle=True,
        drop_last=False,
        seed=0,
    )
    loaders.sampler.set_epoch(0)
    seen = sum(len(labels) for _, labels in loaders.train)
    assert seen == 18 + sum(1 for _, _, data in FUZZ if _decodes(data))


def test_predict_gives_error_rows_not_a_crash(fuzz_folder, served_run):
    """The command itself, over a folder of mutants: a row for each file, exit 2 and a count (it
    exited 139, killed by SIGSEGV, before)."""
    result = run_trainer(
        f"run={served_run}",
        f"inputs=[{fuzz_folder / 'train'}]",
        "output=jsonl",
        "max_image_pixels=1000000",
        module="trainer.predict",
    )
    rows = [json.loads(line) for line in result.stdout.splitlines()]
    errors = [r for r in rows if "error" in r]
    assert (
        result.returncode == 2 and f"{len(errors)} of {len(rows)} images could not be read" in result.stderr
    )
    assert len(rows) == len(FUZZ) + 18 + 2 and len(errors) == len(FUZZ) + 2 - sum(
        _decodes(d) for _, _, d in FUZZ
    )
    assert any("over max_image_pixels=1,000,000" in r["error"] for r in errors)


# ---- the server -------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def served_run(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("hostile")
    write_imagefolder(root / "images", per_class=4)
    result = run_trainer(
        "dataset=imagefolder",
        f"dataset.root={root / 'images'}",
        "model=cnn",
        "model.width=8",
        *TINY_RUN,
        "trainer.max_epochs=1",
        "loader.batch_size=8",
        "export.formats=[torch_export]",
        f"hydra.run.dir={root / 'run'}",
    )
    assert result.returncode == 0, result.stderr
    return root / "run"


@contextmanager
def hostile_server(run: Path, *settings: str, max_files: int | None = None):
    """The server in its own process, forked from the fork server (with at most `max_files` file
    descriptors); yields (process, port)."""
    process = forkrun.launch(
        "trainer.serve", f"run={run}", "serve.port=0", *settings, cwd=ROOT, max_files=max_files
    )
    try:
        line = process.stdout.readline()
        assert line.startswith("serving"), line + process.stderr.read()
        yield process, int(line.strip().rsplit(":", 1)[1])
    finally:
        if process.poll() is None:
            process.kill()
        process.wait(timeout=30)


def exchange(port: int, request: bytes, timeout: float = 10) -> tuple[int, bytes]:
    """One raw HTTP exchange: (status, body), read as far as Content-Length says or the server closes;
    status 0 when it closed without answering."""
    answer = b""
    with socket.create_connection(("127.0.0.1", port), timeout=timeout) as s:
        s.sendall(request)
        try:
            while chunk := s.recv(65536):
                answer += chunk
                head, _, body = answer.partition(b"\r\n\r\n")
                length = re.search(rb"(?i)content-length: (\d+)", head)
                if length and len(body) >= int(length.group(1)):
                    break
        except (TimeoutError, ConnectionResetError):
            pass
    match = re.match(rb"HTTP/1\.[01] (\d{3})", answer)
    return (int(match.group(1)) if match else 0), answer.partition(b"\r\n\r\n")[2]


def post(body: bytes, content_type: str, headers: bytes = b"") -> bytes:
    return (
        b"POST /v1/predict HTTP/1.1\r\nHost: test\r\nConnection: close\r\nContent-Type: "
        + content_type.encode()
        + b"\r\nContent-Length: "
        + str(len(body)).encode()
        + b"\r\n"
        + headers
        + b"\r\n"
        + body
    )


def form(*parts: bytes, boundary: str = "b0undary", close: bool = True) -> bytes:
    body = b"".join(f"--{boundary}\r\n".encode() + part + b"\r\n" for part in parts)
    return body + (f"--{boundary}--\r\n".encode() if close else b"")


def file_part(data: bytes, name: str = "image", filename: str = "a.png", kind: str = "image/png") -> bytes:
    return (
        f'Content-Disposition: form-data; name="{name}"; filename="{filename}"\r\n'
        f"Content-Type: {kind}\r\n\r\n".encode()
        + data
    )


PNG = originals()["PNG"]
MULTIPART = "multipart/form-data; boundary=b0undary"
HOSTILE = [  # (what, request, expected status, a phrase of the error)
    ("empty body", post(b"", "image/png"), 400, "empty"),
    ("empty JSON", post(b"", "application/json"), 400, "empty"),
    (
        "JSON nested 10,000 deep",
        post(b'{"inputs": ' + b"[" * 10000 + b"]" * 10000 + b"}", "application/json"),
        400,
        "nested too deeply",
    ),
    (
        "an integer of 400 digits",
        post(b'{"inputs": [[[' + b"9" * 400 + b"]]]}", "application/json"),
        422,
        "float32",
    ),
    (
        "an integer of 5,000 digits",
        post(b'{"inputs": [' + b"9" * 5000 + b"]}", "application/json"),
        400,
        "malformed JSON",
    ),
    ("multipart, an empty file", post(form(file_part(b"")), MULTIPART), 400, "is empty"),
    (
        "multipart, a part without a name",
        post(form(b"Content-Type: image/png\r\n\r\n" + PNG), MULTIPART),
        200,
        None,
    ),
    ("multipart, no boundary", post(MARKER, "multipart/form-data"), 400, "malformed multipart"),
    (
        "multipart, no closing boundary",
        post(form(file_part(PNG), close=False), MULTIPART),
        400,
        "malformed multipart",
    ),
    (
        "multipart, 1,001 parts",
        post(form(*[file_part(b"x", name=f"f{i}") for i in range(1001)]), MULTIPART),
        422,
        "serve.max_batch_size=16",
    ),
    (
        "multipart, a deflated part",
        post(form(b"Content-Encoding: deflate\r\n" + file_part(zlib.compress(PNG))), MULTIPART),
        415,
        "encoded form parts",
    ),
    (
        "claims gzip, is not",
        post(MARKER, "image/png", b"Content-Encoding: gzip\r\n"),
        400,
        "could not be read",
    ),
    ("a GIF declared as PNG", post(originals()["GIF"], "image/png"), 400, "not PNG as declared"),
    ("a GIF declared as GIF", post(originals()["GIF"], "image/gif"), 200, None),
    ("an animated GIF", post(animated_gif(), "image/gif"), 200, None),
    ("a 12000 x 12000 PNG", post(huge_png(), "image/png"), 413, "serve.max_image_pixels"),
    ("a 35-byte GIF of 65535 x 65535", post(huge_gif(), "image/gif"), 413, "serve.max_image_pixels"),
    ("a body over the limit", post(b"\x00" * 2_100_000, "image/png"), 413, "serve.max_body_bytes=2,000,000"),
    (
        "Expect: 100-continue over the limit",
        b"POST /v1/predict HTTP/1.1\r\nHost: t\r\nContent-Type: image/png\r\nContent-Length: 99999999\r\n"
        b"Expect: 100-continue\r\n\r\n",
        413,
        "serve.max_body_bytes",
    ),
    ("text/plain", post(MARKER, "text/plain"), 415, "content type"),
    ("a tensor of the wrong shape", post(b'{"inputs": [[1.0, 2.0]]}', "application/json"), 422, "shape"),
    (
        "a NaN tensor",
        post(json.dumps({"inputs": [[[float("nan")] * 32] * 32] * 3}).encode(), "application/json"),
        422,
        "finite",
    ),
    (
        "a request line of garbage",
        b"GARBAGE \x01" + MARKER + b" HTTP/9\r\n\r\n",
        400,
        "malformed HTTP request",
    ),
    (
        "a header line of 100 KB",
        b"GET /healthz HTTP/1.1\r\nX-Big: " + MARKER * 6000 + b"\r\n\r\n",
        400,
        "malformed HTTP request (LineTooLong)",
    ),
    (
        "a bad Content-Length",
        b"POST /v1/predict HTTP/1.1\r\nHost: t\r\nContent-Length: ten\r\n\r\n",
        400,
        "malformed HTTP request",
    ),
    ("an unknown method", b"BREW /healthz HTTP/1.1\r\nHost: t\r\n\r\n", 400, "malformed HTTP request"),
    ("an unknown path", b"GET /admin HTTP/1.1\r\nHost: t\r\nConnection: close\r\n\r\n", 404, "Not Found"),
]


@pytest.fixture(scope="module")
def hostile(served_run):
    with hostile_server(
        served_run,
        "serve.max_body_bytes=2000000",
        "serve.max_batch_size=16",
        "serve.max_image_pixels=4000000",
        "serve.idle_timeout_s=1",
        "serve.head_timeout_s=1",
        "serve.body_timeout_s=2",
        "serve.max_connections=64",
    ) as (process, port):
        yield process, port


def peak_rss_mb(pid: int) -> float:
    status = Path(f"/proc/{pid}/status").read_text()
    return int(re.search(r"VmHWM:\s+(\d+) kB", status).group(1)) / 1024


def test_every_hostile_request_gets_its_4xx_and_the_server_lives_on(hostile):
    process, port = hostile
    assert exchange(port, post(PNG, "image/png"))[0] == 200
    peak_before = peak_rss_mb(process.pid)
    for what, request, status, phrase in HOSTILE:
        got, body = exchange(port, request)
        assert got == status, (what, body[:200])
        if phrase:
            assert phrase in json.loads(body)["error"], (what, body[:200])
        assert exchange(port, post(PNG, "image/png"))[0] == 200, f"not serving after: {what}"
    for fmt, i, data in FUZZ:  # every mutant: an answer, never a crash or a 5xx
        got, body = exchange(port, post(data, "application/octet-stream"))
        assert got in (200, 400, 413), (fmt, i, body[:200])
    assert process.poll() is None
    # the 144-megapixel PNG and the 4-gigapixel GIF were refused from their headers: no decoded copy
    assert peak_rss_mb(process.pid) - peak_before < 60


def test_connections_idle_slow_or_too_many_are_closed_cleanly(hostile):
    """250 idle connections, then 100 sending half a request head, against serve.max_connections=64: a
    valid client is still answered, because at the cap the oldest idle (then slow) connection is closed
    to make room; none is refused while none has a request being handled."""
    process, port = hostile
    idle = [socket.create_connection(("127.0.0.1", port)) for _ in range(250)]
    time.sleep(0.3)
    assert exchange(port, post(PNG, "image/png"))[0] == 200
    slow = [socket.create_connection(("127.0.0.1", port)) for _ in range(100)]
    for s in slow:
        s.sendall(b"POST /v1/predict HTTP/1.1\r\nHost: t\r\n")
    time.sleep(0.3)
    assert exchange(port, post(PNG, "image/png"))[0] == 200
    answers = []
    for s in idle + slow:  # each closed: to make room, or after serve.idle_timeout_s / head_timeout_s=1
        s.settimeout(5)
        try:
            answers.append(s.recv(1000)[:12])
        except ConnectionResetError:
            answers.append(b"")
        s.close()
    assert set(answers) == {b""}, answers
    time.sleep(0.2)
    assert exchange(port, post(PNG, "image/png"))[0] == 200
    slow = socket.create_connection(("127.0.0.1", port))  # a request head, one byte every 0.2 s
    start, closed = time.monotonic(), False
    for byte in b"POST /v1/predict HTTP/1.1\r\nHost: t\r\nX-Slow: " + b"x" * 40:
        try:
            slow.sendall(bytes([byte]))
        except (BrokenPipeError, ConnectionResetError):
            closed = True
            break
        time.sleep(0.2)
    assert closed and time.monotonic() - start < 4  # serve.head_timeout_s=1
    status, body = exchange(port, post(PNG, "image/png")[: -len(PNG) + 10])  # a body that never finishes
    assert status == 408 and "serve.body_timeout_s" in json.loads(body)["error"]
    assert exchange(port, post(PNG, "image/png"))[0] == 200 and process.poll() is None


def test_the_log_holds_no_traceback_and_no_client_bytes(hostile):
    """Runs last in this module: everything above went through this server."""
    process, port = hostile
    with socket.create_connection(("127.0.0.1", port)) as s:  # a client that leaves halfway through its body
        s.sendall(post(PNG, "image/png")[:-100])
    time.sleep(0.3)
    assert exchange(port, post(PNG, "image/png"))[0] == 200
    process.send_signal(15)
    _, log = process.communicate(timeout=60)
    assert process.returncode == 0
    assert "Traceback" not in log and "Error" not in log and MARKER.decode() not in log, log[-3000:]


def test_a_flood_of_connections_cannot_run_the_server_out_of_file_descriptors(served_run):
    """120 file descriptors, 150 clients connecting while the server is stopped (so the kernel's listen
    queue is full when it continues): asyncio accepts a backlog's worth of sockets per turn of its loop
    before any can be refused, so the server fits serve.max_connections and its backlog to `ulimit -n`
    (with a warning) instead of failing accept() with a traceback per socket."""
    with hostile_server(served_run, "serve.max_connections=64", "serve.idle_timeout_s=1", max_files=120) as (
        process,
        port,
    ):
        clients: list[socket.socket] = []

        def connect() -> None:
            try:
                clients.append(socket.create_connection(("127.0.0.1", port), timeout=3))
            except OSError:  # not taken within the timeout: the listen queue is small on purpose
                pass

        threads = [threading.Thread(target=connect) for _ in range(150)]
        process.send_signal(signal.SIGSTOP)
        for thread in threads:
            thread.start()
        time.sleep(0.5)
        process.send_signal(signal.SIGCONT)
        for thread in threads:
            thread.join()
        for client in clients:
            client.close()
        time.sleep(0.3)
        assert exchange(port, post(PNG, "image/png"))[0] == 200
        process.send_signal(15)
        _, log = process.communicate(timeout=60)
    assert process.returncode == 0 and "Traceback" not in log and "out of system resource" not in log, log[
        -2000:
    ]
    assert "serve.max_connections=64 lowered to" in log and "(ulimit -n)" in log


def test_a_failing_batch_fails_its_own_requests_only_and_health_follows_the_batcher(served_run):
    """In process (aiohttp's test client): a model that fails once fails that batch's requests with a
    500; the next batch is answered; with the batcher stopped, /healthz and /v1/predict answer 503."""
    from aiohttp.test_utils import TestClient, TestServer

    from trainer.serve import ServeSettings, batcher_key, build_app
    from trainer.serving.predictor import Predictor

    predictor = Predictor(served_run)
    real, calls = predictor.outputs, []

    def flaky(batch: torch.Tensor) -> torch.Tensor:
        calls.append(len(batch))
        if len(calls) == 1:
            raise RuntimeError("the device fell over")
        return real(batch)

    predictor.outputs = flaky

    async def check():
        app = build_app(predictor, ServeSettings(max_wait_ms=200))
        async with TestClient(TestServer(app)) as client:

            async def send():
                response = await client.post("/v1/predict", data=PNG, headers={"Content-Type": "image/png"})
                return response.status, await response.json()

            first = await asyncio.gather(send(), send())  # one batch: both fail together
            assert [s for s, _ in first] == [500, 500] and "failed" in first[0][1]["error"]
            assert (await send())[0] == 200 and calls == [2, 1]  # the batcher lives on
            assert (await client.get("/healthz")).status == 200
            await app[batcher_key()].stop()
            health = await client.get("/healthz")
            assert health.status == 503 and "not running" in (await health.json())["status"]
            assert (await send())[0] == 503

    asyncio.run(check())


def test_slow_clients_do_not_lock_valid_ones_out(served_run):
    """The server's defaults, 1,000 connections each holding half a request head: a valid request is
    answered, and so are 300 valid requests sent at once (benchmarks/slow_clients.py measures it)."""
    result = forkrun.run(
        "benchmarks/slow_clients.py",
        "--run",
        str(served_run),
        "--slow",
        "1000",
        "--concurrent",
        "300",
        cwd=ROOT,
        timeout=300,
    )
    assert result.returncode == 0, result.stderr[-2000:]
    data = json.loads(result.stdout.strip().splitlines()[-1])
    assert data["valid_status"] == 200 and data["statuses"] == {"200": 300}, data
