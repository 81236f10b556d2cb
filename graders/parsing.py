"""Reading grader objects: `parse_grader(obj)` turns one grader object (a dict as the hosted platform
accepts it) into its config (graders/config.py), `load_graders(path)` reads a JSON or YAML file holding
one grader or a list. Invalid input raises `GraderConfigError` with one `path: message` per problem,
naming the field and suggesting the type or field that was meant.

It sits above the grader table (graders/registry.py): the types it accepts derive from that table.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from pydantic import BaseModel, ValidationError

from graders.config import InputAudio, InputImage, InputText, Message, OutputText, SamplingParams
from graders.errors import GraderConfigError, did_you_mean
from graders.registry import ADAPTER, CONFIG_CLASSES, GRADER_TYPES, SUB_GRADER_TYPES, AnyGraderConfig

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


def parse_grader(obj: Any) -> AnyGraderConfig:
    """Validate one grader object (platform JSON shape) into its config model.

    >>> parse_grader({"type": "string_check", "name": "label", "input": "{{sample.output_text}}",
    ...               "reference": "{{item.label}}", "operation": "ilike"}).operation
    'ilike'

    Raises GraderConfigError naming the field: ``input: field required``, or
    ``type: unknown grader 'exct'; known: string_check, ... (did you mean 'string_check'?)``.
    """
    if isinstance(obj, BaseModel) and type(obj) in CONFIG_CLASSES.values():
        return obj  # already a config
    _check_types(obj, "", top=True)
    try:
        return ADAPTER.validate_python(obj)
    except ValidationError as e:
        raise GraderConfigError(_format_errors(e, obj)) from None


def _check_types(obj: Any, path: str, *, top: bool) -> None:
    """Catch an unknown or missing `type` before pydantic, to say which types exist."""
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
