"""Step distillation's objective (hvctl/train/distill_steps.py) on tiny models, apart from the trainer."""

import copy
from types import SimpleNamespace

import pytest
import torch

from hvctl.errors import HvctlError
from hvctl.flow import sampling_sigmas
from hvctl.train.distill_steps import StepDistillationObjective, solver_grid, velocity

FLOW = SimpleNamespace(timestep_sampling="uniform", shift=1.0, logit_mean=0.0, logit_std=1.0, stratified=False,
                       loss_weighting="none", guidance=1.0, unmasked_weight=1.0)


def tiny_dit(seed, guidance_embeds=False):
    from diffusers import HunyuanVideoTransformer3DModel

    torch.manual_seed(seed)
    return HunyuanVideoTransformer3DModel(
        in_channels=4, out_channels=4, num_attention_heads=2, attention_head_dim=8, num_layers=1, num_single_layers=1,
        num_refiner_layers=1, mlp_ratio=2.0, patch_size=2, patch_size_t=1, text_embed_dim=16, pooled_projection_dim=8,
        rope_axes_dim=(2, 2, 4), guidance_embeds=guidance_embeds)


def as_student(teacher, guidance_embeds=False):
    """A student holding the teacher's weights (plus a zero-initialised guidance embedding)."""
    if not guidance_embeds:
        return copy.deepcopy(teacher).train().requires_grad_(True)
    student = type(teacher).from_config({**teacher.config, "guidance_embeds": True})
    student.load_state_dict(teacher.state_dict(), strict=False)
    torch.nn.init.zeros_(student.time_text_embed.guidance_embedder.linear_2.weight)
    torch.nn.init.zeros_(student.time_text_embed.guidance_embedder.linear_2.bias)
    return student


def batch(n=2):
    g = torch.Generator().manual_seed(0)
    mask = torch.zeros(n, 6, dtype=torch.long)
    mask[:, :4] = 1
    return {"latent_mean": torch.randn(n, 4, 2, 8, 8, generator=g), "latent_std": torch.zeros(n, 4, 2, 8, 8),
            "text_states": torch.randn(n, 6, 16, generator=g), "text_mask": mask, "pooled": torch.randn(n, 8, generator=g)}


EMPTY = {"text_states": torch.zeros(1, 6, 16), "text_mask": torch.tensor([[1, 0, 0, 0, 0, 0]]), "pooled": torch.zeros(1, 8)}


def objective(teacher, student_steps, teacher_steps, **kw):
    return StepDistillationObjective(FLOW, EMPTY, teacher.eval().requires_grad_(False), edges=sampling_sigmas(student_steps, 3.0),
                                     teacher_sigmas=sampling_sigmas(teacher_steps, 3.0), **kw)


@pytest.mark.parametrize("guidance_embeds", [False, True])
def test_the_loss_is_zero_when_the_student_already_is_its_target(guidance_embeds):
    """A teacher sampled on the student's own schedule takes one Euler step a phase: a student
    equal to it (the new guidance embedding at zero, guidance 1) already makes that step."""
    teacher = tiny_dit(0)
    obj = objective(teacher, 4, 4, guidance_range=(1.0, 1.0) if guidance_embeds else None, phase_start_share=0.5)
    student = as_student(teacher, guidance_embeds)
    for seed in range(3):
        loss, logs = obj(student, batch(), torch.Generator().manual_seed(seed))
        assert loss.item() < 1e-10, loss.item()


def test_the_target_is_the_teachers_guided_run_to_the_phase_edge():
    """One phase (a 1-step student) from pure noise: the target velocity is (x_0 - noise) / (0 - 1),
    x_0 the teacher's 8-step Euler run with classifier-free guidance 3, recomputed here by hand."""
    teacher, student = tiny_dit(0), tiny_dit(1)
    obj = objective(teacher, 1, 8, guidance_range=(3.0, 3.0), phase_start_share=1.0)
    b = batch()
    loss, logs = obj(student, b, torch.Generator().manual_seed(7))
    noise = obj.noised(b, torch.Generator().manual_seed(7))["noise"]  # the same draws as the call's
    text = (b["text_states"], b["text_mask"], b["pooled"])
    empty = (EMPTY["text_states"].expand(2, -1, -1), EMPTY["text_mask"].expand(2, -1), EMPTY["pooled"].expand(2, -1))
    sigmas, x = sampling_sigmas(8, 3.0), noise.clone()
    with torch.no_grad():
        for i in range(8):
            s = sigmas[i].expand(2)
            v_c, v_u = velocity(teacher, x, s, text), velocity(teacher, x, s, empty)
            x = x + (sigmas[i + 1] - sigmas[i]) * (v_u + 3.0 * (v_c - v_u))
        target = (x - noise) / -1.0
        expected = ((velocity(student, noise, torch.ones(2), text) - target) ** 2).mean()
    assert abs(loss.item() - expected.item()) < 1e-5 * expected.item() and logs["sigma_mean"] == 1.0


