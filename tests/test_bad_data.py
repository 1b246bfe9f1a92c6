"""Bad input in webdataset shards: corrupt or empty tars, JSON of unexpected types, labels out of range and
keys shared by sources are skipped, counted and logged; a reader without a usable sample stops the run
instead of hanging it; filters are not bad data; pad mode decodes like crop mode."""

from __future__ import annotations

import gzip
import io
import itertools
import json
import logging
import math
import re
import tarfile
from collections import Counter
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from web_shards import as_reader, keys_of, make_shards, png_of, stream, write_shard
from torch.utils.data import DataLoader

from diffusion_train.data.bad_data import LOGGED_PER_REASON, BadDataError
from diffusion_train.data.decode import SampleDecoder
from diffusion_train.data.stream import ShardStream, unchanged
from diffusion_train.data.tar_io import tar_samples
from diffusion_train.data.web import WebDataModule, expand_shards

HTML = b"<html><head><title>403 Forbidden</title></head><body>AccessDenied</body></html>\n" * 20


def samples(n: int, start: int = 0, **members: bytes) -> list[dict]:
    return [{"__key__": f"{k:06d}", "png": png_of(k), "cls": str(k % 10).encode(), "txt": b"a", **members}
            for k in range(start, start + n)]


def skipped_in(batches) -> Counter:
    return sum((Counter(b["__skipped__"]) for b in batches), Counter())


# ----------------------------------------------------------------------------------------------
# a reader without a usable sample


def _cut_in_first_header(path: Path) -> None:
    path.write_bytes(path.read_bytes()[:300])


@pytest.mark.timeout(60)  # the old behaviour: reading on forever
@pytest.mark.parametrize("case", ["empty_file", "empty_archive", "cut_in_first_header", "html"])
def test_an_exact_mode_reader_whose_shards_give_nothing_stops_naming_them(tmp_path, monkeypatch, case):
    write_shard(tmp_path / "train-000000.tar", samples(10))
    bad = tmp_path / "train-000001.tar"
    write_shard(bad, samples(10, start=10) if case == "cut_in_first_header" else [])
    if case == "empty_file":
        bad.write_bytes(b"")
    elif case == "cut_in_first_header":
        _cut_in_first_header(bad)
    elif case == "html":
        bad.write_bytes(HTML)
    pattern = str(tmp_path / "train-{000000..000001}.tar")
    as_reader(monkeypatch, 0, 1, 0, 2)
    assert len(keys_of(itertools.islice(iter(stream(pattern)), 4))) == 20, "reader 0 reads its good shard"
    as_reader(monkeypatch, 0, 1, 1, 2)
    with pytest.raises(BadDataError, match=r"^data reader 1 of 2 \(rank 0\) has no usable sample: a whole pass "
                                           rf"over its shards gave none \(1 shard: {re.escape(str(bad))}\); "
                                           r"skipped since its last batch: \{'unreadable_tar': 1\}"):
        next(iter(stream(pattern)))


@pytest.mark.timeout(60)
def test_a_resampled_reader_without_labels_stops_instead_of_hanging(tmp_path, monkeypatch):
    """Caption-only shards with the default label_key=cls: every sample is missing_label."""
    for s in range(2):
        write_shard(tmp_path / f"train-{s:06d}.tar", [{"__key__": f"{s}{i:05d}", "png": png_of(i), "txt": b"a photo"}
                                                      for i in range(30)])
    as_reader(monkeypatch, 0, 1, 0, 1)
    dm = WebDataModule(str(tmp_path / "train-{000000..000001}.tar"), resolution=8, channels=1, batch_size=4,
                       num_workers=0, caption_key="txt", shuffle_buffer=10)
    with pytest.raises(BadDataError, match=r"has no usable sample: every shard was read and the last 1000 samples "
                                           r"were unusable \(2 shards: .*train-000000.tar, .*train-000001.tar\); "
                                           r"skipped since its last batch: \{'missing_label': 1000\}"):
        next(iter(dm.train_dataloader()))


