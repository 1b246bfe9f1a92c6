"""FID and Fréchet distances: float64 statistics (batch size, ranks, gloo all_reduce), the distance
against scipy, the Inception-v3 wrapper on a locally saved random-init weights file, reference files
with provenance, metric names, and scripts/fid_reference.py on Fashion-MNIST."""

from __future__ import annotations

import math
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import scipy.linalg
import torch

from conftest import gloo_group, load_script
from diffusion_train.metrics.fid import (EXTRACTORS, FeatureStats, ReferenceMismatchError, build_extractor,
                                         check_reference_images, frechet_distance, load_reference, metric_name,
                                         save_reference)
from diffusion_train.metrics.inception import InceptionV3, random_network

ROOT = Path(__file__).resolve().parent.parent


def features(n: int = 600, d: int = 48, seed: int = 0) -> np.ndarray:
    """Correlated, well-conditioned float64 features with a non-zero mean."""
    rng = np.random.default_rng(seed)
    mix = np.eye(d) + 0.3 * rng.standard_normal((d, d)) / np.sqrt(d)
    return rng.standard_normal((n, d)) @ mix + rng.standard_normal(d)


def scipy_fd(x: np.ndarray, y: np.ndarray) -> float:
    mu1, mu2 = x.mean(0), y.mean(0)
    s1, s2 = np.cov(x, rowvar=False), np.cov(y, rowvar=False)
    covmean = scipy.linalg.sqrtm(s1 @ s2).real
    return float(((mu1 - mu2) ** 2).sum() + np.trace(s1) + np.trace(s2) - 2 * np.trace(covmean))


def stats_of(x: np.ndarray, batch_size: int | None = None) -> FeatureStats:
    stats = FeatureStats(x.shape[1])
    t = torch.from_numpy(x)
    for i in range(0, len(x), batch_size or len(x)):
        stats.update(t[i: i + (batch_size or len(x))])
    return stats


# ----------------------------------------------------------------------------------------------
# the distance


def test_distance_of_a_set_to_itself_is_zero():
    x = features()
    s = stats_of(x)
    assert abs(frechet_distance(s.mean(), s.covariance(), s.mean(), s.covariance())) < 1e-6
    few = features(n=40, d=96, seed=1)  # rank-deficient covariance: N < D
    s = stats_of(few)
    assert abs(frechet_distance(s.mean(), s.covariance(), s.mean(), s.covariance())) < 1e-6


@pytest.mark.parametrize("change", ["shift", "rescale", "other"])
def test_distance_matches_scipy(change):
    x = features()
    y = {"shift": x + 0.25, "rescale": 1.5 * x, "other": features(seed=3)}[change]
    sx, sy = stats_of(x), stats_of(y)
    got = frechet_distance(sx.mean(), sx.covariance(), sy.mean(), sy.covariance())
    want = scipy_fd(x, y)
    assert want > 1e-3 and got == pytest.approx(want, rel=1e-6)
    # numpy inputs give the same
    assert frechet_distance(x.mean(0), np.cov(x, rowvar=False), y.mean(0), np.cov(y, rowvar=False)) == \
        pytest.approx(want, rel=1e-6)


def test_distance_rejects_bad_statistics():
    s = stats_of(features(d=8))
    with pytest.raises(ValueError, match="shapes"):
        frechet_distance(s.mean(), s.covariance(), s.mean()[:4], s.covariance())
    bad = s.covariance().clone()
    bad[0, 0] = float("nan")
    with pytest.raises(ValueError, match="NaN"):
        frechet_distance(s.mean(), bad, s.mean(), s.covariance())


# ----------------------------------------------------------------------------------------------
# statistics


def test_stats_match_numpy_and_do_not_depend_on_batch_size():
    x = features(n=257)
    ref = stats_of(x)
    assert ref.count == 257
    np.testing.assert_allclose(ref.mean().numpy(), x.mean(0), rtol=0, atol=1e-12)
    np.testing.assert_allclose(ref.covariance().numpy(), np.cov(x, rowvar=False), rtol=0, atol=1e-12)
    for batch_size in (1, 7, 64):
        s = stats_of(x, batch_size)
        assert s.count == 257
        torch.testing.assert_close(s.mean(), ref.mean(), rtol=0, atol=1e-12)
        torch.testing.assert_close(s.covariance(), ref.covariance(), rtol=0, atol=1e-12)


