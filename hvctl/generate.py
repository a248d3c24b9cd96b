"""`hvctl generate`: text-to-video inference, one mp4 and one JSON sidecar per video.

Settings come from, in rising priority: the model folder's defaults (hvctl.json, else the
official ones), the recipe file, `--set` overrides, and command-line flags. Video i of a run is
drawn from `torch.Generator().manual_seed(seed + i)` over the latent shape, as the official code
seeds its videos and as diffusers draws its noise, so any single video can be reproduced alone
from its sidecar.
"""

from __future__ import annotations

import math
import random
import re
import time
from dataclasses import dataclass, field, fields, replace
from pathlib import Path
from typing import ClassVar, Literal

from hvctl import __version__
from hvctl.data.formats import is_frame_count
from hvctl.errors import HvctlError
from hvctl.i2v import condition_type, latent_channels
from hvctl.models.loading import prepare_model, resolve_device_dtype
from hvctl.rewrite import Rewriter, RewriteRecipe


@dataclass
class GenerateRecipe:
    """An inference recipe. None means: the model's default."""

    KIND: ClassVar[str] = "generate"
    LIMITS: ClassVar[dict] = {  # checked when the recipe is loaded (hvctl/recipe.py)
        "height": ">= 16", "width": ">= 16", "frames": ">= 1", "steps": ">= 1", "seed": "[0, 9223372036854775807]",
        "guidance_scale": ">= 1", "embedded_guidance": ">= 0", "flow_shift": "> 0", "text_len": ">= 1",
        "num_videos": ">= 1", "fps": ">= 1", "vae_tile_size": ">= 16", "ulysses_degree": ">= 1", "ring_degree": ">= 1"}
    prompt: str | None = None
    negative_prompt: str | None = None
    model: Path | None = None  # None: the embedded default model
    height: int | None = None
    width: int | None = None
    frames: int | None = None
    steps: int | None = None
    seed: int | None = None  # None: a random seed, recorded in the sidecar
    guidance_scale: float | None = None  # true classifier-free guidance (2 passes per step when > 1)
    embedded_guidance: float | None = None  # guidance-distilled models only
    flow_shift: float | None = None
    text_len: int | None = None
    num_videos: int = 1
    fps: int | None = None
    output: Path | None = None  # None: hvctl-outputs/{time}_seed{seed}_{prompt}.mp4
    dtype: Literal["auto", "float32", "bfloat16", "float16"] = "auto"
    device: str = "auto"
    vae_tiling: bool | None = None  # None: tile frames larger than vae_tile_size
    vae_tile_size: int = 256
    vae_tile_stats: Literal["frame", "tile"] = "frame"  # GroupNorm statistics of a tile: the whole frame's, or its own
    ulysses_degree: int = 1  # sequence-parallel inference over ulysses_degree x ring_degree processes
    ring_degree: int = 1
    cfg_parallel: bool = False  # true CFG's two passes on two processes (times ulysses x ring)
    rewrite: RewriteRecipe | None = None  # rewrite the prompt first (hvctl/rewrite.py); None: as written
    lora: list[str] = field(default_factory=list)  # LoRA files, each FILE or FILE:SCALE (diffusers, musubi/kohya, ComfyUI or official I2V format)
    image: Path | None = None  # image-to-video: the first frame (hvctl i2v); needs an i2v model
    i2v_stability: bool = True  # start from 0.999 noise + 0.001 image latent (official --i2v-stability)
    # Inference accelerators (hvctl/accelerate.py)
    attention: Literal["auto", "sdpa", "flash", "flash3", "sage", "native"] = "auto"
    offload: Literal["none", "model", "group", "sequential", "auto"] = "none"
    weights_dtype: str | None = None  # the DiT's stored weights, e.g. float8_e4m3fn; None: the compute dtype
    compile: bool = False  # regional torch.compile of the DiT's blocks
    step_cache: str = "none"  # none, teacache:T or fbc:T
    gpu_memory: float | None = None  # GiB that --offload auto and --plan plan for; None: the GPU's own


