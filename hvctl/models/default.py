"""The embedded default models, used when no model folder is named: the toy text-to-video model
trained by recipes/toy/ (README, "The embedded default model"), and the toy avatar model trained
from it by recipes/toy/avatar.yaml; both stored in the package as float16."""

from __future__ import annotations

from pathlib import Path

from hvctl.errors import HvctlError

ASSETS = Path(__file__).resolve().parent.parent / "assets"
PACKAGED_DEFAULT = ASSETS / "default-model"
PACKAGED_AVATAR = ASSETS / "avatar-model"


def _packaged(folder: Path, what: str) -> Path:
    if not (folder / "model_index.json").is_file():
        raise HvctlError(f"{folder}: the embedded {what} is missing; reinstall hvctl or name a model with --model")
    return folder


def default_model_dir() -> Path:
    return _packaged(PACKAGED_DEFAULT, "default model")


def default_avatar_model_dir() -> Path:
    return _packaged(PACKAGED_AVATAR, "avatar model")
