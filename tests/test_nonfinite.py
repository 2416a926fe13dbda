"""A NaN or Inf loss stops the run (naming the step) or skips the batch, and never reaches a checkpoint."""

import hashlib
import json
from pathlib import Path

from conftest import TINY_DATA, TINY_RUN, run_trainer

from trainer.core.checkpoint import load_checkpoint

FLAKY_MODEL = """
import os
import torch
from trainer import MODELS

class EveryNthIsNaN(torch.nn.Module):
    def __init__(self, in_channels, num_classes, n):
        super().__init__()
        self.net = torch.nn.Sequential(torch.nn.Conv2d(in_channels, 8, 3), torch.nn.ReLU(),
                                       torch.nn.AdaptiveAvgPool2d(1), torch.nn.Flatten(),
                                       torch.nn.Linear(8, num_classes))
        self.n, self.calls = n, 0

    def forward(self, x):
        y = self.net(x)
        if self.training:
            self.calls += 1
            if self.calls % self.n == 0:
                return y * float("nan")
        return y

@MODELS.register("flaky")
def flaky(num_classes: int, in_channels: int = 3) -> torch.nn.Module:
    # from the environment, not the config: a resume with another model config is refused, rightly
    return EveryNthIsNaN(in_channels, num_classes, int(os.environ.get("NAN_EVERY", "7")))
"""


def _flaky_project(tmp_path: Path) -> list[str]:
    (tmp_path / "flaky_models.py").write_text(FLAKY_MODEL)
    (tmp_path / "conf" / "model").mkdir(parents=True)
    (tmp_path / "conf" / "model" / "flaky.yaml").write_text(
        "name: flaky\nnum_classes: ${dataset.num_classes}\nin_channels: ${dataset.in_channels}\n"
    )
    return [
        *TINY_DATA,
        *TINY_RUN,
        "imports=[flaky_models]",
        f"hydra.searchpath=[file://{tmp_path / 'conf'}]",
        "model=flaky",
        "export.formats=[]",
    ]


def _digest(folder: Path) -> dict[str, str]:
    return {p.name: hashlib.sha256(p.read_bytes()).hexdigest() for p in sorted(folder.glob("*.pt"))}


def test_nan_stops_naming_the_step_and_keeps_the_last_good_checkpoint(tmp_path):
    args = _flaky_project(tmp_path)
    run_dir = tmp_path / "run"
    first = run_trainer(
        *args, "trainer.max_epochs=1", f"hydra.run.dir={run_dir}", cwd=tmp_path, env={"NAN_EVERY": "1000"}
    )
    assert first.returncode == 0, first.stderr
    before = _digest(run_dir / "checkpoints")
    # the resumed model counts its calls from 0: the 7th training batch after the resume is NaN
    bad = run_trainer(f"resume={run_dir}", "trainer.max_epochs=2", cwd=tmp_path, env={"NAN_EVERY": "7"})
    assert bad.returncode == 2, bad.stderr
    assert "the loss became NaN or Inf at step 36 (epoch 2)" in bad.stderr and "learning rate" in bad.stderr
    assert _digest(run_dir / "checkpoints") == before  # nothing overwritten


def test_skip_batch_skips_and_counts_then_stops_past_the_limit(tmp_path):
    args = _flaky_project(tmp_path)
    run_dir = tmp_path / "run"
    ok = run_trainer(
        *args,
        "trainer.on_nonfinite=skip_batch",
        "trainer.max_epochs=1",
        f"hydra.run.dir={run_dir}",
        cwd=tmp_path,
    )
    assert ok.returncode == 0, ok.stderr
    assert load_checkpoint(run_dir / "checkpoints" / "last.pt")["progress"]["skipped_batches"] == 29 // 7
    metrics = json.loads((run_dir / "metrics.json").read_text())
    assert all(v == v for v in (metrics["train/loss"], metrics["val/loss"]))  # finite, no NaN leaked in
    too_many = run_trainer(
        *args,
        "trainer.on_nonfinite=skip_batch",
        "trainer.max_skipped_batches=2",
        f"hydra.run.dir={tmp_path / 'run2'}",
        cwd=tmp_path,
    )
    assert too_many.returncode == 2 and "trainer.max_skipped_batches: 3 batches" in too_many.stderr