def test_float32_features_are_accumulated_in_float64():
    x = torch.from_numpy(features(n=100)).float()
    s = FeatureStats(x.shape[1]).update(x)
    assert s.sum.dtype == s.sum_outer.dtype == torch.float64
    np.testing.assert_allclose(s.covariance().numpy(), np.cov(x.double().numpy(), rowvar=False), atol=1e-12)


def test_stats_merged_over_ranks_equal_one_process_and_round_trip():
    x = features(n=301)
    ref = stats_of(x)
    a, b = stats_of(x[:120], 16), stats_of(x[120:], 50)  # two "ranks", uneven shares and batch sizes
    merged = a.merge(b)
    assert merged.count == 301
    torch.testing.assert_close(merged.mean(), ref.mean(), rtol=0, atol=1e-12)
    torch.testing.assert_close(merged.covariance(), ref.covariance(), rtol=0, atol=1e-12)
    again = FeatureStats.from_state_dict(merged.state_dict())
    assert again.count == 301 and torch.equal(again.sum_outer, merged.sum_outer)
    with pytest.raises(ValueError, match="dims differ"):
        ref.merge(FeatureStats(3))
    with pytest.raises(ValueError, match=r"\(B, 48\)"):
        ref.update(torch.zeros(2, 5))
    with pytest.raises(ValueError, match="at least 2"):
        FeatureStats(4).update(torch.zeros(1, 4)).covariance()


def _gloo_worker(rank: int, world: int, init: str, out: str, x: np.ndarray) -> None:
    with gloo_group(rank, world, init):
        share = np.array_split(x, [130])[rank]  # uneven shares
        stats = stats_of(share, batch_size=32 if rank else 9).all_reduce()
        torch.save(stats.state_dict(), f"{out}.{rank}")


def test_gloo_all_reduce_equals_one_process(tmp_path):
    x = features(n=200, d=16)
    init = f"file://{tmp_path / 'rendezvous'}"
    torch.multiprocessing.spawn(_gloo_worker, args=(2, init, str(tmp_path / "stats"), x), nprocs=2, join=True)
    ref = stats_of(x)
    for rank in range(2):
        s = FeatureStats.from_state_dict(torch.load(tmp_path / f"stats.{rank}", weights_only=True))
        assert s.count == 200
        torch.testing.assert_close(s.mean(), ref.mean(), rtol=0, atol=1e-12)
        torch.testing.assert_close(s.covariance(), ref.covariance(), rtol=0, atol=1e-12)


# ----------------------------------------------------------------------------------------------
# Inception-v3


@pytest.fixture(scope="module")
def inception_weights(tmp_path_factory) -> Path:
    """A random-init state dict of torch-fidelity's Inception-v3, saved as the real weights file is."""
    torch.manual_seed(0)
    path = tmp_path_factory.mktemp("inception") / "weights-inception-random.pth"
    torch.save(random_network().state_dict(), path)
    return path


@pytest.fixture(scope="module")
def inception(inception_weights) -> InceptionV3:
    return InceptionV3(weights_path=inception_weights)


def test_inception_features_from_a_local_weights_file(inception, inception_weights):
    import hashlib

    for shape in ((2, 1, 28, 28), (2, 3, 64, 64)):
        images = torch.rand(shape) * 2 - 1
        f = inception(images)
        assert f.shape == (shape[0], 2048) and f.dtype == torch.float32 and torch.isfinite(f).all()
    prov = inception.provenance
    assert prov["extractor"] == "inception_v3" and prov["feature"] == "2048"
    assert prov["weights_sha256"] == hashlib.sha256(inception_weights.read_bytes()).hexdigest()
    assert not any(p.requires_grad for p in inception.parameters())
    inception.train()
    assert not inception.training and not inception.net.training


def test_inception_grayscale_equals_repeated_rgb(inception):
    gray = torch.rand(1, 1, 28, 28) * 2 - 1
    assert torch.equal(inception(gray), inception(gray.expand(-1, 3, -1, -1)))


