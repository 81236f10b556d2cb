"""Progress display for long work: a rich bar on stderr, silent when disabled or not a terminal."""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager

from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn, TimeRemainingColumn

from flywheel.harness import ProgressFn


@contextmanager
def progress_bar(label: str, disable: bool = False) -> Iterator[ProgressFn | None]:
    """Yield a `progress(done, total)` callback drawing a bar with ETA (None when disabled)."""
    console = Console(stderr=True)
    if disable or not console.is_terminal:
        yield None
        return
    with Progress(TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(),
                  TimeElapsedColumn(), TextColumn("eta"), TimeRemainingColumn(),
                  console=console, transient=True) as bar:
        task = bar.add_task(label, total=None)

        def update(done: int, total: int) -> None:
            bar.update(task, completed=done, total=total)

        yield update
