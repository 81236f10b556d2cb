"""Eval specs: the YAML a user writes, as typed pydantic models.

A spec names its dataset (relative to the spec file), how to split it, the chat messages to send
(with `{{item.field}}` templates), the model and its sampling, and the graders (the platform's
grader JSON schema, see `graders`). Loading reports every problem as `file: field: message`.

    spec = load_eval_spec("evals/banking77/eval.yaml", overrides=["sampling.max_tokens=16"])
"""

from __future__ import annotations

import hashlib
import json
import math
import re
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Annotated, Any, Literal, TypeVar

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

from flywheel.errors import SpecError

SPLITS = ("train", "valid", "test")


# Every seed field's range: what each consumer accepts (numpy's legacy seeding, which
# transformers.set_seed calls, takes 0..2**32-1; torch and random take more).
SEED_MAX = 2**32 - 1


SpecT = TypeVar("SpecT", bound=BaseModel)

class ExecutorSpec(BaseModel):
    """Where evaluations run: `executor: {kind: ray, address: auto}` in a run spec (the wheel's
    evaluations) or an eval spec (`flywheel eval`). Execution only: it never changes what an eval
    computes, so it is not part of the eval's fingerprint and stored results stay comparable."""

    model_config = ConfigDict(extra="forbid")

    kind: Literal["local", "ray"] = Field("local", description="local: generate and grade in this process; "
                                          "ray: in Ray tasks (pip install 'flywheel[ray]'), the store stays here.")
    address: str | None = Field(None, description="Ray cluster to join (auto, ray://host:10001); default: "
                                "$RAY_ADDRESS, else a cluster started here.")
    num_cpus: int | None = Field(None, ge=1, description="CPUs of a Ray cluster started here (default: all).")
    chunk_size: int | None = Field(None, ge=1, description="Samples per Ray task (default: 4 model batches).")


class _Spec(BaseModel):
    model_config = ConfigDict(extra="forbid")


class CapturesSourceSpec(_Spec):
    db: str | None = Field(
        default=None, description="SQLite store the proxy wrote, relative to the spec file; "
        "default $FLYWHEEL_DB, else ./flywheel.db."
    )
    metadata: dict[str, str] = Field(default_factory=dict, description="Only captures whose metadata has these values.")
    since: str | None = Field(default=None, description="Only captures from then on: 2026-11-05, a timestamp, or an age (7d).")
    until: str | None = Field(default=None, description="Only captures before then (a bare day is inclusive).")
    model: str | None = Field(default=None, description="Only captures of this model.")


class ImagesSpec(_Spec):
    folders: list[str] = Field(
        default_factory=list,
        description="More folders (relative to the spec file) that image paths may name, besides the dataset "
        "file's own folder; a path, file:// URL or symlink leading anywhere else is refused.")
    fetch: bool = Field(
        default=False,
        description="Fetch http(s) image URLs (when the spec is checked and run). Off by default: an eval "
        "spec makes no network request for its images unless it says so here.")


class DatasetSpec(_Spec):
    path: str | None = Field(default=None, description="JSONL or CSV file, relative to the spec file.")
    captures: CapturesSourceSpec | None = Field(
        default=None,
        description="Items from the proxy's successful captures instead of a file: fields input (the "
        "last user message), messages, output (the reply), model, created_at, metadata; all in the "
        "test split.",
    )
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
    images: ImagesSpec = Field(
        default_factory=ImagesSpec,
        description="What image parts may read: files inside the dataset's folder (plus `folders`), and "
        "http(s) URLs only with `fetch: true` (docs/vision.md).")

    @model_validator(mode="after")
    def _path_or_captures(self) -> "DatasetSpec":
        if (self.path is None) == (self.captures is None):
            raise ValueError("give exactly one of `path` (a file) or `captures` (the proxy's captures)")
        return self

    @property
    def resolved_format(self) -> str:
        if self.format:
            return self.format
        return "csv" if (self.path or "").lower().endswith(".csv") else "jsonl"


