"""Shared fixtures: offline environment, Hydra compose, tiny training configs."""

from __future__ import annotations

import contextlib
import os
from pathlib import Path

import pytest
import torch
from hydra import compose, initialize_config_dir

os.environ.setdefault("WANDB_MODE", "offline")
os.environ.setdefault("WANDB_SILENT", "true")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
# a crash (e.g. a segmentation fault) in a process a test starts prints that process's Python stacks
os.environ.setdefault("PYTHONFAULTHANDLER", "1")

CONFIG_DIR = str(Path(__file__).resolve().parent.parent / "conf")

# A fast training setup on synthetic data: tiny model, no sample grids, csv logging only.
TINY = [
    "data=synthetic", "model=unet_tiny", "trainer=cpu", "logger=csv",
    "trainer.max_steps=4", "trainer.log_every_n_steps=1", "trainer.val_check_interval=2",
    "trainer.enable_progress_bar=false", "trainer.enable_model_summary=false",
    "callbacks.sample_grid.every_n_steps=1000", "callbacks.checkpoint.every_n_train_steps=2",
    "sampler.steps=2", "lr_schedule.warmup_steps=0",
]

# TINY on real Fashion-MNIST
FMNIST = [o for o in TINY if not o.startswith("data=")] + ["data=fashion_mnist", "data.batch_size=8",
                                                           "data.val_size=8"]


@pytest.fixture(scope="module")
def extractor_files(tmp_path_factory) -> tuple[Path, Path]:
    """An (untrained) FMNISTNet weights file and a reference of 64 random images made with it (for the Fréchet
    distance of generated images)."""
    from diffusion_train.metrics.fid import FeatureStats, save_reference
    from diffusion_train.metrics.fmnist_net import FMNISTNet

    root = tmp_path_factory.mktemp("extractor")
    torch.manual_seed(0)
    net = FMNISTNet(channels=(8, 16), feature_dim=16)
    net(torch.rand(8, 1, 28, 28) * 2 - 1)  # a train-mode pass gives the BatchNorm statistics some data
    weights = net.save(root / "net.safetensors")
    net = FMNISTNet.load(weights)
    stats = FeatureStats(net.feature_dim).update(net(torch.rand(64, 1, 32, 32) * 2 - 1))
    reference = save_reference(root / "ref.safetensors", stats, {"dataset": "random", "split": "train",
                                                                 "extractor": net.provenance})
    return weights, reference


def file_digest(path: Path) -> str:
    """The sha256 of a file's bytes: whether a checkpoint was rewritten."""
    import hashlib

    return hashlib.sha256(Path(path).read_bytes()).hexdigest()


def compare_checkpoints(a: dict, b: dict) -> None:
    """Two checkpoints hold the same training state: step, weights, EMA, optimizer moments, schedule."""
    assert a["global_step"] == b["global_step"]
    for k in a["state_dict"]:
        assert torch.equal(a["state_dict"][k], b["state_dict"][k]), k
    for decay in a["ema"]["weights"]:
        for k, v in a["ema"]["weights"][decay].items():
            assert torch.equal(v, b["ema"]["weights"][decay][k]), (decay, k)
    assert a["ema"]["num_updates"] == b["ema"]["num_updates"]
    sa, sb = a["optimizer_states"][0]["state"], b["optimizer_states"][0]["state"]
    for i in sa:
        for key in ("exp_avg", "exp_avg_sq", "step"):
            assert torch.equal(sa[i][key], sb[i][key]), (i, key)
    assert a["lr_schedulers"][0]["last_epoch"] == b["lr_schedulers"][0]["last_epoch"]


def validated_steps(run: Path) -> list[int]:
    """The steps of a run's metrics.csv rows with a val/loss."""
    import csv

    with (run / "metrics.csv").open() as f:
        return [int(r["step"]) for r in csv.DictReader(f) if r.get("val/loss")]


def compose_train(overrides: list[str], run_dir: Path | None = None):
    with initialize_config_dir(config_dir=CONFIG_DIR, version_base="1.3"):
        return compose("train", overrides=list(overrides) + ([f"run_dir={run_dir}"] if run_dir else []))


@pytest.fixture
def tiny_cfg(tmp_path):
    def make(*overrides: str, run_dir: Path | None = None):
        return compose_train(TINY + list(overrides), run_dir or tmp_path / "run")

    return make


