import os
import subprocess
import sys

import pytest

# Tests never touch the user's cache and never reach a hub.
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")


@pytest.fixture(scope="session", autouse=True)
def hvctl_home(tmp_path_factory):
    home = tmp_path_factory.mktemp("hvctl-home")
    os.environ["HVCTL_HOME"] = str(home)
    return home


@pytest.fixture(scope="session")
def tiny_model(tmp_path_factory):
    """A tiny model without guidance embedding (true classifier-free guidance)."""
    from hvctl.models.presets import init_model

    return init_model("tiny", tmp_path_factory.mktemp("models") / "tiny", seed=0)


@pytest.fixture(scope="session")
def tiny_guided_model(tmp_path_factory):
    """A tiny guidance-distilled model (embedded guidance)."""
    from hvctl.models.presets import init_model

    return init_model("tiny", tmp_path_factory.mktemp("models") / "tiny-guided", guidance_embeds=True, seed=1)


def run_cli(*args, cwd=None, timeout=300):
    """Run `hvctl` as a user would, in a fresh process."""
    return subprocess.run(
        [sys.executable, "-m", "hvctl", *map(str, args)], capture_output=True, text=True, cwd=cwd, timeout=timeout,
        env={**os.environ, "CI": "1"},
    )