def test_samples_at_different_points_of_a_phase_each_get_their_own_teacher_run():
    """Samples drawn inside their phases need different numbers of teacher steps; the teacher runs
    on the moving ones only, and each target equals that sample's own guided run, done alone."""
    teacher, student = tiny_dit(0), tiny_dit(1)
    obj = objective(teacher, 2, 8, guidance_range=(3.0, 3.0), phase_start_share=0.0)
    b = batch(4)
    loss, _ = obj(student, b, torch.Generator().manual_seed(3))
    g = torch.Generator().manual_seed(3)  # the call's draws, in its order
    drawn = obj.noised(b, g)
    start, stop, end = obj.draw(4, g)
    assert len(set((stop - start).tolist())) > 1  # the samples really take different numbers of steps
    text = (b["text_states"], b["text_mask"], b["pooled"])
    errors = []
    with torch.no_grad():
        for i in range(4):
            one = tuple(part[i:i + 1] for part in text)
            t, edge = obj.grid[start[i]], obj.grid[end[i]]
            x_t = (1 - t) * drawn["x0"][i:i + 1] + t * drawn["noise"][i:i + 1]
            x = x_t.clone()
            for j in range(int(start[i]), int(stop[i])):
                x = x + (obj.grid[j + 1] - obj.grid[j]) * obj.teacher_velocity(x, obj.grid[j].view(1), one, torch.tensor([3.0]))
            target = (x - x_t) / (edge - t)
            errors.append(((velocity(student, x_t, t.view(1), one) - target) ** 2).mean())
    expected = torch.stack(errors).mean()
    assert abs(loss.item() - expected.item()) < 1e-5 * expected.item()


def test_training_moves_the_student_towards_the_teachers_jumps():
    teacher, student = tiny_dit(0), tiny_dit(1)
    obj = objective(teacher, 2, 8, guidance_range=None, phase_start_share=0.5)
    optimizer = torch.optim.Adam(student.parameters(), lr=1e-2)
    losses = []
    for _ in range(8):
        loss, _ = obj(student, batch(), torch.Generator().manual_seed(0))  # the same draws: one fixed target
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        losses.append(loss.item())
    assert losses[-1] < 0.5 * losses[0], losses


def test_draws_stay_inside_their_phase_and_the_solver_stops_early_when_told():
    teacher = tiny_dit(0)
    obj = objective(teacher, 4, 30, guidance_range=None, phase_start_share=0.3, teacher_solver_steps=2)
    start, stop, end = obj.draw(500, torch.Generator().manual_seed(0))
    edges = obj.grid[end]
    assert set(edges.tolist()) <= set(sampling_sigmas(4, 3.0)[1:].tolist())
    assert (obj.grid[start] > edges).all() and (stop <= end).all() and (stop - start <= 2).all() and (stop > start).all()
    starts = {obj.grid[i].item() for i in obj.edge_index[:-1]}
    share = sum(obj.grid[j].item() in starts for j in start.tolist()) / 500
    assert 0.2 < share < 0.45  # 0.3 at phase starts, plus interior draws that land on none


def test_a_bootstrapped_target_uses_the_students_own_jump():
    """teacher_solver_steps 1 on a grid finer than the student's: the target passes through the
    student's stop-gradient jump, so a student equal to the teacher is not at zero loss, but its
    gradient is the prediction's alone."""
    teacher = tiny_dit(0)
    obj = objective(teacher, 2, 12, guidance_range=None, phase_start_share=1.0, teacher_solver_steps=1)
    student = as_student(teacher)
    loss, _ = obj(student, batch(), torch.Generator().manual_seed(0))
    assert loss.item() > 0 and loss.requires_grad
    full = objective(teacher, 2, 12, guidance_range=None, phase_start_share=1.0)
    assert abs(full(student, batch(), torch.Generator().manual_seed(0))[0].item() - loss.item()) > 1e-9


