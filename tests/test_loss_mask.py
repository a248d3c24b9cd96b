"""Masked training loss: toy render writes object masks, encode pools them onto the latent grid,
the flow objectives weigh latents by them, and training without masks says so."""

import json
import math
import shutil
from dataclasses import replace
from types import SimpleNamespace

import numpy as np
import pytest
import torch
from torch import nn

from conftest import run_cli
from hvctl.cache import LatentCache
from hvctl.data.manifest import read_manifest
from hvctl.encode import EncodeRecipe, encode, pool_loss_mask
from hvctl.errors import HvctlError
from hvctl.toy.world import ToySample, object_mask, render, sample_spec
from hvctl.train.config import FlowConfig
from hvctl.train.distill import GuidanceDistillationObjective
from hvctl.train.objectives import FlowMatchingObjective
from hvctl.video import read_image, read_video, write_image, write_video


def toy_sample(record) -> ToySample:
    return ToySample(**{**record.extra["toy"], "start": tuple(record.extra["toy"]["start"])})


def reach(sample):
    """How far the object reaches from its centre: a square's radius is its half-side."""
    return sample.radius * (math.sqrt(2) if sample.shape == "square" else 1.0)


def distances(sample, t, height, width):
    """Each pixel centre's distance to the object's centre in frame t."""
    cx, cy = sample.centre(t)
    ys, xs = np.mgrid[0:height, 0:width] + 0.5
    return np.hypot(xs - cx, ys - cy)


# -- toy render ---------------------------------------------------------------------------------


def test_object_mask_is_the_objects_coverage_whatever_its_colours():
    for index in range(6):
        sample = sample_spec(4, index, "train", size=(64, 64), frames=5)
        frames = render(sample)
        mask = object_mask(sample, frames)
        assert mask.shape == frames.shape and mask.dtype == np.uint8
        assert (mask == mask[..., :1]).all(), "grey"
        for t in range(sample.frames):
            d = distances(sample, t, 64, 64)
            # every shape holds the disc of radius r/2 (the triangle's inscribed circle)
            assert (mask[t, d < sample.radius / 2 - 1] == 255).all(), (sample, t)
            assert (mask[t, d > reach(sample) + 1] == 0).all(), (sample, t)
            grey = mask[t, ..., 0]
            assert ((grey > 0) & (grey < 255)).any(), "anti-aliased edges are partial coverage"
        # The same geometry on any background in any colour is the same mask, within rounding.
        for background, color in [("white", "blue"), ("gray", "yellow"), ("black", "cyan")]:
            other = replace(sample, background=background, color=color)
            diff = np.abs(object_mask(other, render(other)).astype(int) - mask.astype(int))
            assert diff.max() <= 2, (background, color)


@pytest.mark.slow
def test_toy_render_writes_masks_and_no_loss_masks_turns_them_off(tmp_path):
    out = tmp_path / "with"
    result = run_cli("toy", "render", out, "--videos", 2, "--images", 1, "--seed", 7, "--size", "64x96")
    assert result.returncode == 0, result.stderr
    records = read_manifest(out / "manifest.jsonl")
    assert len(records) == 3
    for rec in records:
        sample = toy_sample(rec)
        suffix = "mp4" if rec.kind == "video" else "png"
        assert rec.extra["loss_mask"] == f"masks/{rec.id}.{suffix}"
        path = out / rec.extra["loss_mask"]
        mask = read_video(path)[0] if rec.kind == "video" else read_image(path)[None]
        media = read_video(out / rec.media)[0] if rec.kind == "video" else read_image(out / rec.media)[None]
        assert mask.shape == media.shape == (sample.frames, 64, 96, 3)
        # the mp4 codec blurs edges by a grey level or so; well inside and far outside it is exact enough
        for t in range(sample.frames):
            d = distances(sample, t, 64, 96)
            assert mask[t][d < sample.radius / 2 - 1].min() >= 245, (rec.id, t)
            assert mask[t][d > reach(sample) + 3].max() <= 10, (rec.id, t)

    off = tmp_path / "without"
    result = run_cli("toy", "render", off, "--videos", 2, "--images", 1, "--seed", 7, "--size", "64x96",
                     "--no-loss-masks")
    assert result.returncode == 0, result.stderr
    assert not (off / "masks").exists()
    plain = read_manifest(off / "manifest.jsonl")
    assert all("loss_mask" not in rec.extra for rec in plain)
    # the masks change nothing else: same records, same media
    assert [{**r.to_dict(), "loss_mask": None} for r in records] == [{**r.to_dict(), "loss_mask": None} for r in plain]
    for rec in plain:
        assert (out / rec.media).read_bytes() == (off / rec.media).read_bytes()


