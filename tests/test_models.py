import pytest
import torch

from trainer import MODELS
from trainer.core.errors import UserError


@pytest.mark.parametrize(
    "name,params,shape",
    [
        ("resnet", {"depth": 18, "width": 8}, (2, 3, 32, 32)),
        ("resnet", {"depth": 34, "width": 8}, (2, 3, 32, 32)),
        ("resnet", {"depth": 50, "width": 8}, (2, 3, 32, 32)),
        ("cnn", {"width": 8}, (2, 3, 32, 32)),
        ("cnn", {"width": 8, "in_channels": 1}, (2, 1, 28, 28)),
        ("mlp", {"in_channels": 1, "image_size": 28, "hidden": [16]}, (2, 1, 28, 28)),
        ("torchvision", {"arch": "resnet18"}, (2, 3, 32, 32)),
        ("torchvision", {"arch": "mobilenet_v3_small", "in_channels": 1}, (2, 1, 32, 32)),
    ],
)
def test_forward_pass_gives_one_logit_per_class(name, params, shape):
    model = MODELS.build(name, num_classes=7, **params).eval()
    with torch.no_grad():
        out = model(torch.randn(shape))
    assert out.shape == (2, 7) and torch.isfinite(out).all()


@pytest.mark.parametrize(
    "name,params",
    [
        ("unet", {"widths": [8, 16, 32]}),
        ("unet", {"widths": [8, 16], "in_channels": 1}),
        ("tvseg", {"arch": "lraspp_mobilenet_v3_large"}),
        ("tvseg", {"arch": "deeplabv3_mobilenet_v3_large"}),
        ("tvseg", {"arch": "fcn_resnet50"}),
    ],
)
def test_segmentation_models_give_a_logit_per_class_and_pixel(name, params):
    model = MODELS.build(name, num_classes=5, **params).eval()
    with torch.no_grad():
        out = model(torch.randn(2, params.get("in_channels", 3), 32, 32))
    assert out.shape == (2, 5, 32, 32) and torch.isfinite(out).all()


def test_resnet18_is_the_cifar_variant():
    model = MODELS.build("resnet", num_classes=10)
    stem = model[0]
    assert stem.kernel_size == (3, 3) and stem.stride == (1, 1)
    assert not any(isinstance(m, torch.nn.MaxPool2d) for m in model.modules())
    assert 11_000_000 < sum(p.numel() for p in model.parameters()) < 11_300_000  # ResNet-18's 11.2M


@pytest.mark.parametrize(
    "name,params,key",
    [
        ("resnet", {"depth": 20}, "model.depth"),
        ("torchvision", {"arch": "resnet19"}, "model.arch"),
        ("mlp", {"in_channels": 3, "image_size": 32, "hidden": [0]}, "model.hidden"),
        ("unet", {"widths": [8]}, "model.widths"),
        ("tvseg", {"arch": "segformer"}, "model.arch"),
        ("tvseg", {"in_channels": 1}, "model.in_channels"),
    ],
)
def test_bad_model_parameters_name_the_key(name, params, key):
    with pytest.raises(UserError, match=key.replace(".", r"\.")):
        MODELS.build(name, num_classes=10, **params)
