"""Recipes: YAML files that configure a subcommand, loaded into typed dataclasses.

A recipe is a YAML mapping whose keys are the fields of a schema dataclass
(nested mappings fill nested dataclasses)::

    kind: generate              # optional; checked against the schema's KIND
    extends: base.yaml          # optional; a file or a list of files
    model: ../checkpoints/hy    # a Path field: relative to this file's directory
    sampling:
      steps: 30

Values are combined in this order, later winning:

1. the files named by `extends` (each fully resolved, in list order), then the
   file itself; `extends` paths are relative to the file that names them;
2. `--set a.b.c=value` overrides, the value parsed as YAML (`steps=30` is an int);
3. `values`: already-parsed command-line values (dotted keys; None = not given).

Mappings merge key by key; lists and scalars replace. Omitted fields keep the
schema's default; omitted fields without one are an error.

Field types: int, float (an int is accepted; so is a string like `1e-5`, which
YAML 1.1 reads as a string), str, bool (only true/false), `X | None`, unions,
list[X], tuple[X, ...], tuple[X, Y], dict[str, X], Literal[...], nested
dataclasses and pathlib.Path.

Paths: a relative path is resolved against the directory of the recipe file that
set it; one from `--set`, from `values` or a schema default against the current
directory. `~` is expanded. Loaded paths are therefore absolute, so a recipe
dumped with `recipe_to_dict` loads back the same from anywhere.

Numbers: a float must be finite (no .nan, .inf). A schema states the range of its numbers
in a `LIMITS` class variable, {field: ">= 1" | "> 0" | "[0, 1)" | ...}, checked at load time
(on every item of a list); None values are not checked.

Every problem raises HvctlError with one line naming the file (or the `--set`)
and the dotted key, e.g. `recipes/x.yaml: 'sampling.steps' must be an int, got str 'ten'`.
"""

from __future__ import annotations

import copy
import dataclasses
import difflib
import importlib
import math
import os
import re
import types
from collections.abc import Mapping, Sequence
from pathlib import Path, PurePath
from typing import Any, Literal, TypeVar, Union, get_args, get_origin, get_type_hints

import yaml

from hvctl.errors import HvctlError

T = TypeVar("T")

# Recipe kinds that `hvctl recipe show FILE` can validate, as "module:ClassName"
# so that looking one up imports only that subcommand's module.
RECIPE_KINDS: dict[str, str] = {
    "generate": "hvctl.generate:GenerateRecipe",
    "encode": "hvctl.encode:EncodeRecipe",
    "curate": "hvctl.curate:CurateRecipe",
    "train": "hvctl.train.config:TrainRecipe",
    "distill": "hvctl.train.distill:DistillRecipe",
    "caption": "hvctl.caption:CaptionRecipe",
    "rewrite": "hvctl.rewrite:RewriteRecipe",
    "avatar": "hvctl.avatar:AvatarRecipe",
}

_NO_FILE = "no recipe file"
_COMMAND_LINE = "command line"
_KeyPath = tuple  # keys from the top, list positions as ints: ("sampling", "steps")

# A float written like `1e-5`: YAML 1.1 (PyYAML) wants a dot and a signed
# exponent, so it reads this as a string; a float field accepts it anyway.
_EXPONENT_FLOAT = re.compile(r"[-+]?(\d+\.?\d*|\.\d+)[eE][-+]?\d+")


def load_recipe(
    schema: type[T],
    path: str | Path | None = None,
    overrides: Sequence[str] = (),
    values: Mapping[str, Any] | None = None,
    base: tuple[str, Path, Mapping] | None = None,
) -> T:
    """Load `path` (None: defaults only), apply overrides then values, and build `schema`.
    base: (label, folder, data), a layer under the file's (a video's sidecar settings, for
    --replay); its relative paths are relative to folder."""
    if not dataclasses.is_dataclass(schema):
        raise TypeError(f"recipe schema must be a dataclass, got {schema!r}")
    data: dict = {}
    origins: dict[_KeyPath, _Source] = {}
    main = _Source(_NO_FILE if path is None else str(Path(path)), None)
    if base is not None:
        label, folder, layer = base
        _merge(data, origins, layer, _Source(label, Path(folder).absolute()))
        if path is None:
            main = _Source(label, Path(folder).absolute())
    if path is not None:
        for file, layer in _read_layers(Path(path), chain=()):
            _merge(data, origins, layer, _Source(str(file), file.absolute().parent))
    for text in overrides:
        keys, value = _parse_override(text)
        source = _Source("--set " + text.replace("\n", "\\n"), None)
        _merge(data, origins, _nest(keys, value), source)
    for key, value in (values or {}).items():
        if value is not None:
            _merge(data, origins, _nest(tuple(key.split(".")), value), _Source(_COMMAND_LINE, None))

    builder = _Builder(origins, main)
    kind = data.pop("kind", None)
    expected = getattr(schema, "KIND", None)
    if kind is not None and expected is not None and kind != expected:
        raise HvctlError(
            f"{builder.source_of(('kind',)).label}: kind {kind!r} given "
            f"where a {expected!r} recipe is expected"
        )
    return builder.build(schema, data, ())


