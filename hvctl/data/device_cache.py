"""`data.preload`: the latent cache's tensors loaded once, stacked per bucket, on the training
device (or in CPU memory); a micro-batch is then a gather instead of per-sample safetensors reads,
text padding and stacking on the main process (which held stages 3 and 4 at 300-1,100 samples/s
on an H100).

`PreloadedCache.batch(indices, variants)` returns exactly what `collate([cache.item(i, v) ...])`
does (same keys, values, dtypes and order); the trainer's randomness is untouched, so runs and
resumes are bit-identical with and without it. Text states are kept at the cache's longest caption
(at most text_len) and padded with zeros to text_len on the gather, as `LatentCache.pad_text` does.
"""

from __future__ import annotations

import os
from dataclasses import dataclass

import torch

from hvctl.cache import LatentCache
from hvctl.errors import HvctlError

# Share of the free memory the cache may take: the rest is for activations, gradients, optimizer.
USABLE_SHARE = 0.8
DTYPE_BYTES = {"F64": 8, "F32": 4, "F16": 2, "BF16": 2, "I64": 8, "I32": 4, "I16": 2, "I8": 1, "U8": 1, "BOOL": 1}


@dataclass
class BucketTensors:
    """One bucket's samples, stacked: row r is the bucket's r-th sample; its caption variant v is
    text row first[r] + v % variants[r]."""

    latent_mean: torch.Tensor  # (N, C, T', H', W')
    latent_std: torch.Tensor
    loss_mask: torch.Tensor  # (N, 1, T', H', W'), ones where a sample has none
    text: torch.Tensor  # (rows, L, D), L = the bucket's longest caption, at most text_len
    text_tokens: torch.Tensor  # (rows,) each caption's length, at most L
    pooled: torch.Tensor  # (rows, D2)
    first: list[int]
    variants: list[int]
    conditions: list[dict[str, torch.Tensor]]  # avatar conditions, per sample (they vary)


def _bytes(tensor_slice) -> int:
    n = DTYPE_BYTES.get(tensor_slice.get_dtype(), 4)
    for d in tensor_slice.get_shape():
        n *= d
    return n


def estimate_bytes(cache: LatentCache, indices: list[int]) -> int:
    """What preloading these samples takes, from the shards' headers (no tensor is read)."""
    total, text_rows = 0, {}  # bucket -> [rows, longest caption, bytes per token]
    for i in indices:
        e = cache.entries[i]
        f = cache.handle(e.shard)
        size = lambda name: _bytes(f.get_slice(f"{e.key}.{name}"))  # noqa: E731, B023
        mean = f.get_slice(f"{e.key}.latent_mean")
        # mean and std, and a loss mask of one channel; conditions; pooled vectors and caption lengths
        total += 2 * _bytes(mean) + _bytes(mean) // max(mean.get_shape()[0], 1)
        total += sum(size(f"cond.{name}") for name in e.conditions)
        rows = text_rows.setdefault(e.bucket, [0, 0, 0])
        for v in range(e.text_variants):
            total += size(f"pooled.{v}") + 8
            text = f.get_slice(f"{e.key}.text.{v}")
            tokens, dim = text.get_shape()
            rows[0] += 1
            rows[1] = max(rows[1], min(tokens, cache.text_len))
            rows[2] = dim * DTYPE_BYTES.get(text.get_dtype(), 4)
    # text rows are padded to their bucket's longest caption
    return total + sum(n * longest * per_token for n, longest, per_token in text_rows.values())


def free_bytes(device: torch.device) -> int:
    if device.type == "cuda":
        return torch.cuda.mem_get_info(device)[0]
    try:  # Linux: what can be allocated without swapping
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")


