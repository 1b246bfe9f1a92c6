"""Webdataset shards: the writer (diffusion_train.data.shards), scripts/make_shards.py on real image
folders, Fashion-MNIST and CSV/JSONL lists (read back with tarfile and webdataset), and the command lines of
make_shards.py and inspect_shards.py (the checker itself: test_inspect_shards.py)."""

from __future__ import annotations

import io
import json
import random
import subprocess
import sys
import tarfile
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from conftest import load_script
from diffusion_train.data.fashion_mnist import CLASSES, load_split
from diffusion_train.data.shards import FORMAT, encode_image, read_manifest, shard_paths, write_shards

ROOT = Path(__file__).resolve().parent.parent
CAPTION_TEMPLATES = ["a photo of a {name}", "a {name}", "a black and white picture of a {name}",
                     "a grayscale photo of a {name}, centered"]


make = load_script("make_shards")


def opts(**kw) -> dict:
    args = [f"{k}={v}" for k, v in kw.items()]
    return make.parse_args(args)


def read_tar(path: Path) -> list[tuple[str, bytes]]:
    with tarfile.open(path) as tar:
        return [(m.name, tar.extractfile(m).read()) for m in tar]


def read_samples(manifest_dir: Path, prefix: str | None = None) -> dict[str, dict[str, bytes]]:
    """key -> {ext: bytes} over the shards of a manifest, checking that members of a sample are adjacent."""
    samples: dict[str, dict[str, bytes]] = {}
    for path in shard_paths(manifest_dir, prefix):
        last = None
        for name, data in read_tar(path):
            key, ext = name.split(".", 1)
            if key != last:
                assert key not in samples, f"{key} not adjacent or duplicated"
                samples[key] = {}
            samples[key][ext] = data
            last = key
    return samples


def rgb_noise(w: int, h: int, seed: int) -> Image.Image:
    return Image.fromarray(np.random.default_rng(seed).integers(0, 256, (h, w, 3), dtype=np.uint8))


@pytest.fixture
def folder(tmp_path) -> Path:
    """cats/ and dogs/ with png, jpg, webp, bmp images, captions, and one corrupt file."""
    root = tmp_path / "images"
    (root / "cats").mkdir(parents=True)
    (root / "dogs" / "deep").mkdir(parents=True)
    rgb_noise(20, 16, 0).save(root / "cats" / "a.png")
    rgb_noise(24, 24, 1).save(root / "cats" / "b.jpg", quality=90)
    rgb_noise(12, 10, 2).save(root / "cats" / "c.webp", lossless=True)
    Image.fromarray(np.arange(16 * 8, dtype=np.uint8).reshape(8, 16)).save(root / "dogs" / "d.png")
    rgb_noise(9, 7, 3).save(root / "dogs" / "deep" / "e.bmp")
    # a PNG signature, then no valid chunk (fixed bytes: random ones parse as a truncated chunk 1 time in 300)
    (root / "dogs" / "bad.png").write_bytes(b"\x89PNG\r\n\x1a\n" + b"not a png chunk " * 12)
    (root / "cats" / "a.txt").write_text("  a noisy cat \n")
    (root / "cats" / "c.txt").write_text("a small webp\n")
    (root / "dogs" / "d.txt").write_text("   \n")  # empty caption: no txt member
    return root


def test_encode_image_layouts_and_errors():
    hwc = np.random.default_rng(0).integers(0, 256, (5, 7, 3), dtype=np.uint8)
    for arr in (hwc, hwc.transpose(2, 0, 1)):
        assert np.array_equal(np.asarray(Image.open(io.BytesIO(encode_image(arr, "png")))), hwc)
    gray = hwc[..., 0]
    for arr in (gray, gray[None], gray[..., None]):
        img = Image.open(io.BytesIO(encode_image(arr, "png")))
        assert img.mode == "L" and np.array_equal(np.asarray(img), gray)
    jpg = Image.open(io.BytesIO(encode_image(hwc, "jpg")))
    assert jpg.format == "JPEG" and jpg.size == (7, 5)
    with pytest.raises(TypeError, match="uint8"):
        encode_image(hwc.astype(np.float32))
    with pytest.raises(ValueError, match="alpha"):
        encode_image(np.zeros((4, 4, 4), np.uint8), "jpg")
    with pytest.raises(ValueError, match="unknown image format"):
        encode_image(hwc, "gif")


