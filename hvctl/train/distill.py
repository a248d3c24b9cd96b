"""`hvctl distill`: classifier-free-guidance distillation, in one place: its recipe, the student
built from the teacher, the objective, and the student's generation defaults on export.

The student is the teacher's DiT plus a guidance embedding, starting from the teacher's weights;
in one pass with the scale w embedded, it regresses the teacher's guided velocity
v_u + w (v_c - v_u), w drawn per sample. Every other part of a run is the trainer's
(checkpoints, resume, parallelism).
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import ClassVar, Literal

import torch
import torch.nn.functional as F

from hvctl.errors import HvctlError
from hvctl.train.config import TrainRecipe
from hvctl.train.dit import DitSpec
from hvctl.train.objectives import FlowMatchingObjective
from hvctl.train.specs import chain, register


@dataclass
class DistillRecipe(TrainRecipe):
    """`hvctl distill`: the trainer's keys, plus the teacher and the guidance range; `mode` chooses
    classifier-free-guidance distillation (cfg) or step distillation (steps, hvctl/train/distill_steps.py)."""

    KIND: ClassVar[str] = "distill"
    LIMITS: ClassVar[dict] = {**TrainRecipe.LIMITS, "guidance_range": ">= 1", "student_guidance": ">= 0", "student_steps": ">= 1",
                              "student_shift": "> 0", "teacher_steps": ">= 2", "teacher_shift": "> 0",
                              "teacher_solver_steps": ">= 1", "phase_start_share": "[0, 1]"}
    teacher: Path | None = None  # a model folder whose DiT has no guidance embedding (mode steps: either)
    guidance_range: tuple[float, float] = (1.0, 8.0)  # the scale w, drawn uniformly per sample
    guidance_embedder_init: Literal["zero", "random"] = "zero"  # zero: the student starts as the teacher's conditional pass
    # The embedded guidance the student's folder defaults to; None: the teacher's scale (6 when it is 1).
    # A tiny student may need more than the teacher's scale for the same look (README: distill).
    student_guidance: float | None = None
    # mode steps: step distillation (phased consistency distillation): a student sampled in
    # student_steps Euler steps learns where the teacher's own schedule (teacher_steps,
    # teacher_shift; None: the teacher folder's) takes each phase.
    mode: Literal["cfg", "steps"] = "cfg"
    student_steps: int = 4
    student_shift: float | None = None  # None: the shift hvctl generate uses for student_steps (17/7 of the model's under 20)
    teacher_steps: int | None = None
    teacher_shift: float | None = None
    # Also distil CFG: the student embeds the guidance scale (drawn from guidance_range) and runs one
    # pass a step; false keeps true CFG (two passes), the student learning the teacher's unguided flow.
    embed_guidance: bool = True
    teacher_solver_steps: int | None = None  # teacher steps per target, then the student's own jump; None: to the phase edge
    phase_start_share: float = 0.5  # share of samples at a phase's start, the sigma the student samples at

    @property
    def VARIANT(self) -> str:  # noqa: N802  (specs.variant_name reads it)
        return "step_distill" if self.mode == "steps" else "cfg_distill"


class GuidanceDistillationObjective(FlowMatchingObjective):
    """The student's one-pass velocity, with the scale embedded, against the teacher's CFG velocity."""

    def __init__(self, flow, empty_text: dict | None, teacher, guidance_range: tuple[float, float]):
        if empty_text is None:
            raise HvctlError("distillation needs the empty prompt's text states in the cache (re-run hvctl encode)")
        super().__init__(flow, empty_text, 0.0)
        self.teacher, self.guidance_range = teacher, guidance_range

    def __call__(self, model, batch: dict, generator: torch.Generator, *, step: int = 0, stratum=None):
        from hvctl.flow import guided

        b = self.noised(batch, generator, stratum)
        n = b["x0"].shape[0]
        low, high = self.guidance_range
        scale = low + (high - low) * torch.rand(n, generator=generator)
        empty = self.empty_text_batch(n)
        with torch.no_grad():
            conditional = self.predict(self.teacher, b["x0"], b["noise"], b["sigma"], b["text"])
            unconditional = self.predict(self.teacher, b["x0"], b["noise"], b["sigma"], empty)
            target = guided(conditional, unconditional, scale.view(n, 1, 1, 1, 1).to(conditional.device))
        prediction = self.predict(model, b["x0"], b["noise"], b["sigma"], b["text"], scale)
        loss = self.per_sample_loss(batch, F.mse_loss(prediction, target, reduction="none")).mean()
        return loss, {"loss": loss.item(), "guidance_mean": scale.mean().item()}


@register("cfg_distill")
class DistillSpec(DitSpec):
    model_key = "teacher"  # the student starts from the teacher's folder

    def check(self, r) -> None:
        if r.teacher is None or r.target != "dit":
            raise HvctlError("distill needs 'teacher' (a model folder) and target: dit")
        if r.avatar is not None:
            raise HvctlError("avatar: trains a DiT's conditioners with full weights (not with lora, distill or target: vae)")
        if r.i2v is not None:
            raise HvctlError("distill: the teacher and student are text-to-video models; i2v does not apply")
        super().check(r)

    def load(self, t, folder) -> torch.nn.Module:
        """The student: the teacher's architecture (plus a guidance embedding), holding its weights
        (a new embedder zero-initialised unless the recipe says random, so that the student
        starts as the teacher's conditional pass). The frozen teacher is kept in self.frozen."""
        from hvctl.models.loading import load_component

        teacher = load_component(folder, "transformer", dtype=torch.float32, device=t.device)
        self.check_teacher(folder, teacher)
        teacher.eval().requires_grad_(False)
        embeds = self.student_embeds_guidance(t, teacher)
        student = type(teacher).from_config({**teacher.config, "guidance_embeds": embeds}).to(t.device)
        missing, unexpected = student.load_state_dict(teacher.state_dict(), strict=False)
        assert not unexpected and all(k.startswith("time_text_embed.guidance_embedder.") for k in missing), missing
        self.new_guidance_embedder = bool(missing)
        if missing and t.r.guidance_embedder_init == "zero":
            last = student.time_text_embed.guidance_embedder.linear_2
            torch.nn.init.zeros_(last.weight)
            torch.nn.init.zeros_(last.bias)
        self.frozen["teacher"] = teacher
        return student

    def check_teacher(self, folder, teacher) -> None:
        if teacher.config.guidance_embeds:
            raise HvctlError(f"{folder.path}: the teacher already embeds guidance; distillation needs one without")

    def student_embeds_guidance(self, t, teacher) -> bool:
        return True

    def trained_in_full(self, t, model) -> list[torch.nn.Module]:
        """Under LoRA, a new guidance embedding is trained whole: it has no weights to adapt."""
        return [model.time_text_embed.guidance_embedder] if self.new_guidance_embedder else []

    def sequence_parallel_teacher(self, t) -> torch.nn.Module:
        teacher = self.frozen["teacher"]
        if t.r.parallel.ring * t.r.parallel.ulysses > 1:  # the teacher sees whole inputs too
            from hvctl.parallel import apply_sequence_parallel

            apply_sequence_parallel(teacher, t.mesh)
        return teacher

    def objective(self, t, dataset):
        return GuidanceDistillationObjective(t.r.flow, dataset.empty_text(), self.sequence_parallel_teacher(t),
                                             tuple(t.r.guidance_range))

    def exported(self, t, state):
        module, write = super().exported(t, state)
        # A new embedding defaults to the teacher's scale; an embedded teacher's stays unless student_guidance says.
        if not (self.new_guidance_embedder or (t.r.student_guidance is not None and module.config.guidance_embeds)):
            return module, write
        scale = t.r.student_guidance
        return module, chain(write, lambda folder: embed_guidance_defaults(folder / "model", scale))


def embed_guidance_defaults(model_dir: Path, scale: float | None = None) -> None:
    """A distilled student's generation defaults: one pass, with `scale` embedded, or else the
    teacher's guidance scale (6, the official default, when the teacher's is 1)."""
    from hvctl.io import write_json_atomic

    info_file = model_dir / "hvctl.json"
    if not info_file.is_file():
        return
    info = json.loads(info_file.read_text())
    generation = info.setdefault("generation", {})
    teacher_scale = generation.get("guidance_scale") or 1.0
    if scale is None:
        scale = teacher_scale if teacher_scale > 1 else 6.0
    generation["embedded_guidance"] = scale
    generation["guidance_scale"] = 1.0
    write_json_atomic(info_file, info)
