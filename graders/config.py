"""Grader configs: the platform's grader JSON schema (reference §2) as pydantic models.

One config class per grader type; the table of types, their unions and `CONFIG_CLASSES` live in
graders/registry.py, and reading objects and files (`parse_grader`, `load_graders`) in graders/parsing.py.
Dumping with `cfg.model_dump(by_alias=True, exclude_none=True)` gives the platform's field names
back, so a config round-trips.
"""

from __future__ import annotations

import ast
from typing import Annotated, Any, Literal, Union

from pydantic import AliasChoices, BaseModel, ConfigDict, Field, field_validator, model_validator

from graders.errors import GraderConfigError, TemplateVariableError
from graders.formula import Formula, FormulaError
from graders.pii import check_entities
from graders.templates import template_variables

STRING_CHECK_OPERATIONS = ("eq", "ne", "like", "ilike")
TEXT_SIMILARITY_METRICS = (
    "cosine", "fuzzy_match", "bleu", "gleu", "meteor",
    "rouge_1", "rouge_2", "rouge_3", "rouge_4", "rouge_5", "rouge_l",
)
MAX_PYTHON_SOURCE_BYTES = 256 * 1024

class _Config(BaseModel):
    model_config = ConfigDict(extra="forbid", populate_by_name=True, frozen=True)

    def dump(self) -> dict[str, Any]:
        """The platform JSON shape: `model_dump(by_alias=True, exclude_none=True)`."""
        return self.model_dump(by_alias=True, exclude_none=True, mode="json")


def _check_template(value: str) -> str:
    try:
        template_variables(value)
    except TemplateVariableError as e:
        raise ValueError(f"template {e}") from None
    return value


# --- messages for model graders -------------------------------------------------------------

class InputText(_Config):
    type: Literal["input_text"] = Field(description="A text part written by the user/system.")
    text: str = Field(description="The text; may contain {{item.x}} / {{sample.x}} templates.")


class OutputText(_Config):
    type: Literal["output_text"] = Field(description="A text part written by the assistant.")
    text: str = Field(description="The text; may contain templates.")


class InputImage(_Config):
    type: Literal["input_image"] = Field(description="An image part.")
    image_url: str = Field(description="Image URL or data URL; may contain templates.")
    detail: Literal["high", "low", "auto"] | None = Field(None, description="Image detail level.")


class InputAudioData(_Config):
    data: str = Field(description="Base64 audio; may contain templates.")
    format: Literal["mp3", "wav"] = Field(description="Audio encoding.")


class InputAudio(_Config):
    type: Literal["input_audio"] = Field(description="An audio part.")
    input_audio: InputAudioData = Field(description="The audio payload.")


ContentPart = Annotated[Union[InputText, OutputText, InputImage, InputAudio], Field(discriminator="type")]


class Message(_Config):
    """One templated message of a model grader's `input`."""

    role: Literal["user", "assistant", "system", "developer"] = Field(description="Who speaks.")
    content: str | ContentPart | list[ContentPart] = Field(
        description="A string, one content part, or a list of parts; text may contain templates."
    )
    type: Literal["message"] | None = Field(None, description="Always 'message' when given.")

    @field_validator("content")
    @classmethod
    def _templates(cls, value: Any) -> Any:
        parts = value if isinstance(value, list) else [value]
        for part in parts:
            if isinstance(part, str):
                _check_template(part)
            elif isinstance(part, (InputText, OutputText)):
                _check_template(part.text)
        return value


class SamplingParams(_Config):
    """Sampling settings for the judge model (score_model; tolerated on label_model)."""

    max_completions_tokens: int | None = Field(
        None, ge=1, description="Most tokens the judge may write (the platform spells it with an extra 's'; "
        "'max_completion_tokens' is accepted too).",
        validation_alias=AliasChoices("max_completions_tokens", "max_completion_tokens"),
    )
    reasoning_effort: Literal["none", "minimal", "low", "medium", "high", "xhigh", "max"] | None = Field(
        None, description="Reasoning effort for reasoning judges; ignored by local models."
    )
    seed: int | None = Field(None, description="Sampling seed.")
    temperature: float | None = Field(None, ge=0, description="Sampling temperature (default 0: greedy).")
    top_p: float | None = Field(None, gt=0, le=1, description="Nucleus sampling mass; ignored by judges "
                                "whose chat() has no top_p.")


# --- grader configs -------------------------------------------------------------------------

class StringCheckGraderConfig(_Config):
    """Compare `input` with `reference`: eq, ne, like (contains), ilike (case-insensitive contains)."""

    type: Literal["string_check"] = Field(description="The grader type.")
    name: str = Field(min_length=1, description="The grader's name (stored with its grades).")
    input: str = Field(description="Templated text to check, usually '{{sample.output_text}}'.")
    reference: str = Field(description="Templated text to compare against, e.g. '{{item.label}}'.")
    operation: Literal["eq", "ne", "like", "ilike"] = Field(
        description="eq: equal; ne: not equal; like: input contains reference; ilike: same, case-insensitive."
    )

    @field_validator("operation", mode="before")
    @classmethod
    def _neq(cls, value: Any) -> Any:
        return "ne" if value == "neq" else value  # the platform guide misspells 'ne' as 'neq'

    _t = field_validator("input", "reference")(classmethod(lambda cls, v: _check_template(v)))


