"""Typed rows of the store, and the one rule for a sample that passed.

A sample **passed** when it has no error, every grader of its iteration graded it, and every such
grade passed (no grade error). An ungraded or errored sample did not pass. `sample_passed` is the
rule in Python; `PASSED_SQL` (with `ITERATION_GRADERS`) is the same rule as an SQL expression over
a sample aliased `s`, for aggregates. tests/test_store_rows.py checks that both agree on a table of cases.
"""

from __future__ import annotations

import json
from collections.abc import Collection, Iterable, Mapping
from dataclasses import asdict, dataclass, field
from typing import Any


@dataclass
class SampleRecord:
    """A sample and its grades, ready to be written together."""

    iteration_id: str
    item_key: str
    repeat: int
    input_json: str
    output_text: str | None
    finish_reason: str | None = None
    prompt_tokens: int = 0
    completion_tokens: int = 0
    latency_s: float = 0.0
    cost: float = 0.0
    cache_hit: bool = False
    error: str | None = None
    grades: list[dict[str, Any]] = field(default_factory=list)
    cache_key: str | None = None
    model_fingerprint: str | None = None
    output_tools_json: str | None = None  # the output's tool calls (flywheel.tools), JSON


def grade_passed(passed: Any, error: str | None) -> bool:
    """One grade passed: its grader said so and did not error."""
    return bool(passed) and error is None


def sample_passed(error: str | None, grades: Iterable[tuple[str, Any, str | None]],
                  graders: Collection[str]) -> bool:
    """THE passed rule: no sample error, every grader in `graders` (those of the iteration) graded
    the sample, and each of its grades passed. `grades` are (grader, passed, grade error) triples.

    >>> sample_passed(None, [("exact", 1, None)], {"exact"})
    True
    >>> sample_passed(None, [], {"exact"}), sample_passed("timeout", [], set())
    (False, False)
    """
    if error is not None:
        return False
    graded: set[str] = set()
    for grader, passed, grade_error in grades:
        if not grade_passed(passed, grade_error):
            return False
        graded.add(grader)
    return bool(graded) and graded >= set(graders)


def passed_of_rows(error: str | None, grade_rows: Iterable[Mapping[str, Any]], graders: Collection[str]) -> bool:
    """`sample_passed` over grade rows (dicts with `grader`, `passed` and `error`)."""
    return sample_passed(error, ((g["grader"], g["passed"], g.get("error")) for g in grade_rows), graders)


# The same rule in SQL, for a sample row aliased `s` in a query that starts `with {ITERATION_GRADERS}`
# (one `?`: the iteration id) and reads `from samples s, iteration_graders`. The graders of the
# iteration are those that graded any of its samples (a sample has at most one grade per grader), so
# "every grader graded it and every grade passed" is "its passing grades number the iteration's graders".
ITERATION_GRADERS = ("iteration_graders(n) as (select count(distinct g.grader) from grades g"
                     " join samples gs on gs.id = g.sample_id where gs.iteration_id = ?)")
PASSED_SQL = ("(s.error is null and iteration_graders.n > 0 and (select count(*) from grades g"
              " where g.sample_id = s.id and g.passed = 1 and g.error is null) = iteration_graders.n)")


@dataclass(frozen=True)
class IterationUsage:
    """What an iteration's samples used, summed; `missing_tokens` counts the samples that did not
    error yet report no token count (none, or zero prompt and completion tokens: data outputs,
    a backend that returns no usage)."""

    n: int
    errors: int
    prompt_tokens: int
    completion_tokens: int
    cost: float
    missing_tokens: int


@dataclass(frozen=True)
class ApiRunName:
    """What the API calls a harness run: its object's id, the name its caller gave, the model as named."""

    object_id: str
    name: str | None
    model: str | None