def test_inception_runs_fp32_without_tf32_and_restores_flags(inception):
    seen = {}

    def record(module, args):
        seen.update(matmul_tf32=torch.backends.cuda.matmul.allow_tf32, cudnn_tf32=torch.backends.cudnn.allow_tf32,
                    autocast=torch.is_autocast_enabled("cpu"), grad=torch.is_grad_enabled(),
                    training=module.training)

    images = torch.rand(1, 1, 28, 28) * 2 - 1
    old_precision, old_cudnn = torch.get_float32_matmul_precision(), torch.backends.cudnn.allow_tf32
    handle = inception.net.register_forward_pre_hook(record)
    try:
        plain = inception(images)
        for precision in ("high", "medium"):
            torch.set_float32_matmul_precision(precision)
            torch.backends.cudnn.allow_tf32 = True
            with torch.autocast("cpu", dtype=torch.bfloat16):
                under_autocast = inception(images)
            assert seen == {"matmul_tf32": False, "cudnn_tf32": False, "autocast": False, "grad": False,
                            "training": False}
            assert torch.get_float32_matmul_precision() == precision and torch.backends.cudnn.allow_tf32
            assert under_autocast.dtype == torch.float32 and torch.equal(under_autocast, plain)
    finally:
        handle.remove()
        torch.set_float32_matmul_precision(old_precision)
        torch.backends.cudnn.allow_tf32 = old_cudnn


def test_no_tf32_with_the_per_backend_precision_api():
    """Precision set with the fp32_precision API (where the global getter raises) is restored in that API."""
    code = (
        "import torch\n"
        "from diffusion_train.metrics.base import no_tf32\n"
        "b = torch.backends\n"
        "b.cuda.matmul.fp32_precision = 'tf32'; b.cudnn.conv.fp32_precision = 'tf32'\n"
        "with no_tf32():\n"
        "    assert (b.cuda.matmul.fp32_precision, b.cudnn.conv.fp32_precision) == ('ieee', 'ieee')\n"
        "assert (b.cuda.matmul.fp32_precision, b.cudnn.conv.fp32_precision) == ('tf32', 'tf32')\n"
    )
    if not hasattr(torch.backends.cuda.matmul, "fp32_precision"):
        pytest.skip("this torch has no fp32_precision API")
    res = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert res.returncode == 0, res.stderr


def test_inception_rejects_bad_images(inception):
    with pytest.raises(ValueError, match="B, 1 or 3"):
        inception(torch.zeros(1, 2, 8, 8))
    with pytest.raises(ValueError, match="NaN"):
        inception(torch.full((1, 1, 8, 8), float("nan")))


def test_missing_weights_file_is_one_line_naming_the_path(tmp_path):
    missing = tmp_path / "nowhere" / "inception.pth"
    with pytest.raises(FileNotFoundError) as e:
        InceptionV3(weights_path=missing)
    assert str(missing) in str(e.value) and "\n" not in str(e.value)


class Payload:
    """Anything that is not plain tensors: weights_only must refuse to unpickle it."""


def test_unsafe_or_wrong_weights_files_are_refused(tmp_path):
    pickled = tmp_path / "pickled.pth"
    torch.save({"conv.weight": torch.zeros(1), "extra": Payload()}, pickled)
    garbage = tmp_path / "garbage.pth"
    garbage.write_bytes(b"not a checkpoint at all")
    other = tmp_path / "other.pth"
    torch.save({"layer.weight": torch.zeros(3)}, other)
    for path, match in ((pickled, "weights_only=True"), (garbage, "weights_only=True"), (other, "missing keys")):
        with pytest.raises(ValueError, match=match) as e:
            InceptionV3(weights_path=path)
        assert str(path) in str(e.value) and "\n" not in str(e.value)


# ----------------------------------------------------------------------------------------------
# reference files and names


PROV = {"extractor": "inception_v3", "weights_sha256": "ab" * 32, "feature": "2048"}


def test_reference_round_trip(tmp_path):
    stats = stats_of(features(n=90, d=12))
    path = save_reference(tmp_path / "refs" / "ref.safetensors", stats,
                          {"dataset": "fashion_mnist", "split": "train", "resolution": 32, "resize": "pad",
                           "extractor": PROV})
    assert sorted(p.name for p in path.parent.iterdir()) == ["ref.safetensors"]  # no temp file left
    mu, sigma, prov = load_reference(path, dict(PROV))
    assert mu.dtype == sigma.dtype == torch.float64
    assert torch.equal(mu, stats.mean()) and torch.equal(sigma, stats.covariance())
    assert prov == {"dataset": "fashion_mnist", "split": "train", "resolution": 32, "resize": "pad", "count": 90,
                    "extractor": PROV}
    with pytest.raises(ValueError, match="count 5"):
        save_reference(path, stats, {"count": 5, "extractor": PROV})
    with pytest.raises(ValueError, match="'extractor'"):
        save_reference(path, stats, {"dataset": "x"})


