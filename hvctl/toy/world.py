"""The toy world as data and pure numpy functions: draw a sample, render it, measure it back.

This file follows shared/design/toy-world.md, the contract that the renderer, the captioner and
the evaluator share. Coordinates are in pixels, x to the right and y downward, with pixel (i, j)
covering [j, j+1) x [i, i+1); an object is placed by its centre.
"""

import math
from dataclasses import dataclass

import numpy as np

from hvctl.errors import HvctlError

BACKGROUNDS = {"black": (0, 0, 0), "white": (255, 255, 255), "gray": (128, 128, 128)}
OBJECT_COLORS = {
    "red": (220, 40, 40),
    "green": (40, 180, 60),
    "blue": (50, 90, 230),
    "yellow": (240, 210, 40),
    "magenta": (210, 60, 200),
    "cyan": (40, 200, 210),
}
SHAPES = ("circle", "square", "triangle")
MOTIONS = ("left", "right", "up", "down", "still")
DIRECTIONS = {"left": (-1, 0), "right": (1, 0), "up": (0, -1), "down": (0, 1), "still": (0, 0)}
ASPECT_BUCKETS = [(64, 64), (64, 96), (96, 64)]  # (height, width)
DURATION_BUCKETS = [9, 17, 33]
FPS = 8
SPLITS = ("train", "eval")
KINDS = ("video", "image")

# (color, shape) pairs that no training set ever contains; they measure compositional generalisation.
HELD_OUT = (("red", "triangle"), ("blue", "circle"), ("yellow", "square"))
TRAIN_PAIRS = tuple((c, s) for c in OBJECT_COLORS for s in SHAPES if (c, s) not in HELD_OUT)
EVAL_HELD_OUT_EVERY = 3  # eval samples 0, 3, 6, ... show a held-out pair: a third of any eval set

# Sizes and speeds are given for a 64 px short side and scale with the short side.
BASE_SIDE = 64
RADIUS_RANGE = (7.0, 11.0)
SPEED_RANGE = (1.0, 2.0)  # px/frame
STILL_UNDER = 3.0  # px of centroid travel, first to last frame
SUPERSAMPLE = 4  # anti-aliasing: 4x4 samples per pixel


@dataclass(frozen=True)
class ToySample:
    """Everything needed to render one toy image or video."""

    index: int
    split: str
    color: str
    shape: str
    motion: str
    background: str
    height: int
    width: int
    frames: int
    radius: float  # circle radius, half-side of the square, circumradius of the triangle
    speed: float  # px/frame; 0 when still
    start: tuple[float, float]  # object centre (x, y) at frame 0

    @property
    def kind(self):
        return "image" if self.frames == 1 else "video"

    def centre(self, t):
        dx, dy = DIRECTIONS[self.motion]
        return self.start[0] + dx * self.speed * t, self.start[1] + dy * self.speed * t

    def prompt(self):
        verb = "stays still" if self.motion == "still" else f"moves {self.motion}"
        return f"a {self.color} {self.shape} {verb} on a {self.background} background"

    def caption(self):
        """The structured caption (toy-world.md, Captions)."""
        still = self.motion == "still"
        return {
            "short_description": self.prompt(),
            "dense_description": self._dense_description(),
            "background": f"a plain {self.background} background",
            "style": "flat 2D graphics",
            "shot_type": "static wide shot",
            "lighting": "flat, even",
            "atmosphere": "calm" if still else "lively",
            "camera_movement": "static",
            "additional_metadata": {
                "source_tags": ["toy world", "synthetic"],
                "quality_tags": ["clean", "anti-aliased"],
                "other_tags": [self.kind, "single object", "still" if still else "moving"],
            },
        }

    def _dense_description(self):
        scale = min(self.height, self.width) / BASE_SIDE
        size = _word(self.radius / scale, RADIUS_RANGE, ("small", "medium-sized", "large"))
        thing = f"A {size} {self.color} {self.shape}"
        place = _place_words(self.start, self.width, self.height)
        if self.motion == "still":
            return f"{thing} stays still near {place} of the frame on a plain {self.background} background."
        pace = _word(self.speed / scale, SPEED_RANGE, ("slowly", "at a steady pace", "quickly"))
        way = {"left": "to the left", "right": "to the right", "up": "upward", "down": "downward"}[self.motion]
        return (f"{thing} starts near {place} of the frame and moves {pace} {way} "
                f"across a plain {self.background} background.")


