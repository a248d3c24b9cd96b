from __future__ import annotations  # the loader must resolve string annotations

import json
import subprocess
import sys
import textwrap
from dataclasses import dataclass, field
from pathlib import Path
from typing import ClassVar, Literal, Optional

import pytest
import yaml

from hvctl import recipe
from hvctl.errors import HvctlError
from hvctl.recipe import RECIPE_KINDS, load_recipe, load_recipe_file, recipe_to_dict, schema_for_kind


@dataclass
class Guidance:
    scale: float = 6.0
    schedule: list[float] = field(default_factory=list)


@dataclass
class Sampling:
    steps: int = 50
    shift: float = 7.0
    solver: Literal["euler", "dpm"] = "euler"
    guidance: Guidance = field(default_factory=Guidance)


@dataclass
class Lora:
    rank: int
    alpha: float = 1.0


@dataclass
class Gen:
    KIND: ClassVar[str] = "generate"

    model: Path
    prompt: str = ""
    seed: int | None = None
    negative: Optional[str] = None
    fp8: bool = False
    lr: float = 1e-4
    sizes: list[int] = field(default_factory=list)
    frames: tuple[int, ...] = (129,)
    size: tuple[int, int] = (1280, 720)
    env: dict[str, str] = field(default_factory=dict)
    extra_weights: list[Path] = field(default_factory=list)
    sampling: Sampling = field(default_factory=Sampling)
    lora: Lora | None = None


@dataclass
class Plain:  # no KIND, no required keys
    name: str = "x"
    out: Path = Path("outputs")
    workers: int | Literal["auto"] = "auto"


@dataclass
class NeedsSection:
    sampling: Sampling  # required, but every field inside has a default
    lora: Lora  # required, and `rank` inside is required too


@pytest.fixture
def cwd(tmp_path, monkeypatch):
    """Work in tmp_path so that messages name files as `recipes/x.yaml`."""
    monkeypatch.chdir(tmp_path)
    (tmp_path / "recipes").mkdir()
    return tmp_path


def write(name: str, text: str) -> str:
    path = Path(name)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(textwrap.dedent(text))
    return name


def error(*args, **kwargs) -> str:
    """The message load_recipe fails with, checked to be one line."""
    with pytest.raises(HvctlError) as info:
        load_recipe(*args, **kwargs)
    message = str(info.value)
    assert "\n" not in message
    return message


# --- types -------------------------------------------------------------------


def test_every_field_type_is_converted(cwd):
    write(
        "recipes/x.yaml",
        """
        model: ckpt
        prompt: a cat
        seed: 7
        negative: null
        fp8: true
        lr: 1e-5          # YAML 1.1 reads this as a string
        sizes: [1, 2]
        frames: [33, 65]
        size: [960, 544]
        env: {A: x}
        extra_weights: [a.safetensors, /abs/b.safetensors]
        sampling:
          steps: 30
          shift: 5        # an int for a float field
          solver: dpm
          guidance: {scale: 4, schedule: [1, 2.5]}
        lora: {rank: 8}
        """,
    )
    gen = load_recipe(Gen, "recipes/x.yaml")

    assert gen.model == cwd / "recipes" / "ckpt"
    assert (gen.prompt, gen.seed, gen.negative, gen.fp8) == ("a cat", 7, None, True)
    assert gen.lr == 1e-5 and type(gen.lr) is float
    assert gen.sizes == [1, 2]
    assert gen.frames == (33, 65) and gen.size == (960, 544)
    assert gen.env == {"A": "x"}
    assert gen.extra_weights == [cwd / "recipes" / "a.safetensors", Path("/abs/b.safetensors")]
    assert gen.sampling == Sampling(steps=30, shift=5.0, solver="dpm", guidance=Guidance(4.0, [1.0, 2.5]))
    assert type(gen.sampling.shift) is float and type(gen.sampling.guidance.scale) is float
    assert all(type(x) is float for x in gen.sampling.guidance.schedule)
    assert gen.lora == Lora(rank=8, alpha=1.0)


