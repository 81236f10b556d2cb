"""`build_grader`: a config (or a platform-shaped dict) -> a runnable `Grader`."""

from __future__ import annotations

from typing import Any

from graders.base import Grader
from graders.config import parse_grader


def build_grader(
    config: Any,
    *,
    judge: Any = None,
    embedder: Any = None,
    sandbox: Any = None,
) -> Grader:
    """Build the grader for `config` (a config model or a dict in the platform's JSON shape).

    judge:    for score_model / label_model: a callable mapping the config's `model` string to a
              `JudgeModel` (e.g. `flywheel.models.load_model`), or one JudgeModel for all.
    embedder: for the cosine metric: an object with `embed(texts) -> array`; default all-MiniLM-L6-v2.
    sandbox:  for python graders: `SandboxLimits` or a shared `SandboxPool`.

    >>> g = build_grader({"type": "string_check", "name": "exact", "input": "{{sample.output_text}}",
    ...                   "reference": "{{item.label}}", "operation": "eq"})
    >>> g.grade("refund", {"label": "refund"}).score
    1.0
    """
    config = parse_grader(config)
    kind = config.type
    if kind == "string_check":
        from graders.string_check import StringCheckGrader

        return StringCheckGrader(config)
    if kind == "text_similarity":
        from graders.text_similarity import TextSimilarityGrader

        return TextSimilarityGrader(config, embedder=embedder)
    if kind == "score_model":
        from graders.model_graders import ScoreModelGrader

        return ScoreModelGrader(config, judge)
    if kind == "label_model":
        from graders.model_graders import LabelModelGrader

        return LabelModelGrader(config, judge)
    if kind == "python":
        from graders.python_sandbox import PythonGrader

        return PythonGrader(config, sandbox=sandbox)
    if kind in ("pii", "blocklist"):  # Flywheel extensions: safety checks
        from graders.safety import BlocklistGrader, PIIGrader

        return PIIGrader(config) if kind == "pii" else BlocklistGrader(config)
    if kind == "multi":
        from graders.multi import MultiGrader

        subs = {key: build_grader(sub, judge=judge, embedder=embedder, sandbox=sandbox)
                for key, sub in config.graders.items()}
        return MultiGrader(config, subs)
    raise AssertionError(f"unhandled grader type {kind!r}")  # parse_grader only returns known types
