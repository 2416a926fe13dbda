import pytest
import torch

from trainer import DATASETS, MODELS, OPTIMIZERS, SCHEDULERS
from trainer.core.errors import UserError
from trainer.core.registry import Registry


def test_register_build_and_names_sorted():
    reg = Registry("model")

    @reg.register("b")
    def b(width: int = 1) -> int:
        return width * 2

    reg.register("a")(lambda: 0)
    assert reg.names() == ["a", "b"]
    assert reg.build("b", width=3) == 6
    assert "b" in reg and "c" not in reg


def test_duplicate_name_is_an_error():
    reg = Registry("model")
    reg.register("x")(lambda: 0)
    with pytest.raises(ValueError, match="registered twice"):
        reg.register("x")(lambda: 1)


def test_unknown_name_lists_the_choices_and_the_group():
    with pytest.raises(UserError) as e:
        MODELS.build("resnte", num_classes=10)
    assert "cnn, fastnet, gpt, hf, mlp, resnet, text_encoder, timm, torchvision, tvseg, unet" in str(
        e.value
    ) and "model=" in str(e.value)


def test_check_names_unknown_missing_and_mistyped_parameters():
    with pytest.raises(UserError, match=r"model\.detph: not a parameter of model 'resnet'.*depth"):
        MODELS.check("resnet", {"num_classes": 10, "detph": 18})
    with pytest.raises(UserError, match=r"model\.num_classes: missing"):
        MODELS.check("resnet", {"depth": 18})
    with pytest.raises(UserError, match=r"model\.depth: expected int, got 'x'"):
        MODELS.check("resnet", {"num_classes": 10, "depth": "x"})
    with pytest.raises(UserError, match=r"optimizer\.lr: expected float"):
        OPTIMIZERS.check("sgd", {"lr": "fast"}, provided=("model",))
    MODELS.check("resnet", {"num_classes": 10, "depth": 34})  # valid: no error


def test_builtin_registries_hold_the_documented_entries():
    assert {"resnet", "cnn", "mlp", "torchvision"} <= set(MODELS.names())
    assert {"cifar10", "cifar100", "mnist", "fashion_mnist", "synthetic"} <= set(DATASETS.names())
    assert {"sgd", "adamw", "adam"} <= set(OPTIMIZERS.names())
    assert {"cosine", "onecycle", "step", "constant"} <= set(SCHEDULERS.names())


def test_user_registration_is_buildable():
    @MODELS.register("test_tiny_linear")
    def tiny(num_classes: int, in_channels: int = 3) -> torch.nn.Module:
        return torch.nn.Sequential(torch.nn.Flatten(), torch.nn.LazyLinear(num_classes))

    try:
        model = MODELS.build("test_tiny_linear", num_classes=4)
        assert model(torch.zeros(2, 3, 8, 8)).shape == (2, 4)
    finally:
        MODELS._builders.pop("test_tiny_linear")
