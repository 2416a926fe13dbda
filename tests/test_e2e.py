"""End to end through `python -m trainer` in a subprocess, on tiny synthetic data."""

import json
from pathlib import Path

import pytest
import torch
from conftest import TINY, run_trainer

from trainer.core.checkpoint import load_checkpoint


@pytest.fixture(scope="module")
def golden(tmp_path_factory) -> Path:
    """One complete default run, read by several tests."""
    run_dir = tmp_path_factory.mktemp("golden") / "run"
    as_typed = [
        arg for arg in TINY if not arg.startswith("export.")
    ]  # the default exports: the whole contract
    result = run_trainer(*as_typed, f"hydra.run.dir={run_dir}", fresh=True)  # a new interpreter, as typed
    assert result.returncode == 0, result.stderr
    return run_dir


def test_run_dir_holds_the_whole_contract(golden):
    for name in [
        ".hydra/config.yaml",
        ".hydra/overrides.yaml",
        "train.log",
        "checkpoints/last.pt",
        "checkpoints/best.pt",
        "export/model.torchscript.pt",
        "export/model.pt2",
        "export/manifest.json",
        "metrics.json",
    ]:
        assert (golden / name).is_file(), name
    assert list((golden / "tensorboard").glob("events.out.tfevents.*"))
    metrics = json.loads((golden / "metrics.json").read_text())
    for key in [
        "train/loss",
        "val/loss",
        "val/acc",
        "test/loss",
        "test/acc",
        "epochs",
        "steps",
        "images_per_sec",
        "wall_time_s",
    ]:
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
    assert manifest["input"]["shape"] == [-1, 3, 32, 32] and manifest["normalization"]["mean"] == [
        0.5,
        0.5,
        0.5,
    ]
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
    assert reported["test/acc"] == metrics["test/acc"] and reported["test/loss"] == pytest.approx(
        metrics["test/loss"]
    )
    last = run_trainer(f"run={golden}", "checkpoint=last", module="trainer.evaluate")
    assert last.returncode == 0 and json.loads(last.stdout.strip().splitlines()[-1])["checkpoint"] == "last"


def test_hydra_entry_returns_the_monitored_metric(tmp_path):
    """What Hydra's sweepers optimise: the task function's return value, the best checkpoint.monitor."""
    from conftest import compose_config
    from hydra.core.hydra_config import HydraConfig
    from omegaconf import open_dict

    from trainer.__main__ import run

    cfg = compose_config(
        *TINY,
        "trainer.max_epochs=1",
        "export.formats=[]",
        "checkpoint.monitor=val/loss",
        "checkpoint.mode=min",
        return_hydra_config=True,
    )
    with open_dict(cfg):
        cfg.hydra.runtime.output_dir = str(tmp_path)
        HydraConfig.instance().set_config(cfg)
        del cfg["hydra"]
    best = run(cfg)
    assert best == pytest.approx(json.loads((tmp_path / "metrics.json").read_text())["val/loss"])
