"""Training checkpoints: a diffusers model folder plus everything an exact resume needs.

    RUN/checkpoints/step-00000500/
        model/                  a complete model folder (`hvctl generate` and diffusers load it);
                                the trained component holds the EMA weights when EMA is on
        state/sharded/          trained weights, optimizer state and EMA weights, written by
                                torch.distributed.checkpoint: each rank its own shards, as
                                safetensors with the sharding in their headers (no pickle), so
                                a run resumes on any number of processes
        state/objective.pt      the VAE discriminator's state, if any; loaded with weights_only=True
        state/rng.safetensors   torch's global RNG
        state/trainer.json      step, data position, LR schedule

A checkpoint is written under a temporary name and renamed when complete, so a crash while saving
never leaves one that loads wrong; only the newest `keep_last` are kept.
"""

from __future__ import annotations

import json
import os
import shutil
import warnings
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file

from hvctl.errors import HvctlError
from hvctl.io import disk_errors

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


def save_checkpoint(run: Path, step: int, *, ranks, tensors: dict, write_main, keep_last: int) -> Path:
    """Every rank writes its shards of `tensors` (torch.distributed.checkpoint, as safetensors);
    rank 0 then calls write_main(folder) for the model folder and the small files, and renames."""
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint import HuggingFaceStorageWriter

    from hvctl.parallel import barrier

    final = checkpoint_dir(run) / f"{PREFIX}{step:08d}"
    tmp = final.with_name(f".{final.name}.tmp")  # one name that every rank (and node) agrees on
    cleanup = (lambda: shutil.rmtree(tmp, ignore_errors=True)) if ranks.is_main else None
    with disk_errors(final, cleanup=cleanup):  # a full disk: one error line, no partial checkpoint left
        if ranks.is_main:
            shutil.rmtree(tmp, ignore_errors=True)
            (tmp / "state").mkdir(parents=True)
        barrier(ranks)
        with warnings.catch_warnings():  # one process: DCP warns that it is one process
            warnings.simplefilter("ignore", UserWarning)
            dcp.save(tensors, storage_writer=HuggingFaceStorageWriter(str(tmp / "state" / "sharded"),
                                                                      save_distributed=ranks.distributed),
                     no_dist=not ranks.distributed)
        if ranks.is_main:
            write_main(tmp)
        barrier(ranks)
    if ranks.is_main:
        shutil.rmtree(final, ignore_errors=True)
        tmp.rename(final)
        for old in list_checkpoints(run)[:-keep_last]:
            shutil.rmtree(old, ignore_errors=True)
    return final


def write_state_files(folder: Path, *, rng: dict, trainer: dict, objective: dict | None) -> None:
    state = folder / "state"
    save_file(rng, str(state / "rng.safetensors"))
    if objective:
        torch.save(objective, state / "objective.pt")
    (state / "trainer.json").write_text(json.dumps(trainer, indent=2) + "\n")


def load_checkpoint(path: Path, tensors: dict, distributed: bool) -> dict:
    """Load the shards into `tensors` (in place: the live model's, optimizer's and EMA's own
    tensors, sharded as they are now) and return the small files."""
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint import HuggingFaceStorageReader

    state = Path(path) / "state"
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", UserWarning)
            dcp.load(tensors, storage_reader=HuggingFaceStorageReader(str(state / "sharded")), no_dist=not distributed)
        return {
            "objective": torch.load(state / "objective.pt", weights_only=True) if (state / "objective.pt").exists() else {},
            "rng": load_file(str(state / "rng.safetensors")),
            "trainer": json.loads((state / "trainer.json").read_text()),
        }
    except Exception as e:  # any damage: name the checkpoint rather than raise a library traceback
        raise HvctlError(f"{path}: cannot resume from this checkpoint ({str(e).splitlines()[0] if str(e) else type(e).__name__})") from None