@pytest.mark.timeout(60)
def test_a_resampled_reader_whose_shards_are_all_unreadable_stops(tmp_path, monkeypatch):
    for s in range(3):
        (tmp_path / f"train-{s:06d}.tar").write_bytes(HTML if s else b"")
    as_reader(monkeypatch, 0, 1, 0, 1)
    with pytest.raises(BadDataError, match=r"every shard was read and none gave a sample \(3 shards: .*"
                                           r"'unreadable_tar': \d+"):
        next(iter(stream(str(tmp_path / "train-{000000..000002}.tar"), resampled=True)))


@pytest.mark.timeout(60)
def test_a_reader_error_in_a_dataloader_worker_reaches_the_main_process_as_one_line(tmp_path):
    write_shard(tmp_path / "train-000000.tar", samples(20))
    (tmp_path / "train-000001.tar").write_bytes(b"")  # an interrupted copy
    dm = WebDataModule(str(tmp_path / "train-{000000..000001}.tar"), resolution=8, channels=1, num_classes=10,
                       batch_size=4, num_workers=2, resampled=False, shuffle_buffer=4)
    loader = DataLoader(dm.train_stream(), batch_size=None, collate_fn=unchanged, num_workers=2,
                        timeout=30)  # a reader that never yields fails the test instead of hanging it
    batches = iter(loader)
    with pytest.raises(BadDataError) as error:
        for _ in range(10):
            next(batches)
    message = str(error.value)
    batches._shutdown_workers()  # now, rather than when the garbage collector finds the traceback's frames
    assert "\n" not in message and message.startswith("data reader 1 of 2 (rank 0) has no usable sample")
    assert str(tmp_path / "train-000001.tar") in message


def test_a_reader_whose_usable_samples_are_fewer_than_a_batch_per_pass_still_makes_batches(tmp_path, monkeypatch):
    good = samples(3)
    bad = [{"__key__": f"b{k:05d}", "png": b"not a png", "cls": b"0", "txt": b"a"} for k in range(20)]
    write_shard(tmp_path / "train-000000.tar", good + bad)
    as_reader(monkeypatch, 0, 1, 0, 1)
    batches = list(itertools.islice(iter(stream(str(tmp_path / "train-000000.tar"), batch_size=5)), 3))
    assert sorted(Counter(keys_of(batches)).values()) == [5, 5, 5]  # 3 good samples a pass, 5 passes
    assert skipped_in(batches)["undecodable_image"] >= 60


# ----------------------------------------------------------------------------------------------
# corrupt tars


def _with_bad_size_field(path: Path, member: int) -> None:
    """Non-octal bytes in the size field of the member-th header, with a valid checksum."""
    with tarfile.open(path) as tar:
        offset = tar.getmembers()[member].offset
    data = bytearray(path.read_bytes())
    header = data[offset:offset + 512]
    header[124:136] = b"zz\x00zzzzzzzz\x00"
    header[148:156] = b" " * 8
    header[148:156] = b"%06o\x00 " % sum(header)
    data[offset:offset + 512] = header
    path.write_bytes(bytes(data))


