"""Step distillation: phased consistency distillation (PCM, Wang et al. 2024), the method of
FastVideo's few-step FastHunyuan, for a flow-matching velocity model.

The student's K sampling steps split sigma's [1, 0] into K phases, whose edges are the Euler
sampler's own sigmas for K steps (hvctl.flow.sampling_sigmas). Within a phase the student is a
consistency function with PCM's Euler parameterisation: from x_t it jumps straight to the phase's
lower edge, x_edge = x_t + (edge - t) v_student(x_t, t). Its target is where the teacher's ODE
(its own Euler schedule, with classifier-free guidance) takes x_t: either all the way to the edge
(`teacher_solver_steps` None, the default: no bootstrapping, the fastest to learn on a small
budget), or a few teacher steps to t' and from there the student's own jump with its gradient
stopped (improved consistency training's target network: the current weights, no EMA copy).
Sampling the student is then plain Euler at those K sigmas: one model call per step.

The loss compares velocities, (x_edge_target - x_t) / (edge - t) against v_student, so it has the
scale of the flow-matching loss whatever the phase length.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch
import torch.nn.functional as F

from hvctl.errors import HvctlError
from hvctl.flow import add_noise, guided, sampling_sigmas, transformer_velocity
from hvctl.train.distill import DistillSpec
from hvctl.train.objectives import FlowMatchingObjective
from hvctl.train.specs import chain, register


def solver_grid(edges: torch.Tensor, teacher_sigmas: torch.Tensor) -> torch.Tensor:
    """The teacher's sampling sigmas with the student's phase edges added, from 1 down to 0."""
    grid = torch.unique(torch.cat([edges.double(), teacher_sigmas.double()]))  # sorted ascending
    return grid.flip(0).float()


def velocity(model, latents: torch.Tensor, sigma: torch.Tensor, text, guidance: torch.Tensor | None = None) -> torch.Tensor:
    """The model's velocity at noisy `latents` and per-sample `sigma` (float32); guidance: per-sample
    scales for a guidance-embedded model."""
    device = next(model.parameters()).device
    states, mask, pooled = text
    longest = max(int(mask.sum(dim=1).max()), 1)  # padding is masked out: compute the longest text only
    return transformer_velocity(model, latents.to(device), sigma, states[:, :longest].to(device),
                                mask[:, :longest].to(device), pooled.to(device), guidance).float()


class StepDistillationObjective(FlowMatchingObjective):
    """PCM on cached latents. teacher: frozen DiT; edges: the student's K+1 sampling sigmas;
    teacher_sigmas: the teacher's sampling sigmas; guidance_range: scales w drawn per sample and
    embedded in the student (None: w = 1, the teacher's plain velocity, for a student that keeps
    true CFG; then prompts are dropped at empty_prompt_rate so it learns the unconditional flow too)."""

    def __init__(self, flow, empty_text: dict | None, teacher, *, edges: torch.Tensor, teacher_sigmas: torch.Tensor,
                 guidance_range: tuple[float, float] | None, teacher_solver_steps: int | None = None,
                 phase_start_share: float = 0.5, empty_prompt_rate: float = 0.0):
        if empty_text is None:
            raise HvctlError("step distillation needs the empty prompt's text states in the cache (re-run hvctl encode)")
        if teacher_solver_steps is not None and teacher_solver_steps < 1:
            raise HvctlError(f"teacher_solver_steps must be >= 1, got {teacher_solver_steps}")
        if not 0 <= phase_start_share <= 1:
            raise HvctlError(f"phase_start_share must be in [0, 1], got {phase_start_share}")
        super().__init__(flow, empty_text, empty_prompt_rate if guidance_range is None else 0.0)
        self.teacher, self.guidance_range = teacher, guidance_range
        self.edges = edges.float()
        self.grid = solver_grid(self.edges, teacher_sigmas)
        # Each edge's position on the grid: phase k spans grid[edge_index[k]] .. grid[edge_index[k + 1]].
        self.edge_index = [int(torch.nonzero(torch.isclose(self.grid, e)).min()) for e in self.edges]
        self.solver_steps, self.phase_start_share = teacher_solver_steps, phase_start_share

    def draw(self, n: int, generator: torch.Generator) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Per sample: its grid position j (the sigma t = grid[j]), where the teacher stops, and
        its phase's lower edge's grid position."""
        phases = torch.randint(0, len(self.edges) - 1, (n,), generator=generator)
        at_start = torch.rand(n, generator=generator) < self.phase_start_share
        u = torch.rand(n, generator=generator)
        start, stop, end = [], [], []
        for k, s, v in zip(phases.tolist(), at_start.tolist(), u.tolist()):
            first, last = self.edge_index[k], self.edge_index[k + 1]
            inside = last - first - 1  # teacher points strictly inside the phase
            j = first if s or inside == 0 else first + 1 + min(int(v * inside), inside - 1)
            start.append(j)
            stop.append(last if self.solver_steps is None else min(last, j + self.solver_steps))
            end.append(last)
        return torch.tensor(start), torch.tensor(stop), torch.tensor(end)

    @torch.no_grad()
    def teacher_velocity(self, latents, sigma, text, scale):
        """The teacher's velocity under classifier-free guidance at per-sample scales."""
        if self.teacher.config.guidance_embeds:
            return velocity(self.teacher, latents, sigma, text, scale)
        conditional = velocity(self.teacher, latents, sigma, text)
        if bool((scale == 1).all()):
            return conditional
        n = latents.shape[0]
        empty = self.empty_text_batch(n)
        unconditional = velocity(self.teacher, latents, sigma, empty)
        return guided(conditional, unconditional, scale.view(n, 1, 1, 1, 1).to(conditional.device))

    def __call__(self, model, batch: dict, generator: torch.Generator, *, step: int = 0, stratum=None):
        b = self.noised(batch, generator)
        x0, noise, text = b["x0"], b["noise"], b["text"]
        n = x0.shape[0]
        start, stop, end = self.draw(n, generator)
        if self.guidance_range is None:
            scale = torch.ones(n)
        else:
            low, high = self.guidance_range
            scale = low + (high - low) * torch.rand(n, generator=generator)
        student_scale = scale if model.config.guidance_embeds else None
        device = next(model.parameters()).device
        t, edge = self.grid[start], self.grid[end]
        x_t = add_noise(x0, noise, t).to(device)
        # The teacher's Euler steps along the grid, each sample from its own t to its own stop;
        # each step runs the teacher on the samples still moving only.
        x, j = x_t.clone(), start.clone()
        with torch.no_grad():
            while bool((j < stop).any()):
                moving = torch.nonzero(j < stop).flatten()
                sigma, sigma_next = self.grid[j[moving]], self.grid[j[moving] + 1]
                v = self.teacher_velocity(x[moving.to(device)], sigma, tuple(part[moving] for part in text), scale[moving])
                x[moving.to(device)] += (sigma_next - sigma).view(-1, 1, 1, 1, 1).to(device) * v
                j[moving] += 1
            reached = stop == end
            if not bool(reached.all()):  # bootstrap: the student's own jump from t' to the edge
                t_prime = self.grid[stop]
                jump = x + (edge - t_prime).view(n, 1, 1, 1, 1).to(device) * velocity(model, x, t_prime, text, student_scale)
                x = torch.where(reached.view(n, 1, 1, 1, 1).to(device), x, jump)
            target = (x - x_t) / (edge - t).view(n, 1, 1, 1, 1).to(device)
        prediction = velocity(model, x_t, t, text, student_scale)
        loss = self.per_sample_loss(batch, F.mse_loss(prediction, target, reduction="none")).mean()
        return loss, {"loss": loss.item(), "sigma_mean": t.mean().item(), "guidance_mean": scale.mean().item()}


