"""dataset=hf: a Hugging Face `datasets` dataset trains like the image folder it was made from; its
class names come from its features; bad columns, splits and paths are one-line errors. (Streaming
over its Arrow files is tested with the other shard formats in test_streaming.py.)"""

import json

import pytest
import torch
from conftest import TINY_MODEL, refused_in_process, run_trainer, write_hf_dataset, write_imagefolder

from trainer.core.checkpoint import load_checkpoint

datasets = pytest.importorskip("datasets")

RUN = [
    *TINY_MODEL,
    "loader.batch_size=8",
    "loader.num_workers=0",
    "trainer.max_epochs=2",
    "export.formats=[]",
    "trainer.progress_bar=false",
    "dataset.image_size=16",
]


@pytest.fixture(scope="module")
def folders(tmp_path_factory):
    root = tmp_path_factory.mktemp("hf")
    images = write_imagefolder(
        root / "images", classes=("ant", "bee", "cow"), per_class=8, splits=("train", "val", "test")
    )
    return images, write_hf_dataset(images, root / "saved", num_shards=2)


def test_a_saved_dataset_trains_exactly_like_the_image_folder_it_was_made_from(folders, tmp_path):
    images, saved = folders
    runs = {name: tmp_path / name for name in ("folder", "hf")}
    for name, data in (
        ("folder", ["dataset=imagefolder", f"dataset.root={images}"]),
        ("hf", ["dataset=hf", f"dataset.path={saved}"]),
    ):
        result = run_trainer(*data, *RUN, f"hydra.run.dir={runs[name]}")
        assert result.returncode == 0, result.stderr
    a, b = (load_checkpoint(runs[name] / "checkpoints" / "last.pt") for name in ("folder", "hf"))
    assert a["model"].keys() == b["model"].keys() and all(
        torch.equal(a["model"][k], b["model"][k]) for k in a["model"]
    )
    metrics = [json.loads((runs[name] / "metrics.json").read_text()) for name in ("folder", "hf")]
    assert (
        metrics[0]["test/acc"] == metrics[1]["test/acc"] and metrics[0]["val/loss"] == metrics[1]["val/loss"]
    )
    log = (runs["hf"] / "train.log").read_text()
    assert "train = train (24 rows), val = validation (24 rows), test = test (24 rows)" in log
    assert b["model_args"]["num_classes"] == 3  # counted from the ClassLabel when the data was built
    streamed = tmp_path / "streamed"  # the Arrow files read lazily by two loader workers
    result = run_trainer(
        "dataset=hf",
        f"dataset.path={saved}",
        "dataset.streaming=true",
        *RUN,
        "loader.num_workers=2",
        "export.formats=[torchscript]",
        f"hydra.run.dir={streamed}",
    )
    assert result.returncode == 0, result.stderr
    assert json.loads((streamed / "metrics.json").read_text())["steps"] == 2 * 3  # 24 rows, batches of 8
    assert json.loads((streamed / "export" / "manifest.json").read_text())["classes"] == ["ant", "bee", "cow"]


def test_class_names_come_from_the_features_or_the_label_values(tmp_path):
    from trainer.data.hf import class_names

    png = (
        write_imagefolder(tmp_path / "images", per_class=1, splits=("train",)) / "train" / "cat" / "0.png"
    ).read_bytes()
    image = {"bytes": png, "path": None}
    named = datasets.Dataset.from_dict(
        {"img": [image] * 3, "kind": ["zebra", "ant", "zebra"]},
        features=datasets.Features({"img": datasets.Image(), "kind": datasets.Value("string")}),
    )
    named.save_to_disk(str(tmp_path / "named"))
    assert class_names(str(tmp_path / "named"), "kind", "train") == ["ant", "zebra"]
    indexed = datasets.Dataset.from_dict(
        {"img": [image] * 2, "y": [0, 4]},
        features=datasets.Features({"img": datasets.Image(), "y": datasets.Value("int64")}),
    )
    indexed.save_to_disk(str(tmp_path / "indexed"))
    assert class_names(str(tmp_path / "indexed"), "y", "train") == ["0", "1", "2", "3", "4"]


@pytest.mark.parametrize(
    "override, needle",
    [
        ("dataset.image_column=picture", "dataset.image_column: 'picture' is not a column of"),
        ("dataset.label_column=kind", "dataset.label_column: 'kind' is not a column of"),
        ("dataset.split_train=training", "dataset.split_train: 'training' is not a split of"),
        ("dataset.split_val=dev", "dataset.split_val: 'dev' is not a split of"),
        ("dataset.image_column=label", "dataset.image_column: 'label' holds ClassLabel"),
    ],
)
def test_a_wrong_column_or_split_is_one_line(folders, monkeypatch, capsys, override, needle):
    _, saved = folders
    code, err = refused_in_process(monkeypatch, capsys, "dataset=hf", f"dataset.path={saved}", override, *RUN)
    assert code == 2 and needle in err and len(err.strip().splitlines()) == 1, err
    assert "image, label" in err or "splits: test, train, validation" in err or "holds" in err


def test_an_unknown_path_offline_names_the_cache_to_fill(monkeypatch, capsys, tmp_path):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setattr(datasets.config, "HF_HUB_OFFLINE", True, raising=False)
    monkeypatch.setenv("HF_DATASETS_CACHE", str(tmp_path / "cache"))
    code, err = refused_in_process(
        monkeypatch, capsys, "dataset=hf", "dataset.path=someone/no-such-dataset", *RUN
    )
    assert code == 2 and len(err.strip().splitlines()) == 1, err
    assert "dataset.path: cannot load 'someone/no-such-dataset'" in err and str(tmp_path / "cache") in err


def test_a_damaged_arrow_file_is_one_line_naming_it(folders, tmp_path):
    """Files from elsewhere are hostile: a truncated Arrow file is refused in one line, never a crash."""
    import shutil

    from trainer import DATASETS
    from trainer.core.errors import UserError

    _, saved = folders
    copy = shutil.copytree(saved, tmp_path / "copy")
    arrow = sorted((copy / "train").glob("*.arrow"))[0]
    arrow.write_bytes(arrow.read_bytes()[: arrow.stat().st_size // 2])
    with pytest.raises(
        UserError, match=f"dataset.path: cannot load the folder {copy} \\(OSError: .*; write it again"
    ):
        DATASETS.build("hf", path=str(copy), streaming=True, image_size=16)
