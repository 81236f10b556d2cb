"""Which models an API caller may name: the server's model registry (see docs/security.md).

A model reference that arrives over HTTP (a chat call's `model`, an eval run's
`data_source.model`, a fine-tuning base, an inline wheel run's `eval_spec`, a judge inside a
grader) is resolved here, never handed to `flywheel.models.load_model` as it came. For a
`member` or `reader` key (and keyless loopback callers below admin) it must be one of:

* an `ft:` name made by the caller's project (its checkpoint, resolved on the server);
* a local base the server offers: the embedded ones (`local:smollm2`) and those an admin listed
  under `local_bases` in the providers file (`serve --api --providers providers.yaml`);
* an `openai:NAME` model an admin configured for the project, with that provider's own base URL
  and key variable (the caller never gives either).

Never a filesystem path, an adapter folder (`local:base+folder`), a hub id, a server environment
variable or a URL. Every refusal says the same words whether or not a folder exists, so errors
do not map the server's disk. An `admin` key may name any reference (it can already run any spec
file on the server with the `path` form of `POST /v1/flywheel/runs`).

    models = load_server_models("providers.yaml")     # or ServerModels() (embedded bases only)
    resolved = resolve_model(store, "openai:gpt-4o-mini", caller, models, param="model")
    cached_model(resolved.ref, resolved.options)

providers.yaml:

    local_bases: [/srv/models/qwen2.5-0.5b]          # local:/srv/models/qwen2.5-0.5b, as written
    openai:
      - base_url: https://api.openai.com/v1
        api_key_env: TEAM_A_OPENAI_KEY
        models: [gpt-4o-mini]                          # "*": any name
        projects: [team-a]                             # "*": every project
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError

from flywheel.api.access import Caller
from flywheel.api.platform import model_for
from flywheel.errors import FlywheelError, SpecError
from flywheel.models import cached_model, parse_model_ref
from flywheel.models.loading import EMBEDDED
from flywheel.store import Store
from flywheel.web import ApiError

# model_options an API caller may never set: they choose where calls go and which secret goes along
SERVER_ONLY_OPTIONS = ("base_url", "api_key_env")
# Top-level spec fields that name server resources: where evaluations run (`executor.address`: a
# Ray cluster the server would ship items and code to) and a prompt read from the server's own
# store (`prompt: {id}`). An operator's spec file may use them; a key holder's submitted spec may not.
SERVER_ONLY_FIELDS = ("executor", "prompt")
# keys of a submitted spec whose string value is a model reference (task model, teacher, proposer, judge)
MODEL_KEYS = ("model", "teacher")
# values of those keys that name no model but a role in the wheel (capture's teacher: incumbent)
WHEEL_ROLES = ("incumbent",)


class OpenAIProvider(BaseModel):
    """An `openai:` endpoint an admin offers to API callers, with its own URL and key variable."""

    model_config = ConfigDict(extra="forbid")
    base_url: str = Field(description="Server URL ending in /v1.")
    api_key_env: str = Field(description="Server environment variable holding this provider's key.")
    models: list[str] = Field(default=["*"], description="Model names offered (`openai:NAME`); '*': any.")
    projects: list[str] = Field(default=["*"], description="Projects whose keys may use it; '*': every project.")

    def offers(self, name: str, project: str) -> bool:
        return ("*" in self.models or name in self.models) and ("*" in self.projects or project in self.projects)


class ServerModels(BaseModel):
    """The server's model registry for API callers (`serve --api --providers FILE`)."""

    model_config = ConfigDict(extra="forbid")
    local_bases: list[str] = Field(default=[], description="Local bases offered besides the embedded ones, "
                                   "as written after `local:` (a folder or hub id the admin chose).")
    openai: list[OpenAIProvider] = Field(default=[], description="openai: providers offered to API callers.")


def load_server_models(path: str | Path | None) -> ServerModels:
    """The providers file (None: the embedded bases only); SpecError with `file: field: message` lines."""
    if path is None:
        return ServerModels()
    try:
        data = yaml.safe_load(Path(path).read_text(encoding="utf-8")) or {}
    except (OSError, yaml.YAMLError) as exc:
        raise SpecError(f"{path}: cannot read the providers file: {exc}") from None
    try:
        return ServerModels.model_validate(data)
    except ValidationError as exc:
        lines = [f"{path}: {'.'.join(str(p) for p in e['loc']) or '(top)'}: {e['msg']}" for e in exc.errors()]
        raise SpecError("\n".join(lines)) from None


@dataclass(frozen=True)
class ResolvedModel:
    """A reference the server will load, and the options the server (not the caller) adds to it."""

    ref: str
    options: dict[str, Any] = field(default_factory=dict)


def no_access(ref: Any, param: str, status: int = 400) -> ApiError:
    """The one refusal for a model the caller may not name: the same words for a missing folder, an
    existing one, another project's model and an unconfigured provider."""
    return ApiError(status, f"{param}: The model {str(ref)[:200]!r} does not exist or you do not have access to "
                    "it (API callers name the ft: models of their project, the server's local bases and the "
                    "openai: models an admin configured).", param=param, code="model_not_found")


def local_bases(models: ServerModels) -> list[str]:
    return [*EMBEDDED, *models.local_bases]


