"""`hvctl curate`: shots are split at the cuts, each filter removes the clip it is for, duplicates and
corrupt inputs are reported, and nothing is dropped without a line saying why."""

import json
import shutil
import subprocess
import sys
from pathlib import Path

import cv2
import numpy as np
import pytest

from conftest import run_cli
from hvctl import plugins
from hvctl.curate import CurateRecipe, curate, four_k_plus_one, rejected_list_path
from hvctl.data.manifest import read_manifest
from hvctl.errors import HvctlError
from hvctl.plugins import SampleFailure
from hvctl.recipe import load_recipe
from hvctl.toy.world import render, sample_spec
from hvctl.video import read_video, write_image, write_video
from hvctl_filters import TextArea, proxy_text_area, tesseract_text_area

TOY_RECIPE = Path(__file__).resolve().parent.parent / "recipes" / "curate" / "toy.yaml"
HAS_TESSERACT = shutil.which("tesseract") is not None
SHOTS = [(0, 17), (17, 34), (34, 57)]  # the cuts of multi.mp4; its last shot is 23 frames, cut to 21


def toy_video(index, frames=17):
    """A moving, sharp toy video (the indices below are chosen so: none is still or low-contrast)."""
    return render(sample_spec(0, index, "train", "video", size=(64, 64), frames=frames))


def with_text(frames):
    # Spec 12 is a blue triangle moving right along y ~ 40 on white: the word sits above its path.
    frames = frames.copy()
    for frame in frames:
        cv2.putText(frame, "SALE", (4, 20), cv2.FONT_HERSHEY_SIMPLEX, 0.6, (0, 0, 0), 2)
    return frames


@pytest.fixture(scope="module")
def inputs(tmp_path_factory):
    """A folder where each file has one known fate."""
    root = tmp_path_factory.mktemp("raw")
    # Three shots on black, white and gray backgrounds: the cuts are at frames 17 and 34.
    write_video(root / "multi.mp4", np.concatenate([toy_video(0), toy_video(2), toy_video(9, 25)[:23]]), 8)
    clean = toy_video(11)
    write_video(root / "clean.mp4", clean, 8)
    # The same video re-encoded lossier and 3 levels brighter: a near-duplicate, after clean in order.
    write_video(root / "dup.mp4", np.clip(clean.astype(int) + 3, 0, 255).astype(np.uint8), 8, crf=30)
    write_video(root / "blurred.mp4", np.stack([cv2.GaussianBlur(f, (7, 7), 3) for f in toy_video(13)]), 8)
    write_video(root / "frozen.mp4", np.repeat(toy_video(4)[:1], 17, axis=0), 8)
    write_video(root / "text.mp4", with_text(toy_video(12)), 8)
    write_video(root / "short.mp4", toy_video(5, 5), 8)  # 5 frames: under the toy recipe's min_frames (9)
    (root / "corrupt.mp4").write_bytes(np.random.default_rng(0).bytes(4096))
    write_image(root / "still.png", render(sample_spec(0, 3, "train", "image", size=(64, 64)))[0])
    (root / "notes.txt").write_text("not media: ignored")
    return root


@pytest.fixture(scope="module")
def curated(inputs, tmp_path_factory):
    out = tmp_path_factory.mktemp("curated") / "manifest.jsonl"
    problems = []
    summary = curate(load_recipe(CurateRecipe, TOY_RECIPE, values={"input": inputs, "out": out}),
                     progress=False, on_problem=problems.append)
    rejected = [json.loads(line) for line in rejected_list_path(out).read_text().splitlines()]
    return {"summary": summary, "out": out, "records": {r.id: r for r in read_manifest(out)},
            "rejected": {e["id"]: e for e in rejected}, "problems": problems}


