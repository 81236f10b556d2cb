"""The training methods, in one table: every list of methods, CLI choice and dispatch reads it.

    METHODS["sft"].config           # SFTSpec, our pydantic settings
    METHODS["sft"].build_set(...)   # the SFT rows out of the store
    METHODS["sft"].train(...)       # TRL + PEFT, locally
    METHODS["rft"].hosted_type      # "reinforcement": the platform's `method.type`

A method is named once here, beside what it builds; `load_train_config`, the wheel's training
stages, `flywheel train <method>`, the hosted backend and the training-set formats derive from it.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from pydantic import ValidationError

from flywheel.errors import SpecError
from flywheel.spec import apply_overrides, read_yaml
from flywheel.train.config import DPOSpec, RFTSpec, SFTSpec, TrainConfig
from flywheel.train.dpo import train_dpo
from flywheel.train.rft import train_rft
from flywheel.train.sets import build_dpo_set, build_rft_set, build_sft_set
from flywheel.train.sft import train_sft


# A platform hyper-parameter: (type, lowest, highest, whether the lowest is allowed), its OpenAPI range.
HostedRange = tuple[type, float, float, bool]
# The platform's hyper-parameters of every method; a method's own are `TrainingMethod.hosted_hyperparameters`.
HOSTED_HYPERPARAMETERS: dict[str, HostedRange] = {
    "n_epochs": (int, 1, 50, True), "batch_size": (int, 1, 256, True),
    "learning_rate_multiplier": (float, 0, 100, False)}


@dataclass(frozen=True)
class TrainingMethod:
    """One training method: its name (CLI word, store `method`, training-set format), settings,
    how its set is built from the store, its local trainer and the platform's name for it."""

    name: str
    summary: str
    config: type[TrainConfig]
    set_builder: Callable[..., Any]
    trainer: Callable[..., Any]
    hosted_type: str
    set_options: tuple[str, ...] = ()  # the stage settings its set builder takes
    needs_store: bool = True  # RFT prompts come from the eval's items alone
    starts_tuned: bool = False  # polishes a tuned model (the platform's advice: SFT first)
    # the platform's numeric hyper-parameters of this method beyond HOSTED_HYPERPARAMETERS
    hosted_hyperparameters: dict[str, HostedRange] = field(default_factory=dict)
    validation_loss: bool = True  # the trainer has a loss on held-out rows (GRPO has none)
    grader_rewards: bool = False  # trains on the eval's graders as rewards (the platform's job names one grader)

    def build_set(self, spec, store, **options: Any):
        """The method's training set for `spec` (options: prompt, min_score, max_per_item, min_margin, ...)."""
        options = {k: v for k, v in options.items() if v is not None}
        return self.set_builder(spec, store, **options) if self.needs_store else self.set_builder(spec, **options)

    def train(self, spec, store, training_set, **options: Any):
        """Train locally with TRL + PEFT (see the method's module), register and optionally evaluate."""
        return self.trainer(spec, store, training_set, **options)


METHODS: dict[str, TrainingMethod] = {m.name: m for m in (
    TrainingMethod("sft", "supervised fine-tuning on passing outputs", SFTSpec, build_sft_set, train_sft,
                   "supervised", set_options=("min_score", "max_per_item")),
    TrainingMethod("dpo", "preference optimisation on best-vs-worst outputs", DPOSpec, build_dpo_set, train_dpo,
                   "dpo", set_options=("min_margin",), starts_tuned=True,
                   hosted_hyperparameters={"beta": (float, 0, 2, False)}),
    TrainingMethod("rft", "reward-based fine-tuning (GRPO) with the eval's graders as rewards", RFTSpec,
                   build_rft_set, train_rft, "reinforcement", needs_store=False, starts_tuned=True,
                   hosted_hyperparameters={"compute_multiplier": (float, 0.00001, 10, False),
                                           "eval_interval": (int, 1, 10**6, True),
                                           "eval_samples": (int, 1, 10**6, True)},
                   validation_loss=False, grader_rewards=True),
)}
HOSTED_TYPES: tuple[str, ...] = tuple(m.hosted_type for m in METHODS.values())  # the platform's `method.type`s


def training_method(name: str) -> TrainingMethod:
    """The method called `name`; SpecError lists the known ones."""
    try:
        return METHODS[name]
    except KeyError:
        raise SpecError(f"unknown training method {name!r}; known: {', '.join(METHODS)}") from None


def hosted_method(hosted_type: str) -> TrainingMethod:
    """The method the platform calls `hosted_type` (supervised, dpo, reinforcement); SpecError lists them."""
    for method in METHODS.values():
        if method.hosted_type == hosted_type:
            return method
    raise SpecError(f"unknown platform method type {hosted_type!r}; known: {', '.join(HOSTED_TYPES)}")


def format_config_error(source: str, exc: ValidationError) -> str:
    """One `source: field: message` line per error of a training config (a check across fields names
    its fields itself: `source: message`)."""
    lines = []
    for err in exc.errors():
        loc = ".".join(str(p) for p in err["loc"])
        message = "unknown field" if err["type"] == "extra_forbidden" else err["msg"]
        message = message.removeprefix("Value error, ")
        # A check across fields (TrainConfig._validation_fits_together) names its fields itself.
        lines.append(f"{source}: {loc}: {message}" if loc else f"{source}: {message}")
    return "\n".join(lines)


def load_train_config(method: str, path: str | Path | None = None, overrides: list[str] | None = None,
                      values: dict[str, Any] | None = None) -> TrainConfig:
    """The settings of `method` from an optional YAML file (or `values`) plus `key.path=value` overrides.

    >>> load_train_config("sft", overrides=["epochs=3", "lora.r=8"]).lora.r
    8
    """
    config_class = training_method(method).config
    source = str(path) if path else "train config"
    data: dict[str, Any] = read_yaml(Path(path)) if path else dict(values or {})
    data = apply_overrides(data, overrides or [], source)
    try:
        return config_class.model_validate(data)
    except ValidationError as exc:
        raise SpecError(format_config_error(source, exc)) from None
