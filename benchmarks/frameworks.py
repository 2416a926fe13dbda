"""What the speed benchmarks share: our framework built from the real config (as `python -m trainer`
builds it, minus the process), and a batch source for the hand-written and Lightning loops that does
the data work our device-resident loader does (a permutation per epoch, uint8 images gathered and
normalised per batch), so that only the training loops differ."""

import time
from pathlib import Path

import torch
from torch import Tensor

ROOT = Path(__file__).resolve().parents[1]


def compose(overrides: list[str]):
    """The config for these overrides, composed from conf/ as the command line does, and validated."""
    from hydra import compose as hydra_compose
    from hydra import initialize_config_dir

    from trainer.config import register_configs, validate

    register_configs()
    with initialize_config_dir(config_dir=str(ROOT / "conf"), version_base="1.3"):
        cfg = hydra_compose(config_name="config", overrides=overrides)
    validate(cfg)
    return cfg


def build_ours(overrides: list[str], run_dir: Path):
    """(trainer, bundle, cfg) for these overrides, built as `python -m trainer` builds them (the recipe's
    setup: every part, the loggers, the data-dependent initialisation)."""
    from omegaconf import open_dict

    from trainer.run.recipe import Supervised

    cfg = compose(overrides)
    recipe = Supervised(cfg, run_dir)
    recipe.setup()
    with open_dict(cfg):
        cfg.model_args = recipe.trainer.s.model_args  # what build_model takes for the same network
    return recipe.trainer, recipe.data.bundle, cfg


def same_model(cfg, **facts):
    """The network of cfg's model section built again from the seed (the same initial weights): with
    what the data gave it, as build_ours recorded it, or as `facts` (num_classes=10, ...) say."""
    from trainer.config import params_of
    from trainer.run.builders import build_model

    args = (
        dict(cfg.model_args)
        if "model_args" in cfg
        else {"name": cfg.model.name, **params_of(cfg.model), **facts}
    )
    return build_model(cfg, args)


class DeviceBatches:
    """uint8 images and labels on the device, reshuffled every epoch, normalised batch by batch."""

    def __init__(
        self,
        images: Tensor,
        labels: Tensor,
        batch_size: int,
        mean: list[float],
        std: list[float],
        device: torch.device,
        seed: int = 0,
    ) -> None:
        self.images, self.labels, self.batch_size = images.to(device), labels.to(device), batch_size
        self.mean = torch.tensor(mean, device=device).view(1, -1, 1, 1)
        self.std = torch.tensor(std, device=device).view(1, -1, 1, 1)
        self.generator = torch.Generator().manual_seed(seed)

    def __len__(self) -> int:
        return -(-len(self.labels) // self.batch_size)

    def __iter__(self):
        order = torch.randperm(len(self.labels), generator=self.generator).to(self.labels.device)
        for first in range(0, len(order), self.batch_size):
            index = order[first : first + self.batch_size]
            yield self.images[index].float().div_(255).sub_(self.mean).div_(self.std), self.labels[index]


def in_child(function, *args):
    """function(*args) in a forked child process, its result handed back: what one side sets for its
    whole process (trainer.keep_cpu_memory's allocator, oneDNN's kernel caches, the heap) stays its own,
    and neither side finds the other's warm caches. The parent must not have computed yet (fork and
    OpenMP's threads do not mix)."""
    import multiprocessing
    import traceback

    context = multiprocessing.get_context("fork")
    receive, send = context.Pipe(duplex=False)

    def run() -> None:
        try:
            send.send(("ok", function(*args)))
        except BaseException:
            send.send(("error", traceback.format_exc()))

    child = context.Process(target=run)
    child.start()
    send.close()  # the child's copy is the only writer left: its death ends recv with EOFError
    try:
        status, value = receive.recv()
    except EOFError:
        raise RuntimeError(
            f"the benchmark's child process died (exit code {child.join() or child.exitcode})"
        ) from None
    child.join()
    if status == "error":
        raise RuntimeError(f"the benchmark's child process failed:\n{value}")
    return value


def synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


class HandWritten:
    """The minimal loop: forward, loss, backward, step, schedule; nothing measured, nothing logged."""

    def __init__(
        self,
        model: torch.nn.Module,
        batches: DeviceBatches,
        precision: str,
        lr: float,
        epochs: int,
        device: torch.device,
    ) -> None:
        self.model, self.batches, self.device = model.to(device), batches, device
        self.optimizer = torch.optim.SGD(
            model.parameters(), lr=lr, momentum=0.9, nesterov=True, weight_decay=5e-4
        )
        self.scheduler = torch.optim.lr_scheduler.CosineAnnealingLR(
            self.optimizer, T_max=epochs * len(batches)
        )
        self.dtype = {"32": None, "bf16": torch.bfloat16, "16": torch.float16}[precision]
        self.scaler = torch.amp.GradScaler(device.type, enabled=self.dtype is torch.float16)

    def epoch(self) -> dict:
        """One epoch, timed from its first step to a device synchronisation after its last."""
        self.model.train()
        synchronize(self.device)
        start, images = time.perf_counter(), 0
        for x, y in self.batches:
            with torch.autocast(self.device.type, dtype=self.dtype, enabled=self.dtype is not None):
                loss = torch.nn.functional.cross_entropy(self.model(x), y)
            self.optimizer.zero_grad(set_to_none=True)
            self.scaler.scale(loss).backward()
            self.scaler.step(self.optimizer)
            self.scaler.update()
            self.scheduler.step()
            images += len(y)
        synchronize(self.device)
        return {"images": images, "seconds": time.perf_counter() - start}
