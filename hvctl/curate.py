"""`hvctl curate`: raw videos and images in, a manifest of clean single-shot clips out.

After HunyuanVideo's data pipeline, each input goes through:

1. shot splitting (PySceneDetect): every shot becomes its own H.264 clip in the clips folder,
   cut to 4k+1 frames; shots shorter than `shots.min_frames` are dropped;
2. bucket assignment (hvctl.data.buckets): a clip that fits no bucket is dropped;
3. filters (plugins of kind "filter", see plugins/hvctl_filters): each scores the clip and the
   first one whose threshold it fails drops it; every score is kept in the record;
4. near-duplicate removal: a clip whose embedding (a few thumbnails) is too close to an earlier
   kept clip's is dropped, in input order, so the first of a group stays.

Outputs: the manifest (the kept clips, their scores under "curate", their bucket); next to it the
rejected list, manifest.jsonl -> manifest.rejected.jsonl (one line per dropped shot or failed
input, with the reason and the scores); and the clips folder, which keeps only the kept clips
unless `keep_rejected_clips`. An unreadable or corrupt input is reported and skipped, never fatal.

Filters see a few frames per clip, downsized (analysis_frames, analysis_size); a source is
decoded as a stream, never held whole in memory.

A manifest record's frame-aligned companions follow its clips: a loss mask (`loss_mask`, as
`hvctl toy render` writes) is cut to each shot's frames beside the clip; the other path fields
(hvctl.encode's CONDITION_FIELDS) are re-rooted to the new manifest when the clip is the source's
one shot and dropped otherwise, like its caption, since a shot of them would need its own cut.
"""

from __future__ import annotations

import json
import math
import os
import re
import shutil
import time
from collections import Counter
from contextlib import nullcontext
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, ClassVar, Literal

import numpy as np

from hvctl.data.manifest import ManifestRecord, iter_manifest, write_manifest
from hvctl.data.formats import ASPECT_BUCKETS, DURATION_BUCKETS, IMAGE_SUFFIXES, VIDEO_SUFFIXES, is_frame_count
from hvctl.errors import HvctlError
from hvctl.io import atomic_output, check_not_input, check_output_file, write_text_atomic
from hvctl.plugins import SampleFailure, create
from hvctl.progress import progress_bar

BUILTIN_FILTERS = ("clarity", "motion", "text_area")  # run unless a recipe sets them to null


@dataclass
class ShotRecipe:
    LIMITS: ClassVar[dict] = {"threshold": "> 0", "min_frames": ">= 1"}
    detector: Literal["content", "adaptive"] = "content"  # PySceneDetect's ContentDetector or AdaptiveDetector
    threshold: float = 27.0  # content: the frame-to-frame change that is a cut; adaptive: its ratio to its neighbours'
    min_frames: int = 33  # shorter shots are dropped


@dataclass
class DedupRecipe:
    LIMITS: ClassVar[dict] = {"threshold": "[-1, 1]", "frames": ">= 1", "size": ">= 1"}
    threshold: float | None = 0.98  # cosine similarity above which a clip repeats an earlier one; null: keep all
    frames: int = 4  # frames per embedding, evenly spaced
    size: int = 16  # side of each frame's thumbnail in the embedding


@dataclass
class CurateRecipe:
    KIND: ClassVar[str] = "curate"
    LIMITS: ClassVar[dict] = {"aspect_buckets": ">= 16", "frame_buckets": ">= 1", "analysis_size": ">= 1",
                              "analysis_frames": ">= 1", "crf": "[0, 51]"}
    input: Path | None = None  # a folder of videos and images, a manifest (.jsonl), or one media file
    out: Path | None = None  # the manifest of kept clips; the rejected list goes next to it
    clips_dir: Path | None = None  # None: clips/ next to the manifest
    shots: ShotRecipe = field(default_factory=ShotRecipe)
    # Registered filter name -> its options (thresholds). clarity, motion and text_area run with their
    # own defaults unless named here; null turns one off; other names add installed filters.
    filters: dict[str, dict[str, Any] | None] = field(default_factory=dict)
    dedup: DedupRecipe = field(default_factory=DedupRecipe)
    aspect_buckets: list[tuple[int, int]] = field(default_factory=lambda: list(ASPECT_BUCKETS))  # (height, width)
    frame_buckets: list[int] = field(default_factory=lambda: list(DURATION_BUCKETS))
    analysis_size: int | None = 360  # short side (px) of the frames filters see, so thresholds ignore resolution; null: as is
    analysis_frames: int = 32  # frames per clip that filters see, evenly spaced
    crf: int = 16  # H.264 quality of the written clips: lower is better and larger
    keep_rejected_clips: bool = False  # keep the files of dropped clips (the rejected list names them)