def test_write_shards_limits_manifest_and_rewrite(tmp_path):
    rng = np.random.default_rng(0)
    payloads = [rng.integers(0, 256, int(n), dtype=np.uint8).tobytes() for n in rng.integers(100, 3000, 40)]

    def samples(n=40):
        for i in range(n):
            yield {"__key__": f"{i:06d}", "png": payloads[i], "cls": i % 3, "txt": f"caption {i}" if i % 2 else None,
                   "json": {"i": i}, "__url__": "ignored"}

    out = tmp_path / "shards"
    (out).mkdir()
    (out / "train-000009.tar").write_bytes(b"stale")  # from an earlier, longer run: removed
    seen = []
    manifest = write_shards(samples(), out, max_count=7, max_bytes=16 * 1024, on_shard=seen.append,
                            val_samples=({"__key__": f"v{i}", "png": payloads[i]} for i in range(3)))
    assert manifest == read_manifest(out) == read_manifest(out / "manifest.json")
    assert manifest["format"] == FORMAT and manifest["count"] == 43
    assert manifest["keys"] == ["cls", "json", "png", "txt"]
    assert manifest["num_classes"] == 3 and manifest["class_names"] is None  # inferred: largest cls + 1
    assert seen == manifest["shards"]
    assert sorted(p.name for p in out.iterdir()) == sorted([s["path"] for s in manifest["shards"]] + ["manifest.json"])
    for s in manifest["shards"]:
        size = (out / s["path"]).stat().st_size
        assert s["bytes"] == size <= 16 * 1024 and 1 <= s["count"] <= 7
    train = [s for s in manifest["shards"] if s["path"].startswith("train-")]
    assert [s["path"] for s in train] == [f"train-{i:06d}.tar" for i in range(len(train))]
    assert sum(s["count"] for s in train) == 40 and len(train) > 40 // 7  # the byte limit split some shards
    assert [s["path"] for s in manifest["shards"][len(train):]] == ["val-000000.tar"]

    got = read_samples(out, "train")
    assert list(got) == [f"{i:06d}" for i in range(40)]
    for i, (key, members) in enumerate(got.items()):
        assert list(members) == ["png", "cls"] + (["txt"] if i % 2 else []) + ["json"]
        assert members["png"] == payloads[i] and members["cls"] == str(i % 3).encode()
        assert members.get("txt") == (f"caption {i}".encode() if i % 2 else None)
        assert json.loads(members["json"]) == {"i": i}

    # the same samples give the same bytes; a shorter rewrite removes the shards it no longer needs
    before = {p.name: p.read_bytes() for p in out.glob("*.tar")}
    write_shards(samples(), out, max_count=7, max_bytes=16 * 1024, val_samples=iter(()))
    assert {p.name: p.read_bytes() for p in out.glob("train-*.tar")} == \
        {k: v for k, v in before.items() if k.startswith("train-")}
    assert not list(out.glob("val-*.tar"))
    small = write_shards(samples(5), out, class_names=["a", "b", "c"])
    assert [s["path"] for s in small["shards"]] == ["train-000000.tar"] and sorted(out.glob("*.tar")) == \
        [out / "train-000000.tar"]
    assert small["num_classes"] == 3 and small["class_names"] == ["a", "b", "c"]

    with pytest.raises(ValueError, match="duplicate sample key '000001'"):
        write_shards(list(samples(3)) + [{"__key__": "000001", "png": b"x"}], tmp_path / "dup")
    with pytest.raises(ValueError, match="without '.'"):
        write_shards([{"__key__": "a.b", "png": b"x"}], tmp_path / "dot")
    with pytest.raises(ValueError, match="cls 5 but only 3 class_names"):
        write_shards([{"__key__": "a", "png": b"x", "cls": 5}], tmp_path / "cls", class_names=["a", "b", "c"])
    assert not list((tmp_path / "dup").glob("*.tmp")) and not (tmp_path / "dup" / "manifest.json").exists()
    with pytest.raises(FileNotFoundError, match=f"no shard manifest {tmp_path / 'nothing' / 'manifest.json'}"):
        read_manifest(tmp_path / "nothing")


