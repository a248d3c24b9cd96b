"""The official HunyuanVideo checkpoint names (Tencent's `hyvideo/modules/models.py`) and diffusers'
`HunyuanVideoTransformer3DModel` names: one mapping, used by `hvctl model convert` and by anything
else that meets official names (LoRA files of musubi-tuner and ComfyUI).

API
- `diffusers_module_to_official(name) -> (official_name, split_index_or_None)`: a diffusers
  module name (no `.weight`/`.bias`) to its official module. A split index means the official
  module is fused: its output rows stack the diffusers modules of `official_module_to_diffusers`
  in that order, and this module's rows are part `split_index` (q, k, v of `img_attn_qkv`,
  `txt_attn_qkv`, `self_attn_qkv`; q, k, v, MLP-in of a single block's `linear1`).
- `official_module_to_diffusers(name) -> [diffusers names]`: the inverse; several names for a
  fused module, in row order. Each part has as many rows as its diffusers module has outputs.
- `HALVES_SWAPPED`: diffusers modules whose output halves are in the other order in the
  official model: the final layer's adaLN is (shift, scale) there and (scale, shift) in diffusers.
- `official_to_diffusers(state_dict) -> state_dict` and `diffusers_to_official(state_dict) ->
  state_dict`: whole transformer state dicts, exact (splits and concatenations only); an unknown
  key raises HvctlError.
- `transformer_config(state_dict, defaults) -> dict`: the diffusers config of an official
  checkpoint, every size read from its shapes; `defaults` gives what shapes cannot say (rope
  axes, rope theta, the i2v design when the input is not 2C+1 channels).
- `strip_vae_prefix(state_dict)`, `vae_config(state_dict, defaults)`, and `diffusers_vae_config`
  / `official_vae_config` (the config.json of one side from the other's): the VAE. The
  official 884-16c-hy VAE (`AutoencoderKLCausal3D`) uses diffusers' own parameter names, so its
  weights need no renaming (diffusers' conversion script renames nothing either); only a
  `vae.` prefix, if any, is dropped, and the config is translated.
"""

from __future__ import annotations

import re

from hvctl.errors import HvctlError

# Inside one dual-stream block: diffusers `transformer_blocks.N.<key>` -> official `double_blocks.N.<value>`.
_DOUBLE = {
    "norm1.linear": ("img_mod.linear", None),
    "norm1_context.linear": ("txt_mod.linear", None),
    "attn.to_q": ("img_attn_qkv", 0),
    "attn.to_k": ("img_attn_qkv", 1),
    "attn.to_v": ("img_attn_qkv", 2),
    "attn.add_q_proj": ("txt_attn_qkv", 0),
    "attn.add_k_proj": ("txt_attn_qkv", 1),
    "attn.add_v_proj": ("txt_attn_qkv", 2),
    "attn.norm_q": ("img_attn_q_norm", None),
    "attn.norm_k": ("img_attn_k_norm", None),
    "attn.norm_added_q": ("txt_attn_q_norm", None),
    "attn.norm_added_k": ("txt_attn_k_norm", None),
    "attn.to_out.0": ("img_attn_proj", None),
    "attn.to_add_out": ("txt_attn_proj", None),
    "ff.net.0.proj": ("img_mlp.fc1", None),
    "ff.net.2": ("img_mlp.fc2", None),
    "ff_context.net.0.proj": ("txt_mlp.fc1", None),
    "ff_context.net.2": ("txt_mlp.fc2", None),
}
# Inside one single-stream block: `linear1` is q, k, v and the MLP input; `linear2` their output.
_SINGLE = {
    "attn.to_q": ("linear1", 0),
    "attn.to_k": ("linear1", 1),
    "attn.to_v": ("linear1", 2),
    "proj_mlp": ("linear1", 3),
    "proj_out": ("linear2", None),
    "attn.norm_q": ("q_norm", None),
    "attn.norm_k": ("k_norm", None),
    "norm.linear": ("modulation.linear", None),
}
# Inside one token-refiner block (the text input's bidirectional refiner).
_REFINER = {
    "norm1": ("norm1", None),
    "norm2": ("norm2", None),
    "attn.to_q": ("self_attn_qkv", 0),
    "attn.to_k": ("self_attn_qkv", 1),
    "attn.to_v": ("self_attn_qkv", 2),
    "attn.to_out.0": ("self_attn_proj", None),
    "ff.net.0.proj": ("mlp.fc1", None),
    "ff.net.2": ("mlp.fc2", None),
    "norm_out.linear": ("adaLN_modulation.1", None),
}
_TOP = {
    "x_embedder.proj": "img_in.proj",
    "time_text_embed.timestep_embedder.linear_1": "time_in.mlp.0",
    "time_text_embed.timestep_embedder.linear_2": "time_in.mlp.2",
    "time_text_embed.guidance_embedder.linear_1": "guidance_in.mlp.0",
    "time_text_embed.guidance_embedder.linear_2": "guidance_in.mlp.2",
    "time_text_embed.text_embedder.linear_1": "vector_in.in_layer",
    "time_text_embed.text_embedder.linear_2": "vector_in.out_layer",
    "context_embedder.proj_in": "txt_in.input_embedder",
    "context_embedder.time_text_embed.timestep_embedder.linear_1": "txt_in.t_embedder.mlp.0",
    "context_embedder.time_text_embed.timestep_embedder.linear_2": "txt_in.t_embedder.mlp.2",
    "context_embedder.time_text_embed.text_embedder.linear_1": "txt_in.c_embedder.linear_1",
    "context_embedder.time_text_embed.text_embedder.linear_2": "txt_in.c_embedder.linear_2",
    "norm_out.linear": "final_layer.adaLN_modulation.1",
    "proj_out": "final_layer.linear",
}
_BLOCKS = (  # (diffusers prefix, official prefix, the names inside a block)
    ("transformer_blocks", "double_blocks", _DOUBLE),
    ("single_transformer_blocks", "single_blocks", _SINGLE),
    ("context_embedder.token_refiner.refiner_blocks", "txt_in.individual_token_refiner.blocks", _REFINER),
)
HALVES_SWAPPED = frozenset({"norm_out.linear"})
_FROM_OFFICIAL_TOP = {v: k for k, v in _TOP.items()}


