"""Held-out denoising loss at fixed noise levels: the training objective measured on clips the
model never trained on, with the same samples, noise and sigmas every time, so that figures are
comparable across steps, runs and models. Losses at different sigmas are not averaged: they differ
by orders of magnitude, and each noise level decides different things (layout near 1, edges near 0).
Where the cache has loss masks, the loss inside them (the toy world's object) is reported beside."""

from __future__ import annotations

import torch

from hvctl.errors import HvctlError
from hvctl.flow import add_noise, transformer_velocity, velocity_target
from hvctl.train.config import DEFAULT_LOSS_SIGMAS


def check_sigmas(sigmas, what: str) -> tuple[float, ...]:
    sigmas = tuple(float(s) for s in sigmas)
    bad = [s for s in sigmas if not 0 < s <= 1]  # NaN fails the comparison too
    if not sigmas or bad:
        raise HvctlError(f"{what}: noise levels must be in (0, 1], got {list(sigmas)}")
    return sigmas


def sample_noise(index: int, shape, seed: int) -> torch.Tensor:
    """Sample `index`'s noise, the same at every sigma: its own generator, so that a figure does
    not depend on the batching, on how many samples are measured or on the other sigmas."""
    return torch.randn(shape, generator=torch.Generator().manual_seed(seed * 1_000_003 + index))


def object_error(squared: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """The mean of one sample's squared error [C, T, H, W] inside its loss mask [1, T, H, W]."""
    return (squared * mask).sum() / (mask.sum() * squared.shape[0])


@torch.no_grad()
def held_out_losses(model, cache, *, samples: int, sigmas=DEFAULT_LOSS_SIGMAS, seed: int = 0, batch_size: int = 8,
                    guidance: float = 1.0) -> dict:
    """The velocity loss of `model` on the first `samples` entries of `cache` (a LatentCache),
    caption variant 0, the posterior mean as x0, at each sigma."""
    sigmas = check_sigmas(sigmas, "validation sigmas")
    device = next(model.parameters()).device
    dtype = next(model.parameters()).dtype
    indices = range(min(samples, len(cache)))
    by_bucket: dict = {}
    for i in indices:
        by_bucket.setdefault(cache.entries[i].bucket, []).append(i)
    totals = torch.zeros(len(sigmas), dtype=torch.float64)
    masked_totals = torch.zeros(len(sigmas), dtype=torch.float64)
    masked_count = 0
    for group in by_bucket.values():
        for first in range(0, len(group), batch_size):
            idx = group[first:first + batch_size]
            items = [cache.item(i, 0) for i in idx]
            x0 = torch.stack([it["latent_mean"] for it in items]).float()
            mask = torch.stack([it["loss_mask"] for it in items]).float()
            # samples with a mask of their own (an unmasked one reads as all ones) that is not empty
            masked = [j for j, i in enumerate(idx) if cache.entries[i].loss_mask and mask[j].sum() > 0]
            longest = max(int(max(it["text_mask"].sum() for it in items)), 1)
            text = torch.stack([it["text_states"][:longest] for it in items]).to(device, dtype)
            text_mask = torch.stack([it["text_mask"][:longest] for it in items]).to(device)
            pooled = torch.stack([it["pooled"] for it in items]).to(device, dtype)
            noise = torch.stack([sample_noise(i, x0.shape[1:], seed) for i in idx])
            g = torch.full((len(idx),), guidance) if model.config.guidance_embeds else None
            for k, sigma in enumerate(sigmas):
                s = torch.full((len(idx),), sigma)
                noisy = add_noise(x0, noise, s).to(device, dtype)
                velocity = transformer_velocity(model, noisy, s.to(device), text, text_mask, pooled, g).float().cpu()
                squared = (velocity - velocity_target(x0, noise)) ** 2
                totals[k] += squared.mean(dim=(1, 2, 3, 4)).sum().double()
                for j in masked:
                    masked_totals[k] += object_error(squared[j], mask[j]).double()
            masked_count += len(masked)
    n = len(indices)
    if n == 0:
        raise HvctlError(f"{cache.root}: no cached samples to validate on")
    return {"samples": n, "sigmas": list(sigmas), "loss": [round(float(t / n), 6) for t in totals],
            "masked_loss": [round(float(t / masked_count), 6) for t in masked_totals] if masked_count else None,
            "masked_samples": masked_count}


def loss_logs(result: dict) -> dict[str, float]:
    """The figures as metrics: val_loss@SIGMA (and val_masked_loss@SIGMA)."""
    logs = {f"val_loss@{s:g}": v for s, v in zip(result["sigmas"], result["loss"])}
    if result["masked_loss"] is not None:
        logs.update({f"val_masked_loss@{s:g}": v for s, v in zip(result["sigmas"], result["masked_loss"])})
    return logs


def model_losses(model_dir, cache_dir, *, samples: int, sigmas=DEFAULT_LOSS_SIGMAS, seed: int = 0, device: str = "auto",
                 guidance: float = 1.0, accept_foreign_cache: bool = False, what: str = "validation.loss_cache",
                 override: str = "set validation.accept_foreign_cache: true") -> dict:
    """held_out_losses of the transformer in `model_dir` on the cache in `cache_dir`."""
    from hvctl.cache import LatentCache, check_cache_encoders
    from hvctl.models.loading import load_components, prepare_model, resolve_device_dtype

    sigmas = check_sigmas(sigmas, "validation sigmas")
    model_dir, defaults = prepare_model(model_dir)
    cache = LatentCache(cache_dir, text_len=defaults["text_len"])
    if not accept_foreign_cache:
        check_cache_encoders(cache.root, cache.entries[:samples], model_dir, what=what, override=override)
    device, dtype = resolve_device_dtype(device, "auto")
    model = load_components(model_dir, parts=("transformer",), dtype=dtype, device=device).transformer.eval()
    if model.config.image_condition_type is not None:
        raise HvctlError(f"{model_dir}: an image-to-video DiT; the held-out loss measures text-to-video ones")
    return {"model": str(model_dir), "cache": str(cache.root),
            **held_out_losses(model, cache, samples=samples, sigmas=sigmas, seed=seed, guidance=guidance)}
