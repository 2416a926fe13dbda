"""Every config group file composes with the real defaults and passes validation."""

import pytest
from conftest import CONF, compose_config, write_imagefolder
from hydra.errors import ConfigCompositionException
from omegaconf.errors import ValidationError

from trainer.config import validate
from trainer.core.errors import UserError

GROUPS = ["model", "dataset", "task", "optimizer", "scheduler", "experiment", "debug"]
OPTIONS = [(g, p.stem) for g in GROUPS for p in sorted((CONF / g).glob("*.yaml"))]


@pytest.mark.parametrize("group,option", OPTIONS, ids=[f"{g}={o}" for g, o in OPTIONS])
def test_every_group_option_composes_and_validates(group, option, tmp_path):
    required = {
        "imagefolder": [f"dataset.root={write_imagefolder(tmp_path)}"],
        "numpy": [f"dataset.root={tmp_path}", "dataset.num_classes=10"],
        "streaming": [f"dataset.root={tmp_path}", "dataset.num_classes=3"],
        "hf": [f"dataset.path={tmp_path}"],
        "manifest": [f"dataset.root={tmp_path}"],
        "segfolder": [f"dataset.root={tmp_path}", "dataset.num_classes=3"],
        "text": ["dataset.root=corpus.txt", "model=gpt", "task=language_model"],
        "shakespeare_char": ["dataset.root=input.txt"],
        "gpt": ["dataset=text", "dataset.root=corpus.txt", "task=language_model"],
        "language_model": ["dataset=text", "dataset.root=corpus.txt", "model=gpt"],
        "text_classification": [f"dataset.root={tmp_path}", "model=text_encoder"],
        "text_encoder": ["dataset=text_classification", f"dataset.root={tmp_path}"],
        "model=hf": [
            "model.pretrained=gpt2",
            "dataset=text",
            "dataset.root=corpus.txt",
            "task=language_model",
        ],
    }  # by option, or by group=option where two groups have an option of that name
    extra = required.get(f"{group}={option}", required.get(option, []))
    extra = extra if group in ("dataset", "experiment", "model", "task") else []
    cfg = compose_config(f"{group}={option}", *extra)
    validate(cfg)
    if group in ("model", "dataset", "task", "optimizer", "scheduler"):
        assert cfg[group].name == option  # a group file names its registry entry


def test_model_takes_classes_and_channels_from_the_dataset():
    """The model is given num_classes, in_channels (and an MLP its image size) by the data it trains on."""
    from trainer import DATASETS
    from trainer.run.builders import model_args

    tiny = {"train_size": 16, "test_size": 8}
    cfg = compose_config("dataset=synthetic", "dataset.in_channels=1", "dataset.image_size=28", "model=mlp")
    bundle = DATASETS.build("synthetic", in_channels=1, image_size=28, mean=[0.5], std=[0.25], **tiny)
    args = model_args(cfg, bundle)
    assert (args["num_classes"], args["in_channels"], args["image_size"]) == (10, 1, 28)
    assert (
        model_args(compose_config(), DATASETS.build("synthetic", num_classes=100, **tiny))["num_classes"]
        == 100
    )


def test_debug_profiles_shrink_the_run():
    fast = compose_config("debug=fast")
    assert (
        fast.trainer.max_epochs == 1
        and fast.trainer.limit_train_batches == 5
        and fast.loader.num_workers == 0
    )
    overfit = compose_config("debug=overfit")
    assert overfit.loader.shuffle is False and list(overfit.dataset.augment) == []
    assert overfit.scheduler.name == "constant"


def test_schema_rejects_misspelled_keys_and_wrong_types_at_composition():
    with pytest.raises(ConfigCompositionException):
        compose_config("trainer.max_epoch=3")
    with pytest.raises((ConfigCompositionException, ValidationError)):
        compose_config("trainer.max_epochs=three")


@pytest.mark.parametrize(
    "override,message",
    [
        ("trainer.max_epochs=0", "trainer.max_epochs"),
        ("loader.num_workers=-1", "loader.num_workers"),
        ("loader.batch_size=0", "loader.batch_size"),
        ("trainer.device=gpu", "trainer.device"),
        ("trainer.precision=8", "trainer.precision"),
        ("checkpoint.monitor=val/f1", "checkpoint.monitor"),
        ("export.formats=[tflite]", "export.formats"),
        ("optimizer.lr=0", "optimizer.lr"),
        ("dataset.val_split=1.0", "dataset.val_split"),
        ("trainer.limit_train_batches=0", "trainer.limit_train_batches"),
        ("+model.detph=34", "model.detph"),
        ("optimizer.momentum=fast", "optimizer.momentum"),
    ],
)
def test_validate_names_the_key(override, message):
    with pytest.raises(UserError, match=message.replace(".", r"\.")):
        validate(compose_config(override))