class SplitSpec(_Spec):
    column: str | None = Field(
        default=None, description="Item field naming each row's split (train / valid / test)."
    )
    ratios: dict[Literal["train", "valid", "test"], float] = Field(
        default_factory=lambda: {"train": 0.6, "valid": 0.2, "test": 0.2},
        description="Seeded split fractions, used when `column` is not set.",
    )
    seed: int = Field(default=0, ge=0, le=SEED_MAX, description="Seed of the ratio split.")

    @field_validator("ratios")
    @classmethod
    def _ratios_sum_to_one(cls, value: dict[str, float]) -> dict[str, float]:
        if not all(math.isfinite(v) for v in value.values()):
            raise ValueError("split ratios must be finite numbers (no NaN or inf)")
        if any(v < 0 for v in value.values()):
            raise ValueError("split ratios must not be negative")
        if abs(sum(value.values()) - 1.0) > 1e-6:
            raise ValueError(f"split ratios must sum to 1, got {sum(value.values()):g}")
        return value


class TextPartSpec(_Spec):
    type: Literal["input_text", "text"] = Field(description="A text part (`text` is the Chat Completions name).")
    text: str = Field(description="The text; may hold `{{item.field}}` templates.")


class ImagePartSpec(_Spec):
    type: Literal["input_image"] = Field(description="An image part (flywheel.images).")
    image_url: str | None = Field(
        default=None, description="A path (relative to the dataset file), an http(s) URL or a base64 data "
        "URL; usually a template such as {{item.image}}.")
    file_id: str | None = Field(default=None, description="A local image file path (instead of image_url).")
    detail: Literal["auto", "low", "high"] | None = Field(
        default=None, description="Resolution the model should use; passed on as is (the platform's default is auto).")

    @model_validator(mode="after")
    def _one_source(self) -> "ImagePartSpec":
        if (self.image_url is None) == (self.file_id is None):
            raise ValueError("give exactly one of `image_url` or `file_id`")
        return self

    @property
    def ref(self) -> str:
        return self.image_url if self.image_url is not None else self.file_id  # type: ignore[return-value]


ContentPartSpec = Annotated[TextPartSpec | ImagePartSpec, Field(discriminator="type")]


class MessageSpec(_Spec):
    role: Literal["system", "developer", "user", "assistant"] = Field(description="Chat role.")
    content: str | list[ContentPartSpec] = Field(
        description="Message text with `{{item.field}}` templates, or a list of parts: "
        "{type: input_text, text} and {type: input_image, image_url, detail} (docs/vision.md).")

    @model_validator(mode="after")
    def _parts_not_empty(self) -> "MessageSpec":
        if isinstance(self.content, list) and not self.content:
            raise ValueError("content: a list of parts needs at least one part")
        return self

    def templates(self) -> list[tuple[str, str]]:
        """(where, template text) of every templated string: the content or each part's."""
        if isinstance(self.content, str):
            return [("content", self.content)]
        return [(f"content[{i}].{'text' if isinstance(p, TextPartSpec) else 'image_url' if p.image_url is not None else 'file_id'}",
                 p.text if isinstance(p, TextPartSpec) else p.ref) for i, p in enumerate(self.content)]

    def image_templates(self) -> list[str]:
        """The templates naming images."""
        return [p.ref for p in self.content if isinstance(p, ImagePartSpec)] if isinstance(self.content, list) else []

    def to_message(self) -> dict[str, Any]:
        """The message as the prompt stores it (parts without unset fields)."""
        if isinstance(self.content, str):
            return {"role": self.role, "content": self.content}
        return {"role": self.role, "content": [p.model_dump(exclude_none=True) for p in self.content]}


