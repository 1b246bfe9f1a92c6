"""FMNISTNet (the Fashion-MNIST feature net of FD-FMNIST and class accuracy): the FeatureExtractor
contract, weights files and their errors, and scripts/train_feature_net.py on real Fashion-MNIST."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

from conftest import load_script
from diffusion_train.conditioning.weights import tensors_sha256
from diffusion_train.data.fashion_mnist import load_split
from diffusion_train.metrics.base import FeatureExtractor
from diffusion_train.metrics.fmnist_net import FMNISTNet, to_input

ROOT = Path(__file__).resolve().parent.parent
SCRIPT = ROOT / "scripts" / "train_feature_net.py"
TINY_ARCH = ["channels=[8,16]", "feature_dim=32"]


@pytest.fixture(scope="module")
def script():
    return load_script("train_feature_net")


def _net(seed: int = 0) -> FMNISTNet:
    """A random FMNISTNet whose BatchNorm running statistics moved away from their defaults."""
    torch.manual_seed(seed)
    net = FMNISTNet(channels=(8, 16), feature_dim=32)
    net.train()
    with torch.no_grad():
        net.train_logits(torch.rand(16, 1, 28, 28) * 2 - 1)
    return net.eval()


def _images(n: int = 4, seed: int = 1) -> torch.Tensor:
    return torch.rand(n, 1, 28, 28, generator=torch.Generator().manual_seed(seed)) * 2 - 1


def test_forward_contract_shapes_dtypes_and_input_rule():
    net = _net()
    assert isinstance(net, FeatureExtractor) and net.name == "fmnist_net" and net.feature_dim == 32
    x = _images()
    feats = net(x)
    assert feats.shape == (4, 32) and feats.dtype == torch.float32 and not feats.requires_grad
    padded = F.pad(x, (2, 2, 2, 2), value=-1.0)  # the project's 28 -> 32 black padding
    assert torch.equal(net(padded), feats)
    assert torch.allclose(net(x.expand(-1, 3, -1, -1)), feats, atol=1e-5)  # gray RGB -> the same luma
    big = torch.rand(3, 3, 64, 64) * 2 - 1
    assert net(big).shape == (3, 32) and net(big).dtype == torch.float32
    assert torch.equal(to_input(big), F.interpolate(
        (big * torch.tensor([0.299, 0.587, 0.114]).view(1, 3, 1, 1)).sum(1, keepdim=True), size=(28, 28),
        mode="bilinear", antialias=True, align_corners=False))
    assert net(x.double()).dtype == torch.float32
    assert net.logits(x).shape == (4, 10) and net.logits(x).dtype == torch.float32
    for bad in (torch.zeros(2, 2, 28, 28), torch.zeros(28, 28)):
        with pytest.raises(ValueError, match="C of 1 or 3"):
            net(bad)


def test_forward_is_eval_mode_and_keeps_the_callers_mode():
    net = _net()
    x = _images(8)
    ref = net(x)
    net.train()
    assert torch.equal(net(x), ref)  # BatchNorm running statistics and no dropout, whatever the mode
    assert torch.allclose(net(x[:1]), ref[:1], atol=1e-6)  # no batch dependence
    assert net.training


def test_features_are_fp32_and_unchanged_under_autocast():
    net = _net()
    x = _images(6)
    ref, ref_logits = net(x), net.logits(x)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        feats, logits = net(x), net.logits(x)
    assert feats.dtype == logits.dtype == torch.float32
    assert torch.equal(feats, ref) and torch.equal(logits, ref_logits)
    matmul = torch.get_float32_matmul_precision()
    net(x)
    assert torch.get_float32_matmul_precision() == matmul


def test_save_load_round_trip_keeps_features_and_provenance(tmp_path):
    net = _net()
    x = _images(5)
    path = net.save(tmp_path / "sub" / "fmnist.safetensors",
                    extra={"test_accuracy": 0.5, "training": {"epochs": 1, "seed": 0}})
    assert path.is_file() and not path.with_name(path.name + ".tmp").exists()
    loaded = FMNISTNet.load(path)
    assert not loaded.training and loaded.config == net.config
    assert torch.equal(loaded(x), net(x)) and torch.equal(loaded.logits(x), net.logits(x))
    prov = loaded.provenance
    assert prov["extractor"] == "fmnist_net" and prov["feature_dim"] == 32
    assert prov["weights_sha256"] == tensors_sha256(net) and len(prov["weights_sha256"]) == 64
    assert prov["input"] == "28x28 gray; 32x32 inputs centre-cropped" and prov["test_accuracy"] == 0.5
    assert loaded.metadata["training"] == {"epochs": 1, "seed": 0}
    assert {k: v for k, v in prov.items() if k != "test_accuracy"} == \
        {k: v for k, v in net.provenance.items() if k != "test_accuracy"}
    assert _net(seed=1).provenance["weights_sha256"] != prov["weights_sha256"]


def test_missing_or_corrupt_weights_give_a_one_line_error_naming_the_path(tmp_path):
    missing = tmp_path / "nope.safetensors"
    with pytest.raises(FileNotFoundError) as e:
        FMNISTNet.load(missing)
    assert str(missing) in str(e.value) and "\n" not in str(e.value)
    assert "scripts/train_feature_net.py out=" in str(e.value)

    garbage = tmp_path / "garbage.safetensors"
    garbage.write_bytes(b"\x00\x01 not a safetensors file" * 10)
    good = _net().save(tmp_path / "good.safetensors")
    truncated = tmp_path / "truncated.safetensors"
    truncated.write_bytes(good.read_bytes()[: good.stat().st_size // 2])
    from safetensors.torch import save_file

    foreign = tmp_path / "foreign.safetensors"
    save_file({"w": torch.zeros(2)}, str(foreign))
    for path in (garbage, truncated, foreign):
        with pytest.raises(ValueError) as e:
            FMNISTNet.load(path)
        assert str(path) in str(e.value) and "\n" not in str(e.value), str(e.value)


@pytest.fixture(scope="module")
def fmnist():
    """(train images, train labels, held-out test images, test labels): real Fashion-MNIST, in [-1, 1]."""
    tr_x, tr_y = load_split("train")
    te_x, te_y = load_split("test")
    return (tr_x[:1024].float() / 127.5 - 1, tr_y[:1024], te_x[:1000].float() / 127.5 - 1, te_y[:1000])


def test_a_briefly_trained_net_beats_chance_on_held_out_images(script, fmnist):
    tr_x, tr_y, te_x, te_y = fmnist
    torch.manual_seed(0)
    net = FMNISTNet(channels=(8, 16), feature_dim=32)
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # small convolutions: one thread is faster on shared cores
    try:
        history = script.train_feature_net(net, tr_x[:1024], tr_y[:1024], epochs=2, batch_size=32, lr=3e-3,
                                           generator=torch.Generator().manual_seed(0), log=None)
    finally:
        torch.set_num_threads(threads)
    assert [h["epoch"] for h in history] == [1, 2] and history[-1]["loss"] < history[0]["loss"]
    accuracy = net.class_accuracy(te_x, te_y, batch_size=300)
    assert accuracy > 0.5, accuracy  # chance is 0.1
    padded = F.pad(te_x, (2, 2, 2, 2), value=-1.0)
    assert net.class_accuracy(padded, te_y) == accuracy
    with pytest.raises(ValueError, match="labels"):
        net.class_accuracy(te_x[:3], te_y[:2])


def test_training_is_deterministic_given_the_seed(script, fmnist):
    tr_x, tr_y = fmnist[0][:256], fmnist[1][:256]
    shas = []
    for _ in range(2):
        torch.manual_seed(3)
        net = FMNISTNet(channels=(8,), feature_dim=16)
        script.train_feature_net(net, tr_x, tr_y, epochs=1, batch_size=64, lr=1e-3,
                                 generator=torch.Generator().manual_seed(3), log=None)
        shas.append(tensors_sha256(net))
    assert shas[0] == shas[1]


def test_augment_flips_and_shifts_with_black_fill(script):
    x = torch.rand(64, 1, 28, 28) * 2 - 1
    out = script.augment(x, torch.Generator().manual_seed(0))
    assert out.shape == x.shape and out.min() >= -1 and out.max() <= 1
    assert not torch.equal(out, x)
    for i in range(8):  # each image is its (maybe flipped) self shifted by at most 2 pixels
        candidates = [F.pad(src, (2, 2, 2, 2), value=-1.0)[:, 2 + dy: 30 + dy, 2 + dx: 30 + dx]
                      for src in (x[i], x[i].flip(-1)) for dy in range(-2, 3) for dx in range(-2, 3)]
        assert any(torch.equal(out[i], c) for c in candidates)


def _run(args: list[str], cwd: Path) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, str(SCRIPT), *args], cwd=cwd, capture_output=True, text=True, timeout=300)


def test_script_refuses_to_save_below_min_accuracy(tmp_path):
    out = tmp_path / "net.safetensors"
    r = _run([f"out={out}", "limit=128", "epochs=1", "batch_size=64", "min_accuracy=0.99", *TINY_ARCH], tmp_path)
    assert r.returncode == 1, r.stderr
    lines = r.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: test accuracy 0.") and "min_accuracy=0.99" in lines[0]
    assert not out.exists()


@pytest.mark.slow
def test_script_saves_with_min_accuracy_zero_and_checks_arguments(tmp_path, script):
    out = tmp_path / "net.safetensors"
    r = _run([f"out={out}", "limit=128", "epochs=1", "batch_size=64", "min_accuracy=0", *TINY_ARCH], tmp_path)
    assert r.returncode == 0, r.stderr
    net = FMNISTNet.load(out)
    assert net.config["channels"] == [8, 16] and net.feature_dim == 32
    assert 0.0 <= net.metadata["test_accuracy"] <= 1.0 and net.metadata["test_images"] == 10000
    assert net.metadata["training"]["train_images"] == 128 and net.metadata["training"]["limit"] == 128
    assert f"test accuracy {net.metadata['test_accuracy']:.4f}" in r.stdout
    for bad in (["epochs=2"], [f"out={out}", "epochs=0"], [f"out={out}", "bogus=1"], [f"out={out}", "lr=x"],
                [f"out={out}", "min_accuracy=2"]):
        with pytest.raises(script.UsageError):
            script.parse_args(bad)
    assert script.main([f"out={out}", "epochs=zero"]) == 2
