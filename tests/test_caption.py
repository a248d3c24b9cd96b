"""`hvctl caption`: structured captions for samples that lack one, by a registered captioner."""

import json

import pytest

from conftest import run_cli
from hvctl.caption import CaptionRecipe, caption
from hvctl.data.captions import caption_problems
from hvctl.data.manifest import read_manifest, write_manifest
from hvctl.errors import HvctlError
from hvctl.toy.render import render_dataset


@pytest.fixture(scope="module")
def rendered(tmp_path_factory):
    """Toy videos (every aspect bucket and duration) and images with their true captions."""
    return render_dataset(tmp_path_factory.mktemp("toy"), videos=36, images=12, seed=4, split="eval")


def uncaptioned_copy(manifest, directory, name="uncaptioned.jsonl"):
    """The manifest with its captions removed, next to the media (paths stay relative)."""
    records = read_manifest(manifest)
    truth = {r.id: r.caption for r in records}
    for r in records:
        r.caption = None
    out = manifest.parent / name
    write_manifest(out, records)
    return out, truth


def test_toy_captioner_matches_the_ground_truth(rendered):
    manifest, truth = uncaptioned_copy(rendered, rendered.parent, "accuracy.jsonl")
    result = caption(CaptionRecipe(manifest=manifest, captioner="toy"), progress=False)
    assert result["captioned"] == len(truth) and not result["failed"]
    records = read_manifest(manifest)
    assert all(not caption_problems(r.caption) for r in records)
    short = sum(r.caption["short_description"] == truth[r.id]["short_description"] for r in records) / len(records)
    dense = sum(r.caption["dense_description"] == truth[r.id]["dense_description"] for r in records) / len(records)
    print(f"toy captioner accuracy over {len(records)} samples: short {short:.1%}, dense {dense:.1%}")
    # The short description names colour, shape, motion and background: all read exactly from pixels.
    assert short == 1.0
    # The dense one adds size, speed and place words; a value at a word's boundary can flip.
    assert dense >= 0.75


def test_captioning_is_incremental_and_resumable(rendered, monkeypatch):
    from hvctl import plugins

    manifest, _ = uncaptioned_copy(rendered, rendered.parent, "resume.jsonl")
    toy = plugins.get("captioner", "toy").factory

    class Interrupted(Exception):
        pass

    class DiesAfterSeven(toy):
        calls = 0

        def caption(self, frames, record=None):
            DiesAfterSeven.calls += 1
            if DiesAfterSeven.calls > 7:
                raise Interrupted  # like a killed process: nothing after this line runs
            return super().caption(frames, record)

    monkeypatch.setitem(plugins._registry, ("captioner", "dies"), plugins.Plugin("captioner", "dies", DiesAfterSeven, "test", ""))
    with pytest.raises(Interrupted):
        caption(CaptionRecipe(manifest=manifest, captioner="dies", save_every=3), progress=False)
    saved = [r for r in read_manifest(manifest) if r.caption is not None]
    assert len(saved) == 6  # the last atomic save before the crash

    result = caption(CaptionRecipe(manifest=manifest, captioner="toy"), progress=False)
    assert result["already_captioned"] == 6 and result["captioned"] == 48 - 6
    again = caption(CaptionRecipe(manifest=manifest, captioner="toy"), progress=False)
    assert again["captioned"] == 0 and again["already_captioned"] == 48


@pytest.mark.slow
def test_a_sample_that_cannot_be_captioned_is_recorded_not_fatal(rendered, tmp_path):
    manifest, _ = uncaptioned_copy(rendered, rendered.parent, "broken.jsonl")
    records = read_manifest(manifest)
    (rendered.parent / "media" / "corrupt.mp4").write_bytes(b"\x00not a video" * 50)
    records[2].media = "media/corrupt.mp4"
    write_manifest(manifest, records)

    done = run_cli("caption", manifest, "--json")
    assert done.returncode == 0, done.stderr
    result = json.loads(done.stdout)
    assert [f["id"] for f in result["failed"]] == [records[2].id]
    assert "corrupt.mp4" in result["failed"][0]["error"]
    after = {r.id: r for r in read_manifest(manifest)}
    assert after[records[2].id].caption is None and "corrupt" in after[records[2].id].extra["caption_error"]
    assert sum(r.caption is not None for r in after.values()) == 47

    failing = run_cli("caption", manifest, "--on-error", "fail")
    assert failing.returncode == 1 and "corrupt.mp4" in failing.stderr


@pytest.mark.slow
def test_unknown_captioner_is_one_line_listing_the_choices(rendered):
    done = run_cli("caption", rendered, "--captioner", "gpt9")
    assert done.returncode == 1
    assert "unknown captioner 'gpt9'" in done.stderr and "toy" in done.stderr and "vlm" in done.stderr
    assert "Traceback" not in done.stderr


def test_vlm_captioner_runs_a_local_model_and_records_what_it_could_not_parse(rendered, tiny_vlm):
    manifest, _ = uncaptioned_copy(rendered, rendered.parent, "vlm.jsonl")
    records = read_manifest(manifest)[:2]
    small = manifest.parent / "vlm-small.jsonl"
    write_manifest(small, records)
    result = caption(CaptionRecipe(manifest=small, captioner="vlm", model=tiny_vlm, options={"max_new_tokens": 24}),
                     progress=False)
    # A randomly initialised model writes no valid JSON: each sample is a recorded failure, with
    # the reason, and the run goes on; a valid answer would have been kept.
    assert result["captioned"] + len(result["failed"]) == 2
    for failure in result["failed"]:
        assert "not a valid structured caption after one retry" in failure["error"]
    for r in read_manifest(small):
        assert (r.caption is None) == ("caption_error" in r.extra)
        assert r.caption is None or not caption_problems(r.caption)


def test_vlm_captioner_needs_a_model_folder(rendered, tmp_path):
    with pytest.raises(HvctlError, match="needs a model folder"):
        caption(CaptionRecipe(manifest=rendered, captioner="vlm"), progress=False)
    with pytest.raises(HvctlError, match="not a transformers model folder"):
        caption(CaptionRecipe(manifest=rendered, captioner="vlm", model=tmp_path), progress=False)


def test_model_replies_are_parsed_repaired_and_validated():
    from hvctl_transformers.captioner import parse_caption

    good = {"short_description": "a cat walks", "dense_description": "A cat walks on grass.", "background": "grass",
            "style": "realistic", "shot_type": "wide", "lighting": "daylight", "atmosphere": "calm",
            "camera_movement": "static"}
    fenced = "Sure!\n```json\n" + json.dumps(good)[:-1] + ',}\n```'  # trailing comma, no tag lists
    caption_, problems = parse_caption(fenced)
    assert problems == [] and caption_["additional_metadata"] == {"source_tags": [], "quality_tags": [], "other_tags": []}
    assert parse_caption("no json here")[1] == ["no JSON object in the reply"]
    assert parse_caption('{"short_description": "unclosed')[1] == ["the JSON object is not closed"]
    missing = parse_caption(json.dumps({**good, "lighting": ""}))[1]
    assert missing == ["'lighting' must be a non-empty string"]
    braces = parse_caption(json.dumps({**good, "style": "a {curly} style"}) + " trailing } text")
    assert braces[1] == [] and braces[0]["style"] == "a {curly} style"
