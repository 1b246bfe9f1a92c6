"""scripts/inspect_shards.py: the shard checker on good, corrupt, truncated and gzipped shards, and its brace
patterns (its command line: test_shards.py, next to make_shards.py's)."""

from __future__ import annotations

import os
import tarfile

import numpy as np
import pytest
from PIL import Image

from conftest import load_script
from diffusion_train.data.shards import encode_image, write_shards

inspect_ = load_script("inspect_shards")


def _png(seed: int, w: int = 12, h: int = 12) -> bytes:
    return encode_image(np.random.default_rng(seed).integers(0, 256, (h, w, 3), dtype=np.uint8))


def test_inspect_reports_corrupt_and_truncated_shards(tmp_path, capsys):
    out = tmp_path / "shards"
    samples = [{"__key__": f"{i:06d}", "png": _png(i, 12 if i % 5 else 20), "cls": i % 4, "txt": "x" * (i % 7)}
               for i in range(40)]
    samples[3]["png"] = os.urandom(300)  # corrupt image member
    del samples[8]["png"]  # no image at all
    manifest = write_shards(samples, out, max_count=10, class_names=["a", "b", "c", "d"])
    assert len(manifest["shards"]) == 4
    with tarfile.open(out / "train-000001.tar") as tar:  # cut inside the data of the 3rd member of 000013
        member = tar.getmember("000013.txt")
        cut = member.offset_data + member.size // 2
    (out / "train-000001.tar").write_bytes((out / "train-000001.tar").read_bytes()[:cut])
    with tarfile.open(out / "train-000002.tar") as tar:  # cut at a header: tarfile alone would not notice
        cut = tar.getmember("000025.png").offset
    (out / "train-000002.tar").write_bytes((out / "train-000002.tar").read_bytes()[:cut])
    size = (out / "train-000003.tar").stat().st_size  # and one cut somewhere in the middle
    (out / "train-000003.tar").write_bytes((out / "train-000003.tar").read_bytes()[: size // 2])

    grid = tmp_path / "grid.png"
    assert inspect_.main([str(out), f"grid={grid}", "n=9"]) == 1
    text = capsys.readouterr().out
    print(text)
    assert "  train-000000.tar        10 samples" in text
    assert "  train-000001.tar         4 samples" in text and "manifest: 10 samples" in text
    assert "  train-000002.tar         5 samples" in text
    assert "total: " in text and "(manifest: 40)" in text
    assert "undecodable image: 1  e.g. train-000000.tar/000003" in text
    assert "missing image: 1  e.g. train-000000.tar/000008" in text
    assert "truncated member: " in text and "train-000001.tar/000013" in text
    assert "tar read error: " in text and "train-000002.tar (no end-of-archive marker" in text
    assert "train-000003.tar" in text.split("problems:")[1]  # the half file: a truncated member or a header
    assert "     0 a: " in text and "captions: " in text and "image sizes (WxH): 12x12" in text
    img = Image.open(grid)
    assert img.size == (3 * 14 + 2, 3 * 14 + 2) and img.mode == "RGB"  # 9 images at 12x12 (the common size)

    # a clean pattern: exit 0; the duplicate keys of a second copy are reported
    assert inspect_.main([str(out / "train-{000000..000000}.tar")]) == 1  # 000003, 000008 are bad
    capsys.readouterr()
    clean = write_shards([{"__key__": f"k{i}", "jpg": encode_image(np.full((8, 8, 3), i, np.uint8), "jpg"),
                           "cls": 0} for i in range(3)], tmp_path / "clean")
    assert clean["keys"] == ["cls", "jpg"]
    assert inspect_.main([str(tmp_path / "clean")]) == 0
    assert "problems: none" in capsys.readouterr().out
    (tmp_path / "clean" / "copy-000000.tar").write_bytes((tmp_path / "clean" / "train-000000.tar").read_bytes())
    assert inspect_.main([str(tmp_path / "clean" / "*.tar")]) == 1
    assert "duplicate key: 3  e.g. train-000000.tar/k0" in capsys.readouterr().out
    (tmp_path / "empty").mkdir()
    assert inspect_.main([str(tmp_path / "empty")]) == 2
    assert capsys.readouterr().err.startswith(f"error: no shard manifest {tmp_path / 'empty' / 'manifest.json'}")


def test_inspect_reads_tar_gz_shards_as_training_does(tmp_path, capsys):
    import gzip
    from collections import Counter

    from diffusion_train.data.tar_io import tar_samples

    rng = np.random.default_rng(0)
    write_shards([{"__key__": f"{i:06d}", "png": _png(i), "cls": i % 2, "txt": "a", "json": {"n": i},
                   "bin": rng.integers(0, 4, 3000, dtype=np.uint8).tobytes()} for i in range(5)], tmp_path / "s")
    gz = tmp_path / "train-000000.tar.gz"
    gz.write_bytes(gzip.compress((tmp_path / "s" / "train-000000.tar").read_bytes()))
    assert len(list(tar_samples(str(gz), Counter()))) == 5
    assert inspect_.main([str(gz)]) == 0
    text = capsys.readouterr().out
    assert "  train-000000.tar.gz         5 samples" in text and "problems: none" in text
    corrupt = bytearray(gz.read_bytes())  # bad deflate data in the middle: reported, not raised
    corrupt[len(corrupt) // 2: len(corrupt) // 2 + 8] = bytes(8)
    (tmp_path / "bad.tar.gz").write_bytes(bytes(corrupt))
    assert inspect_.main([str(tmp_path / "bad.tar.gz")]) == 1
    assert "bad.tar.gz" in capsys.readouterr().out.split("problems:")[1]


def test_inspect_resolves_brace_patterns(tmp_path):
    for i in range(8, 12):
        (tmp_path / f"train-{i:06d}.tar").write_bytes(b"")
    paths, manifest = inspect_.resolve_shards(str(tmp_path / "train-{000008..000011}.tar"))
    assert paths == [tmp_path / f"train-{i:06d}.tar" for i in range(8, 12)] and manifest is None
    with pytest.raises(FileNotFoundError, match="none of the 2 shards"):
        inspect_.resolve_shards(str(tmp_path / "val-{0..1}.tar"))
