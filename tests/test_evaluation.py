"""Metrics of generated images: the shared evaluation, the training callback and ``diffusion-eval``."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import torch

from conftest import FMNIST, TINY, compose_train, gloo_group
from diffusion_train.diffusion.samplers import Sampler
from diffusion_train.metrics.fid import FeatureStats, ReferenceMismatchError, frechet_distance, save_reference
from diffusion_train.metrics.fmnist_net import FMNISTNet
from diffusion_train.metrics.generated import evaluate_generated
from diffusion_train.train import train
from diffusion_train.training.build import build_module


def _module_and_sampler():
    cfg = compose_train(FMNIST, None)
    from hydra.utils import instantiate

    return build_module(cfg).eval(), instantiate(cfg.sampler, _convert_="all")


def test_generated_metrics_do_not_depend_on_the_batch_size(extractor_files):
    weights, reference = extractor_files
    from diffusion_train.metrics.fid import load_reference

    net = FMNISTNet.load(weights)
    mu, sigma, _ = load_reference(reference, net.provenance)
    module, sampler = _module_and_sampler()
    a, images = evaluate_generated(module, net, sampler, 12, (mu, sigma), batch_size=5, keep=4)
    b, _ = evaluate_generated(module, net, sampler, 12, (mu, sigma), batch_size=12)
    assert set(a) == {"fd/fmnist_net_12", "class_accuracy/fmnist_net_12"} and images.shape == (4, 1, 32, 32)
    assert math.isclose(a["fd/fmnist_net_12"], b["fd/fmnist_net_12"], rel_tol=1e-6)
    assert a["class_accuracy/fmnist_net_12"] == b["class_accuracy/fmnist_net_12"]
    # the same set by hand: image i from seed i, class i mod 10
    inputs = module.conditioner.sample_inputs(12)
    assert inputs["label"].tolist() == [i % 10 for i in range(12)]
    from diffusion_train.diffusion import per_image_generators, randn

    gens = per_image_generators(list(range(12)))
    images = module.sample(randn((12, 1, 32, 32), gens), inputs, sampler, 1.0, generator=gens)
    feats = net(images)
    stats = FeatureStats(net.feature_dim).update(feats)
    expected = frechet_distance(stats.mean(), stats.covariance(), mu, sigma)
    assert math.isclose(a["fd/fmnist_net_12"], expected, rel_tol=1e-6)  # batches of 5 vs 12: float32 rounding
    hits = (net.logits(images).argmax(1) == inputs["label"]).sum().item() / 12
    assert math.isclose(a["class_accuracy/fmnist_net_12"], hits, rel_tol=1e-12)


def test_a_nonfinite_image_gives_a_nan_distance_and_is_counted(extractor_files, monkeypatch):
    """A diverging model's NaN image must not stop a training run in its FID callback."""
    weights, reference = extractor_files
    from diffusion_train.metrics.fid import load_reference

    net = FMNISTNet.load(weights)
    mu, sigma, _ = load_reference(reference, net.provenance)
    module, sampler = _module_and_sampler()
    clean, _ = evaluate_generated(module, net, sampler, 6, (mu, sigma), batch_size=4)
    sample_seeded = module.sample_seeded

    def one_nan(indices, *args, **kwargs):  # image 4 gets a NaN pixel
        images = sample_seeded(indices, *args, **kwargs)
        images[[k for k, i in enumerate(indices) if i == 4], 0, 3, 5] = float("nan")
        return images

    monkeypatch.setattr(module, "sample_seeded", one_nan)
    metrics, kept = evaluate_generated(module, net, sampler, 6, (mu, sigma), batch_size=4, keep=6)
    assert math.isnan(metrics["fd/fmnist_net_6"]) and metrics["nonfinite_images_6"] == 1
    assert "nonfinite_images_6" not in clean
    # image 4 counts as a miss: the accuracy is that of the clean run without image 4's hit, if it had one
    hit4 = net.logits(sample_seeded([4], module.conditioner.sample_inputs(6), sampler)).argmax(1).item() == 4 % 10
    assert metrics["class_accuracy/fmnist_net_6"] * 6 == pytest.approx(clean["class_accuracy/fmnist_net_6"] * 6 - hit4)
    assert torch.isfinite(kept).all()


