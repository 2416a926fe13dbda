"""fastnet: a small, fast CIFAR network in the style of the speed-record scripts (airbench).

A whitening first layer (2x2 filters from the principal components of the training images' patches,
set from the first batch and then frozen; its bias trains, for the first `whiten_bias_epochs` epochs
only when that is set, as the speed record does), then three groups of conv-pool-BN-GELU-conv-BN-GELU, a
global max-pool and a bias-free linear head whose logits are scaled down. BatchNorm keeps its scale
fixed at 1 and learns only its shift, and follows the batch statistics closely (momentum 0.4).
"""

import torch
from torch import Tensor, nn

from trainer.core.errors import UserError
from trainer.core.hooks import ModelHooks
from trainer.core.registry import MODELS


class Whitening(nn.Module):
    """A 2x2 convolution that decorrelates image patches: its filters are the eigenvectors of the patch
    covariance, scaled by 1/sqrt(eigenvalue), each paired with its negative (so a following GELU keeps
    both signs). Frozen; the bias is learned."""

    def __init__(self, in_channels: int, eps: float = 5e-4) -> None:
        super().__init__()
        self.eps = eps
        patch = in_channels * 4
        self.conv = nn.Conv2d(in_channels, 2 * patch, kernel_size=2, bias=True)
        self.conv.weight.requires_grad_(False)

    @torch.no_grad()
    def init_from_data(self, images: Tensor) -> None:
        channels = images.shape[1]
        patches = images.float().unfold(2, 2, 1).unfold(3, 2, 1)  # N, C, H-1, W-1, 2, 2
        patches = patches.permute(0, 2, 3, 1, 4, 5).reshape(-1, channels * 4)
        eigenvalues, eigenvectors = torch.linalg.eigh(torch.cov(patches.T))
        filters = (eigenvectors.T / torch.sqrt(eigenvalues + self.eps)[:, None]).reshape(-1, channels, 2, 2)
        self.conv.weight.copy_(torch.cat([filters, -filters]).to(self.conv.weight))

    def forward(self, x: Tensor) -> Tensor:
        return self.conv(x)


def _batchnorm(width: int, momentum: float) -> nn.BatchNorm2d:
    norm = nn.BatchNorm2d(width, momentum=momentum, eps=1e-12)
    norm.weight.requires_grad_(False)  # scale fixed at 1: only the shift is learned
    return norm


def _group(cin: int, cout: int, momentum: float) -> nn.Sequential:
    return nn.Sequential(
        nn.Conv2d(cin, cout, 3, padding=1, bias=False),
        nn.MaxPool2d(2),
        _batchnorm(cout, momentum),
        nn.GELU(),
        nn.Conv2d(cout, cout, 3, padding=1, bias=False),
        _batchnorm(cout, momentum),
        nn.GELU(),
    )


class FastNet(nn.Sequential, ModelHooks):
    whiten_bias_epochs = 0  # 0: the whitening bias trains throughout

    def init_from_data(self, inputs: Tensor) -> None:
        if isinstance(self[0], Whitening):
            self[0].init_from_data(inputs)

    def start_epoch(self, epoch: int) -> None:
        """The whitening bias stops training after `whiten_bias_epochs` epochs. Then no gradient flows
        into the first layer at all, which also saves the backward pass through it (3% of a step at the
        record's widths, measured)."""
        if isinstance(self[0], Whitening) and self.whiten_bias_epochs:
            self[0].conv.bias.requires_grad_(epoch < self.whiten_bias_epochs)

    def changes_trained_parameters_until(self) -> int:
        return self.whiten_bias_epochs if isinstance(self[0], Whitening) else 0


class Scale(nn.Module):
    def __init__(self, factor: float) -> None:
        super().__init__()
        self.factor = factor

    def forward(self, x: Tensor) -> Tensor:
        return x * self.factor


@MODELS.register("fastnet")
def fastnet(
    *,
    num_classes: int,
    in_channels: int = 3,
    widths: tuple[int, ...],
    whiten: bool,
    logit_scale: float,
    bn_momentum: float,
    whiten_bias_epochs: int,
) -> nn.Module:
    if not widths or min(widths) < 1:
        raise UserError(f"model.widths: needs one or more positive widths, got {list(widths)}")
    if whiten_bias_epochs < 0:
        raise UserError(
            f"model.whiten_bias_epochs: 0 (the bias always trains) or more, got {whiten_bias_epochs}"
        )
    stem_width = 8 * in_channels if whiten else widths[0]
    stem = Whitening(in_channels) if whiten else nn.Conv2d(in_channels, stem_width, 3, padding=1, bias=False)
    layers: list[nn.Module] = [stem, nn.GELU()]
    for cin, cout in zip((stem_width, *widths), widths):
        layers.append(_group(cin, cout, bn_momentum))
    layers += [
        nn.AdaptiveMaxPool2d(1),
        nn.Flatten(),
        nn.Linear(widths[-1], num_classes, bias=False),
        Scale(logit_scale),
    ]
    model = FastNet(*layers)
    model.whiten_bias_epochs = whiten_bias_epochs if whiten else 0
    for module in model.modules():  # identity-initialise the first filters of each conv: a better start
        if isinstance(module, nn.Conv2d) and module.kernel_size == (3, 3):
            nn.init.dirac_(module.weight.data[: module.in_channels])
    return model
