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


@pytest.mark.slow
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


@pytest.mark.slow
def test_a_checkpoint_is_a_model_folder_diffusers_loads(tiny_model, toy_cache, tmp_path):
    from diffusers import HunyuanVideoPipeline

    r = load_recipe(TrainRecipe, write_recipe(tmp_path / "c.yaml", tiny_model, toy_cache, tmp_path / "run"), ["steps=2"])
    train(r, progress=False)
    pipe = HunyuanVideoPipeline.from_pretrained(tmp_path / "run" / "checkpoints" / "step-00000002" / "model")
    assert pipe.transformer.config.num_layers == 2
    gen = run_cli("generate", "a red circle moves left on a black background", "--model", tmp_path / "run" / "model",
                  "--steps", 2, "--frames", 5, "--height", 32, "--width", 32, "--seed", 0, "-o", tmp_path / "v.mp4")
    assert gen.returncode == 0, gen.stderr


@pytest.mark.slow
def test_nan_loss_stops_with_one_line(tiny_model, toy_cache, tmp_path):
    r = load_recipe(TrainRecipe, write_recipe(tmp_path / "d.yaml", tiny_model, toy_cache, tmp_path / "run"))
    trainer = Trainer(r, progress=False)
    with torch.no_grad():
        next(trainer.model.parameters()).fill_(float("nan"))
    with pytest.raises(HvctlError, match=r"step 1: the loss is nan"):
        trainer.train()


@pytest.mark.slow
def test_train_recipe_errors(tiny_model, toy_cache, tmp_path):
    bad = tmp_path / "bad.yaml"
    bad.write_text("kind: train\noptim:\n  lr: fast\n")
    result = run_cli("train", bad)
    assert result.returncode != 0 and "optim.lr" in result.stderr and len(result.stderr.strip().splitlines()) == 1
    r = TrainRecipe(model=tiny_model, out=tmp_path / "x")
    with pytest.raises(HvctlError, match="data.cache or data.manifest"):
        Trainer(r)
    recipe = write_recipe(tmp_path / "p.yaml", tiny_model, toy_cache, tmp_path / "p")
    for setting, message in [("parallel.fsdp=2", "need that many processes"), ("parallel.cpu_offload=true", "on the CPU already")]:
        result = run_cli("train", recipe, "--set", setting)
        assert result.returncode == 1 and message in result.stderr and len(result.stderr.strip().splitlines()) == 1, setting


@pytest.fixture(scope="module")
def single_process_run(tiny_model, toy_cache, tmp_path_factory):
    """4 steps in one process, accumulating 2 micro-batches a step."""
    root = tmp_path_factory.mktemp("single")
    assert run_cli("train", write_recipe(root / "s.yaml", tiny_model, toy_cache, root / "run")).returncode == 0
    return root / "run"


@pytest.mark.slow
@pytest.mark.parametrize("settings", [
    ["optim.grad_accumulation=1"],  # data parallel: rank r takes micro-batch r
    ["optim.grad_accumulation=1", "parallel.fsdp=2"],  # sharded: still one micro-batch per rank
    ["parallel.ulysses=2"],  # sequence parallel: both ranks take the same micro-batches
    ["parallel.ring=2"],
    ["optim.grad_accumulation=1", "parallel.balance=true"],  # micro-batches handed out by estimated cost
], ids=["data", "fsdp", "ulysses", "ring", "balanced"])
def test_two_processes_reach_the_single_process_weights(settings, single_process_run, tiny_model, toy_cache, tmp_path):
    """torchrun (gloo, 2 ranks) sees the same micro-batches and randomness as one process, so each
    parallel mode reaches the same weights and logs the same loss curve."""
    double = tmp_path / "double"
    recipe = write_recipe(tmp_path / "d.yaml", tiny_model, toy_cache, double)
    result = run_cli("train", recipe, "--nproc", "2", *[a for s in settings for a in ("--set", s)], "--json")
    assert result.returncode == 0, result.stderr
    report = json.loads(result.stdout)  # printed once, by rank 0
    assert report["processes"] == 2 and report["steps"] == 4
    a, b = final_weights(single_process_run), final_weights(double)
    start = load_file(str(tiny_model / "transformer" / "diffusion_pytorch_model.safetensors"))
    moved = max((a[k] - start[k]).abs().max().item() for k in a)
    assert moved > 1e-4, "training changed the weights"
    # Sums in another order (Ulysses' all-to-all, ring attention's blocks) leave ~1e-5 after four
    # Adam steps; a wrong micro-batch or a missed gradient leaves a step's size, ~1e-3.
    assert max((a[k] - b[k]).abs().max().item() for k in a) < 3e-5, moved
    curve = lambda run: [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]  # noqa: E731
    single, logged = curve(single_process_run), curve(double)
    assert [m["step"] for m in logged] == [1, 2, 3, 4]  # one writer
    assert all(abs(x["loss"] - y["loss"]) < 1e-5 for x, y in zip(single, logged))


