"""Every shipped task beyond classification, end to end on its synthetic data: it learns, its metrics
reach TensorBoard, metrics.json and a sweep's summary, the export matches the eager model, evaluate
reproduces the test metrics, predict and serve answer what the eager model answers, a SIGKILL mid-epoch
resumes bit for bit, and two processes reduce its metrics to the single-process values."""

import asyncio
import io
import json
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import (
    assert_same_training_state,
    kill_while_saving,
    refused_in_process,
    run_trainer,
    write_segfolder,
)
from PIL import Image

from trainer.config import params_of
from trainer.core.checkpoint import load_checkpoint
from trainer.core.errors import UserError
from trainer.core.registry import MODELS, TASKS
from trainer.evaluate import evaluate_run
from trainer.serving.predictor import Predictor
from trainer.tasks.abilities import ExportWrapper, TestTimeAugmentation
from trainer.tasks.metrics import MetricSet

COMMON = ["loader.batch_size=32", "loader.num_workers=0", "trainer.progress_bar=false"]
# (overrides, the test metric that shows learning, a bar well past chance). Chance: mAP ~0.35 (the
# labels' prevalence), R2 0, mIoU ~0.25 (everything background).
TASK_RUNS = {
    "multilabel": (
        [
            "dataset=synthetic_multilabel",
            "task=multilabel",
            "dataset.train_size=512",
            "dataset.test_size=128",
            "model=cnn",
            "model.width=16",
            "optimizer=adam",
            "optimizer.lr=0.003",
        ],
        "test/map",
        0.75,
    ),
    "regression": (
        [
            "dataset=synthetic_regression",
            "task=regression",
            "dataset.train_size=512",
            "dataset.test_size=128",
            "model=cnn",
            "model.width=16",
        ],
        "test/r2",
        0.6,
    ),
    "segmentation": (
        [
            "dataset=synthetic_shapes",
            "task=segmentation",
            "dataset.train_size=480",
            "dataset.val_size=64",
            "dataset.test_size=64",
            "model=unet",
            "model.widths=[8,16]",
            "optimizer=adam",
            "optimizer.lr=0.01",
            "task.tta=flip",
        ],
        "test/miou",
        0.4,
    ),
}


@pytest.fixture(scope="module", params=list(TASK_RUNS))
def trained(request, tmp_path_factory) -> tuple[str, Path]:
    name = request.param
    run_dir = tmp_path_factory.mktemp(name) / "run"
    result = run_trainer(*TASK_RUNS[name][0], *COMMON, "trainer.max_epochs=3", f"hydra.run.dir={run_dir}")
    assert result.returncode == 0, result.stderr
    return name, run_dir


def test_each_task_learns_and_reports_its_own_metrics(trained):
    name, run_dir = trained
    _, metric, bar = TASK_RUNS[name]
    metrics = json.loads((run_dir / "metrics.json").read_text())
    assert metrics[metric] > bar, metrics
    task = TASKS.build(name)
    reported = set(task.metrics()) | {"loss"}
    assert {f"test/{k}" for k in reported} <= set(metrics) and "test/acc" not in metrics
    assert metrics["best"]["monitor"] == f"val/{task.monitor}"  # the task's default monitor
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    events = EventAccumulator(str(run_dir / "tensorboard")).Reload()
    assert {f"val/{k}" for k in reported} | {"train/loss"} <= set(events.Tags()["scalars"])
    assert len(events.Scalars(f"val/{task.monitor}")) == 3


def test_the_export_matches_and_evaluate_reproduces_the_test_metrics(trained):
    name, run_dir = trained
    manifest = json.loads((run_dir / "export" / "manifest.json").read_text())
    assert manifest["task"]["name"] == name
    assert all(r["parity"] for r in manifest["formats"].values()), manifest["formats"]
    metrics = json.loads((run_dir / "metrics.json").read_text())
    again = evaluate_run(run_dir, "best", [])
    for key in (k for k in metrics if k.startswith("test/")):
        assert again[key] == pytest.approx(metrics[key], rel=1e-5, abs=1e-6), key


