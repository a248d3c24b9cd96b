"""Inference accelerators in one place, applied to loaded components from outside:

- attention: which kernel diffusers' attention dispatcher runs (hvctl's sequence-parallel
  processor asks the same dispatcher);
- offload: component offload and sequential per-module offload (accelerate's hooks), group
  offloading of the DiT's blocks (diffusers' hooks, CUDA streams and prefetch on a GPU);
- weights_dtype: the DiT's weights stored in FP8 (or any dtype), computed in the compute dtype
  (diffusers' layerwise casting; norms and embeddings stay in full precision);
- compile: regional torch.compile of the DiT's repeated blocks;
- step_cache: TeaCache (below) or diffusers' FirstBlockCache: a step whose first block barely
  changed reuses the last full step's residual instead of running the other blocks.

The model code stays diffusers'; generate.py asks `Accelerators.apply` once per loaded model.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

from hvctl.errors import HvctlError

ATTENTION = ("auto", "sdpa", "flash", "flash3", "sage", "native")
OFFLOAD = ("none", "model", "group", "sequential", "auto")
STEP_CACHES = ("none", "teacache", "fbc")

# hvctl's name -> diffusers' backend. HunyuanVideo masks the text padding, so the flash and sage
# kernels run in their variable-length form (keys unpadded, as the official code calls flash-attn).
# `native` is torch's plain math kernel: the reference the fused ones are checked against.
_BACKENDS = {"sdpa": "native", "native": "_native_math", "flash": "flash_varlen", "flash3": "_flash_varlen_3",
             "sage": "sage_varlen"}
_PACKAGES = {"flash": "flash-attn>=2.6.3 (pip install flash-attn --no-build-isolation)",
             "flash3": "flash-attn 3 (flash_attn_interface: build flash-attention's hopper/ folder)",
             "sage": "sageattention>=2.1.1 (pip install sageattention)"}


def _installed(name: str) -> bool:
    from diffusers.models import attention_dispatch as d

    return {"flash": d._CAN_USE_FLASH_ATTN, "flash3": d._CAN_USE_FLASH_ATTN_3, "sage": d._CAN_USE_SAGE_ATTN}.get(name, True)


def attention_backend(name: str, device) -> str:
    """hvctl's attention name (auto resolved for `device`) -> diffusers' backend name, checked."""
    return _BACKENDS[attention_choice(name, device)]


def training_attention_backend(name: str, device) -> str:
    """attention_backend for training: a kernel with a backward pass."""
    if attention_choice(name, device) == "sage":
        raise HvctlError(f"attention: {name} is SageAttention, which has no backward pass (inference only); "
                         "train with auto, sdpa, flash or flash3")
    return attention_backend(name, device)


def attention_choice(name: str, device) -> str:
    """hvctl's attention name, auto resolved for `device` and checked."""
    if name not in ATTENTION:
        raise HvctlError(f"--attention {name}: choose one of {', '.join(ATTENTION)}")
    if name == "auto":
        import torch

        name = "sdpa"
        if device.type == "cuda":
            hopper = torch.cuda.get_device_capability(device)[0] == 9
            name = "flash3" if hopper and _installed("flash3") else "flash" if _installed("flash") else "sdpa"
    if not _installed(name):
        raise HvctlError(f"--attention {name}: the package is not installed; install {_PACKAGES[name]}")
    if name in _PACKAGES and device.type != "cuda":
        raise HvctlError(f"--attention {name}: runs on a CUDA GPU only; on {device.type} use sdpa")
    return name


def set_attention(transformer, backend: str) -> None:
    """Every attention of the DiT (the sequence-parallel processor too) through `backend`."""
    transformer.set_attention_backend(backend)
    for module in transformer.modules():  # processors that diffusers' setter does not know
        processor = getattr(module, "processor", None)
        if processor is not None and hasattr(processor, "_attention_backend"):
            processor._attention_backend = backend


# -- memory ---------------------------------------------------------------------------------------

TEXT_ENCODERS = ("text_encoder", "text_encoder_2")


