"""Model presets and `hvctl model init`: new diffusers-format HunyuanVideo model folders.

A model folder is exactly what diffusers' `HunyuanVideoPipeline.from_pretrained` reads
(model_index.json plus one sub-folder per component, weights as safetensors), with one extra
file, `hvctl.json`, holding the generation defaults that suit the model (size, frames, fps,
steps, guidance). diffusers ignores it; hvctl falls back to the official defaults without it.
"""

from __future__ import annotations

import json
import shutil
from dataclasses import dataclass, field
from pathlib import Path

from hvctl import __version__
from hvctl.errors import HvctlError
from hvctl.io import check_output_dir, disk_errors

MODEL_INDEX = {
    "_class_name": "HunyuanVideoPipeline",
    "scheduler": ["diffusers", "FlowMatchEulerDiscreteScheduler"],
    "text_encoder": ["transformers", "LlamaModel"],
    "text_encoder_2": ["transformers", "CLIPTextModel"],
    "tokenizer": ["transformers", "PreTrainedTokenizerFast"],
    "tokenizer_2": ["transformers", "CLIPTokenizer"],
    "transformer": ["diffusers", "HunyuanVideoTransformer3DModel"],
    "vae": ["diffusers", "AutoencoderKLHunyuanVideo"],
}

# The official sample_video.py defaults, used for folders without hvctl.json. The flow shift
# comes from the folder's scheduler config.
OFFICIAL_GENERATION_DEFAULTS = {
    "height": 720, "width": 1280, "frames": 129, "fps": 24, "steps": 50,
    "guidance_scale": 1.0, "embedded_guidance": 6.0, "text_len": 256, "negative_prompt": "",
}


@dataclass
class Preset:
    name: str
    description: str
    transformer: dict
    vae: dict
    text_encoder: dict  # LlamaConfig arguments
    text_encoder_2: dict  # CLIPTextConfig arguments
    scheduler: dict = field(default_factory=lambda: {"shift": 7.0})
    # The std of the text encoders' token embeddings; None: transformers' init (0.02). Frozen
    # random encoders at 0.02 give the DiT text states of std 0.02, a signal it takes tens of
    # thousands of steps to amplify; at 1 the prompt words stand out from the first step.
    text_embedding_std: float | None = None
    # A frozen random CLIP pools nearly the same vector for every prompt (cosine 0.98), so the
    # DiT's global conditioning says nothing. True: CLIP's weights are set so that its pooled
    # output is a bag of words (see `make_clip_pool_words`).
    clip_pools_words: bool = False
    generation: dict = field(default_factory=lambda: dict(OFFICIAL_GENERATION_DEFAULTS))


