"""Weights from elsewhere: a local state dict (ours, timm's or torchvision's) loaded into a model, its
classifier head left at the dataset's size, and what did not fit said in one line."""

import logging
from pathlib import Path

import torch
from torch import nn

from trainer.core.errors import UserError

log = logging.getLogger("trainer")


def state_dict_of(path: Path) -> dict[str, torch.Tensor]:
    """The tensors of a checkpoint file: one of ours ({"model": ...}), a training script's
    ({"state_dict": ...}, as timm writes), or a bare state dict (torchvision's, timm's releases)."""
    if not path.is_file():
        raise UserError(f"finetune.checkpoint: {path} is not a file; give a .pt/.pth/.safetensors state dict")
    try:
        if path.suffix == ".safetensors":
            from safetensors.torch import load_file

            loaded = load_file(str(path))
        else:
            loaded = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # a damaged or foreign file: say which, in one line
        raise UserError(
            f"finetune.checkpoint: cannot read {path} as a state dict ({type(e).__name__}: "
            f"{str(e).splitlines()[0][:120]})"
        ) from None
    for key in ("model", "state_dict", "model_state_dict"):
        if isinstance(loaded, dict) and isinstance(loaded.get(key), dict):
            loaded = loaded[key]
            break
    if not isinstance(loaded, dict) or not all(isinstance(v, torch.Tensor) for v in loaded.values()):
        raise UserError(f"finetune.checkpoint: {path} holds no state dict of tensors")
    # Wrappers' prefixes: torch.compile's, DDP's
    return {k.removeprefix("_orig_mod.").removeprefix("module."): v for k, v in loaded.items()}


def load_weights_file(model: nn.Module, path: Path) -> None:
    """Loads what fits; tensors of another shape (the head of another class count) stay as built."""
    own = model.state_dict()
    given = state_dict_of(path)
    resized = [k for k, v in given.items() if k in own and own[k].shape != v.shape]
    fitting = {k: v for k, v in given.items() if k in own and k not in resized}
    missing = [k for k in own if k not in fitting and k not in resized]
    unexpected = [k for k in given if k not in own]
    if not fitting:
        raise UserError(
            f"finetune.checkpoint: none of {path}'s {len(given)} tensors fits this model (it has e.g. "
            f"{', '.join(list(own)[:3])}; the file e.g. {', '.join(list(given)[:3])}): a state dict for "
            f"another architecture"
        )
    model.load_state_dict(fitting, strict=False)
    parts = [f"loaded {len(fitting)} of {len(own)} tensors from {path}"]
    if resized:
        parts.append(f"kept new for this dataset's shapes: {_names(resized)}")
    if missing:
        parts.append(f"missing (left as initialised): {_names(missing)}")
    if unexpected:
        parts.append(f"unexpected (ignored): {_names(unexpected)}")
    log.info("finetune.checkpoint: %s", "; ".join(parts))


def _names(keys: list[str]) -> str:
    return ", ".join(keys[:4]) + (f" and {len(keys) - 4} more" if len(keys) > 4 else "")


def replace_head(model: nn.Module, num_classes: int) -> None:
    """A pretrained classifier's last Linear layer, resized to the dataset's classes (new weights)."""
    last = None
    for name, module in model.named_modules():
        if isinstance(module, nn.Linear):
            last = name, module
    if last is None or last[1].out_features == num_classes:
        return
    name, old = last
    parent = model.get_submodule(name.rpartition(".")[0]) if "." in name else model
    setattr(
        parent, name.rpartition(".")[2], nn.Linear(old.in_features, num_classes, bias=old.bias is not None)
    )
