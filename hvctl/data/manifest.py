"""The manifest: one JSON object per line describing one image or video; every stage reads and writes it.

    {"id": "toy-train-v00000", "media": "media/toy-train-v00000.mp4", "kind": "video",
     "width": 64, "height": 64, "frames": 17, "fps": 8.0, "caption": {...}, "split": "train",
     ...any later stage's fields (filter scores, audio or pose paths)...}

Media paths are relative to the manifest's directory. Keys this module does not know go into
`extra` and are written back at top level unchanged, so a stage never loses another's fields.
"""

import json
import math
from dataclasses import dataclass, field
from pathlib import Path

from hvctl.data.formats import is_frame_count
from hvctl.errors import HvctlError
from hvctl.io import write_text_atomic

KINDS = ("image", "video")
SPLITS = ("train", "eval", None)
REQUIRED = ("id", "media", "kind", "width", "height", "frames")


@dataclass
class ManifestRecord:
    id: str
    media: str  # relative to the manifest's directory
    kind: str  # "image" | "video"
    width: int
    height: int
    frames: int  # 4k+1 for a video, 1 for an image
    fps: float | None = None  # required for a video
    caption: dict | None = None  # the structured caption
    split: str | None = None  # "train" | "eval" | None
    extra: dict = field(default_factory=dict)  # later stages' fields, kept at top level on disk

    def media_path(self, manifest_dir):
        return Path(manifest_dir) / self.media

    def to_dict(self):
        known = {name: getattr(self, name) for name in (*REQUIRED, "fps", "caption", "split")}
        return {**known, **self.extra}

    @classmethod
    def from_dict(cls, obj):
        """A validated record; raises ValueError saying what is wrong."""
        if not isinstance(obj, dict):
            raise ValueError(f"expected a JSON object, got {type(obj).__name__}")
        missing = [name for name in REQUIRED if name not in obj]
        if missing:
            raise ValueError(f"missing field {', '.join(missing)}")
        for name in ("id", "media"):
            if not isinstance(obj[name], str) or not obj[name]:
                raise ValueError(f"{name} must be a non-empty string, got {obj[name]!r}")
        for name in ("width", "height", "frames"):
            if not _is_int(obj[name]) or obj[name] < 1:
                raise ValueError(f"{name} must be a positive integer, got {obj[name]!r}")
        kind, frames, fps = obj["kind"], obj["frames"], obj.get("fps")
        if kind not in KINDS:
            raise ValueError(f"kind must be image or video, got {kind!r}")
        if kind == "image" and frames != 1:
            raise ValueError(f"an image has 1 frame, got {frames}")
        if kind == "video" and not is_frame_count(frames):
            raise ValueError(f"a video has 4k+1 frames (5, 9, 13, ...), got {frames}")
        if (fps is not None or kind == "video") and not (_is_number(fps) and 0 < fps < math.inf):
            raise ValueError(f"fps must be a positive number, got {fps!r}")
        if obj.get("caption") is not None and not isinstance(obj["caption"], dict):
            raise ValueError(f"caption must be a JSON object or null, got {type(obj['caption']).__name__}")
        if obj.get("split") not in SPLITS:
            raise ValueError(f"split must be train, eval or null, got {obj['split']!r}")
        if "extra" in obj:
            raise ValueError("'extra' is not a manifest field; put its keys at top level")
        extra = {key: value for key, value in obj.items() if key not in cls.__dataclass_fields__}
        return cls(
            id=obj["id"], media=obj["media"], kind=kind, width=obj["width"], height=obj["height"],
            frames=frames, fps=None if fps is None else float(fps), caption=obj.get("caption"),
            split=obj.get("split"), extra=extra,
        )


def _is_int(value):
    return isinstance(value, int) and not isinstance(value, bool)


def _is_number(value):
    return isinstance(value, (int, float)) and not isinstance(value, bool)


class BadManifestLine(HvctlError):
    """A manifest line that is not a valid record: where it is ("{path}:{lineno}") and why."""

    def __init__(self, where: str, reason: str):
        super().__init__(f"{where}: {reason}")
        self.where, self.reason = where, reason


def iter_manifest(path, on_error=None):
    """Yield the records of a manifest, in order.

    A bad line raises BadManifestLine, or, given on_error, is passed to it and skipped. Blank lines
    are skipped. Ids must be unique.
    """
    path = Path(path)
    if not path.is_file():
        raise HvctlError(f"{path}: no such manifest")
    first_line = {}
    with path.open("rb") as lines:  # bytes: a line that is not UTF-8 is reported like any bad line
        for lineno, line in enumerate(lines, 1):
            if not line.strip():
                continue
            try:
                record = ManifestRecord.from_dict(json.loads(line))
                if record.id in first_line:
                    raise ValueError(f"duplicate id {record.id!r} (first on line {first_line[record.id]})")
            except ValueError as e:  # JSONDecodeError and UnicodeDecodeError are ValueErrors
                error = BadManifestLine(f"{path}:{lineno}", str(e))
                if on_error is None:
                    raise error from None
                on_error(error)
                continue
            first_line[record.id] = lineno
            yield record


def read_manifest(path):
    return list(iter_manifest(path))


def write_manifest(path, records):
    """Validate and write records as JSONL, atomically: what read_manifest accepts, nothing else."""
    path = Path(path)
    lines, ids = [], set()
    for i, record in enumerate(records):
        try:
            clash = set(record.extra) & set(ManifestRecord.__dataclass_fields__)
            if clash:
                raise ValueError(f"extra repeats the field {', '.join(sorted(clash))}")
            if record.id in ids:
                raise ValueError("duplicate id")
            line = json.dumps(record.to_dict(), ensure_ascii=False, allow_nan=False)
            ManifestRecord.from_dict(json.loads(line))
        except (TypeError, ValueError) as e:  # TypeError: a value JSON cannot hold
            raise HvctlError(f"{path}: record {i} ({record.id!r}): {e}") from None
        ids.add(record.id)
        lines.append(line + "\n")
    return write_text_atomic(path, "".join(lines))
