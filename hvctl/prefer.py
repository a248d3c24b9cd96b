"""`hvctl prefer`: preference pairs for DPO (hvctl/train/dpo.py) from the model's own videos.

For each prompt the model makes `videos` videos (4, as Seaweed does), a scorer plugin scores them
(built in: `toy`, the toy evaluator's measure; `labels`, scores from a JSONL file such as people's
ratings), and the best and the worst form the prompt's (chosen, rejected) pair. A prompt whose
videos all score the same gives no pair. The output folder holds

    OUT/videos/{id}/{k}.mp4     video k of prompt {id}
    OUT/prompts.jsonl           per prompt: its videos' scores, chosen, rejected (the run's state)
    OUT/manifest.jsonl          the preference manifest: each pair's chosen and rejected clip as a
                                manifest record, `preference: {pair, role, score}`, caption = prompt
    OUT/cache/                  their latents and text states, as `hvctl encode` caches them

It is incremental and resumable like `hvctl caption`: a video on disk is not made again, a score
is not asked again, prompts.jsonl is rewritten atomically every `save_every` prompts, and prompts
added to the input later are done by the next run. Video k of a prompt is drawn from a seed
derived from (seed, prompt id, k) alone, so a resumed run makes what an uninterrupted one does.
"""

from __future__ import annotations

import hashlib
import json
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, ClassVar, Literal

from hvctl.errors import HvctlError


@dataclass
class PreferRecipe:
    KIND: ClassVar[str] = "prefer"
    LIMITS: ClassVar[dict] = {"videos": ">= 2", "seed": "[0, 9223372036854775807]", "save_every": ">= 1", "batch_size": ">= 1",
                              "steps": ">= 1", "guidance_scale": ">= 1", "embedded_guidance": ">= 0", "flow_shift": "> 0",
                              "height": ">= 16", "width": ">= 16", "frames": ">= 1", "limit": ">= 1"}
    prompts: Path | None = None  # a text file (one prompt a line) or a manifest (.jsonl: each record's short_description)
    model: Path | None = None  # None: the embedded default model
    out: Path | None = None  # the preference folder
    videos: int = 4  # videos per prompt; the best and the worst form the pair
    scorer: str = "toy"  # a registered scorer (hvctl plugins list --kind scorer)
    options: dict[str, Any] = field(default_factory=dict)  # the scorer's own options (labels: {path: FILE})
    limit: int | None = None  # the first `limit` prompts only
    seed: int = 0
    steps: int | None = None  # generation settings; None: the model's defaults
    guidance_scale: float | None = None
    embedded_guidance: float | None = None
    flow_shift: float | None = None
    height: int | None = None
    width: int | None = None
    frames: int | None = None
    batch_size: int = 4  # videos per DiT batch
    save_every: int = 8  # prompts between atomic rewrites of prompts.jsonl
    device: str = "auto"
    on_error: Literal["skip", "fail"] = "skip"


def read_prompts(path: Path) -> list[dict]:
    """[{id, prompt, ...the record's fields}] from a text file or a manifest; ids are stable:
    a manifest's own, or a hash of the prompt text (so reordering a text file changes nothing)."""
    if not Path(path).is_file():
        raise HvctlError(f"prompts: {path} not found")
    items: dict[str, dict] = {}
    if Path(path).suffix == ".jsonl":
        from hvctl.data.manifest import read_manifest

        for rec in read_manifest(path):
            caption = rec.caption or {}
            prompt = caption.get("short_description")
            if not prompt:
                raise HvctlError(f"{path}: record {rec.id} has no caption short_description to prompt with")
            items.setdefault(rec.id, {**rec.extra, "id": rec.id, "prompt": prompt})
    else:
        for line in Path(path).read_text(encoding="utf-8").splitlines():
            prompt = line.strip()
            if prompt:
                pid = "p-" + hashlib.sha1(prompt.encode()).hexdigest()[:12]
                items.setdefault(pid, {"id": pid, "prompt": prompt})
    if not items:
        raise HvctlError(f"{path}: no prompts")
    return list(items.values())


def video_seed(seed: int, prompt_id: str, k: int) -> int:
    digest = hashlib.sha256(f"{seed}/{prompt_id}/{k}".encode()).digest()
    return int.from_bytes(digest[:8], "little") >> 1


def pick_pair(scores: list[float]) -> tuple[int, int] | None:
    """(best, worst) video indices, the first of equals; None when every score is the same."""
    best = max(range(len(scores)), key=lambda k: (scores[k], -k))
    worst = min(range(len(scores)), key=lambda k: (scores[k], k))
    return None if scores[best] == scores[worst] else (best, worst)


def _read_state(path: Path) -> dict[str, dict]:
    if not path.is_file():
        return {}
    state = {}
    for number, line in enumerate(path.read_text(encoding="utf-8").splitlines(), 1):
        try:
            row = json.loads(line)
            state[row["id"]] = row
        except (ValueError, KeyError, TypeError):
            raise HvctlError(f"{path}:{number}: not a prefer state line (delete the file to start over)") from None
    return state


def _write_state(path: Path, rows: list[dict]) -> None:
    from hvctl.io import write_text_atomic

    write_text_atomic(path, "".join(json.dumps(row) + "\n" for row in rows))


