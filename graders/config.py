"""Grader configs: the platform's grader JSON schema (reference §2) as pydantic models.

`parse_grader(obj)` turns one grader object (a dict as the hosted platform accepts it) into a
config; `load_graders(path)` reads a JSON or YAML file holding one grader or a list. Dumping with
`cfg.model_dump(by_alias=True, exclude_none=True)` gives the platform's field names back, so a
config round-trips. Invalid input raises `GraderConfigError` with one `path: message` per problem.
"""

from __future__ import annotations

import ast
import json
from pathlib import Path
from typing import Annotated, Any, Literal, Union

from pydantic import AliasChoices, BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

from graders.errors import GraderConfigError, TemplateVariableError, did_you_mean
from graders.formula import Formula, FormulaError
from graders.templates import template_variables

STRING_CHECK_OPERATIONS = ("eq", "ne", "like", "ilike")
TEXT_SIMILARITY_METRICS = (
    "cosine", "fuzzy_match", "bleu", "gleu", "meteor",
    "rouge_1", "rouge_2", "rouge_3", "rouge_4", "rouge_5", "rouge_l",
)
MAX_PYTHON_SOURCE_BYTES = 256 * 1024

# Words people write for a grader type; only used to suggest the right one.
_TYPE_ALIASES = {
    "exact": "string_check", "exact_match": "string_check", "equals": "string_check",
    "contains": "string_check", "string": "string_check", "regex": "string_check",
    "similarity": "text_similarity", "fuzzy": "text_similarity", "bleu": "text_similarity",
    "rouge": "text_similarity", "meteor": "text_similarity", "cosine": "text_similarity",
    "judge": "score_model", "llm_judge": "score_model", "score": "score_model", "model": "score_model",
    "label": "label_model", "classify": "label_model", "classifier": "label_model",
    "code": "python", "py": "python", "script": "python", "combined": "multi", "formula": "multi",
}


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
        from graders.pii import check_entities

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


# The grader types, their unions and CONFIG_CLASSES derive from the table in graders/registry.py.
_FROM_REGISTRY = ("GRADER_TYPES", "SUB_GRADER_TYPES", "CONFIG_CLASSES", "GraderConfig", "AnyGraderConfig",
                  "SubGraderConfig", "EXTENSION_GRADER_TYPES")


