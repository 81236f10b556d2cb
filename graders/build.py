"""`build_grader`: a config (or a platform-shaped dict) -> a runnable `Grader`."""

from __future__ import annotations

from typing import Any

from graders.base import Grader
from graders.parsing import parse_grader
from graders.registry import TABLE


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
    return TABLE[config.type].build(config, judge=judge, embedder=embedder, sandbox=sandbox)
