"""Unexpected failures end the run: an exception in a loss, a loader worker, the checkpoint writer or
one torchrun process makes every process exit non-zero within seconds, with the traceback; nothing
waits for idle workers or a dead peer. Each failure is injected by a module named in `imports:`."""

import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest
from conftest import ROOT, TINY_DATA, TINY_MODEL, run_trainer, write_imagefolder

from trainer.data.shard import write_shards

# Loader workers on (two, persistent: the default), which is what used to hang after an error.
WORKERS = [
    "loader.batch_size=32",
    "loader.num_workers=2",
    "loader.persistent_workers=true",
    "trainer.max_epochs=2",
    "trainer.progress_bar=false",
    "export.formats=[]",
]
FAILED_AT = "failed_at"  # the injected failure writes the time it happened here


def inject(folder: Path, name: str, body: str) -> str:
    """A module that replaces part of the framework with code that fails, importable from `folder`."""
    prelude = f"import os, time\nfrom pathlib import Path\nMARK = Path({str(folder / FAILED_AT)!r})\n"
    (folder / f"{name}.py").write_text(prelude + textwrap.dedent(body))
    return f"imports=[{name}]"


def assert_failed_promptly(result: subprocess.CompletedProcess, folder: Path, message: str) -> None:
    ended = time.time()
    assert result.returncode == 1, result.stderr[-2000:]
    assert "Traceback" in result.stderr and message in result.stderr, result.stderr[-2000:]
    assert ended - float((folder / FAILED_AT).read_text()) < 10  # it used to wait for its workers forever


def test_an_error_in_the_loss_with_loader_workers_exits_1_promptly(tmp_path):
    imports = inject(
        tmp_path,
        "bad_loss",
        """
        from trainer.tasks.classification import Classification
        original, calls = Classification.loss, []
        def loss(self, outputs, batch):
            calls.append(1)
            if len(calls) == 5:
                MARK.write_text(str(time.time()))
                raise RuntimeError("injected: the loss failed")
            return original(self, outputs, batch)
        Classification.loss = loss
    """,
    )
    result = run_trainer(
        *TINY_DATA,
        *TINY_MODEL,
        *WORKERS,
        imports,
        f"hydra.run.dir={tmp_path / 'run'}",
        cwd=tmp_path,
        timeout=120,
    )
    assert_failed_promptly(result, tmp_path, "injected: the loss failed")
    assert "injected: the loss failed" in (tmp_path / "run" / "train.log").read_text()  # the log has it too


def test_an_error_in_a_streaming_worker_exits_1_promptly(tmp_path):
    write_imagefolder(tmp_path / "images", per_class=20, size=(32, 32))
    write_shards(tmp_path / "images", tmp_path / "shards", shard_size=16)
    imports = inject(
        tmp_path,
        "bad_worker",
        """
        import torch.utils.data
        from trainer.data.streaming import StreamBatches
        original = StreamBatches._make_batch
        def make_batch(self, samples, epoch, step):
            if torch.utils.data.get_worker_info() is not None and step == 1:
                MARK.write_text(str(time.time()))
                raise RuntimeError("injected: a worker failed")
            return original(self, samples, epoch, step)
        StreamBatches._make_batch = make_batch
    """,
    )
    result = run_trainer(
        "dataset=streaming",
        f"dataset.root={tmp_path / 'shards'}",
        *TINY_MODEL,
        *WORKERS,
        "loader.batch_size=8",
        imports,
        f"hydra.run.dir={tmp_path / 'run'}",
        cwd=tmp_path,
        timeout=120,
    )
    assert_failed_promptly(result, tmp_path, "injected: a worker failed")


def test_an_error_in_the_checkpoint_writer_exits_1_promptly(tmp_path):
    imports = inject(
        tmp_path,
        "bad_writer",
        """
        import importlib
        def keep_history(last, step, keep):
            MARK.write_text(str(time.time()))
            raise RuntimeError("injected: the checkpoint writer failed")
        importlib.import_module("trainer.core.checkpoint").keep_history = keep_history
    """,
    )
    result = run_trainer(
        *TINY_DATA,
        *TINY_MODEL,
        *WORKERS,
        "checkpoint.every_n_steps=3",
        imports,
        f"hydra.run.dir={tmp_path / 'run'}",
        cwd=tmp_path,
        timeout=120,
    )
    assert_failed_promptly(result, tmp_path, "injected: the checkpoint writer failed")


@pytest.mark.parametrize("failing_rank", [0, 1])
def test_an_error_in_one_torchrun_process_ends_both(tmp_path, failing_rank):
    imports = inject(
        tmp_path,
        "bad_rank",
        f"""
        from trainer.tasks.classification import Classification
        original, calls = Classification.loss, []
        def loss(self, outputs, batch):
            calls.append(1)
            if len(calls) == 3 and os.environ["RANK"] == "{failing_rank}":
                MARK.write_text(str(time.time()))
                raise RuntimeError("injected: one rank failed")
            return original(self, outputs, batch)
        Classification.loss = loss
    """,
    )
    command = [
        sys.executable,
        "-m",
        "torch.distributed.run",
        "--nproc_per_node=2",
        "-m",
        "trainer",
        *TINY_DATA,
        *TINY_MODEL,
        *WORKERS,
        "loader.batch_size=16",
        imports,
        f"hydra.run.dir={tmp_path / 'run'}",
    ]
    result = subprocess.run(
        command,
        cwd=tmp_path,
        capture_output=True,
        text=True,
        timeout=180,
        env={"PYTHONPATH": f"{tmp_path}:{ROOT}", **_environment()},
    )
    ended = time.time()
    assert result.returncode != 0 and "injected: one rank failed" in result.stderr, result.stderr[-3000:]
    assert ended - float((tmp_path / FAILED_AT).read_text()) < 30  # both ranks gone; torchrun reported it


def _environment() -> dict[str, str]:
    import os

    return {key: value for key, value in os.environ.items() if key != "PYTHONPATH"}
