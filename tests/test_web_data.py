"""Webdataset shards: exact split over ranks x workers, resampling, bad samples, training (resume:
test_stream_resume.py; aspect-ratio buckets: test_aspect_buckets.py; the tar reader and sample fields:
test_shard_reading.py)."""

from __future__ import annotations

import csv
import io
import itertools
import random
import tarfile
from collections import Counter
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from diffusion_train.data.bad_data import BadDataError
from diffusion_train.data.decode import SampleDecoder
from diffusion_train.data.stream import ShardStream, finish_batch
from diffusion_train.data.web import WebDataModule, expand_shards
from web_shards import as_reader, keys_of, make_shards, png_of, stream, write_shard


def test_exact_mode_covers_every_sample_once_per_epoch_over_2_ranks_x_2_workers(tmp_path, monkeypatch):
    pattern = make_shards(tmp_path, n_shards=8, per_shard=10)
    seen = []
    for rank, worker in itertools.product(range(2), range(2)):
        as_reader(monkeypatch, rank, 2, worker, 2)
        batches = list(itertools.islice(iter(stream(pattern, shuffle_buffer=4)), 8))  # 2 shards x 10 = 4 batches/epoch
        first_pass = keys_of(batches[:4])
        assert len(set(first_pass)) == len(first_pass) == 20, "no sample twice within a pass"
        seen.append(keys_of(batches))
    everything = [k for keys in seen for k in keys]
    counts = {k: everything.count(k) for k in set(everything)}
    assert len(counts) == 80 and set(counts.values()) == {2}, "2 epochs: every sample exactly twice"
    assert not set(seen[0]) & set(seen[1]), "readers never share a sample"


def test_exact_mode_without_shuffle_buffer_gives_exact_epochs(tmp_path, monkeypatch):
    pattern = make_shards(tmp_path, n_shards=4, per_shard=10)
    all_epoch = []
    for rank, worker in itertools.product(range(2), range(2)):
        as_reader(monkeypatch, rank, 2, worker, 2)
        all_epoch += keys_of(itertools.islice(iter(stream(pattern)), 2))  # 1 shard of 10 = 2 batches
    assert sorted(all_epoch) == [f"{k:06d}" for k in range(40)]


def test_a_loader_without_workers_reads_all_its_shards_whatever_the_environment(tmp_path, monkeypatch):
    """num_workers=0: the rank's one reader reads every shard of the rank, also where the environment has a
    NUM_WORKERS or WORKER variable of its own."""
    pattern = make_shards(tmp_path, n_shards=4, per_shard=5)
    monkeypatch.setenv("NUM_WORKERS", "4")
    monkeypatch.setenv("WORKER", "1")
    assert sorted(keys_of(itertools.islice(iter(stream(pattern, rank=0, world_size=1)), 4))) == \
        [f"{k:06d}" for k in range(20)]


def test_val_size_0_gives_no_validation(tmp_path):
    pattern = make_shards(tmp_path, n_shards=1, per_shard=6)
    dm = WebDataModule(pattern, resolution=8, channels=1, num_classes=10, batch_size=4, val_shards=pattern, val_size=0,
                       num_workers=0)
    dm.setup()
    assert dm.val_set is None and dm.val_dataloader() == []
    dm = WebDataModule(pattern, resolution=8, channels=1, num_classes=10, batch_size=4, val_shards=pattern, val_size=4,
                       num_workers=0)
    dm.setup()
    assert len(dm.val_set) == 4


def test_too_few_shards_for_the_readers_is_explained(tmp_path, monkeypatch):
    pattern = make_shards(tmp_path, n_shards=3, per_shard=5)
    as_reader(monkeypatch, 0, 2, 0, 2)
    with pytest.raises(ValueError, match=r"3 shards cannot be split exactly over 4 readers.*resampled=true"):
        next(iter(stream(pattern)))


def test_resampled_mixing_weights(tmp_path, monkeypatch):
    a = make_shards(tmp_path / "a", n_shards=4, per_shard=10, prefix="a")
    b = make_shards(tmp_path / "b", n_shards=4, per_shard=10, prefix="b")
    as_reader(monkeypatch, 0, 1, 0, 1)
    decoder = SampleDecoder(resolution=8, channels=1)
    s = ShardStream([(expand_shards(a), 3.0), (expand_shards(b), 1.0)], decoder, batch_size=10, resampled=True,
                    shuffle_buffer=1)
    assert len(next(iter(s))["__key__"]) == 10
    picks = [u for u, _ in itertools.islice(s._shard_order(random.Random(0)), 4000)]
    frac_a = sum("/a/" in u for u in picks) / len(picks)
    assert abs(frac_a - 0.75) < 4 * (0.75 * 0.25 / 4000) ** 0.5


