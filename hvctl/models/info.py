"""`hvctl model info`: what a model folder holds, read from configs and safetensors headers only."""

from __future__ import annotations

import importlib
import json
import struct
from math import prod
from pathlib import Path

from hvctl.errors import HvctlError
from hvctl.models.loading import WEIGHTED, ModelFolder

KEY_CONFIG = {
    "transformer": ["in_channels", "num_attention_heads", "attention_head_dim", "num_layers", "num_single_layers",
                    "num_refiner_layers", "patch_size", "patch_size_t", "guidance_embeds", "text_embed_dim",
                    "pooled_projection_dim", "rope_axes_dim", "image_condition_type"],
    "vae": ["latent_channels", "block_out_channels", "spatial_compression_ratio", "temporal_compression_ratio",
            "scaling_factor"],
    "text_encoder": ["hidden_size", "num_hidden_layers", "num_attention_heads", "vocab_size"],
    "text_encoder_2": ["hidden_size", "num_hidden_layers", "projection_dim", "vocab_size"],
    "scheduler": ["shift", "num_train_timesteps"],
}


def safetensors_parameter_count(folder: Path) -> tuple[int, dict[str, int]]:
    """Parameters and their count per dtype, from the headers of every .safetensors file in a folder."""
    total, by_dtype = 0, {}
    files = sorted(folder.glob("*.safetensors"))
    if not files:
        raise HvctlError(f"{folder}: no .safetensors weights (the folder says it has weights)")
    for file in files:
        header = safetensors_header(file)
        for name, entry in header.items():
            if name == "__metadata__":
                continue
            n = prod(entry["shape"])
            total += n
            by_dtype[entry["dtype"]] = by_dtype.get(entry["dtype"], 0) + n
    return total, by_dtype


def safetensors_header(file: Path) -> dict:
    """A safetensors file's header, checked against the file's size: a truncated or padded file
    (an interrupted copy or download) is an error here, not a crash at load time."""
    size = file.stat().st_size
    try:
        with open(file, "rb") as f:
            (header_len,) = struct.unpack("<Q", f.read(8))
            if 8 + header_len > size:
                raise ValueError(f"its header claims {header_len} bytes")
            header = json.loads(f.read(header_len))
        ends = [entry["data_offsets"][1] for name, entry in header.items() if name != "__metadata__"]
    except (struct.error, ValueError, KeyError, TypeError, IndexError) as e:
        raise HvctlError(f"{file}: not a valid safetensors file ({size} bytes; {e})") from None
    expected = 8 + header_len + max(ends, default=0)
    if expected != size:
        raise HvctlError(f"{file}: {'truncated' if size < expected else 'has trailing bytes'}: the header describes "
                         f"{expected} bytes, the file has {size}")
    return header


def meta_component(folder: ModelFolder, name: str):
    """A component built on the meta device from its config alone (no weights needed)."""
    import torch

    library, class_name = folder.component_class(name)
    cls = getattr(importlib.import_module(library), class_name)
    config = folder.component_config(name)
    with torch.device("meta"):
        if library == "diffusers":
            return cls.from_config(config)
        return cls(cls.config_class.from_dict(config))


def meta_parameter_count(folder: ModelFolder, name: str) -> int:
    """Parameters of a component built on the meta device from its config alone (no weights needed)."""
    return sum(p.numel() for p in meta_component(folder, name).parameters())


def describe(path) -> dict:
    folder = ModelFolder.open(path)
    components = {}
    names = ["transformer", "vae", "text_encoder", "text_encoder_2", "scheduler", "tokenizer", "tokenizer_2"]
    for name in names + (["image_processor"] if folder.reads_images else []):
        library, class_name = folder.component_class(name)
        entry = {"class": f"{library}.{class_name}"}
        if name in WEIGHTED:
            if folder.has_weights:
                entry["parameters"], entry["dtypes"] = safetensors_parameter_count(folder.path / name)
            else:
                entry["parameters"], entry["dtypes"] = meta_parameter_count(folder, name), {}
        if name in KEY_CONFIG:
            config = folder.component_config(name)
            entry["config"] = {k: config[k] for k in KEY_CONFIG[name] if k in config}
        components[name] = entry
    return {
        "path": str(folder.path),
        "weights": folder.has_weights,
        "parameters": sum(c.get("parameters", 0) for c in components.values()),
        "components": components,
        "generation_defaults": folder.generation_defaults,
        "preset": folder.hvctl_info.get("preset"),
    }
