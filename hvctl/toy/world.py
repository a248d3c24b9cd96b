"""The toy world as data and pure numpy functions: draw a sample, render it, measure it back.

This file follows shared/design/toy-world.md, the contract that the renderer, the captioner and
the evaluator share. Coordinates are in pixels, x to the right and y downward, with pixel (i, j)
covering [j, j+1) x [i, i+1); an object is placed by its centre.
"""

import math
from dataclasses import dataclass

import numpy as np

from hvctl.data.formats import ASPECT_BUCKETS, AUDIO_RATE, DURATION_BUCKETS, is_frame_count
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
        return structured_caption(self.prompt(), self._dense_description(), self.background, moving=not still,
                                  tags=[self.kind, "single object", "still" if still else "moving"])

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


def structured_caption(short, dense, background, moving, tags):
    """A toy sample's structured caption: its own sentences and tags, the rest the world's constants."""
    return {
        "short_description": short,
        "dense_description": dense,
        "background": f"a plain {background} background",
        "style": "flat 2D graphics",
        "shot_type": "static wide shot",
        "lighting": "flat, even",
        "atmosphere": "lively" if moving else "calm",
        "camera_movement": "static",
        "additional_metadata": {
            "source_tags": ["toy world", "synthetic"],
            "quality_tags": ["clean", "anti-aliased"],
            "other_tags": tags,
        },
    }


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
    elif not is_frame_count(frames):
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
    centres = [sample.centre(t) for t in range(sample.frames)]
    radii = np.full(sample.frames, sample.radius)
    return draw(sample.shape, sample.color, sample.background, (sample.height, sample.width), centres, radii)


def draw(shape, color, background, size, centres, radii, angles=None):
    """Frames [T,H,W,3] uint8: frame t shows the object at centres[t] (x, y), radius radii[t] and
    rotation angles[t] (radians, clockwise on screen; None: unrotated) on its background."""
    height, width = size
    offsets = (np.arange(SUPERSAMPLE) + 0.5) / SUPERSAMPLE
    background_rgb = np.array(BACKGROUNDS[background], dtype=np.float64)
    color_rgb = np.array(OBJECT_COLORS[color], dtype=np.float64)
    video = np.empty((len(centres), height, width, 3), dtype=np.uint8)
    video[:] = BACKGROUNDS[background]
    for t, (cx, cy) in enumerate(centres):
        r, theta = radii[t], 0.0 if angles is None else angles[t]
        # Only the pixels around the object need sampling; the rest is background. A turned
        # square's corners reach out to r * sqrt(2); circle and triangle stay within r.
        reach = r * math.sqrt(2) if shape == "square" and theta else r
        top, bottom = max(int(cy - reach), 0), min(math.ceil(cy + reach) + 1, height)
        left, right = max(int(cx - reach), 0), min(math.ceil(cx + reach) + 1, width)
        if top >= bottom or left >= right:
            continue
        xs = (np.arange(left, right)[:, None] + offsets).reshape(1, -1) - cx
        ys = (np.arange(top, bottom)[:, None] + offsets).reshape(-1, 1) - cy
        if theta:
            # The drawn shape is the unrotated one turned by theta: a sample point is inside when
            # it, turned back by -theta, is inside the unrotated shape.
            cos, sin = math.cos(theta), math.sin(theta)
            xs, ys = xs * cos + ys * sin, ys * cos - xs * sin
        inside = _inside(shape, xs, ys, r)
        coverage = inside.reshape(bottom - top, SUPERSAMPLE, right - left, SUPERSAMPLE).mean(axis=(1, 3))
        video[t, top:bottom, left:right] = np.rint(background_rgb + coverage[..., None] * (color_rgb - background_rgb))
    return video


