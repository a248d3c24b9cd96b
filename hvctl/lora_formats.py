"""The HunyuanVideo ecosystem's LoRA file formats, read into and written from hvctl's own (diffusers').

| format        | keys of one module                                                   | written by                 |
|---------------|----------------------------------------------------------------------|----------------------------|
| diffusers     | `transformer.<diffusers module>.lora_A.weight` / `.lora_B.weight`    | hvctl, diffusers, PEFT     |
| musubi        | `lora_unet_<official module, dots as _>.lora_down.weight` / `.lora_up.weight` / `.alpha` | musubi-tuner, kohya |
| comfyui       | `diffusion_model.<official module>.lora_A.weight` / `.lora_B.weight` (or lora_down/up + alpha) | ComfyUI, diffusion-pipe (`transformer.<official>`) |
| official-i2v  | `Hunyuan_video_I2V_lora_<official module, dots as _>.lora_down/.lora_up` | Tencent's HunyuanVideo-I2V |

The official module names (Tencent's `hyvideo/modules/models.py`, which musubi-tuner and ComfyUI
keep) fuse what diffusers keeps apart: `img_attn_qkv` stacks the rows of `to_q`, `to_k`, `to_v`;
`linear1` those of `to_q`, `to_k`, `to_v`, `proj_mlp`. A fused adapter is written as the
block-diagonal stack of the parts' adapters (rank = the sum of theirs), whose product is exactly
theirs stacked. Read back, a fused adapter splits by blocks when it is block diagonal; otherwise each
part keeps the whole lora_down with its own rows of lora_up, which is exact too.

The module names come from hvctl/models/official.py, the checkpoint converter's mapping.
"""

from __future__ import annotations

import re

from hvctl.errors import HvctlError

OFFICIAL_ROOTS = ("double_blocks.", "single_blocks.", "txt_in.", "time_in.", "vector_in.", "guidance_in.", "final_layer.", "img_in.")
# ComfyUI's own module names (its model keeps Flux's) for the official ones.
COMFY_INTERNAL = [("_attn.qkv", "_attn_qkv"), ("_attn.proj", "_attn_proj"), ("_mod.lin", "_mod.linear"),
                  ("_mlp.0", "_mlp.fc1"), ("_mlp.2", "_mlp.fc2"), ("modulation.lin", "modulation.linear")]

FORMATS = {"diffusers": "diffusers/PEFT", "musubi": "musubi-tuner/kohya", "comfyui": "ComfyUI",
           "official-i2v": "official I2V"}
KINDS = {"lora_A.weight": "down", "lora_A.default.weight": "down", "lora_down.weight": "down",
         "lora_B.weight": "up", "lora_B.default.weight": "up", "lora_up.weight": "up", "alpha": "alpha"}
KEY = re.compile(r"(.+?)\.(" + "|".join(re.escape(k) for k in KINDS) + r")")
DIFFUSERS_PREFIXES = ("transformer.", "base_model.model.")
MUSUBI_PREFIX = "lora_unet_"
OFFICIAL_I2V_PREFIX = "Hunyuan_video_I2V_lora_"


def official_modules(transformer) -> dict[str, list[tuple[str, int]]]:
    """Official module name -> [(diffusers module, its output rows)] in row order, for the Linear
    modules this transformer has (the names from hvctl/models/official.py). The final layer's
    adaLN (norm_out.linear) is left out: its two halves are in swapped order."""
    import torch

    from hvctl.models.official import HALVES_SWAPPED, diffusers_module_to_official

    parts: dict[str, list[tuple[int, str, int]]] = {}
    for name, module in transformer.named_modules():
        if not isinstance(module, torch.nn.Linear) or ".lora_" in name:
            continue
        name = name.removesuffix(".base_layer")
        if name in HALVES_SWAPPED:
            continue
        try:
            official, part = diffusers_module_to_official(name)
        except HvctlError:  # a module the official model does not have (e.g. hvctl's conditioners)
            continue
        parts.setdefault(official, []).append((part or 0, name, module.out_features))
    return {official: [(name, rows) for _, name, rows in sorted(found)] for official, found in parts.items()}


# --- reading ---------------------------------------------------------------------------------


