"""service.yaml: what `flywheel serve --flywheel service.yaml` runs (flywheel.service).

    service = load_service_spec("examples/service/service.yaml")

It names the eval whose reference-free graders score live answers, the run spec whose promotion
rule a lap's offline gate uses, the triggers of a lap, the serving aliases and their first targets,
the shadow and canary tests, budgets, and the ports of the one process group. Loading reports
every problem as `file: field: message`.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from pydantic import BaseModel, ConfigDict, Field, model_validator

from flywheel.spec import load_spec_file

ALIASES = ("production", "candidate")


class _Spec(BaseModel):
    model_config = ConfigDict(extra="forbid")


class PromptSourceSpec(_Spec):
    """A whole prompted system: a prompt file, or a prompt stored in the service's store."""

    file: str | None = Field(default=None, description="A prompt file (JSON or YAML: `messages`, optional "
                             "`demos` and `nearest`), as `flywheel export prompt` writes it; relative to this file.")
    id: str | None = Field(default=None, description="A prompt stored in the service's store (p-...), e.g. the "
                           "best one a `flywheel run` on the same store found.")

    @model_validator(mode="after")
    def _one_source(self) -> "PromptSourceSpec":
        if (self.file is None) == (self.id is None):
            raise ValueError("give exactly one of `file` or `id`")
        return self


PROMPT_DESCRIPTION = ("System prompt text, or `{file: ...}` / `{id: p-...}` for a prompt with demonstrations "
                      "(fixed, or the `nearest` k to each request); its system messages replace the app's and "
                      "its demonstrations go before the app's last user turn.")


class AliasSpec(_Spec):
    """A serving alias's first target (later ones are switches recorded in the store)."""

    model: str = Field(description="Model reference the alias serves (local:..., local:BASE+ADAPTER, openai:...).")
    prompt: str | PromptSourceSpec | None = Field(default=None, description=PROMPT_DESCRIPTION + " None: the "
                                                  "app's messages as sent.")


class TriggerSpec(_Spec):
    """When a lap starts; any trigger that fires starts one (`flywheel service lap` always can)."""

    new_captures: int | None = Field(default=None, ge=1, description="Start a lap when this many new answered "
                                     "captures matching `metadata` arrived since the last lap.")
    metadata: dict[str, str] = Field(default_factory=dict, description="Only captures whose request metadata has "
                                     "these values count and become training data.")
    every_s: float | None = Field(default=None, gt=0, description="Start a lap on this schedule (seconds between "
                                  "laps), when there is at least one new capture.")
    check_every_s: float = Field(default=5.0, gt=0, description="How often the scheduler looks at the triggers.")


class ShadowSpec(_Spec):
    """The candidate answers a share of live requests off the request path; both answers are graded."""

    share: float = Field(default=0.2, ge=0, le=1, description="Share of live requests the candidate answers too.")
    alpha: float = Field(default=0.05, gt=0, lt=0.5, description="Error rate of the always-valid sequential test.")
    margin: float = Field(default=0.02, ge=0, lt=1, description="Non-inferiority margin for a cheaper candidate.")
    min_pairs: int = Field(default=20, ge=1, description="No shadow decision before this many graded pairs.")
    queue: int = Field(default=256, ge=1, description="Most shadow requests waiting; past it new ones are "
                       "dropped (never the user's request).")


class CanarySpec(_Spec):
    """After a switch the previous production answers a share of requests; a drop rolls back."""

    share: float = Field(default=0.2, ge=0, le=1, description="Share of live requests also sent to the previous "
                         "production after a switch.")
    pairs: int = Field(default=100, ge=1, description="Pairs after which a switch that showed no drop is kept.")
    margin: float = Field(default=0.02, ge=0, lt=1, description="A drop beyond this margin rolls back.")
    alpha: float = Field(default=0.05, gt=0, lt=0.5, description="Error rate of the sequential test.")


class LimitSpec(_Spec):
    wall_s: float | None = Field(default=None, gt=0, description="Most wall-clock seconds.")
    model_calls: int | None = Field(default=None, ge=1, description="Most model calls (teacher and evaluations).")
    money: float | None = Field(default=None, gt=0, description="Most spend on priced (openai:) models.")
    training_steps: int | None = Field(default=None, ge=1, description="Most optimiser steps.")