def object_mask(sample, frames):
    """The object's coverage of each pixel of `render(sample)`'s frames, as grey frames [T,H,W,3]
    uint8 (255: all object, 0: all background): a pixel is background + c * (colour - background)."""
    background = np.array(BACKGROUNDS[sample.background], dtype=np.float64)
    step = np.array(OBJECT_COLORS[sample.color], dtype=np.float64) - background
    coverage = (frames.astype(np.float64) - background) @ step / (step @ step)
    grey = np.rint(np.clip(coverage, 0.0, 1.0) * 255).astype(np.uint8)
    return np.repeat(grey[..., None], 3, axis=-1)


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
# Shape: a shape with n-fold symmetry has a non-zero n-fold angular moment
# |sum w rho^2 e^{i n phi}| / sum w rho^2 and none for the other n: a triangle (3-fold) about 0.54
# at n=3 and 0 at n=4, a square (4-fold) 0.29 at n=4 and 0 at n=3, a circle neither. The test is
# rotation invariant and survives blur. Through the toy VAE, which rounds corners, a triangle kept
# 0.16-0.47 at n=3 (n=4 under 0.09), a square 0.12-0.28 at n=4 (n=3 under 0.04), a circle mostly
# both under 0.04: whichever of the two is larger decides, under ROUND_BELOW the shape is a circle.
# toy-world.md names the bounding-box fill ratio instead, but that reads blurred triangles as
# circles: on the 96 eval videos passed through the toy VAE it got 76% of shapes right, this 93%.
ROUND_BELOW = 0.07
SYMMETRY = {"square": 4, "triangle": 3}  # rotational symmetry of the shapes that show a rotation
# arg(c_n) of the unrotated shape: the square's corners at phi = +-pi/4, +-3pi/4 give
# e^{4i phi} = -1; the triangle's apex at phi = -pi/2 (y down) gives e^{-3i pi/2} = i.
UNROTATED_PHASE = {"square": math.pi, "triangle": math.pi / 2}


def track_object(frames, shape=None):
    """Per-frame position, size and rotation of the one object in a video, from pixels only.

    Returns centre [T,2] (x, y centroid; NaN where no object), area [T] (px, coverage-weighted),
    size [T] (sqrt(area); 0 where no object), angle [T] (rotation in radians, clockwise, within the
    shape's symmetry; NaN for a circle or where no object), visible [T] (bool), the names color,
    shape, background (color and shape None when no object shows), the RGB behind them
    (color_rgb, background_rgb) and symmetry, the median 3- and 4-fold moments behind the shape.
    shape: the shape whose symmetry the angle is read with; None: the measured one.
    """
    video = np.asarray(frames)
    if video.ndim == 3:
        video = video[None]
    count = video.shape[0]
    pixels = video.astype(np.float32)
    background_rgb = _background_rgb(pixels)
    result = {
        "centre": np.full((count, 2), np.nan), "area": np.zeros(count), "size": np.zeros(count),
        "angle": np.full(count, np.nan), "visible": np.zeros(count, dtype=bool),
        "color": None, "shape": None, "background": _nearest(BACKGROUNDS, background_rgb), "symmetry": None,
        "background_rgb": background_rgb.tolist(), "color_rgb": None,
    }
    coverage = _coverage(pixels, background_rgb)
    if coverage is None:
        return result
    mask = coverage > 0.5
    weights = np.where(coverage < COVERAGE_FLOOR, 0.0, coverage)  # codec noise is no object
    ys, xs = np.mgrid[:video.shape[1], :video.shape[2]] + 0.5  # pixel centres
    visible = np.flatnonzero(mask.sum(axis=(1, 2)) >= MIN_OBJECT_PIXELS)
    if visible.size == 0:
        return result
    moments = {}
    for t in visible:
        w = weights[t]
        area = w.sum()
        cx, cy = (w * xs).sum() / area, (w * ys).sum() / area
        result["centre"][t], result["area"][t] = (cx, cy), area
        moments[t] = {n: _angular_moment(w, xs - cx, ys - cy, n) for n in (3, 4)}
    m3, m4 = (float(np.median([abs(m[n]) for m in moments.values()])) for n in (3, 4))
    result["visible"][visible] = True
    color_rgb = np.median(pixels[mask], axis=0)
    result.update(
        size=np.sqrt(result["area"]), symmetry=(m3, m4),
        shape="circle" if max(m3, m4) < ROUND_BELOW else "triangle" if m3 > m4 else "square",
        color=_nearest(OBJECT_COLORS, color_rgb), color_rgb=color_rgb.tolist(),
    )
    read_as = shape or result["shape"]
    if read_as in SYMMETRY:
        n = SYMMETRY[read_as]
        for t in visible:  # turning the shape by theta turns its n-fold moment by n theta
            result["angle"][t] = _wrap((np.angle(moments[t][n]) - UNROTATED_PHASE[read_as]) / n, 2 * math.pi / n)
    return result


