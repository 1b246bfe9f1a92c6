"""FSDP on CPU (gloo): EMA swaps into shards, gradient accumulation with one reduce-scatter, and mixed precision
that keeps the timesteps in fp32."""

from __future__ import annotations

import contextlib
import copy
import json
from pathlib import Path

import pytest
import torch

from conftest import gloo_group


def _swap_worker(rank: int, world: int, init: str, reshard_after_forward: bool, out: str) -> None:
    from torch import nn
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import fully_shard

    from diffusion_train.training.ema import EMA

    with gloo_group(rank, world, init):
        torch.manual_seed(0)
        model = nn.Sequential(nn.Linear(4, 4), nn.Linear(4, 4))
        mesh = init_device_mesh("cpu", (world,))
        for layer in model:
            fully_shard(layer, mesh=mesh, reshard_after_forward=reshard_after_forward)
        fully_shard(model, mesh=mesh, reshard_after_forward=reshard_after_forward)
        ema = EMA(decays=[0.9])
        ema.update(model)
        for w in ema.weights["0.9"]:
            w.to_local().add_(1.0)  # an average unlike the weights
        x = torch.randn(2, 4, generator=torch.Generator().manual_seed(1))
        with torch.no_grad():
            raw = model(x)  # evaluation: no backward, so reshard_after_forward=False leaves the weights gathered
            with ema.swapped(model):
                average = model(x)
                with ema.unswapped():  # a checkpoint saved during an evaluation
                    inside = model(x)
                again = model(x)
            after = model(x)
        Path(out, f"{rank}.json").write_text(json.dumps({
            "average_differs": not torch.allclose(average, raw), "average_again": torch.equal(again, average),
            "unswapped_is_raw": torch.equal(inside, raw), "raw_restored": torch.equal(after, raw)}))


@pytest.mark.parametrize("reshard_after_forward", [True, False])
def test_ema_swaps_into_fsdp_shards_after_a_forward_without_backward(tmp_path, reshard_after_forward):
    """Sampling and EMA validation swap an average into a sharded model after a forward pass without a backward
    (validation), which under reshard_after_forward=False (trainer=fsdp_grad_op) leaves the gathered weights in
    place: the swap reshards first, and again before restoring, so the raw weights come back."""
    init = f"file://{tmp_path / 'init'}"
    torch.multiprocessing.spawn(_swap_worker, args=(2, init, reshard_after_forward, str(tmp_path)), nprocs=2,
                                join=True)
    for rank in range(2):
        assert json.loads((tmp_path / f"{rank}.json").read_text()) == {
            "average_differs": True, "average_again": True, "unswapped_is_raw": True, "raw_restored": True}, rank


def _accumulate_worker(rank: int, world: int, init: str, param_dtype: str | None, out: str) -> None:
    from torch import nn
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard

    from diffusion_train.training.parallel import full_tensor, no_gradient_sync

    with gloo_group(rank, world, init):
        torch.manual_seed(0)
        reference = nn.Sequential(nn.Linear(4, 8), nn.Tanh(), nn.Linear(8, 1))
        mesh = init_device_mesh("cpu", (world,))
        policy = MixedPrecisionPolicy(param_dtype=getattr(torch, param_dtype) if param_dtype else None,
                                      reduce_dtype=torch.float32)
        inputs = [torch.randn(2, 2, 4, generator=torch.Generator().manual_seed(r)) for r in range(world)]
        grads, untouched = {}, {}
        for mode in ("each", "once"):  # a reduce-scatter per micro-batch; whole gradients until the last
            model = copy.deepcopy(reference)
            for layer in (model[0], model[2]):
                fully_shard(layer, mesh=mesh, mp_policy=policy)
            fully_shard(model, mesh=mesh, mp_policy=policy)
            with contextlib.nullcontext() if mode == "each" else no_gradient_sync(model):
                model(inputs[rank][0]).sum().backward()
            untouched[mode] = all(p.grad is None for p in model.parameters())  # nothing reduce-scattered yet
            model(inputs[rank][1]).sum().backward()
            grads[mode] = [full_tensor(p.grad).float() for p in model.parameters()]
        for r in range(world):  # FSDP averages over ranks: the mean of each rank's summed micro-batch gradients
            for micro in inputs[r]:
                (reference(micro).sum() / world).backward()

        def diff(a, b):
            return max((x - y).abs().max().item() for x, y in zip(a, b))

        Path(out, f"{rank}.json").write_text(json.dumps({
            "untouched": untouched, "once_vs_each": diff(grads["once"], grads["each"]),
            "once_vs_fp32": diff(grads["once"], [q.grad for q in reference.parameters()])}))