def eager_model(run_dir: Path) -> tuple[torch.nn.Module, object]:
    """The run's best weights in a freshly built model, under the task's TTA and export wrapper, with
    the task rebuilt from the run's config: what the export must equal."""
    from omegaconf import OmegaConf

    state = load_checkpoint(run_dir / "checkpoints" / "best.pt")
    cfg = OmegaConf.create(state["config"])
    task = TASKS.build(cfg.task.name, **params_of(cfg.task))
    task.classes = Predictor(run_dir).classes
    task.load_state_dict(state["task"])
    args = dict(state["model_args"])
    model = MODELS.build(args.pop("name"), **args)
    model.load_state_dict(state["model"])
    if isinstance(task, TestTimeAugmentation):
        model = task.evaluated(model)
    return (task.exported(model) if isinstance(task, ExportWrapper) else model).eval(), task


def sample_images(name: str, folder: Path) -> list[Path]:
    from trainer.data.segmentation import synthetic_scenes
    from trainer.data.synthetic import synthetic_labelled, synthetic_measured

    images = {
        "multilabel": lambda: synthetic_labelled(4, 6, 3, 32, 0.15, 99)[0],
        "regression": lambda: synthetic_measured(4, 3, 32, 0.05, 99)[0],
        "segmentation": lambda: synthetic_scenes(4, 32, 0.1, 99)[0],
    }[name]()
    folder.mkdir(exist_ok=True)
    paths = []
    for i, image in enumerate(images):
        paths.append(folder / f"{name}_{i}.png")
        Image.fromarray(image.permute(1, 2, 0).numpy()).save(paths[-1])
    return paths


def test_predict_and_serve_answer_what_the_eager_model_answers(trained, tmp_path):
    from aiohttp.test_utils import TestClient, TestServer

    from trainer.predict import PredictConfig, predict
    from trainer.serve import ServeSettings, build_app

    name, run_dir = trained
    files = sample_images(name, tmp_path)
    model, task = eager_model(run_dir)
    predictor = Predictor(run_dir)
    with torch.no_grad():
        outputs = model(torch.stack([predictor.decode(p.read_bytes()) for p in files]))
    expected = task.answer(outputs, {"topk": 5})
    config = PredictConfig(
        run=str(run_dir),
        inputs=[str(p) for p in files],
        masks=str(tmp_path / "masks") if name == "segmentation" else None,
    )
    rows = predict(config)
    assert [{k: v for k, v in row.items() if k not in ("image", "mask")} for row in rows] == _rounded(
        expected
    )
    if name == "segmentation":  # the mask files hold the eager model's argmax
        masks = [torch.from_numpy(np.array(Image.open(r["mask"]))) for r in rows]
        assert all(torch.equal(m.long(), o.argmax(0)) for m, o in zip(masks, outputs))

    async def ask() -> None:
        async with TestClient(TestServer(build_app(predictor, ServeSettings(max_wait_ms=1)))) as client:
            for path, answer in zip(files, expected):
                response = await client.post(
                    "/v1/predict", data=path.read_bytes(), headers={"Content-Type": "image/png"}
                )
                assert response.status == 200
                assert (await response.json())["predictions"] == _rounded([answer])
            if name == "segmentation":
                response = await client.post(
                    "/v1/predict?format=png",
                    data=files[0].read_bytes(),
                    headers={"Content-Type": "image/png"},
                )
                mask = torch.from_numpy(np.array(Image.open(io.BytesIO(await response.read()))))
                assert response.content_type == "image/png" and torch.equal(mask.long(), outputs[0].argmax(0))
            if name == "multilabel":  # the request's threshold over the run's task.threshold
                strict = await client.post(
                    "/v1/predict?threshold=0.99",
                    data=files[0].read_bytes(),
                    headers={"Content-Type": "image/png"},
                )
                answer = (await strict.json())["predictions"][0]
                assert answer == _rounded(task.answer(outputs[:1], {"threshold": 0.99}))[0]
                assert answer["threshold"] == 0.99 and all(
                    label["score"] >= 0.99 for label in answer["labels"]
                )
                bad = await client.post(
                    "/v1/predict?threshold=2",
                    data=files[0].read_bytes(),
                    headers={"Content-Type": "image/png"},
                )
                assert bad.status == 400 and "threshold must be below 1" in (await bad.json())["error"]
            meta = await (await client.get("/v1/metadata")).json()
            assert meta["task"]["name"] == name
            assert (
                await client.post("/v1/generate", json={"prompt": "a"})
            ).status == 404  # language models only

    asyncio.run(ask())


