"""`hvctl eval toy`: how well a model draws the toy world, measured from pixels.

A fixed prompt set (the eval split's canonical captions; a third are held-out colour-shape
pairs) is generated at the model's default settings unless told otherwise, and each video is
measured by `hvctl.toy.world.measure`. Strict accuracy counts videos whose colour, shape, motion
and background all match the prompt; per-attribute accuracies stand beside it, separately for
seen and held-out compositions. The VAE is scored apart, by its reconstruction PSNR on rendered
eval videos.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, replace
from pathlib import Path

import numpy as np

from hvctl.rewrite import Rewriter, RewriteRecipe
from hvctl.toy.world import HELD_OUT, paraphrase, render, sample_spec

ATTRIBUTES = ("color", "shape", "motion", "background")
GROUPS = ("seen", "held_out")


@dataclass
class ToyEvalSettings:
    model: Path | None = None  # None: the embedded default
    prompts: int = 96  # eval-split samples 0..n-1; every third is a held-out pair
    seed: int = 0  # the prompt set's seed; video i's noise uses seed + i
    steps: tuple[int, ...] = ()  # several: one evaluation per step count; none: the model's default
    guidance_scale: float | None = None
    embedded_guidance: float | None = None
    flow_shift: float | None = None
    batch_size: int = 16
    vae_videos: int = 32  # 0: skip the VAE's reconstruction score
    out: Path | None = None  # also write every video and the per-video measurements here
    device: str = "auto"
    rewrite: RewriteRecipe | None = None  # also: paraphrased prompts, as written and rewritten


def prompt_set(n: int, seed: int):
    """The toy samples whose captions are the prompts; their attributes are the right answers."""
    return [sample_spec(seed, i, "eval", "video") for i in range(n)]


def group_of(sample) -> str:
    return "held_out" if (sample.color, sample.shape) in HELD_OUT else "seen"


def score(samples, measurements) -> dict:
    """Strict and per-attribute accuracy, per group."""
    table = {}
    for group in GROUPS:
        rows = [(s, m) for s, m in zip(samples, measurements) if group_of(s) == group]
        if not rows:
            continue
        hits = {a: [getattr(s, a) == m[a] for s, m in rows] for a in ATTRIBUTES}
        table[group] = {"n": len(rows), "strict": float(np.mean(np.all([hits[a] for a in ATTRIBUTES], axis=0))),
                        **{a: float(np.mean(hits[a])) for a in ATTRIBUTES}}
    return table


def psnr(reference: np.ndarray, test: np.ndarray) -> float:
    mse = np.mean((reference.astype(np.float64) - test.astype(np.float64)) ** 2)
    return float("inf") if mse == 0 else float(10 * np.log10(255.0**2 / mse))


def vae_psnr(vae, n: int, seed: int, height: int, width: int, frames: int) -> dict:
    """Reconstruction PSNR (dB) of rendered eval videos through the VAE's posterior mean."""
    from hvctl.models.vae import decode_to_frames, encode_posterior

    scores = []
    for i in range(n):
        video = render(sample_spec(seed, i, "eval", "video", size=(height, width), frames=frames))
        mean, _ = encode_posterior(vae, video)
        scores.append(psnr(video, decode_to_frames(vae, mean[None])[0].numpy()))
    return {"videos": n, "psnr": float(np.mean(scores)), "psnr_min": float(np.min(scores))}


def evaluate_toy(s: ToyEvalSettings, *, progress: bool | None = None) -> dict:
    from hvctl.generate import GenerateRecipe, TextToVideo, prepare, resolve_device_dtype
    from hvctl.io import write_json_atomic
    from hvctl.models.loading import folder_fingerprint
    from hvctl.progress import progress_bar
    from hvctl.video import write_video

    samples = prompt_set(s.prompts, s.seed)
    base = GenerateRecipe(prompt=samples[0].prompt() if samples else "-", model=s.model, seed=s.seed, device=s.device,
                          guidance_scale=s.guidance_scale, embedded_guidance=s.embedded_guidance,
                          flow_shift=s.flow_shift)
    result = {"model": None, "prompts": s.prompts, "seed": s.seed, "runs": []}
    prompt_forms = [("canonical", [x.prompt() for x in samples])]
    if s.rewrite is not None:
        # Users' wording, as written and as the rewriter turns it back into the trained form.
        paraphrased = [paraphrase(x) for x in samples]
        rewrite = Rewriter(s.rewrite)
        rewritten = [rewrite(p) for p in paraphrased]
        prompt_forms = [("paraphrased", paraphrased), (f"rewritten-{s.rewrite.rewriter}", [x["rewritten"] for x in rewritten])]
        result["rewrite"] = {"rewriter": s.rewrite.rewriter, "mode": s.rewrite.mode,
                             "kept_as_written": sum(x["warning"] is not None for x in rewritten),
                             "exact_canonical": sum(x["rewritten"] == sample.prompt() for x, sample in zip(rewritten, samples))}
    t2v = None
    for steps in s.steps or (None,):
        r, model_dir = prepare(replace(base, steps=steps))
        device, dtype = resolve_device_dtype(r.device, r.dtype)
        if t2v is None:
            t2v = TextToVideo(model_dir, r, device, dtype)
            result["model"] = {"path": str(model_dir), "fingerprint": folder_fingerprint(model_dir)}
        else:  # same weights, another schedule
            t2v.sampler = replace(t2v.sampler, steps=r.steps, shift=r.flow_shift)
        for form, texts in prompt_forms:
            started, measurements = time.perf_counter(), []
            if s.out is not None:
                folder = Path(s.out) / (f"steps{r.steps}" if form == "canonical" else f"steps{r.steps}-{form}")
            with progress_bar(len(samples), f"eval {r.steps} steps, {form} prompts", enabled=progress) as advance:
                for first in range(0, len(samples), s.batch_size):
                    batch = samples[first:first + s.batch_size]
                    seeds = [s.seed + first + j for j in range(len(batch))]
                    videos = t2v.frames(t2v.latents(seeds, t2v.conditions(texts[first:first + s.batch_size])))
                    for j, (sample, video) in enumerate(zip(batch, videos)):
                        measurements.append(_measure(sample, texts[first + j], video))
                        if s.out is not None:
                            write_video(folder / f"{first + j:04d}.mp4", video, fps=r.fps)
                    advance(len(batch))
            run = {"steps": r.steps, "prompts": form, "flow_shift": r.flow_shift, "guidance_scale": r.guidance_scale,
                   "embedded_guidance": r.embedded_guidance, "height": r.height, "width": r.width, "frames": r.frames,
                   "seconds": round(time.perf_counter() - started, 2), "accuracy": score(samples, measurements)}
            result["runs"].append(run)
            if s.out is not None:
                write_json_atomic(folder / "measurements.json", measurements)
    if s.vae_videos:
        result["vae"] = vae_psnr(t2v.parts.vae, s.vae_videos, s.seed, r.height, r.width, r.frames)
    return result


def _measure(sample, prompt, video) -> dict:
    from hvctl.toy.world import measure

    m = measure(video)
    return {"prompt": prompt, "group": group_of(sample), **{a: m[a] for a in ATTRIBUTES},
            "expected": {a: getattr(sample, a) for a in ATTRIBUTES}}