def __getattr__(name: str) -> Any:
    if name in _FROM_REGISTRY:
        from graders import registry

        return getattr(registry, name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


# --- parsing and error messages ---------------------------------------------------------------

def parse_grader(obj: Any) -> AnyGraderConfig:
    """Validate one grader object (platform JSON shape) into its config model.

    >>> parse_grader({"type": "string_check", "name": "label", "input": "{{sample.output_text}}",
    ...               "reference": "{{item.label}}", "operation": "ilike"}).operation
    'ilike'

    Raises GraderConfigError naming the field: ``input: field required``, or
    ``type: unknown grader 'exct'; known: string_check, ... (did you mean 'string_check'?)``.
    """
    from graders.registry import ADAPTER, CONFIG_CLASSES

    if isinstance(obj, BaseModel) and type(obj) in CONFIG_CLASSES.values():
        return obj  # already a config
    _check_types(obj, "", top=True)
    try:
        return ADAPTER.validate_python(obj)
    except ValidationError as e:
        raise GraderConfigError(_format_errors(e, obj)) from None


def _check_types(obj: Any, path: str, *, top: bool) -> None:
    """Catch an unknown or missing `type` before pydantic, to say which types exist."""
    from graders.registry import GRADER_TYPES, SUB_GRADER_TYPES

    if not isinstance(obj, dict):
        raise GraderConfigError([(path, f"a grader must be an object, got {type(obj).__name__}")])
    known = GRADER_TYPES if top else SUB_GRADER_TYPES
    kind = obj.get("type")
    if kind is None:
        raise GraderConfigError([(_join(path, "type"), f"field required; one of: {', '.join(known)}")])
    if kind not in known:
        if kind == "multi" and not top:
            raise GraderConfigError([(_join(path, "type"), "a multi grader cannot contain another multi grader")])
        hint = did_you_mean(str(kind), known, _TYPE_ALIASES)
        raise GraderConfigError([(_join(path, "type"), f"unknown grader {kind!r}; known: {', '.join(known)}{hint}")])
    if kind == "multi" and isinstance(obj.get("graders"), (dict, list)):
        subs = obj["graders"]
        entries = subs.items() if isinstance(subs, dict) else enumerate(subs)
        for key, sub in entries:
            sub_path = f"{_join(path, 'graders')}.{key}" if isinstance(subs, dict) else f"{_join(path, 'graders')}[{key}]"
            _check_types(sub, sub_path, top=False)


def _join(path: str, field: str) -> str:
    return f"{path}.{field}" if path else field


def _format_errors(error: ValidationError, obj: Any) -> list[tuple[str, str]]:
    out: list[tuple[str, str]] = []
    for err in error.errors(include_url=False):
        located = _location(err["loc"], obj)
        if located is None:
            continue  # an error from a union branch that does not apply to this value's type
        path, union_miss = located
        message = err["msg"]
        if union_miss:
            message = f"must be a string, a content part or a list of parts (got {type(err['input']).__name__})"
        elif err["type"] == "missing":
            message = "field required"
        elif err["type"] == "extra_forbidden":
            field = str(err["loc"][-1])
            model = _model_at(err["loc"][:-1], obj)
            hint = did_you_mean(field, model.model_fields) if model else ""
            message = f"unknown field{hint}"
        elif err["type"] in ("value_error", "assertion_error"):
            message = message.removeprefix("Value error, ").removeprefix("Assertion failed, ")
            if message.startswith(("calculate_output: ", "graders: ", "passing_labels: ", "labels: ")):
                field, _, message = message.partition(": ")
                path = _join(path, field)
        else:
            message = message[:1].lower() + message[1:]
            if not isinstance(err.get("input"), (dict, list, type(None))):
                message += f" (got {err['input']!r})"
        if (path, message) not in out:
            out.append((path, message))
    return out


def _branch_matches(label: str, data: Any) -> bool | None:
    """Whether the union branch `label` (pydantic's name for it) is the one for `data`'s type."""
    if label == "str":
        return isinstance(data, str)
    if label.startswith("list["):
        return isinstance(data, list)
    if label.startswith(("tagged-union[", "function-")):
        return isinstance(data, dict)
    return None  # not a union branch label


def _location(loc: tuple, obj: Any) -> tuple[str, bool] | None:
    """Pydantic's error location as a field path, without the union tags and branch labels it
    inserts; None when the error comes from a branch that does not apply to the value's type."""
    parts: list[str] = []
    data = obj
    for elem in loc:
        if isinstance(data, dict) and elem in data:
            data = data[elem]
            parts.append(f".{elem}")
        elif isinstance(data, list) and isinstance(elem, int):
            data = data[elem] if elem < len(data) else None
            parts.append(f"[{elem}]")
        elif isinstance(data, dict) and data.get("type") == elem:
            continue  # the discriminated union's tag, not a field
        elif isinstance(elem, str) and (match := _branch_matches(elem, data)) is not None:
            if not match:
                if not isinstance(data, (str, list, dict)) and elem == "str":
                    return "".join(parts).lstrip("."), True  # no branch fits: say so once
                return None
        else:
            parts.append(f"[{elem}]" if isinstance(elem, int) else f".{elem}")
            data = None
    return "".join(parts).lstrip("."), False


def _model_at(loc: tuple, obj: Any) -> type[BaseModel] | None:
    """The config class that validated the object at `loc` (for 'did you mean' on unknown fields)."""
    data = obj
    for elem in loc:
        if isinstance(data, dict) and elem in data:
            data = data[elem]
        elif isinstance(data, list) and isinstance(elem, int) and elem < len(data):
            data = data[elem]
    if not isinstance(data, dict):
        return None
    from graders.registry import CONFIG_CLASSES

    if data.get("type") in CONFIG_CLASSES:
        return CONFIG_CLASSES[data["type"]]
    parts = {"input_text": InputText, "output_text": OutputText, "input_image": InputImage, "input_audio": InputAudio}
    if data.get("type") in parts:
        return parts[data["type"]]
    if "role" in data:
        return Message
    if set(data) & set(SamplingParams.model_fields) or loc and loc[-1] == "sampling_params":
        return SamplingParams
    return None


def load_graders(path: str | Path) -> list[AnyGraderConfig]:
    """Read a JSON or YAML file holding one grader object or a list of them.

    A file may also hold `{"graders": [...]}` or `{"testing_criteria": [...]}` (an eval's).
    Errors name the file: ``graders.yaml: [1].operation: input should be 'eq', ...``.
    """
    path = Path(path)
    try:
        text = path.read_text(encoding="utf-8")
    except OSError as e:
        raise GraderConfigError([("", f"cannot read the file: {e.strerror or e}")], source=str(path)) from None
    except UnicodeDecodeError as e:
        raise GraderConfigError([("", f"not UTF-8 text (byte {e.start})")], source=str(path)) from None
    try:
        if path.suffix.lower() == ".json":
            data = json.loads(text)
        else:
            import yaml

            data = yaml.safe_load(text)
    except Exception as e:  # json.JSONDecodeError, yaml.YAMLError
        raise GraderConfigError([("", f"not valid {'JSON' if path.suffix.lower() == '.json' else 'YAML'}: {e}")],
                                source=str(path)) from None
    prefix = ""
    if isinstance(data, dict) and "type" not in data:
        for key in ("graders", "testing_criteria", "grader"):
            if key in data:
                data, prefix = data[key], key
                break
    many = isinstance(data, list)
    objs = data if many else [data]
    if not objs:
        raise GraderConfigError([(prefix, "the file holds no graders")], source=str(path))
    configs, problems = [], []
    for i, obj in enumerate(objs):
        try:
            configs.append(parse_grader(obj))
        except GraderConfigError as e:
            where = f"{prefix}[{i}]" if many else prefix
            problems.extend(e.prefixed(where).errors)
    if problems:
        raise GraderConfigError(problems, source=str(path))
    return configs
