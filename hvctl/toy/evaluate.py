"""`hvctl eval toy`: how well a model draws the toy world, measured from pixels.

A fixed prompt set (the eval split's canonical captions; a third are held-out colour-shape
pairs) is generated at the model's default settings unless told otherwise, and each video is
measured by `hvctl.toy.world.measure`. Strict accuracy counts videos whose colour, shape, motion
and background all match the prompt; per-attribute accuracies stand beside it, separately for
seen and held-out compositions. The VAE is scored apart, by its reconstruction PSNR on rendered
eval videos and the accuracy measured on them after the round trip (the ceiling for any DiT).
With `i2v`, an image-to-video model starts each video from the first frame of the prompt's
rendered eval video: frame 0's PSNR against that image is reported beside the accuracies
(colour and shape should be kept from the image, motion should follow the prompt).
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field, replace
from pathlib import Path

import numpy as np

from hvctl.errors import HvctlError
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
    vae_only: bool = False  # score the VAE's ceiling alone, generating nothing (a VAE being designed)
    manifest: Path | None = None  # prompts from a rendered toy manifest instead (e.g. the clips a model trained on)
    out: Path | None = None  # also write every video and the per-video measurements here
    device: str = "auto"
    rewrite: RewriteRecipe | None = None  # also: paraphrased prompts, as written and rewritten
    i2v: bool = False  # an image-to-video model, given each eval video's first frame
    avatar: tuple[str, ...] = ()  # avatar models: one evaluation per mode set ("audio,pose", "hybrid", ...)
    frames: int | None = None  # avatar: video length (longer than the model's window: blended windows)
    condition_guidance: dict = field(default_factory=dict)  # avatar: e.g. {"audio": 2.0}
    # < 1: denoise each prompt's own true video, noised to this level, instead of pure noise; the
    # accuracy against it says at which noise levels the model loses an attribute (SDEdit).
    start_sigma: float = 1.0

    def check(self) -> None:
        """One line naming the `hvctl eval toy` flag at fault, before any model loads."""
        from hvctl.data.formats import is_frame_count
        from hvctl.generate import GenerateRecipe
        from hvctl.recipe import SEED_RANGE, check_number
        from hvctl.toy.world import avatar_modes

        for name, value in (("prompts", self.prompts), ("batch-size", self.batch_size)):
            if value < 1:
                raise HvctlError(f"--{name} must be at least 1, got {value}")
        check_number("--seed", self.seed, SEED_RANGE)
        check_number("--audio-guidance", self.condition_guidance.get("audio", 1.0), ">= 1")
        check_number("--start-sigma", self.start_sigma, "(0, 1]")
        if self.start_sigma < 1 and (self.i2v or self.avatar or self.vae_only or self.rewrite):
            raise HvctlError("--start-sigma denoises the prompts' own videos: not with --i2v, --avatar, --vae-only or --rewrite")
        for name in ("guidance_scale", "embedded_guidance", "flow_shift"):
            check_number("--" + name.replace("_", "-"), getattr(self, name), GenerateRecipe.LIMITS[name])
        if sum(map(bool, (self.i2v, self.rewrite, self.avatar, self.vae_only))) > 1:
            raise HvctlError("--i2v, --rewrite, --avatar and --vae-only: choose one")
        if self.manifest is not None and (self.i2v or self.avatar):
            raise HvctlError("--manifest gives text-to-video prompts: not with --i2v or --avatar")
        if self.vae_only and self.vae_videos < 1:
            raise HvctlError("--vae-only needs --vae-videos of at least 1")
        for spec in self.avatar:
            avatar_modes(spec)
        if self.frames is not None and not is_frame_count(self.frames):
            raise HvctlError(f"--frames must be 4k+1 and at least 5, got {self.frames}")
        if self.vae_videos < 0 or any(n < 1 for n in self.steps):
            raise HvctlError("--vae-videos must be >= 0 and --steps >= 1")


def prompt_set(n: int, seed: int):
    """The toy samples whose captions are the prompts; their attributes are the right answers."""
    return [sample_spec(seed, i, "eval", "video") for i in range(n)]


def manifest_samples(path: Path, n: int) -> list:
    """The first n toy samples of a rendered manifest (its records' `toy` truth): how a model is
    scored on the very clips it trained on (the sanity bound of docs/toy-models.md)."""
    from hvctl.data.manifest import read_manifest

    samples = [toy_sample(record, path) for record in read_manifest(path)[:n]]
    if not samples:
        raise HvctlError(f"{path}: no samples")
    return samples


def toy_sample(record, path: Path):
    """The toy truth a rendered manifest's record carries (hvctl toy render writes it)."""
    from hvctl.toy.world import ToySample

    truth = record.extra.get("toy")
    if not isinstance(truth, dict):
        raise HvctlError(f"{path}: record {record.id} has no toy truth (render it with hvctl toy render)")
    return ToySample(**{**truth, "start": tuple(truth["start"])})


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


def vae_scores(vae, n: int, seed: int, height: int, width: int, frames: int) -> dict:
    """The first n eval prompts' true videos through the VAE's posterior mean and back: their
    reconstruction PSNR (dB), and the accuracy measured on them, the ceiling no DiT using this VAE
    can pass."""
    from hvctl.models.vae import decode_to_frames, encode_posterior

    samples, scores, measurements = prompt_set(n, seed), [], []
    for sample in samples:
        video = render(sample_spec(seed, sample.index, "eval", "video", size=(height, width), frames=frames))
        mean, _ = encode_posterior(vae, video)
        decoded = decode_to_frames(vae, mean[None])[0].numpy()
        scores.append(psnr(video, decoded))
        measurements.append(_measure(sample, sample.prompt(), decoded))
    return {"videos": n, "psnr": float(np.mean(scores)), "psnr_min": float(np.min(scores)),
            "accuracy": score(samples, measurements)}


def evaluate_toy(s: ToyEvalSettings, *, progress: bool | None = None) -> dict:
    from hvctl.generate import GenerateRecipe
    from hvctl.io import check_output_dir

    s.check()
    if s.out is not None:
        check_output_dir(s.out, "--out")

    if s.avatar:
        return evaluate_avatar(s, progress)
    samples = manifest_samples(s.manifest, s.prompts) if s.manifest else prompt_set(s.prompts, s.seed)
    size = {}
    if s.manifest:  # generated at the clips' own size and length, so that they are the answers
        size = {"height": samples[0].height, "width": samples[0].width, "frames": samples[0].frames}
        if any((x.height, x.width, x.frames) != tuple(size.values()) for x in samples):
            raise HvctlError(f"{s.manifest}: its clips differ in size or length; eval needs one")
    base = GenerateRecipe(prompt=samples[0].prompt() if samples else "-", model=s.model, seed=s.seed, device=s.device,
                          guidance_scale=s.guidance_scale, embedded_guidance=s.embedded_guidance,
                          flow_shift=s.flow_shift, **size)
    if s.i2v:
        return _with_first_frames(s, samples, base, progress)
    if s.vae_only:
        return _vae_ceiling_only(s, base)
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
    return _generate_and_score(s, samples, base, prompt_forms, result, progress)


def _vae_ceiling_only(s: ToyEvalSettings, base) -> dict:
    """The VAE's ceiling at the model's default size, without loading the DiT or text encoders."""
    from hvctl.generate import prepare
    from hvctl.models.loading import resolve_device_dtype
    from hvctl.models.loading import folder_fingerprint, load_components

    r, model_dir = prepare(base)
    device, dtype = resolve_device_dtype(r.device, r.dtype)
    vae = load_components(model_dir, dtype=dtype, device=device, parts=("vae",)).vae
    return {"model": {"path": str(model_dir), "fingerprint": folder_fingerprint(model_dir)}, "prompts": 0,
            "seed": s.seed, "runs": [], "vae": vae_scores(vae, s.vae_videos, s.seed, r.height, r.width, r.frames)}


def _with_first_frames(s: ToyEvalSettings, samples, base, progress) -> dict:
    """The i2v evaluation: the recipe names the first sample's image (an i2v model needs one);
    each batch passes its own samples' first frames."""
    import tempfile

    from hvctl.video import write_image

    with tempfile.TemporaryDirectory() as tmp:
        image = Path(tmp) / "first.png"
        write_image(image, render(samples[0])[0])
        result = {"model": None, "prompts": s.prompts, "seed": s.seed, "i2v": True, "runs": []}
        return _generate_and_score(s, samples, replace(base, image=image), [("canonical", [x.prompt() for x in samples])],
                                   result, progress)


def _generate_and_score(s: ToyEvalSettings, samples, base, prompt_forms, result, progress) -> dict:
    from hvctl.generate import TextToVideo, prepare
    from hvctl.models.loading import resolve_device_dtype
    from hvctl.io import write_json_atomic
    from hvctl.models.loading import folder_fingerprint
    from hvctl.progress import progress_bar
    from hvctl.video import write_video

    t2v = None
    for steps in s.steps or (None,):
        r, model_dir = prepare(replace(base, steps=steps))
        device, dtype = resolve_device_dtype(r.device, r.dtype)
        if t2v is None:
            t2v = TextToVideo(model_dir, r, device, dtype)
            t2v.sampler.start_sigma = s.start_sigma
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
                    images = [true_video(s, x, r)[0] for x in batch] if s.i2v else None
                    x0 = true_latents(t2v, [true_video(s, x, r) for x in batch]) if s.start_sigma < 1 else None
                    videos = t2v.frames(t2v.latents(seeds, t2v.conditions(texts[first:first + s.batch_size], images), x0=x0))
                    for j, (sample, video) in enumerate(zip(batch, videos)):
                        measurements.append(_measure(sample, texts[first + j], video))
                        if s.i2v:
                            measurements[-1]["frame0_psnr"] = psnr(images[j], np.asarray(video[0]))
                        if s.out is not None:
                            write_video(folder / f"{first + j:04d}.mp4", video, fps=r.fps)
                    advance(len(batch))
            run = {"steps": r.steps, "prompts": form, "start_sigma": s.start_sigma, "flow_shift": r.flow_shift, "guidance_scale": r.guidance_scale,
                   "embedded_guidance": r.embedded_guidance, "height": r.height, "width": r.width, "frames": r.frames,
                   "seconds": round(time.perf_counter() - started, 2), "accuracy": score(samples, measurements)}
            if s.i2v:
                frame0 = [m["frame0_psnr"] for m in measurements]
                run["frame0_psnr"], run["frame0_psnr_min"] = float(np.mean(frame0)), float(np.min(frame0))
            result["runs"].append(run)
            if s.out is not None:
                write_json_atomic(folder / "measurements.json", measurements)
    if s.vae_videos:
        result["vae"] = vae_scores(t2v.parts.vae, s.vae_videos, s.seed, r.height, r.width, r.frames)
    return result


def true_video(s: ToyEvalSettings, sample, r) -> np.ndarray:
    """The video a prompt describes, at the generated size: a manifest's clip as it was rendered
    (already that size), an eval sample drawn again at it (same object and motion)."""
    if s.manifest:
        return render(sample)
    return render(sample_spec(s.seed, sample.index, "eval", "video", size=(r.height, r.width), frames=r.frames))


def true_latents(t2v, videos):
    """The videos' posterior means, as the DiT sees them (B, C, T', H', W')."""
    import torch

    from hvctl.models.vae import encode_posterior

    return torch.stack([encode_posterior(t2v.parts.vae, video)[0] for video in videos])


def _measure(sample, prompt, video) -> dict:
    from hvctl.toy.world import measure

    m = measure(video)
    return {"prompt": prompt, "group": group_of(sample), **{a: m[a] for a in ATTRIBUTES},
            "expected": {a: getattr(sample, a) for a in ATTRIBUTES}}


AVATAR_FIGURES = ("size_correlation", "pose_error_px", "rotation_error_deg")
KEPT = ("color_kept", "shape_kept", "background_kept")


def evaluate_avatar(s: ToyEvalSettings, progress) -> dict:
    """Avatar models: eval samples' reference, audio, pose and expression drive each video, and
    the video is scored against the sample's truth (hvctl.toy.world.score_avatar): the audio
    envelope's correlation with the object's size, the pose-tracking error, the rotation error,
    and whether the reference's colour, shape and background are kept. The prompt is empty: the
    reference alone says what to draw. Beside each figure stands its VAE ceiling: the score of the
    true video passed through the model's VAE and back, which no DiT can beat."""
    import torch

    from hvctl.avatar import AvatarGenerator, AvatarRecipe, batch_inputs, read_avatar_config, windows
    from hvctl.generate import resolve
    from hvctl.models.loading import prepare_model, resolve_device_dtype
    from hvctl.io import write_json_atomic
    from hvctl.models.default import default_avatar_model_dir
    from hvctl.models.loading import folder_fingerprint
    from hvctl.models.vae import encode_posterior
    from hvctl.progress import progress_bar
    from hvctl.toy.world import avatar_modes, avatar_spec, score_avatar
    from hvctl.video import write_video

    model_dir, defaults = prepare_model(s.model or default_avatar_model_dir())
    frames = s.frames or (read_avatar_config(model_dir) or {}).get("window", {}).get("frames") or defaults["frames"]
    recipe = AvatarRecipe(model=model_dir, prompt="", frames=frames, seed=s.seed, steps=s.steps[0] if s.steps else None,
                          guidance_scale=s.guidance_scale, flow_shift=s.flow_shift, device=s.device,
                          condition_guidance=dict(s.condition_guidance))
    r = resolve(recipe, {**defaults, "guidance_scale": 1.0}, prompt_required=False)
    device, dtype = resolve_device_dtype(r.device, r.dtype)
    generator = AvatarGenerator(model_dir, r, device, dtype)
    encode, vae = generator.encode, generator.t2v.parts.vae
    result = {"model": {"path": str(model_dir), "fingerprint": folder_fingerprint(model_dir)}, "prompts": s.prompts,
              "seed": s.seed, "avatar": True, "runs": []}
    for spec in s.avatar:
        modes = avatar_modes(spec)
        samples = [avatar_spec(s.seed, i, "eval", modes, size=(r.height, r.width), frames=frames) for i in range(s.prompts)]
        generator.check(["reference", *{m for x in samples for m in x.modes}])
        started, scores = time.perf_counter(), []
        with progress_bar(len(samples), f"eval avatar {spec}", enabled=progress) as advance:
            for first in range(0, len(samples), s.batch_size):
                batch = samples[first:first + s.batch_size]
                per_sample = []
                for x in batch:
                    inputs = {"reference": encode.reference(x.reference(), r.height, r.width)}
                    if "audio" in x.modes:
                        inputs["audio"] = encode.audio(x.audio(), r.fps, frames)
                    if "pose" in x.modes:
                        inputs["pose"] = encode.pose(x.pose_video(), r.height, r.width, frames)
                    if "expression" in x.modes:
                        inputs["expression"] = encode.expression(x.expression(), frames)
                    per_sample.append(inputs)
                seeds = [s.seed + first + j for j in range(len(batch))]
                videos = generator.t2v.frames(generator.latents(seeds, batch_inputs(per_sample, device), [""] * len(batch)))
                # What a perfect DiT would score: the true video through the VAE and back.
                truths = generator.t2v.frames(torch.stack([encode_posterior(vae, x.render())[0] for x in batch]).to(device))
                for j, (x, video, truth) in enumerate(zip(batch, videos, truths)):
                    scores.append({"index": x.index, "modes": list(x.modes), "group": group_of(x), **score_avatar(x, video),
                                   "vae_ceiling": score_avatar(x, truth)})
                    if s.out is not None:
                        write_video(Path(s.out) / spec.replace(",", "+") / f"{first + j:04d}.mp4", video, fps=r.fps)
                advance(len(batch))
        run = {"modes": spec, "steps": r.steps, "frames": frames, "flow_shift": r.flow_shift,
               "condition_guidance": r.condition_guidance,
               "guidance_scale": r.guidance_scale, "windows": len(windows(generator.t2v.latent_shape[1], generator.window, generator.overlap)),
               "seconds": round(time.perf_counter() - started, 2), "scores": avatar_table(scores),
               "vae_ceiling": avatar_table([{**x["vae_ceiling"], "group": x["group"]} for x in scores])}
        result["runs"].append(run)
        if s.out is not None:
            write_json_atomic(Path(s.out) / spec.replace(",", "+") / "scores.json", scores)
    return result


def avatar_table(scores: list[dict]) -> dict:
    """Means of each figure over the videos it applies to, and the kept shares, per group and all."""
    table = {}
    for group in ("all", *GROUPS):
        rows = [x for x in scores if group in ("all", x["group"])]
        if not rows:
            continue
        entry = {"n": len(rows), **{k: float(np.mean([x[k] for x in rows])) for k in KEPT}}
        for figure in AVATAR_FIGURES:
            values = [x[figure] for x in rows if x.get(figure) is not None]
            entry[figure] = float(np.mean(values)) if values else None
            entry[f"{figure}_n"] = len(values)
        table[group] = entry
    return table


def print_report(result: dict) -> None:
    """evaluate_toy's result as tables on the terminal: accuracy per step count and group (the
    VAE's ceiling last), frame 0's PSNR for i2v, the VAE's reconstruction; or the avatar figures."""
    from rich.console import Console
    from rich.table import Table

    console = Console()
    if result.get("avatar"):
        console.print(_avatar_report_table(result))
        return
    table = Table(title=f"toy eval: {result['model']['path']}")
    for column in ("steps", "prompts", "compositions", "videos", "strict", *ATTRIBUTES):
        table.add_column(column, justify="right")
    rows = [(str(run["steps"]) + (f" from sigma {run['start_sigma']:g}" if run.get("start_sigma", 1) < 1 else ""),
             run["prompts"], run["accuracy"]) for run in result["runs"]]
    if "vae" in result:  # the true videos through the VAE: the ceiling
        rows.append(("-", "VAE ceiling", result["vae"]["accuracy"]))
    for steps, prompts, accuracy in rows:
        for group, acc in accuracy.items():
            table.add_row(steps, prompts, group.replace("_", "-"), str(acc["n"]),
                          *(f"{100 * acc[k]:.1f}%" for k in ("strict", *ATTRIBUTES)))
    console.print(table)
    for run in result["runs"]:
        if "frame0_psnr" in run:
            console.print(f"{run['steps']} steps: frame 0 against the condition image: {run['frame0_psnr']:.2f} dB mean PSNR "
                          f"(min {run['frame0_psnr_min']:.2f})")
    if "vae" in result:
        v = result["vae"]
        console.print(f"VAE reconstruction: {v['psnr']:.2f} dB mean PSNR (min {v['psnr_min']:.2f}) over {v['videos']} eval videos")


def _avatar_report_table(result: dict):
    from rich.table import Table

    table = Table(title=f"toy avatar eval: {result['model']['path']}")
    # size r: correlation of the audio envelope with the object's size; pose and rotation: mean errors
    for column in ("modes", "frames", "group", "n", "size r", "pose px", "rot deg", "colour", "shape", "bg"):
        table.add_column(column, justify="right")
    number = lambda v, unit="": "-" if v is None else f"{v:.2f}{unit}"  # noqa: E731
    for run in result["runs"]:
        modes = run["modes"].replace(",", "+").replace("expression", "expr")
        for label, rows in (("", run["scores"]), (" (VAE ceiling)", run["vae_ceiling"])):
            for group, row in rows.items():
                table.add_row(modes + label, str(run["frames"]), group.replace("_", "-"), str(row["n"]),
                              number(row["size_correlation"]), number(row["pose_error_px"]), number(row["rotation_error_deg"]),
                              *(f"{100 * row[k]:.1f}%" for k in ("color_kept", "shape_kept", "background_kept")))
    return table