def test_omitted_fields_keep_defaults(cwd):
    write("recipes/x.yaml", "model: m\n")
    gen = load_recipe(Gen, "recipes/x.yaml")
    assert gen.sampling == Sampling() and gen.lora is None and gen.size == (1280, 720)
    assert load_recipe(Plain).name == "x"


def test_empty_file_is_an_empty_recipe(cwd):
    write("recipes/x.yaml", "# nothing here\n")
    assert load_recipe(Plain, "recipes/x.yaml").name == "x"


@pytest.mark.parametrize(
    "text, message",
    [
        ("sampling: {steps: ten}", "'sampling.steps' must be an int, got str 'ten'"),
        ("sampling: {steps: 3.5}", "'sampling.steps' must be an int, got float 3.5"),
        ("sampling: {steps: true}", "'sampling.steps' must be an int, got bool True"),
        ("sampling: {shift: true}", "'sampling.shift' must be a number, got bool True"),
        ("lr: fast", "'lr' must be a number, got str 'fast'"),
        ("fp8: 1", "'fp8' must be true or false, got int 1"),
        ("fp8: 'yes'", "'fp8' must be true or false, got str 'yes'"),
        ("prompt: 42", "'prompt' must be a string, got int 42 (quote it to make it a string)"),
        ("seed: x", "'seed' must be an int, got str 'x'"),
        ("sizes: [1, two]", "'sizes[1]' must be an int, got str 'two'"),
        ("sizes: 3", "'sizes' must be a list, got int 3"),
        ("size: [1, 2, 3]", "'size' must be a list of 2 items, got list [1, 2, 3]"),
        ("env: {A: 1}", "'env.A' must be a string, got int 1 (quote it to make it a string)"),
        ("sampling: 5", "'sampling' must be a mapping, got int 5"),
        ("sampling: {guidance: {scale: high}}", "'sampling.guidance.scale' must be a number, got str 'high'"),
        ("model: ''", "'model' must be a path, got str ''"),
    ],
)
def test_wrong_type_names_file_and_key(cwd, text, message):
    write("recipes/x.yaml", "model: m\n" + text + "\n")
    assert error(Gen, "recipes/x.yaml") == f"recipes/x.yaml: {message}"


def test_literal_rejects_other_values_and_suggests(cwd):
    write("recipes/x.yaml", "model: m\nsampling: {solver: eulr}\n")
    assert error(Gen, "recipes/x.yaml") == (
        "recipes/x.yaml: 'sampling.solver' must be one of 'euler', 'dpm', got str 'eulr'; did you mean 'euler'?"
    )


def test_union_takes_the_first_member_that_fits(cwd):
    assert load_recipe(Plain, overrides=["workers=4"]).workers == 4
    assert load_recipe(Plain, overrides=["workers=auto"]).workers == "auto"
    assert error(Plain, overrides=["workers=many"]) == (
        "--set workers=many: 'workers' must be an int or one of 'auto', got str 'many'"
    )


def test_unknown_key_lists_known_keys_and_suggests(cwd):
    write("recipes/x.yaml", "model: m\nsampling: {stepz: 3}\n")
    assert error(Gen, "recipes/x.yaml") == (
        "recipes/x.yaml: unknown key 'sampling.stepz' (known keys: steps, shift, solver, guidance); "
        "did you mean 'steps'?"
    )


def test_unknown_key_without_close_match_suggests_nothing(cwd):
    write("recipes/x.yaml", "model: m\nzzz: 1\n")
    message = error(Gen, "recipes/x.yaml")
    assert message.startswith("recipes/x.yaml: unknown key 'zzz' (known keys: model, prompt, ")
    assert "did you mean" not in message


def test_missing_required_key(cwd):
    write("recipes/x.yaml", "prompt: hi\n")
    assert error(Gen, "recipes/x.yaml") == "recipes/x.yaml: missing required key 'model'"
    assert error(Gen) == "no recipe file: missing required key 'model'"


