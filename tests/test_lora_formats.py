"""LoRA files of musubi-tuner, ComfyUI and the official I2V code: read exactly, written so each loads every module."""

import json

import pytest
import torch
from safetensors.torch import load_file, save_file

from conftest import run_cli
from hvctl.errors import HvctlError


def _transformer(model_dir):
    from hvctl.models.loading import ModelFolder, load_component

    return load_component(ModelFolder.open(model_dir), "transformer", dtype=torch.float32)


def _output(transformer, loras=()):
    """The transformer's velocity on fixed inputs, with LoRA files applied."""
    from hvctl.lora import load_loras

    loaded = load_loras(transformer, [(p, 1.0) for p in loras]) if loras else []
    g = torch.Generator().manual_seed(0)
    inputs = dict(hidden_states=torch.randn(1, 16, 2, 8, 8, generator=g), timestep=torch.tensor([500.0]),
                  encoder_hidden_states=torch.randn(1, 6, 64, generator=g),
                  encoder_attention_mask=torch.ones(1, 6, dtype=torch.bool), pooled_projections=torch.randn(1, 32, generator=g))
    with torch.no_grad():
        return transformer(**inputs, return_dict=False)[0], loaded


# Official module -> the diffusers modules whose rows it stacks, written out here from the
# official model's structure (independently of hvctl/lora_formats.py) for the tiny model's blocks.
FUSED = {
    "double_blocks.{i}.img_attn_qkv": ["transformer_blocks.{i}.attn.to_q", "transformer_blocks.{i}.attn.to_k", "transformer_blocks.{i}.attn.to_v"],
    "double_blocks.{i}.txt_attn_qkv": ["transformer_blocks.{i}.attn.add_q_proj", "transformer_blocks.{i}.attn.add_k_proj",
                                       "transformer_blocks.{i}.attn.add_v_proj"],
    "double_blocks.{i}.img_attn_proj": ["transformer_blocks.{i}.attn.to_out.0"],
    "double_blocks.{i}.img_mlp.fc1": ["transformer_blocks.{i}.ff.net.0.proj"],
    "double_blocks.{i}.txt_mod.linear": ["transformer_blocks.{i}.norm1_context.linear"],
    "single_blocks.{i}.linear1": ["single_transformer_blocks.{i}.attn.to_q", "single_transformer_blocks.{i}.attn.to_k",
                                  "single_transformer_blocks.{i}.attn.to_v", "single_transformer_blocks.{i}.proj_mlp"],
    "single_blocks.{i}.linear2": ["single_transformer_blocks.{i}.proj_out"],
}


def _community_adapter(transformer, rank=8, alpha=4.0):
    """A trained-looking adapter on official modules (fused q/k/v not block diagonal, as musubi
    trains it): {official: (down, up)}, and the same update in diffusers' format."""
    modules = dict(transformer.named_modules())
    g = torch.Generator().manual_seed(3)
    official, diffusers = {}, {}
    for i in range(2):
        for name, parts in FUSED.items():
            parts = [p.format(i=i) for p in parts]
            rows = [modules[p].out_features for p in parts]
            down = torch.randn(rank, modules[parts[0]].in_features, generator=g) * 0.1
            up = torch.randn(sum(rows), rank, generator=g) * 0.1
            official[name.format(i=i)] = (down, up)
            for part, block in zip(parts, up.split(rows)):  # rows of up @ down are rows of the update
                diffusers[f"transformer.{part}.lora_A.weight"] = down
                diffusers[f"transformer.{part}.lora_B.weight"] = block * (alpha / rank)  # 0.5: exact in floats
    return official, diffusers