def resolve(recipe: GenerateRecipe, defaults: dict, prompt_required: bool = True) -> GenerateRecipe:
    """Fill the unset settings from the model's defaults (ModelFolder.generation_defaults) and check them all."""
    guidance_embeds = defaults["guidance_embeds"]
    filled = {f.name: (getattr(recipe, f.name) if getattr(recipe, f.name) is not None else defaults.get(f.name))
              for f in fields(recipe)}
    r = replace(recipe, **filled)
    if not (r.prompt or "").strip() and prompt_required:
        raise HvctlError("no prompt given (pass PROMPT or set 'prompt' in the recipe)")
    if r.lora:
        from hvctl.lora import check_lora_spec

        for spec in r.lora:  # before any model loads
            check_lora_spec(spec)
    if not is_frame_count(r.frames, image=True):
        raise HvctlError(f"--frames must be 4k+1 (1, 5, 9, 13, 17, ...), got {r.frames}")
    if r.gpu_memory is not None and not (math.isfinite(r.gpu_memory) and r.gpu_memory > 0):
        raise HvctlError(f"--gpu-memory must be a positive number of GiB, got {r.gpu_memory}")
    for name in ("height", "width"):
        value = getattr(r, name)
        if value <= 0 or value % 16:
            raise HvctlError(f"--{name} must be a positive multiple of 16, got {value}")
    for name in ("steps", "num_videos", "fps", "text_len", "vae_tile_size", "ulysses_degree", "ring_degree"):
        if getattr(r, name) < 1:
            raise HvctlError(f"--{name.replace('_', '-')} must be at least 1, got {getattr(r, name)}")
    if r.guidance_scale < 1:
        raise HvctlError(f"--guidance-scale must be >= 1 (1 turns classifier-free guidance off), got {r.guidance_scale}")
    if r.cfg_parallel and r.guidance_scale <= 1:
        raise HvctlError("--cfg-parallel runs the conditional and unconditional passes of true classifier-free guidance "
                         f"on two processes: it needs --guidance-scale > 1 (got {r.guidance_scale:g})")
    if r.step_cache != "none" and r.ulysses_degree * r.ring_degree > 1:
        raise HvctlError("--step-cache with sequence parallelism: each rank would decide on its own shard; "
                         "use one of them, or --cfg-parallel")
    if guidance_embeds and r.embedded_guidance is None:
        r.embedded_guidance = 6.0
    if not guidance_embeds and recipe.embedded_guidance is not None:
        raise HvctlError("--embedded-guidance given, but this model has no guidance embedding (use --guidance-scale)")
    if recipe.flow_shift is None and r.image is None and defaults.get("shift_for_steps") == r.steps:
        r.flow_shift = defaults["flow_shift"]  # a step-distilled student's own schedule
    elif recipe.flow_shift is None:  # the shift follows the step count (or the I2V design) unless set
        from hvctl.flow import default_flow_shift

        r.flow_shift = default_flow_shift(r.steps, defaults["flow_shift"],
                                          i2v_stability=r.i2v_stability if r.image is not None else None)
    if r.seed is None:
        r.seed = random.randrange(2**31)
    r.negative_prompt = r.negative_prompt or ""
    return r


def output_paths(r: GenerateRecipe) -> list[Path]:
    """The videos' paths, each checked writable (with its sidecar) before any work starts."""
    from hvctl.io import check_output_file

    if r.output is not None:
        out = Path(r.output)
        if out.suffix.lower() != ".mp4":
            raise HvctlError(f"--output {out}: must end in .mp4")
        paths = [out] if r.num_videos == 1 else [out.with_name(f"{out.stem}_{i}{out.suffix}") for i in range(r.num_videos)]
    else:
        slug = re.sub(r"[^A-Za-z0-9]+", "_", r.prompt).strip("_")[:100] or "video"
        stamp = time.strftime("%Y%m%d-%H%M%S")
        paths = [Path("hvctl-outputs") / f"{stamp}_seed{r.seed + i}_{slug}.mp4" for i in range(r.num_videos)]
    for path in paths:
        check_output_file(path, "--output")
        check_output_file(path.with_suffix(".json"), "--output")
    return paths


