"""Host-device synchronisations: the CPU audit finds what would make the host wait for a GPU, and the training
step (module, Lightning loop and callbacks) makes none between logging steps."""

from __future__ import annotations

import collections
import inspect
import json
import math
import warnings

import pytest
import torch

from diffusion_train.data.samplers import mix_seed
from diffusion_train.train import train
from diffusion_train.training.syncs import CUDA_MESSAGE, HostSyncAudit, SyncWatch, host_side, would_sync

x = torch.randn(6)


@pytest.mark.parametrize("name, run, reason", [
    ("item", lambda: x.sum().item(), "value read"),
    ("float", lambda: float(x[0]), "value read"),
    ("if tensor", lambda: bool(x.sum() > 0), "value read"),
    ("equal", lambda: torch.equal(x, x), "value read"),
    ("nonzero", lambda: torch.nonzero(x > 0), "data-dependent size"),
    ("mask index", lambda: x[x > 0], "data-dependent size"),
    ("mask assignment", lambda: x.clone().__setitem__(x > 0, 0.0), "data-dependent size"),
    ("masked_select", lambda: torch.masked_select(x, x > 0), "data-dependent size"),
    ("unique", lambda: x.unique(), "data-dependent size"),
    ("repeat_interleave", lambda: torch.repeat_interleave(x, (x > 0).long()), "data-dependent size"),
    ("torch.tensor", lambda: torch.tensor([1.0, 2.0]), "host data"),
    ("as_tensor of a number", lambda: torch.as_tensor(3), "host data"),
])
def test_audit_counts_what_would_wait_for_a_gpu(name, run, reason):
    with HostSyncAudit() as audit:
        run()
    assert reason in {r for r, _ in audit.sites}, (name, audit.sites)


def test_audit_counts_nothing_in_device_math_and_the_optimizer_step():
    """Arithmetic, generators, constants, clipping, the fused AdamW step with its found_inf, foreach EMA lerp."""
    net = torch.nn.Sequential(torch.nn.Linear(6, 8), torch.nn.GELU(), torch.nn.Linear(8, 6))
    opt = torch.optim.AdamW(net.parameters(), lr=1e-3, fused=True)  # as optim=adamw
    ema = [p.detach().clone() for p in net.parameters()]
    g = torch.Generator().manual_seed(0)
    net(torch.randn(2, 6)).sum().backward()
    opt.step()  # lazy state initialisation outside the audit
    with HostSyncAudit() as audit:
        noise = torch.randn(4, 6, generator=g)
        t = torch.randint(0, 1000, (4,), generator=g).float()
        loss = (net(noise * t[:, None].sqrt()) - noise).square().mean() + torch.full((), 0.5)
        loss.backward()
        norm = torch.nn.utils.clip_grad_norm_(list(net.parameters()), 1.0, foreach=True)
        torch.where(torch.isfinite(norm), norm, torch.zeros_like(norm))
        opt.step()
        opt.zero_grad(set_to_none=True)
        torch._foreach_lerp_(ema, [p.detach() for p in net.parameters()], 0.01)
        x[torch.arange(2)]  # an integer index: a gather
    assert not audit.sites, audit.sites


def test_site_is_the_calling_line_and_host_side_is_skipped():
    with HostSyncAudit(depth=1) as audit:
        line = inspect.currentframe().f_lineno + 1
        x.sum().item()
        with host_side():
            torch.tensor([1]).item()
    assert [(reason, site.rsplit("/", 1)[-1]) for reason, site in audit.sites] == [("value read", f"test_syncs.py:{line}")]


def test_data_loading_is_host_side():
    """Batches are made on the host by design; the DataLoader's fetch is not counted."""
    class Data(torch.utils.data.Dataset):
        def __len__(self):
            return 4

        def __getitem__(self, i):
            return {"label": torch.tensor(i), "value": float(torch.tensor(i * 1.0))}

    with HostSyncAudit() as audit:
        batches = list(torch.utils.data.DataLoader(Data(), batch_size=2))
    assert len(batches) == 2 and not audit.sites


def test_would_sync_sees_blocking_copies_between_devices():
    cpu = torch.zeros(3)
    meta = torch.empty(3, device="meta")
    assert would_sync(torch.ops.aten._to_copy.default, (cpu,), {"device": torch.device("cuda")}) == "blocking copy"
    assert would_sync(torch.ops.aten._to_copy.default, (cpu,), {"device": torch.device("cuda"),
                                                                "non_blocking": True}) is None
    assert would_sync(torch.ops.aten._to_copy.default, (cpu,), {"dtype": torch.float16}) is None
    assert would_sync(torch.ops.aten._to_copy.default, (meta,), {"device": torch.device("cpu")}) is None


