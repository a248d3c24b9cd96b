"""hvctl's curation filters (`hvctl curate`): clarity, motion and text area; and the `labels`
scorer of `hvctl prefer` (labels.py: scores from a JSONL file, generic like these filters).

A filter is a class registered as `@register("filter", name)`; a curate recipe names it under
`filters:` and its mapping there gives the keyword arguments (thresholds, how many frames to
look at). The stage uses this interface:

    score(frames, step=1.0) -> float
        frames: uint8 RGB [T, H, W, 3], evenly spaced over the clip, `step` source frames apart
        (T == 1 for an image). The stage downsizes them first (the recipe's analysis_size), so
        thresholds mean the same whatever the source resolution.
    keep(score) -> bool       whether a clip with this score stays
    rule: str                 the threshold in words ("clarity >= 100"), quoted in rejections
    media: tuple[str, ...]    the kinds it applies to ("image", "video"); others are not scored
    method: str               optional: how the score was made, recorded next to it

A filter that cannot score a clip raises hvctl.plugins.SampleFailure: the stage reports that
input as failed and goes on. Another package adds filters the same way, through the
`hvctl.plugins` entry points; a recipe then names them under `filters:` next to these.
OpenCV is imported inside the methods: `hvctl plugins list` imports this module.
"""

from __future__ import annotations

import os
import shutil
import subprocess

import numpy as np

from hvctl.errors import HvctlError
from hvctl.plugins import register


def _evenly(count: int, wanted: int) -> list[int]:
    """Up to `wanted` indices spread evenly over range(count), first and last included."""
    if count <= wanted:
        return list(range(count))
    return sorted(set(np.linspace(0, count - 1, wanted).round().astype(int).tolist()))


def _gray(frame):
    import cv2

    return cv2.cvtColor(np.ascontiguousarray(frame), cv2.COLOR_RGB2GRAY)


def _number(name: str, key: str, value) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise HvctlError(f"filter '{name}': '{key}' must be a number, got {value!r}")
    return float(value)


def _count(name: str, key: str, value) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise HvctlError(f"filter '{name}': '{key}' must be a positive integer, got {value!r}")
    return value


@register("filter", "clarity")
class Clarity:
    """Sharpness: variance of the Laplacian, median over sampled frames; drops blurry clips."""

    media = ("image", "video")

    def __init__(self, min: float = 100.0, frames: int = 5):
        self.min, self.frames = _number("clarity", "min", min), _count("clarity", "frames", frames)
        self.rule = f"clarity >= {self.min:g}"

    def score(self, frames, step=1.0) -> float:
        import cv2

        # On luma, as is usual: per colour channel would see isoluminant edges (magenta on gray) but
        # also the blocky chroma of 4:2:0 video, which makes a blurred clip look sharp.
        values = [cv2.Laplacian(_gray(frames[i]), cv2.CV_64F).var() for i in _evenly(len(frames), self.frames)]
        return float(np.median(values))

    def keep(self, score: float) -> bool:
        return score >= self.min


@register("filter", "motion")
class Motion:
    """Mean optical-flow magnitude (Farneback), px per source frame; drops frozen and too-shaky clips."""

    # Flow is measured between neighbouring given frames and divided by their spacing (`step`). With
    # a spacing of several frames, very fast motion (tens of px) is underestimated: for `max` to
    # catch shake, keep the recipe's analysis_frames high enough that step stays near 1-4.
    media = ("video",)

    def __init__(self, min: float = 0.3, max: float = 20.0, pairs: int = 8):
        self.min, self.max = _number("motion", "min", min), _number("motion", "max", max)
        self.pairs = _count("motion", "pairs", pairs)
        if self.min > self.max:
            raise HvctlError(f"filter 'motion': 'min' ({min}) is above 'max' ({max})")
        self.rule = f"{self.min:g} <= motion <= {self.max:g}"

    def score(self, frames, step=1.0) -> float:
        import cv2

        if len(frames) < 2:
            return 0.0
        magnitudes = []
        for i in _evenly(len(frames) - 1, self.pairs):
            # pyr_scale 0.5, 3 levels, 15 px window, 3 iterations, poly_n 5, poly_sigma 1.2: OpenCV's usual settings.
            flow = cv2.calcOpticalFlowFarneback(_gray(frames[i]), _gray(frames[i + 1]), None, 0.5, 3, 15, 3, 5, 1.2, 0)
            magnitudes.append(float(np.linalg.norm(flow, axis=-1).mean()))
        return float(np.mean(magnitudes)) / step

    def keep(self, score: float) -> bool:
        return self.min <= score <= self.max