@dataclass
class Source:
    """One input file: a video or an image, maybe with its manifest record."""

    id: str
    path: Path
    kind: str  # "image" | "video"
    record: ManifestRecord | None = None  # when the input is a manifest
    manifest_dir: Path | None = None  # its folder, which the record's paths are relative to


@dataclass
class Clip:
    """One shot written to the clips folder, with what the stage measured of it."""

    id: str
    source: Source
    path: Path
    kind: str
    width: int
    height: int
    frames: int
    fps: float | None
    bucket: tuple[int, int, int]
    shot: dict | None  # {"index", "start_frame", "end_frame"} in the source; None for an image
    only_shot: bool  # the source's one shot: its caption still describes the clip
    analysis: np.ndarray | None = None  # the frames filters see, until scored
    step: float = 1.0  # source frames between two analysis frames
    scores: dict = field(default_factory=dict)
    embedding: np.ndarray | None = None
    loss_mask: Path | None = None  # the source's loss mask cut to this clip, beside it

    def files(self) -> list[Path]:
        return [self.path] + ([self.loss_mask] if self.loss_mask is not None else [])


def curate(r: CurateRecipe, *, progress: bool | None = None, on_problem=None) -> dict:
    """Run a curate recipe; returns the summary (counts per reason, failures, output paths).

    on_problem(message) hears each failed input as it happens (the CLI prints it).
    """
    from hvctl.data.buckets import BucketConfig

    check_recipe(r)
    filters = make_filters(r.filters)
    out = Path(r.out)
    check_output_file(out, "--out")
    check_not_input(out, [r.input], "--out")
    check_output_file(rejected_list_path(out), "--out")
    clips_dir = Path(r.clips_dir) if r.clips_dir is not None else out.parent / "clips"
    buckets = BucketConfig(aspect_buckets=[tuple(b) for b in r.aspect_buckets], frame_buckets=list(r.frame_buckets))
    started = time.perf_counter()
    rejected: list[dict] = []  # one entry per dropped shot or failed input
    failed: list[dict] = []
    dropped_clips: list[Clip] = []  # written, then rejected: their files go unless keep_rejected_clips

    def reject(clip, reason, detail, **fields):
        dropped_clips.append(clip)
        entry = {"id": clip.id, "source": str(clip.source.path), "reason": reason, "detail": detail}
        if r.keep_rejected_clips:
            entry["media"] = _relative(clip.path, out.parent)
        rejected.append({**entry, "curate": {**_curate_fields(clip, out.parent), **fields}})

    def fail(source_id, path, reason):
        failed.append({"id": source_id, "source": str(path), "reason": reason})
        rejected.append({"id": source_id, "source": str(path), "reason": "failed", "detail": reason})
        if on_problem:
            on_problem(f"failed {path}: {reason}")

    sources = find_sources(Path(r.input), exclude=clips_dir, on_bad_line=fail)
    passed: list[Clip] = []
    shots = 0
    with progress_bar(len(sources), "curating", enabled=progress) as advance:
        for source in sources:
            try:
                clips, dropped, count = process_source(source, r, filters, buckets, clips_dir)
            except HvctlError as e:
                fail(source.id, source.path, str(e).removeprefix(f"{source.path}: "))
                clips, dropped, count = [], [], 0
            shots += count
            rejected += dropped
            for clip in clips:
                failing = first_failing(filters, clip.scores)
                if failing is None:
                    passed.append(clip)
                else:
                    reject(clip, failing, f"{failing} {clip.scores[failing]:.4g} fails {filters[failing].rule}")
            advance()

    kept = []
    for clip, original, similarity in find_duplicates(passed, r.dedup.threshold):
        if original is None:
            kept.append(clip)
        else:
            reject(clip, "duplicate", f"cosine similarity {similarity:.4f} to {original.id}",
                   duplicate_of=original.id, similarity=round(similarity, 6))

    write_manifest(out, [clip_record(clip, out.parent) for clip in kept])
    rejected_path = rejected_list_path(out)
    write_text_atomic(rejected_path, "".join(json.dumps(e, ensure_ascii=False) + "\n" for e in rejected))
    if not r.keep_rejected_clips:
        for clip in dropped_clips:
            for path in clip.files():
                path.unlink(missing_ok=True)
    reasons = [e["reason"] for e in rejected]
    return {
        "manifest": str(out), "rejected": str(rejected_path), "clips_dir": str(clips_dir),
        "inputs": len(sources) + sum(1 for f in failed if f["id"] is None), "shots": shots,
        "short_shots": reasons.count("short_shot"), "no_bucket": reasons.count("no_bucket"),
        "removed": {name: reasons.count(name) for name in filters},
        "rules": {name: f.rule for name, f in filters.items()},
        "duplicates": reasons.count("duplicate"), "kept": len(kept), "failed": failed,
        "seconds": round(time.perf_counter() - started, 3),
    }


