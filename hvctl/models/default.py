"""The embedded default model, used when no model folder is named: the toy model trained by
recipes/toy/ (README, "The embedded default model"), stored in the package as float16."""

from __future__ import annotations

from pathlib import Path

from hvctl.errors import HvctlError

PACKAGED_DEFAULT = Path(__file__).resolve().parent.parent / "assets" / "default-model"


def default_model_dir() -> Path:
    if not (PACKAGED_DEFAULT / "model_index.json").is_file():
        raise HvctlError(f"{PACKAGED_DEFAULT}: the embedded default model is missing; reinstall hvctl or name a model with --model")
    return PACKAGED_DEFAULT
