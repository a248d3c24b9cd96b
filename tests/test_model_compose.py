"""`hvctl model compose`: components from other folders, recast weights, new generation defaults."""

import json

import pytest
import torch
from safetensors.torch import load_file

from conftest import run_cli


@pytest.mark.slow
def test_compose_takes_a_component_and_casts(tiny_model, tiny_guided_model, tmp_path):
    out = tmp_path / "composed"
    result = run_cli("model", "compose", tiny_model, out, "--take", f"vae={tiny_guided_model}", "--dtype", "float16",
                     "--default", "guidance_scale=4.5", "--default", "steps=12", "--json")
    assert result.returncode == 0, result.stderr
    vae_file = "vae/diffusion_pytorch_model.safetensors"
    vae, other = load_file(str(out / vae_file)), load_file(str(tiny_guided_model / vae_file))
    assert all(v.dtype == torch.float16 and torch.equal(v, other[k].half()) for k, v in vae.items())
    dit_file = "transformer/diffusion_pytorch_model.safetensors"
    dit, base = load_file(str(out / dit_file)), load_file(str(tiny_model / dit_file))
    assert all(torch.equal(v, base[k].half()) for k, v in dit.items())
    generation = json.loads((out / "hvctl.json").read_text())["generation"]
    assert generation["guidance_scale"] == 4.5 and generation["steps"] == 12
    gen = run_cli("generate", "a red circle", "--model", out, "--steps", 1, "--frames", 1, "--seed", 0,
                  "-o", tmp_path / "v.mp4", "--json")
    assert gen.returncode == 0, gen.stderr
    assert json.loads(gen.stdout)["settings"]["guidance_scale"] == 4.5


def test_compose_without_a_dtype_keeps_the_encoders_a_cache_was_made_with(tiny_model, tiny_guided_model, tmp_path):
    from hvctl.cache import encoder_identities
    from hvctl.models.compose import compose_model

    out = compose_model(tiny_model, tmp_path / "new-dit", take={"transformer": tiny_guided_model})
    # the base's VAE and text encoders, byte for byte: a cache the base encoded is this model's too
    assert encoder_identities(out) == encoder_identities(tiny_model)
    for name in ("vae/diffusion_pytorch_model.safetensors", "text_encoder_2/config.json", "scheduler/scheduler_config.json"):
        assert (out / name).read_bytes() == (tiny_model / name).read_bytes(), name
    dit = "transformer/diffusion_pytorch_model.safetensors"
    assert (out / dit).read_bytes() == (tiny_guided_model / dit).read_bytes()
    recast = compose_model(tiny_model, tmp_path / "recast", take={"transformer": tiny_guided_model}, dtype="float16")
    assert encoder_identities(recast) != encoder_identities(tiny_model)


@pytest.mark.slow
def test_compose_errors_are_one_line(tiny_model, tiny_guided_model, tmp_path):
    result = run_cli("model", "compose", tiny_model, tmp_path / "a", "--take", f"transformer={tiny_guided_model}x")
    assert result.returncode == 1 and len(result.stderr.strip().splitlines()) == 1
    result = run_cli("model", "compose", tiny_model, tmp_path / "b", "--take", f"unet={tiny_guided_model}")
    assert result.returncode == 1 and "no such component" in result.stderr
    result = run_cli("model", "compose", tiny_model, tmp_path / "c", "--default", "colour=red")
    assert result.returncode == 1 and "not a generation setting" in result.stderr
    assert not (tmp_path / "c").exists()