def test_folder_source_keeps_png_jpg_bytes(folder, tmp_path):
    out = tmp_path / "shards"
    manifest, skipped = make.make_shards(opts(source="folder", root=folder, out=out, max_count=2, val_size=2),
                                         log=lambda s: None)
    assert skipped == [("dogs/bad.png", skipped[0][1])] and "UnidentifiedImageError" in skipped[0][1]
    assert manifest["class_names"] == ["cats", "dogs"] and manifest["num_classes"] == 2
    assert manifest["keys"] == ["cls", "jpg", "json", "png", "txt"]
    assert manifest["count"] == 5
    assert [(s["path"], s["count"]) for s in manifest["shards"]] == \
        [("train-000000.tar", 2), ("train-000001.tar", 1), ("val-000000.tar", 2)]

    # list_images order: cats/a.png cats/b.jpg cats/c.webp dogs/bad.png dogs/d.png dogs/deep/e.bmp
    samples = dict(sorted(read_samples(out).items()))
    assert list(samples) == ["000000", "000001", "000002", "000004", "000005"]
    a, b, c, d, e = samples.values()
    assert a["png"] == (folder / "cats/a.png").read_bytes() and b["jpg"] == (folder / "cats/b.jpg").read_bytes()
    assert np.array_equal(np.asarray(Image.open(io.BytesIO(c["png"]))), np.asarray(Image.open(folder / "cats/c.webp")))
    assert d["png"] == (folder / "dogs/d.png").read_bytes()
    assert np.array_equal(np.asarray(Image.open(io.BytesIO(e["png"]))),
                          np.asarray(Image.open(folder / "dogs/deep/e.bmp")))
    assert [s["cls"] for s in samples.values()] == [b"0", b"0", b"0", b"1", b"1"]
    assert a["txt"] == b"a noisy cat" and c["txt"] == b"a small webp" and "txt" not in b and "txt" not in d
    assert json.loads(a["json"]) == {"path": "cats/a.png", "width": 20, "height": 16}
    assert json.loads(e["json"]) == {"path": "dogs/deep/e.bmp", "width": 9, "height": 7}
    # val_size=2 of 6 items: the 2nd and 5th, one of each class folder (the last two would both be dogs)
    assert list(read_samples(out, "val")) == ["000001", "000004"]

    wds = pytest.importorskip("webdataset")  # not a dependency of the package: the reader may be elsewhere
    ds = wds.WebDataset(str(out / "train-{000000..000001}.tar"), shardshuffle=False).decode("pil")
    got = {s["__key__"]: s for s in ds}
    assert list(got) == ["000000", "000002", "000005"]
    for key, s in got.items():
        raw = samples[key]
        image = s.get("png") or s.get("jpg")
        ext = "png" if "png" in raw else "jpg"
        assert np.array_equal(np.asarray(image.convert("RGB")),
                              np.asarray(Image.open(io.BytesIO(raw[ext])).convert("RGB")))
        assert s["cls"] == int(raw["cls"]) and s.get("txt") == (raw["txt"].decode() if "txt" in raw else None)
        assert s["json"] == json.loads(raw["json"])

    rgb_noise(4, 4, 9).save(folder / "loose.png")
    with pytest.raises(ValueError, match="labels=auto: 6 images are in subfolders but 1 directly in"):
        make.make_shards(opts(source="folder", root=folder, out=tmp_path / "x"), log=lambda s: None)
    manifest, skipped = make.make_shards(opts(source="folder", root=folder, out=tmp_path / "x", labels="false",
                                              image_format="jpg", limit=4, shuffle=1), log=lambda s: None)
    assert manifest["num_classes"] is None and "cls" not in manifest["keys"]
    assert manifest["count"] + len(skipped) == 4


