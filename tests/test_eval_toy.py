"""`hvctl eval toy`: the scoring is right on videos whose truth is known, and the command works end to end."""

import json

import pytest

from conftest import run_cli
from hvctl.toy.evaluate import _measure, group_of, prompt_set, score
from hvctl.toy.world import render, sample_spec


def test_rendered_truth_scores_full_marks_and_a_mismatch_does_not():
    samples = prompt_set(12, seed=3)
    assert sum(group_of(s) == "held_out" for s in samples) == 4  # a third held out
    videos = [render(sample_spec(3, s.index, "eval", "video", size=(64, 64), frames=17)) for s in samples]
    table = score(samples, [_measure(s, s.prompt(), v) for s, v in zip(samples, videos)])
    assert table["seen"]["n"] == 8 and table["held_out"]["n"] == 4
    for group in table.values():
        assert group["strict"] == 1.0 and group["color"] == group["motion"] == 1.0
    # Each video measured against the next sample's prompt: accuracy must drop.
    shifted = score(samples, [_measure(s, s.prompt(), v) for s, v in zip(samples, videos[1:] + videos[:1])])
    assert shifted["seen"]["strict"] < 0.5


@pytest.mark.slow
def test_eval_toy_cli_json(tiny_model, tmp_path):
    result = run_cli("eval", "toy", "--model", str(tiny_model), "--prompts", "3", "--steps", "2", "--steps", "3",
                     "--vae-videos", "1", "--out", str(tmp_path / "eval"), "--json")
    assert result.returncode == 0, result.stderr
    report = json.loads(result.stdout)
    assert [run["steps"] for run in report["runs"]] == [2, 3]
    assert report["runs"][0]["accuracy"]["held_out"]["n"] == 1 and report["runs"][0]["accuracy"]["seen"]["n"] == 2
    assert report["vae"]["videos"] == 1 and report["vae"]["psnr"] < 20  # a random VAE reconstructs nothing
    assert [(g["n"], g["strict"]) for g in report["vae"]["accuracy"].values()] == [(1, 0.0)]
    measured = json.loads((tmp_path / "eval" / "steps3" / "measurements.json").read_text())
    assert len(measured) == 3 and measured[0]["expected"]["color"] in ("red", "blue", "yellow")
    assert len(list((tmp_path / "eval" / "steps2").glob("*.mp4"))) == 3


@pytest.mark.slow
def test_eval_toy_vae_only_scores_the_ceiling_alone(tiny_model):
    result = run_cli("eval", "toy", "--model", str(tiny_model), "--vae-only", "--vae-videos", "2", "--json")
    assert result.returncode == 0, result.stderr
    report = json.loads(result.stdout)
    assert report["runs"] == [] and report["vae"]["videos"] == 2 and report["vae"]["psnr"] < 20
    assert sum(g["n"] for g in report["vae"]["accuracy"].values()) == 2


@pytest.mark.slow
def test_eval_toy_manifest_scores_the_manifests_clips(tiny_model, tmp_path):
    from hvctl.toy.render import render_dataset

    manifest = render_dataset(tmp_path / "clips", 3, 0, seed=5, split="train", sizes=[(32, 48)], frames=5)
    result = run_cli("eval", "toy", "--model", str(tiny_model), "--manifest", str(manifest), "--prompts", "2",
                     "--steps", "1", "--vae-videos", "0", "--out", str(tmp_path / "eval"), "--json")
    assert result.returncode == 0, result.stderr
    run = json.loads(result.stdout)["runs"][0]
    assert (run["height"], run["width"], run["frames"]) == (32, 48, 5)  # the clips' own size and length
    measured = json.loads((tmp_path / "eval" / "steps1" / "measurements.json").read_text())
    truths = [json.loads(line)["toy"] for line in manifest.read_text().splitlines()[:2]]
    assert [m["expected"]["color"] for m in measured] == [t["color"] for t in truths]
    assert [m["prompt"] for m in measured] == [json.loads(line)["caption"]["short_description"]
                                              for line in manifest.read_text().splitlines()[:2]]


@pytest.mark.slow
def test_eval_toy_rejects_bad_counts(tiny_model):
    result = run_cli("eval", "toy", "--model", str(tiny_model), "--prompts", "0")
    assert result.returncode == 1 and result.stderr.strip() == "error: --prompts must be at least 1, got 0"
    for flags, message in ((["--start-sigma", "0"], "--start-sigma must be in (0, 1], got 0"),
                           (["--start-sigma", "nan"], "--start-sigma must be a finite number, got nan"),
                           (["--start-sigma", "0.5", "--i2v"], "--start-sigma denoises the prompts' own videos")):
        result = run_cli("eval", "toy", "--model", str(tiny_model), *flags)
        assert result.returncode == 1 and message in result.stderr and "Traceback" not in result.stderr, result.stderr