# Users' wording of a toy prompt, for measuring prompt rewriting (`hvctl eval toy --rewrite`):
# synonyms, other word orders and Chinese, as people write them.
_SAYINGS = {
    "color": {"red": ["crimson", "scarlet", "red"], "green": ["emerald", "green"], "blue": ["azure", "blue"],
              "yellow": ["golden", "yellow"], "magenta": ["pink", "fuchsia"], "cyan": ["turquoise", "aqua"]},
    "shape": {"circle": ["disc", "ball", "round dot"], "square": ["box", "block", "square"], "triangle": ["triangle"]},
    "motion": {"left": ["drifting to the left", "heading left", "sliding leftward"],
               "right": ["going to the right", "moving rightward"], "up": ["rising", "floating upward"],
               "down": ["falling", "sinking downward"], "still": ["sitting still", "not moving"]},
    "background": {"black": ["black", "dark"], "white": ["white"], "gray": ["grey", "gray"]},
}
_CHINESE = {
    "color": {"red": "红色", "green": "绿色", "blue": "蓝色", "yellow": "黄色", "magenta": "品红色", "cyan": "青色"},
    "shape": {"circle": "圆形", "square": "方块", "triangle": "三角形"},
    "motion": {"left": "向左移动", "right": "向右移动", "up": "向上移动", "down": "向下移动", "still": "静止不动"},
    "background": {"black": "黑色", "white": "白色", "gray": "灰色"},
}


def paraphrase(sample) -> str:
    """A user's wording of the sample's prompt, drawn deterministically from its index."""
    rng = np.random.default_rng([sample.index, 7])
    form = int(rng.integers(4))
    if form == 3:
        zh = {k: _CHINESE[k][getattr(sample, k)] for k in _CHINESE}
        return f"{zh['background']}背景上，一个{zh['color']}的{zh['shape']}{zh['motion']}"
    say = {k: str(rng.choice(_SAYINGS[k][getattr(sample, k)])) for k in _SAYINGS}
    return [
        "{color} {shape} {motion}, {background} backdrop",
        "on a {background} background, a {color} {shape} {motion}",
        "{shape} ({color}) {motion} over {background}",
    ][form].format(**say)


def _word(value, value_range, words):
    # The range in equal thirds: low, middle, high.
    lo, hi = value_range
    third = min(int((value - lo) / (hi - lo) * 3), 2)
    return words[max(third, 0)]


def _place_words(point, width, height):
    col = ("left", "", "right")[min(int(point[0] / width * 3), 2)]
    row = ("top", "", "bottom")[min(int(point[1] / height * 3), 2)]
    return "the " + (f"{row} {col}".strip() or "centre")


