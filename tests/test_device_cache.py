"""data.preload: the cache stacked on the device gives the per-sample loader's batches exactly,
so training and resuming reach the same weights; a cache too large for the device is refused."""

import pytest
import torch
from safetensors.torch import load_file

from hvctl.cache import LatentCache
from hvctl.data.batching import collate
from hvctl.data.device_cache import PreloadedCache, estimate_bytes
from hvctl.encode import EncodeRecipe, encode
from hvctl.errors import HvctlError
from hvctl.recipe import load_recipe
from hvctl.toy.render import render_dataset
from hvctl.train.config import TrainRecipe
from hvctl.train.trainer import Trainer, train


@pytest.fixture(scope="module")
def toy_cache(tmp_path_factory, tiny_model):
    root = tmp_path_factory.mktemp("preload-data")
    render_dataset(root / "data", videos=4, images=4, seed=5, split="train", sizes=[(32, 32)])
    encode(EncodeRecipe(manifest=root / "data" / "manifest.jsonl", out=root / "cache", model=tiny_model,
                        aspect_buckets=[(32, 32)], frame_buckets=[5, 9], caption_variants=3), progress=False)
    return root / "cache"


def recipe_file(path, model, cache, out, preload="none"):
    path.write_text("\n".join([
        "kind: train", "target: dit", f"model: {model}", f"out: {out}", "steps: 3", "seed: 3", "ema_decay: 0",
        "optim:", "  lr: 0.001", "  grad_accumulation: 2", "data:", f"  cache: {cache}", "  batch_size: 2",
        "  empty_prompt_rate: 0.5", f"  preload: {preload}", "checkpoint:", "  every: 2", "  keep_last: 1"]) + "\n")
    return path


def assert_same_batch(a: dict, b: dict):
    assert a.keys() == b.keys()
    for k in a:
        if isinstance(a[k], torch.Tensor):
            assert a[k].dtype == b[k].dtype and torch.equal(a[k], b[k]), k
        else:
            assert a[k] == b[k], k


@pytest.mark.parametrize("text_len", [None, 3])  # 3: every caption truncated
def test_a_gather_is_the_collated_batch(toy_cache, text_len):
    cache = LatentCache(toy_cache, text_len=text_len or 64)
    preloaded = PreloadedCache(cache, list(range(len(cache))), "cpu")
    assert preloaded.buckets and len(preloaded.where) == len(cache)
    stored = sum(t.numel() * t.element_size() for b in preloaded.buckets.values()
                 for t in (b.latent_mean, b.latent_std, b.loss_mask, b.text, b.text_tokens, b.pooled))
    assert estimate_bytes(cache, list(range(len(cache)))) == stored  # the fit check's estimate is exact
    for indices in cache.buckets.values():
        for variants in ([0] * len(indices), list(range(5, 5 + len(indices))), [2**29 + 7] * len(indices)):
            expected = collate([cache.item(i, v) for i, v in zip(indices, variants)])
            assert_same_batch(preloaded.batch(indices, variants), expected)
        # one sample, drawn twice in a batch, in another order
        pair = [indices[-1], indices[0], indices[-1]]
        assert_same_batch(preloaded.batch(pair, [1, 2, 4]), collate([cache.item(i, v) for i, v in zip(pair, [1, 2, 4])]))


@pytest.mark.slow
def test_preloaded_training_has_the_same_batches_and_weights(tiny_model, toy_cache, tmp_path):
    runs = {}
    for mode in ("none", "cpu", "device"):  # device: the CPU here
        recipe = load_recipe(TrainRecipe, recipe_file(tmp_path / f"{mode}.yaml", tiny_model, toy_cache, tmp_path / mode, mode))
        trainer = Trainer(recipe, progress=False)
        assert (trainer.spec.preloaded is None) == (mode == "none")
        batches, micro_batch = [], trainer.micro_batch

        def recorded(indices, j, micro_batch=micro_batch, batches=batches):
            batch = micro_batch(indices, j)
            batches.append({k: v.clone() if isinstance(v, torch.Tensor) else v for k, v in batch[0].items()})
            return batch

        trainer.micro_batch = recorded
        trainer.train()
        runs[mode] = (batches, {k: v.detach().clone() for k, v in trainer.model.state_dict().items()})
    for mode in ("cpu", "device"):
        assert len(runs[mode][0]) == len(runs["none"][0]) == 3 * 2  # steps x accumulation
        for a, b in zip(runs[mode][0], runs["none"][0]):
            assert_same_batch(a, b)
        weights, expected = runs[mode][1], runs["none"][1]
        assert all(torch.equal(weights[k], expected[k]) for k in expected)


@pytest.mark.slow
def test_a_preloaded_run_resumes_exactly(tiny_model, toy_cache, tmp_path):
    straight = recipe_file(tmp_path / "a.yaml", tiny_model, toy_cache, tmp_path / "straight", "none")
    train(load_recipe(TrainRecipe, straight), progress=False)
    stopped = recipe_file(tmp_path / "b.yaml", tiny_model, toy_cache, tmp_path / "stopped", "device")
    train(load_recipe(TrainRecipe, stopped, ["steps=2"]), progress=False)
    report = train(load_recipe(TrainRecipe, stopped), progress=False)
    assert report["resumed_from"] == 2
    read = lambda run: load_file(str(run / "model" / "transformer" / "diffusion_pytorch_model.safetensors"))  # noqa: E731
    a, b = read(tmp_path / "straight"), read(tmp_path / "stopped")
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def test_a_cache_larger_than_the_free_memory_is_refused(tiny_model, toy_cache, tmp_path, monkeypatch):
    import hvctl.data.device_cache as device_cache

    monkeypatch.setattr(device_cache, "free_bytes", lambda device: 1000)
    recipe = load_recipe(TrainRecipe, recipe_file(tmp_path / "r.yaml", tiny_model, toy_cache, tmp_path / "run", "device"))
    with pytest.raises(HvctlError, match=r"data.preload: the cache's \d+ samples need .* GiB free") as e:
        Trainer(recipe, progress=False)
    assert "\n" not in str(e.value)
    with pytest.raises(HvctlError, match="preload"):
        load_recipe(TrainRecipe, recipe_file(tmp_path / "w.yaml", tiny_model, toy_cache, tmp_path / "w", "gpu"))


@pytest.mark.parametrize("preload", ["none", "cpu"])
def test_short_caption_rate_trains_that_share_on_the_short_description(tiny_model, toy_cache, tmp_path, preload):
    cache = LatentCache(toy_cache)

    def shares(rate):
        path = recipe_file(tmp_path / f"{rate}.yaml", tiny_model, toy_cache, tmp_path / f"run-{rate}", preload)
        trainer = Trainer(load_recipe(TrainRecipe, path, [f"data.short_caption_rate={rate}"]), progress=False)
        generator = torch.Generator().manual_seed(0)
        short = total = 0
        for _ in range(30):
            for indices in cache.buckets.values():
                pooled = trainer.spec.batch(trainer, indices, generator)["pooled"]
                first = torch.stack([cache.item(i, 0)["pooled"] for i in indices])
                short += int((pooled == first).all(dim=1).sum())
                total += len(indices)
        return short / total

    assert shares(1.0) == 1.0
    assert 0.2 < shares("null") < 0.5  # one variant in three
    assert 0.55 < shares(0.5) < 0.8  # a half, and a third of the other half
