"""Exact resume with each training feature that keeps state of its own: SIGKILL in the middle of an
epoch, resume, and the weights, optimizer state and EMA equal, bit for bit, those of a run that was
never interrupted. (The plain case, signals and damaged checkpoints are in test_resume.py; two
processes under torchrun in test_distributed.py.)"""

import pytest
from conftest import assert_same_training_state, kill_while_saving, run_trainer

from trainer.core.checkpoint import load_checkpoint

# 461 training images (10% of 512 held out) in batches of 32: 15 batches an epoch. Dropout, random
# crops and flips: every random generator a resume must restore is in use.
BASE = [
    "dataset=synthetic",
    "dataset.train_size=512",
    "dataset.test_size=64",
    "model=cnn",
    "model.width=8",
    "model.dropout=0.2",
    "loader.batch_size=32",
    "loader.num_workers=0",
    "trainer.max_epochs=3",
    "trainer.progress_bar=false",
    "export.formats=[]",
    "scheduler=step",
]

# (overrides, checkpoint.every_n_steps, the step whose save is killed): the checkpoint before it, the
# one the resume starts from, lies inside epoch 2.
CASES = {
    "ema": (["ema.decay=0.9", "ema.every=2"], 4, 24),
    "mixup_and_cutmix": (["task.mixup_alpha=0.4", "task.cutmix_alpha=1.0"], 4, 24),
    "accumulate_grad_batches": (["trainer.accumulate_grad_batches=3"], 3, 9),  # 5 steps an epoch
    "on_device": (["loader.on_device=true", "ema.decay=0.9"], 4, 24),
}


@pytest.mark.parametrize("case", CASES)
def test_sigkill_mid_epoch_then_resume_is_bit_identical(tmp_path, case):
    overrides, every, killed_at = CASES[case]
    args = [*BASE, *overrides, f"checkpoint.every_n_steps={every}"]
    straight = run_trainer(*args, f"hydra.run.dir={tmp_path / 'straight'}")
    assert straight.returncode == 0, straight.stderr
    run_dir = tmp_path / "killed"
    kill_while_saving(run_dir, args, killed_at)
    saved = load_checkpoint(run_dir / "checkpoints" / "last.pt")["progress"]
    assert (
        saved["step"] == killed_at - every and saved["epoch"] == 1 and saved["batches_in_epoch"] > 0
    )  # mid-epoch
    resumed = run_trainer(f"resume={run_dir}")
    assert resumed.returncode == 0, resumed.stderr
    assert_same_training_state(run_dir, tmp_path / "straight")
