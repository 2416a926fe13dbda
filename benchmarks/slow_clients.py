"""Slow clients against `python -m trainer.serve` with its default settings: N connections that each
send half a request head and then nothing, held open, while a valid client asks for a prediction; then
M valid clients at once. Prints the valid request's latency, the M requests' statuses and p50/p99
latency, and a JSON line. Needs the `serve` extra.

    python benchmarks/slow_clients.py                               # trains a small model first (~30 s)
    python benchmarks/slow_clients.py --run outputs/2026-11-25/10-00-00 --slow 1000 --concurrent 300
"""

import argparse
import asyncio
import json
import resource
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from serve import png_images, train_small_run

ROOT = Path(__file__).resolve().parents[1]
HALF_HEAD = b"POST /v1/predict HTTP/1.1\r\nHost: bench\r\nContent-Type: image/"


def request(body: bytes) -> bytes:
    return (
        b"POST /v1/predict HTTP/1.1\r\nHost: bench\r\nConnection: close\r\nContent-Type: image/png\r\n"
        b"Content-Length: " + str(len(body)).encode() + b"\r\n\r\n" + body
    )


async def one_request(port: int, body: bytes) -> tuple[int, float]:
    """(HTTP status, seconds) of one request on a new connection; status 0 when it got no answer."""
    started = time.perf_counter()
    try:
        reader, writer = await asyncio.open_connection("127.0.0.1", port)
        writer.write(request(body))
        answer = await asyncio.wait_for(reader.read(), 60)
        writer.close()
    except (TimeoutError, OSError):
        return 0, time.perf_counter() - started
    status = int(answer[9:12]) if answer.startswith(b"HTTP/1.1 ") else 0
    return status, time.perf_counter() - started


def start_server(run: Path) -> tuple[subprocess.Popen, int]:
    server = subprocess.Popen(
        [sys.executable, "-m", "trainer.serve", f"run={run}", "serve.port=0"],
        cwd=ROOT,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    line = server.stdout.readline()
    if not line.startswith("serving"):
        server.kill()
        raise SystemExit(f"the server did not start: {line}{server.stderr.read()}")
    return server, int(line.strip().rsplit(":", 1)[1])


def measure(run: Path, slow: int, concurrent: int) -> dict:
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)  # this side holds every client socket
    resource.setrlimit(resource.RLIMIT_NOFILE, (max(soft, min(hard, slow + concurrent + 256)), hard))
    body = png_images(1)[0]
    server, port = start_server(run)
    try:
        asyncio.run(one_request(port, body))  # warm-up: the first batch pays for the model's first run
        held = []
        for _ in range(slow):
            client = socket.create_connection(("127.0.0.1", port))
            client.sendall(HALF_HEAD)
            held.append(client)
        time.sleep(0.2)
        valid_status, valid_seconds = asyncio.run(one_request(port, body))

        async def together() -> list[tuple[int, float]]:
            return await asyncio.gather(*(one_request(port, body) for _ in range(concurrent)))

        answers = asyncio.run(together())
        for client in held:
            client.close()
    finally:
        server.terminate()
        server.communicate(timeout=60)
    latencies = sorted(seconds for _, seconds in answers)
    statuses: dict[str, int] = {}
    for status, _ in answers:
        statuses[str(status)] = statuses.get(str(status), 0) + 1
    return {
        "benchmark": "slow_clients",
        "slow_clients": slow,
        "valid_status": valid_status,
        "valid_latency_s": valid_seconds,
        "concurrent": concurrent,
        "statuses": statuses,
        "p50_s": statistics.median(latencies),
        "p99_s": latencies[max(0, int(0.99 * len(latencies)) - 1)],
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--run", type=Path, help="a finished run with export/model.pt2 (default: train one)")
    parser.add_argument("--slow", type=int, default=1000, help="connections holding half a request head")
    parser.add_argument("--concurrent", type=int, default=300, help="valid requests sent at once")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as folder:
        run = args.run or train_small_run(Path(folder), width=16, images=512)
        result = measure(run, args.slow, args.concurrent)
    print(
        f"with {result['slow_clients']} slow clients connected: a valid request got "
        f"{result['valid_status']} in {result['valid_latency_s'] * 1000:.0f} ms; {result['concurrent']} "
        "concurrent "
        f"valid requests: {result['statuses']}, p50 {result['p50_s'] * 1000:.0f} ms, p99 "
        f"{result['p99_s'] * 1000:.0f} ms"
    )
    print(json.dumps(result))


if __name__ == "__main__":
    main()
