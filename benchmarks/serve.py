"""A bounded load test of `python -m trainer.serve` on loopback: a fixed number of PNG requests from N
concurrent clients, against the server with dynamic micro-batching and with serve.max_batch_size=1,
in one run. Prints throughput and p50/p99 latency of each and their ratios, and a JSON line. Needs the
`serve` extra.

    python benchmarks/serve.py                                   # trains a small model first (~30 s)
    python benchmarks/serve.py --run outputs/2026-11-25/10-00-00 --requests 4000 --clients 128

Each server runs in its own process (as in production); the clients run here, with aiohttp. A warm-up
of 50 requests precedes each measurement.
"""

import argparse
import asyncio
import io
import json
import signal
import statistics
import subprocess
import sys
import tempfile
import time
import urllib.request
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def train_small_run(folder: Path, width: int, images: int) -> Path:
    run = folder / "run"
    subprocess.run(
        [
            sys.executable,
            "-m",
            "trainer",
            "dataset=synthetic",
            f"dataset.train_size={images}",
            "model=cnn",
            f"model.width={width}",
            "trainer.max_epochs=1",
            "trainer.progress_bar=false",
            "loader.num_workers=0",
            "export.formats=[torch_export]",
            f"hydra.run.dir={run}",
        ],
        cwd=ROOT,
        check=True,
        capture_output=True,
    )
    return run


def png_images(count: int, size: int = 32) -> list[bytes]:
    import numpy as np
    from PIL import Image

    rng, images = np.random.default_rng(0), []
    for _ in range(count):
        buffer = io.BytesIO()
        Image.fromarray(rng.integers(0, 256, (size, size, 3), dtype=np.uint8)).save(buffer, "PNG")
        images.append(buffer.getvalue())
    return images


def start_server(run: Path, *settings: str) -> tuple[subprocess.Popen, str]:
    process = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "trainer.serve",
            f"run={run}",
            "serve.port=0",
            "serve.max_queue=100000",
            *settings,
        ],
        cwd=ROOT,
        stdout=subprocess.PIPE,
        text=True,
    )
    line = process.stdout.readline()
    if not line.startswith("serving"):
        process.kill()
        raise SystemExit(f"error: the server did not start: {line}")
    return process, line.strip().rsplit(" ", 1)[-1]


async def load(url: str, images: list[bytes], requests: int, clients: int) -> dict:
    import aiohttp

    latencies: list[float] = []
    remaining = iter(range(requests))

    async def client(session: aiohttp.ClientSession) -> None:
        for i in remaining:  # the clients share one bounded count
            start = time.perf_counter()
            async with session.post(
                f"{url}/v1/predict", data=images[i % len(images)], headers={"Content-Type": "image/png"}
            ) as response:
                await response.read()
                if response.status != 200:
                    raise SystemExit(f"error: request {i} got HTTP {response.status}")
            latencies.append(time.perf_counter() - start)

    connector = aiohttp.TCPConnector(limit=clients)
    async with aiohttp.ClientSession(connector=connector) as session:
        started = time.perf_counter()
        await asyncio.gather(*(client(session) for _ in range(clients)))
        seconds = time.perf_counter() - started
    ordered = sorted(latencies)
    return {
        "requests": len(latencies),
        "seconds": seconds,
        "requests_per_sec": len(latencies) / seconds,
        "p50_ms": 1000 * statistics.median(ordered),
        "p99_ms": 1000 * ordered[int(0.99 * (len(ordered) - 1))],
    }


def forward_passes(url: str) -> int:
    with urllib.request.urlopen(f"{url}/healthz") as response:
        return json.loads(response.read())["batches"]


def measure(run: Path, images: list[bytes], settings: list[str], requests: int, clients: int) -> dict:
    process, url = start_server(run, *settings)
    try:
        asyncio.run(load(url, images, min(50, requests), min(clients, 8)))  # warm-up
        before = forward_passes(url)
        result = asyncio.run(load(url, images, requests, clients))
        result["forward_passes"] = forward_passes(url) - before
    finally:
        process.send_signal(signal.SIGTERM)
        process.wait(timeout=60)
    return result


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--run", type=Path, help="a finished run dir (default: train a small one)")
    parser.add_argument("--width", type=int, default=32, help="the small run's cnn width (without --run)")
    parser.add_argument(
        "--train-images", type=int, default=2048, help="the small run's training set (without --run)"
    )
    parser.add_argument("--requests", type=int, default=2000)
    parser.add_argument("--clients", type=int, default=64)
    parser.add_argument("--max-batch-size", type=int, default=32)
    parser.add_argument("--max-wait-ms", type=float, default=5.0)
    args = parser.parse_args(argv)
    images = png_images(64)
    configs = {
        "micro-batching": [
            f"serve.max_batch_size={args.max_batch_size}",
            f"serve.max_wait_ms={args.max_wait_ms}",
        ],
        "one at a time": ["serve.max_batch_size=1", "serve.max_wait_ms=0"],
    }
    with tempfile.TemporaryDirectory() as tmp:
        run = args.run or train_small_run(Path(tmp), args.width, args.train_images)
        results = {
            name: measure(run, images, settings, args.requests, args.clients)
            for name, settings in configs.items()
        }
    for name, r in results.items():
        print(
            f"{name:<15} {r['requests_per_sec']:>8,.0f} req/s   p50 {r['p50_ms']:>7.1f} ms"
            f"   p99 {r['p99_ms']:>7.1f} ms"
            f"   ({r['forward_passes']:,} forward passes for {r['requests']:,} requests)"
        )
    batched, single = results["micro-batching"], results["one at a time"]
    ratio = batched["requests_per_sec"] / single["requests_per_sec"]
    print(
        f"serve: micro-batching gives {ratio:.2f}x the throughput of one request per forward pass, p99 "
        "latency "
        f"{batched['p99_ms'] / single['p99_ms']:.2f}x ({args.requests} requests, {args.clients} clients)"
    )
    summary = {
        "benchmark": "serve",
        "requests": args.requests,
        "clients": args.clients,
        "max_batch_size": args.max_batch_size,
        "max_wait_ms": args.max_wait_ms,
        "results": results,
        "throughput_ratio": ratio,
        "p99_ratio": batched["p99_ms"] / single["p99_ms"],
    }
    print(json.dumps(summary))
    return summary


if __name__ == "__main__":
    main()
