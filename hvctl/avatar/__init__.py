"""Avatar: a reference image animated by audio, pose and expression, any of them at once.

The conditioners (plugins/hvctl_avatar, chosen by registered name) are applied to a plain
diffusers HunyuanVideo transformer from outside: `AvatarConditioners.attach` adds them as its
`avatar` submodule (so they train, checkpoint and shard with it) and hooks them in, adding input
tokens after the patch embedding and residuals after chosen blocks. The transformer's own code and
weights stay those of a text-to-video model.

A model folder holds them beside the usual components:

    MODEL/avatar/config.json                 the conditioners and their options, the audio encoder, the window
    MODEL/avatar/conditioners.safetensors    their weights

The conditions of one call are a dict of tensors (`given`):
    reference   (B, C, 1, H', W')     the reference image's latent      | latent-aligned
    pose        (B, C, T', H', W')    the pose video's latents          |
    audio       (B, T, F)             audio features per video frame    | frame-aligned
    expression  (B, T, E)             expression features per video frame
    audio_mask  (B, 1, H, W)          where the audio may act (1: everywhere when absent)
    present.X   (B,)                  1 where sample b has condition X (hybrid batches, dropout)
"""

from __future__ import annotations

import json
from contextlib import contextmanager, nullcontext
from dataclasses import dataclass, field
from functools import partial
from pathlib import Path
from typing import ClassVar

import numpy as np
import torch
from torch import nn

from hvctl.errors import HvctlError
from hvctl.generate import GenerateRecipe

CONDITIONS = ("reference", "audio", "pose", "expression")
LATENT_ALIGNED = ("reference", "pose")  # latents: sliced by latent frame
FRAME_ALIGNED = ("audio", "expression")  # per video frame: sliced by video frame
MASKS = ("audio_mask",)
AVATAR_DIR = "avatar"
WEIGHTS_FILE = "conditioners.safetensors"
AUDIO_RATE = 16000  # Hz: what the audio encoders read and the mp4 carries


