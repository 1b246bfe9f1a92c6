"""DreamBooth (finetune/dreambooth.py): instance and class images paired in each batch, class images made
before training (and a waiting process stopped by a signal), and scripts/dreambooth_eval.py."""

from __future__ import annotations

import json
import os
import signal
from pathlib import Path

import numpy as np
import pytest
import torch

from conftest import instantiate_data
from diffusion_train.train import train
from diffusion_train.training.preemption import find_preemption


def write_images(folder: Path, n: int, seed: int, exist_ok: bool = False) -> None:
    from PIL import Image

    folder.mkdir(parents=True, exist_ok=exist_ok)
    rng = np.random.default_rng(seed)
    for i in range(n):
        Image.fromarray(rng.integers(0, 256, (20, 24, 3), dtype=np.uint8)).save(folder / f"img{i}.png")


def dreambooth_overrides(tmp_path, *extra: str) -> list[str]:
    return ["data=dreambooth", f"data.instance_dir={tmp_path / 'subject'}", "data.instance_prompt=a photo of sks thing",
            "data.class_prompt=a photo of a thing", "data.num_class_images=5", "data.batch_size=2",
            "data.resolution=16", "conditioning=t5_tiny", "data.prior_loss_weight=0.5",
            "callbacks.sample_grid.prompts=[a photo of sks thing]", *extra]


def test_dreambooth_batches_pair_instance_and_class_images(tmp_path):
    from diffusion_train.finetune.dreambooth import DreamBoothBatches

    instance = torch.zeros(3, 1, 4, 4, dtype=torch.uint8)
    klass = torch.full((5, 1, 4, 4), 255, dtype=torch.uint8)
    batches = DreamBoothBatches(instance, "a sks dog", klass, "a dog", 0.25, "train")
    assert len(batches) == 5
    batch = batches[[1, 4]]
    assert batch["caption"] == ["a sks dog"] * 2 + ["a dog"] * 2
    assert batch["__key__"] == ["train/instance/1", "train/instance/1", "train/class/1", "train/class/4"]
    assert batch["loss_weight"].tolist() == [1.0, 1.0, 0.25, 0.25]
    assert (batch["image"][:2] == -1).all() and (batch["image"][2:] == 1).all()


def test_a_text_model_without_grid_prompts_is_refused_before_its_class_images(tiny_cfg, tmp_path):
    """The sample grid's prompts are checked before the model makes the class images (minutes), not after."""
    write_images(tmp_path / "subject", 2, seed=0)
    run = tmp_path / "db"
    overrides = [o for o in dreambooth_overrides(tmp_path) if not o.startswith("callbacks.sample_grid.prompts")]
    with pytest.raises(ValueError, match=r"^callbacks.sample_grid: the model is conditioned on text \('caption'\): "
                                         r"give callbacks.sample_grid.prompts=\[\.\.\.\]"):
        train(tiny_cfg(*overrides, "callbacks.sample_grid.prompts=[]", run_dir=run), run)
    assert not list(run.rglob("class_*.png"))


