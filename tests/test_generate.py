"""hvctl's sampling equals diffusers' HunyuanVideoPipeline, and `hvctl generate` behaves as a CLI should."""

import json

import pytest
import torch

from conftest import run_cli
from hvctl.generate import GenerateRecipe, TextToVideo, prepare
from hvctl.models.loading import resolve_device_dtype
from hvctl.models.templates import PROMPT_TEMPLATES, crop_start

PROMPT = "a red circle moves left on a black background"
SIZE = dict(height=32, width=48, frames=9)  # not square, so a swapped height/width would show


def hvctl_latents(model, **settings):
    r, model_dir = prepare(GenerateRecipe(model=model, prompt=PROMPT, dtype="float32", device="cpu", **SIZE, **settings))
    return TextToVideo(model_dir, r, *resolve_device_dtype(r.device, r.dtype)).latents([r.seed])


def diffusers_latents(model, *, seed, steps, shift, text_len, guidance_scale=1.0, negative_prompt=None, embedded=6.0):
    from diffusers import FlowMatchEulerDiscreteScheduler, HunyuanVideoPipeline

    pipe = HunyuanVideoPipeline.from_pretrained(model, dtype=torch.float32)
    pipe.scheduler = FlowMatchEulerDiscreteScheduler.from_config(pipe.scheduler.config, shift=shift)
    pipe.set_progress_bar_config(disable=True)
    template = PROMPT_TEMPLATES["video"]
    return pipe(
        prompt=PROMPT, negative_prompt=negative_prompt, true_cfg_scale=guidance_scale, guidance_scale=embedded,
        height=SIZE["height"], width=SIZE["width"], num_frames=SIZE["frames"], num_inference_steps=steps,
        generator=torch.Generator("cpu").manual_seed(seed), max_sequence_length=text_len, output_type="latent",
        prompt_template={"template": template.template, "crop_start": crop_start(pipe.tokenizer, template)},
    ).frames


def test_crop_start_points_at_the_prompt(tiny_model):
    from transformers import PreTrainedTokenizerFast

    tokenizer = PreTrainedTokenizerFast.from_pretrained(tiny_model / "tokenizer")
    for template in PROMPT_TEMPLATES.values():
        start = crop_start(tokenizer, template)
        ids = tokenizer(template.template.format(PROMPT))["input_ids"]
        assert tokenizer.decode(ids[start:-1]) == PROMPT  # then only <|eot_id|> follows
        assert tokenizer.convert_ids_to_tokens(ids[-1]) == "<|eot_id|>"


def test_true_cfg_matches_diffusers(tiny_model):
    ours = hvctl_latents(tiny_model, seed=3, steps=4, flow_shift=5.0, text_len=32, guidance_scale=4.0,
                         negative_prompt="a blurry video")
    theirs = diffusers_latents(tiny_model, seed=3, steps=4, shift=5.0, text_len=32, guidance_scale=4.0,
                               negative_prompt="a blurry video")
    assert ours.shape == theirs.shape == (1, 16, 3, 4, 6)
    assert torch.allclose(ours, theirs, atol=1e-4, rtol=0), (ours - theirs).abs().max()
    # The comparison means something: guidance changes the result far beyond the tolerance.
    unguided = hvctl_latents(tiny_model, seed=3, steps=4, flow_shift=5.0, text_len=32, guidance_scale=1.0)
    assert (unguided - ours).abs().max() > 1e-2


def test_embedded_guidance_matches_diffusers(tiny_guided_model):
    ours = hvctl_latents(tiny_guided_model, seed=5, steps=3, flow_shift=7.0, text_len=24, embedded_guidance=6.0)
    theirs = diffusers_latents(tiny_guided_model, seed=5, steps=3, shift=7.0, text_len=24, embedded=6.0)
    assert torch.allclose(ours, theirs, atol=1e-4, rtol=0), (ours - theirs).abs().max()
    other = hvctl_latents(tiny_guided_model, seed=5, steps=3, flow_shift=7.0, text_len=24, embedded_guidance=2.0)
    assert (other - ours).abs().max() > 1e-3


