"""Avatar conditions: from files or arrays to the tensors the conditioners read, one sample at a
time (what `hvctl encode` caches and `hvctl avatar` feeds at once) and as a batch."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import torch

from hvctl.errors import HvctlError

CONDITIONS = ("reference", "audio", "pose", "expression")
LATENT_ALIGNED = ("reference", "pose")  # latents: sliced by latent frame
FRAME_ALIGNED = ("audio", "expression")  # per video frame: sliced by video frame
MASKS = ("audio_mask",)


def read_expression(path: Path) -> np.ndarray:
    """Per-frame expression features (T, E) from .npy (no pickles), .json (a list of rows) or .safetensors (one tensor)."""
    path = Path(path)
    if not path.is_file():
        raise HvctlError(f"{path}: no such file")
    try:
        if path.suffix == ".npy":
            array = np.load(path, allow_pickle=False)
        elif path.suffix == ".json":
            array = np.asarray(json.loads(path.read_text()), dtype=np.float32)
        elif path.suffix == ".safetensors":
            from safetensors.numpy import load_file

            tensors = load_file(str(path))
            if len(tensors) != 1:
                raise ValueError(f"expected one tensor, found {len(tensors)}")
            array = next(iter(tensors.values()))
        else:
            raise ValueError("expected .npy, .json or .safetensors")
    except (ValueError, OSError, json.JSONDecodeError) as e:
        raise HvctlError(f"{path}: unreadable expression features ({e})") from None
    array = np.asarray(array, dtype=np.float32)
    if array.ndim != 2 or array.shape[0] == 0 or not np.isfinite(array).all():
        raise HvctlError(f"{path}: expression features must be finite numbers shaped (frames, features), got {array.shape}")
    return array


class ConditionEncoder:
    """Condition media -> the tensors the conditioners read: what `hvctl encode` caches for
    training and what `hvctl avatar` feeds at once. Latents are posterior means, scaled like the
    video latents."""

    def __init__(self, vae, audio_encoder=None):
        self.vae, self.audio_encoder = vae, audio_encoder

    def _latent(self, frames) -> torch.Tensor:
        from hvctl.models.vae import encode_posterior

        return encode_posterior(self.vae, frames)[0].cpu()

    def reference(self, image, height: int, width: int) -> torch.Tensor:
        from hvctl.data.buckets import fit_to_bucket

        return self._latent(fit_to_bucket(image[None], (height, width, 1)))

    def pose(self, frames, height: int, width: int, count: int, source="pose video") -> torch.Tensor:
        from hvctl.data.buckets import fit_to_bucket

        if len(frames) < count:
            raise HvctlError(f"{source}: {len(frames)} frames, the video needs {count}")
        return self._latent(fit_to_bucket(frames, (height, width, count)))

    def audio(self, samples, fps: float, count: int) -> torch.Tensor:
        if self.audio_encoder is None:
            raise HvctlError("audio given, but no audio encoder is set")
        return self.audio_encoder(samples, fps, count)

    @staticmethod
    def expression(array, count: int, source="expression features") -> torch.Tensor:
        if len(array) < count:
            raise HvctlError(f"{source}: {len(array)} frames of features, the video needs {count}")
        return torch.as_tensor(np.asarray(array[:count], dtype=np.float32))

    @staticmethod
    def mask(image, height: int, width: int) -> torch.Tensor:
        from hvctl.data.buckets import fit_to_bucket

        return torch.as_tensor(fit_to_bucket(image[None], (height, width, 1))[0].mean(axis=-1, dtype=np.float32) / 255.0)[None]

    def from_files(self, files: dict, height: int, width: int, count: int, fps: float) -> dict[str, torch.Tensor]:
        """Read each given condition file ({"reference": path, "audio": path, ...}) and encode it."""
        from hvctl.video import read_audio, read_image, read_video

        out = {}
        for name, path in files.items():
            if name == "reference":
                out[name] = self.reference(read_image(path), height, width)
            elif name == "pose":
                out[name] = self.pose(read_video(path)[0], height, width, count, source=str(path))
            elif name == "audio":
                out[name] = self.audio(read_audio(path), fps, count)
            elif name == "expression":
                out[name] = self.expression(read_expression(path), count, source=str(path))
            elif name == "audio_mask":
                out[name] = self.mask(read_image(path), height, width)
            else:
                raise HvctlError(f"unknown avatar condition {name!r} (choices: {', '.join((*CONDITIONS, *MASKS))})")
        return out


def batch_inputs(per_sample: list[dict], device=None) -> dict:
    """Per-sample condition dicts -> one batch: stacked tensors, zeros and present.X = 0 where a
    sample lacks X (a mask that is absent means everywhere: ones)."""
    names = sorted({name for sample in per_sample for name in sample})
    batch = {}
    for name in names:
        like = next(sample[name] for sample in per_sample if name in sample)
        fill = torch.ones_like(like) if name in MASKS else torch.zeros_like(like)
        batch[name] = torch.stack([sample.get(name, fill) for sample in per_sample]).float()
        if name not in MASKS:
            batch[f"present.{name}"] = torch.tensor([float(name in sample) for sample in per_sample])
    return {k: v.to(device) for k, v in batch.items()} if device is not None else batch
