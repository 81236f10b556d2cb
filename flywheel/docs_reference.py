"""The spec reference, generated from the pydantic models so it cannot drift: every field of the eval
spec, of the `optimize:` block (each few-shot strategy, its required fields) and of the run spec
(every stage, every training method's `config`), with its type, default and description.

    python -m flywheel.docs_reference            # rewrites docs/reference.md
    python -m flywheel.docs_reference --check    # exit 1 when docs/reference.md is stale

`models_documented()` lists the models; `undocumented_fields()` the fields without a description
(a test keeps it empty).
"""

from __future__ import annotations

import sys
import types
import typing
from pathlib import Path
from typing import Any, Literal, Union, get_args, get_origin

from pydantic import BaseModel
from pydantic.fields import FieldInfo
from pydantic_core import PydanticUndefined

REFERENCE_PATH = Path(__file__).resolve().parent.parent / "docs" / "reference.md"


def _sections() -> list[tuple[str, str, list[type[BaseModel]]]]:
    """(title, introduction, root models) of each part of the reference."""
    from flywheel.run_spec import RunSpec
    from flywheel.spec import EvalSpec, OptimizeSpec
    from flywheel.stages import STAGES
    from flywheel.train.methods import METHODS

    stage_specs = list(dict.fromkeys(cls.spec_class for cls in STAGES.values()))
    return [
        ("Eval spec", "An eval spec (`flywheel eval SPEC`, docs/spec.md): YAML or JSON, every field below; "
         "`-s key.path=value` overrides one.", [EvalSpec]),
        ("The `optimize:` block", "Prompt search settings of an eval spec (`flywheel optimize SPEC`, docs/optimize.md) "
         "and of a run spec's `optimize` stage. Only the commands that search prompts validate it: `flywheel eval` "
         "reads it as a mapping and nothing more.", [OptimizeSpec]),
        ("Run spec", "A run spec (`flywheel run SPEC`, docs/run.md): the wheel's target, budget and stages.",
         [RunSpec, *stage_specs]),
        ("Training config", "The `config:` of a training stage (and `flywheel train -s ...`), one model per method "
         "(docs/training.md).", [m.config for m in METHODS.values()]),
    ]


def _models_under(roots: list[type[BaseModel]], seen: set[type[BaseModel]]) -> list[type[BaseModel]]:
    """The roots and every model their fields hold, depth first, each once."""
    out: list[type[BaseModel]] = []

    def visit(model: type[BaseModel]) -> None:
        if model in seen:
            return
        seen.add(model)
        out.append(model)
        for field in model.model_fields.values():
            for inner in _models_in(field.annotation):
                visit(inner)

    for root in roots:
        visit(root)
    return out


def _models_in(annotation: Any) -> list[type[BaseModel]]:
    if isinstance(annotation, type) and issubclass(annotation, BaseModel):
        return [annotation]
    return [m for arg in get_args(annotation) for m in _models_in(arg)]


def models_documented() -> list[type[BaseModel]]:
    """Every model the reference covers."""
    seen: set[type[BaseModel]] = set()
    return [m for _, _, roots in _sections() for m in _models_under(roots, seen)]


def _public_fields(model: type[BaseModel]) -> dict[str, FieldInfo]:
    return {name: f for name, f in model.model_fields.items() if not f.exclude}


def undocumented_fields() -> list[str]:
    """`Model.field` for each documented field that has no description."""
    return [f"{m.__name__}.{name}" for m in models_documented() for name, f in _public_fields(m).items()
            if not (f.description or "").strip()]


def _type_name(annotation: Any) -> str:
    origin = get_origin(annotation)
    if annotation is type(None):
        return "null"
    if origin is Literal:
        # sorted: typing caches Literal by its set of values, so the order seen depends on import order
        return " \\| ".join(f"`{a}`" for a in sorted(get_args(annotation), key=str))
    if origin in (Union, types.UnionType):
        return " \\| ".join(_type_name(a) for a in get_args(annotation))
    if origin is typing.Annotated:
        return _type_name(get_args(annotation)[0])
    if origin in (list, tuple, set):
        args = get_args(annotation)
        return f"list of {_type_name(args[0])}" if args else "list"
    if origin is dict:
        args = get_args(annotation)
        return f"mapping of {_type_name(args[0])} to {_type_name(args[1])}" if args else "mapping"
    if isinstance(annotation, type) and issubclass(annotation, BaseModel):
        return f"[{annotation.__name__}](#{annotation.__name__.lower()})"
    if annotation is Any:
        return "any"
    return getattr(annotation, "__name__", str(annotation))


def _default(field: FieldInfo) -> str:
    if field.is_required():
        return "**required**"
    if field.default_factory is not None:
        try:
            value = field.default_factory()  # type: ignore[call-arg]
        except TypeError:
            return "(computed)"
        if isinstance(value, BaseModel):
            return "(its defaults)"
        if not isinstance(value, (list, dict, tuple, set)):  # e.g. read from the environment
            return "(see description)"
    else:
        value = field.default
    if value is None or value is PydanticUndefined:
        return "–"
    return f"`{value!r}`".replace("|", "\\|")


def _cell(text: str) -> str:
    return " ".join(text.split()).replace("|", "\\|")


def render_reference() -> str:
    """docs/reference.md, as text."""
    lines = ["# Spec reference", "",
             "Generated from the pydantic models by `python -m flywheel.docs_reference`; do not edit by hand "
             "(a test fails when this file and the models disagree, or when a field has no description).", ""]
    seen: set[type[BaseModel]] = set()
    for title, intro, roots in _sections():
        lines += [f"## {title}", "", intro, ""]
        for model in _models_under(roots, seen):
            lines += [f"### {model.__name__}", ""]
            doc = (model.__doc__ or "").strip()
            if doc and not doc.startswith(f"{model.__name__}("):  # pydantic's generated signature is no doc
                lines += [" ".join(doc.split("\n\n")[0].split()), ""]
            lines += ["| field | type | default | description |", "|---|---|---|---|"]
            for name, field in _public_fields(model).items():
                key = field.alias or name
                lines.append(f"| `{key}` | {_type_name(field.annotation)} | {_default(field)} | "
                             f"{_cell(field.description or '')} |")
            lines.append("")
    return "\n".join(lines).rstrip() + "\n"


def main(argv: list[str] | None = None) -> int:
    """Write docs/reference.md (or, with --check, say whether it is up to date)."""
    argv = sys.argv[1:] if argv is None else argv
    text = render_reference()
    if "--check" in argv:
        current = REFERENCE_PATH.read_text(encoding="utf-8") if REFERENCE_PATH.exists() else ""
        if current != text:
            print(f"{REFERENCE_PATH}: out of date; run python -m flywheel.docs_reference", file=sys.stderr)
            return 1
        return 0
    REFERENCE_PATH.write_text(text, encoding="utf-8")
    print(f"wrote {REFERENCE_PATH}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
