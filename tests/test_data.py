import pytest
import torch
from conftest import write_cifar10, write_cifar100, write_mnist

from trainer import DATASETS
from trainer.core.errors import UserError
from trainer.core.retry import retry
from trainer.data import build_loaders

STATS = {"mean": [0.5, 0.5, 0.5], "std": [0.25, 0.25, 0.25]}


def _synthetic(**kw):
    return DATASETS.build("synthetic", **{"train_size": 200, "test_size": 50, **kw})


def test_synthetic_is_seeded_and_shaped_like_cifar():
    a, b = _synthetic(), _synthetic()
    assert torch.equal(a.train.images, b.train.images)
    assert not torch.equal(a.train.images, _synthetic(seed=1).train.images)
    image, label = a.test[0]
    assert image.shape == (3, 32, 32) and image.dtype == torch.float32 and 0 <= label < 10
    assert len(a.train) + len(a.val) == 200 and len(a.test) == 50  # val_split 0.1 held out of train


def test_val_split_is_disjoint_fixed_and_unaugmented():
    bundle = _synthetic(val_split=0.25, augment=[{"name": "RandomHorizontalFlip", "p": 1.0}])
    train_idx, val_idx = set(bundle.train.indices.tolist()), set(bundle.val.indices.tolist())
    assert len(val_idx) == 50 and not train_idx & val_idx
    assert val_idx == set(
        _synthetic(val_split=0.25, seed=7).val.indices.tolist()
    )  # same images whatever the run
    i = bundle.val.indices[0]
    assert torch.equal(
        bundle.val[0][0], bundle.test.transform(bundle.val.images[i])
    )  # eval transform: no flip
    j = bundle.train.indices[0]
    assert torch.equal(bundle.train[0][0], bundle.test.transform(bundle.train.images[j]).flip(-1))


def test_unknown_augmentation_and_wrong_stats_are_user_errors():
    with pytest.raises(UserError, match="dataset.augment: 'RandomCropp'"):
        _synthetic(augment=[{"name": "RandomCropp", "size": 32}])
    with pytest.raises(UserError, match=r"dataset\.mean: needs 3 values"):
        _synthetic(mean=[0.5], std=[0.2, 0.2, 0.2])


def _batches(bundle, workers, epoch=0, seed=3):
    loaders = build_loaders(
        bundle,
        batch_size=16,
        num_workers=workers,
        pin_memory=False,
        prefetch_factor=2,
        persistent_workers=False,
        shuffle=True,
        drop_last=False,
        seed=seed,
    )
    loaders.sampler.set_epoch(epoch)
    return [b for b in loaders.train]


def test_same_seed_same_batches_whatever_the_worker_count():
    bundle = _synthetic(
        augment=[{"name": "RandomCrop", "size": 32, "padding": 4}, {"name": "RandomHorizontalFlip"}]
    )
    zero, two = _batches(bundle, 0), _batches(bundle, 2)
    assert len(zero) == len(two) == 12
    for (xa, ya), (xb, yb) in zip(zero, two):
        assert torch.equal(xa, xb) and torch.equal(ya, yb)
    other_epoch = _batches(bundle, 0, epoch=1)
    assert not torch.equal(zero[0][0], other_epoch[0][0])  # a new order and new augmentation each epoch


def test_sampler_restarts_mid_epoch_at_the_same_position():
    bundle = _synthetic()
    loaders = build_loaders(
        bundle,
        batch_size=16,
        num_workers=0,
        pin_memory=False,
        prefetch_factor=2,
        persistent_workers=False,
        shuffle=True,
        drop_last=False,
        seed=3,
    )
    loaders.sampler.set_epoch(2)
    full = list(loaders.train)
    loaders.sampler.set_epoch(2, start=5)
    rest = list(loaders.train)
    assert len(rest) == len(full) - 5
    assert all(torch.equal(a[0], b[0]) for a, b in zip(full[5:], rest))


@pytest.mark.parametrize(
    "name,writer,channels,classes",
    [
        ("cifar10", write_cifar10, 3, 10),
        ("cifar100", write_cifar100, 3, 100),
        ("mnist", lambda root: write_mnist(root, "MNIST"), 1, 10),
        ("fashion_mnist", lambda root: write_mnist(root, "FashionMNIST"), 1, 10),
    ],
)
def test_torchvision_datasets_read_their_real_on_disk_format(tmp_path, name, writer, channels, classes):
    writer(tmp_path)
    size = 32 if channels == 3 else 28
    bundle = DATASETS.build(
        name,
        root=str(tmp_path),
        download=False,
        verify_checksum=False,
        image_size=size,
        mean=[0.5] * channels,
        std=[0.25] * channels,
        augment=[{"name": "RandomHorizontalFlip"}],
    )
    image, label = bundle.train[0]
    assert image.shape == (channels, size, size) and 0 <= label < classes
    assert len(bundle.classes) == classes and len(bundle.test) > 0


