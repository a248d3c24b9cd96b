"""The `labels` scorer (`hvctl prefer`): scores read from a JSONL file, e.g. people's ratings or a
reward model run elsewhere.

Each line is {"id": PROMPT_ID, "index": K, "score": NUMBER}: the score of video K of that prompt
(the prefer run's OUT/videos/PROMPT_ID/K.mp4). A video without a line is left unscored, and a
later run, once the file has it, scores it: label the videos as they come.
"""

from __future__ import annotations

import json
import math
from pathlib import Path

from hvctl.errors import HvctlError
from hvctl.plugins import SampleFailure, register


@register("scorer", "labels")
class LabelScorer:
    """Scores from a JSONL file of {"id", "index", "score"} lines (human labels, an outside reward model)."""

    def __init__(self, path: str | None = None):
        if path is None:
            raise HvctlError("scorer 'labels' needs option 'path': a JSONL file of {\"id\", \"index\", \"score\"} lines")
        self.path = Path(path)
        if not self.path.is_file():
            raise HvctlError(f"scorer 'labels': {self.path} not found")
        self.scores: dict[tuple[str, int], float] = {}
        for number, line in enumerate(self.path.read_text(encoding="utf-8").splitlines(), 1):
            if not line.strip():
                continue
            try:
                row = json.loads(line)
                key, score = (str(row["id"]), int(row["index"])), row["score"]
            except (ValueError, KeyError, TypeError):
                raise HvctlError(f"{self.path}:{number}: expected {{\"id\": ..., \"index\": K, \"score\": NUMBER}}") from None
            if isinstance(score, bool) or not isinstance(score, (int, float)) or not math.isfinite(score):
                raise HvctlError(f"{self.path}:{number}: score must be a finite number, got {score!r}")
            self.scores[key] = float(score)

    def score(self, frames, prompt: str, item: dict) -> float:
        key = (str(item["id"]), int(item["index"]))
        if key not in self.scores:
            raise SampleFailure(f"no label for video {key[1]} of {key[0]} in {self.path}")
        return self.scores[key]
