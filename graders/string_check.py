"""`string_check`: eq / ne / like (contains) / ilike (case-insensitive contains), reference §2.1.

Plain comparisons: no trimming, no `%`/`_` wildcards (the platform documents none). Score 1 or 0;
passes iff 1.
"""

from __future__ import annotations

from typing import Any

from graders.base import Grader
from graders.config import StringCheckGraderConfig
from graders.grade import Grade, shorten
from graders.templates import Template


class StringCheckGrader(Grader):
    type = "string_check"

    def __init__(self, config: StringCheckGraderConfig):
        super().__init__(config)
        self.input = Template(config.input)
        self.reference = Template(config.reference)
        self.operation = config.operation
        self._what = "output" if "sample.output_text" in config.input else "input"

    def _grade_one(self, sample: dict[str, Any], item: dict[str, Any]) -> Grade:
        text = self.input.render(item, sample)
        ref = self.reference.render(item, sample)
        op = self.operation
        if op == "eq":
            ok = text == ref
        elif op == "ne":
            ok = text != ref
        elif op == "like":
            ok = ref in text
        else:
            ok = ref.casefold() in text.casefold()
        return Grade(
            score=1.0 if ok else 0.0,
            passed=ok,
            feedback=self._feedback(ok, text, ref),
            details={"name": self.name, "type": self.type, "operation": op, "input": text, "reference": ref},
        )

    def _feedback(self, ok: bool, text: str, ref: str) -> str:
        what, r, t = self._what, shorten(repr(ref)), shorten(repr(text))
        op = self.operation
        if op == "eq":
            return f"{what} equals {r}" if ok else f"expected {what} to equal {r}; got {t}"
        if op == "ne":
            return f"{what} differs from {r}" if ok else f"expected {what} to differ from {r}; it was equal"
        case = " (case-insensitive)" if op == "ilike" else ""
        if ok:
            return f"{what} contains {r}{case}"
        return f"expected {r} to be contained in {what}{case}; it was not (got {t})"