def test_reference_of_another_extractor_is_refused(tmp_path):
    path = save_reference(tmp_path / "ref.safetensors", stats_of(features(n=30, d=4)), {"extractor": PROV})
    other = {**PROV, "weights_sha256": "cd" * 32}
    with pytest.raises(ReferenceMismatchError) as e:
        load_reference(path, other)
    msg = str(e.value)
    assert "\n" not in msg and str(path) in msg and "weights_sha256" in msg and "ab" * 32 in msg and "cd" * 32 in msg
    assert "feature" not in msg.replace("feature extractor", "")  # only the differing key is named
    with pytest.raises(ReferenceMismatchError, match="input expected 'uint8'"):
        load_reference(path, {**PROV, "input": "uint8"})


def test_missing_or_corrupt_reference_is_one_line(tmp_path):
    missing = tmp_path / "none.safetensors"
    with pytest.raises(FileNotFoundError, match=str(missing)):
        load_reference(missing, PROV)
    corrupt = tmp_path / "corrupt.safetensors"
    corrupt.write_bytes(b"\x10\x00\x00\x00\x00\x00\x00\x00{not json}")
    with pytest.raises(ValueError) as e:
        load_reference(corrupt, PROV)
    assert str(corrupt) in str(e.value) and "\n" not in str(e.value)


def test_metric_names():
    assert metric_name("inception_v3", 10_000) == "fid/inception_10k"
    assert metric_name("inception_v3", 50_000) == "fid/inception_50k"
    assert metric_name("fmnist_net", 2000) == "fd/fmnist_net_2k"
    assert metric_name("fmnist_net", 500) == "fd/fmnist_net_500"
    assert metric_name("fmnist_net", 2500) == "fd/fmnist_net_2.5k"
    assert metric_name("fmnist_net", 1234) == "fd/fmnist_net_1234"
    assert not metric_name("clip_vit", 50_000).startswith("fid")


def test_extractor_registry(inception_weights):
    assert {"inception", "fmnist_net"} <= set(EXTRACTORS)
    with pytest.raises(ValueError, match="unknown feature extractor 'nope'"):
        build_extractor("nope")
    assert isinstance(build_extractor("inception", inception_weights), InceptionV3)


# ----------------------------------------------------------------------------------------------
# scripts/fid_reference.py


def _run_fid_reference(tmp_path: Path, weights: Path, limit: int, batch_size: int, capsys) -> tuple:
    script = load_script("fid_reference")
    out = tmp_path / "refs" / "fmnist_train.safetensors"
    rc = script.main([f"out={out}", "dataset=fashion_mnist", "split=train", "extractor=inception",
                      f"weights={weights}", f"limit={limit}", f"batch_size={batch_size}", "resolution=32",
                      "device=cpu"])
    assert rc == 0, capsys.readouterr().err
    assert f"wrote {out}: {limit} images of fashion_mnist train" in capsys.readouterr().out
    return out


def _check_reference(out: Path, inception: InceptionV3, count: int) -> None:
    mu, sigma, prov = load_reference(out, inception.provenance)
    assert mu.shape == (2048,) and sigma.shape == (2048, 2048)
    assert {k: prov[k] for k in ("dataset", "split", "count", "resolution", "resize")} == \
        {"dataset": "fashion_mnist", "split": "train", "count": count, "resolution": 32, "resize": "pad"}
    assert prov["extractor"] == inception.provenance
    assert prov["extractor"]["weights_sha256"] == inception.weights_sha256


def test_fid_reference_script_on_a_few_images(tmp_path, inception_weights, inception, capsys):
    out = _run_fid_reference(tmp_path, inception_weights, limit=3, batch_size=2, capsys=capsys)
    _check_reference(out, inception, 3)
    # the same statistics as the extractor gives on the same images
    from diffusion_train.data.fashion_mnist import load_split, to_resolution

    images = to_resolution(load_split("train")[0][:3], 32, "pad").float() / 127.5 - 1
    stats = FeatureStats(2048).update(inception(images))
    mu, sigma, _ = load_reference(out, inception.provenance)
    torch.testing.assert_close(mu, stats.mean(), rtol=1e-6, atol=1e-12)
    torch.testing.assert_close(sigma, stats.covariance(), rtol=1e-6, atol=1e-20)