@pytest.mark.slow
def test_a_failing_rank_is_one_line(tiny_model, toy_cache, tmp_path):
    recipe = write_recipe(tmp_path / "f.yaml", tiny_model, toy_cache, tmp_path / "run")
    result = run_cli("train", recipe, "--nproc", "2", "--set", "data.batch_size=64")
    assert result.returncode == 1
    assert "Traceback" not in result.stderr
    assert result.stderr.strip().splitlines()[-1].startswith("error: rank ")


def test_a_stage_trains_on_its_own_buckets_and_media(tiny_model, toy_cache, tmp_path):
    recipe = write_recipe(tmp_path / "e.yaml", tiny_model, toy_cache, tmp_path / "run")
    images = Trainer(load_recipe(TrainRecipe, recipe, ["data.media=[image]"]), progress=False)
    assert set(images.sampler.streams) == {"image"}
    videos = Trainer(load_recipe(TrainRecipe, recipe, ["data.media=[video]", "data.frame_buckets=[9]"]), progress=False)
    assert set(videos.sampler.streams) == {"video"}
    assert all(b[2] == 9 for b in videos.sampler.streams["video"])
    for wrong in ("data.aspect_buckets=[[64, 64]]", "data.frame_buckets=[5]"):  # the cache holds 32x32, 9 frames
        with pytest.raises(HvctlError, match="among this stage's buckets"):
            Trainer(load_recipe(TrainRecipe, recipe, ["data.media=[video]", wrong]), progress=False)


@pytest.mark.slow
def test_trainable_prefixes_freeze_the_rest(tiny_model, toy_cache, tmp_path):
    recipe = write_recipe(tmp_path / "t.yaml", tiny_model, toy_cache, tmp_path / "run")
    train(load_recipe(TrainRecipe, recipe, ["trainable=[proj_out, norm_out]", "steps=2", "ema_decay=0"]), progress=False)
    start = load_file(str(tiny_model / "transformer" / "diffusion_pytorch_model.safetensors"))
    trained = final_weights(tmp_path / "run")
    changed = {k for k in start if not torch.equal(start[k], trained[k])}
    assert changed and all(k.startswith(("proj_out.", "norm_out.")) for k in changed)
    with pytest.raises(HvctlError, match="names no parameters"):
        Trainer(load_recipe(TrainRecipe, recipe, ["trainable=[decoder]"]), progress=False)


def test_reinit_starts_from_a_fresh_transformer(tiny_model, toy_cache, tmp_path):
    recipe = write_recipe(tmp_path / "r.yaml", tiny_model, toy_cache, tmp_path / "run")
    fresh = Trainer(load_recipe(TrainRecipe, recipe, ["reinit=true", "seed=11"]), progress=False).model.state_dict()
    again = Trainer(load_recipe(TrainRecipe, recipe, ["reinit=true", "seed=11", f"out={tmp_path / 'run2'}"]),
                    progress=False).model.state_dict()
    start = load_file(str(tiny_model / "transformer" / "diffusion_pytorch_model.safetensors"))
    key = "proj_out.weight"
    assert torch.equal(fresh[key], again[key]) and not torch.equal(fresh[key], start[key])