def sample_spec(seed, index, split, kind="video", size=None, frames=None):
    """Draw sample `index` of a split, deterministically from (seed, index, split, kind).

    size: (height, width), drawn from ASPECT_BUCKETS when None; frames: drawn from
    DURATION_BUCKETS when None (a video), always 1 for an image. Images are still: an image has no
    motion, so its caption says "stays still". Train never draws a HELD_OUT pair; eval draws one
    for every EVAL_HELD_OUT_EVERY-th index. Speeds are uniform in SPEED_RANGE, narrowed where a
    long clip's path would not fit the canvas (33 frames on 64 px: at most ~1.3 px/frame).
    """
    if split not in SPLITS:
        raise HvctlError(f"toy split {split!r}: expected one of {', '.join(SPLITS)}")
    if kind not in KINDS:
        raise HvctlError(f"toy sample kind {kind!r}: expected one of {', '.join(KINDS)}")
    if seed < 0 or index < 0:
        raise HvctlError(f"toy sample seed {seed}, index {index}: both must be >= 0")
    # One vector of uniforms, always drawn whole: fixing size or frames changes nothing else.
    rng = np.random.default_rng([seed, index, SPLITS.index(split), KINDS.index(kind)])
    u = rng.random(9)

    held_out = split == "eval" and index % EVAL_HELD_OUT_EVERY == 0
    color, shape = _pick(HELD_OUT if held_out else TRAIN_PAIRS, u[0])
    background = _pick(tuple(BACKGROUNDS), u[1])
    motion = "still" if kind == "image" else _pick(MOTIONS, u[2])
    height, width = size if size is not None else _pick(ASPECT_BUCKETS, u[3])
    if height <= 0 or width <= 0 or height % 16 or width % 16:
        raise HvctlError(f"toy size {height}x{width}: height and width must be positive multiples of 16")
    if kind == "image":
        if frames not in (None, 1):
            raise HvctlError(f"toy image with {frames} frames: an image is 1 frame")
        frames = 1
    elif frames is None:
        frames = _pick(DURATION_BUCKETS, u[4])
    elif frames < 5 or (frames - 1) % 4:
        raise HvctlError(f"toy video with {frames} frames: a video has 4k+1 frames, k >= 1")

    scale = min(height, width) / BASE_SIDE
    radius = scale * (RADIUS_RANGE[0] + u[5] * (RADIUS_RANGE[1] - RADIUS_RANGE[0]))
    dx, dy = DIRECTIONS[motion]
    speed = 0.0
    if motion != "still":
        room = (width if dx else height) - 2 * radius
        hi = min(scale * SPEED_RANGE[1], room / (frames - 1))
        lo = min(scale * SPEED_RANGE[0], hi)
        speed = lo + u[6] * (hi - lo)
    travel = speed * (frames - 1)

    def start_coord(x, extent, direction):
        # Uniform over the starts that keep the whole path (object included) inside [0, extent].
        lo = radius + travel * max(-direction, 0)
        hi = extent - radius - travel * max(direction, 0)
        return lo + x * (hi - lo)

    start = (float(start_coord(u[7], width, dx)), float(start_coord(u[8], height, dy)))
    return ToySample(
        index, split, color, shape, motion, background, height, width, frames, float(radius), float(speed), start
    )


def _pick(options, u):
    """The option that the uniform u in [0, 1) falls on."""
    return options[min(int(u * len(options)), len(options) - 1)]


def render(sample):
    """Frames [T,H,W,3] uint8: the flat object on its flat background, anti-aliased by supersampling."""
    offsets = (np.arange(SUPERSAMPLE) + 0.5) / SUPERSAMPLE
    background = np.array(BACKGROUNDS[sample.background], dtype=np.float64)
    color = np.array(OBJECT_COLORS[sample.color], dtype=np.float64)
    video = np.empty((sample.frames, sample.height, sample.width, 3), dtype=np.uint8)
    video[:] = BACKGROUNDS[sample.background]
    r = sample.radius
    for t in range(sample.frames):
        cx, cy = sample.centre(t)
        # Only the pixels around the object need sampling; the rest is background.
        top, bottom = max(int(cy - r), 0), min(math.ceil(cy + r) + 1, sample.height)
        left, right = max(int(cx - r), 0), min(math.ceil(cx + r) + 1, sample.width)
        xs = (np.arange(left, right)[:, None] + offsets).reshape(1, -1)
        ys = (np.arange(top, bottom)[:, None] + offsets).reshape(-1, 1)
        inside = _inside(sample.shape, xs - cx, ys - cy, r)
        coverage = inside.reshape(bottom - top, SUPERSAMPLE, right - left, SUPERSAMPLE).mean(axis=(1, 3))
        video[t, top:bottom, left:right] = np.rint(background + coverage[..., None] * (color - background))
    return video


def _inside(shape, dx, dy, r):
    if shape == "circle":
        return dx * dx + dy * dy <= r * r
    if shape == "square":
        return (np.abs(dx) <= r) & (np.abs(dy) <= r)
    # Triangle, apex up at (0, -r), base at y = r/2: inscribed in the circle of radius r.
    return (dy <= r / 2) & (np.abs(dx) * math.sqrt(3) <= dy + r)


# --- measurement from pixels (toy-world.md, "What is measured") ---

FAR_FROM_BACKGROUND = 48.0  # RGB distance; object/background pairs are >= 120 apart, codec noise < 20
MIN_OBJECT_PIXELS = 4
COVERAGE_FLOOR = 0.1  # coverage below this is codec noise, not object
# Fill ratio of the object in its bounding box: triangle 0.5, circle pi/4 ~ 0.785, square 1.0.
# Measured on a 64 px short side a triangle reads 0.53-0.71 (its apex is thinner than a pixel
# row, and H.264's half-resolution chroma rounds it further), a circle 0.77-0.83, a square above
# 0.98: hence a triangle threshold nearer the circle than the midpoint 0.64.
TRIANGLE_BELOW, CIRCLE_BELOW = 0.74, 0.9