def test_musubi_comfyui_and_official_i2v_files_change_the_output_exactly_as_diffusers_format(tiny_model, tmp_path):
    base = _transformer(tiny_model)
    official, diffusers = _community_adapter(base)
    rank, alpha = 8, 4.0
    files = {"diffusers": diffusers, "musubi": {}, "comfyui": {}, "official-i2v": {}, "diffusion-pipe": {}}
    for name, (down, up) in official.items():
        flat = name.replace(".", "_")  # musubi: lora_unet_ + the official module name, dots as underscores
        files["musubi"].update({f"lora_unet_{flat}.lora_down.weight": down, f"lora_unet_{flat}.lora_up.weight": up,
                                f"lora_unet_{flat}.alpha": torch.tensor(alpha)})
        files["official-i2v"].update({f"Hunyuan_video_I2V_lora_{flat}.lora_down.weight": down,
                                      f"Hunyuan_video_I2V_lora_{flat}.lora_up.weight": up,
                                      f"Hunyuan_video_I2V_lora_{flat}.alpha": torch.tensor(alpha)})
        files["comfyui"].update({f"diffusion_model.{name}.lora_A.weight": down,
                                 f"diffusion_model.{name}.lora_B.weight": up * (alpha / rank)})
        files["diffusion-pipe"].update({f"transformer.{name}.lora_A.weight": down, f"transformer.{name}.lora_B.weight": up * (alpha / rank)})
    outputs, formats = {}, {}
    for kind, weights in files.items():
        path = tmp_path / f"{kind}.safetensors"
        save_file({k: v.clone() for k, v in weights.items()}, str(path))
        outputs[kind], loaded = _output(_transformer(tiny_model), [path])
        formats[kind] = (loaded[0]["format"], loaded[0]["modules"])
    assert formats == {"diffusers": ("diffusers/PEFT", 28), "musubi": ("musubi-tuner/kohya", 28),
                       "comfyui": ("ComfyUI", 28), "official-i2v": ("official I2V", 28), "diffusion-pipe": ("ComfyUI", 28)}  # 9 + 5 per block pair
    plain, _ = _output(base)
    assert not torch.allclose(outputs["diffusers"], plain, atol=1e-3)  # the adapter does something
    for kind in files:
        assert torch.equal(outputs[kind], outputs["diffusers"]), kind
    # And that is the update musubi-tuner merges: W + alpha/rank * up @ down on the fused weight's rows.
    merged = _transformer(tiny_model)
    modules = dict(merged.named_modules())
    with torch.no_grad():
        for name, (down, up) in official.items():
            i = int(name.split(".")[1])
            parts = [p.format(i=i) for p in FUSED[name.replace(f".{i}.", ".{i}.", 1)]]
            delta = (alpha / rank) * up @ down
            for part, block in zip(parts, delta.split([modules[p].out_features for p in parts])):
                modules[part].weight += block
    reference, _ = _output(merged)
    assert torch.allclose(outputs["musubi"], reference, atol=1e-5, rtol=1e-4)


@pytest.mark.slow
def test_hvctl_to_musubi_and_comfyui_and_back_is_exact(tiny_model, tmp_path):
    g = torch.Generator().manual_seed(1)
    modules = dict(_transformer(tiny_model).named_modules())
    targets = [n for n in modules if n.endswith((".to_q", ".to_k", ".to_v", ".to_out.0", ".add_q_proj", ".add_k_proj",
                                                 ".add_v_proj", ".to_add_out")) and "refiner" not in n]
    original = {}
    for n in targets:
        original[f"transformer.{n}.lora_A.weight"] = torch.randn(4, modules[n].in_features, generator=g)
        original[f"transformer.{n}.lora_B.weight"] = torch.randn(modules[n].out_features, 4, generator=g)
    source = tmp_path / "hvctl.safetensors"
    save_file(original, str(source))
    for to, key in {"musubi": "lora_unet_double_blocks_0_img_attn_qkv.lora_down.weight",
                    "comfyui": "diffusion_model.single_blocks.1.linear1.lora_A.weight"}.items():
        out, back = tmp_path / f"{to}.safetensors", tmp_path / f"{to}-back.safetensors"
        done = run_cli("lora", "convert", source, out, "--to", to, "--model", tiny_model, "--json")
        assert done.returncode == 0, done.stderr
        assert json.loads(done.stdout)["source_format"] == "diffusers/PEFT"
        converted = load_file(str(out))
        assert key in converted
        assert not any("transformer_blocks" in k or ".to_q" in k for k in converted)  # official names only
        if to == "musubi":  # fused q/k/v: rank 3 x 4, scale alpha/rank = 1
            assert converted[key].shape == (12, 128)
            assert float(converted["lora_unet_double_blocks_0_img_attn_qkv.alpha"]) == 12.0
            assert converted["lora_unet_single_blocks_0_linear1.lora_up.weight"].shape == (128 * 3 + 512, 16)
        done = run_cli("lora", "convert", out, back, "--to", "diffusers", "--model", tiny_model, "--json")
        assert done.returncode == 0, done.stderr
        restored = load_file(str(back))
        assert restored.keys() == original.keys(), to  # proj_mlp's empty block is not brought back
        assert all(torch.equal(original[k], restored[k]) for k in original), to


