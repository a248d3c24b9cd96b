"""`hvctl model init`, `hvctl model info`, `hvctl recipe show`, and loading errors."""

import json

import pytest

from conftest import run_cli
from hvctl.errors import HvctlError
from hvctl.models.loading import ModelFolder, folder_fingerprint, load_components


@pytest.mark.slow
def test_tiny_init_is_deterministic_and_loads_in_diffusers(tmp_path):
    from diffusers import HunyuanVideoPipeline

    a = run_cli("model", "init", "--preset", "tiny", tmp_path / "a", "--json")
    b = run_cli("model", "init", "--preset", "tiny", tmp_path / "b", "--json")
    assert a.returncode == 0 and b.returncode == 0, a.stderr + b.stderr
    info = json.loads(a.stdout)
    assert 1_000_000 < info["parameters"] < 20_000_000
    assert set(info["components"]) == {"transformer", "vae", "text_encoder", "text_encoder_2", "scheduler", "tokenizer", "tokenizer_2"}
    # Same seed, same bytes: tokenizers built locally and weights alike.
    assert folder_fingerprint(tmp_path / "a") == folder_fingerprint(tmp_path / "b")
    pipe = HunyuanVideoPipeline.from_pretrained(tmp_path / "a")
    assert pipe.transformer.config.num_layers == info["components"]["transformer"]["config"]["num_layers"]
    assert not list((tmp_path / "a").rglob("*.bin")), "weights must be safetensors only"


@pytest.mark.slow
def test_official_preset_meta_has_the_13b_configuration(tmp_path):
    result = run_cli("model", "init", "--preset", "hunyuan-t2v-720p", "--meta", tmp_path / "hy", "--json")
    assert result.returncode == 0, result.stderr
    info = json.loads(result.stdout)
    transformer = info["components"]["transformer"]
    assert 12.7e9 < transformer["parameters"] < 12.9e9  # HunyuanVideo's DiT: 12.8B
    assert transformer["config"]["num_layers"] == 20 and transformer["config"]["num_single_layers"] == 40
    assert transformer["config"]["guidance_embeds"] is True
    assert info["weights"] is False and not list((tmp_path / "hy").rglob("*.safetensors"))
    assert info["generation_defaults"]["frames"] == 129 and info["generation_defaults"]["embedded_guidance"] == 6.0
    with pytest.raises(HvctlError, match="no weights"):
        load_components(tmp_path / "hy", parts=("transformer",))


@pytest.mark.slow
def test_model_info_reports_counts_from_headers(tiny_model):
    result = run_cli("model", "info", tiny_model, "--json")
    assert result.returncode == 0, result.stderr
    info = json.loads(result.stdout)
    parts = load_components(tiny_model, parts=("transformer",))
    assert info["components"]["transformer"]["parameters"] == sum(p.numel() for p in parts.transformer.parameters())
    assert info["generation_defaults"]["height"] == 64
    human = run_cli("model", "info", tiny_model)
    assert "HunyuanVideoTransformer3DModel" in human.stdout and "total parameters" in human.stdout


@pytest.mark.slow
@pytest.mark.parametrize("args, culprit", [
    (["model", "info", "/no/such/model"], "/no/such/model"),
    (["model", "init", "--preset", "huge", "/tmp/never-written"], "huge"),
])
def test_model_command_errors_are_one_line(args, culprit):
    result = run_cli(*args)
    assert result.returncode != 0
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error:") and culprit in lines[0], result.stderr


@pytest.mark.slow
def test_init_overrides_change_the_preset_config(tmp_path):
    result = run_cli("model", "init", "--preset", "toy", tmp_path / "m", "--json",
                     "--set", "vae.latent_channels=8", "--set", "vae.norm_num_groups=2",
                     "--set", "transformer.in_channels=8", "--set", "transformer.out_channels=8")
    assert result.returncode == 0, result.stderr
    vae = json.loads((tmp_path / "m" / "vae" / "config.json").read_text())
    transformer = json.loads((tmp_path / "m" / "transformer" / "config.json").read_text())
    assert vae["latent_channels"] == 8 and vae["norm_num_groups"] == 2 and transformer["in_channels"] == 8
    assert vae["block_out_channels"] == [16, 32, 64]  # the rest is the preset's
    assert json.loads((tmp_path / "m" / "hvctl.json").read_text())["overrides"]["vae"]["latent_channels"] == 8


@pytest.mark.slow
@pytest.mark.parametrize("override, culprit", [
    ("vae.latent_chanels=8", "vae.latent_chanels"), ("unet.x=1", "unet"), ("vae=3", "vae"),
])
def test_init_refuses_unknown_overrides(tmp_path, override, culprit):
    result = run_cli("model", "init", "--preset", "toy", tmp_path / "m", "--set", override)
    lines = result.stderr.strip().splitlines()
    assert result.returncode != 0 and len(lines) == 1 and lines[0].startswith("error:") and culprit in lines[0], result.stderr
    assert not (tmp_path / "m").exists()


@pytest.mark.slow
def test_init_refuses_a_non_empty_folder(tmp_path):
    (tmp_path / "keep.txt").write_text("mine")
    result = run_cli("model", "init", "--preset", "tiny", tmp_path)
    assert result.returncode != 0 and "not empty" in result.stderr
    assert (tmp_path / "keep.txt").read_text() == "mine"


