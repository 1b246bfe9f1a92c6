"""Reading webdataset shards: the lean tar reader (diffusion_train.data.tar_io) against tarfile, .npy members,
``pipe:`` URLs, keys repeated within a shard, and JSON metadata fields in the batch."""

from __future__ import annotations

import io
import itertools
import json
import tarfile
from collections import Counter

import numpy as np
import pytest
import torch

from diffusion_train.data.decode import SampleDecoder
from web_shards import as_reader, keys_of, make_shards, png_of, stream, write_shard


def test_pipe_urls_stream_like_files(tmp_path, monkeypatch):
    make_shards(tmp_path, n_shards=2, per_shard=10)
    as_reader(monkeypatch, 0, 1, 0, 1)
    piped = stream(f"pipe:cat {tmp_path}/train-{{000000..000001}}.tar")
    local = stream(str(tmp_path / "train-{000000..000001}.tar"))
    assert keys_of(itertools.islice(iter(piped), 4)) == keys_of(itertools.islice(iter(local), 4))


def test_npy_members_load_like_np_load():
    from diffusion_train.data.tar_io import _load_npy

    for array in (np.arange(24, dtype=np.float16).reshape(2, 3, 4), np.ones((5,), dtype=np.int64),
                  np.asfortranarray(np.arange(6.0).reshape(2, 3))):
        buf = io.BytesIO()
        np.save(buf, array)
        for _ in range(2):  # the second read uses the cached header
            out = _load_npy(buf.getvalue())
            assert out.dtype == array.dtype and np.array_equal(out, array) and out.flags.writeable


@pytest.mark.parametrize("fmt", [tarfile.USTAR_FORMAT, tarfile.GNU_FORMAT, tarfile.PAX_FORMAT])
def test_tar_reader_matches_tarfile(tmp_path, fmt):
    """The lean reader gives tarfile's members, long (PAX / GNU) names and gzip included."""
    import gzip

    from diffusion_train.data.tar_io import TarReadError, tar_members

    path = tmp_path / "a.tar"
    names = ["000001.png", "000001.cls", "d/000002.txt", "x" * 120 + ".txt" if fmt != tarfile.USTAR_FORMAT
             else "y" * 90 + ".txt", "ü_000003.json" if fmt == tarfile.PAX_FORMAT else "000003.json"]
    with tarfile.open(path, "w", format=fmt) as tar:
        for i, name in enumerate(names):
            data = bytes(range(256)) * (i * 7 + 1)
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))
    with tarfile.open(path) as tar:
        expected = [(m.name, tar.extractfile(m).read()) for m in tar.getmembers() if m.isfile()]
    with open(path, "rb") as f:
        assert list(tar_members(f)) == expected
    gz = tmp_path / "a.tar.gz"
    gz.write_bytes(gzip.compress(path.read_bytes()))
    keys = list(dict.fromkeys(n.rpartition("/")[0] + "/" * ("/" in n) + n.rpartition("/")[2].split(".")[0]
                              for n, _ in expected))
    assert [s["__key__"] for s in tar_samples_of(gz)] == keys
    cut = path.read_bytes()[: 512 + 100]  # inside the first member's 256 bytes of data
    with pytest.raises(TarReadError, match="unexpected end of data"):
        list(tar_members(io.BytesIO(cut)))


def tar_samples_of(path) -> list[dict]:
    from diffusion_train.data.tar_io import tar_samples

    skipped = Counter()
    out = list(tar_samples(str(path), skipped))
    assert not skipped
    return out


def test_resampled_mode_drops_keys_repeated_within_a_shard(tmp_path, monkeypatch):
    samples = [{"__key__": f"{k % 7:06d}", "png": png_of(k), "cls": b"0"} for k in range(14)]  # 0..6, 0..6
    write_shard(tmp_path / "d-000000.tar", samples)
    as_reader(monkeypatch, 0, 1, 0, 1)
    s = stream(str(tmp_path / "d-000000.tar"), resampled=True, shuffle_buffer=1, batch_size=7,
               decoder=SampleDecoder(resolution=8, channels=1, caption_key=None))
    batches = list(itertools.islice(iter(s), 4))  # each shard draw gives 7 distinct keys, one batch
    assert all(sorted(b["__key__"]) == [f"{k:06d}" for k in range(7)] for b in batches)
    assert sum(b["__skipped__"].get("duplicate_key", 0) for b in batches) >= 3 * 7  # counted with the next batch


def test_json_metadata_reaches_the_batch_and_missing_fields_are_counted(tmp_path, monkeypatch):
    samples = [{"__key__": f"{k:06d}", "png": png_of(k), "cls": b"0",
                "json": json.dumps({"aesthetic": k / 10, "size": [k, 2 * k]} if k != 3 else {}).encode()}
               for k in range(9)]
    write_shard(tmp_path / "m-000000.tar", samples)
    as_reader(monkeypatch, 0, 1, 0, 1)
    decoder = SampleDecoder(resolution=8, channels=1, caption_key=None,
                            metadata={"aesthetic": "aesthetic", "orig": "size"})
    batches = list(itertools.islice(iter(stream(str(tmp_path / "m-000000.tar"), decoder=decoder, batch_size=4)), 2))
    for batch in batches:
        ks = [int(k) for k in batch["__key__"]]
        assert batch["aesthetic"].dtype == torch.float32
        assert torch.allclose(batch["aesthetic"], torch.tensor([k / 10 for k in ks]))
        assert batch["orig"].tolist() == [[k, 2 * k] for k in ks]
    assert sum(b["__skipped__"].get("missing_aesthetic", 0) for b in batches) == 1


def test_a_key_written_twice_in_a_row_is_a_duplicate_not_a_mixed_sample(tmp_path, monkeypatch):
    """A sample rewritten right after itself (a retried write): the reader keeps the first copy whole and drops the
    second as a duplicate, instead of mixing the second's image and label with the first's caption."""
    from collections import Counter

    from diffusion_train.data.tar_io import tar_samples

    first = {"__key__": "000001", "png": png_of(1), "cls": b"1", "txt": b"first"}
    again = {"__key__": "000001", "png": png_of(200), "cls": b"9"}
    others = [{"__key__": f"{k:06d}", "png": png_of(k), "cls": b"0", "txt": b"x"} for k in (2, 3, 4)]
    path = write_shard(tmp_path / "r-000000.tar", [first, again, *others])
    raw = list(tar_samples(str(path), Counter()))
    assert [(r["__key__"], r.get("txt"), r["cls"]) for r in raw[:2]] == [("000001", b"first", b"1"),
                                                                        ("000001", None, b"9")]
    as_reader(monkeypatch, 0, 1, 0, 1)
    batch = next(iter(stream(str(path), batch_size=4)))
    one = batch["__key__"].index("000001")
    assert sorted(batch["__key__"]) == ["000001", "000002", "000003", "000004"]
    assert (batch["caption"][one], int(batch["label"][one])) == ("first", 1)
    assert batch["__skipped__"] == {"duplicate_key": 1}
