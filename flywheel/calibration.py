"""Judge quality, measured: graders' verdicts against reference labels (`flywheel graders calibrate`).

    rows = read_rows("labelled.jsonl")           # each row: the output to grade + its reference
    results = calibrate(graders.load_graders("graders.json"), rows, judge=resolver, source="labelled.jsonl")

Per grader: accuracy and Cohen's kappa of pass/fail against the reference (flywheel.reviews'
`cohen_kappa`, the statistic the review server shows for judge-vs-human agreement); for
label_model also of the label itself (multi-class kappa) with the confusion table; for
score_model a calibration table: the judge's scores in equal-width bins of its range with the
reference pass rate per bin (a calibrated judge's pass rate rises with its score).

A grade that is an error counts as a fail and as the label `<error>`: a judge that cannot answer
is not excused from agreeing.
"""

from __future__ import annotations

import math
import time
from collections import Counter
from dataclasses import asdict, dataclass, field
from typing import Any

import graders
from flywheel.errors import DataError
from flywheel.reviews import cohen_kappa

ERROR_LABEL = "<error>"
TRUE_WORDS = {"true", "pass", "passed", "1"}
FALSE_WORDS = {"false", "fail", "failed", "0"}
BINS = 5


@dataclass
class ScoreBin:
    low: float
    high: float
    n: int
    mean_score: float
    reference_pass_rate: float


@dataclass
class Calibration:
    grader: str
    type: str
    n: int
    errors: int
    pass_accuracy: float
    pass_kappa: float
    label_accuracy: float | None = None
    label_kappa: float | None = None
    confusion: dict[str, dict[str, int]] = field(default_factory=dict)  # reference -> judged -> count
    bins: list[ScoreBin] = field(default_factory=list)
    auc: float | None = None  # score_model: P(a passing reference outscores a failing one)
    constrained: bool = False
    wall_s: float = 0.0

    @property
    def grades_per_s(self) -> float:
        return self.n / self.wall_s if self.wall_s > 0 else math.nan

    def to_dict(self) -> dict[str, Any]:
        data = asdict(self)
        data["grades_per_s"] = self.grades_per_s
        return data


def multiclass_kappa(pairs: list[tuple[str, str]]) -> float:
    """Cohen's kappa of (reference, judged) label pairs over any number of classes; nan if undefined."""
    n = len(pairs)
    if n == 0:
        return math.nan
    observed = sum(a == b for a, b in pairs) / n
    ref, got = Counter(a for a, _ in pairs), Counter(b for _, b in pairs)
    expected = sum(ref[c] * got[c] for c in ref) / (n * n)
    if expected >= 1:
        return 1.0 if observed == 1 else math.nan
    return (observed - expected) / (1 - expected)


def _reference_passes(value: Any, *, labels: list[str], passing_labels: set[str], passing: set[str],
                      threshold: float | None, where: str) -> bool:
    if passing:
        return str(value) in passing
    if labels and isinstance(value, str) and value in labels:
        return value in passing_labels
    if isinstance(value, bool):
        return value
    text = str(value).strip().lower()
    if threshold is not None and not isinstance(value, bool):
        try:
            return float(text) >= threshold
        except ValueError:
            pass
    if text in TRUE_WORDS:
        return True
    if text in FALSE_WORDS:
        return False
    hint = f"one of the labels ({', '.join(labels)}), " if labels else ("a number, " if threshold is not None else "")
    raise DataError(f"{where}: reference {value!r} is not {hint}true/false or pass/fail "
                    "(use --passing VALUE to say which references count as a pass)")


def calibrate(configs: list[Any], rows: list[tuple[int, dict[str, Any]]], *, judge: Any,
              output_field: str = "output", label_field: str = "label", passing: list[str] | None = None,
              source: str = "<data>") -> list[Calibration]:
    """Grade every row's `output_field` with each grader; compare with its `label_field`."""
    for line, row in rows:
        for name in (output_field, label_field):
            if row.get(name) in (None, ""):
                raise DataError(f"{source}:{line}: no {name!r} field (fields: {', '.join(sorted(row))})")
    samples = [row[output_field] if isinstance(row[output_field], str) else str(row[output_field])
               for _, row in rows]
    items = [row for _, row in rows]
    out = []
    for config in configs:
        with graders.build_grader(config, judge=judge) as grader:
            labels = list(getattr(grader, "labels", []) or [])
            passing_labels = set(getattr(grader, "passing", set()) or set())
            threshold = getattr(grader, "threshold", None)
            started = time.perf_counter()
            grades = grader.grade_batch(samples, items)
            wall = time.perf_counter() - started
        refs = [_reference_passes(row[label_field], labels=labels, passing_labels=passing_labels,
                                  passing=set(passing or []), threshold=threshold, where=f"{source}:{line}")
                for line, row in rows]
        judged = [bool(g.passed) and g.error is None for g in grades]
        pp = sum(j and r for j, r in zip(judged, refs))
        pf = sum(j and not r for j, r in zip(judged, refs))
        fp = sum(r and not j for j, r in zip(judged, refs))
        ff = sum(not j and not r for j, r in zip(judged, refs))
        result = Calibration(
            grader=grader.name, type=grader.type, n=len(grades), errors=sum(g.error is not None for g in grades),
            pass_accuracy=(pp + ff) / len(grades), pass_kappa=cohen_kappa(pp, pf, fp, ff),
            constrained=any(g.details.get("constrained") for g in grades), wall_s=wall)
        if labels and all(str(row[label_field]) in labels for _, row in rows):
            pairs = [(str(row[label_field]), g.details.get("label") if g.error is None else ERROR_LABEL)
                     for (_, row), g in zip(rows, grades)]
            result.label_accuracy = sum(a == b for a, b in pairs) / len(pairs)
            result.label_kappa = multiclass_kappa(pairs)
            for ref, got in pairs:
                result.confusion.setdefault(ref, {}).setdefault(got, 0)
                result.confusion[ref][got] += 1
        if grader.type == "score_model":
            result.bins = score_bins(grader.low, grader.high, [g.score for g in grades], refs,
                                     [g.error is None for g in grades])
            result.auc = rank_auc([g.score for g in grades], refs)
        out.append(result)
    return out


