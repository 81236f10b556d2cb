"""Flywheel's graders: the hosted platform's grader JSON schema, run locally.

    import graders
    cfg = graders.parse_grader({"type": "string_check", "name": "label", "operation": "ilike",
                                "input": "{{sample.output_text}}", "reference": "{{item.label}}"})
    with graders.build_grader(cfg) as grader:
        grade = grader.grade(graders.make_sample("card_arrival"), {"label": "card_arrival"})
    grade.score, grade.passed, grade.feedback

Usable alone (it never imports flywheel), e.g. as TRL reward functions: `graders.reward_function`.
Heavy imports (sentence-transformers, nltk) happen only when a metric needs them.
"""

from graders.base import DEFAULT_PASS_THRESHOLD, Grader
from graders.build import build_grader
from graders.config import (
    LabelModelGraderConfig,
    MultiGraderConfig,
    PythonGraderConfig,
    ScoreModelGraderConfig,
    StringCheckGraderConfig,
    TextSimilarityGraderConfig,
)
from graders.endpoints import run_grader, validate_grader
from graders.errors import ERROR_KINDS, GraderConfigError, GraderError, TemplateVariableError
from graders.grade import Grade
from graders.judge import JudgeModel
from graders.parsing import load_graders, parse_grader
from graders.python_sandbox import SandboxLimits, SandboxPool, hide_from_sandbox
from graders.registry import GRADER_TYPES, GraderConfig
from graders.reward import reward_function
from graders.templates import make_sample, render_template

__all__ = [
    "DEFAULT_PASS_THRESHOLD",
    "ERROR_KINDS",
    "GRADER_TYPES",
    "Grade",
    "Grader",
    "GraderConfig",
    "GraderConfigError",
    "GraderError",
    "JudgeModel",
    "LabelModelGraderConfig",
    "MultiGraderConfig",
    "PythonGraderConfig",
    "SandboxLimits",
    "SandboxPool",
    "ScoreModelGraderConfig",
    "StringCheckGraderConfig",
    "TemplateVariableError",
    "TextSimilarityGraderConfig",
    "build_grader",
    "hide_from_sandbox",
    "load_graders",
    "make_sample",
    "parse_grader",
    "render_template",
    "reward_function",
    "run_grader",
    "validate_grader",
]