def test_the_callback_logs_fd_and_class_accuracy_during_training(extractor_files, tmp_path):
    weights, reference = extractor_files
    run = tmp_path / "run"
    cfg = compose_train(FMNIST + ["+callbacks/fid=fmnist_net", f"callbacks.fid.weights={weights}",
                                  f"callbacks.fid.reference={reference}", "callbacks.fid.num_samples=10",
                                  "callbacks.fid.every_n_steps=2", "callbacks.fid.batch_size=4"], run)
    train(cfg, run)
    lines = [json.loads(line) for line in (run / "eval/metrics.jsonl").read_text().splitlines()]
    assert [line["step"] for line in lines] == [2, 4]
    assert all(line["fd/fmnist_net_10"] > 0 and 0 <= line["class_accuracy/fmnist_net_10"] <= 1 for line in lines)
    assert "fd/fmnist_net_10" in (run / "metrics.csv").read_text().splitlines()[0]
    summary = json.loads((run / "summary.json").read_text())["metrics"]  # what scaling_report.py fits
    assert [h["step"] for h in summary["fd/fmnist_net_10"]["history"]] == [2, 4]
    assert summary["fd/fmnist_net_10"]["final"] == pytest.approx(lines[-1]["fd/fmnist_net_10"], rel=1e-6)
    state = torch.load(run / "checkpoints/last.ckpt", weights_only=True, map_location="cpu")["state_dict"]
    assert not any("extractor" in k or k.startswith("head.") for k in state), "the extractor stays out of checkpoints"
    # resumed to step 6: the evaluations up to the checkpoint are kept, the new one appended
    train(compose_train(FMNIST + ["+callbacks/fid=fmnist_net", f"callbacks.fid.weights={weights}",
                                  f"callbacks.fid.reference={reference}", "callbacks.fid.num_samples=10",
                                  "callbacks.fid.every_n_steps=2", "callbacks.fid.batch_size=4",
                                  "trainer.max_steps=6"], run), run)
    steps = [json.loads(line)["step"] for line in (run / "eval/metrics.jsonl").read_text().splitlines()]
    assert steps == [2, 4, 6]
    summary = json.loads((run / "summary.json").read_text())["metrics"]["fd/fmnist_net_10"]
    assert [h["step"] for h in summary["history"]] == [2, 4, 6]


def test_a_rank_with_fewer_images_samples_and_asks_to_stop_as_often_as_the_others(monkeypatch):
    """10 images on 3 ranks in batches of 3: rank 0 has 4 (2 batches), rank 1 has 3 (1 batch). Rank 1 still
    samples twice (the second time one unused image: a sharded model's forward passes are collective) and asks
    twice whether to stop (every rank joins the same number of agreements); its statistics hold its 3 images."""
    import diffusion_train.metrics.generated as generated

    module, sampler = _module_and_sampler()
    net = FMNISTNet(channels=(8, 16), feature_dim=16).eval()
    monkeypatch.setattr(torch.distributed, "all_reduce", lambda *a, **k: None)  # each rank's own counts
    real_sample, real_features = module.sample_seeded, net.forward
    for rank, images in ((0, 4), (1, 3)):
        monkeypatch.setattr(generated, "rank_world", lambda rank=rank: (rank, 3))
        asked, sampled, featured = [], [], []
        monkeypatch.setattr(module, "sample_seeded",
                            lambda idx, *a, **k: sampled.append(list(idx)) or real_sample(idx, *a, **k))
        monkeypatch.setattr(net, "forward", lambda x: featured.append(len(x)) or real_features(x))
        evaluate_generated(module, net, sampler, 10, batch_size=3, stop=lambda: asked.append(1) or False)
        assert len(asked) == 2 and len(sampled) == 2
        assert [i for idx in sampled for i in idx][:images] == list(range(rank, 10, 3))
        assert sum(featured) == images  # the unused image is not counted
    stopped = []
    assert evaluate_generated(module, net, sampler, 10, batch_size=3, stop=lambda: stopped.append(1) or True) is None
    assert stopped == [1]