class LossRecorder:
    """A callback (``+callbacks.recorder._target_=conftest.LossRecorder``) that keeps each optimizer step's
    training loss, the mean of its micro-batches' as ``training_step`` returned them, in ``LossRecorder.losses``,
    and the learning rate the step was taken with in ``LossRecorder.lrs``; with ``stop_at``, it stops the fit
    after that step, as a preemption does."""

    losses: dict[int, float] = {}
    lrs: dict[int, float] = {}

    def __new__(cls, stop_at: int | None = None):
        import lightning as L

        class _Recorder(L.Callback):
            micro: list[float] = []

            def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
                cls.lrs[trainer.global_step + 1] = trainer.optimizers[0].param_groups[0]["lr"]

            def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
                loss = outputs["loss"] if isinstance(outputs, dict) else outputs
                self.micro.append(float(loss))
                if len(self.micro) == pl_module.accumulate_grad_batches:  # the step's last micro-batch
                    cls.losses[trainer.global_step] = sum(self.micro) / len(self.micro)
                    self.micro.clear()
                if stop_at is not None and trainer.global_step >= stop_at:
                    trainer.should_stop = True

        return _Recorder()


def signal_rank0_at_last_step(signum: str = "SIGUSR1"):
    """A callback (``+callbacks.signal._target_=conftest.signal_rank0_at_last_step``) with which rank 0 sends
    itself ``signum`` at the end of the fit's last step, after the step's preemption check: the signal comes
    during the end-of-fit work, on one rank only."""
    import os
    import signal

    import lightning as L

    class _Signal(L.Callback):
        def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
            if trainer.global_rank == 0 and trainer.global_step == trainer.max_steps:
                os.kill(os.getpid(), getattr(signal, signum))

    return _Signal()


def signal_at_step(step: int, signum: str = "SIGUSR1"):
    """A callback (``+callbacks.signal._target_=conftest.signal_at_step +callbacks.signal.step=N``) with which the
    process sends itself ``signum`` during the batch that makes optimizer step ``step``, as Slurm does."""
    import os
    import signal

    import lightning as L

    class _Signal(L.Callback):
        sent = False

        def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
            if trainer.global_step == step - 1 and not self.sent:
                self.sent = True
                os.kill(os.getpid(), getattr(signal, signum))

    return _Signal()


def fail_in_validation(step: int):
    """A callback (``+callbacks.fail._target_=conftest.fail_in_validation +callbacks.fail.step=N``) that fails the
    run in the validation of optimizer step ``step``, as a hard kill (out of memory, a lost node) stops it there."""
    import lightning as L

    class _Fail(L.Callback):
        def on_validation_start(self, trainer, pl_module):
            if trainer.global_step == step and not trainer.sanity_checking:
                raise RuntimeError(f"killed in the validation of step {step}")

    return _Fail()


# -- tiny modules for the fine-tuning tests -------------------------------------------------------------
DIT = ["model=dit_tiny"]


def module_of(tiny_cfg, *overrides: str, seed: int = 0):
    """The training module of the tiny config with a tiny DiT and ``overrides``, built after seeding ``seed``."""
    from diffusion_train.training.build import build_module

    torch.manual_seed(seed)
    return build_module(tiny_cfg(*DIT, *overrides))


def randomised(module, seed: int):
    """``module`` with every parameter drawn anew (N(0, 0.05^2)), so zero-initialised layers matter too."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in module.parameters():
            p.copy_(torch.randn(p.shape, generator=g) * 0.05)
    return module


def params(module) -> dict[str, torch.Tensor]:
    return {n: p.detach().clone() for n, p in module.named_parameters()}


def load_script(name: str):
    """scripts/<name>.py as a module (named <name>_script), its folder on sys.path while it loads so that it can
    import its sibling scripts; registered in sys.modules, where dataclasses look their module up."""
    import importlib.util
    import sys

    scripts = str(Path(CONFIG_DIR).parent / "scripts")
    spec = importlib.util.spec_from_file_location(f"{name}_script", f"{scripts}/{name}.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module
    sys.path.insert(0, scripts)
    try:
        spec.loader.exec_module(module)
    finally:
        sys.path.remove(scripts)
    return module


def instantiate_data(cfg):
    from hydra.utils import instantiate

    return instantiate(cfg.data, _convert_="all")


@contextlib.contextmanager
def gloo_group(rank: int, world: int, init: str):
    """The gloo process group of a spawned test worker. Its ranks meet at a barrier before they destroy it: a rank
    that tears its group down while a peer's last collective is still in flight can abort the peer ("terminate
    called without an active exception"), as the trainer's own end of a run avoids the same way."""
    torch.distributed.init_process_group("gloo", init_method=init, rank=rank, world_size=world)
    try:
        yield
        torch.distributed.barrier()
    finally:
        torch.distributed.destroy_process_group()
