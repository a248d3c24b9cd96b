"""Post-training (Seaweed): task mixing for i2v models, SFT on the best samples, DPO runs."""

import hashlib
import json

import pytest
import torch
from safetensors.torch import load_file

from conftest import run_cli, small_cache
from hvctl.i2v import ImageCondition, check_task_ratio, draw_task, expand_for_i2v, training_condition
from hvctl.data.manifest import ManifestRecord, read_manifest, write_manifest
from hvctl.data.select import SelectConfig, select_ids
from hvctl.errors import HvctlError
from hvctl.recipe import load_recipe
from hvctl.train.config import TrainRecipe
from hvctl.train.trainer import train


def _micro_batch_generator(seed, step, j):  # how the trainer seeds micro-batch j of a step
    digest = hashlib.sha256(f"{seed}/{step}/{j}".encode()).digest()
    return torch.Generator().manual_seed(int.from_bytes(digest[:8], "little") >> 1)


def test_task_draws_keep_the_ratio():
    shares = {"t2v": 0.8, "i2v": 0.2, "v2v": 0.0}
    tasks = [draw_task(shares, _micro_batch_generator(0, step, j)) for step in range(1000) for j in range(2)]
    assert abs(tasks.count("t2v") / len(tasks) - 0.8) < 0.03 and "v2v" not in tasks
    assert tasks[:50] == [draw_task(shares, _micro_batch_generator(0, s, j)) for s in range(25) for j in range(2)]


class _Config:
    def __init__(self, kind):
        self.image_condition_type = kind


class _Model:
    def __init__(self, kind):
        self.config = _Config(kind)


def test_task_ratio_is_checked_against_the_model():
    assert check_task_ratio({"t2v": 4, "i2v": 1}, _Model("latent_concat")) == {"t2v": 0.8, "i2v": 0.2, "v2v": 0.0}
    with pytest.raises(HvctlError, match="unknown task t2i"):
        check_task_ratio({"t2i": 1}, _Model("latent_concat"))
    with pytest.raises(HvctlError, match="positive sum"):
        check_task_ratio({"t2v": 0, "i2v": 0}, _Model("latent_concat"))
    with pytest.raises(HvctlError, match="needs an image-to-video model"):
        check_task_ratio({"t2v": 1}, _Model(None))
    with pytest.raises(HvctlError, match="token_replace"):
        check_task_ratio({"t2v": 0.8, "i2v": 0.2}, _Model("token_replace"))


def test_each_task_gives_its_frames():
    x0 = torch.randn(2, 4, 5, 2, 2)
    model = _Model("latent_concat")
    inputs = {task: training_condition(model, x0, task).model_input(torch.zeros_like(x0)) for task in ("t2v", "i2v", "v2v")}
    given = {task: int(x[:, -1].amax(dim=(0, 2, 3)).sum()) for task, x in inputs.items()}  # frames the mask marks
    assert given == {"t2v": 0, "i2v": 1, "v2v": 2}
    assert inputs["t2v"][:, 4:8].abs().sum() == 0  # no image at all
    assert torch.equal(inputs["v2v"][:, 4:8, :2], x0[:, :, :2]) and inputs["v2v"][:, 4:8, 2:].abs().sum() == 0
    assert ImageCondition("token_replace", x0[:, :, :1]).loss_mask(x0)[:, :, 0].sum() == 0


def test_select_keeps_the_best_by_a_numeric_field():
    records = [ManifestRecord(id=f"s{i}", media="m.mp4", kind="video", width=32, height=32, frames=5, fps=8.0,
                              extra={"curate": {"clarity": c}} if c is not None else {})
               for i, c in enumerate([10.0, 50.0, None, 30.0, 20.0])]
    assert select_ids(records, SelectConfig(field="curate.clarity", top=2)) == ["s1", "s3"]
    assert select_ids(records, SelectConfig(field="curate.clarity", min=15, max=40)) == ["s3", "s4"]
    with pytest.raises(HvctlError, match="no sample has a curate.motion"):
        select_ids(records, SelectConfig(field="curate.motion"))
    records[0].extra["curate"]["clarity"] = "sharp"
    with pytest.raises(HvctlError, match="record s0: curate.clarity is 'sharp'"):
        select_ids(records, SelectConfig(field="curate.clarity"))


@pytest.fixture(scope="module")
def videos(tmp_path_factory, tiny_model):
    root = tmp_path_factory.mktemp("post-training")
    small_cache(root, tiny_model, videos=4, images=0, seed=7, frames=9)
    return root


def _recipe(path, text):
    path.write_text(text)
    return load_recipe(TrainRecipe, path)