class TextToVideo:
    """A loaded model ready to sample: the part of `generate` that tests and evaluators reuse.

    Several prompts can share one batch; video i is still drawn from its own seed, so a batch
    gives what separate runs give (up to float rounding).
    """

    def __init__(self, model_dir: Path, r: GenerateRecipe, device, dtype, parallel_later: bool = False):
        from hvctl.accelerate import Accelerators
        from hvctl.models.loading import load_components
        from hvctl.models.text import ImagePromptEncoder, PromptEncoder
        from hvctl.models.vae import configure_tiling, latent_shape
        from hvctl.sampling import FlowMatchEulerSampler

        self.r = r
        self.accelerators = Accelerators.from_recipe(r)
        self.accelerators.check(device, dtype)
        self.accelerators.resolve_offload(r, model_dir, device, dtype)
        self.parts = load_components(model_dir, dtype=dtype, device=self.accelerators.load_device(device))
        self.loras = []  # what each LoRA file was read as
        if r.lora:
            from hvctl.lora import load_loras, parse_lora_spec

            self.loras = load_loras(self.parts.transformer, [parse_lora_spec(spec) for spec in r.lora])
        self.device = device
        self.offload = self.step_cache = None
        kind = condition_type(self.parts.transformer)
        # A latent_concat model given no image gets a zero image and mask: text-to-video, as task mixing trains it.
        text_only = kind == "latent_concat" and self.parts.image_processor is None
        if kind is not None and r.image is None and not text_only:
            raise HvctlError(f"{model_dir} is an image-to-video model ({kind}): give it an image (hvctl i2v IMAGE PROMPT)")
        if kind is None and r.image is not None:
            raise HvctlError(f"{model_dir} is a text-to-video model: make an image-to-video one with `hvctl model compose MODEL OUT --i2v token_replace`")
        p = self.parts
        if p.image_processor is not None:  # the official I2V's LLaVA reads the image with the prompt
            self.encode = ImagePromptEncoder(p.tokenizer, p.text_encoder, p.tokenizer_2, p.text_encoder_2,
                                             p.image_processor, condition=kind, text_len=r.text_len)
        else:
            self.encode = PromptEncoder(p.tokenizer, p.text_encoder, p.tokenizer_2, p.text_encoder_2, text_len=r.text_len)
        self.sampler = FlowMatchEulerSampler(r.steps, r.flow_shift, r.guidance_scale, r.embedded_guidance)
        configure_tiling(self.parts.vae, r.vae_tiling, r.vae_tile_size, r.vae_tile_stats)
        channels = latent_channels(self.parts.transformer)
        self.latent_shape = latent_shape(self.parts.vae.config, channels, r.frames, r.height, r.width)
        if not parallel_later:
            self.accelerate()

    def accelerate(self) -> None:
        """Apply the recipe's accelerators (after any sequence-parallel processors: they share the attention choice)."""
        self.offload, self.step_cache = self.accelerators.apply(self.parts, self.device, self.parts.transformer.dtype, self.r.steps)

    def run_report(self, ticks: list[float]) -> dict:
        """What the accelerators did for the last video, and its step times (ticks: its start, then each step's end)."""
        steps = [b - a for a, b in zip(ticks, ticks[1:])]
        later = sorted(steps[1:]) or steps
        report = {"accelerators": dict(self.accelerators.applied), "step_seconds": {
            "first": round(steps[0], 4), "median_after_first": round(later[len(later) // 2], 4)}}
        if self.accelerators.compile:  # the first step compiles the blocks
            report["step_seconds"]["compile"] = round(max(0.0, steps[0] - later[len(later) // 2]), 4)
        if self.step_cache is not None:
            report["step_cache"] = self.step_cache.summary()
        return report

    def release_text_encoders(self) -> None:
        """The prompts are encoded: the text encoders leave the GPU."""
        if self.offload is not None:
            self.offload.release_text_encoders()

    def conditions(self, prompts: list[str], images: list | None = None):
        """Text conditions for `prompts`; for an i2v model, `images` ([H, W, 3] uint8, one per
        prompt; default: the recipe's image for every prompt) too. A LLaVA text encoder reads each
        prompt with its image, and the negative prompt with a black one (as diffusers does)."""
        import numpy as np

        from hvctl.sampling import Conditions

        image = None
        if self.r.image is not None:
            from hvctl.video import read_image

            images = images if images is not None else [read_image(self.r.image)] * len(prompts)
            image = self.image_condition(images)
        elif condition_type(self.parts.transformer) == "latent_concat":
            import torch

            from hvctl.i2v import ImageCondition

            c, _, h, w = self.latent_shape
            image = ImageCondition("latent_concat", torch.zeros((len(prompts), c, 0, h, w), device=self.device))
        negative = None
        if self.r.guidance_scale > 1:
            black = [np.zeros((self.r.height, self.r.width, 3), np.uint8)] * len(prompts) if images is not None else None
            negative = self.encode([self.r.negative_prompt] * len(prompts), black)
        return Conditions(self.encode(prompts, images), negative, image)

    def image_condition(self, images: list):
        """The first frames' latents: each image resized to cover the video's size, centre-cropped,
        encoded (posterior mean, already scaled like the video latents by encode_posterior)."""
        import torch

        from hvctl.data.buckets import fit_to_bucket
        from hvctl.i2v import ImageCondition
        from hvctl.models.vae import encode_posterior

        latents = []
        for image in images:
            frame = fit_to_bucket(image[None], (self.r.height, self.r.width, 1))
            mean, _ = encode_posterior(self.parts.vae, frame)
            latents.append(mean[None])
        return ImageCondition(condition_type(self.parts.transformer), torch.cat(latents).to(self.device))

    def latents(self, seeds: list[int], conditions=None, on_step=None, denoiser=None, x0=None):
        """Final latents (B, C, T', H', W'): video i from seeds[i], conditioned on row i of `conditions`
        (self.conditions(prompts); default: the recipe's prompt for every video). denoiser: what
        the sampler calls instead of the bare transformer (hvctl.avatar.WindowedDenoiser). x0:
        latents that the seeds' noise is added to, at the sampler's start_sigma."""
        import torch

        from hvctl.flow import add_noise

        noise = torch.cat([torch.randn((1, *self.latent_shape), generator=torch.Generator("cpu").manual_seed(seed))
                           for seed in seeds])
        if x0 is not None:
            noise = add_noise(x0.float().cpu(), noise, self.sampler.start_sigma)
        if conditions is None:
            conditions = self.conditions([self.r.prompt] * len(seeds))
        noise = noise.to(self.device)
        if conditions.image is not None:
            noise = conditions.image.initial(noise, self.r.i2v_stability)
        if self.step_cache is not None:
            self.step_cache.reset()
        return self.sampler(denoiser or self.parts.transformer, noise, conditions, on_step=on_step)

    def frames(self, latents):
        """(B, ...) latents -> (B, T, H, W, 3) uint8 numpy frames."""
        from hvctl.models.vae import decode_to_frames

        return decode_to_frames(self.parts.vae, latents).numpy()


def prepare(recipe: GenerateRecipe) -> tuple[GenerateRecipe, Path]:
    """Resolve a recipe against its model folder."""
    model_dir, defaults = prepare_model(recipe.model)
    r = resolve(recipe, defaults)
    r.lora = [absolute_lora_spec(spec) for spec in r.lora]  # the sidecar replays from anywhere
    device, dtype = resolve_device_dtype(r.device, r.dtype)
    r.model, r.device, r.dtype = model_dir, str(device), str(dtype).removeprefix("torch.")
    if r.ulysses_degree * r.ring_degree > 1:  # the launcher checks this before any rank starts
        from hvctl.models.loading import ModelFolder
        from hvctl.parallel import check_sequence_split

        folder = ModelFolder.open(model_dir)
        check_sequence_split([(r.frames, r.height, r.width)], folder.component_config("transformer"),
                             folder.component_config("vae"), r.ulysses_degree, r.ring_degree, "--ulysses-degree/--ring-degree")
    return r, model_dir


def absolute_lora_spec(spec: str) -> str:
    from hvctl.lora import parse_lora_spec

    path, scale = parse_lora_spec(spec)
    return f"{Path(path).absolute()}:{scale:g}"


def replay_layer(sidecar: Path, kind: str) -> tuple[str, Path, dict]:
    """The settings that made the one video a sidecar describes, as a recipe layer (--replay):
    its own seed and final prompt (already rewritten, so no rewrite), one video."""
    import json

    sidecar = Path(sidecar)
    try:
        data = json.loads(sidecar.read_text())
    except (OSError, UnicodeDecodeError, ValueError) as e:
        raise HvctlError(f"--replay {sidecar}: not a readable JSON sidecar ({e})") from None
    if not isinstance(data, dict) or not isinstance(data.get("settings"), dict) or not isinstance(data.get("seed"), int):
        raise HvctlError(f"--replay {sidecar}: not an hvctl video sidecar (it needs 'settings' and 'seed')")
    if data.get("kind", kind) != kind:
        raise HvctlError(f"--replay {sidecar}: written by `hvctl {data['kind']}`; replay it with that command")
    settings = {**data["settings"], "seed": data["seed"], "num_videos": 1, "rewrite": None}
    if isinstance(data.get("prompt"), str):
        settings["prompt"] = data["prompt"]
    return f"--replay {sidecar}", sidecar.parent, settings


def diffusers_settings(t2v: "TextToVideo", seed: int) -> dict:
    """What diffusers' HunyuanVideoPipeline needs to draw the same noise and reach the same
    latents: its call's arguments and the scheduler's shift (the noise is torch.randn over the
    latent shape from torch.Generator("cpu").manual_seed(seed), as hvctl draws it)."""
    r = t2v.r
    call = {"prompt": r.prompt, "height": r.height, "width": r.width, "num_frames": r.frames,
            "num_inference_steps": r.steps, "prompt_template": {"template": t2v.encode.template.template,
                                                                "crop_start": t2v.encode.crop_start},
            "max_sequence_length": t2v.encode.text_len, "generator_seed": seed}
    if r.embedded_guidance is not None:
        call["guidance_scale"] = r.embedded_guidance
    if r.guidance_scale > 1:
        call.update(true_cfg_scale=r.guidance_scale, negative_prompt=r.negative_prompt)
    return {"pipeline_call": call, "scheduler": {"class": "FlowMatchEulerDiscreteScheduler", "shift": r.flow_shift},
            "latent_shape": [1, *t2v.latent_shape]}


def plan(recipe: GenerateRecipe) -> dict:
    """`hvctl generate --plan`: estimated peak GPU memory per offload setting and time per step,
    from the model's configs and a short matmul probe of the device; nothing is sampled."""
    from hvctl.accelerate import GIB, Accelerators, device_memory, make_plan

    r, model_dir = prepare(recipe)
    device, dtype = resolve_device_dtype(r.device, r.dtype)
    Accelerators.from_recipe(r).check(device, dtype)
    budget = r.gpu_memory if r.gpu_memory is not None else (device_memory(device) or 0) / GIB or None
    return {"settings": _settings_dict(r), "device": str(device),
            **make_plan(r, model_dir, device, dtype).to_dict(round(budget, 2) if budget else None)}


def generate(recipe: GenerateRecipe, *, progress: bool | None = None, on_warning=None) -> dict | None:
    """Run a generate recipe; returns the JSON-able result (videos, sidecars, settings, timings).
    Sequence-parallel: every rank samples, rank 0 writes and returns; the others return None."""
    from hvctl.io import write_json_atomic
    from hvctl.models.loading import folder_fingerprint
    from hvctl.parallel import sequence_parallel_inference
    from hvctl.progress import progress_bar
    from hvctl.video import write_video

    started = time.perf_counter()
    r, model_dir = prepare(recipe)
    rewritten = None
    if r.rewrite is not None:
        rewritten = Rewriter(r.rewrite)(r.prompt)
        if rewritten["warning"] and on_warning:
            on_warning(rewritten["warning"])
        r.prompt = rewritten["rewritten"]
    device, dtype = resolve_device_dtype(r.device, r.dtype)
    parallel = sequence_parallel_inference(r.ulysses_degree, r.ring_degree, device, cfg=2 if r.cfg_parallel else 1)
    if parallel is not None:
        device, r.seed = parallel.device, parallel.agree(r.seed)  # a random seed: rank 0's
    paths = output_paths(r)
    t2v = TextToVideo(model_dir, r, device, dtype, parallel_later=parallel is not None)
    if on_warning and (n := t2v.encode.prompt_tokens(r.prompt)) > r.text_len:
        on_warning(f"the prompt is {n} tokens long; only the first {r.text_len} are used (--text-len)")
    if parallel is not None:
        parallel.apply(t2v.parts.transformer)
        t2v.sampler.cfg_group = parallel.cfg_group
        t2v.accelerate()
    main = parallel is None or parallel.ranks.is_main
    model = {"path": str(model_dir), "fingerprint": folder_fingerprint(model_dir)}
    loaded = time.perf_counter()

    conditions = t2v.conditions([r.prompt])  # encoded once for every video
    t2v.release_text_encoders()
    videos = []
    for i, path in enumerate(paths):
        seed, t0 = r.seed + i, time.perf_counter()
        ticks = [t0]
        with progress_bar(r.steps, f"video {i + 1}/{len(paths)}", enabled=progress if main else False) as advance:
            latents = t2v.latents([seed], conditions, on_step=lambda _: (advance(), ticks.append(time.perf_counter())))
        if not main:  # rank 0 alone decodes and writes
            continue
        frames = t2v.frames(latents)[0]
        write_video(path, frames, fps=r.fps)
        sidecar = path.with_suffix(".json")
        write_json_atomic(sidecar, {
            "hvctl_version": __version__,
            "kind": "generate",  # `hvctl generate --replay` (and i2v's) remakes this video from this file
            "prompt": r.prompt,
            **({"rewrite": rewritten} if rewritten else {}),
            "negative_prompt": r.negative_prompt,
            "seed": seed,
            "index": i,
            "settings": _settings_dict(r),
            "model": model,
            "diffusers": diffusers_settings(t2v, seed),
            "video": {"path": path.name, "frames": int(frames.shape[0]), "height": int(frames.shape[1]),
                      "width": int(frames.shape[2]), "fps": r.fps},
            "seconds": round(time.perf_counter() - t0, 3),
            **t2v.run_report(ticks),
        })
        videos.append({"path": str(path), "sidecar": str(sidecar), "seed": seed, **t2v.run_report(ticks)})
    if parallel is not None:
        parallel.close()
    if not main:
        return None
    return {
        "videos": videos,
        "settings": _settings_dict(r),
        "model": model,
        **({"loras": t2v.loras} if t2v.loras else {}),
        "seconds": {"load": round(loaded - started, 3), "total": round(time.perf_counter() - started, 3)},
    }


def _settings_dict(r: GenerateRecipe) -> dict:
    from hvctl.recipe import recipe_to_dict

    settings = recipe_to_dict(r)
    settings.pop("output", None)
    return settings
