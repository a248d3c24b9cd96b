"""`hvctl encode`: VAE latents and text states of a manifest's samples, cached to disk.

Each sample is keyed by a content hash of (media bytes, caption texts, bucket, VAE identity,
text-encoder identity), so a second run encodes only what is new or changed. Work is committed
shard by shard (see hvctl/cache.py), so a run killed at any moment loses at most the samples of
its open shard, and the next run completes the cache. `--shard i/n` gives each of n processes or
machines the samples whose id hashes to i; they write into one cache folder (shared storage) and
their shards join in one index.

Per sample: `read_sample` finds its files, reads its media and computes its key
(cache.sample_key); a key already in the cache is skipped; `encode_sample` makes its tensors;
`encode` hands them to cache.ShardWriter. A sample that cannot be encoded raises BadSample
naming the file at fault, which the run records before going on (or stops at, on_error: fail).
"""

from __future__ import annotations

import hashlib
import os
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import ClassVar, Literal

from hvctl.errors import HvctlError
from hvctl.data.formats import ASPECT_BUCKETS, DURATION_BUCKETS, IMAGE_SUFFIXES, is_frame_count

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

        from hvctl.cache import content_hash, encoder_identities
        from hvctl.models.loading import ModelFolder, folder_fingerprint, load_components, resolve_device_dtype
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
        self.vae_id = content_hash([folder_fingerprint(model_dir / "vae"), r.vae_tiling, r.vae_tile_size, r.vae_tile_stats, r.storage_dtype])
        self.text_id = content_hash([folder_fingerprint(model_dir / n) for n in ("text_encoder", "tokenizer", "text_encoder_2", "tokenizer_2")]
                                  + [text_len, r.storage_dtype])
        self.identities = encoder_identities(model_dir)  # recorded in every entry; training checks them

    def condition_encoder(self):
        """The avatar conditions' encoder (built on first use: the audio encoder may be a Whisper)."""
        if self._conditions is None:
            from hvctl.avatar import ConditionEncoder, audio_encoder_for

            audio = audio_encoder_for(self.r.audio_encoder, self.r.audio_encoder_options).to(self.parts.vae.device)
            self._conditions = ConditionEncoder(self.parts.vae, audio)
        return self._conditions

    def encode_conditions(self, files: dict, bucket, fps: float) -> dict:
        from hvctl.cache import condition_tensor

        h, w, n = bucket
        tensors = self.condition_encoder().from_files(files, h, w, n, fps)
        return {condition_tensor(name): t.to(self.storage_dtype) for name, t in tensors.items()}

    def encode_media(self, frames) -> dict:
        from hvctl.cache import LATENT_MEAN, LATENT_STD
        from hvctl.models.vae import encode_posterior

        mean, std = encode_posterior(self.parts.vae, frames)
        return {LATENT_MEAN: mean.to(self.storage_dtype), LATENT_STD: std.to(self.storage_dtype)}

    def encode_loss_mask(self, mask_frames, bucket) -> dict:
        """A loss mask (image [1,H,W,3] or video [T,H,W,3] uint8) fitted to the bucket as the media
        is, then pooled onto the VAE's latent grid."""
        from hvctl.cache import LOSS_MASK
        from hvctl.data.buckets import fit_to_bucket

        if mask_frames.shape[0] == 1:  # one image masks every frame
            mask_frames = mask_frames.repeat(bucket[2], axis=0)
        fitted = fit_to_bucket(mask_frames, bucket)
        config = self.parts.vae.config
        pooled = pool_loss_mask(fitted, config.spatial_compression_ratio, config.temporal_compression_ratio)
        return {LOSS_MASK: pooled.to(self.storage_dtype)}

    def encode_texts(self, texts: list[str], template: str) -> dict:
        from hvctl.cache import pooled_tensor, text_tensor

        text = self.prompt_encoders[template](texts)
        tensors = {}
        for v in range(len(texts)):
            n = int(text.llm_mask[v].sum())
            tensors[text_tensor(v)] = text.llm_states[v, :n].to(self.storage_dtype)  # padding is rebuilt on reading
            tensors[pooled_tensor(v)] = text.pooled[v].to(self.storage_dtype)
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


class BadSample(Exception):
    """A sample that cannot be encoded: the file at fault and what is wrong with it."""

    def __init__(self, path, reason: str):
        super().__init__(f"{path}: {reason}")
        self.path, self.reason = path, reason


def _read_frames(path: Path, as_image: bool):
    """A media file's frames [T,H,W,3]; a file that cannot be read is this sample's failure."""
    from hvctl.video import read_image, read_video

    try:
        return read_image(path)[None] if as_image else read_video(path)[0]
    except HvctlError as e:  # its message names the file first
        raise BadSample(path, str(e).removeprefix(f"{path}: ")) from None


@dataclass
class Sample:
    """A manifest record, its files found and its media read, and its cache key."""
    record: object  # data.manifest.ManifestRecord
    frames: object  # [T,H,W,3] uint8, before bucketing
    bucket: tuple[int, int, int]
    texts: list[str]
    conditions: dict[str, Path]  # avatar condition name -> file
    loss_mask: Path | None
    key: str


