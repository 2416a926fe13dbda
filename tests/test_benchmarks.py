"""The benchmarks run in a tiny mode: what they measure is checked, not how fast it is. The loader and
streaming benchmarks run their configurations in one process here (--same-process: an interpreter
start is ~8 s on two cores); the memory benchmark keeps a child process per configuration, as they
all do when run for figures."""
import json
import subprocess
import sys

import pytest
from conftest import ROOT


def run_benchmark(name: str, *args: str) -> subprocess.CompletedProcess:
    """As the README runs them: `python benchmarks/<name>.py ...` from the repository root."""
    return subprocess.run([sys.executable, f"benchmarks/{name}.py", *args], cwd=ROOT, capture_output=True,
                          text=True, timeout=300)


def test_checkpoint_benchmark_measures_both_sides():
    result = run_benchmark("checkpoint", "--tiny")
    assert result.returncode == 0, result.stderr
    summary, line = result.stdout.strip().splitlines()[-2:]
    data = json.loads(line)
    assert "durable after" in summary and "training blocked" in summary
    assert data["benchmark"] == "checkpoint" and data["rounds"] == 2
    assert abs(data["bytes_ours"] - data["bytes_plain"]) < 0.01 * data["bytes_plain"]  # the same state, format
    for side in ("save_blocking_s_ours", "save_s_ours", "save_s_plain", "save_s_plain_fsync", "load_s_ours",
                 "load_s_plain"):
        assert data[side] > 0
    assert data["save_ratio"] == data["save_s_ours"] / data["save_s_plain"]


def test_loader_benchmark_feeds_every_configuration_the_same_images(tmp_path):
    from conftest import write_imagefolder
    write_imagefolder(tmp_path / "images", per_class=8, size=(32, 32))
    result = run_benchmark("loader", "--data", str(tmp_path / "images"), "--epochs", "1", "--batch-size", "8",
                           "--same-process")
    assert result.returncode == 0, result.stderr
    data = json.loads(result.stdout.strip().splitlines()[-1])
    runs = data["results"]
    assert list(runs) == ["standard", "ours-0w", "ours-2w", "on-device"]
    assert {r["images"] for r in runs.values()} == {24}  # 3 classes x 8 train images, each once
    assert runs["standard"]["ratio_to_standard"] == 1.0
    for r in runs.values():
        assert r["images_per_sec"] > 0 and r["peak_pss_mb"] > 0
        assert r["ratio_to_standard"] == r["images_per_sec"] / runs["standard"]["images_per_sec"]


def test_memory_benchmark_reads_every_image_in_each_configuration():
    result = run_benchmark("memory", "--mb", "4", "--workers", "1")
    assert result.returncode == 0, result.stderr
    data = json.loads(result.stdout.strip().splitlines()[-1])
    assert [(r["mmap"], r["workers"]) for r in data["runs"]] == [(True, 1), (False, 1)]
    assert {r["images"] for r in data["runs"]} == {data["images"]} and data["images"] == 4 * 2**20 // 3072
    assert all(r["peak_pss_mb"] > 0 and r["peak_anonymous_mb"] > 0 for r in data["runs"])


def test_streaming_benchmark_reads_every_image_at_every_size():
    result = run_benchmark("streaming", "--sizes", "60", "120", "--image-size", "16", "--shuffle-buffer", "20",
                           "--batch-size", "16", "--workers", "1", "--same-process")
    assert result.returncode == 0, result.stderr
    data = json.loads(result.stdout.strip().splitlines()[-1])
    assert [(r["config"], r["size"]) for r in data["runs"]] == [
        ("streaming", 60), ("in-memory", 60), ("streaming", 120), ("in-memory", 120)]
    assert all(r["images"] == r["size"] and r["peak_pss_mb"] > 0 for r in data["runs"])
    streaming = [r["peak_pss_mb"] for r in data["runs"] if r["config"] == "streaming"]
    assert data["peak_growth"]["streaming"] == streaming[1] / streaming[0]


def test_overhead_benchmark_pairs_both_loops_on_the_same_work():
    result = run_benchmark("overhead", "--images", "256", "--batch-size", "64", "--rounds", "2", "--width", "8")
    assert result.returncode == 0, result.stderr
    data = json.loads(result.stdout.strip().splitlines()[-1])
    assert data["benchmark"] == "overhead" and len(data["rounds"]) == 2 == len(data["near_zero_rounds"])
    for r in data["rounds"] + data["near_zero_rounds"]:
        assert r["ours"]["images"] == r["hand_written"]["images"] == 256  # one epoch each, every image
        assert r["ratio"] == pytest.approx((r["ours"]["images"] / r["ours"]["seconds"])
                                           / (r["hand_written"]["images"] / r["hand_written"]["seconds"]))
    step = data["hand_written_step_s"]
    assert data["implied_ratio"] == pytest.approx(step / (step + max(data["loop_overhead_s"], 0)))


def test_lightning_benchmark_runs_the_same_epochs_through_both(tmp_path):
    pytest.importorskip("lightning", reason="the bench extra (PyTorch Lightning) is not installed")
    result = run_benchmark("vs_lightning", "--images", "256", "--batch-size", "64", "--rounds", "2", "--width", "8")
    assert result.returncode == 0, result.stderr
    data = json.loads(result.stdout.strip().splitlines()[-1])
    assert len(data["rounds"]) == 2
    for r in data["rounds"]:
        assert r["ours"]["images"] == r["lightning"]["images"] == r["hand_written"]["images"] == 256
    assert set(data["step_overhead_us"]) == {"ours", "lightning"}


def test_fast_recipe_benchmark_trains_both_identically(tmp_path):
    from conftest import write_imagefolder
    write_imagefolder(tmp_path / "images", per_class=16, size=(32, 32))
    result = run_benchmark("fast_recipe", "--data", str(tmp_path / "images"), "--target", "0.0", "--epochs", "2",
                           "--seeds", "0")
    assert result.returncode == 0, result.stderr
    data = json.loads(result.stdout.strip().splitlines()[-1])
    run = data["runs"][0]
    assert run["ours"]["reached"] and run["script"]["reached"] and run["ours"]["epochs"] == run["script"]["epochs"] == 1
    assert run["ours"]["val_acc"] == run["script"]["val_acc"]  # the same batches, the same steps: the same model
    assert data["ratio"] == data["median_seconds"]["script"] / data["median_seconds"]["ours"]


def test_serve_benchmark_sends_every_request_to_both_servers():
    pytest.importorskip("aiohttp", reason="the serve extra is not installed")
    result = run_benchmark("serve", "--requests", "60", "--clients", "6", "--max-batch-size", "8", "--width", "8",
                           "--train-images", "256")
    assert result.returncode == 0, result.stderr
    data = json.loads(result.stdout.strip().splitlines()[-1])
    batched, single = data["results"]["micro-batching"], data["results"]["one at a time"]
    assert batched["requests"] == single["requests"] == 60
    assert single["forward_passes"] == 60  # one per request; the warm-up's are not counted
    assert batched["forward_passes"] <= single["forward_passes"]
    assert data["throughput_ratio"] == batched["requests_per_sec"] / single["requests_per_sec"]
    assert 0 < batched["p50_ms"] <= batched["p99_ms"]