def _angular_moment(weights, dx, dy, n):
    """sum w rho^2 e^{i n phi} / sum w rho^2 around the centroid (complex)."""
    rho2 = dx * dx + dy * dy
    return (weights * rho2 * np.exp(1j * n * np.arctan2(dy, dx))).sum() / (weights * rho2).sum()


def _wrap(angle, period):
    """angle into (-period/2, period/2]."""
    half = period / 2
    return half - np.mod(half - angle, period)


def measure(frames):
    """What a video (or one [H,W,3] image) shows, measured from pixels only (track_object).

    Returns background, color, shape, motion (names; the last three None when no object is
    found) and the figures behind them: background_rgb, color_rgb, symmetry (the 3- and 4-fold
    moments behind the shape), displacement (dx, dy) of the centroid in px from the first to the
    last frame showing the object, its start, mean object area in px, area_cv (coefficient of
    variation of the area over frames) and visible_frames.
    """
    video = np.asarray(frames)
    track = track_object(video)
    result = {
        "background": track["background"], "color": track["color"], "shape": track["shape"], "motion": None,
        "background_rgb": track["background_rgb"], "color_rgb": track["color_rgb"], "symmetry": track["symmetry"],
        "displacement": None, "start": None, "area": 0.0, "area_cv": None, "visible_frames": int(track["visible"].sum()),
    }
    if track["shape"] is None:
        return result
    visible = np.flatnonzero(track["visible"])
    first, last = track["centre"][visible[0]], track["centre"][visible[-1]]
    dx, dy = last - first
    areas = track["area"][visible]
    height, width = video.shape[-3:-1]
    result.update(
        motion=_motion(dx, dy, STILL_UNDER * min(height, width) / BASE_SIDE),
        displacement=(float(dx), float(dy)), start=(float(first[0]), float(first[1])),
        area=float(areas.mean()), area_cv=float(areas.std() / areas.mean()),
    )
    return result


def _background_rgb(pixels):
    """The median colour of the border pixels of float frames [T,H,W,3]."""
    border = np.concatenate([pixels[:, 0], pixels[:, -1], pixels[:, :, 0], pixels[:, :, -1]], axis=1)
    return np.median(border.reshape(-1, 3), axis=0)


def _coverage(pixels, background_rgb):
    """Each pixel of float frames [T,H,W,3] as a blend of background and object colour: its
    coverage in [0, 1], as the renderer's anti-aliasing made it; None when no one object shows.

    The object mask is coverage > 1/2 (nearer the object's colour than the background's), which
    keeps areas unbiased.
    """
    far = np.linalg.norm(pixels - background_rgb, axis=-1) > FAR_FROM_BACKGROUND
    if far.sum() < MIN_OBJECT_PIXELS:
        return None
    contrast = np.median(pixels[far], axis=0) - background_rgb
    if np.linalg.norm(contrast) < FAR_FROM_BACKGROUND:  # scattered colours, no one object
        return None
    return np.clip((pixels - background_rgb) @ contrast / (contrast @ contrast), 0.0, 1.0)


def _nearest(palette, rgb):
    return min(palette, key=lambda name: float(np.sum((np.array(palette[name]) - rgb) ** 2)))


def _motion(dx, dy, still_under):
    if max(abs(dx), abs(dy)) < still_under:
        return "still"
    if abs(dx) >= abs(dy):
        return "right" if dx > 0 else "left"
    return "down" if dy > 0 else "up"


# --- the avatar world (toy-world.md, "Avatar") ---

