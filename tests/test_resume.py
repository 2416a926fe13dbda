"""Kill a run at any instant, resume it, and get the weights of a run that was never interrupted."""

import json
import logging
import os
import signal
import time
from pathlib import Path

import pytest
import torch
from conftest import TINY, refused_in_process, run_trainer, start_trainer
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

from trainer.core.checkpoint import load_checkpoint

# A schedule that does not depend on max_epochs (so a 2-epoch run extended to 4 can equal a 4-epoch
# run), and checkpoints inside epochs: 29 steps an epoch, so saves at steps 10, 20, 29 (epoch end), 30...
# Dropout: the model draws from the global random generator, whose state a resume must restore exactly.
RESUMABLE = [*TINY, "scheduler=step", "checkpoint.every_n_steps=10", "export.formats=[]", "model.dropout=0.2"]


def _assert_same_state(a: Path, b: Path) -> None:
    sa, sb = load_checkpoint(a / "checkpoints" / "last.pt"), load_checkpoint(b / "checkpoints" / "last.pt")
    assert sa["progress"]["step"] == sb["progress"]["step"] == 4 * 29
    for key, tensor in sa["model"].items():
        assert torch.equal(tensor, sb["model"][key]), key
    for pid, buf in sa["optimizer"]["state"].items():
        for key, tensor in buf.items():
            assert torch.equal(tensor, sb["optimizer"]["state"][pid][key]), (pid, key)
    assert sa["optimizer"]["param_groups"] == sb["optimizer"]["param_groups"]


@pytest.fixture(scope="module")
def uninterrupted(tmp_path_factory) -> Path:
    run_dir = tmp_path_factory.mktemp("straight") / "run"
    result = run_trainer(*RESUMABLE, "trainer.max_epochs=4", f"hydra.run.dir={run_dir}")
    assert result.returncode == 0, result.stderr
    return run_dir


def _start(run_dir: Path, *extra: str, env: dict | None = None):
    """The run in a process group of its own, as under a shell, Slurm or systemd."""
    return start_trainer(
        *RESUMABLE, "trainer.max_epochs=4", *extra, f"hydra.run.dir={run_dir}", env=env, new_session=True
    )


def _send(proc, signum: int, group: bool) -> None:
    """To the main process alone, or to its whole group (DataLoader workers too), as `kill -- -<pgid>`,
    Slurm's scancel and time limit, and a terminal's Ctrl-C do."""
    if group:
        os.killpg(proc.pid, signum)
    else:
        proc.send_signal(signum)


def _wait_for(condition, timeout: float = 120) -> None:
    deadline = time.time() + timeout
    while not condition():
        assert time.time() < deadline, "timed out"
        time.sleep(0.02)


def _log_has(run_dir: Path, text: str) -> bool:
    log = run_dir / "train.log"
    return log.is_file() and text in log.read_text()


def test_extending_a_finished_run_equals_training_longer(tmp_path, uninterrupted):
    run_dir = tmp_path / "run"
    assert run_trainer(*RESUMABLE, f"hydra.run.dir={run_dir}").returncode == 0
    resumed = run_trainer(f"resume={run_dir / 'checkpoints' / 'last.pt'}", "trainer.max_epochs=4")
    assert resumed.returncode == 0, resumed.stderr
    _assert_same_state(run_dir, uninterrupted)
    assert (
        "trainer.max_epochs=4" in (run_dir / ".hydra" / "overrides.yaml").read_text()
    )  # same dir, config updated
    assert "resumed" in (run_dir / "train.log").read_text()
    steps = [e.step for e in EventAccumulator(str(run_dir / "tensorboard")).Reload().Scalars("val/acc")]
    assert steps == sorted(set(steps)) and len(steps) == 4  # continued, no duplicate points


@pytest.mark.parametrize(
    "signum,code,workers,group", [(signal.SIGTERM, 143, 2, True), (signal.SIGINT, 130, 0, False)]
)
def test_a_signal_saves_mid_epoch_and_resume_is_exact(tmp_path, uninterrupted, signum, code, workers, group):
    run_dir = tmp_path / "run"
    proc = _start(run_dir, f"loader.num_workers={workers}")
    _wait_for(lambda: _log_has(run_dir, "epoch 1 |"))
    _send(proc, signum, group)
    _, stderr = proc.communicate(timeout=120)
    assert proc.returncode == code, stderr
    progress = load_checkpoint(run_dir / "checkpoints" / "last.pt")["progress"]
    assert 1 <= progress["epoch"] < 4
    assert "resume with: python -m trainer resume=" in (run_dir / "train.log").read_text()
    # resumed with a different worker count than the interrupted run
    resumed = run_trainer(f"resume={run_dir}", f"loader.num_workers={2 - workers}")
    assert resumed.returncode == 0, resumed.stderr
    _assert_same_state(run_dir, uninterrupted)


