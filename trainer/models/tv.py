"""Any torchvision classification architecture, untrained, with its head sized to the dataset."""
from torch import Tensor, nn

from trainer.errors import UserError
from trainer.registry import MODELS


class RepeatChannels(nn.Module):
    """Feeds grey images to architectures built for RGB by repeating the one channel."""

    def __init__(self, model: nn.Module, channels: int) -> None:
        super().__init__()
        self.model, self.channels = model, channels

    def forward(self, x: Tensor) -> Tensor:
        return self.model(x.expand(-1, self.channels, -1, -1))


@MODELS.register("torchvision")
def torchvision_model(num_classes: int, arch: str, in_channels: int = 3) -> nn.Module:
    import torchvision  # here, not at import: registering the entry must not cost torchvision's import
    choices = torchvision.models.list_models(module=torchvision.models)
    if arch not in choices:
        raise UserError(f"model.arch: '{arch}' is not a torchvision classification model; "
                        f"choose one of {', '.join(choices)}")
    if in_channels not in (1, 3):
        raise UserError(f"model.in_channels: torchvision models take 1 or 3 channels, got {in_channels}")
    model = torchvision.models.get_model(arch, weights=None, num_classes=num_classes)
    return RepeatChannels(model, 3) if in_channels == 1 else model