def test_dreambooth_makes_its_class_images_then_trains(tiny_cfg, tmp_path, monkeypatch):
    """Prior preservation: the model makes the missing class images with the class prompt before training (a
    relaunch finds them all), then batches hold the subject and the class images with their weights. A requeue
    signal while they are made (the handler is installed before) stops the run between two batches of images,
    before training; the relaunch makes the rest."""
    from diffusion_train.training.module import DiffusionModule

    write_images(tmp_path / "subject", 3, seed=0)
    run = tmp_path / "db"
    sample_seeded, calls = DiffusionModule.sample_seeded, []

    def signalled_during_first_batch(self, *args, **kwargs):
        calls.append(args[0])
        if len(calls) == 1:
            os.kill(os.getpid(), signal.SIGUSR1)
        return sample_seeded(self, *args, **kwargs)

    monkeypatch.setattr(DiffusionModule, "sample_seeded", signalled_during_first_batch)
    cfg = tiny_cfg(*dreambooth_overrides(tmp_path, "data.class_batch_size=2"), run_dir=run)
    handler = signal.getsignal(signal.SIGUSR1)
    trainer = train(cfg, run)
    assert find_preemption(trainer).stopped_by == "SIGUSR1" and trainer.global_step == 0 and calls == [[0, 1]]
    assert sorted(p.name for p in (run / "class_images").glob("*.png")) == ["class_00000.png", "class_00001.png"]
    assert not (run / "checkpoints").exists() and not (run / "weights").exists()
    assert signal.getsignal(signal.SIGUSR1) == handler  # the callback's handler is gone with the run

    monkeypatch.undo()
    train(cfg, run)
    made = sorted((run / "class_images").glob("*.png"))
    assert [p.name for p in made] == [f"class_{i:05d}.png" for i in range(5)]
    dm = instantiate_data(tiny_cfg(*dreambooth_overrides(tmp_path), run_dir=run))
    assert dm.class_images_missing() == 0  # a relaunch makes none
    dm.setup()
    batch = next(iter(dm.train_dataloader()))
    assert batch["image"].shape == (4, 3, 16, 16) and batch["loss_weight"].tolist() == [1.0, 1.0, 0.5, 0.5]
    summary = json.loads((run / "summary.json").read_text())  # the class images count in throughput and FLOPs
    assert summary["global_batch"] == 4 and summary["images_seen"] == 4 * summary["steps"] > 0


def test_a_process_waiting_for_the_class_images_stops_when_signalled(tmp_path, monkeypatch):
    """Processes other than 0 wait for its class images; a signal stops the wait (no time-out) and the run."""
    from diffusion_train.train import make_class_images
    from diffusion_train.training.preemption import Preemption

    class Waiting:
        num_class_images = 4

        def class_images_missing(self):
            return 4

    monkeypatch.setenv("RANK", "1")
    preemption = Preemption(str(tmp_path))
    preemption.received = signal.SIGTERM
    try:
        make_class_images(Waiting(), None, None, preemption, timeout_s=30)
    finally:
        preemption.uninstall()
    assert preemption.stopped_by == "SIGTERM" and not preemption.requeue
    preemption = Preemption(str(tmp_path))  # not signalled: it waits until its time-out
    try:
        with pytest.raises(TimeoutError, match="process 0 did not make the class images"):
            make_class_images(Waiting(), None, None, preemption, timeout_s=0)
    finally:
        preemption.uninstall()
    assert preemption.stopped_by is None


def test_dreambooth_needs_its_images(tiny_cfg, tmp_path, caplog):
    (tmp_path / "subject").mkdir()
    dm = instantiate_data(tiny_cfg(*dreambooth_overrides(tmp_path, "data.class_prompt=null")))
    with pytest.raises(FileNotFoundError, match="data.instance_dir"):
        dm.setup()
    bad = tmp_path / "subject" / "broken.jpg"  # not an image: skipped and named, never a crash naming a BytesIO
    bad.write_bytes(b"not an image at all")
    with pytest.raises(FileNotFoundError, match=f"no readable image .* e.g. {bad}"):
        dm.setup()
    write_images(tmp_path / "subject", 2, seed=1, exist_ok=True)
    with caplog.at_level("WARNING", logger="diffusion_train"):
        dm.setup()
    assert len(dm.train_set.instance) == 2 and f"skipped 1 of 3 images that could not be read: {bad}" in caplog.text


def test_missing_class_images_fill_the_gaps(tiny_cfg, tmp_path):
    """The class images to make are the first free indices: a deleted one is made again (not an existing one
    overwritten), and images given under other names count."""
    dm = instantiate_data(tiny_cfg(*dreambooth_overrides(tmp_path), run_dir=tmp_path / "run"))
    folder = Path(dm.class_dir)
    write_images(folder, 0, seed=0)
    assert dm.class_images_to_make() == [0, 1, 2, 3, 4]
    for i in (0, 2, 3, 4):
        (folder / f"class_{i:05d}.png").write_bytes(b"")
    assert dm.class_images_missing() == 1 and dm.class_images_to_make() == [1]
    (folder / "class_00002.png").unlink(), (folder / "class_00003.png").unlink()
    (folder / "given.png").write_bytes(b"")  # 0, 4 and the given one: 2 to make, in the first free places
    assert dm.class_images_to_make() == [1, 2]


