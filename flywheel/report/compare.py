"""What reports show, computed once for the HTML report and the review server.

A run has N iterations; any two can be compared. Samples are matched by (item_key, repeat); each
matched pair is classed (regression, improvement, changed, same) on the eval's objective, and the
pair of iterations gets a paired statistic: the mean per-item difference with a bootstrap CI and an
exact McNemar test on pass/fail.

    view = load_run_view(store, ["run-20261105-..."])
    cmp = compare_iterations(store, view, view.iterations[0]["id"], view.iterations[-1]["id"])
    cmp.stats["p_mcnemar"], cmp.rows[0].status
"""

from __future__ import annotations

import difflib
import json
import math
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any


from flywheel import summaries
from flywheel.stats import mcnemar_exact, paired_stats  # noqa: F401 - re-exported
from flywheel.spec import GraderInfo, grader_infos
from flywheel.store import Run, Store, StoreError
from flywheel.summaries import GraderSummary

STATUS_ORDER = {"regression": 0, "improvement": 1, "changed": 2, "same": 3, "only_a": 4, "only_b": 5}


@dataclass
class RunView:
    """Runs, their iterations (with per-grader stats), graders and the objective."""

    runs: list[Run]
    iterations: list[dict[str, Any]]
    graders: list[GraderInfo]
    objective: dict[str, str]
    eval_name: str
    spec: dict[str, Any] | None

    def iteration(self, iteration_id: str) -> dict[str, Any]:
        for it in self.iterations:
            if it["id"] == iteration_id:
                return it
        raise KeyError(iteration_id)


@dataclass
class PairRow:
    key: str
    repeat: int
    status: str
    delta: float
    a: dict[str, Any] | None
    b: dict[str, Any] | None


@dataclass
class Comparison:
    a: dict[str, Any]
    b: dict[str, Any]
    rows: list[PairRow]
    stats: dict[str, Any]
    graders: list[dict[str, Any]] = field(default_factory=list)
    config: list[dict[str, Any]] = field(default_factory=list)


def objective_of(spec: dict[str, Any] | None, graders: Sequence[GraderInfo]) -> dict[str, str]:
    objective = (spec or {}).get("objective") or {}
    name = objective.get("grader") or (graders[0].name if graders else "")
    return {"grader": name, "metric": objective.get("metric") or "pass_rate"}


def iteration_label(iteration: dict[str, Any], multi_run: bool = False) -> str:
    label = f"#{iteration['seq']} {iteration.get('stage') or 'eval'}"
    if multi_run:
        label = f"{iteration['run_id'][-6:]} {label}"
    return label


def grader_stats(store: Store, iteration_id: str) -> dict[str, GraderSummary]:
    """Per grader: mean score and pass rate over every sample (errored samples count 0), errors."""
    return {g.name: g for g in store.grader_stats(iteration_id, ci=False)}


def resolve_run_ids(store: Store, ids: Sequence[str]) -> list[str]:
    """Run ids for a report: run ids (or unique suffixes) as given; a checkpoint id or a training job id
    (the job's chosen checkpoint) becomes the runs that evaluated it after training, each split's parent
    run before its own (valid, then test), so `flywheel report sft-...` shows what `flywheel train`
    printed, with the job's loss curves and checkpoint scores."""
    out: list[str] = []
    for given in ids:
        checkpoint_id = given
        if given.startswith("job-"):
            checkpoint_id = store.get_training_job(given).checkpoint_id or ""
            if not checkpoint_id:
                raise StoreError(f"{store.path}: training job {given!r} has no checkpoint (it did not finish)")
        row = None if given.startswith("run-") else store.checkpoint_row(checkpoint_id)
        if row is None:
            out.append(given)
            continue
        evals = row.evals
        runs = [store.get_iteration(e[key]).run_id for split in ("valid", "test") if (e := evals.get(split))
                for key in ("parent_iteration_id", "iteration_id") if e.get(key)]
        chosen = store.get_training_job(row.job_id).checkpoint_id if row.job_id else None
        if not runs and chosen and chosen != checkpoint_id:
            raise StoreError(f"{store.path}: checkpoint {checkpoint_id!r} (step {row.step}) is not the one its "
                             f"job chose; report that one: flywheel report {chosen}")
        if not runs:
            raise StoreError(f"{store.path}: checkpoint {checkpoint_id!r} was not evaluated after training; "
                             f"run flywheel eval SPEC --model {row.model_ref} and report that run")
        out += [r for r in dict.fromkeys(runs) if r not in out]
    return out