def test_bad_samples_are_skipped_and_counted_by_reason(tmp_path, monkeypatch):
    good = [{"__key__": f"{k:06d}", "png": png_of(k), "cls": b"1"} for k in range(6)]
    bad = [{"__key__": "c00001", "png": b"not a png", "cls": b"1"},  # undecodable
           {"__key__": "c00002", "cls": b"1"},  # no image
           {"__key__": "c00003", "png": png_of(3), "cls": b"x"}]  # bad label
    write_shard(tmp_path / "s-000000.tar", good[:3] + bad)
    write_shard(tmp_path / "s-000001.tar", good[3:])
    with tarfile.open(tmp_path / "s-000001.tar") as tar:  # truncated inside the 3rd member's data
        cut = tar.getmembers()[2].offset_data + 10
    (tmp_path / "s-000001.tar").write_bytes((tmp_path / "s-000001.tar").read_bytes()[:cut])
    as_reader(monkeypatch, 0, 1, 0, 1)
    decoder = SampleDecoder(resolution=8, channels=1, caption_key=None)
    s = ShardStream([(expand_shards(str(tmp_path / "s-{000000..000001}.tar")), 1.0)], decoder, batch_size=2,
                    resampled=False, shuffle_buffer=1)
    batches = list(itertools.islice(iter(s), 3))
    keys = keys_of(batches)
    assert set(keys) <= {f"{k:06d}" for k in range(6)}, "only good samples reach the batches"
    assert {"000000", "000001", "000002"} <= set(keys)
    total = sum((Counter(b["__skipped__"]) for b in batches), Counter())
    assert total["undecodable_image"] >= 1 and total["missing_image"] >= 1 and total["bad_label"] >= 1
    assert total["unreadable_tar"] >= 1


def test_missing_shards_fail_at_start_naming_the_pattern(tmp_path):
    with pytest.raises(FileNotFoundError, match=r"shard pattern .*nope-\{000000\.\.000003\}\.tar.*4 of 4 paths"):
        expand_shards(str(tmp_path / "nope-{000000..000003}.tar"))
    with pytest.raises(FileNotFoundError, match=r"has no manifest.json"):
        expand_shards(str(tmp_path))
    from diffusion_train.data.shards import write_shards

    write_shards(({"__key__": f"{i:06d}", "cls": i} for i in range(6)), tmp_path / "set", "train", max_count=2)
    (tmp_path / "set" / "train-000001.tar").unlink()
    with pytest.raises(FileNotFoundError, match=r"^shard directory .*set: 1 of 3 shards its manifest lists do not "
                                                r"exist \(first: .*train-000001.tar\)"):
        expand_shards(str(tmp_path / "set"))


def test_too_many_bad_samples_stop_the_run_with_the_reason(tmp_path):
    pattern = make_shards(tmp_path, n_shards=2, per_shard=10)
    dm = WebDataModule(pattern, resolution=8, channels=1, batch_size=4, max_bad_fraction=0.1,
                       min_samples_for_bad_check=10, num_workers=0)
    batch = {"image": None, "__key__": ["a"] * 4, "__skipped__": {"undecodable_image": 1}}
    dm.on_before_batch_transfer(dict(batch), 0)
    dm.check_bad_data(dm.skip_counts, dm.samples_used)  # 1 of 5 read, before the check's minimum of 10
    with pytest.raises(BadDataError, match=r"^3 of 11 samples read were unusable \(\{'undecodable_image': 3\}\), "
                                           r"more than data.max_bad_fraction=0.1"):
        for _ in range(3):
            dm.on_before_batch_transfer({**batch, "__skipped__": {"undecodable_image": 2}}, 0)
            dm.check_bad_data(dm.skip_counts, dm.samples_used)
    with pytest.raises(BadDataError, match=r"^40 of 140 samples read"):  # the sums over the ranks, as given
        dm.check_bad_data({"undecodable_image": 40}, 100)
    dm.check_bad_data({"undecodable_image": 4, "filtered_punsafe": 36}, 100)  # filtered: read, not unusable


@pytest.fixture(scope="module")
def fmnist_shards(tmp_path_factory):
    """Shards of the first 200 Fashion-MNIST training and 24 test images, by make_shards.py."""
    import subprocess
    import sys

    out = tmp_path_factory.mktemp("fmnist_shards")
    script = Path(__file__).resolve().parent.parent / "scripts/make_shards.py"
    res = subprocess.run([sys.executable, str(script), "source=fashion_mnist", f"out={out}", "limit=200",
                          "max_count=50", "val_size=24"], capture_output=True, text=True, timeout=300)
    assert res.returncode == 0, res.stderr[-2000:]
    return out


