"""The streaming dataset: shards written by the shard tool, read lazily, split over workers and ranks
with every sample exactly once per epoch, resumable at any batch."""

import json
import os
import shutil
import signal
import tarfile
import time
from collections import Counter
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import TINY_MODEL, run_trainer, start_trainer, write_hf_dataset, write_imagefolder

from trainer import DATASETS
from trainer.core.checkpoint import load_checkpoint
from trainer.core.cli import _unwrap_worker_error
from trainer.core.errors import UserError
from trainer.data import build_loaders
from trainer.data.shard import main as shard_main
from trainer.data.shard import write_shards

N_TRAIN = 45  # not a multiple of anything used below: partial batches, uneven shards, uneven windows


def write_numbered_images(root: Path, n: int, split: str = "train") -> None:
    """PNG images (lossless) whose first two pixels spell the image's number: identity survives decoding."""
    from PIL import Image

    for i in range(n):
        folder = root / split / f"c{i % 3}"
        folder.mkdir(parents=True, exist_ok=True)
        pixels = np.zeros((8, 8, 3), dtype=np.uint8)
        pixels[0, 0, 0], pixels[0, 1, 0] = i % 256, i // 256
        Image.fromarray(pixels).save(folder / f"{i}.png")


def numbers(images: torch.Tensor) -> list[int]:
    values = (images[:, 0, 0, :2] * 255).round().long()  # mean 0, std 1: the pixels themselves
    return (values[:, 0] + 256 * values[:, 1]).tolist()


@pytest.fixture(scope="module", params=["tar", "jsonl", "hf"])
def shards(request, tmp_path_factory) -> Path:
    """The same images as tar shards, JSONL manifests, or a Hugging Face dataset's Arrow files (dataset=hf
    with dataset.streaming=true reads those through the same plan)."""
    if request.param == "hf":
        pytest.importorskip("datasets")
    root = tmp_path_factory.mktemp(f"shards-{request.param}")
    write_numbered_images(root / "images", N_TRAIN)
    write_numbered_images(root / "images", 9, split="val")
    if request.param == "hf":
        return write_hf_dataset(root / "images", root / "out", num_shards=3)
    write_shards(root / "images", root / "out", shard_size=7, fmt=request.param)
    return root / "out"


def _bundle(root: Path, **kw):
    common = dict(image_size=8, mean=[0.0] * 3, std=[1.0] * 3, **{"shuffle_buffer": 10, "augment": [], **kw})
    if (root / "dataset_dict.json").is_file():
        return DATASETS.build("hf", path=str(root), streaming=True, **common)
    return DATASETS.build("streaming", root=str(root), num_classes=3, **common)


def _epoch(
    bundle, *, workers=0, rank=0, world=1, epoch=0, start=0, batch=4
) -> list[tuple[torch.Tensor, torch.Tensor]]:
    loaders = build_loaders(
        bundle,
        batch_size=batch,
        num_workers=workers,
        pin_memory=False,
        prefetch_factor=2,
        persistent_workers=False,
        shuffle=True,
        drop_last=False,
        seed=5,
        rank=rank,
        world_size=world,
    )
    loaders.sampler.set_epoch(epoch, start)
    batches = list(loaders.train)
    assert len(batches) == len(loaders.train)
    return batches


def test_shard_writer_writes_webdataset_tars_and_an_index(tmp_path):
    write_imagefolder(tmp_path / "images", per_class=4, splits=("train", "val", "test"))
    shard_main([str(tmp_path / "images"), str(tmp_path / "out"), "--shard-size", "5"])
    index = json.loads((tmp_path / "out" / "index.json").read_text())
    assert index["classes"] == ["cat", "dog", "frog"]
    assert [s["count"] for s in index["splits"]["train"]["shards"]] == [5, 5, 2]
    assert set(index["splits"]) == {"train", "val", "test"}
    with tarfile.open(tmp_path / "out" / "train" / "shard-000000.tar") as tar:
        names = tar.getnames()
        labels = {int(tar.extractfile(n).read()) for n in names if n.endswith(".cls")}
    assert len(names) == 10 and {n.split(".")[1] for n in names} <= {"png", "jpg", "webp", "cls"}
    assert labels <= {0, 1, 2}
    with pytest.raises(SystemExit) as exit_info:  # index.json exists: never overwritten
        shard_main([str(tmp_path / "images"), str(tmp_path / "out")])
    assert exit_info.value.code == 2


