"""Image-to-video: both conditioning designs, made from a text-to-video model, sampled and trained."""

import json

import pytest
import torch
from safetensors.torch import load_file

from conftest import run_cli, small_cache
from hvctl.i2v import ImageCondition, expand_for_i2v
from hvctl.toy.world import render, sample_spec
from hvctl.video import read_video, write_image


@pytest.fixture(scope="module")
def i2v_models(tiny_model, tmp_path_factory):
    root = tmp_path_factory.mktemp("i2v")
    models = {}
    for kind in ("latent_concat", "token_replace"):
        done = run_cli("model", "compose", tiny_model, root / kind, "--i2v", kind, "--json")
        assert done.returncode == 0, done.stderr
        models[kind] = root / kind
    return models


@pytest.fixture(scope="module")
def first_frame(tmp_path_factory):
    path = tmp_path_factory.mktemp("image") / "frame.png"
    write_image(path, render(sample_spec(0, 4, "eval", "image", size=(32, 32)))[0])
    return path


@pytest.mark.slow
def test_latent_concat_adds_zero_input_weights_so_the_image_changes_nothing_at_first(tiny_model, i2v_models):
    config = json.loads((i2v_models["latent_concat"] / "transformer" / "config.json").read_text())
    assert config["in_channels"] == 33 and config["image_condition_type"] == "latent_concat"
    base = load_file(str(tiny_model / "transformer" / "diffusion_pytorch_model.safetensors"))
    expanded = load_file(str(i2v_models["latent_concat"] / "transformer" / "diffusion_pytorch_model.safetensors"))
    weight = expanded["x_embedder.proj.weight"]
    assert torch.equal(weight[:, :16], base["x_embedder.proj.weight"]) and not weight[:, 16:].any()
    assert all(torch.equal(base[k], expanded[k]) for k in base if k != "x_embedder.proj.weight")


def test_expanded_model_predicts_what_the_text_to_video_model_does(tiny_model):
    from hvctl.models.loading import load_components

    t2v = load_components(tiny_model, parts=("transformer",)).transformer.float()
    i2v = expand_for_i2v(t2v, "latent_concat")
    latents = torch.randn(1, 16, 2, 4, 4, generator=torch.Generator().manual_seed(0))
    condition = ImageCondition("latent_concat", torch.randn(1, 16, 1, 4, 4))
    text = dict(timestep=torch.tensor([500.0]), encoder_hidden_states=torch.randn(1, 5, 64),
                encoder_attention_mask=torch.ones(1, 5, dtype=torch.bool), pooled_projections=torch.randn(1, 32))
    with torch.no_grad():
        plain = t2v(hidden_states=latents, **text, return_dict=False)[0]
        conditioned = i2v(hidden_states=condition.model_input(latents), **text, return_dict=False)[0]
    assert torch.allclose(plain, conditioned, atol=1e-6)


@pytest.mark.slow
def test_token_replace_keeps_frame_zero_the_image(i2v_models, first_frame, tmp_path):
    from hvctl.generate import GenerateRecipe, TextToVideo, prepare
    from hvctl.models.loading import resolve_device_dtype

    r, model_dir = prepare(GenerateRecipe(prompt="a red circle moves left on a black background", image=first_frame,
                                          model=i2v_models["token_replace"], steps=3, frames=9, height=32, width=32,
                                          seed=1, dtype="float32"))
    t2v = TextToVideo(model_dir, r, *resolve_device_dtype(r.device, r.dtype))
    conditions = t2v.conditions([r.prompt])
    latents = t2v.latents([1], conditions)
    # Frame 0 is the image's latent at every step, whatever the (random) DiT predicts there.
    assert torch.equal(latents[:, :, :1], conditions.image.image_latent)
    assert not torch.equal(latents[:, :, 1:2], conditions.image.image_latent)

    out = tmp_path / "v.mp4"
    done = run_cli("i2v", first_frame, r.prompt, "--model", i2v_models["token_replace"], "--steps", "3", "--frames", "9",
                   "--height", "32", "--width", "32", "--seed", "1", "-o", out, "--json")
    assert done.returncode == 0, done.stderr
    assert read_video(out)[0].shape == (9, 32, 32, 3)
    sidecar = json.loads(out.with_suffix(".json").read_text())
    assert sidecar["settings"]["flow_shift"] == 7.0 and sidecar["settings"]["image"].endswith("frame.png")


@pytest.mark.slow
def test_stability_off_takes_the_official_shift_17(i2v_models, first_frame, tmp_path):
    out = tmp_path / "v.mp4"
    done = run_cli("i2v", first_frame, "a cyan square", "--model", i2v_models["latent_concat"], "--steps", "2",
                   "--frames", "5", "--height", "32", "--width", "32", "--no-stability", "-o", out)
    assert done.returncode == 0, done.stderr
    assert json.loads(out.with_suffix(".json").read_text())["settings"]["flow_shift"] == 17.0