PRESETS = {
    p.name: p
    for p in [
        Preset(
            name="tiny",
            description="a few million parameters, locally built tokenizers; the toy world's size",
            transformer=dict(
                in_channels=16, out_channels=16, num_attention_heads=4, attention_head_dim=32,
                num_layers=2, num_single_layers=2, num_refiner_layers=1, mlp_ratio=4.0,
                patch_size=2, patch_size_t=1, qk_norm="rms_norm", guidance_embeds=False,
                text_embed_dim=64, pooled_projection_dim=32, rope_theta=256.0, rope_axes_dim=(8, 12, 12),
            ),
            vae=dict(
                latent_channels=16, block_out_channels=(16, 32, 64, 64), layers_per_block=1,
                norm_num_groups=8, scaling_factor=0.476986, mid_block_add_attention=True,
            ),
            text_encoder=dict(
                hidden_size=64, intermediate_size=128, num_hidden_layers=4, num_attention_heads=4,
                num_key_value_heads=4, max_position_embeddings=1024, rms_norm_eps=1e-5, rope_theta=10000.0,
            ),
            text_encoder_2=dict(
                hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=2,
                max_position_embeddings=77, projection_dim=32, hidden_act="quick_gelu",
            ),
            generation=dict(
                OFFICIAL_GENERATION_DEFAULTS, height=64, width=64, frames=17, fps=8, steps=30,
                guidance_scale=1.0, embedded_guidance=None, text_len=128,
            ),
        ),
        Preset(
            name="hunyuan-t2v-720p",
            description="the official HunyuanVideo 13B text-to-video configuration (cfg-distilled)",
            transformer=dict(
                in_channels=16, out_channels=16, num_attention_heads=24, attention_head_dim=128,
                num_layers=20, num_single_layers=40, num_refiner_layers=2, mlp_ratio=4.0,
                patch_size=2, patch_size_t=1, qk_norm="rms_norm", guidance_embeds=True,
                text_embed_dim=4096, pooled_projection_dim=768, rope_theta=256.0, rope_axes_dim=(16, 56, 56),
            ),
            vae=dict(
                latent_channels=16, block_out_channels=(128, 256, 512, 512), layers_per_block=2,
                norm_num_groups=32, scaling_factor=0.476986, mid_block_add_attention=True,
            ),
            # llava-llama-3-8b's language model and CLIP ViT-L/14's text tower.
            text_encoder=dict(
                vocab_size=128320, hidden_size=4096, intermediate_size=14336, num_hidden_layers=32,
                num_attention_heads=32, num_key_value_heads=8, max_position_embeddings=8192,
                rms_norm_eps=1e-5, rope_theta=500000.0,
            ),
            text_encoder_2=dict(
                vocab_size=49408, hidden_size=768, intermediate_size=3072, num_hidden_layers=12,
                num_attention_heads=12, max_position_embeddings=77, projection_dim=768,
                hidden_act="quick_gelu",
            ),
        ),
    ]
}


def _toy_preset() -> Preset:
    """The toy world's trained default: tiny, with a VAE that compresses 4x in space, not 8x.

    At 8x, an 8x8-pixel latent cell must hold a 7-11 px object's colour, shape and sub-pixel
    edges; the tiny VAE learned the flat backgrounds and stalled near 22 dB PSNR with the objects
    blurred away. At 4x it passes 28 dB in the same steps. The DiT keeps 2x2 patches: a 4x4 patch
    of 16 channels is 256 numbers, more than its 128-wide tokens hold, so it could never predict
    the noise (its loss stalled near 0.6 against 0.17 for 2x2 after the same 600 steps).
    """
    tiny = PRESETS["tiny"]
    return Preset(
        name="toy",
        description="tiny, with a 4x spatial VAE and a bag-of-words CLIP; the trained embedded default's configuration",
        transformer=dict(tiny.transformer),
        vae=dict(tiny.vae, spatial_compression_ratio=4, block_out_channels=(16, 32, 64),
                 down_block_types=("HunyuanVideoDownBlock3D",) * 3, up_block_types=("HunyuanVideoUpBlock3D",) * 3),
        text_encoder=tiny.text_encoder,
        text_encoder_2=tiny.text_encoder_2,
        scheduler=dict(tiny.scheduler),
        generation=dict(tiny.generation),
        text_embedding_std=1.0,
        clip_pools_words=True,
    )


PRESETS["toy"] = _toy_preset()


def get_preset(name: str) -> Preset:
    if name not in PRESETS:
        raise HvctlError(f"unknown preset '{name}' (choices: {', '.join(PRESETS)})")
    return PRESETS[name]


# The components whose configuration a preset override may change, and the diffusers class
# whose constructor names the keys it accepts.
_OVERRIDABLE = {"transformer": "HunyuanVideoTransformer3DModel", "vae": "AutoencoderKLHunyuanVideo"}