class AvatarConditioners(nn.Module):
    """The conditioners of one model, and the hooks that feed them the current call's conditions."""

    def __init__(self, config: dict, model_config: dict):
        from hvctl import plugins

        super().__init__()
        self.config = config
        self.conditioners = nn.ModuleDict({
            name: plugins.create("conditioner", name, model_config=dict(model_config), **options)
            for name, options in config["conditioners"].items()
        })
        self.inputs: dict | None = None
        self.grid: tuple[int, int, int] | None = None

    @contextmanager
    def given(self, inputs: dict | None):
        """Model calls inside see these conditions (None: none, the plain text-to-video model)."""
        self.inputs = inputs
        try:
            yield
        finally:
            self.inputs = None

    def _scaled(self, name: str, value: torch.Tensor) -> torch.Tensor:
        present = self.inputs.get(f"present.{name}")
        if present is None:
            return value
        return value * present.to(value).view(-1, *[1] * (value.dim() - 1))

    def _active(self):
        return [(name, c) for name, c in self.conditioners.items() if self.inputs.get(name) is not None]

    def add_input_tokens(self, tokens: torch.Tensor) -> torch.Tensor:
        for name, conditioner in self._active():
            if hasattr(conditioner, "input_tokens"):
                tokens = tokens + self._scaled(name, conditioner.input_tokens(self.inputs, self.grid))
        return tokens

    def add_after_block(self, block: int, hidden: torch.Tensor) -> torch.Tensor:
        for name, conditioner in self._active():
            if block in conditioner.blocks:
                hidden = hidden + self._scaled(name, conditioner.after_block(block, hidden, self.inputs, self.grid))
        return hidden

    def attach(self, transformer) -> None:
        """Make these the transformer's conditioners (its `avatar` submodule) and hook them in."""
        transformer.add_module("avatar", self)
        transformer.register_forward_pre_hook(self._record_grid, with_kwargs=True)
        transformer.x_embedder.register_forward_hook(
            lambda module, args, out: out if self.inputs is None else self.add_input_tokens(out))
        blocks = [*transformer.transformer_blocks, *transformer.single_transformer_blocks]
        used = {b for c in self.conditioners.values() for b in c.blocks}
        for index in sorted(used):
            blocks[index].register_forward_hook(partial(self._after_block_hook, index))

    def _record_grid(self, transformer, args, kwargs):
        latents = kwargs["hidden_states"] if "hidden_states" in kwargs else args[0]
        c = transformer.config
        self.grid = (latents.shape[2] // c.patch_size_t, latents.shape[3] // c.patch_size, latents.shape[4] // c.patch_size)

    def _after_block_hook(self, index, block, args, out):
        if self.inputs is None:
            return out
        hidden, text = out
        return self.add_after_block(index, hidden), text


def new_conditioners(settings, transformer, window_frames: int | None) -> AvatarConditioners:
    """Fresh conditioners for a train recipe's `avatar` section (zero-initialised outputs);
    window_frames: the inference window, the longest clips trained on."""
    unknown = sorted(set(settings.options) - set(CONDITIONS))
    if unknown:  # options of known but unused conditions are let be: one base recipe serves several
        raise HvctlError(f"avatar.options: {', '.join(unknown)} is not a condition ({', '.join(CONDITIONS)})")
    options = {name: dict(settings.options.get(name, {})) for name in settings.conditions}
    if "audio" in options and "feature_dim" not in options["audio"]:
        options["audio"]["feature_dim"] = audio_encoder_for(settings.audio_encoder, settings.audio_encoder_options).feature_dim
    config = {
        "conditioners": options,
        "audio_encoder": {"name": settings.audio_encoder, "options": dict(settings.audio_encoder_options)},
        "window": {"frames": window_frames, "overlap": settings.window_overlap},
    }
    conditioners = AvatarConditioners(config, transformer.config)
    return conditioners.to(transformer.device, transformer.dtype)


def audio_encoder_for(name: str, options: dict):
    from hvctl import plugins

    return plugins.create("audio_encoder", name, **options)


def read_avatar_config(model_dir: Path) -> dict | None:
    file = Path(model_dir) / AVATAR_DIR / "config.json"
    if not file.is_file():
        return None
    try:
        return json.loads(file.read_text())
    except (OSError, json.JSONDecodeError) as e:
        raise HvctlError(f"{file}: unreadable ({e})") from None


def load_conditioners(model_dir: Path, transformer) -> AvatarConditioners | None:
    """The model folder's conditioners attached to `transformer`; None when it has none."""
    from safetensors.torch import load_file

    config = read_avatar_config(model_dir)
    if config is None:
        return None
    conditioners = AvatarConditioners(config, transformer.config)
    weights = Path(model_dir) / AVATAR_DIR / WEIGHTS_FILE
    if not weights.is_file():
        raise HvctlError(f"{weights}: missing")
    try:
        conditioners.load_state_dict(load_file(str(weights)))
    except RuntimeError as e:
        raise HvctlError(f"{weights}: does not fit {Path(model_dir) / AVATAR_DIR / 'config.json'} "
                         f"({str(e).splitlines()[0]})") from None
    conditioners.to(transformer.device, transformer.dtype).attach(transformer)
    return conditioners


def save_conditioners(model_dir: Path, config: dict, state: dict) -> None:
    """Write MODEL/avatar/ (state: the conditioners' weights, keys without the `avatar.` prefix)."""
    from safetensors.torch import save_file

    from hvctl.io import atomic_output, write_json_atomic

    folder = Path(model_dir) / AVATAR_DIR
    folder.mkdir(parents=True, exist_ok=True)
    with atomic_output(folder / WEIGHTS_FILE) as tmp:
        save_file({k: v.detach().cpu().contiguous() for k, v in state.items()}, str(tmp))
    write_json_atomic(folder / "config.json", config)


# -- conditions: from files or arrays to the conditioners' inputs ---------------------------------


def read_expression(path: Path) -> np.ndarray:
    """Per-frame expression features (T, E) from .npy (no pickles), .json (a list of rows) or .safetensors (one tensor)."""
    path = Path(path)
    if not path.is_file():
        raise HvctlError(f"{path}: no such file")
    try:
        if path.suffix == ".npy":
            array = np.load(path, allow_pickle=False)
        elif path.suffix == ".json":
            array = np.asarray(json.loads(path.read_text()), dtype=np.float32)
        elif path.suffix == ".safetensors":
            from safetensors.numpy import load_file

            tensors = load_file(str(path))
            if len(tensors) != 1:
                raise ValueError(f"expected one tensor, found {len(tensors)}")
            array = next(iter(tensors.values()))
        else:
            raise ValueError("expected .npy, .json or .safetensors")
    except (ValueError, OSError, json.JSONDecodeError) as e:
        raise HvctlError(f"{path}: unreadable expression features ({e})") from None
    array = np.asarray(array, dtype=np.float32)
    if array.ndim != 2 or array.shape[0] == 0 or not np.isfinite(array).all():
        raise HvctlError(f"{path}: expression features must be finite numbers shaped (frames, features), got {array.shape}")
    return array


class ConditionEncoder:
    """Condition media -> the tensors the conditioners read: what `hvctl encode` caches for
    training and what `hvctl avatar` feeds at once. Latents are posterior means, scaled like the
    video latents."""

    def __init__(self, vae, audio_encoder=None):
        self.vae, self.audio_encoder = vae, audio_encoder

    def _latent(self, frames) -> torch.Tensor:
        from hvctl.models.vae import encode_posterior

        return encode_posterior(self.vae, frames)[0].cpu()

    def reference(self, image, height: int, width: int) -> torch.Tensor:
        from hvctl.generate import fit_image

        return self._latent(fit_image(image, height, width)[None])

    def pose(self, frames, height: int, width: int, count: int, source="pose video") -> torch.Tensor:
        from hvctl.data.buckets import fit_to_bucket

        if len(frames) < count:
            raise HvctlError(f"{source}: {len(frames)} frames, the video needs {count}")
        return self._latent(fit_to_bucket(frames, (height, width, count)))

    def audio(self, samples, fps: float, count: int) -> torch.Tensor:
        if self.audio_encoder is None:
            raise HvctlError("audio given, but no audio encoder is set")
        return self.audio_encoder(samples, fps, count)

    @staticmethod
    def expression(array, count: int, source="expression features") -> torch.Tensor:
        if len(array) < count:
            raise HvctlError(f"{source}: {len(array)} frames of features, the video needs {count}")
        return torch.as_tensor(np.asarray(array[:count], dtype=np.float32))

    @staticmethod
    def mask(image, height: int, width: int) -> torch.Tensor:
        from hvctl.generate import fit_image

        return torch.as_tensor(fit_image(image, height, width).mean(axis=-1, dtype=np.float32) / 255.0)[None]

    def from_files(self, files: dict, height: int, width: int, count: int, fps: float) -> dict[str, torch.Tensor]:
        """Read each given condition file ({"reference": path, "audio": path, ...}) and encode it."""
        from hvctl.video import read_audio, read_image, read_video

        out = {}
        for name, path in files.items():
            if name == "reference":
                out[name] = self.reference(read_image(path), height, width)
            elif name == "pose":
                out[name] = self.pose(read_video(path)[0], height, width, count, source=str(path))
            elif name == "audio":
                out[name] = self.audio(read_audio(path), fps, count)
            elif name == "expression":
                out[name] = self.expression(read_expression(path), count, source=str(path))
            elif name == "audio_mask":
                out[name] = self.mask(read_image(path), height, width)
            else:
                raise HvctlError(f"unknown avatar condition {name!r} (choices: {', '.join((*CONDITIONS, *MASKS))})")
        return out


def batch_inputs(per_sample: list[dict], device=None) -> dict:
    """Per-sample condition dicts -> one batch: stacked tensors, zeros and present.X = 0 where a
    sample lacks X (a mask that is absent means everywhere: ones)."""
    names = sorted({name for sample in per_sample for name in sample})
    batch = {}
    for name in names:
        like = next(sample[name] for sample in per_sample if name in sample)
        fill = torch.ones_like(like) if name in MASKS else torch.zeros_like(like)
        batch[name] = torch.stack([sample.get(name, fill) for sample in per_sample]).float()
        if name not in MASKS:
            batch[f"present.{name}"] = torch.tensor([float(name in sample) for sample in per_sample])
    return {k: v.to(device) for k, v in batch.items()} if device is not None else batch


# -- long videos: overlapping windows --------------------------------------------------------------


def windows(latent_frames: int, window: int, overlap: int) -> list[tuple[int, int]]:
    """[start, stop) latent-frame windows covering the video, neighbours sharing `overlap` frames
    (the last one is moved back to end at the video's end)."""
    if latent_frames <= window:
        return [(0, latent_frames)]
    stride = max(window - overlap, 1)
    starts = list(range(0, latent_frames - window, stride)) + [latent_frames - window]
    return [(s, s + window) for s in starts]


def blend_weights(spans: list[tuple[int, int]]) -> list[torch.Tensor]:
    """Each window's weight per latent frame: 1 inside, rising linearly across the frames it
    shares with its neighbours, so the blend moves smoothly from one window to the next."""
    weights = []
    for i, (start, stop) in enumerate(spans):
        w = torch.ones(stop - start)
        if i > 0:
            shared = spans[i - 1][1] - start
            w[:shared] = torch.arange(1, shared + 1) / (shared + 1)
        if i + 1 < len(spans):
            shared = stop - spans[i + 1][0]
            w[stop - start - shared:] = torch.minimum(w[stop - start - shared:], torch.arange(shared, 0, -1) / (shared + 1))
        weights.append(w)
    return weights


def window_inputs(inputs: dict, start: int, stop: int, per_latent: int = 4) -> dict:
    """The conditions of latent frames [start, stop): latents sliced as they are, per-frame
    features from the video frame that the window's first latent frame shows."""
    out = {}
    for name, value in inputs.items():
        if name in LATENT_ALIGNED and value.shape[2] > 1:
            value = value[:, :, start:stop]
        elif name in FRAME_ALIGNED:
            value = value[:, per_latent * start:per_latent * (stop - 1) + 1]
        out[name] = value
    return out


class WindowedDenoiser:
    """The transformer with avatar conditions, called window by window over a long latent video
    and the overlapping predictions blended; a drop-in for the transformer in the sampler.

    guidance {name: scale}: condition guidance, as audio-driven avatar models use it: one more
    pass without the condition, and v = v_all + (scale - 1) (v_all - v_without), per condition.
    """

    def __init__(self, transformer, inputs: dict, window: int, overlap: int, guidance: dict | None = None):
        self.transformer, self.inputs = transformer, inputs
        self.window, self.overlap = window, overlap
        self.guidance = {k: v for k, v in (guidance or {}).items() if v != 1.0 and f"present.{k}" in inputs}
        self.config, self.dtype = transformer.config, transformer.dtype

    def _velocity(self, inputs: dict, latents: torch.Tensor, kwargs: dict) -> torch.Tensor:
        with self.transformer.avatar.given(inputs):
            full = self.transformer(hidden_states=latents, return_dict=False, **kwargs)[0].float()
        guided = full
        for name, scale in self.guidance.items():
            without = {**inputs, f"present.{name}": torch.zeros_like(inputs[f"present.{name}"])}
            with self.transformer.avatar.given(without):
                other = self.transformer(hidden_states=latents, return_dict=False, **kwargs)[0].float()
            guided = guided + (scale - 1.0) * (full - other)
        return guided

    def __call__(self, hidden_states: torch.Tensor, return_dict: bool = False, **kwargs):
        batch, frames = hidden_states.shape[0], hidden_states.shape[2]
        repeat = batch // next(iter(self.inputs.values())).shape[0]  # classifier-free guidance doubles the batch
        inputs = {k: v.repeat(repeat, *[1] * (v.dim() - 1)) for k, v in self.inputs.items()}
        spans = windows(frames, self.window, self.overlap)
        total = torch.zeros(hidden_states.shape, dtype=torch.float32, device=hidden_states.device)
        weights = torch.zeros(frames, device=hidden_states.device)
        for (start, stop), weight in zip(spans, blend_weights(spans)):
            velocity = self._velocity(window_inputs(inputs, start, stop), hidden_states[:, :, start:stop], kwargs)
            weight = weight.to(total.device)
            total[:, :, start:stop] += velocity * weight.view(1, 1, -1, 1, 1)
            weights[start:stop] += weight
        return ((total / weights.view(1, 1, -1, 1, 1)).to(hidden_states.dtype),)


def conditions_context(model, inputs: dict | None):
    """`model.avatar.given(inputs)` for a model with conditioners, else nothing."""
    avatar = getattr(model, "avatar", None)
    return avatar.given(inputs) if avatar is not None and inputs else nullcontext()


# -- hvctl avatar --------------------------------------------------------------------------------


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
    from hvctl.generate import _settings_dict, absolute_lora_spec, output_paths, prepare_model, resolve, resolve_device_dtype
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