def test_fashion_mnist_shards_decode_to_the_in_memory_images(fmnist_shards, monkeypatch):
    from conftest import compose_train
    from hydra.utils import instantiate

    as_reader(monkeypatch, 0, 1, 0, 1)
    cfg = compose_train(["data=fashion_mnist_shards", f"data.sources={fmnist_shards}", "data.val_size=24",
                         "data.resampled=false", "data.shuffle_buffer=1", "data.batch_size=50", "data.num_workers=0"])
    dm = instantiate(cfg.data, _convert_="all")
    assert len(dm.sources[0][0]) == 4 and dm.val_urls and all("val-" in u for u in dm.val_urls)
    batches = [finish_batch(b) for b in itertools.islice(iter(dm.train_stream()), 4)]
    reference = instantiate(compose_train(["data=fashion_mnist"]).data, _convert_="all")
    reference.setup()
    keys = keys_of(batches)
    assert sorted(keys) == [f"train_{i:06d}" for i in range(200)], "one exact pass over the 4 shards"
    idx = [int(k.split("_")[1]) for k in batches[0]["__key__"]]
    expected = reference.train_set[idx]
    assert torch.equal(batches[0]["image"], expected["image"]) and torch.equal(batches[0]["label"], expected["label"])
    dm.setup()
    assert len(dm.val_set) == 24
    assert torch.equal(finish_batch(dm.val_set[[0, 5]])["image"], reference.val_set[[0, 5]]["image"])


def test_the_default_model_trains_from_fashion_mnist_shards(fmnist_shards, tmp_path):
    from conftest import TINY, compose_train
    from diffusion_train.train import train

    overrides = [o for o in TINY if not o.startswith("data=")]
    cfg = compose_train(overrides + ["data=fashion_mnist_shards", f"data.sources={fmnist_shards}", "data.val_size=8",
                                     "data.batch_size=8", "data.num_workers=2", "data.shuffle_buffer=16"],
                        tmp_path / "run")
    trainer = train(cfg, tmp_path / "run")
    assert trainer.global_step == 4 and (tmp_path / "run/checkpoints/last.ckpt").is_file()
    assert trainer.lightning_module.backbone.in_channels == 1 and trainer.lightning_module.backbone.input_size == 32


def test_precomputed_latents_in_shards_train_a_latent_model(tmp_path):
    """Shards holding autoencoder moments (``latent.npy``) and no image train a latent model."""
    from conftest import TINY, compose_train
    from diffusion_train.train import train

    rng = np.random.default_rng(0)
    for s in range(2):
        samples = []
        for i in range(12):
            buf = io.BytesIO()
            np.save(buf, rng.standard_normal((8, 4, 4)).astype(np.float16))  # mean and logvar of 4x4x4 latents
            samples.append({"__key__": f"{s}_{i:04d}", "latent.npy": buf.getvalue(), "cls": str(i % 4).encode()})
        samples[5]["cls"] = b"7"  # a label outside the 4 classes: skipped and counted
        write_shard(tmp_path / f"train-{s:06d}.tar", samples)
    pattern = str(tmp_path / "train-{000000..000001}.tar")
    overrides = [o for o in TINY if not o.startswith("data=")] + [
        "data=webdataset", f"data.sources='{pattern}'", f"data.val_shards='{pattern}'", "data.val_size=8",
        "data.resolution=16", "data.num_classes=4", "data.batch_size=4", "data.num_workers=0", "data.shuffle_buffer=4",
        "data.tensors={latent:latent.npy}", "autoencoder=tiny_vae", "autoencoder.in_channels=3"]
    trainer = train(compose_train(overrides, tmp_path / "run"), tmp_path / "run")
    module = trainer.lightning_module
    assert trainer.global_step == 4 and (module.backbone.in_channels, module.backbone.input_size) == (4, 4)
    rows = list(csv.DictReader(open(tmp_path / "run/metrics.csv", newline="")))
    skipped = [float(r["data/skipped_bad_label"]) for r in rows if r.get("data/skipped_bad_label")]
    assert skipped and skipped[-1] >= 1 and skipped == sorted(skipped)  # a running count
    batch = next(iter(trainer.datamodule.train_stream()))
    assert "image" not in batch and batch["latent"].dtype == torch.float16  # stored dtype until on the device
    batch = finish_batch(batch)
    assert batch["latent"].dtype == torch.float32 and batch["latent"].shape == (4, 8, 4, 4)
    # 1 sample in 12 unusable is more than a bound of 1%: the run stops at a logging step (on every rank at once)
    strict = overrides + ["data.max_bad_fraction=0.01", "data.min_samples_for_bad_check=4"]
    with pytest.raises(BadDataError, match=r"^1 of \d+ samples read were unusable \(\{'bad_label': 1\}\)"):
        train(compose_train(strict, tmp_path / "strict"), tmp_path / "strict")


