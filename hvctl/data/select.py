"""Selecting a manifest's best samples by a numeric field: the SFT stage's data (Seaweed fine-tunes
on a small set of the highest-scoring clips). Any number a record holds will do: a curate score
(`curate.clarity`, `curate.motion`), an aesthetic or reward score another tool wrote, a label."""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import ClassVar

from hvctl.errors import HvctlError


@dataclass
class SelectConfig:
    LIMITS: ClassVar[dict] = {"top": ">= 1"}
    field: str = ""  # the record's number; dots reach into objects: curate.clarity
    min: float | None = None  # keep samples scoring at least this
    max: float | None = None  # and at most this
    top: int | None = None  # then the `top` highest-scoring of them (ties: the smaller id first)


def field_value(record: dict, dotted: str):
    value = record
    for key in dotted.split("."):
        if not isinstance(value, dict) or key not in value:
            return None
        value = value[key]
    return value


def select_ids(records, s: SelectConfig, source: str = "data.manifest") -> list[str]:
    """The ids of the records `s` keeps, best first. Records without the field are left out;
    a value that is not a finite number is an error naming the record."""
    if not s.field:
        raise HvctlError("data.select.field: name the manifest field to select by (e.g. curate.clarity)")
    for name in ("min", "max"):
        bound = getattr(s, name)
        if bound is not None and (isinstance(bound, bool) or not math.isfinite(bound)):
            raise HvctlError(f"data.select.{name} must be a finite number, got {bound!r}")
    scored = []
    for rec in records:
        value = field_value(rec.to_dict(), s.field)
        if value is None:
            continue
        if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
            raise HvctlError(f"{source}: record {rec.id}: {s.field} is {value!r}, not a finite number")
        if (s.min is None or value >= s.min) and (s.max is None or value <= s.max):
            scored.append((-float(value), rec.id))
    kept = [rid for _, rid in sorted(scored)][:s.top]
    if not kept:
        raise HvctlError(f"{source}: no sample has a {s.field} within data.select's bounds")
    return kept
