"""loader.on_device: batched augmentation that matches the per-sample pipeline, deterministic, resumable."""

import pytest
import torch
from torchvision.transforms import v2

from trainer import DATASETS
from trainer.core.errors import UserError
from trainer.data import build_loaders
from trainer.data.device import DeviceBatches

AUGMENT = [{"name": "RandomCrop", "size": 32, "padding": 4}, {"name": "RandomHorizontalFlip"}]


def _device_batches(bundle, seed=3, shuffle=True, batch_size=16):
    return DeviceBatches(
        bundle.train,
        batch_size=batch_size,
        device=torch.device("cpu"),
        seed=seed,
        shuffle=shuffle,
        drop_last=False,
    )


@pytest.mark.parametrize("mode", ["constant", "edge", "reflect", "symmetric"])
def test_every_output_is_a_crop_or_flip_of_its_own_image(mode):
    crop = {"name": "RandomCrop", "size": 32, "padding": 4, "padding_mode": mode}
    bundle = DATASETS.build(
        "synthetic",
        train_size=48,
        test_size=8,
        val_split=0.0,
        augment=[crop, {"name": "RandomHorizontalFlip"}],
    )
    batches = _device_batches(bundle, shuffle=False)
    normalise = v2.Compose([v2.ToDtype(torch.float32, scale=True), v2.Normalize(bundle.mean, bundle.std)])
    images, labels = next(iter(batches))
    flips = 0
    for i in range(len(images)):
        source = v2.functional.pad(bundle.train.images[i], [4, 4, 4, 4], padding_mode=mode)
        candidates = [source[:, y : y + 32, x : x + 32] for y in range(9) for x in range(9)]
        matches = [
            k
            for k, c in enumerate(candidates)
            for flip in (False, True)
            if torch.equal(normalise(c.flip(-1) if flip else c), images[i])
        ]
        assert matches, f"sample {i} is not a crop of its image"
        flips += not any(torch.equal(normalise(candidates[k]), images[i]) for k in matches)
    assert 0 < flips < len(images)  # some flipped, some not
    assert torch.equal(labels, bundle.train.labels[:16])


def test_same_seed_same_batches_and_each_sample_once_per_epoch():
    bundle = DATASETS.build("synthetic", train_size=100, test_size=8, val_split=0.0, augment=AUGMENT)
    a, b = _device_batches(bundle), _device_batches(bundle)
    first = list(a)
    assert all(torch.equal(x, y) and torch.equal(la, lb) for (x, la), (y, lb) in zip(first, b))
    a.set_epoch(1)
    assert not torch.equal(first[0][0], next(iter(a))[0])
    plain = DATASETS.build(
        "synthetic", train_size=100, test_size=8, val_split=0.0, augment=[]
    )  # no augmentation
    seen = torch.cat([x for x, _ in _device_batches(plain)])
    reference = torch.stack([plain.train[i][0] for i in range(100)])
    matches = (seen.flatten(1)[:, None, :] == reference.flatten(1)[None, :, :]).all(-1)
    assert matches.sum(0).tolist() == [1] * 100  # every sample exactly once


def test_a_mid_epoch_start_continues_the_same_order():
    bundle = DATASETS.build("synthetic", train_size=100, test_size=8, val_split=0.0, augment=AUGMENT)
    batches = _device_batches(bundle)
    batches.set_epoch(2)
    full = list(batches)
    batches.set_epoch(2, start=3)
    assert len(batches) == len(full) - 3
    assert all(torch.equal(x, y) for (x, _), (y, _) in zip(full[3:], batches))


def test_unbatched_augmentation_is_refused():
    bundle = DATASETS.build(
        "synthetic", train_size=20, test_size=8, augment=[{"name": "ColorJitter", "brightness": 0.5}]
    )
    with pytest.raises(UserError, match="loader.on_device: dataset.augment step ColorJitter"):
        build_loaders(
            bundle,
            batch_size=8,
            num_workers=0,
            pin_memory=False,
            prefetch_factor=2,
            persistent_workers=False,
            shuffle=True,
            drop_last=False,
            seed=0,
            on_device=torch.device("cpu"),
        )


def test_cutout_blanks_a_square_per_image_on_both_paths():
    bundle = DATASETS.build(
        "synthetic", train_size=64, test_size=8, val_split=0.0, augment=[{"name": "Cutout", "size": 8}]
    )
    per_sample = torch.stack([bundle.train[i][0] for i in range(32)])
    blanked = (per_sample == 0).all(1).flatten(1).sum(1)  # pixels set to the mean colour, in every channel
    assert blanked.max() == 64 and blanked.min() >= 16  # 8x8; a centre near a corner clips it to 4x4 at least
    device = torch.cat([x for x, _ in _device_batches(bundle)])
    blanked = (device == 0).all(1).flatten(1).sum(1)
    assert blanked.max() == 64 and blanked.min() >= 16  # clipped at a corner: at least a 4x4 quarter
    again = torch.cat([x for x, _ in _device_batches(bundle)])
    assert torch.equal(device, again)