def diffusers_module_to_official(name: str) -> tuple[str, int | None]:
    """A diffusers transformer module name to (official module name, part index in a fused module or None)."""
    if name in _TOP:
        return _TOP[name], None
    for ours, theirs, inner in _BLOCKS:
        match = re.fullmatch(rf"{re.escape(ours)}\.(\d+)\.(.+)", name)
        if match and match.group(2) in inner:
            official, part = inner[match.group(2)]
            return f"{theirs}.{match.group(1)}.{official}", part
    raise HvctlError(f"{name}: not a HunyuanVideo transformer module")


def official_module_to_diffusers(name: str) -> list[str]:
    """An official module name to its diffusers module names: one, or a fused module's parts in row order."""
    if name in _FROM_OFFICIAL_TOP:
        return [_FROM_OFFICIAL_TOP[name]]
    for ours, theirs, inner in _BLOCKS:
        match = re.fullmatch(rf"{re.escape(theirs)}\.(\d+)\.(.+)", name)
        if match:
            parts = sorted((part or 0, key) for key, (official, part) in inner.items() if official == match.group(2))
            if parts:
                return [f"{ours}.{match.group(1)}.{key}" for _, key in parts]
    raise HvctlError(f"{name}: not an official HunyuanVideo transformer module")


def _split_key(key: str) -> tuple[str, str]:
    module, _, param = key.rpartition(".")
    if not module:
        raise HvctlError(f"{key}: not a module parameter")
    return module, param


def _swap_halves(tensor):
    import torch

    first, second = tensor.chunk(2, dim=0)
    return torch.cat([second, first], dim=0)


def official_to_diffusers(state_dict: dict) -> dict:
    """An official transformer state dict in diffusers' names; fused modules split, the final adaLN reordered."""
    hidden = _hidden_size(state_dict)
    out = {}
    for key, tensor in state_dict.items():
        module, param = _split_key(key)
        try:
            names = official_module_to_diffusers(module)
        except HvctlError:
            raise HvctlError(f"{key}: not an official HunyuanVideo transformer weight") from None
        if len(names) == 1:
            parts = [tensor]
        elif len(names) == 3:
            parts = tensor.chunk(3, dim=0)
        else:  # linear1: q, k, v of the hidden size, then the MLP input
            parts = tensor.split([hidden, hidden, hidden, tensor.shape[0] - 3 * hidden], dim=0)
        for name, part in zip(names, parts):
            out[f"{name}.{param}"] = _swap_halves(part) if name in HALVES_SWAPPED else part
    return out


