"""The training recipe (`kind: train`): one schema for DiT and VAE runs, which variants
(hvctl/train/specs.py) extend. Imports no torch."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import ClassVar, Literal

from hvctl.data.select import SelectConfig
from hvctl.lora import LoraSettings



@dataclass
class OptimConfig:
    LIMITS: ClassVar[dict] = {"lr": "> 0", "betas": "[0, 1)", "weight_decay": ">= 0", "eps": "> 0", "warmup_steps": ">= 0",
                              "min_lr_ratio": "[0, 1]", "schedule_steps": ">= 1", "grad_clip": "> 0", "grad_accumulation": ">= 1"}
    lr: float = 1e-4
    betas: tuple[float, float] = (0.9, 0.999)
    weight_decay: float = 0.0
    eps: float = 1e-8
    warmup_steps: int = 0
    schedule: Literal["constant", "cosine", "linear"] = "constant"  # after warm-up
    min_lr_ratio: float = 0.0  # the cosine/linear schedule's floor, as a share of lr
    schedule_steps: int | None = None  # length of the decay; None: the run's steps (set it to stop a run early)
    grad_clip: float | None = 1.0  # max global gradient norm; None: no clipping
    grad_accumulation: int = 1  # micro-batches per optimizer step


@dataclass
class FlowConfig:
    LIMITS: ClassVar[dict] = {"shift": "> 0", "logit_std": "> 0", "guidance": ">= 0", "unmasked_weight": "[0, 1]"}
    timestep_sampling: Literal["uniform", "logit_normal", "shifted"] = "logit_normal"
    shift: float = 7.0  # for "shifted"
    logit_mean: float = 0.0
    logit_std: float = 1.0
    stratified: bool = False  # CogVideoX: each rank draws from its own slice of [0, 1]
    loss_weighting: Literal["none", "cosmap"] = "none"
    guidance: float = 1.0  # embedded guidance fed to a guidance-embedded model while training
    # Masked loss (the manifest's loss_mask, cached by encode): latents outside the mask weigh this
    # much against 1 inside, normalised per sample; 1 ignores masks, 0 trains on the masked part alone.
    unmasked_weight: float = 1.0


@dataclass
class DataConfig:
    LIMITS: ClassVar[dict] = {"batch_size": ">= 1", "image_ratio": "[0, 1]", "empty_prompt_rate": "[0, 1]",
                              "short_caption_rate": "[0, 1]", "caption_variants": ">= 1", "aspect_buckets": ">= 16",
                              "frame_buckets": ">= 1", "text_len": ">= 1"}
    cache: Path | None = None  # an `hvctl encode` cache; None: encode `manifest` first
    manifest: Path | None = None  # limits training to its samples; needed without a cache and for VAE runs
    split: str | None = "train"
    batch_size: int = 4
    image_ratio: float | None = None  # share of steps on image batches (None: even when both exist)
    empty_prompt_rate: float = 0.1  # text replaced by the empty prompt: what makes CFG work
    caption_variants: int = 4  # when encoding here
    # Share of samples that read caption variant 0, the short description as users type it, instead
    # of a variant drawn at random (null: every variant alike).
    short_caption_rate: float | None = None
    # The stage's buckets: a cache's samples outside them are skipped; media is fitted to them.
    # None: every bucket of the cache (the toy buckets when media is read here).
    aspect_buckets: list[tuple[int, int]] | None = None
    frame_buckets: list[int] | None = None
    media: list[Literal["image", "video"]] = field(default_factory=lambda: ["image", "video"])  # what this stage trains on
    text_len: int | None = None  # None: the model's
    # The cache records which VAE and text encoders made it; training refuses other encoders than
    # the model's unless this says they are the same (e.g. a copy re-saved in another dtype).
    accept_foreign_cache: bool = False
    # none: read each sample from the cache's shards; device: the whole cache stacked on the training
    # device once, a micro-batch a gather (hvctl/data/device_cache.py); cpu: stacked in CPU memory.
    preload: Literal["none", "cpu", "device"] = "none"
    # SFT: train on the manifest's best samples by a numeric field (hvctl/data/select.py)
    select: SelectConfig | None = None
    # Task mixing for an image-to-video (latent_concat) model: shares of micro-batches trained as
    # text-to-video, image-to-video and video continuation, e.g. {t2v: 0.8, i2v: 0.2} (Seaweed).
    task_ratio: dict[str, float] | None = None


@dataclass
class VaeLossConfig:
    LIMITS: ClassVar[dict] = {"kl_weight": ">= 0", "mse_weight": ">= 0", "lpips_weight": ">= 0", "adversarial_weight": ">= 0",
                              "adversarial_start": ">= 0", "discriminator_lr": "> 0", "random_tiling": "[0, 1]", "tile_sizes": ">= 1"}
    kl_weight: float = 1e-6
    mse_weight: float = 0.0  # squared error beside the official L1
    lpips_weight: float = 0.0  # official 0.1; needs local LPIPS weights (lpips_weights)
    lpips_weights: Path | None = None
    adversarial_weight: float = 0.0  # official 0.05 (a PatchGAN discriminator)
    adversarial_start: int = 0  # step at which the discriminator joins
    discriminator_lr: float = 1e-4
    random_tiling: float = 0.0  # finetune phase: share of steps encoded/decoded in tiles
    tile_sizes: list[int] = field(default_factory=lambda: [32, 64])


@dataclass
class ParallelConfig:
    """How the model is spread over the processes (hvctl/parallel.py); data parallelism takes the
    processes these leave. Each needs its product to divide the process count."""

    LIMITS: ClassVar[dict] = {"fsdp": ">= 1", "ulysses": ">= 1", "ring": ">= 1", "activation_checkpointing": ">= 0"}
    fsdp: int = 1  # shard parameters, gradients and optimizer state over this many ranks (FSDP2)
    ulysses: int = 1  # sequence parallelism (DiT): all-to-all from sequence shards to head shards
    ring: int = 1  # sequence parallelism (DiT): key/value blocks passed around a ring
    cpu_offload: bool = False  # FSDP keeps parameters, gradients and optimizer state in CPU memory
    activation_checkpointing: int = 0  # recompute every k-th block's activations in backward (1: all; 0: none)
    activation_offload: bool = False  # keep the other blocks' activations in CPU memory
    # Seaweed's runtime balancing: hand each data shard the step's micro-batches that even out
    # their estimated compute (sequence length, attention quadratic), not a fixed share.
    balance: bool = False


@dataclass
class AvatarSettings:
    """Train conditioners that animate a reference image (hvctl/avatar.py, plugins/hvctl_avatar).
    The manifest names each sample's conditions (reference, audio, pose, expression, audio_mask
    paths); hvctl encode caches them. A model that already has conditioners keeps them."""

    LIMITS: ClassVar[dict] = {"drop": "[0, 1]", "window_overlap": ">= 0"}
    conditions: list[Literal["reference", "audio", "pose", "expression"]] = field(default_factory=lambda: ["reference", "audio"])
    options: dict[str, dict] = field(default_factory=dict)  # per conditioner: {audio: {blocks: [0, 1]}, expression: {every: 2}}
    audio_encoder: str = "logmel"  # a registered audio encoder (hvctl plugins list --kind audio_encoder)
    audio_encoder_options: dict = field(default_factory=dict)  # e.g. whisper: {path: /models/whisper-tiny}
    # Per condition, the share of samples trained without it: the model then also works when it is
    # not given, which hybrid use (any subset at once) needs.
    drop: dict[str, float] = field(default_factory=dict)
    window_overlap: int = 2  # inference: latent frames that neighbouring windows of a long video share


@dataclass
class DpoSettings:
    """Flow-matching DPO (hvctl/train/dpo.py) on `hvctl prefer` pairs: data.cache and
    data.manifest are the prefer folder's cache and manifest.jsonl. The reference is the starting
    model (with LoRA: the model with its adapters off)."""

    LIMITS: ClassVar[dict] = {"beta": "> 0", "rounds": ">= 1"}
    beta: float = 500.0  # the KL price: larger keeps closer to the reference (Diffusion-DPO used 2000-5000 on images)
    # Passes over the preference set; the run's steps follow from it (Seaweed: one is enough, more
    # cost other qualities). None: the recipe's `steps` instead.
    rounds: int | None = 1


@dataclass
class CheckpointConfig:
    LIMITS: ClassVar[dict] = {"every": ">= 1", "keep_last": ">= 1"}
    every: int = 500
    keep_last: int = 3


DEFAULT_LOSS_SIGMAS = (0.1, 0.3, 0.5, 0.7, 0.9)  # the held-out loss's noise levels unless asked


@dataclass
class ValidationConfig:
    LIMITS: ClassVar[dict] = {"every": ">= 0", "steps": ">= 1", "seed": "[0, 9223372036854775807]", "guidance_scale": ">= 1",
                              "loss_samples": ">= 1", "loss_sigmas": "(0, 1]"}
    every: int = 0  # 0: never; else at every checkpoint whose step is a multiple of it
    prompts: list[str] = field(default_factory=list)  # videos generated from the checkpoint
    steps: int = 20
    seed: int = 0  # of the videos' noise and of the held-out loss's
    guidance_scale: float = 1.0
    # DiT: the held-out denoising loss (hvctl/train/validation.py) on the first loss_samples of this
    # cache (hvctl encode of clips not trained on), logged as val_loss@SIGMA for each noise level.
    loss_cache: Path | None = None
    loss_samples: int = 64
    loss_sigmas: list[float] = field(default_factory=lambda: list(DEFAULT_LOSS_SIGMAS))
    accept_foreign_cache: bool = False  # as data.accept_foreign_cache, for loss_cache


@dataclass
class TrainRecipe:
    KIND: ClassVar[str] = "train"
    # The training variant (hvctl/train/specs.py) of a recipe kind of its own; None: read from the keys.
    VARIANT: ClassVar[str | None] = None
    LIMITS: ClassVar[dict] = {"steps": ">= 1", "seed": "[0, 9223372036854775807]", "ema_decay": "[0, 1)", "nproc": ">= 1",
                              "max_restarts": ">= 0", "log_every": ">= 1"}
    target: Literal["dit", "vae"] = "dit"
    model: Path | None = None  # the starting model folder (a previous stage's output)
    init_preset: str | None = None  # or a new model from a preset (`hvctl model init`)
    init_guidance_embeds: bool | None = None
    init_overrides: dict[str, dict] | None = None  # with init_preset: {vae: {latent_channels: 8}, transformer: {...}}
    trainable: list[str] | None = None  # parameter-name prefixes to train (e.g. [decoder]); None: all
    lora: LoraSettings | None = None  # DiT only: train LoRA adapters instead (hvctl/lora.py); None: full weights
    # Make a text-to-video DiT image-to-video before training (hvctl/i2v.py); a model that
    # already is one is trained as it is.
    i2v: Literal["latent_concat", "token_replace"] | None = None
    avatar: AvatarSettings | None = None  # DiT only: audio-, pose- and expression-driven animation of a reference
    dpo: DpoSettings | None = None  # DiT only: preference optimisation on hvctl prefer's pairs
    # VAE runs: the exported VAE's scaling_factor becomes 1/std of its latents on the training data
    # (as Stable Diffusion set its own), so the DiT sees unit-variance latents. Off by default: it
    # would break a pretrained DiT's match with a finetuned official VAE.
    calibrate_scaling_factor: bool = False
    reinit: bool = False  # train the target from a fresh init of its config in `model` (keeping the other components)
    # How a fresh DiT (reinit or init_preset) is initialised: as diffusers builds it, or
    # adaln-zero (every block the identity, the prediction zero; hvctl/models/dit_init.py).
    dit_init: Literal["diffusers", "adaln-zero"] = "diffusers"
    out: Path | None = None  # the run folder: checkpoints, metrics, validation
    steps: int = 1000
    seed: int = 0
    precision: Literal["float32", "bfloat16", "float16"] = "float32"  # autocast dtype of the forward pass
    ema_decay: float = 0.0  # 0: no EMA; else exported weights are the EMA's (its decay ramps up to this: trainer.EMA)
    device: str = "auto"
    # The DiT's attention kernel (as `hvctl generate --attention`), under Ulysses and ring too:
    # auto, sdpa, flash, flash3, native (sage has no backward pass).
    attention: Literal["auto", "sdpa", "flash", "flash3", "sage", "native"] = "auto"
    nproc: int = 1  # processes per node; > 1 launches torchrun
    max_restarts: int = 0  # restart failed processes this many times; each restart resumes from the last checkpoint
    log_every: int = 10
    tensorboard: bool = True  # when the tensorboard package is installed
    optim: OptimConfig = field(default_factory=OptimConfig)
    flow: FlowConfig = field(default_factory=FlowConfig)
    data: DataConfig = field(default_factory=DataConfig)
    vae_loss: VaeLossConfig = field(default_factory=VaeLossConfig)
    checkpoint: CheckpointConfig = field(default_factory=CheckpointConfig)
    parallel: ParallelConfig = field(default_factory=ParallelConfig)
    validation: ValidationConfig = field(default_factory=ValidationConfig)


def check_paths(r: TrainRecipe) -> None:
    """Check every path a resolved train/distill recipe names, before any process starts: a bad
    recipe is then one line from the launcher, not one from each of N ranks."""
    from hvctl.errors import HvctlError
    from hvctl.io import check_output_dir
    from hvctl.models.loading import ModelFolder
    from hvctl.models.presets import get_preset
    from hvctl.train.specs import spec_for

    if r.out is None:
        raise HvctlError("train needs an output folder ('out' in the recipe or --out)")
    check_output_dir(r.out, "out:")
    spec = spec_for(r)
    spec.check(r)
    start = getattr(r, spec.model_key)
    if spec.model_key != "model":  # the variant starts from a folder of its own (distill: the teacher)
        ModelFolder.open(start)
    elif r.model is not None:
        folder = ModelFolder.open(r.model)
        if not folder.has_weights and not r.reinit:
            raise HvctlError(f"model: {r.model} has configs but no weights (written with --meta); train it with reinit: true")
    elif r.init_preset is not None:
        get_preset(r.init_preset)
    else:
        raise HvctlError("train needs a starting model: 'model' (a model folder) or 'init_preset' (e.g. tiny)")
    if r.dit_init != "diffusers" and (r.target != "dit" or (not r.reinit and r.init_preset is None)):
        raise HvctlError(f"dit_init: {r.dit_init} initialises a fresh DiT: set reinit: true (or init_preset) with target: dit")
    d = r.data
    if d.cache is not None and r.target == "dit" and not Path(d.cache).is_dir():
        raise HvctlError(f"data.cache: {d.cache} not found (make it with `hvctl encode`)")
    if d.manifest is not None and not Path(d.manifest).is_file():
        raise HvctlError(f"data.manifest: {d.manifest} not found")
    if (r.dpo is not None or d.select is not None) and d.manifest is None:
        raise HvctlError("dpo and data.select read data.manifest (the pairs / the scores): set it")
    if d.manifest is None and (r.target == "vae" or d.cache is None):
        raise HvctlError("VAE training reads pixels: set data.manifest" if r.target == "vae" else "train needs data.cache or data.manifest")
    if r.lora is not None and r.lora.init is not None and not Path(r.lora.init).is_file():
        raise HvctlError(f"lora.init: {r.lora.init} not found")
    if r.vae_loss.lpips_weights is not None and not Path(r.vae_loss.lpips_weights).is_file():
        raise HvctlError(f"vae_loss.lpips_weights: {r.vae_loss.lpips_weights} not found")
    if r.avatar is not None and r.avatar.audio_encoder_options.get("path") is not None:
        if not Path(r.avatar.audio_encoder_options["path"]).exists():
            raise HvctlError(f"avatar.audio_encoder_options.path: {r.avatar.audio_encoder_options['path']} not found")
    v = r.validation
    if v.loss_cache is not None:
        if r.target != "dit" or r.i2v is not None:
            raise HvctlError("validation.loss_cache: the held-out loss is a text-to-video DiT's; not for a VAE or i2v run")
        if not v.every:
            raise HvctlError("validation.loss_cache is set but validation.every is 0: set the checkpoints to validate at")
        if not Path(v.loss_cache).is_dir():
            raise HvctlError(f"validation.loss_cache: {v.loss_cache} not found (make it with `hvctl encode` of held-out clips)")
    if r.target == "dit":
        check_parallel(r)


def check_parallel(r: TrainRecipe) -> None:
    """The attention kernel exists here and trains; with sequence parallelism, every bucket this
    stage may train on splits its video tokens evenly over the ulysses x ring ranks."""
    from hvctl.accelerate import training_attention_backend
    from hvctl.data.buckets import BucketConfig
    from hvctl.models.loading import resolve_device_dtype
    from hvctl.models.loading import ModelFolder
    from hvctl.models.presets import get_preset, with_overrides
    from hvctl.parallel import check_sequence_split

    training_attention_backend(r.attention, resolve_device_dtype(r.device, "float32")[0])
    p, d = r.parallel, r.data
    if p.ulysses * p.ring == 1:
        return
    source = r.teacher if r.KIND == "distill" else r.model
    if source is not None:
        folder = ModelFolder.open(source)
        dit, vae = folder.component_config("transformer"), folder.component_config("vae")
    else:
        preset = with_overrides(get_preset(r.init_preset), r.init_overrides)
        dit, vae = preset.transformer, preset.vae
    stage = BucketConfig(aspect_buckets=d.aspect_buckets, frame_buckets=d.frame_buckets)
    if d.cache is not None and Path(d.cache).is_dir():  # the buckets the cache holds
        from hvctl.cache import latest_by_id, load_entries

        buckets = {e.bucket for e in latest_by_id(load_entries(Path(d.cache))).values()}
    else:  # the buckets encoding here can make
        defaults = BucketConfig()
        buckets = {(h, w, n) for h, w in stage.aspect_buckets or defaults.aspect_buckets
                   for n in [1, *(stage.frame_buckets or defaults.frame_buckets)]}
    sizes = sorted((n, h, w) for h, w, n in buckets if stage.admits((h, w, n), d.media))
    check_sequence_split(sizes, dit, vae, p.ulysses, p.ring, f"parallel.ulysses {p.ulysses}, ring {p.ring}")
