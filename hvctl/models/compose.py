"""`hvctl model compose`: a new model folder from an existing one, with components taken from other
folders (a finetuned VAE beside a trained DiT), weights cast to a storage dtype, and generation
defaults set. Written to a temporary folder and renamed."""

from __future__ import annotations

from pathlib import Path

from hvctl.errors import HvctlError


def compose_from_flags(base: Path, out: Path, take: list[str], dtype: str | None, defaults: list[str], i2v: str | None) -> Path:
    """`hvctl model compose`'s flags checked and read (--take COMPONENT=DIR, --default KEY=VALUE
    with the value read as YAML: 4 is a number, true a boolean), then compose_model."""
    import yaml

    if dtype not in (None, "float32", "bfloat16", "float16"):
        raise HvctlError(f"--dtype {dtype}: choose float32, bfloat16 or float16")
    pairs = {}
    for flag, items in (("--take", take), ("--default", defaults)):
        for item in items:
            key, sep, value = item.partition("=")
            if not sep or not key:
                raise HvctlError(f"{flag} {item}: expected KEY=VALUE")
            pairs.setdefault(flag, {})[key] = Path(value) if flag == "--take" else yaml.safe_load(value)
    return compose_model(base, out, take=pairs.get("--take"), dtype=dtype, defaults=pairs.get("--default"), i2v=i2v)


def compose_model(base: Path, out: Path, *, take: dict[str, Path] | None = None, dtype: str | None = None,
                  defaults: dict | None = None, i2v: str | None = None) -> Path:
    """i2v: make the DiT an image-to-video one of that design (hvctl/i2v.py).

    A LLaVA text encoder (`--take text_encoder=` an official I2V folder) makes the folder one that
    diffusers' HunyuanVideoImageToVideoPipeline loads: its tokenizer and image processor come
    from the same folder unless taken from elsewhere, and model_index.json names that pipeline."""
    import torch

    from hvctl.models.loading import ModelFolder, load_component, quiet_libraries
    from hvctl.models.presets import check_new_model_folder, write_model_folder

    check_new_model_folder(out)
    quiet_libraries()
    folder = ModelFolder.open(base)
    take = dict(take or {})
    names = folder.component_names
    index = dict(folder.index)
    if "text_encoder" in take and not folder.reads_images and _reads_images(take["text_encoder"]):
        names, index = _with_llava(folder, take, index, names, i2v)
    unknown = sorted(set(take) - set(names))
    if unknown:
        raise HvctlError(f"--take {', '.join(unknown)}: {base} has no such component; it has {', '.join(names)}")
    components = {}
    for name in names:
        source = ModelFolder.open(take[name]) if name in take else folder
        wanted = tuple(index[name] or source.component_class(name))  # a new component: as its source has it
        if source.component_class(name) != wanted and not (name.startswith("tokenizer") and name in take):
            raise HvctlError(f"--take {name}={take[name]}: its {name} is {'.'.join(source.component_class(name))}, "
                             f"the base's is {'.'.join(wanted)}")
        index[name] = list(source.component_class(name))
        if dtype is None and not (name == "transformer" and i2v is not None):
            # Unchanged: copied byte for byte, so its fingerprint stays, and with it every cache
            # its VAE and text encoders encoded (hvctl/cache.py: check_cache_encoders).
            components[name] = source.path / name
        elif name == "scheduler":
            from diffusers import FlowMatchEulerDiscreteScheduler

            components[name] = FlowMatchEulerDiscreteScheduler.from_config(source.component_config(name))
        else:
            components[name] = load_component(source, name, dtype=torch.float32)  # applies to weighted parts only
    if i2v is not None:
        from hvctl.i2v import expand_for_i2v

        components["transformer"] = expand_for_i2v(components["transformer"], i2v)
    generation = {k: v for k, v in folder.generation_defaults.items() if k != "guidance_embeds"}
    unknown = sorted(set(defaults or {}) - set(generation))
    if unknown:
        raise HvctlError(f"--default {', '.join(unknown)}: not a generation setting; choose from {', '.join(sorted(generation))}")
    generation.update(defaults or {})
    extra = {k: v for k, v in folder.hvctl_info.items() if k not in ("generation", "weights", "hvctl_version")}
    extra["composed_from"] = {"base": str(base), **{k: str(v) for k, v in take.items()}, **({"i2v": i2v} if i2v else {})}
    return write_model_folder(out, components, generation, meta=False, index=index,
                              dtype=getattr(torch, dtype) if dtype else None, extra=extra,
                              write_more=_avatar_writer(take.get("transformer", base), dtype))


def _reads_images(path: Path) -> bool:
    from hvctl.models.loading import ModelFolder

    return ModelFolder.open(path).reads_images


def _with_llava(folder, take: dict, index: dict, names: list[str], i2v: str | None):
    """The components and index of a folder whose text encoder becomes a LLaVA: diffusers' I2V pipeline's."""
    source = take["text_encoder"]
    if i2v is None and folder.component_config("transformer").get("image_condition_type") is None:
        raise HvctlError(f"--take text_encoder={source}: a LLaVA reads the prompt with an image; "
                         "only for an image-to-video model (add --i2v token_replace or latent_concat)")
    for name in ("tokenizer", "image_processor"):  # a LLaVA's tokenizer carries its <image> token
        take.setdefault(name, source)
    index = {**index, "_class_name": "HunyuanVideoImageToVideoPipeline",
             "text_encoder": ["transformers", "LlavaForConditionalGeneration"], "image_processor": None}
    return [*names, "image_processor"], index


def _avatar_writer(transformer_source: Path, dtype: str | None):
    """An avatar model's conditioners go with its transformer (hvctl/avatar.py), recast like it."""
    from hvctl.avatar import AVATAR_DIR, WEIGHTS_FILE, read_avatar_config, save_conditioners

    config = read_avatar_config(transformer_source)
    if config is None:
        return None

    def write(folder: Path) -> None:
        import torch
        from safetensors.torch import load_file

        state = load_file(str(Path(transformer_source) / AVATAR_DIR / WEIGHTS_FILE))
        save_conditioners(folder, config, {k: v.to(getattr(torch, dtype)) if dtype else v for k, v in state.items()})

    return write