def diffusers_to_official(state_dict: dict) -> dict:
    """A diffusers transformer state dict in the official names; the fused modules concatenated."""
    import torch

    fused: dict[str, dict[int, object]] = {}
    out = {}
    for key, tensor in state_dict.items():
        module, param = _split_key(key)
        try:
            official, part = diffusers_module_to_official(module)
        except HvctlError:
            raise HvctlError(f"{key}: not a HunyuanVideo transformer weight") from None
        if part is None:
            out[f"{official}.{param}"] = _swap_halves(tensor) if module in HALVES_SWAPPED else tensor
        else:
            fused.setdefault(f"{official}.{param}", {})[part] = tensor
    for key, parts in fused.items():
        expected = len(official_module_to_diffusers(key.rpartition(".")[0]))
        if sorted(parts) != list(range(expected)):
            missing = official_module_to_diffusers(key.rpartition(".")[0])
            raise HvctlError(f"{key}: needs all of {', '.join(missing)}; some are missing")
        out[key] = torch.cat([parts[i] for i in range(expected)], dim=0)
    return dict(sorted(out.items()))


def _hidden_size(state_dict: dict) -> int:
    if "img_in.proj.weight" not in state_dict:
        raise HvctlError("img_in.proj.weight missing: not an official HunyuanVideo transformer checkpoint")
    return state_dict["img_in.proj.weight"].shape[0]


def _count(state_dict: dict, prefix: str) -> int:
    indices = {int(m.group(1)) for k in state_dict if (m := re.match(rf"{re.escape(prefix)}\.(\d+)\.", k))}
    if indices != set(range(len(indices))):
        raise HvctlError(f"{prefix}: block numbers {sorted(indices)} are not 0..{len(indices) - 1}")
    return len(indices)


def transformer_config(state_dict: dict, defaults: dict | None = None) -> dict:
    """The diffusers config of an official transformer checkpoint. Sizes come from the shapes;
    `defaults` (a diffusers config) gives rope_axes_dim, rope_theta and image_condition_type."""
    defaults = defaults or {}
    need = ["img_in.proj.weight", "txt_in.input_embedder.weight", "vector_in.in_layer.weight", "final_layer.linear.weight"]
    missing = [k for k in need if k not in state_dict]
    if missing:
        raise HvctlError(f"{', '.join(missing)} missing: not an official HunyuanVideo transformer checkpoint")
    hidden, in_channels, patch_t, patch, _ = state_dict["img_in.proj.weight"].shape
    norm = next((k for k in ("double_blocks.0.img_attn_q_norm.weight", "single_blocks.0.q_norm.weight") if k in state_dict), None)
    if norm is None:
        raise HvctlError("no q/k norm weights (img_attn_q_norm): diffusers' HunyuanVideo needs RMS q/k norm")
    head_dim = state_dict[norm].shape[0]
    num_layers, num_single = _count(state_dict, "double_blocks"), _count(state_dict, "single_blocks")
    if num_layers:
        mlp = state_dict["double_blocks.0.img_mlp.fc1.weight"].shape[0]
    elif num_single:
        mlp = state_dict["single_blocks.0.linear1.weight"].shape[0] - 3 * hidden
    else:
        raise HvctlError("no double_blocks or single_blocks: not an official HunyuanVideo transformer checkpoint")
    out_channels = state_dict["final_layer.linear.weight"].shape[0] // (patch_t * patch * patch)
    condition = defaults.get("image_condition_type")
    if in_channels == 2 * out_channels + 1:
        condition = "latent_concat"
    elif condition == "latent_concat":
        condition = None  # the defaults' model concatenated; this one has no room for the image
    rope = list(defaults.get("rope_axes_dim") or [])
    if sum(rope) != head_dim:
        if head_dim != 128:
            raise HvctlError(f"the checkpoint's attention head dim is {head_dim}; the base transformer's rope_axes_dim "
                             f"{rope} does not sum to it (the official [16, 56, 56] is for 128)")
        rope = [16, 56, 56]
    return {
        "in_channels": in_channels, "out_channels": out_channels,
        "num_attention_heads": hidden // head_dim, "attention_head_dim": head_dim,
        "num_layers": num_layers, "num_single_layers": num_single,
        "num_refiner_layers": _count(state_dict, "txt_in.individual_token_refiner.blocks"),
        "mlp_ratio": mlp / hidden, "patch_size": patch, "patch_size_t": patch_t, "qk_norm": "rms_norm",
        "guidance_embeds": "guidance_in.mlp.0.weight" in state_dict,
        "text_embed_dim": state_dict["txt_in.input_embedder.weight"].shape[1],
        "pooled_projection_dim": state_dict["vector_in.in_layer.weight"].shape[1],
        "rope_theta": float(defaults.get("rope_theta", 256.0)), "rope_axes_dim": rope,
        "image_condition_type": condition,
    }


