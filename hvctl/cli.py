"""The `hvctl` command. Each subcommand parses, loads its recipe and calls its stage; nothing more.

torch, diffusers and transformers are imported inside the commands, so `hvctl --help` and
argument errors answer at once.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Optional

import typer

from hvctl import __version__
from hvctl.data.formats import is_frame_count
from hvctl.errors import HvctlError

app = typer.Typer(
    help="Curate data for, train, distill and serve HunyuanVideo-style text-to-video models.",
    no_args_is_help=True, pretty_exceptions_enable=False, add_completion=False,
)
model_app = typer.Typer(help="Create and inspect model folders.", no_args_is_help=True)
recipe_app = typer.Typer(help="Inspect recipes.", no_args_is_help=True)
toy_app = typer.Typer(help="The toy world: a synthetic dataset whose truth is known.", no_args_is_help=True)
eval_app = typer.Typer(help="Measure models.", no_args_is_help=True)
lora_app = typer.Typer(help="LoRA files: convert between the diffusers, musubi-tuner/kohya and ComfyUI formats.", no_args_is_help=True)
plugins_app = typer.Typer(help="The plugin registry: captioners, rewriters, filters, conditioners, audio encoders, scorers.", no_args_is_help=True)
app.add_typer(model_app, name="model")
app.add_typer(recipe_app, name="recipe")
app.add_typer(toy_app, name="toy")
app.add_typer(eval_app, name="eval")
app.add_typer(plugins_app, name="plugins")
app.add_typer(lora_app, name="lora")

JSON_OPTION = typer.Option(False, "--json", help="Print the result as JSON on stdout.")
SET_OPTION = typer.Option(None, "--set", metavar="KEY=VALUE", help="Override a recipe key (repeatable).")
# Shared by generate, i2v and avatar (hvctl/accelerate.py: speed and memory).
LORA_OPTION = typer.Option(None, "--lora", metavar="FILE[:SCALE]", help="Apply a LoRA (repeatable; diffusers, musubi/kohya, ComfyUI or official I2V format).")
ATTENTION_OPTION = typer.Option(None, help="Attention kernel: auto (fastest installed), sdpa, flash, flash3, sage or native (torch's math reference).")
OFFLOAD_OPTION = typer.Option(None, help="none, model (each component on the GPU only while used), group (the DiT's blocks streamed), sequential (per module; least memory) or auto (the least that fits).")
WEIGHTS_DTYPE_OPTION = typer.Option(None, "--weights-dtype", help="Store the DiT's weights in this dtype, e.g. float8_e4m3fn (half of bf16); computed in --dtype.")
COMPILE_OPTION = typer.Option(None, "--compile/--no-compile", help="Regional torch.compile of the DiT's blocks (compile time reported apart).")
STEP_CACHE_OPTION = typer.Option(None, "--step-cache", metavar="none|teacache:T|fbc:T", help="Skip DiT passes whose first block barely changed (T=0: never).")


def emit(result: dict, as_json: bool, human: str) -> None:
    """The one way a command reports its result: JSON for pipelines, a short text for people."""
    if as_json:
        print(json.dumps(result, indent=2, default=str))
    else:
        typer.echo(human)


def _run_stage(schema, stage, recipe, overrides, flags: dict, as_json: bool, *, base=None, problems: bool = False):
    """What a stage command does after parsing: load its recipe (flags over the file over the
    defaults) and run the stage, with a progress bar only on a terminal and, with problems=True,
    each skipped sample's problem on stderr as it happens. Returns (the recipe, the result)."""
    from hvctl.recipe import load_recipe

    config = load_recipe(schema, recipe, overrides or (), values=flags, base=base)
    hooks = {"on_problem": lambda m: typer.echo(m, err=True)} if problems else {}
    return config, stage(config, progress=None if not as_json else False, **hooks)


def _exit_if_failed(result: dict, config) -> None:
    """--on-error fail: the samples done are kept, the exit status says the run failed."""
    if result["failed"] and config.on_error == "fail":
        raise typer.Exit(1)


def _version(value: bool) -> None:
    if value:
        typer.echo(f"hvctl {__version__}")
        raise typer.Exit()


@app.callback()
def _root(version: bool = typer.Option(False, "--version", callback=_version, is_eager=True, help="Print the version.")):
    pass


# generate's, which i2v shares.
PROMPT_ARGUMENT = typer.Argument(None, help="What the video shows.")
MODEL_OPTION = typer.Option(None, "--model", "-m", help="Model folder (diffusers format). Default: the embedded model.")
HEIGHT_OPTION = typer.Option(None, help="Height in px, a multiple of 16.")
WIDTH_OPTION = typer.Option(None, help="Width in px, a multiple of 16.")
FRAMES_OPTION = typer.Option(None, help="Number of frames, 4k+1.")
STEPS_OPTION = typer.Option(None, help="Sampling steps.")
SEED_OPTION = typer.Option(None, help="Seed of the first video; video i uses seed+i. Default: random.")
GUIDANCE_SCALE_OPTION = typer.Option(None, "--guidance-scale", help="True classifier-free guidance (>1: two passes per step).")
EMBEDDED_GUIDANCE_OPTION = typer.Option(None, "--embedded-guidance", help="Guidance scale of a guidance-distilled model.")
FLOW_SHIFT_OPTION = typer.Option(None, "--flow-shift", help="Flow-matching schedule shift.")
NEGATIVE_PROMPT_OPTION = typer.Option(None, "--negative-prompt", help="Negative prompt, used when --guidance-scale > 1.")
NUM_VIDEOS_OPTION = typer.Option(None, "--num-videos", "-n", help="Videos to make.")
FPS_OPTION = typer.Option(None, help="Frames per second of the mp4.")
OUTPUT_OPTION = typer.Option(None, "--output", "-o", help="Output .mp4 (with several videos: NAME_i.mp4).")
DTYPE_OPTION = typer.Option(None, help="auto, float32, bfloat16 or float16.")
DEVICE_OPTION = typer.Option(None, help="auto, cpu, cuda, cuda:1, ...")
VAE_TILING_OPTION = typer.Option(None, "--vae-tiling/--no-vae-tiling", help="Decode in spatial tiles. Default: when a frame exceeds the tile.")
TEXT_LEN_OPTION = typer.Option(None, "--text-len", help="Maximum prompt length in LLM tokens.")
ULYSSES_DEGREE_OPTION = typer.Option(None, "--ulysses-degree", help="Sequence parallelism: Ulysses processes.")
RING_DEGREE_OPTION = typer.Option(None, "--ring-degree", help="Sequence parallelism: ring-attention processes.")
CFG_PARALLEL_OPTION = typer.Option(None, "--cfg-parallel/--no-cfg-parallel", help="True CFG's two passes on two processes (x the sequence-parallel ones).")
REPLAY_OPTION = typer.Option(None, "--replay", metavar="VIDEO.json", help="Make a video again from its sidecar (its settings, seed and prompt); flags override them.")
GPU_MEMORY_OPTION = typer.Option(None, "--gpu-memory", metavar="GIB", help="GPU memory to plan for (--plan, --offload auto). Default: the GPU's.")
PLAN_OPTION = typer.Option(False, "--plan", help="Print the estimated peak GPU memory per offload setting and time per step; sample nothing.")
GENERATE_RECIPE_OPTION = typer.Option(None, "--recipe", "-r", help="A YAML generate recipe; flags override it.")


