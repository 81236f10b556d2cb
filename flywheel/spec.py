"""Eval specs: the YAML a user writes, as typed pydantic models.

A spec names its dataset (relative to the spec file), how to split it, the chat messages to send
(with `{{item.field}}` templates), the model and its sampling, and the graders (the platform's
grader JSON schema, see `graders`). Loading reports every problem as `file: field: message`.

    spec = load_eval_spec("evals/banking77/eval.yaml", overrides=["sampling.max_tokens=16"])
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path
from typing import Any, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

from flywheel.errors import SpecError

SPLITS = ("train", "valid", "test")


class _Spec(BaseModel):
    model_config = ConfigDict(extra="forbid")


class DatasetSpec(_Spec):
    path: str = Field(description="JSONL or CSV file, relative to the spec file.")
    format: Literal["jsonl", "csv"] | None = Field(
        default=None, description="File format; inferred from the suffix when omitted."
    )
    columns: dict[str, str] = Field(
        default_factory=dict,
        description="Item field -> source column. When given, only these fields are kept and each "
        "column must exist.",
    )
    id_field: str | None = Field(
        default=None, description="Field holding a stable item id; the row number when omitted."
    )

    @property
    def resolved_format(self) -> str:
        if self.format:
            return self.format
        return "csv" if self.path.lower().endswith(".csv") else "jsonl"


class SplitSpec(_Spec):
    column: str | None = Field(
        default=None, description="Item field naming each row's split (train / valid / test)."
    )
    ratios: dict[Literal["train", "valid", "test"], float] = Field(
        default_factory=lambda: {"train": 0.6, "valid": 0.2, "test": 0.2},
        description="Seeded split fractions, used when `column` is not set.",
    )
    seed: int = Field(default=0, description="Seed of the ratio split.")

    @field_validator("ratios")
    @classmethod
    def _ratios_sum_to_one(cls, value: dict[str, float]) -> dict[str, float]:
        if any(v < 0 for v in value.values()):
            raise ValueError("split ratios must not be negative")
        if abs(sum(value.values()) - 1.0) > 1e-6:
            raise ValueError(f"split ratios must sum to 1, got {sum(value.values()):g}")
        return value


class MessageSpec(_Spec):
    role: Literal["system", "developer", "user", "assistant"] = Field(description="Chat role.")
    content: str = Field(description="Message text; may hold `{{item.field}}` templates.")


class SamplingSpec(_Spec):
    temperature: float = Field(default=0.0, ge=0.0, le=2.0, description="0 means greedy decoding.")
    max_tokens: int = Field(default=64, ge=1, le=32768, description="Most new tokens per sample.")
    top_p: float = Field(default=1.0, gt=0.0, le=1.0, description="Nucleus sampling mass.")
    seed: int = Field(default=0, description="Sampling seed (used when temperature > 0).")
    repeats: int = Field(default=1, ge=1, le=100, description="Samples drawn per item.")


class ObjectiveSpec(_Spec):
    grader: str | None = Field(
        default=None, description="Name of the grader to optimise; the first grader when omitted."
    )
    metric: Literal["pass_rate", "mean_score"] = Field(
        default="pass_rate", description="What the objective grader contributes."
    )


class VariantSpec(_Spec):
    name: str = Field(description="Short name shown in the search tree.")
    system: str | None = Field(default=None, description="Replaces the first system message.")
    messages: list[MessageSpec] | None = Field(default=None, description="Replaces all input messages.")

    @model_validator(mode="after")
    def _one_of(self) -> "VariantSpec":
        if (self.system is None) == (self.messages is None):
            raise ValueError("give exactly one of `system` or `messages`")
        return self


class FewShotSpec(_Spec):
    source: Literal["model", "teacher", "labels"] = Field(
        default="model",
        description="Where demonstrations come from: the task model's own passing train outputs, "
        "a teacher model's, or the train items' labels rendered by `demo_output` (still graded).",
    )
    teacher: str | None = Field(default=None, description="Model reference when source is teacher.")
    demo_output: str | None = Field(
        default=None, description="Template of the assistant reply when source is labels, e.g. {{item.label}}."
    )
    strategies: list[Literal["random", "balanced", "nearest"]] = Field(
        default_factory=lambda: ["balanced"], description="Demo selection strategies to try."
    )
    k: list[int] = Field(
        default_factory=lambda: [1],
        description="Demo counts to try: per label for balanced, in all for random and nearest.",
    )
    label_field: str | None = Field(default=None, description="Item field for balanced selection.")
    max_items: int = Field(default=200, ge=1, description="Most train items to bootstrap from.")

    @model_validator(mode="after")
    def _needs(self) -> "FewShotSpec":
        if self.source == "labels" and not self.demo_output:
            raise ValueError("demo_output: required when source is labels")
        if self.source == "teacher" and not self.teacher:
            raise ValueError("teacher: required when source is teacher")
        if "balanced" in self.strategies and not self.label_field:
            raise ValueError("label_field: required by the balanced strategy")
        if any(k < 1 for k in self.k):
            raise ValueError("k: every demo count must be at least 1")
        return self


class ProposerSpec(_Spec):
    model: str | None = Field(default=None, description="Proposer model; the teacher, else the task model.")
    rounds: int = Field(default=1, ge=0, le=20, description="Reflective rewrite rounds.")
    proposals: int = Field(default=2, ge=1, le=16, description="Rewrites proposed per parent per round.")
    beam: int = Field(default=2, ge=1, le=16, description="Best candidates kept as parents.")
    failures_shown: int = Field(default=4, ge=1, le=32, description="Failing examples shown per proposal.")
    temperature: float = Field(default=0.8, ge=0.0, le=2.0, description="Proposer sampling temperature.")
    max_tokens: int = Field(default=256, ge=16, description="Longest proposal.")


class BudgetSpec(_Spec):
    max_candidates: int = Field(default=20, ge=1, description="Most candidates evaluated (baseline included).")
    max_model_calls: int | None = Field(default=None, ge=1, description="Most task+proposer model calls.")
    max_tokens: int | None = Field(default=None, ge=1, description="Most prompt+completion tokens.")


class OptimizeSpec(_Spec):
    variants: list[VariantSpec] = Field(default_factory=list, description="Hand-written prompt variants.")
    fewshot: FewShotSpec | None = Field(default=None, description="Few-shot bootstrap settings.")
    proposer: ProposerSpec | None = Field(default=None, description="Reflective instruction rewrites.")
    minibatch: int = Field(default=40, ge=1, description="Valid items every candidate is scored on.")
    finalists: int = Field(default=3, ge=1, description="Best candidates re-scored on all of valid.")
    alpha: float = Field(default=0.05, gt=0, lt=1, description="Significance level of the paired test.")
    seed: int = Field(default=0, description="Seed of minibatch and demo sampling.")
    budget: BudgetSpec = Field(default_factory=BudgetSpec, description="Limits of the search.")


class EvalSpec(_Spec):
    name: str = Field(description="Short name of the eval, shown in run listings.")
    description: str = Field(default="", description="What the eval measures.")
    dataset: DatasetSpec = Field(description="Where the items come from.")
    split: SplitSpec = Field(default_factory=SplitSpec, description="How items are split.")
    input: list[MessageSpec] = Field(min_length=1, description="Chat messages sent per item.")
    model: str = Field(default="local:smollm2", description="Model reference, e.g. local:smollm2.")
    model_options: dict[str, Any] = Field(
        default_factory=dict,
        description="Backend options (e.g. base_url, api_key_env, batch_size, dtype).",
    )
    sampling: SamplingSpec = Field(default_factory=SamplingSpec, description="Sampling settings.")
    response_format: dict[str, Any] | None = Field(
        default=None,
        description="Structured output, passed to `openai:` models as is (e.g. a json_schema); the "
        "parsed reply reaches graders as sample.output_json.",
    )
    graders: list[dict[str, Any]] = Field(
        min_length=1, description="Graders in the platform's grader JSON schema."
    )
    objective: ObjectiveSpec = Field(default_factory=ObjectiveSpec, description="What is optimised.")
    optimize: OptimizeSpec | None = Field(default=None, description="Prompt search settings (flywheel optimize).")

    # Where the spec was loaded from; relative dataset paths resolve against it.
    base_dir: Path = Field(default=Path("."), exclude=True, description="Folder of the spec file.")
    source: str = Field(default="<spec>", exclude=True, description="The spec file, for errors.")

    @field_validator("graders")
    @classmethod
    def _graders_parse(cls, value: list[dict[str, Any]]) -> list[dict[str, Any]]:
        import graders

        names: set[str] = set()
        out = []
        for index, raw in enumerate(value):
            try:
                config = graders.parse_grader(raw)
            except graders.GraderConfigError as exc:
                raise ValueError(f"graders[{index}]: {exc}") from None
            name = getattr(config, "name", None) or f"grader_{index}"
            if name in names:
                raise ValueError(f"graders[{index}].name: duplicate grader name {name!r}")
            names.add(name)
            out.append(raw)
        return out

    @model_validator(mode="after")
    def _objective_names_a_grader(self) -> "EvalSpec":
        names = [g.get("name") for g in self.graders]
        if self.objective.grader is not None and self.objective.grader not in names:
            raise ValueError(
                f"objective.grader: no grader named {self.objective.grader!r}; graders: "
                + ", ".join(map(str, names))
            )
        return self

    @property
    def dataset_path(self) -> Path:
        return (self.base_dir / self.dataset.path).resolve()

    @property
    def objective_grader(self) -> str:
        return self.objective.grader or self.graders[0].get("name") or "grader_0"

    def messages(self) -> list[dict[str, str]]:
        return [m.model_dump() for m in self.input]

    def fingerprint(self) -> str:
        """Content hash of everything that changes what the eval computes."""
        payload = self.model_dump(mode="json", exclude={"optimize"})
        return hashlib.sha256(json.dumps(payload, sort_keys=True).encode()).hexdigest()[:16]


def format_validation_error(source: str, exc: ValidationError) -> str:
    lines = []
    for err in exc.errors():
        loc = ".".join(
            f"[{p}]" if isinstance(p, int) else str(p) for p in err["loc"]
        ).replace(".[", "[")
        message = err["msg"]
        if message.startswith("Value error, "):
            message = message[len("Value error, ") :]
        if err["type"] == "extra_forbidden":
            message = "unknown field"
        # A nested "graders[2]: type: ..." message already carries its own location.
        if message.startswith("graders[") or message.startswith("objective.grader"):
            lines.append(f"{source}: {message}")
        else:
            lines.append(f"{source}: {loc or '(top level)'}: {message}")
    return "\n".join(lines)


def apply_overrides(data: dict[str, Any], overrides: list[str], source: str) -> dict[str, Any]:
    """Apply `-s key.path=value` overrides; the value is parsed as YAML (so 3 is an int)."""
    for override in overrides:
        if "=" not in override:
            raise SpecError(f"{source}: override {override!r}: expected key=value")
        key, raw = override.split("=", 1)
        value = yaml.safe_load(raw) if raw else ""
        target = data
        parts = key.strip().split(".")
        for part in parts[:-1]:
            nxt = target.get(part)
            if nxt is None:
                nxt = target[part] = {}
            if not isinstance(nxt, dict):
                raise SpecError(f"{source}: override {key}: {part} is not a mapping")
            target = nxt
        target[parts[-1]] = value
    return data


def read_yaml(path: Path) -> dict[str, Any]:
    """Read a YAML mapping, turning every failure into a one-line SpecError naming the file."""
    try:
        text = path.read_text(encoding="utf-8")
    except FileNotFoundError:
        raise SpecError(f"{path}: spec file not found") from None
    except OSError as exc:
        raise SpecError(f"{path}: cannot read spec: {exc.strerror}") from None
    try:
        data = yaml.safe_load(text)
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        where = f":{mark.line + 1}:{mark.column + 1}" if mark else ""
        problem = getattr(exc, "problem", None) or str(exc).splitlines()[0]
        raise SpecError(f"{path}{where}: malformed YAML: {problem}") from None
    if not isinstance(data, dict):
        raise SpecError(f"{path}: expected a mapping at the top level, got {type(data).__name__}")
    return data


def load_eval_spec(path: str | Path, overrides: list[str] | None = None) -> EvalSpec:
    """Load and validate an eval spec file; raise SpecError with `file: field: message` lines."""
    path = Path(path)
    data = apply_overrides(read_yaml(path), overrides or [], str(path))
    return parse_eval_spec(data, source=str(path), base_dir=path.resolve().parent)


def parse_eval_spec(data: dict[str, Any], source: str = "<spec>", base_dir: Path | None = None) -> EvalSpec:
    """Validate an already-loaded mapping as an eval spec."""
    try:
        spec = EvalSpec.model_validate(data)
    except ValidationError as exc:
        raise SpecError(format_validation_error(source, exc)) from None
    spec.base_dir = base_dir or Path(".").resolve()
    spec.source = source
    return spec
