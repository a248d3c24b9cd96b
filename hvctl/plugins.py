"""The plugin registry: named implementations for the places where users choose one.

A recipe names a captioner, a rewriter, a curation filter, a conditioner or an audio encoder by its
registered name; `get(kind, name)` finds it. Implementations come from the `hvctl.plugins`
entry-point group: hvctl's own built-ins (the packages in plugins/) are declared there by hvctl's
pyproject.toml exactly as a third-party package declares its own:

    [project.entry-points."hvctl.plugins"]
    my_captioners = "my_package.captioners"      # a module that calls hvctl.plugins.register

Entry points are loaded on first lookup, so `hvctl --help` imports none of them. A plugin module
must not import torch at module level: `hvctl plugins list` imports every one.
"""

from __future__ import annotations

import inspect
from dataclasses import dataclass
from importlib.metadata import entry_points

from hvctl.errors import HvctlError

ENTRY_POINT_GROUP = "hvctl.plugins"
KINDS = {
    "captioner": "writes the structured caption of a sample (hvctl caption)",
    "rewriter": "rewrites a user's prompt (hvctl rewrite, generate's rewrite step)",
    "filter": "scores samples and drops those past a threshold (hvctl curate)",
    "conditioner": "steers the DiT by a condition besides the text (hvctl avatar)",
    "audio_encoder": "turns a waveform into per-frame features (hvctl avatar)",
}


@dataclass(frozen=True)
class Plugin:
    kind: str
    name: str
    factory: object  # a class or function; called with the recipe's options for it
    source: str  # the entry point (distribution: module) that registered it
    description: str

    def create(self, **options):
        signature = inspect.signature(self.factory)
        try:  # checked before the call, so a TypeError inside the plugin stays its own
            signature.bind(**options)
        except TypeError as e:
            accepted = ", ".join(signature.parameters) or "none"
            raise HvctlError(f"{self.kind} '{self.name}': bad options {sorted(options)} ({e}); accepted: {accepted}") from None
        return self.factory(**options)


_registry: dict[tuple[str, str], Plugin] = {}
_loaded = False
_loading_source = "hvctl"


def register(kind: str, name: str, description: str | None = None):
    """Decorator: register a class or function as the `kind` plugin called `name`."""
    if kind not in KINDS:
        raise HvctlError(f"plugin kind '{kind}' is not one of {', '.join(KINDS)}")

    def decorate(factory):
        key = (kind, name)
        if key in _registry and _registry[key].factory is not factory:
            raise HvctlError(f"{kind} '{name}' is registered twice: by {_registry[key].source} and by {_loading_source}")
        doc = description or (inspect.getdoc(factory) or "").split("\n")[0]
        _registry[key] = Plugin(kind, name, factory, _loading_source, doc)
        return factory

    return decorate


def load_entry_points() -> None:
    """Import every module of the entry-point group once; a broken one is a one-line error naming it."""
    global _loaded, _loading_source
    if _loaded:
        return
    _loaded = True
    for point in sorted(entry_points(group=ENTRY_POINT_GROUP), key=lambda p: p.name):
        dist = point.dist.name if point.dist is not None else "?"
        _loading_source = f"{dist}: {point.value}"
        try:
            loaded = point.load()
            if callable(loaded) and not inspect.ismodule(loaded):
                loaded()  # an entry point may also name a function that registers
        except HvctlError:
            raise
        except Exception as e:
            raise HvctlError(f"plugin entry point '{point.name}' ({point.value}) failed to load: {type(e).__name__}: {e}") from None
        finally:
            _loading_source = "hvctl"


def get(kind: str, name: str) -> Plugin:
    load_entry_points()
    if (kind, name) not in _registry:
        choices = ", ".join(sorted(n for k, n in _registry if k == kind)) or "none installed"
        raise HvctlError(f"unknown {kind} '{name}' (choices: {choices})")
    return _registry[(kind, name)]


def create(kind: str, name: str, **options):
    """The named plugin, made with the recipe's options for it."""
    return get(kind, name).create(**options)


def available(kind: str | None = None) -> list[Plugin]:
    load_entry_points()
    if kind is not None and kind not in KINDS:
        raise HvctlError(f"unknown plugin kind '{kind}' (choices: {', '.join(KINDS)})")
    return sorted((p for p in _registry.values() if kind in (None, p.kind)), key=lambda p: (p.kind, p.name))


class SampleFailure(Exception):
    """A plugin could not process one sample (no object found, unparsable model output, ...):
    the stage records the message for that sample and goes on."""
