"""Features end to end: user models via `imports`, multirun, debug profiles, the step-level knobs,
precision, real dataset formats, and partial export failure."""

import json
import shutil
import subprocess
import textwrap
from importlib.metadata import entry_points

import pytest
from conftest import CONF, TINY, TINY_DATA, TINY_RUN, run_trainer, write_cifar10

from trainer.core.checkpoint import load_checkpoint

USER_MODULE = """
import torch
from trainer import MODELS

@MODELS.register("{name}")
def build(num_classes: int, in_channels: int = 3, hidden: int = 32) -> torch.nn.Module:
    return {body}
"""


def _user_project(tmp_path, name, body):
    (tmp_path / f"{name}_models.py").write_text(USER_MODULE.format(name=name, body=body))
    (tmp_path / "conf" / "model").mkdir(parents=True)
    (tmp_path / "conf" / "model" / f"{name}.yaml").write_text(
        f"name: {name}\nhidden: 24\n"  # num_classes and in_channels: what the data gives
    )
    return [f"imports=[{name}_models]", f"hydra.searchpath=[file://{tmp_path / 'conf'}]", f"model={name}"]


def test_a_users_own_model_trains_without_editing_the_package(tmp_path):
    args = _user_project(
        tmp_path,
        "mynet",
        "torch.nn.Sequential(torch.nn.Conv2d(in_channels, hidden, 3), "
        "torch.nn.ReLU(), torch.nn.AdaptiveAvgPool2d(1), torch.nn.Flatten(), "
        "torch.nn.Linear(hidden, num_classes))",
    )
    run_dir = tmp_path / "run"
    # run from the user's folder, as they would
    result = run_trainer(*TINY_DATA, *TINY_RUN, *args, f"hydra.run.dir={run_dir}", cwd=tmp_path)
    assert result.returncode == 0, result.stderr
    metrics = json.loads((run_dir / "metrics.json").read_text())
    assert metrics["val/acc"] > 0.2  # it learned something (chance 0.1)
    assert load_checkpoint(run_dir / "checkpoints" / "best.pt")["model"]["0.weight"].shape[0] == 24
    resumed = run_trainer(
        f"resume={run_dir}", "trainer.max_epochs=3", cwd=tmp_path
    )  # the searchpath is replayed
    assert resumed.returncode == 0, resumed.stderr


def test_one_failing_export_format_keeps_the_others(tmp_path):
    # data-dependent control flow: TorchScript's tracer records one branch, torch.export refuses
    body = "Gate(in_channels, num_classes)"
    module = USER_MODULE.format(name="gated", body=body) + textwrap.dedent("""
        class Gate(torch.nn.Module):
            def __init__(self, c, k):
                super().__init__()
                self.net = torch.nn.Sequential(torch.nn.Flatten(), torch.nn.LazyLinear(k))
            def forward(self, x):
                y = self.net(x)
                return y if y.sum() > -1e9 else -y
        """)
    args = _user_project(tmp_path, "gated", body)
    (tmp_path / "gated_models.py").write_text(module)
    run_dir = tmp_path / "run"
    result = run_trainer(
        *TINY_DATA,
        *TINY_RUN,
        *args,
        "trainer.max_epochs=1",
        "export.formats=[torchscript,torch_export]",
        f"hydra.run.dir={run_dir}",
        cwd=tmp_path,
    )
    assert result.returncode == 1 and "export: torch_export failed" in result.stderr
    manifest = json.loads((run_dir / "export" / "manifest.json").read_text())
    assert manifest["formats"]["torchscript"]["parity"] is True
    assert "error" in manifest["formats"]["torch_export"] and not (run_dir / "export" / "model.pt2").exists()
    assert (run_dir / "export" / "model.torchscript.pt").is_file() and (run_dir / "metrics.json").is_file()


def test_multirun_gives_one_run_dir_per_job(tmp_path):
    sweep = tmp_path / "sweep"
    result = run_trainer(
        "-m",
        *TINY_DATA,
        *TINY_RUN,
        "trainer.max_epochs=1",
        "export.formats=[]",
        "optimizer.lr=0.1,0.01",
        "model=cnn,mlp",
        f"hydra.sweep.dir={sweep}",
    )
    assert result.returncode == 0, result.stderr
    jobs = sorted(p for p in sweep.iterdir() if p.is_dir())
    assert [p.name for p in jobs] == ["0", "1", "2", "3"]
    seen = set()
    for job in jobs:
        assert (job / "metrics.json").is_file() and (job / "checkpoints" / "best.pt").is_file()
        config = load_checkpoint(job / "checkpoints" / "last.pt")["config"]
        seen.add((config["model"]["name"], config["optimizer"]["lr"]))
    assert seen == {("cnn", 0.1), ("cnn", 0.01), ("mlp", 0.1), ("mlp", 0.01)}


