"""The cifar10_fast recipe as one hand-written script, in the style of the speed-record scripts: the
competitor in benchmarks/fast_recipe.py. It shares only the network (trainer's `fastnet`, so both train
the same architecture from the same initial weights); data, augmentation, optimizer, schedule, EMA,
test-time augmentation and the loop are its own.

It draws its random numbers the way the framework's device-resident loader does (each epoch: a
generator seeded from (seed, epoch), a permutation, then every position's crop offset, then its flip),
so that, step for step, both train on the same batches. Measured: over a whole epoch the two end with
bit-identical weights and EMA. Then both reach the target in the same epoch and the comparison is of
speed alone; with independent draws, which run needs one or two more epochs on a 5,000-image set is
luck, and it swamps the speed difference.

    python benchmarks/fast_recipe_script.py --data ../shared/data/cifar10-mini --target 0.6
"""

import argparse
import copy
import json
import time
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image

from trainer.core.seeding import mix as seed_of  # the framework's (seed, epoch) -> generator seed


def load_split(folder: Path, size: int = 32) -> tuple[torch.Tensor, torch.Tensor]:
    classes = sorted(p.name for p in folder.iterdir() if p.is_dir())
    images, labels = [], []
    for label, name in enumerate(classes):
        for path in sorted((folder / name).iterdir()):
            image = torch.from_numpy(np.asarray(Image.open(path).convert("RGB")).copy()).permute(2, 0, 1)
            images.append(
                F.interpolate(image[None].float(), size=(size, size), mode="bilinear")[0].round().byte()
                if image.shape[-1] != size
                else image
            )
            labels.append(label)
    return torch.stack(images), torch.tensor(labels)


def batches(images, labels, batch_size, mean, std, padding, seed, epoch, train, padding_mode="constant"):
    """Normalised batches; when training, shuffled, and each image randomly shifted and flipped."""
    n, device = len(labels), images.device
    generator = torch.Generator().manual_seed(seed_of(seed, epoch))
    order = torch.randperm(n, generator=generator).to(device) if train else torch.arange(n, device=device)
    if train:
        shifts = (torch.rand(n, 2, generator=generator) * (2 * padding + 1)).long().to(device)
        flips = (torch.rand(n, generator=generator) < 0.5).to(device)
    for first in range(0, n, batch_size):
        index = order[first : first + batch_size]
        x = images[index]
        if train:
            x = F.pad(x, (padding,) * 4, mode=padding_mode)  # then a crop back to size, one per image
            shift = shifts[first : first + batch_size]
            rows = (shift[:, :1] + torch.arange(images.shape[-2], device=device))[:, None, :, None]
            cols = (shift[:, 1:] + torch.arange(images.shape[-1], device=device))[:, None, None, :]
            x = x[
                torch.arange(len(index), device=device)[:, None, None, None],
                torch.arange(x.shape[1], device=device)[None, :, None, None],
                rows,
                cols,
            ]
            x = torch.where(flips[first : first + batch_size, None, None, None], x.flip(-1), x)
        # the same float arithmetic as the framework (x * (1/255) is not bit-equal to x / 255)
        yield (
            x.float().mul_(1 / 255).sub_(mean).div_(std).contiguous(memory_format=torch.channels_last),
            labels[index],
        )


@torch.no_grad()
def evaluate(model, images, labels, mean, std, dtype, tta: str = "flip") -> float:
    """Accuracy, under test-time augmentation: none, flip, or flip_translate (flips of the image and of
    its two one-pixel shifts, weighted 1/2, 1/4, 1/4)."""
    model.eval()

    def flips(x):
        return model(x) + model(x.flip(-1)) if tta != "none" else model(x)

    correct = torch.zeros((), device=images.device)
    for x, y in batches(images, labels, 1000, mean, std, 0, 0, 0, train=False):
        with torch.autocast(images.device.type, dtype=dtype, enabled=dtype is not None):
            logits = flips(x)
            if tta == "flip_translate":
                padded = F.pad(x, (1, 1, 1, 1), mode="reflect")
                logits = logits / 2 + (flips(padded[..., :32, :32]) + flips(padded[..., 2:, 2:])) / 4
        correct += (logits.argmax(1) == y).sum()
    return correct.item() / len(labels)


