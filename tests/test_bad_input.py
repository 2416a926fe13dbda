"""Every input a person can get wrong: exit 2 and one plain line that names the key, no traceback.

Most cases call the real entry point, `trainer.__main__.main`, in this process (Hydra composes for real;
it is only the interpreter start that is skipped); two go through a subprocess to pin the exit code
and the stderr a person sees."""

import pytest
from conftest import TINY_DATA, TINY_RUN, refused_in_process, run_trainer, write_cifar10


def _main_exit(monkeypatch, capsys, tmp_path, *args: str) -> tuple[int, str]:
    base = TINY_RUN + (TINY_DATA if not any(a.startswith("dataset=") for a in args) else [])
    return refused_in_process(monkeypatch, capsys, *base, f"hydra.run.dir={tmp_path / 'run'}", *args)


@pytest.mark.parametrize(
    "args,needle",
    [
        (
            ["model=resnte"],
            "model=resnte: no such option; choose one of actor_critic, cnn, fastnet, gpt, hf, mlp, resnet, "
            "text_encoder, timm, torchvision, tvseg, unet",
        ),
        (["dataset=imagefolder"], "dataset.root: dataset=imagefolder needs it; give dataset.root=<value>"),
        (
            ["task=segmentaton"],
            "task=segmentaton: no such option; choose one of classification, language_model, "
            "multilabel, regression, segmentation",
        ),
        (
            ["task=segmentation"],
            "task=segmentation: dataset=synthetic holds single-class targets, but segmentation needs "
            "segmentation-mask ones; choose a dataset that holds them (e.g. dataset=synthetic_shapes",
        ),
        (
            [
                "task=regression",
                "dataset=synthetic_multilabel",
                "dataset.train_size=64",
                "dataset.test_size=16",
            ],
            "task=regression: dataset=synthetic_multilabel holds multi-label targets, but regression needs "
            "regression",
        ),
        (
            ["checkpoint.monitor=val/map"],
            "checkpoint.monitor: task=classification does not report 'val/map'; choose one "
            "of val/loss, val/acc, val/top5, train/loss, train/acc",
        ),
        (["task=multilabel", "task.threshold=2"], "task.threshold: must be in (0, 1), got 2"),
        (["task=regression", "task.loss=hinge"], "task.loss: must be one of mse, l1, huber, got 'hinge'"),
        (["task.label_smoothing=1.5"], "task.label_smoothing: must be in [0, 1), got 1.5"),
        # keys of an older version (they moved to task.*): refused as unknown, no migration
        (["loss.label_smoothing=0.1"], "loss.label_smoothing: not a key of the config"),
        (["trainer.tta=flip"], "trainer.tta: not a key of the config"),
        (["task=language_model", "task.tta=flip"], "task.tta: not a key of the config"),  # it has no TTA
        (
            ["task=segmentation", "dataset=synthetic_shapes", "model=unet", "task.tta=flip_translate"],
            "task.tta: must be one of none, flip, got 'flip_translate'",  # segmentation averages flips only
        ),
        (["task.tta=rotate"], "task.tta: must be one of none, flip, flip_translate, got 'rotate'"),
        (["dataset=imagenet"], "dataset=imagenet: no such option"),
        (["optimizer=lamb"], "optimizer=lamb: no such option; choose one of adam, adamw, sgd"),
        (
            ["scheduler=cosin"],
            "scheduler=cosin: no such option; choose one of constant, cosine, linear, onecycle, step",
        ),
        (["trainer.max_epoch=3"], "trainer.max_epoch"),
        (["model.detph=3"], "model.detph"),
        (["+model.detph=3"], "model.detph: not a parameter of model 'resnet'"),
        (["+trainer.typo_key=3"], "trainer.typo_key: not a key of trainer"),  # `+` slips past the schema
        (
            ["+trainer.max_epoch=3"],
            "trainer.max_epoch: not a key of trainer (did you mean trainer.max_epochs?)",
        ),
        (["+loader.batchsize=3"], "loader.batchsize: not a key of loader (did you mean loader.batch_size?)"),
        (["+seeds=3"], "seeds: not a key of the config (did you mean seed?)"),
        (["trainer.max_epochs=abc"], "trainer.max_epochs"),
        (["optimizer.lr=fast"], "optimizer.lr: expected float"),
        (["loader.batch_size=-4"], "loader.batch_size: must be 1 or more"),
        (["loader.num_workers=-1"], "loader.num_workers: must be 0"),
        (["trainer.max_epochs=0"], "trainer.max_epochs: must be 1 or more"),
        (["dataset.train_size=0"], "dataset.train_size: must be 1 or more"),
        (["trainer.device=tpu"], "trainer.device: must be one of auto, cpu, cuda, mps, got 'tpu'"),
        (["trainer.precision=16"], "trainer.precision=16"),
        (["model=torchvision", "model.arch=resnet19"], "model.arch: 'resnet19' is not a torchvision"),
        (["imports=[no_such_module]"], "imports: cannot import 'no_such_module'"),
        (["resume=/no/such/run"], "resume: /no/such/run does not exist"),
        (["dataset.augment=[{name: Blur}]"], "dataset.augment: 'Blur'"),
    ],
)
def test_bad_input_exits_2_with_one_line(monkeypatch, capsys, tmp_path, args, needle):
    code, err = _main_exit(monkeypatch, capsys, tmp_path, *args)
    assert code == 2
    lines = err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: ") and needle in lines[0], err


