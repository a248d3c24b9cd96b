"""`hvctl generate`'s accelerators on a GPU: seconds per step, peak GPU memory, and what the
step caches cost in quality.

Part 1, the 13B DiT: the `hunyuan-t2v-720p` preset's transformer with random weights drawn on the
GPU (nothing downloaded; timing and memory do not depend on the values), at 720p x 129 frames and
544p x 129 frames, one pass per step (the cfg-distilled model), random text states of 256 tokens.
Each setting: one warm-up step (it compiles, with --compile, timed apart), then --steps timed steps;
seconds per step and torch.cuda.max_memory_allocated. Settings: each installed attention kernel,
--compile, FP8 weights, and FP8 with group offload (the 24 GiB target). For the step caches, a run
of --cache-steps steps at 544p, uncached and cached: the speed-up and the PSNR of the cached final
latents against the uncached ones (random weights: no video to decode).

Part 2, the embedded toy model (hvctl's default): whole videos at its defaults (30 steps), uncached
and with each step cache; speed-up and PSNR of the decoded video against the uncached one.

Prints one table (and --json writes the rows). Needs a CUDA GPU; `--smoke` runs every code path
on the tiny preset on any device, to check the script (its numbers mean nothing).

    python benchmarks/gpu_generate.py                       # everything (~15 min on an H100)
    python benchmarks/gpu_generate.py --sizes 544p --steps 2 --only sdpa,fp8
"""

from __future__ import annotations

import argparse
import json
import math
import sys
import time

SIZES = {"720p": (720, 1280, 129), "544p": (544, 960, 129)}
SETTINGS = ("sdpa", "flash", "flash3", "sage", "compile", "fp8", "fp8+group")
CACHES = ("teacache:0.1", "teacache:0.15", "fbc:0.05")


def random_transformer(preset: str, device, dtype):
    """A DiT of the preset's shape, weights drawn on `device` (normal, std 0.02; norms at 1)."""
    import torch
    from diffusers import HunyuanVideoTransformer3DModel

    from hvctl.models.presets import PRESETS

    with torch.device("meta"):
        model = HunyuanVideoTransformer3DModel(**PRESETS[preset].transformer)
    model = model.to_empty(device=device).to(dtype)
    generator = torch.Generator(device).manual_seed(0)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if p.dim() == 1:
                p.fill_(1.0 if "norm" in name and "weight" in name else 0.0)
            else:
                p.normal_(0, 0.02, generator=generator)
    return model.eval()


def conditions(model, device, dtype, text_len: int):
    import torch

    from hvctl.models.text import TextConditions
    from hvctl.sampling import Conditions

    c = model.config
    g = torch.Generator(device).manual_seed(1)
    text = TextConditions(llm_states=torch.randn(1, text_len, c.text_embed_dim, device=device, dtype=dtype, generator=g),
                          llm_mask=torch.ones(1, text_len, dtype=torch.long, device=device),
                          pooled=torch.randn(1, c.pooled_projection_dim, device=device, dtype=dtype, generator=g))
    return Conditions(text)


def sample(model, noise, cond, steps: int, on_step=None):
    from hvctl.sampling import FlowMatchEulerSampler

    guidance = 6.0 if model.config.guidance_embeds else None
    return FlowMatchEulerSampler(steps, 7.0, 1.0, guidance)(model, noise, cond, on_step=on_step)


def timed(model, noise, cond, steps: int, device) -> tuple[float, list[float], object]:
    """(first step seconds, later steps' seconds, latents) of one run of steps + 1 steps."""
    import torch

    sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)
    ticks = [time.perf_counter()]

    def tick(_):
        sync()
        ticks.append(time.perf_counter())

    latents = sample(model, noise, cond, steps + 1, tick)
    durations = [b - a for a, b in zip(ticks, ticks[1:])]
    return durations[0], durations[1:], latents


def psnr(a, b) -> float:
    """PSNR in dB of a against b, on b's range."""
    a, b = a.float(), b.float()
    peak = float(b.max() - b.min())
    mse = float((a - b).pow(2).mean())
    return math.inf if mse == 0 else 10 * math.log10(peak**2 / mse)


