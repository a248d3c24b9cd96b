"""Generation time of a CFG teacher against its distilled students (`hvctl distill`).

The teacher (`tiny` preset, no guidance embedding) samples with true classifier-free guidance:
a conditional and an unconditional pass per step. The student (the same DiT plus the guidance
embedding, as `hvctl distill` makes it) samples with the scale embedded: one pass per step. Both
generate the same video (64x64, 17 frames by default) for the same steps, in this process, one
after the other, each timed over --repeats runs after a warm-up; only the sampling loop is timed
(prompt encoding and VAE decoding are the same for both). The speed-up is an architecture
property, so random weights measure it as well as trained ones.

--student-steps K adds the step-distilled students (`hvctl distill --mode steps`) of the teacher
at its own --steps: one sampled in K steps with true CFG (`embed_guidance: false`), one in K steps
with the scale embedded (composed with CFG distillation); each is timed for the sampling loop and
for a whole video (prompt encoding, sampling, VAE decoding), and its ratio to the teacher printed.

Run:
    python benchmarks/distill_speed.py
    python benchmarks/distill_speed.py --steps 50 --frames 33 --height 96 --width 96
    python benchmarks/distill_speed.py --steps 30 --student-steps 4 --threads 1   # the toy default's settings
"""

from __future__ import annotations

import argparse
import tempfile
import time
from pathlib import Path


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--frames", type=int, default=17)
    parser.add_argument("--height", type=int, default=64)
    parser.add_argument("--width", type=int, default=64)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--student-steps", type=int, default=None, help="also time step-distilled students at this many steps")
    parser.add_argument("--clock", choices=["wall", "cpu"], default="wall",
                        help="--student-steps: wall seconds, or this process's CPU seconds (steady on a shared machine)")
    args = parser.parse_args()
    if args.student_steps is not None:
        return step_students(args)

    import torch

    from hvctl.generate import GenerateRecipe, TextToVideo, prepare
    from hvctl.models.presets import init_model

    torch.set_num_threads(args.threads)
    root = Path(tempfile.mkdtemp(prefix="hvctl-distill-bench-"))
    teacher = init_model("tiny", root / "teacher", seed=0)
    student = init_model("tiny", root / "student", guidance_embeds=True, seed=0)
    common = dict(prompt="a red circle moves left on a black background", steps=args.steps, frames=args.frames,
                  height=args.height, width=args.width, seed=0, device="cpu", dtype="float32")
    cases = {"teacher, CFG 6 (2 passes/step)": GenerateRecipe(model=teacher, guidance_scale=6.0, **common),
             "student, embedded 6 (1 pass/step)": GenerateRecipe(model=student, embedded_guidance=6.0, **common)}
    seconds = {}
    for name, recipe in cases.items():
        r, model_dir = prepare(recipe)
        t2v = TextToVideo(model_dir, r, torch.device("cpu"), torch.float32)
        conditions = t2v.conditions([r.prompt])
        t2v.latents([0], conditions)  # warm-up
        t0 = time.perf_counter()
        for _ in range(args.repeats):
            t2v.latents([0], conditions)
        seconds[name] = (time.perf_counter() - t0) / args.repeats
    print(f"{args.steps} steps, {args.frames} frames of {args.height}x{args.width}, {args.threads} thread(s):")
    for name, s in seconds.items():
        print(f"  {name:36} {s:7.3f} s")
    teacher_s, student_s = seconds.values()
    print(f"  speed-up (teacher / student): {teacher_s / student_s:.2f}x")


def step_students(args) -> None:
    """Teacher (--steps, CFG 6) against K-step students with and without CFG distillation."""
    import torch

    from hvctl.generate import GenerateRecipe, TextToVideo, prepare
    from hvctl.models.presets import init_model

    torch.set_num_threads(args.threads)
    root = Path(tempfile.mkdtemp(prefix="hvctl-distill-bench-"))
    # The toy default's architecture (hvctl/assets/default-model), with and without the embedding.
    teacher = init_model("toy", root / "teacher", seed=0)
    student = init_model("toy", root / "student", guidance_embeds=True, seed=0)
    common = dict(prompt="a red circle moves left on a black background", frames=args.frames, height=args.height,
                  width=args.width, seed=0, device="cpu", dtype="float32")
    k = args.student_steps
    cases = {f"teacher, {args.steps} steps, CFG 6 (2 passes/step)": GenerateRecipe(model=teacher, steps=args.steps, guidance_scale=6.0, **common),
             f"student, {k} steps, CFG 6 (2 passes/step)": GenerateRecipe(model=teacher, steps=k, guidance_scale=6.0, **common),
             f"student, {k} steps, embedded 6 (1 pass/step)": GenerateRecipe(model=student, steps=k, embedded_guidance=6.0, **common)}
    clock = time.perf_counter if args.clock == "wall" else time.process_time
    loop, video = {}, {}
    for name, recipe in cases.items():
        r, model_dir = prepare(recipe)
        t2v = TextToVideo(model_dir, r, torch.device("cpu"), torch.float32)
        t2v.frames(t2v.latents([0], t2v.conditions([r.prompt])))  # warm-up
        loop[name] = video[name] = 0.0
        for _ in range(args.repeats):
            t0 = clock()
            conditions = t2v.conditions([r.prompt])
            t1 = clock()
            latents = t2v.latents([0], conditions)
            t2 = clock()
            t2v.frames(latents)
            t3 = clock()
            loop[name] += (t2 - t1) / args.repeats
            video[name] += (t3 - t0) / args.repeats
    print(f"{args.frames} frames of {args.height}x{args.width}, {args.threads} thread(s), {args.clock} seconds per video:")
    print(f"  {'':44} {'sampling':>9} {'video':>9} {'speed-up (sampling / video)':>29}")
    teacher_name = next(iter(cases))
    for name in cases:
        print(f"  {name:44} {loop[name]:9.3f} {video[name]:9.3f} "
              f"{loop[teacher_name] / loop[name]:13.2f}x / {video[teacher_name] / video[name]:.2f}x")


if __name__ == "__main__":
    main()
