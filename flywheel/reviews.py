"""Human reviews of samples, and the training data the next turn of the wheel builds from them.

A review is an append-only row about one sample: a pass/fail `verdict` that overrides the graders,
a `correction` (the output it should have been), a `note`, and, when two outputs of the same item
were shown side by side, a `preference` between the sample and `other_sample_id` ('sample',
'other' or 'tie'). For each field the latest review wins, so a reviewer can change their mind.

    add_review(store, 42, verdict="fail", correction="card_arrival", reviewer="ana")
    add_review(store, 42, other_sample_id=17, preference="other")
    review_sft_rows(store, run_ids=[run_id])    # [{"messages": [..., {"role": "assistant", ...}]}]
    review_dpo_pairs(store, run_ids=[run_id])   # [{"input": {...}, "preferred_output": [...], ...}]

Both training functions return rows in the hosted platform's JSONL formats (chat format for SFT,
preference format for DPO), so they can be written out as they are.
"""

from __future__ import annotations

import json
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
        ids += [it["id"] for it in store.iterations(store.get_run(run_id)["id"])]
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


def _messages(sample: dict[str, Any]) -> list[dict[str, Any]] | None:
    messages = json.loads(sample.get("input_json") or "null")
    return messages if isinstance(messages, list) and messages else None


def review_sft_rows(store: Store, *, run_ids: Sequence[str] | None = None,
                    iteration_ids: Sequence[str] | None = None, include_approved: bool = False) -> list[dict[str, Any]]:
    """Reviewer corrections as SFT rows in the platform chat format.

    Each row is the sample's rendered input messages followed by the corrected assistant message:
    `{"messages": [{"role": "system", ...}, {"role": "user", ...}, {"role": "assistant", "content": CORRECTION}]}`.
    With `include_approved`, outputs a reviewer marked `pass` (and did not correct) are added too.
    Samples whose input could not be rendered are skipped.
    """
    reviews = sample_reviews(store, run_ids=run_ids, iteration_ids=iteration_ids)
    samples = store.samples_by_id(reviews)
    rows, seen = [], set()
    for sample_id, review in reviews.items():
        sample = samples[sample_id]
        messages = _messages(sample)
        if messages is None:
            continue
        if review.correction is not None:
            target = review.correction
        elif include_approved and review.verdict == "pass" and sample.get("output_text"):
            target = sample["output_text"]
        else:
            continue
        row = {"messages": [*messages, {"role": "assistant", "content": target}]}
        fingerprint = json.dumps(row, sort_keys=True)
        if fingerprint not in seen:
            seen.add(fingerprint)
            rows.append(row)
    return rows


def _dpo_row(messages: list[dict[str, Any]], preferred: str, rejected: str) -> dict[str, Any]:
    return {"input": {"messages": messages},
            "preferred_output": [{"role": "assistant", "content": preferred}],
            "non_preferred_output": [{"role": "assistant", "content": rejected}]}


def review_dpo_pairs(store: Store, *, run_ids: Sequence[str] | None = None,
                     iteration_ids: Sequence[str] | None = None, include_corrections: bool = True) -> list[dict[str, Any]]:
    """Reviewer preferences as DPO pairs in the platform preference format.

    `{"input": {"messages": [...]}, "preferred_output": [{"role": "assistant", "content": ...}],
    "non_preferred_output": [{"role": "assistant", "content": ...}]}`. The input is the rendered
    prompt of the preferred sample (both outputs answer the same item; their prompts may differ
    when the two iterations used different prompts). Ties and identical outputs give no pair.
    With `include_corrections`, a correction also yields a pair: the correction preferred over the
    sample's own output.
    """
    prefs = preferences(store, run_ids=run_ids, iteration_ids=iteration_ids)
    reviews = sample_reviews(store, run_ids=run_ids, iteration_ids=iteration_ids) if include_corrections else {}
    ids = [i for p in prefs if not p.tie for i in (p.chosen, p.rejected)] + list(reviews)
    samples = store.samples_by_id(ids)
    rows, seen = [], set()

    def add(messages: list[dict[str, Any]] | None, preferred: str | None, rejected: str | None) -> None:
        if messages is None or preferred is None or rejected is None or preferred == rejected:
            return
        row = _dpo_row(messages, preferred, rejected)
        fingerprint = json.dumps(row, sort_keys=True)
        if fingerprint not in seen:
            seen.add(fingerprint)
            rows.append(row)

    for p in prefs:
        if p.tie:
            continue
        chosen, rejected = samples[p.chosen], samples[p.rejected]
        add(_messages(chosen), chosen.get("output_text"), rejected.get("output_text"))
    for sample_id, review in reviews.items():
        if review.correction is not None:
            sample = samples[sample_id]
            add(_messages(sample), review.correction, sample.get("output_text"))
    return rows


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
