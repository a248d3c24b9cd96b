"""`hvctl rewrite` and generate's rewrite step: free wording to the form the model was trained on."""

import json

import pytest

from conftest import run_cli
from hvctl.rewrite import Rewriter, RewriteRecipe


@pytest.mark.parametrize("prompt, canonical", [
    ("a crimson ball drifting to the right against a grey backdrop", "a red circle moves right on a gray background"),
    ("Blue box, white bg, not moving", "a blue square stays still on a white background"),
    ("triangle, green, going up, dark background", "a green triangle moves up on a black background"),
    ("a cyan disk sliding from the right to the left on black", "a cyan circle moves left on a black background"),
    ("on a white background a pink cube falls", "a magenta square moves down on a white background"),
    ("一个红色的圆形在黑色背景上向左移动", "a red circle moves left on a black background"),
    ("从左到右移动的黄色三角形，白色背景", "a yellow triangle moves right on a white background"),
    ("灰色背景上一个静止的青色方块", "a cyan square stays still on a gray background"),
])
def test_lexicon_rewriter_maps_free_wording_to_the_canonical_caption(prompt, canonical):
    result = Rewriter(RewriteRecipe(rewriter="lexicon"))(prompt)
    assert result == {"original": prompt, "rewritten": canonical, "changed": True, "warning": None}


def test_master_mode_adds_the_style_fields_to_the_same_facts():
    master = Rewriter(RewriteRecipe(rewriter="lexicon", mode="master"))("green circle going left, black background")
    assert master["rewritten"].startswith("A green circle moves left on a black background.")
    assert "lighting" in master["rewritten"].lower()


@pytest.mark.slow
def test_an_unusable_rewrite_keeps_the_prompt_with_a_warning(tmp_path):
    prompts = tmp_path / "prompts.txt"
    prompts.write_text("a red square moves up on a white background\n\nhello world\n", encoding="utf-8")
    done = run_cli("rewrite", "--file", prompts, "--json")
    assert done.returncode == 0, done.stderr
    results = json.loads(done.stdout)["prompts"]
    assert [r["rewritten"] for r in results] == ["a red square moves up on a white background", "hello world"]
    assert results[0]["warning"] is None and results[0]["changed"] is False
    assert "names no color, no shape" in results[1]["warning"]
    assert "hello world" in done.stderr  # the warning, on stderr for people


@pytest.mark.slow
def test_rewrite_needs_exactly_one_source_of_prompts(tmp_path):
    done = run_cli("rewrite")
    assert done.returncode == 1 and "give a PROMPT or --file" in done.stderr
    done = run_cli("rewrite", "x", "--mode", "poetic")
    assert done.returncode == 1 and "'mode' must be" in done.stderr


def test_llm_rewriter_runs_a_local_model_and_keeps_the_prompt_when_its_output_is_unusable(tiny_llm):
    rewrite = Rewriter(RewriteRecipe(rewriter="llm", model=tiny_llm, options={"max_new_tokens": 16}))
    result = rewrite("a cat walks on the grass")
    # A randomly initialised model's words are not the prompt's: the check refuses them.
    assert result["rewritten"] == "a cat walks on the grass" and result["warning"].startswith("prompt kept as written")


def test_rewrite_check_keeps_facts_and_allows_translation():
    from hvctl.plugins import SampleFailure
    from hvctl_transformers.rewriter import check_rewrite

    prompt = "a cat walks on the grass"
    good = "A ginger cat walks slowly across sunlit grass, realistic style, soft morning light.\n\nExtra notes."
    assert check_rewrite(prompt, good, "normal") == good.split("\n\n")[0]
    for reply, reason in [("", "empty"), ("A dog runs in the snow at night.", "drops the prompt's words"),
                          ("word " * 200, "words long"), ("Rewrite the user's video prompt for a ...", "repeats")]:
        with pytest.raises(SampleFailure, match=reason):
            check_rewrite(prompt, reply, "normal")
    # A Chinese prompt shares no words with its English rewrite; translation is the point.
    assert check_rewrite("一只猫在草地上走", "A cat walks on the grass.", "normal") == "A cat walks on the grass."


@pytest.mark.slow
def test_generate_rewrites_the_prompt_first_and_records_both(tiny_model, tmp_path):
    out = tmp_path / "v.mp4"
    done = run_cli("generate", "一个红色的圆形在黑色背景上向左移动", "--model", tiny_model, "--steps", "2",
                   "--frames", "5", "--height", "32", "--width", "32", "--seed", "3", "-o", out,
                   "--set", "rewrite.rewriter=lexicon", "--json")
    assert done.returncode == 0, done.stderr
    sidecar = json.loads(out.with_suffix(".json").read_text())
    assert sidecar["prompt"] == "a red circle moves left on a black background"
    assert sidecar["rewrite"]["original"] == "一个红色的圆形在黑色背景上向左移动"