def check_item_templates(text: str) -> None:
    """Every `{{...}}` in an input message must name `item.<path>`: there is no sample yet."""
    import graders
    from graders.templates import parse_variable

    for expr in _TEMPLATE.findall(text):
        try:
            namespace, _ = parse_variable(expr)
        except graders.TemplateVariableError as exc:
            raise ValueError(f"template {{{{{expr.strip()}}}}}: {exc.reason}") from None
        if namespace != "item":
            raise ValueError(f"template {{{{{expr.strip()}}}}}: input messages can use item.<field> only "
                             "(the sample does not exist before the model answers)")


_TEMPLATE = re.compile(r"\{\{(.*?)\}\}", re.S)


def _checked_messages(messages: list[MessageSpec]) -> list[MessageSpec]:
    for index, message in enumerate(messages):
        for where, text in message.templates():
            try:
                check_item_templates(text)
            except ValueError as exc:
                raise ValueError(f"[{index}].{where}: {exc}") from None
    return messages


class SamplingSpec(_Spec):
    temperature: float = Field(default=0.0, ge=0.0, le=2.0, description="0 means greedy decoding.")
    max_tokens: int = Field(default=64, ge=1, le=32768, description="Most new tokens per sample.")
    top_p: float = Field(default=1.0, gt=0.0, le=1.0, description="Nucleus sampling mass.")
    seed: int = Field(default=0, ge=0, le=SEED_MAX, description="Sampling seed (used when temperature > 0).")
    repeats: int = Field(default=1, ge=1, le=100, description="Samples drawn per item.")


class PromptRefSpec(_Spec):
    """An imported platform prompt version used as the eval's input messages (docs/rescue.md)."""

    id: str = Field(min_length=1, description="The platform prompt's id (pmpt_...), as imported.")
    version: str | None = Field(default=None, description="Its version (\"3\"); unset: the newest imported.")
    variables: dict[str, str] = Field(
        default_factory=dict,
        description="Platform variable -> item field, for variables not named like the item's fields.")


class OutputsSpec(_Spec):
    field: str = Field(
        description="Item field holding an output that already exists (another system's answer, "
        "logged traffic): it is graded as the sample, and no model is called."
    )


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

    @field_validator("system")
    @classmethod
    def _system_templates(cls, value: str | None) -> str | None:
        if value is not None:
            check_item_templates(value)
        return value

    @field_validator("messages")
    @classmethod
    def _message_templates(cls, value: list[MessageSpec] | None) -> list[MessageSpec] | None:
        return _checked_messages(value) if value is not None else None

    @model_validator(mode="after")
    def _one_of(self) -> "VariantSpec":
        if (self.system is None) == (self.messages is None):
            raise ValueError("give exactly one of `system` or `messages`")
        return self


class FewShotSpec(_Spec):
    """Few-shot demonstrations bootstrapped from train items, chosen by each strategy and count `k`."""

    source: Literal["model", "teacher", "labels"] = Field(
        default="model",
        description="Where demonstrations come from: the task model's own passing train outputs, "
        "a teacher model's, or the train items' labels rendered by `demo_output` (still graded).",
    )
    teacher: str | None = Field(default=None, description="Model reference; required when source is teacher.")
    demo_output: str | None = Field(
        default=None, description="Template of the assistant reply, e.g. {{item.label}}; required when source is "
        "labels."
    )
    strategies: list[Literal["random", "balanced", "nearest"]] = Field(
        default_factory=lambda: ["balanced"], description="Demo selection strategies to try: random (k demos "
        "drawn at random), balanced (k demos per value of `label_field`, which it requires), nearest (the k train "
        "items most similar to each item)."
    )
    k: list[int] = Field(
        default_factory=lambda: [1],
        description="Demo counts to try: per label for balanced, in all for random and nearest.",
    )
    label_field: str | None = Field(
        default=None, description="Item field the balanced strategy draws k demos per value of; required when "
        "strategies include balanced (the default).")
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
    """The `optimize:` block: every candidate is scored on a valid minibatch, the best `finalists` on all of
    valid, and the winner must beat the baseline by a paired test (docs/optimize.md)."""

    variants: list[VariantSpec] = Field(default_factory=list, description="Hand-written prompt variants.")
    fewshot: FewShotSpec | None = Field(default=None, description="Few-shot bootstrap settings.")
    proposer: ProposerSpec | None = Field(default=None, description="Reflective instruction rewrites.")
    minibatch: int = Field(default=40, ge=1, description="Valid items every candidate is scored on.")
    finalists: int = Field(default=3, ge=1, description="Best candidates re-scored on all of valid.")
    alpha: float = Field(default=0.05, gt=0, lt=1, description="Significance level of the paired test.")
    seed: int = Field(default=0, ge=0, le=SEED_MAX, description="Seed of minibatch and demo sampling.")
    budget: BudgetSpec = Field(default_factory=BudgetSpec, description="Limits of the search.")


