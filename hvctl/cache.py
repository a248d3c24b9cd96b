"""The encode cache format, in one place: what `hvctl encode` writes and training reads.

A cache is a folder:

    CACHE/shards/{commit time ns}-{tag}.safetensors   encoded samples, many per file
    CACHE/index.json                          a consolidated listing (an accelerator only)
    CACHE/empty_text-{text_id}.safetensors    the empty prompt's text states (classifier-free dropout)

A shard is self-describing: its safetensors metadata lists its entries (key, id, bucket, ...).
It is written under a temporary name and renamed, so the rename commits it: a reader, or a run
killed with -9, never sees part of one. The index is therefore always derivable from the shards;
index.json is only trusted when it lists exactly the shard files present.

Shard names start with their commit time, so name order is commit order. A sample id can have
several entries (its caption or media changed, or two runs encoded it at once); readers see the
most recently committed one (`latest_by_id`).

Tensors of an entry (key = `sample_key`: a content hash of media, caption, bucket, VAE and text
encoders, and of the loss mask and conditions when there are some; names below are the constants
and functions of this module):
    {key}.latent_mean, {key}.latent_std   (C, T', H', W') the VAE posterior; training samples from it
    {key}.text.{v}                        (n_tokens, D) LLM states of caption variant v, padding dropped
    {key}.pooled.{v}                      (D2,) CLIP pooled output of caption variant v
    {key}.cond.{name}                     avatar conditions (hvctl/avatar.py): reference and pose
                                          latents, audio and expression features per frame, audio_mask
    {key}.loss_mask                       (1, T', H', W') the manifest's loss mask on the latent grid,
                                          in [0, 1] (hvctl/encode.py: pool_loss_mask)
"""

from __future__ import annotations

import hashlib
import json
import os
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
from safetensors import safe_open
from safetensors.torch import save_file

from hvctl.errors import HvctlError
from hvctl.io import atomic_output, disk_errors, write_json_atomic

CACHE_FORMAT = "hvctl-cache/1"

# An entry's tensor names, under its key: what encode writes and LatentCache reads.
LATENT_MEAN, LATENT_STD, LOSS_MASK = "latent_mean", "latent_std", "loss_mask"


def text_tensor(variant: int) -> str:
    return f"text.{variant}"


def pooled_tensor(variant: int) -> str:
    return f"pooled.{variant}"


def condition_tensor(name: str) -> str:
    return f"cond.{name}"


def content_hash(items) -> str:
    """sha256 of a JSON-able list: cache keys and encoder identities."""
    return hashlib.sha256(json.dumps(items, sort_keys=True, default=str).encode()).hexdigest()


def file_sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def sample_key(media: Path, texts: list[str], bucket: tuple[int, int, int], vae_id: str, text_id: str, *,
               loss_mask: Path | None = None, conditions: dict[str, Path] | None = None,
               audio_encoder=None) -> str:
    """A sample's cache key: the hash of everything its tensors depend on. The files by content
    (a renamed or touched file keeps its key), the encoders by their ids (encode.Encoder), and the
    audio encoder's identity when there is audio. A sample whose key is in the cache is skipped."""
    parts = [file_sha256(media), texts, bucket, vae_id, text_id]
    if loss_mask is not None:
        parts.append(("loss_mask", file_sha256(loss_mask)))
    if conditions:
        parts.append(sorted((name, file_sha256(p)) for name, p in conditions.items()))
        if "audio" in conditions:
            parts.append(audio_encoder)
    return content_hash(parts)


@dataclass(frozen=True)
class CacheEntry:
    key: str
    id: str
    kind: str  # image | video
    bucket: tuple[int, int, int]  # (height, width, frames) of the media that was encoded
    text_variants: int
    shard: str  # file name under shards/
    split: str | None = None
    conditions: tuple[str, ...] = ()  # avatar conditions cached with it: cond.{name}
    loss_mask: bool = False  # a loss mask is cached with it
    # Fingerprints of the model parts that encoded it (encoder_identities); None in older caches.
    vae: str | None = None
    text_encoders: str | None = None

    @classmethod
    def from_json(cls, d: dict) -> "CacheEntry":
        return cls(**{**d, "bucket": tuple(d["bucket"]), "conditions": tuple(d.get("conditions", ()))})


def shard_dir(root: Path) -> Path:
    return Path(root) / "shards"


