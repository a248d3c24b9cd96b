"""`hvctl rewrite` and generate's `rewrite:` step: a user's prompt, rewritten for the model.

Users write prompts in any language and form; the model was trained on captions of one form.
A rewriter plugin (hvctl/plugins.py; built in: `lexicon`, the toy world's wording to its
canonical caption, and `llm`, a local causal language model with an instruction per mode) turns
one into the other, in one of two modes (system.md):

- normal: keep every fact of the prompt, in English, expanded where it is a word or two, with
  the style and lighting it implies;
- master: the same, with more detail on composition, lighting and camera.

A rewrite that fails (no usable output) keeps the original prompt, with a warning: rewriting may
improve a prompt, never lose it.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, ClassVar, Literal

MODES = ("normal", "master")


@dataclass
class RewriteRecipe:
    KIND: ClassVar[str] = "rewrite"
    rewriter: str = "lexicon"  # a registered rewriter (hvctl plugins list)
    mode: Literal["normal", "master"] = "normal"
    model: Path | None = None  # the rewriter's model folder, for rewriters that need one (llm)
    options: dict[str, Any] = field(default_factory=dict)  # the rewriter's own options


class Rewriter:
    """A rewriter plugin made once, then applied to any number of prompts."""

    def __init__(self, r: RewriteRecipe):
        from hvctl import plugins

        self.r = r
        options = dict(r.options, **({"model": r.model} if r.model is not None else {}))
        self.plugin = plugins.create("rewriter", r.rewriter, **options)

    def __call__(self, prompt: str) -> dict:
        """{"original", "rewritten", "changed", "warning"}; on failure rewritten is the original."""
        from hvctl.plugins import SampleFailure

        try:
            text = self.plugin.rewrite(prompt, self.r.mode)
            if not isinstance(text, str) or not text.strip():
                raise SampleFailure("the rewriter returned nothing")
            text, warning = " ".join(text.split()), None
        except SampleFailure as e:
            text, warning = prompt, f"prompt kept as written: {e}"
        return {"original": prompt, "rewritten": text, "changed": text != prompt, "warning": warning}