def load_recipe_file(path: str | Path) -> tuple[dict, list[Path]]:
    """The raw dict of a recipe after `extends` (kind kept, no schema), and the files read, bases first."""
    data: dict = {}
    files: list[Path] = []
    for file, layer in _read_layers(Path(path), chain=()):
        _merge(data, {}, layer, _Source(str(file), None))
        if file not in files:  # a base extended twice is listed once
            files.append(file)
    return data, files


def recipe_to_dict(obj: Any) -> dict:
    """A loaded recipe as plain data for yaml.safe_dump / json.dumps, with `kind` first when the schema has one."""
    if not dataclasses.is_dataclass(obj) or isinstance(obj, type):
        raise TypeError(f"expected a recipe dataclass instance, got {obj!r}")
    data = _plain(obj)
    kind = getattr(type(obj), "KIND", None)
    return {"kind": kind, **data} if kind is not None else data


def schema_for_kind(kind: str) -> type:
    """The schema class registered for a recipe kind, importing its module only now."""
    if not isinstance(kind, str) or kind not in RECIPE_KINDS:
        known = ", ".join(sorted(RECIPE_KINDS))
        raise HvctlError(f"unknown recipe kind {kind!r} (known kinds: {known}){_did_you_mean(kind, RECIPE_KINDS)}")
    module_name, _, class_name = RECIPE_KINDS[kind].partition(":")
    return getattr(importlib.import_module(module_name), class_name)


# --- reading files -----------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class _Source:
    """Where a value came from: what errors name, and what relative paths are relative to."""

    label: str
    base_dir: Path | None  # None: the current directory


def _read_layers(path: Path, chain: tuple[Path, ...]) -> list[tuple[Path, dict]]:
    """(file, mapping without `extends`) for `path` and everything it extends, bases first."""
    if path.resolve() in [p.resolve() for p in chain]:
        cycle = " -> ".join(str(p) for p in (*chain, path))
        raise HvctlError(f"{chain[-1]}: extends cycle: {cycle}")
    data = _read_yaml(path, extended_by=chain[-1] if chain else None)
    extends = data.pop("extends", None)
    bases = [extends] if isinstance(extends, str) else extends or []
    if not isinstance(bases, list) or not all(isinstance(b, str) for b in bases):
        raise HvctlError(f"{path}: 'extends' must be a file name or a list of them, got {_show(extends)}")
    layers = []
    for base in bases:
        base_path = Path(os.path.normpath(path.parent / Path(base).expanduser()))
        layers += _read_layers(base_path, (*chain, path))
    layers.append((path, data))
    return layers


def _read_yaml(path: Path, extended_by: Path | None) -> dict:
    try:
        text = path.read_text(encoding="utf-8")
    except FileNotFoundError:
        raise HvctlError(f"{path}: not found" + (f" (extended by {extended_by})" if extended_by else "")) from None
    except IsADirectoryError:
        raise HvctlError(f"{path}: is a directory, not a recipe file") from None
    except UnicodeDecodeError:
        raise HvctlError(f"{path}: not a text file (invalid UTF-8)") from None
    except OSError as e:
        raise HvctlError(f"{path}: cannot read: {e.strerror}") from None
    try:
        data = yaml.safe_load(text)
    except yaml.YAMLError as e:
        mark = getattr(e, "problem_mark", None)
        where = f" at line {mark.line + 1}" if mark is not None else ""
        problem = getattr(e, "problem", None) or str(e)
        raise HvctlError(f"{path}: invalid YAML{where}: {' '.join(problem.split())}") from None
    if data is None:  # an empty file is an empty recipe
        return {}
    if not isinstance(data, dict):
        raise HvctlError(f"{path}: top level must be a mapping, got {_type_name(data)}")
    return data