class TextSimilarityGraderConfig(_Config):
    """Score `input` against `reference` with a text metric in [0, 1]."""

    type: Literal["text_similarity"] = Field(description="The grader type.")
    name: str = Field(min_length=1, description="The grader's name (stored with its grades).")
    input: str = Field(description="Templated text to grade, usually '{{sample.output_text}}'.")
    reference: str = Field(description="Templated reference text.")
    evaluation_metric: Literal[
        "cosine", "fuzzy_match", "bleu", "gleu", "meteor",
        "rouge_1", "rouge_2", "rouge_3", "rouge_4", "rouge_5", "rouge_l",
    ] = Field(description="The metric; see docs/graders.md for how each is computed.")
    pass_threshold: float | None = Field(
        None, description="Pass iff score >= pass_threshold (required by the platform's evals; 0.5 when omitted)."
    )

    _t = field_validator("input", "reference")(classmethod(lambda cls, v: _check_template(v)))


class ScoreModelGraderConfig(_Config):
    """A judge model gives a number, clipped to `range`."""

    type: Literal["score_model"] = Field(description="The grader type.")
    name: str = Field(min_length=1, description="The grader's name (stored with its grades).")
    model: str = Field(description="The judge model reference, resolved by the caller (e.g. 'local:smollm2').")
    input: list[Message] = Field(min_length=1, description="Templated messages sent to the judge.")
    range: list[float] | None = Field(
        None, description="[min, max] of the score (default [0, 1]); the judge's number is clipped to it."
    )
    sampling_params: SamplingParams | None = Field(None, description="Judge sampling settings.")
    pass_threshold: float | None = Field(
        None, description="Pass iff score >= pass_threshold (the middle of `range` when omitted)."
    )

    @field_validator("range")
    @classmethod
    def _range(cls, value: list[float] | None) -> list[float] | None:
        if value is not None and (len(value) != 2 or not value[0] < value[1]):
            raise ValueError(f"must be [min, max] with min < max, got {value}")
        return value

    @property
    def score_range(self) -> tuple[float, float]:
        return (self.range[0], self.range[1]) if self.range else (0.0, 1.0)


class LabelModelGraderConfig(_Config):
    """A judge model picks one of `labels`; the grade passes if it is in `passing_labels`."""

    type: Literal["label_model"] = Field(description="The grader type.")
    name: str = Field(min_length=1, description="The grader's name (stored with its grades).")
    model: str = Field(description="The judge model reference, resolved by the caller.")
    input: list[Message] = Field(min_length=1, description="Templated messages sent to the judge.")
    labels: list[str] = Field(min_length=1, description="The labels the judge may answer with.")
    passing_labels: list[str] = Field(min_length=1, description="Labels that pass; a subset of `labels`.")
    sampling_params: SamplingParams | None = Field(
        None, description="Tolerated (the platform guide shows it; its SDK type does not have it)."
    )

    @model_validator(mode="after")
    def _subset(self) -> LabelModelGraderConfig:
        extra = [label for label in self.passing_labels if label not in self.labels]
        if extra:
            raise ValueError(f"passing_labels: must be a subset of labels; not in labels: {', '.join(map(repr, extra))}")
        if len(set(self.labels)) != len(self.labels):
            raise ValueError("labels: must be distinct")
        return self


class PythonGraderConfig(_Config):
    """User code `grade(sample, item) -> float`, run in a sandboxed worker process."""

    type: Literal["python"] = Field(description="The grader type.")
    name: str = Field(min_length=1, description="The grader's name (stored with its grades).")
    source: str = Field(description="Python source defining grade(sample, item) -> float (< 256 kB).")
    image_tag: str | None = Field(None, description="The platform's sandbox image tag; recorded, not used.")
    pass_threshold: float | None = Field(None, description="Pass iff score >= pass_threshold (0.5 when omitted).")

    @field_validator("source")
    @classmethod
    def _source(cls, value: str) -> str:
        size = len(value.encode("utf-8"))
        if size >= MAX_PYTHON_SOURCE_BYTES:
            raise ValueError(f"is {size} bytes; the limit is {MAX_PYTHON_SOURCE_BYTES} (256 kB)")
        try:
            compile(value, "<grader source>", "exec", dont_inherit=True)
        except SyntaxError as e:
            raise ValueError(f"is not valid Python: line {e.lineno}: {e.msg}") from None
        if not _defines_grade(ast.parse(value).body):
            raise ValueError("defines no top-level grade(sample, item) function")
        return value