def test_shot_splitter_finds_the_cuts_and_cuts_clips_to_4k_plus_1(inputs, curated):
    records = curated["records"]
    shots = [records[f"multi-s00{i}"].extra["curate"]["shot"] for i in range(3)]
    for shot, (start, end) in zip(shots, SHOTS):
        assert abs(shot["start_frame"] - start) <= 1 and abs(shot["end_frame"] - end) <= 1, shots
        assert (curated["out"].parent / shot["source"]).resolve() == (inputs / "multi.mp4").resolve()
    assert [records[f"multi-s00{i}"].frames for i in range(3)] == [17, 17, 21]
    assert [four_k_plus_one(n) for n in (4, 5, 8, 9, 23)] == [0, 5, 5, 9, 21]


def test_each_filter_removes_the_clip_it_is_for(curated):
    rejected = curated["rejected"]
    assert rejected["blurred-s000"]["reason"] == "clarity"
    assert rejected["frozen-s000"]["reason"] == "motion"
    assert rejected["text-s000"]["reason"] == "text_area"
    assert rejected["short-s000"]["reason"] == "short_shot"
    # A rejection keeps every score, and says which rule failed.
    blurred = rejected["blurred-s000"]
    assert blurred["curate"]["clarity"] < 15 <= curated["records"]["clean-s000"].extra["curate"]["clarity"]
    assert "clarity >= 15" in blurred["detail"] and "motion" in blurred["curate"]
    assert rejected["frozen-s000"]["curate"]["motion"] < 0.01
    assert rejected["text-s000"]["curate"]["text_area"] > curated["records"]["clean-s000"].extra["curate"]["text_area"]


def test_near_duplicate_is_removed_and_points_at_the_first(curated):
    dup = curated["rejected"]["dup-s000"]
    assert dup["reason"] == "duplicate"
    assert dup["curate"]["duplicate_of"] == "clean-s000" and dup["curate"]["similarity"] > 0.98
    assert "clean-s000" in curated["records"]


def test_corrupt_input_is_reported_not_fatal(curated):
    failed = curated["summary"]["failed"]
    assert [Path(f["source"]).name for f in failed] == ["corrupt.mp4"]
    assert "corrupt.mp4" in failed[0]["source"] and failed[0]["reason"]
    assert curated["rejected"]["corrupt"]["reason"] == "failed"
    assert len(curated["problems"]) == 1 and "corrupt.mp4" in curated["problems"][0]


def test_summary_counts_add_up(curated):
    s = curated["summary"]
    assert s["inputs"] == 9  # notes.txt is not media
    assert s["shots"] == 10  # multi: 3, the image: 1, the other six videos: 1 each
    assert s["removed"] == {"clarity": 1, "motion": 1, "text_area": 1}
    assert (s["short_shots"], s["no_bucket"], s["duplicates"], s["kept"]) == (1, 0, 1, 5)
    assert s["shots"] == s["short_shots"] + s["no_bucket"] + sum(s["removed"].values()) + s["duplicates"] + s["kept"]
    # Nothing is lost: every shot and failed input is either kept or has a rejected line.
    assert len(curated["records"]) + len(curated["rejected"]) == s["shots"] + len(s["failed"])


def test_kept_clips_are_a_valid_manifest_with_scores_and_buckets(curated):
    records, out = curated["records"], curated["out"]
    assert sorted(records) == ["clean-s000", "multi-s000", "multi-s001", "multi-s002", "still"]
    for record in records.values():
        fields = record.extra["curate"]
        assert {"clarity", "text_area", "text_area_method"} <= set(fields)
        assert fields["text_area_method"] == ("tesseract" if HAS_TESSERACT else "proxy")
        assert record.extra["bucket"] == [64, 64, 1 if record.kind == "image" else 17]
        path = record.media_path(out.parent)
        if record.kind == "video":
            assert "motion" in fields
            frames, fps = read_video(path)
            assert frames.shape == (record.frames, 64, 64, 3) and fps == 8.0
    assert "motion" not in records["still"].extra["curate"]
    # Dropped clips' files are gone; kept ones are all that is left in the clips folder.
    clips = sorted(p.name for p in (out.parent / "clips").iterdir())
    assert clips == sorted(Path(r.media).name for r in records.values())


