"""Avatar: conditioners hooked into a plain transformer, audio encoders, cached conditions,
training, windowed generation with the audio muxed in, and the toy evaluation."""

import json
import shutil

import numpy as np
import pytest
import torch

from conftest import run_cli
from hvctl.avatar import (AvatarConditioners, WindowedDenoiser, batch_inputs, blend_weights, load_conditioners,
                          save_conditioners, windows)
from hvctl.toy.render import render_avatar_dataset
from hvctl.toy.world import AUDIO_RATE, AvatarSample, avatar_spec

ALL = {"reference": {}, "pose": {}, "audio": {"feature_dim": 80, "blocks": [0]}, "expression": {"feature_dim": 2, "every": 1}}


def avatar_config(conditioners=ALL, window=5):
    return {"conditioners": conditioners, "audio_encoder": {"name": "logmel", "options": {}},
            "window": {"frames": window, "overlap": 1}}


def transformer_of(model):
    from hvctl.models.loading import ModelFolder, load_component

    return load_component(ModelFolder.open(model), "transformer", dtype=torch.float32, device="cpu")


def text_kwargs(transformer, batch, seed=0):
    g = torch.Generator().manual_seed(seed)
    return dict(timestep=torch.full((batch,), 700.0),
                encoder_hidden_states=torch.randn(batch, 6, transformer.config.text_embed_dim, generator=g),
                encoder_attention_mask=torch.ones(batch, 6, dtype=torch.long),
                pooled_projections=torch.randn(batch, transformer.config.pooled_projection_dim, generator=g))


def call(transformer, latents):
    return transformer(hidden_states=latents, return_dict=False, **text_kwargs(transformer, latents.shape[0]))[0]


def random_inputs(batch, frames, latent_shape, seed=0):
    g = torch.Generator().manual_seed(seed)
    c, t, h, w = latent_shape
    return batch_inputs([{"reference": torch.randn(c, 1, h, w, generator=g), "pose": torch.randn(c, t, h, w, generator=g),
                          "audio": torch.randn(frames, 80, generator=g), "expression": torch.randn(frames, 2, generator=g)}
                         for _ in range(batch)])


@pytest.fixture(scope="module")
def hooked(tiny_model):
    """The tiny transformer with every conditioner, their weights randomised (as if trained)."""
    transformer = transformer_of(tiny_model)
    conditioners = AvatarConditioners(avatar_config(), transformer.config)
    conditioners.attach(transformer)
    torch.manual_seed(0)
    for p in conditioners.parameters():
        torch.nn.init.normal_(p, std=0.1)
    return transformer


def test_new_conditioners_start_at_zero_so_the_model_is_unchanged(tiny_model):
    transformer = transformer_of(tiny_model)
    latents = torch.randn(2, 16, 3, 4, 4)
    before = call(transformer, latents)
    AvatarConditioners(avatar_config(), transformer.config).attach(transformer)
    with transformer.avatar.given(random_inputs(2, 9, (16, 3, 4, 4))):
        assert torch.equal(call(transformer, latents), before)


def test_conditions_steer_the_model_and_absent_ones_do_nothing(hooked):
    latents = torch.randn(2, 16, 3, 4, 4)
    plain = call(hooked, latents)
    inputs = random_inputs(2, 9, (16, 3, 4, 4))
    with hooked.avatar.given(inputs):
        steered = call(hooked, latents)
    assert (steered - plain).abs().amax(dim=(1, 2, 3, 4)).min() > 1e-3
    absent = {**inputs, **{k: torch.zeros(2) for k in inputs if k.startswith("present.")}}
    with hooked.avatar.given(absent):
        assert torch.allclose(call(hooked, latents), plain, atol=1e-6)


@pytest.mark.parametrize("name", ["audio", "expression"])
def test_per_frame_features_reach_only_their_own_latent_frame(hooked, name):
    """Video frames 5..8 are latent frame 2 of the causal VAE; changing their features must change
    the cross-attention's output on that latent frame's tokens and no other (before the model's
    own attention mixes frames), or lips would run ahead of the sound."""
    conditioner = hooked.avatar.conditioners[name]
    grid = (4, 2, 2)  # latent frames, token rows, token columns
    hidden = torch.randn(1, 16, hooked.config.num_attention_heads * hooked.config.attention_head_dim)
    inputs = random_inputs(1, 13, (16, 4, 4, 4))
    changed = {**inputs, name: inputs[name].clone()}
    changed[name][:, 5:9] += 3.0
    block = conditioner.blocks[0]
    a = conditioner.after_block(block, hidden, inputs, grid)
    b = conditioner.after_block(block, hidden, changed, grid)
    moved = (a - b).abs().reshape(4, 4, -1).amax(dim=(1, 2))  # per latent frame
    assert moved[2] > 1e-3 and torch.all(moved[[0, 1, 3]] == 0)


