"""Scale-out in one place: the FSDP strategy, the global batch and its learning-rate rule, device checks.

The model code knows nothing of parallelism: ``DiffusionModule.configure_model`` hands itself to the
strategy's ``parallelize`` when the strategy has one (FSDP below); DDP needs nothing.
"""

from __future__ import annotations

import contextlib
import math
import os
from typing import Any, Iterator

import torch
from lightning.pytorch.strategies import ModelParallelStrategy
from torch import nn

from diffusion_train.conditioning.cond import Cond


class FSDP(ModelParallelStrategy):
    """Fully sharded data parallel (PyTorch's FSDP2, ``fully_shard``) over every device of every node.

    ``parallelize`` shards each element of the backbone's ``nn.ModuleList``\\ s (its repeated blocks) as
    a unit, then the rest of the backbone, then each conditioner embedder that has trainable weights
    (e.g. the class table); frozen encoders stay whole on every device. Every trainable parameter is
    then a DTensor sharded over the data-parallel mesh, so gradient clipping, the fused optimizer and
    the EMA (kept as sharded DTensors too) all work on shards.

    ``reshard_after_forward``: True frees gathered weights after each unit's forward (ZeRO-3, "full
    shard"); False keeps them until the backward (ZeRO-2-like, "shard grad op": more memory, less
    communication). ``param_dtype``: gather weights in this dtype (``bfloat16`` halves the traffic;
    gradients are reduced in fp32); None keeps fp32 weights under the trainer's autocast.
    ``reduce_every_micro_batch``: with gradient accumulation, True reduce-scatters each micro-batch's gradients
    into the sharded sum; False keeps whole gradients on every device until the step's last micro-batch and
    reduce-scatters them once (1/accumulation of the gradient traffic, for one whole fp32 gradient of memory).

    Checkpoints are whole (``last.ckpt`` holds full tensors, gathered to rank 0 as it is written), so they
    load under any strategy and any number of devices. It also runs on CPUs with gloo.
    """

    def __init__(self, reshard_after_forward: bool = True, param_dtype: str | None = None,
                 reduce_every_micro_batch: bool = True, **kwargs: Any):
        super().__init__(data_parallel_size="auto", tensor_parallel_size=1, save_distributed_checkpoint=False,
                         **kwargs)
        self.reshard_after_forward = bool(reshard_after_forward)
        self.param_dtype = _dtype(param_dtype)
        self.reduce_every_micro_batch = bool(reduce_every_micro_batch)

    @contextlib.contextmanager
    def block_backward_sync(self) -> Iterator[None]:
        """Around the backward passes of a step's micro-batches before its last (``DiffusionModule.training_step``).
        ``reduce_every_micro_batch=False``: :func:`no_gradient_sync`, so the step's gradients are reduce-scattered
        once, in its last backward pass. Otherwise each backward pass reduce-scatters its own (FSDP's default)."""
        with contextlib.nullcontext() if self.reduce_every_micro_batch else no_gradient_sync(self.lightning_module):
            yield

    def setup_environment(self) -> None:
        self._data_parallel_size = self.num_nodes * self.num_processes  # one data-parallel dimension
        super().setup_environment()

    def parallelize(self, module: nn.Module) -> None:
        from torch.distributed.fsdp import FSDPModule, MixedPrecisionPolicy, fully_shard

        backbone = module.backbone
        if isinstance(backbone, FSDPModule):  # already sharded (configure_model runs once per fit)
            return
        mesh = self.device_mesh["data_parallel"]
        policy = MixedPrecisionPolicy(param_dtype=self.param_dtype, reduce_dtype=torch.float32) \
            if self.param_dtype is not None else MixedPrecisionPolicy()
        kw = {"mesh": mesh, "reshard_after_forward": self.reshard_after_forward, "mp_policy": policy}
        for blocks in [m for m in backbone.modules() if isinstance(m, nn.ModuleList)]:
            for block in blocks:
                if any(p.requires_grad for p in block.parameters()) and not isinstance(block, FSDPModule):
                    fully_shard(block, **kw)
        if self.param_dtype is not None:  # FSDP would cast the timesteps too: bf16 makes DDPM's 999 and 998 one
            fully_shard(backbone, **{**kw, "mp_policy": MixedPrecisionPolicy(
                param_dtype=self.param_dtype, reduce_dtype=torch.float32, cast_forward_inputs=False)})
            backbone.register_forward_pre_hook(cast_all_but_time(self.param_dtype), with_kwargs=True)
        else:
            fully_shard(backbone, **kw)
        for embedder in getattr(module.conditioner, "embedders", {}).values():
            if any(p.requires_grad for p in embedder.parameters()):
                fully_shard(embedder, **kw)
        unsharded = [n for n, p in module.named_parameters() if p.requires_grad and not is_dtensor(p)]
        if unsharded:
            raise ValueError(f"FSDP shards the backbone and the conditioner's embedders, but {unsharded[:3]} are "
                             f"trainable and outside them; freeze them or train with DDP")