def read_sample(rec, manifest_dir: Path, buckets, r: EncodeRecipe, encoder: Encoder) -> Sample:
    """The sample's key, and what encoding it needs; raises BadSample for a missing or
    unreadable file or media too short for every bucket."""
    from hvctl.cache import sample_key
    from hvctl.data.buckets import assign_bucket
    from hvctl.data.captions import caption_variants

    path = rec.media_path(manifest_dir)
    if not path.is_file():
        raise BadSample(path, "media file not found")
    frames = _read_frames(path, as_image=rec.kind != "video")
    bucket = assign_bucket(frames.shape[2], frames.shape[1], frames.shape[0], buckets)
    if bucket is None:
        raise BadSample(path, f"{frames.shape[0]} frames, fewer than the shortest frame bucket ({min(r.frame_buckets)})")
    conditions = {name: manifest_dir / rec.extra[name] for name in CONDITION_FIELDS if rec.extra.get(name)}
    missing = [p for p in conditions.values() if not p.is_file()]
    if missing:
        raise BadSample(missing[0], "condition file not found")
    mask = manifest_dir / rec.extra[LOSS_MASK_FIELD] if rec.extra.get(LOSS_MASK_FIELD) else None
    if mask is not None and not mask.is_file():
        raise BadSample(mask, "loss mask file not found")
    texts = caption_variants(rec.caption, rec.id, r.caption_variants)
    audio = encoder.condition_encoder().audio_encoder.identity if "audio" in conditions else None
    key = sample_key(path, texts, bucket, encoder.vae_id, encoder.text_id, loss_mask=mask, conditions=conditions, audio_encoder=audio)
    return Sample(rec, frames, bucket, texts, conditions, mask, key)


def encode_sample(sample: Sample, encoder: Encoder) -> dict:
    """The sample's tensors, named as hvctl/cache.py reads them; raises BadSample naming the
    file at fault (a loss mask or condition file that cannot be read or does not fit)."""
    from hvctl.data.buckets import fit_to_bucket

    rec, bucket = sample.record, sample.bucket
    tensors = encoder.encode_media(fit_to_bucket(sample.frames, bucket))
    if sample.loss_mask is not None:
        mask_frames = _read_frames(sample.loss_mask, as_image=sample.loss_mask.suffix.lower() in IMAGE_SUFFIXES)  # else a video
        problem = _loss_mask_mismatch(mask_frames.shape, sample.frames.shape)
        if problem:
            raise BadSample(sample.loss_mask, problem)
        tensors.update(encoder.encode_loss_mask(mask_frames, bucket))
    for name, path in sample.conditions.items():  # one at a time, so that a failure knows its file
        try:
            tensors.update(encoder.encode_conditions({name: path}, bucket, rec.fps or 1.0))
        except HvctlError as e:  # its message names the file first
            raise BadSample(path, str(e).removeprefix(f"{path}: ")) from None
    tensors.update(encoder.encode_texts(sample.texts, "image" if rec.kind == "image" else "video"))
    return tensors


def encode(r: EncodeRecipe, *, progress: bool | None = None, on_problem=None) -> dict:
    """Run an encode recipe; returns counts, failures and timings.

    on_problem(message) hears each skipped sample as it happens (the CLI prints it).
    """
    from hvctl.cache import (CacheLock, ShardWriter, latest_by_id, load_entries, pooled_tensor, shard_dir, text_tensor,
                             write_empty_text, write_index)
    from hvctl.data.buckets import BucketConfig
    from hvctl.data.manifest import iter_manifest
    from hvctl.io import check_output_dir
    from hvctl.models.loading import prepare_model
    from hvctl.progress import progress_bar

    if r.manifest is None or r.out is None:
        raise HvctlError("encode needs a manifest and an output cache folder (MANIFEST --out CACHE)")
    for name in ("caption_variants", "samples_per_shard", "vae_tile_size"):
        if getattr(r, name) < 1:
            raise HvctlError(f"'{name}' must be at least 1, got {getattr(r, name)}")
    if not all(is_frame_count(f, image=True) for f in r.frame_buckets):
        raise HvctlError(f"frame_buckets must all be 4k+1, got {r.frame_buckets}")
    if any(h % 16 or w % 16 for h, w in r.aspect_buckets):
        raise HvctlError(f"aspect_buckets must be multiples of 16, got {r.aspect_buckets}")
    shard = parse_shard(r.shard)
    manifest = Path(r.manifest)
    check_output_dir(r.out, "--out")
    failures: list[dict] = []

    def fail(sample_id, path, reason):
        if r.on_error == "fail":
            raise HvctlError(f"{path}: {reason}" + (f" (sample {sample_id})" if sample_id else ""))
        failures.append({"id": sample_id, "path": str(path), "reason": reason})
        if on_problem:
            on_problem(f"skipped {path}: {reason}")

    records = list(iter_manifest(manifest, on_error=lambda e: fail(None, e.where, e.reason)))
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
        write_empty_text(cache, encoder.text_id, {"text": empty[text_tensor(0)], "pooled": empty[pooled_tensor(0)]})
        latest = {sample_id: entry.key for sample_id, entry in latest_by_id(load_entries(cache)).items()}
        writer = ShardWriter(cache, f"s{shard[0]}of{shard[1]}-{os.getpid()}", r.samples_per_shard)
        encoded = skipped = 0
        try:
            with progress_bar(len(records), "encoding", enabled=progress) as advance:
                for rec in records:
                    advance()
                    try:
                        sample = read_sample(rec, manifest.parent, buckets, r, encoder)
                        if latest.get(rec.id) == sample.key:
                            skipped += 1
                            continue
                        tensors = encode_sample(sample, encoder)
                    except BadSample as e:
                        fail(rec.id, e.path, e.reason)
                        continue
                    writer.add({"key": sample.key, "id": rec.id, "kind": rec.kind, "bucket": list(sample.bucket),
                                "text_variants": len(sample.texts), "split": rec.split, "conditions": sorted(sample.conditions),
                                "loss_mask": sample.loss_mask is not None, **encoder.identities}, tensors)
                    latest[rec.id] = sample.key
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
