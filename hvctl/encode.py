"""`hvctl encode`: VAE latents and text states of a manifest's samples, cached to disk.

Each sample is keyed by a content hash of (media bytes, caption texts, bucket, VAE identity,
text-encoder identity), so a second run encodes only what is new or changed. Work is committed
shard by shard (see hvctl/cache.py), so a run killed at any moment loses at most the samples of
its open shard, and the next run completes the cache. `--shard i/n` gives each of n processes or
machines the samples whose id hashes to i; they write into one cache folder (shared storage) and
their shards join in one index.
"""

from __future__ import annotations

import hashlib
import json
import os
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import ClassVar, Literal

from hvctl.errors import HvctlError
from hvctl.toy.world import ASPECT_BUCKETS, DURATION_BUCKETS

CONDITION_FIELDS = ("reference", "audio", "pose", "expression", "audio_mask")  # hvctl/avatar.py's, kept torch-free here
LOSS_MASK_FIELD = "loss_mask"  # a manifest field: an image or video, white where the loss weighs fully


@dataclass
class EncodeRecipe:
    KIND: ClassVar[str] = "encode"
    LIMITS: ClassVar[dict] = {"aspect_buckets": ">= 16", "frame_buckets": ">= 1", "caption_variants": ">= 1",
                              "text_len": ">= 1", "vae_tile_size": ">= 16", "samples_per_shard": ">= 1"}
    manifest: Path | None = None
    model: Path | None = None  # None: the embedded default model
    out: Path | None = None  # the cache folder
    aspect_buckets: list[tuple[int, int]] = field(default_factory=lambda: list(ASPECT_BUCKETS))  # (height, width)
    frame_buckets: list[int] = field(default_factory=lambda: list(DURATION_BUCKETS))
    caption_variants: int = 4  # texts per sample: the short description, then field dropout + permutation
    text_len: int | None = None  # None: the model's
    vae_tiling: bool | None = None  # None: tile frames larger than vae_tile_size
    vae_tile_size: int = 256
    vae_tile_stats: Literal["frame", "tile"] = "frame"  # GroupNorm statistics of a tile: the whole frame's, or its own
    storage_dtype: Literal["float16", "bfloat16", "float32"] = "float16"
    dtype: Literal["auto", "float32", "bfloat16", "float16"] = "auto"  # compute dtype
    device: str = "auto"
    samples_per_shard: int = 64
    shard: str = "0/1"  # i/n: this process encodes the samples whose id hashes to i
    on_error: Literal["skip", "fail"] = "skip"
    # Avatar samples: the manifest's reference, audio, pose, expression and audio_mask paths are
    # encoded too (hvctl/avatar.py); audio by this registered encoder.
    audio_encoder: str = "logmel"
    audio_encoder_options: dict = field(default_factory=dict)


def parse_shard(text: str) -> tuple[int, int]:
    try:
        i, n = (int(x) for x in text.split("/"))
    except ValueError:
        raise HvctlError(f"--shard {text}: expected i/n, e.g. 0/4") from None
    if not (n >= 1 and 0 <= i < n):
        raise HvctlError(f"--shard {text}: need 0 <= i < n")
    return i, n


def in_shard(sample_id: str, shard: tuple[int, int]) -> bool:
    i, n = shard
    return int(hashlib.sha1(sample_id.encode()).hexdigest(), 16) % n == i


def file_sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def remove_stale_temp_files(directory: Path) -> None:
    """Delete temporary shard files left by runs that died (their pid is gone)."""
    for tmp in directory.glob(".*.tmp-*"):
        try:
            pid = int(tmp.name.rsplit(".tmp-", 1)[1].split(".")[0])
            os.kill(pid, 0)
        except ProcessLookupError:
            tmp.unlink(missing_ok=True)
        except (ValueError, PermissionError):
            pass  # not ours to judge