def with_overrides(preset: Preset, overrides: dict | None) -> Preset:
    """A copy of `preset` with {component: {config key: value}} changed: how the toy-model
    experiments try other widths, depths, latent channels and GroupNorm groups without a new
    preset each. Unknown components or keys are refused by name."""
    import dataclasses
    import inspect

    if not overrides:
        return preset
    import diffusers

    changed = {}
    for component, values in overrides.items():
        if component not in _OVERRIDABLE:
            raise HvctlError(f"preset override '{component}': choose one of {', '.join(_OVERRIDABLE)}")
        if not isinstance(values, dict):
            raise HvctlError(f"preset override '{component}': expected a mapping of config keys, got {values!r}")
        accepted = inspect.signature(getattr(diffusers, _OVERRIDABLE[component]).__init__).parameters
        for key in values:
            if key not in accepted or key == "self":
                raise HvctlError(f"preset override '{component}.{key}': {_OVERRIDABLE[component]} has no such key")
        config = dict(getattr(preset, component))
        config.update({k: tuple(v) if isinstance(v, list) else v for k, v in values.items()})
        changed[component] = config
    return dataclasses.replace(preset, **changed)


def build_components(preset: Preset, *, meta: bool = False, guidance_embeds: bool | None = None, seed: int = 0,
                     dit_init: str = "diffusers"):
    """Instantiate every component of a preset: randomly initialised (the DiT by `dit_init`,
    hvctl/models/dit_init.py), or on the meta device."""
    import torch
    from diffusers import AutoencoderKLHunyuanVideo, FlowMatchEulerDiscreteScheduler, HunyuanVideoTransformer3DModel
    from transformers import CLIPTextConfig, CLIPTextModel, LlamaConfig, LlamaModel

    from hvctl.models.tokenizers import build_clip_tokenizer, build_llama_tokenizer

    tokenizer, tokenizer_2 = build_llama_tokenizer(), build_clip_tokenizer()
    transformer_config = dict(preset.transformer)
    if guidance_embeds is not None:
        transformer_config["guidance_embeds"] = guidance_embeds
    llama_config = LlamaConfig(
        **{"vocab_size": len(tokenizer), **preset.text_encoder},
        bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id,
    )
    clip_config = CLIPTextConfig(
        **{"vocab_size": len(tokenizer_2), **preset.text_encoder_2},
        bos_token_id=tokenizer_2.bos_token_id, eos_token_id=tokenizer_2.eos_token_id, pad_token_id=tokenizer_2.pad_token_id,
    )
    torch.manual_seed(seed)
    with torch.device("meta" if meta else "cpu"):
        components = {
            "transformer": HunyuanVideoTransformer3DModel(**transformer_config),
            "vae": AutoencoderKLHunyuanVideo(**preset.vae),
            "text_encoder": LlamaModel(llama_config),
            "text_encoder_2": CLIPTextModel(clip_config),
        }
    if preset.text_embedding_std is not None and not meta:
        with torch.no_grad():
            components["text_encoder"].embed_tokens.weight.normal_(0.0, preset.text_embedding_std)
            components["text_encoder_2"].embeddings.token_embedding.weight.normal_(0.0, preset.text_embedding_std)
    if preset.clip_pools_words and not meta:
        make_clip_pool_words(components["text_encoder_2"])
    if not meta:  # after the others, so that every other component is the same whatever the DiT's init
        from hvctl.models.dit_init import init_dit

        init_dit(components["transformer"], dit_init)
    components["scheduler"] = FlowMatchEulerDiscreteScheduler(**preset.scheduler)
    components["tokenizer"], components["tokenizer_2"] = tokenizer, tokenizer_2
    return components


def make_clip_pool_words(clip, gain: float = 8.0) -> None:
    """Set a CLIPTextModel's weights so that its pooled output is a bag of the prompt's words.

    Queries and keys at zero make every causal attention uniform, so the first layer adds to each
    token the mean of the (normalised) embeddings before it; with position embeddings at zero and
    every later sublayer silenced, the end-of-text token, which CLIP pools, carries
    LayerNorm(e_eot + gain * mean(words)): the same for any word order, different for other words.
    It stays a plain CLIP checkpoint that diffusers and transformers load as usual.
    """
    import torch

    hidden = clip.config.hidden_size
    with torch.no_grad():
        clip.embeddings.position_embedding.weight.zero_()
        for index, layer in enumerate(clip.encoder.layers):
            attention = layer.self_attn
            for projection in (attention.q_proj, attention.k_proj):
                projection.weight.zero_()
                projection.bias.zero_()
            attention.v_proj.weight.copy_(torch.eye(hidden))
            attention.v_proj.bias.zero_()
            attention.out_proj.weight.copy_(torch.eye(hidden) * (gain if index == 0 else 0.0))
            attention.out_proj.bias.zero_()
            layer.mlp.fc2.weight.zero_()
            layer.mlp.fc2.bias.zero_()