def measure(frames):
    """What a video (or one [H,W,3] image) shows, measured from pixels only.

    Returns background, color, shape, motion (names; the last three None when no object is
    found) and the figures behind them: background_rgb, color_rgb, fill_ratio, displacement
    (dx, dy) of the centroid in px, mean object area in px, area_cv (coefficient of variation of
    the area over frames) and visible_frames.
    """
    video = np.asarray(frames)
    if video.ndim == 3:
        video = video[None]
    pixels = video.astype(np.float32)
    border = np.concatenate([pixels[:, 0], pixels[:, -1], pixels[:, :, 0], pixels[:, :, -1]], axis=1)
    background_rgb = np.median(border.reshape(-1, 3), axis=0)
    result = {
        "background": _nearest(BACKGROUNDS, background_rgb),
        "color": None, "shape": None, "motion": None,
        "background_rgb": background_rgb.tolist(), "color_rgb": None, "fill_ratio": None,
        "displacement": None, "start": None, "area": 0.0, "area_cv": None, "visible_frames": 0,
    }
    far = np.linalg.norm(pixels - background_rgb, axis=-1) > FAR_FROM_BACKGROUND
    if far.sum() < MIN_OBJECT_PIXELS:
        return result
    # Each pixel as a blend of background and object colour: its coverage, as the renderer's
    # anti-aliasing made it. The object mask is coverage > 1/2 (nearer the object's colour than
    # the background's), which keeps areas unbiased.
    contrast = np.median(pixels[far], axis=0) - background_rgb
    if np.linalg.norm(contrast) < FAR_FROM_BACKGROUND:  # scattered colours, no one object
        return result
    coverage = np.clip((pixels - background_rgb) @ contrast / (contrast @ contrast), 0.0, 1.0)
    mask = coverage > 0.5
    areas = mask.sum(axis=(1, 2))
    visible = np.flatnonzero(areas >= MIN_OBJECT_PIXELS)
    if visible.size == 0:
        return result
    color_rgb = np.median(pixels[mask], axis=0)
    fill = float(np.median([_fill_ratio(coverage[t], mask[t]) for t in visible]))
    first, last = _centroid(mask[visible[0]]), _centroid(mask[visible[-1]])
    dx, dy = last[0] - first[0], last[1] - first[1]
    visible_areas = areas[visible].astype(np.float64)
    result.update(
        color=_nearest(OBJECT_COLORS, color_rgb),
        shape="triangle" if fill < TRIANGLE_BELOW else "circle" if fill < CIRCLE_BELOW else "square",
        motion=_motion(dx, dy, STILL_UNDER * min(video.shape[1:3]) / BASE_SIDE),
        color_rgb=color_rgb.tolist(),
        fill_ratio=fill,
        displacement=(float(dx), float(dy)),
        start=(float(first[0]), float(first[1])),
        area=float(visible_areas.mean()),
        area_cv=float(visible_areas.std() / visible_areas.mean()),
        visible_frames=int(visible.size),
    )
    return result


def _nearest(palette, rgb):
    return min(palette, key=lambda name: float(np.sum((np.array(palette[name]) - rgb) ** 2)))


def _fill_ratio(coverage, mask):
    """Object area over bounding-box area, both at sub-pixel precision from the coverage.

    A whole-pixel box of the mask drops the partly covered rows and columns at the edges, which
    at 64 px moves a ratio by up to 0.1; summing coverage for the area and each row's (column's)
    largest coverage for the box height (width) does not.
    """
    rows, cols = np.flatnonzero(mask.any(axis=1)), np.flatnonzero(mask.any(axis=0))
    window = coverage[max(rows[0] - 1, 0):rows[-1] + 2, max(cols[0] - 1, 0):cols[-1] + 2]
    window = np.where(window < COVERAGE_FLOOR, 0.0, window)
    return window.sum() / (window.max(axis=1).sum() * window.max(axis=0).sum())


def _centroid(mask):
    ys, xs = np.nonzero(mask)
    return xs.mean(), ys.mean()


def _motion(dx, dy, still_under):
    if max(abs(dx), abs(dy)) < still_under:
        return "still"
    if abs(dx) >= abs(dy):
        return "right" if dx > 0 else "left"
    return "down" if dy > 0 else "up"