def test_cifar_checksums_catch_corrupt_files(tmp_path):
    write_cifar10(tmp_path)  # not the real bytes, so the real MD5 check must reject them
    with pytest.raises(UserError, match=r"dataset=cifar10: no valid data under .*dataset\.download=true"):
        DATASETS.build(
            "cifar10",
            root=str(tmp_path),
            download=False,
            image_size=32,
            **STATS,
        )


def test_missing_data_says_what_to_put_where(tmp_path):
    with pytest.raises(UserError, match=r"MNIST/raw/"):
        DATASETS.build(
            "mnist",
            root=str(tmp_path),
            download=False,
            image_size=28,
            mean=[0.5],
            std=[0.25],
        )


def test_retry_backs_off_then_succeeds_or_gives_up(monkeypatch):
    sleeps = []
    monkeypatch.setattr("trainer.core.retry.time.sleep", sleeps.append)
    calls = []

    @retry(attempts=3, base_delay=1.0, exceptions=(OSError,))
    def flaky():
        calls.append(1)
        if len(calls) < 3:
            raise ConnectionError("offline")
        return "ok"

    assert flaky() == "ok" and len(calls) == 3
    assert len(sleeps) == 2 and 0 <= sleeps[0] <= 1.0 and 0 <= sleeps[1] <= 2.0  # exponential, with jitter

    @retry(attempts=2, base_delay=0.0, exceptions=(OSError,))
    def down():
        raise TimeoutError("no route")

    with pytest.raises(TimeoutError):
        down()


# ---- imagefolder ---------------------------------------------------------------------------------
def _folder(root, **kw):
    return DATASETS.build("imagefolder", **{"root": str(root), "image_size": 16, **kw})


def test_imagefolder_reads_png_jpeg_and_webp_resized_and_labelled(tmp_path):
    from conftest import write_imagefolder

    write_imagefolder(tmp_path)
    bundle = _folder(tmp_path)
    assert bundle.classes == ["cat", "dog", "frog"] and len(bundle.train) == 18 and len(bundle.val) == 18
    assert bundle.train.images.shape == (18, 3, 16, 16) and bundle.train.images.dtype == torch.uint8
    assert sorted(set(bundle.train.labels.tolist())) == [0, 1, 2]
    # each class has its own brightness: the labels follow the folders
    means = [bundle.train.images[bundle.train.labels == k].float().mean().item() for k in range(3)]
    assert means == sorted(means)
    assert len(bundle.test) == 18  # no test/ folder: the best checkpoint is tested on val/


def test_imagefolder_val_split_test_folder_and_errors(tmp_path):
    from conftest import write_imagefolder

    write_imagefolder(tmp_path, splits=("train", "test"))
    with pytest.raises(UserError, match="has no val/ folder; hold out part of train"):
        _folder(tmp_path)
    bundle = _folder(tmp_path, val_split=0.5)
    assert len(bundle.train) == len(bundle.val) == 9 and len(bundle.test) == 18
    write_imagefolder(tmp_path / "only_train", splits=("train",))
    bundle = _folder(tmp_path / "only_train", val_split=0.5)
    # no val/, no test/: tested on the held-out part
    assert bundle.test is bundle.val and len(bundle.val) == 9


def test_imagefolder_skips_or_refuses_unreadable_images(tmp_path, caplog):
    from conftest import write_imagefolder

    write_imagefolder(tmp_path)
    (tmp_path / "train" / "dog" / "broken.jpg").write_bytes(b"\xff\xd8\xff not really a jpeg")
    bundle = _folder(tmp_path)
    assert (
        len(bundle.train) == 18
        and "skipped 1 unreadable image(s)" in caplog.text
        and "broken.jpg" in caplog.text
    )
    with pytest.raises(UserError, match=r"cannot decode .*broken\.jpg.*dataset\.on_error=skip"):
        _folder(tmp_path, on_error="error")


