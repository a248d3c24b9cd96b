"""`hvctl model convert`: official HunyuanVideo checkpoints to a diffusers model folder, and back.

Official -> diffusers: the transformer (`mp_rank_00_model_states.pt`, read with
`torch.load(weights_only=True)` and unwrapped from its `module`/`ema` nesting, or a safetensors
file with the official names) and optionally the official VAE become the new folder's transformer
and VAE; every other component is copied from a base model folder, as `model compose` takes them.
Diffusers -> official: `transformer.safetensors` with the official names (plus the diffusers config
in its metadata), `vae.safetensors` and `vae_config.json` (the official AutoencoderKLCausal3D one).
The name mapping lives in hvctl/models/official.py.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

from hvctl.errors import HvctlError
from hvctl.models import official
from hvctl.progress import progress_bar

LOAD_KEYS = ("module", "ema")
NESTING = ("module", "ema", "state_dict", "model")  # wrappers DeepSpeed and trainers put around a state dict
PREFIXES = ("module.", "model.diffusion_model.", "diffusion_model.")  # whole-file prefixes of some exports
CONFIG_METADATA = "hvctl_diffusers_config"
# What `--to official` writes, and what a folder SRC is searched for (ours, then the official ckpts layout).
OFFICIAL_TRANSFORMER = ("transformer.safetensors", "transformers/mp_rank_00_model_states.pt")
OFFICIAL_VAE = ("vae.safetensors", "vae/pytorch_model.pt")


def read_weights(path: Path, load_key: str | None = None) -> tuple[dict, dict]:
    """(state dict, safetensors metadata) of a .safetensors or a weights-only torch file."""
    path = Path(path)
    if not path.is_file():
        raise HvctlError(f"{path}: no such file")
    metadata = {}
    if path.suffix == ".safetensors":
        from safetensors import SafetensorError, safe_open

        try:
            with safe_open(str(path), framework="pt") as f:
                metadata = f.metadata() or {}
                state = {k: f.get_tensor(k) for k in f.keys()}
        except (SafetensorError, OSError) as e:
            raise HvctlError(f"{path}: not a readable safetensors file ({e})") from None
    else:
        state = _torch_load(path)
        state = _unnest(path, state, load_key)
    import torch

    bad = [k for k, v in state.items() if not isinstance(v, torch.Tensor)]
    if bad or not state:
        raise HvctlError(f"{path}: not a state dict of tensors" + (f" ({bad[0]} is {type(state[bad[0]]).__name__})" if bad else " (empty)"))
    for prefix in PREFIXES:
        if all(k.startswith(prefix) for k in state):
            state = {k[len(prefix):]: v for k, v in state.items()}
    return state, metadata


def _torch_load(path: Path):
    import pickle
    import re
    import zipfile

    import torch

    try:
        # Zip-format files (every torch.save since 1.6) are memory-mapped: a 26 GB checkpoint is not copied.
        return torch.load(path, map_location="cpu", weights_only=True, mmap=zipfile.is_zipfile(path))
    except pickle.UnpicklingError as e:
        found = re.search(r"Unsupported global: GLOBAL ([\w.]+)", str(e))
        if found:
            raise HvctlError(f"{path}: not loadable as weights only (it holds a {found.group(1)}), so it is not read") from None
        raise HvctlError(f"{path}: not a torch checkpoint") from None
    except Exception as e:  # noqa: BLE001 (zipfile, EOF, ... for files that are not torch files at all)
        raise HvctlError(f"{path}: not a torch checkpoint ({type(e).__name__})") from None


def _unnest(path: Path, obj, load_key: str | None):
    if not isinstance(obj, dict):
        raise HvctlError(f"{path}: holds a {type(obj).__name__}, not a state dict")
    wrappers = [k for k in NESTING if isinstance(obj.get(k), dict)]
    if load_key is not None:
        if load_key not in wrappers:
            raise HvctlError(f"{path}: --load-key {load_key}: no such entry; it has {', '.join(wrappers) or 'none (a plain state dict)'}")
        return obj[load_key]
    return obj[wrappers[0]] if wrappers else obj


def _find(src: Path, names: tuple[str, ...], what: str) -> Path:
    for name in names:
        if (src / name).is_file():
            return src / name
    raise HvctlError(f"{src}: no {what} ({' or '.join(names)})")


def _out_is_free(out: Path) -> None:
    if out.exists() and (not out.is_dir() or any(out.iterdir())):
        raise HvctlError(f"{out}: exists and is not empty; choose a new folder")


def to_diffusers(src: Path, out: Path, *, base: Path, vae: Path | None = None, load_key: str | None = None,
                 i2v: str | None = None, dtype: str | None = None) -> Path:
    """An official transformer (file, or a folder in the official or `--to official` layout) and VAE
    into a new diffusers model folder whose other components are copied from `base`."""
    from hvctl.i2v import CONDITION_TYPES
    from hvctl.models.loading import ModelFolder, quiet_libraries

    src, out = Path(src), Path(out)
    if not src.exists():
        raise HvctlError(f"{src}: no such file or folder")
    if i2v is not None and i2v not in CONDITION_TYPES:
        raise HvctlError(f"--i2v {i2v}: choose {' or '.join(CONDITION_TYPES)}")
    _out_is_free(out)
    base_folder = ModelFolder.open(base)
    quiet_libraries()
    transformer_file = _find(src, OFFICIAL_TRANSFORMER, "official transformer checkpoint") if src.is_dir() else src
    if vae is None and src.is_dir() and any((src / n).is_file() for n in OFFICIAL_VAE):
        vae = _find(src, OFFICIAL_VAE, "VAE")

    with progress_bar(3, "convert") as advance:  # read, convert, write: minutes each for the 13B model
        return _to_diffusers(transformer_file, out, base_folder, vae, load_key, i2v, dtype, advance)


def _to_diffusers(transformer_file: Path, out: Path, base_folder, vae: Path | None, load_key: str | None,
                  i2v: str | None, dtype: str | None, advance) -> Path:
    import torch

    from hvctl.models.presets import write_model_folder

    base = base_folder.path
    state, metadata = read_weights(transformer_file, load_key)
    advance()
    defaults = dict(base_folder.component_config("transformer"))
    if CONFIG_METADATA in metadata:  # written by --to official: what shapes cannot say
        defaults.update(json.loads(metadata[CONFIG_METADATA]))
    if i2v is not None:
        defaults["image_condition_type"] = i2v
    elif CONFIG_METADATA not in metadata:
        defaults["image_condition_type"] = None  # a 16-channel checkpoint is text-to-video unless --i2v says
    config = official.transformer_config(state, defaults)
    if i2v == "token_replace" and config["image_condition_type"] == "latent_concat":
        raise HvctlError(f"--i2v token_replace: {transformer_file} takes {config['in_channels']} = 2x{config['out_channels']}+1 "
                         "input channels, the latent_concat design")
    if i2v == "latent_concat" and config["image_condition_type"] != "latent_concat":
        raise HvctlError(f"--i2v latent_concat: {transformer_file} takes {config['in_channels']} input channels, "
                         f"not 2x{config['out_channels']}+1")
    _check_fits_base(base_folder, config)
    components = {"transformer": _build("HunyuanVideoTransformer3DModel", config, official.official_to_diffusers(state),
                                        transformer_file)}
    del state
    advance()
    if vae is not None:
        vae_state, _ = read_weights(Path(vae), load_key=None)
        vae_state = official.strip_vae_prefix(vae_state)
        vae_defaults = dict(base_folder.component_config("vae"))
        vae_defaults.update(official.diffusers_vae_config(_official_vae_config_beside(Path(vae))))
        vae_config = official.vae_config(vae_state, vae_defaults)
        if vae_config["latent_channels"] != config["out_channels"]:
            raise HvctlError(f"{vae}: {vae_config['latent_channels']} latent channels; the transformer's are {config['out_channels']}")
        components["vae"] = _build("AutoencoderKLHunyuanVideo", vae_config, vae_state, Path(vae))
    elif base_folder.component_config("vae").get("latent_channels") != config["out_channels"]:
        raise HvctlError(f"{base}: its VAE has {base_folder.component_config('vae').get('latent_channels')} latent "
                         f"channels; the transformer's are {config['out_channels']} (give the official VAE with --vae)")

    generation = {k: v for k, v in base_folder.generation_defaults.items() if k != "guidance_embeds"}
    if config["guidance_embeds"] and generation.get("embedded_guidance") is None:
        generation["embedded_guidance"] = 6.0
    if not config["guidance_embeds"]:
        generation["embedded_guidance"] = None
    copied = [n for n, e in base_folder.index.items() if not n.startswith("_") and isinstance(e, list) and e[0]
              and n not in components]
    for name in copied:
        base_folder.component_class(name)  # an unsupported class fails before anything is written

    def copy_rest(folder: Path) -> None:
        for name in copied:
            shutil.copytree(base_folder.path / name, folder / name)

    extra = {"converted_from": {"transformer": str(transformer_file), "vae": str(vae) if vae else None,
                                "base": str(base), **({"load_key": load_key} if load_key else {})}}
    path = write_model_folder(out, components, generation, meta=False, index=base_folder.index,
                              dtype=getattr(torch, dtype) if dtype else None, extra=extra, write_more=copy_rest)
    advance()
    return path


def _official_vae_config_beside(vae: Path) -> dict:
    """The official vae/config.json next to pytorch_model.pt, or our vae_config.json next to vae.safetensors."""
    for candidate in (vae.parent / "config.json", vae.parent / "vae_config.json"):
        if candidate.is_file():
            try:
                config = json.loads(candidate.read_text())
            except (OSError, json.JSONDecodeError) as e:
                raise HvctlError(f"{candidate}: unreadable JSON ({e})") from None
            if isinstance(config, dict) and "latent_channels" in config:
                return config
    return {}


def _check_fits_base(base, config: dict) -> None:
    """The text encoders the new folder takes from the base must feed this transformer."""
    if base.reads_images and config["image_condition_type"] is None:
        raise HvctlError(f"--base {base.path}: its LLaVA text encoder is an image-to-video one; for a text-to-video "
                         "checkpoint take a base with a Llama text encoder (or give --i2v for an I2V checkpoint)")
    text = base.component_config("text_encoder")
    width = (text.get("text_config") or {}).get("hidden_size", text.get("hidden_size"))
    if width is not None and width != config["text_embed_dim"]:
        raise HvctlError(f"{base.path}: its text encoder gives {width}-wide states; the transformer takes {config['text_embed_dim']}")
    pooled = base.component_config("text_encoder_2").get("hidden_size")
    if pooled is not None and pooled != config["pooled_projection_dim"]:
        raise HvctlError(f"{base.path}: its CLIP pools {pooled}-wide vectors; the transformer takes {config['pooled_projection_dim']}")


def _build(class_name: str, config: dict, state: dict, source: Path):
    """A diffusers model holding exactly `state` (every key used, none missing), in its dtype."""
    import diffusers
    import torch

    cls = getattr(diffusers, class_name)
    with torch.device("meta"):
        model = cls.from_config(config)
    expected = set(model.state_dict())
    missing, unexpected = sorted(expected - set(state)), sorted(set(state) - expected)
    if missing or unexpected:
        parts = [f"missing {', '.join(missing[:3])}" + (f" (+{len(missing) - 3})" if len(missing) > 3 else "")] if missing else []
        parts += [f"unknown {', '.join(unexpected[:3])}" + (f" (+{len(unexpected) - 3})" if len(unexpected) > 3 else "")] if unexpected else []
        raise HvctlError(f"{source}: does not fit a {class_name}: {'; '.join(parts)}")
    try:
        model.load_state_dict(state, strict=True, assign=True)
    except RuntimeError as e:  # shapes
        raise HvctlError(f"{source}: does not fit a {class_name}: {str(e).strip().splitlines()[-1].strip()}") from None
    return model.eval().requires_grad_(False)


def _folder_state(folder: Path) -> dict:
    """A diffusers component folder's weights, from its safetensors (sharded or not)."""
    from safetensors.torch import load_file

    index = folder / "diffusion_pytorch_model.safetensors.index.json"
    if index.is_file():
        files = sorted(set(json.loads(index.read_text())["weight_map"].values()))
    else:
        files = ["diffusion_pytorch_model.safetensors"]
    state = {}
    for name in files:
        if not (folder / name).is_file():
            raise HvctlError(f"{folder / name}: missing")
        state.update(load_file(str(folder / name)))
    return state


