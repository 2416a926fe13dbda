"""Any torchvision classification architecture, untrained, with its head sized to the dataset."""

import difflib
from pathlib import Path

from omegaconf import DictConfig
from torch import Tensor, nn

from trainer.core.errors import UserError
from trainer.core.registry import MODELS, PREPROCESSING


class RepeatChannels(nn.Module):
    """Feeds grey images to architectures built for RGB by repeating the one channel."""

    def __init__(self, model: nn.Module, channels: int) -> None:
        super().__init__()
        self.model, self.channels = model, channels

    def forward(self, x: Tensor) -> Tensor:
        return self.model(x.expand(-1, self.channels, -1, -1))


@MODELS.register("torchvision")
def torchvision_model(*, num_classes: int, arch: str, in_channels: int = 3, weights: str | None) -> nn.Module:
    """`weights`: a name torchvision knows for `arch` (DEFAULT, IMAGENET1K_V1, ...), fetched through its
    own download and cache (TORCH_HOME); the classifier is then resized to the dataset's classes."""
    import torchvision  # here, not at import: registering the entry must not cost torchvision's import

    choices = torchvision.models.list_models(module=torchvision.models)
    if arch not in choices:
        close = difflib.get_close_matches(arch, choices, n=5, cutoff=0.5)
        raise UserError(
            f"model.arch: '{arch}' is not a torchvision classification model; "
            + (f"did you mean {', '.join(close)}?" if close else f"choose one of {', '.join(choices)}")
        )
    if in_channels not in (1, 3):
        raise UserError(f"model.in_channels: torchvision models take 1 or 3 channels, got {in_channels}")
    if weights is None:
        model = torchvision.models.get_model(arch, weights=None, num_classes=num_classes)
    else:
        try:
            chosen = (
                torchvision.models.get_model_weights(arch)[weights]
                if weights != "DEFAULT"
                else torchvision.models.get_model_weights(arch).DEFAULT
            )
        except KeyError:
            names = ", ".join(w.name for w in torchvision.models.get_model_weights(arch))
            raise UserError(
                f"model.weights: {arch} has no weights '{weights}'; choose DEFAULT or one of {names}"
            ) from None
        try:
            model = torchvision.models.get_model(arch, weights=chosen)
        except Exception as e:  # noqa: BLE001 - offline with an empty cache: one line, exit 2
            import torch.hub

            cache = Path(torch.hub.get_dir()) / "checkpoints"
            raise UserError(
                f"model.weights: cannot get {chosen} ({type(e).__name__}); offline, put "
                f"{Path(chosen.url).name} in {cache} (or set TORCH_HOME), or give a local file with "
                f"finetune.checkpoint=<file>"
            ) from None
        from trainer.models.pretrained import replace_head

        replace_head(model, num_classes)
    return RepeatChannels(model, 3) if in_channels == 1 else model


def weights_data_config(model: DictConfig) -> dict:
    """model.weights' preprocessing (DEFAULT's for a finetune.checkpoint): torchvision's transforms()."""
    import torchvision

    try:
        entries = torchvision.models.get_model_weights(model.arch)
        chosen = entries.DEFAULT if model.get("weights") in (None, "DEFAULT") else entries[model.weights]
    except (ValueError, KeyError, AttributeError):  # no such arch or weights: the builder says which
        return {}
    preprocess = chosen.transforms()
    return {
        "mean": list(preprocess.mean),
        "std": list(preprocess.std),
        "image_size": int(preprocess.crop_size[0]),
    }


PREPROCESSING["torchvision"] = weights_data_config