class EvalSpec(_Spec):
    name: str = Field(description="Short name of the eval, shown in run listings.")
    description: str = Field(default="", description="What the eval measures.")
    dataset: DatasetSpec = Field(description="Where the items come from.")
    split: SplitSpec = Field(default_factory=SplitSpec, description="How items are split.")
    input: list[MessageSpec] = Field(
        default_factory=list,
        description="Chat messages sent per item (required unless `outputs` is set; then they are "
        "only stored with each sample, as the prompt the outputs answered).",
    )
    prompt: PromptRefSpec | None = Field(
        default=None, exclude=True,
        description="Instead of `input`: an imported platform prompt version (`flywheel import openai-prompts`), "
        "its messages filled in as `input` when the spec is loaded (so the fingerprint is the messages').")
    model: str = Field(default="local:smollm2", description="Model reference, e.g. local:smollm2.")
    outputs: OutputsSpec | None = Field(
        default=None,
        description="Grade outputs the dataset already holds (`outputs: {field: answer}`) instead of "
        "generating them; the iteration's model is recorded as data:FIELD.",
    )
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
    tools: list[dict[str, Any]] | None = Field(
        default=None,
        description="Function definitions in the platform's Chat Completions shape "
        "({type: function, function: {name, description, parameters}}); sent with every request, "
        "calls reach graders as sample.output_tools (docs/spec.md, Tools).",
    )
    tool_choice: str | dict[str, Any] | None = Field(
        default=None, description="auto | none | required | {type: function, function: {name: NAME}}."
    )
    graders: list[dict[str, Any]] = Field(
        min_length=1, description="Graders in the platform's grader JSON schema."
    )
    objective: ObjectiveSpec = Field(default_factory=ObjectiveSpec, description="What is optimised.")
    optimize: dict[str, Any] | None = Field(
        default=None, description="Prompt search settings (`flywheel optimize`, a run's optimize stage): an "
        "[OptimizeSpec](#optimizespec) mapping, validated only by the commands that search prompts.")
    executor: ExecutorSpec | None = Field(
        default=None, description="Where `flywheel eval` generates and grades ({kind: local|ray, address, "
        "num_cpus, chunk_size}); execution only, so not part of the fingerprint. --executor overrides it.")

    # Where the spec was loaded from; relative dataset paths resolve against it.
    base_dir: Path = Field(default=Path("."), exclude=True, description="Folder of the spec file.")
    source: str = Field(default="<spec>", exclude=True, description="The spec file, for errors.")

    @field_validator("input")
    @classmethod
    def _input_templates(cls, value: list[MessageSpec]) -> list[MessageSpec]:
        return _checked_messages(value)

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
            name = config.name  # required and non-empty in every grader config
            if name in names:
                raise ValueError(f"graders[{index}].name: duplicate grader name {name!r}")
            names.add(name)
            out.append(raw)
        return out

    @model_validator(mode="after")
    def _tools_are_functions(self) -> "EvalSpec":
        from flywheel.tools import check_tools

        check_tools(self.tools, self.tool_choice)
        return self

    @model_validator(mode="after")
    def _input_or_outputs(self) -> "EvalSpec":
        if self.outputs is None and not self.input:
            raise ValueError("input: at least one message is required (or set outputs.field to grade existing outputs)")
        if self.outputs is not None and "model" in self.model_fields_set:
            raise ValueError("model: give either a model or outputs.field, not both "
                             "(outputs are read from the data, no model is called)")
        return self

    @model_validator(mode="after")
    def _images_not_in_string_graders(self) -> "EvalSpec":
        fields = image_fields(self.input)
        if not fields:
            return self
        for index, raw in enumerate(self.graders):
            for where, text in _string_grader_templates(raw, f"graders[{index}]"):
                for name in _ITEM_FIELD.findall(text):
                    if name in fields:
                        raise ValueError(
                            f"{where}: {{{{item.{name}}}}} is an image (an input_image part names it); "
                            f"{raw.get('type')} graders compare text, not images: grade a text field instead")
        return self

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
        """The dataset file, or the store holding the captures it reads."""
        if self.dataset.captures is not None:
            import os

            db = self.dataset.captures.db
            return (self.base_dir / db).resolve() if db else Path(os.environ.get("FLYWHEEL_DB") or "flywheel.db").resolve()
        return (self.base_dir / self.dataset.path).resolve()

    def image_access(self, root: Path | None):
        """What this spec's image parts may read, for a dataset whose files lie in `root`."""
        from flywheel.images import ImageAccess

        images = self.dataset.images
        return ImageAccess(root=root, folders=tuple((self.base_dir / f).resolve() for f in images.folders),
                           fetch=images.fetch)

    def optimize_config(self) -> OptimizeSpec:
        """The `optimize:` block, validated (its defaults when absent); a mistake in it is a SpecError naming
        `optimize.FIELD`. Only prompt search calls this, so `flywheel eval` never fails on that block."""
        try:
            return OptimizeSpec.model_validate(self.optimize or {})
        except ValidationError as exc:
            message = format_validation_error(self.source, exc)
            raise SpecError("\n".join(line.replace(f"{self.source}: ", f"{self.source}: optimize.", 1)
                                       if not line.startswith(f"{self.source}: (top level)")
                                       else line.replace("(top level)", "optimize", 1)
                                       for line in message.splitlines())) from None

    @property
    def objective_grader(self) -> str:
        return self.objective.grader or self.graders[0]["name"]

    def messages(self) -> list[dict[str, Any]]:
        return [m.to_message() for m in self.input]

    def fingerprint(self) -> str:
        """Content hash of everything that changes what the eval computes."""
        # None of these changes a result (dataset.images only allows or refuses reads).
        payload = self.model_dump(mode="json", exclude={"optimize": True, "executor": True, "dataset": {"images"}})
        return hashlib.sha256(json.dumps(payload, sort_keys=True).encode()).hexdigest()[:16]