@app.command()
def generate(
    prompt: Optional[str] = PROMPT_ARGUMENT,
    model: Optional[Path] = MODEL_OPTION,
    height: Optional[int] = HEIGHT_OPTION,
    width: Optional[int] = WIDTH_OPTION,
    frames: Optional[int] = FRAMES_OPTION,
    steps: Optional[int] = STEPS_OPTION,
    seed: Optional[int] = SEED_OPTION,
    guidance_scale: Optional[float] = GUIDANCE_SCALE_OPTION,
    embedded_guidance: Optional[float] = EMBEDDED_GUIDANCE_OPTION,
    flow_shift: Optional[float] = FLOW_SHIFT_OPTION,
    negative_prompt: Optional[str] = NEGATIVE_PROMPT_OPTION,
    num_videos: Optional[int] = NUM_VIDEOS_OPTION,
    fps: Optional[int] = FPS_OPTION,
    output: Optional[Path] = OUTPUT_OPTION,
    dtype: Optional[str] = DTYPE_OPTION,
    device: Optional[str] = DEVICE_OPTION,
    vae_tiling: Optional[bool] = VAE_TILING_OPTION,
    text_len: Optional[int] = TEXT_LEN_OPTION,
    ulysses_degree: Optional[int] = ULYSSES_DEGREE_OPTION,
    ring_degree: Optional[int] = RING_DEGREE_OPTION,
    cfg_parallel: Optional[bool] = CFG_PARALLEL_OPTION,
    lora: Optional[list[str]] = LORA_OPTION,
    replay: Optional[Path] = REPLAY_OPTION,
    attention: Optional[str] = ATTENTION_OPTION,
    offload: Optional[str] = OFFLOAD_OPTION,
    weights_dtype: Optional[str] = WEIGHTS_DTYPE_OPTION,
    compile: Optional[bool] = COMPILE_OPTION,
    step_cache: Optional[str] = STEP_CACHE_OPTION,
    gpu_memory: Optional[float] = GPU_MEMORY_OPTION,
    plan: bool = PLAN_OPTION,
    recipe: Optional[Path] = GENERATE_RECIPE_OPTION,
    overrides: Optional[list[str]] = SET_OPTION,
    as_json: bool = JSON_OPTION,
):
    """Generate videos from a text prompt; writes an mp4 and a JSON sidecar per video."""
    _run_generate(locals())


def _run_generate(options: dict) -> None:
    """generate and i2v: the flags over the recipe, then one process or torchrun."""
    from hvctl.generate import GenerateRecipe, generate as run_generate, replay_layer
    from hvctl.recipe import load_recipe

    flags = {k: v for k, v in options.items() if k not in ("recipe", "overrides", "as_json", "replay", "plan")}
    flags["lora"] = flags.get("lora") or None
    base = replay_layer(options["replay"], "generate") if options.get("replay") else None
    config = load_recipe(GenerateRecipe, options["recipe"], options["overrides"] or (), values=flags, base=base)
    if options.get("plan"):
        from hvctl.generate import plan

        result = plan(config)
        emit(result, options["as_json"], _plan_text(result))
        return
    from hvctl.generate import prepare
    from hvctl.parallel import relaunch

    processes = config.ulysses_degree * config.ring_degree * (2 if config.cfg_parallel else 1)
    if relaunch(processes, check=lambda: prepare(config)):  # each process runs this same command; rank 0 writes
        return
    as_json = options["as_json"]
    result = run_generate(config, progress=None if not as_json else False, on_warning=lambda m: typer.echo(f"warning: {m}", err=True))
    if result is None:  # not rank 0
        return
    loras = [f"LoRA {x['path']}: {x['format']} format, {x['modules']} modules" for x in result.get("loras", [])]
    emit(result, as_json, "\n".join(loras + [f"wrote {v['path']} (seed {v['seed']})" for v in result["videos"]]))


def _plan_text(result: dict) -> str:
    lines = [f"plan on {result['device']}: {result['seconds_per_step']} s per step "
             f"({result['step_tflop']} TFLOP at {result['matmul_tflop_per_s']} TFLOP/s measured on matmuls)",
             "weights GiB: " + ", ".join(f"{k} {v}" for k, v in result["weights_gib"].items()),
             "estimated peak GiB by --offload: " + ", ".join(f"{k} {v}" for k, v in result["peak_gib"].items())]
    if "fits" in result:
        lines.append(f"fits {result['gpu_memory_gib']} GiB: " + (", ".join(result["fits"]) or "none of them"))
    return "\n".join(lines)


@app.command("i2v")
def i2v(
    image: Optional[Path] = typer.Argument(None, metavar="IMAGE", help="The first frame (PNG, JPEG, ...): resized to cover the video, centre-cropped."),
    prompt: Optional[str] = PROMPT_ARGUMENT,
    model: Optional[Path] = MODEL_OPTION,
    height: Optional[int] = HEIGHT_OPTION,
    width: Optional[int] = WIDTH_OPTION,
    frames: Optional[int] = FRAMES_OPTION,
    steps: Optional[int] = STEPS_OPTION,
    seed: Optional[int] = SEED_OPTION,
    guidance_scale: Optional[float] = GUIDANCE_SCALE_OPTION,
    embedded_guidance: Optional[float] = EMBEDDED_GUIDANCE_OPTION,
    flow_shift: Optional[float] = FLOW_SHIFT_OPTION,
    negative_prompt: Optional[str] = NEGATIVE_PROMPT_OPTION,
    num_videos: Optional[int] = NUM_VIDEOS_OPTION,
    fps: Optional[int] = FPS_OPTION,
    output: Optional[Path] = OUTPUT_OPTION,
    dtype: Optional[str] = DTYPE_OPTION,
    device: Optional[str] = DEVICE_OPTION,
    vae_tiling: Optional[bool] = VAE_TILING_OPTION,
    text_len: Optional[int] = TEXT_LEN_OPTION,
    ulysses_degree: Optional[int] = ULYSSES_DEGREE_OPTION,
    ring_degree: Optional[int] = RING_DEGREE_OPTION,
    cfg_parallel: Optional[bool] = CFG_PARALLEL_OPTION,
    lora: Optional[list[str]] = LORA_OPTION,
    replay: Optional[Path] = REPLAY_OPTION,
    attention: Optional[str] = ATTENTION_OPTION,
    offload: Optional[str] = OFFLOAD_OPTION,
    weights_dtype: Optional[str] = WEIGHTS_DTYPE_OPTION,
    compile: Optional[bool] = COMPILE_OPTION,
    step_cache: Optional[str] = STEP_CACHE_OPTION,
    gpu_memory: Optional[float] = GPU_MEMORY_OPTION,
    plan: bool = PLAN_OPTION,
    i2v_stability: Optional[bool] = typer.Option(None, "--stability/--no-stability",
                                                 help="Start from 0.999 noise + 0.001 image latent (default: on; flow shift 7, else 17)."),
    recipe: Optional[Path] = GENERATE_RECIPE_OPTION,
    overrides: Optional[list[str]] = SET_OPTION,
    as_json: bool = JSON_OPTION,
):
    """Generate videos from an image (the first frame) and a prompt, with an image-to-video model."""
    if image is None and not replay:
        raise HvctlError("i2v needs IMAGE (or --replay VIDEO.json)")
    _run_generate(locals())