def test_solver_grid_holds_both_schedules_once():
    grid = solver_grid(sampling_sigmas(4, 3.0), sampling_sigmas(8, 3.0))
    assert grid[0] == 1 and grid[-1] == 0 and (grid[:-1] > grid[1:]).all() and len(grid) <= 13


def test_bad_settings_are_one_line_errors():
    teacher = tiny_dit(0)
    with pytest.raises(HvctlError, match="teacher_solver_steps"):
        objective(teacher, 4, 8, guidance_range=None, teacher_solver_steps=0)
    with pytest.raises(HvctlError, match="phase_start_share"):
        objective(teacher, 4, 8, guidance_range=None, phase_start_share=1.5)


# -- in the trainer: `hvctl distill --mode steps` -----------------------------------------------------

@pytest.fixture(scope="module")
def cache(tmp_path_factory, tiny_model):
    from conftest import small_cache

    return small_cache(tmp_path_factory.mktemp("distill-steps-data"), tiny_model, videos=4, images=0, seed=8)


def write_recipe(path, teacher, cache, out, steps=4, extra=()):
    path.write_text("\n".join([
        "kind: distill", "mode: steps", f"teacher: {teacher}", f"out: {out}", f"steps: {steps}", "seed: 1", "log_every: 1",
        "student_steps: 2", "teacher_steps: 4", "guidance_range: [2.0, 4.0]", "optim:", "  lr: 0.001", "data:",
        f"  cache: {cache}", "  batch_size: 2", "checkpoint:", "  every: 2", "  keep_last: 1", *extra,
    ]) + "\n")
    return path


def exported(run):
    from safetensors.torch import load_file

    return load_file(str(run / "model" / "transformer" / "diffusion_pytorch_model.safetensors"))


@pytest.mark.slow
def test_a_resumed_step_distillation_reaches_the_uninterrupted_weights(tiny_model, cache, tmp_path):
    from hvctl.recipe import load_recipe
    from hvctl.train.distill import DistillRecipe
    from hvctl.train.trainer import train

    straight = load_recipe(DistillRecipe, write_recipe(tmp_path / "a.yaml", tiny_model, cache, tmp_path / "straight"))
    train(straight, progress=False)
    recipe = write_recipe(tmp_path / "b.yaml", tiny_model, cache, tmp_path / "stopped")
    train(load_recipe(DistillRecipe, recipe, ["steps=2"]), progress=False)  # stops at step 2, as a killed run would
    assert train(load_recipe(DistillRecipe, recipe), progress=False)["resumed_from"] == 2
    a, b = exported(tmp_path / "straight"), exported(tmp_path / "stopped")
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    assert any(k.startswith("time_text_embed.guidance_embedder.") for k in a)  # composed with CFG distillation
    assert not torch.equal(a["time_text_embed.guidance_embedder.linear_2.weight"], torch.zeros_like(a["time_text_embed.guidance_embedder.linear_2.weight"]))


@pytest.mark.slow
def test_distill_mode_steps_writes_a_student_generate_runs_at_its_step_count(tiny_model, cache, tmp_path):
    import json

    from conftest import run_cli

    run = tmp_path / "run"
    recipe = write_recipe(tmp_path / "r.yaml", tiny_model, cache, run, steps=2)
    recipe.write_text(recipe.read_text().replace("mode: steps\n", ""))  # the flag sets it
    result = run_cli("distill", recipe, "--mode", "steps", "--set", "student_guidance=3.5", "--set", "student_shift=3.0",
                     "--json")
    assert result.returncode == 0, result.stderr
    info = json.loads((run / "model" / "hvctl.json").read_text())
    g = info["generation"]
    assert (g["steps"], g["shift_for_steps"], g["guidance_scale"], g["embedded_guidance"]) == (2, 2, 1.0, 3.5)
    assert info["distilled"] == {"method": "phased_consistency", "steps": 2, "teacher_steps": 4}
    gen = run_cli("generate", "a red circle moves left on a black background", "--model", run / "model", "--frames", 5,
                  "--height", 32, "--width", 32, "--seed", 0, "-o", tmp_path / "v.mp4", "--json")
    assert gen.returncode == 0, gen.stderr
    settings = json.loads(gen.stdout)["settings"]
    # the recorded shift, not the under-20-steps rule's 17/7 of the teacher's
    assert settings["steps"] == 2 and settings["flow_shift"] == g["flow_shift"] == 3.0 and settings["embedded_guidance"] == 3.5