def rejected_list_path(out: Path) -> Path:
    """Where the rejected list of a manifest goes: manifest.jsonl -> manifest.rejected.jsonl."""
    return out.with_name(f"{out.stem}.rejected.jsonl")


def check_recipe(r: CurateRecipe) -> None:
    if r.input is None or r.out is None:
        raise HvctlError("curate needs an input and an output manifest (INPUT --out MANIFEST)")
    problems = [
        (r.shots.min_frames < 5, f"'shots.min_frames' must be at least 5 (a video clip has 4k+1 >= 5 frames), got {r.shots.min_frames}"),
        (r.shots.threshold <= 0, f"'shots.threshold' must be positive, got {r.shots.threshold}"),
        (r.analysis_size is not None and r.analysis_size < 16, f"'analysis_size' must be at least 16 or null, got {r.analysis_size}"),
        (r.analysis_frames < 2, f"'analysis_frames' must be at least 2 (motion needs a pair), got {r.analysis_frames}"),
        (r.dedup.threshold is not None and not 0 < r.dedup.threshold <= 1, f"'dedup.threshold' must be in (0, 1] or null, got {r.dedup.threshold}"),
        (r.dedup.frames < 1 or r.dedup.size < 2, f"'dedup.frames' must be >= 1 and 'dedup.size' >= 2, got {r.dedup.frames} and {r.dedup.size}"),
        (not 0 <= r.crf <= 51, f"'crf' must be in 0..51, got {r.crf}"),
        (not r.frame_buckets or not all(is_frame_count(f) for f in r.frame_buckets), f"'frame_buckets' must all be 4k+1 >= 5, got {r.frame_buckets}"),
        (not r.aspect_buckets or any(h % 16 or w % 16 or h < 16 or w < 16 for h, w in r.aspect_buckets), f"'aspect_buckets' must be multiples of 16, got {r.aspect_buckets}"),
    ]
    for bad, message in problems:
        if bad:
            raise HvctlError(message)


def make_filters(spec: dict[str, dict | None]) -> dict:
    """name -> filter object: the built-ins unless set to null, then the recipe's others, in order."""
    options = {name: {} for name in BUILTIN_FILTERS}
    options.update(spec)
    return {name: create("filter", name, **opts) for name, opts in options.items() if opts is not None}


def first_failing(filters: dict, scores: dict) -> str | None:
    """The first filter, in recipe order, whose threshold the scores fail; None when all pass."""
    return next((name for name, f in filters.items() if name in scores and not f.keep(scores[name])), None)


# --- inputs -------------------------------------------------------------------