def test_the_sampler_from_a_start_sigma_visits_only_the_levels_below_it():
    """An oracle denoiser that knows x0 returns it exactly from any start; the model is asked at the
    start level and then at the schedule's levels below it, nowhere else."""
    import torch

    from hvctl.flow import add_noise, sampling_sigmas
    from hvctl.models.text import TextConditions
    from hvctl.sampling import Conditions, FlowMatchEulerSampler

    x0, noise = torch.randn(2, 4, 2, 3, 3), torch.randn(2, 4, 2, 3, 3)

    class Oracle(torch.nn.Module):
        dtype = torch.float32
        config = type("Config", (), {"guidance_embeds": False})()

        def __init__(self):
            super().__init__()
            self.sigmas = []

        def forward(self, hidden_states, timestep, **_):
            sigma = float(timestep[0]) / 1000
            self.sigmas.append(sigma)
            return ((hidden_states - x0) / sigma,)  # x = (1 - s) x0 + s n, so n - x0 = (x - x0) / s

    text = TextConditions(torch.zeros(2, 4, 8), torch.ones(2, 4, dtype=torch.long), torch.zeros(2, 8))
    schedule = sampling_sigmas(10, 7.0)
    for start in (1.0, 0.6, 0.05):
        model = Oracle()
        out = FlowMatchEulerSampler(steps=10, shift=7.0, start_sigma=start)(model, add_noise(x0, noise, start), Conditions(text))
        assert torch.allclose(out, x0, atol=1e-5)
        expected = [start] + [float(s) for s in schedule if 0 < s < start] if start < 1 else [float(s) for s in schedule[:-1]]
        assert model.sigmas == pytest.approx(expected, abs=1e-6)
    assert len(expected) == 1 + int(((schedule > 0) & (schedule < 0.05)).sum()) and len(expected) < 10


@pytest.mark.slow
def test_eval_toy_from_a_start_sigma_denoises_the_prompts_own_videos(tmp_path):
    """From sigma 0.02 the default model hands back each prompt's true video (through its VAE);
    from pure noise, with the same seeds, it draws videos of its own."""
    import numpy as np

    from hvctl.toy.evaluate import psnr
    from hvctl.video import read_video

    truths = [render(sample_spec(0, s.index, "eval", "video", size=(64, 64), frames=17)) for s in prompt_set(3, 0)]
    scores = {}
    for start in ("0.02", "1"):
        out = tmp_path / start
        result = run_cli("eval", "toy", "--prompts", "3", "--steps", "10", "--vae-videos", "0", "--start-sigma", start,
                         "--out", str(out), "--json")
        assert result.returncode == 0, result.stderr
        assert json.loads(result.stdout)["runs"][0]["start_sigma"] == float(start)
        videos = [np.asarray(read_video(out / "steps10" / f"{i:04d}.mp4")[0]) for i in range(3)]
        scores[start] = [psnr(truth, video) for truth, video in zip(truths, videos)]
    assert min(scores["0.02"]) > 22, scores
    assert all(near - far > 5 for near, far in zip(scores["0.02"], scores["1"])), scores


@pytest.mark.slow
def test_eval_toy_rewrite_scores_paraphrased_prompts_as_written_and_rewritten(tiny_model, tmp_path):
    result = run_cli("eval", "toy", "--model", str(tiny_model), "--prompts", "4", "--steps", "2", "--vae-videos", "0",
                     "--rewrite", "lexicon", "--out", str(tmp_path / "eval"), "--json")
    assert result.returncode == 0, result.stderr
    report = json.loads(result.stdout)
    assert [run["prompts"] for run in report["runs"]] == ["paraphrased", "rewritten-lexicon"]
    assert report["rewrite"] == {"rewriter": "lexicon", "mode": "normal", "kept_as_written": 0, "exact_canonical": 4}
    as_written = json.loads((tmp_path / "eval" / "steps2-paraphrased" / "measurements.json").read_text())
    rewritten = json.loads((tmp_path / "eval" / "steps2-rewritten-lexicon" / "measurements.json").read_text())
    assert [m["prompt"] for m in as_written] != [m["prompt"] for m in rewritten]
    assert all(m["prompt"].endswith("background") for m in rewritten)


@pytest.mark.slow
def test_the_shape_test_reads_true_videos_through_the_toy_vae():
    """The eval's ceiling: rendered eval videos through the embedded toy VAE keep their measured
    attributes. The shape test survives the VAE's blur (a bounding-box fill ratio read most
    triangles as circles here)."""
    from hvctl.models.default import default_model_dir
    from hvctl.models.loading import load_components
    from hvctl.toy.evaluate import vae_scores

    vae = load_components(default_model_dir(), parts=("vae",)).vae
    ceiling = vae_scores(vae, 24, seed=0, height=64, width=64, frames=17)
    for group in ceiling["accuracy"].values():
        assert group["shape"] >= 0.85 and group["color"] >= 0.75 and group["motion"] >= 0.95, ceiling
        assert group["background"] == 1.0