class BudgetSpec(_Spec):
    per_lap: LimitSpec = Field(default_factory=LimitSpec, description="Limits one lap may not pass; a lap "
                               "whose planned work passes them does not start.")
    per_day: LimitSpec = Field(default_factory=LimitSpec, description="Limits of all laps started in 24 hours.")


class LapSpec(_Spec):
    """What a lap does with the new traffic."""

    teacher: str | None = Field(default=None, description="Model that labels the new inputs; none: production's "
                                "recorded answers are the labels.")
    student: str | None = Field(default=None, description="Base model trained; none: production's model.")
    method: str = Field(default="sft", description="Training method (a row of flywheel.train.methods).")
    train: dict[str, Any] = Field(default_factory=lambda: {"max_steps": 20}, description="The method's training "
                                  "settings (flywheel.train.methods.load_train_config values: max_steps, lora, ...).")
    prompt: str | PromptSourceSpec | None = Field(default=None, description="The prompt the student is trained "
                                                  "and served with (" + PROMPT_DESCRIPTION + "); none: production's.")
    votes: int = Field(default=1, ge=1, le=16, description="Teacher samples per unlabelled input "
                       "(self-consistency: the majority answer is the label).")
    holdout: float = Field(default=0.2, ge=0, lt=1, description="Share of the new traffic held back from "
                           "training for the offline gate.")
    max_captures: int = Field(default=2000, ge=1, description="Most captures one lap takes.")
    history: int = Field(default=0, ge=0, description="Also use up to this many earlier captures (the newest "
                         "before the lap's own): the student trains on the traffic seen so far, not one lap's worth, "
                         "and their held-back share that the current production answered joins the gate. 0: new "
                         "traffic only.")


class PortsSpec(_Spec):
    host: str = Field(default="127.0.0.1", description="Interface every part listens on.")
    proxy: int = Field(default=8080, ge=0, le=65535, description="The app's base URL: the capture proxy.")
    models: int = Field(default=8081, ge=0, le=65535, description="The alias model server.")
    api: int = Field(default=8082, ge=0, le=65535, description="The API and review app (dashboard).")


class ServiceSpec(_Spec):
    eval: str = Field(description="The eval spec (relative to this file): its graders that need no reference "
                      "grade live answers; its valid split is the offline gate.")
    run: str | None = Field(default=None, description="Run spec whose goal (minimise, margin) and alpha the "
                            "offline gate uses; none: the defaults.")
    db: str = Field(default="flywheel.db", description="The store (relative to this file).")
    production: AliasSpec = Field(description="What `production` serves before any switch.")
    candidate: AliasSpec | None = Field(default=None, description="What `candidate` serves before the first lap.")
    triggers: TriggerSpec = Field(default_factory=TriggerSpec, description="When laps start.")
    lap: LapSpec = Field(default_factory=LapSpec, description="What a lap does.")
    shadow: ShadowSpec = Field(default_factory=ShadowSpec, description="The shadow gate.")
    canary: CanarySpec = Field(default_factory=CanarySpec, description="The canary after a switch.")
    budgets: BudgetSpec = Field(default_factory=BudgetSpec, description="Per-lap and per-day budgets.")
    redact: bool = Field(default=True, description="Redact PII (flywheel.privacy) in captures before they are "
                         "stored and become training data.")
    retention_days: float | None = Field(default=None, gt=0, description="Purge captures older than this (at start "
                                         "and hourly, with a recorded deletion): no lap trains on them after.")
    ports: PortsSpec = Field(default_factory=PortsSpec, description="Where the parts listen.")

    source: str = Field(default="<service spec>", exclude=True, description="The spec file, for errors.")
    base_dir: Path = Field(default=Path("."), exclude=True, description="Folder of the spec file.")

    @model_validator(mode="after")
    def _distinct_ports(self) -> "ServiceSpec":
        ports = [p for p in (self.ports.proxy, self.ports.models, self.ports.api) if p]
        if len(set(ports)) != len(ports):
            raise ValueError(f"ports: proxy, models and api must differ, got {ports}")
        return self

    def path(self, relative: str) -> Path:
        """A path of the spec, resolved against its folder."""
        return (self.base_dir / relative).resolve()


def load_service_spec(path: str | Path, overrides: list[str] | None = None) -> ServiceSpec:
    """Load and validate a service spec; SpecError with `file: field: message` lines."""
    return load_spec_file(path, ServiceSpec, overrides)