class Encoder:
    """The loaded VAE and text encoders, and the identities that go into every cache key."""

    def __init__(self, r: EncodeRecipe, model_dir: Path, text_len: int):
        import torch

        from hvctl.generate import resolve_device_dtype
        from hvctl.models.loading import ModelFolder, folder_fingerprint, load_components
        from hvctl.models.text import PromptEncoder
        from hvctl.models.vae import configure_tiling

        if ModelFolder.open(model_dir).reads_images:
            raise HvctlError(f"{model_dir}: its LLaVA text encoder reads each prompt with an image; hvctl encode needs a text-only one")
        device, dtype = resolve_device_dtype(r.device, r.dtype)
        self.parts = load_components(model_dir, dtype=dtype, device=device, parts=("vae", "text"))
        configure_tiling(self.parts.vae, r.vae_tiling, r.vae_tile_size, r.vae_tile_stats)
        self.r, self._conditions = r, None
        p = self.parts
        self.prompt_encoders = {
            template: PromptEncoder(p.tokenizer, p.text_encoder, p.tokenizer_2, p.text_encoder_2, template=template, text_len=text_len)
            for template in ("video", "image")
        }
        self.storage_dtype = getattr(torch, r.storage_dtype)
        self.vae_id = _hash([folder_fingerprint(model_dir / "vae"), r.vae_tiling, r.vae_tile_size, r.vae_tile_stats, r.storage_dtype])
        self.text_id = _hash([folder_fingerprint(model_dir / n) for n in ("text_encoder", "tokenizer", "text_encoder_2", "tokenizer_2")]
                             + [text_len, r.storage_dtype])
        from hvctl.cache import encoder_identities

        self.identities = encoder_identities(model_dir)  # recorded in every entry; training checks them

    def condition_encoder(self):
        """The avatar conditions' encoder (built on first use: the audio encoder may be a Whisper)."""
        if self._conditions is None:
            from hvctl.avatar import ConditionEncoder, audio_encoder_for

            audio = audio_encoder_for(self.r.audio_encoder, self.r.audio_encoder_options).to(self.parts.vae.device)
            self._conditions = ConditionEncoder(self.parts.vae, audio)
        return self._conditions

    def encode_conditions(self, files: dict, bucket, fps: float) -> dict:
        h, w, n = bucket
        tensors = self.condition_encoder().from_files(files, h, w, n, fps)
        return {f"cond.{name}": t.to(self.storage_dtype) for name, t in tensors.items()}

    def encode_media(self, frames) -> dict:
        from hvctl.models.vae import encode_posterior

        mean, std = encode_posterior(self.parts.vae, frames)
        return {"latent_mean": mean.to(self.storage_dtype), "latent_std": std.to(self.storage_dtype)}

    def encode_loss_mask(self, mask_frames, bucket) -> dict:
        """A loss mask (image [1,H,W,3] or video [T,H,W,3] uint8) fitted to the bucket as the media
        is, then pooled onto the VAE's latent grid."""
        from hvctl.data.buckets import fit_to_bucket

        if mask_frames.shape[0] == 1:  # one image masks every frame
            mask_frames = mask_frames.repeat(bucket[2], axis=0)
        fitted = fit_to_bucket(mask_frames, bucket)
        config = self.parts.vae.config
        pooled = pool_loss_mask(fitted, config.spatial_compression_ratio, config.temporal_compression_ratio)
        return {LOSS_MASK_FIELD: pooled.to(self.storage_dtype)}

    def encode_texts(self, texts: list[str], template: str) -> dict:
        text = self.prompt_encoders[template](texts)
        tensors = {}
        for v in range(len(texts)):
            n = int(text.llm_mask[v].sum())
            tensors[f"text.{v}"] = text.llm_states[v, :n].to(self.storage_dtype)  # padding is rebuilt on reading
            tensors[f"pooled.{v}"] = text.pooled[v].to(self.storage_dtype)
        return tensors


def pool_loss_mask(frames, spatial: int, temporal: int):
    """Mask frames [T,H,W,3] uint8 -> [1, T', H', W'] in [0, 1] on the latent grid of a causal VAE:
    latent frame 0 encodes frame 0 alone, each later one the next `temporal` frames.

    Max pooling: a latent counts as masked when any pixel it encodes is, since it carries that
    pixel's content (a small object covers a fraction of its cells; averaging would dilute it).
    """
    import torch
    import torch.nn.functional as F

    mask = torch.from_numpy(frames).float().mean(dim=-1) / 255.0  # [T, H, W], grey level
    mask = F.max_pool2d(mask[:, None], spatial)[:, 0]
    groups = [mask[:1]] + [mask[i:i + temporal] for i in range(1, mask.shape[0], temporal)]
    return torch.stack([g.amax(dim=0) for g in groups])[None]