@pytest.mark.slow
def test_the_wrong_kind_of_model_is_one_line(tiny_model, i2v_models, first_frame):
    done = run_cli("i2v", first_frame, "x", "--model", tiny_model, "--steps", "1")
    assert done.returncode == 1 and "is a text-to-video model" in done.stderr and "i2v" in done.stderr
    done = run_cli("generate", "x", "--model", i2v_models["token_replace"], "--steps", "1")
    assert done.returncode == 1 and "is an image-to-video model (token_replace)" in done.stderr


def test_token_replace_training_leaves_frame_zero_out_of_the_loss(i2v_models):
    from hvctl.models.loading import load_components
    from hvctl.train.config import FlowConfig
    from hvctl.train.objectives import FlowMatchingObjective

    model = load_components(i2v_models["token_replace"], parts=("transformer",)).transformer.float()
    objective = FlowMatchingObjective(FlowConfig(), None, 0.0)
    batch = {"latent_mean": torch.randn(2, 16, 3, 4, 4), "latent_std": torch.zeros(2, 16, 3, 4, 4),
             "text_states": torch.randn(2, 5, 64), "text_mask": torch.ones(2, 5, dtype=torch.bool),
             "pooled": torch.randn(2, 32)}
    loss, _ = objective(model, batch, torch.Generator().manual_seed(0))
    changed = dict(batch, latent_mean=batch["latent_mean"].clone())
    changed["latent_mean"][:, :, 0] += 5.0  # only the given frame: the target there no longer counts...
    changed_loss, _ = objective(model, changed, torch.Generator().manual_seed(0))
    # ...but it is the model's input for the other frames, so the loss moves a little, not by 25.
    assert 1e-6 < abs(float(changed_loss) - float(loss)) < 1.0
    with pytest.raises(Exception, match="needs videos"):
        objective(model, {k: v[:, :, :1] if k.startswith("latent") else v for k, v in batch.items()},
                  torch.Generator().manual_seed(0))


@pytest.mark.slow
def test_hvctl_train_trains_an_i2v_model_on_videos(i2v_models, tiny_model, tmp_path):
    small_cache(tmp_path, i2v_models["latent_concat"], videos=4, images=0, seed=3, frames=9)
    recipe = tmp_path / "i2v.yaml"
    recipe.write_text("\n".join([
        "kind: train", "target: dit", f"model: {i2v_models['latent_concat']}", f"out: {tmp_path / 'run'}",
        "steps: 3", "optim:", "  lr: 0.01", "data:", f"  cache: {tmp_path / 'cache'}", "  batch_size: 2",
        "  media: [video]", "checkpoint:", "  every: 3",
    ]) + "\n")
    done = run_cli("train", recipe, "--json")
    assert done.returncode == 0, done.stderr
    weights = load_file(str(tmp_path / "run" / "model" / "transformer" / "diffusion_pytorch_model.safetensors"))
    assert weights["x_embedder.proj.weight"][:, 16:].abs().sum() > 0  # the image channels learned something
    # Or from the text-to-video model itself, the recipe making it image-to-video first.
    recipe.write_text(recipe.read_text().replace(str(i2v_models["latent_concat"]), str(tiny_model))
                      .replace(str(tmp_path / "run"), str(tmp_path / "run2")) + "i2v: token_replace\n")
    done = run_cli("train", recipe, "--json")
    assert done.returncode == 0, done.stderr
    config = json.loads((tmp_path / "run2" / "model" / "transformer" / "config.json").read_text())
    assert config["image_condition_type"] == "token_replace"


@pytest.mark.slow
def test_eval_toy_i2v_scores_frame_0_against_each_condition_image(i2v_models, tmp_path):
    from hvctl.models.loading import load_components
    from hvctl.models.vae import decode_to_frames, encode_posterior
    from hvctl.toy.evaluate import prompt_set, psnr

    model = i2v_models["token_replace"]
    result = run_cli("eval", "toy", "--model", model, "--i2v", "--prompts", "2", "--steps", "2", "--vae-videos", "0", "--json")
    assert result.returncode == 0, result.stderr
    run = json.loads(result.stdout)["runs"][0]
    # token_replace keeps frame 0's latent equal to the image's, so frame 0 is the VAE's own
    # reconstruction of each condition image, whatever the (random) DiT does.
    vae = load_components(model, parts=("vae",)).vae
    expected = []
    for sample in prompt_set(2, seed=0):
        image = render(sample_spec(0, sample.index, "eval", "video", size=(run["height"], run["width"]),
                                   frames=run["frames"]))[0]
        mean, _ = encode_posterior(vae, image[None])
        expected.append(psnr(image, decode_to_frames(vae, mean[None])[0].numpy()[0]))
    assert run["frame0_psnr"] == pytest.approx(sum(expected) / 2, abs=0.5)
    assert run["accuracy"]["seen"]["n"] + run["accuracy"].get("held_out", {"n": 0})["n"] == 2
    assert run_cli("eval", "toy", "--model", model, "--i2v", "--rewrite", "lexicon").returncode == 1