def test_a_reference_of_another_extractor_is_refused_before_training(extractor_files, tmp_path):
    weights, reference = extractor_files
    other = FMNISTNet(channels=(8, 16), feature_dim=16).save(tmp_path / "other.safetensors")  # other weights
    run = tmp_path / "run"
    cfg = compose_train(FMNIST + ["+callbacks/fid=fmnist_net", f"callbacks.fid.weights={other}",
                                  f"callbacks.fid.reference={reference}"], run)
    with pytest.raises(ReferenceMismatchError, match=r"weights_sha256"):
        train(cfg, run)
    assert not (run / "checkpoints").exists()


def test_a_reference_of_another_resolution_or_resize_is_refused_before_training(extractor_files, tmp_path):
    """The model makes 32x32 samples of Fashion-MNIST padded from 28 (data.resize=pad); a reference recorded as
    made from 64x64 images, or from images enlarged to 32 (resize=resize), is refused; one of 32x32 padded (or one
    that records neither) is taken."""
    weights, _ = extractor_files
    net = FMNISTNet.load(weights)
    stats = FeatureStats(net.feature_dim).update(net(torch.rand(8, 1, 32, 32) * 2 - 1))
    run = tmp_path / "run"
    refused = {(64, "pad"): r"computed from 64x64 images but the model makes 32x32 samples: compute a reference at "
                            r"resolution=32",
               (32, "resize"): r"brought to size with resize=resize, the model learned images made with "
                               r"data.resize=pad: compute a reference with resize=pad"}
    for resolution, resize in (*refused, (32, "pad")):
        reference = save_reference(tmp_path / f"ref{resolution}{resize}.safetensors", stats,
                                   {"dataset": "random", "split": "train", "resolution": resolution, "resize": resize,
                                    "extractor": net.provenance})
        cfg = compose_train(FMNIST + ["+callbacks/fid=fmnist_net", f"callbacks.fid.weights={weights}",
                                      f"callbacks.fid.reference={reference}", "trainer.max_steps=1",
                                      "callbacks.fid.every_n_steps=100", "callbacks.fid.num_samples=2"], run)
        if (resolution, resize) in refused:
            with pytest.raises(ReferenceMismatchError, match=refused[resolution, resize]):
                train(cfg, run)
            assert not (run / "checkpoints").exists()
        else:
            train(cfg, run)
            assert (run / "checkpoints/last.ckpt").is_file()


@pytest.mark.slow
def test_diffusion_eval_writes_metrics_and_a_grid(extractor_files, tmp_path):
    from test_train import _run_cli

    weights, reference = extractor_files
    run = tmp_path / "run"
    train(compose_train(FMNIST + ["trainer.max_steps=2"], run), run)
    out = tmp_path / "eval"
    args = [f"ckpt={run / 'checkpoints/last.ckpt'}", f"out_dir={out}", "extractor=fmnist_net",
            f"extractor_weights={weights}", f"reference={reference}", "num_samples=6", "batch_size=4",
            "sampler.steps=2", "grid_images=4", "ncol=2"]
    done = _run_cli(args, tmp_path, module="diffusion_train.evaluate")
    assert done.returncode == 0, done.stderr[-2000:]
    record = json.loads((out / "metrics.json").read_text())
    assert set(record["metrics"]) == {"fd/fmnist_net_6", "class_accuracy/fmnist_net_6"}
    assert record["reference"]["dataset"] == "random" and record["extractor"]["extractor"] == "fmnist_net"
    assert record["loaded_weights"] == "ema_0.999"  # weights=ema: the run's sampling decay
    assert (out / "grid.png").is_file()
    bad = _run_cli(args[:-4] + ["num_samples=1"], tmp_path, module="diffusion_train.evaluate")
    errors = [line for line in bad.stderr.splitlines() if line.startswith("error:")]
    assert bad.returncode == 1 and errors == ["error: num_samples=1: give a whole number >= 2"]


def test_sampler_type_is_what_the_evaluation_takes():
    _, sampler = _module_and_sampler()
    assert isinstance(sampler, Sampler)


TINY_CLIP = {"embed_dim": 32, "vision_cfg": {"image_size": 32, "layers": 1, "width": 64, "patch_size": 8},
             "text_cfg": {"context_length": 77, "vocab_size": 49408, "width": 32, "heads": 2, "layers": 1}}


