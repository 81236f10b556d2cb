"""`Grader`: the runnable form of a grader config. Every grader type subclasses it."""

from __future__ import annotations

import gc
import traceback
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from typing import Any, ClassVar

from graders.errors import TemplateVariableError
from graders.grade import Grade
from graders.templates import make_sample

#: pass_threshold used when a text_similarity or python config omits it (the platform documents
#: no default); score_model uses the middle of its range instead.
DEFAULT_PASS_THRESHOLD = 0.5


def coerce_sample(sample: Any) -> dict[str, Any]:
    """Accept a ready `sample` dict, a partial one, or a bare output string."""
    if isinstance(sample, str):
        return make_sample(sample)
    if isinstance(sample, dict):
        if "output_text" in sample and "output_json" in sample and "choices" in sample:
            return sample
        full = make_sample(sample.get("output_text") or "", sample.get("output_json"),
                           sample.get("choices"), sample.get("output_tools"), sample.get("output_audio"))
        full.update({k: v for k, v in sample.items() if k not in full or v is not None})
        return full
    raise TypeError(f"a sample must be a dict (see graders.make_sample) or a string, got {type(sample).__name__}")


@contextmanager
def gc_paused() -> Iterator[None]:
    """Pause the cyclic GC around a tight loop that allocates many acyclic objects (Grades and
    their dicts): its generation scans otherwise cost ~40% of a large string_check batch."""
    enabled = gc.isenabled()
    gc.disable()
    try:
        yield
    finally:
        if enabled:
            gc.enable()


class Grader:
    """Grades samples against items. Build one with `graders.build_grader(config)`.

    `grade(sample, item)` returns a `Grade`; `grade_batch(samples, items)` grades many at once
    (model-backed graders batch their model calls). A problem with one sample never raises: it
    is a Grade with `error` set. `close()` releases workers; graders are context managers.
    """

    type: ClassVar[str] = ""

    def __init__(self, config: Any):
        self.config = config
        self.name: str = config.name

    # --- public API --------------------------------------------------------------------------
    def grade(self, sample: Any, item: dict[str, Any] | None = None) -> Grade:
        """Grade one sample (a `make_sample` dict or the output string) against one item."""
        return self.grade_batch([sample], [item if item is not None else {}])[0]

    def grade_batch(self, samples: Sequence[Any], items: Sequence[dict[str, Any]]) -> list[Grade]:
        """Grade `samples[i]` against `items[i]` for every i."""
        if len(samples) != len(items):
            raise ValueError(f"grade_batch: {len(samples)} samples but {len(items)} items")
        prepared = []
        for sample in samples:
            try:
                prepared.append(coerce_sample(sample))
            except TypeError as e:
                prepared.append(e)
        return self._grade_prepared(prepared, list(items))

    def close(self) -> None:
        """Release what the grader holds (worker processes); grading after close restarts them."""

    def __enter__(self) -> Grader:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def __repr__(self) -> str:
        return f"<{type(self).__name__} {self.name!r}>"

    # --- for subclasses ----------------------------------------------------------------------
    def _grade_prepared(self, samples: list[Any], items: list[dict[str, Any]]) -> list[Grade]:
        """Default batch: one `_grade_one` per pair. Model-backed graders override this."""
        return [self._safe_one(s, i) for s, i in zip(samples, items)]

    def _safe_one(self, sample: Any, item: dict[str, Any]) -> Grade:
        if isinstance(sample, Exception):
            return self._failure("sample_parse_error", str(sample))
        try:
            return self._grade_one(sample, item)
        except TemplateVariableError as e:
            return self._failure("invalid_variable_error", str(e))
        except Exception as e:  # a grader bug or an odd value must not crash a run
            return self._failure("other_error", _describe(e))

    def _grade_one(self, sample: dict[str, Any], item: dict[str, Any]) -> Grade:
        raise NotImplementedError

    def _failure(self, error: str, error_details: str, **details: Any) -> Grade:
        return Grade.failure(error, error_details, details={"name": self.name, "type": self.type, **details})


def _describe(e: BaseException) -> str:
    frame = traceback.extract_tb(e.__traceback__)[-1:] if e.__traceback__ else []
    where = f" (at {frame[0].filename.rsplit('/', 1)[-1]}:{frame[0].lineno})" if frame else ""
    return f"{type(e).__name__}: {e}{where}"