def test_fashion_mnist_source_round_trip(tmp_path):
    out = tmp_path / "fmnist"
    manifest, skipped = make.make_shards(opts(source="fashion_mnist", out=out, limit=300, max_count=100,
                                              val_size=20, captions="true"), log=lambda s: None)
    assert skipped == [] and manifest["count"] == 320 and manifest["keys"] == ["cls", "png", "txt"]
    assert manifest["class_names"] == list(CLASSES) and manifest["num_classes"] == 10
    assert [(s["path"], s["count"]) for s in manifest["shards"]] == \
        [("train-000000.tar", 100), ("train-000001.tar", 100), ("train-000002.tar", 100), ("val-000000.tar", 20)]
    assert all(s["bytes"] == (out / s["path"]).stat().st_size for s in manifest["shards"])

    with tarfile.open(out / "train-000001.tar") as tar:
        assert tar.getnames()[:3] == ["train_000100.png", "train_000100.cls", "train_000100.txt"]
    splits = {"train": load_split("train"), "test": load_split("test")}
    for prefix, split in (("train", "train"), ("val", "test")):
        (x, y), n = splits[split], 300 if split == "train" else 20
        samples = read_samples(out, prefix)
        assert list(samples) == [f"{split}_{i:06d}" for i in range(n)]
        for i, s in enumerate(samples.values()):
            img = Image.open(io.BytesIO(s["png"]))
            assert img.mode == "L" and np.array_equal(np.asarray(img), x[i, 0].numpy())
            assert s["cls"] == str(int(y[i])).encode()
            assert s["txt"].decode() == CAPTION_TEMPLATES[i % 4].format(name=CLASSES[int(y[i])].lower())

    wds = pytest.importorskip("webdataset")
    for prefix, split in (("train", "train"), ("val", "test")):
        (x, y), n = splits[split], 300 if split == "train" else 20
        got = list(wds.WebDataset([str(p) for p in shard_paths(out, prefix)], shardshuffle=False).decode("l8"))
        assert [s["__key__"] for s in got] == [f"{split}_{i:06d}" for i in range(n)]
        for i, s in enumerate(got):
            assert np.array_equal(s["png"], x[i, 0].numpy()) and s["cls"] == int(y[i])
            assert s["txt"] == CAPTION_TEMPLATES[i % 4].format(name=CLASSES[int(y[i])].lower())


