"""`hvctl caption`: the structured caption of every manifest sample that lacks one.

A captioner plugin (hvctl/plugins.py; built in: `toy`, which reads the toy world's attributes from
pixels, and `vlm`, a vision-language model from a local transformers folder) sees each sample's
frames and returns the structured caption, which is validated against the schema before it is
kept. The run is incremental and resumable: samples that have a caption are skipped, and the
manifest is rewritten atomically every `save_every` captions, so a run killed at any moment loses
at most that many, and the next run goes on from there. A sample the captioner cannot caption
keeps no caption and gets a `caption_error` field saying why; the next run tries it again.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, ClassVar, Literal

from hvctl.errors import HvctlError


@dataclass
class CaptionRecipe:
    KIND: ClassVar[str] = "caption"
    LIMITS: ClassVar[dict] = {"save_every": ">= 1"}
    manifest: Path | None = None
    out: Path | None = None  # the captioned manifest; None: the input manifest, updated in place
    captioner: str = "toy"  # a registered captioner (hvctl plugins list)
    model: Path | None = None  # the captioner's model folder, for captioners that need one (vlm)
    options: dict[str, Any] = field(default_factory=dict)  # the captioner's own options
    overwrite: bool = False  # caption samples that already have a caption too
    save_every: int = 32  # captions between atomic rewrites of the manifest
    on_error: Literal["skip", "fail"] = "skip"


def load_frames(record, manifest_dir: Path):
    """A sample's frames, (T, H, W, 3) uint8; an image is one frame."""
    from hvctl.video import read_image, read_video

    path = record.media_path(manifest_dir)
    if record.kind == "image":
        return read_image(path)[None]
    return read_video(path)[0]


def caption(r: CaptionRecipe, *, progress: bool | None = None, on_problem=None) -> dict:
    from hvctl import plugins
    from hvctl.data.captions import caption_problems
    from hvctl.data.manifest import read_manifest, write_manifest
    from hvctl.io import check_output_file
    from hvctl.progress import progress_bar

    if r.manifest is None:
        raise HvctlError("no manifest given (the MANIFEST argument or the recipe's 'manifest')")
    if r.save_every < 1:
        raise HvctlError(f"save_every must be at least 1, got {r.save_every}")
    out = r.out or r.manifest
    check_output_file(out, "--out")
    records = read_manifest(r.manifest)
    if out != r.manifest and out.exists():  # resume: captions a previous run already wrote
        done = {rec.id: rec for rec in read_manifest(out) if rec.caption is not None}
        for rec in records:
            if rec.caption is None and rec.id in done:
                rec.caption = done[rec.id].caption
                rec.extra.pop("caption_error", None)
    manifest_dir = r.manifest.parent
    if out.parent.resolve() != manifest_dir.resolve():
        # Media paths are relative to the manifest's folder; a manifest written elsewhere would
        # point at files that are not there.
        raise HvctlError(f"--out {out}: must be in the manifest's folder {manifest_dir} (media paths are relative to it)")
    options = dict(r.options, **({"model": r.model} if r.model is not None else {}))
    captioner = plugins.create("captioner", r.captioner, **options)
    todo = [rec for rec in records if r.overwrite or rec.caption is None]

    started, failed, captioned = time.monotonic(), [], 0
    with progress_bar(len(todo), f"captioning ({r.captioner})", enabled=progress) as advance:
        for i, rec in enumerate(todo):
            try:
                result = captioner.caption(load_frames(rec, manifest_dir), rec)
                problems = caption_problems(result)
                if problems:
                    raise plugins.SampleFailure(f"caption fails the schema: {problems[0]}")
            except (HvctlError, plugins.SampleFailure) as e:
                rec.extra["caption_error"] = str(e)
                failed.append({"id": rec.id, "error": str(e)})
                if on_problem:
                    on_problem(f"{rec.id}: {e}")
                if r.on_error == "fail":
                    break
            else:
                rec.caption = result
                rec.extra.pop("caption_error", None)
                captioned += 1
            if (i + 1) % r.save_every == 0:
                write_manifest(out, records)
            advance()
    write_manifest(out, records)
    return {
        "manifest": str(out), "captioner": r.captioner, "captioned": captioned, "failed": failed,
        "already_captioned": len(records) - len(todo), "samples": len(records),
        "seconds": round(time.monotonic() - started, 2),
    }
