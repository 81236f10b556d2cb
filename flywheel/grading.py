"""The eval spec's graders, built once and run as a set.

`GraderSet` parses the spec's grader configs, builds each grader once (judge graders get their
models through `judge_model`, loaded once per reference), grades batches of samples into
store-ready rows, and closes sandboxes and judges when done. The harness, prompt search, capture
and the RFT reward functions all grade through it, so a grade means the same everywhere.

    grader_set = GraderSet(spec.graders)
    rows = grader_set.grade([graders.make_sample("card_arrival")], [{"label": "card_arrival"}])
    grader_set.close()
"""

from __future__ import annotations

from typing import Any

import graders

from flywheel.models import Model, load_model


class GraderSet:
    """The spec's graders, built once per run, with a model resolver for judge graders."""

    def __init__(self, configs: list[dict[str, Any]]):
        self._judges: dict[str, Model] = {}
        self.runners = []
        self.names = []
        for index, raw in enumerate(configs):
            config = graders.parse_grader(raw)
            self.names.append(getattr(config, "name", None) or f"grader_{index}")
            self.runners.append(graders.build_grader(config, judge=self.judge_model))

    def judge_model(self, ref: str) -> Model:
        """The judge model for a grader's `model` string (no scheme means openai:), loaded once."""
        if ref not in self._judges:
            full = ref if ":" in ref and ref.split(":", 1)[0] in ("local", "openai") else f"openai:{ref}"
            self._judges[ref] = load_model(full)
        return self._judges[ref]

    def grade(self, samples: list[dict[str, Any]], items: list[dict[str, Any]]) -> list[list[dict[str, Any]]]:
        """Grades per sample: a list (one per grader) of store-ready dicts. Never raises."""
        per_sample: list[list[dict[str, Any]]] = [[] for _ in samples]
        for name, runner in zip(self.names, self.runners):
            try:
                results = runner.grade_batch(samples, items)
            except Exception as exc:  # noqa: BLE001 - a grader bug is a recorded error, not a crash
                message = f"{type(exc).__name__}: {exc}"
                results = [None] * len(samples)
            for row, grade in zip(per_sample, results):
                if grade is None:
                    row.append({"grader": name, "score": 0.0, "passed": False,
                                "feedback": f"grader raised {message}", "details": {},
                                "error": "other_error", "error_details": message})
                else:
                    row.append({"grader": name, "score": float(grade.score), "passed": bool(grade.passed),
                                "feedback": grade.feedback, "details": grade.details,
                                "error": grade.error, "error_details": grade.error_details})
        return per_sample

    def close(self) -> None:
        for runner in self.runners:
            runner.close()
        for model in self._judges.values():
            model.close()