@pytest.mark.parametrize("signum,workers,group", [(signal.SIGUSR1, 0, False), (signal.SIGUSR2, 2, True)])
def test_sigusr_checkpoints_and_exits_143(tmp_path, signum, workers, group):
    """SIGUSR2 to the group: what our Slurm profile's --signal=USR2@120 does before a time limit."""
    run_dir = tmp_path / "run"
    proc = _start(run_dir, f"loader.num_workers={workers}")
    _wait_for(lambda: _log_has(run_dir, "training cnn"))
    time.sleep(0.5)
    _send(proc, signum, group)
    _, stderr = proc.communicate(timeout=120)
    assert proc.returncode == 143, stderr
    assert f"after {signal.Signals(signum).name}" in (run_dir / "train.log").read_text()
    assert (run_dir / "checkpoints" / "last.pt").is_file() and "Traceback" not in stderr


def test_sigkill_while_writing_a_checkpoint(tmp_path, uninterrupted):
    run_dir = tmp_path / "run"
    marker = tmp_path / "paused"
    proc = _start(run_dir, "loader.num_workers=2", env={"TRAINER_TEST_PAUSE_IN_SAVE": f"40:{marker}"})
    _wait_for(marker.exists)  # the step-40 checkpoint is written to its temporary file, not yet renamed
    proc.kill()
    proc.wait()
    folder = run_dir / "checkpoints"
    assert list(folder.glob(".last.pt.*.tmp"))  # killed in the middle of the save
    assert load_checkpoint(folder / "last.pt")["progress"]["step"] == 30  # the previous one is whole
    resumed = run_trainer(f"resume={run_dir}")
    assert resumed.returncode == 0, resumed.stderr
    assert not list(folder.glob(".*.tmp"))
    _assert_same_state(run_dir, uninterrupted)