_ITEM_FIELD = re.compile(r"\{\{\s*item\.([A-Za-z_][A-Za-z0-9_]*)")
STRING_GRADERS = ("string_check", "text_similarity")


def image_fields(messages: Sequence[MessageSpec]) -> set[str]:
    """Item fields that input messages use as images (`{{item.x}}` in an image part)."""
    return {name for m in messages for ref in m.image_templates() for name in _ITEM_FIELD.findall(ref)}


def _string_grader_templates(raw: Any, where: str) -> list[tuple[str, str]]:
    """(where, template) of the text templates of string graders, inside multi graders too."""
    if not isinstance(raw, dict):
        return []
    if raw.get("type") in STRING_GRADERS:
        return [(f"{where}.{key}", raw[key]) for key in ("input", "reference") if isinstance(raw.get(key), str)]
    if raw.get("type") == "multi" and isinstance(raw.get("graders"), dict):
        return [t for name, sub in raw["graders"].items() for t in _string_grader_templates(sub, f"{where}.graders.{name}")]
    return []


@dataclass
class GraderInfo:
    """A grader of a stored eval spec as reports show it: name, type, whether it asks a model."""

    name: str
    type: str
    is_model: bool


def grader_infos(spec: dict[str, Any] | None, seen_names: Sequence[str] = ()) -> list[GraderInfo]:
    """Graders of a stored spec (its JSON, parsed) in spec order, then any other stored grader names.

    >>> [g.name for g in grader_infos({"graders": [{"type": "score_model", "name": "judge"}]}, ["judge", "old"])]
    ['judge', 'old']
    """
    from graders.registry import uses_model

    infos = [GraderInfo(name=config["name"], type=str(config.get("type", "?")), is_model=uses_model(config))
             for config in (spec or {}).get("graders") or []]
    known = {g.name for g in infos}
    infos += [GraderInfo(name=n, type="?", is_model=False) for n in seen_names if n not in known]
    return infos


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
        if message.startswith(("graders[", "objective.grader", "input: ", "model: ", "tools[", "tool_choice: ")):
            lines.append(f"{source}: {message}")
        else:
            lines.append(f"{source}: {loc or '(top level)'}: {message}")
    return "\n".join(lines)


