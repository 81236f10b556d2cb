"""The service's dashboard data (flywheel.service): aliases, switches, laps, and per model the online
score with a bootstrap CI, tokens per request (cost per 1,000 requests) and latency percentiles
over the shadow/canary pairs, also window by window over time, and each lap's offline-gate
iterations (the dashboard links a lap to its samples). `flywheel service status` prints it; the
review app's `/service` page renders it. Behind every point: `pairs_page` (the pairs of a model or a
window, `/service/pairs`) and `capture_view` (one live request with its pairs, `/service/captures/ID`)."""

from __future__ import annotations

import json
import math
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from flywheel.capture_rows import loads_json, reply_message
from flywheel.errors import StoreError
from flywheel.images import describe_content
from flywheel.stats import mean_ci
from flywheel.store import Store
from flywheel.store.rows import Capture
from flywheel.store.service import AliasSwitch, AliasTarget, ServiceLap, ShadowPair


@dataclass(frozen=True)
class ModelScore:
    """One model's online figures over the pairs it answered in."""

    model: str
    pairs: int
    score: float
    ci_low: float
    ci_high: float
    tokens_per_request: float
    latency_p50_s: float
    latency_p95_s: float


@dataclass(frozen=True)
class ScoreWindow:
    """Consecutive pairs of one phase and switch: both sides' online scores over that stretch."""

    first_at: str
    last_at: str
    phase: str
    switch_id: int
    scores: list[ModelScore]
    first_pair_id: int | None = None  # the stretch's pairs: ids in [first, last] of this phase and switch
    last_pair_id: int | None = None


GATE_SIDES = ("production", "student")


def gate_run_id(lap_id: str, side: str) -> str:
    """The harness run of one side of a lap's offline gate on the eval's valid split
    (flywheel.service.laps.offline_valid), which the dashboard links to."""
    return f"{lap_id}-{side}"


@dataclass(frozen=True)
class ServiceSummary:
    aliases: dict[str, AliasTarget]
    switches: list[AliasSwitch]
    laps: list[ServiceLap]
    scores: list[ModelScore] = field(default_factory=list)
    requests: int = 0  # production captures
    windows: list[ScoreWindow] = field(default_factory=list)
    # lap id -> the iterations (production, student) of its offline gate on valid, for its samples
    gates: dict[str, tuple[str, str]] = field(default_factory=dict)
    # stored prompt id -> what it says, for a reader (its system text, how many demonstrations)
    prompts: dict[str, str] = field(default_factory=dict)

    def lines(self) -> list[str]:
        """The summary as lines for a terminal."""
        out = [f"{alias}: {t.model}" + (f" (prompt: {t.prompt[:60]!r})" if t.prompt else "")
               for alias, t in self.aliases.items()]
        out.append(f"requests to production: {self.requests}")
        out += [f"  {s.model}: online score {s.score:.3f} [{s.ci_low:.3f}, {s.ci_high:.3f}] over {s.pairs} pairs, "
                f"{s.tokens_per_request:.0f} tokens/request, latency p50 {s.latency_p50_s * 1000:.0f} ms "
                f"p95 {s.latency_p95_s * 1000:.0f} ms" for s in self.scores]
        out += [f"lap {lap.id}: {lap.status}" + (f", {lap.decision}: {lap.reason}" if lap.decision else "")
                for lap in self.laps[:5]]
        out += [f"switch {s.id} {s.created_at} {s.alias} {s.kind} -> {s.to_target.model} by {s.who}: {s.why}"
                for s in self.switches[:10]]
        return out


def _percentile(values: list[float], q: float) -> float:
    return float(np.percentile(values, q)) if values else math.nan


def model_scores(pairs: list[ShadowPair]) -> list[ModelScore]:
    """Per model, its online score (mean, bootstrap CI), tokens and latency over the pairs."""
    seen: dict[str, list[tuple[float, int | None, float | None]]] = {}
    for p in pairs:
        seen.setdefault(p.production_model, []).append((p.production_score, p.production_tokens, p.production_latency_s))
        if not p.other_error:
            seen.setdefault(p.other_model, []).append((p.other_score, p.other_tokens, p.other_latency_s))
    out = []
    for model, rows in seen.items():
        mean, low, high = mean_ci([r[0] for r in rows])
        tokens = [r[1] for r in rows if r[1] is not None]
        latency = [r[2] for r in rows if r[2] is not None]
        out.append(ModelScore(model, len(rows), mean, low, high, sum(tokens) / len(tokens) if tokens else math.nan,
                              _percentile(latency, 50), _percentile(latency, 95)))
    return out