class ShardWriter:
    """Buffers encoded samples and commits them as shards of `samples_per_shard` entries."""

    def __init__(self, root: Path, tag: str, samples_per_shard: int = 64):
        self.dir = shard_dir(root)
        self.dir.mkdir(parents=True, exist_ok=True)
        self.tag, self.samples_per_shard = tag, samples_per_shard
        self.pending: list[tuple[dict, dict[str, torch.Tensor]]] = []
        self.written: list[Path] = []

    def add(self, entry: dict, tensors: dict[str, torch.Tensor]) -> None:
        """entry: CacheEntry fields but `shard`; tensors: names without the `{key}.` prefix."""
        self.pending.append((entry, tensors))
        if len(self.pending) >= self.samples_per_shard:
            self.flush()

    def flush(self) -> None:
        if not self.pending:
            return
        path = self.dir / f"{time.time_ns():020d}-{self.tag}-{len(self.written):05d}.safetensors"
        tensors, entries = {}, []
        for entry, named in self.pending:
            entries.append({**entry, "shard": path.name})
            for name, tensor in named.items():
                tensors[f"{entry['key']}.{name}"] = tensor.detach().cpu().contiguous()
        metadata = {"format": CACHE_FORMAT, "entries": json.dumps(entries)}
        with atomic_output(path) as tmp:
            save_file(tensors, str(tmp), metadata=metadata)
        self.written.append(path)
        self.pending = []


TEXT_PARTS = ("text_encoder", "tokenizer", "text_encoder_2", "tokenizer_2")


def encoder_identities(model_dir: Path) -> dict[str, str]:
    """What a cache entry records of the model that encoded it: its VAE's and its text encoders'
    content fingerprints (a copied or hard-linked folder has the same)."""
    from hvctl.models.loading import folder_fingerprint

    model_dir = Path(model_dir)
    text = [folder_fingerprint(model_dir / name) for name in TEXT_PARTS]
    return {"vae": folder_fingerprint(model_dir / "vae"),
            "text_encoders": "sha256:" + hashlib.sha256(json.dumps(text).encode()).hexdigest()}


def check_cache_encoders(root: Path, entries: list[CacheEntry], model_dir: Path, *, what: str = "data.cache",
                         override: str = "set data.accept_foreign_cache: true") -> None:
    """Refuse to train on latents or text states from other encoders than the model's: the DiT
    would learn another VAE's latent space without a word (`override` says how to insist)."""
    mine = encoder_identities(model_dir)
    for part, name in (("vae", "VAE"), ("text_encoders", "text encoders")):
        foreign = [e for e in entries if getattr(e, part) is not None and getattr(e, part) != mine[part]]
        if foreign:
            raise HvctlError(f"{what} {root}: {len(foreign)} of {len(entries)} samples were encoded by another {name} "
                             f"than {model_dir}'s (e.g. {foreign[0].id}); encode with this model (hvctl encode "
                             f"--model), or {override} if the encoders are the same")


def read_shard_entries(path: Path) -> list[CacheEntry]:
    try:
        with safe_open(str(path), framework="pt") as f:
            metadata = f.metadata() or {}
    except Exception as e:  # safetensors raises its own error types for a damaged file
        raise HvctlError(f"{path}: unreadable cache shard ({e})") from None
    if metadata.get("format") != CACHE_FORMAT:
        raise HvctlError(f"{path}: not an hvctl cache shard (format {metadata.get('format')!r})")
    return [CacheEntry.from_json(d) for d in json.loads(metadata["entries"])]


def shard_files(root: Path) -> list[Path]:
    # Temporary files start with a dot: never part of the cache.
    return sorted(p for p in shard_dir(root).glob("*.safetensors") if not p.name.startswith("."))


def scan_entries(root: Path) -> list[CacheEntry]:
    """Every entry of every committed shard, in commit order."""
    return [entry for path in shard_files(root) for entry in read_shard_entries(path)]


def load_entries(root: Path) -> list[CacheEntry]:
    """The cache's entries, from index.json when it is current, else from the shards themselves."""
    index_path = Path(root) / "index.json"
    names = [p.name for p in shard_files(root)]
    if index_path.is_file():
        try:
            index = json.loads(index_path.read_text())
            if index.get("format") == CACHE_FORMAT and index.get("shards") == names:
                return [CacheEntry.from_json(e) for e in index["entries"]]
        except (json.JSONDecodeError, KeyError, TypeError):
            pass  # rebuilt below
    return scan_entries(root)


def latest_by_id(entries: list[CacheEntry]) -> dict[str, CacheEntry]:
    """Each sample id's most recently committed entry."""
    return {entry.id: entry for entry in entries}


def write_index(root: Path) -> list[CacheEntry]:
    """Consolidate the shards' entries into index.json (atomically)."""
    names = [p.name for p in shard_files(root)]
    entries = scan_entries(root)
    write_json_atomic(Path(root) / "index.json", {
        "format": CACHE_FORMAT, "shards": names, "entries": [asdict(e) for e in entries],
    })
    return entries