@app.command("avatar")
def avatar_command(
    reference: Optional[Path] = typer.Argument(None, metavar="REF_IMAGE", help="The reference image to animate."),
    audio: Optional[Path] = typer.Option(None, "--audio", help="Speech or sound (wav, mp3, ...): drives the video and sets its length; muxed into the mp4."),
    pose: Optional[Path] = typer.Option(None, "--pose", help="A pose video (e.g. keypoints drawn on black)."),
    expression: Optional[Path] = typer.Option(None, "--expression", help="Per-frame expression features: .npy, .json or .safetensors (frames, features)."),
    audio_mask: Optional[Path] = typer.Option(None, "--audio-mask", help="An image, white where the audio may act (a face mask). Default: everywhere."),
    prompt: Optional[str] = typer.Option(None, "--prompt", "-p", help="Text besides the conditions. Default: none."),
    model: Optional[Path] = typer.Option(None, "--model", "-m", help="An avatar model folder (with avatar/). Default: the embedded toy avatar model."),
    frames: Optional[int] = typer.Option(None, help="Frames, 4k+1. Default: as long as the audio, else the pose video, else the expression features."),
    height: Optional[int] = typer.Option(None, help="Height in px, a multiple of 16."),
    width: Optional[int] = typer.Option(None, help="Width in px, a multiple of 16."),
    steps: Optional[int] = typer.Option(None, help="Sampling steps."),
    seed: Optional[int] = typer.Option(None, help="Noise seed. Default: random."),
    guidance_scale: Optional[float] = typer.Option(None, "--guidance-scale", help="True classifier-free guidance on the text (default 1: off)."),
    flow_shift: Optional[float] = typer.Option(None, "--flow-shift", help="Flow-matching schedule shift."),
    window_overlap: Optional[int] = typer.Option(None, "--window-overlap", help="Latent frames shared by neighbouring windows of a long video."),
    audio_guidance: Optional[float] = typer.Option(None, "--audio-guidance", help="Audio guidance scale (>1: one more pass without the audio, a stronger effect)."),
    fps: Optional[int] = typer.Option(None, help="Frames per second."),
    output: Optional[Path] = typer.Option(None, "--output", "-o", help="Output .mp4."),
    dtype: Optional[str] = typer.Option(None, help="auto, float32, bfloat16 or float16."),
    device: Optional[str] = typer.Option(None, help="auto, cpu, cuda, ..."),
    lora: Optional[list[str]] = LORA_OPTION,
    replay: Optional[Path] = typer.Option(None, "--replay", metavar="VIDEO.json", help="Make a video again from its sidecar; flags override its settings."),
    attention: Optional[str] = ATTENTION_OPTION,
    offload: Optional[str] = OFFLOAD_OPTION,
    weights_dtype: Optional[str] = WEIGHTS_DTYPE_OPTION,
    compile: Optional[bool] = COMPILE_OPTION,
    step_cache: Optional[str] = STEP_CACHE_OPTION,
    recipe: Optional[Path] = typer.Option(None, "--recipe", "-r", help="A YAML avatar recipe; flags override it."),
    overrides: Optional[list[str]] = SET_OPTION,
    as_json: bool = JSON_OPTION,
):
    """Animate a reference image by audio, pose and expression (any of them at once); long videos in blended windows."""
    flags = {k: v for k, v in locals().items() if k not in ("recipe", "overrides", "as_json", "audio_guidance", "replay")}
    flags["lora"] = flags.get("lora") or None
    if audio_guidance is not None:
        flags["condition_guidance.audio"] = audio_guidance
    from hvctl.avatar import AvatarRecipe, avatar as run_avatar
    from hvctl.generate import replay_layer

    base = replay_layer(replay, "avatar") if replay else None
    _, result = _run_stage(AvatarRecipe, run_avatar, recipe, overrides, flags, as_json, base=base)
    emit(result, as_json, "\n".join(f"wrote {v['path']} (seed {v['seed']})" for v in result["videos"]))


@app.command()
def encode(
    manifest: Optional[Path] = typer.Argument(None, help="Dataset manifest (JSONL)."),
    out: Optional[Path] = typer.Option(None, "--out", "-o", help="Cache folder (created or completed)."),
    model: Optional[Path] = typer.Option(None, "--model", "-m", help="Model folder whose VAE and text encoders encode. Default: the embedded model."),
    shard: Optional[str] = typer.Option(None, help="i/n: encode only the i-th of n parts (for n processes or machines)."),
    on_error: Optional[str] = typer.Option(None, "--on-error", help="skip (report bad samples, go on) or fail (stop at the first)."),
    device: Optional[str] = typer.Option(None, help="auto, cpu, cuda, ..."),
    recipe: Optional[Path] = typer.Option(None, "--recipe", "-r", help="A YAML encode recipe (buckets, tiling, ...)."),
    overrides: Optional[list[str]] = SET_OPTION,
    as_json: bool = JSON_OPTION,
):
    """Encode a manifest's media (VAE posterior) and captions (text states) into a cache."""
    from hvctl.encode import EncodeRecipe, encode as run_encode

    flags = dict(manifest=manifest, out=out, model=model, shard=shard, on_error=on_error, device=device)
    config, result = _run_stage(EncodeRecipe, run_encode, recipe, overrides, flags, as_json, problems=True)
    emit(result, as_json, f"{result['cache']}: encoded {result['encoded']}, already cached {result['skipped_cached']}, "
                          f"failed {len(result['failed'])}; {result['entries']} entries in the cache")
    _exit_if_failed(result, config)