def test_augmentation_of_images_with_stored_latents_is_refused():
    """Training reads the stored latents: a flip or crop of the image would be silently lost."""
    with pytest.raises(ValueError, match=r"data.flip and data.random_crop would change the image but not the stored"):
        SampleDecoder(resolution=16, tensors={"latent": "latent.npy"}, flip=True, random_crop=True)
    SampleDecoder(resolution=16, tensors={"latent": "latent.npy"})


def test_a_stored_array_with_non_finite_values_is_skipped_as_bad():
    """A NaN latent member trained: its batch's loss was non-finite (a skipped step), and nothing was counted."""
    from diffusion_train.data.decode import Skip

    decode = SampleDecoder(resolution=16, tensors={"latent": "latent.npy"}, caption_key=None, label_key=None)

    def sample(value: float) -> dict:
        buf = io.BytesIO()
        np.save(buf, np.full((4, 2, 2), value, dtype=np.float32))
        return {"__key__": "a", "latent.npy": buf.getvalue()}

    assert isinstance(decode(sample(0.5)), dict)
    skipped = decode(sample(float("nan")))
    assert isinstance(skipped, Skip) and skipped == "bad_latent.npy" and "non-finite" in skipped.detail


def test_random_crops_of_a_side_that_rounds_up_stay_inside_the_image():
    """643 x 256/480 = 342.9 px resampled: an offset range computed from 343 put 1 crop in ~87 past the edge,
    and the good image was skipped as undecodable."""
    buf = io.BytesIO()
    Image.fromarray(np.random.default_rng(0).integers(0, 255, (480, 643, 3), dtype=np.uint8)).save(buf, format="PNG")
    decode = SampleDecoder(resolution=256, caption_key=None, label_key=None, random_crop=True,
                           metadata={"crop": "image:crop_top_left"})
    outs = [decode({"__key__": "a", "png": buf.getvalue()}, random.Random(seed)) for seed in range(300)]
    assert all(isinstance(o, dict) for o in outs), [o for o in outs if not isinstance(o, dict)][:1]
    lefts = {int(o["crop"][1]) for o in outs}
    assert min(lefts) == 0 and max(lefts) == 342 - 256