def write_empty_text(root: Path, text_id: str, tensors: dict[str, torch.Tensor]) -> Path:
    path = Path(root) / f"empty_text-{text_id[:16]}.safetensors"
    if not path.exists():
        with atomic_output(path) as tmp:
            save_file({k: v.contiguous() for k, v in tensors.items()}, str(tmp), metadata={"format": CACHE_FORMAT})
    return path


class CacheLock:
    """An exclusive, non-blocking lock on a cache for one shard of work (`--shard i/n`).

    flock is released by the kernel when its holder dies, kill -9 included, so a crashed run
    never leaves the cache locked.
    """

    def __init__(self, root: Path, name: str):
        self.path = Path(root) / f".lock-{name}"

    def __enter__(self):
        import fcntl

        with disk_errors(self.path):
            self.path.parent.mkdir(parents=True, exist_ok=True)
            self.file = open(self.path, "a+")
        try:
            fcntl.flock(self.file, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            self.file.close()
            raise HvctlError(f"{self.path.parent}: another hvctl encode is working on this cache (lock {self.path.name})") from None
        try:  # the holder's pid, for people; the lock is the flock
            self.file.truncate(0)
            self.file.write(f"{os.getpid()}\n")
            self.file.flush()
        except OSError:
            pass  # a full disk fails the first real write, with its path
        return self

    def __exit__(self, *exc):
        self.file.close()


class LatentCache(torch.utils.data.Dataset):
    """Training's view of a cache: one item per entry, grouped by bucket.

    An item holds the VAE posterior (mean, std), and the text states of one caption variant
    padded to `text_len` with their mask, and the CLIP pooled vector, and its loss mask on the
    latent grid (ones when the sample has none, so that every batch stacks one).
    """

    def __init__(self, root: str | Path, text_len: int = 256, split: str | None = None, ids=None):
        """split, ids: keep only the samples of this split / with these ids (e.g. a manifest's)."""
        self.root = Path(root)
        if not shard_dir(self.root).is_dir():
            raise HvctlError(f"{self.root}: not an hvctl cache (no shards/ folder)")
        ids = None if ids is None else set(ids)
        self.entries = sorted(
            (e for e in latest_by_id(load_entries(self.root)).values()
             if (split is None or e.split == split) and (ids is None or e.id in ids)),
            key=lambda e: e.id,
        )
        self.text_len = text_len
        self._handles: dict[str, object] = {}

    def __len__(self) -> int:
        return len(self.entries)

    @property
    def buckets(self) -> dict[tuple[int, int, int], list[int]]:
        from hvctl.data.batching import group_by_bucket

        return group_by_bucket([e.bucket for e in self.entries])

    def handle(self, shard: str):
        """The shard's open safetensors file (kept open: shards hold many samples)."""
        if shard not in self._handles:
            self._handles[shard] = safe_open(str(shard_dir(self.root) / shard), framework="pt")
        return self._handles[shard]

    def _tensor(self, shard: str, name: str) -> torch.Tensor:
        return self.handle(shard).get_tensor(name)

    def pad_text(self, states: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        n = min(states.shape[0], self.text_len)
        padded = states.new_zeros(self.text_len, states.shape[1])
        padded[:n] = states[:n]
        mask = torch.zeros(self.text_len, dtype=torch.long)
        mask[:n] = 1
        return padded, mask

    def item(self, index: int, variant: int = 0) -> dict:
        entry = self.entries[index]
        variant = variant % entry.text_variants
        get = lambda name: self._tensor(entry.shard, f"{entry.key}.{name}")  # noqa: E731
        text, mask = self.pad_text(get(text_tensor(variant)))
        latent_mean = get(LATENT_MEAN)
        return {
            "id": entry.id, "key": entry.key, "bucket": entry.bucket, "kind": entry.kind,
            "latent_mean": latent_mean, "latent_std": get(LATENT_STD),
            "text_states": text, "text_mask": mask, "pooled": get(pooled_tensor(variant)),
            "loss_mask": get(LOSS_MASK) if entry.loss_mask else torch.ones_like(latent_mean[:1]),
            **{f"cond.{name}": get(condition_tensor(name)) for name in entry.conditions},
        }

    def __getitem__(self, index: int) -> dict:
        return self.item(index)

    def empty_text(self) -> dict | None:
        """The empty prompt's conditions (for classifier-free-guidance dropout), if encoded."""
        files = sorted(self.root.glob("empty_text-*.safetensors"))
        if not files:
            return None
        with safe_open(str(files[0]), framework="pt") as f:
            text, mask = self.pad_text(f.get_tensor("text"))
            return {"text_states": text, "text_mask": mask, "pooled": f.get_tensor("pooled")}

    def __getstate__(self):  # DataLoader workers open their own file handles
        return {**self.__dict__, "_handles": {}}