@app.command()
def curate(
    input_path: Optional[Path] = typer.Argument(None, metavar="INPUT", help="A folder of videos and images, a manifest (JSONL), or one file."),
    out: Optional[Path] = typer.Option(None, "--out", "-o", help="Manifest of the kept clips; the rejected list goes next to it."),
    clips_dir: Optional[Path] = typer.Option(None, "--clips-dir", help="Folder for the shot clips. Default: clips/ next to the manifest."),
    recipe: Optional[Path] = typer.Option(None, "--recipe", "-r", help="A YAML curate recipe (shot detection, filter thresholds, buckets)."),
    overrides: Optional[list[str]] = SET_OPTION,
    as_json: bool = JSON_OPTION,
):
    """Split videos into shots, score and filter the clips, drop near-duplicates; writes a manifest."""
    from hvctl.curate import CurateRecipe, curate as run_curate, summary_table

    _, result = _run_stage(CurateRecipe, run_curate, recipe, overrides, dict(input=input_path, out=out, clips_dir=clips_dir),
                           as_json, problems=True)
    if as_json:
        emit(result, True, "")
    else:
        from rich.console import Console

        Console().print(summary_table(result))


def _train_command(kind: str, recipe, out, steps, device, nproc, nnodes, rdzv_endpoint, rdzv_id, max_restarts,
                   overrides, as_json, mode=None) -> None:
    from hvctl.parallel import relaunch, under_torchrun
    from hvctl.recipe import load_recipe, schema_for_kind
    from hvctl.train import config as train_config

    config = load_recipe(schema_for_kind(kind), recipe, overrides or (),
                         values=dict(out=out, steps=steps, device=device, nproc=nproc, max_restarts=max_restarts,
                                     **({"mode": mode} if mode is not None else {})))
    if config.nproc < 1 or nnodes < 1:
        raise HvctlError(f"--nproc {config.nproc}, --nnodes {nnodes}: both must be at least 1")
    if not under_torchrun():  # the launcher checks once, before any rank starts
        train_config.check_paths(config)
    if relaunch(config.nproc, nnodes, rdzv_endpoint, rdzv_id, config.max_restarts):
        return
    from hvctl.train.trainer import train as run_train

    result = run_train(config, progress=None if not as_json else False)
    if result is not None:  # rank 0 reports
        emit(result, as_json, f"trained {result['steps']} steps on {result['processes']} process(es); model: {result['model']}")


def _training_command(kind: str, doc: str):
    """`hvctl train` and `hvctl distill`: one command line, two recipe schemas."""

    def command(
        recipe: Path = typer.Argument(..., help=f"A YAML recipe (kind: {kind})."),
        out: Optional[Path] = typer.Option(None, "--out", "-o", help="Run folder (checkpoints, metrics, the final model)."),
        steps: Optional[int] = typer.Option(None, help="Total optimizer steps."),
        device: Optional[str] = typer.Option(None, help="auto, cpu, cuda, ..."),
        nproc: Optional[int] = typer.Option(None, "--nproc", help="Processes per node (default: the recipe's, 1); > 1 runs torchrun."),
        nnodes: int = typer.Option(1, "--nnodes", help="Nodes; each runs this same command."),
        rdzv_endpoint: Optional[str] = typer.Option(None, "--rdzv-endpoint", help="HOST:PORT of node 0 (multi-node)."),
        rdzv_id: Optional[str] = typer.Option(None, "--rdzv-id", help="Run id shared by the nodes (multi-node)."),
        max_restarts: Optional[int] = typer.Option(None, "--max-restarts",
                                                   help="Restart failed processes this many times, from the last checkpoint."),
        overrides: Optional[list[str]] = SET_OPTION,
        as_json: bool = JSON_OPTION,
        mode: Optional[str] = typer.Option(None, "--mode", help="cfg: one pass per step (guidance embedded); steps: a "
                                           "few-step student (student_steps); the recipe's 'mode'."),
    ):
        _train_command(kind, recipe, out, steps, device, nproc, nnodes, rdzv_endpoint, rdzv_id, max_restarts,
                       overrides, as_json, mode if kind == "distill" else None)  # train's is the hidden option's default

    command.__doc__ = doc
    if kind != "distill":  # --mode is distill's alone
        import inspect

        signature = inspect.signature(command)
        command.__signature__ = signature.replace(parameters=[p for p in signature.parameters.values() if p.name != "mode"])
    return command


app.command("train")(_training_command(
    "train", "Train the DiT (flow matching) or the VAE; resumes exactly from the run folder's last checkpoint."))
app.command("distill")(_training_command(
    "distill", "Distil classifier-free guidance into a guidance-embedded student (one pass per step), "
    "or with --mode steps the teacher's sampling into a few-step student; trains like `train`."))


@app.command()
def caption(
    manifest: Optional[Path] = typer.Argument(None, help="Dataset manifest (JSONL)."),
    out: Optional[Path] = typer.Option(None, "--out", "-o", help="Write the captioned manifest here (same folder). Default: in place."),
    captioner: Optional[str] = typer.Option(None, "--captioner", "-c", help="A registered captioner (hvctl plugins list). Default: toy."),
    model: Optional[Path] = typer.Option(None, "--model", "-m", help="The captioner's model folder (vlm: a local transformers folder)."),
    overwrite: Optional[bool] = typer.Option(None, "--overwrite", help="Caption samples that already have a caption too."),
    on_error: Optional[str] = typer.Option(None, "--on-error", help="skip (record the failure, go on) or fail (stop at the first)."),
    recipe: Optional[Path] = typer.Option(None, "--recipe", "-r", help="A YAML caption recipe."),
    overrides: Optional[list[str]] = SET_OPTION,
    as_json: bool = JSON_OPTION,
):
    """Write the structured caption of every sample that lacks one; resumable."""
    from hvctl.caption import CaptionRecipe, caption as run_caption

    flags = dict(manifest=manifest, out=out, captioner=captioner, model=model, overwrite=overwrite, on_error=on_error)
    config, result = _run_stage(CaptionRecipe, run_caption, recipe, overrides, flags, as_json, problems=True)
    emit(result, as_json, f"{result['manifest']}: captioned {result['captioned']}, already captioned "
                          f"{result['already_captioned']}, failed {len(result['failed'])} ({result['captioner']})")
    _exit_if_failed(result, config)