@dataclass(frozen=True)
class Checkpoint:
    """A registered checkpoint (a `checkpoints` row): a trained adapter or hosted fine-tuned model with
    its lineage. `config`, `metrics` and `evals` are its JSON columns, parsed."""

    id: str
    method: str
    backend: str
    model_ref: str
    base_model: str
    path: str | None
    adapter_hash: str | None
    training_set_id: str | None
    training_set_hash: str | None
    parent_id: str | None
    job_id: str | None
    config: dict[str, Any]
    metrics: dict[str, Any]
    evals: dict[str, Any]
    created_at: str | None = None
    step: int | None = None  # the training step it was saved at (None: saved once, at the end)
    pruned_at: str | None = None  # when its adapter folder was removed (`keep`), else None
    trained_on_deleted: str | None = None  # the deletion that removed items it was trained on, if any

    @classmethod
    def from_row(cls, row: Mapping[str, Any]) -> "Checkpoint":
        """The checkpoint of a `checkpoints` row (a dict from sqlite-utils)."""
        return cls(id=row["id"], method=row["method"], backend=row["backend"], model_ref=row["model_ref"],
                   base_model=row["base_model"], path=row["path"], adapter_hash=row["adapter_hash"],
                   training_set_id=row["training_set_id"], training_set_hash=row["training_set_hash"],
                   parent_id=row["parent_id"], job_id=row["job_id"],
                   config=json.loads(row["config_json"] or "{}"), metrics=json.loads(row["metrics_json"] or "{}"),
                   evals=json.loads(row["eval_json"] or "{}"), created_at=row["created_at"],
                   step=row.get("step"), pruned_at=row.get("pruned_at"),
                   trained_on_deleted=row.get("trained_on_deleted"))

    def to_dict(self) -> dict[str, Any]:
        """Its fields as a JSON-ready dict."""
        return asdict(self)


@dataclass(frozen=True)
class TrainingJob:
    """A training job (a `training_jobs` row): local or hosted, running until it registers its chosen
    checkpoint (`succeeded`), fails, or is pruned by a search. `config_json` is its training config
    exactly as stored (a job is resumed only with the same text)."""

    id: str
    created_at: str
    backend: str
    method: str
    status: str
    base_model: str | None
    training_set_id: str | None = None
    config_json: str | None = None
    finished_at: str | None = None
    remote_id: str | None = None  # the hosted job's id at its provider
    error: str | None = None
    checkpoint_id: str | None = None  # the checkpoint it chose, once succeeded
    stop_reason: str | None = None  # early stopping or a monitor; None when the schedule ended
    output_dir: str | None = None  # its resumable trainer state (jobs that save steps)

    @classmethod
    def from_row(cls, row: Mapping[str, Any]) -> "TrainingJob":
        """The job of a `training_jobs` row."""
        return cls(**{f: row.get(f) for f in cls.__dataclass_fields__})

    def to_dict(self) -> dict[str, Any]:
        """Its fields as a JSON-ready dict."""
        return asdict(self)


@dataclass(frozen=True)
class Run:
    """A run (a `runs` row): an eval, capture, optimize or wheel run and its stored summary, read with
    `flywheel.summaries.RunSummary.of_run` (any run) or `EvalSummary.of_run` (an eval run)."""

    id: str
    kind: str | None
    status: str
    started_at: str | None = None
    finished_at: str | None = None
    config_key: str | None = None
    eval_id: str | None = None
    dataset_id: str | None = None
    model_ref: str | None = None
    model_fingerprint: str | None = None
    split: str | None = None
    item_limit: int | None = None
    command: str | None = None
    summary_json: str | None = None

    @classmethod
    def from_row(cls, row: Mapping[str, Any]) -> "Run":
        """The run of a `runs` row."""
        return cls(**{f: row.get(f) for f in cls.__dataclass_fields__})

    def to_dict(self) -> dict[str, Any]:
        """Its columns as a JSON-ready dict (in table order)."""
        return asdict(self)


