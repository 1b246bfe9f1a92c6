"""Resuming a shard stream: exact-mode positions (saved per reader, checked against the layout, bit-identical
batches after a restart, also under DDP) and resampled streams that draw fresh data after a resume."""

from __future__ import annotations

import pytest
import torch

from diffusion_train.data.decode import SampleDecoder
from diffusion_train.data.web import WebDataModule
from web_shards import loader_batches, make_shards, positions_after


def test_a_saved_position_is_used_only_with_the_same_shards_seed_and_buffer(tmp_path, caplog):
    """Exact-mode positions depend on the shard list, the seed and the shuffle buffer: with another of them the
    readers start again at the beginning of their shards, with a warning; the same shards under another folder
    keep it."""
    import shutil

    pattern = make_shards(tmp_path / "a", n_shards=4, per_shard=5)
    args = dict(resolution=8, channels=1, batch_size=4, resampled=False, num_workers=0, shuffle_buffer=4)
    saved = WebDataModule(pattern, **args)
    saved.positions = {0: {"reader": 0, "pass": 0, "emitted": 8, "pending": []}}
    state = saved.state_dict()
    shutil.copytree(tmp_path / "a", tmp_path / "moved")
    sources = {"moved": pattern.replace(str(tmp_path / "a"), str(tmp_path / "moved")),
               "reordered": [str(tmp_path / "a" / f"train-00000{i}.tar") for i in (0, 1, 3, 2)]}
    for changed, kept in (({}, True), ({"seed": 1}, False), ({"shuffle_buffer": 5}, False),
                          ({"sources": "moved"}, True), ({"sources": "reordered"}, False)):
        settings = {**args, **changed, "sources": sources.get(changed.get("sources"), pattern)}
        dm = WebDataModule(**settings)
        caplog.clear()
        dm.load_state_dict(state)
        assert (dm.positions == saved.positions) is kept, changed
        assert ("each reader starts at the beginning" in caplog.text) is not kept, changed


def _loader_order(pattern, monkeypatch, start: int, n: int, **kw) -> list[list[str]]:
    return [b["__key__"] for b in loader_batches(pattern, monkeypatch, start, n, **kw)]


class CountingDecoder(SampleDecoder):
    calls = 0

    def __call__(self, sample, rng=None):
        CountingDecoder.calls += 1
        return super().__call__(sample, rng)


def test_exact_mode_resume_continues_the_same_batches_without_decoding_used_samples(tmp_path, monkeypatch):
    pattern = make_shards(tmp_path, n_shards=6, per_shard=10)
    full = loader_batches(pattern, monkeypatch, 0, 14, shuffle_buffer=7)  # 14 batches: into the second pass
    for start in (3, 4, 12):
        CountingDecoder.calls = 0
        decoder = CountingDecoder(resolution=8, channels=1, caption_key="txt")
        resumed = loader_batches(pattern, monkeypatch, start, 14 - start, shuffle_buffer=7,
                                  positions=positions_after(full[:start]), decoder=decoder)
        assert [b["__key__"] for b in resumed] == [b["__key__"] for b in full[start:]], start
        assert all(torch.equal(a["image"], b["image"]) for a, b in zip(resumed, full[start:]))
        # each of the 2 readers decodes only the 14 - start batches of 5 it is asked for, none it skipped
        assert CountingDecoder.calls == 2 * (14 - start) * 5, start


def test_exact_mode_without_saved_position_starts_the_readers_at_their_first_pass(tmp_path, monkeypatch):
    pattern = make_shards(tmp_path, n_shards=4, per_shard=10)
    assert _loader_order(pattern, monkeypatch, 2, 4) == _loader_order(pattern, monkeypatch, 0, 4)


def test_resampled_resume_draws_fresh_data_instead_of_replaying(tmp_path, monkeypatch):
    pattern = make_shards(tmp_path, n_shards=40, per_shard=50)
    first = _loader_order(pattern, monkeypatch, 0, 10, resampled=True, shuffle_buffer=20)
    resumed = _loader_order(pattern, monkeypatch, 5, 5, resampled=True, shuffle_buffer=20)
    seen = {k for b in first[:5] for k in b}
    assert resumed != first[:5] and resumed != first[5:]
    repeats = sum(k in seen for b in resumed for k in b)
    assert repeats <= 3  # 25 of 2000 samples seen: a fresh random draw repeats 0.3 of them on average
    again = _loader_order(pattern, monkeypatch, 5, 5, resampled=True, shuffle_buffer=20)
    assert again == resumed, "the resumed stream is a pure function of (seed, rank, worker, step)"


