"""The benchmarks run in a tiny mode: what they measure is checked, not how fast it is: both sides did
the same work (the same images, bytes, epochs, requests), and the memory figures are those of a live
torch process (a wrong /proc field or unit would give a few MB). Ratios are not re-derived here: that
would only repeat the script's own division. The loader and
streaming benchmarks run their configurations in one process here (--same-process: an interpreter
start is ~8 s on two cores); the memory benchmark keeps a child process per configuration, as they
all do when run for figures."""

import json
import subprocess

import forkrun
import pytest
from conftest import ROOT


def run_benchmark(name: str, *args: str) -> subprocess.CompletedProcess:
    """As docs/performance.md runs them: `python benchmarks/<name>.py ...` from the repository root
    (forked from the fork server: its own process, without the imports' cost)."""
    return forkrun.run(f"benchmarks/{name}.py", *args, cwd=ROOT, timeout=300)


def test_checkpoint_benchmark_measures_both_sides():
    result = run_benchmark("checkpoint", "--tiny")
    assert result.returncode == 0, result.stderr
    summary, line = result.stdout.strip().splitlines()[-2:]
    data = json.loads(line)
    assert "durable after" in summary and "training blocked" in summary
    assert data["benchmark"] == "checkpoint" and data["rounds"] == 2
    assert (
        abs(data["bytes_ours"] - data["bytes_plain"]) < 0.01 * data["bytes_plain"]
    )  # the same state, format


def test_loader_benchmark_feeds_every_configuration_the_same_images(tmp_path):
    from conftest import write_imagefolder

    write_imagefolder(tmp_path / "images", per_class=8, size=(32, 32))
    result = run_benchmark(
        "loader", "--data", str(tmp_path / "images"), "--epochs", "1", "--batch-size", "8", "--same-process"
    )
    assert result.returncode == 0, result.stderr
    data = json.loads(result.stdout.strip().splitlines()[-1])
    runs = data["results"]
    assert list(runs) == ["standard", "ours-0w", "ours-2w", "on-device"]
    assert {r["images"] for r in runs.values()} == {24}  # 3 classes x 8 train images, each once
    assert all(r["peak_pss_mb"] > 100 for r in runs.values())  # torch alone maps more than that


def test_memory_benchmark_reads_every_image_in_each_configuration():
    result = run_benchmark("memory", "--mb", "4", "--workers", "1")
    assert result.returncode == 0, result.stderr
    data = json.loads(result.stdout.strip().splitlines()[-1])
    assert [(r["mmap"], r["workers"]) for r in data["runs"]] == [(True, 1), (False, 1)]
    assert {r["images"] for r in data["runs"]} == {data["images"]} and data["images"] == 4 * 2**20 // 3072
    assert all(r["peak_pss_mb"] > 100 and r["peak_anonymous_mb"] > 4 for r in data["runs"])  # 4 MB of images


def test_streaming_benchmark_reads_every_image_at_every_size():
    result = run_benchmark(
        "streaming",
        "--sizes",
        "60",
        "120",
        "--image-size",
        "16",
        "--shuffle-buffer",
        "20",
        "--batch-size",
        "16",
        "--workers",
        "1",
        "--same-process",
    )
    assert result.returncode == 0, result.stderr
    data = json.loads(result.stdout.strip().splitlines()[-1])
    assert [(r["config"], r["size"]) for r in data["runs"]] == [
        ("streaming", 60),
        ("in-memory", 60),
        ("streaming", 120),
        ("in-memory", 120),
    ]
    assert all(r["images"] == r["size"] and r["peak_pss_mb"] > 0 for r in data["runs"])
    assert all(r["peak_pss_mb"] > 100 for r in data["runs"])


def test_overhead_benchmark_pairs_both_loops_on_the_same_work():
    result = run_benchmark(
        "overhead", "--images", "256", "--batch-size", "64", "--rounds", "2", "--width", "8"
    )
    assert result.returncode == 0, result.stderr
    data = json.loads(result.stdout.strip().splitlines()[-1])
    assert data["benchmark"] == "overhead" and len(data["rounds"]) == 2 == len(data["near_zero_rounds"])
    for r in data["rounds"] + data["near_zero_rounds"]:
        assert r["ours"]["images"] == r["hand_written"]["images"] == 256  # one epoch each, every image