def test_missing_required_nested_key(cwd):
    write("recipes/x.yaml", "model: m\nlora: {alpha: 2}\n")
    assert error(Gen, "recipes/x.yaml") == "recipes/x.yaml: missing required key 'lora.rank'"


def test_required_section_is_built_from_defaults_when_omitted(cwd):
    write("recipes/x.yaml", "lora: {rank: 4}\n")
    loaded = load_recipe(NeedsSection, "recipes/x.yaml")
    assert loaded.sampling == Sampling() and loaded.lora == Lora(4)
    write("recipes/y.yaml", "sampling: {steps: 2}\n")
    assert error(NeedsSection, "recipes/y.yaml") == "recipes/y.yaml: missing required key 'lora.rank'"


def test_file_not_found(cwd):
    assert error(Gen, "recipes/nope.yaml") == "recipes/nope.yaml: not found"


def test_invalid_yaml_names_the_line(cwd):
    write("recipes/x.yaml", "model: m\nprompt: hi\nseed: a: b\n")
    assert error(Gen, "recipes/x.yaml").startswith("recipes/x.yaml: invalid YAML at line 3: ")


def test_top_level_must_be_a_mapping(cwd):
    write("recipes/x.yaml", "- model\n- m\n")
    assert error(Gen, "recipes/x.yaml") == "recipes/x.yaml: top level must be a mapping, got list"


# --- extends -------------------------------------------------------------------


def test_extends_chain_with_relative_paths_and_deep_merge(cwd):
    write("recipes/base/root.yaml", "prompt: from root\nseed: 1\n")
    write(
        "recipes/base/common.yaml",
        """
        extends: root.yaml        # relative to base/, not to the cwd
        kind: generate
        model: ../../ckpt         # relative to base/
        sizes: [1, 2, 3]
        env: {A: a, B: b}
        sampling: {steps: 10, shift: 5, guidance: {scale: 3}}
        """,
    )
    write(
        "recipes/x.yaml",
        """
        extends: base/common.yaml
        seed: 2
        sizes: [9]
        env: {B: bb}
        sampling: {steps: 30, guidance: {schedule: [1]}}
        """,
    )
    gen = load_recipe(Gen, "recipes/x.yaml")
    assert gen.model == cwd / "ckpt"
    assert (gen.prompt, gen.seed) == ("from root", 2)
    assert gen.sizes == [9]  # lists replace
    assert gen.env == {"A": "a", "B": "bb"}  # mappings merge
    assert gen.sampling == Sampling(steps=30, shift=5.0, guidance=Guidance(3.0, [1.0]))

    data, files = load_recipe_file("recipes/x.yaml")
    assert files == [Path("recipes/base/root.yaml"), Path("recipes/base/common.yaml"), Path("recipes/x.yaml")]
    assert data["kind"] == "generate" and "extends" not in data
    assert data["sampling"] == {"steps": 30, "shift": 5, "guidance": {"scale": 3, "schedule": [1]}}
    assert data["model"] == "../../ckpt"  # raw: no schema, no path resolution


def test_extends_list_merges_in_order(cwd):
    write("recipes/a.yaml", "model: a\nprompt: a\nsampling: {steps: 1, shift: 1}\n")
    write("recipes/b.yaml", "prompt: b\nsampling: {steps: 2}\n")
    write("recipes/x.yaml", "extends: [a.yaml, b.yaml]\nsampling: {solver: dpm}\n")
    gen = load_recipe(Gen, "recipes/x.yaml")
    assert gen.model == cwd / "recipes" / "a"
    assert gen.prompt == "b"
    assert gen.sampling == Sampling(steps=2, shift=1.0, solver="dpm")


def test_error_names_the_base_file_that_set_the_value(cwd):
    write("recipes/base.yaml", "model: m\nsampling: {steps: ten}\n")
    write("recipes/x.yaml", "extends: base.yaml\nprompt: hi\n")
    assert error(Gen, "recipes/x.yaml") == "recipes/base.yaml: 'sampling.steps' must be an int, got str 'ten'"