def prefer(r: PreferRecipe, *, progress: bool | None = None, on_problem=None) -> dict:
    from dataclasses import replace

    from hvctl import plugins
    from hvctl.generate import GenerateRecipe, TextToVideo, prepare
    from hvctl.models.loading import resolve_device_dtype
    from hvctl.io import check_output_dir
    from hvctl.progress import progress_bar
    from hvctl.recipe import check_number
    from hvctl.video import read_video, write_video

    if r.prompts is None or r.out is None:
        raise HvctlError("prefer needs prompts and an output folder (PROMPTS --out DIR)")
    for name, spec in PreferRecipe.LIMITS.items():
        check_number(name, getattr(r, name), spec)
    out = check_output_dir(r.out, "--out")
    items = read_prompts(r.prompts)[:r.limit]
    scorer = plugins.create("scorer", r.scorer, **r.options)
    base, model_dir = prepare(GenerateRecipe(prompt=items[0]["prompt"], model=r.model, steps=r.steps,
                                             guidance_scale=r.guidance_scale, embedded_guidance=r.embedded_guidance,
                                             flow_shift=r.flow_shift, height=r.height, width=r.width,
                                             frames=r.frames, device=r.device, seed=r.seed))
    if base.frames < 5:
        raise HvctlError(f"prefer makes videos: frames must be 4k+1 >= 5, got {base.frames}")
    out.mkdir(parents=True, exist_ok=True)
    state_path = out / "prompts.jsonl"
    state = _read_state(state_path)
    settings = {"model": str(model_dir), "videos": r.videos, "seed": r.seed, "steps": base.steps, "height": base.height,
                "width": base.width, "frames": base.frames, "flow_shift": base.flow_shift,
                "guidance_scale": base.guidance_scale, "embedded_guidance": base.embedded_guidance}
    settings_path = out / "settings.json"
    if settings_path.is_file() and json.loads(settings_path.read_text()) != settings:
        raise HvctlError(f"--out {out}: made with other settings ({settings_path}); use a new folder")
    from hvctl.io import write_json_atomic

    write_json_atomic(settings_path, settings)

    t2v = None
    started, made, scored, failed = time.monotonic(), 0, 0, []
    rows = [state.get(item["id"]) or {"id": item["id"], "prompt": item["prompt"], "scores": [None] * r.videos}
            for item in items]
    todo = [(item, row) for item, row in zip(items, rows) if None in row["scores"]]
    with progress_bar(len(todo), f"prefer ({r.scorer})", enabled=progress) as advance:
        for i, (item, row) in enumerate(todo):
            folder = out / "videos" / item["id"]
            paths = [folder / f"{k}.mp4" for k in range(r.videos)]
            missing = [k for k, p in enumerate(paths) if not p.is_file()]
            if missing and t2v is None:
                device, dtype = resolve_device_dtype(base.device, base.dtype)
                t2v = TextToVideo(model_dir, base, device, dtype)
            for first in range(0, len(missing), r.batch_size):
                ks = missing[first:first + r.batch_size]
                seeds = [video_seed(r.seed, item["id"], k) for k in ks]
                videos = t2v.frames(t2v.latents(seeds, t2v.conditions([item["prompt"]] * len(ks))))
                for k, video in zip(ks, videos):
                    write_video(paths[k], video, fps=base.fps)
                    made += 1
            row.pop("prefer_error", None)
            for k, path in enumerate(paths):
                if row["scores"][k] is not None:
                    continue
                try:
                    value = float(scorer.score(read_video(path)[0], item["prompt"], {**item, "index": k, "video": str(path)}))
                    if value != value or value in (float("inf"), float("-inf")):
                        raise plugins.SampleFailure(f"the scorer gave {value}")
                    row["scores"][k] = value
                    scored += 1
                except plugins.SampleFailure as e:
                    row["prefer_error"] = f"video {k}: {e}"
                    failed.append({"id": item["id"], "video": k, "error": str(e)})
                    if on_problem:
                        on_problem(f"{item['id']} video {k}: {e}")
                    if r.on_error == "fail":
                        raise HvctlError(f"{path}: {e}") from None
            if None not in row["scores"]:
                pair = pick_pair(row["scores"])
                row["chosen"], row["rejected"] = (None, None) if pair is None else pair
            if (i + 1) % r.save_every == 0:
                _write_state(state_path, rows)
            advance()
    _write_state(state_path, rows)
    pairs = [row for row in rows if row.get("chosen") is not None]
    manifest = _write_pair_manifest(out, pairs, base)
    cache = None
    if pairs:
        from hvctl.encode import EncodeRecipe, encode

        cache = encode(EncodeRecipe(manifest=manifest, model=model_dir, out=out / "cache", caption_variants=1,
                                    aspect_buckets=[(base.height, base.width)], frame_buckets=[base.frames],
                                    device=base.device, storage_dtype="float32", on_error="fail"), progress=progress)
    return {"out": str(out), "manifest": str(manifest), "cache": str(out / "cache") if cache else None,
            "scorer": r.scorer, "prompts": len(rows), "pairs": len(pairs),
            "ties": sum(1 for row in rows if None not in row["scores"] and row.get("chosen") is None),
            "unscored": sum(1 for row in rows if None in row["scores"]), "videos_made": made, "scored": scored,
            "failed": failed, "encoded": cache["encoded"] if cache else 0, "seconds": round(time.monotonic() - started, 2)}


def _write_pair_manifest(out: Path, pairs: list[dict], base) -> Path:
    """Each pair's two clips as manifest records (split train), beside their videos."""
    from hvctl.data.manifest import ManifestRecord, write_manifest

    records = []
    for row in pairs:
        for role in ("chosen", "rejected"):
            k = row[role]
            records.append(ManifestRecord(
                id=f"{row['id']}.{role}", media=f"videos/{row['id']}/{k}.mp4", kind="video", width=base.width,
                height=base.height, frames=base.frames, fps=float(base.fps), caption={"short_description": row["prompt"]},
                split="train", extra={"preference": {"pair": row["id"], "role": role, "video": k, "score": row["scores"][k]}}))
    path = out / "manifest.jsonl"
    write_manifest(path, records)
    return path