def resolve_model(store: Store, ref: Any, who: Caller, models: ServerModels, *, param: str,
                  status: int = 400) -> ResolvedModel:
    """The reference `who` may load for `ref` (an `ft:` name becomes its checkpoint's reference); an
    ApiError (`status`, naming `param`) otherwise."""
    if not isinstance(ref, str) or not ref:
        raise ApiError(400, f"{param}: a model reference is required (e.g. local:smollm2).", param=param)
    try:
        resolved = model_for(store, ref, who.project)
    except FlywheelError:
        raise no_access(ref, param, status) from None
    if who.role == "admin" or ref.startswith("ft:"):
        return ResolvedModel(resolved)
    scheme, name, adapter = parse_model_ref(resolved)
    if scheme == "local" and adapter is None and name in local_bases(models):
        return ResolvedModel(resolved)
    if scheme == "openai" and adapter is None:
        for provider in models.openai:
            if provider.offers(name, who.project):
                return ResolvedModel(resolved, {"base_url": provider.base_url, "api_key_env": provider.api_key_env})
    raise no_access(ref, param, status)


def check_options(options: Any, who: Caller, param: str) -> dict[str, Any]:
    """A caller's `model_options`, without what only the server may set (400 naming the field)."""
    if options is None:
        return {}
    if not isinstance(options, dict):
        raise ApiError(400, f"{param}: expected an object.", param=param)
    if who.role != "admin":
        for key in SERVER_ONLY_OPTIONS:
            if key in options:
                raise ApiError(400, f"{param}.{key}: not accepted from an API caller; the server's providers "
                               "file sets where models are called and with which key.", param=f"{param}.{key}")
    return options


def check_judges(store: Store, graders: Any, who: Caller, models: ServerModels, *, param: str) -> Any:
    """Graders (a list, or one grader) with every judge `model` checked; an `ft:` judge becomes its
    checkpoint's reference. Judges of stored specs load without options, so a non-admin's judge is a
    local base or an `ft:` model (an `openai:` judge is offered only by `graders/run`, see
    `judge_loader`)."""
    return _walk(store, graders, who, models, param)


def check_spec(store: Store, spec: dict[str, Any], who: Caller, models: ServerModels, *,
               param: str) -> dict[str, Any]:
    """A submitted eval or run spec with every model reference in it resolved for `who` (the task
    model's provider options added to `model_options`), and no `base_url` / `api_key_env` anywhere."""
    if who.role == "admin":
        return spec
    for key in SERVER_ONLY_FIELDS:
        if spec.get(key) is not None:
            raise ApiError(400, f"{param}.{key}: not accepted from an API caller; it names a server resource "
                           "(docs/security.md).", param=f"{param}.{key}")
    out = _walk(store, {k: v for k, v in spec.items() if k not in ("model", "model_options", "dataset")},
                who, models, param)
    if "dataset" in spec:
        out["dataset"] = spec["dataset"]  # its `model` is a capture filter, not a model call
    if "model" in spec or "model_options" in spec:
        options = check_options(spec.get("model_options"), who, f"{param}.model_options")
        resolved = resolve_model(store, spec.get("model", "local:smollm2"), who, models, param=f"{param}.model")
        out["model"] = resolved.ref
        out["model_options"] = {**options, **resolved.options}
    return out


def _walk(store: Store, value: Any, who: Caller, models: ServerModels, param: str, *,
          providers: bool = False) -> Any:
    if isinstance(value, list):
        return [_walk(store, v, who, models, f"{param}[{i}]", providers=providers) for i, v in enumerate(value)]
    if not isinstance(value, dict):
        return value
    out = {}
    for key, item in value.items():
        where = f"{param}.{key}"
        if key in SERVER_ONLY_OPTIONS and who.role != "admin":
            raise ApiError(400, f"{where}: not accepted from an API caller; the server's providers file sets "
                           "where models are called and with which key.", param=where)
        if key in MODEL_KEYS and isinstance(item, str) and item not in WHEEL_ROLES and who.role != "admin":
            out[key] = _side_model(store, item, who, models, where, providers)
        else:
            out[key] = _walk(store, item, who, models, where, providers=providers)
    return out


def _side_model(store: Store, ref: str, who: Caller, models: ServerModels, param: str, providers: bool) -> str:
    """A judge, teacher or proposer: in a stored spec it loads without options, so only what needs
    none (`providers`: a `graders/run` judge, loaded by `judge_loader` with its provider's options)."""
    resolved = resolve_model(store, _judge_ref(ref), who, models, param=param)
    if providers:
        return ref
    if resolved.options:  # an openai: provider: its URL and key reach only the task model and graders/run
        raise ApiError(400, f"{param}: an openai: model here needs an admin's spec; API callers' judges, teachers "
                       "and proposers are local bases or ft: models of their project.", param=param)
    return resolved.ref


def _judge_ref(ref: str) -> str:
    """A grader's `model` as a reference: no scheme means openai: (as `GraderSet.judge_model` reads it)."""
    return ref if ref.split(":", 1)[0] in ("local", "openai", "ft") else f"openai:{ref}"


def check_run_judges(store: Store, grader: Any, who: Caller, models: ServerModels, *, param: str) -> None:
    """Refuse (400 naming the field) a `graders/run` grader whose judges `who` may not name."""
    if who.role != "admin":
        _walk(store, grader, who, models, param, providers=True)


def judge_loader(store: Store, who: Caller, models: ServerModels) -> Any:
    """A judge resolver for `graders.run_grader` that loads only what `who` may name (providers'
    options included); each judge loads once."""
    def judge(ref: str) -> Any:
        resolved = resolve_model(store, _judge_ref(ref), who, models, param="grader.model")
        return cached_model(resolved.ref, resolved.options or None)

    return judge
