"""The console's live view of a wheel run: one panel (lap and stage, the step of the stage with a bar,
training loss, elapsed and estimated time left, the incumbent's score and cost), redrawn from the
run's `WheelEvent`s, with the run's log lines printed above it.

Quiet when asked (`--json`); when stdout or stderr is not a terminal, one line per stage instead.

    with wheel_view() as on_event:
        result = run_wheel(run_spec, store, on_event=on_event)
"""

from __future__ import annotations

import sys
from collections.abc import Iterator
from contextlib import contextmanager

import click
from rich.console import Console, Group
from rich.live import Live
from rich.progress_bar import ProgressBar
from rich.table import Table
from rich.text import Text

from flywheel.events import EventFn, WheelEvent, format_seconds
from flywheel.report.console import safe_terminal_text

# Lines a terminal without the view shows: one per stage (the baseline and test count as stages).
STAGE_LINE_KINDS = frozenset({"stage_done", "finished"})


def where(event: WheelEvent) -> str:
    """`lap 1/2 · stage 3/5 sft` (or `baseline`, `test`)."""
    stage = safe_terminal_text(event.stage, markup=False)
    if not event.lap:
        return stage
    return f"lap {event.lap}/{event.laps} · stage {min(event.position + 1, event.positions)}/{event.positions} {stage}"


def panel(event: WheelEvent) -> Group:
    """The live view's renderable for the latest event."""
    head = Text(where(event), style="bold")
    if event.step:
        head.append(f" · {safe_terminal_text(event.step, markup=False)}")
    if event.done is not None and event.total:
        head.append(f" {event.done}/{event.total} {event.unit}")
    if event.loss is not None:
        head.append(f" · loss {event.loss:.4g}", style="cyan")
    rows = [head]
    if event.done is not None and event.total:
        rows.append(ProgressBar(total=event.total, completed=event.done, width=40))
    grid = Table.grid(padding=(0, 2))
    incumbent = (f"incumbent valid {event.incumbent_score:.3f}, {event.incumbent_cost}"
                 if event.incumbent_score is not None else "incumbent: measuring the baseline")
    grid.add_row(f"elapsed {format_seconds(event.elapsed_s)}",
                 f"left ~{format_seconds(event.eta_s)}" if event.eta_s is not None else "left: estimating",
                 safe_terminal_text(incumbent, markup=False))
    rows.append(grid)
    return Group(*rows)


@contextmanager
def wheel_view(quiet: bool = False) -> Iterator[EventFn]:
    """Yield the `on_event` callback of a `flywheel run`: nothing when `quiet`, the live panel on a
    terminal, else one line per stage on stdout."""
    if quiet:
        yield lambda event: None
        return
    console = Console(stderr=True)
    if not (console.is_terminal and sys.stdout.isatty()):
        running: list[WheelEvent] = []  # the stage under way, named if the run stops inside it

        def line(event: WheelEvent) -> None:
            if event.kind == "stage":
                running[:] = [event]
            elif event.kind in STAGE_LINE_KINDS:
                running.clear()
                click.echo(safe_terminal_text(event.line(), markup=False))

        try:
            yield line
        except BaseException:  # Ctrl-C or an error inside a stage: say which stage it stopped in
            if running:
                click.echo(safe_terminal_text(f"{running[0].line()} -> stopped", markup=False))
            raise
        return
    with Live(console=console, transient=True, refresh_per_second=4) as live:
        def show(event: WheelEvent) -> None:
            if event.kind in ("log", "stage", "stage_done", "checkpoint"):
                live.console.print(Text(safe_terminal_text(event.line(), markup=False)))
            if event.kind != "finished":
                live.update(panel(event))

        yield show