def student_schedule(student_steps: int, student_shift: float | None, teacher_defaults: dict,
                     teacher_steps: int | None = None, teacher_shift: float | None = None):
    """The student's phase edges and the teacher's sampling sigmas, from the recipe and the
    teacher folder's generation defaults (its recorded steps and flow shift)."""
    from hvctl.flow import default_flow_shift

    model_shift = float(teacher_defaults.get("flow_shift") or 7.0)
    teacher_steps = teacher_steps or int(teacher_defaults.get("steps") or 50)
    if student_steps >= teacher_steps:
        raise HvctlError(f"student_steps ({student_steps}) must be fewer than the teacher's steps ({teacher_steps})")
    teacher_shift = teacher_shift or default_flow_shift(teacher_steps, model_shift)
    student_shift = student_shift or default_flow_shift(student_steps, model_shift)
    return (sampling_sigmas(student_steps, student_shift), sampling_sigmas(teacher_steps, teacher_shift),
            student_shift, teacher_steps)


def record_student_defaults(model_dir, steps: int, shift: float, teacher_steps: int) -> None:
    """The student folder's generation defaults (hvctl.json): its step count and the flow shift it
    was distilled for, so `hvctl generate` and `hvctl eval toy` sample it right with no flags."""
    from hvctl.io import write_json_atomic

    info_file = Path(model_dir) / "hvctl.json"
    info = json.loads(info_file.read_text()) if info_file.is_file() else {}
    generation = info.setdefault("generation", {})
    generation.update({"steps": steps, "flow_shift": shift, "shift_for_steps": steps})
    info["distilled"] = {"method": "phased_consistency", "steps": steps, "teacher_steps": teacher_steps}
    write_json_atomic(info_file, info)