@pytest.mark.parametrize("param_dtype", [None, "bfloat16"])
def test_fsdp_accumulates_micro_batches_with_one_reduce_scatter(tmp_path, param_dtype):
    """trainer.strategy.reduce_every_micro_batch=false: the backward passes before a step's last keep whole
    gradients (no sharded gradient exists after the first), and the last reduce-scatters their sum: the gradients
    of a reduce-scatter per micro-batch, with fp32 weights and with weights gathered in bf16 (whose sum FSDP keeps
    in fp32)."""
    init = f"file://{tmp_path / 'init'}"
    torch.multiprocessing.spawn(_accumulate_worker, args=(2, init, param_dtype, str(tmp_path)), nprocs=2, join=True)
    for rank in range(2):
        got = json.loads((tmp_path / f"{rank}.json").read_text())
        assert got["untouched"] == {"each": False, "once": True}, (rank, got)
        assert got["once_vs_each"] < 1e-6, (rank, got)
        assert got["once_vs_fp32"] < (1e-6 if param_dtype is None else 3e-2), (rank, got)


def test_the_fsdp_strategy_keeps_gradients_whole_between_micro_batches_only_when_asked(monkeypatch):
    from diffusion_train.training import parallel

    entered = []
    monkeypatch.setattr(parallel, "no_gradient_sync", lambda module: entered.append(module) or contextlib.nullcontext())
    module = torch.nn.Linear(2, 2)
    for every in (True, False):
        strategy = parallel.FSDP(reduce_every_micro_batch=every)
        strategy._lightning_module = module
        with strategy.block_backward_sync():
            pass
    assert entered == [module]  # reduce_every_micro_batch=false only


def _time_worker(rank: int, world: int, init: str, out: str) -> None:
    from torch import nn
    from torch.distributed.device_mesh import init_device_mesh

    from diffusion_train.conditioning import Cond, Conditioner
    from diffusion_train.models.dit import DiT
    from diffusion_train.training.parallel import FSDP

    with gloo_group(rank, world, init):
        torch.manual_seed(0)
        holder = nn.Module()
        holder.backbone = DiT(input_size=8, in_channels=4, size=None, hidden_size=32, depth=2, num_heads=2, cond_dim=8)
        holder.conditioner = Conditioner({})
        seen = []
        holder.backbone.cond_embedder.t_embedder.register_forward_pre_hook(lambda m, args: seen.append(args[0]))
        strategy = FSDP(param_dtype="bfloat16")
        strategy._device_mesh = init_device_mesh("cpu", (world,), mesh_dim_names=("data_parallel",))
        strategy.parallelize(holder)
        x, t, cond = torch.randn(2, 4, 8, 8), torch.tensor([999.0, 998.0]), Cond(vector=torch.randn(2, 8))
        with torch.autocast("cpu", dtype=torch.bfloat16):
            mixed = holder.backbone(x, t, cond)
        pure = holder.backbone(x, t, cond)  # no autocast: the weights' bf16 throughout
        Path(out, f"{rank}.json").write_text(json.dumps({
            "times": [[str(s.dtype), s.tolist()] for s in seen], "outputs": [str(mixed.dtype), str(pure.dtype)],
            "finite": bool(mixed.isfinite().all() and pure.isfinite().all())}))


def test_fsdp_gathering_bf16_weights_keeps_the_timesteps_in_fp32(tmp_path):
    """param_dtype=bfloat16 cast every input of the backbone to bf16, the timesteps too: DDPM's 999 and 998 both
    reached the time embedding as 1000 (bf16 keeps 8 bits). The other inputs are still cast, with autocast or
    without."""
    init = f"file://{tmp_path / 'init'}"
    torch.multiprocessing.spawn(_time_worker, args=(1, init, str(tmp_path)), nprocs=1, join=True)
    got = json.loads((tmp_path / "0.json").read_text())
    assert got["times"] == [["torch.float32", [999.0, 998.0]]] * 2
    assert got["outputs"] == ["torch.bfloat16", "torch.bfloat16"] and got["finite"]
