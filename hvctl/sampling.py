"""The flow-matching Euler sampler: a plain callable, (model, noise, conditions) -> latents.

It knows nothing of prompts, files or devices; any denoiser with the diffusers HunyuanVideo
transformer's call signature fits (a wrapped, cached or sequence-parallel one too).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import torch

from hvctl.i2v import ImageCondition
from hvctl.errors import HvctlError
from hvctl.flow import euler_step, guided, sampling_sigmas, sigmas_from, transformer_velocity
from hvctl.models.text import TextConditions


@dataclass
class Conditions:
    text: TextConditions
    negative_text: TextConditions | None = None  # needed for true classifier-free guidance
    image: ImageCondition | None = None  # image-to-video models (hvctl/i2v.py)


def predict_velocity(model, latents: torch.Tensor, sigma: torch.Tensor, text: TextConditions,
                     embedded_guidance: float | None) -> torch.Tensor:
    """One model call, with the dtypes diffusers' HunyuanVideoPipeline uses."""
    batch, dtype = latents.shape[0], model.dtype
    guidance = None
    if model.config.guidance_embeds:
        if embedded_guidance is None:
            raise ValueError("this model is guidance-distilled: an embedded guidance scale is required")
        guidance = torch.full((batch,), embedded_guidance, dtype=dtype, device=latents.device)
    text = text.to(latents.device, dtype)
    return transformer_velocity(model, latents.to(dtype), sigma, text.llm_states, text.llm_mask, text.pooled, guidance)


def _gather_passes(velocity: torch.Tensor, group) -> torch.Tensor:
    """Both ranks' velocities, the conditional (rank 0's) first: what one doubled batch gives."""
    import torch.distributed as dist

    parts = [torch.empty_like(velocity) for _ in range(2)]
    dist.all_gather(parts, velocity.contiguous(), group=group)
    return torch.cat(parts)


@dataclass
class FlowMatchEulerSampler:
    steps: int
    shift: float
    guidance_scale: float = 1.0  # true classifier-free guidance; > 1 runs the negative prompt too
    embedded_guidance: float | None = None  # for guidance-distilled models
    cfg_group: object = None  # CFG-parallel: a process group of 2, rank 0 the conditional pass, rank 1 the unconditional
    start_sigma: float = 1.0  # < 1: `noise` is data noised to this level, denoised by the schedule's steps below it

    @torch.no_grad()
    def __call__(self, model, noise: torch.Tensor, conditions: Conditions,
                 on_step: Callable[[int], None] | None = None) -> torch.Tensor:
        use_cfg = self.guidance_scale > 1.0
        if use_cfg and conditions.negative_text is None:
            raise ValueError("guidance_scale > 1 needs negative text conditions")
        split = use_cfg and self.cfg_group is not None
        if split:  # each rank runs one of the two passes; their velocities are gathered after each step
            import torch.distributed as dist

            text = [conditions.text, conditions.negative_text][dist.get_rank(self.cfg_group)]
        else:
            text = TextConditions.cat([conditions.text, conditions.negative_text]) if use_cfg else conditions.text
        sigmas = sigmas_from(sampling_sigmas(self.steps, self.shift), self.start_sigma).to(noise.device)
        latents = noise.float()
        image = conditions.image
        for i in range(len(sigmas) - 1):
            model_input = latents if image is None else image.model_input(latents)
            # Conditional and unconditional passes share one batch.
            doubled = use_cfg and not split
            velocity = predict_velocity(model, torch.cat([model_input] * 2) if doubled else model_input, sigmas[i],
                                        text, self.embedded_guidance)
            if split:
                velocity = _gather_passes(velocity, self.cfg_group)
            if use_cfg:
                velocity = guided(*velocity.chunk(2), self.guidance_scale)
            latents = euler_step(latents, velocity, sigmas[i], sigmas[i + 1])
            if image is not None:
                latents = image.after_step(latents)
            if not torch.isfinite(latents).all():  # else NaN decodes to a black video and exits 0
                raise HvctlError(f"sampling step {i + 1}/{len(sigmas) - 1}: the latents are not finite (NaN or inf); "
                                 f"check the flow shift ({self.shift}), the guidance scale and the model's weights")
            if on_step is not None:
                on_step(i + 1)
        return latents