def write_model_folder(out: Path, components: dict, generation: dict, *, meta: bool, dtype=None, extra: dict | None = None,
                       index: dict | None = None, write_more=None):
    """Write components (modules, or the Path of a component folder to copy) as a diffusers model
    folder: into a temporary folder, then renamed. write_more(folder): writes anything else the
    folder holds (an avatar model's conditioners)."""
    out = check_new_model_folder(out)
    tmp = out.with_name(f".{out.name}.tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    with disk_errors(out, cleanup=lambda: shutil.rmtree(tmp, ignore_errors=True)):
        tmp.mkdir(parents=True)
        for name, component in components.items():
            path = tmp / name
            if isinstance(component, Path):  # a component folder kept as it is
                shutil.copytree(component, path)
            elif name.startswith("tokenizer") or name in ("scheduler", "image_processor"):
                component.save_pretrained(path)
            elif meta:
                path.mkdir()
                config = component.config.to_dict() if hasattr(component.config, "to_dict") else dict(component.config)
                config["_class_name"] = type(component).__name__
                (path / "config.json").write_text(json.dumps(config, indent=2, default=list) + "\n")
            else:
                if dtype is not None and dtype != component.dtype:
                    component.to(dtype)
                component.save_pretrained(path, safe_serialization=True)
        if write_more is not None:
            write_more(tmp)
        (tmp / "model_index.json").write_text(json.dumps(index or MODEL_INDEX, indent=2) + "\n")
        info = {"hvctl_version": __version__, "generation": generation, "weights": not meta, **(extra or {})}
        (tmp / "hvctl.json").write_text(json.dumps(info, indent=2) + "\n")
        if out.exists():
            out.rmdir()
        tmp.rename(out)
    return out


def check_new_model_folder(out: Path) -> Path:
    """A model folder output: new or empty, writable; checked before any component is built."""
    out = check_output_dir(out, "OUT")
    if out.exists() and any(out.iterdir()):
        raise HvctlError(f"{out}: exists and is not empty; choose a new folder")
    return out


def init_model(preset_name: str, out: Path, *, meta: bool = False, guidance_embeds: bool | None = None,
               seed: int = 0, dtype: str = "float32", overrides: dict | None = None, dit_init: str = "diffusers") -> Path:
    """`hvctl model init`: a new randomly initialised model folder (or configs only, with meta).
    overrides: {component: {config key: value}} on top of the preset (`with_overrides`); dit_init:
    how the DiT is initialised (hvctl/models/dit_init.py)."""
    import torch

    from hvctl.models.loading import quiet_libraries

    quiet_libraries()
    preset = with_overrides(get_preset(preset_name), overrides)
    check_new_model_folder(out)
    components = build_components(preset, meta=meta, guidance_embeds=guidance_embeds, seed=seed, dit_init=dit_init)
    generation = dict(preset.generation)
    if components["transformer"].config.guidance_embeds and generation["embedded_guidance"] is None:
        generation["embedded_guidance"] = 6.0
    if not components["transformer"].config.guidance_embeds:
        generation["embedded_guidance"] = None
    return write_model_folder(
        out, components, generation, meta=meta, dtype=getattr(torch, dtype),
        extra={"preset": preset.name, "seed": seed, **({"overrides": overrides} if overrides else {}),
               **({"dit_init": dit_init} if dit_init != "diffusers" else {})},
    )