def test_task_mixing_keeps_its_draws_over_a_resumed_run(tiny_model, videos, tmp_path):
    text = (f"kind: train\nmodel: {tiny_model}\ni2v: latent_concat\nsteps: 2\nseed: 1\nlog_every: 1\ntensorboard: false\n"
            "optim: {lr: 0.001, grad_accumulation: 3}\ncheckpoint: {every: 1}\n"
            f"data: {{cache: {videos / 'cache'}, batch_size: 1, media: [video], task_ratio: {{t2v: 0.5, i2v: 0.25, v2v: 0.25}}}}\n")
    straight = train(_recipe(tmp_path / "a.yaml", text + f"out: {tmp_path / 'a'}\n"), progress=False)
    stopped = _recipe(tmp_path / "b.yaml", text + f"out: {tmp_path / 'b'}\n")
    stopped.steps = 1
    train(stopped, progress=False)
    resumed = train(_recipe(tmp_path / "b.yaml", text + f"out: {tmp_path / 'b'}\n"), progress=False)
    assert straight["steps"] == resumed["steps"] == 2 and resumed["resumed_from"] == 1
    tasks = lambda run: [{k: v for k, v in json.loads(line).items() if k.startswith("task_")}  # noqa: E731
                         for line in (run / "metrics.jsonl").read_text().splitlines()]
    assert tasks(tmp_path / "a") == tasks(tmp_path / "b") and len(tasks(tmp_path / "a")) == 2
    assert sum(row["task_t2v"] for row in tasks(tmp_path / "a")) > 0  # t2v micro-batches were drawn
    a = load_file(str(tmp_path / "a" / "model" / "transformer" / "diffusion_pytorch_model.safetensors"))
    b = load_file(str(tmp_path / "b" / "model" / "transformer" / "diffusion_pytorch_model.safetensors"))
    assert all(torch.equal(a[k], b[k]) for k in a)


def test_sft_trains_on_the_selected_samples_only(tiny_model, videos, tmp_path):
    records = read_manifest(videos / "data" / "manifest.jsonl")
    for i, rec in enumerate(records):
        rec.extra["aesthetic"] = float(i)
    manifest = videos / "data" / "scored.jsonl"
    write_manifest(manifest, records)
    from hvctl.train.trainer import Trainer

    r = _recipe(tmp_path / "sft.yaml", f"kind: train\nmodel: {tiny_model}\nout: {tmp_path / 'sft'}\nsteps: 1\n"
                f"data: {{cache: {videos / 'cache'}, manifest: {manifest}, batch_size: 2, select: {{field: aesthetic, top: 2}}}}\n")
    trainer = Trainer(r, progress=False)
    assert sorted(e.id for e in trainer.dataset.entries) == sorted(rec.id for rec in records[-2:])


def test_a_dpo_run_makes_one_round_over_the_pairs(tiny_model, videos, tmp_path):
    records = read_manifest(videos / "data" / "manifest.jsonl")
    for i, rec in enumerate(records):  # two pairs: (0 chosen, 1 rejected), (2, 3); all under one prompt each
        rec.extra["preference"] = {"pair": f"p{i // 2}", "role": "chosen" if i % 2 == 0 else "rejected"}
    manifest = videos / "data" / "pairs.jsonl"
    write_manifest(manifest, records)
    text = (f"kind: train\nmodel: {tiny_model}\nout: {tmp_path / 'dpo'}\nsteps: 50\nlog_every: 1\ntensorboard: false\n"
            "lora: {rank: 2, alpha: 2}\ndpo: {beta: 1000}\noptim: {lr: 0.01}\n"
            f"data: {{cache: {videos / 'cache'}, manifest: {manifest}, batch_size: 1, empty_prompt_rate: 0}}\n")
    result = train(_recipe(tmp_path / "dpo.yaml", text), progress=False)
    assert result["steps"] == 2  # rounds: 1 -> each of the 2 pairs once, whatever `steps` says
    rows = [json.loads(line) for line in (tmp_path / "dpo" / "metrics.jsonl").read_text().splitlines()]
    assert rows[0]["margin"] == 0.0  # a fresh adapter: the model is the reference
    assert {"margin", "reward_accuracy", "chosen_err", "rejected_err"} <= rows[-1].keys()
    assert (tmp_path / "dpo" / "lora" / "pytorch_lora_weights.safetensors").is_file()


def test_dpo_needs_pairs(tiny_model, videos, tmp_path):
    r = _recipe(tmp_path / "dpo.yaml", f"kind: train\nmodel: {tiny_model}\nout: {tmp_path / 'x'}\ndpo: {{beta: 10}}\n"
                f"data: {{cache: {videos / 'cache'}, manifest: {videos / 'data' / 'manifest.jsonl'}, batch_size: 1}}\n")
    with pytest.raises(HvctlError, match="no preference pairs"):
        train(r, progress=False)


def test_a_latent_concat_model_without_an_image_generates_text_to_video(tiny_model, tmp_path):
    """The zero image and mask that t2v micro-batches train with; a fresh latent_concat model (zero
    weights on them) then samples exactly what its text-to-video parent does."""
    from hvctl.generate import GenerateRecipe, TextToVideo, prepare
    from hvctl.models.loading import resolve_device_dtype

    latents = {}
    for name, model in (("t2v", tiny_model), ("i2v", tmp_path / "lc")):
        if name == "i2v":
            done = run_cli("model", "compose", tiny_model, model, "--i2v", "latent_concat", "--json")
            assert done.returncode == 0, done.stderr
        r, model_dir = prepare(GenerateRecipe(prompt="a red circle moves left on a black background", model=model, steps=2,
                                              frames=5, height=32, width=32, seed=1, dtype="float32"))
        t2v = TextToVideo(model_dir, r, *resolve_device_dtype(r.device, r.dtype))
        latents[name] = t2v.latents([1])
    assert torch.allclose(latents["t2v"], latents["i2v"], atol=1e-5)