@register("filter", "text_area")
class TextArea:
    """Share of the frame covered by text (tesseract OCR, else an OpenCV proxy), max over sampled frames."""

    media = ("image", "video")

    def __init__(self, max: float = 0.02, frames: int = 3, method: str = "auto", min_confidence: float = 60.0):
        self.max, self.frames = _number("text_area", "max", max), _count("text_area", "frames", frames)
        self.min_confidence = _number("text_area", "min_confidence", min_confidence)
        if method not in ("auto", "tesseract", "proxy"):
            raise HvctlError(f"filter 'text_area': 'method' must be auto, tesseract or proxy, got {method!r}")
        if method == "tesseract" and shutil.which("tesseract") is None:
            raise HvctlError("filter 'text_area': method 'tesseract' asked for, but no tesseract binary is on PATH")
        if method == "auto":
            method = "tesseract" if shutil.which("tesseract") else "proxy"
        self.method = method
        self.rule = f"text_area <= {self.max:g}"

    def score(self, frames, step=1.0) -> float:
        indices = _evenly(len(frames), self.frames)
        if self.method == "tesseract":
            return max(tesseract_text_area(frames[i], self.min_confidence) for i in indices)
        return max(proxy_text_area(frames[i]) for i in indices)

    def keep(self, score: float) -> bool:
        return score <= self.max


def tesseract_text_area(frame, min_confidence: float = 60.0) -> float:
    """Share of the frame inside the word boxes that tesseract reads with confidence > min_confidence."""
    import cv2

    # Tesseract misses letters that touch the image border (subtitles often sit near it): pad.
    pad = max(8, min(frame.shape[:2]) // 20)
    padded = cv2.copyMakeBorder(np.ascontiguousarray(frame[..., ::-1]), pad, pad, pad, pad, cv2.BORDER_REPLICATE)
    _, png = cv2.imencode(".png", padded)
    # --psm 11: sparse text, as captions and overlays are; one OCR thread, as the stage runs many.
    result = subprocess.run(["tesseract", "stdin", "stdout", "--psm", "11", "tsv"], input=png.tobytes(),
                            capture_output=True, env={**os.environ, "OMP_THREAD_LIMIT": "1"})
    if result.returncode != 0:
        message = result.stderr.decode(errors="replace").strip().splitlines()
        raise HvctlError(f"tesseract failed: {message[-1] if message else f'exit status {result.returncode}'}")
    covered = np.zeros((frame.shape[0] + 2 * pad, frame.shape[1] + 2 * pad), dtype=bool)
    lines = result.stdout.decode(errors="replace").splitlines()
    for line in lines[1:]:  # after the header: level page block par line word left top width height conf text
        cells = line.split("\t")
        if len(cells) < 12 or cells[0] != "5" or not cells[11].strip():
            continue  # not a word, or an empty one
        left, top, width, height = (int(c) for c in cells[6:10])
        if float(cells[10]) > min_confidence:
            covered[top:top + height, left:left + width] = True
    return float(covered[pad:-pad, pad:-pad].mean())


def proxy_text_area(frame) -> float:
    """Share of the frame inside text-like boxes: a stand-in for OCR when tesseract is missing.

    Text is dense strokes in a row: edges (morphological gradient, Otsu threshold) are joined
    along rows, and a joined region counts as text when it is wider than tall, not too tall and
    mostly edges. It finds overlays, captions and signs; it also takes some fences and striped
    textures for text, so its threshold wants to be looser than OCR's.
    """
    import cv2

    gray = _gray(frame)
    height, width = gray.shape
    gradient = cv2.morphologyEx(gray, cv2.MORPH_GRADIENT, cv2.getStructuringElement(cv2.MORPH_ELLIPSE, (3, 3)))
    if gradient.max() < 32:  # no edge worth the name: Otsu would split noise
        return 0.0
    _, edges = cv2.threshold(gradient, 0, 255, cv2.THRESH_BINARY | cv2.THRESH_OTSU)
    gap = max(3, round(height / 40))  # the space between letters, about
    joined = cv2.morphologyEx(edges, cv2.MORPH_CLOSE, cv2.getStructuringElement(cv2.MORPH_RECT, (gap, 1)))
    contours, _ = cv2.findContours(joined, cv2.RETR_EXTERNAL, cv2.CHAIN_APPROX_SIMPLE)
    covered = np.zeros((height, width), dtype=bool)
    for contour in contours:
        x, y, w, h = cv2.boundingRect(contour)
        if h < 6 or h > 0.3 * height or w < 1.5 * h:
            continue  # too small to read, too tall for a line of text, or not a row of letters
        if np.count_nonzero(edges[y:y + h, x:x + w]) / (w * h) > 0.35:
            covered[y:y + h, x:x + w] = True
    return float(covered.mean())


from hvctl_filters import labels  # noqa: E402,F401  (importing registers the labels scorer)
