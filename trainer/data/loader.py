"""DataLoaders whose batches depend only on the seed and the epoch, never on the worker count.

The training sampler draws each epoch's order from (seed, epoch) and hands every sample its own
augmentation seed, so worker processes hold no random state that matters: 0, 2 or 8 workers give the
same batches, and a resumed run can restart the order at any batch. With several processes, each
takes its share of every global batch (see plan.py).
"""

import ctypes
import signal
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from typing import Any

import torch
from torch.utils.data import DataLoader, Dataset, Sampler

from trainer.core.seeding import mix, seeded
from trainer.data.arrays import DataBundle
from trainer.data.plan import EpochPlan


class EpochBatches(Sampler[list[tuple[int, int]]]):
    """Yields this process's batches of (index, augmentation seed); the order is a function of
    (seed, epoch) alone, and the epoch is split over processes by `EpochPlan`."""

    def __init__(
        self,
        size: int,
        seed: int,
        shuffle: bool,
        batch_size: int,
        drop_last: bool,
        rank: int = 0,
        world_size: int = 1,
    ) -> None:
        self.seed, self.shuffle, self.rank = seed, shuffle, rank
        self.plan = EpochPlan(size, batch_size, world_size, drop_last)
        self.epoch, self.start = 0, 0

    def set_epoch(self, epoch: int, start: int = 0) -> None:
        """Select the epoch's order; `start` skips the batches already trained on (mid-epoch resume)."""
        self.epoch, self.start = epoch, start

    def __len__(self) -> int:
        return len(self.plan) - self.start

    def __iter__(self) -> Iterator[list[tuple[int, int]]]:
        if self.shuffle:
            generator = torch.Generator().manual_seed(mix(self.seed, self.epoch))
            order = torch.randperm(self.plan.samples, generator=generator).tolist()
        else:
            order = range(self.plan.samples)
        for step in range(self.start, len(self.plan)):
            yield [(order[i], mix(self.seed, self.epoch, order[i])) for i in self.plan.share(step, self.rank)]


class SeededSamples(Dataset):
    """Runs a dataset's random transforms under the seed its sampler chose for that sample."""

    def __init__(self, dataset: Dataset) -> None:
        self.dataset = dataset

    def __len__(self) -> int:
        return len(self.dataset)

    def __getitem__(self, key: tuple[int, int]):
        index, seed = key
        with seeded(seed):
            return self.dataset[index]


# Stop signals reach the whole process group: a terminal's Ctrl-C, and `kill -TERM -- -<pgid>`, which is
# what Slurm sends at scancel and at a time limit (and --signal=USR2@120 before it), and systemd when a
# unit stops. Only the main process acts on them: it finishes the step, saves a checkpoint and stops its
# workers itself. A worker killed by one instead would fail the main process's next batch or its save.
STOP_SIGNALS = (signal.SIGINT, signal.SIGTERM, signal.SIGUSR1, signal.SIGUSR2)


def _worker_init(worker_id: int) -> None:
    # The signals were blocked while this worker was forked (WorkerSignalsBlocked): ignore them, then
    # unblock, which discards any that arrived meanwhile. torch seeds each worker's random, numpy, torch.
    for signum in STOP_SIGNALS:
        signal.signal(signum, signal.SIG_IGN)
    signal.pthread_sigmask(signal.SIG_UNBLOCK, STOP_SIGNALS)
    _map_large_blocks()


class WorkerSignalsBlocked(DataLoader):
    """A DataLoader whose worker processes start with the stop signals blocked, so that no signal can
    reach a worker between its fork and `_worker_init`; the main process gets any that arrive then as
    soon as its workers have started."""

    def __iter__(self):
        if self.num_workers == 0:
            return super().__iter__()
        blocked = signal.pthread_sigmask(signal.SIG_BLOCK, STOP_SIGNALS)
        try:
            return super().__iter__()
        finally:
            signal.pthread_sigmask(signal.SIG_SETMASK, blocked)


def _map_large_blocks() -> None:
    """Large buffers (a batch is megabytes) in their own mappings, returned to the OS when freed.

    glibc raises its mmap threshold each time such a block is freed, after which batches come from
    the heap: in a forked worker that heap is the parent's, so the worker's private memory grew by
    ~370 MB over an epoch (measured: benchmarks/streaming.py). A fixed threshold keeps it flat."""
    try:
        libc = ctypes.CDLL("libc.so.6")
    except OSError:  # not glibc: nothing to do
        return
    libc.mallopt(-3, 1 << 20)  # M_MMAP_THRESHOLD = 1 MiB