def to_official(src: Path, out: Path, *, dtype: str | None = None) -> Path:
    """A diffusers model folder's transformer and VAE in the official names, as safetensors files in `out`."""
    import torch

    from hvctl.models.loading import ModelFolder

    src, out = Path(src), Path(out)
    folder = ModelFolder.open(src)
    _out_is_free(out)
    folder.component_class("transformer")
    if "vae" in folder.index:
        folder.component_class("vae")
    if not folder.has_weights:
        raise HvctlError(f"{src}: has configs but no weights (written with --meta)")
    cast = (lambda t: t.to(getattr(torch, dtype))) if dtype else (lambda t: t)
    transformer_config = {k: v for k, v in folder.component_config("transformer").items() if not k.startswith("_")}
    with progress_bar(2, "convert") as advance:
        return _to_official(folder, out, transformer_config, cast, advance)


def _to_official(folder, out: Path, transformer_config: dict, cast, advance) -> Path:
    from safetensors.torch import save_file

    src = folder.path
    state = official.diffusers_to_official(_folder_state(src / "transformer"))
    advance()
    tmp = out.with_name(f".{out.name}.tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    try:
        metadata = {"format": "pt", CONFIG_METADATA: json.dumps(transformer_config)}
        save_file({k: cast(v).contiguous() for k, v in state.items()}, str(tmp / OFFICIAL_TRANSFORMER[0]), metadata=metadata)
        del state
        if "vae" in folder.index:
            vae_state = _folder_state(src / "vae")
            save_file({k: cast(v).contiguous() for k, v in vae_state.items()}, str(tmp / OFFICIAL_VAE[0]), metadata={"format": "pt"})
            vae_config = official.official_vae_config(folder.component_config("vae"))
            (tmp / "vae_config.json").write_text(json.dumps(vae_config, indent=2) + "\n")
        if out.exists():
            out.rmdir()
        tmp.rename(out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    advance()
    return out