def test_missing_data_subprocess(tmp_path):
    result = run_trainer(
        *TINY_RUN,
        "dataset=cifar10",
        f"dataset.root={tmp_path}",
        "dataset.download=false",
        f"hydra.run.dir={tmp_path / 'run'}",
        fresh=True,
    )
    assert result.returncode == 2
    assert result.stderr.strip().splitlines() == [result.stderr.strip()]  # one line
    assert "dataset=cifar10: no valid data under" in result.stderr and "cifar-10-batches-py" in result.stderr
    assert "Traceback" not in result.stderr and "Error executing job" not in result.stderr
    assert "no valid data" in (tmp_path / "run" / "train.log").read_text()  # and it is in the run's log


def test_composition_error_subprocess(tmp_path):
    result = run_trainer("model=resnte", f"hydra.run.dir={tmp_path / 'run'}", fresh=True)
    assert (
        result.returncode == 2 and result.stderr.strip().count("\n") == 0 and "model=resnte" in result.stderr
    )


def test_corrupt_cifar_with_checksums_on(monkeypatch, capsys, tmp_path):
    write_cifar10(tmp_path / "data")
    code, err = _main_exit(
        monkeypatch,
        capsys,
        tmp_path,
        "dataset=cifar10",
        f"dataset.root={tmp_path / 'data'}",
        "dataset.download=false",
    )
    assert code == 2 and "corrupted" in err and "dataset.root" in err


def test_a_mask_value_past_the_classes_names_the_first_file(monkeypatch, capsys, tmp_path):
    import numpy as np
    from PIL import Image

    root = tmp_path / "seg"
    for split in ("train", "val"):
        (root / split / "images").mkdir(parents=True)
        (root / split / "masks").mkdir()
        for i in range(2):
            Image.fromarray(np.full((8, 8, 3), 100, np.uint8)).save(root / split / "images" / f"{i}.png")
            mask = np.zeros((8, 8), np.uint8)
            mask[0, 0] = 255  # the ignore index: allowed
            if split == "val" and i == 1:
                mask[4, 4] = 7  # past dataset.num_classes=3
            Image.fromarray(mask, mode="L").save(root / split / "masks" / f"{i}.png")
    code, err = _main_exit(
        monkeypatch,
        capsys,
        tmp_path,
        "task=segmentation",
        "dataset=segfolder",
        f"dataset.root={root}",
        "dataset.num_classes=3",
        "dataset.image_size=8",
        "dataset.augment=[]",
        "model=unet",
    )
    assert code == 2 and f"the mask {root / 'val' / 'masks' / '1.png'} holds the value 7" in err, err
    assert "task.ignore_index is 255" in err and err.count("\n") == 1


