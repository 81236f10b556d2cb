"""Serving aliases: `production` and `candidate` -> (model, prompt), switched atomically and reversibly.

Every change is one store transaction that moves the alias and records a switch naming who, why
and the test that decided (`Store.switch_service_aliases`). A promotion swaps the two aliases (the
previous production becomes `candidate`, so the canary can pair the new production with it); a
rollback reverses the newest forward switch of `production` and idles `candidate` on the restored
target (an alias equal to production gets no shadow traffic).

    promote(store, who="shadow", why="better", test="betting confidence sequence ...")
    rollback(store, who="alice", why="complaints")
"""

from __future__ import annotations

from typing import Any

import yaml

from flywheel.errors import FlywheelError
from flywheel.prompt import Prompt
from flywheel.service.spec import ALIASES, PromptSourceSpec, ServiceSpec
from flywheel.store import Store
from flywheel.store.service import AliasSwitch, AliasTarget


class AliasError(FlywheelError):
    """An alias cannot be switched as asked (unknown name, nothing to roll back, never set)."""


def _check(alias: str) -> None:
    if alias not in ALIASES:
        raise AliasError(f"unknown alias {alias!r}; the service serves {', '.join(ALIASES)}")


def target(store: Store, alias: str) -> AliasTarget:
    """The alias's current target; AliasError when it was never set."""
    _check(alias)
    found = store.service_alias(alias)
    if found is None:
        raise AliasError(f"alias {alias!r} is not set yet: start the service with its service.yaml first")
    return found


def stored_prompt(store: Store, spec: ServiceSpec, value: str | PromptSourceSpec | None, field: str) -> str | None:
    """The id of the stored prompt a service.yaml `prompt:` names (a text, `{file}` or `{id}`), storing
    it first when it is new; AliasError naming the field when it cannot be read."""
    if value is None:
        return None
    if isinstance(value, str):
        prompt = Prompt(messages=[{"role": "system", "content": value}])
    elif value.id is not None:
        if store.prompt_row(value.id) is None:
            raise AliasError(f"{spec.source}: {field}.id: no prompt {value.id} in {store.path}")
        return value.id
    else:
        path = spec.path(value.file)
        try:
            prompt = Prompt.from_json(yaml.safe_load(path.read_text(encoding="utf-8")))
        except OSError as exc:
            raise AliasError(f"{spec.source}: {field}.file: cannot read {path}: {exc.strerror}") from None
        except (yaml.YAMLError, KeyError, TypeError, AttributeError) as exc:
            raise AliasError(f"{spec.source}: {field}.file: {path} is not a prompt (messages, demos, nearest): "
                             f"{type(exc).__name__}: {exc}") from None
        bad = next((i for i, m in enumerate(prompt.messages) if not isinstance(m, dict)
                    or not isinstance(m.get("role"), str) or "content" not in m), None)
        if bad is not None or not isinstance(prompt.nearest, int):
            where = f"messages[{bad}] needs a role and a content" if bad is not None else "nearest is not a number"
            raise AliasError(f"{spec.source}: {field}.file: {path} is not a prompt: {where}")
    store.save_prompt(prompt, origin=f"service.yaml {field}")
    return prompt.id


_PROMPTS: dict[str, Prompt] = {}  # by id, a content hash: a cached prompt never goes stale


def prompt_of(store: Store, target: AliasTarget) -> Prompt | None:
    """The stored prompt a target serves (None: the app's messages as sent); read once per process."""
    if target.prompt is None:
        return None
    if target.prompt not in _PROMPTS:
        if len(_PROMPTS) >= 256:
            _PROMPTS.clear()
        _PROMPTS[target.prompt] = Prompt.from_json(store.get_prompt(target.prompt))
    return _PROMPTS[target.prompt]


def served_messages(prompt: Prompt | None, messages: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """The app's messages as a target with this prompt answers them (`Prompt.apply`)."""
    return prompt.apply(messages) if prompt is not None else messages


def ensure_aliases(store: Store, spec: ServiceSpec) -> dict[str, AliasTarget]:
    """Set each alias the spec names that the store does not hold yet (a restart changes nothing)."""
    first = {"production": AliasTarget(spec.production.model,
                                       stored_prompt(store, spec, spec.production.prompt, "production.prompt"))}
    first["candidate"] = (AliasTarget(spec.candidate.model,
                                      stored_prompt(store, spec, spec.candidate.prompt, "candidate.prompt"))
                          if spec.candidate else first["production"])
    missing = {alias: t for alias, t in first.items() if store.service_alias(alias) is None}
    if missing:
        store.switch_service_aliases(missing, who="service.yaml", why=f"first target from {spec.source}", test=None)
    return store.service_aliases()


def set_alias(store: Store, alias: str, new: AliasTarget, *, who: str, why: str, test: str | None = None) -> int:
    """Point one alias at a new target (a lap's student goes to `candidate` this way); the switch id."""
    _check(alias)
    if new.prompt is not None and store.prompt_row(new.prompt) is None:  # serving would fail on every request
        raise AliasError(f"{alias} -> {new.model}: prompt {new.prompt} is not in {store.path}; store it first "
                         "(stored_prompt)")
    return store.switch_service_aliases({alias: new}, who=who, why=why, test=test, kind="set")[0]


def promote(store: Store, *, who: str, why: str, test: str) -> int:
    """`production` <- candidate's target, `candidate` <- the previous production, in one
    transaction; the id of production's switch (the canary's key)."""
    old, new = target(store, "production"), target(store, "candidate")
    if old == new:
        raise AliasError("candidate serves what production serves: nothing to promote")
    ids = store.switch_service_aliases({"production": new, "candidate": old}, who=who, why=why, test=test,
                                       kind="promote")
    return ids[0]


def reject(store: Store, *, who: str, why: str, test: str) -> int:
    """Stop a candidate: `candidate` <- production's target (no more shadow traffic)."""
    return _idle_candidate(store, "reject", who=who, why=why, test=test)


def keep(store: Store, *, who: str, why: str, test: str) -> int:
    """End a canary that showed no drop: `candidate` <- production's target, so the previous
    production gets no more traffic and the next lap may start (the promotion stays reversible
    with `rollback`)."""
    return _idle_candidate(store, "keep", who=who, why=why, test=test)


def _idle_candidate(store: Store, kind: str, *, who: str, why: str, test: str) -> int:
    return store.switch_service_aliases({"candidate": target(store, "production")}, who=who, why=why, test=test,
                                        kind=kind)[0]


def rollback(store: Store, *, who: str, why: str, test: str | None = None, alias: str = "production") -> AliasSwitch:
    """Reverse the newest forward switch of `alias` that is not undone yet; the rollback switch.
    Rolling back production also idles `candidate` on the restored target."""
    _check(alias)
    undo = store.switch_to_revert(alias)
    if undo is None:
        raise AliasError(f"nothing to roll back: {alias!r} has had no switch since its first target")
    targets = {alias: undo.from_target}
    if alias == "production":
        targets["candidate"] = undo.from_target
    ids = store.switch_service_aliases(targets, who=who, why=why, test=test, kind="rollback",
                                       reverts={alias: undo.id})
    return store.service_switch(ids[0])