def test_text_area_scores_text_higher_with_either_method():
    clean, text = toy_video(12), with_text(toy_video(12))
    proxy = TextArea(method="proxy", max=0.05)
    assert proxy.score(clean) == 0.0 and not proxy.keep(proxy.score(text)) and proxy.score(text) > 0.05
    assert max(proxy_text_area(f) for f in text) < 0.5  # the box of the word, not the frame


@pytest.mark.skipif(not HAS_TESSERACT, reason="tesseract is not installed")
def test_tesseract_finds_the_word():
    clean, text = toy_video(12), with_text(toy_video(12))
    assert tesseract_text_area(clean[0]) == 0.0
    assert 0.05 < tesseract_text_area(text[0]) < 0.3
    assert TextArea(method="tesseract").method == "tesseract"


def test_a_manifest_input_keeps_captions_of_single_shot_sources(tmp_path):
    from hvctl.toy.render import render_dataset

    render_dataset(tmp_path / "toy", videos=2, images=1, seed=5, split="train", sizes=[(64, 64)])
    source = read_manifest(tmp_path / "toy" / "manifest.jsonl")
    off = [f"filters.{name}=null" for name in ("clarity", "motion", "text_area")]  # toy stills would not pass
    r = load_recipe(CurateRecipe, TOY_RECIPE, off, values={"input": tmp_path / "toy" / "manifest.jsonl", "out": tmp_path / "out.jsonl"})
    summary = curate(r, progress=False)
    assert summary["kept"] == 3 and summary["removed"] == {}
    kept = {rec.id: rec for rec in read_manifest(tmp_path / "out.jsonl")}
    for rec in source:
        clip = kept[f"{rec.id}-s000" if rec.kind == "video" else rec.id]
        assert clip.caption == rec.caption and clip.split == "train"


class RefusesLongClips:
    """A test filter that cannot score clips of more than 20 frames."""

    media, rule = ("video",), "always"

    def score(self, frames, step=1.0):
        if len(frames) > 20:
            raise SampleFailure(f"{len(frames)} frames")
        return 1.0

    def keep(self, score):
        return True


def test_an_installed_filter_runs_and_its_failure_fails_only_that_input(inputs, tmp_path, monkeypatch):
    # Registered for this test only, as a package's entry point would register it.
    plugin = plugins.Plugin("filter", "test_refuses_long_clips", RefusesLongClips, "tests", "")
    monkeypatch.setitem(plugins._registry, ("filter", "test_refuses_long_clips"), plugin)
    for name in ("clean.mp4", "multi.mp4"):
        shutil.copy(inputs / name, tmp_path / name)
    out = tmp_path / "out" / "m.jsonl"
    r = load_recipe(CurateRecipe, TOY_RECIPE, ["filters.test_refuses_long_clips={}"], values={"input": tmp_path, "out": out})
    summary = curate(r, progress=False)
    assert list(summary["removed"]) == ["clarity", "motion", "text_area", "test_refuses_long_clips"]
    assert summary["kept"] == 1 and [f["id"] for f in summary["failed"]] == ["multi"]
    assert "could not score multi-s002: 21 frames" in summary["failed"][0]["reason"]
    # multi's first two shots were written before its third failed: none of them is left behind.
    assert [p.name for p in (out.parent / "clips").iterdir()] == ["clean-s000.mp4"]