def test_broken_weights_are_reported_with_the_path(tiny_model, tmp_path):
    import shutil

    broken = tmp_path / "broken"
    shutil.copytree(tiny_model, broken)
    (broken / "vae" / "diffusion_pytorch_model.safetensors").write_bytes(b"not a safetensors file")
    with pytest.raises(HvctlError, match=r"broken/vae"):
        load_components(broken, parts=("vae",))
    (broken / "model_index.json").write_text(json.dumps({**json.loads((tiny_model / "model_index.json").read_text()),
                                                          "vae": ["diffusers", "SomethingElse"]}))
    with pytest.raises(HvctlError, match="supported"):
        ModelFolder.open(broken).component_class("vae")


@pytest.mark.slow
def test_recipe_show_resolves_extends_and_overrides(tmp_path):
    (tmp_path / "base.yaml").write_text("kind: generate\nsteps: 50\nheight: 720\n")
    (tmp_path / "child.yaml").write_text("extends: base.yaml\nheight: 544\n")
    result = run_cli("recipe", "show", tmp_path / "child.yaml", "--set", "steps=20", "--json")
    assert result.returncode == 0, result.stderr
    shown = json.loads(result.stdout)
    assert (shown["kind"], shown["steps"], shown["height"], shown["width"]) == ("generate", 20, 544, None)
    bad = run_cli("recipe", "show", tmp_path / "child.yaml", "--set", "hieght=3")
    assert bad.returncode != 0 and "hieght" in bad.stderr and "height" in bad.stderr


def test_a_community_folder_takes_official_defaults_and_its_scheduler_shift(tiny_guided_model, tmp_path):
    import shutil

    folder = tmp_path / "community"
    shutil.copytree(tiny_guided_model, folder)
    (folder / "hvctl.json").unlink()
    scheduler = folder / "scheduler" / "scheduler_config.json"
    scheduler.write_text(json.dumps({**json.loads(scheduler.read_text()), "shift": 5.0}))
    defaults = ModelFolder.open(folder).generation_defaults
    assert (defaults["frames"], defaults["steps"], defaults["flow_shift"]) == (129, 50, 5.0)
    assert defaults["guidance_embeds"] is True and defaults["embedded_guidance"] == 6.0


def test_toy_text_encoders_give_unit_scale_states_that_tell_words_apart():
    import torch

    from hvctl.models.presets import build_components, get_preset
    from hvctl.models.text import PromptEncoder

    prompts = ["a red circle moves left on a black background", "a green square moves left on a black background"]
    stds = {}
    for preset in ("tiny", "toy"):
        c = build_components(get_preset(preset), seed=0)
        states = PromptEncoder(c["tokenizer"], c["text_encoder"], c["tokenizer_2"], c["text_encoder_2"], text_len=64)(prompts)
        n = int(states.llm_mask[0].sum())
        stds[preset] = float(states.llm_states[0, :n].std())
        if preset == "toy":  # "red" vs "green" and "circle" vs "square": far apart; shared words: the same
            cos = torch.nn.functional.cosine_similarity(states.llm_states[0, :n], states.llm_states[1, :n], dim=-1)
            assert (cos < 0.5).sum() == 2 and (cos > 0.99).sum() == n - 2
    assert stds["tiny"] < 0.1 < 0.5 < stds["toy"] < 2.0


def test_toy_clip_pools_a_bag_of_words():
    import torch

    from hvctl.models.presets import build_components, get_preset
    from hvctl.models.text import PromptEncoder

    prompts = ["a red circle moves left on a black background", "circle a red moves left on a black background",
               "a red circle moves left on a white background", "a blue square stays still on a white background"]
    c = build_components(get_preset("toy"), seed=0)
    pooled = PromptEncoder(c["tokenizer"], c["text_encoder"], c["tokenizer_2"], c["text_encoder_2"], text_len=64)(prompts).pooled
    cos = torch.nn.functional.cosine_similarity(pooled[:, None], pooled[None], dim=-1)
    assert cos[0, 1] > 0.9999  # word order does not matter
    assert cos[0, 3] < cos[0, 2] < 0.99  # each differing word moves it, more words further


def test_a_component_resaved_elsewhere_keeps_its_fingerprint(tiny_model, tmp_path):
    """diffusers writes where a component was loaded from (_name_or_path) and its own version into
    config.json; neither changes what the component is, so neither changes the fingerprint
    (a cache encoded by one copy of a VAE trains a model holding another copy)."""
    import shutil

    copy = tmp_path / "vae"
    shutil.copytree(tiny_model / "vae", copy)
    config = json.loads((copy / "config.json").read_text())
    (copy / "config.json").write_text(json.dumps({**config, "_name_or_path": "/elsewhere/vae", "_diffusers_version": "0.0.1"}))
    assert folder_fingerprint(copy) == folder_fingerprint(tiny_model / "vae")
    (copy / "config.json").write_text(json.dumps({**config, "scaling_factor": 0.5}))
    assert folder_fingerprint(copy) != folder_fingerprint(tiny_model / "vae")
