import math
from collections import Counter
from dataclasses import replace

import numpy as np
import pytest

from hvctl.data.manifest import read_manifest
from hvctl.errors import HvctlError
from hvctl.toy.render import render_dataset
from hvctl.toy.world import (
    BACKGROUNDS, HELD_OUT, MOTIONS, OBJECT_COLORS, SHAPES, measure, render, sample_spec,
)
from hvctl.video import read_image, read_video, write_image, write_video


def specs(seed, split, count, kind="video"):
    return [sample_spec(seed, i, split, kind) for i in range(count)]


def truth(sample):
    return sample.color, sample.shape, sample.motion, sample.background


def measured(frames):
    m = measure(frames)
    return m["color"], m["shape"], m["motion"], m["background"]


def test_same_seed_same_samples_and_pixels():
    a, b = specs(0, "train", 20), specs(0, "train", 20)
    assert a == b
    for x, y in zip(a[:5], b[:5]):
        assert np.array_equal(render(x), render(y))
    assert specs(1, "train", 20) != a
    assert specs(0, "eval", 20) != a


def test_fixing_the_size_keeps_the_content():
    for i in range(20):
        drawn, fixed = sample_spec(3, i, "train"), sample_spec(3, i, "train", size=(96, 64), frames=9)
        assert truth(drawn) == truth(fixed)
        assert (fixed.height, fixed.width, fixed.frames) == (96, 64, 9)


def test_held_out_pairs_only_in_eval():
    for kind in ("video", "image"):
        train = specs(0, "train", 300, kind)
        assert not any((s.color, s.shape) in HELD_OUT for s in train)
        eval_ = specs(0, "eval", 300, kind)
        held = Counter((s.color, s.shape) for s in eval_ if (s.color, s.shape) in HELD_OUT)
        assert set(held) == set(HELD_OUT)
        assert sum(held.values()) == 100  # every third eval sample
        for split in (train, eval_):
            assert {s.background for s in split} == set(BACKGROUNDS)
            assert {s.color for s in split} == set(OBJECT_COLORS)
            assert {s.shape for s in split} == set(SHAPES)
            assert {s.motion for s in split} == (set(MOTIONS) if kind == "video" else {"still"})


def test_sizes_speeds_and_the_path_stay_in_range():
    for s in specs(5, "train", 200) + specs(5, "eval", 100, "image"):
        scale = min(s.height, s.width) / 64
        assert 7 * scale <= s.radius <= 11 * scale
        assert s.speed == 0 if s.motion == "still" else scale <= s.speed <= 2 * scale
        assert (s.frames in (9, 17, 33)) if s.kind == "video" else s.frames == 1
        for t in (0, s.frames - 1):
            x, y = s.centre(t)
            assert s.radius - 1e-9 <= x <= s.width - s.radius + 1e-9
            assert s.radius - 1e-9 <= y <= s.height - s.radius + 1e-9


def test_render_draws_the_whole_object_inside_the_canvas():
    area = {"circle": math.pi, "square": 4.0, "triangle": 3 * math.sqrt(3) / 4}
    for s in specs(6, "train", 60):
        video = render(s)
        assert video.shape == (s.frames, s.height, s.width, 3) and video.dtype == np.uint8
        bg, fg = np.array(BACKGROUNDS[s.background]), np.array(OBJECT_COLORS[s.color])
        for t in (0, s.frames - 1):  # the path's ends are where clipping would show
            coverage = ((video[t] - bg) @ (fg - bg)) / ((fg - bg) @ (fg - bg))
            assert coverage.sum() == pytest.approx(area[s.shape] * s.radius**2, rel=0.03)


def test_captions():
    moving = replace(sample_spec(0, 1, "train"), color="red", shape="circle", motion="left", background="gray")
    caption = moving.caption()
    assert caption["short_description"] == moving.prompt() == "a red circle moves left on a gray background"
    assert caption["atmosphere"] == "lively" and caption["camera_movement"] == "static"
    assert caption["style"] == "flat 2D graphics" and caption["shot_type"] == "static wide shot"
    assert caption["lighting"] == "flat, even"
    assert "to the left" in caption["dense_description"] and "red circle" in caption["dense_description"]
    assert set(caption["additional_metadata"]) == {"source_tags", "quality_tags", "other_tags"}
    image = sample_spec(0, 1, "train", "image")
    assert image.prompt().endswith(f"stays still on a {image.background} background")
    assert image.caption()["atmosphere"] == "calm"


