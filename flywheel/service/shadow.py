"""Shadow and canary: a share of live requests is answered by the other alias too, off the request path.

The proxy hands each committed capture to `ShadowWorker.observe` (a dict put on a bounded queue:
no I/O, no waiting; a full queue drops the shadow work, never the user's request). The worker's
thread sends the same request to the other alias, grades both answers with the eval's graders
that the request can feed (reference-free ones always; one reading `{{item.X}}` when the app sent
`X` in the request's metadata), records the pair and applies the online rule:

* **shadow** (production's current switch is no promotion under watch): candidate − production;
  `flywheel.promotion.decide_shadow` promotes (better, or cheaper and non-inferior) or rejects;
* **canary** (right after a promotion, until `canary.pairs` pairs): new production − previous
  production (now `candidate`); `decide_canary` rolls back a drop.

Both use the always-valid confidence sequence of `flywheel.stats`, so testing after every pair
keeps its error rate. Every action is a recorded switch naming the test.
"""

from __future__ import annotations

import json
import logging
import queue
import random
import re
import threading
import time
from dataclasses import dataclass
from typing import Any

import graders

from flywheel.grading import GraderSet
from flywheel.promotion import OnlineVerdict, decide_canary, decide_shadow
from flywheel.service import aliases
from flywheel.service.spec import ServiceSpec
from flywheel.stats import paired_confidence_sequence
from flywheel.store import Store
from flywheel.store.service import ShadowPair

log = logging.getLogger("flywheel.service")
ITEM_FIELD = re.compile(r"\{\{\s*item\.([A-Za-z0-9_]+)")


@dataclass(frozen=True)
class Phase:
    """What the worker pairs now: `shadow` or `canary`, keyed by the switch it watches; None: idle."""

    name: str
    switch_id: int


def current_phase(store: Store, spec: ServiceSpec) -> Phase | None:
    """The gate live pairs feed now (see the module docstring); None when the aliases coincide."""
    production, candidate = store.service_alias("production"), store.service_alias("candidate")
    if production is None or candidate is None or production == candidate:
        return None
    promoted = store.current_switch("production")
    if promoted is not None and promoted.kind == "promote":
        if len(store.shadow_pairs("canary", promoted.id)) < spec.canary.pairs:
            return Phase("canary", promoted.id)
    return Phase("shadow", store.current_switch("candidate").id)


class OnlineGraders:
    """The eval's graders usable on live traffic: each one's `{{item.X}}` fields must all be in the
    request's metadata (reference-free graders read none)."""

    def __init__(self, configs: list[dict[str, Any]]):
        self.configs = configs
        self.needs = [set(ITEM_FIELD.findall(json.dumps(c))) for c in configs]
        self.sets = {i: GraderSet([c]) for i, c in enumerate(configs)}

    def score(self, text: str | None, metadata: dict[str, Any]) -> float | None:
        """Mean score of the usable graders (0 for no answer); None when no grader can judge."""
        usable = [i for i, need in enumerate(self.needs) if need <= set(metadata)]
        if not usable:
            return None
        if text is None:
            return 0.0
        scores = [self.sets[i].grade([graders.make_sample(text)], [metadata])[0][0]["score"] for i in usable]
        return sum(scores) / len(scores)

    def close(self) -> None:
        for grader_set in self.sets.values():
            grader_set.close()


def _reply_text(payload: Any) -> str | None:
    try:
        content = payload["choices"][0]["message"]["content"]
    except (KeyError, IndexError, TypeError):
        return None
    return content if isinstance(content, str) else None


def _tokens(payload: Any) -> int | None:
    usage = payload.get("usage") if isinstance(payload, dict) else None
    return usage.get("total_tokens") if isinstance(usage, dict) else None