def test_exact_mode_training_resumes_bit_identically_from_the_saved_data_position(tmp_path):
    """4 steps straight == 2 steps + resume + 2 steps, reading shards in exact mode with 2 workers and a
    shuffle buffer: the checkpoint holds each reader's position, and the batches continue exactly."""
    from conftest import TINY, compose_train
    from diffusion_train.train import train
    from diffusion_train.training.checkpointing import load_checkpoint

    pattern = make_shards(tmp_path / "shards", n_shards=4, per_shard=12)
    overrides = [o for o in TINY if not o.startswith("data=")] + [
        "data=webdataset", f"data.sources='{pattern}'", "data.resolution=8", "data.channels=1",
        "data.num_classes=10", "data.batch_size=4", "data.num_workers=2", "data.shuffle_buffer=5",
        "data.resampled=false", "data.flip=true", "trainer.val_check_interval=100"]
    straight = compose_train(overrides, tmp_path / "straight")
    train(straight, tmp_path / "straight")
    train(compose_train(overrides + ["trainer.max_steps=2"], tmp_path / "resumed"), tmp_path / "resumed")
    half = load_checkpoint(tmp_path / "resumed/checkpoints/last.ckpt")
    assert half["global_step"] == 2 and len(half["WebDataModule"]["positions"]) == 2
    train(compose_train(overrides, tmp_path / "resumed"), tmp_path / "resumed")
    a = load_checkpoint(tmp_path / "straight/checkpoints/last.ckpt")
    b = load_checkpoint(tmp_path / "resumed/checkpoints/last.ckpt")
    assert a["global_step"] == b["global_step"] == 4
    assert all(torch.equal(a["state_dict"][k], b["state_dict"][k]) for k in a["state_dict"])
    assert a["WebDataModule"]["positions"] == b["WebDataModule"]["positions"]


def test_each_rank_saves_only_its_own_readers_positions(tmp_path, monkeypatch):
    """After a resume every rank holds all loaded positions; only its own readers' are current, so
    only those go into the gathered checkpoint state (else a stale copy could win the merge)."""
    pattern = make_shards(tmp_path, n_shards=4, per_shard=10)
    dm = WebDataModule(pattern, resolution=8, channels=1, resampled=False, num_workers=2)
    dm.positions = {r: {"reader": r, "pass": 0, "emitted": 10 * r, "pending": []} for r in range(4)}
    monkeypatch.setattr(WebDataModule, "_rank_world", lambda self: (1, 2))
    assert sorted(dm.state_dict()["positions"]) == [2, 3]
    monkeypatch.setattr(WebDataModule, "_rank_world", lambda self: (0, 2))
    assert sorted(dm.state_dict()["positions"]) == [0, 1]


def test_bad_sample_counts_go_on_summed_in_rank_0_under_another_world_size(tmp_path, monkeypatch):
    """The counts behind data/skipped_* and max_bad_fraction were dropped on every rank when a run resumed with
    another world size; rank 0 now goes on from their sums (as for truncated captions), the others from 0."""
    from collections import Counter

    pattern = make_shards(tmp_path, n_shards=4, per_shard=10)
    state = {"skipped": [{"undecodable_image": 30}, {"undecodable_image": 25, "missing_label": 1}], "used": [500, 480]}
    for rank, world, skipped, used in ((0, 1, {"undecodable_image": 55, "missing_label": 1}, 980), (1, 4, {}, 0),
                                       (1, 2, {"undecodable_image": 25, "missing_label": 1}, 480)):
        monkeypatch.setattr(WebDataModule, "_rank_world", lambda self: (rank, world))
        dm = WebDataModule(pattern, resolution=8, channels=1, resampled=True, num_workers=0)
        dm.load_state_dict(dict(state))
        assert (dm.skip_counts, dm.samples_used) == (Counter(skipped), used), (rank, world)


@pytest.mark.slow
def test_ddp_exact_mode_resumes_bit_identically_twice(tmp_path):
    """2 ranks (DDP on CPU, gloo) x 2 workers, exact mode: 3 + 3 + 3 steps with two resumes give the
    weights of 9 steps straight; each rank's readers continue from their saved positions."""
    import subprocess
    import sys

    from diffusion_train.training.checkpointing import load_checkpoint

    make_shards(tmp_path / "shards", n_shards=8, per_shard=30)
    args = ["experiment=smoke", "logger=csv", "trainer.devices=2", "+trainer.strategy=ddp", "trainer.accelerator=cpu",
            "data=webdataset", f"data.sources='{tmp_path}/shards/train-{{000000..000007}}.tar'", "data.resolution=8",
            "data.channels=1", "data.num_classes=10", "data.batch_size=4", "data.resampled=false",
            "data.num_workers=2", "data.shuffle_buffer=6", "data.flip=true", "data.val_shards=null",
            "callbacks.sample_grid.every_n_steps=1000", "callbacks.checkpoint.every_n_train_steps=3",
            "trainer.val_check_interval=1000"]

    def run(name: str, steps: int) -> dict:
        out = subprocess.run([sys.executable, "-m", "diffusion_train.train", *args, f"hydra.run.dir={tmp_path / name}",
                              f"trainer.max_steps={steps}"], capture_output=True, text=True, timeout=300,
                             cwd=tmp_path)
        assert out.returncode == 0, out.stderr[-3000:]
        return load_checkpoint(tmp_path / name / "checkpoints/last.ckpt")

    straight = run("straight", 9)
    for steps in (3, 6, 9):
        resumed = run("resumed", steps)
    assert straight["global_step"] == resumed["global_step"] == 9
    assert all(torch.equal(straight["state_dict"][k], resumed["state_dict"][k]) for k in straight["state_dict"])
    assert straight["WebDataModule"]["positions"] == resumed["WebDataModule"]["positions"]
    assert sorted(resumed["WebDataModule"]["positions"]) == [0, 1, 2, 3]