def _loss_mask_mismatch(mask_shape, media_shape) -> str | None:
    """Why a loss mask [T,H,W,3] cannot mask this media, or None: it must have the media's size and
    either its frame count or one frame (an image, for every frame)."""
    if mask_shape[1:3] != media_shape[1:3]:
        return f"loss mask is {mask_shape[2]}x{mask_shape[1]}, the media {media_shape[2]}x{media_shape[1]}"
    if mask_shape[0] not in (1, media_shape[0]):
        return f"loss mask has {mask_shape[0]} frames, the media {media_shape[0]}"
    return None


def _hash(items) -> str:
    return hashlib.sha256(json.dumps(items, sort_keys=True, default=str).encode()).hexdigest()


def encode(r: EncodeRecipe, *, progress: bool | None = None, on_problem=None) -> dict:
    """Run an encode recipe; returns counts, failures and timings.

    on_problem(message) hears each skipped sample as it happens (the CLI prints it).
    """
    from hvctl.cache import CacheLock, ShardWriter, latest_by_id, load_entries, shard_dir, write_empty_text, write_index
    from hvctl.curate import IMAGE_SUFFIXES
    from hvctl.data.buckets import BucketConfig, assign_bucket, fit_to_bucket
    from hvctl.data.captions import caption_variants
    from hvctl.data.manifest import iter_manifest
    from hvctl.generate import prepare_model
    from hvctl.io import check_output_dir
    from hvctl.progress import progress_bar
    from hvctl.video import read_image, read_video

    if r.manifest is None or r.out is None:
        raise HvctlError("encode needs a manifest and an output cache folder (MANIFEST --out CACHE)")
    for name in ("caption_variants", "samples_per_shard", "vae_tile_size"):
        if getattr(r, name) < 1:
            raise HvctlError(f"'{name}' must be at least 1, got {getattr(r, name)}")
    if any(f < 1 or (f - 1) % 4 for f in r.frame_buckets):
        raise HvctlError(f"frame_buckets must all be 4k+1, got {r.frame_buckets}")
    if any(h % 16 or w % 16 for h, w in r.aspect_buckets):
        raise HvctlError(f"aspect_buckets must be multiples of 16, got {r.aspect_buckets}")
    shard = parse_shard(r.shard)
    manifest = Path(r.manifest)
    check_output_dir(r.out, "--out")
    failures: list[dict] = []

    def fail(sample_id, path, reason):
        failure = {"id": sample_id, "path": str(path), "reason": reason}
        if r.on_error == "fail":
            raise HvctlError(f"{path}: {reason}" + (f" (sample {sample_id})" if sample_id else ""))
        failures.append(failure)
        if on_problem:
            on_problem(f"skipped {path}: {reason}")

    # A bad manifest line's error reads "{manifest}:{line}: {reason}".
    records = list(iter_manifest(manifest, on_error=lambda e: fail(None, *str(e).partition(": ")[::2])))
    if not records and not failures:
        raise HvctlError(f"{manifest}: no samples to encode (the manifest is empty)")
    all_records = len(records)
    records = [rec for rec in records if in_shard(rec.id, shard)]
    model_dir, defaults = prepare_model(r.model)
    text_len = r.text_len or defaults["text_len"]
    buckets = BucketConfig(aspect_buckets=[tuple(b) for b in r.aspect_buckets], frame_buckets=list(r.frame_buckets))
    cache = Path(r.out)
    started = time.perf_counter()

    with CacheLock(cache, f"shard-{shard[0]}-of-{shard[1]}"):
        shard_dir(cache).mkdir(parents=True, exist_ok=True)
        remove_stale_temp_files(shard_dir(cache))
        encoder = Encoder(r, model_dir, text_len)
        empty = encoder.encode_texts([""], "video")
        write_empty_text(cache, encoder.text_id, {"text": empty["text.0"], "pooled": empty["pooled.0"]})
        latest = {sample_id: entry.key for sample_id, entry in latest_by_id(load_entries(cache)).items()}
        tag = f"s{shard[0]}of{shard[1]}-{os.getpid()}"
        writer = ShardWriter(cache, tag, r.samples_per_shard)
        encoded = skipped = 0
        try:
            with progress_bar(len(records), "encoding", enabled=progress) as advance:
                for rec in records:
                    advance()
                    path = rec.media_path(manifest.parent)
                    if not path.is_file():
                        fail(rec.id, path, "media file not found")
                        continue
                    try:
                        frames = read_video(path)[0] if rec.kind == "video" else read_image(path)[None]
                    except HvctlError as e:
                        fail(rec.id, path, str(e).removeprefix(f"{path}: "))
                        continue
                    bucket = assign_bucket(frames.shape[2], frames.shape[1], frames.shape[0], buckets)
                    if bucket is None:
                        fail(rec.id, path, f"{frames.shape[0]} frames, fewer than the shortest frame bucket ({min(r.frame_buckets)})")
                        continue
                    texts = caption_variants(rec.caption, rec.id, r.caption_variants)
                    key_parts = [file_sha256(path), texts, bucket, encoder.vae_id, encoder.text_id]
                    conditions = {name: manifest.parent / rec.extra[name] for name in CONDITION_FIELDS if rec.extra.get(name)}
                    missing = [p for p in conditions.values() if not p.is_file()]
                    if missing:
                        fail(rec.id, missing[0], "condition file not found")
                        continue
                    mask_path = manifest.parent / rec.extra[LOSS_MASK_FIELD] if rec.extra.get(LOSS_MASK_FIELD) else None
                    if mask_path is not None:
                        if not mask_path.is_file():
                            fail(rec.id, mask_path, "loss mask file not found")
                            continue
                        key_parts.append(("loss_mask", file_sha256(mask_path)))
                    if conditions:  # the key covers the condition files and whatever encodes them
                        key_parts.append(sorted((name, file_sha256(p)) for name, p in conditions.items()))
                        if "audio" in conditions:
                            key_parts.append(encoder.condition_encoder().audio_encoder.identity)
                    key = _hash(key_parts)
                    if latest.get(rec.id) == key:
                        skipped += 1
                        continue
                    tensors = encoder.encode_media(fit_to_bucket(frames, bucket))
                    if mask_path is not None:
                        try:
                            is_image = mask_path.suffix.lower() in IMAGE_SUFFIXES  # anything else is read as a video
                            mask_frames = read_image(mask_path)[None] if is_image else read_video(mask_path)[0]
                        except HvctlError as e:
                            fail(rec.id, mask_path, str(e).removeprefix(f"{mask_path}: "))
                            continue
                        problem = _loss_mask_mismatch(mask_frames.shape, frames.shape)
                        if problem:
                            fail(rec.id, mask_path, problem)
                            continue
                        tensors.update(encoder.encode_loss_mask(mask_frames, bucket))
                    if conditions:
                        try:
                            tensors.update(encoder.encode_conditions(conditions, bucket, rec.fps or 1.0))
                        except HvctlError as e:  # its message starts with the culprit's path
                            fail(rec.id, *str(e).partition(": ")[::2])
                            continue
                    tensors.update(encoder.encode_texts(texts, "image" if rec.kind == "image" else "video"))
                    entry = {"key": key, "id": rec.id, "kind": rec.kind, "bucket": list(bucket),
                             "text_variants": len(texts), "split": rec.split, "conditions": sorted(conditions),
                             "loss_mask": mask_path is not None, **encoder.identities}
                    writer.add(entry, tensors)
                    latest[rec.id] = key
                    encoded += 1
        finally:
            writer.flush()  # what was encoded before an error is kept
        entries = write_index(cache)
    if encoded + skipped == 0 and failures:  # a run that encoded nothing is no success
        first = failures[0]
        raise HvctlError(f"{manifest}: nothing encoded: {len(failures)} of {all_records + sum(f['id'] is None for f in failures)} "
                         f"samples failed (first: {first['path']}: {first['reason']})")
    return {
        "cache": str(cache), "shard": r.shard, "samples": len(records), "encoded": encoded,
        "skipped_cached": skipped, "failed": failures, "entries": len(latest_by_id(entries)),
        "shards_written": [p.name for p in writer.written], "seconds": round(time.perf_counter() - started, 3),
    }