def apply_overrides(data: dict[str, Any], overrides: list[str], source: str) -> dict[str, Any]:
    """Apply `-s key.path=value` overrides; the value is parsed as YAML (so 3 is an int), except a
    template (a value starting with `{{`, e.g. `-s validation_reference={{item.label}}`), which YAML
    would read as a mapping: it stays the string it is."""
    for override in overrides:
        if "=" not in override:
            raise SpecError(f"{source}: override {override!r}: expected key=value")
        key, raw = override.split("=", 1)
        if raw.lstrip().startswith("{{"):
            value: Any = raw
        else:
            value = _parse_yaml(raw, f"{source}: override {key.strip()}") if raw else ""
        target = data
        parts = key.strip().split(".")
        if not all(parts):
            raise SpecError(f"{source}: override {override!r}: empty key")
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
        raw = path.read_bytes()
    except FileNotFoundError:
        raise SpecError(f"{path}: spec file not found") from None
    except IsADirectoryError:
        raise SpecError(f"{path}: is a folder, not a spec file") from None
    except OSError as exc:
        raise SpecError(f"{path}: cannot read spec: {exc.strerror}") from None
    try:
        text = raw.decode("utf-8-sig")
    except UnicodeDecodeError as exc:
        line = raw[:exc.start].count(b"\n") + 1
        raise SpecError(f"{path}:{line}: not UTF-8 text (byte {exc.start}: {raw[exc.start]:#04x}); "
                        "save the spec as UTF-8") from None
    data = _parse_yaml(text, str(path))
    if not isinstance(data, dict):
        raise SpecError(f"{path}: expected a mapping at the top level, got {type(data).__name__}")
    return data


def _parse_yaml(text: str, where: str) -> Any:
    """YAML text as data; malformed YAML and strings that are not valid Unicode are SpecErrors."""
    try:
        data = yaml.safe_load(text)
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        at = f":{mark.line + 1}:{mark.column + 1}" if mark else ""
        problem = getattr(exc, "problem", None) or str(exc).splitlines()[0]
        raise SpecError(f"{where}{at}: malformed YAML: {problem}") from None
    except RecursionError:
        raise SpecError(f"{where}: malformed YAML: nested too deeply") from None
    except ValueError as exc:  # e.g. an out-of-range date
        raise SpecError(f"{where}: malformed YAML: {str(exc).split(';')[0]}") from None
    bad = _invalid_unicode(data)
    if bad is not None:
        raise SpecError(f"{where}: {bad or '(top level)'}: text holds a lone surrogate (an escape such as "
                        "\\ud800 that is not a character); remove it")
    return data


def _invalid_unicode(value: Any, at: str = "") -> str | None:
    """The path of the first string (key or value) that cannot be encoded as UTF-8, else None."""
    if isinstance(value, str):
        try:
            value.encode("utf-8")
        except UnicodeEncodeError:
            return at
        return None
    if isinstance(value, dict):
        for key, item in value.items():
            where = f"{at}.{key}" if at else str(key)
            if isinstance(key, str) and _invalid_unicode(key) is not None:
                return where
            found = _invalid_unicode(item, where)
            if found is not None:
                return found
    if isinstance(value, list):
        for index, item in enumerate(value):
            found = _invalid_unicode(item, f"{at}[{index}]")
            if found is not None:
                return found
    return None


