"""Render a toy dataset to disk: media/ (mp4 videos, png images) and manifest.jsonl."""

from dataclasses import asdict
from pathlib import Path

from hvctl.data.manifest import ManifestRecord, write_manifest
from hvctl.errors import HvctlError
from hvctl.toy.world import FPS, render, sample_spec
from hvctl.video import write_image, write_video


def render_dataset(out_dir, videos, images, seed, split, sizes=None, on_progress=None):
    """Write `videos` videos and `images` images of a split; the same seed gives the same dataset.

    sizes: (height, width) list that samples cycle through by index; None draws each sample's
    size from the aspect buckets. Video lengths are drawn from the duration buckets.
    The manifest's `toy` field holds each sample's ground truth (ToySample as a dict).
    Returns the manifest's path.
    """
    out_dir = Path(out_dir)
    if videos < 0 or images < 0 or videos + images == 0:
        raise HvctlError(f"toy dataset {out_dir}: need some samples, got {videos} videos and {images} images")
    for size in sizes or ():  # checked up front: a bad size fails before anything is written
        if len(size) != 2 or min(size) <= 0 or size[0] % 16 or size[1] % 16:
            shown = "x".join(map(str, size))
            raise HvctlError(f"toy dataset size {shown}: expected HxW, positive multiples of 16")
    plan = [("video", "v", i) for i in range(videos)] + [("image", "i", i) for i in range(images)]
    records = []
    for done, (kind, letter, index) in enumerate(plan, 1):
        size = sizes[index % len(sizes)] if sizes else None
        sample = sample_spec(seed, index, split, kind, size=size)
        sample_id = f"toy-{split}-{letter}{index:05d}"
        media = f"media/{sample_id}.{'mp4' if kind == 'video' else 'png'}"
        frames = render(sample)
        if kind == "video":
            write_video(out_dir / media, frames, FPS)
        else:
            write_image(out_dir / media, frames[0])
        records.append(ManifestRecord(
            id=sample_id, media=media, kind=kind, width=sample.width, height=sample.height,
            frames=sample.frames, fps=float(FPS) if kind == "video" else None,
            caption=sample.caption(), split=split, extra={"toy": asdict(sample)},
        ))
        if on_progress is not None:
            on_progress(done, len(plan))
    return write_manifest(out_dir / "manifest.jsonl", records)
