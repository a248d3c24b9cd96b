"""Aspect-ratio and duration buckets: every sample is trained at one of a few fixed shapes.

A clip goes to the bucket nearest its aspect ratio (in log space, so 1:2 and 2:1 are equally far
from 1:1) and to the longest frame bucket it can fill; `fit_to_bucket` then crops and resizes it.
"""

import math
from dataclasses import dataclass, field

import av
import numpy as np

from hvctl.errors import HvctlError
from hvctl.data.formats import ASPECT_BUCKETS, DURATION_BUCKETS


@dataclass
class BucketConfig:
    aspect_buckets: list[tuple[int, int]] = field(default_factory=lambda: list(ASPECT_BUCKETS))  # (h, w)
    frame_buckets: list[int] = field(default_factory=lambda: list(DURATION_BUCKETS))

    def admits(self, bucket, media=("image", "video")) -> bool:
        """Whether a (h, w, frames) bucket, assigned elsewhere (e.g. at encode time), belongs to this
        config; a list set to None admits any value."""
        h, w, n = bucket
        frames_ok = self.frame_buckets is None or n in self.frame_buckets
        kind_ok = ("image" in media) if n == 1 else ("video" in media and frames_ok)
        return kind_ok and (self.aspect_buckets is None or (h, w) in [tuple(b) for b in self.aspect_buckets])


def assign_bucket(width, height, frames, cfg):
    """(h, w, frames) of the bucket for a clip, or None when a video is shorter than every frame bucket.

    Aspect: the bucket whose log(h/w) is nearest the clip's; on a tie the one listed first.
    Frames: the largest frame bucket <= the clip's frames; an image (frames == 1) stays 1 frame.
    """
    if width < 1 or height < 1 or frames < 1:
        raise HvctlError(f"clip of {width}x{height}, {frames} frames: sizes and frame count must be positive")
    log_aspect = math.log(height / width)
    # Rounded so that mathematically equal distances (a tie) compare equal despite float error.
    h, w = min(cfg.aspect_buckets, key=lambda hw: round(abs(math.log(hw[0] / hw[1]) - log_aspect), 9))
    if frames == 1:
        return h, w, 1
    fitting = [n for n in cfg.frame_buckets if n <= frames]
    return (h, w, max(fitting)) if fitting else None


def fit_to_bucket(frames, bucket):
    """Crop and resize frames [T,H,W,3] uint8 to bucket (h, w, n): [n,h,w,3].

    Time: the first n frames (the start of a clip is where a shot detector cut it, so it is the
    most reliable part). Space: the centred crop with the bucket's aspect ratio, as large as fits,
    then an area-averaging resize (ffmpeg's swscale) to exactly h x w; equivalent to scaling the
    clip until it covers the bucket and cropping the centre, within a pixel.
    """
    h, w, n = bucket
    frames = np.asarray(frames)
    if frames.ndim != 4 or frames.shape[-1] != 3 or frames.dtype != np.uint8:
        raise HvctlError(f"fit_to_bucket: expected uint8 frames [T,H,W,3], got {frames.dtype} {frames.shape}")
    count, height, width = frames.shape[:3]
    if count < n:
        raise HvctlError(f"fit_to_bucket: {count} frames cannot fill a {n}-frame bucket")
    scale = max(h / height, w / width)
    crop_h, crop_w = min(height, round(h / scale)), min(width, round(w / scale))
    top, left = (height - crop_h) // 2, (width - crop_w) // 2
    out = np.empty((n, h, w, 3), dtype=np.uint8)
    for t in range(n):
        crop = np.ascontiguousarray(frames[t, top:top + crop_h, left:left + crop_w])
        frame = av.VideoFrame.from_ndarray(crop, format="rgb24")
        out[t] = frame.reformat(width=w, height=h, format="rgb24", interpolation="AREA").to_ndarray()
    return out