@app.command()
def prefer(
    prompts: Optional[Path] = typer.Argument(None, help="Prompts: a text file (one a line) or a manifest (.jsonl)."),
    out: Optional[Path] = typer.Option(None, "--out", "-o", help="The preference folder (videos, prompts.jsonl, manifest.jsonl, cache)."),
    model: Optional[Path] = typer.Option(None, "--model", "-m", help="Model folder. Default: the embedded model."),
    videos: Optional[int] = typer.Option(None, "--videos", "-n", help="Videos per prompt; the best and the worst form the pair. Default: 4."),
    scorer: Optional[str] = typer.Option(None, "--scorer", "-s", help="A registered scorer (hvctl plugins list --kind scorer). Default: toy."),
    limit: Optional[int] = typer.Option(None, "--limit", help="The first N prompts only."),
    steps: Optional[int] = typer.Option(None, help="Sampling steps. Default: the model's."),
    seed: Optional[int] = typer.Option(None, help="Seed; video k of a prompt uses one derived from (seed, prompt, k)."),
    device: Optional[str] = typer.Option(None, help="auto, cpu, cuda, cuda:1, ..."),
    on_error: Optional[str] = typer.Option(None, "--on-error", help="skip (record the failure, go on) or fail (stop at the first)."),
    recipe: Optional[Path] = typer.Option(None, "--recipe", "-r", help="A YAML prefer recipe; flags override it."),
    overrides: Optional[list[str]] = SET_OPTION,
    as_json: bool = JSON_OPTION,
):
    """Preference pairs for DPO: N videos per prompt, scored; the best and the worst; resumable."""
    from hvctl.prefer import PreferRecipe, prefer as run_prefer

    flags = dict(prompts=prompts, out=out, model=model, videos=videos, scorer=scorer, limit=limit, steps=steps, seed=seed,
                 device=device, on_error=on_error)
    _, result = _run_stage(PreferRecipe, run_prefer, recipe, overrides, flags, as_json, problems=True)
    emit(result, as_json, f"{result['manifest']}: {result['pairs']} pairs of {result['prompts']} prompts "
                          f"({result['ties']} ties, {result['unscored']} not fully scored; {result['videos_made']} videos made)")


@app.command()
def rewrite(
    prompt: Optional[str] = typer.Argument(None, help="The prompt to rewrite."),
    file: Optional[Path] = typer.Option(None, "--file", "-f", help="Rewrite every line of this file instead."),
    mode: Optional[str] = typer.Option(None, "--mode", help="normal (keep every fact) or master (more aesthetic detail)."),
    rewriter: Optional[str] = typer.Option(None, "--rewriter", help="A registered rewriter (hvctl plugins list). Default: lexicon."),
    model: Optional[Path] = typer.Option(None, "--model", "-m", help="The rewriter's model folder (llm: a local causal LM)."),
    recipe: Optional[Path] = typer.Option(None, "--recipe", "-r", help="A YAML rewrite recipe."),
    overrides: Optional[list[str]] = SET_OPTION,
    as_json: bool = JSON_OPTION,
):
    """Rewrite prompts into the form the model was trained on; prints one per line."""
    from hvctl.recipe import load_recipe
    from hvctl.rewrite import Rewriter, RewriteRecipe

    if (prompt is None) == (file is None):
        raise HvctlError("give a PROMPT or --file FILE (one prompt per line), not both")
    if file is not None:
        try:
            prompts = [line.strip() for line in file.read_text(encoding="utf-8").splitlines() if line.strip()]
        except (OSError, UnicodeDecodeError) as e:
            raise HvctlError(f"{file}: cannot read prompts ({e})") from None
    else:
        prompts = [prompt]
    config = load_recipe(RewriteRecipe, recipe, overrides or (), values=dict(mode=mode, rewriter=rewriter, model=model))
    rewrite_one = Rewriter(config)
    results = [rewrite_one(p) for p in prompts]
    for result in results:
        if result["warning"]:
            typer.echo(f"warning: {result['original']!r}: {result['warning']}", err=True)
    emit({"rewriter": config.rewriter, "mode": config.mode, "prompts": results}, as_json,
         "\n".join(r["rewritten"] for r in results))


@lora_app.command("convert")
def lora_convert(
    source: Path = typer.Argument(..., help="A LoRA safetensors file: diffusers/PEFT, musubi/kohya, ComfyUI or official I2V format."),
    out: Path = typer.Argument(..., help="The converted file to write."),
    to: str = typer.Option(..., "--to", help="diffusers (hvctl, diffusers), musubi (musubi-tuner, kohya; alias: kohya) or comfyui."),
    model: Optional[Path] = typer.Option(None, "--model", "-m", help="The model folder the LoRA is for (its module names and "
                                         "shapes). Default: the embedded model."),
    as_json: bool = JSON_OPTION,
):
    """Convert a LoRA file between the formats of hvctl/diffusers, musubi-tuner and ComfyUI."""
    from hvctl.lora import convert_lora_file

    result = convert_lora_file(source, out, to, model, on_warning=lambda m: typer.echo(f"warning: {m}", err=True))
    emit(result, as_json, f"wrote {out} ({to} format, {result['tensors']} tensors; read as {result['source_format']})")


@plugins_app.command("list")
def plugins_list(
    kind: Optional[str] = typer.Option(None, "--kind", help="Only this kind: captioner, rewriter, filter, conditioner, audio_encoder, scorer."),
    as_json: bool = JSON_OPTION,
):
    """The registered plugins: hvctl's built-ins and those of installed packages."""
    from hvctl.plugins import available

    found = available(kind)
    if as_json:
        emit({"plugins": [{"kind": p.kind, "name": p.name, "source": p.source, "description": p.description}
                          for p in found]}, True, "")
        return
    from rich.console import Console
    from rich.table import Table

    table = Table(title="hvctl plugins")
    for column in ("kind", "name", "from", "what it does"):
        table.add_column(column)
    for p in found:
        table.add_row(p.kind, p.name, p.source, p.description)
    Console().print(table)


