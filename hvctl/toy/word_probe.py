"""Does a model read each word of its prompt? The word probe of docs/toy-models.md.

For a toy clip the model trained on, noise its latent to a level sigma and predict the velocity
twice: once with the clip's own prompt, once with the same prompt with one word changed (another
colour, shape, background or motion). The ratio of the two errors inside the object's loss mask
says how much the word steers the prediction: 1.0 means the model ignores it. It is measured with
teacher forcing, so it ranks models in minutes where sampling and scoring take many, and it
separates "the word is not read" from "the word is read but not drawn"."""

from __future__ import annotations

import dataclasses
import statistics
from pathlib import Path

import torch

from hvctl.errors import HvctlError
from hvctl.toy.world import BACKGROUNDS, MOTIONS, OBJECT_COLORS, SHAPES

DEFAULT_PROBE_SIGMAS = (0.9, 0.6, 0.3)
WORDS = {"color": tuple(OBJECT_COLORS), "shape": SHAPES, "background": tuple(BACKGROUNDS), "motion": MOTIONS}


def changed_prompts(sample) -> dict[str, list[str]]:
    """For each attribute the sample's prompt with that one word changed, to every other value.
    An image has no motion to change (the world's images are still)."""
    attributes = [a for a in WORDS if not (a == "motion" and sample.kind == "image")]
    return {a: [dataclasses.replace(sample, **{a: v}).prompt() for v in WORDS[a] if v != getattr(sample, a)]
            for a in attributes}


def probe_samples(cache, manifest: Path, samples: int) -> list[tuple[int, object]]:
    """(cache index, toy sample) of the first `samples` manifest records that are in the cache with
    a loss mask (the object's latents, where a word's effect is measured)."""
    from hvctl.data.manifest import read_manifest
    from hvctl.toy.evaluate import toy_sample

    index_of = {e.id: i for i, e in enumerate(cache.entries) if e.loss_mask}
    records = [r for r in read_manifest(manifest) if r.id in index_of][:samples]
    chosen = [(index_of[r.id], toy_sample(r, manifest)) for r in records]
    if not chosen:
        raise HvctlError(f"{cache.root}: none of {manifest}'s records is cached with a loss mask; "
                         f"encode that manifest (hvctl encode) with its masks")
    return chosen


@torch.no_grad()
def word_ratios(model, prompt_encoders, cache, chosen, *, sigmas=DEFAULT_PROBE_SIGMAS, seed: int = 0) -> dict:
    """Per attribute and sigma: the median over samples of (object error with one word changed,
    averaged over the word's other values) / (object error with the sample's own prompt)."""
    from hvctl.flow import add_noise, transformer_velocity, velocity_target
    from hvctl.train.validation import object_error, sample_noise

    device = next(model.parameters()).device
    dtype = next(model.parameters()).dtype
    ratios: dict[str, list[list[float]]] = {}
    own_errors = [[] for _ in sigmas]
    for index, sample in chosen:
        item = cache.item(index, 0)
        x0, mask = item["latent_mean"].float()[None], item["loss_mask"].float()
        changed = changed_prompts(sample)
        prompts = [sample.prompt()] + [p for ps in changed.values() for p in ps]
        text = prompt_encoders[sample.kind](prompts)
        longest = max(int(text.llm_mask.sum(dim=1).max()), 1)
        states = text.llm_states[:, :longest].to(device, dtype)
        text_mask = text.llm_mask[:, :longest].to(device)
        pooled = text.pooled.to(device, dtype)
        g = torch.ones(len(prompts)) if model.config.guidance_embeds else None
        noise = sample_noise(index, x0.shape[1:], seed)[None]
        for k, sigma in enumerate(sigmas):
            s = torch.full((1,), sigma)
            noisy = add_noise(x0, noise, s).to(device, dtype).expand(len(prompts), *x0.shape[1:])
            velocity = transformer_velocity(model, noisy, s.to(device), states, text_mask, pooled, g).float().cpu()
            squared = (velocity - velocity_target(x0, noise)) ** 2  # [P, C, T, H, W]
            errors = torch.stack([object_error(one, mask) for one in squared])
            own_errors[k].append(float(errors[0]))
            first = 1
            for attribute, group in changed.items():
                ratio = float(errors[first:first + len(group)].mean() / errors[0])
                ratios.setdefault(attribute, [[] for _ in sigmas])[k].append(ratio)
                first += len(group)
    return {"samples": len(chosen), "sigmas": list(sigmas),
            "own_error": [round(statistics.median(e), 6) for e in own_errors],
            "ratio": {a: [round(statistics.median(r), 4) for r in by_sigma] for a, by_sigma in ratios.items()}}


def probe_model(model_dir, cache_dir, manifest: Path, *, samples: int = 24, sigmas=DEFAULT_PROBE_SIGMAS, seed: int = 0,
                device: str = "auto") -> dict:
    """The word probe of the transformer in `model_dir` on the clips of `manifest` cached in `cache_dir`
    (encoded by the same text encoders: the probe encodes the changed prompts with them)."""
    from hvctl.cache import LatentCache, check_cache_encoders
    from hvctl.models.loading import load_components, prepare_model, resolve_device_dtype
    from hvctl.models.text import PromptEncoder
    from hvctl.train.validation import check_sigmas

    sigmas = check_sigmas(sigmas, "--sigma")
    model_dir, defaults = prepare_model(model_dir)
    cache = LatentCache(cache_dir, text_len=defaults["text_len"])
    chosen = probe_samples(cache, manifest, samples)
    check_cache_encoders(cache.root, [cache.entries[i] for i, _ in chosen], model_dir, what="CACHE",
                         override="encode the clips with this model's encoders")
    device, dtype = resolve_device_dtype(device, "auto")
    parts = load_components(model_dir, parts=("transformer", "text"), dtype=dtype, device=device)
    model = parts.transformer.eval()
    if model.config.image_condition_type is not None:
        raise HvctlError(f"{model_dir}: an image-to-video DiT; the word probe measures text-to-video ones")
    encoders = {kind: PromptEncoder(parts.tokenizer, parts.text_encoder, parts.tokenizer_2, parts.text_encoder_2,
                                    template=kind, text_len=defaults["text_len"]) for kind in ("image", "video")}
    return {"model": str(model_dir), "cache": str(cache.root), "manifest": str(manifest),
            **word_ratios(model, encoders, cache, chosen, sigmas=sigmas, seed=seed)}