def test_reinit_can_start_the_transformer_as_adaln_zero(tiny_model, toy_cache, tmp_path):
    recipe = write_recipe(tmp_path / "z.yaml", tiny_model, toy_cache, tmp_path / "run")
    fresh = Trainer(load_recipe(TrainRecipe, recipe, ["reinit=true", "dit_init=adaln-zero"]), progress=False).model
    for name in ["proj_out.weight", "transformer_blocks.0.norm1.linear.weight", "single_transformer_blocks.0.norm.linear.weight"]:
        assert torch.count_nonzero(fresh.get_parameter(name)) == 0, name
    assert torch.count_nonzero(fresh.get_parameter("transformer_blocks.0.attn.to_q.weight")) > 0


def test_the_ema_starts_from_the_trained_weights_and_ramps_its_decay_up():
    from hvctl.train.trainer import EMA

    module = torch.nn.Linear(2, 2)
    ema = EMA(module, 0.999)
    start = module.weight.detach().clone()
    with torch.no_grad():
        module.weight.add_(1.0)
    ema.update(module, 0)  # the first update copies: no trace of the (random) starting weights
    assert torch.equal(ema.shadow["weight"], module.weight.detach())
    with torch.no_grad():
        module.weight.add_(1.0)
    ema.update(module, 1)  # then the decay ramps up as diffusers' EMAModel's, (1 + t) / (10 + t)
    assert torch.allclose(ema.shadow["weight"], start + 1 + (1 - 2 / 11))
    assert ema.decay_at(100) == pytest.approx(101 / 110) and ema.decay_at(100_000) == 0.999


def test_schedule_steps_sets_the_decay_length():
    from hvctl.train.trainer import lr_factor

    r = TrainRecipe(steps=500)
    r.optim.schedule, r.optim.warmup_steps = "linear", 0
    assert lr_factor(250, r) == pytest.approx(0.5)
    r.optim.schedule_steps = 1000  # a run stopped early keeps the longer schedule
    assert lr_factor(250, r) == pytest.approx(0.75)


def test_masked_text_padding_does_not_change_the_dit(tiny_model):
    """The objective trims text padding to the batch's longest caption; that is exact only because
    the DiT masks padded text tokens out of attention."""
    from hvctl.models.loading import ModelFolder, load_component

    dit = load_component(ModelFolder.open(tiny_model), "transformer", dtype=torch.float32)
    g = torch.Generator().manual_seed(0)
    latents = torch.randn(2, 16, 2, 4, 4, generator=g)
    text = torch.randn(2, 40, 64, generator=g)
    mask = torch.zeros(2, 40, dtype=torch.long)
    mask[0, :9], mask[1, :13] = 1, 1
    call = lambda states, m: dit(hidden_states=latents, timestep=torch.tensor([500.0, 200.0]),  # noqa: E731
                                 encoder_hidden_states=states, encoder_attention_mask=m,
                                 pooled_projections=torch.randn(2, 32, generator=torch.Generator().manual_seed(1)),
                                 return_dict=False)[0]
    with torch.no_grad():
        padded, trimmed = call(text, mask), call(text[:, :13], mask[:, :13])
    assert (padded - trimmed).abs().max() < 1e-5
    with torch.no_grad():  # and the padding really is ignored: changing it changes nothing
        text[:, 20:] = 100.0
        assert (call(text, mask) - padded).abs().max() < 1e-5


