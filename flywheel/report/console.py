"""Console rendering of eval results and stored runs, with rich."""

from __future__ import annotations

import json
import math
from typing import Any

from rich.console import Console
from rich.table import Table

from flywheel.cost import CostPerItem
from flywheel.harness import EvalResult
from flywheel.images import describe_content
from flywheel.store import Run, Store
from flywheel.summaries import RunSummary
from flywheel.terminal import safe_terminal_text
from graders.endpoints import response_error


class _Console(Console):
    """A rich console that does not squeeze tables to 80 columns when output is piped."""

    def __init__(self) -> None:
        super().__init__()
        if not self.is_terminal:
            self.width = 160


console = _Console()

def _pct(value: float | None) -> str:
    return "-" if value is None or (isinstance(value, float) and math.isnan(value)) else f"{100 * value:.1f}%"


def _num(value: float | None, digits: int = 3) -> str:
    return "-" if value is None or (isinstance(value, float) and math.isnan(value)) else f"{value:.{digits}f}"


def print_eval_result(result: EvalResult) -> None:
    safe = safe_terminal_text
    console.print(
        f"[bold]{safe(result.eval_name)}[/bold]  model {safe(result.model)}  split {safe(result.split)}  "
        f"run {safe(result.run_id)}")
    table = Table(show_header=True, header_style="bold")
    for column in ("grader", "n", "mean score", "95% CI", "pass rate", "errors"):
        table.add_column(column, justify="left" if column == "grader" else "right")
    for g in result.graders:
        table.add_row(safe(g.name), str(g.n), _num(g.mean), f"[{_num(g.ci_low)}, {_num(g.ci_high)}]",
                      _pct(g.pass_rate), str(g.errors))
    console.print(table)
    low, high = result.pass_ci
    console.print(
        f"n={result.n_samples}  pass rate {_pct(result.pass_rate)} (95% CI {_pct(low)}–{_pct(high)})  "
        f"errors {result.n_errors}")
    console.print(
        f"tokens {result.prompt_tokens} in / {result.completion_tokens} out  "
        f"model calls {result.model_calls}  cache hits {result.cache_hits}"
        + (f"  resumed {result.resumed}" if result.resumed else "")
        + f"  time {result.wall_s:.1f}s")


def print_runs(rows: list[Run]) -> None:
    table = Table(show_header=True, header_style="bold")
    table.add_column("run", no_wrap=True)
    table.add_column("kind")
    table.add_column("model", max_width=28, overflow="ellipsis")
    for column in ("split", "status", "n", "pass rate"):
        table.add_column(column, no_wrap=True)
    table.add_column("started", no_wrap=True)
    for row in rows:
        summary = RunSummary.of_run(row)
        safe = safe_terminal_text
        table.add_row(safe(row.id), safe(row.kind or ""), safe(row.model_ref or ""), safe(row.split or ""),
                      safe(row.status), "-" if summary.n_samples is None else str(summary.n_samples), _pct(summary.pass_rate),
                      (row.started_at or "")[:16].replace("T", " "))
    console.print(table)


def run_detail(store: Store, run_id: str, failed_only: bool = False, limit: int | None = None) -> dict[str, Any]:
    """A run with its iterations and, per iteration, samples with grades."""
    run = store.get_run(run_id)
    iterations = []
    for iteration in store.iterations(run.id):
        samples = [s.to_dict() for s in store.samples_with_grades(iteration.id)]  # the JSON shape, shown as is
        if failed_only:
            samples = [s for s in samples if s["error"] or not all(g["passed"] for g in s["grades"])]
        if limit:
            samples = samples[:limit]
        for sample in samples:
            sample["input"] = json.loads(sample.pop("input_json") or "null")
            for grade in sample["grades"]:
                grade["details"] = json.loads(grade.pop("details_json") or "{}")
        iterations.append({**iteration.to_dict(), "samples": samples})
    shown = run.to_dict()
    shown["summary"] = json.loads(shown.pop("summary_json") or "null")
    return {"run": shown, "iterations": iterations}


def print_run_detail(detail: dict[str, Any]) -> None:
    safe = safe_terminal_text
    run = detail["run"]
    summary = run.get("summary") or {}
    console.print(f"[bold]{safe(run['id'])}[/bold]  {safe(run['model_ref'])}  split {safe(run['split'])}  "
                  f"{safe(run['status'])}  pass rate {_pct(summary.get('pass_rate'))}")
    for iteration in detail["iterations"]:
        console.print(f"iteration {iteration['seq']} ({safe(iteration['stage'])}): score {_num(iteration['score'])}")
        for sample in iteration["samples"]:
            user = describe_content(next((m["content"] for m in reversed(sample["input"] or []) if m["role"] == "user"), ""))
            console.print(f"[dim]item {safe(sample['item_key'])}#{sample['repeat']}[/dim] {safe(repr(user))}",
                          markup=True, highlight=False)
            if sample["error"]:
                console.print(f"  [red]error[/red] {safe(sample['error'])}", highlight=False)
            else:
                console.print(f"  output: {safe(repr(sample['output_text']), markup=False)}", highlight=False, markup=False)
            for grade in sample["grades"]:
                mark = "[green]pass[/green]" if grade["passed"] else "[red]fail[/red]"
                console.print(f"  {mark} {safe(grade['grader'])} {grade['score']:.3f}  ", end="")
                console.print(safe(grade["feedback"] or "", markup=False), highlight=False, markup=False)