def test_debug_overfit_drives_the_training_loss_near_zero(tmp_path):
    run_dir = tmp_path / "run"
    result = run_trainer(
        "debug=overfit",
        "dataset=synthetic",
        "model=cnn",
        "model.width=16",
        "export.formats=[]",
        f"hydra.run.dir={run_dir}",
    )
    assert result.returncode == 0, result.stderr
    assert json.loads((run_dir / "metrics.json").read_text())["train/loss"] < 0.02


def test_max_steps_accumulation_clipping_and_bf16(tmp_path):
    run_dir = tmp_path / "run"
    result = run_trainer(
        *TINY,
        "trainer.max_steps=7",
        "trainer.accumulate_grad_batches=3",
        "trainer.gradient_clip_val=1.0",
        "trainer.precision=bf16",
        "trainer.limit_val_batches=2",
        "export.formats=[torchscript]",
        f"hydra.run.dir={run_dir}",
    )
    assert result.returncode == 0, result.stderr
    metrics = json.loads((run_dir / "metrics.json").read_text())
    assert (
        metrics["steps"] == 7 and metrics["epochs"] == 1
    )  # 29 batches / 3 = 10 steps an epoch; stopped at 7
    state = load_checkpoint(run_dir / "checkpoints" / "last.pt")
    assert state["progress"]["samples_trained"] == 21 * 32  # 7 steps of 3 batches
    assert all(t.isfinite().all() for t in state["model"].values() if t.is_floating_point())


def test_debug_fast_is_one_short_epoch_on_cifar10_in_its_on_disk_format(tmp_path):
    write_cifar10(tmp_path / "data", per_batch=40)  # 200 training images: more than debug=fast's 5 batches
    run_dir = tmp_path / "run"
    result = run_trainer(
        "debug=fast",
        "model=cnn",
        "dataset=cifar10",
        f"dataset.root={tmp_path / 'data'}",
        "dataset.download=false",
        "dataset.verify_checksum=false",
        "export.formats=[]",
        f"hydra.run.dir={run_dir}",
    )
    assert result.returncode == 0, result.stderr
    assert json.loads((run_dir / "export" / "manifest.json").read_text())["classes"][0] == "airplane"
    metrics = json.loads((run_dir / "metrics.json").read_text())
    assert metrics["epochs"] == 1 and metrics["steps"] == 5


def test_console_script_is_declared_and_answers(tmp_path):
    scripts = {e.name: e.value for e in entry_points(group="console_scripts")}
    assert scripts.get("trainer") == "trainer.__main__:main"
    assert (CONF / "config.yaml").is_file()
    script = shutil.which("trainer")
    if script is None:
        pytest.skip("the console script is not on PATH (pip install -e . puts it there)")
    shown = subprocess.run(
        [script, "--help"], capture_output=True, text=True, timeout=120
    )  # a fresh interpreter
    assert shown.returncode == 0 and "usage: python -m trainer" in shown.stdout
    assert (
        "model           actor_critic, cnn, fastnet, gpt, hf, mlp, resnet, text_encoder, timm" in shown.stdout
    )
    refused = subprocess.run(
        [script, "trainer.max_epochs=0", f"hydra.run.dir={tmp_path}"],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert (
        refused.returncode == 2 and refused.stderr == "error: trainer.max_epochs: must be 1 or more, got 0\n"
    )


def test_imagefolder_end_to_end(tmp_path):
    from conftest import write_imagefolder

    write_imagefolder(tmp_path / "images", per_class=12)
    run_dir = tmp_path / "run"
    result = run_trainer(
        "debug=fast",
        "model=cnn",
        "dataset=imagefolder",
        f"dataset.root={tmp_path / 'images'}",
        "export.formats=[torchscript]",
        f"hydra.run.dir={run_dir}",
    )
    assert result.returncode == 0, result.stderr
    manifest = json.loads((run_dir / "export" / "manifest.json").read_text())
    assert manifest["classes"] == ["cat", "dog", "frog"] and manifest["input"]["shape"] == [-1, 3, 32, 32]
    assert load_checkpoint(run_dir / "checkpoints" / "last.pt")["model_args"]["num_classes"] == 3  # counted


def test_on_device_loader_trains_end_to_end(tmp_path):
    run_dir = tmp_path / "run"
    result = run_trainer(*TINY, "loader.on_device=true", "export.formats=[]", f"hydra.run.dir={run_dir}")
    assert result.returncode == 0, result.stderr
    assert json.loads((run_dir / "metrics.json").read_text())["val/acc"] > 0.6


def test_mixup_cutmix_and_label_smoothing_train(tmp_path):
    run_dir = tmp_path / "run"
    result = run_trainer(
        *TINY,
        "task.mixup_alpha=0.2",
        "task.cutmix_alpha=1.0",
        "task.label_smoothing=0.1",
        "export.formats=[]",
        f"hydra.run.dir={run_dir}",
    )
    assert result.returncode == 0, result.stderr
    metrics = json.loads((run_dir / "metrics.json").read_text())
    assert metrics["val/acc"] > 0.6  # still learns; train/acc, on mixed images, is lower by design
