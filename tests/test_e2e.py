"""End to end through `python -m trainer` in a subprocess, on tiny synthetic data."""
import json
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from conftest import ROOT, TINY, run_trainer
from trainer.checkpoint import load_checkpoint


@pytest.fixture(scope="module")
def golden(tmp_path_factory) -> Path:
    """One complete default run, read by several tests."""
    run_dir = tmp_path_factory.mktemp("golden") / "run"
    result = run_trainer(*TINY, f"hydra.run.dir={run_dir}")
    assert result.returncode == 0, result.stderr
    return run_dir


def test_run_dir_holds_the_whole_contract(golden):
    for name in [".hydra/config.yaml", ".hydra/overrides.yaml", "train.log", "checkpoints/last.pt",
                 "checkpoints/best.pt", "export/model.torchscript.pt", "export/model.pt2", "export/manifest.json",
                 "metrics.json"]:
        assert (golden / name).is_file(), name
    assert list((golden / "tensorboard").glob("events.out.tfevents.*"))
    metrics = json.loads((golden / "metrics.json").read_text())
    for key in ["train/loss", "val/loss", "val/acc", "test/loss", "test/acc", "epochs", "steps", "images_per_sec",
                "wall_time_s"]:
        assert isinstance(metrics[key], (int, float)), key
    assert metrics["epochs"] == 2 and metrics["steps"] == 2 * 29  # 922 train images / 32 per batch
    log = (golden / "train.log").read_text()
    assert "epoch 1 |" in log and "epoch 2 |" in log and "time per phase" in log


def test_learns_well_above_chance(golden):
    metrics = json.loads((golden / "metrics.json").read_text())
    assert metrics["val/acc"] > 0.6 and metrics["test/acc"] > 0.6  # chance is 0.1
    assert metrics["train/loss"] < 1.0


def test_checkpoint_holds_everything_to_resume(golden):
    state = load_checkpoint(golden / "checkpoints" / "last.pt")  # weights_only=True inside
    assert {"model", "optimizer", "scheduler", "scaler", "progress", "rng", "config", "version"} <= set(state)
    assert not any(k.startswith(("_orig_mod.", "module.")) for k in state["model"])
    assert state["progress"]["epoch"] == 2 and state["config"]["model"]["name"] == "cnn"
    assert isinstance(state["config"], dict)


def test_exports_reload_and_match_the_eager_model(golden):
    import warnings
    from trainer import MODELS
    manifest = json.loads((golden / "export" / "manifest.json").read_text())
    assert manifest["classes"] == [f"class_{i}" for i in range(10)]
    assert manifest["input"]["shape"] == [-1, 3, 32, 32] and manifest["normalization"]["mean"] == [0.5, 0.5, 0.5]
    assert all(r["parity"] and r["max_abs_diff"] <= 1e-4 for r in manifest["formats"].values())
    model = MODELS.build("cnn", num_classes=10, width=16).eval()
    model.load_state_dict(load_checkpoint(golden / "checkpoints" / "best.pt")["model"])
    x = torch.randn(5, 3, 32, 32)  # a batch size used by neither export: the batch dimension is dynamic
    with torch.no_grad(), warnings.catch_warnings():
        warnings.simplefilter("ignore", FutureWarning)
        expected = model(x)
        scripted = torch.jit.load(str(golden / "export" / "model.torchscript.pt"))(x)
        program = torch.export.load(str(golden / "export" / "model.pt2")).module()(x)
    assert torch.allclose(scripted, expected, atol=1e-5) and torch.allclose(program, expected, atol=1e-5)


def test_tensorboard_has_curves_images_and_hparams(golden):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
    events = EventAccumulator(str(golden / "tensorboard")).Reload()
    tags = events.Tags()
    for tag in ["train/loss", "train/acc", "val/loss", "val/acc", "lr", "images_per_sec", "epoch_time_s"]:
        assert len(events.Scalars(tag)) == 2, tag  # one point per epoch
    assert "train/samples" in tags["images"]
    assert "hparams" in str(events.PluginTagToContent("hparams"))


def test_evaluate_reproduces_the_runs_test_metrics(golden):
    result = run_trainer(f"run={golden}", module="trainer.evaluate")
    assert result.returncode == 0, result.stderr
    reported = json.loads(result.stdout.strip().splitlines()[-1])
    metrics = json.loads((golden / "metrics.json").read_text())
    assert reported["test/acc"] == metrics["test/acc"] and reported["test/loss"] == pytest.approx(metrics["test/loss"])
    last = run_trainer(f"run={golden}", "checkpoint=last", module="trainer.evaluate")
    assert last.returncode == 0 and json.loads(last.stdout.strip().splitlines()[-1])["checkpoint"] == "last"


# ---- resume ------------------------------------------------------------------------------------
RESUMABLE = [*TINY, "scheduler=step", "checkpoint.every_n_steps=10"]  # a schedule that does not depend on max_epochs


