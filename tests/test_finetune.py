"""Fine-tuning: a timm model from a local weights file (its 1000-class head resized to the dataset's) on
an image folder, part of it frozen until an epoch, its head at a larger learning rate, tracked in MLflow;
killed and resumed across the unfreeze, it ends with the weights of the run never interrupted, in one
MLflow run.
Bad input (an unknown architecture, weights of another one, a pattern matching nothing) is one line."""

import time

import pytest
import torch
from conftest import (
    assert_same_training_state,
    kill_while_saving,
    refused_in_process,
    run_trainer,
    write_imagefolder,
)

from trainer.core.checkpoint import load_checkpoint

pytest.importorskip("timm", reason="the timm extra is not installed")
FROZEN = ["conv1.*", "bn1.*", "layer1.*"]


def args_for(weights, images, database=None) -> list[str]:
    """The run on an image folder; tracked in MLflow (an SQLite store at `database`) when one is given."""
    return [
        "model=timm",
        "model.arch=resnet10t",
        f"finetune.checkpoint={weights}",
        f"finetune.freeze=[{','.join(FROZEN)}]",
        "finetune.unfreeze_at_epoch=2",
        "optimizer.lr=0.02",
        "optimizer.head_lr_scale=5",
        "dataset=imagefolder",
        f"dataset.root={images}",
        "dataset.image_size=32",
        "loader.batch_size=32",
        "loader.num_workers=0",
        "trainer.max_epochs=3",
        "trainer.progress_bar=false",
        "checkpoint.every_n_steps=5",
        "checkpoint.keep_last=10",
        "export.formats=[]",
    ] + (
        ["logger=[tensorboard,mlflow]", f"logger.mlflow.tracking_uri=sqlite:///{database}"]
        if database
        else []
    )


def photos(root):
    """Someone's own photos: 4 classes, 256 to train on (8 batches of 32), 32 to validate on."""
    classes = ("ant", "bee", "cat", "dog")
    write_imagefolder(root, classes=classes, per_class=64, splits=("train",))
    return write_imagefolder(root, classes=classes, per_class=8, splits=("val",))


def test_fine_tuning_a_timm_model_resumes_exactly_across_the_unfreeze_in_one_mlflow_run(tmp_path):
    pytest.importorskip("mlflow", reason="the mlflow extra is not installed")
    import timm
    from mlflow.tracking import MlflowClient

    torch.manual_seed(1)
    weights = tmp_path / "resnet10t_in1k.pth"  # as a pretrained release is: 1000 classes
    pretrained = timm.create_model("resnet10t", num_classes=1000).state_dict()
    torch.save(pretrained, weights)
    straight, killed, images = tmp_path / "straight", tmp_path / "killed", photos(tmp_path / "photos")
    result = run_trainer(
        *args_for(weights, images), f"hydra.run.dir={straight}"
    )  # the reference: no tracker needed
    assert result.returncode == 0, result.stderr
    log = (straight / "train.log").read_text()
    assert (
        "loaded 84 of 86 tensors" in log and "kept new for this dataset's shapes: fc.weight, fc.bias" in log
    )
    # the weights' normalisation (timm's pretrained config); the image size given on the command line kept
    assert "preprocessing: mean [0.485, 0.456, 0.406], std [0.229, 0.224, 0.225], image size 32" in log
    assert load_checkpoint(straight / "checkpoints" / "last.pt")["config"]["dataset"]["image_size"] == 32
    # 8 steps an epoch: at the end of epoch 1 (step 8) the frozen part is the file's, BatchNorm statistics too
    epoch1 = load_checkpoint(straight / "checkpoints" / "step-000000008.pt")
    for key in ("conv1.0.weight", "bn1.weight", "bn1.running_mean", "layer1.0.conv1.weight"):
        assert torch.equal(epoch1["model"][key], pretrained[key]), key
    assert not torch.equal(epoch1["model"]["layer2.0.conv1.weight"], pretrained["layer2.0.conv1.weight"])
    final = load_checkpoint(straight / "checkpoints" / "last.pt")
    assert not torch.equal(
        final["model"]["conv1.0.weight"], pretrained["conv1.0.weight"]
    )  # trained from epoch 2
    rates = sorted({group["initial_lr"] for group in final["optimizer"]["param_groups"]})
    assert rates == pytest.approx([0.02, 0.1])  # the head at 5x
    # Killed while saving step 10 (epoch 2): resumed from step 8, frozen, into the unfreeze.
    kill_while_saving(killed, args_for(weights, images, tmp_path / "killed.db"), 10)
    assert load_checkpoint(killed / "checkpoints" / "last.pt")["progress"]["step"] == 8
    resumed = run_trainer(
        *args_for(weights, images, tmp_path / "killed.db"), f"hydra.run.dir={killed}", f"resume={killed}"
    )
    assert resumed.returncode == 0, resumed.stderr
    assert_same_training_state(straight, killed)
    client = MlflowClient(tracking_uri=f"sqlite:///{tmp_path / 'killed.db'}")
    runs = client.search_runs([client.get_experiment_by_name("trainer").experiment_id])
    assert len(runs) == 1 and runs[0].info.status == "FINISHED"
    steps = [m.step for m in client.get_metric_history(runs[0].info.run_id, "val/acc")]
    assert sorted(steps) == [8, 16, 24]  # one continuous run, each epoch once


