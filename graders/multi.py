"""`multi`: named sub-graders combined by a `calculate_output` formula (reference §2.6).

Every sub-grader grades the whole batch (so judge and cosine sub-graders still batch their model
calls); the formula (graders.formula, a safe parser) then combines the sub-scores per sample.
A sub-grader error makes the multi grade an error of the same kind; a formula that cannot be
computed (division by zero, log of 0, ...) is a `formula_parse_error`. `details["sub_scores"]`
holds every sub-score (the platform's `sub_rewards`). The multi grade passes iff every sub-grade
passed (the platform defines no pass rule for multi: it is used as an RFT reward).
"""

from __future__ import annotations

from typing import Any

from graders.base import Grader
from graders.config import MultiGraderConfig
from graders.formula import Formula, FormulaError
from graders.grade import Grade, shorten


class MultiGrader(Grader):
    type = "multi"

    def __init__(self, config: MultiGraderConfig, sub_graders: dict[str, Grader]):
        super().__init__(config)
        self.graders = sub_graders
        self.formula = Formula.parse(config.calculate_output)

    def _grade_prepared(self, samples: list[Any], items: list[dict[str, Any]]) -> list[Grade]:
        columns = {key: grader._grade_prepared(samples, items) for key, grader in self.graders.items()}
        return [self._combine({key: col[i] for key, col in columns.items()}) for i in range(len(samples))]

    def _grade_one(self, sample: dict[str, Any], item: dict[str, Any]) -> Grade:
        return self._grade_prepared([sample], [item])[0]

    def _combine(self, subs: dict[str, Grade]) -> Grade:
        details: dict[str, Any] = {
            "name": self.name, "type": self.type, "calculate_output": self.formula.text,
            "sub_scores": {k: g.score for k, g in subs.items()},
            "sub_passed": {k: g.passed for k, g in subs.items()},
            "sub_feedback": {k: g.feedback for k, g in subs.items()},
        }
        errors = {k: g for k, g in subs.items() if g.error}
        if errors:
            details["sub_errors"] = {k: g.error for k, g in errors.items()}
            key, first = next(iter(errors.items()))
            return Grade.failure(first.error, f"{key}: {first.error_details}",
                                 feedback=f"sub-grader {key!r} failed: {first.feedback}", details=details)
        try:
            score = self.formula.evaluate(details["sub_scores"])
        except FormulaError as e:
            return Grade.failure("formula_parse_error", f"{self.formula.text}: {e}", details=details)
        ok = all(g.passed for g in subs.values())
        parts = ", ".join(f"{k}={g.score:g}" for k, g in subs.items())
        failing = [f"{k}: {g.feedback}" for k, g in subs.items() if not g.passed]
        why = f"; {shorten(failing[0], 160)}" if failing else ""
        feedback = f"{self.formula.text} = {score:g} with {parts}{why}"
        return Grade(score=score, passed=ok, feedback=feedback, details=details)

    def close(self) -> None:
        for grader in self.graders.values():
            grader.close()