@pytest.mark.parametrize("latent", [[], ["autoencoder=tiny_vae", "autoencoder.channels=[8,8,8]"]],
                         ids=["pixels", "latents"])
def test_dreambooth_eval_script(tmp_path, latent):
    """scripts/dreambooth_eval.py on a tiny text-conditioned Fashion-MNIST run and a stand-in classifier file; in
    latent space too (the subject's images were read at the latents' size and channels: none could be)."""
    from conftest import TINY, compose_train, load_script
    from diffusion_train.metrics.fmnist_net import FMNISTNet

    run = tmp_path / "text"
    cfg = compose_train([o for o in TINY if not o.startswith("data=")] + [
        "data=fashion_mnist_captions", "conditioning=t5_tiny", "data.batch_size=4", "data.val_size=4",
        "trainer.max_steps=2", "callbacks.sample_grid.prompts=[a photo of a bag]", *latent], run)
    train(cfg, run)
    write_images(tmp_path / "subject", 2, seed=1)
    FMNISTNet(channels=(8, 16), feature_dim=16).save(tmp_path / "net.safetensors")
    script = load_script("dreambooth_eval")
    out = tmp_path / "eval"
    args = [f"ckpt={run / 'checkpoints' / 'last.ckpt'}", f"out={out}", f"instance_dir={tmp_path / 'subject'}",
            "instance_prompt=a photo of sks thing", f"classifier={tmp_path / 'net.safetensors'}", "num=3",
            "per_class=1", "steps=2", "device=cpu"]
    assert script.main(args) == 0
    report = json.loads((out / "dreambooth.json").read_text())
    assert report["subject_distance"] > 0 and 0 <= report["class_accuracy"] <= 1 and (out / "grid.png").exists()
    assert script.main(args[:2]) == 1  # instance_dir, instance_prompt and classifier missing


def test_a_branch_makes_its_class_images_with_the_checkpoints_weights(tiny_cfg, tmp_path, monkeypatch):
    """A branch (init.branch_from) of a DreamBooth run makes its own class images (its class_dir starts empty)
    before the fit restores the checkpoint: they came from the fresh initialisation, a random model."""
    from diffusion_train.training.checkpointing import load_checkpoint
    from diffusion_train.training.ema import checkpoint_average
    from diffusion_train.training.module import DiffusionModule

    write_images(tmp_path / "subject", 2, seed=0)
    trunk, branch = tmp_path / "trunk", tmp_path / "branch"
    train(tiny_cfg(*dreambooth_overrides(tmp_path), "trainer.max_steps=2", run_dir=trunk), trunk)
    sample_seeded, seen = DiffusionModule.sample_seeded, []

    def record(self, *args, **kwargs):
        seen.append({n: p.detach().clone() for n, p in self.named_parameters()})
        return sample_seeded(self, *args, **kwargs)

    monkeypatch.setattr(DiffusionModule, "sample_seeded", record)
    train(tiny_cfg(*dreambooth_overrides(tmp_path), "trainer.max_steps=3", f"+init.branch_from={trunk}",
                   "callbacks.sample_grid.every_n_steps=1000", run_dir=branch), branch)
    assert len(list((branch / "class_images").glob("*.png"))) == 5 and seen
    ckpt = load_checkpoint(trunk / "checkpoints" / "last.ckpt")
    _, ema = checkpoint_average(ckpt, "ema", "trunk")
    for name, value in seen[0].items():
        assert torch.equal(value, ema.get(name, ckpt["state_dict"][name])), name
