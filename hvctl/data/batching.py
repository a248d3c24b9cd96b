"""Batches grouped by bucket: every batch holds samples of one (height, width, frames) shape.

Images and videos form two streams; each step draws from the image stream with probability
`image_ratio` (image-video joint training). Each stream walks its batches epoch after epoch,
shuffled by (seed, epoch). Everything is a pure function of the seed and the position, so
`state_dict()` / `load_state_dict()` resume the exact sequence of batches.
"""

from __future__ import annotations

import random

import torch


def group_by_bucket(buckets: list[tuple[int, int, int]]) -> dict[tuple[int, int, int], list[int]]:
    """Dataset indices by bucket, from each item's bucket in index order."""
    groups: dict[tuple[int, int, int], list[int]] = {}
    for index, bucket in enumerate(buckets):
        groups.setdefault(tuple(bucket), []).append(index)
    return groups


def epoch_batches(buckets: dict[tuple, list[int]], batch_size: int, seed, epoch: int) -> list[list[int]]:
    """One epoch of full batches: each bucket shuffled and cut, then the batches shuffled.

    A bucket's last partial batch is dropped (a smaller batch would be a different shape of work).
    """
    rng = random.Random(f"{seed}/{epoch}")
    batches = []
    for bucket in sorted(buckets):
        indices = list(buckets[bucket])
        rng.shuffle(indices)
        batches += [indices[i:i + batch_size] for i in range(0, len(indices) - batch_size + 1, batch_size)]
    rng.shuffle(batches)
    return batches


class BucketBatchSampler:
    """An endless, resumable stream of same-bucket batches of dataset indices."""

    def __init__(self, buckets: dict[tuple, list[int]], batch_size: int, seed: int = 0, image_ratio: float | None = None):
        streams = {
            "image": {b: ix for b, ix in buckets.items() if b[2] == 1},
            "video": {b: ix for b, ix in buckets.items() if b[2] > 1},
        }
        self.streams = {k: v for k, v in streams.items() if epoch_batches(v, batch_size, seed, 0)}
        if not self.streams:
            raise ValueError(f"no bucket holds a full batch of {batch_size} samples")
        self.batch_size, self.seed = batch_size, seed
        self.image_ratio = image_ratio
        self.step = 0
        self.position = {kind: (0, 0) for kind in self.streams}  # (epoch, batch index) per stream
        self._epoch_cache: dict[str, tuple[int, list[list[int]]]] = {}  # kind -> (epoch, its batches)

    def _kind(self) -> str:
        if len(self.streams) == 1:
            return next(iter(self.streams))
        ratio = 0.5 if self.image_ratio is None else self.image_ratio
        return "image" if random.Random(f"{self.seed}/kind/{self.step}").random() < ratio else "video"

    def _batches(self, kind: str, epoch: int) -> list[list[int]]:
        if self._epoch_cache.get(kind, (None,))[0] != epoch:
            seed = f"{self.seed}/{kind}"
            self._epoch_cache[kind] = (epoch, epoch_batches(self.streams[kind], self.batch_size, seed, epoch))
        return self._epoch_cache[kind][1]

    def __iter__(self):
        return self

    def __next__(self) -> list[int]:
        kind = self._kind()
        epoch, index = self.position[kind]
        batches = self._batches(kind, epoch)
        batch = batches[index]
        self.position[kind] = (epoch, index + 1) if index + 1 < len(batches) else (epoch + 1, 0)
        self.step += 1
        return batch

    def state_dict(self) -> dict:
        return {"step": self.step, "position": {k: list(v) for k, v in self.position.items()}}

    def load_state_dict(self, state: dict) -> None:
        self.step = state["step"]
        self.position = {k: tuple(v) for k, v in state["position"].items()}


def collate(items: list[dict]) -> dict:
    """Stack same-bucket cache items into a batch (tensors stacked, the rest as lists). Avatar
    conditions (`cond.X`, which samples may or may not have) go to batch["conditions"]."""
    batch = {
        key: torch.stack([it[key] for it in items]) if isinstance(items[0][key], torch.Tensor) else [it[key] for it in items]
        for key in items[0] if not key.startswith("cond.")
    }
    conditions = [{k.removeprefix("cond."): v for k, v in it.items() if k.startswith("cond.")} for it in items]
    if any(conditions):
        from hvctl.avatar import batch_inputs

        batch["conditions"] = batch_inputs(conditions)
    return batch
