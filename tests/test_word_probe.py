"""The word probe (`hvctl eval words`): each attribute's word changed alone, the object's velocity
error against the own prompt's, measured as the training objective is."""

import json

import pytest
import torch

from conftest import run_cli, small_cache
from hvctl.cache import LatentCache
from hvctl.data.manifest import read_manifest
from hvctl.flow import add_noise, transformer_velocity
from hvctl.models.loading import load_components, prepare_model
from hvctl.models.text import PromptEncoder
from hvctl.toy.evaluate import toy_sample
from hvctl.toy.word_probe import changed_prompts, probe_model, probe_samples, word_ratios
from hvctl.train.validation import sample_noise


@pytest.fixture(scope="module")
def probe_cache(tmp_path_factory, tiny_model):
    return small_cache(tmp_path_factory.mktemp("probe"), tiny_model, videos=2, images=1, seed=4)


def test_each_changed_prompt_differs_from_the_own_prompt_in_one_word(probe_cache):
    manifest = probe_cache.parent / "data" / "manifest.jsonl"
    samples = [toy_sample(r, manifest) for r in read_manifest(manifest)]
    video = next(s for s in samples if s.kind == "video")
    image = next(s for s in samples if s.kind == "image")
    for sample, attributes in [(video, {"color": 5, "shape": 2, "background": 2, "motion": 4}),
                               (image, {"color": 5, "shape": 2, "background": 2})]:
        changed = changed_prompts(sample)
        assert {a: len(p) for a, p in changed.items()} == attributes  # an image has no motion to change
        own = sample.prompt().split()
        for attribute, prompts in changed.items():
            assert len(set(prompts)) == len(prompts)
            for prompt in prompts:
                words = prompt.split()
                if attribute == "motion" and "still" in (own + words):  # "stays still" against "moves left"
                    assert words[:3] == own[:3] and words[-4:] == own[-4:]
                else:
                    assert len(words) == len(own) and sum(a != b for a, b in zip(words, own)) == 1


def test_the_ratio_is_the_objective_by_hand_and_one_where_the_text_cannot_matter(tiny_model, probe_cache):
    model_dir, defaults = prepare_model(tiny_model)
    parts = load_components(model_dir, parts=("transformer", "text"), dtype=torch.float32)
    model = parts.transformer.eval()
    encoders = {k: PromptEncoder(parts.tokenizer, parts.text_encoder, parts.tokenizer_2, parts.text_encoder_2, template=k,
                                 text_len=defaults["text_len"]) for k in ("image", "video")}
    cache = LatentCache(probe_cache, text_len=defaults["text_len"])
    chosen = probe_samples(cache, probe_cache.parent / "data" / "manifest.jsonl", 3)
    assert len(chosen) == 3
    result = word_ratios(model, encoders, cache, chosen, sigmas=(0.7,), seed=3)
    assert result["samples"] == 3 and set(result["ratio"]) == {"color", "shape", "background", "motion"}

    def object_error(index, sample, prompt, sigma=0.7):
        item = cache.item(index, 0)
        x0, mask = item["latent_mean"].float()[None], item["loss_mask"].float()
        noise = sample_noise(index, x0.shape[1:], 3)[None]
        text = encoders[sample.kind]([prompt])
        with torch.no_grad():
            v = transformer_velocity(model, add_noise(x0, noise, torch.tensor([sigma])), torch.tensor([sigma]),
                                     text.llm_states, text.llm_mask, text.pooled)
        return float(((v - (noise - x0)) ** 2 * mask).sum() / (mask.sum() * x0.shape[1]))

    by_hand = []
    for index, sample in chosen:
        own = object_error(index, sample, sample.prompt())
        shapes = changed_prompts(sample)["shape"]
        by_hand.append(sum(object_error(index, sample, p) for p in shapes) / len(shapes) / own)
    assert result["ratio"]["shape"][0] == pytest.approx(sorted(by_hand)[1], rel=1e-3)  # the median of 3
    assert result["ratio"]["shape"][0] != pytest.approx(1.0, abs=1e-4)  # a random tiny model does read its words

    class SameTextForEveryPrompt:  # a text encoder that cannot tell prompts apart
        def __init__(self, encoder):
            self.encoder = encoder

        def __call__(self, prompts):
            one = self.encoder(prompts[:1])
            return type(one)(*(t.expand(len(prompts), *t.shape[1:]) for t in (one.llm_states, one.llm_mask, one.pooled)))

    deaf = word_ratios(model, {k: SameTextForEveryPrompt(e) for k, e in encoders.items()}, cache, chosen, sigmas=(0.7,), seed=3)
    assert all(r == [1.0] for r in deaf["ratio"].values())


def test_eval_words_cli_reports_each_word_and_refuses_bad_input(tiny_model, tiny_guided_model, probe_cache, tmp_path):
    manifest = probe_cache.parent / "data" / "manifest.jsonl"
    ok = run_cli("eval", "words", probe_cache, "--manifest", manifest, "--model", tiny_model, "--samples", 2,
                 "--sigma", 0.5, "--json")
    assert ok.returncode == 0, ok.stderr
    report = json.loads(ok.stdout)
    assert report["samples"] == 2 and report["sigmas"] == [0.5]
    assert report["ratio"] == probe_model(tiny_model, probe_cache, manifest, samples=2, sigmas=(0.5,))["ratio"]
    plain = run_cli("eval", "words", probe_cache, "--manifest", manifest, "--model", tiny_model, "--samples", 1)
    assert plain.returncode == 0 and "shape" in plain.stdout and "sigma 0.9" in plain.stdout
    other = tmp_path / "other.jsonl"
    first = json.loads(manifest.read_text().splitlines()[0])
    other.write_text(json.dumps({**first, "id": "not-in-the-cache", "media": str(manifest.parent / first["media"])}) + "\n")
    for args, message in [(["--manifest", manifest, "--sigma", "nan"], "noise levels must be in (0, 1]"),
                          (["--manifest", manifest, "--samples", "0"], "--samples must be >= 1"),
                          (["--manifest", other], "none of"),
                          (["--manifest", tmp_path / "missing.jsonl"], "missing.jsonl")]:
        bad = run_cli("eval", "words", probe_cache, "--model", tiny_model, *args)
        assert bad.returncode == 1 and message in bad.stderr and len(bad.stderr.strip().splitlines()) == 1, (args, bad.stderr)
    foreign = run_cli("eval", "words", probe_cache, "--manifest", manifest, "--model", tiny_guided_model)
    assert foreign.returncode == 1 and "encoders" in foreign.stderr, foreign.stderr
