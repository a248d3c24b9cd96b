"""LoRA adapters on the DiT: training (through peft), the file formats, loading for generation.

A LoRA file hvctl writes is diffusers' format, the one `HunyuanVideoPipeline.load_lora_weights`
reads: one safetensors file whose keys are `transformer.<module>.lora_A.weight` / `.lora_B.weight`.
diffusers reads no alpha from it (the scale is then 1), so the adapter's alpha / rank is folded into
lora_B when saving: the file means the same to every reader. hvctl reads and writes the other
tools' formats (musubi-tuner/kohya, ComfyUI, official I2V) through hvctl/lora_formats.py.
"""

from __future__ import annotations

import math
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import ClassVar

from hvctl.errors import HvctlError

# The attention projections of both the dual-stream blocks (image and text streams) and the
# single-stream blocks: where diffusers' and musubi-tuner's HunyuanVideo LoRAs go.
DEFAULT_TARGETS = ["to_q", "to_k", "to_v", "to_out.0", "add_q_proj", "add_k_proj", "add_v_proj", "to_add_out"]
PREFIX = "transformer."


@dataclass
class LoraSettings:
    LIMITS: ClassVar[dict] = {"rank": ">= 1", "alpha": "> 0", "dropout": "[0, 1)"}
    rank: int = 16
    alpha: float = 16.0  # the update is scaled by alpha / rank
    dropout: float = 0.0
    target_modules: list[str] = field(default_factory=lambda: list(DEFAULT_TARGETS))
    # Start the adapter from this LoRA file (any format hvctl reads: diffusers, musubi/kohya,
    # ComfyUI, official I2V) instead of zero: its rank per module must be `rank`.
    init: Path | None = None


def add_lora(model, s: LoraSettings) -> None:
    """Freeze the model and add one trainable LoRA adapter to the target modules (zero update at start)."""
    from peft import LoraConfig

    if s.rank < 1 or s.alpha <= 0 or not 0 <= s.dropout < 1:
        raise HvctlError(f"lora: rank must be >= 1, alpha > 0 and 0 <= dropout < 1, got {s.rank}, {s.alpha}, {s.dropout}")
    names = {name.rsplit(".", 1)[-1] for name, _ in model.named_modules()} | {name for name, _ in model.named_modules()}
    missing = [t for t in s.target_modules if not any(n == t or n.endswith("." + t) for n in names)]
    if missing:
        raise HvctlError(f"lora.target_modules: {', '.join(missing)} names no module of the {type(model).__name__}")
    model.requires_grad_(False)
    model.add_adapter(LoraConfig(r=s.rank, lora_alpha=s.alpha, lora_dropout=s.dropout, target_modules=s.target_modules,
                                 init_lora_weights=True))


def init_lora_from_file(model, s: LoraSettings) -> dict:
    """Set the adapter that `add_lora` gave `model` to the LoRA in file `s.init`; returns what was
    read (format, modules). Its update becomes exactly the file's (alpha / rank unfolded from lora_B);
    target modules the file does not name keep their zero update."""
    import torch

    from hvctl.lora_formats import FORMATS, official_modules, to_diffusers

    try:
        weights, fmt = to_diffusers(read_lora(s.init), model, official_modules(model))
    except HvctlError as e:
        raise HvctlError(f"lora.init: {s.init}: {e}") from None
    params = dict(model.named_parameters())
    scale = s.alpha / s.rank
    modules = set()
    for key, value in weights.items():
        module, _, kind = key.removeprefix(PREFIX).rpartition(".lora_")
        target = f"{module}.lora_{kind.split('.')[0]}.default.weight"
        if target not in params:
            raise HvctlError(f"lora.init: {s.init}: adapts {module}, which is not among lora.target_modules")
        if params[target].shape != value.shape:
            raise HvctlError(f"lora.init: {s.init}: {module} has shape {tuple(value.shape)}, the adapter "
                             f"{tuple(params[target].shape)} (lora.rank {s.rank})")
        with torch.no_grad():
            params[target].copy_(value / scale if kind.startswith("B") else value)
        modules.add(module)
    return {"path": str(s.init), "format": FORMATS[fmt], "modules": len(modules)}


def lora_state_dict(model, s: LoraSettings, state: dict | None = None) -> dict:
    """The adapter in diffusers' file format, alpha / rank folded into lora_B. `state`: the model's
    full state dict when it is already gathered (FSDP); else read from the model."""
    import torch
    from peft import get_peft_model_state_dict

    weights = get_peft_model_state_dict(model, state_dict=state)
    scale = s.alpha / s.rank
    return {PREFIX + k: (v * scale if ".lora_B." in k else v).to(torch.float32).contiguous() for k, v in weights.items()}


def save_lora(path: Path, weights: dict) -> Path:
    from safetensors.torch import save_file

    from hvctl.io import atomic_output

    with atomic_output(path) as tmp:
        save_file(weights, str(tmp), metadata={"format": "pt", "hvctl": "diffusers lora, alpha folded into lora_B"})
    return path