@toy_app.command("render")
def toy_render(
    out: Path = typer.Argument(..., help="Folder to write media/ and manifest.jsonl into."),
    videos: int = typer.Option(0, help="Number of videos."),
    images: int = typer.Option(0, help="Number of images."),
    seed: int = typer.Option(0, help="Dataset seed: the same seed gives the same files."),
    split: str = typer.Option("train", help="train (no held-out compositions) or eval (a third held out)."),
    size: Optional[list[str]] = typer.Option(None, help="HxW sizes to cycle through (default: the toy aspect buckets)."),
    avatar: Optional[str] = typer.Option(None, "--avatar", metavar="MODES",
                                         help="Avatar samples driven by a comma list of audio,pose,expression, or "
                                              "hybrid (a random non-empty subset each): --videos of them, with a "
                                              "reference image and the driving signals."),
    frames: Optional[int] = typer.Option(None, help="Frames per video, 4k+1 (default: avatar 17, others drawn from the "
                                               "duration buckets 9, 17, 33)."),
    loss_masks: bool = typer.Option(True, "--loss-masks/--no-loss-masks",
                                    help="Also write each sample's object mask (masks/, manifest field loss_mask) "
                                         "for a masked training loss (flow.unmasked_weight)."),
    as_json: bool = JSON_OPTION,
):
    """Render the toy world: videos (mp4), images (png) and a manifest."""
    from hvctl.progress import progress_bar
    from hvctl.toy.render import render_avatar_dataset, render_dataset

    sizes = None
    if size:
        try:
            sizes = [tuple(int(v) for v in s.lower().split("x")) for s in size]
        except ValueError:
            raise HvctlError(f"--size {size}: expected HxW, e.g. 64x96") from None
    if frames is not None and not is_frame_count(frames):
        raise HvctlError(f"--frames {frames}: a toy video has 4k+1 frames, k >= 1")
    if avatar is not None and (images or len(sizes or ()) > 1):
        raise HvctlError("--avatar renders videos only, at one size: give --videos and at most one --size")
    if avatar is not None:
        from hvctl.toy.world import avatar_modes

        modes = avatar_modes(avatar)
        with progress_bar(videos, "rendering", enabled=None if not as_json else False) as advance:
            manifest = render_avatar_dataset(out, videos, seed, split, modes, frames=17 if frames is None else frames,
                                             size=sizes[0] if sizes else (64, 64), loss_masks=loss_masks,
                                             on_progress=lambda done, total: advance())
        driven = modes if modes == "hybrid" else ",".join(modes) or "nothing"
        emit({"manifest": str(manifest), "videos": videos, "images": 0, "seed": seed, "split": split,
              "avatar": modes if modes == "hybrid" else list(modes)},
             as_json, f"wrote {manifest} ({videos} avatar videos, {driven} driven, split {split})")
        return
    with progress_bar(videos + images, "rendering", enabled=None if not as_json else False) as advance:
        manifest = render_dataset(out, videos, images, seed, split, sizes=sizes, frames=frames, loss_masks=loss_masks,
                                  on_progress=lambda done, total: advance())
    emit({"manifest": str(manifest), "videos": videos, "images": images, "seed": seed, "split": split}, as_json,
         f"wrote {manifest} ({videos} videos, {images} images, split {split})")


@eval_app.command("toy")
def eval_toy(
    model: Optional[Path] = typer.Option(None, "--model", "-m", help="Model folder. Default: the embedded model."),
    prompts: int = typer.Option(96, help="Prompts from the toy eval split; a third are held-out compositions."),
    seed: int = typer.Option(0, help="Seed of the prompt set and of the noise (video i: seed+i)."),
    steps: Optional[list[int]] = typer.Option(None, help="Sampling steps (repeat for several). Default: the model's."),
    guidance_scale: Optional[float] = typer.Option(None, "--guidance-scale", help="True classifier-free guidance."),
    embedded_guidance: Optional[float] = typer.Option(None, "--embedded-guidance", help="For guidance-distilled models."),
    flow_shift: Optional[float] = typer.Option(None, "--flow-shift", help="Default: the model's, or by step count."),
    batch_size: int = typer.Option(16, "--batch-size", help="Videos generated at once."),
    vae_videos: int = typer.Option(32, "--vae-videos", help="Eval videos for the VAE's ceiling: reconstruction PSNR and accuracy after the round trip (0: skip)."),
    manifest: Optional[Path] = typer.Option(None, "--manifest", help="Prompts from this rendered toy manifest (its first "
                                            "--prompts clips, e.g. the ones a model trained on) instead of the eval split."),
    vae_only: bool = typer.Option(False, "--vae-only", help="Score only the VAE's ceiling (--vae-videos of them); generate nothing."),
    out: Optional[Path] = typer.Option(None, "--out", help="Also write the videos and per-video measurements here."),
    rewrite: Optional[str] = typer.Option(None, "--rewrite", help="Instead of the canonical prompts: paraphrased ones, "
                                          "as written and rewritten by this rewriter (e.g. lexicon)."),
    rewrite_model: Optional[Path] = typer.Option(None, "--rewrite-model", help="The rewriter's model folder (llm)."),
    i2v: bool = typer.Option(False, "--i2v", help="An image-to-video model: start each video from its eval video's "
                             "first frame and report frame 0's PSNR against it."),
    avatar: Optional[list[str]] = typer.Option(None, "--avatar", metavar="MODES", help="An avatar model (default: the "
                                               "embedded one), driven by these modes: a comma list of audio, pose, "
                                               "expression, or hybrid (a random subset per video); repeat for several."),
    frames: Optional[int] = typer.Option(None, help="Avatar: frames per video (past the model's window: blended windows)."),
    audio_guidance: float = typer.Option(1.0, "--audio-guidance", help="Avatar: audio guidance scale (1: off)."),
    start_sigma: float = typer.Option(1.0, "--start-sigma", help="Below 1: denoise each prompt's own true video, noised "
                                      "to this level, instead of pure noise: where the model loses an attribute."),
    device: str = typer.Option("auto", help="auto, cpu, cuda, ..."),
    as_json: bool = JSON_OPTION,
):
    """Generate the toy prompt set and measure, from pixels, what the videos show."""
    from hvctl.rewrite import RewriteRecipe
    from hvctl.toy.evaluate import ToyEvalSettings, evaluate_toy, print_report

    settings = ToyEvalSettings(model=model, prompts=prompts, seed=seed, steps=tuple(steps or ()),
                               guidance_scale=guidance_scale, embedded_guidance=embedded_guidance,
                               flow_shift=flow_shift, batch_size=batch_size, vae_videos=vae_videos, vae_only=vae_only, manifest=manifest, out=out,
                               device=device, i2v=i2v, avatar=tuple(avatar or ()), frames=frames, start_sigma=start_sigma,
                               condition_guidance={"audio": audio_guidance} if audio_guidance != 1.0 else {},
                               rewrite=RewriteRecipe(rewriter=rewrite, model=rewrite_model) if rewrite else None)
    result = evaluate_toy(settings, progress=None if not as_json else False)
    if as_json:
        emit(result, True, "")
    else:
        print_report(result)


