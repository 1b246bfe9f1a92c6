"""Generation from a trained :class:`~diffusion_train.training.module.DiffusionModule`: seeded images, inpainting
and instruction editing, with classifier-free (single or dual) guidance and ControlNet control images."""

from __future__ import annotations

from dataclasses import replace

import torch
from torch import Tensor

from diffusion_train.conditioning.conditioner import select_inputs
from diffusion_train.data.samplers import mix_seed
from diffusion_train.diffusion import Sampler, per_image_generators, randn
from diffusion_train.diffusion.guidance import DualGuidance
from diffusion_train.finetune.editing import InstructionEditing
from diffusion_train.finetune.inpainting import Inpainting, KnownRegion
from diffusion_train.finetune.masks import downsample_mask


class Generation:
    """The sampling methods of :class:`~diffusion_train.training.module.DiffusionModule`, which provides the
    attributes they use: ``backbone``, ``net`` (what the step calls), ``conditioner``, ``objective``,
    ``autoencoder``, ``task``, ``controlnet`` and ``device``."""

    # -- sampling --------------------------------------------------------------------------------
    @torch.no_grad()
    def sample_seeded(self, indices: list[int], inputs: dict, sampler: Sampler, guidance_scale: float = 1.0,
                      seed: int = 0, size: tuple[int, int] | None = None, **guidance) -> Tensor:
        """Images ``indices`` of a set: image i starts from the noise of seed ``seed + i`` and draws any
        stochastic sampler noise from its own generator, with the i-th entry of ``inputs`` (see
        ``Conditioner.sample_inputs``); so image i is the same whatever the batch it is made in.
        ``size``: the backbone's (height, width), default its training size."""
        net = self.backbone
        gens = per_image_generators([seed + i for i in indices], self.device)
        noise = randn((len(indices), net.out_channels, *(size or (net.input_size, net.input_size))), gens, self.device)
        return self.sample(noise, select_inputs(inputs, indices), sampler, guidance_scale, generator=gens, **guidance)

    def sample(self, noise: Tensor, cond_inputs: dict, sampler: Sampler, guidance_scale: float = 1.0,
               generator=None, progress: bool = False, image: Tensor | None = None,
               known: tuple[Tensor, Tensor] | None = None, image_guidance: float | None = None,
               control: Tensor | None = None, control_scale: float = 1.0, **guidance) -> Tensor:
        """Images in [-1, 1] (decoded by the autoencoder) from ``noise`` for the conditioning inputs (e.g. ``{"label": ...}``);
        ``guidance`` takes ``guidance_interval`` and ``guidance_rescale`` (see ``CFGDenoiser``).

        ``image``: the task's ``cond.image`` (without one, the task's null image: an inpainting model generates
        from nothing, an editing model without a source); ``known``: (latents, mask) kept in every denoised
        estimate where the mask is 0; ``image_guidance``: a separate scale for ``image``
        (:class:`DualGuidance`, ``guidance_scale`` then being the text's); ``control``: a ControlNet's control
        images (at image resolution), their residuals scaled by ``control_scale``."""
        was_training = self.training
        self.eval()
        if not self.conditioner.embedders and image_guidance is None:
            guidance_scale = 1.0  # nothing to drop: the unconditional pass would repeat the conditional one
        try:
            if image is None and self.task is not None:
                image = self._null_image(torch.zeros_like(noise, device=self.device))
            with self.conditioner.uncounted():  # prompts are not training data
                cond = self.conditioner(cond_inputs)
                uncond = (self.conditioner.uncond(noise.shape[0])
                          if guidance_scale != 1.0 or image_guidance is not None else None)
            if image is not None:
                image = image.to(self.device)
                cond = replace(cond, image=image)
                uncond = None if uncond is None else replace(uncond, image=image)
            if control is not None:
                if self.controlnet is None:
                    raise ValueError("control images need a model trained with finetune=controlnet")
                control = control.to(self.device)
                cond = replace(cond, control=control)
                uncond = None if uncond is None else replace(uncond, control=control)
                self.net.scale = float(control_scale)
            denoiser = self.objective.denoiser(self.net)
            if known is not None:
                denoiser = KnownRegion(denoiser, known[0].to(self.device), known[1].to(self.device))
            if image_guidance is not None:
                if image is None or self.task is None:
                    raise ValueError("image_guidance needs a model with a task that gives cond.image (task=editing)")
                if guidance.get("guidance_interval") is not None or guidance.get("guidance_rescale"):
                    raise ValueError("image_guidance (separate image and text scales) takes no guidance_interval or "
                                     "guidance_rescale")
                uncond_all = replace(uncond, image=self.task.null_image(image))
                denoiser = DualGuidance(denoiser, uncond, uncond_all, guidance_scale, image_guidance)
                guidance_scale = 1.0
            x = sampler(denoiser, noise.to(self.device), cond, uncond=uncond, guidance_scale=guidance_scale,
                        generator=generator, progress=progress, **guidance)
            images = self.autoencoder.decode(x)
        finally:
            self.train(was_training)
            if self.controlnet is not None:
                self.net.scale = 1.0
        return images.clamp(-1, 1)

    @torch.no_grad()
    def inpaint(self, images: Tensor, masks: Tensor, cond_inputs: dict, sampler: Sampler, guidance_scale: float = 1.0,
                seed: int = 0, **guidance) -> Tensor:
        """``images`` (B, C, H, W) in [-1, 1] completed where ``masks`` (B, 1, H, W) is 1; pixels where it is 0
        are returned exactly as given. Image i starts from the noise of seed ``seed + i``. Needs a model
        trained with ``task=inpainting``."""
        if not isinstance(self.task, Inpainting):
            raise ValueError("inpainting needs a model trained with task=inpainting")
        images, masks = images.to(self.device).float(), masks.to(self.device).float()
        if masks.shape != (images.shape[0], 1, *images.shape[-2:]):
            raise ValueError(f"masks must be (B, 1, H, W) for images {tuple(images.shape)}, got {tuple(masks.shape)}")
        x0 = self._encode(images, seed)
        mask = downsample_mask(masks, tuple(x0.shape[-2:]))
        gens = per_image_generators([seed + i for i in range(images.shape[0])], self.device)
        noise = randn(tuple(x0.shape), gens, self.device)
        image = self.task.image(x0, mask, images, lambda pixels: self._encode(pixels, seed, stream=2))
        out = self.sample(noise, cond_inputs, sampler, guidance_scale, generator=gens, image=image, known=(x0, mask),
                          **guidance)
        return torch.where(masks > 0.5, out, images)

    def _encode(self, images: Tensor, seed: int, stream: int = 1) -> Tensor:
        """Known images' latents: image i's posterior sample from its own generator (of ``seed + i`` and
        ``stream``, apart from the one its starting noise comes from), so it is the same whatever the batch."""
        moments = self.autoencoder.encode_moments(images)
        return torch.cat([self.autoencoder.latents_from_moments(
            moments[i:i + 1], torch.Generator(self.device).manual_seed(mix_seed(seed + i, stream)))
            for i in range(moments.shape[0])])

    def _null_image(self, like: Tensor) -> Tensor:
        """The task's ``cond.image`` when there is none: for inpainting, all masked (``masked_image=encoded``: the
        encoding of a gray image)."""
        if not isinstance(self.task, Inpainting):
            return self.task.null_image(like)
        f = int(getattr(self.autoencoder, "downsample", 1))
        pixels = like.new_zeros(1, int(getattr(self.autoencoder, "in_channels", like.shape[1])),
                                like.shape[-2] * f, like.shape[-1] * f)
        return self.task.null_image(like, pixels, lambda gray: self._encode(gray, 0))

    @torch.no_grad()
    def edit(self, sources: Tensor, cond_inputs: dict, sampler: Sampler, text_scale: float = 7.5,
             image_scale: float = 1.5, seed: int = 0) -> Tensor:
        """``sources`` (B, C, H, W) in [-1, 1] edited as the instructions in ``cond_inputs`` say, with separate
        text and image guidance (:class:`DualGuidance`). Needs a model trained with ``task=editing``."""
        if not isinstance(self.task, InstructionEditing):
            raise ValueError("editing needs a model trained with task=editing")
        source = self._encode(sources.to(self.device).float(), seed)
        gens = per_image_generators([seed + i for i in range(source.shape[0])], self.device)
        noise = randn(tuple(source.shape), gens, self.device)
        return self.sample(noise, cond_inputs, sampler, text_scale, generator=gens, image=source,
                           image_guidance=image_scale)