@pytest.mark.parametrize(
    "case,needle",
    [
        ("timm typo", "model.arch: 'resnet1o' is not a timm model; did you mean"),
        (
            "torchvision typo",
            "model.arch: 'resnet1800' is not a torchvision classification model; did you mean resnet18",
        ),
        ("another architecture", "finetune.checkpoint: none of"),
        ("no such parameter", "finetune.freeze: no parameter matches ['head.*']; the names look like"),
    ],
)
def test_bad_fine_tuning_input_is_one_line(tmp_path, monkeypatch, capsys, case, needle):
    from trainer.models.small import cnn

    torch.save(cnn(num_classes=10, in_channels=3, width=8, dropout=0.0).state_dict(), tmp_path / "cnn.pt")
    model = {
        "timm typo": ["model=timm", "model.arch=resnet1o"],
        "torchvision typo": ["model=torchvision", "model.arch=resnet1800"],
        "another architecture": [
            "model=timm",
            "model.arch=resnet10t",
            f"finetune.checkpoint={tmp_path / 'cnn.pt'}",
        ],
        "no such parameter": ["model=cnn", "model.width=8", "finetune.freeze=[head.*]"],
    }[case]
    code, err = refused_in_process(
        monkeypatch,
        capsys,
        *model,
        "dataset=synthetic",
        "dataset.train_size=64",
        "loader.num_workers=0",
        f"hydra.run.dir={tmp_path / 'run'}",
    )
    assert code == 2 and needle in err and err.count("\n") == 1, err


def test_preprocessing_follows_pretrained_weights_unless_given(compose_cfg):
    """The image datasets' mean, std and size are `${pretrained:...}`: the weights' own when the model
    asks for pretrained weights (timm's pretrained config, torchvision's weights transforms; in-memory
    tables, nothing downloaded), a value given on the command line as given."""
    cfg = compose_cfg(
        "model=torchvision", "model.arch=resnet18", "model.weights=IMAGENET1K_V1", "dataset=synthetic"
    )
    assert list(cfg.dataset.mean) == [0.485, 0.456, 0.406] and list(cfg.dataset.std) == [0.229, 0.224, 0.225]
    assert cfg.dataset.image_size == 224  # and the random crop, which takes the image size
    given = compose_cfg(
        "model=timm",
        "model.arch=resnet10t",
        "model.pretrained=true",
        "dataset=synthetic",
        "dataset.image_size=64",
        "dataset.mean=[0.5,0.5,0.5]",
    )
    assert given.dataset.image_size == 64 and list(given.dataset.mean) == [0.5] * 3  # given: kept
    assert list(given.dataset.std) == [0.229, 0.224, 0.225]  # not given: timm's
    untouched = compose_cfg("model=timm", "model.arch=resnet10t", "dataset=synthetic")  # not pretrained
    assert untouched.dataset.image_size == 32 and list(untouched.dataset.std) == [0.25] * 3
    grey = compose_cfg("model=timm", "model.arch=resnet10t", "model.pretrained=true", "dataset=mnist")
    assert list(grey.dataset.mean) == [0.1307]  # one channel: the data's own, not the weights' three


def test_pretrained_weights_offline_with_an_empty_cache_name_the_folder_to_fill(tmp_path):
    """No network here: each library's own download fails, and the one line says which folder to fill."""
    common = [
        "dataset=synthetic",
        "dataset.train_size=64",
        "dataset.test_size=32",
        "loader.num_workers=0",
        "trainer.max_epochs=1",
        "export.formats=[]",
        f"hydra.run.dir={tmp_path / 'run'}",
    ]
    # No HF_HUB_OFFLINE: the run finds the hub unreachable (a closed port stands in for no network) and
    # fails in seconds, quietly, instead of retrying every request for a minute.
    started = time.monotonic()
    timm_run = run_trainer(
        "model=timm",
        "model.arch=resnet10t",
        "model.pretrained=true",
        *common,
        env={"HF_ENDPOINT": "http://127.0.0.1:9", "HF_HUB_CACHE": str(tmp_path / "hub")},
    )
    assert time.monotonic() - started < 10
    assert timm_run.returncode == 2 and len(timm_run.stderr.strip().splitlines()) == 1, timm_run.stderr
    assert "model.pretrained: cannot get resnet10t's weights" in timm_run.stderr
    assert f"fill the cache {tmp_path / 'hub'}" in timm_run.stderr
    tv_run = run_trainer(
        "model=torchvision",
        "model.arch=resnet18",
        "model.weights=IMAGENET1K_V1",
        *common,
        env={"TORCH_HOME": str(tmp_path / "torch")},
    )
    assert tv_run.returncode == 2, tv_run.stderr
    assert (
        f"put resnet18-f37072fd.pth in {tmp_path / 'torch' / 'hub' / 'checkpoints'}"
        in tv_run.stderr.splitlines()[-1]
    )