@pytest.mark.slow
def test_vae_export_calibrates_the_latent_scale(tiny_model, tmp_path):
    """With calibrate_scaling_factor the exported VAE's latents, times its scaling factor, have unit std."""
    from hvctl.models.loading import ModelFolder, load_component
    from hvctl.models.vae import encode_posterior
    from hvctl.toy.world import render, sample_spec

    data = tmp_path / "data"
    render_dataset(data, videos=2, images=2, seed=2, split="train", sizes=[(32, 32)])
    r = TrainRecipe(target="vae", model=tiny_model, out=tmp_path / "run", steps=1, calibrate_scaling_factor=True,
                    tensorboard=False)
    r.data.manifest, r.data.batch_size = data / "manifest.jsonl", 2
    r.data.aspect_buckets, r.data.frame_buckets = [(32, 32)], [5]
    train(r, progress=False)
    vae = load_component(ModelFolder.open(tmp_path / "run" / "model"), "vae", dtype=torch.float32)
    assert vae.config.scaling_factor != load_component(ModelFolder.open(tiny_model), "vae").config.scaling_factor
    means = torch.cat([encode_posterior(vae, render(sample_spec(2, i, "train", "video", size=(32, 32), frames=5)))[0].flatten()
                       for i in range(2)])
    assert 0.7 < float(means.std()) < 1.4


@pytest.mark.slow
def test_a_sharded_run_resumes_on_another_process_count(single_process_run, tiny_model, toy_cache, tmp_path):
    """Checkpoints hold each rank's shards (torch.distributed.checkpoint): 2 FSDP ranks stop at
    step 2, one process resumes, and the weights are those of the uninterrupted run."""
    run = tmp_path / "run"
    recipe = write_recipe(tmp_path / "r.yaml", tiny_model, toy_cache, run)
    first = run_cli("train", recipe, "--steps", 2, "--nproc", "2", "--set", "parallel.fsdp=2",
                    "--set", "optim.grad_accumulation=1")
    assert first.returncode == 0, first.stderr
    assert sorted(p.name for p in (run / "checkpoints" / "step-00000002" / "state" / "sharded").iterdir())[:2] == [
        "shard-00001-model-00001-of-00001.safetensors", "shard-00002-model-00001-of-00001.safetensors"]
    second = run_cli("train", recipe, "--json")
    assert second.returncode == 0, second.stderr
    assert json.loads(second.stdout)["resumed_from"] == 2
    a, b = final_weights(single_process_run), final_weights(run)
    assert max((a[k] - b[k]).abs().max().item() for k in a) < 1e-5


@pytest.mark.slow
def test_a_killed_rank_restarts_from_the_last_checkpoint(tiny_model, toy_cache, tmp_path):
    """kill -9 one of 2 FSDP ranks once the first checkpoint exists: with --max-restarts both are
    started again, resume from the last checkpoint, and end with the uninterrupted run's weights."""
    import os
    import signal
    import subprocess
    import sys
    import time

    settings = ["--set", "parallel.fsdp=2", "--set", "optim.grad_accumulation=1", "--set", "steps=12",
                "--set", "checkpoint.every=2", "--set", "checkpoint.keep_last=2"]
    straight = tmp_path / "straight"
    done = run_cli("train", write_recipe(tmp_path / "a.yaml", tiny_model, toy_cache, straight), "--nproc", "2", *settings)
    assert done.returncode == 0, done.stderr

    run = tmp_path / "killed"
    recipe = write_recipe(tmp_path / "b.yaml", tiny_model, toy_cache, run)
    agent = subprocess.Popen([sys.executable, "-m", "hvctl", "train", str(recipe), "--nproc", "2", "--max-restarts", "1",
                              "--json", *settings], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                             env={**os.environ, "CI": "1"})
    deadline = time.time() + 120
    while not (run / "checkpoints" / "step-00000002").exists():
        assert time.time() < deadline and agent.poll() is None, "no checkpoint appeared"
        time.sleep(0.05)
    workers = subprocess.run(["pgrep", "-P", str(agent.pid)], capture_output=True, text=True).stdout.split()
    assert len(workers) == 2
    os.kill(int(workers[1]), signal.SIGKILL)
    out, err = agent.communicate(timeout=240)
    assert agent.returncode == 0, err[-2000:]
    report = json.loads(out)
    assert report["steps"] == 12 and report["resumed_from"] is not None  # the restarted ranks resumed
    a, b = final_weights(straight), final_weights(run)
    assert max((a[k] - b[k]).abs().max().item() for k in a) < 1e-5