def test_sigkill_mid_epoch_with_a_corrupt_newest_checkpoint(tmp_path, uninterrupted):
    run_dir = tmp_path / "run"
    proc = _start(run_dir)
    _wait_for(lambda: _log_has(run_dir, "epoch 2 |"))
    proc.kill()  # no handler runs: whatever is on disk is what there is
    proc.wait()
    last = run_dir / "checkpoints" / "last.pt"
    data = bytearray(last.read_bytes())
    data[len(data) // 2] ^= 0xFF  # and then the disk flips a bit in the newest checkpoint
    last.write_bytes(bytes(data))
    resumed = run_trainer(f"resume={run_dir}")
    assert resumed.returncode == 0, resumed.stderr
    log = (run_dir / "train.log").read_text()
    assert "skipped a checkpoint" in log and "checksum mismatch" in log and "newest valid checkpoint" in log
    _assert_same_state(run_dir, uninterrupted)


def test_resume_auto_starts_fresh_continues_and_survives_no_valid_checkpoint(tmp_path, monkeypatch, capsys):
    run_dir = tmp_path / "run"
    args = [*TINY, "export.formats=[]", "resume=auto", f"hydra.run.dir={run_dir}"]
    first = run_trainer(*args, "trainer.max_epochs=1")
    assert first.returncode == 0, first.stderr
    assert "starting fresh" in (run_dir / "train.log").read_text()
    again = run_trainer(*args, "trainer.max_epochs=2")
    assert again.returncode == 0, again.stderr
    assert json.loads((run_dir / "metrics.json").read_text())["epochs"] == 2
    assert "resumed (resume=auto) at epoch 1" in (run_dir / "train.log").read_text()
    for path in (run_dir / "checkpoints").glob("*.pt"):
        path.write_bytes(path.read_bytes()[:1000])
    code, err = refused_in_process(monkeypatch, capsys, f"resume={run_dir}")
    assert code == 2 and "resume: no valid checkpoint in" in err and "truncated" in err
    auto = run_trainer(*args, "trainer.max_epochs=1")
    assert auto.returncode == 0, auto.stderr
    assert (run_dir / "train.log").read_text().count("starting fresh") == 2


def test_changed_hyperparameters_are_applied_and_said(uninterrupted, tmp_path, monkeypatch, capsys):
    run_dir = tmp_path / "run"
    assert run_trainer(*RESUMABLE, "trainer.max_epochs=1", f"hydra.run.dir={run_dir}").returncode == 0
    resumed = run_trainer(
        f"resume={run_dir}",
        "trainer.max_epochs=2",
        "optimizer.lr=0.05",
        "optimizer.weight_decay=0.001",
        "scheduler.gamma=0.5",
        "checkpoint.reset_scheduler=true",
    )
    assert resumed.returncode == 0, resumed.stderr
    log = (run_dir / "train.log").read_text()
    for line in [
        "optimizer.lr changed on resume: 0.1 -> 0.05 (applied)",
        "optimizer.weight_decay changed on resume: 0.0005 -> 0.001 (applied)",
        "scheduler.gamma changed on resume: 0.1 -> 0.5 (applied)",
        "schedule restarts at step 29",
    ]:
        assert line in log, line
    state = load_checkpoint(run_dir / "checkpoints" / "last.pt")
    assert state["progress"]["schedule_start"] == 29
    assert {g["initial_lr"] for g in state["optimizer"]["param_groups"]} == {0.05}
    assert state["optimizer"]["param_groups"][0]["weight_decay"] == 0.001
    # another optimizer: refused, unless its state is to start fresh
    code, err = refused_in_process(monkeypatch, capsys, f"resume={run_dir}", "optimizer=adam")
    assert code == 2 and "checkpoint.reset_optimizer=true" in err
    fresh = run_trainer(
        f"resume={run_dir}", "optimizer=adam", "checkpoint.reset_optimizer=true", "trainer.max_epochs=3"
    )
    assert fresh.returncode == 0, fresh.stderr
    assert "optimizer state (momentum, moments) starts fresh" in (run_dir / "train.log").read_text()
    adam_state = load_checkpoint(run_dir / "checkpoints" / "last.pt")["optimizer"]["state"]
    assert all("exp_avg" in buffers for buffers in adam_state.values())


def test_resume_refuses_another_model_and_a_damaged_file(uninterrupted, tmp_path, monkeypatch, capsys):
    code, err = refused_in_process(monkeypatch, capsys, f"resume={uninterrupted}", "model.width=32")
    assert code == 2 and "model.width: 16 -> 32" in err
    copy = tmp_path / "copy.pt"
    data = (uninterrupted / "checkpoints" / "last.pt").read_bytes()
    copy.write_bytes(data[: len(data) - 100])
    code, err = refused_in_process(
        monkeypatch, capsys, *TINY, f"resume={copy}", f"hydra.run.dir={tmp_path / 'run'}"
    )
    assert code == 2 and err.count("\n") == 1 and "copy.pt: truncated" in err


def test_a_signal_landing_inside_a_log_write_does_not_write_again():
    """A stop signal can land while the main thread is inside a log handler (CI caught one: the handler
    logged, and the file's writer refused the reentrant call with a traceback). The signal lands here,
    deterministically, in the middle of an emit; the guard's handler must only set the flag, and the
    "received" line comes at the step boundary, once."""
    from trainer.run.signals import StopRequested, stop_on_signals

    class Probe(logging.Handler):
        def __init__(self):
            super().__init__()
            self.depth, self.reentered, self.lines = 0, False, []

        def emit(self, record):
            self.depth += 1
            self.reentered |= self.depth > 1
            if record.getMessage() == "a line being written":
                signal.raise_signal(signal.SIGUSR1)  # its Python handler runs before raise_signal returns
            self.lines.append(record.getMessage())
            self.depth -= 1

    def save(signum):  # what the Trainer does on a stop: say so, save
        logging.getLogger("trainer").warning(
            "received %s: stopped at step 7, saving a checkpoint", signal.Signals(signum).name
        )

    probe, logger = Probe(), logging.getLogger("trainer")
    logger.addHandler(probe)
    level, logger.level = logger.level, logging.INFO
    try:
        with pytest.raises(SystemExit) as exit_, stop_on_signals(save) as stop:
            logger.info("a line being written")
            assert stop.signum == signal.SIGUSR1
            raise StopRequested(stop.signum)
    finally:
        logger.removeHandler(probe)
        logger.setLevel(level)
    assert exit_.value.code == 143 and not probe.reentered
    assert probe.lines[0] == "a line being written"
    assert probe.lines[1] == "received SIGUSR1: stopped at step 7, saving a checkpoint"
    assert signal.getsignal(signal.SIGUSR1) is not None  # the previous handler is back
