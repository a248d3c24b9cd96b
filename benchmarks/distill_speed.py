"""Generation time of a CFG teacher against its guidance-distilled student (`hvctl distill`).

The teacher (`tiny` preset, no guidance embedding) samples with true classifier-free guidance:
a conditional and an unconditional pass per step. The student (the same DiT plus the guidance
embedding, as `hvctl distill` makes it) samples with the scale embedded: one pass per step. Both
generate the same video (64x64, 17 frames by default) for the same steps, in this process, one
after the other, each timed over --repeats runs after a warm-up; only the sampling loop is timed
(prompt encoding and VAE decoding are the same for both). The speed-up is an architecture
property, so random weights measure it as well as trained ones.

Run:
    python benchmarks/distill_speed.py
    python benchmarks/distill_speed.py --steps 50 --frames 33 --height 96 --width 96
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
    args = parser.parse_args()

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


if __name__ == "__main__":
    main()