def _corrupt_gzip(path: Path) -> Path:
    rng = np.random.default_rng(0)
    write_shard(path, [{"__key__": f"{k:06d}", "bin": rng.integers(0, 4, 4000, dtype=np.uint8).tobytes()}
                       for k in range(6)])
    data = bytearray(gzip.compress(path.read_bytes()))
    for i in range(len(data) // 2, len(data) // 2 + 8):
        data[i] ^= 0x5A
    out = path.with_suffix(".tar.gz")
    out.write_bytes(bytes(data))
    return out


@pytest.mark.parametrize("case", ["html", "bad_checksum_field", "bad_size_field", "corrupt_gzip", "empty_file",
                                  "empty_archive", "cut_at_a_member"])
def test_corrupt_or_empty_tars_are_counted_and_logged_not_raised(tmp_path, caplog, case):
    path = tmp_path / "s.tar"
    write_shard(path, samples(3) if case not in ("empty_archive", "corrupt_gzip") else [])
    if case == "html":
        path.write_bytes(HTML)
    elif case == "bad_checksum_field":
        data = bytearray(path.read_bytes())
        data[148:156] = b"<body>\x00 "
        path.write_bytes(bytes(data))
    elif case == "bad_size_field":
        _with_bad_size_field(path, member=4)  # the first member of the third sample
    elif case == "corrupt_gzip":
        path = _corrupt_gzip(path)
    elif case == "empty_file":
        path.write_bytes(b"")
    elif case == "cut_at_a_member":  # before the last member's header: no partial data, no end-of-archive marker
        with tarfile.open(path) as tar:
            path.write_bytes(path.read_bytes()[:tar.getmembers()[-1].offset])
    skipped = Counter()
    with caplog.at_level(logging.WARNING, logger="diffusion_train.data.tar_io"):
        got = [s["__key__"] for s in tar_samples(str(path), skipped)]
        again = [s["__key__"] for s in tar_samples(str(path), skipped)]  # a resampled stream draws it again
    assert skipped == {"unreadable_tar": 2} and again == got
    warnings = [r.getMessage() for r in caplog.records if str(path) in r.getMessage()]
    assert len(warnings) == 1, "the warning names the shard, once"
    if case == "bad_size_field":
        assert got == ["000000"], "the samples before the damage are kept"
    if case == "cut_at_a_member":
        assert got == ["000000", "000001"], "the cut sample is dropped"


def test_a_resampled_stream_skips_a_non_tar_shard(tmp_path, monkeypatch):
    write_shard(tmp_path / "train-000000.tar", samples(10))
    (tmp_path / "train-000001.tar").write_bytes(HTML)
    as_reader(monkeypatch, 0, 1, 0, 1)
    batches = list(itertools.islice(iter(stream(str(tmp_path / "train-{000000..000001}.tar"), resampled=True)), 20))
    assert len(batches) == 20 and skipped_in(batches)["unreadable_tar"] >= 1


# ----------------------------------------------------------------------------------------------
# JSON, captions and labels of unexpected types


def _raw(key: str = "000000", **members) -> dict:
    return {"__key__": key, "__url__": "s.tar", "png": png_of(1), "cls": b"0", **members}


@pytest.mark.parametrize("meta, kw, reason", [
    ({"punsafe": "n/a"}, dict(max_scores={"punsafe": 0.5}), "bad_punsafe"),
    ({"punsafe": [0.1]}, dict(max_scores={"punsafe": 0.5}), "bad_punsafe"),
    ({"punsafe": math.nan}, dict(max_scores={"punsafe": 0.5}), "bad_punsafe"),
    ({"punsafe": True}, dict(max_scores={"punsafe": 0.5}), "filtered_punsafe"),  # a flag: 1
    ({"punsafe": 0.9}, dict(max_scores={"punsafe": 0.5}), "filtered_punsafe"),
    ([1, 2], dict(max_scores={"punsafe": 0.5}), "bad_json"),
    ("a string", dict(caption_key="json:caption"), "bad_json"),
    ({"caption": 5}, dict(caption_key="json:caption", max_caption_length=100), "bad_caption"),
    ({"caption": ["a", "b"]}, dict(caption_key="json:caption"), "bad_caption"),
    ({"caption": None}, dict(caption_key="json:caption"), "missing_caption"),
    ({"aesthetic": "high"}, dict(metadata={"a": "aesthetic"}), "bad_aesthetic"),
    ({"aesthetic": {"v": 1}}, dict(metadata={"a": "aesthetic"}), "bad_aesthetic"),
    ({"aesthetic": None}, dict(metadata={"a": "aesthetic"}), "missing_aesthetic"),
    ({"aesthetic": math.nan}, dict(metadata={"a": "aesthetic"}), "bad_aesthetic"),  # JSON's NaN parses
    ({"aesthetic": [1.0, math.inf]}, dict(metadata={"a": "aesthetic"}), "bad_aesthetic"),
])
def test_json_of_unexpected_types_is_a_skip_reason(meta, kw, reason):
    decoder = SampleDecoder(resolution=8, channels=1, **{"caption_key": None, **kw})
    out = decoder(_raw(json=json.dumps(meta).encode()))
    assert out == reason
    if reason.startswith("bad_"):
        assert out.detail, "the reason says what was wrong"


def test_min_image_size_filters_on_the_original_short_side():
    """An 8x8 stored copy of a 400x600 original passes min_image_size=300; without the json's original size, or
    with an original whose short side is smaller, it is filtered."""
    decoder = SampleDecoder(resolution=8, channels=1, caption_key=None, min_image_size=300)
    resized = {"original_height": 400, "original_width": 600}
    assert decoder(_raw(json=json.dumps(resized).encode()))["image"].shape == (1, 8, 8)
    assert decoder(_raw()) == "filtered_image_size"
    assert decoder(_raw(json=json.dumps({"original_height": 200, "original_width": 600}).encode())) == \
        "filtered_image_size"


def test_json_captions_are_stripped_strings():
    decoder = SampleDecoder(resolution=8, channels=1, caption_key="json:caption")
    assert decoder(_raw(json=json.dumps({"caption": "  a cat \n"}).encode()))["caption"] == "a cat"


def test_a_json_glitch_in_a_shard_skips_one_sample_in_a_dataloader_worker(tmp_path):
    metas = [{"punsafe": 0.1} if k != 7 else {"punsafe": "NaN?"} for k in range(20)]
    write_shard(tmp_path / "train-000000.tar", [{**s, "json": json.dumps(m).encode()}
                                                for s, m in zip(samples(20), metas)])
    dm = WebDataModule(str(tmp_path / "train-000000.tar"), resolution=8, channels=1, num_classes=10, batch_size=4,
                       num_workers=1, resampled=False, shuffle_buffer=1, max_scores={"punsafe": 0.5})
    batches = [dm.on_before_batch_transfer(b, 0) for b in itertools.islice(iter(dm.train_dataloader()), 10)]
    assert len(batches) == 10 and "000007" not in keys_of(batches[:4])
    assert dm.skip_counts["bad_punsafe"] >= 1


def test_labels_outside_num_classes_are_skipped(tmp_path, monkeypatch):
    labels = [b"-1", b"0", b"9", b"10", b"11", b"x", b"3"]
    write_shard(tmp_path / "train-000000.tar", [{"__key__": f"{k:06d}", "png": png_of(k), "cls": c}
                                                for k, c in enumerate(labels)])
    as_reader(monkeypatch, 0, 1, 0, 1)
    dm = WebDataModule(str(tmp_path / "train-000000.tar"), resolution=8, channels=1, num_classes=10, batch_size=3,
                       num_workers=0, resampled=False, shuffle_buffer=1)
    batch = next(iter(dm.train_stream()))
    assert sorted(batch["label"].tolist()) == [0, 3, 9]  # 10 would be the guidance null class
    assert batch["__skipped__"] == {"bad_label": 4}
    assert SampleDecoder(resolution=8, channels=1, caption_key=None, num_classes=10)(_raw(cls=b"10")).detail == \
        "label 10 is outside [0, num_classes=10)"


# ----------------------------------------------------------------------------------------------
# several sources, filters, logging


def test_exact_mode_keeps_samples_of_sources_that_use_the_same_keys(tmp_path, monkeypatch):
    a = make_shards(tmp_path / "a", n_shards=2, per_shard=10, prefix="a")  # keys 000000..000019
    b = make_shards(tmp_path / "b", n_shards=2, per_shard=10, prefix="b")  # the same keys
    (tmp_path / "c").mkdir()
    write_shard(tmp_path / "c" / "c-000000.tar", samples(5))
    write_shard(tmp_path / "c" / "c-000001.tar", samples(5))  # a copy within one source: duplicates
    as_reader(monkeypatch, 0, 1, 0, 1)
    decoder = SampleDecoder(resolution=8, channels=1, caption_key="txt")
    s = ShardStream([(expand_shards(a), 1.0), (expand_shards(b), 1.0)], decoder, batch_size=5, resampled=False,
                    shuffle_buffer=1)
    first_pass = list(itertools.islice(iter(s), 8))
    assert {b["__position__"]["pass"] for b in first_pass} == {0}
    assert set(Counter(keys_of(first_pass)).values()) == {2} and len(set(keys_of(first_pass))) == 20
    assert "duplicate_key" not in skipped_in(first_pass)
    decoder = SampleDecoder(resolution=8, channels=1, caption_key=None)
    s = ShardStream([(expand_shards(str(tmp_path / "c" / "c-{000000..000001}.tar")), 1.0)], decoder, batch_size=5,
                    resampled=False, shuffle_buffer=1)
    batches = list(itertools.islice(iter(s), 2))
    assert skipped_in(batches)["duplicate_key"] == 5


def _filter_shards(root: Path) -> str:
    """40 samples: 12 with punsafe 0.9 (filtered at 0.5), 4 corrupt images, 24 good."""
    shard = []
    for s in samples(40):
        k = int(s["__key__"])
        s["json"] = json.dumps({"punsafe": 0.9 if k % 10 < 3 else 0.1}).encode()
        if k % 10 == 5:
            s["png"] = b"not a png"
        shard.append(s)
    root.mkdir(parents=True, exist_ok=True)
    write_shard(root / "train-000000.tar", shard)
    return str(root / "train-000000.tar")


def test_filtered_samples_do_not_count_as_bad_data(tmp_path):
    dm = WebDataModule(_filter_shards(tmp_path), resolution=8, channels=1, num_classes=10, batch_size=4,
                       num_workers=0, resampled=False, shuffle_buffer=1, max_scores={"punsafe": 0.5},
                       max_bad_fraction=0.15, min_samples_for_bad_check=20)
    for batch in itertools.islice(iter(dm.train_dataloader()), 12):  # two passes: 10 % corrupt, 30 % filtered
        dm.on_before_batch_transfer(batch, 0)
        dm.check_bad_data(dm.skip_counts, dm.samples_used)
    assert dm.skip_counts["filtered_punsafe"] >= 20 and dm.skip_counts["undecodable_image"] >= 6
    dm = WebDataModule(_filter_shards(tmp_path), resolution=8, channels=1, num_classes=10, batch_size=4,
                       num_workers=0, resampled=False, shuffle_buffer=1, max_scores={"punsafe": 0.5},
                       max_bad_fraction=0.05, min_samples_for_bad_check=20)
    with pytest.raises(BadDataError, match=r"samples read were unusable \(\{'undecodable_image': \d+\}\), more than"):
        for batch in itertools.islice(iter(dm.train_dataloader()), 12):
            dm.on_before_batch_transfer(batch, 0)
            dm.check_bad_data(dm.skip_counts, dm.samples_used)


def test_bad_samples_are_named_in_the_log_a_few_per_reason(tmp_path, monkeypatch, caplog):
    shard = samples(20)
    for k in range(3, 13, 2):
        shard[k]["png"] = b"not a png"
    del shard[4]["png"]
    write_shard(tmp_path / "train-000000.tar", shard)
    as_reader(monkeypatch, 0, 1, 0, 1)
    with caplog.at_level(logging.WARNING, logger="diffusion_train.data.bad_data"):
        batches = list(itertools.islice(iter(stream(str(tmp_path / "train-000000.tar"))), 2))
    assert skipped_in(batches) == {"undecodable_image": 5, "missing_image": 1}
    lines = [r.getMessage() for r in caplog.records]
    undecodable = [line for line in lines if "undecodable_image" in line]
    assert len(undecodable) == LOGGED_PER_REASON < 5
    shard_path = tmp_path / "train-000000.tar"
    assert undecodable[0].startswith(f"data reader 0 of 1 (rank 0): skipped sample 000003 of shard {shard_path}: "
                                     f"undecodable_image (UnidentifiedImageError: cannot identify image file")
    assert "(more undecodable_image samples are only counted)" in undecodable[-1]
    assert [line for line in lines if "missing_image" in line] == [
        f"data reader 0 of 1 (rank 0): skipped sample 000004 of shard {shard_path}: missing_image"]


# ----------------------------------------------------------------------------------------------
# pad mode


def _encoded(image: Image.Image, fmt: str = "PNG", **kw) -> bytes:
    buf = io.BytesIO()
    image.save(buf, format=fmt, **kw)
    return buf.getvalue()


def test_pad_mode_reports_the_original_size(tmp_path, monkeypatch):
    write_shard(tmp_path / "train-000000.tar", [{"__key__": f"{k:06d}", "png": _encoded(
        Image.fromarray(np.full((28, 20), 100 + k, np.uint8))), "cls": b"0"} for k in range(4)])
    as_reader(monkeypatch, 0, 1, 0, 1)
    for resize in ("pad", "crop"):
        decoder = SampleDecoder(resolution=32, channels=1, caption_key=None, resize=resize,
                                metadata={"size": "image:original_size", "crop": "image:crop_top_left"})
        batch = next(iter(stream(str(tmp_path / "train-000000.tar"), decoder=decoder, batch_size=4)))
        assert batch["size"].tolist() == [[28, 20]] * 4, resize
        assert batch["image"].shape == (4, 1, 32, 32)
    assert batch["crop"].tolist() == [[6, 0]] * 4  # crop: 28x20 covers 32x32 as 44.8x32


def test_pad_mode_decodes_like_crop_mode(tmp_path, monkeypatch):
    """16-bit grayscale, transparency and EXIF rotation: an image at the training size comes out of pad
    mode as out of crop mode (which only crops it)."""
    gradient = (np.arange(256, dtype=np.uint16).reshape(16, 16) * 257)
    sixteen = _encoded(Image.fromarray(gradient))
    rgba = np.zeros((16, 16, 4), np.uint8)
    rgba[:8] = (255, 0, 0, 255)  # the rest is transparent black: white once flattened
    transparent = _encoded(Image.fromarray(rgba, "RGBA"))
    stored = np.zeros((16, 16, 3), np.uint8)
    stored[:, :4] = 255  # a white band on the left, shown at the top or bottom after rotation
    img = Image.fromarray(stored)
    exif = img.getexif()
    exif[0x0112] = 6
    rotated = _encoded(img, "JPEG", exif=exif.tobytes(), quality=100)
    write_shard(tmp_path / "train-000000.tar", [{"__key__": f"{k:06d}", "png" if k < 2 else "jpg": data, "cls": b"0"}
                                                for k, data in enumerate([sixteen, transparent, rotated])])
    as_reader(monkeypatch, 0, 1, 0, 1)
    out = {}
    for resize in ("pad", "crop"):
        decoder = SampleDecoder(resolution=16, channels=3, caption_key=None, resize=resize)
        batch = next(iter(stream(str(tmp_path / "train-000000.tar"), decoder=decoder, batch_size=3)))
        out[resize] = dict(zip(batch["__key__"], batch["image"]))
    for key in out["crop"]:
        assert torch.equal(out["pad"][key], out["crop"][key]), key
    pad = out["pad"]
    assert pad["000000"][0, 0, 1].item() == 1 and pad["000000"][0, 15, 15].item() == 255, "16 bits scaled to 8"
    assert pad["000001"][:, 15, 0].tolist() == [255, 255, 255], "transparent pixels on white"
    assert pad["000002"][0, :4].float().mean() > 200 and pad["000002"][0, 4:].float().mean() < 50, "rotated"


def test_a_resumed_reader_with_bad_samples_continues_the_same_batches(tmp_path, monkeypatch):
    """The samples skipped before a restart are not decoded again and do not stop the resumed reader."""
    shard = samples(20)
    for k in range(0, 20, 3):
        shard[k]["png"] = b"not a png"
    write_shard(tmp_path / "train-000000.tar", shard)
    write_shard(tmp_path / "train-000001.tar", samples(20, start=20))
    pattern = str(tmp_path / "train-{000000..000001}.tar")
    as_reader(monkeypatch, 0, 1, 0, 1)
    full = list(itertools.islice(iter(stream(pattern, shuffle_buffer=5)), 12))
    positions = {0: full[3]["__position__"]}
    resumed = list(itertools.islice(iter(stream(pattern, shuffle_buffer=5, start_batch=4, positions=positions)), 8))
    assert keys_of(resumed) == keys_of(full[4:12])
