"""Pixels of a manifest's samples, fitted to their buckets: what VAE training reads."""

from __future__ import annotations

from pathlib import Path

import torch

from hvctl.data.batching import group_by_bucket
from hvctl.data.buckets import BucketConfig, assign_bucket, fit_to_bucket
from hvctl.data.manifest import read_manifest
from hvctl.errors import HvctlError
from hvctl.video import read_image, read_video


class MediaDataset(torch.utils.data.Dataset):
    """Items: {"pixels": (3, T, H, W) float in [-1, 1], "bucket", "id", "kind"}.

    Media are decoded and fitted once, then kept in memory (the toy world is small; a large set
    belongs in the encode cache, not here).
    """

    def __init__(self, manifest: str | Path, buckets: BucketConfig, split: str | None = None):
        from hvctl.models.vae import frames_to_tensor

        manifest = Path(manifest)
        self.items = []
        for rec in read_manifest(manifest):
            if split is not None and rec.split != split:
                continue
            frames, bucket = fitted_frames(rec, manifest.parent, buckets)
            pixels = frames_to_tensor(frames)[0]
            self.items.append({"pixels": pixels, "bucket": bucket, "id": rec.id, "kind": rec.kind})
        if not self.items:
            raise HvctlError(f"{manifest}: no samples" + (f" in split {split}" if split else ""))

    def __len__(self) -> int:
        return len(self.items)

    def __getitem__(self, index: int) -> dict:
        return self.items[index]

    @property
    def buckets(self) -> dict[tuple[int, int, int], list[int]]:
        return group_by_bucket([item["bucket"] for item in self.items])


def fitted_frames(rec, manifest_dir: Path, buckets: BucketConfig):
    """A record's (T, H, W, 3) uint8 frames, fitted to its bucket, and the bucket."""
    path = rec.media_path(manifest_dir)
    frames = read_video(path)[0] if rec.kind == "video" else read_image(path)[None]
    bucket = assign_bucket(frames.shape[2], frames.shape[1], frames.shape[0], buckets)
    if bucket is None:
        raise HvctlError(f"{path}: {frames.shape[0]} frames, fewer than the shortest frame bucket")
    return fit_to_bucket(frames, bucket), bucket