def _offload_component(module, device, hooks: dict):
    """accelerate's component offload, except that before this component runs every other one
    goes back to the CPU (accelerate's own chain offloads only one predecessor). Returns the hook
    whose offload() sends it back."""
    from accelerate.hooks import CpuOffload, UserCpuOffloadHook, add_hook_to_module

    class OffloadOthersFirst(CpuOffload):
        def pre_forward(self, module, *args, **kwargs):
            for hook in hooks.values():
                if hook.model is not module:
                    hook.offload()
            return super().pre_forward(module, *args, **kwargs)

    hook = OffloadOthersFirst(execution_device=device)
    add_hook_to_module(module, hook, append=True)
    return UserCpuOffloadHook(module, hook)


class Offload:
    """Where components live between uses. Built by `apply_offload`; `release_text_encoders` is
    called as soon as the prompts are encoded."""

    def __init__(self, mode: str, parts, device):
        self.mode, self.parts, self.device = mode, parts, device
        self.hooks: dict = {}

    def release_text_encoders(self) -> None:
        import torch

        for name in TEXT_ENCODERS:
            if name in self.hooks:
                self.hooks[name].offload()
            elif self.mode == "none" and getattr(self.parts, name) is not None and self.device.type != "cpu":
                # Kept, on the CPU, so that encoding again still works (slowly).
                setattr(self.parts, name, getattr(self.parts, name).to("cpu"))
        if self.device.type == "cuda":
            torch.cuda.empty_cache()


def apply_offload(parts, mode: str, device) -> Offload:
    """Offload hooks on the loaded components (all on the CPU for any mode but none)."""
    offload = Offload(mode, parts, device)
    if mode == "none":
        return offload
    from accelerate import cpu_offload

    names = [n for n in ("text_encoder", "text_encoder_2", "transformer", "vae") if getattr(parts, n) is not None]
    if mode == "sequential":  # every leaf module onloaded for its own forward only: least memory, slowest
        for name in names:
            cpu_offload(getattr(parts, name), execution_device=device)
        return offload
    if mode == "group":
        names.remove("transformer")
        parts.transformer.enable_group_offload(onload_device=device, offload_device="cpu", offload_type="block_level",
                                               num_blocks_per_group=1, use_stream=device.type == "cuda")
    for name in names:
        offload.hooks[name] = _offload_component(getattr(parts, name), device, offload.hooks)
    return offload


def storage_dtype(name: str | None, compute_dtype):
    """The dtype named by --weights-dtype (None: the compute dtype), checked on this machine."""
    import torch

    if name is None:
        return compute_dtype
    dtype = getattr(torch, name, None)
    if not isinstance(dtype, torch.dtype) or not dtype.is_floating_point:
        raise HvctlError(f"--weights-dtype {name}: not a floating-point torch dtype "
                         "(float8_e4m3fn, float8_e5m2, bfloat16, float16, float32)")
    try:  # layerwise casting needs the cast both ways on this build of torch
        torch.ones(2, dtype=compute_dtype).to(dtype).to(compute_dtype)
    except (RuntimeError, TypeError) as e:
        raise HvctlError(f"--weights-dtype {name}: this torch cannot cast {name} to {compute_dtype} ({e})") from None
    return dtype


# Kept in the compute dtype: the input embedders (the text refiner among them), the output layer,
# LoRA and avatar modules. Every linear layer of the blocks, their modulation included, is stored in
# the storage dtype, as the official FP8 checkpoint does. (diffusers' own rule for this model also
# keeps every module named "norm*", which keeps the blocks' modulation layers, a third of the DiT.)
FULL_PRECISION_MODULES = ("^x_embedder", "^context_embedder", "^time_text_embed", "^norm_out", "^proj_out$", "lora_", "^avatar")


def apply_weights_dtype(transformer, dtype, compute_dtype) -> None:
    """The DiT's linear and conv weights stored in `dtype`, each cast to compute_dtype for its own
    forward only (diffusers' layerwise casting)."""
    if dtype != compute_dtype:
        from diffusers.hooks import apply_layerwise_casting

        apply_layerwise_casting(transformer, dtype, compute_dtype, skip_modules_pattern=FULL_PRECISION_MODULES)


def weight_bytes(module) -> int:
    return sum(p.numel() * p.element_size() for p in module.parameters())


# -- step caches ----------------------------------------------------------------------------------

# TeaCache's published fit for HunyuanVideo: the relative L1 change of the first block's
# modulated input -> the relative change of the model's output, as a polynomial (highest power first).
TEACACHE_HUNYUAN_COEFFICIENTS = (7.33226126e02, -4.01131952e02, 6.75869174e01, -3.14987800e00, 9.61237896e-02)