def _defines_grade(body: list[ast.stmt]) -> bool:
    """Whether module-level code binds the name `grade` (a def, an assignment or an import),
    looking into top-level if/try/with blocks but not into functions or classes."""
    for node in body:
        if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef)) and node.name == "grade":
            return True
        if isinstance(node, (ast.Assign, ast.AnnAssign, ast.AugAssign)):
            targets = node.targets if isinstance(node, ast.Assign) else [node.target]
            if any(isinstance(n, ast.Name) and n.id == "grade" for t in targets for n in ast.walk(t)):
                return True
        if isinstance(node, (ast.Import, ast.ImportFrom)):
            if any((alias.asname or alias.name.split(".")[0]) == "grade" for alias in node.names):
                return True
        if isinstance(node, ast.ImportFrom) and any(alias.name == "*" for alias in node.names):
            return True  # cannot tell statically; the worker reports a missing grade at run time
        blocks = [getattr(node, name, None) or [] for name in ("body", "orelse", "finalbody")]
        blocks += [h.body for h in getattr(node, "handlers", [])]
        if isinstance(node, (ast.If, ast.Try, ast.With, ast.For, ast.While)) and any(_defines_grade(b) for b in blocks):
            return True
    return False


# --- Flywheel extensions of the platform schema: safety checks (graders/safety.py) ----------------

class PIIGraderConfig(_Config):
    """Flywheel extension: fails when `input` (the output) holds PII that `reference` (what the model
    was given) does not — a leak. Detection: graders.pii (Presidio pattern recognisers)."""

    type: Literal["pii"] = Field(description="The grader type (a Flywheel extension, not a platform type).")
    name: str = Field(description="The grader's name.")
    input: str = Field("{{sample.output_text}}", description="Templated text checked for PII (the output).")
    reference: str | None = Field(
        None, description="Templated text the model was given (e.g. '{{item.question}}'); PII also found "
        "there is not a leak. Omitted: any PII in the output fails.")
    entities: list[str] | None = Field(None, description="Entity kinds checked (default: graders.pii.DEFAULT_ENTITIES).")
    min_score: float = Field(0.35, ge=0, le=1, description="Least detector confidence that counts.")

    _t = field_validator("input", "reference")(classmethod(lambda cls, v: v if v is None else _check_template(v)))

    @field_validator("entities")
    @classmethod
    def _entities(cls, value: list[str] | None) -> list[str] | None:
        return None if value is None else list(check_entities(value))


class BlocklistGraderConfig(_Config):
    """Flywheel extension: fails when `input` contains a blocked term or matches a blocked regex."""

    type: Literal["blocklist"] = Field(description="The grader type (a Flywheel extension, not a platform type).")
    name: str = Field(description="The grader's name.")
    input: str = Field("{{sample.output_text}}", description="Templated text to check.")
    terms: list[str] = Field(default_factory=list, description="Blocked words or phrases (whole words).")
    patterns: list[str] = Field(default_factory=list, description="Blocked regular expressions (Python syntax).")
    case_sensitive: bool = Field(False, description="Match terms and patterns case-sensitively.")

    _t = field_validator("input")(classmethod(lambda cls, v: _check_template(v)))

    @field_validator("patterns")
    @classmethod
    def _patterns(cls, value: list[str]) -> list[str]:
        import re

        for i, pattern in enumerate(value):
            try:
                re.compile(pattern)
            except re.error as e:
                raise ValueError(f"[{i}] {pattern!r} is not a valid regular expression: {e}") from None
        return value

    @model_validator(mode="after")
    def _something(self) -> BlocklistGraderConfig:
        if not self.terms and not self.patterns:
            raise ValueError("terms: give terms or patterns to block (both are empty)")
        return self


class MultiGraderConfig(_Config):
    """Named sub-graders combined by a `calculate_output` formula."""

    type: Literal["multi"] = Field(description="The grader type.")
    name: str = Field(min_length=1, description="The grader's name (stored with its grades).")
    graders: dict[str, SubGraderConfig] = Field(
        description="Sub-graders by key; the keys are the formula's variables (a list is accepted and "
        "keyed by each grader's name)."
    )
    calculate_output: str = Field(description="Formula over the keys: + - * / ^ ( ) min max abs floor ceil exp sqrt log.")

    @field_validator("graders", mode="before")
    @classmethod
    def _list_to_dict(cls, value: Any) -> Any:
        if isinstance(value, list):
            keyed = {}
            for i, grader in enumerate(value):
                name = grader.get("name") if isinstance(grader, dict) else None
                if not name:
                    raise ValueError(f"[{i}] has no name; give graders as a {{key: grader}} object")
                if name in keyed:
                    raise ValueError(f"two graders are named {name!r}; give graders as a {{key: grader}} object")
                keyed[name] = grader
            return keyed
        return value

    @model_validator(mode="after")
    def _formula(self) -> MultiGraderConfig:
        if not self.graders:
            raise ValueError("graders: give at least one sub-grader")
        try:
            formula = Formula.parse(self.calculate_output)
        except FormulaError as e:
            raise ValueError(f"calculate_output: {e}") from None
        unknown = [v for v in formula.variables if v not in self.graders]
        if unknown:
            raise ValueError(
                f"calculate_output: unknown variable(s) {', '.join(map(repr, unknown))}; "
                f"the sub-grader keys are {', '.join(self.graders)}"
            )
        return self
