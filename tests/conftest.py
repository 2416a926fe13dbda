"""Shared helpers: run the real entry point, compose the real config, write datasets in their real
on-disk formats. Nothing here reads outside the repository or the test's temporary folder."""

import os
import pickle
import signal
import struct
import subprocess
import sys
import time
from pathlib import Path

import forkrun
import numpy as np
import pytest
from hydra import compose, initialize_config_dir

# Two pytest workers share two cores, and every run they start would take a torch thread per core:
# four busy threads on two cores, each run ~35% slower. One thread per run (unless you set it), which
# for these tiny models costs nothing. The runs under test inherit it; no test depends on the count.
os.environ.setdefault("OMP_NUM_THREADS", "1")

ROOT = Path(__file__).resolve().parents[1]
CONF = ROOT / "conf"
sys.path.append(str(ROOT / "benchmarks"))  # what tests and benchmarks both build (hf_models.py)

# A run small enough for seconds on two cores, still through every phase.
TINY_DATA = ["dataset=synthetic", "dataset.train_size=1024", "dataset.test_size=128"]
TINY_MODEL = ["model=cnn", "model.width=16"]
# No export unless a test looks at it (test_e2e's contract, predict, serve): tracing for torch.export is
# a second of CPU per run, more than the tiny run's training.
TINY_RUN = [
    "loader.batch_size=32",
    "loader.num_workers=0",
    "trainer.max_epochs=2",
    "trainer.progress_bar=false",
    "export.formats=[]",
]
TINY = TINY_DATA + TINY_MODEL + TINY_RUN


# The files that take longest go first: `--dist loadfile` hands whole files to the workers in collection
# order, and a long file handed out last leaves the other worker idle while it runs (~15 s of the suite).
LONGEST_FIRST = [
    "test_docs.py",  # every command of the docs, ~4 minutes
    "test_distributed.py",
    "test_sweeps.py",
    "test_tasks.py",
    "test_resume.py",
    "test_benchmarks.py",
    "test_streaming.py",
    "test_finetune.py",
    "test_text.py",
    "test_features.py",
    "test_speed.py",
]


def pytest_collection_modifyitems(items: list) -> None:
    rank = {name: i for i, name in enumerate(LONGEST_FIRST)}
    items.sort(key=lambda item: rank.get(item.path.name, len(rank)))  # stable: each file's own order is kept


def run_trainer(
    *args: str,
    module: str = "trainer",
    cwd: Path | None = None,
    timeout: int = 300,
    env: dict | None = None,
    fresh: bool = False,
) -> subprocess.CompletedProcess:
    """`python -m <module> args...` in its own process, as a person would type it: forked from this
    worker's fork server (forkserver.py: the imports are done once), or with `fresh`, a new interpreter."""
    if fresh:
        return subprocess.run(
            [sys.executable, "-m", module, *args],
            cwd=cwd or ROOT,
            capture_output=True,
            text=True,
            timeout=timeout,
            env={**os.environ, **(env or {})},
        )
    return forkrun.run(module, *args, cwd=cwd or ROOT, env=env, timeout=timeout)


def start_trainer(
    *args: str,
    module: str = "trainer",
    cwd: Path | None = None,
    env: dict | None = None,
    new_session: bool = False,
    stdout=subprocess.DEVNULL,
    stderr=subprocess.PIPE,
) -> forkrun.Forked:
    """Like subprocess.Popen of `python -m <module> args...`, forked from the fork server: for tests
    that signal or kill the run while it works."""
    return forkrun.launch(
        module, *args, cwd=cwd or ROOT, env=env, new_session=new_session, stdout=stdout, stderr=stderr
    )


def process_tree(pid: int) -> list[int]:
    """pid and all its descendants, from /proc. torchrun starts each worker in a session of its own, so
    a signal to torchrun's process group misses them; Slurm and systemd signal the whole tree (the job
    step's or the unit's cgroup), which this lets a test do."""
    children: dict[int, list[int]] = {}
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rsplit(")", 1)[1].split()
        except OSError:  # the process ended meanwhile
            continue
        children.setdefault(int(fields[1]), []).append(int(stat.parent.name))
    tree, todo = [], [pid]
    while todo:
        tree.append(todo.pop())
        todo += children.get(tree[-1], [])
    return tree


def signal_tree(pid: int, signum: int) -> None:
    for member in process_tree(pid):
        try:
            os.kill(member, signum)
        except ProcessLookupError:
            pass


def refused_in_process(monkeypatch, capsys, *args: str) -> tuple[int, str]:
    """The real entry point, `trainer.__main__.main`, in this process, for a command that must be
    refused before training (Hydra composes for real; only the interpreter start is skipped, ~8 s of
    imports on two cores): its exit code and stderr."""
    from trainer.__main__ import main

    monkeypatch.setattr(sys, "argv", ["trainer", *args])
    with pytest.raises(SystemExit) as exit_info:
        main()
    return exit_info.value.code, capsys.readouterr().err


