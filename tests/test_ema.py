"""The EMA callback: the closed form, the warm-up, update_every, checkpoint state and exact resume, swapping."""

from __future__ import annotations

import copy
from types import SimpleNamespace

import pytest
import torch
from torch import nn

from diffusion_train.training.checkpointing import atomic_torch_save, load_checkpoint
from diffusion_train.training.ema import EMA

def _flat(module: nn.Module) -> torch.Tensor:
    return torch.cat([p.detach().reshape(-1) for p in module.parameters()]).double()


def _set(module: nn.Module, flat: torch.Tensor) -> None:
    with torch.no_grad():
        i = 0
        for p in module.parameters():
            p.copy_(flat[i:i + p.numel()].reshape(p.shape))
            i += p.numel()


def _ema_flat(ema: EMA, decay: float) -> torch.Tensor:
    return torch.cat([w.reshape(-1) for w in ema.weights[ema.key(decay)]]).double()


def _param_sequence(module, n, seed=0):
    g = torch.Generator().manual_seed(seed)
    return [torch.randn(_flat(module).numel(), generator=g, dtype=torch.float64) for _ in range(n)]


def _fit_start(ema, module, step=0):
    """As Lightning: a resumed run's step is restored after ``on_fit_start`` (which sees 0), before
    ``on_train_start``."""
    ema.on_fit_start(SimpleNamespace(global_step=0), module)
    ema.on_train_start(SimpleNamespace(global_step=step), module)


def _updated_ema(warmup: bool, steps: int, seed: int) -> tuple[nn.Module, EMA]:
    """A Linear(3, 2) and its EMA (decays 0.9 and 0.5) after ``steps`` updates along a random weight sequence."""
    torch.manual_seed(0)
    module = nn.Linear(3, 2)
    ema = EMA(decays=[0.9, 0.5], warmup=warmup)
    _fit_start(ema, module)
    for p in _param_sequence(module, steps, seed=seed):
        _set(module, p.float())
        ema.update(module)
    return module, ema


def test_ema_closed_form_without_warmup():
    torch.manual_seed(0)
    module = nn.Linear(3, 2)
    decays = [0.9, 0.5]
    ema = EMA(decays=decays, warmup=False)
    p0 = _flat(module)
    _fit_start(ema, module)  # the averages start at the initial weights p_0
    ps = _param_sequence(module, 6)
    for p in ps:
        _set(module, p.float())
        ema.update(module)
    n = len(ps)
    ps_f = [p.float().double() for p in ps]  # the module holds float32 copies
    for d in decays:
        expected = d**n * p0 + sum((1 - d) * d ** (n - k) * ps_f[k - 1] for k in range(1, n + 1))
        torch.testing.assert_close(_ema_flat(ema, d), expected, rtol=1e-5, atol=1e-6)
    assert ema.num_updates == n
    assert all(w.dtype == torch.float32 for ws in ema.weights.values() for w in ws)


def test_ema_first_update_without_init_starts_from_current_weights():
    torch.manual_seed(0)
    module = nn.Linear(3, 2)
    ema = EMA(decays=[0.9], warmup=False)
    ps = _param_sequence(module, 3, seed=1)
    for p in ps:
        _set(module, p.float())
        ema.update(module)
    d, pf = 0.9, [p.float().double() for p in ps]
    e = pf[0]
    for p in pf:
        e = d * e + (1 - d) * p
    torch.testing.assert_close(_ema_flat(ema, 0.9), e, rtol=1e-5, atol=1e-6)


def test_ema_follows_the_module_it_is_given():
    """The averaged parameters are found once per module: another module of the same parameters (a copy) is
    followed from its first update on; one with other parameters is refused, naming the counts."""
    torch.manual_seed(0)
    first = nn.Linear(3, 2)
    ema = EMA(decays=[0.5], warmup=False)
    ema.update(first)
    second = copy.deepcopy(first)
    _set(second, _flat(first).float() + 1.0)
    ema.update(second)
    assert torch.allclose(_ema_flat(ema, 0.5), _flat(first) + 0.5, atol=1e-6)
    with pytest.raises(ValueError, match=r"EMA: Sequential has other trainable parameters.*\(4 against 2\)"):
        ema.update(nn.Sequential(nn.Linear(3, 2), nn.Linear(2, 2)))