@pytest.mark.parametrize("workers", [0, 1, 2, 3])
def test_every_sample_once_per_epoch_for_any_workers_and_two_ranks(shards, workers):
    bundle = _bundle(shards)
    for epoch in (0, 1):
        single = _epoch(bundle, workers=workers, epoch=epoch)
        assert sorted(numbers(torch.cat([x for x, _ in single]))) == list(range(N_TRAIN))
        ranks = [_epoch(bundle, workers=workers, rank=r, world=2, epoch=epoch, batch=2) for r in (0, 1)]
        assert len(ranks[0]) == len(ranks[1]) == len(single)  # equal steps on every rank
        seen = Counter(numbers(torch.cat([x for rank in ranks for x, _ in rank])))
        assert sorted(seen) == list(range(N_TRAIN)) and set(seen.values()) == {1}
        # step for step, the two ranks together train on the single process's batch
        for k, batch in enumerate(single):
            assert sorted(numbers(batch[0])) == sorted(numbers(ranks[0][k][0]) + numbers(ranks[1][k][0]))
    assert numbers(_epoch(bundle, epoch=0)[0][0]) != numbers(_epoch(bundle, epoch=1)[0][0])  # reshuffled


def test_batches_do_not_depend_on_the_worker_count(shards):
    bundle = _bundle(shards, augment=[{"name": "RandomCrop", "size": 8, "padding": 2}])
    reference = _epoch(bundle, workers=0)
    for workers in (2, 3):
        batches = _epoch(bundle, workers=workers)
        assert all(torch.equal(a, b) and torch.equal(la, lb) for (a, la), (b, lb) in zip(reference, batches))


def test_a_resume_position_continues_the_epoch_exactly(shards):
    bundle = _bundle(shards, augment=[{"name": "RandomHorizontalFlip"}])
    full = _epoch(bundle, workers=2, epoch=3)
    for start in (1, 5, len(full) - 1):
        rest = _epoch(bundle, workers=2, epoch=3, start=start)
        assert len(rest) == len(full) - start
        assert all(torch.equal(a, b) for (a, _), (b, _) in zip(full[start:], rest))