AVATAR_MODES = ("audio", "pose", "expression")
TONE_HZ = 440.0
# The subsets that "hybrid" draws from: every non-empty one, each in AVATAR_MODES order.
HYBRID_SUBSETS = tuple(
    tuple(m for i, m in enumerate(AVATAR_MODES) if bits >> i & 1) for bits in range(1, 2 ** len(AVATAR_MODES))
)
_AVATAR_STREAM = 2  # the random stream's last key: sample_spec uses 0 (video) and 1 (image)
ENVELOPE_FREQ_RANGE = (0.25, 1.0)  # Hz
POSE_FREQ_RANGE = (0.2, 0.6)  # Hz
ANGLE_FREQ_RANGE = (0.2, 0.8)  # Hz
# theta's amplitude stays under pi/4: a square (4-fold symmetric) or a triangle (3-fold) turned
# by theta then never looks like one turned by another angle.
MAX_ANGLE = 0.6  # rad
AUDIO_SIZE_RANGE = (0.7, 1.3)  # r(t) / r0 = 0.7 + 0.6 a(t): 0.82 to 1.3 as a(t) runs over [0.2, 1]


@dataclass(frozen=True)
class AvatarSample:
    """One avatar sample: a toy object whose size, position and rotation the driving signals set.

    Every curve's parameters are always drawn, whatever the modes; only the modes' curves drive
    the video (the others hold the object at r0, centred, unrotated). Times are in seconds.
    """

    index: int
    split: str
    color: str
    shape: str
    background: str
    height: int
    width: int
    frames: int
    r0: float  # reference radius (as ToySample.radius)
    modes: tuple  # the driven subset of AVATAR_MODES, in that order; () drives nothing
    # a(t) = 0.6 + 0.4 * sum(amp * sin(2 pi freq t + phase)) / sum(amp), in [0.2, 1.0]
    envelope_freqs: tuple
    envelope_amps: tuple
    envelope_phases: tuple
    # centre: x(t) = base_x + amp_x * sin(2 pi freq_x t + phase_x), likewise y
    pose_base: tuple
    pose_amp: tuple
    pose_freq: tuple
    pose_phase: tuple
    # theta(t) = sum(amp * sin(2 pi freq t + phase)), sum(amp) <= MAX_ANGLE
    angle_freqs: tuple
    angle_amps: tuple
    angle_phases: tuple

    @classmethod
    def from_dict(cls, fields):
        """The sample back from its manifest form (render_avatar_dataset's `toy_avatar`)."""
        return cls(**{k: tuple(v) if isinstance(v, list) else v for k, v in fields.items()})

    def times(self):
        return np.arange(self.frames) / FPS

    def envelope(self, t):
        """a(t) in [0.2, 1.0], the audio's loudness, at times t (seconds; a number or an array)."""
        s = _sinusoids(t, self.envelope_freqs, self.envelope_amps, self.envelope_phases) / sum(self.envelope_amps)
        return 0.6 + 0.4 * s

    def radii(self):
        if "audio" not in self.modes:
            return np.full(self.frames, self.r0)
        low, high = AUDIO_SIZE_RANGE
        return self.r0 * (low + (high - low) * self.envelope(self.times()))

    def centres(self):
        """[frames, 2] object centre (x, y) per frame."""
        if "pose" not in self.modes:
            return np.tile([self.width / 2, self.height / 2], (self.frames, 1))
        t = self.times()[:, None]
        base, amp, freq, phase = (np.array(v) for v in (self.pose_base, self.pose_amp, self.pose_freq, self.pose_phase))
        return base + amp * np.sin(2 * np.pi * freq * t + phase)

    def angles(self):
        if "expression" not in self.modes:
            return np.zeros(self.frames)
        return _sinusoids(self.times(), self.angle_freqs, self.angle_amps, self.angle_phases)

    def audio(self):
        """float32 samples at AUDIO_RATE for frames / FPS seconds: the 440 Hz tone under a(t)."""
        t = np.arange(self.frames * AUDIO_RATE // FPS) / AUDIO_RATE
        return (self.envelope(t) * np.sin(2 * np.pi * TONE_HZ * t)).astype(np.float32)

    def pose_video(self):
        """uint8 [frames, H, W, 3]: a white 3x3 dot on black at each frame's centre.

        The dot's middle pixel is the one that holds the centre, so the dot's own centre is within
        half a pixel of it (pixel (i, j) covers [j, j+1) x [i, i+1)).
        """
        video = np.zeros((self.frames, self.height, self.width, 3), dtype=np.uint8)
        for t, (x, y) in enumerate(self.centres()):
            col, row = int(math.floor(x)), int(math.floor(y))
            video[t, max(row - 1, 0):row + 2, max(col - 1, 0):col + 2] = 255
        return video

    def expression(self):
        """float32 [frames, 2]: (cos theta, sin theta) per frame."""
        theta = self.angles()
        return np.stack([np.cos(theta), np.sin(theta)], axis=1).astype(np.float32)

    def reference(self):
        """uint8 [H, W, 3]: the object on its background, centred, at radius r0, unrotated."""
        centre = [(self.width / 2, self.height / 2)]
        return draw(self.shape, self.color, self.background, (self.height, self.width), centre, [self.r0])[0]

    def render(self):
        """uint8 [frames, H, W, 3]: the target video, the object as the driving signals set it."""
        return draw(self.shape, self.color, self.background, (self.height, self.width),
                    self.centres(), self.radii(), self.angles())

    def prompt(self):
        return f"a {self.color} {self.shape} on a {self.background} background"

    def caption(self):
        """The structured caption, shaped like ToySample.caption()."""
        return structured_caption(self.prompt(), self._dense_description(), self.background, moving=bool(self.modes),
                                  tags=["video", "single object", "avatar", *self.modes])

    def _dense_description(self):
        scale = min(self.height, self.width) / BASE_SIDE
        size = _word(self.r0 / scale, RADIUS_RANGE, ("small", "medium-sized", "large"))
        thing = f"A {size} {self.color} {self.shape}"
        driven = [clause for mode, clause in zip(AVATAR_MODES, (
            "its size swells and shrinks with the loudness of the audio",
            "its position follows the pose",
            "its rotation follows the expression",
        )) if mode in self.modes]
        if not driven:
            return f"{thing} stays still at the centre of the frame on a plain {self.background} background."
        said = driven[0] if len(driven) == 1 else ", ".join(driven[:-1]) + " and " + driven[-1]
        return f"{thing} on a plain {self.background} background: {said}."


def _sinusoids(t, freqs, amps, phases):
    t = np.asarray(t, dtype=np.float64)
    return sum(a * np.sin(2 * np.pi * f * t + p) for f, a, p in zip(freqs, amps, phases))


def avatar_modes(modes):
    """Driving modes as AvatarSample keeps them: a tuple in AVATAR_MODES order, or "hybrid".

    modes: "hybrid", a comma list ("audio,pose") or a list of names; an empty one drives nothing.
    """
    if isinstance(modes, str):
        if modes.strip() == "hybrid":
            return "hybrid"
        modes = [m.strip() for m in modes.split(",") if m.strip()]
    for mode in modes:
        if mode not in AVATAR_MODES:
            raise HvctlError(f"avatar mode {mode!r}: expected some of {', '.join(AVATAR_MODES)}, or hybrid")
    return tuple(m for m in AVATAR_MODES if m in modes)


def avatar_spec(seed, index, split, modes, size=(64, 64), frames=17):
    """Draw avatar sample `index` of a split, deterministically from (seed, index, split, modes).

    modes: see avatar_modes; "hybrid" draws a non-empty subset per sample. The object (colour,
    shape, background, r0) and every curve's randomness are drawn the same whatever the modes;
    the modes only decide what drives the video, and the pose curve's room (a larger or turning
    object needs more). Held-out pairs follow sample_spec's rule.
    """
    if split not in SPLITS:
        raise HvctlError(f"toy split {split!r}: expected one of {', '.join(SPLITS)}")
    if seed < 0 or index < 0:
        raise HvctlError(f"toy sample seed {seed}, index {index}: both must be >= 0")
    if len(size) != 2 or min(size) <= 0 or size[0] % 16 or size[1] % 16:
        raise HvctlError(f"toy size {'x'.join(map(str, size))}: expected HxW, positive multiples of 16")
    height, width = size
    if not is_frame_count(frames):
        raise HvctlError(f"toy avatar video with {frames} frames: a video has 4k+1 frames, k >= 1")
    modes = avatar_modes(modes)
    # The same uniforms are drawn in the same order whatever the modes, size and length, so these
    # change nothing else.
    u = np.random.default_rng([seed, index, SPLITS.index(split), _AVATAR_STREAM]).random

    held_out = split == "eval" and index % EVAL_HELD_OUT_EVERY == 0
    color, shape = _pick(HELD_OUT if held_out else TRAIN_PAIRS, u())
    background = _pick(tuple(BACKGROUNDS), u())
    scale = min(height, width) / BASE_SIDE
    r0 = scale * _between(RADIUS_RANGE, u())
    hybrid = _pick(HYBRID_SUBSETS, u())
    if modes == "hybrid":
        modes = hybrid

    def curve(count, freq_range, amp_range):
        # `count` sinusoids out of three drawn: (freqs, amps, phases).
        draws = [(_between(freq_range, u()), _between(amp_range, u()), 2 * math.pi * u()) for _ in range(3)]
        return tuple(zip(*draws[:count]))

    envelope = curve(_pick((1, 2, 3), u()), ENVELOPE_FREQ_RANGE, (0.2, 1.0))
    angle_freqs, angle_weights, angle_phases = curve(_pick((1, 2), u()), ANGLE_FREQ_RANGE, (0.2, 1.0))
    total = _between((0.5 * MAX_ANGLE, MAX_ANGLE), u())
    angle_amps = tuple(total * w / sum(angle_weights) for w in angle_weights)

    # The object's farthest reach from its centre, plus 1 px to spare, stays inside the canvas.
    reach = r0 * (AUDIO_SIZE_RANGE[1] if "audio" in modes else 1.0)
    if shape == "square" and "expression" in modes:
        reach *= math.sqrt(2)
    pose = []
    for extent in (width, height):
        lo, hi = reach + 1, extent - reach - 1
        amp = (hi - lo) / 4 * _between((0.5, 1.0), u())  # up to a quarter of the room: visible
        base = _between((lo + amp, hi - amp), u())
        pose.append((base, amp, _between(POSE_FREQ_RANGE, u()), 2 * math.pi * u()))
    base, amp, freq, phase = zip(*pose)
    return AvatarSample(
        index, split, color, shape, background, height, width, frames, float(r0), modes,
        *envelope, base, amp, freq, phase, angle_freqs, angle_amps, angle_phases,
    )


def _between(value_range, u):
    lo, hi = value_range
    return float(lo + u * (hi - lo))


def score_avatar(sample, frames):
    """How well one generated video follows its avatar sample's driving signals, from pixels.

    size_correlation: Pearson r of a(t) and the measured size (audio mode; 0.0 where either is
    constant); pose_error_px: mean distance of the measured centre from the pose (pose mode; a
    frame without the object counts as the canvas diagonal); rotation_error_deg: mean angle error
    within the shape's symmetry (expression mode, square or triangle; a frame without the object
    counts as the largest error). Each is None where its mode is off. Also the measured color,
    shape, background and whether each matches the sample's.
    """
    video = np.asarray(frames)
    if video.ndim != 4 or video.shape[0] != sample.frames:
        raise HvctlError(f"avatar sample {sample.index}: expected a video of {sample.frames} frames [T,H,W,3], "
                         f"got shape {video.shape}")
    track = track_object(video, shape=sample.shape)
    score = {"size_correlation": None, "pose_error_px": None, "rotation_error_deg": None}
    if "audio" in sample.modes:
        score["size_correlation"] = _pearson(sample.envelope(sample.times()), track["size"])
    if "pose" in sample.modes:
        distance = np.linalg.norm(track["centre"] - sample.centres(), axis=1)
        score["pose_error_px"] = float(np.where(np.isnan(distance), math.hypot(*video.shape[1:3]), distance).mean())
    if "expression" in sample.modes and sample.shape in SYMMETRY:
        period = 2 * math.pi / SYMMETRY[sample.shape]
        error = np.abs(_wrap(track["angle"] - sample.angles(), period))
        score["rotation_error_deg"] = float(np.degrees(np.where(np.isnan(error), period / 2, error).mean()))
    for name in ("color", "shape", "background"):
        score[f"{name}_kept"] = track[name] == getattr(sample, name)
        score[name] = track[name]
    return score


def _pearson(a, b):
    a, b = a - a.mean(), b - b.mean()
    spread = math.sqrt((a * a).sum() * (b * b).sum())
    return float((a * b).sum() / spread) if spread > 1e-9 else 0.0
