"""`streaming`: datasets bigger than memory, read lazily from shards, one sample at a time.

A split is a list of shards, read in order as one stream: tar files in the WebDataset layout
(`<key>.jpg|png|webp|gif` next to `<key>.cls`, the label as text), or JSONL manifests of
`{"path": ..., "label": ...}` lines, read line by line (shard_format.py). `python -m trainer.data.shard`
writes both.

An epoch is a fixed sequence that every process and worker can compute without reading any data:
the shards in an order drawn from (seed, pass), then each window of `shuffle_buffer` consecutive
samples permuted (the bounded shuffle buffer). The sequence is cut into global batches by EpochPlan
(spread over ranks like every other loader), and a rank's batch k is built by DataLoader worker
k mod num_workers, which the DataLoader collects round-robin from worker 0. So:
- every sample is in exactly one batch of one rank per epoch, whatever the worker and rank counts;
- the batches are the same for any number of workers (and a 2-rank run's global batches are a
  1-rank run's batches);
- resuming at batch k needs only k: a worker skips whole shards, and within a shard reads only tar
  headers (or lines) of samples that are not its own.
A worker holds the encoded bytes of its own samples for the windows it is reading: memory is set by
`shuffle_buffer` and the batch size, not by the size of the dataset.

The shard format itself (finding a split's shards, reading one lazily) is shard_format.py.
Longer than 300 lines: the epoch's sequence and the per-worker batches are one mechanism, and each part's
invariants (above) hold only with the other.
"""

import logging
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import Tensor
from torch.utils.data import IterableDataset, get_worker_info

from trainer.core.errors import UserError
from trainer.core.images import ImageError, decode_image
from trainer.core.registry import DATASETS
from trainer.core.seeding import mix, seeded
from trainer.data.arrays import DataBundle, build_transform
from trainer.data.plan import EpochPlan
from trainer.data.shard_format import INDEX, Shard, find_shards, iter_shard, read_index

log = logging.getLogger("trainer")


# ---- decoding ---------------------------------------------------------------------------------------
def bad_sample(error: Exception, on_error: str) -> None:
    """dataset.on_error: skip (with a warning) or stop."""
    reason = str(error).strip().splitlines()[0] if str(error).strip() else type(error).__name__
    if on_error == "error":
        raise UserError(
            f"dataset.on_error=error: unreadable sample ({reason}); fix or remove it, or set "
            f"dataset.on_error=skip"
        ) from None
    log.warning("skipped an unreadable sample (%s)", reason)


@dataclass
class StreamingSplit:
    """One split: its shards and how a sample becomes a tensor. `batches()` makes the loader's dataset."""

    shards: list[Shard]
    classes: list[str]
    image_size: int
    channels: int
    transform: Callable[[Tensor], Tensor]
    shuffle_buffer: int
    epoch_length: int | None
    on_error: str
    max_image_pixels: int

    def decode(self, data: bytes) -> Tensor:
        return decode_image(
            data, self.image_size, self.channels, self.max_image_pixels, "dataset.max_image_pixels"
        )

    def __len__(self) -> int:
        return self.epoch_length or sum(s.count for s in self.shards)

    def preview(self, n: int) -> Tensor:
        """The first n readable images of the split, through its transform (for TensorBoard and export
        checks)."""
        images: list[Tensor] = []
        for shard in self.shards:
            for _, read in iter_shard(shard, 0, shard.count, lambda i: True, self.classes):
                try:
                    images.append(self.transform(self.decode(read()[0])))
                except (OSError, ValueError, KeyError) as e:
                    bad_sample(e, self.on_error)
                if len(images) == n:
                    return torch.stack(images)
        return torch.stack(images)

    def batches(
        self,
        *,
        batch_size: int,
        seed: int,
        shuffle: bool,
        drop_last: bool,
        rank: int = 0,
        world_size: int = 1,
    ) -> "StreamBatches":
        return StreamBatches(
            self,
            EpochPlan(len(self), batch_size, world_size, drop_last),
            seed=seed,
            shuffle=shuffle,
            rank=rank,
        )