def test_extends_cycle_is_an_error_naming_the_files(cwd):
    write("recipes/a.yaml", "extends: b.yaml\n")
    write("recipes/b.yaml", "extends: a.yaml\n")
    assert error(Gen, "recipes/a.yaml") == (
        "recipes/b.yaml: extends cycle: recipes/a.yaml -> recipes/b.yaml -> recipes/a.yaml"
    )
    write("recipes/self.yaml", "extends: ./self.yaml\n")
    assert "extends cycle: recipes/self.yaml -> recipes/self.yaml" in error(Gen, "recipes/self.yaml")


def test_extends_of_missing_file_names_both_files(cwd):
    write("recipes/x.yaml", "extends: gone.yaml\n")
    assert error(Gen, "recipes/x.yaml") == "recipes/gone.yaml: not found (extended by recipes/x.yaml)"


def test_extends_must_name_files(cwd):
    write("recipes/x.yaml", "extends: [a.yaml, 3]\n")
    assert error(Gen, "recipes/x.yaml") == (
        "recipes/x.yaml: 'extends' must be a file name or a list of them, got ['a.yaml', 3]"
    )


# --- kind ------------------------------------------------------------------------


def test_kind_mismatch(cwd):
    write("recipes/x.yaml", "kind: train\nmodel: m\n")
    assert error(Gen, "recipes/x.yaml") == "recipes/x.yaml: kind 'train' given where a 'generate' recipe is expected"


def test_kind_matching_or_unchecked_is_accepted(cwd):
    write("recipes/x.yaml", "kind: generate\nmodel: m\n")
    assert load_recipe(Gen, "recipes/x.yaml").model == cwd / "recipes" / "m"
    write("recipes/y.yaml", "kind: anything\n")
    assert load_recipe(Plain, "recipes/y.yaml") == load_recipe(Plain)  # no KIND: nothing to check


def test_kind_mismatch_inherited_from_a_base_names_the_base(cwd):
    write("recipes/base.yaml", "kind: train\n")
    write("recipes/x.yaml", "extends: base.yaml\nmodel: m\n")
    assert error(Gen, "recipes/x.yaml").startswith("recipes/base.yaml: kind 'train' given")


# --- overrides and values ----------------------------------------------------------


def test_overrides_are_typed_by_yaml_and_win_over_files(cwd):
    write("recipes/x.yaml", "model: m\nseed: 3\nsampling: {steps: 10, shift: 2}\n")
    gen = load_recipe(
        Gen,
        "recipes/x.yaml",
        overrides=["sampling.steps=30", "prompt=foo", "sizes=[1, 2]", "seed=null", "lora.rank=8", "env={A: x}"],
    )
    assert gen.sampling.steps == 30 and gen.sampling.shift == 2.0  # the rest of `sampling` is kept
    assert (gen.prompt, gen.sizes, gen.seed) == ("foo", [1, 2], None)
    assert gen.lora == Lora(rank=8)
    assert gen.env == {"A": "x"}


def test_override_with_bad_value_names_the_override(cwd):
    write("recipes/x.yaml", "model: m\n")
    assert error(Gen, "recipes/x.yaml", overrides=["sampling.steps=ten"]) == (
        "--set sampling.steps=ten: 'sampling.steps' must be an int, got str 'ten'"
    )


def test_override_of_unknown_key_names_the_override(cwd):
    write("recipes/x.yaml", "model: m\n")
    message = error(Gen, "recipes/x.yaml", overrides=["sampling.stepz=3"])
    assert message.startswith("--set sampling.stepz=3: unknown key 'sampling.stepz' (known keys: steps, ")
    assert message.endswith("did you mean 'steps'?")


def test_override_without_equals_sign(cwd):
    assert error(Gen, overrides=["steps"]) == "--set steps: expected KEY=VALUE, e.g. sampling.steps=30"


