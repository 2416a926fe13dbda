"""The benchmarks run in a tiny mode: what they measure is checked, not how fast it is."""
import json

from conftest import ROOT, run_trainer


def test_checkpoint_benchmark_measures_both_sides():
    result = run_trainer("--tiny", module="benchmarks.checkpoint", cwd=ROOT)
    assert result.returncode == 0, result.stderr
    summary, line = result.stdout.strip().splitlines()[-2:]
    data = json.loads(line)
    assert "durable after" in summary and "training blocked" in summary and data["benchmark"] == "checkpoint" and data["rounds"] == 2
    assert abs(data["bytes_ours"] - data["bytes_plain"]) < 0.01 * data["bytes_plain"]  # the same state, format
    for side in ("save_blocking_s_ours", "save_s_ours", "save_s_plain", "save_s_plain_fsync", "load_s_ours",
                 "load_s_plain"):
        assert data[side] > 0
    assert data["save_ratio"] == data["save_s_ours"] / data["save_s_plain"]
