"""The toy scorer (`hvctl prefer`): how many of the prompt's attributes a video shows, read from pixels.

It is the toy evaluator's measure (hvctl/toy/evaluate.py): colour, shape, motion and background
measured by hvctl.toy.world.measure and compared with the prompt's. The score is the share of
the four that match, so 1.0 is exactly the evaluator's strict hit, and among misses a video with
three right attributes ranks above one with none (four samples rarely tie at 0 or 1 alone).
"""

from __future__ import annotations

from hvctl.plugins import SampleFailure, register

ATTRIBUTES = ("color", "shape", "motion", "background")


@register("scorer", "toy")
class ToyScorer:
    """Share of the prompt's colour, shape, motion and background the video shows (toy world only)."""

    def score(self, frames, prompt: str, item: dict) -> float:
        from hvctl.toy.world import measure
        from hvctl_toy.rewriter import parse_toy_prompt

        # The prompt record's own truth (a rendered toy manifest's `toy` field) beats parsing its words.
        truth = item.get("toy") if isinstance(item.get("toy"), dict) else parse_toy_prompt(prompt)
        missing = [a for a in ATTRIBUTES if truth.get(a) is None]
        if missing:
            raise SampleFailure(f"the prompt names no {', '.join(missing)} of the toy world: {prompt!r}")
        measured = measure(frames)
        return sum(measured[a] == truth[a] for a in ATTRIBUTES) / len(ATTRIBUTES)