def build_recipe(cfg, run_dir: Path):
    """The recipe `python -m trainer` runs for `cfg`, set up in this process (every part built, the
    loggers opened), for tests that drive its Trainer (recipe.trainer) directly."""
    from trainer.run.recipe import Supervised

    recipe = Supervised(cfg, run_dir)
    recipe.setup()
    return recipe


def compose_config(*overrides: str, return_hydra_config: bool = False):
    from trainer.config import register_configs

    register_configs()
    with initialize_config_dir(config_dir=str(CONF), version_base="1.3"):
        return compose(
            config_name="config", overrides=list(overrides), return_hydra_config=return_hydra_config
        )


@pytest.fixture
def compose_cfg():
    return compose_config


# ---- datasets in their real on-disk formats ----------------------------------------------------
def _images(n: int, shape: tuple[int, ...], seed: int) -> tuple[np.ndarray, list[int]]:
    rng = np.random.default_rng(seed)
    return rng.integers(0, 256, (n, *shape), dtype=np.uint8), rng.integers(0, 10, n).tolist()


def write_cifar10(root: Path, per_batch: int = 20) -> Path:
    folder = root / "cifar-10-batches-py"
    folder.mkdir(parents=True)
    for i, name in enumerate([f"data_batch_{k}" for k in range(1, 6)] + ["test_batch"]):
        data, labels = _images(per_batch, (3 * 32 * 32,), i)
        with open(folder / name, "wb") as f:
            pickle.dump({"data": data, "labels": labels}, f)
    with open(folder / "batches.meta", "wb") as f:
        pickle.dump(
            {
                "label_names": [
                    "airplane",
                    "automobile",
                    "bird",
                    "cat",
                    "deer",
                    "dog",
                    "frog",
                    "horse",
                    "ship",
                    "truck",
                ]
            },
            f,
        )
    return root


def write_cifar100(root: Path, n: int = 40) -> Path:
    folder = root / "cifar-100-python"
    folder.mkdir(parents=True)
    for i, name in enumerate(["train", "test"]):
        data, _ = _images(n, (3 * 32 * 32,), i)
        with open(folder / name, "wb") as f:
            pickle.dump({"data": data, "fine_labels": [k % 100 for k in range(n)]}, f)
    with open(folder / "meta", "wb") as f:
        pickle.dump({"fine_label_names": [f"c{k}" for k in range(100)]}, f)
    return root


def write_mnist(root: Path, folder_name: str = "MNIST", n: int = 40) -> Path:
    raw = root / folder_name / "raw"
    raw.mkdir(parents=True)
    for i, prefix in enumerate(["train", "t10k"]):
        images, labels = _images(n, (28, 28), i)
        (raw / f"{prefix}-images-idx3-ubyte").write_bytes(
            struct.pack(">IIII", 0x803, n, 28, 28) + images.tobytes()
        )
        (raw / f"{prefix}-labels-idx1-ubyte").write_bytes(struct.pack(">II", 0x801, n) + bytes(labels))
    return root


def write_imagefolder(
    root: Path, classes=("cat", "dog", "frog"), per_class: int = 6, splits=("train", "val"), size=(40, 30)
) -> Path:
    """Images of three kinds of file, of a size other than the training size, one colour per class."""
    from PIL import Image

    rng = np.random.default_rng(0)
    formats = [("png", "PNG"), ("jpg", "JPEG"), ("webp", "WEBP")]
    for split in splits:
        for label, name in enumerate(classes):
            folder = root / split / name
            folder.mkdir(parents=True)
            for i in range(per_class):
                pixels = np.full((size[1], size[0], 3), 60 * label + 40, dtype=np.uint8)
                pixels = np.clip(pixels + rng.integers(0, 20, pixels.shape), 0, 255).astype(np.uint8)
                suffix, fmt = formats[i % 3]
                Image.fromarray(pixels).save(folder / f"{i}.{suffix}", fmt)
    return root


def write_hf_dataset(image_folder: Path, out: Path, num_shards: int = 1) -> Path:
    """An image folder (root/<split>/<class>/*) as a Hugging Face dataset written by save_to_disk: the
    file bytes in an Image column, the class folders' names in a ClassLabel, rows in the image folder's
    order; `val` becomes the "validation" split, as the hub names it."""
    import datasets

    classes = sorted(p.name for p in (image_folder / "train").iterdir())
    features = datasets.Features({"image": datasets.Image(), "label": datasets.ClassLabel(names=classes)})
    splits = {}
    for split in sorted(p.name for p in image_folder.iterdir()):
        rows = [
            (path, label)
            for label, name in enumerate(classes)
            if (image_folder / split / name).is_dir()
            for path in sorted((image_folder / split / name).iterdir())
        ]
        splits["validation" if split == "val" else split] = datasets.Dataset.from_dict(
            {
                "image": [{"bytes": path.read_bytes(), "path": None} for path, _ in rows],
                "label": [label for _, label in rows],
            },
            features=features,
        )
    datasets.DatasetDict(splits).save_to_disk(
        str(out), num_shards={name: min(num_shards, len(split)) for name, split in splits.items()}
    )
    return out


