"""Progress bars: rich on a terminal, silent in CI logs and pipes."""

from __future__ import annotations

import os
import sys
from contextlib import contextmanager


def interactive() -> bool:
    return sys.stderr.isatty() and not os.environ.get("CI")


@contextmanager
def progress_bar(total: int, description: str, enabled: bool | None = None):
    """Yields `advance(n=1)`; shows a bar on stderr only when interactive."""
    if not (interactive() if enabled is None else enabled):
        yield lambda n=1: None
        return
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn, TimeRemainingColumn
    from rich.console import Console

    columns = [TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn(), TimeRemainingColumn()]
    with Progress(*columns, console=Console(stderr=True), transient=False) as progress:
        task = progress.add_task(description, total=total)
        yield lambda n=1: progress.advance(task, n)
