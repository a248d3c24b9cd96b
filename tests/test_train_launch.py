"""The documented train commands resolve, and a bad recipe is one line from the launcher before any rank starts."""

from pathlib import Path

import pytest

from conftest import run_cli

ROOT = Path(__file__).resolve().parent.parent


def _one_error_line(done) -> str:
    lines = [line for line in done.stderr.splitlines() if line.strip()]
    assert done.returncode == 1 and len(lines) == 1 and lines[0].startswith("error: "), done.stderr
    return lines[0]


@pytest.mark.slow
def test_the_13b_stage_recipes_are_where_users_type_them():
    shown = run_cli("recipe", "show", "recipes/stage2.yaml", cwd=ROOT)
    assert shown.returncode == 0, shown.stderr
    assert "hunyuan-stage1" in shown.stdout and "frame_buckets" in shown.stdout
    # Found and resolved; it stops, before torchrun's 8 ranks, at the stage-1 model that this checkout lacks.
    line = _one_error_line(run_cli("train", "recipes/stage2.yaml", cwd=ROOT))
    assert "runs/hunyuan-stage1/model: model folder not found" in line
    assert not (ROOT / "recipes" / "train").exists()
    assert sorted(p.name for p in (ROOT / "recipes" / "toy").glob("stage*.yaml"))[:2] == ["stage0.yaml", "stage1.yaml"]


@pytest.mark.slow
def test_a_bad_recipe_is_one_line_from_the_launcher(tiny_model, tmp_path):
    (tmp_path / "file").write_text("x")
    recipe = tmp_path / "bad.yaml"
    cases = {
        "data.cache": ([f"model: {tiny_model}", f"out: {tmp_path / 'run'}", f"data: {{cache: {tmp_path / 'no-cache'}}}"],
                       "data.cache: "),
        "model": ([f"model: {tmp_path / 'no-model'}", f"out: {tmp_path / 'run'}", f"data: {{cache: {tmp_path}}}"],
                  "no-model: model folder not found"),
        "out": ([f"model: {tiny_model}", f"out: {tmp_path / 'file'}", f"data: {{cache: {tmp_path}}}"], "is a file"),
        # 48x48 images are 9 tokens of the tiny DiT: ring 2 cannot split them (its 5-frame videos, 18, it can).
        "parallel.ring": ([f"model: {tiny_model}", f"out: {tmp_path / 'run'}", "parallel: {ring: 2}",
                           f"data: {{manifest: {tmp_path / 'file'}, aspect_buckets: [[48, 48]], frame_buckets: [5]}}"],
                          "parallel.ulysses 1, ring 2: 1 frames of 48x48 make 9 video tokens, which do not split evenly "
                          "over ulysses 1 x ring 2 = 2 ranks"),
        "attention": ([f"model: {tiny_model}", f"out: {tmp_path / 'run'}", "attention: flash", f"data: {{cache: {tmp_path}}}"],
                      "--attention flash: "),
    }
    for name, (lines, message) in cases.items():
        recipe.write_text("\n".join(["kind: train", "steps: 1", *lines]) + "\n")
        line = _one_error_line(run_cli("train", recipe, "--nproc", 2))
        assert message in line, (name, line)
    assert not (tmp_path / "run").exists()