def test_a_regression_column_a_row_lacks_names_the_file_and_row(monkeypatch, capsys, tmp_path):
    from PIL import Image

    root = tmp_path / "faces"
    root.mkdir()
    Image.new("RGB", (8, 8)).save(root / "a.png")
    (root / "train.csv").write_text("path,age\na.png,31\na.png,40\n")
    code, err = _main_exit(
        monkeypatch,
        capsys,
        tmp_path,
        "task=regression",
        "dataset=manifest",
        f"dataset.root={root}",
        "dataset.targets=[age,height]",
        "dataset.val_split=0.5",
        "model=cnn",
    )
    assert code == 2 and f"dataset.targets: {root / 'train.csv'} row 1 has no 'height' (it has age)" in err, (
        err
    )


def test_an_optional_library_that_is_not_installed_names_its_extra():
    """The one helper every optional extra goes through (timm, tokenizers, the trackers, serve's aiohttp)."""
    from trainer.core.errors import UserError, require

    with pytest.raises(UserError) as refused:
        require("no_such_library_here", "model=timm", "timm", hint="or choose another model")
    assert str(refused.value) == (
        "model=timm: needs no_such_library_here, which is not installed: "
        'pip install -e ".[timm]" (or choose another model)'
    )
    assert require("json", "anything", "none").dumps([1]) == "[1]"


@pytest.mark.parametrize(
    "args,needle",
    [
        (
            ["task=segmentation", "dataset=synthetic_shapes", "model=cnn"],
            "model=cnn does not fit task=segmentation: for inputs float32 [2, 3, 32, 32] of "
            "dataset=synthetic_shapes it "
            "outputs float32 [2, 3], and task=segmentation needs [N, 3, 32, 32] logits",
        ),
        (
            ["model=unet"],
            "model=unet does not fit task=classification: for inputs float32 [2, 3, 32, 32] of "
            "dataset=synthetic it outputs float32 [2, 10, 32, 32], and task=classification needs [N, 10]",
        ),
        (
            ["task=segmentation", "dataset=synthetic_shapes", "model=unet", "+model.num_classes=5"],
            "it outputs float32 [2, 5, 32, 32], and task=segmentation needs [N, 3, 32, 32] logits",
        ),
    ],
)
def test_a_model_that_does_not_fit_the_task_is_refused_before_any_step(
    monkeypatch, capsys, tmp_path, args, needle
):
    """Found with one forward pass of two training samples, before a step, a checkpoint or a tracker."""
    code, err = _main_exit(monkeypatch, capsys, tmp_path, *args)
    lines = err.strip().splitlines()
    assert code == 2 and len(lines) == 1 and needle in lines[0], err
    assert not (tmp_path / "run" / "checkpoints").exists() and not (tmp_path / "run" / "tensorboard").exists()


def test_a_model_that_cannot_take_the_datasets_inputs_is_refused_in_one_line():
    import torch
    from omegaconf import OmegaConf

    from trainer.core.errors import UserError
    from trainer.run.builders import check_model_fits
    from trainer.tasks.language_model import LanguageModel

    cfg = OmegaConf.create(
        {"model": {"name": "cnn"}, "task": {"name": "language_model"}, "dataset": {"name": "text"}}
    )
    image_model = torch.nn.Sequential(torch.nn.Conv2d(3, 4, 3), torch.nn.Flatten())
    tokens = torch.randint(0, 50, (2, 9))
    with pytest.raises(UserError) as refused:
        check_model_fits(
            cfg, image_model, LanguageModel(), (tokens[:, :-1], tokens[:, 1:]), torch.device("cpu")
        )
    assert str(refused.value).startswith("model=cnn cannot take the inputs of dataset=text (int64 [2, 8]): ")
    assert "\n" not in str(refused.value)