def test_recipe_errors_name_the_culprit(tmp_path):
    base = dict(input=tmp_path, out=tmp_path / "m.jsonl")
    with pytest.raises(HvctlError, match=r"unknown filter 'sharpness' \(choices: .*clarity, motion, text_area"):
        curate(CurateRecipe(**base, filters={"sharpness": {"min": 1}}))
    with pytest.raises(HvctlError, match=r"filter 'motion': bad options .*accepted: min, max, pairs"):
        curate(CurateRecipe(**base, filters={"motion": {"minimum": 1}}))
    with pytest.raises(HvctlError, match=r"filter 'motion': 'min' \(2\) is above 'max' \(1\)"):
        curate(CurateRecipe(**base, filters={"motion": {"min": 2, "max": 1}}))
    with pytest.raises(HvctlError, match=r"filter 'clarity': 'min' must be a number, got 'sharp'"):
        curate(load_recipe(CurateRecipe, overrides=["filters.clarity.min=sharp"], values=base))
    with pytest.raises(HvctlError, match=r"'shots.min_frames' must be at least 5"):
        curate(load_recipe(CurateRecipe, values={**base, "shots.min_frames": 3}))
    with pytest.raises(HvctlError, match=r"no such file or folder"):
        curate(CurateRecipe(input=tmp_path / "missing", out=tmp_path / "m.jsonl"))
    with pytest.raises(HvctlError, match=r"no videos .* or images"):
        curate(CurateRecipe(**base))


def test_output_inside_the_input_folder_is_not_read_back(inputs, tmp_path):
    shutil.copy(inputs / "clean.mp4", tmp_path / "clean.mp4")
    recipe = load_recipe(CurateRecipe, TOY_RECIPE, values={"input": tmp_path, "out": tmp_path / "manifest.jsonl"})
    first, again = curate(recipe, progress=False), curate(recipe, progress=False)
    assert first["kept"] == again["kept"] == 1 and again["inputs"] == 1  # clips/ is skipped
    assert [r.id for r in read_manifest(tmp_path / "manifest.jsonl")] == ["clean-s000"]


def test_bad_manifest_lines_are_failures_not_crashes(tmp_path):
    write_video(tmp_path / "a.mp4", toy_video(11), 8)
    manifest = tmp_path / "in.jsonl"
    manifest.write_text(json.dumps({"id": "a", "media": "a.mp4", "kind": "video", "width": 64, "height": 64,
                                    "frames": 17, "fps": 8}) + "\n{not json\n")
    summary = curate(load_recipe(CurateRecipe, TOY_RECIPE, values={"input": manifest, "out": tmp_path / "o.jsonl"}),
                     progress=False)
    assert summary["kept"] == 1 and len(summary["failed"]) == 1 and ":2" in summary["failed"][0]["source"]


def test_plugin_module_imports_no_heavy_library():
    code = "import sys, hvctl_filters; print([m for m in ('cv2', 'scenedetect', 'torch') if m in sys.modules])"
    assert subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout.strip() == "[]"


@pytest.mark.slow
def test_cli_json_and_errors(inputs, tmp_path):
    small = tmp_path / "in"
    small.mkdir()
    for name in ("clean.mp4", "frozen.mp4", "corrupt.mp4"):
        shutil.copy(inputs / name, small / name)
    out = tmp_path / "out" / "kept.jsonl"
    result = run_cli("curate", small, "--out", out, "-r", TOY_RECIPE, "--set", "filters.text_area=null", "--json")
    assert result.returncode == 0, result.stderr
    summary = json.loads(result.stdout)
    assert (summary["kept"], summary["removed"], len(summary["failed"])) == (1, {"clarity": 0, "motion": 1}, 1)
    assert "corrupt.mp4" in result.stderr  # the failure is also said as it happens
    assert (out.parent / "kept.rejected.jsonl").is_file() and len(read_manifest(out)) == 1

    table = run_cli("curate", small, "--out", out, "-r", TOY_RECIPE, "--set", "filters.text_area=null")
    assert table.returncode == 0 and "filter motion" in table.stdout and "kept" in table.stdout

    missing = run_cli("curate", tmp_path / "nothing", "--out", out)
    assert missing.returncode == 1 and "error:" in missing.stderr and "nothing: no such file or folder" in missing.stderr
    assert "Traceback" not in missing.stderr