def _parse_override(text: str) -> tuple[_KeyPath, Any]:
    key, sep, raw = text.partition("=")
    keys = tuple(key.strip().split("."))
    if not sep or not all(keys):
        raise HvctlError(f"--set {text}: expected KEY=VALUE, e.g. sampling.steps=30")
    try:
        return keys, yaml.safe_load(raw)
    except yaml.YAMLError as e:
        problem = getattr(e, "problem", None) or str(e)
        raise HvctlError(f"--set {text}: invalid YAML value: {' '.join(problem.split())}") from None


def parse_overrides(texts: list[str]) -> dict:
    """["a.b=1", "a.c=x"] -> {"a": {"b": 1, "c": "x"}}: `--set` pairs outside a recipe."""
    result: dict = {}
    for text in texts:
        keys, value = _parse_override(text)
        node = result
        for key in keys[:-1]:
            node = node.setdefault(key, {})
            if not isinstance(node, dict):
                raise HvctlError(f"--set {text}: '{key}' is already set to a value")
        node[keys[-1]] = value
    return result


def _nest(keys: _KeyPath, value: Any) -> dict:
    """("a", "b"), 1 -> {"a": {"b": 1}}"""
    for key in reversed(keys):
        value = {key: value}
    return value


def _merge(data: dict, origins: dict[_KeyPath, _Source], layer: Mapping, source: _Source, prefix: _KeyPath = ()) -> None:
    """Deep-merge `layer` into `data`, noting in `origins` which source set each key."""
    for key, value in layer.items():
        keys = (*prefix, key)
        if isinstance(value, Mapping) and isinstance(data.get(key), dict):
            _merge(data[key], origins, value, source, keys)
            continue
        for stale in [k for k in origins if k[: len(keys)] == keys]:
            del origins[stale]
        data[key] = _copy(value)
        _note_origin(origins, keys, value, source)


def _copy(value: Any) -> Any:
    # Copied so that merging later layers never edits a caller's `values`.
    if isinstance(value, Mapping):
        return {k: _copy(v) for k, v in value.items()}
    return copy.deepcopy(value)


def _note_origin(origins: dict[_KeyPath, _Source], keys: _KeyPath, value: Any, source: _Source) -> None:
    origins[keys] = source
    if isinstance(value, Mapping):
        for k, v in value.items():
            _note_origin(origins, (*keys, k), v, source)


# --- building typed objects --------------------------------------------------