class ShadowWorker:
    """A thread pairing live requests with the other alias's answers (see the module docstring)."""

    def __init__(self, db_path: str, spec: ServiceSpec, grader_configs: list[dict[str, Any]], models_url: str,
                 *, seed: int | None = None):
        self.db_path, self.spec, self.models_url = db_path, spec, models_url.rstrip("/")
        self.grader_configs = grader_configs
        self.share = spec.shadow.share
        self.dropped = 0
        self.paired = 0
        self.decisions: list[OnlineVerdict] = []
        self._random = random.Random(seed)
        self._queue: queue.Queue[tuple[int, dict[str, Any]] | None] = queue.Queue(maxsize=spec.shadow.queue)
        self._thread = threading.Thread(target=self._run, name="shadow", daemon=True)
        self._idle = threading.Event()

    # -- the request path: O(1), never blocks ------------------------------------------------
    def observe(self, row: dict[str, Any], capture_id: int) -> None:
        """Take a committed capture: a `production` call answered 200 is shadowed with `share` odds."""
        if row.get("model") != "production" or row.get("status") != 200 or row.get("error"):
            return
        if self.share <= 0 or self._random.random() >= self.share:
            return
        try:
            self._queue.put_nowait((capture_id, row))
        except queue.Full:
            self.dropped += 1

    # -- the worker ---------------------------------------------------------------------------
    def start(self) -> None:
        self._thread.start()

    def stop(self) -> None:
        if self._thread.is_alive():
            self._queue.put(None)
            self._thread.join(timeout=60)

    def drain(self, timeout: float = 120.0) -> bool:
        """Wait until every queued capture is handled (tests, benchmarks); False on timeout."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self._queue.unfinished_tasks == 0:
                return True
            time.sleep(0.02)
        return False

    def _run(self) -> None:
        import httpx2

        store = Store.open(self.db_path)
        scorer = OnlineGraders(self.grader_configs)
        client = httpx2.Client(timeout=120.0)
        try:
            while True:
                item = self._queue.get()
                try:
                    if item is None:
                        return
                    self.handle(store, scorer, client, *item)
                except Exception as exc:  # noqa: BLE001 - one bad pair must not stop the shadow
                    log.warning("shadow: capture %s: %s: %s", item[0] if item else "-", type(exc).__name__, exc)
                finally:
                    self._queue.task_done()
        finally:
            client.close()
            scorer.close()
            store.close()

    def handle(self, store: Store, scorer: OnlineGraders, client: Any, capture_id: int, row: dict[str, Any]) -> None:
        """Pair one capture, record the pair, apply the rule of the phase."""
        phase = current_phase(store, self.spec)
        if phase is None:
            return
        # A request that arrived before the aliases last moved may have been answered by the old
        # target: it cannot be attributed, so it is not paired.
        moved = max(s.created_at for s in (store.current_switch("production"), store.current_switch("candidate")))
        if row["created_at"] <= moved:
            return
        self.share = self.spec.canary.share if phase.name == "canary" else self.spec.shadow.share
        body = json.loads(row["request_json"])
        metadata = {k: v for k, v in (body.get("metadata") or {}).items() if isinstance(v, str)}
        production_reply = json.loads(row["response_json"])
        production_score = scorer.score(_reply_text(production_reply), metadata)
        if production_score is None:
            return
        body.update(model="candidate", stream=False)
        body.pop("metadata", None)
        started = time.perf_counter()
        error, other_reply = None, None
        try:
            response = client.post(self.models_url + "/chat/completions", json=body)
            other_reply = response.json()
            if response.status_code != 200:
                error = f"HTTP {response.status_code}: {str(other_reply)[:200]}"
        except Exception as exc:  # noqa: BLE001 - an unreachable candidate scores 0
            error = f"{type(exc).__name__}: {exc}"
        latency = time.perf_counter() - started
        other_score = scorer.score(None if error else _reply_text(other_reply), metadata) or 0.0
        production, other = store.service_alias("production"), store.service_alias("candidate")
        pair = ShadowPair(capture_id=capture_id, phase=phase.name, switch_id=phase.switch_id,
                          production_model=production.model, other_model=other.model,
                          production_score=production_score, other_score=other_score,
                          production_latency_s=row.get("latency_s"), other_latency_s=latency,
                          production_tokens=row.get("total_tokens"), other_tokens=None if error else _tokens(other_reply),
                          other_error=error)
        if store.add_shadow_pair(pair):
            self.paired += 1
            self.decide(store, phase)

    def decide(self, store: Store, phase: Phase) -> OnlineVerdict:
        """Apply the phase's sequential rule to its pairs so far; act on promote/reject/rollback."""
        pairs = store.shadow_pairs(phase.name, phase.switch_id)
        if phase.name == "shadow":
            shadow = self.spec.shadow
            bounds = paired_confidence_sequence([p.other_score - p.production_score for p in pairs], alpha=shadow.alpha)
            verdict = decide_shadow(bounds, margin=shadow.margin, cheaper=_cheaper(pairs), alpha=shadow.alpha,
                                    min_pairs=shadow.min_pairs)
            if verdict.action == "promote":
                aliases.promote(store, who="shadow", why=verdict.reason, test="shadow: paired confidence sequence")
            elif verdict.action == "reject":
                aliases.reject(store, who="shadow", why=verdict.reason, test="shadow: paired confidence sequence")
        else:
            canary = self.spec.canary
            bounds = paired_confidence_sequence([p.production_score - p.other_score for p in pairs], alpha=canary.alpha)
            verdict = decide_canary(bounds, margin=canary.margin, alpha=canary.alpha, enough=canary.pairs)
            if verdict.action == "rollback":
                aliases.rollback(store, who="canary", why=verdict.reason, test="canary: paired confidence sequence")
            elif verdict.action == "keep":
                aliases.keep(store, who="canary", why=verdict.reason, test="canary: paired confidence sequence")
        if verdict.action != "wait":
            log.info("%s: %s: %s", phase.name, verdict.action, verdict.reason)
            self.decisions.append(verdict)
        return verdict


def _cheaper(pairs: list[ShadowPair]) -> bool:
    """The candidate used fewer tokens per request than production on the same requests."""
    both = [(p.other_tokens, p.production_tokens) for p in pairs if p.other_tokens and p.production_tokens]
    return bool(both) and sum(o for o, _ in both) < sum(p for _, p in both)