def cast_all_but_time(dtype: torch.dtype):
    """A forward pre-hook for ``backbone(x, t, cond, ...)`` that casts the floating-point inputs to ``dtype`` as
    FSDP's mixed precision does, but the timesteps ``t``: the time embedding takes them in fp32."""
    def cast(value):
        if isinstance(value, torch.Tensor):
            return value.to(dtype) if value.is_floating_point() else value
        if isinstance(value, (list, tuple)):
            return type(value)(cast(v) for v in value)
        if isinstance(value, Cond):
            return value.map(cast)
        return value

    def hook(module, args, kwargs):
        kept = {k: v for k, v in kwargs.items() if k in ("t", "timestep", "timesteps")}
        cast_args = cast(args[:1]) + args[1:2] + cast(args[2:])
        return cast_args, {**{k: cast(v) for k, v in kwargs.items() if k not in kept}, **kept}

    return hook


def is_dtensor(t: torch.Tensor) -> bool:
    from torch.distributed.tensor import DTensor

    return isinstance(t, DTensor)


def _dtype(name: str | None) -> torch.dtype | None:
    if name in (None, "null", "none"):
        return None
    dtype = getattr(torch, str(name), None)
    if not isinstance(dtype, torch.dtype):
        raise ValueError(f"trainer.strategy.param_dtype: {name!r} is not a torch dtype (e.g. bfloat16)")
    return dtype


def full_tensor(t: torch.Tensor) -> torch.Tensor:
    """The whole tensor of a (possibly sharded) DTensor; a collective call for DTensors: every rank calls it."""
    return t.full_tensor() if is_dtensor(t) else t


def mean_over_ranks(t: torch.Tensor) -> torch.Tensor:
    """``t``'s mean over the processes of a multi-process run (one all-reduce, no barrier: on GPUs the host does not
    wait for it), ``t`` itself in one process."""
    dist = torch.distributed
    if not (dist.is_available() and dist.is_initialized()) or dist.get_world_size() == 1:
        return t
    total = t.clone()
    dist.all_reduce(total, op=dist.ReduceOp.SUM)  # gloo has no AVG
    return total / dist.get_world_size()


def sum_over_ranks(counts: dict[str, int]) -> dict[str, int]:
    """Named counts summed over the processes of a multi-process run (the names may differ between ranks; one
    ``all_gather_object``, which waits for every rank: for logging steps, not every step), ``counts`` in one process."""
    dist = torch.distributed
    if not (dist.is_available() and dist.is_initialized()) or dist.get_world_size() == 1:
        return dict(counts)
    gathered: list = [None] * dist.get_world_size()
    dist.all_gather_object(gathered, dict(counts))
    total: dict[str, int] = {}
    for rank in gathered:
        for name, n in rank.items():
            total[name] = total.get(name, 0) + n
    return total


def fsdp_units(module: nn.Module) -> list:
    """The FSDP units (``fully_shard``-ed modules) in ``module``, outermost first."""
    from torch.distributed.fsdp import FSDPModule

    return [m for m in module.modules() if isinstance(m, FSDPModule)]


