"""`hvctl train`: a resumed run reaches exactly the weights of an uninterrupted one; bad runs fail clearly."""

import json

import pytest
import torch
from safetensors.torch import load_file

from conftest import run_cli
from hvctl.encode import EncodeRecipe, encode
from hvctl.errors import HvctlError
from hvctl.recipe import load_recipe
from hvctl.toy.render import render_dataset
from hvctl.train.config import TrainRecipe
from hvctl.train.trainer import Trainer, train


@pytest.fixture(scope="module")
def toy_cache(tmp_path_factory, tiny_model):
    root = tmp_path_factory.mktemp("train-data")
    render_dataset(root / "data", videos=4, images=4, seed=5, split="train", sizes=[(32, 32)])
    encode(EncodeRecipe(manifest=root / "data" / "manifest.jsonl", out=root / "cache", model=tiny_model,
                        aspect_buckets=[(32, 32)], frame_buckets=[5, 9], caption_variants=2))
    return root


def write_recipe(path, model, cache_root, out, **extra):
    lines = [
        "kind: train", "target: dit", f"model: {model}", f"out: {out}", "steps: 4", "seed: 3", "ema_decay: 0.9",
        "log_every: 1", "optim:", "  lr: 0.001", "  warmup_steps: 2", "  schedule: cosine", "  grad_accumulation: 2",
        "data:", f"  cache: {cache_root / 'cache'}", "  batch_size: 2", "  empty_prompt_rate: 0.5",
        "checkpoint:", "  every: 2", "  keep_last: 1",
    ]
    path.write_text("\n".join(lines + [f"{k}: {v}" for k, v in extra.items()]) + "\n")
    return path


def final_weights(run):
    return load_file(str(run / "model" / "transformer" / "diffusion_pytorch_model.safetensors"))


def test_resume_reaches_the_uninterrupted_weights(tiny_model, toy_cache, tmp_path):
    straight = tmp_path / "straight"
    result = run_cli("train", write_recipe(tmp_path / "a.yaml", tiny_model, toy_cache, straight), "--json")
    assert result.returncode == 0, result.stderr
    report = json.loads(result.stdout)
    assert report["steps"] == 4 and report["resumed_from"] is None

    stopped = tmp_path / "stopped"
    recipe = write_recipe(tmp_path / "b.yaml", tiny_model, toy_cache, stopped)
    first = run_cli("train", recipe, "--steps", 2, "--json")  # stops at step 2, as a killed run would
    assert first.returncode == 0, first.stderr
    second = run_cli("train", recipe, "--json")
    assert second.returncode == 0, second.stderr
    assert json.loads(second.stdout)["resumed_from"] == 2

    a, b = final_weights(straight), final_weights(stopped)
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    start = load_file(str(tiny_model / "transformer" / "diffusion_pytorch_model.safetensors"))
    assert any(not torch.equal(a[k], start[k]) for k in a), "training changed the weights"
    # keep_last: 1 keeps only the newest checkpoint; metrics have a line per step.
    assert [p.name for p in (stopped / "checkpoints").iterdir()] == ["step-00000004"]
    steps = [json.loads(line)["step"] for line in (stopped / "metrics.jsonl").read_text().splitlines()]
    assert steps == [1, 2, 3, 4]


def test_a_checkpoint_is_a_model_folder_diffusers_loads(tiny_model, toy_cache, tmp_path):
    from diffusers import HunyuanVideoPipeline

    r = load_recipe(TrainRecipe, write_recipe(tmp_path / "c.yaml", tiny_model, toy_cache, tmp_path / "run"), ["steps=2"])
    train(r, progress=False)
    pipe = HunyuanVideoPipeline.from_pretrained(tmp_path / "run" / "checkpoints" / "step-00000002" / "model")
    assert pipe.transformer.config.num_layers == 2
    gen = run_cli("generate", "a red circle moves left on a black background", "--model", tmp_path / "run" / "model",
                  "--steps", 2, "--frames", 5, "--height", 32, "--width", 32, "--seed", 0, "-o", tmp_path / "v.mp4")
    assert gen.returncode == 0, gen.stderr


def test_nan_loss_stops_with_one_line(tiny_model, toy_cache, tmp_path):
    r = load_recipe(TrainRecipe, write_recipe(tmp_path / "d.yaml", tiny_model, toy_cache, tmp_path / "run"))
    trainer = Trainer(r, progress=False)
    with torch.no_grad():
        next(trainer.model.parameters()).fill_(float("nan"))
    with pytest.raises(HvctlError, match=r"step 1: the loss is nan"):
        trainer.train()


def test_train_recipe_errors(tiny_model, toy_cache, tmp_path):
    bad = tmp_path / "bad.yaml"
    bad.write_text("kind: train\noptim:\n  lr: fast\n")
    result = run_cli("train", bad)
    assert result.returncode != 0 and "optim.lr" in result.stderr and len(result.stderr.strip().splitlines()) == 1
    r = TrainRecipe(model=tiny_model, out=tmp_path / "x")
    with pytest.raises(HvctlError, match="data.cache or data.manifest"):
        Trainer(r)


def test_two_processes_equal_one_with_twice_the_accumulation(tiny_model, toy_cache, tmp_path):
    """torchrun (gloo, 2 ranks, accumulation 1) takes the same micro-batches and randomness as one
    process accumulating 2, so it reaches the same weights."""
    single = tmp_path / "single"
    assert run_cli("train", write_recipe(tmp_path / "s.yaml", tiny_model, toy_cache, single)).returncode == 0
    double = tmp_path / "double"
    recipe = write_recipe(tmp_path / "d.yaml", tiny_model, toy_cache, double)
    result = run_cli("train", recipe, "--nproc", "2", "--set", "optim.grad_accumulation=1", "--json")
    assert result.returncode == 0, result.stderr
    report = json.loads(result.stdout)  # printed once, by rank 0
    assert report["processes"] == 2 and report["steps"] == 4
    a, b = final_weights(single), final_weights(double)
    assert max((a[k] - b[k]).abs().max().item() for k in a) < 1e-5
    start = load_file(str(tiny_model / "transformer" / "diffusion_pytorch_model.safetensors"))
    assert max((a[k] - start[k]).abs().max().item() for k in a) > 1e-4, "training changed the weights"
    logged = [json.loads(line) for line in (double / "metrics.jsonl").read_text().splitlines()]
    assert [m["step"] for m in logged] == [1, 2, 3, 4]  # one writer


def test_a_failing_rank_is_one_line(tiny_model, toy_cache, tmp_path):
    recipe = write_recipe(tmp_path / "f.yaml", tiny_model, toy_cache, tmp_path / "run")
    result = run_cli("train", recipe, "--nproc", "2", "--set", "data.batch_size=64")
    assert result.returncode == 1
    assert "Traceback" not in result.stderr
    assert result.stderr.strip().splitlines()[-1].startswith("error: rank ")