@pytest.mark.slow
def test_a_lora_student_without_embedded_guidance_keeps_true_cfg(tiny_model, cache, tmp_path):
    import json

    from hvctl.recipe import load_recipe
    from hvctl.train.distill import DistillRecipe
    from hvctl.train.trainer import Trainer

    recipe = write_recipe(tmp_path / "r.yaml", tiny_model, cache, tmp_path / "run", steps=2,
                          extra=["embed_guidance: false", "lora:", "  rank: 4"])
    trainer = Trainer(load_recipe(DistillRecipe, recipe), progress=False)
    assert not trainer.model.config.guidance_embeds and trainer.objective.guidance_range is None
    trained = {n for n, p in trainer.model.named_parameters() if p.requires_grad}
    assert trained and all("lora_" in n for n in trained)
    trainer.train()
    g = json.loads((tmp_path / "run" / "model" / "hvctl.json").read_text())["generation"]
    teacher = json.loads((tiny_model / "hvctl.json").read_text())["generation"]
    assert g["steps"] == 2 and g["guidance_scale"] == teacher["guidance_scale"] and (tmp_path / "run" / "lora").is_dir()
    from hvctl.errors import HvctlError

    with pytest.raises(HvctlError, match="student_guidance: 5.0 sets an embedded scale"):  # nothing would embed it
        Trainer(load_recipe(DistillRecipe, recipe, ["student_guidance=5", f"out={tmp_path / 'run2'}"]), progress=False)


def test_the_13b_recipe_is_a_six_step_student_of_the_official_schedule():
    """recipes/distill/hunyuan-steps-13b.yaml: the official teacher's schedule (50 steps, shift 7,
    embedded guidance 6) split into 6 phases at shift 17, as FastHunyuan samples; its parallel
    layout fits the processes it asks for."""
    from pathlib import Path

    from hvctl.models.presets import OFFICIAL_GENERATION_DEFAULTS
    from hvctl.recipe import load_recipe
    from hvctl.train.distill import DistillRecipe
    from hvctl.train.distill_steps import student_schedule

    path = Path(__file__).resolve().parent.parent / "recipes" / "distill" / "hunyuan-steps-13b.yaml"
    r = load_recipe(DistillRecipe, path)
    assert (r.mode, r.student_steps, r.student_shift, r.teacher_steps) == ("steps", 6, 17.0, 50)
    assert r.nproc % (r.parallel.fsdp * r.parallel.ulysses * r.parallel.ring) == 0 and r.embed_guidance
    edges, teacher_sigmas, shift, teacher_steps = student_schedule(r.student_steps, r.student_shift, OFFICIAL_GENERATION_DEFAULTS,
                                                                   r.teacher_steps, r.teacher_shift)
    assert len(edges) == 7 and len(teacher_sigmas) == 51 and shift == 17.0 and teacher_steps == 50
    assert torch.allclose(edges, sampling_sigmas(6, 17.0)) and torch.allclose(teacher_sigmas, sampling_sigmas(50, 7.0))


def test_mode_steps_picks_the_step_distill_spec_and_lora_composes():
    from hvctl.lora import LoraSettings
    from hvctl.train.distill import DistillRecipe, DistillSpec
    from hvctl.train.distill_steps import StepDistillSpec
    from hvctl.train.dit import LoraModifier
    from hvctl.train.specs import spec_for

    assert type(spec_for(DistillRecipe(teacher="t"))) is DistillSpec
    assert type(spec_for(DistillRecipe(teacher="t", mode="steps"))) is StepDistillSpec
    mro = type(spec_for(DistillRecipe(teacher="t", mode="steps", lora=LoraSettings()))).__mro__
    assert mro[1] is LoraModifier and StepDistillSpec in mro
    with pytest.raises(HvctlError, match="i2v does not apply"):
        r = DistillRecipe(teacher="t", mode="steps", i2v="token_replace")
        spec_for(r).check(r)