def _rounded(answers: list[dict]) -> list[dict]:
    """Answers as they come back through JSON (floats compared to 1e-5: the export and eager differ
    in the last bits only)."""
    return json.loads(json.dumps(answers), parse_float=lambda s: pytest.approx(float(s), abs=1e-5))


# Batches of 32: multilabel and regression train 461 images (15 batches), segmentation 240 (8 batches).
RESUME = {
    "multilabel": (
        [
            "dataset=synthetic_multilabel",
            "task=multilabel",
            "dataset.train_size=512",
            "dataset.test_size=64",
            "model=cnn",
            "model.width=8",
            "model.dropout=0.2",
        ],
        4,
        24,
    ),
    "regression": (
        [
            "dataset=synthetic_regression",
            "task=regression",
            "dataset.train_size=512",
            "dataset.test_size=64",
            "model=cnn",
            "model.width=8",
            "model.dropout=0.2",
        ],
        4,
        24,
    ),
    "segmentation": (
        [
            "dataset=synthetic_shapes",
            "task=segmentation",
            "dataset.train_size=240",
            "dataset.val_size=32",
            "dataset.test_size=32",
            "model=unet",
            "model.widths=[8,16]",
        ],
        3,
        12,
    ),
}


@pytest.mark.parametrize("name", RESUME)
def test_sigkill_mid_epoch_then_resume_is_bit_identical(tmp_path, name):
    overrides, every, killed_at = RESUME[name]
    args = [
        *overrides,
        *COMMON,
        "trainer.max_epochs=2",
        "export.formats=[]",
        f"checkpoint.every_n_steps={every}",
    ]
    straight = run_trainer(*args, f"hydra.run.dir={tmp_path / 'straight'}")
    assert straight.returncode == 0, straight.stderr
    run_dir = tmp_path / "killed"
    kill_while_saving(run_dir, args, killed_at)
    saved = load_checkpoint(run_dir / "checkpoints" / "last.pt")["progress"]
    assert saved["step"] == killed_at - every and saved["epoch"] == 1 and saved["batches_in_epoch"] > 0
    resumed = run_trainer(f"resume={run_dir}")
    assert resumed.returncode == 0, resumed.stderr
    assert_same_training_state(run_dir, tmp_path / "straight")


# ---- two processes reduce every task's metrics to the one-process values ------------------------------
def _task(name: str):
    from trainer.tasks.base import DataInfo

    task = TASKS.build(name)
    target = {
        "classification": "class",
        "multilabel": "labels",
        "regression": "values",
        "segmentation": "mask",
    }
    classes = {"regression": ["a", "b"]}.get(
        name, [f"c{i}" for i in range(7 if name == "classification" else 3)]
    )
    targets = torch.randn(50, 2, generator=torch.Generator().manual_seed(1)) if name == "regression" else None
    task.bind(DataInfo(target=target[name], classes=classes, train_targets=targets))
    return task


def _samples(name: str) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """Seven batches of outputs and targets, of unequal sizes."""
    g = torch.Generator().manual_seed(0)
    batches = []
    for size in (5, 3, 8, 1, 6, 4, 2):
        if name == "classification":
            batches.append((torch.randn(size, 7, generator=g), torch.randint(7, (size,), generator=g)))
        elif name == "multilabel":
            batches.append(
                (torch.randn(size, 3, generator=g), (torch.rand(size, 3, generator=g) < 0.4).float())
            )
        elif name == "regression":
            batches.append((torch.randn(size, 2, generator=g), torch.randn(size, 2, generator=g)))
        else:
            masks = torch.randint(3, (size, 6, 6), generator=g)
            masks[0, 0] = 255  # an ignored pixel
            batches.append((torch.randn(size, 3, 6, 6, generator=g), masks))
    return batches


