"""Errors raised by the graders library, and the platform's per-grade error kinds.

Configuration problems raise (`GraderConfigError`); a problem with one sample never raises:
it becomes a `Grade` whose `error` is one of `ERROR_KINDS`.
"""

from __future__ import annotations

import difflib
from collections.abc import Iterable

#: The error flags of the platform's grader run response (reference §3), in its order.
ERROR_KINDS = (
    "formula_parse_error",
    "invalid_variable_error",
    "model_grader_parse_error",
    "model_grader_refusal_error",
    "model_grader_server_error",
    "other_error",
    "python_grader_runtime_error",
    "python_grader_server_error",
    "sample_parse_error",
    "truncated_observation_error",
    "unresponsive_reward_error",
)


class GraderError(Exception):
    """Base class of every error the graders library raises."""


class GraderConfigError(GraderError, ValueError):
    """A grader config is invalid. `errors` holds `(field path, message)` pairs.

    `str(err)` is one `path: message` line per problem, e.g.
    ``type: unknown grader 'exct'; known: string_check, ... (did you mean 'string_check'?)``.
    """

    def __init__(self, errors: Iterable[tuple[str, str]] | str, *, source: str | None = None):
        if isinstance(errors, str):
            errors = [("", errors)]
        self.errors: list[tuple[str, str]] = list(errors)
        self.source = source
        super().__init__(self._format())

    def _format(self) -> str:
        lines = []
        for path, message in self.errors:
            head = ": ".join(p for p in (self.source, path) if p)
            lines.append(f"{head}: {message}" if head else message)
        return "\n".join(lines)

    def prefixed(self, prefix: str, *, source: str | None = None) -> GraderConfigError:
        """The same errors with `prefix` put before every field path (e.g. ``graders[2]``)."""
        joined = []
        for path, message in self.errors:
            if not prefix:
                joined.append((path, message))
            elif not path:
                joined.append((prefix, message))
            elif path.startswith("["):
                joined.append((prefix + path, message))
            else:
                joined.append((f"{prefix}.{path}", message))
        return GraderConfigError(joined, source=source if source is not None else self.source)


class TemplateVariableError(GraderError, KeyError):
    """A `{{namespace.path}}` template names something the item or sample does not have."""

    def __init__(self, variable: str, reason: str):
        self.variable = variable
        self.reason = reason
        super().__init__(variable)

    def __str__(self) -> str:
        return f"{{{{{self.variable}}}}}: {self.reason}"


def did_you_mean(word: str, choices: Iterable[str], aliases: dict[str, str] | None = None) -> str:
    """`" (did you mean 'x'?)"` for the closest choice (or alias target), else ``""``."""
    choices = list(choices)
    pool = {c: c for c in choices}
    pool.update(aliases or {})
    match = difflib.get_close_matches(str(word).lower(), list(pool), n=1, cutoff=0.6)
    return f" (did you mean {pool[match[0]]!r}?)" if match else ""