def load_run_view(store: Store, run_ids: Sequence[str]) -> RunView:
    """The runs (ids or unique suffixes) and all their iterations, ordered by run then seq."""
    runs = [store.get_run(r) for r in run_ids]
    iterations: list[dict[str, Any]] = []
    spec = None
    eval_name = ""
    for run in runs:
        if spec is None and run.eval_id:
            row = store.get_eval(run.eval_id)
            if row:
                eval_name, spec = row["name"], json.loads(row["spec_json"]) if row["spec_json"] else None
        iterations += [it.to_dict() for it in store.iterations(run.id)]  # view dicts: the report adds keys
    names: list[str] = []
    for it in iterations:
        it["grader_stats"] = grader_stats(store, it["id"])
        names += [n for n in it["grader_stats"] if n not in names]
        it["label"] = iteration_label(it, multi_run=len(runs) > 1)
        it["messages"] = store.prompt_messages(it.get("prompt_id"))
        it["tokens"] = (it.get("prompt_tokens") or 0) + (it.get("completion_tokens") or 0)
    graders = grader_infos(spec, names)
    return RunView(runs=runs, iterations=iterations, graders=graders, objective=objective_of(spec, graders),
                   eval_name=eval_name or (runs[0].id if runs else ""), spec=spec)


def default_pair(iterations: Sequence[dict[str, Any]]) -> tuple[str | None, str | None]:
    """A = the parent of the best iteration (or the first), B = the best scoring (or the last)."""
    if not iterations:
        return None, None
    if len(iterations) == 1:
        return iterations[0]["id"], iterations[0]["id"]
    scored = [it for it in iterations[1:] if it.get("score") is not None and not math.isnan(it["score"])]
    best = max(scored, key=lambda it: it["score"]) if scored else iterations[-1]
    ids = {it["id"] for it in iterations}
    a = best.get("parent_id") if best.get("parent_id") in ids and best.get("parent_id") != best["id"] else None
    return a or iterations[0]["id"], best["id"]


def item_fields(store: Store, runs: Sequence[Run]) -> dict[str, dict[str, Any]]:
    """Dataset fields by item key, for the runs' datasets."""
    out: dict[str, dict[str, Any]] = {}
    for dataset_id in dict.fromkeys(r.dataset_id for r in runs if r.dataset_id):
        for key, fields in store.item_fields(dataset_id).items():
            out.setdefault(key, fields)
    return out


def iteration_samples(store: Store, iteration_id: str, objective: dict[str, str]) -> list[dict[str, Any]]:
    """Samples of an iteration as view dicts (`SampleWithGrades.to_dict()`), each with `grades` by
    grader name and objective `score`/`passed`."""
    samples = [s.to_dict() for s in store.samples_with_grades(
        iteration_id, objective=(objective["grader"], objective["metric"]), details=False)]
    for s in samples:
        for g in s["grades"]:
            g["passed"] = bool(g["passed"])
        s["grades"] = {g["grader"]: g for g in s["grades"]}
    return samples


def objective_value(sample: dict[str, Any], objective: dict[str, str]) -> tuple[float, bool]:
    """(score, passed) of one sample on the objective; an errored or ungraded sample is (0, False)."""
    grade = sample["grades"].get(objective["grader"])
    return summaries.objective_value(sample.get("error"), grade["score"] if grade else None,
                                     grade["passed"] if grade else None, objective["metric"])