def test_a_loss_mask_is_cut_with_each_shot_and_other_paths_follow_the_manifest(tmp_path):
    from hvctl.data.manifest import ManifestRecord, write_manifest

    src = tmp_path / "src"
    (src / "masks").mkdir(parents=True)
    multi = np.concatenate([toy_video(0), toy_video(2), toy_video(9, 25)[:23]])  # cuts at 17 and 34
    write_video(src / "multi.mp4", multi, 8)
    # Frame i of the mask is a flat grey of 4 * i, so a shot's mask frames say where they came from.
    write_video(src / "masks" / "multi.mp4", np.stack([np.full((64, 64, 3), 4 * i, np.uint8) for i in range(57)]), 8)
    write_video(src / "one.mp4", toy_video(11), 8)
    write_video(src / "masks" / "one.mp4", np.full((17, 64, 64, 3), 200, np.uint8), 8)
    (src / "one.wav").write_bytes(b"RIFF")  # a condition path: only followed, never read here
    records = [ManifestRecord(id="multi", media="multi.mp4", kind="video", width=64, height=64, frames=57, fps=8.0,
                              extra={"loss_mask": "masks/multi.mp4", "audio": "one.wav"}),
               ManifestRecord(id="one", media="one.mp4", kind="video", width=64, height=64, frames=17, fps=8.0,
                              extra={"loss_mask": "masks/one.mp4", "audio": "one.wav"})]
    write_manifest(src / "manifest.jsonl", records)
    out = tmp_path / "out" / "curated" / "manifest.jsonl"
    off = [f"filters.{name}=null" for name in ("clarity", "motion", "text_area")] + ["dedup.threshold=null"]
    summary = curate(load_recipe(CurateRecipe, TOY_RECIPE, off, values={"input": src / "manifest.jsonl", "out": out}),
                     progress=False)
    assert summary["kept"] == 4 and not summary["failed"]
    kept = {rec.id: rec for rec in read_manifest(out)}
    for index, (start, end) in enumerate(SHOTS):
        rec = kept[f"multi-s{index:03d}"]
        mask, _ = read_video(out.parent / rec.extra["loss_mask"])
        assert len(mask) == rec.frames == four_k_plus_one(end - start)
        assert np.abs(mask[:, 0, 0, 0].astype(int) - 4 * np.arange(start, start + rec.frames)).max() <= 2
        assert "audio" not in rec.extra  # a shot of a longer source: its audio would need its own cut
    one = kept["one-s000"]
    assert read_video(out.parent / one.extra["loss_mask"])[0].shape[0] == 17
    assert (out.parent / one.extra["audio"]).resolve() == (src / "one.wav").resolve()


def test_a_missing_loss_mask_fails_only_its_source(tmp_path):
    from hvctl.data.manifest import ManifestRecord, write_manifest

    write_video(tmp_path / "a.mp4", toy_video(11), 8)
    write_video(tmp_path / "b.mp4", toy_video(0), 8)
    write_manifest(tmp_path / "in.jsonl", [
        ManifestRecord(id="a", media="a.mp4", kind="video", width=64, height=64, frames=17, fps=8.0,
                       extra={"loss_mask": "masks/a.mp4"}),
        ManifestRecord(id="b", media="b.mp4", kind="video", width=64, height=64, frames=17, fps=8.0)])
    off = [f"filters.{name}=null" for name in ("clarity", "motion", "text_area")]
    summary = curate(load_recipe(CurateRecipe, TOY_RECIPE, off, values={"input": tmp_path / "in.jsonl",
                                                                        "out": tmp_path / "out" / "m.jsonl"}),
                     progress=False)
    assert [rec.id for rec in read_manifest(tmp_path / "out" / "m.jsonl")] == ["b-s000"]
    assert len(summary["failed"]) == 1 and "masks/a.mp4" in json.dumps(summary["failed"])
    assert sorted(p.name for p in (tmp_path / "out" / "clips").iterdir()) == ["b-s000.mp4"]
