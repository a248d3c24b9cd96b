"""The toy captioner: the structured caption of a toy-world video, from its pixels alone."""

from __future__ import annotations

import math

from hvctl.plugins import SampleFailure, register
from hvctl.toy.world import ToySample, measure

# Area of each shape for radius 1 (toy-world.md, Objects): a disc, a square of half-side 1, an
# equilateral triangle inscribed in the unit circle.
UNIT_AREA = {"circle": math.pi, "square": 4.0, "triangle": 3 * math.sqrt(3) / 4}


@register("captioner", "toy")
class ToyCaptioner:
    """Reads colour, shape, motion, background, size, speed and place from pixels (toy world only)."""

    def caption(self, frames, record=None) -> dict:
        m = measure(frames)
        if m["color"] is None:
            raise SampleFailure("no object found in the frames")
        dx, dy = m["displacement"]
        moving = m["motion"] != "still"
        # The renderer's words need the radius, the speed and the start; the mask's area, travel
        # and first centroid give them back (the centroid of a triangle sits a little below its
        # circumcentre, which no word depends on).
        sample = ToySample(
            index=0, split="train", color=m["color"], shape=m["shape"], motion=m["motion"],
            background=m["background"], height=frames.shape[1], width=frames.shape[2], frames=frames.shape[0],
            radius=math.sqrt(m["area"] / UNIT_AREA[m["shape"]]),
            speed=math.hypot(dx, dy) / max(m["visible_frames"] - 1, 1) if moving else 0.0,
            start=m["start"],
        )
        return sample.caption()