def parse_step_cache(spec: str) -> tuple[str, float]:
    """"teacache:0.1" -> ("teacache", 0.1); "none" -> ("none", 0.0)."""
    kind, _, value = spec.partition(":")
    if kind not in STEP_CACHES:
        raise HvctlError(f"--step-cache {spec}: choose none, teacache:T or fbc:T (T a threshold >= 0)")
    if kind == "none":
        if value:
            raise HvctlError(f"--step-cache {spec}: none takes no threshold")
        return kind, 0.0
    try:
        threshold = float(value)
    except ValueError:
        raise HvctlError(f"--step-cache {spec}: give a threshold, e.g. {kind}:0.1") from None
    if not math.isfinite(threshold) or threshold < 0:
        raise HvctlError(f"--step-cache {spec}: the threshold must be a finite number >= 0")
    return kind, threshold


class StepCache:
    """A step cache on a DiT: TeaCache (hvctl's hooks below) or FirstBlockCache (diffusers').

    Each call of the DiT gets a cache context named by its place within its step (the calls of a
    step share one timestep: one call, or several for avatar windows or condition guidance), so
    each call is compared with the same call of the previous step. `skipped`/`computed` count calls.
    """

    def __init__(self, transformer, kind: str, threshold: float, steps: int):
        from diffusers.hooks import HookRegistry

        self.transformer, self.kind, self.threshold, self.steps = transformer, kind, threshold, steps
        self.skipped = self.computed = 0
        self._last_timestep, self._call = None, 0
        if kind == "fbc":
            from diffusers import FirstBlockCacheConfig

            transformer.enable_cache(FirstBlockCacheConfig(threshold=threshold))
        else:
            _apply_teacache(transformer, self)
        HookRegistry.check_if_exists_or_initialize(transformer).register_hook(_context_hook(self), "hvctl_step_cache_context")

    def reset(self) -> None:
        """Before a new video: no state from the last one."""
        from diffusers.hooks import HookRegistry

        for module in self.transformer.modules():
            registry = getattr(module, "_diffusers_hook", None)
            if isinstance(registry, HookRegistry):
                registry.reset_stateful_hooks()
        self._last_timestep, self._call = None, 0
        self.skipped = self.computed = 0

    def context(self, timestep) -> str:
        value = float(timestep.flatten()[0])
        self._call = self._call + 1 if value == self._last_timestep else 0
        self._last_timestep = value
        return f"call{self._call}"

    def count(self, computed: bool) -> None:
        if computed:
            self.computed += 1
        else:
            self.skipped += 1

    def summary(self) -> dict:
        return {"kind": self.kind, "threshold": self.threshold, "computed": self.computed, "skipped": self.skipped}


def _context_hook(cache: StepCache):
    """On the DiT itself: names each call's cache context, and counts diffusers' FBC decisions."""
    from diffusers.hooks import ModelHook
    from diffusers.hooks.first_block_cache import _FBC_LEADER_BLOCK_HOOK

    class Context(ModelHook):
        def new_forward(self, module, *args, **kwargs):
            timestep = kwargs["timestep"] if "timestep" in kwargs else args[1]
            with module.cache_context(cache.context(timestep)):
                output = self.fn_ref.original_forward(*args, **kwargs)
                if cache.kind == "fbc":
                    head = module.transformer_blocks[0]._diffusers_hook.get_hook(_FBC_LEADER_BLOCK_HOOK)
                    cache.count(head.state_manager.get_state().should_compute)
            return output

    return Context()


