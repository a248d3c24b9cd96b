"""Training checkpoints: a diffusers model folder plus everything an exact resume needs.

    RUN/checkpoints/step-00000500/
        model/                  a complete model folder (`hvctl generate` and diffusers load it);
                                the trained component holds the EMA weights when EMA is on
        state/weights.safetensors   the raw trained weights
        state/ema.safetensors       the EMA weights (float32), when EMA is on
        state/optimizer.pt          optimizer (and objective) state; loaded with weights_only=True
        state/rng.safetensors       the trainer's generator and torch's global RNG
        state/trainer.json          step, data position, LR schedule

A checkpoint is written under a temporary name and renamed when complete, so a crash while saving
never leaves one that loads wrong; only the newest `keep_last` are kept.
"""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file

from hvctl.errors import HvctlError

PREFIX = "step-"


def checkpoint_dir(run: Path) -> Path:
    return Path(run) / "checkpoints"


def list_checkpoints(run: Path) -> list[Path]:
    """Complete checkpoints, oldest first."""
    root = checkpoint_dir(run)
    if not root.is_dir():
        return []
    return sorted(p for p in root.iterdir() if p.name.startswith(PREFIX) and p.name[len(PREFIX):].isdigit()
                  and (p / "state" / "trainer.json").is_file())


def copy_model_folder(base: Path, out: Path, replace: str) -> None:
    """A model folder like `base`, without its `replace` component (written next by the caller).

    Files are hard-linked where the file system allows: a 13B base costs no space per checkpoint.
    """
    for src in Path(base).rglob("*"):
        rel = src.relative_to(base)
        if rel.parts[0] == replace or src.is_dir():
            continue
        dst = out / rel
        dst.parent.mkdir(parents=True, exist_ok=True)
        try:
            os.link(src, dst)
        except OSError:
            shutil.copy2(src, dst)


def save_checkpoint(run: Path, step: int, *, base_model: Path, component: str, export_module, weights: dict,
                    ema: dict | None, optimizer_state: dict, rng: dict, trainer: dict, keep_last: int) -> Path:
    final = checkpoint_dir(run) / f"{PREFIX}{step:08d}"
    tmp = final.with_name(f".{final.name}.tmp-{os.getpid()}")
    shutil.rmtree(tmp, ignore_errors=True)
    (tmp / "state").mkdir(parents=True)
    try:
        copy_model_folder(base_model, tmp / "model", component)
        export_module.save_pretrained(tmp / "model" / component, safe_serialization=True)
        save_file({k: v.detach().cpu().contiguous() for k, v in weights.items()}, str(tmp / "state" / "weights.safetensors"))
        if ema is not None:
            save_file({k: v.contiguous() for k, v in ema.items()}, str(tmp / "state" / "ema.safetensors"))
        torch.save(optimizer_state, tmp / "state" / "optimizer.pt")
        save_file(rng, str(tmp / "state" / "rng.safetensors"))
        (tmp / "state" / "trainer.json").write_text(json.dumps(trainer, indent=2) + "\n")
        shutil.rmtree(final, ignore_errors=True)
        tmp.rename(final)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    for old in list_checkpoints(run)[:-keep_last]:
        shutil.rmtree(old, ignore_errors=True)
    return final


def load_checkpoint(path: Path) -> dict:
    state = Path(path) / "state"
    try:
        return {
            "weights": load_file(str(state / "weights.safetensors")),
            "ema": load_file(str(state / "ema.safetensors")) if (state / "ema.safetensors").exists() else None,
            "optimizer": torch.load(state / "optimizer.pt", weights_only=True),
            "rng": load_file(str(state / "rng.safetensors")),
            "trainer": json.loads((state / "trainer.json").read_text()),
        }
    except Exception as e:  # any damage: name the checkpoint rather than raise a library traceback
        raise HvctlError(f"{path}: cannot resume from this checkpoint ({str(e).splitlines()[0] if str(e) else type(e).__name__})") from None