def test_random_crop_and_flip_keep_the_short_side_and_vary(tmp_path):
    wide = np.zeros((16, 48, 3), dtype=np.uint8)
    wide[:, :, 0] = np.arange(48, dtype=np.uint8)[None, :] * 5  # a horizontal ramp
    buf = io.BytesIO()
    Image.fromarray(wide).save(buf, format="PNG")
    sample = {"__key__": "a", "png": buf.getvalue(), "cls": b"0"}
    centre = SampleDecoder(resolution=16, caption_key=None)(sample, random.Random(0))["image"]
    assert torch.equal(centre[0, 0], torch.arange(16, 32, dtype=torch.uint8) * 5)  # the middle third
    rand = SampleDecoder(resolution=16, caption_key=None, random_crop=True)
    starts = {int(rand(sample, random.Random(seed))["image"][0, 0, 0]) // 5 for seed in range(20)}
    assert len(starts) > 5 and min(starts) >= 0 and max(starts) <= 32  # offsets across the whole width
    flip = SampleDecoder(resolution=16, caption_key=None, flip=True)
    flips = [bool(flip(sample, random.Random(seed))["image"][0, 0, 0] > 100) for seed in range(40)]
    assert 10 < sum(flips) < 30  # mirrored about half the time
    # the crop's left edge is that of the image as it comes out: mirrored with it (diffusers' SDXL script too)
    both = SampleDecoder(resolution=16, caption_key=None, random_crop=True, flip=True,
                         metadata={"crop": "image:crop_top_left"})
    mirrored = 0
    for seed in range(40):
        out = both(sample, random.Random(seed))
        row = out["image"][0, 0].long() // 5  # the source x of each pixel of the first row
        flipped = bool(row[0] > row[1])
        mirrored += flipped
        assert int(out["crop"][1]) == (47 - int(row[0]) if flipped else int(row[0])), seed
    assert 10 < mirrored < 30


def test_batches_from_workers_equal_batches_made_in_process(tmp_path, monkeypatch):
    """RGB images are stacked in channels-last memory (straight into shared memory in a worker), labels
    leave the worker as numpy; the data module hands the training step the same tensors either way."""
    rng = np.random.default_rng(0)
    samples = []
    for k in range(12):
        buf = io.BytesIO()
        Image.fromarray(rng.integers(0, 256, (96, 128, 3), dtype=np.uint8)).save(buf, format="PNG")
        samples.append({"__key__": f"{k:06d}", "png": buf.getvalue(), "cls": str(k % 5).encode()})
    write_shard(tmp_path / "rgb-000000.tar", samples)
    dm = WebDataModule(str(tmp_path / "rgb-000000.tar"), resolution=96, batch_size=4, num_workers=1,
                       resampled=False, shuffle_buffer=3, flip=True)
    from_worker = list(itertools.islice(iter(dm.train_dataloader()), 3))
    assert isinstance(from_worker[0]["label"], np.ndarray)
    as_reader(monkeypatch, 0, 1, 0, 1)
    in_process = list(itertools.islice(iter(dm.train_stream()), 3))
    from_worker = [dm.on_before_batch_transfer(b, 0) for b in from_worker]
    for a, b in zip(from_worker, in_process):
        assert a["__key__"] == b["__key__"] and isinstance(a["label"], torch.Tensor) and torch.equal(a["label"], b["label"])
        assert torch.equal(a["image"], b["image"]) and a["image"].shape == (4, 3, 96, 96)  # > SMALL_BYTES
        assert torch.equal(b["image"], torch.stack([img.contiguous() for img in b["image"]]))
        done = finish_batch(dict(a))["image"]
        assert done.is_contiguous() and torch.equal(done, a["image"].float() / 127.5 - 1)


def test_epoch_batches_end_epochs_that_continue_the_stream(tmp_path):
    pattern = make_shards(tmp_path / "shards", n_shards=4, per_shard=10)
    dm = WebDataModule(pattern, resolution=8, channels=1, batch_size=2, num_workers=2, shuffle_buffer=4,
                       epoch_batches=5)
    loader = dm.train_dataloader()
    assert len(loader) == 5
    epochs = [[tuple(b["__key__"]) for b in loader] for _ in range(3)]
    assert [len(e) for e in epochs] == [5, 5, 5]
    assert epochs[0] != epochs[1] != epochs[2], "each epoch continues the stream: no replay"
    with pytest.raises(ValueError, match="epoch_batches=5.*resampled=true"):
        WebDataModule(pattern, resolution=8, channels=1, resampled=False, epoch_batches=5).train_stream()


def test_training_counts_epochs_of_epoch_batches(tmp_path):
    from conftest import TINY, compose_train
    from diffusion_train.train import train

    pattern = make_shards(tmp_path / "shards", n_shards=4, per_shard=10)
    overrides = [o for o in TINY if not o.startswith("data=")] + [
        "data=webdataset", f"data.sources='{pattern}'", "data.resolution=8", "data.channels=1", "data.num_classes=10",
        "data.batch_size=4", "data.num_workers=2", "data.shuffle_buffer=4", "data.epoch_batches=3",
        "trainer.max_steps=6", "trainer.val_check_interval=100"]
    trainer = train(compose_train(overrides, tmp_path / "run"), tmp_path / "run")
    assert trainer.global_step == 6 and trainer.current_epoch == 2  # two epochs of 3 (an endless one: 1)


@pytest.mark.slow
def test_bench_data_script_measures_both_modes(tmp_path):
    import subprocess
    import sys

    root = Path(__file__).resolve().parent.parent
    args = ["mode=all", "images=40", "latents=200", "per_shard=20", "batch_size=8", "resolution=64", "seconds=0.3",
            "warmup=1", "workers=1", "shuffle_buffer=8", "short_side=80", f"dir={tmp_path}"]
    out = subprocess.run([sys.executable, str(root / "scripts/bench_data.py"), *args], capture_output=True, text=True,
                         timeout=300, cwd=tmp_path)
    assert out.returncode == 0, out.stderr[-2000:]
    lines = [line for line in out.stdout.splitlines() if "samples/s" in line]
    assert [line.split()[:2] for line in lines] == [["jpeg", "workers=0"], ["jpeg", "workers=1"],
                                                    ["latent", "workers=0"], ["latent", "workers=1"]]
    assert "resized to short side 80" in out.stdout
    bad = subprocess.run([sys.executable, str(root / "scripts/bench_data.py"), "mode=nope"], capture_output=True,
                         text=True, timeout=120, cwd=tmp_path)
    assert bad.returncode == 1 and bad.stderr.strip() == "error: mode=nope: valid: jpeg, latent, all"