NAMES = ["classification", "multilabel", "regression", "segmentation"]


def _evaluate_shares(rank: int, world: int, init: str, out: str) -> None:
    import torch.distributed as dist

    dist.init_process_group("gloo", init_method=init, rank=rank, world_size=world)
    found = {}
    for name in NAMES:
        task = _task(name)
        evaluation = MetricSet(task.metrics(), torch.device("cpu"))
        for i, (outputs, targets) in enumerate(_samples(name)):
            if i % world == rank:  # this process's share: unequal in batches and in samples
                evaluation.update(
                    task, outputs, (None, targets), task.loss(outputs, (None, targets)), len(targets)
                )
        found[name] = evaluation.compute()
    if rank == 0:
        Path(out).write_text(json.dumps(found))
    dist.destroy_process_group()


def test_two_processes_reduce_every_tasks_metrics_to_the_single_process_values(tmp_path):
    """mAP from scores gathered from both processes, the others from summed totals: equal to one
    process's values over the same outputs, up to the order of float64 additions."""
    import torch.multiprocessing as mp

    out = tmp_path / "pair.json"
    # forked from this worker, which has imported torch already (a spawned child would import it again)
    mp.start_processes(
        _evaluate_shares,
        args=(2, f"file://{tmp_path / 'rendezvous'}", str(out)),
        nprocs=2,
        start_method="fork",
    )
    pair = json.loads(out.read_text())
    for name in NAMES:
        task = _task(name)
        evaluation = MetricSet(task.metrics(), torch.device("cpu"))
        for outputs, targets in _samples(name):
            evaluation.update(
                task, outputs, (None, targets), task.loss(outputs, (None, targets)), len(targets)
            )
        single = evaluation.compute()
        assert pair[name].keys() == single.keys(), name
        for key, value in single.items():
            assert pair[name][key] == pytest.approx(value, rel=1e-12, abs=1e-12), (name, key)


# ---- a task and a dataset of one's own -------------------------------------------------------------------
def readme_block(first_line: str) -> str:
    """The documentation's code block that starts with `first_line` (a file name comment)."""
    readme = (Path(__file__).resolve().parents[1] / "docs" / "how-to" / "extend.md").read_text()
    start = readme.index(first_line)
    return readme[start : readme.index("```", start)]