def test_lightning_benchmark_runs_the_same_epochs_through_both(tmp_path):
    pytest.importorskip("lightning", reason="the bench extra (PyTorch Lightning) is not installed")
    result = run_benchmark(
        "vs_lightning", "--images", "256", "--batch-size", "64", "--rounds", "2", "--width", "8"
    )
    assert result.returncode == 0, result.stderr
    data = json.loads(result.stdout.strip().splitlines()[-1])
    assert len(data["rounds"]) == 2
    for r in data["rounds"]:
        assert r["ours"]["images"] == r["lightning"]["images"] == r["hand_written"]["images"] == 256
    assert set(data["step_overhead_us"]) == {"ours", "lightning"}


def test_fast_recipe_benchmark_trains_both_identically(tmp_path):
    from conftest import write_imagefolder

    write_imagefolder(tmp_path / "images", per_class=16, size=(32, 32))
    result = run_benchmark(
        "fast_recipe", "--data", str(tmp_path / "images"), "--target", "0.0", "--epochs", "2", "--seeds", "0"
    )
    assert result.returncode == 0, result.stderr
    data = json.loads(result.stdout.strip().splitlines()[-1])
    run = data["runs"][0]
    assert (
        run["ours"]["reached"]
        and run["script"]["reached"]
        and run["ours"]["epochs"] == run["script"]["epochs"] == 1
    )
    assert (
        run["ours"]["val_acc"] == run["script"]["val_acc"]
    )  # the same batches, the same steps: the same model


def test_record_benchmark_trains_both_recipes_for_the_same_epochs(tmp_path):
    from conftest import write_imagefolder

    write_imagefolder(tmp_path / "images", per_class=16, size=(32, 32))
    result = run_benchmark("vs_record", "--data", str(tmp_path / "images"), "--epochs", "2", "--seeds", "0")
    assert result.returncode == 0, result.stderr
    run = json.loads(result.stdout.strip().splitlines()[-1])["runs"][0]
    assert (
        run["ours"]["epochs"] == 2 and run["record"]["steps"] == 2
    )  # 48 images: one batch of 1,024 an epoch
    for side in ("ours", "record"):  # an accuracy over the 48 validation images, each side's own
        assert run[side]["val_acc"] * 48 == pytest.approx(round(run[side]["val_acc"] * 48))


def test_serve_benchmark_sends_every_request_to_both_servers():
    pytest.importorskip("aiohttp", reason="the serve extra is not installed")
    result = run_benchmark(
        "serve",
        "--requests",
        "60",
        "--clients",
        "6",
        "--max-batch-size",
        "8",
        "--width",
        "8",
        "--train-images",
        "256",
    )
    assert result.returncode == 0, result.stderr
    data = json.loads(result.stdout.strip().splitlines()[-1])
    batched, single = data["results"]["micro-batching"], data["results"]["one at a time"]
    assert batched["requests"] == single["requests"] == 60
    assert single["forward_passes"] == 60  # one per request; the warm-up's are not counted
    assert batched["forward_passes"] < single["forward_passes"]  # 6 clients at once: requests shared passes
    assert batched["p50_ms"] <= batched["p99_ms"]