def _apply_teacache(transformer, cache: StepCache) -> None:
    """TeaCache on a HunyuanVideo DiT, built on diffusers' hooks: the first dual-stream block
    measures its modulated input and decides; on a skipped call every block passes its input
    through and the last adds the residual (output - input) of the last computed call."""
    import torch
    from diffusers.hooks import HookRegistry, ModelHook
    from diffusers.hooks.hooks import BaseState, StateManager

    class State(BaseState):
        def __init__(self):
            self.reset()

        def reset(self):
            self.step = 0
            self.previous = None  # the last call's modulated input
            self.accumulated = 0.0
            self.compute = True
            self.head_input = None
            self.residual = None

    states = StateManager(State)
    polynomial = torch.tensor(TEACACHE_HUNYUAN_COEFFICIENTS, dtype=torch.float64)

    def rescale(x: float) -> float:
        return float(sum(c * x ** (len(polynomial) - 1 - i) for i, c in enumerate(polynomial.tolist())))

    class Head(ModelHook):
        _is_stateful = True

        def __init__(self):
            super().__init__()
            self.states = states  # found here by diffusers' cache_context

        def new_forward(self, block, *args, **kwargs):
            hidden, encoder, temb = args[0], args[1], args[2]
            if len(args) > 5 and args[5] is not None:  # token_replace i2v: frame 0 modulated by its own embedding
                modulated = block.norm1(hidden, temb, args[5], args[6])[0]
            else:
                modulated = block.norm1(hidden, emb=temb)[0]
            state = states.get_state()
            compute = state.step == 0 or state.step == cache.steps - 1 or cache.threshold == 0
            if not compute:
                change = ((modulated - state.previous).abs().mean() / state.previous.abs().mean()).item()
                state.accumulated += rescale(change)
                compute = state.accumulated >= cache.threshold
            if compute:
                state.accumulated = 0.0
            state.previous, state.compute, state.head_input = modulated, compute, hidden
            state.step += 1
            cache.count(compute)
            return self.fn_ref.original_forward(*args, **kwargs) if compute else (hidden, encoder)

        def reset_state(self, module):
            states.reset()
            return module

    class Body(ModelHook):
        def __init__(self, tail: bool):
            super().__init__()
            self.tail = tail

        def new_forward(self, block, *args, **kwargs):
            state = states.get_state()
            if state.compute:
                output = self.fn_ref.original_forward(*args, **kwargs)
                if self.tail:
                    state.residual = output[0] - state.head_input
                return output
            hidden, encoder = args[0], args[1]
            return (state.head_input + state.residual if self.tail else hidden), encoder

    blocks = [*transformer.transformer_blocks, *transformer.single_transformer_blocks]
    HookRegistry.check_if_exists_or_initialize(blocks[0]).register_hook(Head(), "hvctl_teacache_head")
    for i, block in enumerate(blocks[1:], 1):
        HookRegistry.check_if_exists_or_initialize(block).register_hook(Body(i == len(blocks) - 1), "hvctl_teacache_block")


# -- all together ---------------------------------------------------------------------------------


@dataclass
class Accelerators:
    """The resolved accelerator settings of a generate recipe."""

    attention: str = "auto"
    offload: str = "none"
    weights_dtype: str | None = None
    compile: bool = False
    step_cache: str = "none"
    applied: dict = field(default_factory=dict)  # what apply() did: backend names, counts, ...

    @classmethod
    def from_recipe(cls, r) -> "Accelerators":
        return cls(r.attention, r.offload, r.weights_dtype, r.compile, r.step_cache)

    def check(self, device, compute_dtype) -> None:
        """Every setting's errors, before any weights load."""
        attention_backend(self.attention, device)
        if self.offload not in OFFLOAD:
            raise HvctlError(f"--offload {self.offload}: choose one of {', '.join(OFFLOAD)}")
        storage_dtype(self.weights_dtype, compute_dtype)
        parse_step_cache(self.step_cache)

    def resolve_offload(self, r, model_dir, device, dtype) -> None:
        """`--offload auto`: the least offload that the plan says fits --gpu-memory (else the GPU's)."""
        if self.offload == "auto":
            budget = r.gpu_memory * GIB if r.gpu_memory is not None else device_memory(device)
            self.offload = choose_offload(make_plan(r, model_dir, device, dtype), budget) if budget else "none"
        self.applied["offload"] = self.offload

    def load_device(self, device):
        """Where load_components puts the weights: the CPU when hooks will move them."""
        import torch

        return torch.device("cpu") if self.offload not in ("none", "auto") else device

    def apply(self, parts, device, compute_dtype, steps: int) -> tuple[Offload, StepCache | None]:
        """Apply everything to loaded components; the order matters (casting before offload
        hooks, the cache's hooks before compile wraps the blocks)."""
        choice = attention_choice(self.attention, device)
        set_attention(parts.transformer, _BACKENDS[choice])
        self.applied.update(attention=choice, attention_backend=_BACKENDS[choice])
        dtype = storage_dtype(self.weights_dtype, compute_dtype)
        apply_weights_dtype(parts.transformer, dtype, compute_dtype)
        self.applied["transformer_weight_bytes"] = weight_bytes(parts.transformer)
        kind, threshold = parse_step_cache(self.step_cache)
        cache = StepCache(parts.transformer, kind, threshold, steps) if kind != "none" else None
        offload = apply_offload(parts, self.offload, device)
        if self.compile:
            compile_blocks(parts.transformer)
        return offload, cache


