"""`loader.on_device=true`: the whole uint8 dataset lives on the training device; each epoch is one
permutation, and augmentation runs on whole batches as tensor operations, with no per-sample Python.

It reproduces the dataset's own transform (read from its transforms.v2 pipeline): Resize is applied
once up front, RandomCrop (any padding mode) and RandomHorizontalFlip per sample but batched,
then scaling and Normalize, then Cutout. Other augmentation steps have no batched version here: refused.
Every random draw of an epoch comes from a generator seeded by (seed, epoch) and is indexed by the
sample's position in the epoch, so the same seed gives the same batches, and a resume can start
mid-epoch.
"""

from collections.abc import Iterator

import torch
import torch.nn.functional as F
from torch import Tensor

from trainer.core.errors import UserError
from trainer.core.seeding import mix
from trainer.data.arrays import ArrayDataset, Cutout
from trainer.data.plan import EpochPlan


class DeviceBatches:
    def __init__(
        self,
        dataset: ArrayDataset,
        *,
        batch_size: int,
        device: torch.device,
        seed: int,
        shuffle: bool,
        drop_last: bool,
        rank: int = 0,
        world_size: int = 1,
    ) -> None:
        if not isinstance(dataset, ArrayDataset):
            raise UserError(
                "loader.on_device: needs a dataset held in memory as one tensor (synthetic, cifar10, "
                "cifar100, mnist, fashion_mnist, imagefolder); set loader.on_device=false"
            )
        self.seed, self.shuffle, self.rank = seed, shuffle, rank
        self.plan = EpochPlan(len(dataset), batch_size, world_size, drop_last)
        self.epoch, self.start = 0, 0
        self.crop: tuple[tuple[int, int], list[int], float, str] | None = None
        self.flip_p = 0.0
        self.cutout = 0
        from torchvision.transforms import v2  # the steps the dataset's transform is made of

        images = dataset.all_images()
        for step in dataset.transform.transforms:
            if isinstance(step, v2.Resize):
                images = torch.cat([step(chunk) for chunk in images.split(1024)])  # once, not every epoch
            elif isinstance(step, v2.RandomCrop) and not step.pad_if_needed:
                self.crop = (step.size, step.padding or [0, 0, 0, 0], float(step.fill), step.padding_mode)
            elif isinstance(step, v2.RandomHorizontalFlip):
                self.flip_p = step.p
            elif isinstance(step, Cutout):
                self.cutout = step.size
            elif isinstance(step, v2.Normalize):
                shape = (1, -1, 1, 1)
                self.mean = torch.tensor(step.mean, device=device).view(shape)
                self.std = torch.tensor(step.std, device=device).view(shape)
            elif not isinstance(step, v2.ToDtype):
                raise UserError(
                    f"loader.on_device: dataset.augment step {type(step).__name__} has no batched "
                    f"version; use RandomCrop, RandomHorizontalFlip and Cutout, or loader.on_device=false"
                )
        self.images = images.to(device)
        self.labels = dataset.labels[dataset.indices].to(device)
        self.device = device

    def set_epoch(self, epoch: int, start: int = 0) -> None:
        """Select the epoch's order; `start` skips the batches already trained on (mid-epoch resume)."""
        self.epoch, self.start = epoch, start

    def __len__(self) -> int:
        return len(self.plan) - self.start

    def __iter__(self) -> Iterator[tuple[Tensor, Tensor]]:
        n = len(self.labels)
        generator = torch.Generator().manual_seed(mix(self.seed, self.epoch))
        order = torch.randperm(n, generator=generator) if self.shuffle else torch.arange(n)
        offsets = flips = centres = None
        if self.crop is not None:
            (h, w), (left, right, top, bottom), _, _ = self.crop  # transforms.v2 keeps padding in this order
            limits = torch.tensor(
                [self.images.shape[-2] + top + bottom - h + 1, self.images.shape[-1] + left + right - w + 1]
            )
            offsets = (torch.rand(n, 2, generator=generator) * limits).long().to(self.device)
        if self.flip_p > 0:
            flips = (torch.rand(n, generator=generator) < self.flip_p).to(self.device)
        if self.cutout:
            centres = (torch.rand(n, 2, generator=generator) * torch.tensor(self.images.shape[-2:])).long()
            centres = centres.to(self.device)
        order = order.to(self.device)  # one copy per epoch; everything below stays on the device
        for step in range(self.start, len(self.plan)):
            share = self.plan.share(step, self.rank)
            position = slice(share.start, share.stop, share.step)
            index = order[position]
            images = self.images[index]
            if offsets is not None:
                images = self._crop(images, offsets[position])
            if flips is not None:
                images = torch.where(flips[position].view(-1, 1, 1, 1), images.flip(-1), images)
            # the arithmetic of v2.ToDtype(scale=True) and v2.Normalize, so both paths give the same floats
            images = images.float().mul_(1 / 255).sub_(self.mean).div_(self.std)
            if centres is not None:
                images = self._cut(images, centres[position])
            yield images, self.labels[index]

    def _cut(self, images: Tensor, centres: Tensor) -> Tensor:
        """Cutout for the whole batch: one mask of size x size squares around each image's centre."""
        first = centres - self.cutout // 2  # may start above or left of the image: clipped there
        rows = torch.arange(images.shape[-2], device=images.device)
        cols = torch.arange(images.shape[-1], device=images.device)
        inside_rows = (rows >= first[:, :1]) & (rows < first[:, :1] + self.cutout)
        inside_cols = (cols >= first[:, 1:]) & (cols < first[:, 1:] + self.cutout)
        return images.masked_fill_((inside_rows[:, :, None] & inside_cols[:, None, :])[:, None], 0)

    def _crop(self, images: Tensor, offsets: Tensor) -> Tensor:
        """A different crop per image, as one gather: from the padded batch (constant padding), or from the
        batch itself through rows and columns mapped back inside the image (edge, reflect, symmetric)."""
        (h, w), (left, right, top, bottom), fill, mode = self.crop
        rows = offsets[:, 0, None] + torch.arange(
            h, device=images.device
        )  # in the padded image's coordinates
        cols = offsets[:, 1, None] + torch.arange(w, device=images.device)
        if mode == "constant":
            images = F.pad(images, (left, right, top, bottom), value=fill)
        else:
            rows, cols = (
                _inside(rows - top, images.shape[-2], mode),
                _inside(cols - left, images.shape[-1], mode),
            )
        batch = torch.arange(len(images), device=images.device)[:, None, None, None]
        channels = torch.arange(images.shape[1], device=images.device)[None, :, None, None]
        return images[batch, channels, rows[:, None, :, None], cols[:, None, None, :]]


def _inside(index: Tensor, size: int, mode: str) -> Tensor:
    """Positions outside 0..size-1 mapped to the pixel padding mode `mode` (torchvision's) copies there."""
    if mode == "edge":
        return index.clamp(0, size - 1)
    if mode == "reflect":  # the edge pixel is not repeated: -1 -> 1, size -> size - 2
        return torch.where(index < 0, -index, torch.where(index >= size, 2 * (size - 1) - index, index))
    # symmetric (transforms.v2 has no other mode): the edge pixel is repeated, -1 -> 0, size -> size - 1
    return torch.where(index < 0, -index - 1, torch.where(index >= size, 2 * size - 1 - index, index))