def read_lora(path: Path) -> dict:
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    if not Path(path).is_file():
        raise HvctlError(f"{path}: no such LoRA file")
    try:
        return load_file(str(path))
    except (SafetensorError, OSError) as e:
        raise HvctlError(f"{path}: not a safetensors LoRA file ({e})") from None


def parse_lora_spec(spec: str) -> tuple[Path, float]:
    """FILE or FILE:SCALE; a scale that is not a finite number is an error (a file named so is kept whole)."""
    path, sep, scale = spec.rpartition(":")
    if not sep or not path or Path(spec).is_file() or "/" in scale:
        return Path(spec), 1.0
    try:
        value = float(scale)
    except ValueError:
        raise HvctlError(f"--lora {spec}: scale {scale!r} is not a number (give FILE or FILE:SCALE)") from None
    if not math.isfinite(value):
        raise HvctlError(f"--lora {spec}: scale must be a finite number, got {scale}")
    return Path(path), value


def check_lora_spec(spec: str) -> None:
    """A --lora spec names an existing file and a good scale: checked before any model loads."""
    path, _ = parse_lora_spec(spec)
    if not path.is_file():
        raise HvctlError(f"--lora {path}: no such LoRA file")


def load_loras(transformer, specs: list[tuple[Path, float]]) -> list[dict]:
    """Load LoRA files of any known format (hvctl/lora_formats.py) into the transformer, each at its
    scale; returns what was loaded: path, format, modules."""
    from hvctl.lora_formats import FORMATS, official_modules, to_diffusers

    table = official_modules(transformer)  # before any adapter wraps the modules
    names, loaded = [], []
    for i, (path, scale) in enumerate(specs):
        try:
            weights, fmt = to_diffusers(read_lora(path), transformer, table)
        except HvctlError as e:
            raise HvctlError(f"{path}: {e}") from None
        name = f"lora_{i}"
        try:
            transformer.load_lora_adapter(weights, prefix=PREFIX.rstrip("."), adapter_name=name)
        except (ValueError, RuntimeError, KeyError) as e:
            raise HvctlError(f"{path}: does not fit this model's transformer ({str(e).splitlines()[0]})") from None
        modules = sum(1 for m in transformer.modules() if name in getattr(m, "lora_A", {}))
        if not modules:
            raise HvctlError(f"{path}: no key names a module of this model's transformer (a LoRA for another model?)")
        names.append(name)
        loaded.append({"path": str(path), "format": FORMATS[fmt], "modules": modules, "scale": scale})
    if names:
        transformer.set_adapters(names, [scale for _, scale in specs])
    return loaded


def convert_lora(weights: dict, to: str, transformer) -> tuple[dict, str]:
    """A LoRA file's tensors in format `to` (diffusers, musubi/kohya or comfyui), and the format
    they came in. `transformer`: the model the LoRA is for (its module names and shapes; meta is enough)."""
    from hvctl.lora_formats import FORMATS, from_diffusers, official_modules, to_diffusers

    table = official_modules(transformer)
    diffusers, source = to_diffusers(weights, transformer, table)
    if to == "diffusers":
        return diffusers, FORMATS[source]
    return from_diffusers(diffusers, "musubi" if to == "kohya" else to, table), FORMATS[source]


def convert_lora_file(source: Path, out: Path, to: str, model: Path | None = None, on_warning=None) -> dict:
    """`hvctl lora convert`: read a LoRA file in any format, write it in format `to` for the model
    folder `model` (its transformer's module names and shapes; default: the embedded model).
    on_warning(message) hears what the target tool will not load."""
    from hvctl.io import check_not_input, check_output_file

    if to not in ("diffusers", "musubi", "kohya", "comfyui"):
        raise HvctlError(f"--to {to}: choose diffusers, musubi (or kohya) or comfyui")
    check_output_file(out, "OUT")
    check_not_input(out, [source], "OUT")
    import torch  # after the checks: a bad flag answers at once

    from hvctl.models.loading import ModelFolder, component_from_config, prepare_model

    weights = read_lora(source)
    model_dir, _ = prepare_model(model)
    with torch.device("meta"):  # the module names and shapes only: no memory, even for 13B
        transformer = component_from_config(ModelFolder.open(model_dir), "transformer")
    try:
        converted, source_format = convert_lora(weights, to, transformer)
    except HvctlError as e:
        raise HvctlError(f"{source}: {e}") from None
    if to in ("musubi", "kohya") and on_warning:  # musubi-tuner adapts the double and single blocks alone
        outside = sorted({k.split(".")[0] for k in converted if not k.startswith(("lora_unet_double_blocks_", "lora_unet_single_blocks_"))})
        if outside:
            on_warning(f"musubi-tuner loads no module outside the double/single blocks: {len(outside)} of this "
                       f"LoRA's ({outside[0]}, ...) are ignored there")
    save_lora(out, converted)
    return {"source": str(source), "source_format": source_format, "out": str(out), "format": to, "tensors": len(converted)}


def merged_into(module, weights: dict):
    """`module` with the LoRA's update added into its weights, adapter layers removed."""
    module.load_lora_adapter(weights, prefix=PREFIX.rstrip("."), adapter_name="merge")
    module.fuse_lora(lora_scale=1.0)
    module.unload_lora()
    return module
