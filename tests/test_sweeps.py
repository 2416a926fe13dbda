"""Sweeps: a summary of every job (table and chart), failures recorded without stopping the sweep,
the same command resuming an interrupted sweep, Optuna, parallel local jobs, and submitit's requeue."""

import csv
import json
import os
import signal
import time
from pathlib import Path

import pytest
from conftest import TINY_DATA, TINY_MODEL, run_trainer, start_trainer

from trainer.sweep.summary import collect, swept_parameter, varying_keys

QUICK = [
    *TINY_DATA,
    *TINY_MODEL,
    "dataset.train_size=256",
    "loader.batch_size=32",
    "loader.num_workers=0",
    "trainer.max_epochs=1",
    "trainer.progress_bar=false",
    "export.formats=[]",
]


def _rows(sweep_dir: Path) -> list[dict]:
    with open(sweep_dir / "sweep_summary.csv") as f:
        return list(csv.DictReader(f))


def test_a_failing_job_is_recorded_and_the_others_run(tmp_path):
    result = run_trainer(
        "-m", *QUICK, "optimizer.lr=0.05,0.1", "trainer.precision=32,16", f"hydra.sweep.dir={tmp_path}"
    )
    assert result.returncode == 1, result.stderr
    error_lines = [line for line in result.stderr.splitlines() if line.startswith("error:")]
    assert len(error_lines) == 1 and "2 of 4 jobs did not finish" in error_lines[0]
    assert "trainer.precision=16" in error_lines[0] and "sweep_summary.md" in error_lines[0]
    rows = _rows(tmp_path)
    assert [r["status"] for r in rows] == ["done", "failed", "done", "failed"]
    assert all("needs a CUDA device" in r["error"] for r in rows if r["status"] == "failed")
    assert all(float(r["best val/acc"]) > 0 and r["test/acc"] for r in rows if r["status"] == "done")
    markdown = (tmp_path / "sweep_summary.md").read_text()
    assert "2 of 4 jobs done" in markdown and "| optimizer.lr=0.1 trainer.precision=16 |" in markdown
    assert (tmp_path / "sweep_summary.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def _sweep(sweep_dir: Path, *extra: str):
    return start_trainer(
        "-m",
        *QUICK,
        "dataset.train_size=1024",
        "model.width=8",
        "trainer.max_epochs=2",
        "checkpoint.every_n_steps=5",
        "optimizer.lr=0.05,0.1,0.2",
        *extra,
        f"hydra.sweep.dir={sweep_dir}",
    )


def test_an_interrupted_sweep_resumes_with_the_same_command(tmp_path):
    first = _sweep(tmp_path)
    deadline = time.time() + 120
    while not (
        (tmp_path / "1" / "train.log").is_file() and "epoch 1 |" in (tmp_path / "1" / "train.log").read_text()
    ):
        assert time.time() < deadline and first.poll() is None, "the second job never trained an epoch"
        time.sleep(0.05)
    first.send_signal(signal.SIGTERM)
    _, stderr = first.communicate(timeout=120)
    assert first.returncode == 143, stderr
    assert [r["status"] for r in _rows(tmp_path)] == [
        "done",
        "interrupted",
    ]  # a partial sweep has its summary
    second = _sweep(tmp_path)
    _, stderr = second.communicate(timeout=300)
    assert second.returncode == 0, stderr
    assert "skipped" in (tmp_path / "0" / "train.log").read_text()  # finished: not trained again
    assert "resumed (resume=auto)" in (tmp_path / "1" / "train.log").read_text()  # from its checkpoint
    rows = _rows(tmp_path)
    assert [r["status"] for r in rows] == ["done"] * 3 and all(r["epochs"] == "2" for r in rows)
    assert json.loads((tmp_path / "1" / "job.json").read_text())["runs"] == 2
    # the same folder with another sweep in it: refused per job, nothing overwritten
    third = run_trainer("-m", *QUICK, "optimizer.lr=0.3", f"hydra.sweep.dir={tmp_path}")
    assert third.returncode == 1 and "holds another job's results" in third.stderr
    assert json.loads((tmp_path / "0" / "job.json").read_text())["status"] == "done"


def test_optuna_search_continues_where_it_stopped(tmp_path):
    pytest.importorskip("hydra_plugins.hydra_optuna_sweeper", reason="the sweep extra is not installed")
    optuna = pytest.importorskip("optuna")
    search = ["-m", "hparams_search=optuna", *QUICK, f"hydra.sweep.dir={tmp_path}"]
    first = run_trainer(*search, "hydra.sweeper.n_trials=2")
    assert first.returncode == 0, first.stderr
    second = run_trainer(*search, "hydra.sweeper.n_trials=3")  # the same search, asked for 3 in all
    assert second.returncode == 0, second.stderr
    assert "2 finished trial(s); 1 to go" in second.stdout + second.stderr
    study = optuna.load_study(study_name="search", storage=f"sqlite:///{tmp_path}/optuna.db")
    assert study.direction == optuna.study.StudyDirection.MAXIMIZE  # checkpoint.mode=max
    assert len([t for t in study.trials if t.state == optuna.trial.TrialState.COMPLETE]) == 3
    rows = collect(tmp_path)
    assert len(rows) == 3 and all(r["status"] == "done" for r in rows)
    assert all(r["job"].startswith("lr=") and "batch_size=" in r["job"] for r in rows)  # named by parameters
    assert {round(t.value, 6) for t in study.trials} == {round(r["best"], 6) for r in rows}


def test_joblib_runs_jobs_in_parallel_with_capped_threads(tmp_path):
    pytest.importorskip("hydra_plugins.hydra_joblib_launcher", reason="the sweep extra is not installed")
    result = run_trainer(
        "-m",
        "hydra/launcher=joblib",
        "hydra.launcher.n_jobs=2",
        "process.threads=1",
        *QUICK,
        "optimizer.lr=0.05,0.1",
        f"hydra.sweep.dir={tmp_path}",
    )
    assert result.returncode == 0, result.stderr
    assert "Joblib.Parallel(n_jobs=2" in result.stdout + result.stderr
    assert [r["status"] for r in _rows(tmp_path)] == ["done", "done"]


def test_submitit_requeues_a_signalled_job_which_resumes(tmp_path):
    """What Slurm does before a time limit: submitit sends SIGUSR2 (submitit_local does too, 30 s before
    its timeout; here it is sent at once). The job saves, submitit requeues it, the new run resumes."""
    pytest.importorskip("hydra_plugins.hydra_submitit_launcher", reason="the sweep extra is not installed")
    sweep = start_trainer(
        "-m",
        "hydra/launcher=submitit_local",
        "hydra.launcher.timeout_min=5",
        *QUICK,
        "dataset.train_size=2048",
        "model.width=8",
        "trainer.max_epochs=3",
        "checkpoint.every_n_steps=10",
        f"hydra.sweep.dir={tmp_path}",
    )
    log = tmp_path / "0" / "train.log"
    deadline = time.time() + 120
    while not (log.is_file() and "epoch 1 |" in log.read_text()):
        assert time.time() < deadline and sweep.poll() is None, "the job never trained an epoch"
        time.sleep(0.05)
    task = next(int(p.name) for p in Path("/proc").iterdir() if p.name.isdigit() and _is_job(p, tmp_path))
    os.kill(task, signal.SIGUSR2)
    _, stderr = sweep.communicate(timeout=300)
    assert sweep.returncode == 0, stderr
    text = log.read_text()
    assert "received SIGUSR2" in text and "resumed (resume=auto)" in text and "epoch 3 |" in text
    record = json.loads((tmp_path / "0" / "job.json").read_text())
    assert record["runs"] == 2 and record["status"] == "done"
    assert any("Requeued job" in p.read_text() for p in (tmp_path / ".submitit").rglob("*_log.out"))


def _is_job(proc: Path, sweep_dir: Path) -> bool:
    try:
        command = (proc / "cmdline").read_bytes().replace(b"\0", b" ").decode()
    except OSError:
        return False
    return "submitit.core._submit" in command and str(sweep_dir) in command


def test_the_chart_follows_the_one_swept_parameter():
    rows = [
        {"overrides": f"model=cnn optimizer.lr={lr}", "status": "done", "best": 0.5, "job": str(i)}
        for i, lr in enumerate((0.1, 0.01))
    ]
    assert varying_keys(rows) == ["optimizer.lr"] and swept_parameter(rows) == "optimizer.lr"
    rows.append({"overrides": "model=mlp optimizer.lr=0.1", "status": "failed", "best": None, "job": "2"})
    assert varying_keys(rows) == ["model", "optimizer.lr"] and swept_parameter(rows) is None