def test_csv_and_jsonl_sources(tmp_path):
    data = tmp_path / "data"
    (data / "img").mkdir(parents=True)
    for i in range(4):
        rgb_noise(8 + i, 8, i).save(data / "img" / f"{i}.png")
    absolute = tmp_path / "elsewhere.jpg"
    rgb_noise(6, 5, 7).save(absolute, quality=95)
    (data / "list.csv").write_text(
        "path,caption,label,source,aesthetic,zip\n"
        'img/0.png,"a caption, with a comma",dog,web,6.5,007\n'
        f"{absolute},second,cat,camera,7,1e3\n"
        "img/missing.png,gone,cat,web,,\n"
        "img/1.png,,dog,,-.25,12\n", encoding="utf-8")
    out = tmp_path / "csv_shards"
    manifest, skipped = make.make_shards(opts(source="csv", path=data / "list.csv", out=out), log=lambda s: None)
    assert skipped == [("list.csv:4 img/missing.png", "missing file")]
    assert manifest["count"] == 3 and manifest["class_names"] == ["cat", "dog"]
    samples = read_samples(out)
    assert list(samples) == ["000000", "000001", "000003"]
    first, second, fourth = samples.values()
    assert first["png"] == (data / "img/0.png").read_bytes() and second["jpg"] == absolute.read_bytes()
    assert (first["txt"], second["txt"], "txt" in fourth) == ("a caption, with a comma".encode(), b"second", False)
    assert [s["cls"] for s in samples.values()] == [b"1", b"0", b"1"]
    # cells written as numbers are JSON numbers (max_scores and metadata read them); empty cells are left out
    assert json.loads(first["json"]) == {"path": "img/0.png", "source": "web", "aesthetic": 6.5, "zip": "007",
                                         "width": 8, "height": 8}
    assert [json.loads(s["json"]).get(k) for s in (second, fourth) for k in ("source", "aesthetic", "zip")] == [
        "camera", 7, 1000.0, None, -0.25, 12]

    rows = [{"path": "img/2.png", "caption": "two", "label": 4, "meta": {"a": [1, 2]}},
            {"path": "img/3.png", "label": 1},
            {"path": "img/none.png", "label": 0, "caption": "x"},
            {"path": "img/0.png", "caption": "zero", "label": 2}]
    (data / "list.jsonl").write_text("\n".join(json.dumps(r) for r in rows) + "\n\n")
    out = tmp_path / "jsonl_shards"
    manifest, skipped = make.make_shards(opts(source="jsonl", path=data / "list.jsonl", out=out, val_size=2),
                                         log=lambda s: None)
    assert [reason for _, reason in skipped] == ["missing file"]
    assert manifest["num_classes"] == 5 and manifest["class_names"] is None  # integer labels: largest + 1
    assert list(read_samples(out, "train")) == ["000000"] and list(read_samples(out, "val")) == ["000001", "000003"]
    samples = read_samples(out)
    assert json.loads(samples["000000"]["json"]) == {"path": "img/2.png", "meta": {"a": [1, 2]}, "width": 10,
                                                     "height": 8}
    assert samples["000000"]["cls"] == b"4" and samples["000003"]["txt"] == b"zero"

    # bad lists: one line naming the file and the line
    (data / "nopath.csv").write_text("file,caption\na.png,x\n")
    with pytest.raises(ValueError, match=r"nopath\.csv:1: no 'path' column in the header \(columns: file, caption\)"):
        make.make_shards(opts(source="csv", path=data / "nopath.csv", out=tmp_path / "x"), log=lambda s: None)
    (data / "nopath.jsonl").write_text('{"path": "img/0.png"}\n\n{"file": "a.png"}\n')
    with pytest.raises(ValueError, match=r"nopath\.jsonl:3: no 'path' field \(fields: file\)"):
        make.make_shards(opts(source="jsonl", path=data / "nopath.jsonl", out=tmp_path / "x"), log=lambda s: None)


def test_make_shards_main_one_line_errors(tmp_path, capsys):
    (tmp_path / "nopath.csv").write_text("file\na.png\n")
    cases = [(["source=csv", f"path={tmp_path / 'nopath.csv'}", f"out={tmp_path / 'o'}"],
              f"error: {tmp_path / 'nopath.csv'}:1: no 'path' column"),
             (["source=folder", f"root={tmp_path / 'missing'}", f"out={tmp_path / 'o'}"],
              f"error: root: image folder {tmp_path / 'missing'} does not exist"),
             (["source=csv", f"path={tmp_path / 'missing.csv'}", f"out={tmp_path / 'o'}"],
              f"error: path: csv file {tmp_path / 'missing.csv'} does not exist"),
             (["source=folder", f"out={tmp_path}"], "error: source=folder needs root=DIR"),
             (["source=csv", "path=x", f"out={tmp_path}", "max_bytes=lots"], "error: max_bytes=lots: not a valid"),
             (["source=fashion_mnist"], "error: set out=DIR")]
    for argv, expected in cases:
        assert make.main(argv) == 1
        err = capsys.readouterr().err
        assert err.startswith(expected) and err.count("\n") == 1, err
    assert make.parse_args(["source=csv", "path=x", "out=o", "max_bytes=2M"])["max_bytes"] == 2_000_000
    assert make.parse_args(["source=csv", "path=x", "out=o", "max_bytes=2MiB"])["max_bytes"] == 2 << 20
    assert make.parse_args(["source=csv", "path=x", "out=o", "max_bytes=1000"])["max_bytes"] == 1000


def _run(script: str, *args: str, cwd: Path) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, str(ROOT / "scripts" / script), *map(str, args)], cwd=cwd,
                          capture_output=True, text=True, timeout=120)