def score_windows(pairs: list[ShadowPair], size: int = 20) -> list[ScoreWindow]:
    """The pairs cut into windows of `size` within each (phase, switch), oldest first."""
    groups: dict[tuple[str, int], list[ShadowPair]] = {}
    for p in pairs:
        groups.setdefault((p.phase, p.switch_id), []).append(p)
    windows = []
    for (phase, switch_id), rows in groups.items():
        for start in range(0, len(rows), size):
            chunk = rows[start:start + size]
            windows.append(ScoreWindow(chunk[0].created_at or "", chunk[-1].created_at or "", phase, switch_id,
                                       model_scores(chunk), chunk[0].id, chunk[-1].id))
    return sorted(windows, key=lambda w: w.first_at)


def gate_iterations(store: Store, laps: list[ServiceLap]) -> dict[str, tuple[str, str]]:
    """Per lap whose offline gate ran on valid, the (production, student) iterations it paired."""
    out = {}
    for lap in laps:
        sides = [store.iterations(gate_run_id(lap.id, side)) for side in GATE_SIDES]
        if all(sides):
            out[lap.id] = (sides[0][-1].id, sides[1][-1].id)
    return out


def describe_prompt(store: Store, prompt_id: str) -> str:
    """A stored prompt in one line: its system text and its demonstrations."""
    data = store.get_prompt(prompt_id)
    text = " ".join(m.get("content", "") for m in data["messages"] if m.get("role") == "system"
                    and isinstance(m.get("content"), str)) or "(no system message)"
    demos = len(data.get("demos") or [])
    if demos:
        text += f" + {data['nearest']} nearest of {demos} demonstrations" if data.get("nearest") else \
            f" + {demos} demonstrations"
    return text


def service_summary(store: Store) -> ServiceSummary:
    """Everything `flywheel service status` and the dashboard show."""
    pairs = store.shadow_pairs()
    laps = store.service_laps(limit=50)
    served = store.service_aliases()
    return ServiceSummary(aliases=served, switches=store.service_switches(limit=50),
                          laps=laps, scores=model_scores(pairs),
                          requests=len(store.captures_after(0, models=["production"])), windows=score_windows(pairs),
                          gates=gate_iterations(store, laps),
                          prompts={t.prompt: describe_prompt(store, t.prompt) for t in served.values() if t.prompt})


PAIRS_PAGE_SIZE = 100


@dataclass(frozen=True)
class PairsPage:
    """One page of the pairs behind a dashboard point, newest first."""

    pairs: list[ShadowPair]
    next_before: int | None  # the cursor (`before`) of the next, older page; None on the last page


def pairs_page(store: Store, *, before: int | None = None, size: int = PAIRS_PAGE_SIZE,
               **filters: Any) -> PairsPage:
    """The pairs `Store.shadow_pairs` selects with `filters` (phase, switch_id, model, first_id,
    last_id, since, until), newest first, `size` of them with ids below `before`."""
    rows = store.shadow_pairs(**filters, before=before, limit=size + 1, newest_first=True)
    return PairsPage(rows[:size], rows[size - 1].id if len(rows) > size else None)


@dataclass(frozen=True)
class CaptureView:
    """One capture as stored (redacted when the proxy redacts), read for a page."""

    capture: Capture
    messages: list[tuple[str, str]]  # the request's messages: (role, text; images as [image: REF])
    request_fields: str  # the request's other fields as stored (JSON), or its raw text when not JSON
    reply: str | None  # the reply's text (a tool call as its JSON); None when the response holds none
    response: str  # the response as stored (JSON pretty-printed), or its raw text
    metadata: dict[str, Any]
    pairs: list[ShadowPair]  # its shadow and canary pairs, oldest first


def _pretty(value: Any, raw: str | None) -> str:
    return (raw or "") if value is None else json.dumps(value, indent=2, ensure_ascii=False)


def _message_text(message: Any) -> tuple[str, str]:
    if not isinstance(message, dict):
        return "", json.dumps(message, ensure_ascii=False)
    text = describe_content(message.get("content"))
    if message.get("tool_calls"):
        text += ("\n" if text else "") + json.dumps(message["tool_calls"], ensure_ascii=False)
    return str(message.get("role", "")), text


def capture_view(store: Store, capture_id: int) -> CaptureView:
    """The capture with this id and its pairs; a StoreError when there is none."""
    found = store.query_captures(ids=[capture_id]) if 0 <= capture_id < 2 ** 63 else []  # SQLite's integers
    if not found:
        raise StoreError(f"no capture with id {capture_id}")
    capture = found[0]
    request, response = loads_json(capture.request_json), loads_json(capture.response_json)
    messages = request.get("messages") if isinstance(request, dict) else None
    fields = {k: v for k, v in request.items() if k != "messages"} if isinstance(messages, list) else request
    reply = reply_message(response)
    metadata = loads_json(capture.metadata_json)
    return CaptureView(capture=capture, messages=[_message_text(m) for m in messages or []],
                       request_fields=_pretty(fields, None if isinstance(messages, list) else capture.request_json),
                       reply=None if reply is None else _message_text(reply)[1], response=_pretty(response, capture.response_json),
                       metadata=metadata if isinstance(metadata, dict) else {},
                       pairs=store.shadow_pairs(capture_id=capture_id))