def find_sources(path: Path, exclude: Path, on_bad_line=None) -> list[Source]:
    """The inputs, in a fixed order: a folder's media files (recursively, sorted), a manifest's
    records, or one media file. Hidden files and the clips folder itself are skipped."""
    if path.is_dir():
        files = sorted(p for p in path.rglob("*") if p.is_file() and _media_kind(p)
                       and not any(part.startswith(".") for part in p.relative_to(path).parts)
                       and not p.resolve().is_relative_to(exclude.resolve()))
        if not files:
            raise HvctlError(f"{path}: no videos ({', '.join(VIDEO_SUFFIXES)}) or images ({', '.join(IMAGE_SUFFIXES)}) in this folder")
        ids = _ids_for([p.relative_to(path) for p in files])
        return [Source(i, p, _media_kind(p)) for i, p in zip(ids, files)]
    if path.is_file() and _media_kind(path):
        return [Source(path.stem, path, _media_kind(path))]
    if path.is_file():
        on_error = None if on_bad_line is None else (lambda e: on_bad_line(None, e.where, e.reason))
        return [Source(rec.id, rec.media_path(path.parent), rec.kind, rec, path.parent) for rec in iter_manifest(path, on_error=on_error)]
    raise HvctlError(f"{path}: no such file or folder")


def _media_kind(path: Path) -> str | None:
    suffix = path.suffix.lower()
    return "video" if suffix in VIDEO_SUFFIXES else "image" if suffix in IMAGE_SUFFIXES else None


def _ids_for(relative_paths: list[Path]) -> list[str]:
    """Ids from paths: "a/b.mp4" -> "a-b"; where two files share a stem, the suffix tells them apart."""
    stems = ["-".join(p.with_suffix("").parts) for p in relative_paths]
    shared = {stem for stem, n in Counter(stems).items() if n > 1}
    return [f"{stem}-{p.suffix.lstrip('.').lower()}" if stem in shared else stem for stem, p in zip(stems, relative_paths)]


def _file_name(clip_id: str) -> str:
    return re.sub(r"[^\w.-]", "_", clip_id)  # a manifest id may hold characters a file name must not


# --- shots --------------------------------------------------------------------


def process_source(source: Source, r: CurateRecipe, filters: dict, buckets, clips_dir: Path) -> tuple[list[Clip], list[dict], int]:
    """Write the source's usable shots as clips and score them: (clips, rejections of its other
    shots, its shot count). An unreadable input raises HvctlError, leaving none of its clips behind."""
    written: list[Clip] = []
    try:
        if source.kind == "image":
            written.append(_image_clip(source, buckets, clips_dir, r.analysis_size))
            dropped = []
        else:
            dropped = _video_clips(source, r, buckets, clips_dir, written)
        for clip in written:
            score_clip(clip, filters, r)
    except BaseException:
        for clip in written:
            for path in clip.files():
                path.unlink(missing_ok=True)
        raise
    return written, dropped, len(written) + len(dropped)


def detect_shots(path: Path, shots: ShotRecipe) -> list[tuple[int, int]]:
    """[start, end) frame ranges of a video's shots, by PySceneDetect (one range when it finds no cut).

    Frame numbers come from timestamps and the average frame rate: exact for constant-frame-rate
    video; on variable-frame-rate video a cut may land a frame or two off."""
    import scenedetect
    from scenedetect.backends.pyav import VideoStreamAv

    if shots.detector == "content":
        detector = scenedetect.ContentDetector(threshold=shots.threshold, min_scene_len=1)
    else:
        detector = scenedetect.AdaptiveDetector(adaptive_threshold=shots.threshold, min_scene_len=1)
    # min_scene_len=1: the detector reports every cut; a short shot is dropped here rather than
    # merged into its neighbour, which would put a cut inside a clip.
    try:
        # PyAV, the decoder hvctl.video uses, so frame numbers agree; suppress_output keeps scenedetect
        # from turning on FFmpeg's logging for the whole process.
        video = VideoStreamAv(str(path), suppress_output=True)
        manager = scenedetect.SceneManager()
        manager.add_detector(detector)
        manager.detect_scenes(video)
        scenes = manager.get_scene_list(start_in_scene=True)
    except Exception as e:  # the library raises its own types and PyAV's
        raise HvctlError(f"{path}: shot detection failed ({type(e).__name__}: {e})") from None
    return [(_frame_index(start), _frame_index(end)) for start, end in scenes]


