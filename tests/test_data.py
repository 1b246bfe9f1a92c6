"""Tests for the data layer: index samplers, Fashion-MNIST loading, in-memory data modules."""

from __future__ import annotations

import gzip
import struct
from itertools import islice
from pathlib import Path

import numpy as np
import pytest
import torch

from diffusion_train.data.fashion_mnist import FashionMNISTDataModule, load_split, to_resolution
from diffusion_train.data.samplers import FixedBatches, InfiniteBatchSampler, fixed_batches
from diffusion_train.data.synthetic import SyntheticDataModule

from conftest import instantiate_data, module_of


def take(sampler, n):
    return list(islice(iter(sampler), n))


# ------------------------------------------------------------------------------------------------
# InfiniteBatchSampler
# ------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("num_samples,batch_size", [(12, 4), (10, 4), (7, 3), (5, 8)])
def test_every_index_once_per_epoch(num_samples, batch_size):
    epochs = 3
    n_batches = -(-epochs * num_samples // batch_size)
    batches = take(InfiniteBatchSampler(num_samples, batch_size, seed=0), n_batches)
    assert all(len(b) == batch_size for b in batches)
    stream = [i for b in batches for i in b][: epochs * num_samples]
    for e in range(epochs):
        chunk = stream[e * num_samples:(e + 1) * num_samples]
        assert sorted(chunk) == list(range(num_samples)), f"epoch {e}: {chunk}"
    # epochs are reshuffled (with 12 items, 3 identical orders would be a 1/12!^2 coincidence)
    if num_samples >= 10:
        orders = {tuple(stream[e * num_samples:(e + 1) * num_samples]) for e in range(epochs)}
        assert len(orders) > 1


def test_different_seeds_give_different_orders():
    a = take(InfiniteBatchSampler(100, 10, seed=0), 10)
    b = take(InfiniteBatchSampler(100, 10, seed=1), 10)
    c = take(InfiniteBatchSampler(100, 10, seed=0), 10)
    assert a != b
    assert a == c


@pytest.mark.parametrize("k", [0, 1, 3, 7, 11])
def test_start_batch_resumes_the_stream(k):
    fresh = take(InfiniteBatchSampler(10, 4, seed=5), k + 8)
    resumed = take(InfiniteBatchSampler(10, 4, seed=5, start_batch=k), 8)
    assert resumed == fresh[k:]
    # random access agrees with iteration, whatever order it is queried in
    s = InfiniteBatchSampler(10, 4, seed=5)
    for j in reversed(range(k + 8)):
        assert s.indices(j) == fresh[j]


@pytest.mark.parametrize("num_samples,batch_size", [(16, 4), (13, 3)])
def test_two_ranks_split_the_global_batches(num_samples, batch_size):
    world, n = 2, 12
    global_batches = take(InfiniteBatchSampler(num_samples, batch_size * world, seed=3), n)
    ranks = [take(InfiniteBatchSampler(num_samples, batch_size, seed=3, rank=r, world_size=world), n)
             for r in range(world)]
    for j in range(n):
        for r in range(world):
            assert ranks[r][j] == global_batches[j][r * batch_size:(r + 1) * batch_size]
    if num_samples % (batch_size * world) == 0:  # whole global batches per epoch
        per_epoch = num_samples // (batch_size * world)
        for e in range(n // per_epoch):
            r0 = {i for b in ranks[0][e * per_epoch:(e + 1) * per_epoch] for i in b}
            r1 = {i for b in ranks[1][e * per_epoch:(e + 1) * per_epoch] for i in b}
            assert not r0 & r1
            assert r0 | r1 == set(range(num_samples))


def test_invalid_rank_and_empty_dataset_raise():
    with pytest.raises(ValueError):
        InfiniteBatchSampler(10, 2, rank=2, world_size=2)
    with pytest.raises(ValueError):
        InfiniteBatchSampler(10, 2, rank=-1, world_size=2)
    with pytest.raises(ValueError):
        InfiniteBatchSampler(0, 2)


# ------------------------------------------------------------------------------------------------
# fixed_batches: the validation set's batches
# ------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("num_samples,batch_size,world", [(16, 8, 1), (10, 3, 3), (7, 2, 4), (3, 4, 5), (100, 7, 2)])
def test_fixed_batches_balanced_and_each_item_counted_once(num_samples, batch_size, world):
    shards = [fixed_batches(num_samples, batch_size, r, world) for r in range(world)]
    assert len({len(s) for s in shards}) == 1  # every rank runs as many batches (none waits in a collective)
    counted = [b for s in shards for b in s if not b.padding]
    # the same batches as one process makes, each counted on exactly one rank
    assert sorted(counted) == fixed_batches(num_samples, batch_size, 0, 1)
    assert [i for b in sorted(counted) for i in b.items] == list(range(num_samples))
    assert all(0 < len(b.items) <= batch_size for s in shards for b in s)
    assert len(shards[0]) * world - len(counted) < world  # at most one padding batch per rank


def test_validation_loss_is_the_same_for_any_number_of_ranks(tiny_cfg):
    """Each fixed batch draws its noise from its own stream and padding batches are not counted, so the
    validation loss summed over the ranks' batches is that of one process (the runs of a scaling study may
    use different numbers of GPUs)."""
    module = module_of(tiny_cfg)
    data = instantiate_data(tiny_cfg("data.val_size=10"))
    data.setup()
    val = FixedBatches(data.val_set)

    def total(world: int) -> torch.Tensor:
        module.on_validation_epoch_start()
        for rank in range(world):
            for batch in fixed_batches(len(data.val_set), 3, rank, world):
                module.validation_step(val[batch], 0)
        return module._val_total[0].clone()

    one = total(1)
    assert one[1] == len(data.val_set)
    for world in (2, 3, len(data.val_set) // 3 + 2):
        assert torch.allclose(total(world), one, rtol=1e-12, atol=0), world


# ------------------------------------------------------------------------------------------------
# Fashion-MNIST
# ------------------------------------------------------------------------------------------------
# The Debian package dataset-fashion-mnist is a test requirement (.ci/run installs it): no skip.
@pytest.fixture(scope="module")
def fmnist_train():
    return load_split("train")


def test_load_split_train_and_test(fmnist_train):
    x, y = fmnist_train
    assert x.shape == (60000, 1, 28, 28) and x.dtype == torch.uint8
    assert y.shape == (60000,) and y.dtype == torch.int64
    assert torch.bincount(y, minlength=10).tolist() == [6000] * 10
    assert int(x.max()) > 200 and int(x.min()) == 0
    xt, yt = load_split("test")
    assert xt.shape == (10000, 1, 28, 28) and yt.shape == (10000,)
    assert torch.bincount(yt, minlength=10).tolist() == [1000] * 10


def test_to_resolution(fmnist_train):
    x = fmnist_train[0][:20]
    padded = to_resolution(x, 32, "pad")
    assert padded.shape == (20, 1, 32, 32) and padded.dtype == torch.uint8
    assert torch.equal(padded[..., 2:30, 2:30], x)
    border = torch.ones(32, 32, dtype=torch.bool)
    border[2:30, 2:30] = False
    assert int(padded[..., border].abs().sum()) == 0
    resized = to_resolution(x, 32, "resize")
    assert resized.shape == (20, 1, 32, 32) and resized.dtype == torch.uint8
    # bilinear resize keeps the overall brightness (mean intensity) close
    assert abs(float(resized.float().mean()) - float(x.float().mean())) < 2.0
    assert to_resolution(x, 28, "pad") is x
    with pytest.raises(ValueError):
        to_resolution(x, 31, "pad")
    with pytest.raises(ValueError):
        to_resolution(x, 32, "crop")


def test_fashion_mnist_class_subset(fmnist_train):
    """data.classes keeps those classes only, in training and validation, under their own labels."""
    dm = FashionMNISTDataModule(batch_size=64, val_size=40, classes=[5, 7])
    dm.setup()
    labels = torch.cat([next(iter(dm.train_dataloader()))["label"], next(iter(dm.val_dataloader()))["label"]])
    assert set(labels.tolist()) == {5, 7}
    raw_x, raw_y = fmnist_train
    keys = next(iter(dm.train_dataloader()))["__key__"]
    assert all(int(raw_y[int(k.split("/")[1])]) in (5, 7) for k in keys)
    with pytest.raises(ValueError, match="data.classes"):
        FashionMNISTDataModule(classes=[3, 12])


def test_fashion_mnist_datamodule_batches(fmnist_train):
    dm = FashionMNISTDataModule(batch_size=8, val_size=16)
    dm.setup()
    batch = next(iter(dm.train_dataloader()))
    assert set(batch) == {"image", "label", "__key__"}
    img = batch["image"]
    assert img.shape == (8, 1, 32, 32) and img.dtype == torch.float32
    assert float(img.min()) >= -1.0 and float(img.max()) <= 1.0
    assert batch["label"].dtype == torch.int64 and batch["label"].shape == (8,)
    keys = batch["__key__"]
    assert isinstance(keys, list) and len(keys) == 8 and all(isinstance(k, str) for k in keys)
    # the batch holds exactly the padded, rescaled training images named by its keys
    raw_x, raw_y = fmnist_train
    idx = [int(k.split("/")[1]) for k in keys]
    assert all(k.startswith("train/") for k in keys)
    expected = to_resolution(raw_x[idx], 32, "pad").float() / 127.5 - 1
    torch.testing.assert_close(img, expected)
    assert torch.equal(batch["label"], raw_y[idx])

    val = list(dm.val_dataloader())
    val_keys = [k for b in val for k in b["__key__"]]
    assert sorted(val_keys, key=lambda k: int(k.split("/")[1])) == [f"val/{i}" for i in range(16)]
    te_x, te_y = load_split("test")
    val_labels = torch.cat([b["label"] for b in val])
    val_idx = [int(k.split("/")[1]) for k in val_keys]
    assert torch.equal(val_labels, te_y[val_idx])


# ------------------------------------------------------------------------------------------------
# missing / hand-written files
# ------------------------------------------------------------------------------------------------
def test_missing_files_error_message(tmp_path):
    with pytest.raises(FileNotFoundError) as info:
        load_split("train", root=tmp_path)
    msg = str(info.value)
    assert str(tmp_path) in msg
    assert "apt-get install dataset-fashion-mnist" in msg


def _idx_bytes(arr: np.ndarray) -> bytes:
    header = b"\x00\x00\x08" + bytes([arr.ndim]) + b"".join(struct.pack(">I", d) for d in arr.shape)
    return header + arr.astype(np.uint8).tobytes()


def _write_split(root: Path, split_files, images: np.ndarray, labels: np.ndarray, gz=True, truncate=0):
    img_name, lbl_name = split_files
    img_bytes = _idx_bytes(images)
    if truncate:
        img_bytes = img_bytes[:-truncate]
    for name, data in ((img_name, img_bytes), (lbl_name, _idx_bytes(labels))):
        if gz:
            with gzip.open(root / (name + ".gz"), "wb") as f:
                f.write(data)
        else:
            (root / name).write_bytes(data)


@pytest.mark.parametrize("gz", [True, False])
def test_hand_written_idx_files_load(tmp_path, gz):
    rng = np.random.default_rng(0)
    images = rng.integers(0, 256, size=(5, 28, 28), dtype=np.uint8)
    labels = np.array([3, 1, 4, 1, 5], dtype=np.uint8)
    _write_split(tmp_path, ("train-images-idx3-ubyte", "train-labels-idx1-ubyte"), images, labels, gz=gz)
    x, y = load_split("train", root=tmp_path)
    assert x.shape == (5, 1, 28, 28) and x.dtype == torch.uint8
    assert np.array_equal(x[:, 0].numpy(), images)
    assert y.dtype == torch.int64 and y.tolist() == [3, 1, 4, 1, 5]
    # the test split is still missing
    with pytest.raises(FileNotFoundError):
        load_split("test", root=tmp_path)


def test_torchvision_layout_is_found(tmp_path):
    sub = tmp_path / "FashionMNIST" / "raw"
    sub.mkdir(parents=True)
    images = np.arange(2 * 28 * 28, dtype=np.int64).reshape(2, 28, 28) % 256
    _write_split(sub, ("t10k-images-idx3-ubyte", "t10k-labels-idx1-ubyte"), images, np.array([9, 0]))
    x, y = load_split("test", root=tmp_path)
    assert np.array_equal(x[:, 0].numpy(), images.astype(np.uint8)) and y.tolist() == [9, 0]


def test_a_damaged_gzip_idx_file_is_named(tmp_path):
    images = np.zeros((5, 28, 28), dtype=np.uint8)
    _write_split(tmp_path, ("train-images-idx3-ubyte", "train-labels-idx1-ubyte"), images,
                 np.zeros(5, dtype=np.uint8), gz=True)
    path = tmp_path / "train-images-idx3-ubyte.gz"
    path.write_bytes(path.read_bytes()[:-20])  # a download cut short
    with pytest.raises(ValueError, match=rf"{path}: damaged gzip file \(EOFError"):
        load_split("train", root=tmp_path)


def test_truncated_idx_raises(tmp_path):
    images = np.zeros((5, 28, 28), dtype=np.uint8)
    _write_split(tmp_path, ("train-images-idx3-ubyte", "train-labels-idx1-ubyte"), images,
                 np.zeros(5, dtype=np.uint8), truncate=28 * 28)
    with pytest.raises(ValueError, match="truncated"):
        load_split("train", root=tmp_path)


def test_not_an_idx_file_and_count_mismatch_raise(tmp_path):
    (tmp_path / "train-images-idx3-ubyte").write_bytes(b"garbage!" * 10)
    _write_split(tmp_path, ("unused", "train-labels-idx1-ubyte"), np.zeros((1, 1)), np.zeros(3), gz=False)
    with pytest.raises(ValueError, match="IDX"):
        load_split("train", root=tmp_path)
    _write_split(tmp_path, ("train-images-idx3-ubyte", "train-labels-idx1-ubyte"),
                 np.zeros((2, 28, 28)), np.zeros(3), gz=False)
    with pytest.raises(ValueError):
        load_split("train", root=tmp_path)


# ------------------------------------------------------------------------------------------------
# synthetic data
# ------------------------------------------------------------------------------------------------
def test_synthetic_datamodule_shapes_and_determinism():
    cfg = dict(batch_size=5, resolution=8, channels=2, num_classes=3, num_train=40, val_size=7)
    dm = SyntheticDataModule(seed=4, **cfg)
    dm.setup()
    b1 = next(iter(dm.train_dataloader()))
    assert b1["image"].shape == (5, 2, 8, 8) and b1["image"].dtype == torch.float32
    assert float(b1["image"].min()) >= -1 and float(b1["image"].max()) <= 1
    assert b1["label"].shape == (5,) and b1["label"].dtype == torch.int64
    assert int(b1["label"].min()) >= 0 and int(b1["label"].max()) < 3
    assert len(dm.train_set) == 40 and len(dm.val_set) == 7
    val = list(dm.val_dataloader())
    assert sorted(k for b in val for k in b["__key__"]) == sorted(f"val/{i}" for i in range(7))

    dm2 = SyntheticDataModule(seed=4, **cfg)
    dm2.setup()
    b2 = next(iter(dm2.train_dataloader()))
    assert torch.equal(b1["image"], b2["image"]) and b1["__key__"] == b2["__key__"]

    dm3 = SyntheticDataModule(seed=5, **cfg)
    dm3.setup()
    # the data itself is fixed; the seed only changes the order
    assert torch.equal(dm3.train_set.images, dm.train_set.images)
    first3 = next(iter(dm3.train_dataloader()))["__key__"]
    stream1 = [k for b in islice(iter(dm.train_dataloader()), 8) for k in b["__key__"]]
    stream3 = [k for b in islice(iter(dm3.train_dataloader()), 8) for k in b["__key__"]]
    assert stream1 != stream3 and first3 == stream3[:5]


def test_synthetic_datamodule_rejects_wrong_config_shape():
    class Wrong(SyntheticDataModule):
        def load(self):
            tr_x, tr_y, va_x, va_y = super().load()
            return tr_x[:, :1], tr_y, va_x[:, :1], va_y

    with pytest.raises(ValueError):
        Wrong(channels=3).setup()


def test_fashion_mnist_three_channels_repeat_the_grayscale_image(fmnist_train):
    gray = FashionMNISTDataModule(batch_size=6, val_size=8)
    rgb = FashionMNISTDataModule(batch_size=6, val_size=8, channels=3)
    b1, b3 = (next(iter(dm.train_dataloader())) for dm in (gray, rgb))
    assert b3["image"].shape == (6, 3, 32, 32) and b3["image"].dtype == torch.float32
    assert b3["__key__"] == b1["__key__"] and torch.equal(b3["label"], b1["label"])  # same seeded stream
    for c in range(3):
        assert torch.equal(b3["image"][:, c:c + 1], b1["image"])
    v1, v3 = (next(iter(dm.val_dataloader()))["image"] for dm in (gray, rgb))
    assert v3.shape[1] == 3 and torch.equal(v3, v1.expand_as(v3))
    with pytest.raises(ValueError, match="channels=1 \\(or 3"):
        FashionMNISTDataModule(channels=2)