class PreloadedCache:
    def __init__(self, cache: LatentCache, indices: list[int], device: torch.device | str):
        self.device = torch.device(device)
        self.text_len = cache.text_len
        need, free = estimate_bytes(cache, indices), free_bytes(self.device)
        if need > USABLE_SHARE * free:
            raise HvctlError(f"data.preload: the cache's {len(indices)} samples need {need / 2**30:.2f} GiB and "
                             f"{self.device} has {free / 2**30:.2f} GiB free ({USABLE_SHARE:.0%} usable); "
                             "set data.preload: none")
        self.entries = cache.entries
        self.where: dict[int, tuple[tuple, int]] = {}  # dataset index -> (bucket, row)
        by_bucket: dict[tuple, list[int]] = {}
        for i in sorted(indices):
            by_bucket.setdefault(cache.entries[i].bucket, []).append(i)
        self.buckets = {b: self._load(cache, b, ix) for b, ix in by_bucket.items()}

    def _load(self, cache: LatentCache, bucket: tuple, indices: list[int]) -> BucketTensors:
        means, stds, masks, texts, tokens, pooled, first, variants, conditions = ([] for _ in range(9))
        for row, i in enumerate(indices):
            self.where[i] = (bucket, row)
            e = cache.entries[i]
            get = lambda name: cache.handle(e.shard).get_tensor(f"{e.key}.{name}")  # noqa: E731, B023
            means.append(get("latent_mean"))
            stds.append(get("latent_std"))
            masks.append(get("loss_mask") if e.loss_mask else torch.ones_like(means[-1][:1]))
            first.append(len(texts))
            variants.append(e.text_variants)
            for v in range(e.text_variants):
                texts.append(get(f"text.{v}")[:self.text_len])
                tokens.append(texts[-1].shape[0])
                pooled.append(get(f"pooled.{v}"))
            conditions.append({name: get(f"cond.{name}").to(self.device) for name in e.conditions})
        longest = max(tokens)
        text = texts[0].new_zeros(len(texts), longest, texts[0].shape[1])
        for r, states in enumerate(texts):
            text[r, :states.shape[0]] = states
        try:
            stacked = [torch.stack(t).to(self.device) for t in (means, stds, masks, pooled)]
        except RuntimeError as e:  # a bucket's samples have one latent shape unless the cache is damaged
            raise HvctlError(f"data.preload: bucket {'x'.join(map(str, bucket))} holds tensors of different shapes ({e})") from None
        return BucketTensors(*stacked[:3], text=text.to(self.device), text_tokens=torch.tensor(tokens, device=self.device),
                             pooled=stacked[3], first=first, variants=variants, conditions=conditions)

    def batch(self, indices: list[int], variants: list[int]) -> dict:
        """The micro-batch of these same-bucket samples and caption variants, as `collate` makes it."""
        bucket = self.where[indices[0]][0]
        t = self.buckets[bucket]
        rows = [self.where[i][1] for i in indices]
        text_rows = torch.tensor([t.first[r] + v % t.variants[r] for r, v in zip(rows, variants)], device=self.device)
        rows_t = torch.tensor(rows, device=self.device)
        states = t.text.index_select(0, text_rows)
        text = states.new_zeros(len(indices), self.text_len, states.shape[2])
        text[:, :states.shape[1]] = states
        lengths = t.text_tokens.index_select(0, text_rows)
        mask = (torch.arange(self.text_len, device=self.device)[None] < lengths[:, None]).long()
        entries = [self.entries[i] for i in indices]
        batch = {
            "id": [e.id for e in entries], "key": [e.key for e in entries], "bucket": [e.bucket for e in entries],
            "kind": [e.kind for e in entries],
            "latent_mean": t.latent_mean.index_select(0, rows_t), "latent_std": t.latent_std.index_select(0, rows_t),
            "text_states": text, "text_mask": mask, "pooled": t.pooled.index_select(0, text_rows),
            "loss_mask": t.loss_mask.index_select(0, rows_t),
        }
        conditions = [t.conditions[r] for r in rows]
        if any(conditions):
            from hvctl.avatar import batch_inputs

            batch["conditions"] = batch_inputs(conditions)
        return batch


def preload(cache: LatentCache, sampler, mode: str, device: torch.device) -> PreloadedCache | None:
    """data.preload: none (read per sample), cpu (stacked in CPU memory), device (on the training
    device); only the samples the stage's sampler can draw."""
    if mode == "none":
        return None
    drawn = [i for stream in sampler.streams.values() for ix in stream.values() for i in ix]
    return PreloadedCache(cache, drawn, device if mode == "device" else torch.device("cpu"))