@pytest.mark.slow
def test_a_file_whose_keys_fit_no_format_is_one_line(tiny_model, tmp_path):
    odd = tmp_path / "odd.safetensors"
    save_file({"blocks.0.q.weight_delta": torch.zeros(2, 2)}, str(odd))
    done = run_cli("generate", "x", "--model", tiny_model, "--lora", odd, "--steps", "1")
    assert done.returncode == 1 and "Traceback" not in done.stderr
    line = done.stderr.strip()
    assert "\n" not in line and "odd.safetensors" in line and "fit no LoRA format" in line
    assert all(f in line for f in ("diffusers/PEFT", "musubi-tuner/kohya", "ComfyUI", "official I2V"))
    with pytest.raises(HvctlError, match="fit no LoRA format"):
        from hvctl.lora_formats import detect_format

        detect_format({"lora_unet_a.lora_down.weight": torch.zeros(1), "diffusion_model.b.lora_A.weight": torch.zeros(1)})


@pytest.mark.slow
def test_a_training_adapter_starts_from_a_community_file_exactly(tiny_model, tmp_path):
    """lora.init: a musubi-format file (fused q/k/v) read into a fresh adapter gives back exactly the
    diffusers-format update it came from; a wrong rank or a module outside the targets is one line."""
    from hvctl.lora import LoraSettings, add_lora, init_lora_from_file, lora_state_dict

    g = torch.Generator().manual_seed(2)
    teacher = _transformer(tiny_model)
    settings = LoraSettings(rank=4, alpha=2.0, target_modules=["to_q", "to_k", "to_v"])
    add_lora(teacher, settings)
    with torch.no_grad():
        for name, p in teacher.named_parameters():
            if ".lora_" in name:
                p.copy_(torch.randn(p.shape, generator=g) * 0.1)
    original = lora_state_dict(teacher, settings)
    source, musubi = tmp_path / "hvctl.safetensors", tmp_path / "musubi.safetensors"
    save_file(original, str(source))
    done = run_cli("lora", "convert", source, musubi, "--to", "musubi", "--model", tiny_model)
    assert done.returncode == 0, done.stderr

    student = _transformer(tiny_model)
    add_lora(student, LoraSettings(rank=4, alpha=2.0, target_modules=["to_q", "to_k", "to_v"], init=musubi))
    read = init_lora_from_file(student, LoraSettings(rank=4, alpha=2.0, target_modules=["to_q", "to_k", "to_v"], init=musubi))
    assert read["format"] == "musubi-tuner/kohya" and read["modules"] == len(original) // 2
    restored = lora_state_dict(student, settings)
    assert restored.keys() == original.keys()
    assert all(torch.allclose(original[k], restored[k], atol=1e-6) for k in original)

    for wrong, match in ((LoraSettings(rank=8, alpha=2.0, target_modules=["to_q", "to_k", "to_v"], init=source), "lora.rank 8"),
                         (LoraSettings(rank=4, alpha=2.0, target_modules=["to_q"], init=source), "not among lora.target_modules")):
        other = _transformer(tiny_model)
        add_lora(other, wrong)
        with pytest.raises(HvctlError, match=match):
            init_lora_from_file(other, wrong)
