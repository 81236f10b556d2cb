"""The grader table: every grader type named once, beside its config class and how it is built.

Everything that depends on a grader's type derives from `GRADER_TABLE`: the type lists
(`GRADER_TYPES`, `SUB_GRADER_TYPES`), the pydantic discriminated unions that `parse_grader`
validates with, `CONFIG_CLASSES`, `build_grader`'s dispatch, which types ask a judge model
(`MODEL_GRADER_TYPES`, `uses_model`) and which the hosted RFT API accepts (`HOSTED_RFT_TYPES`).
A grader's name is its config class's `type` literal. Builders import their grader module on
first use, so parsing a config never loads a metric library.

    >>> GRADER_TYPES
    ('string_check', 'text_similarity', 'score_model', 'label_model', 'python', 'multi', 'pii', 'blocklist')
    >>> uses_model({"type": "multi", "graders": {"j": {"type": "score_model"}}})
    True
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Annotated, Any, Union, get_args

from pydantic import Field, TypeAdapter

from graders.base import Grader
from graders.config import (BlocklistGraderConfig, LabelModelGraderConfig, MultiGraderConfig, PIIGraderConfig,
                            PythonGraderConfig, ScoreModelGraderConfig, StringCheckGraderConfig,
                            TextSimilarityGraderConfig, _Config)
from graders.model_graders import LabelModelGrader, ScoreModelGrader
from graders.multi import MultiGrader
from graders.python_sandbox import PythonGrader
from graders.safety import BlocklistGrader, PIIGrader
from graders.string_check import StringCheckGrader
from graders.text_similarity import TextSimilarityGrader

Builder = Callable[..., Grader]  # (config, *, judge, embedder, sandbox) -> Grader


@dataclass(frozen=True)
class GraderType:
    """One row of the table: a grader type and what depends on it."""

    config: type[_Config]
    build: Builder
    uses_model: bool  # asks a judge model: the report flags it, judge agreement lists it first
    sub_grader: bool = True  # may stand inside a multi grader
    hosted_rft: bool = True  # the hosted reinforcement fine-tuning API accepts it (reference §2)
    platform: bool = True  # in the platform's schema; False for Flywheel's own extensions

    @property
    def name(self) -> str:
        return get_args(self.config.model_fields["type"].annotation)[0]


def _string_check(config: Any, **_: Any) -> Grader:
    return StringCheckGrader(config)


def _text_similarity(config: Any, *, embedder: Any = None, **_: Any) -> Grader:
    return TextSimilarityGrader(config, embedder=embedder)


def _score_model(config: Any, *, judge: Any = None, **_: Any) -> Grader:
    return ScoreModelGrader(config, judge)


def _label_model(config: Any, *, judge: Any = None, **_: Any) -> Grader:
    return LabelModelGrader(config, judge)


def _python(config: Any, *, sandbox: Any = None, **_: Any) -> Grader:
    return PythonGrader(config, sandbox=sandbox)


def _pii(config: Any, **_: Any) -> Grader:
    return PIIGrader(config)


def _blocklist(config: Any, **_: Any) -> Grader:
    return BlocklistGrader(config)


def _multi(config: Any, **options: Any) -> Grader:
    return MultiGrader(config, {key: TABLE[sub.type].build(sub, **options) for key, sub in config.graders.items()})


GRADER_TABLE: tuple[GraderType, ...] = (
    GraderType(StringCheckGraderConfig, _string_check, uses_model=False),
    GraderType(TextSimilarityGraderConfig, _text_similarity, uses_model=False),
    GraderType(ScoreModelGraderConfig, _score_model, uses_model=True),
    GraderType(LabelModelGraderConfig, _label_model, uses_model=True, hosted_rft=False),
    GraderType(PythonGraderConfig, _python, uses_model=False),
    GraderType(MultiGraderConfig, _multi, uses_model=False, sub_grader=False),
    # Flywheel extensions (safety checks, graders/safety.py): not in the platform's schema.
    GraderType(PIIGraderConfig, _pii, uses_model=False, hosted_rft=False, platform=False),
    GraderType(BlocklistGraderConfig, _blocklist, uses_model=False, hosted_rft=False, platform=False),
)

TABLE: dict[str, GraderType] = {row.name: row for row in GRADER_TABLE}
GRADER_TYPES: tuple[str, ...] = tuple(TABLE)
SUB_GRADER_TYPES: tuple[str, ...] = tuple(row.name for row in GRADER_TABLE if row.sub_grader)
MODEL_GRADER_TYPES: frozenset[str] = frozenset(row.name for row in GRADER_TABLE if row.uses_model)
HOSTED_RFT_TYPES: tuple[str, ...] = tuple(row.name for row in GRADER_TABLE if row.hosted_rft)
EXTENSION_GRADER_TYPES: tuple[str, ...] = tuple(row.name for row in GRADER_TABLE if not row.platform)
CONFIG_CLASSES: dict[str, type[_Config]] = {row.name: row.config for row in GRADER_TABLE}

SubGraderConfig = Annotated[Union[tuple(row.config for row in GRADER_TABLE if row.sub_grader)],  # type: ignore[misc]
                            Field(discriminator="type")]
AnyGraderConfig = Union[tuple(CONFIG_CLASSES.values())]  # type: ignore[misc, valid-type]
GraderConfig = Annotated[AnyGraderConfig, Field(discriminator="type")]

MultiGraderConfig.model_rebuild(_types_namespace={"SubGraderConfig": SubGraderConfig})
ADAPTER: TypeAdapter = TypeAdapter(GraderConfig)


def uses_model(config: dict[str, Any]) -> bool:
    """Whether a grader object (platform JSON shape) asks a judge model, in itself or a sub-grader."""
    row = TABLE.get(config.get("type"))  # type: ignore[arg-type]
    if row is not None and row.uses_model:
        return True
    subs = config.get("graders")
    if isinstance(subs, dict):
        return any(isinstance(s, dict) and uses_model(s) for s in subs.values())
    return False
