"""hvctl prefer: N videos per prompt, scored by a scorer plugin; best and worst form the pair."""

import json

import pytest

from hvctl.errors import HvctlError
from hvctl.prefer import PreferRecipe, pick_pair, prefer, read_prompts

PROMPTS = ["a red circle moves left on a black background", "a blue square stays still on a white background"]


def _recipe(tmp_path, model, labels, **kw):
    prompts = tmp_path / "prompts.txt"
    prompts.write_text("\n".join(PROMPTS) + "\n")
    return PreferRecipe(prompts=prompts, model=model, out=tmp_path / "pref", videos=3, scorer="labels",
                        options={"path": str(labels)}, steps=1, height=32, width=32, frames=5, save_every=1, **kw)


def test_pick_pair_takes_the_best_and_the_worst_and_skips_ties():
    assert pick_pair([0.5, 1.0, 0.0, 1.0]) == (1, 2)
    assert pick_pair([0.25, 0.25, 0.25]) is None


def test_prefer_is_incremental_and_resumable_as_labels_arrive(tiny_model, tmp_path):
    ids = [item["id"] for item in read_prompts(_recipe(tmp_path, tiny_model, tmp_path / "x").prompts)]
    labels = tmp_path / "labels.jsonl"
    # People have rated the first prompt's videos only.
    labels.write_text("".join(json.dumps({"id": ids[0], "index": k, "score": s}) + "\n" for k, s in enumerate([0.2, 0.9, 0.1])))
    first = prefer(_recipe(tmp_path, tiny_model, labels), progress=False)
    assert first["videos_made"] == 6 and first["pairs"] == 1 and first["unscored"] == 1 and first["encoded"] == 2
    assert [f["id"] for f in first["failed"]] == [ids[1]] * 3
    out = tmp_path / "pref"
    pairs = [json.loads(line) for line in (out / "manifest.jsonl").read_text().splitlines()]
    assert [(p["id"], p["media"], p["preference"]["role"]) for p in pairs] == [
        (f"{ids[0]}.chosen", f"videos/{ids[0]}/1.mp4", "chosen"), (f"{ids[0]}.rejected", f"videos/{ids[0]}/2.mp4", "rejected")]
    assert pairs[0]["caption"]["short_description"] == PROMPTS[0]
    video = (out / "videos" / ids[0] / "0.mp4").read_bytes()

    # The rest of the labels arrive: nothing is made again, only the new scores are read.
    with labels.open("a") as f:
        f.write("".join(json.dumps({"id": ids[1], "index": k, "score": s}) + "\n" for k, s in enumerate([0.5, 0.5, 0.7])))
    second = prefer(_recipe(tmp_path, tiny_model, labels), progress=False)
    assert second["videos_made"] == 0 and second["scored"] == 3 and second["pairs"] == 2 and second["failed"] == []
    assert second["encoded"] == 2  # the first pair is cached already
    state = {row["id"]: row for row in map(json.loads, (out / "prompts.jsonl").read_text().splitlines())}
    assert state[ids[1]]["chosen"] == 2 and state[ids[1]]["rejected"] == 0
    assert (out / "videos" / ids[0] / "0.mp4").read_bytes() == video

    from hvctl.cache import LatentCache

    cache = LatentCache(out / "cache")
    assert sorted(e.id for e in cache.entries) == sorted(f"{i}.{role}" for i in ids for role in ("chosen", "rejected"))

    # A run killed before it wrote and scored video 1: the next makes it again, the same, and scores it.
    from hvctl.video import read_video

    before = read_video(out / "videos" / ids[1] / "1.mp4")[0]
    (out / "videos" / ids[1] / "1.mp4").unlink()
    rows = [json.loads(line) for line in (out / "prompts.jsonl").read_text().splitlines()]
    rows[1]["scores"][1], rows[1]["chosen"], rows[1]["rejected"] = None, None, None
    (out / "prompts.jsonl").write_text("".join(json.dumps(row) + "\n" for row in rows))
    third = prefer(_recipe(tmp_path, tiny_model, labels), progress=False)
    assert third["videos_made"] == 1 and third["scored"] == 1 and third["pairs"] == 2 and third["encoded"] == 0
    again = read_video(out / "videos" / ids[1] / "1.mp4")[0]
    assert abs(again.astype(float) - before).mean() < 1.0  # its own seed; batched with others before (float rounding)


def test_prefer_refuses_other_settings_in_the_same_folder(tiny_model, tmp_path):
    labels = tmp_path / "labels.jsonl"
    labels.write_text("")
    r = _recipe(tmp_path, tiny_model, labels, limit=1)
    (tmp_path / "pref").mkdir()
    (tmp_path / "pref" / "settings.json").write_text(json.dumps({"videos": 9}))
    with pytest.raises(HvctlError, match="other settings"):
        prefer(r, progress=False)


def test_toy_scorer_is_the_evaluators_measure():
    from hvctl import plugins
    from hvctl.toy.world import render, sample_spec

    sample = sample_spec(0, 1, "eval", "video", size=(64, 64), frames=9)
    scorer = plugins.create("scorer", "toy")
    assert scorer.score(render(sample), sample.prompt(), {}) == 1.0
    wrong = sample.prompt().replace(sample.background, "gray" if sample.background != "gray" else "white")
    assert scorer.score(render(sample), wrong, {}) == 0.75
    with pytest.raises(plugins.SampleFailure, match="names no"):
        scorer.score(render(sample), "a cat", {})


def test_labels_scorer_checks_its_file(tmp_path):
    from hvctl import plugins

    bad = tmp_path / "labels.jsonl"
    bad.write_text('{"id": "a", "index": 0, "score": "high"}\n')
    with pytest.raises(HvctlError, match="labels.jsonl:1: score must be a finite number"):
        plugins.create("scorer", "labels", path=str(bad))
    with pytest.raises(HvctlError, match="needs option 'path'"):
        plugins.create("scorer", "labels")