def test_same_seed_same_latents_and_seed_matters(tiny_model):
    a = hvctl_latents(tiny_model, seed=11, steps=2)
    assert torch.equal(a, hvctl_latents(tiny_model, seed=11, steps=2))
    assert not torch.allclose(a, hvctl_latents(tiny_model, seed=12, steps=2))


@pytest.mark.slow
def test_generate_cli_writes_mp4_and_sidecar(tiny_model, tmp_path):
    from hvctl.video import read_video

    out = tmp_path / "clip.mp4"
    result = run_cli("generate", PROMPT, "--model", tiny_model, "--height", 32, "--width", 48, "--frames", 9,
                     "--steps", 2, "--seed", 7, "--num-videos", 2, "--fps", 8, "-o", out, "--json")
    assert result.returncode == 0, result.stderr
    report = json.loads(result.stdout)
    assert [v["seed"] for v in report["videos"]] == [7, 8]
    for i, video in enumerate(report["videos"]):
        frames, fps = read_video(video["path"])
        assert frames.shape == (9, 32, 48, 3) and fps == 8
        sidecar = json.loads(open(video["sidecar"]).read())
        assert sidecar["seed"] == 7 + i and sidecar["prompt"] == PROMPT
        assert sidecar["settings"]["frames"] == 9 and sidecar["settings"]["steps"] == 2
        assert sidecar["model"]["fingerprint"].startswith("sha256:")
        assert sidecar["hvctl_version"]
    assert (tmp_path / "clip_0.mp4").exists() and (tmp_path / "clip_1.mp4").exists()


@pytest.mark.slow
def test_generate_reads_a_recipe_and_flags_win(tiny_model, tmp_path):
    recipe = tmp_path / "gen.yaml"
    recipe.write_text(f"kind: generate\nmodel: {tiny_model}\nprompt: {PROMPT}\nheight: 32\nwidth: 32\nframes: 5\nsteps: 1\nseed: 4\n")
    result = run_cli("generate", "--recipe", recipe, "--frames", 9, "--set", "width=48", "-o", tmp_path / "r.mp4", "--json")
    assert result.returncode == 0, result.stderr
    settings = json.loads(result.stdout)["settings"]
    assert (settings["frames"], settings["width"], settings["height"], settings["seed"]) == (9, 48, 32, 4)


@pytest.mark.slow
@pytest.mark.parametrize("args, culprit", [
    (["--frames", "16"], "--frames"),
    (["--height", "50"], "--height"),
    (["--width", "0"], "--width"),
    (["--model", "/nonexistent/model"], "/nonexistent/model"),
])
def test_bad_generate_input_is_one_clear_line(tiny_model, tmp_path, args, culprit):
    base = ["generate", PROMPT, "--model", tiny_model, "-o", tmp_path / "x.mp4"]
    result = run_cli(*base, *args)
    assert result.returncode != 0
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error:") and culprit in lines[0], result.stderr
    assert not (tmp_path / "x.mp4").exists()


@pytest.mark.slow
def test_unknown_recipe_key_is_one_clear_line(tmp_path):
    recipe = tmp_path / "bad.yaml"
    recipe.write_text("kind: generate\nstepz: 3\n")
    result = run_cli("generate", PROMPT, "--recipe", recipe)
    assert result.returncode != 0
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and "bad.yaml" in lines[0] and "stepz" in lines[0] and "steps" in lines[0]


def test_the_flow_shift_follows_the_step_count_unless_set(tiny_model):
    from hvctl.generate import GenerateRecipe, prepare

    shift = lambda **kw: prepare(GenerateRecipe(prompt="x", model=tiny_model, **kw))[0].flow_shift  # noqa: E731
    assert shift(steps=50) == 7.0 and shift(steps=20) == 7.0  # the scheduler's
    assert shift(steps=10) == pytest.approx(17.0)  # the official short-schedule shift
    assert shift(steps=10, flow_shift=5.0) == 5.0