def _frame_index(timecode) -> int:
    # scenedetect 0.7 names it frame_num; 0.6 has only get_frames().
    return int(timecode.frame_num if hasattr(timecode, "frame_num") else timecode.get_frames())


def four_k_plus_one(frames: int) -> int:
    """The longest 4k+1 frame count that fits in `frames` (0 when under 5)."""
    return (frames - 1) // 4 * 4 + 1 if frames >= 5 else 0


def _video_clips(source: Source, r: CurateRecipe, buckets, clips_dir: Path, written: list[Clip]) -> list[dict]:
    """Append each usable shot's clip to `written` as it is written (so a caller can remove them
    after an error); returns the rejections of the other shots."""
    from hvctl.data.buckets import assign_bucket
    from hvctl.video import VideoReader, write_video

    dropped = []
    mask_path = _loss_mask_of(source)
    # Opened first: an unreadable file fails here, with hvctl.video's message, before the detector sees it.
    with VideoReader(source.path) as video, (VideoReader(mask_path) if mask_path else nullcontext()) as mask:
        width, height = video.width - video.width % 2, video.height - video.height % 2  # H.264 wants even sizes
        if mask is not None and (mask.width, mask.height) != (video.width, video.height):
            raise HvctlError(f"{mask_path}: loss mask is {mask.width}x{mask.height}, its video {video.width}x{video.height}")
        shots = detect_shots(source.path, r.shots)
        if not shots:
            raise HvctlError(f"{source.path}: video has zero frames")
        frames, fps = video.frames(), video.fps
        mask_frames = mask.frames() if mask is not None else None
        position = 0  # index of the next frame `frames` (and `mask_frames`) yields
        for index, (start, end) in enumerate(shots):
            clip_id = f"{source.id}-s{index:03d}"
            shot = {"index": index, "start_frame": start, "end_frame": end}
            length = four_k_plus_one(end - start)
            bucket = assign_bucket(width, height, length, buckets) if length else None
            if end - start < r.shots.min_frames:
                dropped.append(_dropped_shot(clip_id, source, shot, "short_shot",
                                             f"{end - start} frames, under shots.min_frames ({r.shots.min_frames})"))
                continue
            if bucket is None:
                dropped.append(_dropped_shot(clip_id, source, shot, "no_bucket",
                                             f"{length} frames, fewer than the shortest frame bucket ({min(buckets.frame_buckets)})"))
                continue
            for _ in range(start - position):  # frames of dropped shots, and the tails cut off to 4k+1
                if next(frames, None) is None:
                    raise HvctlError(f"{source.path}: decoding stopped at frame {position}, before shot {index}")
                if mask_frames is not None and next(mask_frames, None) is None:
                    raise HvctlError(f"{mask_path}: loss mask ends at frame {position}, before shot {index}")
                position += 1
            sampler = _AnalysisSampler(length, r.analysis_frames, r.analysis_size)
            path = clips_dir / f"{_file_name(clip_id)}.mp4"
            write_video(path, sampler.feed(_take(frames, length, source.path, start), height, width), fps, crf=r.crf)
            clip = Clip(id=clip_id, source=source, path=path, kind="video", width=width, height=height,
                        frames=length, fps=fps, bucket=bucket, shot=shot, only_shot=len(shots) == 1,
                        analysis=sampler.frames(), step=sampler.stride)
            written.append(clip)
            if mask_frames is not None:
                clip.loss_mask = clips_dir / f"{_file_name(clip_id)}.mask.mp4"
                cut = (frame[:height, :width] for frame in _take(mask_frames, length, mask_path, start))
                write_video(clip.loss_mask, cut, fps, crf=r.crf)
            position += length
    return dropped


def _dropped_shot(clip_id: str, source: Source, shot: dict, reason: str, detail: str) -> dict:
    return {"id": clip_id, "source": str(source.path), "reason": reason, "detail": detail, "curate": {"shot": shot}}