def _ci(cmp: dict[str, Any]) -> str:
    if not cmp:
        return "-"
    return (f"{cmp['diff']:+.3f} [{cmp['ci_low']:+.3f}, {cmp['ci_high']:+.3f}]  "
            f"McNemar p={cmp['p_mcnemar']:.3g}  ({cmp['improvements']} fixed, {cmp['regressions']} broken)")


def tokens_line(paid: int, measured: int) -> str:
    """The two token figures, each named: paid by every model call, and of the run's iterations (its report's)."""
    return f"tokens paid {paid:,} (all model calls)  tokens measured {measured:,} (this run's iterations)"


def print_grader_runs(responses: list[dict[str, Any]]) -> None:
    """`flywheel graders run`: one row per grader: name, type, score, passed, error."""
    safe = safe_terminal_text
    table = Table(show_header=True, header_style="bold")
    for column in ("grader", "type", "score", "passed", "error"):
        table.add_column(column, justify="right" if column == "score" else "left", overflow="fold")
    for r in responses:
        meta = r.get("metadata") or {}
        error = response_error(r)
        passed = r.get("passed")
        table.add_row(safe(meta.get("name")), safe(meta.get("type")), _num(r.get("reward")),
                      "–" if passed is None else ("yes" if passed else "no"), safe(error) if error else "")
    console.print(table)


def print_optimize_result(result) -> None:
    """The search tree in order, then winner vs baseline on valid and on test."""
    safe = safe_terminal_text
    table = Table(show_header=True, header_style="bold", title=f"prompt search {safe(result.run_id)}")
    for column in ("candidate", "parent", "demos", "minibatch", "all of valid", "test"):
        table.add_column(column, justify="left" if column in ("candidate", "parent") else "right")
    for c in result.candidates:
        mark = " ★" if c is result.winner else ""
        table.add_row(safe(c.origin) + mark, safe(c.parent.origin) if c.parent else "",
                      (f"{len(c.prompt.demos)}" + (f" (nearest {c.prompt.nearest})" if c.prompt.nearest else "")),
                      _num(c.minibatch.objective if c.minibatch else None),
                      _num(c.valid.objective if c.valid else None), _num(c.test.objective if c.test else None))
    console.print(table)
    if result.rejected:
        console.print(f"{len(result.rejected)} proposal(s) rejected before evaluation: "
                      + "; ".join(sorted({safe(r['reason']) for r in result.rejected})), highlight=False)
    for note in result.notes:
        console.print(f"note: {safe(note)}", highlight=False)
    console.print(safe(result.reason, markup=False), highlight=False, markup=False)
    console.print(f"valid  winner - baseline: {_ci(result.valid_comparison)}", highlight=False)
    console.print(f"test   winner - baseline: {_ci(result.test_comparison)}", highlight=False)
    console.print(f"model calls {result.model_calls}  {tokens_line(result.tokens, result.tokens_measured)}  "
                  f"time {result.wall_s:.1f}s", highlight=False)


def print_wheel_result(result) -> None:
    """Each stage's decision by lap, then baseline -> best prompt -> final model with score and cost,
    the winner vs the baseline on test, the spend and the report."""
    safe = safe_terminal_text
    table = Table(show_header=True, header_style="bold", title=f"flywheel run {safe(result.run_id)}")
    for column in ("lap", "stage", "valid", "decision", "time", "why"):
        table.add_column(column, overflow="fold")
    for o in result.stages:
        table.add_row(str(o.lap), safe(o.stage), _num(o.valid), safe(o.decision), f"{o.wall_s:.0f}s", safe(o.reason))
    console.print(table)
    console.print(f"stopped: {safe(result.stopped, markup=False)}", highlight=False, markup=False)
    if result.milestones:
        goal = result.minimise
        milestones = Table(show_header=True, header_style="bold", title="baseline -> best prompt -> final model")
        for column in ("", "model", "prompt", "valid", "test", "cost per item"):
            milestones.add_column(column, overflow="fold")
        for m in result.milestones:
            cost = CostPerItem.from_dict(m.cost)
            milestones.add_row(safe(m.label), safe(m.model_ref), safe(m.prompt_id), _pct(m.valid), _pct(m.test),
                               safe(", ".join(dict.fromkeys([cost.describe(goal), cost.describe("tokens"),
                                                             cost.describe("latency_s")]))))
        console.print(milestones)
    if result.test:
        cmp = result.test.get("comparison") or {}
        console.print(f"test: {_pct(result.test.get('baseline'))} -> {_pct(result.test.get('winner'))}  "
                      f"diff {_ci(cmp)}", highlight=False, markup=False)
    laps = "  ".join(f"lap {lap} {seconds:.0f}s" for lap, seconds in sorted(result.lap_wall_s.items()))
    console.print(f"model calls {result.model_calls}  {tokens_line(result.tokens, result.tokens_measured)}  "
                  f"cost {result.cost:.4f}  "
                  f"time {result.wall_s:.0f}s ({laps})", highlight=False)
    if result.report_path:
        console.print(f"report: {safe(result.report_path, markup=False)}", highlight=False, markup=False)