def test_sync_watch_on_cpu_counts_between_start_and_stop():
    watch = SyncWatch("cpu")
    x.sum().item()
    watch.start()
    x.sum().item()
    with watch.paused():
        x.sum().item()
    bool(x.sum() > 0)
    watch.stop()
    x.sum().item()
    assert watch.total == 2  # one read on each of two lines
    assert [(e["count"], e["per_step"]) for e in watch.table(steps=2)] == [(1, 0.5), (1, 0.5)]


def test_sync_watch_on_gpu_takes_the_warnings_of_the_sync_debug_mode(monkeypatch):
    """On a GPU each synchronisation is a warning of torch.cuda's sync debug mode; the watch counts each by the
    Python line that made it, as it is raised, and leaves other warnings alone."""
    modes = []
    monkeypatch.setattr(torch.cuda, "set_sync_debug_mode", modes.append)
    monkeypatch.setattr(torch.cuda, "get_sync_debug_mode", lambda: modes[-1])
    watch = SyncWatch("cuda")
    watch.start()
    line = inspect.currentframe().f_lineno + 1
    warnings.warn(CUDA_MESSAGE)
    with watch.paused():
        assert modes[-1] == 0
    with pytest.warns(UserWarning, match="something else"):
        warnings.warn("something else")
    watch.stop()
    assert modes == [1, 0, 1, 0]
    assert [(r, s.split(" < ")[0].rsplit("/", 1)[-1], n) for (r, s), n in watch.sites.items()] == \
        [("cuda sync", f"test_syncs.py:{line}", 1)]


STEPS = ["trainer.max_steps=14", "trainer.log_every_n_steps=4", "trainer.val_check_interval=4",
         "callbacks.checkpoint.every_n_train_steps=4", "callbacks.sample_grid.every_n_steps=8",
         "callbacks.host_syncs.steps=12", "callbacks.host_syncs.start=1"]


@pytest.mark.parametrize("extra", [
    ["model=unet_tiny"],
    ["model=dit_tiny", "training.accumulate_grad_batches=2"],
    ["model=mmdit_tiny", "task=inpainting", "task.masked_image=encoded", "autoencoder=tiny_vae",
     "autoencoder.weights=null"],  # the masked images encoded in the step
    ["model=dit_tiny", "data=fashion_mnist_captions", "data.val_size=16", "conditioning=t5_tiny",
     "conditioning.embedders.caption.cache_size=0", "callbacks.sample_grid.prompts=[a bag]"],  # a text encoder in the step
    ["finetune=lora"],
    ["finetune=controlnet"],  # Sobel control images made in the step
    ["model=dit_tiny", "task=editing", "data=fashion_mnist_edits", "data.val_size=16", "conditioning=t5_tiny",
     "conditioning.embedders.caption.cache_size=0", "callbacks.sample_grid.prompts=[flip]"],
])
def test_training_steps_do_not_wait_for_the_device(extra, tiny_cfg, tmp_path):
    """The real trainer with its callbacks (EMA, checkpoints, samples, validation, summary, throughput,
    preemption, CSV logging): no synchronisation outside logging steps; the logging steps read what they
    log (the audit is live: it finds the module's check of the non-finite streak there)."""
    cfg = tiny_cfg(*STEPS, *extra)
    train(cfg, tmp_path / "run")
    report = json.loads((tmp_path / "run" / "host_syncs.json").read_text())
    accumulate = 2 if "training.accumulate_grad_batches=2" in extra else 1
    # steps 2-13 watched; logging (Lightning's and the module's) at the batches ending steps 4, 8 and 12
    assert report["watched"]["batches"] == {"other_steps": 12 * accumulate - 3, "logging_steps": 3}
    assert report["syncs_per_step"]["other_steps"] == 0, report["sites"]["other_steps"]
    logging_sites = [e["site"] for e in report["sites"]["logging_steps"]]
    assert any(s.startswith("diffusion_train/training/module.py") for s in logging_sites), logging_sites
    assert math.isfinite(report["syncs_per_step"]["logging_steps"]) and report["device"] == "cpu"