def test_the_readmes_own_task_trains_resumes_predicts_and_serves(tmp_path, monkeypatch):
    import asyncio

    from aiohttp.test_utils import TestClient, TestServer

    from trainer.serve import ServeSettings, build_app

    code = readme_block("# my_tasks.py")
    assert len(code.strip().splitlines()) <= 20  # the promise the docs make: two methods, twenty lines
    (tmp_path / "my_tasks.py").write_text(code)
    (tmp_path / "my_conf" / "task").mkdir(parents=True)
    (tmp_path / "my_conf" / "task" / "focal.yaml").write_text(readme_block("# my_conf/task/focal.yaml"))
    run_dir = tmp_path / "run"
    args = [
        "imports=[my_tasks]",
        f"hydra.searchpath=[file://{tmp_path / 'my_conf'}]",
        "task=focal",
        "dataset=synthetic",
        "dataset.train_size=512",
        "dataset.test_size=128",
        "model=cnn",
        "model.width=16",
        *COMMON,
        "trainer.max_epochs=3",
        "export.formats=[torch_export]",
        f"hydra.run.dir={run_dir}",
    ]
    result = run_trainer(*args, cwd=tmp_path)
    assert result.returncode == 0, result.stderr
    metrics = json.loads((run_dir / "metrics.json").read_text())
    assert metrics["best"]["monitor"] == "val/f1" and metrics["test/acc"] > 0.3, metrics  # chance: 0.1
    resumed = run_trainer(f"resume={run_dir}", "trainer.max_epochs=4", cwd=tmp_path)
    assert resumed.returncode == 0, resumed.stderr
    assert json.loads((run_dir / "metrics.json").read_text())["epochs"] == 4
    images = sample_images("regression", tmp_path / "images")  # any images: the answer's form is checked
    predicted = run_trainer(
        f"run={run_dir}", f"inputs=[{images[0]}]", "output=jsonl", module="trainer.predict", cwd=tmp_path
    )
    assert predicted.returncode == 0, predicted.stderr
    assert len(json.loads(predicted.stdout)["outputs"]) == 10  # no Answers ability: its raw outputs
    monkeypatch.syspath_prepend(str(tmp_path))  # the server imports the run's own modules (its imports)
    monkeypatch.setattr(TASKS, "_builders", dict(TASKS._builders))  # the task leaves with this test
    try:
        predictor = Predictor(run_dir)
    finally:
        sys.modules.pop("my_tasks", None)

    async def serve() -> None:
        async with TestClient(TestServer(build_app(predictor, ServeSettings(max_wait_ms=1)))) as client:
            response = await client.post(
                "/v1/predict", data=images[0].read_bytes(), headers={"Content-Type": "image/png"}
            )
            assert response.status == 200 and len((await response.json())["predictions"][0]["outputs"]) == 10

    asyncio.run(serve())


USER_DATASET = '''
import torch
from torch.utils.data import TensorDataset
from trainer.data import DATASETS, DataBundle
from trainer.core.registry import MODELS


@DATASETS.register("points")
def points(num_classes: int = 3, size: int = 600):
    """Points in 16 dimensions, a class per cluster: no images, no mean, no std, no preview."""
    g = torch.Generator().manual_seed(0)
    centres = torch.randn(num_classes, 16, generator=g) * 3
    labels = torch.randint(num_classes, (size,), generator=g)
    features = centres[labels] + torch.randn(size, 16, generator=g)
    split = lambda a, b: TensorDataset(features[a:b], labels[a:b])
    return DataBundle(train=split(0, 400), val=split(400, 500), test=split(500, 600),
                      classes=[f"cluster_{i}" for i in range(num_classes)])


@MODELS.register("linear")
def linear(num_classes: int, features: int = 16):  # num_classes: what the data gives
    return torch.nn.Linear(features, num_classes)
'''


def test_a_tensordataset_without_images_trains_exports_and_serves_json(tmp_path, monkeypatch):
    from aiohttp.test_utils import TestClient, TestServer

    from trainer.serve import ServeSettings, build_app

    (tmp_path / "my_data.py").write_text(USER_DATASET)
    conf = tmp_path / "my_conf"
    (conf / "dataset").mkdir(parents=True)
    (conf / "model").mkdir()
    (conf / "dataset" / "points.yaml").write_text("name: points\nnum_classes: 3\n")
    (conf / "model" / "linear.yaml").write_text("name: linear\n")
    run_dir = tmp_path / "run"
    result = run_trainer(
        "imports=[my_data]",
        f"hydra.searchpath=[file://{conf}]",
        "dataset=points",
        "model=linear",
        *COMMON,
        "trainer.max_epochs=3",
        f"hydra.run.dir={run_dir}",
        cwd=tmp_path,
    )
    assert result.returncode == 0, result.stderr
    assert json.loads((run_dir / "metrics.json").read_text())["test/acc"] > 0.8  # chance: 1/3
    manifest = json.loads((run_dir / "export" / "manifest.json").read_text())
    assert manifest["preprocess"] is None and manifest["input"]["shape"] == [-1, 16]
    monkeypatch.syspath_prepend(str(tmp_path))  # the server imports the run's own modules (its imports)...
    from trainer.core.registry import DATASETS

    for registry in (MODELS, DATASETS):  # ...whose entries leave with this test, not stay in this worker
        monkeypatch.setattr(registry, "_builders", dict(registry._builders))
    try:
        predictor = Predictor(run_dir)
    finally:
        sys.modules.pop("my_data", None)
    point = (
        torch.load(run_dir / "checkpoints" / "best.pt", weights_only=True)["model"]["weight"][0] * 0
    )  # zeros

    async def ask() -> None:
        async with TestClient(TestServer(build_app(predictor, ServeSettings(max_wait_ms=1)))) as client:
            response = await client.post("/v1/predict", json={"inputs": point.tolist()})
            assert response.status == 200
            assert len((await response.json())["predictions"][0]["top_k"]) == 3
            image = await client.post("/v1/predict", data=b"\x89PNG", headers={"Content-Type": "image/png"})
            assert image.status == 400 and "takes tensors" in (await image.json())["error"]

    asyncio.run(ask())