# -- pooling onto the latent grid ---------------------------------------------------------------


@pytest.mark.parametrize("frame, latent_frame", [(0, 0), (1, 1), (4, 1), (5, 2), (8, 2)])
def test_pool_loss_mask_puts_a_pixel_in_its_latent_cell(frame, latent_frame):
    frames = np.zeros((9, 16, 24, 3), dtype=np.uint8)
    frames[frame, 9, 21] = 255  # row 9, column 21: spatial cell (2, 5)
    pooled = pool_loss_mask(frames, 4, 4)
    assert pooled.shape == (1, 3, 4, 6)
    expected = torch.zeros(1, 3, 4, 6)
    expected[0, latent_frame, 2, 5] = 1.0  # max pooling: one pixel marks its whole cell
    assert torch.equal(pooled.float(), expected)


def test_pool_loss_mask_keeps_grey_levels_and_pools_images():
    frames = np.zeros((1, 16, 16, 3), dtype=np.uint8)
    frames[0, 0, 0] = 51  # a fifth of the way to white
    frames[0, 1, 1] = 102  # the larger of two in one cell wins
    frames[0, 15, 15] = 255
    pooled = pool_loss_mask(frames, 8, 4)
    assert pooled.shape == (1, 1, 2, 2)
    assert torch.allclose(pooled[0, 0].float(), torch.tensor([[0.4, 0.0], [0.0, 1.0]]))


# -- encode -------------------------------------------------------------------------------------

BUCKETS = dict(aspect_buckets=[(32, 48)], frame_buckets=[9], caption_variants=1)  # 64x96 media at half size


def encode_recipe(root, cache, **kw):  # model None: the embedded default model (VAE: 4x spatial, 4x temporal)
    return EncodeRecipe(manifest=root / "manifest.jsonl", out=cache, **{**BUCKETS, **kw})


@pytest.fixture(scope="module")
def masked_dataset(tmp_path_factory):
    from hvctl.toy.render import render_dataset

    root = tmp_path_factory.mktemp("masked")
    render_dataset(root, videos=3, images=1, seed=11, split="train", sizes=[(64, 96)])
    return root


def rewrite_manifest(root, change):
    """Apply change(record dict) to each line of root's manifest."""
    lines = [json.loads(line) for line in (root / "manifest.jsonl").read_text().splitlines()]
    (root / "manifest.jsonl").write_text("".join(json.dumps(change(d) or d) + "\n" for d in lines))


def cached(cache):
    data = LatentCache(cache, text_len=16)
    return {e.id: (e, data[i]) for i, e in enumerate(data.entries)}


