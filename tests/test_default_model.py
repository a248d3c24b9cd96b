"""The embedded default model is the trained toy model: it draws the prompted toy scene."""

import json

import pytest

from conftest import run_cli
from hvctl.toy.world import measure
from hvctl.video import read_video


@pytest.mark.slow
def test_default_model_draws_one_object_on_the_prompted_background(tmp_path):
    backgrounds = ("black", "white", "gray")
    for background in backgrounds:
        out = tmp_path / f"{background}.mp4"
        result = run_cli("generate", f"a green square moves right on a {background} background", "-o", out, "--seed", "0", "--json")
        assert result.returncode == 0, result.stderr
        assert json.loads(result.stdout)["settings"]["guidance_scale"] == 3  # its own default: true CFG
        seen = measure(read_video(out)[0])
        assert seen["background"] == background
        assert seen["color"] is not None and seen["visible_frames"] >= 12  # an object, not an empty or noisy frame