def reshard(module: nn.Module) -> None:
    """A sharded model's FSDP units back in their sharded state, so that its parameters are this rank's shards. A
    forward pass without a backward (evaluation, sampling) under ``reshard_after_forward=False`` leaves the gathered
    whole weights registered until the next backward. Without FSDP units, nothing."""
    for unit in fsdp_units(module):
        unit.reshard()


@contextlib.contextmanager
def no_gradient_sync(module: nn.Module) -> Iterator[None]:
    """Backward passes inside keep their gradients whole on every device and add them to those of the passes before,
    without communication; the next backward pass outside reduce-scatters the sum into the sharded gradients (FSDP's
    gradient accumulation without communication). Without FSDP units, nothing."""
    units = fsdp_units(module)
    for unit in units:
        unit.set_requires_gradient_sync(False, recurse=False)
    try:
        yield
    finally:
        for unit in units:
            unit.set_requires_gradient_sync(True, recurse=False)


def local(t: torch.Tensor) -> torch.Tensor:
    """This rank's part of a sharded DTensor (sharing its storage), else the tensor itself."""
    return t.to_local() if is_dtensor(t) else t


def like(full: torch.Tensor, param: torch.Tensor) -> torch.Tensor:
    """``full`` (a whole tensor, the same on every rank) as a tensor laid out like ``param``: this
    rank's shard when ``param`` is a sharded DTensor (no communication), else ``full`` itself."""
    if is_dtensor(param):
        from torch.distributed.tensor import distribute_tensor

        return distribute_tensor(full.to(param.device), param.device_mesh, param.placements, src_data_rank=None)
    return full.to(param.device)


# -- the global batch, the learning-rate rule, the devices -----------------------------------------
def global_batch(batch_size: int, world_size: int, accumulate: int) -> int:
    """Images per optimizer step: per-device batch x devices x nodes x accumulation steps."""
    return int(batch_size) * int(world_size) * int(accumulate)


def trainer_global_batch(trainer, pl_module) -> int:
    """The images of one optimizer step in a running fit (0 without a data module): :func:`global_batch` times
    the images each sample of the data module brings (``images_per_sample``: 2 for DreamBooth with prior
    preservation, whose samples pair a subject image with a class image)."""
    dm = trainer.datamodule
    if dm is None:
        return 0
    samples = global_batch(dm.batch_size, trainer.world_size, getattr(pl_module, "accumulate_grad_batches", 1))
    return samples * int(getattr(dm, "images_per_sample", 1))


def lightning_intervals(trainer_cfg, accumulate: int) -> dict:
    """``trainer.log_every_n_steps`` and an integer ``trainer.val_check_interval`` in the batches Lightning
    counts them in. The config counts optimizer steps, as ``max_steps`` and checkpoints do; with the
    module's own gradient accumulation, one step is ``accumulate`` batches."""
    out = {"log_every_n_steps": max(1, int(trainer_cfg.get("log_every_n_steps") or 50)) * accumulate}
    val = trainer_cfg.get("val_check_interval")
    number = isinstance(val, (int, float)) and not isinstance(val, bool)  # else a time ("00:01:00:00"): Lightning's
    if (number and not (val > 0 and (isinstance(val, int) or val <= 1))) or isinstance(val, bool):
        raise ValueError(f"trainer.val_check_interval={val}: give a number of optimizer steps >= 1, a fraction "
                         f"of an epoch in (0, 1], or a time (DD:HH:MM:SS)")
    if isinstance(val, int) and not isinstance(val, bool):
        out["val_check_interval"] = val * accumulate
    return out