def dit_rows(args, device, dtype) -> list[dict]:
    import torch

    from hvctl import accelerate as acc
    from hvctl.models.vae import latent_shape

    rows = []
    settings = [s for s in SETTINGS if s in args.only] if args.only else list(SETTINGS)
    for size in args.sizes:
        height, width, frames = SIZES[size] if not args.smoke else (64, 64, 9)
        size = size if not args.smoke else "64x64x9"
        shape = latent_shape({"temporal_compression_ratio": 4, "spatial_compression_ratio": 8}, 16, frames, height, width)
        noise = torch.randn((1, *shape), generator=torch.Generator().manual_seed(0)).to(device)
        for setting in settings:
            attention = setting if setting in ("sdpa", "flash", "flash3", "sage") else "auto"
            try:
                backend = acc.attention_backend(attention, device)
            except Exception as e:  # not installed, or not this device: a row that says so
                rows.append({"part": "13B DiT", "size": size, "setting": setting, "note": f"not run: {e}"})
                continue
            model = random_transformer(args.preset, device, dtype)
            acc.set_attention(model, backend)
            if setting.startswith("fp8"):
                acc.apply_weights_dtype(model, torch.float8_e4m3fn, dtype)
            if setting == "fp8+group":
                model.to("cpu")
                model.enable_group_offload(onload_device=device, offload_device="cpu", offload_type="block_level",
                                           num_blocks_per_group=1, use_stream=device.type == "cuda")
            if setting == "compile":
                acc.compile_blocks(model)
            cond = conditions(model, device, dtype, args.text_len)
            if device.type == "cuda":
                torch.cuda.empty_cache()
                torch.cuda.reset_peak_memory_stats(device)
            first, later, _ = timed(model, noise, cond, args.steps, device)
            per_step = sorted(later)[len(later) // 2]
            rows.append({"part": "13B DiT", "size": size, "setting": setting, "attention": backend,
                         "s_per_step": round(per_step, 3), "first_step_s": round(first, 3),
                         "peak_gib": round(torch.cuda.max_memory_allocated(device) / 2**30, 2) if device.type == "cuda" else None})
            print(rows[-1], file=sys.stderr, flush=True)
            del model
    rows += cache_rows_dit(args, device, dtype)
    return rows


def cache_rows_dit(args, device, dtype) -> list[dict]:
    import torch

    from hvctl import accelerate as acc
    from hvctl.models.vae import latent_shape

    height, width, frames = SIZES["544p"] if not args.smoke else (64, 64, 9)
    shape = latent_shape({"temporal_compression_ratio": 4, "spatial_compression_ratio": 8}, 16, frames, height, width)
    noise = torch.randn((1, *shape), generator=torch.Generator().manual_seed(0)).to(device)
    model = random_transformer(args.preset, device, dtype)
    acc.set_attention(model, acc.attention_backend("auto", device))
    cond = conditions(model, device, dtype, args.text_len)
    start = time.perf_counter()
    reference = sample(model, noise, cond, args.cache_steps)
    uncached = time.perf_counter() - start
    rows = []
    for spec in CACHES:
        cached_model = random_transformer(args.preset, device, dtype)
        acc.set_attention(cached_model, acc.attention_backend("auto", device))
        kind, threshold = acc.parse_step_cache(spec)
        cache = acc.StepCache(cached_model, kind, threshold, args.cache_steps)
        start = time.perf_counter()
        latents = sample(cached_model, noise, cond, args.cache_steps)
        seconds = time.perf_counter() - start
        rows.append({"part": f"13B DiT, {args.cache_steps} steps", "size": "544p" if not args.smoke else "64x64x9", "setting": spec,
                     "speedup": round(uncached / seconds, 2), "psnr_db": round(psnr(latents, reference), 2),
                     "skipped": f"{cache.skipped}/{cache.skipped + cache.computed}"})
        print(rows[-1], file=sys.stderr, flush=True)
        del cached_model
    return rows


def toy_rows(args, device) -> list[dict]:
    """Whole videos from the embedded default model: uncached, then each step cache."""
    import torch

    from hvctl.generate import GenerateRecipe, TextToVideo, prepare
    from hvctl.models.loading import resolve_device_dtype

    prompt = "a red circle moves left on a black background"
    rows, reference = [], None
    for spec in ("none", *CACHES):
        r, model_dir = prepare(GenerateRecipe(prompt=prompt, seed=0, device=str(device), step_cache=spec,
                                              steps=4 if args.smoke else None))
        t2v = TextToVideo(model_dir, r, *resolve_device_dtype(r.device, r.dtype))
        cond = t2v.conditions([prompt])
        t2v.latents([0], cond)  # warm-up
        start = time.perf_counter()
        frames = t2v.frames(t2v.latents([0], cond))
        seconds = time.perf_counter() - start
        if reference is None:
            reference, uncached = frames, seconds
            continue
        summary = t2v.step_cache.summary()
        rows.append({"part": f"toy default, {r.steps} steps", "size": f"{r.height}x{r.width}x{r.frames}", "setting": spec,
                     "speedup": round(uncached / seconds, 2),
                     "psnr_db": round(psnr(torch.from_numpy(frames), torch.from_numpy(reference)), 2),
                     "skipped": f"{summary['skipped']}/{summary['skipped'] + summary['computed']}"})
        print(rows[-1], file=sys.stderr, flush=True)
    return rows


def table(rows: list[dict]) -> str:
    columns = ["part", "size", "setting", "attention", "s_per_step", "first_step_s", "peak_gib", "speedup", "psnr_db",
               "skipped", "note"]
    widths = {c: max(len(c), *(len(str(r.get(c, ""))) for r in rows)) for c in columns}
    lines = [" | ".join(c.ljust(widths[c]) for c in columns), "-+-".join("-" * widths[c] for c in columns)]
    lines += [" | ".join(str(r.get(c, "")).ljust(widths[c]) for c in columns) for r in rows]
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--sizes", type=lambda s: s.split(","), default=list(SIZES), help="720p,544p")
    parser.add_argument("--steps", type=int, default=3, help="timed steps per setting, after one warm-up step")
    parser.add_argument("--cache-steps", type=int, default=20, help="steps of the 13B step-cache runs")
    parser.add_argument("--text-len", type=int, default=256)
    parser.add_argument("--only", type=lambda s: s.split(","), default=None, help=f"settings among {','.join(SETTINGS)}")
    parser.add_argument("--skip-toy", action="store_true")
    parser.add_argument("--json", type=str, default=None, help="also write the rows here")
    parser.add_argument("--smoke", action="store_true", help="tiny shapes on any device: checks the script, measures nothing")
    args = parser.parse_args()
    import torch

    from hvctl.models.loading import quiet_libraries

    quiet_libraries()
    if not torch.cuda.is_available() and not args.smoke:
        print("error: benchmarks/gpu_generate.py measures a CUDA GPU and none is available here "
              "(--smoke checks the script on the CPU)", file=sys.stderr)
        sys.exit(1)
    bad = [s for s in args.sizes if s not in SIZES] + [s for s in args.only or () if s not in SETTINGS]
    if bad or min(args.steps, args.cache_steps) < 1:
        print(f"error: unknown size or setting {bad}, or steps < 1", file=sys.stderr)
        sys.exit(1)
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    args.preset = "tiny" if args.smoke else "hunyuan-t2v-720p"
    if args.smoke:
        args.sizes, args.text_len, args.cache_steps = args.sizes[:1], 16, min(args.cache_steps, 4)
    rows = dit_rows(args, device, dtype) + ([] if args.skip_toy else toy_rows(args, device))
    import diffusers

    gpu = torch.cuda.get_device_name(device) if device.type == "cuda" else "CPU (smoke)"
    print(f"{gpu}, torch {torch.__version__}, diffusers {diffusers.__version__}, {time.strftime('%Y-%m-%d')}")
    print(table(rows))
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"device": gpu, "torch": torch.__version__, "rows": rows}, f, indent=2)


if __name__ == "__main__":
    main()