def _take(frames, count: int, path: Path, start: int):
    """The next `count` frames; an HvctlError if the video ends first (the detector saw more)."""
    for i in range(count):
        frame = next(frames, None)
        if frame is None:
            raise HvctlError(f"{path}: decoding stopped at frame {start + i}, inside a shot the detector saw longer")
        yield frame


class _AnalysisSampler:
    """Passes a clip's frames through (cropped to an even size) and keeps every stride-th one,
    downsized, for the filters: at most `count` frames, `stride` source frames apart."""

    def __init__(self, length: int, count: int, short_side: int | None):
        self.stride = max(1, math.ceil(length / count))
        self.short_side = short_side
        self.kept: list[np.ndarray] = []

    def feed(self, frames, height: int, width: int):
        for i, frame in enumerate(frames):
            frame = frame[:height, :width]
            if i % self.stride == 0:
                self.kept.append(downsize(frame, self.short_side))
            yield frame

    def frames(self) -> np.ndarray:
        return np.stack(self.kept)


def downsize(frame: np.ndarray, short_side: int | None) -> np.ndarray:
    """The frame with its short side at most `short_side` px (area averaging), aspect kept."""
    height, width = frame.shape[:2]
    if short_side is None or min(height, width) <= short_side:
        return np.ascontiguousarray(frame)
    import cv2

    scale = short_side / min(height, width)
    size = (max(1, round(width * scale)), max(1, round(height * scale)))
    return cv2.resize(np.ascontiguousarray(frame), size, interpolation=cv2.INTER_AREA)


def _image_clip(source: Source, buckets, clips_dir: Path, analysis_size: int | None) -> Clip:
    """An image is its own one-frame clip: copied as is into the clips folder."""
    from hvctl.data.buckets import assign_bucket
    from hvctl.video import read_image

    image = read_image(source.path)
    height, width = image.shape[:2]
    path = clips_dir / f"{_file_name(source.id)}{source.path.suffix.lower()}"
    with atomic_output(path) as tmp:
        shutil.copyfile(source.path, tmp)
    clip = Clip(id=source.id, source=source, path=path, kind="image", width=width, height=height, frames=1, fps=None,
                bucket=assign_bucket(width, height, 1, buckets), shot=None, only_shot=True,
                analysis=downsize(image, analysis_size)[None])
    mask_path = _loss_mask_of(source)
    if mask_path is not None:
        clip.loss_mask = clips_dir / f"{_file_name(source.id)}.mask{mask_path.suffix.lower()}"
        with atomic_output(clip.loss_mask) as tmp:
            shutil.copyfile(mask_path, tmp)
    return clip


def _loss_mask_of(source: Source) -> Path | None:
    """The source record's loss mask file (a manifest path field), or None."""
    from hvctl.encode import LOSS_MASK_FIELD

    record = source.record
    if record is None or not record.extra.get(LOSS_MASK_FIELD):
        return None
    return source.manifest_dir / record.extra[LOSS_MASK_FIELD]


# --- scores and duplicates ----------------------------------------------------


def score_clip(clip: Clip, filters: dict, r: CurateRecipe) -> None:
    """Fill clip.scores (each filter that applies to its kind) and clip.embedding; frees its frames."""
    frames = clip.analysis
    for name, f in filters.items():
        if clip.kind not in getattr(f, "media", ("image", "video")):
            continue
        try:
            clip.scores[name] = round(float(f.score(frames, step=clip.step)), 6)
        except SampleFailure as e:
            raise HvctlError(f"{clip.source.path}: filter '{name}' could not score {clip.id}: {e}") from None
        if getattr(f, "method", None):
            clip.scores[f"{name}_method"] = f.method
    clip.embedding = embed(frames, r.dedup.frames, r.dedup.size)
    clip.analysis = None


