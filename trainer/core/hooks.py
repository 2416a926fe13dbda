"""What a model may tell the training run, by inheriting `ModelHooks` and overriding what applies; the
run calls a hook only on a model that declares it this way (an `isinstance` check), and a model without
it needs none of them. Every method has a default that does nothing.

    class FastNet(nn.Sequential, ModelHooks):
        def init_from_data(self, inputs): ...   # fastnet's whitening layer, from the first batch
"""

from pathlib import Path
from typing import Any

from torch import Tensor, nn


class ModelHooks:
    """What a model may tell the run about itself: inherit it beside nn.Module and override what
    applies. Each hook has a default that does nothing special, so a plain nn.Module needs none."""

    def init_from_data(self, inputs: Tensor) -> None:
        """Set up from the first training batch's inputs, before the first step of a fresh run (not on
        resume: the checkpoint holds the result). With several processes, rank 0's result is broadcast."""

    def start_epoch(self, epoch: int) -> None:
        """Called as each training epoch starts (0-based), after train mode is set, and once before the
        model is wrapped for several processes: what trains in that epoch (requires_grad)."""

    def changes_trained_parameters_until(self) -> int:
        """The epoch (0-based) before which start_epoch may still change which parameters train; 0 when
        it never does. DDP fixes the trained parameters when it wraps the model (it would then silently
        skip the gradient reduction of parameters that start or stop training), so a run with several
        processes is refused until that epoch."""
        return 0

    def repeated_blocks(self) -> list[nn.Module]:
        """The model's repeated blocks (a transformer's layers), the units FSDP shards and activation
        checkpointing wraps. By default the convention of GPT's and timm's models: a `blocks` attribute
        that is a ModuleList or Sequential; [] when there is none."""
        return _blocks_attribute(self)

    def for_export(self) -> nn.Module:
        """The module the export traces and generation runs (LoRA's adapters merged into the weights, say);
        the model itself by default."""
        assert isinstance(self, nn.Module)
        return self

    def export_files(self, folder: Path) -> dict[str, Any]:
        """Writes what a consumer wants beside the export's formats into `folder`, and returns the
        manifest entries that name it; {} by default. A pretrained transformers model writes its
        save_pretrained folder ({"saved_pretrained": "hf"}): where a format cannot be exported, that
        folder is the export, and the run does not fail for it."""
        return {}


def repeated_blocks(model: nn.Module) -> list[nn.Module]:
    """A model's repeated blocks: its own answer when it declares ModelHooks, else the `blocks`
    attribute convention (GPT's, timm's vision transformers')."""
    return model.repeated_blocks() if isinstance(model, ModelHooks) else _blocks_attribute(model)


def _blocks_attribute(model: object) -> list[nn.Module]:
    blocks = getattr(model, "blocks", None)
    return list(blocks) if isinstance(blocks, (nn.ModuleList, nn.Sequential)) else []


def initialises_from_data(model: nn.Module) -> bool:
    """Whether the model has its own init_from_data (fastnet's whitening), not the default's nothing."""
    return isinstance(model, ModelHooks) and type(model).init_from_data is not ModelHooks.init_from_data