def test_a_zero_audio_mask_silences_the_audio(hooked):
    latents = torch.randn(1, 16, 3, 4, 4)
    plain = call(hooked, latents)
    inputs = {k: v for k, v in random_inputs(1, 9, (16, 3, 4, 4)).items() if k in ("audio", "present.audio")}
    with hooked.avatar.given(inputs):
        assert not torch.allclose(call(hooked, latents), plain)
    with hooked.avatar.given({**inputs, "audio_mask": torch.zeros(1, 1, 32, 32)}):
        assert torch.allclose(call(hooked, latents), plain, atol=1e-6)


def test_windows_cover_the_video_and_blend_weights_sum_to_one():
    assert windows(5, 5, 2) == [(0, 5)]
    spans = windows(11, 5, 2)
    assert spans == [(0, 5), (3, 8), (6, 11)]
    total = torch.zeros(11)
    for (start, stop), w in zip(spans, blend_weights(spans)):
        total[start:stop] += w
    assert torch.allclose(total, torch.ones(11))


def test_one_window_is_the_plain_call_and_long_videos_are_windowed(hooked):
    latents = torch.randn(1, 16, 3, 4, 4)
    inputs = random_inputs(1, 9, (16, 3, 4, 4))
    with hooked.avatar.given(inputs):
        direct = call(hooked, latents)
    windowed = WindowedDenoiser(hooked, inputs, 3, 1)(hidden_states=latents, **text_kwargs(hooked, 1))[0]
    assert torch.allclose(windowed, direct, atol=1e-6)
    long = torch.randn(2, 16, 7, 4, 4)  # and a doubled batch, as classifier-free guidance makes it
    out = WindowedDenoiser(hooked, random_inputs(1, 25, (16, 7, 4, 4)), 3, 1)(hidden_states=long, **text_kwargs(hooked, 2))[0]
    assert out.shape == long.shape and torch.isfinite(out).all()


def test_logmel_features_follow_the_toy_audio_envelope():
    from hvctl import plugins

    sample = avatar_spec(0, 3, "eval", ("audio",), frames=33)
    encoder = plugins.create("audio_encoder", "logmel")
    features = encoder(sample.audio(), 8.0, 33)
    assert features.shape == (33, 80)
    loudness = features.max(dim=1).values.numpy()
    envelope = sample.envelope(sample.times())
    assert np.corrcoef(loudness, np.log(envelope))[0, 1] > 0.95


@pytest.fixture(scope="module")
def tiny_whisper(tmp_path_factory):
    from transformers import WhisperConfig, WhisperFeatureExtractor, WhisperModel

    out = tmp_path_factory.mktemp("models") / "tiny-whisper"
    config = WhisperConfig(d_model=16, encoder_layers=1, decoder_layers=1, encoder_attention_heads=2,
                           decoder_attention_heads=2, encoder_ffn_dim=32, decoder_ffn_dim=32, num_mel_bins=80,
                           max_source_positions=50, max_target_positions=16, vocab_size=64,
                           pad_token_id=0, bos_token_id=1, eos_token_id=2, decoder_start_token_id=1)
    torch.manual_seed(0)
    WhisperModel(config).save_pretrained(out)
    WhisperFeatureExtractor(feature_size=80, chunk_length=1).save_pretrained(out)  # 1 s windows: 100 mel frames
    return out


def test_whisper_encoder_reads_a_local_folder_and_gives_one_vector_per_frame(tiny_whisper, tmp_path):
    from hvctl import plugins
    from hvctl.errors import HvctlError

    encoder = plugins.create("audio_encoder", "whisper", path=str(tiny_whisper))
    sample = avatar_spec(0, 1, "eval", ("audio",), frames=21)  # 2.6 s: three Whisper windows
    features = encoder(sample.audio(), 8.0, 21)
    assert features.shape == (21, 16) and torch.isfinite(features).all()
    assert not torch.allclose(features[0], features[-1])
    with pytest.raises(HvctlError, match="not a Whisper folder"):
        plugins.create("audio_encoder", "whisper", path=str(tmp_path))