def embed(frames: np.ndarray, count: int, size: int) -> np.ndarray:
    """A unit vector that near-identical clips share: `count` evenly spaced frames as size x size
    colour thumbnails, concatenated, mean removed (so a brightness shift barely moves it)."""
    import cv2

    picks = np.linspace(0, len(frames) - 1, count).round().astype(int)
    thumbs = [cv2.resize(np.ascontiguousarray(frames[i]), (size, size), interpolation=cv2.INTER_AREA) for i in picks]
    vector = np.concatenate([t.reshape(-1) for t in thumbs]).astype(np.float64)
    centred = vector - vector.mean()
    norm = np.linalg.norm(centred)
    if norm < 1e-6:  # a flat clip: its colour is all there is to compare
        centred, norm = vector + 1.0, np.linalg.norm(vector + 1.0)
    return (centred / norm).astype(np.float32)


def find_duplicates(clips: list[Clip], threshold: float | None):
    """Yield (clip, original or None, similarity): in order, each clip against the kept ones before it."""
    kept: list[Clip] = []
    matrix = np.zeros((16, clips[0].embedding.size if clips else 0), dtype=np.float32)  # kept embeddings, grown by doubling
    for clip in clips:
        if threshold is not None and kept:
            similarities = matrix[:len(kept)] @ clip.embedding
            best = int(np.argmax(similarities))
            if similarities[best] > threshold:
                yield clip, kept[best], float(similarities[best])
                continue
        if len(kept) == len(matrix):
            matrix = np.concatenate([matrix, np.zeros_like(matrix)])
        matrix[len(kept)] = clip.embedding
        kept.append(clip)
        yield clip, None, 1.0


# --- outputs ------------------------------------------------------------------


def _curate_fields(clip: Clip, manifest_dir: Path) -> dict:
    fields = dict(clip.scores)
    if clip.shot is not None:
        fields["shot"] = {"source": _relative(clip.source.path, manifest_dir), **clip.shot}
    else:
        fields["source"] = _relative(clip.source.path, manifest_dir)
    return fields


def _relative(path: Path, start: Path) -> str:
    return Path(os.path.relpath(Path(path).resolve(), Path(start).resolve())).as_posix()


def clip_record(clip: Clip, manifest_dir: Path):
    """The manifest record of a kept clip. From a manifest input it keeps the source's split and
    fields, and its caption when the clip is the source's one shot (a caption of a whole video
    does not describe one of its shots)."""
    from hvctl.encode import CONDITION_FIELDS, LOSS_MASK_FIELD

    record = clip.source.record
    extra = dict(record.extra) if record is not None else {}
    extra.pop(LOSS_MASK_FIELD, None)
    if clip.loss_mask is not None:
        extra[LOSS_MASK_FIELD] = _relative(clip.loss_mask, manifest_dir)
    for name in CONDITION_FIELDS:
        if extra.get(name):
            if clip.only_shot:
                extra[name] = _relative(clip.source.manifest_dir / extra[name], manifest_dir)
            else:
                del extra[name]
    extra.update(bucket=list(clip.bucket), curate=_curate_fields(clip, manifest_dir))
    return ManifestRecord(
        id=clip.id, media=_relative(clip.path, manifest_dir), kind=clip.kind, width=clip.width, height=clip.height,
        frames=clip.frames, fps=clip.fps,
        caption=record.caption if record is not None and clip.only_shot else None,
        split=record.split if record is not None else None, extra=extra,
    )


def summary_table(summary: dict):
    """A rich Table of where the shots went: what each filter removed, what was kept."""
    from rich.table import Table

    table = Table(title=f"hvctl curate -> {summary['manifest']}")
    table.add_column("step")
    table.add_column("clips", justify="right")
    table.add_column("rule")
    table.add_row("inputs", str(summary["inputs"]), "")
    table.add_row("failed (unreadable inputs)", str(len(summary["failed"])), "")
    table.add_row("shots found", str(summary["shots"]), "")
    table.add_row("too short", str(summary["short_shots"]), "shots.min_frames")
    table.add_row("no bucket", str(summary["no_bucket"]), "frame_buckets")
    for name, count in summary["removed"].items():
        table.add_row(f"filter {name}", str(count), summary["rules"][name])
    table.add_row("near-duplicates", str(summary["duplicates"]), "dedup.threshold")
    table.add_row("kept", str(summary["kept"]), "", style="bold")
    table.caption = f"rejected: {summary['rejected']}; clips: {summary['clips_dir']}"
    return table