@eval_app.command("loss")
def eval_loss(
    cache: Path = typer.Argument(..., help="A latent cache (hvctl encode) of clips the model did not train on."),
    model: Optional[Path] = typer.Option(None, "--model", "-m", help="Model folder. Default: the embedded model."),
    samples: int = typer.Option(64, help="The cache's first N samples (in id order)."),
    sigma: Optional[list[float]] = typer.Option(None, "--sigma", help="Noise levels in (0, 1] (repeat). Default: 0.1 0.3 0.5 0.7 0.9."),
    seed: int = typer.Option(0, help="Seed of the noise (sample i has its own, whatever --samples is)."),
    embedded_guidance: float = typer.Option(1.0, "--embedded-guidance", help="For guidance-distilled models."),
    accept_foreign_cache: bool = typer.Option(False, "--accept-foreign-cache", help="Measure on a cache encoded by other "
                                              "encoders than the model's (only if they are the same weights)."),
    device: str = typer.Option("auto", help="auto, cpu, cuda, ..."),
    as_json: bool = JSON_OPTION,
):
    """The held-out denoising loss at fixed noise levels (the training loss, comparable across models)."""
    from hvctl.recipe import SEED_RANGE, check_number
    from hvctl.train.config import DEFAULT_LOSS_SIGMAS
    from hvctl.train.validation import check_sigmas, model_losses

    check_number("--samples", samples, ">= 1")
    check_number("--seed", seed, SEED_RANGE)
    check_number("--embedded-guidance", embedded_guidance, ">= 0")
    sigmas = check_sigmas(sigma or DEFAULT_LOSS_SIGMAS, "--sigma")
    result = model_losses(model, cache, samples=samples, sigmas=sigmas, seed=seed, device=device, guidance=embedded_guidance,
                          accept_foreign_cache=accept_foreign_cache, what="CACHE", override="pass --accept-foreign-cache")
    lines = [f"{result['samples']} samples of {result['cache']}, model {result['model']}",
             "sigma  loss" + ("      in the loss masks" if result["masked_loss"] else "")]
    for k, s in enumerate(result["sigmas"]):
        masked = f"  {result['masked_loss'][k]:.5f}" if result["masked_loss"] else ""
        lines.append(f"{s:<6g} {result['loss'][k]:.5f}{masked}")
    emit(result, as_json, "\n".join(lines))


@eval_app.command("words")
def eval_words(
    cache: Path = typer.Argument(..., help="A latent cache (hvctl encode) of rendered toy clips, with their loss masks."),
    manifest: Path = typer.Option(..., "--manifest", help="The toy manifest those clips were encoded from (its toy truth)."),
    model: Optional[Path] = typer.Option(None, "--model", "-m", help="Model folder. Default: the embedded model."),
    samples: int = typer.Option(24, help="The manifest's first N clips that are in the cache."),
    sigma: Optional[list[float]] = typer.Option(None, "--sigma", help="Noise levels in (0, 1] (repeat). Default: 0.9 0.6 0.3."),
    seed: int = typer.Option(0, help="Seed of the noise (sample i has its own)."),
    device: str = typer.Option("auto", help="auto, cpu, cuda, ..."),
    as_json: bool = JSON_OPTION,
):
    """How much each prompt word steers the prediction: the object's error with one word changed over
    the error with the clip's own prompt (1.0: the word is ignored)."""
    from hvctl.recipe import SEED_RANGE, check_number
    from hvctl.toy.word_probe import DEFAULT_PROBE_SIGMAS, probe_model

    check_number("--samples", samples, ">= 1")
    check_number("--seed", seed, SEED_RANGE)
    result = probe_model(model, cache, manifest, samples=samples, sigmas=sigma or DEFAULT_PROBE_SIGMAS, seed=seed,
                         device=device)
    lines = [f"{result['samples']} clips of {result['cache']}, model {result['model']}",
             "word        " + "  ".join(f"sigma {s:<5g}" for s in result["sigmas"])]
    for attribute, ratios in result["ratio"].items():
        lines.append(f"{attribute:<11} " + "  ".join(f"{r:<11.3f}" for r in ratios))
    emit(result, as_json, "\n".join(lines))


@model_app.command("init")
def model_init(
    out: Path = typer.Argument(..., help="New model folder to write."),
    preset: str = typer.Option(..., "--preset", "-p", help="tiny or hunyuan-t2v-720p."),
    meta: bool = typer.Option(False, "--meta", help="Write the configs only, no weights."),
    guidance_embeds: Optional[bool] = typer.Option(None, "--guidance-embeds/--no-guidance-embeds", help="Give the DiT a guidance embedding (default: the preset's)."),
    seed: int = typer.Option(0, help="Seed of the random initialisation."),
    dtype: str = typer.Option("float32", help="Weight dtype: float32, bfloat16 or float16."),
    overrides: Optional[list[str]] = typer.Option(None, "--set", metavar="COMPONENT.KEY=VALUE", help="Change a preset config key, e.g. vae.latent_channels=8 (repeatable)."),
    dit_init: str = typer.Option("diffusers", "--dit-init", help="How the DiT is initialised: diffusers (as diffusers builds it) or adaln-zero (every block the identity, the prediction zero: the DiT paper's, to train from)."),
    as_json: bool = JSON_OPTION,
):
    """Write a new randomly initialised model folder in diffusers format."""
    from hvctl.models.dit_init import DIT_INITS
    from hvctl.models.info import describe
    from hvctl.models.presets import get_preset, init_model
    from hvctl.recipe import SEED_RANGE, check_number, parse_overrides

    get_preset(preset)  # an unknown name fails before any import of torch
    check_number("--seed", seed, SEED_RANGE)
    if dtype not in ("float32", "bfloat16", "float16"):
        raise HvctlError(f"--dtype {dtype}: choose float32, bfloat16 or float16")
    if dit_init not in DIT_INITS:
        raise HvctlError(f"--dit-init {dit_init}: choose {' or '.join(DIT_INITS)}")
    path = init_model(preset, out, meta=meta, guidance_embeds=guidance_embeds, seed=seed, dtype=dtype,
                      overrides=parse_overrides(overrides or []), dit_init=dit_init)
    info = describe(path)
    emit(info, as_json, f"wrote {path} ({preset}, {info['parameters']:,} parameters{', configs only' if meta else ''})")


@model_app.command("compose")
def model_compose(
    base: Path = typer.Argument(..., help="Model folder to start from."),
    out: Path = typer.Argument(..., help="New model folder to write."),
    take: Optional[list[str]] = typer.Option(None, "--take", metavar="COMPONENT=DIR", help="Take a component from another folder, e.g. vae=runs/vae/model (repeatable)."),
    dtype: Optional[str] = typer.Option(None, help="Store the weights as float32, bfloat16 or float16."),
    defaults: Optional[list[str]] = typer.Option(None, "--default", metavar="KEY=VALUE", help="Set a generation default in hvctl.json, e.g. guidance_scale=4 (repeatable)."),
    i2v: Optional[str] = typer.Option(None, "--i2v", help="Make the DiT image-to-video: latent_concat (new input weights at zero) or token_replace."),
    as_json: bool = JSON_OPTION,
):
    """Write a model folder made of another's components, recast, with new generation defaults."""
    from hvctl.models.compose import compose_from_flags
    from hvctl.models.info import describe

    path = compose_from_flags(base, out, take or [], dtype, defaults or [], i2v)
    info = describe(path)
    emit(info, as_json, f"wrote {path} ({info['parameters']:,} parameters)")