@pytest.mark.slow
def test_make_shards_cli(folder, tmp_path):
    res = _run("make_shards.py", "source=folder", f"root={folder}", f"out={tmp_path / 's'}", "max_count=3",
               cwd=tmp_path)
    assert res.returncode == 0, res.stderr
    assert "  train-000000.tar        3 samples" in res.stdout and "  train-000001.tar        2 samples" in res.stdout
    assert "skipped 1 unreadable image" in res.stdout and "skipped dogs/bad.png: UnidentifiedImageError" in res.stdout
    assert read_manifest(tmp_path / "s")["count"] == 5
    res = _run("make_shards.py", "source=folder", f"root={tmp_path / 'nope'}", f"out={tmp_path / 's'}", cwd=tmp_path)
    assert res.returncode == 1 and res.stderr == f"error: root: image folder {tmp_path / 'nope'} does not exist\n"


@pytest.mark.slow
def test_inspect_shards_cli(folder, tmp_path):
    make.make_shards(opts(source="folder", root=folder, out=tmp_path / "s", max_count=3), log=lambda s: None)
    res = _run("inspect_shards.py", tmp_path / "s" / "train-{000000..000001}.tar", "grid=g.png", "n=4", cwd=tmp_path)
    assert res.returncode == 0, res.stdout + res.stderr
    assert "total: 5 samples, 5 good" in res.stdout and "problems: none" in res.stdout
    assert "members: cls 5 (100.0%), jpg 1 (20.0%), json 5 (100.0%), png 4 (80.0%), txt 2 (40.0%)" in res.stdout
    assert Image.open(tmp_path / "g.png").size == (2 * 66 + 2, 2 * 66 + 2)  # 4 sizes, none repeated: 64x64


def test_short_side_shrinks_large_images_and_keeps_jpeg(tmp_path):
    """make_shards short_side=N stores large images resized (short side N), JPEG staying JPEG."""
    from PIL import Image as PILImage

    big = tmp_path / "big.jpg"
    PILImage.new("RGB", (600, 400), (200, 30, 30)).save(big, quality=90)
    small = tmp_path / "small.png"
    PILImage.new("RGB", (100, 80), (0, 0, 255)).save(small)
    ext, data, w, h = make.read_image_file(big, "png", short_side=288)
    assert ext == "jpg" and (w, h) == (600, 400)
    assert PILImage.open(io.BytesIO(data)).size == (432, 288)
    ext, data, w, h = make.read_image_file(small, "png", short_side=288)
    assert ext == "png" and data == small.read_bytes()  # already small: stored byte for byte


def test_sizes_are_those_of_the_displayed_original_also_when_shrunk(tmp_path):
    """An image stored 400x200 with EXIF orientation 6 is shown 200 wide and 400 tall: the json sizes say so
    whether it is kept, re-encoded or shrunk, and the decoder's image:original_size is that original even
    when the shard holds a copy shrunk by short_side."""
    from PIL import Image as PILImage

    from diffusion_train.data.decode import SampleDecoder

    exif = PILImage.Exif()
    exif[0x0112] = 6
    for name in ("turned.jpg", "turned.webp"):
        PILImage.new("RGB", (400, 200), (200, 30, 30)).save(tmp_path / name, exif=exif.tobytes())
    decode = SampleDecoder(resolution=64, caption_key=None, label_key=None, metadata={"size": "image:original_size"})
    for name, short_side in (("turned.jpg", None), ("turned.webp", None), ("turned.jpg", 100)):
        sample = make.to_sample(make.Item(key="a", file=tmp_path / name), "png", short_side)
        meta, ext = sample["json"], next(k for k in sample if k in ("jpg", "png", "webp"))
        assert (meta["width"], meta["height"]) == (200, 400), (name, short_side)
        decoded = decode({"__key__": "a", ext: sample[ext], "json": json.dumps(meta).encode()}, random.Random(0))
        assert decoded["size"].tolist() == [400, 200], (name, short_side)