def test_gpt_benchmark_trains_the_same_tokens_on_both_sides():
    result = run_benchmark(
        "gpt",
        "--n-layer",
        "1",
        "--n-head",
        "2",
        "--n-embd",
        "16",
        "--block-size",
        "16",
        "--batch-size",
        "4",
        "--steps",
        "3",
        "--rounds",
        "2",
        "--corpus-bytes",
        "5000",
    )
    assert result.returncode == 0, result.stderr
    data = json.loads(result.stdout.strip().splitlines()[-1])
    assert data["benchmark"] == "gpt" and len(data["rounds"]) == 2
    for pair in data["rounds"]:  # 3 steps of 4 windows of 16 tokens, each side
        assert pair["ours"]["tokens"] == pair["one_file"]["tokens"] == 3 * 4 * 16
    # 9 steps each from the same weights on the same data: both learnt, and alike (the losses differ
    # only by which random windows each drew), both below a uniform guess over 256 bytes (5.55 nats)
    losses = data["val_loss"]
    assert (
        data["steps"] == 9 and max(losses.values()) < 5.4 and abs(losses["ours"] - losses["one_file"]) < 0.3
    )


def test_gpt_memory_benchmark_trains_on_both_corpora():
    result = run_benchmark(
        "gpt",
        "--memory",
        "--same-process",
        "--n-layer",
        "1",
        "--n-head",
        "2",
        "--n-embd",
        "16",
        "--block-size",
        "16",
        "--batch-size",
        "4",
        "--steps",
        "3",
        "--corpus-bytes",
        "5000",
    )
    assert result.returncode == 0, result.stderr
    data = json.loads(result.stdout.strip().splitlines()[-1])
    small, large = data["runs"]
    assert (
        large["corpus_bytes"] > 15 * small["corpus_bytes"]
        and small["tokens"] == large["tokens"] == 3 * 4 * 16
    )
    assert small["peak_pss_mb"] > 100  # a live torch process with its loader workers


@pytest.mark.parametrize("task", ["language_model", "classification"])
def test_hf_trainer_benchmark_trains_both_sides_on_the_same_steps(task):
    pytest.importorskip("transformers")
    pytest.importorskip("accelerate")
    result = run_benchmark(
        "vs_hf_trainer", "--task", task, "--rounds", "1", "--layers", "1", "--width", "32",
        "--corpus-bytes", "20000", "--samples", "128", "--block-size", "32", "--batch-size", "8",
    )  # fmt: skip
    assert result.returncode == 0, result.stderr
    data = json.loads(result.stdout.strip().splitlines()[-1])
    assert data["benchmark"] == "vs_hf_trainer" and data["task"] == task
    assert data["steps"]["ours"] == data["steps"]["hf"] > 0  # the same batches, epoch for epoch
    assert all(0 < loss < 20 for loss in data["val_loss"].values())
    assert all(mb > 100 for mb in data["peak_mb"].values())  # a live torch process's, in MB


def test_sharding_benchmark_measures_both_strategies_on_two_processes():
    result = run_benchmark("sharding", "--tiny")
    assert result.returncode == 0, result.stderr
    data = json.loads(result.stdout.strip().splitlines()[-1])
    assert data["benchmark"] == "sharding" and data["processes"] == 2
    ddp, fsdp = data["ddp"], data["fsdp"]
    # the GPT 2 x 32 with vocab 256, block 32: 33,952 parameters (the head tied), float32: 0.13 MB whole
    assert ddp["parameters_mb"] == pytest.approx(33_952 * 4 / 2**20, rel=0.01)
    assert ddp["optimizer_mb"] == pytest.approx(2 * ddp["parameters_mb"])  # Adam's two moments
    assert fsdp["state_mb"] <= 0.6 * ddp["state_mb"]  # the bar; two shards make it 0.5
    assert ddp["peak_rss_mb"] > 100 and ddp["step_ms"] > 0


def test_cleanrl_benchmark_trains_both_ppos_for_the_same_steps():
    pytest.importorskip("gymnasium")
    result = run_benchmark("vs_cleanrl", "--steps", "4096", "--rounds", "1")
    assert result.returncode == 0, result.stderr
    data = json.loads(result.stdout.strip().splitlines()[-1])
    ours, one_file = data["rounds"][0]["ours"], data["rounds"][0]["one_file"]
    assert ours["env_steps"] == one_file["env_steps"] == 4096  # 8 rollouts of 4 x 128 on both sides
    for side in (ours, one_file):
        assert side["steps_per_sec"] > 100 and 8 <= side["greedy_return"] <= 500  # CartPole's range
