"""torchrun: two processes on the CPU (gloo) write one complete run dir and train what one process
with the same global batch trains; an interrupted two-process run resumes."""

import json
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from conftest import ROOT, TINY_DATA, TINY_RUN, process_tree, run_trainer, signal_tree

from trainer.core.checkpoint import load_checkpoint

# 1,001 synthetic images, 10% held out: 901 to train. With a global batch of 32, the last step has 5
# images, which two processes share 3 + 2: the loss weighting for unequal shares is exercised.
EQUIVALENT = [
    "dataset=synthetic",
    "dataset.train_size=1001",
    "dataset.test_size=128",
    "model=mlp",
    "model.hidden=[64]",
    "loader.num_workers=0",
    "trainer.max_epochs=2",
    "trainer.progress_bar=false",
    "optimizer.lr=0.05",
    "scheduler=cosine",
]


def torchrun(*args: str, timeout: int = 300) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node=2", "-m", "trainer", *args],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=timeout,
    )


@pytest.fixture(scope="module")
def single_and_pair(tmp_path_factory) -> tuple[Path, Path]:
    root = tmp_path_factory.mktemp("ddp")
    single = run_trainer(
        *EQUIVALENT, "loader.batch_size=32", f"hydra.run.dir={root / 'single'}"
    )  # forked; torchrun is not
    assert single.returncode == 0, single.stderr
    pair = torchrun(*EQUIVALENT, "loader.batch_size=16", f"hydra.run.dir={root / 'pair'}")
    assert pair.returncode == 0, pair.stderr
    return root / "single", root / "pair"


def test_two_processes_write_one_complete_run_dir(single_and_pair):
    _, pair = single_and_pair
    assert sorted(p.name for p in pair.iterdir()) == [
        ".hydra",
        "checkpoints",
        "export",
        "metrics.json",
        "tensorboard",
        "train.log",
    ]
    writers = {f.name.split(".")[-2] for f in (pair / "tensorboard").glob("events.out.tfevents.*")}
    assert len(writers) == 1  # one process (rank 0) wrote the events: the name ends in <pid>.<n>
    log = (pair / "train.log").read_text()
    assert "x 2 processes" in log and log.count("epoch 1 |") == 1  # rank 0 logs; the others do not write here
    assert json.loads((pair / "export" / "manifest.json").read_text())["formats"]["torch_export"]["parity"]
    assert not any(
        k.startswith("module.") for k in load_checkpoint(pair / "checkpoints" / "last.pt")["model"]
    )


def test_two_processes_train_what_one_process_trains(single_and_pair):
    """Each step, the two processes' batches of 16 are the one process's batch of 32 (the same images, the
    same augmentation), and DDP averages their gradients. What remains is float32 summation in another
    order: ~1e-7 relative per step, which measured as at most 3e-5 on weights of magnitude up to 0.8
    after these 58 steps. 1e-3 leaves room for that and still fails on a real mistake (a sample seen
    twice, unsynchronised gradients, unweighted unequal shares), which moves weights by 1e-2 or more."""
    single, pair = single_and_pair
    a, b = (load_checkpoint(d / "checkpoints" / "last.pt") for d in (single, pair))
    assert a["progress"]["step"] == b["progress"]["step"] == 2 * 29
    for key, tensor in a["model"].items():
        assert torch.allclose(tensor, b["model"][key], atol=1e-3, rtol=0), key
    ma, mb = (json.loads((d / "metrics.json").read_text()) for d in (single, pair))
    assert mb["train/loss"] == pytest.approx(ma["train/loss"], rel=1e-3)  # reduced over both processes
    assert mb["test/acc"] == ma["test/acc"]


