"""Every recipe shipped in recipes/ loads and validates against its kind's schema."""

from pathlib import Path

import pytest

from hvctl.recipe import load_recipe, load_recipe_file, schema_for_kind

RECIPES = sorted((Path(__file__).resolve().parent.parent / "recipes").rglob("*.yaml"))


def test_there_are_recipes():
    assert RECIPES


@pytest.mark.parametrize("path", RECIPES, ids=lambda p: str(p.relative_to(p.parents[1])))
def test_recipe_validates(path):
    raw, _ = load_recipe_file(path)
    assert "kind" in raw, f"{path}: every shipped recipe names its kind"
    load_recipe(schema_for_kind(raw["kind"]), path)
