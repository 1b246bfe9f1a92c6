"""Training: the LightningModule, callbacks (EMA, samples, Fréchet distance, throughput, preemption, run
summary), checkpoints, loggers."""

from diffusion_train.training.checkpointing import AtomicCheckpointIO, StepCheckpoints, atomic_torch_save
from diffusion_train.training.ema import EMA
from diffusion_train.training.fid import FrechetDistance
from diffusion_train.training.kernel_profile import KernelProfileReport
from diffusion_train.training.module import DiffusionModule, NonFiniteLossError
from diffusion_train.training.preemption import Preemption
from diffusion_train.training.samples import SampleGrid
from diffusion_train.training.summary import RunSummary
from diffusion_train.training.syncs import HostSyncReport
from diffusion_train.training.throughput import Throughput

__all__ = ["AtomicCheckpointIO", "DiffusionModule", "EMA", "FrechetDistance", "HostSyncReport", "KernelProfileReport",
           "NonFiniteLossError", "Preemption", "RunSummary", "SampleGrid", "StepCheckpoints", "Throughput",
           "atomic_torch_save"]