def compile_blocks(transformer) -> None:
    """Regional compilation: each repeated block compiled once (the blocks of one kind share a
    graph), minutes faster to compile than the whole model and as fast to run."""
    try:
        import torch._dynamo  # noqa: F401
    except ImportError as e:
        raise HvctlError(f"--compile: torch.compile is unavailable here ({e})") from None
    transformer.compile_repeated_blocks(dynamic=False)


# -- planning: peak memory and time per step, before any weights load --------------------------------

GIB = 2**30
# Live activations of the widest DiT block per token, in hidden widths: the residual stream and its
# norm, q/k/v and their rotated copies, the attention output, the MLP's 4x input and activation.
ACTIVATION_WIDTHS = 16
# Live activations of a VAE decoder tile per output pixel and frame, in channels of its last stage.
VAE_WIDTHS = 6
# The share of the measured matmul throughput that a whole DiT step reaches (attention and small
# ops run slower than one large matmul). An assumption until benchmarks/gpu_generate.py measures it.
STEP_EFFICIENCY = 0.65
# Operations per DiT block (projections, norms, modulation, rotary, attention, MLP, gates): each
# costs at least one kernel launch on a GPU, one dispatch on a CPU, however small the model.
OPS_PER_BLOCK = 60


@dataclass
class Plan:
    """Estimated peak device memory per offload setting and time per step, for resolved settings."""

    weights: dict  # component -> bytes as stored
    activations: dict  # phase -> bytes
    peaks: dict  # offload mode -> peak bytes
    step_flops: float
    matmul_flops_per_s: float
    op_seconds: float  # the fixed cost of one small operation, measured
    step_seconds: float

    def fits(self, budget_bytes: float) -> list[str]:
        return [mode for mode, peak in self.peaks.items() if peak <= budget_bytes]

    def to_dict(self, gpu_memory_gib: float | None = None) -> dict:
        gib = lambda b: round(b / GIB, 3)  # noqa: E731
        out = {"weights_gib": {k: gib(v) for k, v in self.weights.items()},
               "activations_gib": {k: gib(v) for k, v in self.activations.items()},
               "peak_gib": {k: gib(v) for k, v in self.peaks.items()},
               "step_tflop": round(self.step_flops / 1e12, 3), "matmul_tflop_per_s": round(self.matmul_flops_per_s / 1e12, 3),
               "op_microseconds": round(self.op_seconds * 1e6, 1),
               "seconds_per_step": round(self.step_seconds, 4)}
        if gpu_memory_gib is not None:
            out["gpu_memory_gib"] = gpu_memory_gib
            out["fits"] = self.fits(gpu_memory_gib * GIB)
        return out


def measure_matmul_flops(device, dtype, width: int, tokens: int) -> float:
    """FLOP/s of this device on the DiT's own matmul shape (tokens x width x 4 width), measured in
    about a second (a GPU: up to 8192 tokens after a warm-up; a CPU: a smaller, single product)."""
    import time

    import torch

    if device.type != "cuda":
        width, tokens = min(width, 1024), 128
    tokens = min(tokens, 8192)
    a = torch.randn(tokens, width, device=device, dtype=dtype)
    b = torch.randn(width, 4 * width, device=device, dtype=dtype)
    sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)
    if device.type == "cuda":
        a @ b
        sync()
    runs, start = 0, time.perf_counter()
    while runs < 1 or (device.type == "cuda" and time.perf_counter() - start < 0.3):
        a @ b
        runs += 1
    sync()
    return 2 * tokens * width * 4 * width * runs / (time.perf_counter() - start)


def measure_op_seconds(device, dtype) -> float:
    """The time of one small operation on this device: the floor under every op of a block
    (the median of five rounds, so that a busy moment does not count)."""
    import time

    import torch

    x = torch.randn(64, 64, device=device, dtype=dtype)
    sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)
    rounds = []
    for _ in range(6):
        sync()
        start = time.perf_counter()
        for _ in range(20):
            x = torch.nn.functional.silu(x @ x * 1e-3)
        sync()
        rounds.append((time.perf_counter() - start) / 60)  # three ops per iteration
    return sorted(rounds[1:])[2]