@pytest.fixture(scope="module")
def avatar_data(tmp_path_factory):
    root = tmp_path_factory.mktemp("avatar-data")
    manifest = render_avatar_dataset(root, 6, seed=0, split="train", modes="hybrid", frames=9, size=(32, 32))
    return manifest


def encode_avatar(manifest, model, cache, **extra):
    from hvctl.encode import EncodeRecipe, encode

    return encode(EncodeRecipe(manifest=manifest, out=cache, model=model, aspect_buckets=[(32, 32)], frame_buckets=[9],
                               caption_variants=2, **extra))


@pytest.fixture(scope="module")
def avatar_cache(avatar_data, tiny_model, tmp_path_factory):
    cache = tmp_path_factory.mktemp("avatar-cache") / "cache"
    encode_avatar(avatar_data, tiny_model, cache)
    return cache


def test_encode_caches_each_samples_conditions(avatar_data, avatar_cache):
    from hvctl.cache import LatentCache
    from hvctl.data.manifest import read_manifest

    records = {r.id: r for r in read_manifest(avatar_data)}
    dataset = LatentCache(avatar_cache, text_len=16)
    assert len(dataset) == 6
    for i, entry in enumerate(dataset.entries):
        named = {k for k in ("audio", "pose", "expression") if k in records[entry.id].extra}
        assert set(entry.conditions) == {"reference", *named}
        item = dataset[i]
        assert item["cond.reference"].shape == (16, 1, 4, 4)  # the tiny VAE: 8x in space
        if "pose" in named:
            assert item["cond.pose"].shape == (16, 3, 4, 4)
        if "audio" in named:
            assert item["cond.audio"].shape == (9, 80)
        if "expression" in named:
            truth = np.load(avatar_data.parent / records[entry.id].extra["expression"])
            assert torch.allclose(item["cond.expression"].float(), torch.from_numpy(truth), atol=1e-3)
        # the render's loss mask, on the latent grid: the cell under the object's centre, little else
        assert entry.loss_mask and item["loss_mask"].shape == (1, 3, 4, 4)
        sample = AvatarSample.from_dict(records[entry.id].extra["toy_avatar"])
        x, y = sample.centres()[0]
        assert item["loss_mask"][0, 0, int(y) // 8, int(x) // 8] == 1
        assert 0 < item["loss_mask"].float().mean() < 0.5


def test_a_changed_condition_file_is_encoded_again_and_a_missing_one_reported(avatar_data, tiny_model, tmp_path):
    from hvctl.data.manifest import read_manifest
    from hvctl.video import write_wav

    root = tmp_path / "data"
    shutil.copytree(avatar_data.parent, root)
    manifest = root / avatar_data.name
    cache = tmp_path / "cache"
    assert encode_avatar(manifest, tiny_model, cache)["encoded"] == 6
    with_audio = [r for r in read_manifest(manifest) if "audio" in r.extra]
    write_wav(root / with_audio[0].extra["audio"], np.zeros(AUDIO_RATE, np.float32) + 0.1, AUDIO_RATE)
    (root / with_audio[1].extra["audio"]).unlink()
    result = encode_avatar(manifest, tiny_model, cache)
    assert result["encoded"] == 1 and result["skipped_cached"] == 4
    assert [f["reason"] for f in result["failed"]] == ["condition file not found"]


@pytest.mark.slow
def test_train_avatar_exports_conditioners_beside_a_plain_transformer_and_resumes_exactly(avatar_cache, tiny_model, tmp_path):
    from diffusers import HunyuanVideoTransformer3DModel
    from safetensors.torch import load_file

    from hvctl.recipe import load_recipe
    from hvctl.train.config import TrainRecipe
    from hvctl.train.trainer import train

    def recipe(out, steps):
        return load_recipe(TrainRecipe, values={
            "model": tiny_model, "out": out, "steps": steps, "data": {"cache": avatar_cache, "batch_size": 2, "text_len": 16},
            "avatar": {"conditions": ["reference", "audio", "pose", "expression"], "drop": {"audio": 0.3},
                       "options": {"audio": {"blocks": [0]}}},
            "checkpoint": {"every": 2}, "optim": {"lr": 1e-3}, "tensorboard": False})

    whole = train(recipe(tmp_path / "whole", 4), progress=False)
    train(recipe(tmp_path / "resumed", 2), progress=False)
    train(recipe(tmp_path / "resumed", 4), progress=False)
    model = tmp_path / "whole" / "model"
    a = load_file(str(model / "avatar" / "conditioners.safetensors"))
    b = load_file(str(tmp_path / "resumed" / "model" / "avatar" / "conditioners.safetensors"))
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    assert any(v.abs().sum() > 0 for k, v in a.items() if "to_out" in k)  # trained away from zero
    config = json.loads((model / "avatar" / "config.json").read_text())
    assert config["conditioners"]["audio"] == {"blocks": [0], "feature_dim": 80} and config["window"]["frames"] == 9
    plain = HunyuanVideoTransformer3DModel.from_pretrained(model / "transformer")  # diffusers reads it as it is
    assert not any(k.startswith("avatar") for k in plain.state_dict())
    assert whole["steps"] == 4


@pytest.mark.slow
def test_train_avatar_without_cached_conditions_is_one_line(tiny_model, tmp_path):
    from conftest import small_cache

    cache = small_cache(tmp_path, tiny_model, videos=2, images=0, seed=0)  # plain text-to-video samples
    recipe = tmp_path / "avatar.yaml"
    recipe.write_text(f"kind: train\nmodel: {tiny_model}\nout: {tmp_path / 'run'}\nsteps: 1\n"
                      f"data: {{cache: {cache}, batch_size: 2}}\navatar: {{conditions: [reference, pose]}}\n")
    done = run_cli("train", recipe)
    assert done.returncode == 1 and "no cached sample has a 'reference' condition" in done.stderr
    assert "Traceback" not in done.stderr


@pytest.fixture(scope="module")
def avatar_model(tiny_model, tmp_path_factory):
    """The tiny model with every conditioner (random weights), as a model folder."""
    out = tmp_path_factory.mktemp("models") / "tiny-avatar"
    shutil.copytree(tiny_model, out)
    transformer = transformer_of(tiny_model)
    conditioners = AvatarConditioners(avatar_config(window=9), transformer.config)
    torch.manual_seed(1)
    for p in conditioners.parameters():
        torch.nn.init.normal_(p, std=0.05)
    save_conditioners(out, conditioners.config, conditioners.state_dict())
    assert load_conditioners(out, transformer_of(tiny_model)) is not None
    return out


@pytest.fixture(scope="module")
def condition_files(tmp_path_factory):
    root = tmp_path_factory.mktemp("conditions")
    manifest = render_avatar_dataset(root, 1, seed=3, split="eval", modes=("audio", "pose", "expression"), frames=21,
                                     size=(32, 32))
    record = json.loads(manifest.read_text().splitlines()[0])
    return {k: root / record[k] for k in ("reference", "audio", "pose", "expression")}


@pytest.mark.slow
def test_hvctl_avatar_follows_the_audio_length_windows_it_and_muxes_the_audio(avatar_model, condition_files, tmp_path):
    import av

    out = tmp_path / "talk.mp4"
    f = condition_files
    done = run_cli("avatar", f["reference"], "--audio", f["audio"], "--pose", f["pose"], "--expression", f["expression"],
                   "--model", avatar_model, "--steps", "2", "--seed", "5", "--height", "32", "--width", "32",
                   "--output", out, "--json")
    assert done.returncode == 0, done.stderr
    sidecar = json.loads(out.with_suffix(".json").read_text())
    assert sidecar["video"]["frames"] == 21 and sidecar["video"]["audio"]  # 21 frames of audio at 8 fps
    assert len(sidecar["windows"]) > 1  # 6 latent frames, a window of 3
    with av.open(str(out)) as container:
        assert len(container.streams.audio) == 1 and len(container.streams.video) == 1
    again = tmp_path / "again.mp4"
    run_cli("avatar", f["reference"], "--audio", f["audio"], "--pose", f["pose"], "--expression", f["expression"],
            "--model", avatar_model, "--steps", "2", "--seed", "5", "--height", "32", "--width", "32", "--output", again)
    from hvctl.video import read_video

    assert np.array_equal(read_video(out)[0], read_video(again)[0])


@pytest.mark.slow
@pytest.mark.parametrize("args,message", [
    (["--model", "{plain}"], "no avatar conditioners"),
    (["--expression", "{missing}"], "no such file"),
    (["--pose", "{reference}"], "frames, the video needs"),
])
def test_hvctl_avatar_bad_input_is_one_line(args, message, avatar_model, tiny_model, condition_files, tmp_path):
    names = {"plain": tiny_model, "missing": tmp_path / "nope.npy", "reference": condition_files["reference"]}
    args = [a.format(**names) for a in args]
    if "--model" not in args:
        args += ["--model", str(avatar_model)]
    done = run_cli("avatar", condition_files["reference"], "--frames", "9", "--steps", "1", "--height", "32", "--width", "32",
                   "--output", tmp_path / "x.mp4", *args)
    assert done.returncode == 1 and message in done.stderr and "Traceback" not in done.stderr
    assert not (tmp_path / "x.mp4").exists()


@pytest.mark.slow
def test_eval_toy_avatar_reports_each_figure(avatar_model, tmp_path):
    done = run_cli("eval", "toy", "--model", avatar_model, "--avatar", "audio,pose,expression", "--avatar", "pose",
                   "--prompts", "3", "--steps", "2", "--frames", "9", "--json", "--out", tmp_path)
    assert done.returncode == 0, done.stderr
    result = json.loads(done.stdout)
    both, pose = result["runs"]
    row = both["scores"]["all"]
    assert row["n"] == 3 and row["size_correlation_n"] == 3 and row["pose_error_px_n"] == 3
    assert pose["scores"]["all"]["size_correlation"] is None and pose["scores"]["all"]["pose_error_px"] is not None
    assert len(json.loads((tmp_path / "audio+pose+expression" / "scores.json").read_text())) == 3
    ceiling = both["vae_ceiling"]["all"]  # the true videos through the (here random) VAE: what a perfect DiT scores
    assert ceiling.keys() == row.keys() and ceiling["n"] == 3 and ceiling["size_correlation_n"] == 3


@pytest.mark.slow
def test_model_compose_carries_the_conditioners_recast(avatar_model, tmp_path):
    from safetensors.torch import load_file

    done = run_cli("model", "compose", avatar_model, tmp_path / "half", "--dtype", "float16", "--json")
    assert done.returncode == 0, done.stderr
    before = load_file(str(avatar_model / "avatar" / "conditioners.safetensors"))
    after = load_file(str(tmp_path / "half" / "avatar" / "conditioners.safetensors"))
    assert before.keys() == after.keys() and all(v.dtype == torch.float16 for v in after.values())
    assert all(torch.allclose(after[k].float(), before[k], atol=1e-3) for k in before)
    assert load_conditioners(tmp_path / "half", transformer_of(tmp_path / "half")) is not None


@pytest.mark.slow
def test_the_embedded_toy_avatar_model_follows_the_audio_and_the_pose(tmp_path):
    """The shipped model (recipes/toy/avatar.yaml, then avatar-masked(2).yaml), with no --model: a
    33-frame clip, so two blended windows, tracks the pose and sizes the object by the loudness."""
    from hvctl.toy.world import score_avatar
    from hvctl.video import read_video

    manifest = render_avatar_dataset(tmp_path / "data", 1, seed=7, split="eval", modes=("audio", "pose"), frames=33)
    record = json.loads(manifest.read_text().splitlines()[0])
    sample = AvatarSample.from_dict(record["toy_avatar"])
    out = tmp_path / "out.mp4"
    done = run_cli("avatar", manifest.parent / record["reference"], "--audio", manifest.parent / record["audio"],
                   "--pose", manifest.parent / record["pose"], "--seed", "0", "--output", out)
    assert done.returncode == 0, done.stderr
    score = score_avatar(sample, read_video(out)[0])
    frozen = score_avatar(sample, np.repeat(sample.reference()[None], sample.frames, axis=0))
    assert score["pose_error_px"] < 4 < frozen["pose_error_px"]  # measured 2.3 px; holding still: 8.5
    assert score["size_correlation"] > 0.5  # measured 0.80
    assert score["color_kept"] and score["background_kept"]


def test_audio_guidance_adds_a_pass_without_the_audio(hooked):
    latents = torch.randn(1, 16, 3, 4, 4)
    inputs = random_inputs(1, 9, (16, 3, 4, 4))
    kwargs = text_kwargs(hooked, 1)
    plain = WindowedDenoiser(hooked, inputs, 3, 1)(hidden_states=latents, **kwargs)[0]
    guided = WindowedDenoiser(hooked, inputs, 3, 1, guidance={"audio": 3.0})(hidden_states=latents, **kwargs)[0]
    with hooked.avatar.given({**inputs, "present.audio": torch.zeros(1)}):
        without = call(hooked, latents)
    assert torch.allclose(guided, plain + 2.0 * (plain - without), atol=1e-5)
    assert not torch.allclose(guided, plain)