def test_training_step_neither_captures_stacks_nor_walks_the_module(tiny_cfg, tmp_path, monkeypatch):
    """Host work a small model's step on a GPU waits for. ``torch.manual_seed`` formats the Python stack for each
    accelerator backend not initialised (3 on a CPU, 2 on a GPU): the step seeds the generators it uses directly,
    seeding the CPU's as torch.manual_seed does, so dropout draws the same. Its optimizer update and the EMA's take
    the parameters from the optimizer and from the EMA's first update, not from a walk of the module tree in each
    step (after the first: the EMA finds its parameters then)."""
    import traceback

    from diffusion_train.training.ema import EMA
    from diffusion_train.training.module import DiffusionModule

    inside, captured, steps, walked = [], [], [], []
    real = {"step": DiffusionModule.training_step, "ema": EMA.update, "format": traceback.format_stack,
            "parameters": torch.nn.Module.named_parameters}

    def watched(name):
        def run(self, *args, **kwargs):
            inside.append(name)
            try:
                return real[name](self, *args, **kwargs)
            finally:
                inside.pop()
        return run

    def step(self, *args, **kwargs):
        steps.append(self)
        return watched("step")(self, *args, **kwargs)

    def format_stack(*args, **kwargs):
        captured.extend(inside[-1:])
        return real["format"](*args, **kwargs)

    def named_parameters(self, *args, **kwargs):
        for item in real["parameters"](self, *args, **kwargs):
            if inside and len(steps) > 1:
                walked.append(inside[-1])
            yield item

    monkeypatch.setattr(DiffusionModule, "training_step", step)
    monkeypatch.setattr(EMA, "update", watched("ema"))
    monkeypatch.setattr(traceback, "format_stack", format_stack)
    monkeypatch.setattr(torch.nn.Module, "named_parameters", named_parameters)
    train(tiny_cfg("trainer.max_steps=4", "model.dropout=0.1"), tmp_path / "run")
    module = steps[0]
    assert len(steps) == 4 and captured == []
    # the parameters the steps after the first were given: the conditioner's first (its device) in each
    assert collections.Counter(walked) == {"step": 3}, collections.Counter(walked)
    module.seed_global_generators(7, 1)  # the seeding alone, against torch.manual_seed's
    drawn = torch.rand(4)
    torch.manual_seed(mix_seed(module.seed, 7, 1, 1))
    assert torch.equal(drawn, torch.rand(4))


def test_progress_bar_shows_the_loss(tiny_cfg, tmp_path, capfd):
    """train/loss is logged without prog_bar (Lightning would read it after every batch); the bar reads it at
    its refreshes."""
    train(tiny_cfg("trainer.max_steps=4", "trainer.log_every_n_steps=2", "trainer.enable_progress_bar=true"),
          tmp_path / "run")
    out = capfd.readouterr().out  # Lightning's tqdm bars write to stdout
    assert "train/loss=" in out, out[-2000:]


def test_sync_probe_finds_a_sync_in_the_part_that_makes_it(monkeypatch, tmp_path, capsys):
    """scripts/sync_probe.py on a CPU: a tiny DiT's parts make no synchronisation; a value read added to its
    block's forward is counted once per block call in the block, depth times in the backbone and the loss, and
    not in the optimizer update or the EMA, with the added line as its site."""
    import sys
    from pathlib import Path

    from omegaconf import OmegaConf

    from diffusion_train.models.dit import DiTBlock

    sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "scripts"))
    try:
        import sync_probe
    finally:
        sys.path.pop(0)
    args = ["config=model=dit_tiny", "latent=4x8x8", "classes=10", "batch=2", "device=cpu", "repeats=2",
            f"out={tmp_path / 'probe.json'}"]
    assert sync_probe.main(args) == 0
    clean = json.loads((tmp_path / "probe.json").read_text())
    expected = ["self-attention", "block", "backbone", "conditioner", "loss", "loss+backward", "update", "ema", "step"]
    assert list(clean["parts"]) == expected
    assert all(p["syncs_per_call"] == 0 for p in clean["parts"].values()), clean["parts"]
    assert "| loss+backward | 0.0 |" in capsys.readouterr().out

    forward = DiTBlock.forward

    def reading(self, x, *args, **kwargs):
        float(x[0, 0, 0])  # a value read: the host would wait here
        return forward(self, x, *args, **kwargs)

    monkeypatch.setattr(DiTBlock, "forward", reading)
    assert sync_probe.main(args) == 0
    parts = json.loads((tmp_path / "probe.json").read_text())["parts"]
    depth = OmegaConf.load(Path(__file__).resolve().parent.parent / "conf" / "model" / "dit_tiny.yaml").depth
    n = {name: p["syncs_per_call"] for name, p in parts.items()}
    assert n["block"] == 1 and n["backbone"] == n["loss"] == n["loss+backward"] == n["step"] == depth >= 2, n
    assert n["self-attention"] == n["conditioner"] == n["update"] == n["ema"] == 0, n
    assert parts["block"]["sites"][0]["site"].startswith("tests/test_syncs.py:"), parts["block"]["sites"]
    assert sync_probe.main([*args, "repeats=0"]) == 1
    assert capsys.readouterr().err.strip().endswith("error: repeats must be >= 1, got 0")
