"""`hvctl distill`: a guidance-embedded student learns the teacher's classifier-free-guided velocity."""

import json

import pytest
import torch

from conftest import run_cli, small_cache
from hvctl.errors import HvctlError
from hvctl.recipe import load_recipe
from hvctl.train.distill import DistillRecipe
from hvctl.train.trainer import Trainer


@pytest.fixture(scope="module")
def cache(tmp_path_factory, tiny_model):
    return small_cache(tmp_path_factory.mktemp("distill-data"), tiny_model, videos=4, images=4, seed=6)


def write_recipe(path, teacher, cache, out, steps=4):
    path.write_text("\n".join([
        "kind: distill", f"teacher: {teacher}", f"out: {out}", f"steps: {steps}", "seed: 1", "log_every: 1",
        "guidance_range: [2.0, 6.0]", "optim:", "  lr: 0.001", "data:", f"  cache: {cache}", "  batch_size: 2",
        "checkpoint:", "  every: 2", "  keep_last: 1",
    ]) + "\n")
    return path


def test_the_student_starts_as_the_teachers_conditional_pass(tiny_model, cache, tmp_path):
    trainer = Trainer(load_recipe(DistillRecipe, write_recipe(tmp_path / "r.yaml", tiny_model, cache, tmp_path / "run")),
                      progress=False)
    assert trainer.model.config.guidance_embeds and not trainer.teacher.config.guidance_embeds
    batch, generator, _ = trainer.micro_batch(next(trainer.sampler), 0)
    b = trainer.objective.noised(batch, generator)
    with torch.no_grad():
        student = trainer.objective.predict(trainer.model, b["x0"], b["noise"], b["sigma"], b["text"],
                                            torch.tensor([2.0, 5.0]))
        teacher = trainer.objective.predict(trainer.teacher, b["x0"], b["noise"], b["sigma"], b["text"])
    assert torch.allclose(student, teacher, atol=1e-5)  # the zero-initialised embedder adds nothing yet


def test_the_target_is_the_teachers_guided_velocity(tiny_model, cache, tmp_path):
    """The loss, recomputed by hand from the same random draws: the target is v_u + w (v_c - v_u)
    with w uniform in guidance_range, and the fresh student predicts v_c."""
    trainer = Trainer(load_recipe(DistillRecipe, write_recipe(tmp_path / "r.yaml", tiny_model, cache, tmp_path / "run")),
                      progress=False)
    batch, _, _ = trainer.micro_batch(next(trainer.sampler), 0)
    objective = trainer.objective
    loss, logs = objective(trainer.model, batch, torch.Generator().manual_seed(5))
    # Recompute by hand from the same draws.
    g = torch.Generator().manual_seed(5)
    b = objective.noised(batch, g)
    scale = 2.0 + 4.0 * torch.rand(2, generator=g)
    e = objective.empty_text
    empty = (e["text_states"].float().expand(2, -1, -1), e["text_mask"].expand(2, -1), e["pooled"].float().expand(2, -1))
    with torch.no_grad():
        v_c = objective.predict(trainer.teacher, b["x0"], b["noise"], b["sigma"], b["text"])
        v_u = objective.predict(trainer.teacher, b["x0"], b["noise"], b["sigma"], empty)
    # The student equals v_c now, so the loss is the squared distance from v_c to the guided target.
    expected = ((v_c - (v_u + scale.view(2, 1, 1, 1, 1) * (v_c - v_u))) ** 2).mean()
    assert abs(loss.item() - expected.item()) < 1e-5 * max(1.0, expected.item()) and expected.item() > 1e-6
    assert abs(logs["guidance_mean"] - scale.mean().item()) < 1e-6


@pytest.mark.slow
def test_distill_writes_a_student_that_generate_and_diffusers_load(tiny_model, cache, tmp_path):
    from diffusers import HunyuanVideoPipeline

    run = tmp_path / "run"
    result = run_cli("distill", write_recipe(tmp_path / "r.yaml", tiny_model, cache, run), "--set", "student_guidance=4.5",
                     "--json")
    assert result.returncode == 0, result.stderr
    assert json.loads(result.stdout)["steps"] == 4
    pipe = HunyuanVideoPipeline.from_pretrained(run / "model")
    assert pipe.transformer.config.guidance_embeds
    generation = json.loads((run / "model" / "hvctl.json").read_text())["generation"]
    assert generation["guidance_scale"] == 1.0 and generation["embedded_guidance"] == 4.5
    assert json.loads((tiny_model / "hvctl.json").read_text())["generation"]["embedded_guidance"] is None  # teacher untouched
    gen = run_cli("generate", "a red circle moves left on a black background", "--model", run / "model", "--steps", 2,
                  "--frames", 5, "--height", 32, "--width", 32, "--seed", 0, "-o", tmp_path / "v.mp4", "--json")
    assert gen.returncode == 0, gen.stderr
    assert json.loads(gen.stdout)["settings"]["embedded_guidance"] == 4.5


@pytest.mark.parametrize("teacher_scale, student_guidance, embedded", [(3.0, None, 3.0), (1.0, None, 6.0), (3.0, 5.0, 5.0)])
def test_the_students_default_guidance(tmp_path, teacher_scale, student_guidance, embedded):
    """Unless the recipe says otherwise, the student embeds the teacher's CFG scale, or the
    official 6 for a teacher run without CFG; it always runs one pass."""
    from hvctl.train.distill import embed_guidance_defaults

    (tmp_path / "hvctl.json").write_text(json.dumps({"generation": {"guidance_scale": teacher_scale, "steps": 30}}))
    embed_guidance_defaults(tmp_path, student_guidance)
    generation = json.loads((tmp_path / "hvctl.json").read_text())["generation"]
    assert generation == {"guidance_scale": 1.0, "embedded_guidance": embedded, "steps": 30}


def test_a_guidance_embedded_teacher_is_refused(tiny_guided_model, cache, tmp_path):
    r = load_recipe(DistillRecipe, write_recipe(tmp_path / "r.yaml", tiny_guided_model, cache, tmp_path / "run"))
    with pytest.raises(HvctlError, match="already embeds guidance"):
        Trainer(r)