def test_a_sweeps_summary_shows_the_tasks_own_metrics(tmp_path):
    from trainer.sweep.summary import refresh_summary

    for job, lr, value in (("0", "0.1", 0.81), ("1", "0.01", 0.93)):
        (tmp_path / job).mkdir()
        (tmp_path / job / "job.json").write_text(
            json.dumps(
                {"overrides": [f"optimizer.lr={lr}"], "status": "done", "best": value, "wall_time_s": 3.0}
            )
        )
        (tmp_path / job / "metrics.json").write_text(
            json.dumps(
                {"val/map": value, "val/f1": 0.5, "val/loss": 0.3, "test/map": value - 0.01, "epochs": 2}
            )
        )
    refresh_summary(tmp_path, "val/map")
    header, *rows = (tmp_path / "sweep_summary.csv").read_text().splitlines()
    assert header.split(",") == [
        "job",
        "status",
        "overrides",
        "best val/map",
        "val/map",
        "val/f1",
        "val/loss",
        "test/map",
        "epochs",
        "wall_time_s",
        "error",
    ]
    assert rows[1].split(",")[4] == "0.93" and (tmp_path / "sweep_summary.png").stat().st_size > 0


def test_a_run_from_an_older_version_is_refused_in_one_line(tmp_path, monkeypatch, capsys):
    """No migration code: a run dir whose config has the sections of an older version (before tasks: a
    `loss` section; before the recipe: no ema, finetune or process) is refused by resume and evaluate in
    one line that says so."""
    import yaml

    run_dir = tmp_path / "run"
    args = [
        "dataset=synthetic",
        "dataset.train_size=256",
        "dataset.test_size=64",
        "model=cnn",
        "model.width=8",
        *COMMON,
        "trainer.max_epochs=1",
        "export.formats=[]",
    ]
    assert run_trainer(*args, f"hydra.run.dir={run_dir}").returncode == 0
    saved = yaml.safe_load((run_dir / ".hydra" / "config.yaml").read_text())
    old = {key: value for key, value in saved.items() if key not in ("ema", "finetune", "process", "task")}
    (run_dir / ".hydra" / "config.yaml").write_text(yaml.safe_dump({**old, "loss": {"label_smoothing": 0.1}}))
    code, err = refused_in_process(monkeypatch, capsys, f"resume={run_dir}")
    assert code == 2 and err.count("\n") == 1 and "was written by an older version of trainer" in err, err
    with pytest.raises(UserError, match="was written by an older version of trainer"):
        evaluate_run(run_dir, "best", [])