def test_a_group_sigterm_with_loader_workers_checkpoints_and_resumes(tmp_path):
    """Slurm's scancel and time limit (and systemd) signal every process of the job at once: torchrun,
    both training processes and their DataLoader workers. The workers ignore it, the processes agree on
    a step, rank 0 saves, and the run resumes there."""
    args = [
        *TINY_DATA,
        "dataset.train_size=2048",
        "model=cnn",
        "model.width=8",
        *TINY_RUN,
        "loader.batch_size=16",
        "loader.num_workers=1",
        "trainer.max_epochs=2",
        "trainer.log_every_n_steps=5",
        "export.formats=[]",
    ]
    run = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "torch.distributed.run",
            "--nproc_per_node=2",
            "-m",
            "trainer",
            *args,
            f"hydra.run.dir={tmp_path}",
        ],
        cwd=ROOT,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
        text=True,
    )
    log = tmp_path / "train.log"
    deadline = time.time() + 120
    while not (log.is_file() and "epoch 1 |" in log.read_text()):
        assert time.time() < deadline and run.poll() is None, "never trained an epoch"
        time.sleep(0.05)
    tree = process_tree(run.pid)
    assert len(tree) >= 5  # torchrun, two processes, their loader workers
    signal_tree(run.pid, signal.SIGTERM)
    _, stderr = run.communicate(timeout=120)  # torchrun itself exits 1 on SIGTERM (docs: distributed.md)
    assert "is killed by signal" not in stderr and "saved" in log.read_text().split("received SIGTERM")[-1], (
        stderr
    )
    saved = load_checkpoint(tmp_path / "checkpoints" / "last.pt")["progress"]
    assert saved["epoch"] >= 1 and saved["step"] > 0
    resumed = torchrun(f"resume={tmp_path}")
    assert resumed.returncode == 0, resumed.stderr
    text = log.read_text()
    assert f"at epoch {saved['epoch']}, batch {saved['batches_in_epoch']}, step {saved['step']}" in text
    assert json.loads((tmp_path / "metrics.json").read_text())["epochs"] == 2


def test_sigkill_mid_epoch_then_resume_equals_the_uninterrupted_pair(single_and_pair, tmp_path):
    """Both processes and torchrun killed at once while rank 0 writes the step-40 checkpoint; resumed
    from step 30 (inside epoch 2), the pair ends with the uninterrupted pair's weights, bit for bit."""
    from conftest import assert_same_training_state, kill_while_saving

    _, pair = single_and_pair
    args = [*EQUIVALENT, "loader.batch_size=16", "checkpoint.every_n_steps=10"]
    kill_while_saving(
        tmp_path / "run",
        args,
        40,
        launcher=[sys.executable, "-m", "torch.distributed.run", "--nproc_per_node=2", "-m"],
    )
    assert load_checkpoint(tmp_path / "run" / "checkpoints" / "last.pt")["progress"]["step"] == 30
    resumed = torchrun(f"resume={tmp_path / 'run'}")
    assert resumed.returncode == 0, resumed.stderr
    assert_same_training_state(tmp_path / "run", pair)


def test_torchrun_refuses_a_multirun(tmp_path):
    result = torchrun("-m", *TINY_DATA, "optimizer.lr=0.1,0.2", f"hydra.sweep.dir={tmp_path}", timeout=120)
    assert result.returncode != 0 and "torchrun with -m/--multirun" in result.stderr
    shutil.rmtree(tmp_path, ignore_errors=True)


def test_a_signal_during_the_stop_all_reduce_is_not_lost(monkeypatch):
    """The signal handler runs while this process waits in the all-reduce, after it sent "no": the
    others' answer must not erase the flag (it did, and a signalled run trained on to its end)."""
    from trainer.core import distributed
    from trainer.run.health import stop_agreed
    from trainer.run.signals import Stop

    stop, cpu = Stop(), torch.device("cpu")

    def all_reduce_while_signalled(values, op="sum"):
        stop.signum = signal.SIGTERM  # what the stop handler does
        return torch.zeros_like(values)  # every process said "no" before the signal came

    monkeypatch.setattr(distributed, "active", lambda: True)
    monkeypatch.setattr(distributed, "all_reduce", all_reduce_while_signalled)
    assert stop_agreed(stop, cpu, at_check=True) is False  # not agreed yet: the others go on too
    assert stop.signum == signal.SIGTERM  # kept, so the next check stops everyone
    monkeypatch.setattr(distributed, "all_reduce", lambda values, op="sum": values)
    assert stop_agreed(stop, cpu, at_check=True) is True
