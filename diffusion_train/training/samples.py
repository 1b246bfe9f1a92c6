"""Sample grids during training: fixed noise and labels, so grids are comparable across steps."""

from __future__ import annotations

from pathlib import Path

import lightning as L
import torch

from diffusion_train.diffusion import Sampler
from diffusion_train.diffusion.guidance import check_guidance
from diffusion_train.training.ema import sampling_weights
from diffusion_train.training.images import save_grid
from diffusion_train.training.periodic import PeriodicEvaluation


def check_sampling_inputs(pl_module, prompts: list[str], sampler: Sampler, option: str) -> None:
    """What a sampling callback (``option``: its config key) will sample with, against the model: its prompts
    (missing for a text model, or given to another one) and its sampler on the model's schedule (a spacing the
    schedule cannot take, karras with zero terminal SNR; a solver that cannot run on its times, heun where alpha
    reaches 0). One-line errors naming the setting."""
    try:
        pl_module.conditioner.input_pools(prompts=prompts, prompts_option=f"{option}.prompts")
    except ValueError as e:
        raise ValueError(f"{option}: {e}") from None
    try:
        sampler.check(pl_module.objective.schedule)
    except ValueError as e:
        raise ValueError(f"{option}.sampler ({sampler.name}, spacing={sampler.spacing}): {e}") from None


class SampleGrid(PeriodicEvaluation):
    """Every ``every_n_steps`` optimizer steps and at the end of training, samples a grid with the
    EMA weights (``sample_decay`` of the EMA callback; raw weights if there is no EMA callback).

    Class-conditional models get one row per class (``per_class`` columns), text-conditioned ones one
    row per prompt of ``prompts``; unconditional ones ``rows`` x ``per_class``. Image i always starts
    from the noise of seed ``seed + i``.
    Every rank samples (no rank waits for another); rank 0 writes ``<dirpath>/step_XXXXXXX.png``
    and logs the grid to every logger that can show images. A run stopped by a signal makes the grid of the
    step it stopped at when it resumes, if that grid was due (see :mod:`~diffusion_train.training.periodic`).
    """

    def __init__(self, sampler: Sampler, dirpath: str, every_n_steps: int = 1000, per_class: int = 8,
                 rows: int = 4, guidance_scale: float = 1.0, seed: int = 0,
                 guidance_interval: list[float] | None = None, guidance_rescale: float = 0.0,
                 prompts: list[str] | None = None):
        super().__init__(every_n_steps)
        small = {k: v for k, v in {"every_n_steps": every_n_steps, "per_class": per_class, "rows": rows}.items()
                 if not (isinstance(v, int) and v >= 1)}
        if small:
            raise ValueError("callbacks.sample_grid: " + ", ".join(f"{k}={v}" for k, v in small.items()) +
                             ": give whole numbers >= 1")
        check_guidance(guidance_scale, guidance_interval, guidance_rescale, "callbacks.sample_grid")
        self.sampler, self.dirpath = sampler, Path(dirpath)
        self.per_class, self.rows, self.guidance_scale = per_class, rows, float(guidance_scale)
        self.seed, self.prompts = seed, list(prompts or [])
        self.guidance = {"guidance_interval": guidance_interval, "guidance_rescale": guidance_rescale}

    def check_inputs(self, pl_module) -> None:
        """Before any work (``train`` calls it before a DreamBooth run's class images; ``setup`` again)."""
        check_sampling_inputs(pl_module, self.prompts, self.sampler, "callbacks.sample_grid")

    def setup(self, trainer: L.Trainer, pl_module, stage: str) -> None:
        self.check_inputs(pl_module)

    def cond_inputs(self, pl_module) -> tuple[int, dict]:
        """One row per class / prompt (``per_class`` columns); unconditional: ``rows`` rows."""
        pools = pl_module.conditioner.input_pools(prompts=self.prompts)
        rows = max((len(p) for p in pools.values()), default=self.rows)
        n = rows * self.per_class
        return n, pl_module.conditioner.sample_inputs(n, prompts=self.prompts, repeat=self.per_class)

    def path(self, step: int) -> Path:
        return self.dirpath / f"step_{step:07d}.png"

    def done_at(self, step: int) -> bool:
        return self.path(step).is_file()

    @torch.no_grad()
    def evaluate(self, trainer: L.Trainer, pl_module) -> Path | None:
        """Samples the grid of this step; rank 0 saves and logs it and returns its path."""
        n, inputs = self.cond_inputs(pl_module)
        with sampling_weights(trainer, pl_module):
            images = pl_module.sample_seeded(list(range(n)), inputs, self.sampler, self.guidance_scale, self.seed,
                                             **self.guidance)
        if trainer.global_rank != 0:
            return None
        path = save_grid(images, self.path(trainer.global_step), ncol=self.per_class)
        for logger in trainer.loggers:
            if hasattr(logger, "log_image"):
                logger.log_image(key="samples", images=[str(path)], step=trainer.global_step)
        return path