def strip_vae_prefix(state_dict: dict) -> dict:
    """The official loader keeps only `vae.`-prefixed keys when there are any, without the prefix."""
    if any(k.startswith("vae.") for k in state_dict):
        return {k[len("vae."):]: v for k, v in state_dict.items() if k.startswith("vae.")}
    return state_dict


def vae_config(state_dict: dict, defaults: dict | None = None) -> dict:
    """The diffusers AutoencoderKLHunyuanVideo config of an official VAE. Channels, depth and the
    spatial compression come from the shapes; `defaults` (a diffusers config, or an official one
    translated by `diffusers_vae_config`) gives the rest (groups, scaling factor, time compression)."""
    defaults = defaults or {}
    if "encoder.conv_in.conv.weight" not in state_dict or "decoder.conv_out.conv.weight" not in state_dict:
        raise HvctlError("encoder.conv_in.conv.weight or decoder.conv_out.conv.weight missing: not a HunyuanVideo VAE")
    blocks = _count(state_dict, "encoder.down_blocks")
    channels = [state_dict[f"encoder.down_blocks.{i}.resnets.0.conv1.conv.weight"].shape[0] for i in range(blocks)]
    downsampling = sum(f"encoder.down_blocks.{i}.downsamplers.0.conv.conv.weight" in state_dict for i in range(blocks))
    config = {
        "in_channels": state_dict["encoder.conv_in.conv.weight"].shape[1],
        "out_channels": state_dict["decoder.conv_out.conv.weight"].shape[0],
        "latent_channels": state_dict["decoder.conv_in.conv.weight"].shape[1],
        "down_block_types": ["HunyuanVideoDownBlock3D"] * blocks,
        "up_block_types": ["HunyuanVideoUpBlock3D"] * blocks,
        "block_out_channels": channels,
        "layers_per_block": _count(state_dict, "encoder.down_blocks.0.resnets"),
        "spatial_compression_ratio": 2 ** downsampling,
        "mid_block_add_attention": "encoder.mid_block.attentions.0.to_q.weight" in state_dict,
    }
    for key, value in (("act_fn", "silu"), ("norm_num_groups", 32), ("scaling_factor", 0.476986),
                       ("temporal_compression_ratio", 4)):
        config[key] = defaults.get(key, value)
    return config


def diffusers_vae_config(official: dict) -> dict:
    """The parts of an official AutoencoderKLCausal3D config.json that diffusers' config keeps."""
    keys = {"act_fn": "act_fn", "norm_num_groups": "norm_num_groups", "scaling_factor": "scaling_factor",
            "time_compression_ratio": "temporal_compression_ratio"}
    return {ours: official[theirs] for theirs, ours in keys.items() if theirs in official}


def official_vae_config(config: dict) -> dict:
    """An official AutoencoderKLCausal3D config.json for a diffusers AutoencoderKLHunyuanVideo config."""
    blocks = len(config["block_out_channels"])
    return {
        "_class_name": "AutoencoderKLCausal3D",
        "in_channels": config["in_channels"], "out_channels": config["out_channels"],
        "down_block_types": ["DownEncoderBlockCausal3D"] * blocks, "up_block_types": ["UpDecoderBlockCausal3D"] * blocks,
        "block_out_channels": list(config["block_out_channels"]), "layers_per_block": config["layers_per_block"],
        "act_fn": config["act_fn"], "latent_channels": config["latent_channels"],
        "norm_num_groups": config["norm_num_groups"], "scaling_factor": config["scaling_factor"],
        "spatial_compression_ratio": config["spatial_compression_ratio"],
        "time_compression_ratio": config["temporal_compression_ratio"],
        "mid_block_add_attention": config["mid_block_add_attention"],
    }