@dataclass(frozen=True)
class Iteration:
    """An iteration (an `iterations` row): one measured (or proposed) prompt/model on a split within a
    run, with its score, confidence interval, usage and the decision taken on it."""

    id: str
    run_id: str
    seq: int
    stage: str | None = None
    parent_id: str | None = None
    model_ref: str | None = None
    model_fingerprint: str | None = None
    prompt_id: str | None = None
    split: str | None = None
    n: int | None = None
    score: float | None = None
    ci_low: float | None = None
    ci_high: float | None = None
    prompt_tokens: int | None = None
    completion_tokens: int | None = None
    cost: float | None = None
    wall_s: float | None = None
    decision: str | None = None
    reason: str | None = None
    created_at: str | None = None
    lap: int | None = None  # the wheel lap it belongs to (wheel runs), else None
    latency_s: float | None = None  # its samples' summed latency

    @classmethod
    def from_row(cls, row: Mapping[str, Any]) -> "Iteration":
        """The iteration of an `iterations` row."""
        return cls(**{f: row.get(f) for f in cls.__dataclass_fields__})

    def to_dict(self) -> dict[str, Any]:
        """Its columns as a JSON-ready dict (in table order)."""
        return asdict(self)


@dataclass(frozen=True)
class Capture:
    """A captured call (a `captures` row): a request the proxy forwarded, an imported or `store: true`
    completion, with its response and usage. The JSON columns are kept as stored text (`loads_json`
    in flywheel.capture_rows reads them leniently)."""

    id: int
    created_at: str
    endpoint: str | None = None
    upstream: str | None = None
    model: str | None = None
    stream: int | None = None
    status: int | None = None
    latency_s: float | None = None
    prompt_tokens: int | None = None
    completion_tokens: int | None = None
    total_tokens: int | None = None
    metadata_json: str | None = None
    request_json: str | None = None
    request_bytes: int | None = None
    response_json: str | None = None
    response_id: str | None = None
    error: str | None = None
    api_project: str | None = None  # the API project of a `store: true` completion (None: the proxy's)

    @classmethod
    def from_row(cls, row: Mapping[str, Any]) -> "Capture":
        """The capture of a `captures` row."""
        return cls(**{f: row.get(f) for f in cls.__dataclass_fields__})

    def to_dict(self) -> dict[str, Any]:
        """Its columns as a JSON-ready dict (in table order)."""
        return asdict(self)


@dataclass(frozen=True)
class Grade:
    """One grader's grade of a sample (a `grades` row). `details_json` and `error_details` are None
    when read without details (`Store.samples_with_grades(details=False)`)."""

    sample_id: int
    grader: str
    score: float | None = None
    passed: int | None = None  # 1/0 as stored; `grade_passed` is the rule
    feedback: str | None = None
    error: str | None = None
    details_json: str | None = None
    error_details: str | None = None

    @classmethod
    def from_row(cls, row: Mapping[str, Any]) -> "Grade":
        """The grade of a `grades` row."""
        return cls(**{f: row.get(f) for f in cls.__dataclass_fields__})


@dataclass(frozen=True)
class SampleWithGrades:
    """A sample (a `samples` row) with its grades, in grader order. With an objective, `score` and
    `passed` are its objective value (`flywheel.summaries.objective_value`), else None. Columns not
    read (`details=False`: `finish_reason`, `created_at` ...) are None."""

    id: int
    item_key: str
    repeat: int
    input_json: str | None
    output_text: str | None
    error: str | None
    prompt_tokens: int | None
    completion_tokens: int | None
    latency_s: float | None
    cost: float | None
    cache_hit: int | None
    grades: tuple[Grade, ...] = ()
    iteration_id: str | None = None
    finish_reason: str | None = None
    created_at: str | None = None
    output_tools_json: str | None = None
    cache_key: str | None = None
    score: float | None = None
    passed: bool | None = None

    @classmethod
    def from_row(cls, row: Mapping[str, Any], grades: Iterable[Grade] = (),
                 objective: tuple[float, bool] | None = None) -> "SampleWithGrades":
        """The sample of a `samples` row, its grades and its objective (score, passed) if measured."""
        fields = {f: row.get(f) for f in cls.__dataclass_fields__ if f not in ("grades", "score", "passed")}
        score, passed = objective if objective is not None else (None, None)
        return cls(**fields, grades=tuple(grades), score=score, passed=passed)

    def grade(self, grader: str) -> Grade | None:
        """Its grade by `grader`, or None."""
        return next((g for g in self.grades if g.grader == grader), None)

    def to_dict(self) -> dict[str, Any]:
        """Its fields as a JSON-ready dict (grades as a list of dicts)."""
        out = asdict(self)
        out["grades"] = list(out["grades"])
        return out