def _clip_score(**kw):
    from diffusion_train.metrics.clip_score import CLIPScore

    torch.manual_seed(0)
    return CLIPScore(model_name="dt-clip-score-tiny", model_cfg=TINY_CLIP, **kw)


def test_clip_score_is_the_clipped_scaled_cosine_and_loads_a_local_file(tmp_path):
    clip = _clip_score(pretrained=None)
    images = torch.rand(3, 1, 28, 28) * 2 - 1
    prompts = ["a bag", "a sneaker", "a shirt"]
    scores = clip(images, prompts)
    model = clip.model
    x = torch.nn.functional.interpolate((images.expand(-1, 3, -1, -1) + 1) / 2, size=(32, 32), mode="bicubic",
                                       antialias=True, align_corners=False).clamp(0, 1)
    x = (x - clip.mean) / clip.std
    img = torch.nn.functional.normalize(model.encode_image(x), dim=-1)
    txt = torch.nn.functional.normalize(model.encode_text(clip.tokenizer(prompts)), dim=-1)
    expected = (100 * (img * txt).sum(-1)).clamp(min=0).double()
    assert scores.dtype == torch.float64 and torch.allclose(scores, expected, atol=1e-4)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        assert torch.equal(clip(images, prompts), scores), "fp32 whatever the caller's autocast"
    path = tmp_path / "clip.pt"
    torch.save(model.state_dict(), path)
    loaded = _clip_score(pretrained=str(path))
    assert torch.equal(loaded(images, prompts), scores) and len(loaded.provenance["sha256"]) == 64
    with pytest.raises(ValueError, match="3 images but 2 prompts"):
        clip(images, prompts[:2])
    with pytest.raises(FileNotFoundError, match="does not exist"):
        _clip_score(pretrained=str(tmp_path / "missing.pt"))


def test_text_models_get_a_clip_score_that_does_not_depend_on_the_batch_size(extractor_files):
    from hydra.utils import instantiate

    from diffusion_train.metrics.fid import load_reference

    weights, reference = extractor_files
    cfg = compose_train([o for o in TINY if not o.startswith("data=")] + [
        "data=fashion_mnist_captions", "data.batch_size=4", "data.val_size=8", "conditioning=clip_tiny"], None)
    module, sampler = build_module(cfg).eval(), instantiate(cfg.sampler, _convert_="all")
    net = FMNISTNet.load(weights)
    ref = load_reference(reference, net.provenance)[:2]
    clip = _clip_score(pretrained=None)
    prompts = ["a photo of a bag", "a sneaker", "a shirt"]
    a, _ = evaluate_generated(module, net, sampler, 6, ref, batch_size=4, prompts=prompts, clip=clip)
    b, _ = evaluate_generated(module, net, sampler, 6, ref, batch_size=6, prompts=prompts, clip=clip)
    name = "clip_score/dt-clip-score-tiny_6"
    assert set(a) == {"fd/fmnist_net_6", name} and 0 <= a[name] <= 100
    assert math.isclose(a[name], b[name], rel_tol=1e-6)  # an fp32 network: kernels differ with the batch shape
    assert math.isclose(a["fd/fmnist_net_6"], b["fd/fmnist_net_6"], rel_tol=1e-6)


def _eval_worker(rank: int, world: int, init: str, out: str, weights: str, reference: str) -> None:
    from diffusion_train.metrics.fid import load_reference

    with gloo_group(rank, world, init):
        torch.manual_seed(0)  # the same model on every rank, as DDP makes it
        module, sampler = _module_and_sampler()
        net = FMNISTNet.load(weights)
        metrics, _ = evaluate_generated(module, net, sampler, 7, load_reference(reference, net.provenance)[:2],
                                        batch_size=2 + rank)
        Path(f"{out}.{rank}").write_text(json.dumps(metrics))


