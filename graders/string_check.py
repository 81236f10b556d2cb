"""`string_check`: eq / ne / like (contains) / ilike (case-insensitive contains), reference §2.1.

Plain comparisons: no trimming, no `%`/`_` wildcards (the platform documents none). Score 1 or 0;
passes iff 1.
"""

from __future__ import annotations

from typing import Any

from graders.base import Grader, gc_paused
from graders.config import StringCheckGraderConfig
from graders.grade import Grade, shorten
from graders.errors import TemplateVariableError
from graders.templates import Template


def _quote(text: str) -> str:
    quoted = repr(text)
    return quoted if len(quoted) <= 80 and "\n" not in text else shorten(quoted)


class StringCheckGrader(Grader):
    type = "string_check"

    def __init__(self, config: StringCheckGraderConfig):
        super().__init__(config)
        self.input = Template(config.input)
        self.reference = Template(config.reference)
        self.operation = config.operation
        self._what = "output" if "sample.output_text" in config.input else "input"
        self._compare = {"eq": self._eq, "ne": self._ne, "like": self._like, "ilike": self._ilike}[self.operation]

    def _grade_prepared(self, samples: list[Any], items: list[dict[str, Any]]) -> list[Grade]:
        # the hot loop of the cheapest grader: no per-sample wrapper calls
        with gc_paused():
            return self._loop(samples, items)

    def _loop(self, samples: list[Any], items: list[dict[str, Any]]) -> list[Grade]:
        render_input, render_reference, compare = self.input.render, self.reference.render, self._compare
        out = []
        for sample, item in zip(samples, items):
            if isinstance(sample, Exception):
                out.append(self._safe_one(sample, item))
                continue
            try:
                text = render_input(item, sample)
                ref = render_reference(item, sample)
            except TemplateVariableError as e:
                out.append(self._failure("invalid_variable_error", str(e)))
                continue
            ok = compare(text, ref)
            out.append(Grade(1.0 if ok else 0.0, ok, self._feedback(ok, text, ref),
                             {"name": self.name, "type": self.type, "operation": self.operation,
                              "input": text, "reference": ref}))
        return out

    def _grade_one(self, sample: dict[str, Any], item: dict[str, Any]) -> Grade:
        return self._grade_prepared([sample], [item])[0]

    @staticmethod
    def _eq(text: str, ref: str) -> bool:
        return text == ref

    @staticmethod
    def _ne(text: str, ref: str) -> bool:
        return text != ref

    @staticmethod
    def _like(text: str, ref: str) -> bool:
        return ref in text

    @staticmethod
    def _ilike(text: str, ref: str) -> bool:
        return ref.casefold() in text.casefold()

    def _feedback(self, ok: bool, text: str, ref: str) -> str:
        what, r, t = self._what, _quote(ref), _quote(text)
        op = self.operation
        if op == "eq":
            return f"{what} equals {r}" if ok else f"expected {what} to equal {r}; got {t}"
        if op == "ne":
            return f"{what} differs from {r}" if ok else f"expected {what} to differ from {r}; it was equal"
        case = " (case-insensitive)" if op == "ilike" else ""
        if ok:
            return f"{what} contains {r}{case}"
        return f"expected {r} to be contained in {what}{case}; it was not (got {t})"