def classify(a: dict[str, Any] | None, b: dict[str, Any] | None) -> tuple[str, float]:
    """Status and score delta (b - a) of a matched pair."""
    if a is None:
        return "only_b", 0.0
    if b is None:
        return "only_a", 0.0
    delta = b["score"] - a["score"]
    if (a["passed"] and not b["passed"]) or delta < -1e-9:
        return "regression", delta
    if (b["passed"] and not a["passed"]) or delta > 1e-9:
        return "improvement", delta
    if (a.get("output_text") or "") != (b.get("output_text") or "") or a.get("error") != b.get("error"):
        return "changed", delta
    return "same", delta


def config_diff(a: dict[str, Any], b: dict[str, Any]) -> list[dict[str, Any]]:
    """Iteration settings side by side, `changed` where they differ."""
    fields = [("stage", "stage"), ("model", "model_ref"), ("model fingerprint", "model_fingerprint"),
              ("prompt", "prompt_id"), ("split", "split"), ("parent", "parent_id"), ("decision", "decision")]
    return [{"field": label, "a": a.get(key), "b": b.get(key), "changed": a.get(key) != b.get(key)}
            for label, key in fields]


def _message_text(messages: Sequence[dict[str, Any]]) -> list[str]:
    lines = []
    for m in messages:
        lines.append(f"[{m.get('role', '?')}]")
        lines += str(m.get("content", "")).splitlines() or [""]
    return lines


def prompt_diff(a_messages: Sequence[dict[str, Any]], b_messages: Sequence[dict[str, Any]]) -> list[tuple[str, str]]:
    """Line diff of two prompts as (op, text) with op in ' ', '-', '+'."""
    out = []
    for line in difflib.ndiff(_message_text(a_messages), _message_text(b_messages)):
        if line.startswith("? "):
            continue
        out.append((line[0] if line[0] in "+-" else " ", line[2:]))
    return out


def compare_iterations(store: Store, view: RunView, a_id: str, b_id: str) -> Comparison:
    """Match A's and B's samples by (item_key, repeat); rows sorted regressions first."""
    a_it, b_it = view.iteration(a_id), view.iteration(b_id)
    a_samples = {(s["item_key"], s["repeat"]): s for s in iteration_samples(store, a_id, view.objective)}
    b_samples = {(s["item_key"], s["repeat"]): s for s in iteration_samples(store, b_id, view.objective)}
    rows = []
    for key in list(a_samples) + [k for k in b_samples if k not in a_samples]:
        a, b = a_samples.get(key), b_samples.get(key)
        status, delta = classify(a, b)
        rows.append(PairRow(key=key[0], repeat=key[1], status=status, delta=delta, a=a, b=b))
    rows.sort(key=lambda r: (STATUS_ORDER[r.status], r.delta if r.status == "regression" else -r.delta))
    matched = [r for r in rows if r.a is not None and r.b is not None]
    stats = paired_stats([r.a["score"] for r in matched], [r.b["score"] for r in matched],
                         [r.a["passed"] for r in matched], [r.b["passed"] for r in matched])
    stats["counts"] = {s: sum(1 for r in rows if r.status == s) for s in STATUS_ORDER}
    per_grader = []
    for g in view.graders:
        sa = a_it["grader_stats"].get(g.name)
        sb = b_it["grader_stats"].get(g.name)
        per_grader.append({"name": g.name, "type": g.type, "is_model": g.is_model,
                           "a_mean": sa.mean if sa else None, "b_mean": sb.mean if sb else None,
                           "a_pass": sa.pass_rate if sa else None, "b_pass": sb.pass_rate if sb else None})
    return Comparison(a=a_it, b=b_it, rows=rows, stats=stats, graders=per_grader, config=config_diff(a_it, b_it))
