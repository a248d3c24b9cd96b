"""The held-out denoising loss (`hvctl eval loss`, `validation.loss_cache` in a train recipe): the
training objective by hand at fixed noise, whatever the batching; logged by training at its
validation checkpoints; bad settings refused up front."""

import json

import pytest
import torch

from conftest import run_cli, small_cache
from hvctl.cache import LatentCache
from hvctl.errors import HvctlError
from hvctl.models.loading import load_components, prepare_model
from hvctl.recipe import load_recipe
from hvctl.train.config import TrainRecipe, check_paths
from hvctl.train.validation import held_out_losses, model_losses, sample_noise


@pytest.fixture(scope="module")
def val_cache(tmp_path_factory, tiny_model):
    return small_cache(tmp_path_factory.mktemp("val"), tiny_model, videos=3, images=0, seed=8)


def by_hand(model, item, sigma, noise):
    """The velocity loss of one sample at one noise level, on the whole latent and inside its mask."""
    x0 = item["latent_mean"][None].float()
    noisy = (1 - sigma) * x0 + sigma * noise[None]
    with torch.no_grad():
        velocity = model(hidden_states=noisy, timestep=torch.tensor([1000.0 * sigma]),
                         encoder_hidden_states=item["text_states"][None].float(), encoder_attention_mask=item["text_mask"][None],
                         pooled_projections=item["pooled"][None].float(), return_dict=False)[0]
    squared = (velocity - (noise[None] - x0)) ** 2
    mask = item["loss_mask"][None].float()
    return squared.mean().item(), ((squared * mask).sum() / (mask.sum() * squared.shape[1])).item()


def test_the_held_out_loss_is_the_objective_by_hand_whatever_the_batching(tiny_model, val_cache):
    model = load_components(tiny_model, parts=("transformer",), dtype=torch.float32).transformer.eval()
    cache = LatentCache(val_cache, text_len=prepare_model(tiny_model)[1]["text_len"])
    sigmas = (0.2, 0.8)
    result = held_out_losses(model, cache, samples=3, sigmas=sigmas, seed=5, batch_size=2)
    assert result["samples"] == 3 and result["masked_samples"] == 3 and result["sigmas"] == [0.2, 0.8]
    for k, sigma in enumerate(sigmas):
        whole, inside = zip(*(by_hand(model, cache.item(i, 0), sigma, sample_noise(i, cache.item(i, 0)["latent_mean"].shape, 5))
                              for i in range(3)))
        assert result["loss"][k] == pytest.approx(sum(whole) / 3, rel=1e-4)
        assert result["masked_loss"][k] == pytest.approx(sum(inside) / 3, rel=1e-4)
    # the object is harder than the flat background: the masked loss is its own figure
    assert result["masked_loss"] != result["loss"]
    # one sample at a time, fewer samples or other noise levels beside: each figure is its own
    assert held_out_losses(model, cache, samples=3, sigmas=sigmas, seed=5, batch_size=1)["loss"] == pytest.approx(result["loss"], rel=1e-5)
    first = held_out_losses(model, cache, samples=1, sigmas=(0.8,), seed=5)
    assert first["loss"][0] == pytest.approx(by_hand(model, cache.item(0, 0), 0.8, sample_noise(0, cache.item(0, 0)["latent_mean"].shape, 5))[0], rel=1e-4)
    # another seed is other noise
    assert held_out_losses(model, cache, samples=3, sigmas=sigmas, seed=6)["loss"] != result["loss"]


