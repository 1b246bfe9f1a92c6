"""Aspect-ratio buckets of webdataset images: the bucket set, batches of one shape each, exact resume with samples
waiting in partly filled groups, and a DiT trained on them."""

from __future__ import annotations

import io
import itertools
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from diffusion_train.data.decode import SampleDecoder, aspect_buckets
from diffusion_train.data.web import WebDataModule
from web_shards import as_reader, loader_batches, positions_after, stream, write_shard


def _image(value: int, height: int, width: int) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(np.full((height, width), value % 256, dtype=np.uint8)).save(buf, format="PNG")
    return buf.getvalue()


SHAPES = [(16, 32), (32, 16), (24, 24), (20, 44), (30, 28)]


def make_mixed_aspect_shards(root: Path, n_shards: int, per_shard: int) -> str:
    root.mkdir(parents=True, exist_ok=True)
    for s in range(n_shards):
        write_shard(root / f"train-{s:06d}.tar",
                    [{"__key__": f"{k:06d}", "png": _image(k, *SHAPES[k % len(SHAPES)]), "cls": b"0"}
                     for k in range(s * per_shard, (s + 1) * per_shard)])
    return str(root / f"train-{{000000..{n_shards - 1:06d}}}.tar")


def test_aspect_buckets_keep_the_area_and_step():
    buckets = aspect_buckets(256, step=64, max_aspect=2.0)
    assert (256, 256) in buckets and (192, 320) in buckets and (320, 192) in buckets
    assert all(h % 64 == 0 and w % 64 == 0 and h * w <= 256 * 256 and max(h / w, w / h) <= 2 for h, w in buckets)
    with pytest.raises(ValueError, match="resolution=250 is not a multiple of data.bucket_step=64"):
        aspect_buckets(250, step=64)


def test_bucketed_batches_hold_one_shape_each_closest_to_the_images_aspect(tmp_path, monkeypatch):
    pattern = make_mixed_aspect_shards(tmp_path, n_shards=2, per_shard=30)
    as_reader(monkeypatch, 0, 1, 0, 1)
    decoder = SampleDecoder(resolution=16, channels=1, caption_key=None, buckets=[(8, 16), (16, 8), (16, 16)],
                            metadata={"size": "image:original_size", "crop": "image:crop_top_left"})
    batches = list(itertools.islice(iter(stream(pattern, decoder=decoder)), 10))
    expected = {0: (8, 16), 1: (16, 8), 2: (16, 16), 3: (8, 16), 4: (16, 16)}  # from the aspects of SHAPES
    for batch in batches:
        shapes = {expected[int(k) % len(SHAPES)] for k in batch["__key__"]}
        assert shapes == {tuple(batch["image"].shape[-2:])}
        originals = {SHAPES[int(k) % len(SHAPES)] for k in batch["__key__"]}
        assert {tuple(map(int, s)) for s in batch["size"]} <= originals
    first = next(b for b in batches if "000003" in b["__key__"])  # 20x44 resized to 8x17.6 -> 8x18: crop at 1
    assert first["crop"][first["__key__"].index("000003")].tolist() == [0, 1]


def test_bucketed_exact_resume_refetches_the_samples_waiting_in_groups(tmp_path, monkeypatch):
    pattern = make_mixed_aspect_shards(tmp_path, n_shards=4, per_shard=30)
    buckets = dict(resolution=16, channels=1, caption_key="txt", buckets=[(8, 16), (16, 8), (16, 16)], flip=True)
    kw = dict(shuffle_buffer=9, decoder=SampleDecoder(**{**buckets, "caption_key": None}))
    full = loader_batches(pattern, monkeypatch, 0, 20, **kw)
    for start in (5, 13):
        positions = positions_after(full[:start])
        assert any(p["pending"] for p in positions.values()), "samples were waiting in partly filled groups"
        resumed = loader_batches(pattern, monkeypatch, start, 20 - start, positions=positions, **kw)
        assert [b["__key__"] for b in resumed] == [b["__key__"] for b in full[start:]], start
        assert all(torch.equal(a["image"], b["image"]) for a, b in zip(resumed, full[start:])), "same flips"


def test_a_rare_shape_waiting_over_several_passes_resumes_with_each_pass_s_copy(tmp_path, monkeypatch):
    """One wide image among 10 in the only shard: its group of 5 fills over 5 passes, so a resume finds several
    copies of it waiting, one from each pass, each flipped (or not) by its own pass's draw. Each is read back as
    it was, and the batches go on as without the resume."""
    gradient = np.tile(np.arange(0, 256, 8, dtype=np.uint8), (16, 1))  # 16 x 32: mirroring changes it
    square = [_image(k, 16, 16) for k in range(10)]
    buf = io.BytesIO()
    Image.fromarray(gradient).save(buf, format="PNG")
    write_shard(tmp_path / "train-000000.tar", [{"__key__": f"{k:06d}", "png": buf.getvalue() if k == 3 else
                                                 square[k], "cls": b"0"} for k in range(10)])
    pattern = str(tmp_path / "train-000000.tar")
    kw = dict(workers=1, decoder=SampleDecoder(resolution=16, channels=1, caption_key=None, flip=True,
                                                buckets=[(8, 16), (16, 16)]))
    full = loader_batches(pattern, monkeypatch, 0, 12, **kw)
    wide = [b for b in full if b["image"].shape[-1] == 16 and b["image"].shape[-2] == 8]
    assert len(wide) == 1 and len({b.flatten().tolist()[0] for b in wide[0]["image"]}) == 2, "copies flip apart"
    waited = 0
    for start in range(1, 10):
        positions = positions_after(full[:start])
        waited = max(waited, sum(key == "000003" for _, key, _, _ in positions[0]["pending"]))
        resumed = loader_batches(pattern, monkeypatch, start, 12 - start, positions=positions, **kw)
        assert [b["__key__"] for b in resumed] == [b["__key__"] for b in full[start:]], start
        assert all(torch.equal(a["image"], b["image"]) for a, b in zip(resumed, full[start:])), start
    assert waited >= 3


def test_a_dit_trains_on_aspect_ratio_buckets(tmp_path, monkeypatch):
    from conftest import TINY, compose_train
    from diffusion_train.train import train

    pattern = make_mixed_aspect_shards(tmp_path / "shards", n_shards=2, per_shard=30)
    overrides = [o for o in TINY if not o.startswith(("data=", "model="))] + [
        "model=dit_tiny", "data=webdataset", f"data.sources='{pattern}'", f"data.val_shards='{pattern}'",
        "data.val_size=4", "data.resolution=16", "data.channels=1", "data.batch_size=4", "data.num_workers=0",
        "data.shuffle_buffer=4", "data.buckets=[[8,16],[16,8],[16,16]]", "trainer.max_steps=6",
        "trainer.val_check_interval=100"]
    shapes = []
    original = WebDataModule.on_after_batch_transfer

    def record_shape(self, batch, i):
        shapes.append(tuple(batch["image"].shape[-2:]))
        return original(self, batch, i)

    monkeypatch.setattr(WebDataModule, "on_after_batch_transfer", record_shape)
    trainer = train(compose_train(overrides, tmp_path / "run"), tmp_path / "run")
    assert trainer.global_step == 6 and len(set(shapes)) >= 2 and set(shapes) <= {(8, 16), (16, 8), (16, 16)}, shapes
