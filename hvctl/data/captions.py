"""From a structured caption to the text a model reads.

Training shows the model several compositions of each structured caption (seed 003: field
dropout and permutation), so that it follows a bare short prompt as well as a long one. Variant 0
is always the short description, the form users type; variants 1.. keep each other field with
probability `keep` and shuffle their order. Variants are a pure function of (sample id, variant),
so a cache built twice holds the same texts.
"""

from __future__ import annotations

import random

TEXT_FIELDS = ("short_description", "dense_description", "background", "style", "shot_type", "lighting",
               "atmosphere", "camera_movement")


def _sentence(value: str) -> str:
    value = value.strip().rstrip(".")
    return value[:1].upper() + value[1:] + "." if value else ""


def caption_variants(caption: dict | str | None, sample_id: str, count: int, keep: float = 0.5) -> list[str]:
    """`count` texts for one sample; a plain-string or missing caption gives that string every time."""
    if not isinstance(caption, dict):
        return [caption or ""] * count
    short = caption.get("short_description") or ""
    texts = [short]
    for variant in range(1, count):
        rng = random.Random(f"{sample_id}/{variant}")
        parts = [caption[f] for f in TEXT_FIELDS if caption.get(f) and (f == "short_description" or rng.random() < keep)]
        tags = caption.get("additional_metadata") or {}
        tag_words = [t for group in tags.values() if isinstance(group, list) for t in group]
        if tag_words and rng.random() < keep:
            parts.append("tags: " + ", ".join(tag_words))
        rng.shuffle(parts)
        texts.append(" ".join(_sentence(p) for p in parts) or short)
    return texts


TAG_GROUPS = ("source_tags", "quality_tags", "other_tags")


def caption_problems(caption) -> list[str]:
    """What makes `caption` not a structured caption (toy-world.md, Captions); empty when valid."""
    if not isinstance(caption, dict):
        return [f"expected a JSON object, got {type(caption).__name__}"]
    problems = []
    for name in TEXT_FIELDS:
        value = caption.get(name)
        if not isinstance(value, str) or not value.strip():
            problems.append(f"'{name}' must be a non-empty string")
    tags = caption.get("additional_metadata")
    if not isinstance(tags, dict):
        problems.append("'additional_metadata' must be an object with source_tags, quality_tags, other_tags")
    else:
        for group in TAG_GROUPS:
            if not (isinstance(tags.get(group), list) and all(isinstance(t, str) for t in tags[group])):
                problems.append(f"'additional_metadata.{group}' must be a list of strings")
    unknown = set(caption) - {*TEXT_FIELDS, "additional_metadata"}
    if unknown:
        problems.append(f"unknown field {', '.join(sorted(unknown))}")
    return problems