@register("step_distill")
class StepDistillSpec(DistillSpec):
    """`hvctl distill --mode steps`: the student (the teacher's DiT, with a guidance embedding
    unless embed_guidance is false and the teacher has none) learns the teacher's trajectory in
    student_steps steps; its folder records that step count and shift for `hvctl generate`."""

    def check_teacher(self, folder, teacher) -> None:  # a guidance-embedded teacher is fine here
        if teacher.config.image_condition_type is not None:
            raise HvctlError("distill mode steps: image-to-video students are not supported yet (a text-to-video teacher only)")

    def student_embeds_guidance(self, t, teacher) -> bool:
        embeds = bool(teacher.config.guidance_embeds or t.r.embed_guidance)
        if not embeds and t.r.student_guidance is not None:
            raise HvctlError(f"student_guidance: {t.r.student_guidance} sets an embedded scale, but with embed_guidance: "
                             "false the student keeps true CFG (set guidance at generate time, or drop student_guidance)")
        return embeds

    def objective(self, t, dataset):
        from hvctl.models.loading import ModelFolder

        r = t.r
        edges, teacher_sigmas, self.student_shift, self.teacher_steps = student_schedule(
            r.student_steps, r.student_shift, ModelFolder.open(t.base_model).generation_defaults, r.teacher_steps,
            r.teacher_shift)
        guidance_range = tuple(r.guidance_range) if t.model.config.guidance_embeds else None
        return StepDistillationObjective(r.flow, dataset.empty_text(), self.sequence_parallel_teacher(t), edges=edges,
                                         teacher_sigmas=teacher_sigmas, guidance_range=guidance_range,
                                         teacher_solver_steps=r.teacher_solver_steps,
                                         phase_start_share=r.phase_start_share, empty_prompt_rate=r.data.empty_prompt_rate)

    def exported(self, t, state):
        module, write = super().exported(t, state)
        steps, shift, teacher_steps = t.r.student_steps, self.student_shift, self.teacher_steps
        return module, chain(write, lambda folder: record_student_defaults(folder / "model", steps, shift, teacher_steps))