def _assert_same_state(a: Path, b: Path) -> None:
    sa, sb = load_checkpoint(a / "checkpoints" / "last.pt"), load_checkpoint(b / "checkpoints" / "last.pt")
    assert sa["progress"]["step"] == sb["progress"]["step"]
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


def test_extending_a_finished_run_equals_training_longer(tmp_path, uninterrupted):
    run_dir = tmp_path / "run"
    assert run_trainer(*RESUMABLE, f"hydra.run.dir={run_dir}").returncode == 0
    resumed = run_trainer(f"resume={run_dir / 'checkpoints' / 'last.pt'}", "trainer.max_epochs=4")
    assert resumed.returncode == 0, resumed.stderr
    _assert_same_state(run_dir, uninterrupted)
    assert "trainer.max_epochs=4" in (run_dir / ".hydra" / "overrides.yaml").read_text()  # same dir, config updated
    assert "resumed" in (run_dir / "train.log").read_text()
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
    steps = [e.step for e in EventAccumulator(str(run_dir / "tensorboard")).Reload().Scalars("val/acc")]
    assert steps == sorted(set(steps)) and len(steps) == 4  # continued, no duplicate points


@pytest.mark.parametrize("signum,code,workers", [(signal.SIGTERM, 143, 2), (signal.SIGINT, 130, 0)])
def test_a_signal_saves_mid_epoch_and_resume_is_exact(tmp_path, uninterrupted, signum, code, workers):
    run_dir = tmp_path / "run"
    proc = subprocess.Popen([sys.executable, "-m", "trainer", *RESUMABLE, "trainer.max_epochs=4",
                             f"loader.num_workers={workers}", f"hydra.run.dir={run_dir}"], cwd=ROOT,
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    log = run_dir / "train.log"
    deadline = time.time() + 120
    while time.time() < deadline and not (log.is_file() and "epoch 1 |" in log.read_text()):
        time.sleep(0.05)
    proc.send_signal(signum)
    _, stderr = proc.communicate(timeout=120)
    assert proc.returncode == code, stderr
    progress = load_checkpoint(run_dir / "checkpoints" / "last.pt")["progress"]
    assert 1 <= progress["epoch"] < 4
    assert "resume with: python -m trainer resume=" in (run_dir / "train.log").read_text()
    # resumed with a different worker count than the interrupted run
    resumed = run_trainer(f"resume={run_dir}", f"loader.num_workers={2 - workers}")
    assert resumed.returncode == 0, resumed.stderr
    _assert_same_state(run_dir, uninterrupted)


def test_resume_auto_starts_fresh_then_continues(tmp_path):
    run_dir = tmp_path / "run"
    first = run_trainer(*TINY, "trainer.max_epochs=1", "export.formats=[]", "resume=auto", f"hydra.run.dir={run_dir}")
    assert first.returncode == 0, first.stderr
    assert "no checkpoint" in (run_dir / "train.log").read_text()
    again = run_trainer(*TINY, "trainer.max_epochs=2", "export.formats=[]", "resume=auto", f"hydra.run.dir={run_dir}")
    assert again.returncode == 0, again.stderr
    assert json.loads((run_dir / "metrics.json").read_text())["epochs"] == 2
    assert "resumed auto at epoch 1" in (run_dir / "train.log").read_text()


def test_resume_refuses_another_model_and_a_corrupt_checkpoint(golden, tmp_path):
    other = run_trainer(f"resume={golden}", "model.width=32")
    assert other.returncode == 2 and "model.width: 16 -> 32" in other.stderr
    copy = tmp_path / "copy.pt"
    data = (golden / "checkpoints" / "last.pt").read_bytes()
    copy.write_bytes(data[: len(data) - 100])
    bad = run_trainer(*TINY, f"resume={copy}", f"hydra.run.dir={tmp_path / 'run'}")
    assert bad.returncode == 2 and "copy.pt: truncated" in bad.stderr and "Traceback" not in bad.stderr


def test_hydra_entry_returns_the_monitored_metric(tmp_path):
    """What Hydra's sweepers optimise: the task function's return value, the best checkpoint.monitor."""
    from hydra.core.hydra_config import HydraConfig
    from omegaconf import open_dict
    from conftest import compose_config
    from trainer.__main__ import run
    cfg = compose_config(*TINY, "trainer.max_epochs=1", "export.formats=[]", "checkpoint.monitor=val/loss",
                         "checkpoint.mode=min", return_hydra_config=True)
    with open_dict(cfg):
        cfg.hydra.runtime.output_dir = str(tmp_path)
        HydraConfig.instance().set_config(cfg)
        del cfg["hydra"]
    best = run(cfg)
    assert best == pytest.approx(json.loads((tmp_path / "metrics.json").read_text())["val/loss"])