def log_every_steps(trainer, pl_module) -> int:
    """The logging interval in optimizer steps (``trainer.log_every_n_steps`` counts batches)."""
    return max(1, trainer.log_every_n_steps // max(1, int(getattr(pl_module, "accumulate_grad_batches", 1))))


def logs_at(trainer, pl_module, step: int) -> bool:
    """Whether optimizer ``step`` gets a row of metrics: every :func:`log_every_steps`, and the run's last step
    (``max_steps``), whose row Lightning writes at the end of the fit from the last values logged, so counters
    logged only at logging steps would show an earlier step's. The same on every rank."""
    return step % log_every_steps(trainer, pl_module) == 0 or is_last_step(trainer, step)


def is_last_step(trainer, step: int) -> bool:
    """Whether optimizer ``step`` is the fit's last, ``trainer.max_steps`` (-1 or None: no such limit)."""
    max_steps = getattr(trainer, "max_steps", None)
    return max_steps is not None and 0 < max_steps <= step


def per_device_batch(batch_size: int, global_batch: int | None, world_size: int, accumulate: int) -> int:
    """The batch each device loads per micro-step: ``data.batch_size``, or ``scale.global_batch``
    split over devices x accumulation steps (which must divide it)."""
    if global_batch is None:
        return int(batch_size)
    parts = world_size * accumulate
    if global_batch <= 0 or global_batch % parts:
        raise ValueError(f"scale.global_batch={global_batch} is not divisible by the world size {world_size} "
                         f"x training.accumulate_grad_batches {accumulate} = {parts}; choose a multiple of {parts}")
    return global_batch // parts


LR_RULES = {"none": lambda ratio: 1.0, "linear": lambda ratio: ratio, "sqrt": math.sqrt}


def lr_scale(rule: str | None, global_batch: int, base_batch: int) -> float:
    """The factor ``optim.lr`` is multiplied by: 1 (``none``), global/base (``linear``), or its square
    root (``sqrt``, the usual rule for Adam)."""
    rule = rule or "none"
    if rule not in LR_RULES:
        raise ValueError(f"scale.lr_scaling must be one of {sorted(LR_RULES)}, got {rule!r}")
    if base_batch <= 0:
        raise ValueError(f"scale.lr_base_batch must be positive, got {base_batch}")
    return float(LR_RULES[rule](global_batch / base_batch))


def resolve_accelerator(accelerator: Any) -> str:
    """``trainer.accelerator`` in lower case, ``auto`` (or unset) made ``gpu`` when CUDA is available, else ``cpu``."""
    name = str(accelerator or "auto").lower()
    if name == "auto":
        return "gpu" if torch.cuda.is_available() else "cpu"
    return name


def check_launcher(trainer) -> None:
    """Refuses a strategy that starts its ranks as child processes (``ddp_spawn``, ``ddp_fork``, ``ddp_notebook``):
    the launching process is then no rank, and the run's end (the last checkpoint, exports, a requeue on a signal)
    runs there without the fit's state."""
    start = getattr(trainer.strategy, "_start_method", "popen")
    if start != "popen":
        raise ValueError(f"trainer.strategy: ranks started by {start} ({type(trainer.strategy).__name__}) are not "
                         "supported; use trainer=ddp (or strategy=ddp), which runs every rank as a process of its own")


def check_devices(accelerator: Any, devices: Any) -> None:
    """Refuses more devices than this machine shows, before any process starts, in one line."""
    accelerator = resolve_accelerator(accelerator)
    if accelerator in ("gpu", "cuda"):
        visible, what = torch.cuda.device_count(), "GPU"
        where = f" (CUDA_VISIBLE_DEVICES={os.environ['CUDA_VISIBLE_DEVICES']!r})" if "CUDA_VISIBLE_DEVICES" in os.environ else ""
    elif accelerator == "cpu":
        visible, what, where = os.cpu_count() or 1, "CPU core", ""
    else:
        return  # other accelerators: Lightning checks them
    if accelerator in ("gpu", "cuda") and visible == 0:
        raise ValueError(f"trainer.accelerator={accelerator} but no GPU is visible{where}; use trainer=cpu")
    if isinstance(devices, str) and devices.strip().lstrip("-").isdigit():
        devices = int(devices)
    if isinstance(devices, int) and devices > visible:
        raise ValueError(f"trainer.devices={devices} but this machine shows {visible} {what}"
                         f"{'s' if visible != 1 else ''}{where}; lower trainer.devices (or use more nodes: "
                         f"trainer.num_nodes)")
    if isinstance(devices, (list, tuple)) and devices and max(int(d) for d in devices) >= visible:
        raise ValueError(f"trainer.devices={list(devices)} names device {max(int(d) for d in devices)} but this "
                         f"machine shows {visible} {what}{'s' if visible != 1 else ''}{where}")