def test_a_fashion_mnist_reference_at_its_own_size_records_no_resize(tmp_path, inception_weights, inception, capsys):
    """At 28 px neither pad nor resize changes an image, yet the reference recorded resize=pad and was refused
    for runs with data.resize=resize (and the other way round)."""
    out = tmp_path / "ref28.safetensors"
    assert load_script("fid_reference").main([f"out={out}", "dataset=fashion_mnist", "extractor=inception",
                                              f"weights={inception_weights}", "limit=2", "resolution=28",
                                              "device=cpu"]) == 0, capsys.readouterr().err
    _, _, prov = load_reference(out, inception.provenance)
    assert prov["resolution"] == 28 and prov["resize"] is None
    for resize in ("pad", "resize"):
        check_reference_images(out, prov, 28, resize)
    capsys.readouterr()
    assert load_script("fid_reference").main([f"out={tmp_path / 'ref32.safetensors'}", "dataset=fashion_mnist",
                                              "extractor=inception", f"weights={inception_weights}", "limit=2",
                                              f"against={out}", "device=cpu"]) == 1  # against= another size
    assert "were computed from 28x28 images but the model makes 32x32" in capsys.readouterr().err
    assert not (tmp_path / "ref32.safetensors").exists()  # refused before the pass over the images


@pytest.mark.slow
def test_fid_reference_script_on_64_fashion_mnist_images(tmp_path, inception_weights, inception, capsys):
    out = _run_fid_reference(tmp_path, inception_weights, limit=64, batch_size=32, capsys=capsys)
    _check_reference(out, inception, 64)


def test_fid_reference_script_usage_errors(tmp_path, capsys):
    script = load_script("fid_reference")
    for args, match in ((["dataset=fashion_mnist"], "out="), ([f"out={tmp_path}/r.st", "dataset=imagenet"], "dataset="),
                        ([f"out={tmp_path}/r.st", "dataset=shards"], "sources="),
                        ([f"out={tmp_path}/r.st", "dataset=fashion_mnist", "extractor=clip"], "extractor=clip"),
                        ([f"out={tmp_path}/r.st", "dataset=fashion_mnist", f"weights={tmp_path}/w.pth"],
                         f"{tmp_path}/w.pth")):
        assert script.main(args) == 1
        err = capsys.readouterr().err.strip().splitlines()
        assert len(err) == 1 and err[0].startswith("error:") and match in err[0], (args, err)


def test_fid_equals_torchmetrics_fid_with_the_same_weights_file(inception, inception_weights):
    """torchmetrics' FrechetInceptionDistance with ``antialias=False`` (the original FID's TF1 bilinear resize;
    its default resizes otherwise), given the same weights file and images, sees the same features image by
    image (same network, same conversion of the images), and its distance agrees with ours on the same
    statistics."""
    from torchmetrics.image.fid import FrechetInceptionDistance, _compute_fid

    gen = torch.Generator().manual_seed(0)
    real = torch.randint(0, 256, (12, 3, 32, 32), dtype=torch.uint8, generator=gen)
    metric = FrechetInceptionDistance(feature=2048, feature_extractor_weights_path=str(inception_weights),
                                      antialias=False)
    metric.update(real, real=True)
    theirs_each = metric.inception(real).double()
    ours_each = inception(real.float() / 127.5 - 1).double()
    ours = FeatureStats(2048).update(ours_each)
    assert int(metric.real_features_num_samples) == ours.count == 12
    scale = float(theirs_each.abs().max())  # a random network's features are ~1e-7
    torch.testing.assert_close(ours_each, theirs_each, rtol=0, atol=1e-6 * scale)
    torch.testing.assert_close(ours.mean(), metric.real_features_sum.double() / 12, rtol=0, atol=1e-6 * scale)
    for changed in (real.flip(-1), real.flip(1)):  # a flip or a channel swap is seen at this tolerance
        assert float((inception(changed.float() / 127.5 - 1).double() - theirs_each).abs().max()) > 1e-3 * scale
    # (their spread, ~1e-16 in variance, drowns in the rounding of either covariance: not compared)
    a, b = stats_of(features(n=400, d=24, seed=1)), stats_of(features(n=400, d=24, seed=2) * 1.3 + 0.2)
    theirs = float(_compute_fid(a.mean(), a.covariance(), b.mean(), b.covariance()))
    assert math.isclose(frechet_distance(a.mean(), a.covariance(), b.mean(), b.covariance()), theirs, rel_tol=1e-6)