@model_app.command("reduce-latent")
def model_reduce_latent(
    base: Path = typer.Argument(..., help="Model folder whose VAE latent is reduced."),
    out: Path = typer.Argument(..., help="New model folder to write."),
    manifest: Path = typer.Option(..., "--manifest", help="Media the latent's principal components are fitted on."),
    channels: int = typer.Option(..., "--channels", help="Latent channels to keep: the leading whitened components."),
    samples: int = typer.Option(400, "--samples", help="Media to encode for the fit, spread evenly over the manifest."),
    as_json: bool = JSON_OPTION,
):
    """Write a model folder whose VAE latent is the leading principal components of BASE's, whitened
    (folded into the VAE's layers; the DiT folded to match, as a starting point for training)."""
    from hvctl.models.latent_pca import reduce_latent

    path, pca = reduce_latent(base, out, manifest, channels, samples)
    info = {"path": str(path), "channels": channels, "samples": pca.samples,
            "explained_variance": [round(pca.explained(k), 6) for k in range(1, len(pca.variances) + 1)],
            "variances": [round(float(v), 6) for v in pca.variances]}
    emit(info, as_json, f"wrote {path}: {channels} whitened latent channels, {100 * pca.explained(channels):.2f}% "
                        f"of the latent's variance (fitted on {pca.samples} media)")


@model_app.command("convert")
def model_convert(
    src: Path = typer.Argument(..., help="Official checkpoint (.pt or .safetensors, or a folder of them); with --to official, a model folder."),
    out: Path = typer.Argument(..., help="New folder to write."),
    to: str = typer.Option("diffusers", "--to", help="diffusers (a model folder) or official (official names, safetensors)."),
    base: Optional[Path] = typer.Option(None, "--base", help="Model folder the other components (text encoders, tokenizers, scheduler, VAE unless --vae) are copied from."),
    vae: Optional[Path] = typer.Option(None, "--vae", help="The official VAE (pytorch_model.pt or .safetensors; its config.json beside it is read)."),
    load_key: Optional[str] = typer.Option(None, "--load-key", help="Which weights of a nested .pt: module or ema. Default: module, if nested."),
    i2v: Optional[str] = typer.Option(None, "--i2v", help="The checkpoint is an image-to-video one: token_replace (16 channels) or latent_concat (found from 2C+1 channels)."),
    dtype: Optional[str] = typer.Option(None, help="Store the converted weights as float32, bfloat16 or float16. Default: as they are."),
    as_json: bool = JSON_OPTION,
):
    """Convert official HunyuanVideo checkpoints into a diffusers model folder, or a model folder into official names."""
    from hvctl.models import convert

    if dtype not in (None, "float32", "bfloat16", "float16"):
        raise HvctlError(f"--dtype {dtype}: choose float32, bfloat16 or float16")
    if load_key not in (None, *convert.LOAD_KEYS):
        raise HvctlError(f"--load-key {load_key}: choose {' or '.join(convert.LOAD_KEYS)}")
    if to == "official":
        for flag, value in (("--base", base), ("--vae", vae), ("--load-key", load_key), ("--i2v", i2v)):
            if value is not None:
                raise HvctlError(f"{flag}: only for --to diffusers")
        path = convert.to_official(src, out, dtype=dtype)
        files = sorted(p.name for p in path.iterdir())
        emit({"path": str(path), "to": to, "files": files}, as_json, f"wrote {path} ({', '.join(files)})")
        return
    if to != "diffusers":
        raise HvctlError(f"--to {to}: choose diffusers or official")
    if base is None:
        raise HvctlError("--base DIR: needed with --to diffusers, for the components an official checkpoint lacks")
    from hvctl.models.info import describe

    path = convert.to_diffusers(src, out, base=base, vae=vae, load_key=load_key, i2v=i2v, dtype=dtype)
    info = describe(path)
    emit({**info, "to": to}, as_json, f"wrote {path} ({info['parameters']:,} parameters)")


@model_app.command("info")
def model_info(path: Path = typer.Argument(..., help="Model folder."), as_json: bool = JSON_OPTION):
    """Components, parameter counts and key configuration of a model folder."""
    from hvctl.models.info import describe

    info = describe(path)
    if as_json:
        emit(info, True, "")
        return
    from rich.console import Console
    from rich.table import Table

    table = Table(title=f"{info['path']}" + ("" if info["weights"] else " (configs only)"))
    for column in ("component", "class", "parameters"):
        table.add_column(column)
    for name, c in info["components"].items():
        table.add_row(name, c["class"].split(".")[-1], f"{c['parameters']:,}" if "parameters" in c else "")
    console = Console()
    console.print(table)
    console.print(f"total parameters: {info['parameters']:,}")
    for name, c in info["components"].items():
        if c.get("config"):
            console.print(f"{name}: " + ", ".join(f"{k}={v}" for k, v in c["config"].items()), soft_wrap=True)
    console.print("generation defaults: " + ", ".join(f"{k}={v}" for k, v in info["generation_defaults"].items()),
                  soft_wrap=True)


@recipe_app.command("show")
def recipe_show(
    file: Path = typer.Argument(..., help="Recipe YAML file."),
    overrides: Optional[list[str]] = SET_OPTION,
    as_json: bool = JSON_OPTION,
):
    """Print a recipe fully resolved: extends merged, overrides applied, defaults filled in."""
    import yaml

    from hvctl.recipe import load_recipe, load_recipe_file, recipe_to_dict, schema_for_kind

    raw, _ = load_recipe_file(file)
    if "kind" not in raw:
        raise HvctlError(f"{file}: no 'kind' key, so its recipe type is unknown")
    schema = schema_for_kind(raw["kind"])
    resolved = {"kind": raw["kind"], **recipe_to_dict(load_recipe(schema, file, overrides or ()))}
    emit(resolved, as_json, yaml.safe_dump(resolved, sort_keys=False).rstrip())


def main() -> None:
    try:
        app()
    except HvctlError as e:
        typer.secho(f"error: {e}", fg=typer.colors.RED, err=True)
        sys.exit(1)
    except OSError as e:  # the environment, not hvctl: a full disk, a path under a file, ...
        from hvctl.io import DISK_ERRNOS

        culprit = f"{e.filename}: " if e.filename else ""
        typer.secho(f"error: {culprit}{DISK_ERRNOS.get(e.errno) or e.strerror or e}", fg=typer.colors.RED, err=True)
        sys.exit(1)
    except KeyboardInterrupt:
        typer.echo("interrupted", err=True)
        sys.exit(130)
