"""Fréchet distance (FID with Inception-v3, FD with another extractor) and class accuracy during training."""

from __future__ import annotations

import json
from pathlib import Path

import lightning as L
import torch

from diffusion_train.diffusion import Sampler
from diffusion_train.diffusion.guidance import check_guidance
from diffusion_train.metrics.fid import build_extractor, check_reference_images, load_reference
from diffusion_train.metrics.generated import evaluate_generated
from diffusion_train.training.ema import sampling_weights
from diffusion_train.training.periodic import PeriodicEvaluation
from diffusion_train.training.samples import check_sampling_inputs
from diffusion_train.training.preemption import stopping


class FrechetDistance(PeriodicEvaluation):
    """Every ``every_n_steps`` optimizer steps (and at the end of training), ``num_samples`` images
    with the EMA weights (the EMA callback's sampling decay; raw weights without one), compared with
    the ``reference`` statistics (``scripts/fid_reference.py``) through the ``extractor`` loaded from
    ``weights``. Image i has seed ``seed + i`` and the i-th class or prompt, so evaluations are
    comparable across steps, batch sizes and numbers of ranks; every rank samples its share. Logged
    as ``fid/inception_10k`` or ``fd/<extractor>_2k`` (the extractor and the count in the name: a proxy
    is never mistaken for FID-50k), plus ``class_accuracy/<extractor>_2k`` for class-conditional
    models and an extractor that classifies; rank 0 also appends ``{step, metrics}`` to
    ``<dirpath>/metrics.jsonl``. With ``clip`` (:class:`~diffusion_train.metrics.clip_score.CLIPScore`
    arguments: ``model_name``, ``pretrained``) text-conditioned models also get ``clip_score/<model>_2k``.
    A reference made with another extractor is refused at the start.
    The extractor is held by the callback, outside the model and its checkpoints.
    A signal during an evaluation stops it between two batches (the step is checkpointed, nothing is logged);
    the resumed run makes it again at its start (see :mod:`~diffusion_train.training.periodic`).
    """

    def __init__(self, sampler: Sampler, extractor: str, reference: str, dirpath: str, weights: str | None = None,
                 num_samples: int = 2000, every_n_steps: int = 1000, batch_size: int = 256,
                 guidance_scale: float = 1.0, seed: int = 0, prompts: list[str] | None = None,
                 guidance_interval: list[float] | None = None, guidance_rescale: float = 0.0,
                 clip: dict | None = None):
        super().__init__(every_n_steps)
        if num_samples < 2 or every_n_steps < 1:
            raise ValueError(f"callbacks.fid: num_samples must be >= 2 and every_n_steps >= 1, got "
                             f"{num_samples} and {every_n_steps}")
        check_guidance(guidance_scale, guidance_interval, guidance_rescale, "callbacks.fid")
        self.sampler, self.extractor_name, self.weights = sampler, extractor, weights
        self.reference_path, self.dirpath = reference, Path(dirpath)
        self.num_samples, self.batch_size = int(num_samples), int(batch_size)
        self.guidance_scale, self.seed, self.prompts = float(guidance_scale), int(seed), list(prompts or []) or None
        self.guidance = {"guidance_interval": guidance_interval, "guidance_rescale": guidance_rescale}
        self.extractor = self.reference = self.clip = None
        self.clip_settings = dict(clip) if clip else None

    def check_inputs(self, pl_module) -> None:
        """Before any work (``train`` calls it before a DreamBooth run's class images; ``setup`` again)."""
        check_sampling_inputs(pl_module, self.prompts, self.sampler, "callbacks.fid")

    def setup(self, trainer: L.Trainer, pl_module, stage: str) -> None:
        self.check_inputs(pl_module)
        if self.extractor is None:  # a missing file, another extractor's reference
            self.extractor = build_extractor(self.extractor_name, self.weights, option="callbacks.fid.weights")
            mu, sigma, provenance = load_reference(self.reference_path, self.extractor.provenance)
            check_reference_images(self.reference_path, provenance, pl_module.image_size, pl_module.data_resize)
            self.reference = (mu, sigma)
            if self.clip_settings:
                from diffusion_train.metrics.clip_score import CLIPScore

                self.clip = CLIPScore(**self.clip_settings)

    def records(self) -> list[dict]:
        """The evaluations in ``metrics.jsonl``; a line that a kill cut short is left out."""
        path = self.dirpath / "metrics.jsonl"
        lines = path.read_text().splitlines() if path.is_file() else []
        records = []
        for line in lines:
            try:
                records.append(json.loads(line))
            except json.JSONDecodeError:
                continue
        return records

    def done_at(self, step: int) -> bool:
        return any(r.get("step") == step for r in self.records())

    def on_train_start(self, trainer: L.Trainer, pl_module) -> None:
        """A resumed run forgets evaluations logged after its checkpoint (it makes them again)."""
        path = self.dirpath / "metrics.jsonl"
        if trainer.global_rank == 0 and path.is_file():
            tmp = path.with_name(f".{path.name}.tmp")
            tmp.write_text("".join(json.dumps(r) + "\n" for r in self.records() if r["step"] <= trainer.global_step))
            tmp.replace(path)
        super().on_train_start(trainer, pl_module)

    @torch.no_grad()
    def evaluate(self, trainer: L.Trainer, pl_module) -> dict[str, float] | None:
        """The metrics of this step (logged, and appended to ``metrics.jsonl`` by rank 0); None when a signal
        stopped the evaluation."""
        reference = tuple(t.to(pl_module.device) for t in self.reference)
        with sampling_weights(trainer, pl_module):
            result = evaluate_generated(pl_module, self.extractor, self.sampler, self.num_samples, reference,
                                        batch_size=self.batch_size, guidance_scale=self.guidance_scale,
                                        seed=self.seed, prompts=self.prompts, guidance=self.guidance,
                                        clip=self.clip, stop=lambda: stopping(trainer))
        if result is None:
            return None
        metrics = result[0]
        # where the run summary (summary.json, which scaling reports fit) and checkpoint monitors read metrics
        trainer.callback_metrics.update({name: torch.tensor(float(v)) for name, v in metrics.items()})
        if trainer.global_rank == 0:
            for logger in trainer.loggers:
                logger.log_metrics(metrics, step=trainer.global_step)
            self.dirpath.mkdir(parents=True, exist_ok=True)
            with open(self.dirpath / "metrics.jsonl", "a") as f:
                f.write(json.dumps({"step": trainer.global_step, **metrics}) + "\n")
        return metrics