def test_ema_warmup_matches_python_recursion():
    torch.manual_seed(0)
    module = nn.Linear(4, 3)
    decays = [0.9999, 0.9, 0.5]
    ema = EMA(decays=decays, warmup=True)
    p0 = _flat(module)
    _fit_start(ema, module)
    ps = _param_sequence(module, 25, seed=2)
    for p in ps:
        _set(module, p.float())
        ema.update(module)
    for d in decays:
        e = p0.clone()
        for n, p in enumerate(ps, start=1):
            dn = min(d, (1 + n) / (10 + n))
            e = dn * e + (1 - dn) * p.float().double()
        torch.testing.assert_close(_ema_flat(ema, d), e, rtol=1e-5, atol=1e-6)
    # the per-step decay itself
    assert ema.decay_at(0.9999, 1) == pytest.approx(2 / 11)
    assert ema.decay_at(0.5, 1) == pytest.approx(2 / 11)
    assert ema.decay_at(0.5, 20) == 0.5  # (1 + 20) / (10 + 20) = 0.7 > 0.5
    assert EMA(decays=[0.9999], warmup=False).decay_at(0.9999, 1) == 0.9999


def test_ema_lightning_hooks_update_after_optimizer_steps():
    """update_every=2: updates after steps 2 and 4 only, each standing for two steps (the old average keeps
    0.5 x 0.5); a repeated global step (gradient accumulation) is no step."""
    torch.manual_seed(0)
    module = nn.Linear(2, 2)
    ema = EMA(decays=[0.5], warmup=False, update_every=2)
    p0 = _flat(module)
    _fit_start(ema, module, step=0)
    ps = _param_sequence(module, 4, seed=3)
    # steps 1..4; batch 2 of step 2 repeats the global step (gradient accumulation): no update
    for step, p in zip([1, 2, 2, 3, 4], [ps[0], ps[1], ps[1], ps[2], ps[3]]):
        _set(module, p.float())
        ema.on_train_batch_end(SimpleNamespace(global_step=step), module, None, None, 0)
        assert ema.covered_step == step // 2 * 2 or (step == 1 and ema.covered_step is None)
    assert ema.num_updates == 4  # optimizer steps averaged in
    e = 0.25 * p0 + 0.75 * ps[1].float().double()
    e = 0.25 * e + 0.75 * ps[3].float().double()
    torch.testing.assert_close(_ema_flat(ema, 0.5), e, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("every", [1, 3])
def test_ema_update_every_keeps_the_per_step_horizon(every):
    """With the weights held for update_every steps at a time, updating every k-th step gives exactly the average
    of updating after every step, warm-up decays included: the decays are per optimizer step for any k."""
    torch.manual_seed(0)
    module, dense_module = nn.Linear(3, 2), nn.Linear(3, 2)
    _set(dense_module, _flat(module).float())
    sparse, dense = EMA(decays=[0.9, 0.99], update_every=every), EMA(decays=[0.9, 0.99])
    _fit_start(sparse, module)
    _fit_start(dense, dense_module)
    blocks = _param_sequence(module, 4, seed=7)
    for step in range(1, 4 * every + 1):
        for m, ema in ((module, sparse), (dense_module, dense)):
            _set(m, blocks[(step - 1) // every].float())
            ema.on_train_batch_end(SimpleNamespace(global_step=step), m, None, None, 0)
    assert sparse.num_updates == dense.num_updates == 4 * every
    for d in (0.9, 0.99):
        torch.testing.assert_close(_ema_flat(sparse, d), _ema_flat(dense, d), rtol=1e-6, atol=1e-7)
    with pytest.raises(ValueError, match="callbacks.ema.update_every must be >= 1, got 0"):
        EMA(update_every=0)


def test_ema_update_every_resumes_exactly_from_a_step_between_updates():
    """Saved at step 5 with update_every=2 (the averages cover through step 4), the resumed EMA's update at step 6
    stands for steps 5 and 6, as in the run that was not interrupted."""
    torch.manual_seed(0)
    module = nn.Linear(3, 2)
    start = _flat(module)
    ps = _param_sequence(module, 8, seed=9)

    def run(ema, steps, resume_from=None):
        if resume_from is not None:
            ema.on_load_checkpoint(None, None, {"ema": resume_from})
        _set(module, ps[steps[0] - 2].float() if steps[0] > 1 else start.float())
        _fit_start(ema, module)  # the trainer's global step is not restored yet when on_fit_start runs
        for step in steps:
            _set(module, ps[step - 1].float())
            ema.on_train_batch_end(SimpleNamespace(global_step=step), module, None, None, 0)
        return ema

    whole = run(EMA(decays=[0.9], update_every=2), range(1, 9))
    first = run(EMA(decays=[0.9], update_every=2), range(1, 6))
    state = first.state()
    assert state["step"] == 4 and state["num_updates"] == 4
    older = copy.deepcopy({k: v for k, v in state.items() if k != "step"})  # before "step": the last multiple
    # resumed with update_every=3: the update at step 6 stands for steps 5 and 6, those after the saved "step"
    e4 = torch.cat([w.reshape(-1) for w in state["weights"]["0.9"].values()]).double()
    changed = run(EMA(decays=[0.9], update_every=3), range(6, 7), resume_from=copy.deepcopy(state))
    keep = EMA(decays=[0.9]).decay_at(0.9, 5) * EMA(decays=[0.9]).decay_at(0.9, 6)
    torch.testing.assert_close(_ema_flat(changed, 0.9), keep * e4 + (1 - keep) * ps[5].float().double())
    resumed = run(EMA(decays=[0.9], update_every=2), range(6, 9), resume_from=state)
    assert resumed.num_updates == whole.num_updates == 8 and resumed.covered_step == 8
    torch.testing.assert_close(_ema_flat(resumed, 0.9), _ema_flat(whole, 0.9), rtol=0, atol=0)
    legacy = run(EMA(decays=[0.9], update_every=2), range(6, 9), resume_from=older)
    torch.testing.assert_close(_ema_flat(legacy, 0.9), _ema_flat(whole, 0.9), rtol=0, atol=0)


def test_a_resume_with_gradient_accumulation_adds_no_update():
    """With gradient accumulation every optimizer step n has two micro-batches, the first at global step n - 1.
    After a resume from step 4, that first micro-batch (step 4 again) is no step boundary: no update, with an
    older checkpoint (no "step") too."""
    torch.manual_seed(0)
    module = nn.Linear(3, 2)
    start = _flat(module)
    ps = _param_sequence(module, 6, seed=3)

    def run(ema, steps, resume_from=None):
        restored = steps[0] - 1
        if resume_from is not None:
            ema.on_load_checkpoint(None, None, {"ema": resume_from})
        _set(module, ps[restored - 1].float() if restored else start.float())
        _fit_start(ema, module, restored)
        for step in steps:
            ema.on_train_batch_end(SimpleNamespace(global_step=step - 1), module, None, None, 0)  # micro-batch 1
            _set(module, ps[step - 1].float())
            ema.on_train_batch_end(SimpleNamespace(global_step=step), module, None, None, 1)  # the step
        return ema

    whole = run(EMA(decays=[0.9], update_every=2), range(1, 7))
    older = {k: v for k, v in run(EMA(decays=[0.9], update_every=2), range(1, 5)).state().items() if k != "step"}
    resumed = run(EMA(decays=[0.9], update_every=2), range(5, 7), resume_from=older)
    assert resumed.num_updates == whole.num_updates == 6
    torch.testing.assert_close(_ema_flat(resumed, 0.9), _ema_flat(whole, 0.9), rtol=0, atol=0)


def test_ema_swapped_loads_and_restores():
    module, ema = _updated_ema(warmup=False, steps=3, seed=4)
    raw = _flat(module).clone()
    with ema.swapped(module):  # default: the first decay
        torch.testing.assert_close(_flat(module), _ema_flat(ema, 0.9))
    torch.testing.assert_close(_flat(module), raw, rtol=0, atol=0)
    with ema.swapped(module, 0.5):
        torch.testing.assert_close(_flat(module), _ema_flat(ema, 0.5))
        assert not torch.equal(_flat(module), raw)
    torch.testing.assert_close(_flat(module), raw, rtol=0, atol=0)
    # raw weights are restored even when the body raises
    with pytest.raises(RuntimeError):
        with ema.swapped(module, 0.5):
            raise RuntimeError("boom")
    torch.testing.assert_close(_flat(module), raw, rtol=0, atol=0)


def test_a_checkpoint_restored_after_fit_start_is_saved_before_its_first_update():
    """FSDP restores the checkpoint after on_fit_start (the fresh weights' averages are dropped then). A checkpoint
    saved before the next update (a relaunch of a finished run rewrites last.ckpt; a signal within update_every
    steps) holds the restored averages, not none."""
    module, ema = _updated_ema(warmup=True, steps=4, seed=5)
    state = ema.state()
    other = nn.Linear(3, 2)
    resumed = EMA(decays=[0.9, 0.5], warmup=True, update_every=2)
    resumed.on_fit_start(SimpleNamespace(global_step=0), other)  # FSDP's order: on_fit_start, the restore, then
    resumed.on_load_checkpoint(None, other, {"ema": copy.deepcopy(state)})  # on_train_start
    resumed.on_train_start(SimpleNamespace(global_step=4), other)
    resumed.on_train_batch_end(SimpleNamespace(global_step=5), other, None, None, 0)  # no update at step 5
    saved, elsewhere = {}, {}
    resumed.on_save_checkpoint(SimpleNamespace(is_global_zero=False), other, elsewhere)
    assert elsewhere == {}  # only rank 0 writes checkpoints: the others gather no host copy of the averages (DDP)
    resumed.on_save_checkpoint(SimpleNamespace(is_global_zero=True), other, saved)
    assert saved["ema"]["num_updates"] == 4
    for d in ("0.9", "0.5"):
        assert all(torch.equal(saved["ema"]["weights"][d][n], w) for n, w in state["weights"][d].items())


def test_ema_state_round_trip(tmp_path):
    module, ema = _updated_ema(warmup=True, steps=4, seed=5)
    state = ema.state()
    assert state["num_updates"] == 4 and [float(d) for d in state["decays"]] == [0.9, 0.5]
    assert set(state["weights"]) == {"0.9", "0.5"}
    assert set(state["weights"]["0.9"]) == {"weight", "bias"}
    # through a real file as well
    atomic_torch_save({"ema": state}, tmp_path / "e.ckpt")
    ckpt = load_checkpoint(tmp_path / "e.ckpt")

    ema2 = EMA(decays=[0.9, 0.5], warmup=True)
    ema2.on_load_checkpoint(None, None, ckpt)
    other = nn.Linear(3, 2)
    _set(other, _flat(module).float())
    for d in (0.9, 0.5):
        with ema2.swapped(other, d):
            torch.testing.assert_close(_flat(other), _ema_flat(ema, d), rtol=0, atol=0)
    assert ema2.num_updates == 4
    # the restored EMA keeps averaging from where it stopped
    _set(module, torch.ones(8))
    _set(other, torch.ones(8))
    ema.update(module)
    ema2.update(other)
    for d in (0.9, 0.5):
        torch.testing.assert_close(_ema_flat(ema2, d), _ema_flat(ema, d), rtol=0, atol=0)

    # a checkpoint with other decays is refused
    ema3 = EMA(decays=[0.99], warmup=True)
    ema3.on_load_checkpoint(None, None, {"ema": state})
    with pytest.raises(ValueError):
        ema3.update(other)


@pytest.mark.parametrize("decays", [[], [1.0], [0.0], [-0.5], [0.9, 1.5]])
def test_ema_invalid_decays(decays):
    with pytest.raises(ValueError):
        EMA(decays=decays)


def test_ema_invalid_sample_decay():
    with pytest.raises(ValueError):
        EMA(decays=[0.9, 0.99], sample_decay=0.5)
    assert EMA(decays=[0.9, 0.99], sample_decay=0.99).sample_decay == "0.99"


def test_validated_averages_are_logged_next_to_the_raw_loss_and_change_nothing(tiny_cfg, tmp_path):
    """``callbacks.ema.validate``: each named average is validated with the validation set's noise and timesteps,
    next to the raw weights, as ``val/loss_ema_<name>`` (kept in summary.json for scaling reports). The value is
    the loss of that average's weights as the checkpoint holds them, and the run trains as one without it."""
    import json

    from diffusion_train.data.samplers import FixedBatches, fixed_batches
    from diffusion_train.train import train
    from diffusion_train.training.build import load_module

    from conftest import instantiate_data

    averages = ["callbacks.ema.sigma_rels=[0.1]"]
    validated = [*averages, "callbacks.ema.validate=[0.999,sigma_rel_0.1]"]
    train(tiny_cfg(*averages, run_dir=tmp_path / "plain"), tmp_path / "plain")
    train(tiny_cfg(*validated, run_dir=tmp_path / "validated"), tmp_path / "validated")

    def summary(run: str) -> dict:
        return json.loads((tmp_path / run / "summary.json").read_text())["metrics"]

    plain, metrics = summary("plain"), summary("validated")
    assert set(metrics) == {"val/loss", "val/loss_ema_0.999", "val/loss_ema_sigma_rel_0.1"}
    assert metrics["val/loss"] == plain["val/loss"]  # the raw weights' loss, and training, untouched
    last = {run: load_checkpoint(tmp_path / run / "checkpoints/last.ckpt") for run in ("plain", "validated")}
    assert last["plain"]["state_dict"].keys() == last["validated"]["state_dict"].keys()
    assert all(torch.equal(v, last["validated"]["state_dict"][k]) for k, v in last["plain"]["state_dict"].items())

    data = instantiate_data(tiny_cfg(*validated))
    data.setup()
    val = FixedBatches(data.val_set)
    for name in ("0.999", "sigma_rel_0.1"):
        history = metrics[f"val/loss_ema_{name}"]["history"]
        assert [h["step"] for h in history] == [2, 4]
        assert history[0]["value"] != history[1]["value"] != metrics["val/loss"]["history"][1]["value"]
        module = load_module(tmp_path / "validated/checkpoints/last.ckpt", weights=f"ema_{name}")
        module.on_validation_epoch_start()
        with torch.no_grad():
            for batch in fixed_batches(len(data.val_set), data.val_batch_size, 0, 1):
                module.validation_step(val[batch], 0)
        loss_sum, count = module._val_total[0]
        assert history[1]["value"] == pytest.approx(float(loss_sum / count), rel=1e-6), name

    with pytest.raises(ValueError, match=r"callbacks.ema.validate \[0.5\]: each must be one of the averages"):
        EMA(decays=[0.999], validate=[0.5])


def test_validated_weights_share_a_batch_s_inputs_and_remake_only_a_trained_condition(tiny_cfg):
    """With averages validated, a validation batch's latents, noise and timesteps are made once for every set of
    weights, and its condition too unless the conditioner has trained weights (here a class embedding): then once
    per set. The losses are the same either way."""
    import contextlib

    from diffusion_train.data.samplers import FixedBatches, fixed_batches

    from conftest import instantiate_data, module_of, randomised

    module = randomised(module_of(tiny_cfg), 0).eval()
    data = instantiate_data(tiny_cfg())
    data.setup()
    batch = FixedBatches(data.val_set)[fixed_batches(len(data.val_set), data.val_batch_size, 0, 1)[0]]
    calls = {"conditioner": 0, "latents": 0}

    def counted(name, fn):
        def call(*args):
            calls[name] += 1
            return fn(*args)
        return call

    module.conditioner.forward = counted("conditioner", module.conditioner.forward)
    module.latents = counted("latents", module.latents)
    module.val_weights = {"a": contextlib.nullcontext, "b": contextlib.nullcontext}  # the same weights, 3 times

    def rows() -> list[float]:
        calls.update(conditioner=0, latents=0)
        module.on_validation_epoch_start()
        with torch.no_grad():
            module.validation_step(batch, 0)
        return [float(total / count) for total, count in module._val_total]

    trained = rows()
    assert calls == {"conditioner": 3, "latents": 1} and trained[0] == trained[1] == trained[2]
    module.conditioner.requires_grad_(False)  # a frozen conditioner: one condition for all
    assert rows() == trained and calls == {"conditioner": 1, "latents": 1}


@pytest.mark.parametrize("ema, chosen", [
    ({"decays": [0.999], "sample_decay": None}, "0.999"), ({"decays": [], "sigma_rels": [0.08]}, "sigma_rel_0.08"),
    ({"decays": [0.999], "sample_decay": 0.99}, "0.99"),
])
def test_weights_ema_is_the_runs_sampling_average(ema, chosen):
    """weights=ema takes the average the run sampled with: its sample_decay, else (null) its first average, as the
    EMA callback does. With a null sample_decay a checkpoint of other averages (post-hoc ones) gave its first,
    silently; now it is refused like one with an explicit sample_decay."""
    from diffusion_train.training.ema import checkpoint_average

    config = {"diffusion_train": {"config": {"callbacks": {"ema": ema}}}}
    tensors = {name: {"w": torch.full((1,), float(i))} for i, name in enumerate(["0.9", chosen, "0.5"])}
    assert checkpoint_average({"ema": {"weights": tensors}, **config}, "ema", "x")[0] == chosen
    posthoc = {"ema": {"weights": {"sigma_rel_0.03": {}, "sigma_rel_0.1": {}}}, **config}
    with pytest.raises(ValueError, match=f"^weights=ema: the run samples with its EMA {chosen}, which x does not "
                                         f"hold; choose one of its averages: ema_sigma_rel_0.03, ema_sigma_rel_0.1$"):
        checkpoint_average(posthoc, "ema", "x")
