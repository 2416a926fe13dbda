"""OPTIMIZERS: small strategy functions chosen by name.

Every optimizer strategy splits the parameters so norms, biases and embedding tables get no weight decay
(decaying them only shrinks a scale, a shift or a lookup and hurts accuracy)."""

import logging
from collections.abc import Callable
from typing import Annotated, Any

import torch
from torch import nn
from torch.optim import Optimizer

from trainer.core.errors import UserError
from trainer.core.fields import POSITIVE
from trainer.core.registry import OPTIMIZERS

log = logging.getLogger("trainer")
NORMS = (nn.modules.batchnorm._NormBase, nn.LayerNorm, nn.GroupNorm, nn.LocalResponseNorm, nn.RMSNorm)


def head_parameters(model: nn.Module) -> list[nn.Parameter]:
    """The classifier head's parameters: a timm model's get_classifier(), else the last Linear layer."""
    if hasattr(model, "get_classifier") and isinstance(model.get_classifier(), nn.Module):
        return list(model.get_classifier().parameters())
    linears = [m for m in model.modules() if isinstance(m, nn.Linear)]
    return list(linears[-1].parameters()) if linears else []


def layer_depths(model: nn.Module) -> dict[str, int]:
    """Each parameter's depth for layer-wise decay: 0 for the stem (and parameters of the model itself,
    e.g. position embeddings), one more per block, the head deepest. A timm model's own grouping
    (`group_matcher`, the one timm's fine-tuning uses); else the model's children in order, with a
    Sequential or ModuleList (ResNet's stages, a transformer's blocks) counted block by block."""
    if hasattr(model, "group_matcher"):
        from timm.models import group_parameters

        return group_parameters(model, model.group_matcher(coarse=False), reverse=True)
    blocks: list[str] = []

    def walk(module: nn.Module, prefix: str) -> None:
        for name, child in module.named_children():
            if isinstance(child, (nn.Sequential, nn.ModuleList)):
                walk(child, f"{prefix}{name}.")
            else:
                blocks.append(f"{prefix}{name}.")

    walk(model, "")
    depths, order = {}, {}
    for name, _ in model.named_parameters():
        block = max((b for b in blocks if name.startswith(b)), key=len, default="")
        if block:
            order.setdefault(block, len(order) + 1)
        depths[name] = order[block] if block else 0
    params = dict(model.named_parameters())
    head = {id(p) for p in head_parameters(model)}
    body = [d for name, d in depths.items() if id(params[name]) not in head]
    head_depth = max(body, default=0) + 1  # one past the body, however the head was registered
    return {name: head_depth if id(params[name]) in head else d for name, d in depths.items()}


def param_groups(
    model: nn.Module,
    weight_decay: float,
    decay_norm_and_bias: bool,
    lr: float,
    norm_and_bias_lr_scale: float = 1.0,
    head_lr_scale: float = 1.0,
    layer_decay: float = 1.0,
    biases_as_weights: bool = False,
) -> list[dict]:
    """Decayed and undecayed groups, each at its own rate: lr times norm_and_bias_lr_scale for the
    undecayed, times head_lr_scale for the classifier head (fine-tuning: a new head learns faster than
    the pretrained body), times layer_decay ** (head's depth - depth) below the head (layer-wise decay,
    as BEiT and timm fine-tune: the stem, the most general features, moves least). Groups at lr first.
    `biases_as_weights`: only normalisation layers' parameters count as "norms and biases"; other biases
    are decayed at lr like the weights (the speed record treats its whitening bias so)."""
    if weight_decay < 0:
        raise UserError(f"optimizer.weight_decay: must be 0 or more, got {weight_decay}")
    if norm_and_bias_lr_scale <= 0:
        raise UserError(f"optimizer.norm_and_bias_lr_scale: must be positive, got {norm_and_bias_lr_scale}")
    if head_lr_scale <= 0:
        raise UserError(f"optimizer.head_lr_scale: must be positive, got {head_lr_scale}")
    if not 0 < layer_decay <= 1:
        raise UserError(
            f"optimizer.layer_decay: must be in (0, 1] (1: off; fine-tuning uses 0.65 to 0.85), "
            f"got {layer_decay}"
        )
    head = {id(p) for p in head_parameters(model)} if head_lr_scale != 1.0 else set()
    if head_lr_scale != 1.0 and not head:
        raise UserError(
            f"optimizer.head_lr_scale: {type(model).__name__} has no classifier head (no get_classifier(), "
            f"no Linear layer); leave optimizer.head_lr_scale at 1"
        )
    depths = layer_depths(model) if layer_decay != 1.0 else {}
    deepest = max(depths.values(), default=0)
    if layer_decay != 1.0:
        log.info(
            "optimizer.layer_decay: %d layers, from lr * %.3g (the first) to lr (the head)",
            deepest + 1,
            layer_decay**deepest,
        )
    # The two plain groups always exist (empty or not), so a checkpoint's groups line up on resume.
    groups: dict[tuple[bool, float], list] = {(True, 1.0): [], (False, norm_and_bias_lr_scale): []}
    embeddings = {
        id(m.weight) for m in model.modules() if isinstance(m, nn.Embedding)
    }  # token/position tables
    norms = {id(p) for m in model.modules() if isinstance(m, NORMS) for p in m.parameters(recurse=False)}
    for name, p in model.named_parameters():
        if p.requires_grad:
            decays = (
                (p.ndim > 1 and id(p) not in embeddings)
                or decay_norm_and_bias
                or (biases_as_weights and id(p) not in norms and id(p) not in embeddings)
            )
            scale = (
                (1.0 if decays else norm_and_bias_lr_scale)
                * (head_lr_scale if id(p) in head else 1.0)
                * layer_decay ** (deepest - depths.get(name, deepest))
            )
            groups.setdefault((decays, scale), []).append(p)
    built = [
        {"params": params, "weight_decay": weight_decay if decays else 0.0, "lr": lr * scale}
        for (decays, scale), params in groups.items()
    ]
    return [g for g in built if g["lr"] == lr] + [g for g in built if g["lr"] != lr]


