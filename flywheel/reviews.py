"""Human reviews of samples, and the training data the next turn of the wheel builds from them.

A review is an append-only row about one sample: a pass/fail `verdict` that overrides the graders,
a `correction` (the output it should have been), a `note`, and, when two outputs of the same item
were shown side by side, a `preference` between the sample and `other_sample_id` ('sample',
'other' or 'tie'). For each field the latest review wins, so a reviewer can change their mind.

    add_review(store, 42, verdict="fail", correction="card_arrival", reviewer="ana")
    add_review(store, 42, other_sample_id=17, preference="other")
    sample_reviews(store, run_ids=[run_id])[42].correction   # 'card_arrival'
    preferences(store, run_ids=[run_id])                     # [Preference(chosen=17, rejected=42, ...)]

The training-set builders (`flywheel.train.sets.build_sft_set`, `build_dpo_set`) turn these
into SFT rows (corrections, approved outputs) and DPO pairs (preferences, corrections).
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from typing import Any

from flywheel.errors import FlywheelError
from flywheel.spec import grader_infos
from flywheel.store import Store

VERDICTS = ("pass", "fail")
PREFERENCES = ("sample", "other", "tie")


class ReviewError(FlywheelError):
    """A review names a missing sample or carries a value that is not allowed."""


@dataclass
class SampleReview:
    """The effective human review of one sample (latest value of each field)."""

    sample_id: int
    verdict: str | None = None
    correction: str | None = None
    notes: list[str] = field(default_factory=list)
    reviewers: list[str] = field(default_factory=list)
    updated_at: str | None = None


@dataclass
class Preference:
    """The latest preference between two samples of the same item."""

    chosen: int | None
    rejected: int | None
    tie: bool
    sample_id: int
    other_sample_id: int
    reviewer: str | None
    created_at: str


def add_review(store: Store, sample_id: int, *, verdict: str | None = None, correction: str | None = None,
               note: str | None = None, other_sample_id: int | None = None, preference: str | None = None,
               reviewer: str | None = None) -> int:
    """Record a review of `sample_id`; returns the review id. Empty strings count as not given."""
    verdict = verdict or None
    preference = preference or None
    note = note.strip() if note and note.strip() else None
    correction = correction if correction and correction.strip() else None
    if verdict is not None and verdict not in VERDICTS:
        raise ReviewError(f"verdict {verdict!r}: expected one of {', '.join(VERDICTS)}")
    if preference is not None and preference not in PREFERENCES:
        raise ReviewError(f"preference {preference!r}: expected one of {', '.join(PREFERENCES)}")
    if preference is not None and other_sample_id is None:
        raise ReviewError("a preference needs other_sample_id: the output the sample was compared with")
    ids = [int(sample_id)] + ([int(other_sample_id)] if other_sample_id is not None else [])
    found = store.samples_by_id(ids)
    for sid in ids:
        if sid not in found:
            raise ReviewError(f"{store.path}: no sample with id {sid}")
    if correction is not None and correction == found[ids[0]].get("output_text"):
        correction = None  # the output itself, unchanged: not a correction
    if not any((verdict, correction, note, preference)):
        raise ReviewError("empty review: give a verdict, a preference, a correction (different from the output) "
                          "or a note")
    if other_sample_id is not None:
        a, b = found[ids[0]], found[ids[1]]
        if ids[0] == ids[1] or (a["item_key"], a["repeat"]) != (b["item_key"], b["repeat"]):
            raise ReviewError(f"samples {ids[0]} and {ids[1]} are not two outputs of the same item")
    return store.add_review({"sample_id": ids[0], "other_sample_id": ids[1] if len(ids) > 1 else None,
                             "verdict": verdict, "preference": preference, "correction": correction,
                             "note": note, "reviewer": reviewer})


def _iteration_ids(store: Store, run_ids: Sequence[str] | None, iteration_ids: Sequence[str] | None) -> list[str] | None:
    if run_ids is None and iteration_ids is None:
        return None
    ids = list(iteration_ids or [])
    for run_id in run_ids or []:
        ids += [it.id for it in store.iterations(store.get_run(run_id).id)]
    return ids


def _review_rows(store: Store, run_ids: Sequence[str] | None, iteration_ids: Sequence[str] | None) -> list[dict[str, Any]]:
    ids = _iteration_ids(store, run_ids, iteration_ids)
    if ids is None:
        return store.list_reviews()
    return store.reviews_for_iterations(ids)


def sample_reviews(store: Store, *, run_ids: Sequence[str] | None = None,
                   iteration_ids: Sequence[str] | None = None) -> dict[int, SampleReview]:
    """Effective review per sample id (verdict, correction, notes), within runs or iterations."""
    out: dict[int, SampleReview] = {}
    for row in _review_rows(store, run_ids, iteration_ids):
        if not (row["verdict"] or row["correction"] or row["note"]):
            continue
        review = out.setdefault(row["sample_id"], SampleReview(sample_id=row["sample_id"]))
        review.verdict = row["verdict"] or review.verdict
        review.correction = row["correction"] or review.correction
        if row["note"]:
            review.notes.append(row["note"])
        if row["reviewer"] and row["reviewer"] not in review.reviewers:
            review.reviewers.append(row["reviewer"])
        review.updated_at = row["created_at"]
    return out


def preferences(store: Store, *, run_ids: Sequence[str] | None = None,
                iteration_ids: Sequence[str] | None = None) -> list[Preference]:
    """The latest preference per pair of samples (order of the pair does not matter)."""
    latest: dict[frozenset[int], dict[str, Any]] = {}
    for row in _review_rows(store, run_ids, iteration_ids):
        if row["preference"] and row["other_sample_id"] is not None:
            latest[frozenset((row["sample_id"], row["other_sample_id"]))] = row
    out = []
    for row in latest.values():
        s, o = row["sample_id"], row["other_sample_id"]
        chosen, rejected = {"sample": (s, o), "other": (o, s), "tie": (None, None)}[row["preference"]]
        out.append(Preference(chosen=chosen, rejected=rejected, tie=row["preference"] == "tie", sample_id=s,
                              other_sample_id=o, reviewer=row["reviewer"], created_at=row["created_at"]))
    return sorted(out, key=lambda p: p.created_at)


@dataclass
class Agreement:
    """How often a grader's pass/fail matches the reviewers' verdicts."""

    grader: str
    type: str
    is_model: bool
    n: int
    agree: int
    judge_pass_human_pass: int
    judge_pass_human_fail: int
    judge_fail_human_pass: int
    judge_fail_human_fail: int
    rate: float
    kappa: float

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def cohen_kappa(pp: int, pf: int, fp: int, ff: int) -> float:
    """Cohen's kappa of a 2x2 table (judge pass/fail x human pass/fail); nan when undefined."""
    n = pp + pf + fp + ff
    if n == 0:
        return math.nan
    observed = (pp + ff) / n
    expected = ((pp + pf) * (pp + fp) + (fp + ff) * (pf + ff)) / (n * n)
    if expected >= 1:
        return 1.0 if observed == 1 else math.nan
    return (observed - expected) / (1 - expected)