def test_imagefolder_classes_reach_the_model_from_the_data_and_a_missing_root_is_named(tmp_path):
    """Nothing is read while the config composes: the classes are counted when the data is built, and
    the model is given them from there."""
    from conftest import compose_config, write_imagefolder

    from trainer.run.builders import model_args

    write_imagefolder(tmp_path)
    cfg = compose_config(
        "dataset=imagefolder", f"dataset.root={tmp_path}", "model=cnn", "dataset.image_size=16"
    )
    assert "num_classes" not in cfg.dataset and "num_classes" not in cfg.model
    bundle = _folder(tmp_path)
    assert model_args(cfg, bundle)["num_classes"] == 3 and model_args(cfg, bundle)["in_channels"] == 3
    with pytest.raises(UserError, match="has no train/ folder"):
        _folder(tmp_path / "nowhere")


# ---- numpy (memory-mapped) -----------------------------------------------------------------------
def _npy(root, **kw):
    return DATASETS.build(
        "numpy", **{"root": str(root), "num_classes": 10, "image_size": 32, "augment": [], **kw}
    )


def test_numpy_dataset_is_memory_mapped_and_reads_per_sample(tmp_path):
    import numpy as np
    from conftest import write_npy

    write_npy(tmp_path)
    bundle = _npy(tmp_path)
    assert isinstance(bundle.train.images.base, np.memmap)  # a view of the mapped file, not a copy
    source = np.load(tmp_path / "train_images.npy")
    image, label = bundle.train[5]
    expected = bundle.test.transform(torch.from_numpy(source[5].transpose(2, 0, 1).copy()))
    assert torch.equal(image, expected) and label == int(np.load(tmp_path / "train_labels.npy")[5])
    loaders = build_loaders(
        bundle,
        batch_size=8,
        num_workers=2,
        pin_memory=False,
        prefetch_factor=2,
        persistent_workers=False,
        shuffle=True,
        drop_last=False,
        seed=0,
    )
    assert sum(len(y) for _, y in loaders.train) == 40
    on_device = build_loaders(
        bundle,
        batch_size=8,
        num_workers=0,
        pin_memory=False,
        prefetch_factor=2,
        persistent_workers=False,
        shuffle=False,
        drop_last=False,
        seed=0,
        on_device=torch.device("cpu"),
    )
    assert next(iter(on_device.test))[0].shape == (8, 3, 32, 32)


def test_numpy_dataset_nchw_and_errors(tmp_path):
    from conftest import write_npy

    write_npy(tmp_path / "nchw", layout="NCHW")
    assert _npy(tmp_path / "nchw", layout="NCHW").train[0][0].shape == (3, 32, 32)
    with pytest.raises(UserError, match=r"test_images\.npy is missing"):
        (tmp_path / "nchw" / "test_images.npy").unlink()
        _npy(tmp_path / "nchw", layout="NCHW")
    write_npy(tmp_path / "ok")
    with pytest.raises(UserError, match=r"dataset\.num_classes: .* outside \[0, 5\)"):
        _npy(tmp_path / "ok", num_classes=5)


def _loader_batches(bundle, batch_size, rank=0, world_size=1, workers=0):
    loaders = build_loaders(
        bundle,
        batch_size=batch_size,
        num_workers=workers,
        pin_memory=False,
        prefetch_factor=2,
        persistent_workers=False,
        shuffle=True,
        drop_last=False,
        seed=1,
        rank=rank,
        world_size=world_size,
    )
    loaders.sampler.set_epoch(0)
    return list(loaders.train)


def test_two_ranks_split_each_global_batch_and_see_every_image_once():
    bundle = _synthetic(train_size=101, val_split=0.0)  # 101 = 6 x 16 + 5: a partial last global batch
    whole = _loader_batches(bundle, 16)
    ranks = [_loader_batches(bundle, 8, rank, 2, workers=rank) for rank in (0, 1)]
    assert len(whole) == len(ranks[0]) == len(ranks[1]) == 7
    key = lambda images: sorted(images.flatten(1).sum(1).tolist())  # noqa: E731  (an image's fingerprint)
    for k, (images, _) in enumerate(whole):
        assert key(images) == key(torch.cat([ranks[0][k][0], ranks[1][k][0]])), k
    assert sum(len(labels) for rank in ranks for _, labels in rank) == 101


def test_a_last_batch_of_one_image_joins_the_batch_before():
    """BatchNorm cannot train on one image: 33 images in batches of 16 make 16 + 17, not 16 + 16 + 1."""
    assert [len(labels) for _, labels in _loader_batches(_synthetic(train_size=33, val_split=0.0), 16)] == [
        16,
        17,
    ]