def sample_batch(dataset: Any, n: int = 2) -> Any:
    """The first `n` samples of a split as one collated batch, as a loader would give them, for checks
    before training; the random state that training draws from is left as it was."""
    from torch.utils.data import default_collate

    from trainer.data.streaming import StreamingSplit

    if isinstance(dataset, StreamingSplit):  # it batches itself
        return next(iter(dataset.batches(batch_size=n, seed=0, shuffle=False, drop_last=False)))
    with seeded(0):
        return default_collate([dataset[i] for i in range(min(n, len(dataset)))])


@dataclass
class Loaders:
    train: Iterable  # of (images, labels) batches, with len()
    val: Iterable
    test: Iterable
    sampler: Any  # what orders the training batches: set_epoch(epoch, start batch)
    batch_size: int  # per process
    train_split: Any = None  # the dataset the training batches come from

    def close(self) -> None:
        """Stops every loader's worker processes now. Persistent workers otherwise live as long as their
        DataLoader, and after an error the traceback keeps it alive: the workers ignore the stop signals
        (see _worker_init), so multiprocessing's exit handler would wait for them forever."""
        for loader in (self.train, self.val, self.test):
            iterator = getattr(
                loader, "_iterator", None
            )  # torch's persistent worker pool, when one was started
            if iterator is not None and hasattr(iterator, "_shutdown_workers"):
                iterator._shutdown_workers()
                loader._iterator = None


def build_loaders(
    bundle: DataBundle,
    *,
    batch_size: int,
    num_workers: int,
    pin_memory: bool,
    prefetch_factor: int,
    persistent_workers: bool,
    shuffle: bool,
    drop_last: bool,
    seed: int,
    on_device: torch.device | None = None,
    rank: int = 0,
    world_size: int = 1,
) -> Loaders:
    """DataLoaders over the bundle, this process's share of each epoch; with `on_device`, batches cut
    and augmented on that device instead."""
    split = dict(batch_size=batch_size, seed=seed, rank=rank, world_size=world_size)
    if on_device is not None:
        from trainer.data.device import DeviceBatches

        train = DeviceBatches(bundle.train, device=on_device, shuffle=shuffle, drop_last=drop_last, **split)
        val, test = (
            DeviceBatches(ds, device=on_device, shuffle=False, drop_last=False, **split)
            for ds in (bundle.val, bundle.test)
        )
        return Loaders(
            train=train, val=val, test=test, sampler=train, batch_size=batch_size, train_split=bundle.train
        )
    from trainer.data.streaming import StreamingSplit

    workers = dict(
        num_workers=num_workers,
        pin_memory=pin_memory,
        worker_init_fn=_worker_init,
        prefetch_factor=prefetch_factor if num_workers else None,
        persistent_workers=persistent_workers and num_workers > 0,
    )

    def loader(dataset, shuffle: bool, drop_last: bool) -> tuple[DataLoader, Any]:
        # Each loader gets its own generator: without one, every new iterator draws its workers' base
        # seed from the global generator, which the model's dropout also draws from, so a run resumed
        # mid-epoch would see other dropout masks than the run it continues.
        generator = torch.Generator().manual_seed(seed)
        if isinstance(dataset, StreamingSplit):  # it batches itself: one item per batch
            batches = dataset.batches(shuffle=shuffle, drop_last=drop_last, **split)
            return WorkerSignalsBlocked(batches, batch_size=None, generator=generator, **workers), batches
        sampler = EpochBatches(len(dataset), seed, shuffle, batch_size, drop_last, rank, world_size)
        return (
            WorkerSignalsBlocked(
                SeededSamples(dataset), batch_sampler=sampler, generator=generator, **workers
            ),
            sampler,
        )

    (train, sampler), (val, _), (test, _) = (
        loader(bundle.train, shuffle, drop_last),
        loader(bundle.val, False, False),
        loader(bundle.test, False, False),
    )
    return Loaders(
        train=train, val=val, test=test, sampler=sampler, batch_size=batch_size, train_split=bundle.train
    )
