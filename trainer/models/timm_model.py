"""`model=timm`: any timm model (the `timm` extra), untrained or with its pretrained weights through
timm's own download and cache (the Hugging Face hub cache), its head sized to the dataset's classes."""

import difflib
import os
from pathlib import Path

from omegaconf import DictConfig
from torch import nn

from trainer.core.errors import UserError, require
from trainer.core.registry import MODELS, PREPROCESSING


@MODELS.register("timm")
def timm_model(
    *, num_classes: int, arch: str, pretrained: bool, in_channels: int = 3, drop_rate: float
) -> nn.Module:
    timm = require("timm", "model=timm", "timm")
    if not timm.is_model(arch):
        close = difflib.get_close_matches(arch, timm.list_models(), n=5, cutoff=0.5)
        raise UserError(
            f"model.arch: '{arch}' is not a timm model; "
            + (f"did you mean {', '.join(close)}?" if close else "see timm.list_models()")
        )
    if pretrained:
        from trainer.core.hub import offline_unless_reachable

        offline_unless_reachable()  # no network: the cache at once, not a minute of retries
    try:
        return timm.create_model(
            arch, pretrained=pretrained, num_classes=num_classes, in_chans=in_channels, drop_rate=drop_rate
        )
    except Exception as e:  # noqa: BLE001 - offline with an empty cache, a hub error: one line, exit 2
        if not pretrained:
            raise
        cache = (
            os.environ.get("HF_HUB_CACHE")
            or Path(os.environ.get("HF_HOME", Path.home() / ".cache" / "huggingface")) / "hub"
        )
        raise UserError(
            f"model.pretrained: cannot get {arch}'s weights ({type(e).__name__}); offline, fill the cache "
            f"{cache} on a machine with network (or set HF_HUB_CACHE), or give a local file with "
            f"model.pretrained=false finetune.checkpoint=<weights.pth|.safetensors>"
        ) from None


def pretrained_data_config(model: DictConfig) -> dict:
    """The arch's pretrained config (timm's own table, no download): its mean, std and input size."""
    timm = require("timm", "model=timm", "timm")
    pretrained = timm.get_pretrained_cfg(model.arch) if timm.is_model(model.arch) else None
    if pretrained is None:
        return {}
    return {
        "mean": [float(v) for v in pretrained.mean],
        "std": [float(v) for v in pretrained.std],
        "image_size": int(pretrained.input_size[-1]),
    }


PREPROCESSING["timm"] = pretrained_data_config
