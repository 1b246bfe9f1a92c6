"""Post-hoc EMA: power-function averages (the discrete recursion against its closed form), their snapshots, the
least-squares reconstruction of other widths, and the script through a real training run."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
import torch
from safetensors.torch import load_file
from torch import nn

from conftest import load_script
from diffusion_train.train import train
from diffusion_train.training.build import load_module
from diffusion_train.training.checkpointing import load_checkpoint
from diffusion_train.training.ema import EMA
from diffusion_train.training.posthoc_ema import (check_sigma_rel, find_snapshots, gamma_to_sigma_rel, label,
                                                  profile_products, reconstruct, run_snapshots, sigma_rel_to_gamma,
                                                  solve, write_snapshot)

SCRIPT = Path(__file__).resolve().parent.parent / "scripts" / "posthoc_ema.py"


def _flat(weights: list[torch.Tensor]) -> torch.Tensor:
    return torch.cat([w.reshape(-1) for w in weights]).double()


def test_sigma_rel_and_gamma():
    """The published pairs (sigma_rel 0.05 and 0.10 are gamma 16.97 and 6.94), a round trip, the widest."""
    assert sigma_rel_to_gamma(0.05) == pytest.approx(16.97, abs=0.01)
    assert sigma_rel_to_gamma(0.10) == pytest.approx(6.94, abs=0.01)
    for s in (0.01, 0.03, 0.15, 0.25):
        assert gamma_to_sigma_rel(sigma_rel_to_gamma(s)) == pytest.approx(s, rel=1e-9)
    assert sigma_rel_to_gamma(12 ** -0.5) == pytest.approx(0.0, abs=1e-9)  # the plain mean
    assert sigma_rel_to_gamma(0.2887) == 0.0  # as it is written
    for bad in (0.0, -0.1, 0.3):
        with pytest.raises(ValueError, match="relative width"):
            sigma_rel_to_gamma(bad)


def test_profile_products_match_numerical_integration():
    times, gammas = np.array([40.0, 100.0, 100.0]), np.array([3.0, 16.97, 0.5])
    u = np.linspace(0, 100, 400_001)[1:]
    profiles = [np.where(u <= t, (g + 1) * u ** g / t ** (g + 1), 0.0) for t, g in zip(times, gammas)]
    numeric = np.array([[np.trapezoid(a * b, u) for b in profiles] for a in profiles])
    np.testing.assert_allclose(profile_products(times, gammas, times, gammas), numeric, rtol=1e-3)
    # long runs do not overflow (t^(gamma + 1) alone would)
    assert np.isfinite(profile_products(np.array([1e7]), np.array([40.0]), np.array([5e6]), np.array([40.0]))).all()


@pytest.mark.parametrize("every", [1, 3])
def test_power_average_weighs_each_step_by_its_slice_of_the_profile(every):
    """Step k's weights carry (k^(g+1) - (k-1)^(g+1)) / t^(g+1), the profile's integral over [k-1, k]: read off by
    averaging one-hot weights. update_every=3 updates after steps 3, 6, 9, 12 only, and there the average is the one
    of weights held for 3 steps at a time."""
    t, s = 12, 0.1
    g = sigma_rel_to_gamma(s)
    module = nn.Linear(t, 1, bias=False)
    ema = EMA(decays=[], sigma_rels=[s], update_every=every)
    ema.on_fit_start(None, module)
    for step in range(1, t + 1):
        with torch.no_grad():
            module.weight.zero_()[0, (step - 1) // every * every + every - 1] = 1.0  # step's slot (its block's last)
        ema.step_done(module, step)
    slots = torch.arange(1, t + 1, dtype=torch.float64)
    weights = (slots ** (g + 1) - (slots - 1) ** (g + 1)) / t ** (g + 1)
    if every > 1:  # the block's steps all hold the block's last slot
        weights = weights.view(-1, every).sum(1).repeat_interleave(every) * (torch.arange(t) % every == every - 1)
    torch.testing.assert_close(_flat(ema.weights[label(s)]), weights, rtol=1e-5, atol=1e-7)
    assert ema.decay_at("sigma_rel_0.1", 1) == 0.0  # the first step replaces the initial weights


def test_a_tracked_width_is_reconstructed_exactly(tmp_path):
    averages = {0.05: {"w": torch.randn(3)}, 0.1: {"w": torch.randn(3)}}
    for step in (10, 20):
        write_snapshot(tmp_path / f"step_{step:07d}.safetensors", averages, step, step)
    recs = solve(find_snapshots(tmp_path), [0.1, 0.10])  # a width asked twice is made once
    assert len(recs) == 1 and recs[0].error == pytest.approx(0.0, abs=1e-6) and recs[0].step == 20
    torch.testing.assert_close(reconstruct(recs)[0.1]["w"], averages[0.1]["w"], atol=1e-5, rtol=1e-5)


TRAJECTORY = torch.randn(1000, 64, generator=torch.Generator().manual_seed(0)).cumsum(0) / 30 + torch.randn(
    1000, 64, generator=torch.Generator().manual_seed(1))  # a random walk, and noise around it


def _snapshotted_run(folder: Path | None, steps: int, tracked: list[float], every: int = 50) -> EMA:
    """Power averages of sigma_rel 0.05 and 0.10 along the first ``steps`` of TRAJECTORY (64 weights), snapshotted
    every ``every`` steps into ``folder`` (None: none); returns an EMA that tracked ``tracked`` along the way."""
    module = nn.Linear(8, 8, bias=False)
    source = EMA(decays=[], sigma_rels=[0.05, 0.1], snapshot_every=every, snapshot_dir=str(folder))
    truth = EMA(decays=[], sigma_rels=tracked)
    for step in range(1, steps + 1):
        with torch.no_grad():
            module.weight.copy_(TRAJECTORY[step - 1].view(8, 8))
        source.step_done(module, step)
        truth.step_done(module, step)
        if folder is not None and step % every == 0:
            source.snapshot(write=True)
    return truth


def test_other_widths_are_reconstructed_from_snapshots(tmp_path):
    """Snapshots of sigma_rel 0.05 and 0.10 every 50 of 1000 steps make 0.07, 0.15 and 0.2 within 1% of the
    averages tracked directly (relative to their distance from another width's), at the last step, and 0.15
    within 3% at the 10th snapshot's step from the 20 snapshots up to it."""
    truth = _snapshotted_run(tmp_path, 1000, [0.07, 0.15, 0.2])
    snapshots = find_snapshots(tmp_path)
    assert [s.step for s in snapshots] == list(range(50, 1001, 50))
    recs = solve(snapshots, [0.07, 0.15, 0.2])
    made = reconstruct(recs)
    for r, other in zip(recs, [0.15, 0.07, 0.07]):
        assert r.error < 0.02 and len(r.terms) == 40
        ref = _flat(truth.weights[label(r.sigma_rel)])
        spread = (ref - _flat(truth.weights[label(other)])).norm()
        assert (made[r.sigma_rel]["weight"].double().reshape(-1) - ref).norm() < 0.01 * spread
    early = _snapshotted_run(None, 500, [0.15, 0.05])
    rec = solve(snapshots, [0.15], step=500)[0]
    assert {snap.step for snap, _, _ in rec.terms} == set(range(50, 501, 50))
    ref, other = _flat(early.weights[label(0.15)]), _flat(early.weights[label(0.05)])
    assert (reconstruct([rec])[0.15]["weight"].double().reshape(-1) - ref).norm() < 0.03 * (ref - other).norm()


def test_a_preempted_run_s_extra_snapshot_joins_only_the_fit_of_its_own_step(tmp_path):
    """A launch stopped between grid steps (a preemption at 120 with snapshot_every=50) writes that step's
    averages, marked off the grid: a later step's fit uses the grid's snapshots only, as for an uninterrupted run,
    and gets the same coefficients; the stop step itself can still be made, from its snapshot and those before."""
    module = nn.Linear(8, 8, bias=False)
    straight, stopped = tmp_path / "straight", tmp_path / "stopped"
    for folder, stop in ((straight, None), (stopped, 120)):
        ema = EMA(decays=[], sigma_rels=[0.05, 0.1], snapshot_every=50, snapshot_dir=str(folder))
        for step in range(1, 201):
            with torch.no_grad():
                module.weight.copy_(TRAJECTORY[step - 1].view(8, 8))
            ema.on_step_end(SimpleNamespace(is_global_zero=True), module, step)
            if step == stop:
                ema.on_train_end(SimpleNamespace(is_global_zero=True), module)
    grid, preempted = find_snapshots(straight), find_snapshots(stopped)
    assert [s.step for s in preempted] == [50, 100, 120, 150, 200] and [s.on_grid for s in preempted].count(False) == 1
    a, b = solve(grid, [0.07])[0], solve(preempted, [0.07])[0]
    assert [(snap.step, s, c) for snap, s, c in a.terms] == [(snap.step, s, c) for snap, s, c in b.terms]
    at_stop = solve(preempted, [0.07], step=120)[0]
    assert [snap.step for snap, _, _ in at_stop.terms] == [50, 50, 100, 100, 120, 120]


def test_refusals(tmp_path):
    with pytest.raises(ValueError, match="no EMA snapshots"):
        solve(find_snapshots(tmp_path), [0.1])
    write_snapshot(tmp_path / "step_0000010.safetensors", {0.1: {"w": torch.ones(2)}}, 10, 10)
    with pytest.raises(ValueError, match=r"step=7: no snapshot at that step; snapshots are at steps \[10\]"):
        solve(find_snapshots(tmp_path), [0.1], step=7)
    write_snapshot(tmp_path / "step_0000020.safetensors", {0.1: {"v": torch.ones(2)}}, 20, 20)
    with pytest.raises(ValueError, match="do not all hold the same tensors"):
        reconstruct(solve(find_snapshots(tmp_path), [0.1]))
    (tmp_path / "step_0000030.safetensors").write_bytes(b"not a snapshot")
    with pytest.raises(ValueError, match="step_0000030.safetensors is not an EMA snapshot"):
        find_snapshots(tmp_path)
    with pytest.raises(ValueError, match="needs callbacks.ema.sigma_rels"):
        EMA(decays=[0.9], snapshot_every=10, snapshot_dir=str(tmp_path))
    with pytest.raises(ValueError, match="multiple of update_every=4"):
        EMA(sigma_rels=[0.1], update_every=4, snapshot_every=10, snapshot_dir=str(tmp_path))
    with pytest.raises(ValueError, match="relative width"):
        EMA(sigma_rels=[0.5])
    with pytest.raises(ValueError, match=r"^sigma_rels: abc is not a relative width"):  # float()'s own message
        check_sigma_rel("abc", "sigma_rels")
    with pytest.raises(FileNotFoundError, match=rf"^{tmp_path / 'none'}: no such run directory"):
        run_snapshots(tmp_path / "none")
    with pytest.raises(ValueError, match="'sigma_rel_x' names no EMA average"):
        EMA(sigma_rels=[0.1], sample_decay="sigma_rel_x")
    with pytest.raises(ValueError, match="at least one of decays and sigma_rels"):
        EMA(decays=[])
    assert EMA(decays=[0.9], sigma_rels=[0.1], sample_decay="sigma_rel_0.10").sample_decay == "sigma_rel_0.1"


def test_a_branch_uses_its_trunks_snapshots_up_to_the_branch_step(tmp_path):
    trunk, branch = tmp_path / "trunk", tmp_path / "branch"
    for step in (2, 4, 6):
        write_snapshot(trunk / "ema_snapshots" / f"step_{step:07d}.safetensors", {0.1: {"w": torch.ones(1)}},
                       step, step)
    for step in (5, 6):
        write_snapshot(branch / "ema_snapshots" / f"step_{step:07d}.safetensors", {0.1: {"w": torch.ones(1)}},
                       step, step)
    (branch / "run.json").write_text(json.dumps({"branched_from": {
        "checkpoint": str(trunk / "checkpoints" / "step_0000004.ckpt"), "step": 4}}))
    found = run_snapshots(branch)
    assert [(s.step, s.path.parent.parent.name) for s in found] == [(2, "trunk"), (4, "trunk"), (5, "branch"),
                                                                     (6, "branch")]
    (tmp_path / "moved").mkdir()
    (tmp_path / "moved" / "run.json").write_text(json.dumps({"branched_from": {
        "checkpoint": str(tmp_path / "gone" / "checkpoints" / "step_0000004.ckpt"), "step": 4}}))
    with pytest.raises(FileNotFoundError, match="the run branched from"):
        run_snapshots(tmp_path / "moved")


SNAPSHOTS = ["callbacks.ema.decays=[0.9]", "callbacks.ema.sigma_rels=[0.05,0.1]", "callbacks.ema.snapshot_every=2",
             "callbacks.ema.sample_decay=0.9"]


def test_a_run_snapshots_resumes_exactly_and_the_script_makes_a_loadable_checkpoint(tiny_cfg, tmp_path):
    """A run with power averages writes snapshots at steps 2, 4, 6, 8 (bit-identical when resumed at 4), exports
    them, and the script's checkpoint loads each made width by name; the tracked 0.1 comes back as trained."""
    straight, resumed = tmp_path / "straight", tmp_path / "resumed"
    validate = "callbacks.ema.validate=[sigma_rel_0.1]"  # its val/loss_ema_sigma_rel_0.1, for the script's to match
    train(tiny_cfg(*SNAPSHOTS, validate, "trainer.max_steps=8", run_dir=straight), straight)
    train(tiny_cfg(*SNAPSHOTS, "trainer.max_steps=4", run_dir=resumed), resumed)
    train(tiny_cfg(*SNAPSHOTS, "trainer.max_steps=8", run_dir=resumed), resumed)
    names = [p.name for p in sorted((straight / "ema_snapshots").iterdir())]
    assert names == [f"step_{s:07d}.safetensors" for s in (2, 4, 6, 8)]
    for name in names:
        a, b = load_file(straight / "ema_snapshots" / name), load_file(resumed / "ema_snapshots" / name)
        assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    assert (straight / "weights" / "ema_sigma_rel_0.05.safetensors").is_file()

    out = subprocess.run([sys.executable, str(SCRIPT), str(straight), str(resumed), "sigma_rels=0.1,0.2",
                          "validate=true", "device=cpu"], capture_output=True, text=True)
    assert out.returncode == 0, out.stderr
    assert "sigma_rel_0.2" in out.stdout and "step 8: 4 snapshots" in out.stdout
    assert "note: sigma_rel_0.2 fit with more than 5% error" in out.stdout  # far wider than 0.05 and 0.1 at 4 steps
    made = straight / "posthoc_ema" / "step_0000008.ckpt"
    last = load_checkpoint(straight / "checkpoints" / "last.ckpt")
    module = load_module(made, "ema_sigma_rel_0.1")
    for name, value in last["ema"]["weights"]["sigma_rel_0.1"].items():
        torch.testing.assert_close(dict(module.named_parameters())[name].detach(), value, atol=1e-5, rtol=1e-4)
    info = load_checkpoint(made)["diffusion_train"]["posthoc_ema"]
    assert info["averages"]["sigma_rel_0.2"]["terms"] == 8 and info["step"] == 8 and info["raw_weights_step"] == 8
    # validate=true: the validation loss as training logged it at step 8, for the raw weights and the tracked width
    logged = json.loads((straight / "summary.json").read_text())["metrics"]
    assert info["raw_val_loss"] == pytest.approx(logged["val/loss"]["final"], rel=1e-6)
    assert info["averages"]["sigma_rel_0.1"]["val_loss"] == pytest.approx(
        logged["val/loss_ema_sigma_rel_0.1"]["final"], rel=1e-5)
    assert info["averages"]["sigma_rel_0.2"]["val_loss"] != info["averages"]["sigma_rel_0.1"]["val_loss"]
    lowest = min(("0.1", "0.2"), key=lambda s: info["averages"][f"sigma_rel_{s}"]["val_loss"])
    assert info["lowest_val_loss"] == f"sigma_rel_{lowest}"
    assert f"sigma_rel_{lowest}" in next(line for line in out.stdout.splitlines() if "(lowest)" in line)
    record = json.loads(made.with_suffix(".json").read_text())  # beside the checkpoint, readable without torch
    assert record == json.loads(json.dumps(info))
    again = subprocess.run([sys.executable, str(SCRIPT), str(straight), "sigma_rels=0.1"], capture_output=True,
                           text=True)  # without validate=true, the validated record is kept
    assert again.returncode == 1 and again.stderr.strip().splitlines() == [
        f"error: {made.with_suffix('.json')} holds validation losses; remaking it without them would lose them: "
        "add validate=true, or write elsewhere with out="]
    assert json.loads(made.with_suffix(".json").read_text()) == record
    # the resumed run (the same training) in the same call, and the table of both runs' lowest widths
    resumed_record = json.loads((resumed / "posthoc_ema" / "step_0000008.json").read_text())
    assert resumed_record["lowest_val_loss"] == record["lowest_val_loss"]
    table = out.stdout[out.stdout.index("lowest val/loss"):].splitlines()[1:]
    params = f"{json.loads((straight / 'summary.json').read_text())['params']:,}"
    assert [line.split()[:4] for line in table] == [[str(r), params, "8", record["lowest_val_loss"]]
                                                    for r in (straight, resumed)]
    # "ema" is the run's sampling average (decay 0.9), which the post-hoc checkpoint does not hold: no quiet choice
    with pytest.raises(ValueError, match=r"^weights=ema: the run samples with its EMA 0.9, which .*step_0000008.ckpt "
                                         r"does not hold; choose one of its averages: ema_sigma_rel_0.1, "
                                         r"ema_sigma_rel_0.2$"):
        load_module(made)
    with pytest.raises(ValueError, match=r"has EMA averages \['sigma_rel_0.1', 'sigma_rel_0.2'\], not 0.9"):
        load_module(made, "ema_0.9")
    with pytest.raises(ValueError, match=r"^weights=ema_best: give raw, ema, ema_<decay> \(ema_0.9999\) or "
                                         r"ema_sigma_rel_<s>; .* has EMA averages \['sigma_rel_0.1', 'sigma_rel_0.2'\]$"):
        load_module(made, "ema_best")

    (straight / "checkpoints" / "step_0000006.ckpt").unlink()  # step 6's averages with the last raw weights
    six = subprocess.run([sys.executable, str(SCRIPT), str(straight), "step=6", "sigma_rels=0.1"], capture_output=True,
                         text=True)
    assert six.returncode == 0, six.stderr
    assert f"model and raw weights from {straight / 'checkpoints' / 'last.ckpt'} (step 8)" in six.stdout
    assert json.loads((straight / "posthoc_ema" / "step_0000006.json").read_text())["raw_weights_step"] == 8

    bad = subprocess.run([sys.executable, str(SCRIPT), str(straight), "step=3", "sigma_rels=0.1"],
                         capture_output=True, text=True)
    assert bad.returncode == 1 and bad.stderr.strip().splitlines() == [
        "error: step=3: no snapshot at that step; snapshots are at steps [2, 4, 6, 8]"]
    bad = subprocess.run([sys.executable, str(SCRIPT), str(straight), str(resumed), "sigma_rels=0.1",
                          f"out={tmp_path / 'one.ckpt'}"], capture_output=True, text=True)
    assert bad.returncode == 1 and bad.stderr.strip().splitlines() == [
        "error: out= and snapshots= are for one run folder; give one, or leave them out"]


def _script():
    return load_script("posthoc_ema")


def test_averages_of_another_model_are_refused_and_the_weights_kept():
    from diffusion_train.cli import UsageError

    script = _script()
    model = nn.Linear(2, 2)
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    with pytest.raises(UsageError, match=r"the averages hold \['blocks.0.weight'\], which the run's model does not"):
        with script.loaded(model, {"weight": torch.zeros(2, 2), "blocks.0.weight": torch.zeros(2)}):
            pass
    with script.loaded(model, {"weight": torch.zeros(2, 2)}):
        assert not model.weight.any() and torch.equal(model.bias, before["bias"])
    assert all(torch.equal(p, before[n]) for n, p in model.named_parameters())


@pytest.mark.parametrize("limit", [None, 1, 2, 3, 0.25, 0.5, 0.7, 1.0])
@pytest.mark.parametrize("world", [1, 2, 3])
def test_validate_takes_the_validation_batches_the_run_took_on_its_devices(limit, world):
    """A run on W devices with trainer.limit_val_batches validated, over its ranks, some of the fixed validation
    batches (Lightning limits each rank's share); the script on one device takes the same ones."""
    from diffusion_train.data.samplers import fixed_batches

    total = 7  # batches of 2 over 13 items

    def taken(rank_limit, ranks: int) -> set[int]:
        out = set()
        for rank in range(ranks):
            share = fixed_batches(13, 2, rank, ranks)
            n = len(share) if rank_limit is None else rank_limit if isinstance(rank_limit, int) \
                else int(len(share) * rank_limit)
            out |= {b.index for b in share[:n] if not b.padding}
        return out

    one = _script().one_device_limit(limit, world, lambda: total)
    assert taken(one, 1) == taken(limit, world)


def test_validation_batches_count_the_data_module_s_fixed_batches(tiny_cfg):
    from conftest import instantiate_data

    for size in (3, 4):
        data = instantiate_data(tiny_cfg(f"data.batch_size={size}"))
        assert _script().validation_batches(data) == len(data.val_dataloader()) > 1