def test_bad_specs_are_reported():
    with pytest.raises(HvctlError, match="split 'val'"):
        sample_spec(0, 0, "val")
    with pytest.raises(HvctlError, match="4k\\+1"):
        sample_spec(0, 0, "train", frames=10)
    with pytest.raises(HvctlError, match="multiples of 16"):
        sample_spec(0, 0, "train", size=(64, 70))


def test_measure_recovers_every_attribute_from_raw_frames():
    samples = specs(11, "train", 120) + specs(11, "eval", 120) + specs(11, "eval", 60, "image")
    wrong = [(s, got) for s in samples if (got := measured(render(s))) != truth(s)]
    assert wrong == []


def test_measure_after_mp4_and_png_round_trip(tmp_path):
    samples = specs(12, "eval", 60) + specs(12, "train", 20, "image")
    hits = 0
    for s in samples:
        if s.kind == "video":
            decoded = read_video(write_video(tmp_path / "v.mp4", render(s), 8))[0]
        else:
            decoded = read_image(write_image(tmp_path / "i.png", render(s)[0]))
        hits += measured(decoded) == truth(s)
    rate = hits / len(samples)
    print(f"measure after mp4/png round trip: {hits}/{len(samples)} = {rate:.1%}")
    assert rate >= 0.95


def test_measure_without_an_object():
    blank = np.full((9, 64, 64, 3), 128, dtype=np.uint8)
    m = measure(blank)
    assert m["background"] == "gray"
    assert (m["color"], m["shape"], m["motion"]) == (None, None, None)


def test_render_dataset_is_deterministic(tmp_path):
    def build(name, seed):
        return render_dataset(tmp_path / name, videos=4, images=2, seed=seed, split="train")

    a, b, c = build("a", 0), build("b", 0), build("c", 1)
    assert a.read_text() == b.read_text() != c.read_text()
    records = read_manifest(a)
    ids = [f"toy-train-v{i:05d}" for i in range(4)] + ["toy-train-i00000", "toy-train-i00001"]
    assert [r.id for r in records] == ids
    for record in records:
        assert record.media_path(a.parent).read_bytes() == record.media_path(b.parent).read_bytes()
        assert record.caption["short_description"].startswith(f"a {record.extra['toy']['color']} ")
    video, fps = read_video(records[0].media_path(a.parent))
    assert video.shape == (records[0].frames, records[0].height, records[0].width, 3) and fps == 8


def test_render_dataset_cycles_given_sizes(tmp_path):
    progress = []
    manifest = render_dataset(tmp_path, 3, 1, seed=0, split="eval", sizes=[(64, 96), (96, 64)],
                              on_progress=lambda done, total: progress.append((done, total)))
    sizes = [(r.height, r.width) for r in read_manifest(manifest)]
    assert sizes == [(64, 96), (96, 64), (64, 96), (64, 96)]
    assert progress == [(1, 4), (2, 4), (3, 4), (4, 4)]
    for sizes in ([(64, 64), (64, 72)], [(64, 64, 3)]):
        with pytest.raises(HvctlError, match="positive multiples of 16"):
            render_dataset(tmp_path / "bad", 2, 0, seed=0, split="eval", sizes=sizes)
    assert not (tmp_path / "bad").exists()


def test_render_dataset_at_a_fixed_length_keeps_the_content(tmp_path):
    """--frames fixes every video's length (images stay 1 frame) and changes nothing else drawn."""
    fixed = read_manifest(render_dataset(tmp_path / "f", 3, 1, seed=4, split="train", sizes=[(64, 64)], frames=17))
    drawn = read_manifest(render_dataset(tmp_path / "d", 3, 1, seed=4, split="train", sizes=[(64, 64)]))
    assert [r.frames for r in fixed] == [17, 17, 17, 1]
    for a, b in zip(fixed, drawn):
        assert (a.extra["toy"]["color"], a.extra["toy"]["shape"], a.extra["toy"]["motion"]) == \
               (b.extra["toy"]["color"], b.extra["toy"]["shape"], b.extra["toy"]["motion"])