def score_bins(low: float, high: float, scores: list[float], refs: list[bool], ok: list[bool],
               bins: int = BINS) -> list[ScoreBin]:
    """The calibration table: answered grades in equal-width bins of [low, high]."""
    width = (high - low) / bins
    table = []
    for b in range(bins):
        lo, hi = low + b * width, low + (b + 1) * width
        inside = [(s, r) for s, r, good in zip(scores, refs, ok)
                  if good and (lo <= s < hi or (b == bins - 1 and s == hi))]
        table.append(ScoreBin(
            low=lo, high=hi, n=len(inside),
            mean_score=sum(s for s, _ in inside) / len(inside) if inside else math.nan,
            reference_pass_rate=sum(r for _, r in inside) / len(inside) if inside else math.nan))
    return table


def rank_auc(scores: list[float], refs: list[bool]) -> float:
    """Area under the ROC curve of scores against reference pass/fail (ties count half); nan if one class."""
    pos = [s for s, r in zip(scores, refs) if r]
    neg = [s for s, r in zip(scores, refs) if not r]
    if not pos or not neg:
        return math.nan
    wins = sum((p > n) + 0.5 * (p == n) for p in pos for n in neg)
    return wins / (len(pos) * len(neg))


def save_calibrations(store: Any, results: list[Calibration], configs: list[Any], *, data_path: str,
                      judge: str | None = None) -> list[int]:
    """Store results in `judge_calibrations` (reports show the newest per grader); returns row ids."""
    import hashlib
    import json
    from pathlib import Path

    try:
        data_hash = hashlib.sha256(Path(data_path).read_bytes()).hexdigest()[:16]
    except OSError:
        data_hash = None
    ids = []
    for result, config in zip(results, configs):
        raw = config.model_dump(by_alias=True, exclude_none=True) if hasattr(config, "model_dump") else dict(config)
        ids.append(store.save_calibration({
            "grader": result.grader, "type": result.type, "judge": judge or raw.get("model"),
            "config_json": json.dumps(raw), "data_path": str(data_path), "data_hash": data_hash, "n": result.n,
            "errors": result.errors, "pass_accuracy": result.pass_accuracy, "pass_kappa": _finite(result.pass_kappa),
            "label_accuracy": result.label_accuracy, "label_kappa": _finite(result.label_kappa),
            "auc": _finite(result.auc), "constrained": int(result.constrained),
            "result_json": json.dumps(result.to_dict(), default=str)}))
    return ids


def _finite(value: float | None) -> float | None:
    return None if value is None or value != value else value


def format_calibration(result: Calibration) -> str:
    """A calibration as the text `flywheel graders calibrate` prints."""
    lines = [f"{result.grader} ({result.type}{', constrained' if result.constrained else ''}): "
             f"n={result.n} errors={result.errors} pass/fail accuracy {result.pass_accuracy:.3f} "
             f"kappa {result.pass_kappa:.3f}  ({result.grades_per_s:.2f} grades/s)"]
    if result.label_accuracy is not None:
        lines.append(f"  labels: accuracy {result.label_accuracy:.3f} kappa {result.label_kappa:.3f}")
        judged = sorted({g for row in result.confusion.values() for g in row})
        lines.append("  reference \\ judged  " + "  ".join(f"{g:>10}" for g in judged))
        for ref, row in sorted(result.confusion.items()):
            lines.append(f"  {ref:>19}  " + "  ".join(f"{row.get(g, 0):>10}" for g in judged))
    if result.bins:
        lines.append(f"  ranking: AUC {result.auc:.3f} (0.5 = chance)")
        lines.append("  score bin        n  mean score  reference pass rate")
        for b in result.bins:
            mean = f"{b.mean_score:10.2f}" if b.n else f"{'-':>10}"
            rate = f"{b.reference_pass_rate:19.2f}" if b.n else f"{'-':>19}"
            lines.append(f"  [{b.low:5.3g}, {b.high:5.3g}]  {b.n:4d}  {mean}  {rate}")
    return "\n".join(lines)
