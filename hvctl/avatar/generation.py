"""`hvctl avatar`: its recipe, the loaded avatar model ready to sample, and the command's run."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import ClassVar

import numpy as np

from hvctl.avatar.conditioners import audio_encoder_for, load_conditioners, read_avatar_config
from hvctl.avatar.conditions import CONDITIONS, MASKS, ConditionEncoder, batch_inputs, read_expression
from hvctl.avatar.windows import WindowedDenoiser, windows
from hvctl.data.formats import AUDIO_RATE
from hvctl.errors import HvctlError
from hvctl.generate import GenerateRecipe


@dataclass
class AvatarRecipe(GenerateRecipe):
    """`hvctl avatar`: generate's settings, plus the conditions. frames None: as long as the audio,
    else the pose video, else the expression features, else one window."""

    KIND: ClassVar[str] = "avatar"
    LIMITS: ClassVar[dict] = {**GenerateRecipe.LIMITS, "window_overlap": ">= 0", "condition_guidance": ">= 1"}
    reference: Path | None = None
    audio: Path | None = None
    pose: Path | None = None
    expression: Path | None = None
    audio_mask: Path | None = None
    window_overlap: int | None = None  # latent frames shared by neighbouring windows; None: the model's
    # Condition guidance, e.g. {audio: 2.0}: each scale > 1 costs a pass without that condition
    # and strengthens its effect (hvctl avatar --audio-guidance).
    condition_guidance: dict[str, float] = field(default_factory=dict)


def frames_for(recipe: AvatarRecipe, fps: float, audio: np.ndarray | None) -> int | None:
    """The video length that the driving signal gives (audio: the recipe's, already read): 4k+1
    frames, the longest that it covers."""
    from hvctl.video import probe_video

    if audio is not None:
        covered = int(len(audio) / AUDIO_RATE * fps)
    elif recipe.pose is not None:
        covered = probe_video(recipe.pose)["frames"]
    elif recipe.expression is not None:
        covered = len(read_expression(recipe.expression))
    else:
        return None
    if covered < 5:
        raise HvctlError(f"{recipe.audio or recipe.pose or recipe.expression}: covers {covered} frames at {fps:g} fps; "
                         "an avatar video needs at least 5")
    return (covered - 1) // 4 * 4 + 1


class AvatarGenerator:
    """A loaded avatar model ready to sample: the part of `hvctl avatar` that the toy evaluator reuses."""

    def __init__(self, model_dir: Path, r: AvatarRecipe, device, dtype):
        from hvctl.generate import TextToVideo

        self.r = r
        self.t2v = TextToVideo(model_dir, r, device, dtype)
        self.conditioners = load_conditioners(model_dir, self.t2v.parts.transformer)
        if self.conditioners is None:
            raise HvctlError(f"{model_dir}: no avatar conditioners (MODEL/avatar/); train some with an `avatar:` "
                             "section in a train recipe (recipes/toy/avatar.yaml)")
        config = self.conditioners.config
        encoder = None
        if "audio" in config["conditioners"]:
            encoder = audio_encoder_for(config["audio_encoder"]["name"], config["audio_encoder"]["options"])
        self.encode = ConditionEncoder(self.t2v.parts.vae, encoder)
        vae = self.t2v.parts.vae.config
        self.per_latent = vae.get("temporal_compression_ratio", 4)
        self.window = (config["window"]["frames"] - 1) // self.per_latent + 1
        self.overlap = config["window"]["overlap"] if r.window_overlap is None else r.window_overlap
        if not 0 <= self.overlap < self.window:
            raise HvctlError(f"window overlap {self.overlap}: must be at least 0 and under the window's {self.window} latent frames")

    def check(self, names) -> None:
        model = self.conditioners.config["conditioners"]
        unknown = sorted(set(self.r.condition_guidance) - set(model))
        if unknown:
            raise HvctlError(f"condition guidance for {', '.join(unknown)}: this model has no such conditioner (it has: {', '.join(model)})")
        extra = [n for n in names if n not in MASKS and n not in model]
        if extra:
            raise HvctlError(f"{self.r.model}: this avatar model has no {', '.join(extra)} conditioner "
                             f"(it has: {', '.join(model)})")
        if "reference" in model and "reference" not in names:
            raise HvctlError("this avatar model animates a reference image: give REF_IMAGE")

    def latents(self, seeds: list[int], inputs: dict, prompts: list[str] | None = None, on_step=None, conditions=None):
        denoiser = WindowedDenoiser(self.t2v.parts.transformer, inputs, self.window, self.overlap, self.r.condition_guidance)
        conditions = conditions or self.t2v.conditions(prompts or [self.r.prompt] * len(seeds))
        return self.t2v.latents(seeds, conditions, on_step=on_step, denoiser=denoiser)


def avatar(recipe: AvatarRecipe, *, progress: bool | None = None) -> dict:
    """Run an avatar recipe: one mp4 (with the audio, when given) and a JSON sidecar."""
    import time
    from dataclasses import replace

    from hvctl import __version__
    from hvctl.generate import _settings_dict, absolute_lora_spec, output_paths, resolve
    from hvctl.models.loading import prepare_model, resolve_device_dtype
    from hvctl.io import write_json_atomic
    from hvctl.models.default import default_avatar_model_dir
    from hvctl.models.loading import folder_fingerprint
    from hvctl.progress import progress_bar
    from hvctl.video import read_audio, write_video

    started = time.perf_counter()
    if recipe.ulysses_degree * recipe.ring_degree > 1 or recipe.cfg_parallel or recipe.image is not None:
        raise HvctlError("avatar: parallel inference and --image are not supported; the reference is REF_IMAGE")
    if recipe.step_cache != "none":  # a skipped pass would add the conditioners' block residuals twice
        raise HvctlError("avatar: --step-cache does not apply to avatar models (their conditioners act inside the blocks)")
    files = {name: getattr(recipe, name) for name in (*CONDITIONS, *MASKS) if getattr(recipe, name) is not None}
    model_dir, defaults = prepare_model(recipe.model or default_avatar_model_dir())
    config = read_avatar_config(model_dir)
    fps = recipe.fps or defaults["fps"]
    audio = read_audio(recipe.audio, AUDIO_RATE) if recipe.audio is not None else None  # read once: length, features, mux
    frames = recipe.frames or frames_for(recipe, fps, audio) or (config or {}).get("window", {}).get("frames")
    avatar_defaults = {**defaults, "guidance_scale": 1.0}  # the reference carries the look; the text barely matters
    r = resolve(replace(recipe, frames=frames, prompt=recipe.prompt or ""), avatar_defaults, prompt_required=False)
    path = output_paths(replace(r, prompt=r.prompt or "avatar"))[0]  # checked before the model loads
    device, dtype = resolve_device_dtype(r.device, r.dtype)
    r.model, r.device, r.dtype = model_dir, str(device), str(dtype).removeprefix("torch.")
    r.lora = [absolute_lora_spec(spec) for spec in r.lora]
    generator = AvatarGenerator(model_dir, r, device, dtype)
    generator.check(files)
    conditions = generator.encode.from_files({k: v for k, v in files.items() if k != "audio"}, r.height, r.width, r.frames, r.fps)
    if audio is not None:
        conditions["audio"] = generator.encode.audio(audio, r.fps, r.frames)
    inputs = batch_inputs([conditions], device)
    loaded = time.perf_counter()
    text = generator.t2v.conditions([r.prompt])
    generator.t2v.release_text_encoders()
    with progress_bar(r.steps, "avatar", enabled=progress) as advance:
        latents = generator.latents([r.seed], inputs, on_step=lambda _: advance(), conditions=text)
    video = generator.t2v.frames(latents)[0]
    if audio is not None:
        audio = (audio[:int(round(r.frames / r.fps * AUDIO_RATE))], AUDIO_RATE)
    write_video(path, video, fps=r.fps, audio=audio)
    model = {"path": str(model_dir), "fingerprint": folder_fingerprint(model_dir)}
    sidecar = path.with_suffix(".json")
    settings = _settings_dict(r)
    write_json_atomic(sidecar, {"hvctl_version": __version__, "kind": "avatar", "prompt": r.prompt, "seed": r.seed, "settings": settings,
                                "model": model, "windows": windows(generator.t2v.latent_shape[1], generator.window, generator.overlap),
                                "video": {"path": path.name, "frames": int(video.shape[0]), "height": int(video.shape[1]),
                                          "width": int(video.shape[2]), "fps": r.fps, "audio": audio is not None}})
    return {"videos": [{"path": str(path), "sidecar": str(sidecar), "seed": r.seed}], "settings": settings, "model": model,
            "seconds": {"load": round(loaded - started, 3), "total": round(time.perf_counter() - started, 3)}}