def judge_agreement(store: Store, *, run_ids: Sequence[str] | None = None,
                    iteration_ids: Sequence[str] | None = None) -> list[Agreement]:
    """Per grader, agreement between its pass/fail and the human verdicts of reviewed samples.

    Model graders (score_model, label_model, or a multi grader containing one) come first; the
    others are included because a disagreement there usually means the reference is wrong.
    """
    reviews = {sid: r for sid, r in sample_reviews(store, run_ids=run_ids, iteration_ids=iteration_ids).items()
               if r.verdict}
    if not reviews:
        return []
    ids = list(reviews)
    tables: dict[str, list[int]] = {}
    for grade in store.grades_of_samples(ids):
        human_pass = reviews[grade["sample_id"]].verdict == "pass"
        cell = (0 if grade["passed"] else 2) + (0 if human_pass else 1)
        tables.setdefault(grade["grader"], [0, 0, 0, 0])[cell] += 1
    spec = store.sample_spec(ids[0])
    infos = {g.name: g for g in grader_infos(spec, list(tables))}
    out = []
    for name, (pp, pf, fp, ff) in tables.items():
        n = pp + pf + fp + ff
        info = infos[name]
        out.append(Agreement(grader=name, type=info.type, is_model=info.is_model, n=n, agree=pp + ff,
                             judge_pass_human_pass=pp, judge_pass_human_fail=pf, judge_fail_human_pass=fp,
                             judge_fail_human_fail=ff, rate=(pp + ff) / n if n else math.nan,
                             kappa=cohen_kappa(pp, pf, fp, ff)))
    return sorted(out, key=lambda a: (not a.is_model, a.grader))