def detect_format(weights: dict) -> str:
    """The format of a LoRA file, from its keys alone."""
    modules = []
    for key in weights:
        match = KEY.fullmatch(key)
        if not match:
            raise _no_format(f"key {key!r} ends in none of {', '.join(KINDS)}")
        modules.append(match.group(1))
    if not modules:
        raise _no_format("it holds no tensor")
    if all(m.startswith(OFFICIAL_I2V_PREFIX) for m in modules):
        return "official-i2v"
    if all(m.startswith(MUSUBI_PREFIX) for m in modules):
        return "musubi"
    if all(m.startswith("diffusion_model.") or (_strip(m, DIFFUSERS_PREFIXES).startswith(OFFICIAL_ROOTS)) for m in modules):
        return "comfyui"
    if not any(m.startswith(("diffusion_model.", MUSUBI_PREFIX, OFFICIAL_I2V_PREFIX)) for m in modules):
        return "diffusers"
    raise _no_format(f"its keys mix the prefixes of several formats (e.g. {modules[0]!r})")


def _no_format(why: str) -> HvctlError:
    return HvctlError(f"its keys fit no LoRA format (tried {', '.join(FORMATS.values())}): {why}")


def _strip(name: str, prefixes) -> str:
    for prefix in prefixes:
        if name.startswith(prefix):
            return name[len(prefix):]
    return name


def to_diffusers(weights: dict, transformer, table: dict | None = None) -> tuple[dict, str]:
    """Any format -> (diffusers-format weights with alpha/rank folded into lora_B, the format's
    name). Module names are checked against the transformer's own."""
    fmt = detect_format(weights)
    table = official_modules(transformer) if table is None else table
    names = {n.removesuffix(".base_layer") for n, _ in transformer.named_modules() if ".lora_" not in n}
    flat_official = {n.replace(".", "_"): n for n in table}
    flat_diffusers = {n.replace(".", "_"): n for n in names}
    groups: dict[str, dict] = {}
    for key, value in weights.items():
        module, kind = KEY.fullmatch(key).groups()
        groups.setdefault(module, {})[KINDS[kind]] = value
    out = {}
    for module, parts in groups.items():
        if "down" not in parts or "up" not in parts:
            raise HvctlError(f"LoRA module {module!r}: needs both a down (lora_A/lora_down) and an up (lora_B/lora_up) matrix")
        down, up = parts["down"], parts["up"]
        if down.ndim != 2 or up.ndim != 2 or up.shape[1] != down.shape[0]:
            raise HvctlError(f"LoRA module {module!r}: down {tuple(down.shape)} and up {tuple(up.shape)} are not a low-rank pair")
        if "alpha" in parts:  # the update is up @ down * alpha / rank; hvctl's files carry it in up
            up = up * (float(parts["alpha"]) / down.shape[0])
        official, diffusers_name = _module_name(fmt, module, table, names, flat_official, flat_diffusers)
        if diffusers_name is not None:
            out.update(_diffusers_pair(diffusers_name, down, up))
        else:
            for name, part_down, part_up in split_fused(official, table[official], down, up):
                out.update(_diffusers_pair(name, part_down, part_up))
    return out, fmt


def _module_name(fmt, module, table, names, flat_official, flat_diffusers) -> tuple[str | None, str | None]:
    """(official name, None) or (None, diffusers name) of a file's module."""
    if fmt == "diffusers":
        name = _strip(module, DIFFUSERS_PREFIXES)
        if name not in names:
            raise HvctlError(f"LoRA module {module!r} names no module of this model's transformer (a LoRA for another model?)")
        return None, name
    if fmt in ("musubi", "official-i2v"):
        flat = module[len(MUSUBI_PREFIX if fmt == "musubi" else OFFICIAL_I2V_PREFIX):]
        if flat in flat_official:
            return flat_official[flat], None
        if flat in flat_diffusers:  # kohya's naming over diffusers' module names (hvctl < 0.x wrote these)
            return None, flat_diffusers[flat]
        raise HvctlError(f"LoRA module {module!r} names no module of this model's transformer (a LoRA for another model?)")
    name = _strip(module, ("diffusion_model.", *DIFFUSERS_PREFIXES))
    for internal, official in COMFY_INTERNAL:
        if name.endswith(internal):
            name = name[:-len(internal)] + official
    if name not in table:
        raise HvctlError(f"LoRA module {module!r} names no module of this model's transformer (a LoRA for another model?)")
    return name, None


