"""A sidecar makes its video again: in a fresh process, with a fresh HVCTL_HOME, or after other work in the same process."""

import hashlib
import json
import os
import subprocess
import sys

import numpy as np
import pytest

from conftest import run_cli
from hvctl.video import read_video

PROMPT = "a red circle moves left on a black background"


def _frames(path):
    return read_video(path)[0]


@pytest.mark.slow
def test_replay_remakes_the_video_byte_for_byte(tiny_model, tmp_path):
    first = tmp_path / "first.mp4"
    done = run_cli("generate", PROMPT, "--model", tiny_model, "--steps", "3", "--frames", "9", "--height", "32",
                   "--width", "48", "--seed", "11", "--guidance-scale", "2", "-o", first)
    assert done.returncode == 0, done.stderr
    sidecar = json.loads(first.with_suffix(".json").read_text())
    assert sidecar["kind"] == "generate"
    # What diffusers' HunyuanVideoPipeline needs for the same latents.
    d = sidecar["diffusers"]
    assert d["scheduler"]["shift"] == sidecar["settings"]["flow_shift"]
    call = d["pipeline_call"]
    assert call["prompt_template"]["crop_start"] > 0 and "{}" in call["prompt_template"]["template"]
    assert call["true_cfg_scale"] == 2 and call["generator_seed"] == 11 and call["num_frames"] == 9
    assert d["latent_shape"] == [1, 16, 3, 4, 6]

    # Fresh process, fresh HVCTL_HOME, another working directory.
    home = tmp_path / "home2"
    again = tmp_path / "again.mp4"
    env = {**os.environ, "CI": "1", "HVCTL_HOME": str(home)}
    done = subprocess.run([sys.executable, "-m", "hvctl", "generate", "--replay", str(first.with_suffix(".json")),
                           "-o", str(again)], capture_output=True, text=True, env=env, cwd=tmp_path, timeout=300)
    assert done.returncode == 0, done.stderr
    assert np.array_equal(_frames(again), _frames(first))
    assert first.read_bytes() == again.read_bytes()

    # One process that made a video of another size first, then replays.
    third = tmp_path / "third.mp4"
    script = f"""
import sys
from pathlib import Path
from hvctl.generate import GenerateRecipe, generate, replay_layer
from hvctl.recipe import load_recipe
generate(GenerateRecipe(prompt="a blue square", model=Path({str(tiny_model)!r}), steps=2, frames=5, height=48, width=64,
                        seed=3, output=Path({str(tmp_path / 'other.mp4')!r})), progress=False)
r = load_recipe(GenerateRecipe, values={{"output": {str(third)!r}}}, base=replay_layer(Path({str(first.with_suffix('.json'))!r}), "generate"))
generate(r, progress=False)
"""
    done = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, env=env, timeout=300)
    assert done.returncode == 0, done.stderr
    assert hashlib.sha256(third.read_bytes()).digest() == hashlib.sha256(first.read_bytes()).digest()


@pytest.mark.slow
def test_replay_errors_are_one_line(tiny_model, tmp_path):
    junk = tmp_path / "junk.json"
    junk.write_text("{not json")
    done = run_cli("generate", "--replay", junk)
    assert done.returncode == 1 and done.stderr.strip().startswith("error: --replay") and "junk.json" in done.stderr
    avatar = tmp_path / "avatar.json"
    avatar.write_text(json.dumps({"kind": "avatar", "seed": 1, "settings": {}}))
    done = run_cli("generate", "--replay", avatar)
    assert done.returncode == 1 and "replay it with that command" in done.stderr and len(done.stderr.strip().splitlines()) == 1


def test_the_cpu_vae_decodes_the_same_frames_on_any_thread_count():
    """oneDNN's 3D convolutions sum in a thread-count-dependent order: with it, the embedded model's
    17 frames at 64x64 came out a level apart on 1 and 2 threads (frames 0-1)."""
    import torch

    from hvctl.models.default import default_model_dir
    from hvctl.models.loading import ModelFolder, load_component
    from hvctl.models.vae import decode_to_frames

    vae = load_component(ModelFolder.open(default_model_dir()), "vae", dtype=torch.float32)
    latents = torch.randn(1, 16, 5, 16, 16, generator=torch.Generator().manual_seed(0))
    threads = torch.get_num_threads()
    try:
        frames = []
        for n in (1, 2):
            torch.set_num_threads(n)
            frames.append(decode_to_frames(vae, latents))
    finally:
        torch.set_num_threads(threads)
    assert torch.equal(frames[0], frames[1])