def train(
    data: Path,
    *,
    model: torch.nn.Module,
    target: float,
    epochs: int,
    batch_size: int,
    lr: float,
    momentum: float,
    weight_decay: float,
    bias_scale: float,
    label_smoothing: float,
    warmup_epochs: float,
    final_lr_ratio: float,
    ema_decay: float,
    ema_every: int,
    padding: int,
    mean,
    std,
    precision: str,
    compile: bool,
    device: torch.device,
    seed: int = 0,
    tta: str = "flip",
    start_lr_ratio: float = 0.0,
    padding_mode: str = "constant",
    ema_decay_power: float = 0.0,
    lookahead: bool = False,
    biases_as_weights: bool = False,
) -> dict:
    """Trains until the EMA weights reach `target` validation accuracy (or `epochs` run out). The time
    counts training and evaluation, not loading the data or compiling."""
    train_x, train_y = (t.to(device) for t in load_split(data / "train"))
    val_x, val_y = (t.to(device) for t in load_split(data / "val"))
    mean = torch.tensor(mean, device=device).view(1, 3, 1, 1)
    std = torch.tensor(std, device=device).view(1, 3, 1, 1)
    dtype = {"32": None, "bf16": torch.bfloat16}[precision]
    model = model.to(device, memory_format=torch.channels_last)
    first = next(batches(train_x, train_y, batch_size, mean, std, padding, seed, 0, True, padding_mode))
    model.init_from_data(first[0])
    if biases_as_weights:  # the faster rate and no decay for BatchNorm's parameters alone
        norms = [m for m in model.modules() if isinstance(m, torch.nn.BatchNorm2d)]
        norms_and_biases = [p for m in norms for p in m.parameters() if p.requires_grad]
    else:
        norms_and_biases = [p for p in model.parameters() if p.requires_grad and p.ndim <= 1]
    others = [p for p in model.parameters() if p.requires_grad and all(p is not q for q in norms_and_biases)]
    optimizer = torch.optim.SGD(
        [
            {"params": others, "lr": lr, "weight_decay": weight_decay},
            {"params": norms_and_biases, "lr": lr * bias_scale, "weight_decay": 0.0},
        ],
        momentum=momentum,
        nesterov=True,
    )
    steps_per_epoch = -(-len(train_y) // batch_size)
    total, warmup = epochs * steps_per_epoch, round(warmup_epochs * steps_per_epoch)

    def factor(
        step: int,
    ) -> float:  # linear warmup from start_lr_ratio, then a straight line to final_lr_ratio
        if step < warmup:
            return start_lr_ratio + (1 - start_lr_ratio) * (step + 1) / (warmup + 1)
        return 1 - (1 - final_lr_ratio) * min((step - warmup) / max(total - warmup, 1), 1)

    schedule = torch.optim.lr_scheduler.LambdaLR(optimizer, factor)
    average = copy.deepcopy(model).eval()
    step_model = torch.compile(model) if compile else model
    if compile:  # warm up outside the timing, then put every weight back
        saved = copy.deepcopy(model.state_dict())
        x, y = next(batches(train_x, train_y, batch_size, mean, std, padding, seed, 0, True, padding_mode))
        with torch.autocast(device.type, dtype=dtype, enabled=dtype is not None):
            F.cross_entropy(step_model(x), y).backward()
        optimizer.zero_grad(set_to_none=True)
        model.load_state_dict(saved)
    seconds, step, accuracy, epoch = 0.0, 0, 0.0, 0
    for epoch in range(1, epochs + 1):
        if device.type == "cuda":
            torch.cuda.synchronize()
        start = time.perf_counter()
        step_model.train()
        model.start_epoch(epoch - 1)  # the network's own: its whitening bias may stop training
        for x, y in batches(
            train_x, train_y, batch_size, mean, std, padding, seed, epoch - 1, True, padding_mode
        ):
            with torch.autocast(device.type, dtype=dtype, enabled=dtype is not None):
                loss = F.cross_entropy(step_model(x), y, label_smoothing=label_smoothing)
            loss.backward()
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
            schedule.step()
            step += 1
            if step % ema_every == 0:  # the average; with lookahead, the model goes on from it
                decay = ema_decay * (step / total) ** ema_decay_power if ema_decay_power else ema_decay
                with torch.no_grad():
                    ours = [*average.parameters(), *(b for b in average.buffers() if b.is_floating_point())]
                    theirs = [*model.parameters(), *(b for b in model.buffers() if b.is_floating_point())]
                    torch._foreach_lerp_(ours, theirs, 1 - decay)
                    if lookahead:
                        torch._foreach_copy_(theirs, ours)
        accuracy = evaluate(average, val_x, val_y, mean, std, dtype, tta)  # synchronises
        seconds += time.perf_counter() - start
        if accuracy >= target:
            break
    return {"seconds": seconds, "epochs": epoch, "val_acc": accuracy, "reached": accuracy >= target}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data", type=Path, required=True)
    parser.add_argument("--target", type=float, default=0.6)
    parser.add_argument("--epochs", type=int, default=12)
    args = parser.parse_args()
    from trainer import MODELS

    torch.manual_seed(0)
    model = MODELS.build("fastnet", num_classes=10, widths=(32, 64, 64))
    print(
        json.dumps(
            train(
                args.data,
                model=model,
                target=args.target,
                epochs=args.epochs,
                batch_size=256,
                lr=1.5,
                momentum=0.85,
                weight_decay=2e-6,
                bias_scale=64,
                label_smoothing=0.2,
                warmup_epochs=2.3,
                final_lr_ratio=0.07,
                ema_decay=0.6,
                ema_every=5,
                padding=2,
                mean=[0.5] * 3,
                std=[0.25] * 3,
                precision="32",
                compile=False,
                device=torch.device("cpu"),
            )
        )
    )


if __name__ == "__main__":
    main()
