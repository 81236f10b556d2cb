"""Local counterparts of the platform's `/fine_tuning/alpha/graders/{validate,run}` (reference §3).

`validate_grader(obj)` returns the normalised grader object (or raises GraderConfigError, the
local 400); `run_grader(obj, model_sample, item)` returns the run response shape: `reward`,
`metadata` (with every error flag, false when fine), `sub_rewards`, plus our `feedback`/`passed`.
These are what `flywheel graders validate` / `flywheel graders run` print.
"""

from __future__ import annotations

import time
from typing import Any

from graders.build import build_grader
from graders.parsing import parse_grader
from graders.errors import ERROR_KINDS
from graders.grade import Grade
from graders.templates import make_sample


def validate_grader(obj: Any) -> dict[str, Any]:
    """`{"grader": <normalised grader>}`, as the validate endpoint answers."""
    return {"grader": parse_grader(obj).model_dump(by_alias=True, exclude_none=True, mode="json")}


def run_grader(obj: Any, model_sample: str, item: dict[str, Any] | None = None, *,
               judge: Any = None, **build_options: Any) -> dict[str, Any]:
    """Grade one sample like the run endpoint: `model_sample` fills `sample` (with `output_json`
    when it is valid JSON), `item` fills `item`."""
    config = parse_grader(obj)
    started = time.perf_counter()
    with build_grader(config, judge=judge, **build_options) as grader:
        grade = grader.grade(make_sample(model_sample), item or {})
    return run_response(config, grade, time.perf_counter() - started)


def response_error(response: dict[str, Any]) -> str | None:
    """The error of a run response, as one line (`invalid_variable_error: ...`); None when it graded."""
    errors = (response.get("metadata") or {}).get("errors") or {}
    kind = next((k for k in ERROR_KINDS if errors.get(k) is True), None)
    if kind is None:
        return None
    details = "; ".join(line.strip() for line in str(response.get("error_details") or "").splitlines() if line.strip())
    return f"{kind}: {details}" if details else kind


def run_response(config: Any, grade: Grade, seconds: float = 0.0) -> dict[str, Any]:
    """A Grade in the platform's run-response shape."""
    errors: dict[str, Any] = {kind: grade.error == kind for kind in ERROR_KINDS}
    errors["model_grader_server_error_details"] = (
        grade.error_details if grade.error == "model_grader_server_error" else None)
    errors["python_grader_runtime_error_details"] = (
        grade.error_details if grade.error == "python_grader_runtime_error" else None)
    errors["python_grader_server_error_type"] = (
        "sandbox" if grade.error == "python_grader_server_error" else None)
    sub = dict(grade.details.get("sub_scores", {}))
    return {
        "reward": grade.score,
        "metadata": {
            "name": config.name,
            "type": config.type,
            "execution_time": round(seconds, 6),
            "scores": sub or {config.name: grade.score},
            "token_usage": None,
            "sampled_model_name": getattr(config, "model", None),
            "errors": errors,
        },
        "sub_rewards": sub,
        "model_grader_token_usage_per_model": {},
        "passed": grade.passed,
        "feedback": grade.feedback,
        "error_details": grade.error_details,
    }
