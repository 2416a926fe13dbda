"""DataLoaders whose batches depend only on the seed and the epoch, never on the worker count.

The training sampler draws each epoch's order from (seed, epoch) and hands every sample its own
augmentation seed, so worker processes hold no random state that matters: 0, 2 or 8 workers give the
same batches, and a resumed run can restart the order at any position.
"""
import signal
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from typing import Any

import torch
from torch.utils.data import BatchSampler, DataLoader, Dataset, Sampler

from trainer.data.arrays import DataBundle


def _mix(*values: int) -> int:
    """A deterministic 63-bit mix of integers (Python's hash() of ints is not mixed enough)."""
    h = 0x9E3779B97F4A7C15
    for v in values:
        h = ((h ^ (v & 0xFFFFFFFFFFFFFFFF)) * 0xBF58476D1CE4E5B9) & 0xFFFFFFFFFFFFFFFF
        h ^= h >> 31
    return h & 0x7FFFFFFFFFFFFFFF


class EpochSampler(Sampler[tuple[int, int]]):
    """Yields (index, augmentation seed); the order is a function of (seed, epoch) alone."""

    def __init__(self, size: int, seed: int, shuffle: bool) -> None:
        self.size, self.seed, self.shuffle = size, seed, shuffle
        self.epoch, self.start = 0, 0

    def set_epoch(self, epoch: int, start: int = 0) -> None:
        """Select the epoch's order; `start` skips samples already trained on (mid-epoch resume)."""
        self.epoch, self.start = epoch, start

    def __len__(self) -> int:
        return self.size - self.start

    def __iter__(self) -> Iterator[tuple[int, int]]:
        if self.shuffle:
            order = torch.randperm(self.size, generator=torch.Generator().manual_seed(_mix(self.seed, self.epoch)))
        else:
            order = torch.arange(self.size)
        for index in order[self.start:].tolist():
            yield index, _mix(self.seed, self.epoch, index)


class SeededSamples(Dataset):
    """Runs a dataset's random transforms under the seed its sampler chose for that sample."""

    def __init__(self, dataset: Dataset) -> None:
        self.dataset = dataset

    def __len__(self) -> int:
        return len(self.dataset)

    def __getitem__(self, key: tuple[int, int]):
        index, seed = key
        # Seed only the CPU generator that transforms draw from (torch.manual_seed would also seed
        # every accelerator: 100x slower), and restore it afterwards so model code in the main
        # process (dropout) is unaffected when num_workers=0.
        generator = torch.default_generator
        saved = generator.get_state()
        generator.manual_seed(seed)
        try:
            return self.dataset[index]
        finally:
            generator.set_state(saved)


def _worker_init(worker_id: int) -> None:
    # Ctrl-C reaches the whole process group; only the main process should act on it (it saves a
    # checkpoint and stops the workers itself). torch seeds each worker's random, numpy and torch.
    signal.signal(signal.SIGINT, signal.SIG_IGN)


@dataclass
class Loaders:
    train: Iterable  # of (images, labels) batches, with len()
    val: Iterable
    test: Iterable
    sampler: Any  # the train loader's EpochSampler (or DeviceBatches): set_epoch(epoch, start)
    batch_size: int


def build_loaders(bundle: DataBundle, *, batch_size: int, num_workers: int, pin_memory: bool,
                  prefetch_factor: int, persistent_workers: bool, shuffle: bool, drop_last: bool,
                  seed: int, on_device: torch.device | None = None) -> Loaders:
    """DataLoaders over the bundle; with `on_device`, batches cut and augmented on that device instead."""
    if on_device is not None:
        from trainer.data.device import DeviceBatches  # it builds on _mix, here
        train = DeviceBatches(bundle.train, batch_size=batch_size, device=on_device, seed=seed, shuffle=shuffle,
                              drop_last=drop_last)
        val, test = (DeviceBatches(ds, batch_size=batch_size, device=on_device, seed=seed, shuffle=False,
                                   drop_last=False) for ds in (bundle.val, bundle.test))
        return Loaders(train=train, val=val, test=test, sampler=train, batch_size=batch_size)
    workers = dict(num_workers=num_workers, pin_memory=pin_memory, worker_init_fn=_worker_init,
                   prefetch_factor=prefetch_factor if num_workers else None,
                   persistent_workers=persistent_workers and num_workers > 0)
    # Each loader gets its own generator: without one, every new iterator draws its workers' base seed
    # from the global generator, which the model's dropout also draws from, so a run resumed mid-epoch
    # would see other dropout masks than the run it continues.
    sampler = EpochSampler(len(bundle.train), seed, shuffle)
    train = DataLoader(SeededSamples(bundle.train), batch_sampler=BatchSampler(sampler, batch_size, drop_last),
                       generator=torch.Generator().manual_seed(seed), **workers)
    val, test = (DataLoader(ds, batch_size=batch_size, shuffle=False, generator=torch.Generator().manual_seed(seed),
                            **workers) for ds in (bundle.val, bundle.test))
    return Loaders(train=train, val=val, test=test, sampler=sampler, batch_size=batch_size)

