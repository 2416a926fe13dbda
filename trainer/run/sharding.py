"""trainer.strategy=fsdp: the model sharded over the processes with PyTorch's FSDP2 (`fully_shard`), and
its state moved in and out with torch.distributed.checkpoint's state-dict helpers.

Each of the model's blocks (the model protocol's `repeated_blocks()`: GPT's, timm's and HF models'
layers) is one FSDP unit, the rest of the model the root unit: a block's parameters are gathered just
before it runs and freed after, so a process holds its shard of everything plus one block whole.
Gradients are reduce-scattered, so each process keeps only its shard of them and of the optimizer's
state."""

import logging
from typing import Any

import torch
import torch.distributed as dist
from torch import nn

from trainer.core import distributed
from trainer.core.errors import UserError
from trainer.core.hooks import repeated_blocks

log = logging.getLogger("trainer")


def checkpoint_activations(model: nn.Module, model_name: str) -> None:
    """trainer.activation_checkpointing: each block's activations are recomputed in the backward pass
    instead of kept (torch's composable checkpoint: the module's names and state dict are unchanged)."""
    from torch.distributed._composable import checkpoint

    blocks = repeated_blocks(model)
    if not blocks:
        raise UserError(
            f"trainer.activation_checkpointing: model={model_name} declares no blocks to recompute (the "
            f"model protocol's repeated_blocks()); set trainer.activation_checkpointing=false"
        )
    for block in blocks:
        checkpoint(block)


def one_process_group() -> None:
    """FSDP of one process (trainer.strategy=fsdp without torchrun): a process group of one, so that the
    same sharded code runs, and a run saved by N processes resumes on one."""
    if not dist.is_initialized():
        dist.init_process_group("gloo", store=dist.HashStore(), rank=0, world_size=1)


def shard(
    model: nn.Module, device: torch.device, precision: str, cpu_offload: bool, model_name: str
) -> nn.Module:
    """fully_shard on every block, then on the whole model (the root unit: embeddings, head, norms).
    bf16: parameters gathered in bf16 for the forward and backward, gradients reduced in fp32."""
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import CPUOffloadPolicy, MixedPrecisionPolicy, fully_shard

    if precision == "16":
        raise UserError(
            "trainer.precision: fsdp trains in bf16 or 32 (float16 would need a sharded loss scaler); set "
            "trainer.precision=bf16"
        )
    if cpu_offload and device.type != "cuda":
        raise UserError(
            f"trainer.cpu_offload: offloads from a GPU to the CPU, and this run trains on {device.type}; "
            f"set trainer.cpu_offload=false"
        )
    one_process_group()
    mesh = init_device_mesh(device.type, (dist.get_world_size(),))
    options: dict[str, Any] = {"mesh": mesh}
    if precision == "bf16":
        options["mp_policy"] = MixedPrecisionPolicy(param_dtype=torch.bfloat16, reduce_dtype=torch.float32)
    if cpu_offload:
        options["offload_policy"] = CPUOffloadPolicy()
    blocks = repeated_blocks(model)
    if not blocks:
        log.warning(
            "trainer.strategy=fsdp: model=%s declares no blocks (the model protocol's repeated_blocks()); "
            "the whole model is one FSDP unit, gathered whole for each forward",
            model_name,
        )
    for block in blocks:
        fully_shard(block, **options)
    fully_shard(model, **options)
    return model


def is_sharded(model: nn.Module) -> bool:
    from torch.distributed.fsdp import FSDPModule

    return isinstance(model, FSDPModule)


def set_gradient_sync(model: nn.Module, sync: bool) -> None:
    """Gradient accumulation under FSDP: no reduce-scatter until the batch that steps."""
    model.set_requires_gradient_sync(sync)


def full_model_state(model: nn.Module) -> dict[str, torch.Tensor]:
    """The whole model's state dict on the CPU, gathered from every process (a collective: every process
    calls it); rank 0 gets the tensors, the others an empty dict."""
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict

    return get_model_state_dict(model, options=StateDictOptions(full_state_dict=True, cpu_offload=True))


def load_full_model_state(model: nn.Module, state: dict[str, torch.Tensor]) -> None:
    """A whole state dict (every process has it: best.pt, finetune's weights) into a sharded model."""
    from torch.distributed.checkpoint.state_dict import StateDictOptions, set_model_state_dict

    # a copy: it replaces the dict's entries with the shards it makes of them
    set_model_state_dict(model, dict(state), options=StateDictOptions(full_state_dict=True))


def sharded_state(model: nn.Module, optimizer: Any, ema: nn.Module | None) -> dict[str, Any]:
    """What each process saves with torch.distributed.checkpoint: its shards of the model, the optimizer
    (keyed by parameter name, so another world size can load it) and the weights' average."""
    from torch.distributed.checkpoint.state_dict import get_model_state_dict, get_state_dict

    model_state, optimizer_state = get_state_dict(model, optimizer)
    found = {"model": model_state, "optimizer": optimizer_state}
    if ema is not None:
        found["ema"] = get_model_state_dict(ema)
    return found


def load_sharded(
    folder: str, model: nn.Module, optimizer: Any, ema: nn.Module | None, load_optimizer: bool
) -> None:
    """Reads a torch.distributed.checkpoint folder into this process's model, optimizer and average,
    resharding when it was written by another number of processes."""
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.state_dict import set_model_state_dict, set_state_dict

    wanted = sharded_state(model, optimizer, ema)
    if not load_optimizer:
        del wanted["optimizer"]
    dcp.load(wanted, checkpoint_id=folder, process_group=checkpoint_group())
    if load_optimizer:
        set_state_dict(
            model, optimizer, model_state_dict=wanted["model"], optim_state_dict=wanted["optimizer"]
        )
    else:
        set_model_state_dict(model, wanted["model"])
    if ema is not None:
        set_model_state_dict(ema, wanted["ema"])


_GROUP: list[Any] = []


def checkpoint_group() -> Any:
    """A gloo group of its own for checkpoint traffic, so a save in the background never interleaves
    with training's collectives on the default group."""
    if not distributed.active():
        return None
    if not _GROUP:
        _GROUP.append(dist.new_group(backend="gloo"))
    return _GROUP[0]