class _Builder:
    """Turns merged recipe data into schema objects, blaming errors on the source of each key."""

    def __init__(self, origins: dict[_KeyPath, _Source], main: _Source):
        self.origins = origins
        self.main = main  # blamed for keys no source set, e.g. a missing required key

    def source_of(self, keys: _KeyPath) -> _Source:
        for n in range(len(keys), 0, -1):
            if keys[:n] in self.origins:
                return self.origins[keys[:n]]
        return self.main

    def fail(self, keys: _KeyPath, message: str) -> HvctlError:
        return HvctlError(f"{self.source_of(keys).label}: {message}")

    def wrong_type(self, keys: _KeyPath, tp: Any, value: Any) -> HvctlError:
        hint = " (quote it to make it a string)" if tp is str and isinstance(value, (int, float)) else ""
        return self.fail(keys, f"'{_dotted(keys)}' must be {_describe(tp)}, got {_type_name(value)} {_show(value)}{hint}")

    def build(self, cls: type, value: Any, keys: _KeyPath) -> Any:
        if not isinstance(value, dict):
            raise self.wrong_type(keys, cls, value)
        hints = get_type_hints(cls)
        fields = {f.name: f for f in dataclasses.fields(cls) if f.init}
        for key in value:
            if key not in fields:
                where = _dotted((*keys, str(key)))
                known = ", ".join(fields)
                raise self.fail((*keys, key), f"unknown key '{where}' (known keys: {known}){_did_you_mean(key, fields)}")
        kwargs = {}
        for name, field in fields.items():
            tp = hints[name]
            if name in value:
                kwargs[name] = self.convert(value[name], tp, (*keys, name))
            elif field.default is dataclasses.MISSING and field.default_factory is dataclasses.MISSING:
                if not dataclasses.is_dataclass(tp):
                    raise self.fail((*keys, name), f"missing required key '{_dotted((*keys, name))}'")
                # A required section may be left out when its own fields all have defaults.
                kwargs[name] = self.build(tp, {}, (*keys, name))
            elif isinstance(field.default, PurePath):
                kwargs[name] = _absolute(Path(field.default), None)  # so dumps reload the same anywhere
        for name, spec in getattr(cls, "LIMITS", {}).items():
            if name in kwargs:
                self.check_limit(kwargs[name], spec, (*keys, name))
        return cls(**kwargs)

    def check_limit(self, value: Any, spec: str, keys: _KeyPath) -> None:
        if isinstance(value, (list, tuple)):
            for i, item in enumerate(value):
                self.check_limit(item, spec, (*keys, i))
        elif isinstance(value, Mapping):
            for key, item in value.items():
                self.check_limit(item, spec, (*keys, key))
        elif isinstance(value, (int, float)) and not isinstance(value, bool) and not within(value, spec):
            raise self.bad_number(keys, f"must be {_limit_text(spec)}, got {_show(value)}")

    def bad_number(self, keys: _KeyPath, problem: str) -> HvctlError:
        """A value from a flag is named as the flag (keys and flags share names), others as file: 'key'."""
        if self.source_of(keys).label == _COMMAND_LINE:
            return HvctlError(f"--{_dotted(keys).replace('_', '-')} {problem}")
        return self.fail(keys, f"'{_dotted(keys)}' {problem}")

    def convert(self, value: Any, tp: Any, keys: _KeyPath) -> Any:
        origin, args = get_origin(tp) or tp, get_args(tp)
        if tp is Any:
            return value
        if dataclasses.is_dataclass(tp):
            return self.build(tp, value, keys)
        if origin in (Union, types.UnionType):
            if value is None and type(None) in args:
                return None
            members = [a for a in args if a is not type(None)]
            if len(members) == 1:  # X | None: X's own, more precise errors
                return self.convert(value, members[0], keys)
            for member in members:
                try:
                    return self.convert(value, member, keys)
                except HvctlError:
                    pass
            raise self.wrong_type(keys, tp, value)
        if origin is Literal:
            if any(value == choice and type(value) is type(choice) for choice in args):
                return value
            raise self.fail(
                keys,
                f"'{_dotted(keys)}' must be {_describe(tp)}, got {_type_name(value)} {_show(value)}"
                + _did_you_mean(value, args),
            )
        if tp is bool:
            if isinstance(value, bool):
                return value
        elif tp is int:
            if isinstance(value, int) and not isinstance(value, bool):
                return value
        elif tp is float:
            number = None
            if isinstance(value, (int, float)) and not isinstance(value, bool):
                number = float(value)
            elif isinstance(value, str) and _EXPONENT_FLOAT.fullmatch(value.strip()):
                number = float(value)
            if number is not None and not math.isfinite(number):
                raise self.bad_number(keys, f"must be a finite number, got {_show(value)}")
            if number is not None:
                return number
        elif tp is str:
            if isinstance(value, str):
                return value
        elif tp is Path:
            if isinstance(value, PurePath):
                value = str(value)
            if isinstance(value, str) and value:
                return _absolute(Path(value), self.source_of(keys).base_dir)
        elif origin is list:
            if isinstance(value, (list, tuple)):
                item = args[0] if args else Any
                return [self.convert(v, item, (*keys, i)) for i, v in enumerate(value)]
        elif origin is tuple:
            if isinstance(value, (list, tuple)):
                if not args or args[-1] is Ellipsis:
                    item = args[0] if args else Any
                    return tuple(self.convert(v, item, (*keys, i)) for i, v in enumerate(value))
                if len(value) == len(args):
                    return tuple(self.convert(v, a, (*keys, i)) for i, (v, a) in enumerate(zip(value, args)))
        elif origin is dict:
            if isinstance(value, dict):
                item = args[1] if args else Any
                for key in value:
                    if not isinstance(key, str):
                        raise self.fail((*keys, key), f"keys of '{_dotted(keys)}' must be strings, got {_show(key)}")
                return {k: self.convert(v, item, (*keys, k)) for k, v in value.items()}
        else:
            raise TypeError(f"unsupported type {tp!r} for recipe key '{_dotted(keys)}'")
        raise self.wrong_type(keys, tp, value)