@pytest.mark.slow
def test_generated_metrics_over_two_processes_equal_one_process(extractor_files, tmp_path):
    """Rank r samples images r, r + 2, ... (7 images: uneven shares, other batch sizes per rank); the
    summed statistics and counts give the one-process result."""
    from diffusion_train.metrics.fid import load_reference

    weights, reference = extractor_files
    init = f"file://{tmp_path / 'rendezvous'}"
    torch.multiprocessing.spawn(_eval_worker, args=(2, init, str(tmp_path / "metrics"), str(weights), str(reference)),
                                nprocs=2, join=True)
    torch.manual_seed(0)
    module, sampler = _module_and_sampler()
    net = FMNISTNet.load(weights)
    single, _ = evaluate_generated(module, net, sampler, 7, load_reference(reference, net.provenance)[:2])
    for rank in range(2):
        ranked = json.loads((tmp_path / f"metrics.{rank}").read_text())
        assert set(ranked) == set(single)
        assert all(math.isclose(ranked[k], single[k], rel_tol=1e-6) for k in single), (ranked, single)


def test_fid_reference_against_prints_the_distance_between_two_references(extractor_files, tmp_path, capsys):
    from conftest import load_script
    from diffusion_train.metrics.fid import load_reference

    weights, _ = extractor_files
    script = load_script("fid_reference")
    common = ["dataset=fashion_mnist", "extractor=fmnist_net", f"weights={weights}", "limit=40", "device=cpu"]
    assert script.main([f"out={tmp_path / 'train.safetensors'}", "split=train", *common]) == 0
    assert script.main([f"out={tmp_path / 'test.safetensors'}", "split=test", *common,
                        f"against={tmp_path / 'train.safetensors'}"]) == 0
    net = FMNISTNet.load(weights)
    a = load_reference(tmp_path / "train.safetensors", net.provenance)
    b = load_reference(tmp_path / "test.safetensors", net.provenance)
    line = [ln for ln in capsys.readouterr().out.splitlines() if ln.startswith("fd/fmnist_net_40 of fashion_mnist test")]
    assert len(line) == 1 and line[0].endswith(f"{frechet_distance(b[0], b[1], a[0], a[1]):.4f}")


def test_a_text_model_without_prompts_for_the_callback_is_refused_before_training(extractor_files, tmp_path):
    weights, reference = extractor_files
    run = tmp_path / "run"
    cfg = compose_train([o for o in TINY if not o.startswith("data=")] + [
        "data=fashion_mnist_captions", "data.batch_size=4", "data.val_size=8", "conditioning=clip_tiny",
        "+callbacks/fid=fmnist_net", f"callbacks.fid.weights={weights}", f"callbacks.fid.reference={reference}"], run)
    with pytest.raises(ValueError, match=r"callbacks.sample_grid: the model is conditioned on text \('caption'\): "
                                         r"give callbacks.sample_grid.prompts=\[\.\.\.\]"):
        train(cfg, run)
    cfg.callbacks.sample_grid.prompts = ["a bag"]
    with pytest.raises(ValueError, match=r"callbacks.fid: the model is conditioned on text \('caption'\): "
                                         r"give callbacks.fid.prompts=\[\.\.\.\]"):
        train(cfg, run)
    assert not (run / "checkpoints").exists()


def test_a_missing_extractor_file_is_named_by_the_option_that_sets_it(tmp_path):
    """diffusion-eval sets the feature net's file with extractor_weights (its weights= picks the EMA)."""
    from hydra import compose, initialize_config_dir

    from conftest import CONFIG_DIR
    from diffusion_train.evaluate import evaluate

    with initialize_config_dir(config_dir=CONFIG_DIR, version_base="1.3"):
        cfg = compose("evaluate", overrides=[f"ckpt={tmp_path / 'last.ckpt'}", f"out_dir={tmp_path / 'eval'}",
                                             "extractor=fmnist_net", f"reference={tmp_path / 'ref.safetensors'}"])
    with pytest.raises(ValueError, match=r"^extractor fmnist_net needs extractor_weights=PATH \(a file written by"):
        evaluate(cfg)


def test_an_inception_download_that_fails_names_the_option_for_the_file(tmp_path, monkeypatch):
    import torch

    from diffusion_train.metrics.fid import build_extractor

    def offline(url, dst, *args, **kwargs):
        raise OSError("network unreachable")

    monkeypatch.setattr(torch.hub, "get_dir", lambda: str(tmp_path))
    monkeypatch.setattr(torch.hub, "download_url_to_file", offline)
    with pytest.raises(OSError, match=r"could not download the Inception-v3 .* its path with extractor_weights=PATH$"):
        build_extractor("inception", None, option="extractor_weights")
