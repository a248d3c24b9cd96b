"""The embedded default model, used when no model folder is named.

Until a trained toy model ships inside the package, the default is a `tiny` model made on first
use (seed 0, so every machine gets the same one) in hvctl's cache folder. Its output is noise.
"""

from __future__ import annotations

import os
import sys
import shutil
from pathlib import Path

from hvctl.models.loading import cache_dir

PACKAGED_DEFAULT = Path(__file__).resolve().parent.parent / "assets" / "default-model"


def default_model_dir() -> Path:
    if (PACKAGED_DEFAULT / "model_index.json").is_file():
        return PACKAGED_DEFAULT
    target = cache_dir() / "models" / "tiny-default"
    if (target / "model_index.json").is_file():
        return target
    from hvctl.models.presets import init_model

    print(f"hvctl: making the embedded default model (first use) in {target}", file=sys.stderr)
    # Build beside the target, then rename: a concurrent first use cannot see a half-made folder.
    staging = target.with_name(f"tiny-default.build-{os.getpid()}")
    shutil.rmtree(staging, ignore_errors=True)
    init_model("tiny", staging, seed=0)
    try:
        staging.rename(target)
    except OSError:  # another process finished first
        shutil.rmtree(staging, ignore_errors=True)
    return target