def load_spec_file(path: str | Path, model: type[SpecT], overrides: list[str] | None = None) -> SpecT:
    """A YAML spec file read, `-s` overrides applied and validated as `model` (run specs, service specs);
    SpecError with `file: field: message` lines. The spec's `source` and `base_dir` are set."""
    path = Path(path)
    data = apply_overrides(read_yaml(path), overrides or [], str(path))
    try:
        spec = model.model_validate(data)
    except ValidationError as exc:
        raise SpecError(format_validation_error(str(path), exc)) from None
    spec.source, spec.base_dir = str(path), path.resolve().parent
    return spec


def load_eval_spec(path: str | Path, overrides: list[str] | None = None, *, store: Any = None) -> EvalSpec:
    """Load and validate an eval spec file; raise SpecError with `file: field: message` lines.
    `store`: where a `prompt:` reference is looked up (default: the default store, when it exists)."""
    path = Path(path)
    data = apply_overrides(read_yaml(path), overrides or [], str(path))
    return parse_eval_spec(data, source=str(path), base_dir=path.resolve().parent, store=store)


def resolve_prompt_ref(data: dict[str, Any], source: str, store: Any = None) -> dict[str, Any]:
    """The spec's mapping with `input` filled from the imported prompt version its `prompt` names:
    each `{{item.VAR}}` of the version becomes `{{item.FIELD}}` per `prompt.variables`. SpecError
    `file: prompt: ...` when both `input` and `prompt` are given or the version is not imported."""
    from flywheel.store import Store, default_db_path

    try:
        ref = PromptRefSpec.model_validate(data["prompt"])
    except ValidationError as exc:
        raise SpecError(format_validation_error(source, exc).replace(f"{source}: ", f"{source}: prompt.")) from None
    if data.get("input"):
        raise SpecError(f"{source}: prompt: give either `input` messages or `prompt`, not both")
    opened = None
    if store is None:
        if not Path(default_db_path()).is_file():
            raise SpecError(f"{source}: prompt: {ref.id} is looked up in the store, and {default_db_path()} does not "
                            "exist; import it first (flywheel import openai-prompts) or set --db/$FLYWHEEL_DB")
        store = opened = Store.open(default_db_path())
    try:
        found = store.platform_prompt_version(ref.id, ref.version)
    finally:
        if opened is not None:
            opened.close()
    if found is None:
        raise SpecError(f"{source}: prompt: {ref.id}" + (f" version {ref.version}" if ref.version else "")
                        + f" is not imported in {store.path} (flywheel import openai-prompts FILE|--from-api)")

    def field(match: re.Match[str]) -> str:
        return "{{item." + ref.variables.get(match.group(1), match.group(1)) + "}}"

    messages = [{"role": m["role"], "content": _ITEM_FIELD_TEMPLATE.sub(field, m["content"])} for m in found["messages"]]
    return {**data, "input": messages}


_ITEM_FIELD_TEMPLATE = re.compile(r"\{\{\s*item\.([A-Za-z_][A-Za-z0-9_]*)\s*\}\}")


def parse_eval_spec(data: dict[str, Any], source: str = "<spec>", base_dir: Path | None = None, *,
                    store: Any = None) -> EvalSpec:
    """Validate an already-loaded mapping as an eval spec (a `prompt:` reference resolved first)."""
    if isinstance(data, dict) and data.get("prompt") is not None:
        data = resolve_prompt_ref(data, source, store)
    try:
        spec = EvalSpec.model_validate(data)
    except ValidationError as exc:
        raise SpecError(format_validation_error(source, exc)) from None
    spec.base_dir = base_dir or Path(".").resolve()
    spec.source = source
    return spec