def test_encode_pools_the_mask_onto_the_latent_grid(masked_dataset, tmp_path):
    from hvctl.data.buckets import fit_to_bucket

    cache = tmp_path / "cache"
    report = encode(encode_recipe(masked_dataset, cache, storage_dtype="float32"), progress=False)
    assert (report["encoded"], report["failed"]) == (4, [])
    entries = cached(cache)
    for rec in read_manifest(masked_dataset / "manifest.jsonl"):
        entry, item = entries[rec.id]
        assert entry.loss_mask
        mask = item["loss_mask"]
        latent = item["latent_mean"]
        frames = 9 if rec.kind == "video" else 1
        assert latent.shape == (16, (frames - 1) // 4 + 1, 8, 12)
        assert mask.shape == (1, *latent.shape[1:])
        assert 0 <= mask.min() and mask.max() <= 1

        # Geometry: a latent cell covers 4x4 bucket pixels = 8x8 media pixels, latent frame 0 frame 0
        # alone and latent frame k frames 4k-3..4k. A cell holding the object's centre in one of its
        # frames is masked; a cell well away from the object in all of them is not.
        sample = toy_sample(rec)
        inside, outside = [], []
        for k in range(mask.shape[1]):
            group = [0] if k == 0 else range(4 * k - 3, 4 * k + 1)
            for i in range(8):
                for j in range(12):
                    x0, y0 = 8 * j, 8 * i
                    centres = [sample.centre(t) for t in group]
                    if any(x0 <= cx < x0 + 8 and y0 <= cy < y0 + 8 for cx, cy in centres):
                        inside.append(float(mask[0, k, i, j]))
                    elif all(math.hypot(max(x0 - cx, 0, cx - x0 - 8), max(y0 - cy, 0, cy - y0 - 8)) > reach(sample) + 4
                             for cx, cy in centres):
                        outside.append(float(mask[0, k, i, j]))
        assert inside and min(inside) > 0.9, (rec.id, inside)
        assert len(outside) > 30 and max(outside) < 0.1, (rec.id, max(outside))

        # And it is the mask file, fitted to the bucket as the media was, max-pooled.
        path = masked_dataset / rec.extra["loss_mask"]
        raw = read_video(path)[0] if rec.kind == "video" else read_image(path)[None]
        assert torch.allclose(mask, pool_loss_mask(fit_to_bucket(raw, entry.bucket), 4, 4)[0])


def test_the_mask_file_is_part_of_the_cache_key(masked_dataset, tmp_path):
    root = tmp_path / "data"
    shutil.copytree(masked_dataset, root)
    cache = tmp_path / "cache"
    assert encode(encode_recipe(root, cache), progress=False)["encoded"] == 4
    again = encode(encode_recipe(root, cache), progress=False)
    assert (again["encoded"], again["skipped_cached"]) == (0, 4)
    before = cached(cache)

    records = {r.id: r for r in read_manifest(root / "manifest.jsonl")}
    blank, still, image = "toy-train-v00000", "toy-train-v00001", "toy-train-i00000"
    media = read_video(root / records[blank].media)[0]
    write_video(root / records[blank].extra["loss_mask"], np.zeros_like(media), 8)  # a blank mask
    top = np.zeros((64, 96, 3), dtype=np.uint8)
    top[:32] = 255
    write_image(root / "masks" / "top.png", top)  # one image masks every frame of a video
    rewrite_manifest(root, lambda d: {**d, "loss_mask": "masks/top.png"} if d["id"] == still else None)
    rewrite_manifest(root, lambda d: {k: v for k, v in d.items() if k != "loss_mask"} if d["id"] == image else None)

    third = encode(encode_recipe(root, cache), progress=False)
    assert (third["encoded"], third["skipped_cached"], third["failed"]) == (3, 1, [])
    after = cached(cache)
    for sample_id in (blank, still, image):
        assert after[sample_id][0].key != before[sample_id][0].key
    assert after["toy-train-v00002"][0].key == before["toy-train-v00002"][0].key
    assert before[blank][1]["loss_mask"].max() > 0.9 and after[blank][1]["loss_mask"].max() == 0
    top_mask = after[still][1]["loss_mask"]
    assert top_mask.shape == (1, 3, 8, 12)
    assert (top_mask[:, :, :4] == 1).all() and (top_mask[:, :, 4:] == 0).all()
    entry, item = after[image]  # no mask any more: the entry says so and reads as all ones
    assert not entry.loss_mask
    assert item["loss_mask"].shape == (1, 1, 8, 12) and (item["loss_mask"] == 1).all()


def test_a_bad_mask_is_reported_and_skipped(masked_dataset, tmp_path):
    root = tmp_path / "data"
    shutil.copytree(masked_dataset, root)
    records = {r.id: r for r in read_manifest(root / "manifest.jsonl")}
    missing, small, short = "toy-train-v00000", "toy-train-v00001", "toy-train-v00002"
    (root / records[missing].extra["loss_mask"]).unlink()
    frames = records[small].frames
    write_video(root / records[small].extra["loss_mask"], np.zeros((frames, 32, 32, 3), np.uint8), 8)
    write_video(root / records[short].extra["loss_mask"], np.zeros((5, 64, 96, 3), np.uint8), 8)
    assert records[short].frames != 5

    cache = tmp_path / "cache"
    problems = []
    report = encode(encode_recipe(root, cache), progress=False, on_problem=problems.append)
    assert report["encoded"] == 1  # the image
    failed = {f["id"]: f for f in report["failed"]}
    assert set(failed) == {missing, small, short}
    for sample_id, f in failed.items():
        assert f["path"].endswith(f"masks/{sample_id}.mp4")
    assert "not found" in failed[missing]["reason"]
    assert "32x32" in failed[small]["reason"] and "96x64" in failed[small]["reason"]
    assert "5 frames" in failed[short]["reason"] and str(records[short].frames) in failed[short]["reason"]
    assert len(problems) == 3
    assert set(cached(cache)) == {"toy-train-i00000"}

    (root / records[missing].extra["loss_mask"]).write_bytes(b"")  # now present but no video
    with pytest.raises(HvctlError, match=f"masks/{missing}.mp4"):
        encode(encode_recipe(root, tmp_path / "strict", on_error="fail"), progress=False)


# -- the objectives -----------------------------------------------------------------------------


class FixedModel(nn.Module):
    """Returns a set velocity whatever its input: the loss is then a known function of it."""

    def __init__(self, out):
        super().__init__()
        self.anchor = nn.Parameter(torch.zeros(()))
        self.out = out
        self.config = SimpleNamespace(guidance_embeds=False, image_condition_type=None)

    def forward(self, hidden_states, **kw):
        assert hidden_states.shape == self.out.shape
        return (self.out.clone(),)


SHAPE = (2, 4, 3, 4, 6)  # B, C, T', H', W'


def flow_batch(mask=None):
    g = torch.Generator().manual_seed(0)
    batch = {"latent_mean": torch.randn(SHAPE, generator=g), "latent_std": torch.full(SHAPE, 0.1),
             "text_states": torch.randn(2, 5, 8, generator=g), "text_mask": torch.ones(2, 5, dtype=torch.long),
             "pooled": torch.randn(2, 8, generator=g)}
    if mask is not None:
        batch["loss_mask"] = mask
    return batch


def some_mask():
    mask = torch.zeros(2, 1, *SHAPE[2:])
    mask[0, :, :, 1:3, 2:5] = 1.0
    mask[1, :, 0, :2, :] = 1.0
    mask[1, :, 2, 3, 5] = 0.5  # a partly covered cell
    return mask


def loss_of(unmasked_weight, batch, prediction, seed=1):
    objective = FlowMatchingObjective(FlowConfig(unmasked_weight=unmasked_weight), None, 0.0)
    loss, logs = objective(FixedModel(prediction), batch, torch.Generator().manual_seed(seed))
    assert logs["loss"] == pytest.approx(loss.item())
    return loss.item()


def squared_error(batch, prediction, seed=1):
    objective = FlowMatchingObjective(FlowConfig(), None, 0.0)
    b = objective.noised(batch, torch.Generator().manual_seed(seed))
    return (prediction - (b["noise"] - b["x0"])) ** 2


@pytest.mark.parametrize("unmasked_weight", [0.0, 0.25])
def test_the_flow_loss_is_each_samples_weighted_mean(unmasked_weight):
    mask = some_mask()
    batch = flow_batch(mask)
    prediction = torch.randn(SHAPE, generator=torch.Generator().manual_seed(5))
    weight = (unmasked_weight + (1 - unmasked_weight) * mask).expand(SHAPE)
    squared = squared_error(batch, prediction)
    per_sample = (squared * weight).sum(dim=(1, 2, 3, 4)) / weight.sum(dim=(1, 2, 3, 4))
    assert loss_of(unmasked_weight, batch, prediction) == pytest.approx(per_sample.mean().item(), rel=1e-6)
    # normalised per sample, not over the batch: sample 1's mask is far smaller than sample 0's
    pooled = ((squared * weight).sum() / weight.sum()).item()
    assert per_sample.mean().item() != pytest.approx(pooled, rel=1e-3)


def test_with_unmasked_weight_0_only_errors_inside_the_mask_count():
    mask = some_mask()
    batch = flow_batch(mask)
    prediction = torch.randn(SHAPE, generator=torch.Generator().manual_seed(5))
    base = loss_of(0.0, batch, prediction)
    outside = (mask == 0).expand(SHAPE)
    assert loss_of(0.0, batch, prediction + 10.0 * outside) == base
    inside = (mask == 1).expand(SHAPE)
    assert loss_of(0.0, batch, prediction + 0.5 * inside) != pytest.approx(base, rel=1e-3)
    half = (mask == 0.5).expand(SHAPE)
    assert loss_of(0.0, batch, prediction + 0.5 * half) != pytest.approx(base, rel=1e-3)
    # with a weight outside, errors there count too, but less than inside
    partial = loss_of(0.25, batch, prediction)
    assert loss_of(0.25, batch, prediction + 10.0 * outside) > partial
    # unmasked_weight 1 ignores the mask
    assert loss_of(1.0, batch, prediction + 10.0 * outside) == loss_of(1.0, flow_batch(), prediction + 10.0 * outside)


def test_full_and_empty_masks():
    prediction = torch.randn(SHAPE, generator=torch.Generator().manual_seed(5))
    plain = loss_of(1.0, flow_batch(), prediction)
    assert plain == pytest.approx(squared_error(flow_batch(), prediction).mean().item(), rel=1e-6)
    ones = torch.ones(2, 1, *SHAPE[2:])
    for w in (0.0, 0.5):
        assert loss_of(w, flow_batch(ones), prediction) == pytest.approx(plain, rel=1e-6)
    # an empty mask with unmasked_weight 0 weighs nothing: that sample falls back to the plain mean
    mask = some_mask()
    mask[0] = 0.0
    loss = loss_of(0.0, flow_batch(mask), prediction)
    assert math.isfinite(loss)
    squared = squared_error(flow_batch(mask), prediction)
    weight = mask[1].expand(SHAPE[1:])
    expected = (squared[0].mean() + (squared[1] * weight).sum() / weight.sum()) / 2
    assert loss == pytest.approx(expected.item(), rel=1e-6)
    assert math.isfinite(loss_of(0.0, flow_batch(torch.zeros(2, 1, *SHAPE[2:])), prediction))


def test_token_replace_with_a_mask_only_on_the_given_frame_stays_finite():
    # token_replace: latent frame 0 is the given image, never in the loss. A mask that covers only
    # that frame leaves nothing weighted: the sample falls back to the frames it predicts.
    prediction = torch.randn(SHAPE, generator=torch.Generator().manual_seed(5))
    model = FixedModel(prediction)
    model.config.image_condition_type = "token_replace"
    mask = torch.zeros(2, 1, *SHAPE[2:])
    mask[:, :, 0] = 1.0
    objective = FlowMatchingObjective(FlowConfig(unmasked_weight=0.0), None, 0.0)
    loss, _ = objective(model, flow_batch(mask), torch.Generator().manual_seed(1))
    squared = squared_error(flow_batch(mask), prediction)
    assert loss.item() == pytest.approx(squared[:, :, 1:].mean().item(), rel=1e-6)


@pytest.mark.parametrize("bad", [1.5, -0.1, float("nan")])
def test_unmasked_weight_out_of_range_is_an_error(bad):
    with pytest.raises(HvctlError, match="unmasked_weight"):
        FlowMatchingObjective(FlowConfig(unmasked_weight=bad), None, 0.0)


def test_guidance_distillation_weighs_by_the_mask_too():
    mask = some_mask()
    batch = flow_batch(mask)
    g = torch.Generator().manual_seed(9)
    teacher_out, student_out = torch.randn(SHAPE, generator=g), torch.randn(SHAPE, generator=g)
    empty = {"text_states": torch.zeros(1, 5, 8), "text_mask": torch.ones(1, 5, dtype=torch.long),
             "pooled": torch.zeros(1, 8)}

    def loss(unmasked_weight, student):
        objective = GuidanceDistillationObjective(FlowConfig(unmasked_weight=unmasked_weight), empty,
                                                  FixedModel(teacher_out), (1.0, 4.0))
        return objective(FixedModel(student), batch, torch.Generator().manual_seed(1))[0].item()

    # the teacher's two passes agree, so the guided target is its output at any scale
    squared = (student_out - teacher_out) ** 2
    weight = mask.expand(SHAPE)
    expected = ((squared * weight).sum(dim=(1, 2, 3, 4)) / weight.sum(dim=(1, 2, 3, 4))).mean()
    assert loss(0.0, student_out) == pytest.approx(expected.item(), rel=1e-6)
    outside, inside = (mask == 0).expand(SHAPE), (mask == 1).expand(SHAPE)
    assert loss(0.0, student_out + 10.0 * outside) == loss(0.0, student_out)
    assert loss(0.0, student_out + 0.5 * inside) != pytest.approx(loss(0.0, student_out), rel=1e-3)
    assert loss(1.0, student_out) == pytest.approx(squared.mean().item(), rel=1e-6)


# -- training -----------------------------------------------------------------------------------


def write_recipe(path, cache, out):
    from hvctl.models.default import default_model_dir

    path.write_text("\n".join([
        "kind: train", "target: dit", f"model: {default_model_dir()}", f"out: {out}", "steps: 1", "seed: 0",
        "ema_decay: 0", "tensorboard: false", "data:", f"  cache: {cache}", "  batch_size: 1",
        "  empty_prompt_rate: 0", "checkpoint:", "  every: 100",
    ]) + "\n")
    return path


@pytest.fixture(scope="module")
def unmasked_cache(tmp_path_factory):
    root = tmp_path_factory.mktemp("unmasked")
    result = run_cli("toy", "render", root / "data", "--videos", 1, "--images", 1, "--size", "32x32", "--no-loss-masks")
    assert result.returncode == 0, result.stderr
    encode(EncodeRecipe(manifest=root / "data" / "manifest.jsonl", out=root / "cache", aspect_buckets=[(32, 32)],
                        frame_buckets=[9], caption_variants=1), progress=False)
    return root / "cache"


@pytest.mark.slow
def test_a_masked_loss_without_masks_is_a_one_line_error(unmasked_cache, tmp_path):
    recipe = write_recipe(tmp_path / "r.yaml", unmasked_cache, tmp_path / "run")
    result = run_cli("train", recipe, "--set", "flow.unmasked_weight=0.5")
    assert result.returncode != 0
    assert "Traceback" not in result.stderr
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error:") and "loss masks" in lines[0], result.stderr


@pytest.mark.slow
def test_a_masked_loss_trains_on_a_masked_cache(masked_dataset, tmp_path):
    from hvctl.recipe import load_recipe
    from hvctl.train.config import TrainRecipe
    from hvctl.train.trainer import Trainer

    cache = tmp_path / "cache"
    encode(encode_recipe(masked_dataset, cache), progress=False)
    recipe = write_recipe(tmp_path / "r.yaml", cache, tmp_path / "run")
    trainer = Trainer(load_recipe(TrainRecipe, recipe, ["flow.unmasked_weight=0"]), progress=False)
    seen, objective = [], trainer.objective

    def spy(model, batch, generator, **kw):
        seen.append(batch)
        return objective(model, batch, generator, **kw)

    trainer.objective = spy
    trainer.train()
    assert seen, "the objective ran"
    for batch in seen:  # the cached masks reach the objective, one per sample on its latent grid
        latent, mask = batch["latent_mean"], batch["loss_mask"]
        assert mask.shape == (latent.shape[0], 1, *latent.shape[2:])
        assert 0 < mask.mean() < 1
    metrics = [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    assert metrics and all(math.isfinite(m["loss"]) for m in metrics)
    with pytest.raises(HvctlError, match=r"unmasked_weight'? must be in \[0, 1\]"):
        Trainer(load_recipe(TrainRecipe, recipe, ["flow.unmasked_weight=2", f"out={tmp_path / 'run2'}"]),
                progress=False)