# ---- the epoch's sequence, and one worker's part of it ----------------------------------------------
class StreamBatches(IterableDataset):
    """The DataLoader's dataset (batch_size=None): yields this rank's batches, this worker's share."""

    def __init__(
        self, split: StreamingSplit, plan: EpochPlan, *, seed: int, shuffle: bool, rank: int
    ) -> None:
        if plan.samples < 2 * plan.world_size:
            raise UserError(
                f"dataset.root: a split has {plan.samples} samples, too few for {plan.world_size} process(es)"
            )
        self.split, self.plan, self.seed, self.shuffle, self.rank = split, plan, seed, shuffle, rank
        self.total = sum(s.count for s in split.shards)
        # (epoch, start batch), set in the main process and read by the workers when an epoch begins:
        # shared memory, so persistent workers see it too.
        self.position = torch.zeros(2, dtype=torch.long).share_memory_()

    def set_epoch(self, epoch: int, start: int = 0) -> None:
        """Select the epoch; `start` skips the batches already trained on (mid-epoch resume)."""
        self.position[0], self.position[1] = epoch, start

    def __len__(self) -> int:
        return len(self.plan) - int(self.position[1])

    def window_order(self, epoch: int, window: int) -> Tensor:
        """Stream positions of the window's sequence positions (the shuffle buffer's order)."""
        size = self.split.shuffle_buffer
        n = min(size, self.plan.samples - window * size)
        if not self.shuffle:
            return torch.arange(window * size, window * size + n)
        generator = torch.Generator().manual_seed(mix(self.seed, epoch, window, 1))
        return window * size + torch.randperm(n, generator=generator)

    def shard_order(self, pass_index: int) -> list[Shard]:
        if not self.shuffle:
            return list(self.split.shards)
        generator = torch.Generator().manual_seed(mix(self.seed, pass_index, 2))
        return [
            self.split.shards[i] for i in torch.randperm(len(self.split.shards), generator=generator).tolist()
        ]

    def __iter__(self) -> Iterator[tuple[Tensor, Tensor]]:
        info = get_worker_info()
        worker, workers = (info.id, info.num_workers) if info else (0, 1)
        epoch, start = (int(v) for v in self.position)
        mine = iter(range(start + worker, len(self.plan), workers))  # this worker's steps, in order
        step = next(mine, None)
        if step is None:
            return
        size = self.split.shuffle_buffer
        samples: dict[int, list] = {}  # step -> its samples so far, in batch order
        missing: dict[int, int] = {}  # step -> samples still to read
        owners: dict[int, tuple[int, int]] = {}  # stream position -> (step, slot), for the current window
        window = -1

        def wanted(position: int) -> bool:
            nonlocal window
            if position // size != window:  # a new window: which of its samples are this worker's
                window = position // size
                owners.clear()
                owners.update(self._owners(epoch, window, start, worker, workers))
            return position in owners

        begin = self.plan.bounds(start)[0] // size * size  # the window of the first sample still to train on
        for position, sample in self._stream(epoch, begin, wanted):
            owner, slot = owners.pop(position)
            if owner not in samples:
                samples[owner] = [None] * len(self.plan.share(owner, self.rank))
                missing[owner] = len(samples[owner])
            samples[owner][slot] = sample
            missing[owner] -= 1
            while step is not None and missing.get(step) == 0:  # batches leave in step order
                del missing[step]
                yield self._make_batch(samples.pop(step), epoch, step)
                step = next(mine, None)

    def _owners(
        self, epoch: int, window: int, start: int, worker: int, workers: int
    ) -> dict[int, tuple[int, int]]:
        """{stream position: (step, slot in batch)} for this rank's and worker's samples in a window."""
        size, plan = self.split.shuffle_buffer, self.plan
        stream = self.window_order(epoch, window)
        sequence = torch.arange(window * size, window * size + len(stream))
        steps = (sequence // plan.global_batch).clamp(max=max(len(plan) - 1, 0))
        offset = sequence - steps * plan.global_batch
        keep = (
            (sequence < plan.bounds(len(plan) - 1)[1])
            & (steps >= start)
            & (offset % plan.world_size == self.rank)
            & ((steps - start) % workers == worker)
        )
        slots = offset[keep] // plan.world_size
        return dict(zip(stream[keep].tolist(), zip(steps[keep].tolist(), slots.tolist())))

    def _stream(
        self, epoch: int, begin: int, wanted: Callable[[int], bool]
    ) -> Iterator[tuple[int, tuple[bytes, int] | None]]:
        """(epoch position, (bytes, label)) of the wanted samples from epoch position `begin` on.

        Epoch e covers positions [e x length, (e + 1) x length) of an endless run of passes over the
        shards, each pass in its own shard order; with no epoch_length, an epoch is one pass."""
        length, total = self.plan.samples, self.total
        absolute, end = epoch * length + begin, (epoch + 1) * length
        while absolute < end:
            shard_base = absolute // total * total
            for shard in self.shard_order(absolute // total):
                if shard_base + shard.count > absolute:
                    first, stop = absolute - shard_base, min(shard.count, end - shard_base)
                    at = shard_base - epoch * length  # the epoch position of the shard's sample 0
                    for index, read in iter_shard(
                        shard, first, stop, lambda i, at=at: wanted(at + i), self.split.classes
                    ):
                        yield at + index, self._read(read)
                    absolute = shard_base + stop
                    if absolute >= end:
                        return
                shard_base += shard.count

    def _read(self, read: Callable[[], tuple[bytes, int]]) -> tuple[bytes, int] | None:
        try:
            return read()
        except (OSError, ValueError, KeyError) as e:
            return bad_sample(e, self.split.on_error)

    def _make_batch(self, samples: list, epoch: int, step: int) -> tuple[Tensor, Tensor]:
        """Decodes and augments the batch's samples; each sample's augmentation has its own seed."""
        images, labels = [], []
        first = self.plan.share(step, self.rank)
        for sequence_position, sample in zip(first, samples):
            if sample is None:
                continue
            try:
                image = self.split.decode(sample[0])
            except ImageError as e:
                bad_sample(e, self.split.on_error)
                continue
            with seeded(mix(self.seed, epoch, sequence_position)):
                images.append(self.split.transform(image))
            labels.append(sample[1])
        if not images:
            raise UserError(f"dataset.root: every sample of batch {step} is unreadable; check the shards")
        return torch.stack(images), torch.tensor(labels)


# ---- the DATASETS entry ----------------------------------------------------------------------------
def check_options(
    *, shuffle_buffer: int, epoch_length: int | None, on_error: str, in_channels: int, max_image_pixels: int
) -> None:
    for key, value, ok, requirement in (
        ("shuffle_buffer", shuffle_buffer, shuffle_buffer >= 1, "1 or more"),
        (
            "epoch_length",
            epoch_length,
            epoch_length is None or epoch_length >= 1,
            "null (one pass) or 1 or more",
        ),
        ("on_error", on_error, on_error in ("skip", "error"), "one of skip, error"),
        ("in_channels", in_channels, in_channels in (1, 3), "1 or 3"),
        ("max_image_pixels", max_image_pixels, max_image_pixels >= 1, "1 or more"),
    ):
        if not ok:
            raise UserError(f"dataset.{key}: must be {requirement}, got {value!r}")


@DATASETS.register("streaming")
def streaming(
    *,
    root: str,
    num_classes: int | None,
    image_size: int,
    in_channels: int,
    shuffle_buffer: int,
    epoch_length: int | None,
    augment: Sequence[dict],
    mean: Sequence[float],
    std: Sequence[float],
    on_error: str,
    max_image_pixels: int,
) -> DataBundle:
    check_options(
        shuffle_buffer=shuffle_buffer,
        epoch_length=epoch_length,
        on_error=on_error,
        in_channels=in_channels,
        max_image_pixels=max_image_pixels,
    )
    folder = Path(root)
    if not folder.is_dir():
        raise UserError(
            f"dataset.root: {folder.resolve()} does not exist; write shards there with "
            f"python -m trainer.data.shard <image folder> {root}"
        )
    classes = read_index(folder).get("classes")
    if not classes and num_classes is None:
        raise UserError(
            f"dataset.num_classes: {folder / INDEX} lists no classes; set dataset.num_classes=N, or write "
            "the "
            f"shards with python -m trainer.data.shard"
        )
    classes = classes or [str(i) for i in range(num_classes)]
    if num_classes is not None and len(classes) != num_classes:
        raise UserError(
            f"dataset.num_classes: {folder / INDEX} lists {len(classes)} classes, the config says "
            f"{num_classes}"
        )
    splits = {name: find_shards(folder, name) for name in ("train", "val", "test")}
    if not splits["train"]:
        raise UserError(
            f"dataset.root: no training shards under {folder.resolve()} (train/*.tar, train/*.jsonl or "
            f"train.jsonl); write them with python -m trainer.data.shard <image folder> {root}"
        )
    if not splits["val"] and not splits["test"]:
        raise UserError(
            f"dataset.root: {folder.resolve()} has no val or test shards to validate on; shard an image "
            f"folder that has val/ (or test/)"
        )
    return streaming_bundle(
        splits,
        classes,
        image_size=image_size,
        in_channels=in_channels,
        shuffle_buffer=shuffle_buffer,
        epoch_length=epoch_length,
        augment=augment,
        mean=mean,
        std=std,
        on_error=on_error,
        max_image_pixels=max_image_pixels,
    )


def streaming_bundle(
    splits: dict[str, list[Shard]],
    classes: list[str],
    *,
    image_size: int,
    in_channels: int,
    shuffle_buffer: int,
    epoch_length: int | None,
    augment: Sequence[dict],
    mean: Sequence[float],
    std: Sequence[float],
    on_error: str,
    max_image_pixels: int,
) -> DataBundle:
    """The bundle of streamed splits: val is the test shards when there is no val, and the other way round."""
    common = dict(
        classes=classes,
        image_size=image_size,
        channels=in_channels,
        shuffle_buffer=shuffle_buffer,
        on_error=on_error,
        max_image_pixels=max_image_pixels,
    )
    eval_transform = build_transform([], mean, std, None, image_size)
    train = StreamingSplit(
        splits["train"],
        transform=build_transform(augment, mean, std, None, image_size),
        epoch_length=epoch_length,
        **common,
    )
    val, test = (
        StreamingSplit(splits[name] or splits[other], transform=eval_transform, epoch_length=None, **common)
        for name, other in (("val", "test"), ("test", "val"))
    )
    return DataBundle(
        train=train,
        val=val,
        test=test,
        classes=classes,
        in_channels=in_channels,
        image_size=image_size,
        mean=list(mean),
        std=list(std),
    )
