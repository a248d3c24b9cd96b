"""`hvctl encode`: the cache is complete, incremental, crash-safe, shardable, and reports bad input."""

import json
import os
import shutil
import signal
import subprocess
import sys
import time

import pytest
import torch

from conftest import run_cli
from hvctl.cache import LatentCache, shard_files
from hvctl.data.batching import BucketBatchSampler, collate
from hvctl.encode import EncodeRecipe, encode
from hvctl.errors import HvctlError
from hvctl.toy.render import render_dataset

BUCKETS = ["--set", "aspect_buckets=[[32,32],[32,48]]", "--set", "frame_buckets=[5,9]", "--set", "caption_variants=2"]


def recipe(dataset, cache, model, **kw):
    return EncodeRecipe(manifest=dataset / "manifest.jsonl", out=cache, model=model, aspect_buckets=[(32, 32), (32, 48)],
                        frame_buckets=[5, 9], caption_variants=2, **kw)


@pytest.fixture(scope="module")
def dataset(tmp_path_factory):
    root = tmp_path_factory.mktemp("toy")
    render_dataset(root, videos=5, images=3, seed=3, split="train", sizes=[(32, 32), (32, 48)])
    return root


def cache_contents(cache):
    """sample id -> every tensor of its latest entry: what a reader sees, whatever the shard layout."""
    data = LatentCache(cache, text_len=16)
    out = {}
    for i, entry in enumerate(data.entries):
        items = [data.item(i, v) for v in range(entry.text_variants)]
        out[entry.id] = (entry.key, [{k: v for k, v in it.items() if isinstance(v, torch.Tensor)} for it in items])
    return out


def assert_same_cache(a, b):
    ca, cb = cache_contents(a), cache_contents(b)
    assert ca.keys() == cb.keys()
    for sample_id in ca:
        assert ca[sample_id][0] == cb[sample_id][0]
        for ta, tb in zip(ca[sample_id][1], cb[sample_id][1]):
            assert all(torch.equal(ta[k], tb[k]) for k in ta), sample_id