@pytest.mark.slow
@pytest.mark.parametrize("settings", [["parallel.activation_checkpointing=1"],
                                      ["parallel.activation_checkpointing=2", "parallel.activation_offload=true"]],
                         ids=["checkpointing", "every-2nd+offload"])
def test_activation_checkpointing_and_offload_change_no_weight(settings, single_process_run, tiny_model, toy_cache,
                                                               tmp_path):
    run = tmp_path / "run"
    result = run_cli("train", write_recipe(tmp_path / "c.yaml", tiny_model, toy_cache, run),
                     *[a for s in settings for a in ("--set", s)])
    assert result.returncode == 0, result.stderr
    a, b = final_weights(single_process_run), final_weights(run)
    assert a.keys() == b.keys() and max((a[k] - b[k]).abs().max().item() for k in a) < 1e-6


def test_activation_checkpointing_wraps_the_chosen_blocks_in_place():
    from hvctl.models.presets import build_components, get_preset
    from hvctl.parallel import _blocks, apply_activation_checkpointing

    model = build_components(get_preset("tiny"))["transformer"]
    keys = list(model.state_dict())
    apply_activation_checkpointing(model, every=2, offload=True)
    wrapped = [getattr(b.forward, "func", None).__name__ for b in _blocks(model)]
    assert wrapped == ["checkpoint", "offloaded", "checkpoint", "offloaded"]
    assert list(model.state_dict()) == keys  # diffusers' keys: the export stays a diffusers folder


def test_each_recipe_gets_its_variants_spec_and_modifiers_compose():
    from hvctl.lora import LoraSettings
    from hvctl.train.config import AvatarSettings
    from hvctl.train.distill import DistillRecipe, DistillSpec
    from hvctl.train.dit import DitSpec, I2vModifier, LoraModifier
    from hvctl.train.specs import spec_for
    from hvctl.train.vae import VaeSpec

    assert type(spec_for(TrainRecipe())) is DitSpec and type(spec_for(TrainRecipe(target="vae"))) is VaeSpec
    assert spec_for(TrainRecipe(avatar=AvatarSettings())).name == "avatar"
    assert isinstance(spec_for(DistillRecipe(teacher="t")), DistillSpec)
    # Modifiers wrap the base variant, LoRA outermost: i2v expands the loaded model before the adapters go on.
    mro = type(spec_for(TrainRecipe(i2v="token_replace", lora=LoraSettings()))).__mro__
    assert mro[:3] == (mro[0], LoraModifier, I2vModifier) and DitSpec in mro
    # DPO is outermost: its reference is the model that i2v and LoRA built.
    from hvctl.train.config import DpoSettings
    from hvctl.train.dpo import DpoModifier

    mro = type(spec_for(TrainRecipe(i2v="latent_concat", lora=LoraSettings(), dpo=DpoSettings()))).__mro__
    assert mro[:4] == (mro[0], DpoModifier, LoraModifier, I2vModifier) and DitSpec in mro
    for recipe, message in [(TrainRecipe(target="vae", lora=LoraSettings()), "lora: trains the DiT"),
                            (TrainRecipe(lora=LoraSettings(), trainable=["x"]), "lora: trains the DiT"),
                            (TrainRecipe(avatar=AvatarSettings(), lora=LoraSettings()), "avatar: trains"),
                            (DistillRecipe(), "distill needs 'teacher'"),
                            (TrainRecipe(avatar=AvatarSettings(), dpo=DpoSettings()), "dpo: trains a text-to-video DiT"),
                            (DistillRecipe(teacher="t", dpo=DpoSettings()), "dpo: trains a text-to-video DiT")]:
        with pytest.raises(HvctlError, match=message):
            spec_for(recipe).check(recipe)
    # The loop names no variant: every difference is the spec's.
    from pathlib import Path

    import hvctl.train.trainer as trainer

    source = Path(trainer.__file__).read_text()
    assert not any(f"r.{key}" in source for key in ("lora", "avatar", "i2v", "teacher", "target", "reinit", "trainable",
                                                    "dpo", "select", "task_ratio"))