def _diffusers_pair(name: str, down, up) -> dict:
    import torch

    # clones: parts of one fused adapter may share its down matrix, and safetensors writes no shared tensors
    return {f"transformer.{name}.lora_A.weight": down.to(torch.float32).clone(),
            f"transformer.{name}.lora_B.weight": up.to(torch.float32).clone()}


def split_fused(official: str, parts: list[tuple[str, int]], down, up) -> list[tuple[str, object, object]]:
    """A fused official module's adapter -> (diffusers module, down, up) per part, exactly.

    Block diagonal (what `fuse` writes): part i takes rank block i of both matrices; a part whose
    down block is all zero was absent and is left out. Otherwise each part keeps the whole down
    matrix and its own rows of up: (rows_i of up) @ down is rows_i of the fused product."""
    sizes = [rows for _, rows in parts]
    if up.shape[0] != sum(sizes):
        raise HvctlError(f"LoRA module {official!r}: {up.shape[0]} output rows, but this model's has {sum(sizes)}")
    rank, k = down.shape[0], len(parts)
    row_blocks = up.split(sizes, dim=0)
    if k == 1:
        return [(parts[0][0], down, up)]
    if rank % k == 0:
        r = rank // k
        diagonal = all(not block[:, :i * r].any() and not block[:, (i + 1) * r:].any() for i, block in enumerate(row_blocks))
        if diagonal:
            return [(name, down[i * r:(i + 1) * r], block[:, i * r:(i + 1) * r])
                    for i, ((name, _), block) in enumerate(zip(parts, row_blocks)) if down[i * r:(i + 1) * r].any()]
    return [(name, down, block) for (name, _), block in zip(parts, row_blocks)]


# --- writing ---------------------------------------------------------------------------------


def from_diffusers(weights: dict, fmt: str, table: dict) -> dict:
    """hvctl's (diffusers') format -> musubi or comfyui: official names, fused modules as
    block-diagonal stacks. musubi gets alpha = rank (the scale is already folded in)."""
    import torch

    adapters: dict[str, dict] = {}
    for key, value in weights.items():
        match = re.fullmatch(r"transformer\.(.+)\.lora_([AB])\.weight", key)
        if not match:
            raise HvctlError(f"LoRA key {key!r} is not in diffusers' format (transformer.<module>.lora_A/B.weight)")
        adapters.setdefault(match.group(1), {})[match.group(2)] = value
    owner = {name: official for official, parts in table.items() for name, _ in parts}
    unmapped = sorted(set(adapters) - set(owner))
    if unmapped:
        raise HvctlError(f"LoRA module {unmapped[0]!r} has no official name, so {FORMATS[fmt]} cannot load it "
                         f"({len(unmapped)} such module(s)); keep the diffusers format")
    out = {}
    for official in sorted({owner[name] for name in adapters}, key=_natural):
        present = [(name, rows, adapters.get(name)) for name, rows in table[official]]
        ranks = {a["A"].shape[0] for _, _, a in present if a is not None}
        r = max(ranks)
        downs, ups = [], []
        for name, rows, a in present:  # an absent part: a zero block of the same rank, so the blocks stay equal
            downs.append(a["A"] if a is not None else torch.zeros(r, _in_features(present)))
            ups.append(a["B"] if a is not None else torch.zeros(rows, r))
        down, up = torch.cat(downs), torch.block_diag(*ups)
        down, up = down.to(torch.float32).contiguous(), up.to(torch.float32).contiguous()
        if fmt == "musubi":
            flat = MUSUBI_PREFIX + official.replace(".", "_")
            out[f"{flat}.lora_down.weight"], out[f"{flat}.lora_up.weight"] = down, up
            out[f"{flat}.alpha"] = torch.tensor(float(down.shape[0]))
        else:
            out[f"diffusion_model.{official}.lora_A.weight"], out[f"diffusion_model.{official}.lora_B.weight"] = down, up
    return out


def _in_features(present) -> int:
    return next(a["A"].shape[1] for _, _, a in present if a is not None)


def _natural(name: str):
    return [int(t) if t.isdigit() else t for t in re.split(r"(\d+)", name)]
