"""The service's tables (flywheel.service): serving aliases and their switches, shadow/canary pairs,
laps. An alias change is one transaction: the alias row and the switch that records who, why and
which test move together, so a killed process leaves the old target or the new one, never half.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

from flywheel.errors import StoreError
from flywheel.store.db import StoreBase, now


@dataclass(frozen=True)
class AliasTarget:
    """What an alias serves: a model reference and the id of a stored prompt (`prompts`: instructions and
    demonstrations, applied to the app's messages by `flywheel.prompt.Prompt.apply`); no prompt: the
    app's messages as sent."""

    model: str
    prompt: str | None = None


@dataclass(frozen=True)
class AliasSwitch:
    """One recorded change of an alias (`kind`: set, promote, reject, keep, rollback)."""

    id: int
    created_at: str
    alias: str
    from_target: AliasTarget | None
    to_target: AliasTarget
    who: str
    why: str
    test: str | None
    kind: str
    reverts: int | None


@dataclass(frozen=True)
class ShadowPair:
    """Production's and the other alias's online grades on the same live request."""

    capture_id: int
    phase: str  # shadow (candidate before a switch) or canary (the previous production after one)
    switch_id: int
    production_model: str
    other_model: str
    production_score: float
    other_score: float
    production_latency_s: float | None = None
    other_latency_s: float | None = None
    production_tokens: int | None = None
    other_tokens: int | None = None
    other_error: str | None = None
    created_at: str | None = None
    id: int | None = None  # the recorded pair's row id (None before `add_shadow_pair`)


@dataclass(frozen=True)
class ServiceLap:
    """A lap: the captures (id range) it consumed, its status and decision."""

    id: str
    created_at: str
    trigger: str
    status: str  # queued, running, succeeded, failed, skipped
    first_capture_id: int | None
    last_capture_id: int | None
    captures: int
    checkpoint: str | None = None
    decision: str | None = None
    reason: str | None = None
    finished_at: str | None = None


def _target(model: str | None, prompt: str | None) -> AliasTarget | None:
    return AliasTarget(model, prompt) if model else None


def _switch(row: dict[str, Any]) -> AliasSwitch:
    return AliasSwitch(id=row["id"], created_at=row["created_at"], alias=row["alias"],
                       from_target=_target(row["from_model"], row["from_prompt"]),
                       to_target=AliasTarget(row["to_model"], row["to_prompt"]), who=row["who"], why=row["why"],
                       test=row["test"], kind=row["kind"], reverts=row["reverts"])


class ServiceStore(StoreBase):
    """Serving aliases, their switches, shadow pairs and laps."""

    # -- aliases -------------------------------------------------------------------------------
    def service_alias(self, alias: str) -> AliasTarget | None:
        """The alias's current target, None when it was never set."""
        row = self.db.execute("select model, prompt from service_aliases where alias = ?", [alias]).fetchone()
        return AliasTarget(row[0], row[1]) if row else None

    def service_aliases(self) -> dict[str, AliasTarget]:
        """Every alias and its target."""
        return {alias: AliasTarget(model, prompt) for alias, model, prompt
                in self.db.execute("select alias, model, prompt from service_aliases order by alias")}

    def switch_service_aliases(self, targets: dict[str, AliasTarget], *, who: str, why: str, test: str | None,
                               kind: str = "set", reverts: dict[str, int] | None = None) -> list[int]:
        """Point each alias at its target in ONE transaction, recording a switch per alias; the ids."""
        if not who or not why:
            raise StoreError("an alias switch needs who and why")
        ids = []
        with self.transaction():
            for alias, target in targets.items():
                old = self.service_alias(alias)
                cursor = self.db.conn.execute(
                    "insert into service_switches (created_at, alias, from_model, from_prompt, to_model, to_prompt, "
                    "who, why, test, kind, reverts) values (?,?,?,?,?,?,?,?,?,?,?)",
                    [now(), alias, old.model if old else None, old.prompt if old else None, target.model,
                     target.prompt, who, why, test, kind, (reverts or {}).get(alias)])
                ids.append(cursor.lastrowid)
                self.db.conn.execute(
                    "insert into service_aliases (alias, model, prompt, switch_id, updated_at) values (?,?,?,?,?) "
                    "on conflict(alias) do update set model = excluded.model, prompt = excluded.prompt, "
                    "switch_id = excluded.switch_id, updated_at = excluded.updated_at",
                    [alias, target.model, target.prompt, cursor.lastrowid, now()])
        return ids

    def service_switches(self, alias: str | None = None, limit: int | None = None) -> list[AliasSwitch]:
        """Recorded switches, newest first."""
        sql = "select * from service_switches" + (" where alias = ?" if alias else "") + " order by id desc"
        if limit:
            sql += f" limit {int(limit)}"
        return [_switch(row) for row in self.db.query(sql, [alias] if alias else [])]

    def service_switch(self, switch_id: int) -> AliasSwitch | None:
        row = next(iter(self.db.query("select * from service_switches where id = ?", [switch_id])), None)
        return _switch(row) if row else None

    def current_switch(self, alias: str) -> AliasSwitch | None:
        """The switch that set the alias's current target."""
        row = self.db.execute("select switch_id from service_aliases where alias = ?", [alias]).fetchone()
        return self.service_switch(row[0]) if row and row[0] is not None else None

    def switch_to_revert(self, alias: str) -> AliasSwitch | None:
        """The newest switch of `alias` that moved it forward (not a rollback, not the first set)
        and is not undone yet: what `rollback` reverses."""
        undone = {s.reverts for s in self.service_switches(alias) if s.kind == "rollback"}
        for switch in self.service_switches(alias):
            if switch.kind != "rollback" and switch.id not in undone and switch.from_target is not None:
                return switch
        return None

    # -- shadow and canary pairs ---------------------------------------------------------------
    PAIR_COLUMNS = ("created_at", "capture_id", "phase", "switch_id", "production_model", "other_model",
                    "production_score", "other_score", "production_latency_s", "other_latency_s",
                    "production_tokens", "other_tokens", "other_error")

    def add_shadow_pair(self, pair: ShadowPair) -> bool:
        """Record one pair; False when this capture was already paired in this phase and switch."""
        values = [getattr(pair, c) for c in self.PAIR_COLUMNS]
        values[0] = values[0] or now()
        with self.transaction():
            cursor = self.db.conn.execute(
                f"insert or ignore into service_shadow_pairs ({', '.join(self.PAIR_COLUMNS)}) values "
                f"({','.join('?' * len(values))})", values)
        return cursor.rowcount == 1

    def shadow_pairs(self, phase: str | None = None, switch_id: int | None = None, *, model: str | None = None,
                     capture_id: int | None = None, first_id: int | None = None, last_id: int | None = None,
                     since: str | None = None, until: str | None = None, before: int | None = None,
                     limit: int | None = None, newest_first: bool = False) -> list[ShadowPair]:
        """Pairs, oldest first (newest first when asked), matching every filter given: the phase and
        switch, a model that answered in them (as production or as the other side), the capture
        paired, pair ids in [first_id, last_id], recorded in [since, until), ids below `before` (a
        page's cursor); at most `limit`."""
        where, params = [], []
        for sql, value in (("phase = ?", phase), ("switch_id = ?", switch_id), ("capture_id = ?", capture_id),
                           ("id >= ?", first_id), ("id <= ?", last_id), ("created_at >= ?", since),
                           ("created_at < ?", until), ("id < ?", before)):
            if value is not None:
                where.append(sql)
                params.append(value)
        if model is not None:
            where.append("(production_model = ? or other_model = ?)")
            params += [model, model]
        sql = "select * from service_shadow_pairs" + (" where " + " and ".join(where) if where else "")
        sql += " order by id desc" if newest_first else " order by id"
        if limit is not None:
            sql += f" limit {int(limit)}"
        return [ShadowPair(**row) for row in self.db.query(sql, params)]

    # -- laps ----------------------------------------------------------------------------------
    def create_service_lap(self, lap_id: str, *, trigger: str, capture_ids: Sequence[int]) -> ServiceLap:
        """Record a lap over these captures (its range is fixed here, so a resumed lap reads the same)."""
        with self.transaction():
            self.db.conn.execute(
                "insert into service_laps (id, created_at, trigger, status, first_capture_id, last_capture_id, "
                "captures) values (?,?,?,?,?,?,?)",
                [lap_id, now(), trigger, "queued", min(capture_ids, default=None), max(capture_ids, default=None),
                 len(capture_ids)])
        return self.service_lap(lap_id)

    def service_lap(self, lap_id: str) -> ServiceLap | None:
        row = next(iter(self.db.query("select * from service_laps where id = ?", [lap_id])), None)
        return ServiceLap(**row) if row else None

    def service_laps(self, limit: int | None = None) -> list[ServiceLap]:
        """Laps, newest first."""
        sql = "select * from service_laps order by created_at desc, id desc" + (f" limit {int(limit)}" if limit else "")
        return [ServiceLap(**row) for row in self.db.query(sql)]

    def update_service_lap(self, lap_id: str, **fields: Any) -> None:
        allowed = {"status", "checkpoint", "decision", "reason", "finished_at"}
        if not fields or set(fields) - allowed:
            raise StoreError(f"service lap fields: {sorted(set(fields) - allowed)}; allowed: {sorted(allowed)}")
        with self.transaction():
            self.db.conn.execute(f"update service_laps set {', '.join(f'{k} = ?' for k in fields)} where id = ?",
                                 [*fields.values(), lap_id])

    def last_lapped_capture(self) -> int:
        """The highest capture id a lap has taken (0 before the first lap). A lap whose job failed or
        was cancelled gives its captures back: laps run one at a time, so the failed lap is the newest
        and the next lap takes its captures again with the new ones."""
        return self.db.execute("select coalesce(max(last_capture_id), 0) from service_laps "
                               "where status not in ('failed', 'cancelled')").fetchone()[0]

    def captures_after(self, capture_id: int, *, upto: int | None = None, metadata: dict[str, str] | None = None,
                       models: Sequence[str] = ()) -> list[dict[str, Any]]:
        """Answered chat captures (status 200, no error) with id in (capture_id, upto], oldest first,
        matching the metadata values and (when given) one of the models."""
        where = ["id > ?", "error is null", "status = 200", "endpoint = '/v1/chat/completions'"]
        params: list[Any] = [capture_id]
        if upto is not None:
            where.append("id <= ?")
            params.append(upto)
        for key, value in (metadata or {}).items():
            where.append("json_extract(metadata_json, ?) = ?")
            params += ['$."' + key.replace('"', '""') + '"', value]
        if models:
            where.append(f"model in ({','.join('?' * len(models))})")
            params += list(models)
        return list(self.db.query("select * from captures where " + " and ".join(where) + " order by id", params))
