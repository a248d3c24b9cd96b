"""Flow-matching maths, in one place: the noise path, the sigma schedule, the Euler step.

Conventions (HunyuanVideo, diffusers' FlowMatchEulerDiscreteScheduler):
- sigma runs from 1 (pure noise) to 0 (data); x_sigma = (1 - sigma) * x0 + sigma * noise.
- The model predicts the velocity v = noise - x0, and takes the timestep t = 1000 * sigma.
- The flow shift s bends the schedule towards high noise: sigma' = s*sigma / (1 + (s-1)*sigma).
"""

from __future__ import annotations

import numpy as np
import torch

NUM_TRAIN_TIMESTEPS = 1000


def shift_sigmas(sigmas, shift: float):
    """Apply the flow shift to sigmas in [0, 1] (array or tensor)."""
    return shift * sigmas / (1 + (shift - 1) * sigmas)


MODEL_FLOW_SHIFT = 7.0  # the official text-to-video shift (50 steps): a model folder's unless its scheduler says otherwise
I2V_FLOW_SHIFTS = {True: 7.0, False: 17.0}  # the official I2V's, with and without its stability start


def default_flow_shift(steps: int, model_shift: float = MODEL_FLOW_SHIFT, *, i2v_stability: bool | None = None) -> float:
    """The shift for a schedule of `steps` when none is set: the model's own for long schedules,
    and, under 20 steps, 17/7 of it, the official ratio (shift 7 for 50 steps, 17 for fewer than 20).
    Image-to-video (i2v_stability given): the official I2V's, 7 with the stability start, 17 without."""
    if i2v_stability is not None:
        return I2V_FLOW_SHIFTS[bool(i2v_stability)]
    return model_shift * 17.0 / 7.0 if steps < 20 else model_shift


def sampling_sigmas(steps: int, shift: float) -> torch.Tensor:
    """The `steps + 1` sigmas of an Euler sampling run, from 1 down to a final 0.

    Computed as diffusers' HunyuanVideo pipeline does (float32 after a float64 linspace), so
    that both feed the model the same timesteps.
    """
    sigmas = np.linspace(1.0, 0.0, steps + 1)[:-1].astype(np.float32)
    sigmas = shift_sigmas(sigmas, np.float32(shift))
    return torch.cat([torch.from_numpy(sigmas).float(), torch.zeros(1)])


def sigmas_from(sigmas: torch.Tensor, start: float) -> torch.Tensor:
    """A schedule that starts at noise level `start` instead of 1: `start`, then the schedule's
    sigmas below it (SDEdit; the input is then data noised to `start` with add_noise)."""
    if start >= 1.0:
        return sigmas
    return torch.cat([torch.tensor([start], dtype=sigmas.dtype, device=sigmas.device), sigmas[sigmas < start]])


def timestep_from_sigma(sigma: torch.Tensor) -> torch.Tensor:
    return sigma * NUM_TRAIN_TIMESTEPS


def euler_step(latents: torch.Tensor, velocity: torch.Tensor, sigma, sigma_next) -> torch.Tensor:
    """One Euler step of dx/dsigma = v, in float32 whatever the model's dtype."""
    return (latents.float() + (sigma_next - sigma) * velocity.float()).to(latents.dtype)


def add_noise(x0: torch.Tensor, noise: torch.Tensor, sigma: torch.Tensor | float) -> torch.Tensor:
    """The point at noise level sigma on the straight path from x0 to noise (sigma per sample, or one number)."""
    if isinstance(sigma, torch.Tensor):
        sigma = sigma.reshape(-1, *([1] * (x0.ndim - 1))).to(x0.dtype)
    return (1 - sigma) * x0 + sigma * noise


def guided(conditional: torch.Tensor, unconditional: torch.Tensor, scale, base: torch.Tensor | None = None) -> torch.Tensor:
    """Classifier-free guidance: the unconditional velocity moved `scale` times the way the
    condition moves it (scale 1: the conditional one). base: what that move is added to instead
    of the unconditional velocity (condition guidance adds scale - 1 moves to the full velocity)."""
    return (unconditional if base is None else base) + scale * (conditional - unconditional)


def transformer_velocity(model, hidden_states: torch.Tensor, sigma: torch.Tensor, text_states: torch.Tensor,
                         text_mask: torch.Tensor, pooled: torch.Tensor, guidance: torch.Tensor | None = None) -> torch.Tensor:
    """One call of a HunyuanVideo transformer at noise level sigma (one, or one per sample): the
    timestep is 1000 sigma in float32, and a guidance-embedded model gets its scales (one per
    sample) x1000, as the official embedder takes them. Inputs are on the model's device already."""
    timestep = timestep_from_sigma(sigma).expand(hidden_states.shape[0]).to(hidden_states.device, torch.float32)
    return model(
        hidden_states=hidden_states, timestep=timestep, encoder_hidden_states=text_states, encoder_attention_mask=text_mask,
        pooled_projections=pooled, guidance=None if guidance is None else (guidance * 1000.0).to(hidden_states.device),
        return_dict=False,
    )[0]


def velocity_target(x0: torch.Tensor, noise: torch.Tensor) -> torch.Tensor:
    return noise - x0


def sample_training_sigmas(batch: int, method: str, *, generator: torch.Generator, shift: float = 7.0,
                           logit_mean: float = 0.0, logit_std: float = 1.0,
                           stratum: tuple[int, int] | None = None) -> torch.Tensor:
    """Noise levels for a training batch.

    method: "uniform" (sigma ~ U(0, 1)), "logit_normal" (sigmoid of N(mean, std): SD3's choice,
    most weight mid-way), or "shifted" (U(0, 1) bent by the flow shift, as sampling is).
    stratum (i, n): CogVideoX's stratified sampling; the uniform draws of rank i fall in
    [i/n, (i+1)/n), so the ranks of one step together cover [0, 1] evenly.
    """
    u = torch.rand(batch, generator=generator)
    if stratum is not None:
        i, n = stratum
        u = (i + u) / n
    if method == "uniform":
        sigma = u
    elif method == "shifted":
        sigma = shift_sigmas(u, shift)
    elif method == "logit_normal":
        # The normal's inverse CDF keeps the stratification meaningful.
        z = torch.special.ndtri(u.clamp(1e-6, 1 - 1e-6))
        sigma = torch.sigmoid(logit_mean + logit_std * z)
    else:
        raise ValueError(f"unknown timestep sampling {method!r}")
    return sigma.clamp(1e-5, 1.0)


def loss_weights(sigma: torch.Tensor, scheme: str) -> torch.Tensor:
    """Per-sample weights of the velocity loss: "none" (1), or "cosmap" (SD3's cosine-mapped)."""
    if scheme == "none":
        return torch.ones_like(sigma)
    if scheme == "cosmap":
        return 2 / (torch.pi * (1 - 2 * sigma + 2 * sigma**2))
    raise ValueError(f"unknown loss weighting {scheme!r}")