# ---- the on-disk formats each task reads ------------------------------------------------------------------
def _write_manifest(root: Path, kind: str) -> list[str]:
    import csv

    from trainer.data.synthetic import synthetic_labelled, synthetic_measured

    names = ["red", "green", "blue", "sky", "sea", "sun"]
    (root / "img").mkdir(parents=True)
    for split, seed in (("train", 0), ("val", 1)):
        if kind == "labels":
            images, labels = synthetic_labelled(48, 6, 3, 32, 0.15, seed)
            with (root / f"{split}.csv").open("w", newline="") as f:
                writer = csv.writer(f)
                writer.writerow(["path", "labels"])
                for i, image in enumerate(images):
                    Image.fromarray(image.permute(1, 2, 0).numpy()).save(root / "img" / f"{split}{i}.png")
                    writer.writerow(
                        [f"img/{split}{i}.png", "|".join(n for n, on in zip(names, labels[i]) if on)]
                    )
        else:
            images, values = synthetic_measured(48, 3, 32, 0.05, seed)
            with (root / f"{split}.jsonl").open("w") as f:
                for i, image in enumerate(images):
                    Image.fromarray(image.permute(1, 2, 0).numpy()).save(root / "img" / f"{split}{i}.jpg")
                    f.write(
                        json.dumps(
                            {
                                "path": f"img/{split}{i}.jpg",
                                "bright": float(values[i, 0]),
                                "x": float(values[i, 1]),
                            }
                        )
                        + "\n"
                    )
    targets = [] if kind == "labels" else ["dataset.targets=[bright,x]", "dataset.augment=[]"]
    return ["dataset=manifest", f"dataset.root={root}", *targets]


def _write_numpy(root: Path, kind: str) -> list[str]:
    root.mkdir(parents=True)
    rng = np.random.default_rng(0)
    for split in ("train", "test"):
        np.save(root / f"{split}_images.npy", rng.integers(0, 256, (40, 32, 32, 3), dtype=np.uint8))
        labels = (
            rng.normal(size=(40, 2)).astype(np.float32) if kind == "values" else rng.integers(0, 2, (40, 4))
        )
        np.save(root / f"{split}_labels.npy", labels)
    return ["dataset=numpy", f"dataset.root={root}", f"dataset.num_classes={2 if kind == 'values' else 4}"]


def _write_segfolder(root: Path) -> list[str]:
    write_segfolder(root)
    return [
        "dataset=segfolder",
        f"dataset.root={root}",
        "dataset.num_classes=3",
        "dataset.image_size=32",
        "dataset.class_names=[background,square,disc]",
        "model=unet",
        "model.widths=[8,16]",
        "dataset.augment=[{name: RandomCrop, size: 32, padding: 4}, {name: RandomHorizontalFlip}]",
    ]


FORMATS = {
    "manifest_csv_multilabel": ("multilabel", lambda root: _write_manifest(root, "labels")),
    "manifest_jsonl_regression": ("regression", lambda root: _write_manifest(root, "values")),
    "numpy_float_regression": ("regression", lambda root: _write_numpy(root, "values")),
    "numpy_multi_hot_multilabel": ("multilabel", lambda root: _write_numpy(root, "labels")),
    "segfolder_palette_masks": ("segmentation", _write_segfolder),
}


@pytest.mark.parametrize("case", FORMATS)
def test_the_tasks_read_their_real_on_disk_formats(tmp_path, case):
    task, write = FORMATS[case]
    args = write(tmp_path / "data")
    model = [] if any(a.startswith("model=") for a in args) else ["model=cnn", "model.width=8"]
    run_dir = tmp_path / "run"
    result = run_trainer(
        f"task={task}",
        *args,
        *model,
        *COMMON,
        "loader.batch_size=16",
        "trainer.max_epochs=1",
        "export.formats=[torch_export]",
        f"hydra.run.dir={run_dir}",
    )
    assert result.returncode == 0, result.stderr
    metrics = json.loads((run_dir / "metrics.json").read_text())
    assert all(np.isfinite(metrics[f"test/{k}"]) for k in TASKS.build(task).metrics())
    manifest = json.loads((run_dir / "export" / "manifest.json").read_text())
    assert manifest["formats"]["torch_export"]["parity"] and manifest["task"]["name"] == task
    if case.startswith("manifest"):
        assert manifest["classes"] == (
            ["bright", "x"] if task == "regression" else ["blue", "green", "red", "sea", "sky", "sun"]
        )  # sorted labels
    if case == "segfolder_palette_masks":
        assert manifest["classes"] == ["background", "square", "disc"]
