"""`Grade`: what every grader returns for one sample."""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, field
from typing import Any

from graders.errors import ERROR_KINDS


@dataclass(frozen=True)
class Grade:
    """The result of grading one sample.

    `score` is the number the grader produced (0 when it errored), `passed` the pass/fail verdict
    (reference §2.8), `feedback` a short human "why" that prompt search shows a proposer model, and
    `details` whatever helps a reviewer: rendered input and reference, the metric, the judge's raw
    reply, `sub_scores` of a multi grader. A grade that could not be computed has `error` set to one
    of the platform's error kinds (`graders.ERROR_KINDS`) and `error_details` saying what happened.
    """

    score: float
    passed: bool
    feedback: str
    details: dict[str, Any] = field(default_factory=dict)
    error: str | None = None
    error_details: str | None = None

    def __post_init__(self) -> None:
        if self.error is not None and self.error not in ERROR_KINDS:
            raise ValueError(f"unknown grade error kind {self.error!r}; known: {', '.join(ERROR_KINDS)}")

    @classmethod
    def failure(cls, error: str, error_details: str, *, feedback: str | None = None,
                details: dict[str, Any] | None = None) -> Grade:
        """An errored grade: score 0, not passed, `error` set."""
        return cls(
            score=0.0,
            passed=False,
            feedback=feedback or f"{error}: {shorten(error_details, 200)}",
            details=dict(details or {}),
            error=error,
            error_details=error_details,
        )

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def passes(score: float, threshold: float) -> bool:
    """The platform's rule: pass iff score >= threshold (reference §2.8)."""
    return not math.isnan(score) and score >= threshold


def shorten(text: Any, width: int = 80) -> str:
    """`text` on one line, cut to `width` characters with an ellipsis."""
    text = " ".join(str(text).split()) if "\n" in str(text) else str(text)
    return text if len(text) <= width else text[: width - 1] + "…"