def test_eval_loss_cli_reports_each_noise_level_and_refuses_bad_input(tiny_model, tiny_guided_model, val_cache):
    ok = run_cli("eval", "loss", val_cache, "--model", tiny_model, "--samples", 2, "--sigma", 0.5, "--sigma", 0.9, "--json")
    assert ok.returncode == 0, ok.stderr
    report = json.loads(ok.stdout)
    assert report["samples"] == 2 and report["sigmas"] == [0.5, 0.9] and len(report["loss"]) == 2 and len(report["masked_loss"]) == 2
    assert report == {**model_losses(tiny_model, val_cache, samples=2, sigmas=(0.5, 0.9)), "cache": str(val_cache)}
    for args, message in [(["--sigma", "0"], "--sigma: noise levels must be in (0, 1]"),
                          (["--sigma", "nan"], "--sigma: noise levels must be in (0, 1]"),
                          (["--samples", "0"], "--samples must be >= 1")]:
        bad = run_cli("eval", "loss", val_cache, "--model", tiny_model, *args)
        assert bad.returncode == 1 and message in bad.stderr and len(bad.stderr.strip().splitlines()) == 1, args
    missing = run_cli("eval", "loss", val_cache.parent / "nothing", "--model", tiny_model)
    assert missing.returncode == 1 and "not an hvctl cache" in missing.stderr
    # another model's encoders made this cache: refused unless the user insists
    foreign = run_cli("eval", "loss", val_cache, "--model", tiny_guided_model, "--samples", 1)
    assert foreign.returncode == 1 and "pass --accept-foreign-cache" in foreign.stderr, foreign.stderr
    insisted = run_cli("eval", "loss", val_cache, "--model", tiny_guided_model, "--samples", 1, "--accept-foreign-cache", "--json")
    assert insisted.returncode == 0, insisted.stderr


@pytest.mark.slow
def test_training_logs_the_held_out_loss_of_what_it_exports(tiny_model, val_cache, tmp_path):
    recipe = tmp_path / "r.yaml"
    recipe.write_text("\n".join([
        "kind: train", "target: dit", f"model: {tiny_model}", f"out: {tmp_path / 'run'}", "steps: 4", "seed: 1", "ema_decay: 0.5",
        "log_every: 1", "optim:", "  lr: 0.001", "data:", f"  cache: {val_cache}", "  batch_size: 2",
        "checkpoint:", "  every: 2", "validation:", "  every: 2", f"  loss_cache: {val_cache}", "  loss_samples: 2",
        "  loss_sigmas: [0.5, 0.9]", ""]))
    result = run_cli("train", recipe, "--json")
    assert result.returncode == 0, result.stderr
    report = json.loads(result.stdout)
    rows = [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    validated = {row["step"]: row for row in rows if "val_loss@0.5" in row}
    assert sorted(validated) == [2, 4] and all("val_masked_loss@0.9" in row for row in validated.values())
    # the figures are those of the exported (EMA) weights, measured again from the model folder
    final = model_losses(tmp_path / "run" / "model", val_cache, samples=2, sigmas=(0.5, 0.9))
    assert [validated[4]["val_loss@0.5"], validated[4]["val_loss@0.9"]] == pytest.approx(final["loss"], abs=2e-6)
    assert report["validation"]["val_loss@0.9"] == pytest.approx(final["loss"][1], abs=2e-6)
    assert validated[2]["val_loss@0.5"] != validated[4]["val_loss@0.5"]


def test_a_held_out_loss_that_cannot_run_is_refused_before_training(tiny_model, val_cache, tmp_path):
    base = {"model": str(tiny_model), "out": str(tmp_path / "run"), "data": {"cache": str(val_cache)}}
    for validation, message in [({"loss_cache": str(val_cache)}, "validation.every is 0"),
                                ({"loss_cache": str(tmp_path / "none"), "every": 2}, "validation.loss_cache: .* not found"),
                                ({"loss_cache": str(val_cache), "every": 2, "loss_sigmas": [0.5, 1.5]}, r"validation.loss.sigmas\[1\] must be in \(0, 1\]"),
                                ({"loss_cache": str(val_cache), "every": 2, "loss_samples": 0}, r"validation.loss.samples must be >= 1")]:
        with pytest.raises(HvctlError, match=message):
            check_paths(load_recipe(TrainRecipe, None, values={**base, "validation": validation}))
    with pytest.raises(HvctlError, match="not for a VAE or i2v run"):
        check_paths(load_recipe(TrainRecipe, None, values={**base, "i2v": "token_replace",
                                                           "validation": {"loss_cache": str(val_cache), "every": 2}}))
