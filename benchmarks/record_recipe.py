"""The CIFAR-10 speed record's recipe (airbench94, Keller Jordan) as one file, written from its published
description and hyperparameters (not copied), ported to a CPU the way the issue measured it: eager,
bf16 autocast with float32 weights, channels_last. The competitor in benchmarks/vs_record.py.

What the record does, and this file with it:
- the network: a 2x2 whitening convolution (the patch covariance's eigenvectors, both signs, frozen;
  its bias trained for the first 3 epochs only), then three blocks of conv-maxpool-BN-GELU-conv-BN-GELU
  (widths 64, 256, 256; BatchNorm scale fixed, momentum 0.6 in the record's convention, eps 1e-12),
  a global max-pool, a bias-free linear head and logits scaled by 1/9; 3x3 filters identity-initialised;
- data: random horizontal flips and random translations by up to 2 pixels (reflect padding);
- Nesterov SGD, momentum 0.85, learning rate 11.5 and decoupled weight decay 0.0153 per 1,024 examples
  for the summed loss, BatchNorm biases at 64x the rate; the rate interpolated 0.2 -> 1 over the first
  23% of steps and down to 0.07 at the end; label smoothing 0.2;
- lookahead every 5 steps towards an average whose weight grows with (step / total)^3, the average copied
  in at the end;
- 9.9 epochs; evaluated once, at the end, averaging flips and one-pixel translations.

    python benchmarks/record_recipe.py --data ../shared/data/cifar10-mini --epochs 9.9
"""

import argparse
import copy
import json
import math
import time
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from fast_recipe_script import load_split as load_uint8
from torch import nn

MEAN, STD = torch.tensor([0.4914, 0.4822, 0.4465]), torch.tensor([0.2470, 0.2435, 0.2616])


def load_split(folder: Path) -> tuple[torch.Tensor, torch.Tensor]:
    """An image folder's 32x32 images as one normalised float tensor, and their labels (read as the other
    one-file script reads them: the same pixels on both sides of every benchmark)."""
    images, labels = load_uint8(folder)
    x = images.float() / 255
    return (x - MEAN[:, None, None]) / STD[:, None, None], labels


def batch_norm(width: int) -> nn.BatchNorm2d:
    norm = nn.BatchNorm2d(width, momentum=1 - 0.6, eps=1e-12)
    norm.weight.requires_grad_(False)
    return norm


def block(cin: int, cout: int) -> nn.Sequential:
    return nn.Sequential(
        nn.Conv2d(cin, cout, 3, padding=1, bias=False),
        nn.MaxPool2d(2),
        batch_norm(cout),
        nn.GELU(),
        nn.Conv2d(cout, cout, 3, padding=1, bias=False),
        batch_norm(cout),
        nn.GELU(),
    )


class Net(nn.Module):
    def __init__(self, widths=(64, 256, 256)) -> None:
        super().__init__()
        self.whiten = nn.Conv2d(3, 24, 2, bias=True)
        self.whiten.weight.requires_grad_(False)
        self.blocks = nn.Sequential(
            block(24, widths[0]), block(widths[0], widths[1]), block(widths[1], widths[2])
        )
        self.head = nn.Linear(widths[2], 10, bias=False)
        for m in self.modules():
            if isinstance(m, nn.Conv2d) and m.kernel_size == (3, 3):
                nn.init.dirac_(m.weight.data[: m.in_channels])

    @torch.no_grad()
    def whiten_from(self, images: torch.Tensor, eps: float = 5e-4) -> None:
        patches = images.unfold(2, 2, 1).unfold(3, 2, 1).permute(0, 2, 3, 1, 4, 5).reshape(-1, 12)
        values, vectors = torch.linalg.eigh(torch.cov(patches.T))
        filters = (vectors.T / torch.sqrt(values + eps)[:, None]).reshape(-1, 3, 2, 2)
        self.whiten.weight.copy_(torch.cat([filters, -filters]))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.blocks(F.gelu(self.whiten(x)))
        return self.head(F.adaptive_max_pool2d(x, 1).flatten(1)) / 9


def augment(images: torch.Tensor, generator: torch.Generator, pad: int = 2) -> torch.Tensor:
    """Random flips and translations by up to `pad` pixels (reflect padding), on the whole batch."""
    n, _, h, w = images.shape
    flipped = torch.where(
        (torch.rand(n, generator=generator) < 0.5)[:, None, None, None], images.flip(-1), images
    )
    padded = F.pad(flipped, (pad,) * 4, mode="reflect")
    dy, dx = (torch.randint(0, 2 * pad + 1, (n,), generator=generator) for _ in range(2))
    rows = (dy[:, None] + torch.arange(h))[:, None, :, None].expand(n, 3, h, w + 2 * pad)
    shifted = padded.gather(2, rows)
    cols = (dx[:, None] + torch.arange(w))[:, None, None, :].expand(n, 3, h, w)
    return shifted.gather(3, cols)


