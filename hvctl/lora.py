"""LoRA adapters on the DiT: training (through peft), the file formats, loading for generation.

A LoRA file is diffusers' format, the one `HunyuanVideoPipeline.load_lora_weights` reads: one
safetensors file whose keys are `transformer.<module>.lora_A.weight` / `.lora_B.weight`. diffusers
reads no alpha from it (the scale is then 1), so the adapter's alpha / rank is folded into lora_B
when saving: the file means the same to every reader. The kohya format (`lora_unet_<module with
underscores>.lora_down.weight` / `.lora_up.weight` / `.alpha`), which ComfyUI and kohya's tools
read, is a renaming of the same tensors.
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


def load_loras(transformer, specs: list[tuple[Path, float]]) -> None:
    """Load LoRA files (diffusers or kohya format) into the transformer, each at its scale."""
    names = []
    for i, (path, scale) in enumerate(specs):
        weights = read_lora(path)
        if any(k.startswith("lora_unet_") for k in weights):
            weights = from_kohya(weights, transformer)
        before = sum(1 for n, _ in transformer.named_modules() if n.endswith(".lora_A"))
        name = f"lora_{i}"
        try:
            transformer.load_lora_adapter(weights, prefix=PREFIX.rstrip("."), adapter_name=name)
        except (ValueError, RuntimeError, KeyError) as e:
            raise HvctlError(f"{path}: does not fit this model's transformer ({str(e).splitlines()[0]})") from None
        if sum(1 for n, _ in transformer.named_modules() if n.endswith(".lora_A")) == before:
            raise HvctlError(f"{path}: no key names a module of this model's transformer (a LoRA for another model?)")
        names.append(name)
    if names:
        transformer.set_adapters(names, [scale for _, scale in specs])


def merged_into(module, weights: dict):
    """`module` with the LoRA's update added into its weights, adapter layers removed."""
    module.load_lora_adapter(weights, prefix=PREFIX.rstrip("."), adapter_name="merge")
    module.fuse_lora(lora_scale=1.0)
    module.unload_lora()
    return module


# --- the kohya format -------------------------------------------------------------------------


def to_kohya(weights: dict) -> dict:
    """diffusers -> kohya: lora_unet_<module, dots as underscores>.lora_down/.lora_up/.alpha.
    alpha is written as the rank, since the file's scale is already folded in."""
    import torch

    out = {}
    for key, value in weights.items():
        match = re.fullmatch(r"transformer\.(.+)\.lora_([AB])\.weight", key)
        if not match:
            raise HvctlError(f"LoRA key {key!r} is not in diffusers' format (transformer.<module>.lora_A/B.weight)")
        module = "lora_unet_" + match.group(1).replace(".", "_")
        out[f"{module}.{'lora_down' if match.group(2) == 'A' else 'lora_up'}.weight"] = value
        if match.group(2) == "A":
            out[f"{module}.alpha"] = torch.tensor(float(value.shape[0]))
    return out


def from_kohya(weights: dict, transformer) -> dict:
    """kohya -> diffusers, module names recovered from the transformer's own (underscores are
    ambiguous: to_out_0 is to_out.0); alpha / rank folded into lora_B."""
    by_flat = {"lora_unet_" + name.replace(".", "_"): name for name, _ in transformer.named_modules()}
    out = {}
    for key, value in weights.items():
        module, _, kind = key.partition(".")
        if kind == "alpha":
            continue
        if module not in by_flat:
            raise HvctlError(f"kohya LoRA key {key!r} names no module of this model's transformer")
        if kind == "lora_down.weight":
            out[f"{PREFIX}{by_flat[module]}.lora_A.weight"] = value
        elif kind == "lora_up.weight":
            alpha = weights.get(f"{module}.alpha")
            rank = weights[f"{module}.lora_down.weight"].shape[0]
            scale = float(alpha) / rank if alpha is not None else 1.0
            out[f"{PREFIX}{by_flat[module]}.lora_B.weight"] = value * scale
        else:
            raise HvctlError(f"kohya LoRA key {key!r}: expected lora_down.weight, lora_up.weight or alpha")
    return out