def write_segfolder(root: Path, per_split: int = 24) -> Path:
    """Segmentation data as VOC keeps it: root/<split>/images/*.jpg beside palette PNG masks of class
    indices (0 background, 1 square, 2 disc; 255, the ignore index, on borders)."""
    from PIL import Image

    from trainer.data.segmentation import synthetic_scenes

    palette = [0, 0, 0, 128, 0, 0, 0, 128, 0] + [224, 224, 192] * 253  # index 255: the border colour
    for split, seed in (("train", 0), ("val", 1), ("test", 2)):
        images, masks = synthetic_scenes(per_split, 48, 0.1, seed)
        (root / split / "images").mkdir(parents=True)
        (root / split / "masks").mkdir()
        for i, (image, mask) in enumerate(zip(images, masks)):
            Image.fromarray(image.permute(1, 2, 0).numpy()).save(root / split / "images" / f"{i:03d}.jpg")
            indexed = Image.fromarray(mask.numpy(), mode="P")
            indexed.putpalette(palette)
            indexed.save(root / split / "masks" / f"{i:03d}.png")
    return root


def write_npy(root: Path, n: int = 40, layout: str = "NHWC") -> Path:
    rng = np.random.default_rng(0)
    root.mkdir(parents=True, exist_ok=True)
    for split in ("train", "test"):
        images = rng.integers(0, 256, (n, 32, 32, 3) if layout == "NHWC" else (n, 3, 32, 32), dtype=np.uint8)
        np.save(root / f"{split}_images.npy", images)
        np.save(root / f"{split}_labels.npy", rng.integers(0, 10, n))
    return root


# ---- exact resume: a run killed while it saves, compared with one never interrupted ----------------
# Wall-clock figures differ between any two runs, and a killed session's partial epoch drops out of the
# image count (its time is lost with it).
TIMING = {
    "train_time_s",
    "samples_trained",
    "units_trained",
    "images_per_sec",
    "tokens_per_sec",
    "epoch_time_s",
    "steps_per_sec",  # recipe=ppo's environment steps
}


def comparable(progress: dict) -> dict:
    kept = {key: value for key, value in progress.items() if key not in TIMING}
    return {
        **kept,
        "metrics": {key: value for key, value in progress["metrics"].items() if key not in TIMING},
    }


def assert_same_training_state(a: Path, b: Path) -> None:
    import torch

    from trainer.core.checkpoint import load_checkpoint

    sa, sb = (load_checkpoint(run / "checkpoints" / "last.pt") for run in (a, b))
    assert comparable(sa["progress"]) == comparable(sb["progress"])
    for part in ("model", "ema"):
        assert (sa[part] is None) == (sb[part] is None), part
        for key, tensor in (sa[part] or {}).items():
            assert torch.equal(tensor, sb[part][key]), (part, key)
    for pid, buffers in sa["optimizer"]["state"].items():
        for key, tensor in buffers.items():
            assert torch.equal(tensor, sb["optimizer"]["state"][pid][key]), (pid, key)
    assert sa["optimizer"]["param_groups"] == sb["optimizer"]["param_groups"]
    assert sa.get("task") == sb.get("task")  # e.g. a regression's target statistics


def kill_while_saving(
    run_dir: Path, args: list[str], step: int, *, launcher: list[str] | None = None
) -> None:
    """Starts a run and SIGKILLs it (every process of it) while it writes the checkpoint of `step`."""
    marker = run_dir.parent / f"paused-{run_dir.name}"
    pause = {"TRAINER_TEST_PAUSE_IN_SAVE": f"{step}:{marker}"}
    if launcher:  # torchrun: a true subprocess
        process = subprocess.Popen(
            [*launcher, "trainer", *args, f"hydra.run.dir={run_dir}"],
            cwd=ROOT,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.PIPE,
            text=True,
            env={**os.environ, **pause},
        )
    else:
        process = start_trainer(*args, f"hydra.run.dir={run_dir}", env=pause)
    deadline = time.time() + 180
    while not marker.exists():
        assert process.poll() is None, process.stderr.read()
        assert time.time() < deadline, "never reached the step"
        time.sleep(0.02)
    signal_tree(process.pid, signal.SIGKILL)
    process.communicate(timeout=60)