@OPTIMIZERS.register("sgd")
def sgd(
    *,
    model: nn.Module,
    lr: Annotated[float, POSITIVE],
    momentum: float,
    nesterov: bool,
    weight_decay: float,
    decay_norm_and_bias: bool,
    norm_and_bias_lr_scale: float,
    head_lr_scale: float,
    layer_decay: float,
    biases_as_weights: bool,
) -> Optimizer:
    """norm_and_bias_lr_scale: a larger rate for the norms and biases (the speed-record recipes use 64);
    with biases_as_weights, for the normalisation layers' parameters only."""
    if nesterov and momentum <= 0:
        raise UserError("optimizer.nesterov: needs optimizer.momentum > 0; set one or the other")
    groups = param_groups(
        model,
        weight_decay,
        decay_norm_and_bias,
        lr,
        norm_and_bias_lr_scale,
        head_lr_scale,
        layer_decay,
        biases_as_weights,
    )
    return torch.optim.SGD(groups, lr=lr, momentum=momentum, nesterov=nesterov)


@OPTIMIZERS.register("adamw")
def adamw(
    *,
    model: nn.Module,
    lr: Annotated[float, POSITIVE],
    betas: tuple[float, float],
    eps: float,
    weight_decay: float,
    decay_norm_and_bias: bool,
    head_lr_scale: float,
    layer_decay: float,
    fused: bool | None,
) -> Optimizer:
    groups = param_groups(
        model, weight_decay, decay_norm_and_bias, lr, head_lr_scale=head_lr_scale, layer_decay=layer_decay
    )
    return torch.optim.AdamW(groups, lr=lr, betas=tuple(betas), eps=eps, fused=use_fused(groups, fused))


@OPTIMIZERS.register("adam")
def adam(
    *,
    model: nn.Module,
    lr: Annotated[float, POSITIVE],
    betas: tuple[float, float],
    eps: float,
    weight_decay: float,
    decay_norm_and_bias: bool,
    head_lr_scale: float,
    layer_decay: float,
    fused: bool | None,
) -> Optimizer:
    groups = param_groups(
        model, weight_decay, decay_norm_and_bias, lr, head_lr_scale=head_lr_scale, layer_decay=layer_decay
    )
    return torch.optim.Adam(groups, lr=lr, betas=tuple(betas), eps=eps, fused=use_fused(groups, fused))


FUSED_DEVICES = ("cpu", "cuda")


def use_fused(groups: list[dict], fused: bool | None) -> bool | None:
    """optimizer.fused: torch's fused Adam kernel updates every tensor in one pass (on a CPU, 7x faster
    than one update per tensor for a 5M-parameter GPT; its rounding differs from the other kernel's in
    the last bit). null: fused where every parameter is a floating-point tensor on a CPU or CUDA device."""
    params = [p for group in groups for p in group["params"]]
    supported = all(p.is_floating_point() and p.device.type in FUSED_DEVICES for p in params)
    if fused and not supported:
        raise UserError(
            f"optimizer.fused: the fused kernel needs floating-point parameters on "
            f"{' or '.join(FUSED_DEVICES)}; set optimizer.fused=null"
        )
    return (supported and bool(params)) if fused is None else fused or None


def load_optimizer_state(
    optimizer: Optimizer, saved: dict[str, Any] | None, load: Callable[[], None] | None = None
) -> None:
    """The saved state (momentum, moments) under the configured hyperparameters: an override given on
    resume is applied, never ignored, and each change is said once. `load`: how the state gets in
    instead of optimizer.load_state_dict(saved) (a sharded checkpoint's reader)."""
    configured = [{k: v for k, v in g.items() if k not in ("params", "lr")} for g in optimizer.param_groups]
    if load is None:
        optimizer.load_state_dict(saved)
    else:
        load()
    changes = set()
    for group, wanted in zip(optimizer.param_groups, configured):
        for key, value in wanted.items():
            if group.get(key) != value:
                changes.add(("lr" if key == "initial_lr" else key, str(group.get(key)), str(value)))
                group[key] = value
    for key, old, new in sorted(changes):
        log.warning("optimizer.%s changed on resume: %s -> %s (applied)", key, old, new)