def _absolute(path: Path, base_dir: Path | None) -> Path:
    path = path.expanduser()
    return Path(os.path.abspath(base_dir / path if base_dir is not None else path))


# --- number ranges (LIMITS) -------------------------------------------------

_BOUND = re.compile(r"(>=|>|<=|<)\s*(\S+)")
_INTERVAL = re.compile(r"([\[(])\s*(\S+)\s*,\s*(\S+)\s*([\])])")


def within(value: float, spec: str) -> bool:
    """Whether a finite number satisfies a LIMITS spec: ">= 1", "> 0", "< 1", "[0, 1)", "(0, 1]", ..."""
    if isinstance(value, float) and not math.isfinite(value):
        return False
    if match := _BOUND.fullmatch(spec.strip()):
        op, bound = match.group(1), _number(match.group(2))
        return {">=": value >= bound, ">": value > bound, "<=": value <= bound, "<": value < bound}[op]
    match = _INTERVAL.fullmatch(spec.strip())
    if match is None:
        raise ValueError(f"bad LIMITS spec {spec!r}")
    low, high = _number(match.group(2)), _number(match.group(3))
    above = value >= low if match.group(1) == "[" else value > low
    below = value <= high if match.group(4) == "]" else value < high
    return above and below


SEED_RANGE = "[0, 9223372036854775807]"  # what torch and numpy generators take, with room for seed + i


def check_number(flag: str, value: float | None, spec: str) -> None:
    """A command-line number outside any recipe: one HvctlError naming the flag when out of range."""
    if isinstance(value, float) and not math.isfinite(value):
        raise HvctlError(f"{flag} must be a finite number, got {_show(value)}")
    if value is not None and not within(value, spec):
        raise HvctlError(f"{flag} must be {_limit_text(spec)}, got {_show(value)}")


def _number(text: str) -> float:
    return int(text) if re.fullmatch(r"[-+]?\d+", text) else float(text)


def _limit_text(spec: str) -> str:
    return f"in {spec.strip()}" if spec.strip()[0] in "[(" else spec.strip()


# --- plain data and messages -------------------------------------------------


def _plain(value: Any) -> Any:
    if dataclasses.is_dataclass(value) and not isinstance(value, type):
        return {f.name: _plain(getattr(value, f.name)) for f in dataclasses.fields(value) if f.init}
    if isinstance(value, PurePath):
        return str(value)
    if isinstance(value, (list, tuple)):
        return [_plain(v) for v in value]
    if isinstance(value, Mapping):
        return {k: _plain(v) for k, v in value.items()}
    return value


def _dotted(keys: _KeyPath) -> str:
    """("a", "b", 0, "c") -> "a.b[0].c"."""
    text = ""
    for key in keys:
        if isinstance(key, int) and not isinstance(key, bool):
            text += f"[{key}]"
        else:
            text += f".{key}" if text else str(key)
    return text


def _describe(tp: Any) -> str:
    """How an error message names what a type accepts: "an int", "a list", ..."""
    origin, args = get_origin(tp) or tp, get_args(tp)
    if origin in (Union, types.UnionType):
        return " or ".join("null" if a is type(None) else _describe(a) for a in args)
    if origin is Literal:
        return "one of " + ", ".join(repr(a) for a in args)
    if origin is tuple and args and args[-1] is not Ellipsis:
        return f"a list of {len(args)} items"
    names = {
        int: "an int",
        float: "a number",
        str: "a string",
        bool: "true or false",
        Path: "a path",
        list: "a list",
        tuple: "a list",
        dict: "a mapping",
    }
    if dataclasses.is_dataclass(tp):
        return "a mapping"
    return names.get(origin, repr(tp))


def _type_name(value: Any) -> str:
    if value is None:
        return "null"
    if isinstance(value, Mapping):
        return "mapping"
    return type(value).__name__


def _show(value: Any) -> str:
    text = repr(value)  # repr escapes newlines, keeping messages on one line
    return text if len(text) <= 60 else text[:57] + "..."


def _did_you_mean(word: Any, choices: Any) -> str:
    matches = difflib.get_close_matches(str(word), [str(c) for c in choices], n=1)
    return f"; did you mean '{matches[0]}'?" if matches else ""