def make_plan(r, model_dir, device, dtype) -> Plan:
    """The plan for a resolved generate recipe on `device`, from the model's configs alone."""
    import torch

    from hvctl.models.info import meta_component
    from hvctl.models.loading import ModelFolder, quiet_libraries
    from hvctl.models.vae import latent_shape

    quiet_libraries()
    folder = ModelFolder.open(model_dir)
    weights, modules = {}, {}
    for name in ("transformer", "vae", "text_encoder", "text_encoder_2"):
        module = meta_component(folder, name).to(dtype)
        if name == "transformer":
            apply_weights_dtype(module, storage_dtype(r.weights_dtype, dtype), dtype)
        weights[name], modules[name] = weight_bytes(module), module
    config = modules["transformer"].config
    vae = folder.component_config("vae")
    channels, frames, height, width = latent_shape(vae, config.in_channels, r.frames, r.height, r.width)
    video_tokens = frames // config.patch_size_t * (height // config.patch_size) * (width // config.patch_size)
    tokens = video_tokens + r.text_len
    hidden = config.num_attention_heads * config.attention_head_dim
    passes = 2 if r.guidance_scale > 1 and not getattr(r, "cfg_parallel", False) else 1
    element = torch.finfo(dtype).bits // 8
    blocks = [*modules["transformer"].transformer_blocks, *modules["transformer"].single_transformer_blocks]
    block_params = sum(p.numel() for b in blocks for p in b.parameters())
    # Linear layers: 2 FLOPs per weight per token; attention: QK^T and AV, 2 * 2 * N^2 * D per block.
    step_flops = passes * (2 * block_params * tokens + 4 * tokens**2 * hidden * len(blocks))
    throughput = measure_matmul_flops(device, dtype, hidden, tokens)
    op_seconds = measure_op_seconds(device, dtype)
    # The embedders, the text refiner and the output layer count as a few more blocks.
    step_seconds = step_flops / (throughput * STEP_EFFICIENCY) + passes * (len(blocks) + 4) * OPS_PER_BLOCK * op_seconds

    tile = r.vae_tile_size if r.vae_tiling is not False else max(r.height, r.width)
    tile_frames = min(r.frames, 65)  # diffusers decodes long videos in chunks of 16 latent frames
    activations = {
        "denoise": passes * tokens * hidden * element * ACTIVATION_WIDTHS,
        "decode": vae["block_out_channels"][0] * tile_frames * min(tile, r.height) * min(tile, r.width) * element * VAE_WIDTHS,
        "encode_text": r.text_len * modules["text_encoder"].config.hidden_size * element * ACTIVATION_WIDTHS,
    }
    block_bytes = max(weight_bytes(b) for b in blocks)
    largest_leaf = max(weight_bytes(m) for module in modules.values() for m in module.modules()
                       if not list(m.children()))
    dit_rest = weights["transformer"] - sum(weight_bytes(b) for b in blocks)
    text = weights["text_encoder"] + weights["text_encoder_2"]
    peaks = {
        # none: every component resident until the text encoders leave after encoding
        "none": max(sum(weights.values()) + activations["encode_text"],
                    weights["transformer"] + weights["vae"] + max(activations["denoise"], activations["decode"])),
        "model": max(weights["text_encoder"] + activations["encode_text"], weights["transformer"] + activations["denoise"],
                     weights["vae"] + activations["decode"], text),
        # group: the DiT's own small modules, the running block and the one prefetched
        "group": max(weights["text_encoder"] + activations["encode_text"],
                     dit_rest + 2 * block_bytes + activations["denoise"], weights["vae"] + activations["decode"]),
        "sequential": largest_leaf + max(activations.values()),
    }
    return Plan(weights, activations, peaks, step_flops, throughput, op_seconds, step_seconds)


def device_memory(device) -> float | None:
    """Total memory of a CUDA device in bytes; None on the CPU."""
    import torch

    return torch.cuda.get_device_properties(device).total_memory if device.type == "cuda" else None


def choose_offload(plan: Plan, budget_bytes: float | None) -> str:
    """`--offload auto`: the least offload whose estimated peak fits (none on the CPU)."""
    if budget_bytes is None:
        return "none"
    for mode in ("none", "model", "group", "sequential"):
        if plan.peaks[mode] <= budget_bytes:
            return mode
    return "sequential"