def tta_logits(model: nn.Module, x: torch.Tensor) -> torch.Tensor:
    def flips(v):
        return (model(v) + model(v.flip(-1))) / 2

    padded = F.pad(x, (1,) * 4, mode="reflect")
    return flips(x) / 2 + (flips(padded[..., :32, :32]) + flips(padded[..., 2:, 2:])) / 4


def train(
    data: Path,
    epochs: float = 9.9,
    seed: int = 0,
    batch_size: int = 1024,
    widths=(64, 256, 256),
    bf16: bool = True,
) -> dict:
    torch.manual_seed(seed)
    generator = torch.Generator().manual_seed(seed)
    train_x, train_y = load_split(data / "train")
    val_x, val_y = load_split(data / "val")
    model = Net(widths).to(memory_format=torch.channels_last)
    model.whiten_from(train_x[:5000])
    steps_per_epoch = math.ceil(len(train_x) / batch_size)
    total = math.ceil(epochs * steps_per_epoch)
    kilostep = 1024 * (1 + 1 / (1 - 0.85))  # the rate and the decay are per 1,024 examples of a summed loss
    lr, wd = 11.5 / kilostep, 0.0153 * batch_size / kilostep
    norm_biases = [p for n, p in model.named_parameters() if "blocks" in n and p.ndim < 2 and p.requires_grad]
    others = [
        p for n, p in model.named_parameters() if p.requires_grad and all(p is not q for q in norm_biases)
    ]
    optimizer = torch.optim.SGD(
        [
            {"params": norm_biases, "lr": lr * 64, "weight_decay": wd / (lr * 64)},
            {"params": others, "lr": lr, "weight_decay": wd / lr},
        ],
        momentum=0.85,
        nesterov=True,
    )
    for (
        group
    ) in optimizer.param_groups:  # decoupled: the step's decay is lr * weight_decay, fixed per example
        group["initial"] = group["lr"]
    schedule = np.interp(np.arange(total + 1), [0, int(0.23 * total), total], [0.2, 1.0, 0.07])
    average, step, started = copy.deepcopy(model), 0, time.perf_counter()
    train_seconds = 0.0
    while step < total:
        epoch_started = time.perf_counter()
        if step // steps_per_epoch == 3:
            model.whiten.bias.requires_grad_(False)  # the whitening bias trains for 3 epochs
        order = torch.randperm(len(train_x), generator=generator)
        model.train()
        for first in range(0, len(order), batch_size):
            if step >= total:
                break
            batch = order[first : first + batch_size]
            x = augment(train_x[batch], generator).contiguous(memory_format=torch.channels_last)
            with torch.autocast("cpu", dtype=torch.bfloat16, enabled=bf16):
                loss = F.cross_entropy(model(x), train_y[batch], label_smoothing=0.2, reduction="sum")
            loss.backward()
            for group in optimizer.param_groups:
                group["lr"] = group["initial"] * schedule[step]
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
            step += 1
            # lookahead every 5 steps: the average moves towards the model, the model goes on from the
            # average; after the last step the model takes the average (the record's final decay of 1)
            alphas = ([0.95**5 * (step / total) ** 3] if step % 5 == 0 else []) + (
                [1.0] if step == total else []
            )
            for alpha in alphas:
                with torch.no_grad():
                    for a, m in zip(average.state_dict().values(), model.state_dict().values()):
                        if a.is_floating_point():
                            a.lerp_(m, 1 - alpha)
                            m.copy_(a)
        train_seconds += time.perf_counter() - epoch_started
    eval_started = time.perf_counter()
    model.eval()
    correct = 0
    with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16, enabled=bf16):
        for first in range(0, len(val_x), 2000):
            x = val_x[first : first + 2000].contiguous(memory_format=torch.channels_last)
            correct += int((tta_logits(model, x).argmax(1) == val_y[first : first + 2000]).sum())
    return {
        "val_acc": correct / len(val_x),
        "epochs": epochs,
        "steps": total,
        "train_seconds": train_seconds,
        "eval_seconds": time.perf_counter() - eval_started,
        "seconds": time.perf_counter() - started,
    }


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data", type=Path, required=True, help="an image folder with train/ and val/")
    parser.add_argument("--epochs", type=float, default=9.9)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--batch-size", type=int, default=1024)
    parser.add_argument("--fp32", action="store_true", help="no bf16 autocast")
    args = parser.parse_args(argv)
    result = train(args.data, args.epochs, args.seed, args.batch_size, bf16=not args.fp32)
    print(json.dumps({"benchmark": "record_recipe", **result}))
    return result


if __name__ == "__main__":
    main()