def test_values_apply_last_and_none_means_not_given(cwd):
    write("recipes/x.yaml", "model: m\nseed: 1\nprompt: file\n")
    gen = load_recipe(
        Gen,
        "recipes/x.yaml",
        overrides=["sampling.steps=30", "seed=5"],
        values={"sampling.steps": 40, "seed": None, "prompt": None, "fp8": True, "size": (64, 32)},
    )
    assert gen.sampling.steps == 40
    assert (gen.seed, gen.prompt) == (5, "file")
    assert gen.fp8 is True and gen.size == (64, 32)
    assert load_recipe(Gen, values={"model": "m"}).model == cwd / "m"


def test_bad_value_names_the_command_line(cwd):
    assert error(Gen, values={"model": "m", "sampling.steps": "many"}) == (
        "command line: 'sampling.steps' must be an int, got str 'many'"
    )


# --- paths ---------------------------------------------------------------------


def test_paths_resolve_against_the_file_that_set_them(cwd, monkeypatch):
    monkeypatch.setenv("HOME", str(cwd / "home"))
    write("recipes/sub/x.yaml", "model: ../weights/hy\nextra_weights: [~/w.pt, /abs/v.pt]\n")
    gen = load_recipe(Gen, "recipes/sub/x.yaml")
    assert gen.model == cwd / "recipes" / "weights" / "hy"
    assert gen.extra_weights == [cwd / "home" / "w.pt", Path("/abs/v.pt")]


def test_paths_from_overrides_and_defaults_resolve_against_the_cwd(cwd):
    write("recipes/x.yaml", "model: m\n")
    assert load_recipe(Gen, "recipes/x.yaml", overrides=["model=ckpt/hy"]).model == cwd / "ckpt" / "hy"
    assert load_recipe(Plain).out == cwd / "outputs"


# --- dumping -------------------------------------------------------------------


def test_recipe_to_dict_round_trips(cwd):
    write(
        "recipes/x.yaml",
        """
        model: ckpt
        prompt: "007"
        seed: 3
        lr: 2.5e-6
        frames: [33]
        size: [960, 544]
        env: {A: x}
        extra_weights: [w.pt]
        sampling: {steps: 8, solver: dpm, guidance: {schedule: [1, 2]}}
        lora: {rank: 4}
        """,
    )
    gen = load_recipe(Gen, "recipes/x.yaml")
    data = recipe_to_dict(gen)

    assert list(data)[0] == "kind" and data["kind"] == "generate"
    assert data["model"] == str(cwd / "recipes" / "ckpt")
    assert data["size"] == [960, 544] and data["extra_weights"] == [str(cwd / "recipes" / "w.pt")]
    assert data["sampling"]["guidance"] == {"scale": 6.0, "schedule": [1.0, 2.0]}
    json.dumps(data)

    # Dumped into another directory, it still loads to the same object.
    write("elsewhere/dumped.yaml", yaml.safe_dump(data, sort_keys=False))
    assert load_recipe(Gen, "elsewhere/dumped.yaml") == gen


# --- kinds registry ------------------------------------------------------------


def test_schema_for_kind_imports_lazily(monkeypatch):
    assert recipe.RECIPE_KINDS["generate"] == "hvctl.generate:GenerateRecipe"
    monkeypatch.setitem(recipe.RECIPE_KINDS, "test", f"{__name__}:Gen")
    assert schema_for_kind("test") is Gen


def test_unknown_kind_lists_known_kinds():
    with pytest.raises(HvctlError) as info:
        schema_for_kind("generat")
    message = str(info.value)
    assert message.startswith("unknown recipe kind 'generat' (known kinds: ") and message.endswith("did you mean 'generate'?")
    assert all(kind in message for kind in RECIPE_KINDS)


def test_module_imports_without_heavy_dependencies():
    code = "import sys, hvctl.recipe; print(sorted(m for m in ('torch', 'diffusers', 'numpy') if m in sys.modules))"
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert result.stdout.strip() == "[]"