def test_a_configured_epoch_length_walks_on_through_the_stream(shards):
    half = _bundle(shards, epoch_length=N_TRAIN // 3)  # three epochs make one pass
    seen = [n for epoch in range(3) for x, _ in _epoch(half, workers=2, epoch=epoch) for n in numbers(x)]
    assert sorted(seen) == list(range(N_TRAIN))
    longer = _bundle(shards, epoch_length=2 * N_TRAIN)  # one epoch, two passes in two shard orders
    assert Counter(n for x, _ in _epoch(longer) for n in numbers(x)) == {i: 2 for i in range(N_TRAIN)}


def test_only_a_workers_own_samples_are_read(shards, monkeypatch):
    """Skipped samples cost a tar header or a line, never their bytes."""
    import trainer.data.streaming as streaming

    reads = []
    original = streaming.StreamBatches._read
    monkeypatch.setattr(
        streaming.StreamBatches, "_read", lambda self, read: reads.append(1) or original(self, read)
    )
    batches = _epoch(_bundle(shards), rank=1, world=2, batch=2)
    assert len(reads) == sum(len(y) for _, y in batches) == N_TRAIN // 2


def test_corrupt_samples_are_skipped_or_refused(tmp_path):
    write_imagefolder(tmp_path / "images", per_class=4, size=(32, 32))
    (tmp_path / "images" / "train" / "cat" / "broken.png").write_bytes(b"not an image")
    write_shards(tmp_path / "images", tmp_path / "out", shard_size=100)
    bundle = DATASETS.build("streaming", root=str(tmp_path / "out"), num_classes=3, shuffle_buffer=8)
    assert sum(len(y) for _, y in _epoch(bundle)) == 12  # 13 samples, the broken one skipped
    strict = DATASETS.build("streaming", root=str(tmp_path / "out"), num_classes=3, on_error="error")
    with pytest.raises(UserError, match="dataset.on_error=error"):
        _epoch(strict)
    with pytest.raises(UserError) as in_worker:  # raised in a worker: the CLI shows only our line
        _epoch(strict, workers=1)
    assert _unwrap_worker_error(str(in_worker.value)).startswith("dataset.on_error=error: unreadable sample")
    assert "Traceback" in str(in_worker.value)
    result = run_trainer(
        "dataset=streaming",
        f"dataset.root={tmp_path / 'out'}",
        "dataset.on_error=error",
        *TINY_MODEL,
        "trainer.max_epochs=1",
        "loader.num_workers=1",
        "loader.batch_size=4",
        f"hydra.run.dir={tmp_path / 'run'}",
    )
    assert (
        result.returncode == 2
        and result.stderr.strip().splitlines() == [result.stderr.strip().splitlines()[-1]]
        and "dataset.on_error=error" in result.stderr
    )


def test_missing_or_wrong_shards_are_user_errors(tmp_path):
    with pytest.raises(UserError, match="does not exist.*python -m trainer.data.shard"):
        DATASETS.build("streaming", root=str(tmp_path / "nowhere"), num_classes=3)
    (tmp_path / "empty").mkdir()
    with pytest.raises(UserError, match="no training shards"):
        DATASETS.build("streaming", root=str(tmp_path / "empty"), num_classes=3)
    write_imagefolder(tmp_path / "images", per_class=2)
    write_shards(tmp_path / "images", tmp_path / "out", shard_size=4)
    with pytest.raises(UserError, match="dataset.num_classes: .* lists 3 classes, the config says 5"):
        DATASETS.build("streaming", root=str(tmp_path / "out"), num_classes=5)
    with pytest.raises(UserError, match="dataset.shuffle_buffer: must be 1 or more"):
        DATASETS.build("streaming", root=str(tmp_path / "out"), num_classes=3, shuffle_buffer=0)


def test_unindexed_shards_are_counted(tmp_path):
    write_imagefolder(tmp_path / "images", per_class=3)
    write_shards(tmp_path / "images", tmp_path / "out", shard_size=4)
    (tmp_path / "out" / "index.json").unlink()
    bundle = DATASETS.build("streaming", root=str(tmp_path / "out"), num_classes=3)
    assert len(bundle.train) == 9 and len(bundle.val) == 9 and bundle.classes == ["0", "1", "2"]


def test_train_on_shards_and_resume_mid_epoch_exactly(tmp_path):
    """Through python -m trainer: a run resumed from a mid-epoch checkpoint ends with the weights of
    the run it continues, bit for bit; so does one stopped by SIGTERM to its whole process group while
    its two shard-reading workers run (the workers ignore it; the main process saves, exits 143)."""
    write_imagefolder(tmp_path / "images", per_class=30, size=(36, 36))
    write_shards(tmp_path / "images", tmp_path / "shards", shard_size=16)
    args = [
        "dataset=streaming",
        f"dataset.root={tmp_path / 'shards'}",
        "dataset.shuffle_buffer=20",
        *TINY_MODEL,
        "loader.batch_size=8",
        "loader.num_workers=2",
        "trainer.max_epochs=2",
        "trainer.progress_bar=false",
        "checkpoint.every_n_steps=4",
        "checkpoint.keep_last=10",
        "export.formats=[]",
        "scheduler=step",
    ]
    straight = tmp_path / "straight"
    result = run_trainer(*args, f"hydra.run.dir={straight}")
    assert result.returncode == 0, result.stderr
    metrics = json.loads((straight / "metrics.json").read_text())
    assert metrics["steps"] == 2 * 12 and metrics["val/acc"] > 0.5  # 90 images / 8; chance is 1/3
    resumed = tmp_path / "resumed"
    shutil.copytree(straight, resumed)
    mid_epoch = resumed / "checkpoints" / "step-000000016.pt"  # epoch 2, batch 4 of 12
    assert load_checkpoint(mid_epoch)["progress"]["batches_in_epoch"] == 4
    result = run_trainer(f"resume={mid_epoch}", "loader.num_workers=0")
    assert result.returncode == 0, result.stderr
    stopped = tmp_path / "stopped"
    process = start_trainer(*args, f"hydra.run.dir={stopped}", new_session=True)
    while not ((stopped / "train.log").is_file() and "epoch 1 |" in (stopped / "train.log").read_text()):
        assert process.poll() is None, process.stderr.read()
        time.sleep(0.02)
    os.killpg(process.pid, signal.SIGTERM)
    _, stderr = process.communicate(timeout=120)
    assert process.returncode == 143 and "Traceback" not in stderr, stderr
    assert run_trainer(f"resume={stopped}").returncode == 0
    for other in (resumed, stopped):
        a, b = (load_checkpoint(d / "checkpoints" / "last.pt")["model"] for d in (straight, other))
        assert all(torch.equal(a[k], b[k]) for k in a), other.name
