"""Deterministic seeds: a mix of integers, and a block run under one seed. The data order and every
sample's augmentation derive from (seed, epoch, index) through these, so batches never depend on the
worker count and a resume can start at any batch."""

import contextlib
from collections.abc import Iterator

import torch


def mix(*values: int) -> int:
    """A deterministic 63-bit mix of integers (Python's hash() of ints is not mixed enough)."""
    h = 0x9E3779B97F4A7C15
    for v in values:
        h = ((h ^ (v & 0xFFFFFFFFFFFFFFFF)) * 0xBF58476D1CE4E5B9) & 0xFFFFFFFFFFFFFFFF
        h ^= h >> 31
    return h & 0x7FFFFFFFFFFFFFFF


@contextlib.contextmanager
def seeded(seed: int) -> Iterator[None]:
    """Runs a block under a seed of the CPU generator that transforms draw from, then restores it.
    torch.manual_seed would also seed every accelerator (100x slower); restoring keeps model code in
    the main process (dropout) unaffected when num_workers=0."""
    generator = torch.default_generator
    saved = generator.get_state()
    generator.manual_seed(seed)
    try:
        yield
    finally:
        generator.set_state(saved)
