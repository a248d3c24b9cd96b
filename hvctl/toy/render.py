"""Render a toy dataset to disk: media/ (mp4 videos, png images) and manifest.jsonl; for an avatar
dataset also each sample's reference image and driving signals."""

from dataclasses import asdict
from pathlib import Path

import numpy as np

from hvctl.data.manifest import ManifestRecord, write_manifest
from hvctl.errors import HvctlError
from hvctl.io import atomic_output, check_output_dir
from hvctl.recipe import SEED_RANGE, check_number
from hvctl.toy.world import AUDIO_RATE, FPS, avatar_modes, avatar_spec, object_mask, render, sample_spec
from hvctl.video import write_image, write_video, write_wav


def render_dataset(out_dir, videos, images, seed, split, sizes=None, frames=None, loss_masks=True, on_progress=None):
    """Write `videos` videos and `images` images of a split; the same seed gives the same dataset.

    sizes: (height, width) list that samples cycle through by index; None draws each sample's
    size from the aspect buckets. frames: every video's length; None draws it from the duration buckets.
    The manifest's `toy` field holds each sample's ground truth (ToySample as a dict).
    loss_masks: also write masks/ID.mp4 (or .png), the object's coverage in grey, named by the
    manifest field `loss_mask` (what `hvctl encode` caches for a masked training loss).
    Returns the manifest's path.
    """
    out_dir = check_output_dir(out_dir, "OUT")
    check_number("--seed", seed, SEED_RANGE)
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
        sample = sample_spec(seed, index, split, kind, size=size, frames=frames if kind == "video" else None)
        sample_id = f"toy-{split}-{letter}{index:05d}"
        media = f"media/{sample_id}.{'mp4' if kind == 'video' else 'png'}"
        pixels = render(sample)
        files = {media: pixels}
        extra = {"toy": asdict(sample)}
        if loss_masks:
            extra["loss_mask"] = media.replace("media/", "masks/", 1)
            files[extra["loss_mask"]] = object_mask(sample, pixels)
        for path, content in files.items():
            if kind == "video":
                write_video(out_dir / path, content, FPS)
            else:
                write_image(out_dir / path, content[0])
        records.append(ManifestRecord(
            id=sample_id, media=media, kind=kind, width=sample.width, height=sample.height,
            frames=sample.frames, fps=float(FPS) if kind == "video" else None,
            caption=sample.caption(), split=split, extra=extra,
        ))
        if on_progress is not None:
            on_progress(done, len(plan))
    return write_manifest(out_dir / "manifest.jsonl", records)


def render_avatar_dataset(out_dir, count, seed, split, modes, frames=17, size=(64, 64), loss_masks=True,
                          on_progress=None):
    """Write `count` avatar samples of a split; the same seed gives the same dataset.

    modes: the driving modes (toy.world.avatar_modes: a list, a comma list or "hybrid"). Per
    sample: media/ID.mp4 (the target video, with the audio track when audio drives it),
    reference/ID.png, and for its modes audio/ID.wav, pose/ID.mp4, expression/ID.npy (float32
    [frames, 2], cos and sin of the angle). The manifest names them in the fields reference, audio,
    pose and expression, and holds each sample's ground truth in `toy_avatar` (AvatarSample as a
    dict; AvatarSample.from_dict reads it back). loss_masks: also masks/ID.mp4, as render_dataset
    writes them. Returns the manifest's path.
    """
    out_dir = check_output_dir(out_dir, "OUT")
    check_number("--seed", seed, SEED_RANGE)
    if count < 1:
        raise HvctlError(f"toy avatar dataset {out_dir}: need some samples, got {count}")
    modes = avatar_modes(modes)
    avatar_spec(seed, 0, split, modes, size=size, frames=frames)  # a bad argument fails before any write
    records = []
    for index in range(count):
        sample = avatar_spec(seed, index, split, modes, size=size, frames=frames)
        sample_id = f"toy-avatar-{split}-{index:05d}"
        paths = {"media": f"media/{sample_id}.mp4", "reference": f"reference/{sample_id}.png"}
        paths.update({mode: f"{mode}/{sample_id}.{ext}" for mode, ext in
                      (("audio", "wav"), ("pose", "mp4"), ("expression", "npy")) if mode in sample.modes})
        audio = (sample.audio(), AUDIO_RATE) if "audio" in sample.modes else None
        video = sample.render()
        write_video(out_dir / paths["media"], video, FPS, audio=audio)
        if loss_masks:
            paths["loss_mask"] = f"masks/{sample_id}.mp4"
            write_video(out_dir / paths["loss_mask"], object_mask(sample, video), FPS)
        write_image(out_dir / paths["reference"], sample.reference())
        if "audio" in paths:
            write_wav(out_dir / paths["audio"], *audio)
        if "pose" in paths:
            write_video(out_dir / paths["pose"], sample.pose_video(), FPS)
        if "expression" in paths:
            with atomic_output(out_dir / paths["expression"]) as tmp, open(tmp, "wb") as file:
                np.save(file, sample.expression())
        truth = {k: list(v) if isinstance(v, tuple) else v for k, v in asdict(sample).items()}
        records.append(ManifestRecord(
            id=sample_id, media=paths.pop("media"), kind="video", width=sample.width, height=sample.height,
            frames=sample.frames, fps=float(FPS), caption=sample.caption(), split=split,
            extra={**paths, "toy_avatar": truth},
        ))
        if on_progress is not None:
            on_progress(index + 1, count)
    return write_manifest(out_dir / "manifest.jsonl", records)