def test_encode_is_complete_then_incremental(dataset, tiny_model, tmp_path):
    cache = tmp_path / "cache"
    first = encode(recipe(dataset, cache, tiny_model, samples_per_shard=3))
    assert (first["encoded"], first["skipped_cached"], first["failed"]) == (8, 0, [])
    assert len(first["shards_written"]) == 3  # 8 samples, 3 per shard

    again = encode(recipe(dataset, cache, tiny_model))
    assert (again["encoded"], again["skipped_cached"]) == (0, 8)

    # A changed caption is a changed sample; readers see its new entry.
    manifest = dataset / "manifest.jsonl"
    edited = tmp_path / "edited"
    shutil.copytree(dataset, edited)
    lines = (edited / "manifest.jsonl").read_text().splitlines()
    record = json.loads(lines[0])
    record["caption"]["short_description"] = "a changed caption"
    lines[0] = json.dumps(record)
    (edited / "manifest.jsonl").write_text("\n".join(lines) + "\n")
    third = encode(recipe(edited, cache, tiny_model))
    assert (third["encoded"], third["skipped_cached"], third["entries"]) == (1, 7, 8)
    assert manifest.read_text() != (edited / "manifest.jsonl").read_text()

    data = LatentCache(cache, text_len=24)
    assert len(data) == 8
    by_bucket = data.buckets
    assert set(by_bucket) == {(32, 32, 9), (32, 48, 9), (32, 32, 1), (32, 48, 1)}
    item = data[0]
    bucket = data.entries[0].bucket
    assert item["latent_mean"].shape == (16, (bucket[2] - 1) // 4 + 1, bucket[0] // 8, bucket[1] // 8)
    assert item["text_states"].shape == (24, 64) and item["text_mask"].sum() > 0
    assert torch.all(item["latent_std"] > 0)
    assert data.empty_text()["text_mask"].sum() == 1  # the empty prompt keeps its <|eot_id|>

    # Training reads batches of one shape.
    sampler = BucketBatchSampler(by_bucket, 2, seed=0)
    for _ in range(4):
        batch = collate([data[i] for i in next(sampler)])
        assert batch["latent_mean"].shape[0] == 2 and len(set(batch["bucket"])) == 1


def test_cached_latents_equal_a_direct_vae_encode(dataset, tiny_model, tmp_path):
    from hvctl.data.buckets import fit_to_bucket
    from hvctl.models.loading import load_components
    from hvctl.models.vae import encode_posterior
    from hvctl.video import read_video

    cache = tmp_path / "cache"
    encode(recipe(dataset, cache, tiny_model, storage_dtype="float32"))
    data = LatentCache(cache)
    index = next(i for i, e in enumerate(data.entries) if e.kind == "video")
    entry = data.entries[index]
    frames, _ = read_video(dataset / "media" / f"{entry.id}.mp4")
    vae = load_components(tiny_model, parts=("vae",)).vae
    mean, std = encode_posterior(vae, fit_to_bucket(frames, entry.bucket))
    assert torch.allclose(data[index]["latent_mean"], mean, atol=1e-5)
    assert torch.allclose(data[index]["latent_std"], std, atol=1e-5)


@pytest.mark.slow
def test_kill_9_then_rerun_equals_an_uninterrupted_run(dataset, tiny_model, tmp_path):
    reference = tmp_path / "reference"
    encode(recipe(dataset, reference, tiny_model))
    crashed = tmp_path / "crashed"
    cmd = [sys.executable, "-m", "hvctl", "encode", dataset / "manifest.jsonl", "--out", crashed, "--model", tiny_model,
           *BUCKETS, "--set", "samples_per_shard=1"]
    proc = subprocess.Popen(list(map(str, cmd)), stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.time() + 120
    while time.time() < deadline and (not (crashed / "shards").is_dir() or len(shard_files(crashed)) < 2):
        time.sleep(0.05)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    committed = len(shard_files(crashed))
    assert 2 <= committed < 8, "the kill should land mid-run"
    result = run_cli("encode", dataset / "manifest.jsonl", "--out", crashed, "--model", tiny_model, *BUCKETS, "--json")
    assert result.returncode == 0, result.stderr
    report = json.loads(result.stdout)
    assert report["encoded"] + report["skipped_cached"] == 8 and report["skipped_cached"] >= committed
    assert not [p for p in (crashed / "shards").iterdir() if p.name.startswith(".")], "stale temporary files removed"
    assert_same_cache(reference, crashed)


@pytest.mark.slow
def test_shards_join_into_one_cache(dataset, tiny_model, tmp_path):
    whole, parts = tmp_path / "whole", tmp_path / "parts"
    encode(recipe(dataset, whole, tiny_model))
    # Two processes at once, each its half, into one folder.
    procs = [subprocess.Popen([sys.executable, "-m", "hvctl", "encode", str(dataset / "manifest.jsonl"), "--out", str(parts),
                               "--model", str(tiny_model), "--shard", f"{i}/2", *BUCKETS, "--json"],
                              stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True) for i in range(2)]
    reports = [json.loads(p.communicate(timeout=300)[0]) for p in procs]
    assert sum(r["samples"] for r in reports) == 8 and all(r["encoded"] > 0 for r in reports)
    assert_same_cache(whole, parts)


@pytest.mark.slow
def test_a_second_run_on_a_busy_cache_stops_cleanly(dataset, tiny_model, tmp_path):
    from hvctl.cache import CacheLock

    cache = tmp_path / "cache"
    with CacheLock(cache, "shard-0-of-1"):
        result = run_cli("encode", dataset / "manifest.jsonl", "--out", cache, "--model", tiny_model, *BUCKETS)
    assert result.returncode != 0 and "another hvctl encode" in result.stderr
    assert len(result.stderr.strip().splitlines()) == 1
    assert not shard_files(cache)


@pytest.fixture
def broken_dataset(dataset, tmp_path):
    """The toy dataset plus a corrupt, a truncated, a zero-frame video, a missing file and a malformed line."""
    import av

    root = tmp_path / "broken"
    shutil.copytree(dataset, root)
    media = root / "media"
    good = sorted(media.glob("*.mp4"))[0]
    (media / "corrupt.mp4").write_bytes(os.urandom(4000))
    data = good.read_bytes()
    (media / "truncated.mp4").write_bytes(data[: len(data) // 3])
    with av.open(str(media / "empty.avi"), "w") as container:  # mp4 drops a track without samples; avi keeps it
        stream = container.add_stream("mpeg4", rate=8)
        stream.width, stream.height = 32, 32
        container.start_encoding()
    base = json.loads((root / "manifest.jsonl").read_text().splitlines()[0])
    lines = (root / "manifest.jsonl").read_text().splitlines()
    for name in ("corrupt", "truncated", "empty", "missing"):
        lines.append(json.dumps({**base, "id": name, "media": f"media/{name}.{'avi' if name == 'empty' else 'mp4'}"}))
    lines.insert(2, '{"id": "half a line", ')
    (root / "manifest.jsonl").write_text("\n".join(lines) + "\n")
    return root


@pytest.mark.slow
def test_bad_input_is_skipped_and_reported(broken_dataset, tiny_model, tmp_path):
    cache = tmp_path / "cache"
    result = run_cli("encode", broken_dataset / "manifest.jsonl", "--out", cache, "--model", tiny_model, *BUCKETS, "--json")
    assert result.returncode == 0, result.stderr
    report = json.loads(result.stdout)
    assert report["encoded"] == 8
    failed = {f["id"]: f for f in report["failed"]}
    assert set(failed) == {None, "corrupt", "truncated", "empty", "missing"}
    assert failed[None]["path"].endswith("manifest.jsonl:3")
    assert "not found" in failed["missing"]["reason"]
    assert "frame" in failed["empty"]["reason"]
    for name in ("corrupt", "truncated", "empty", "missing"):
        assert failed[name]["path"].endswith(f"media/{name}.{'avi' if name == 'empty' else 'mp4'}")
    assert len([line for line in result.stderr.splitlines() if line.startswith("skipped")]) == 5
    assert len(LatentCache(cache)) == 8


@pytest.mark.slow
def test_on_error_fail_stops_with_one_line_and_keeps_what_was_done(broken_dataset, tiny_model, tmp_path):
    cache = tmp_path / "cache"
    lines = (broken_dataset / "manifest.jsonl").read_text().splitlines()
    del lines[2]  # drop the malformed line: the first failure is then the corrupt video, after 8 good samples
    (broken_dataset / "manifest.jsonl").write_text("\n".join(lines) + "\n")
    result = run_cli("encode", broken_dataset / "manifest.jsonl", "--out", cache, "--model", tiny_model, *BUCKETS,
                     "--on-error", "fail")
    assert result.returncode != 0
    err = result.stderr.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("error:") and "corrupt.mp4" in err[0], result.stderr
    assert len(LatentCache(cache)) == 8, "samples encoded before the failure are committed"


def test_encode_recipe_errors(dataset, tiny_model, tmp_path):
    with pytest.raises(HvctlError, match="--shard 2/2"):
        encode(recipe(dataset, tmp_path / "c", tiny_model, shard="2/2"))
    with pytest.raises(HvctlError, match="4k\\+1"):
        encode(EncodeRecipe(manifest=dataset / "manifest.jsonl", out=tmp_path / "c", model=tiny_model, frame_buckets=[8]))
    with pytest.raises(HvctlError, match="no such manifest"):
        encode(recipe(dataset / "nope", tmp_path / "c", tiny_model))


def test_tiled_encoding_uses_tiles_only_where_a_frame_exceeds_one(tiny_model):
    from hvctl.models.loading import load_components
    from hvctl.models.vae import configure_tiling, encode_posterior
    from hvctl.toy.world import render, sample_spec

    vae = load_components(tiny_model, parts=("vae",)).vae
    frames = render(sample_spec(0, 0, "train", size=(64, 96), frames=9))
    configure_tiling(vae, False)
    full, _ = encode_posterior(vae, frames)
    configure_tiling(vae, True, tile_size=128)  # the frame fits in one tile: nothing changes
    assert torch.equal(encode_posterior(vae, frames)[0], full)
    configure_tiling(vae, True, tile_size=32)  # 2 x 3 tiles with blended seams
    tiled, _ = encode_posterior(vae, frames)
    assert tiled.shape == full.shape and torch.isfinite(tiled).all() and not torch.equal(tiled, full)
    with pytest.raises(HvctlError, match="multiple of 32"):
        configure_tiling(vae, True, tile_size=48)


@pytest.mark.slow
def test_tiles_normalised_with_frame_statistics_stay_close_to_the_untiled_vae():
    """On the trained toy VAE, 128 px frames in 64 px tiles (9 tiles), twelve samples on all three
    backgrounds. With the frame's GroupNorm statistics, tiled latents decode to within the VAE's own
    reconstruction error of the untiled ones, and tiled decoding stays within a few grey levels of
    untiled decoding. Each tile's own statistics (diffusers) miss by far more, worst on the gray
    background, whose pixels are ~0 at the VAE's input."""
    from hvctl.models.default import default_model_dir
    from hvctl.models.loading import load_components
    from hvctl.models.vae import configure_tiling, decode_to_frames, encode_posterior
    from hvctl.toy.world import render, sample_spec

    vae = load_components(default_model_dir(), parts=("vae",), dtype=torch.float32).vae
    decode = lambda latents: decode_to_frames(vae, latents[None])[0].float()  # noqa: E731

    gaps = {stats: {"encode": 0.0, "decode": 0.0} for stats in ("frame", "tile")}
    backgrounds = set()
    for index in range(12):
        spec = sample_spec(index, 0, "train", size=(128, 128), frames=5)
        backgrounds.add(spec.background)
        frames = render(spec)
        configure_tiling(vae, False)
        latents = encode_posterior(vae, frames)[0]
        untiled = decode(latents)
        reconstruction_error = (untiled - torch.as_tensor(frames).float()).abs().mean()
        for stats, total in gaps.items():
            configure_tiling(vae, True, 64, stats)
            tiled_latents, tiled_decode = encode_posterior(vae, frames)[0], decode(latents)
            configure_tiling(vae, False)
            latent_gap = (tiled_latents - latents).norm() / latents.norm()
            encode_gap = (decode(tiled_latents) - untiled).abs().mean()
            decode_gap = (tiled_decode - untiled).abs().mean()
            total["encode"] += encode_gap.item()
            total["decode"] += decode_gap.item()
            if stats == "frame":
                assert latent_gap < 0.35 and encode_gap < reconstruction_error and decode_gap < 4, (
                    spec, latent_gap, encode_gap, reconstruction_error, decode_gap)
    assert backgrounds == {"black", "white", "gray"}
    assert gaps["tile"]["encode"] > 4 * gaps["frame"]["encode"], gaps
    assert gaps["tile"]["decode"] > 4 * gaps["frame"]["decode"], gaps


def test_the_random_tiling_finetune_trains_through_tiles_with_frame_statistics(tiny_model):
    """VAE training's random-tiling phase runs the tiled path (frame statistics included) with
    gradients: every encoder weight gets one, and the VAE is back to the default 256 px tile afterwards."""
    from hvctl.models.loading import load_components
    from hvctl.models.vae import frames_to_tensor
    from hvctl.toy.world import render, sample_spec
    from hvctl.train.config import VaeLossConfig
    from hvctl.train.objectives import VaeObjective

    vae = load_components(tiny_model, parts=("vae",), dtype=torch.float32).vae.requires_grad_(True)
    pixels = frames_to_tensor(render(sample_spec(0, 0, "train", size=(64, 64), frames=5)))
    objective = VaeObjective(VaeLossConfig(random_tiling=1.0, tile_sizes=[32]), torch.device("cpu"))
    encoder_calls = []
    vae.encoder.register_forward_hook(lambda module, args, out: encoder_calls.append(args[0].shape[-2:]))
    loss, logs = objective(vae, {"pixels": pixels}, torch.Generator().manual_seed(0))
    loss.backward()
    assert torch.isfinite(loss)
    # the whole frame shrunk to one tile's area (the statistics), then 3 x 3 tiles of 32 px
    assert [tuple(s) for s in encoder_calls] == [(32, 32)] + [(32, 32), (32, 32), (32, 16)] * 2 + [(16, 32)] * 2 + [(16, 16)]
    assert all(p.grad is not None and p.grad.abs().sum() > 0 for p in vae.encoder.parameters() if p.requires_grad)
    assert vae.tile_sample_min_height == 256
