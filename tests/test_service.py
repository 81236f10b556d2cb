"""The service (flywheel.service): service.yaml, serving aliases (switch, promote, rollback), and the
shadow and canary gates on live traffic: a real app client -> the capture proxy -> the alias model
server (tiny real Llamas from conftest) on 127.0.0.1, the shadow worker grading both answers."""

from __future__ import annotations

import re

import openai
import pytest
import yaml
from conftest import write_jsonl, make_rows, spec_dict

from flywheel.errors import SpecError
from flywheel.proxy.server import create_proxy_app
from flywheel.service import aliases
from flywheel.service.aliases import AliasError
from flywheel.prompt import Demo, Prompt
from flywheel.service.serving import create_alias_app
from flywheel.service.shadow import ShadowWorker, current_phase
from flywheel.service.spec import load_service_spec
from flywheel.store import Store
from flywheel.store.service import AliasTarget
from flywheel.web import BackgroundServer

LONG = "You are a careful support assistant. " * 12 + "Answer with one label."
SHORT = "One label."
LONG_ID, SHORT_ID = (Prompt(messages=[{"role": "system", "content": text}]).id for text in (LONG, SHORT))
# Reference-free: the tiny model answers with special tokens only (decoded ""), the chatty one with words.
EMPTY_REPLY = {"type": "string_check", "name": "terse", "input": "{{sample.output_text}}", "reference": "",
               "operation": "eq"}


def write_service(tmp_path, production: str, candidate: str | None = None, **extra) -> str:
    write_jsonl(tmp_path / "data.jsonl", make_rows())
    (tmp_path / "eval.yaml").write_text(yaml.safe_dump(spec_dict(production, graders=[EMPTY_REPLY])))
    data = {"eval": "eval.yaml", "db": "service.db", "production": {"model": production, "prompt": LONG},
            "shadow": {"share": 1.0, "margin": 0.3, "min_pairs": 5},
            "canary": {"share": 1.0, "margin": 0.3, "pairs": 40}, **extra}
    if candidate:
        data["candidate"] = {"model": candidate, "prompt": SHORT}
    path = tmp_path / "service.yaml"
    path.write_text(yaml.safe_dump(data))
    return str(path)


def test_service_spec_loads_and_names_bad_fields(tmp_path):
    path = write_service(tmp_path, "local:x")
    spec = load_service_spec(path)
    assert spec.production.prompt == LONG and spec.redact is True and spec.shadow.share == 1.0
    assert spec.path(spec.db) == (tmp_path / "service.db").resolve()
    with pytest.raises(SpecError, match=r"service.yaml: shadow.shre: unknown field"):
        load_service_spec(path, ["shadow.shre=0.5"])
    with pytest.raises(SpecError, match=r"service.yaml: shadow.share: .*less than or equal to 1"):
        load_service_spec(path, ["shadow.share=2"])
    with pytest.raises(SpecError, match=r"ports: proxy, models and api must differ"):
        load_service_spec(path, ["ports.proxy=9000", "ports.models=9000"])


def test_aliases_switch_atomically_and_roll_back(tmp_path):
    spec = load_service_spec(write_service(tmp_path, "local:teacher", "local:student"))
    store = Store.open(spec.path(spec.db))
    try:
        first = aliases.ensure_aliases(store, spec)
        assert first == {"production": AliasTarget("local:teacher", LONG_ID), "candidate": AliasTarget("local:student", SHORT_ID)}
        assert aliases.ensure_aliases(store, spec) == first and len(store.service_switches()) == 2  # restart: no-op
        with pytest.raises(AliasError, match="nothing to roll back"):
            aliases.rollback(store, who="me", why="test")
        switch_id = aliases.promote(store, who="shadow", why="better", test="confidence sequence")
        assert store.service_aliases() == {"production": first["candidate"], "candidate": first["production"]}
        promoted = store.service_switch(switch_id)
        assert (promoted.kind, promoted.who, promoted.test, promoted.from_target) == (
            "promote", "shadow", "confidence sequence", first["production"])
        undone = aliases.rollback(store, who="alice", why="complaints")
        assert undone.reverts == switch_id and undone.kind == "rollback" and undone.who == "alice"
        assert store.service_aliases() == {"production": first["production"], "candidate": first["production"]}
        with pytest.raises(AliasError, match="nothing to roll back"):  # the promotion is undone already
            aliases.rollback(store, who="alice", why="again")
        with pytest.raises(AliasError, match="unknown alias 'staging'"):
            aliases.set_alias(store, "staging", first["production"], who="me", why="x")
        with pytest.raises(AliasError, match="nothing to promote"):
            aliases.promote(store, who="me", why="x", test="t")
    finally:
        store.close()


def test_a_served_prompt_replaces_the_apps_system_messages_and_puts_its_demos_before_the_last_user_turn():
    messages = [{"role": "system", "content": "app's"}, {"role": "user", "content": "hi"}]
    assert Prompt(messages=[{"role": "system", "content": "alias's"}]).apply(messages) == [
        {"role": "system", "content": "alias's"}, messages[1]]
    assert aliases.served_messages(None, messages) == messages
    demos = [Demo("a", "where is my new card?", "card_arrival"), Demo("b", "cancel my transfer", "cancel_transfer"),
             Demo("c", "what is the exchange rate?", "exchange_rate")]
    fixed = Prompt(messages=[{"role": "system", "content": "Label."}], demos=demos[:1])
    assert fixed.apply(messages) == [{"role": "system", "content": "Label."}, *demos[0].turns(), messages[1]]
    nearest = Prompt(messages=[{"role": "system", "content": "Label."}], demos=demos, nearest=1)
    asked = nearest.apply([{"role": "user", "content": "please cancel the transfer I made"}])
    assert asked[1:3] == demos[1].turns() and len(asked) == 4
    # evaluated on an eval's items: the same instructions and demos over the eval's user template
    over = nearest.over([{"role": "system", "content": "eval's"}, {"role": "user", "content": "{{item.text}}"}])
    assert over.messages == [{"role": "system", "content": "Label."}, {"role": "user", "content": "{{item.text}}"}]
    assert (over.demos, over.nearest) == (demos, 1)


def test_an_alias_prompt_is_a_text_a_prompt_file_or_a_stored_prompt_and_bad_ones_are_named(tmp_path):
    import json

    from flywheel.store.migrations import prompt_id_of_system

    assert prompt_id_of_system(LONG) == LONG_ID  # m022 converts texts to the ids flywheel.prompt gives
    with_demos = Prompt(messages=[{"role": "system", "content": "Label."}],
                        demos=[Demo("a", "where is my card?", "card_arrival")], nearest=1)
    (tmp_path / "prompt.json").write_text(json.dumps(with_demos.to_json()))
    spec = load_service_spec(write_service(tmp_path, "local:x", "local:y"),
                             ["production.prompt={file: prompt.json}"])
    store = Store.open(spec.path(spec.db))
    try:
        first = aliases.ensure_aliases(store, spec)
        assert first["production"].prompt == with_demos.id
        assert aliases.prompt_of(store, first["production"]) == with_demos
        assert aliases.prompt_of(store, first["candidate"]).messages == [{"role": "system", "content": SHORT}]
        by_id = load_service_spec(spec.source, [f"candidate.prompt={{id: {with_demos.id}}}"])
        assert aliases.stored_prompt(store, by_id, by_id.candidate.prompt, "candidate.prompt") == with_demos.id
        missing = load_service_spec(spec.source, ["candidate.prompt={id: p-000000000000}"])
        with pytest.raises(AliasError, match=r"service.yaml: candidate.prompt.id: no prompt p-000000000000 in "):
            aliases.ensure_aliases(store, missing)
        (tmp_path / "bad.json").write_text("[1, 2")
        bad = load_service_spec(spec.source, ["production.prompt={file: bad.json}"])
        with pytest.raises(AliasError, match=r"service.yaml: production.prompt.file: .*bad.json is not a prompt"):
            aliases.ensure_aliases(store, bad)
        (tmp_path / "roleless.json").write_text(json.dumps({"messages": [{"content": "x"}]}))
        roleless = load_service_spec(spec.source, ["production.prompt={file: roleless.json}"])
        with pytest.raises(AliasError, match=r"production.prompt.file: .*roleless.json is not a prompt: messages\[0\] "
                           "needs a role and a content"):
            aliases.ensure_aliases(store, roleless)
        with pytest.raises(SpecError, match=r"production.prompt.*exactly one of `file` or `id`"):
            load_service_spec(spec.source, ["production.prompt={file: prompt.json, id: p-1}"])
    finally:
        store.close()


class Service:
    """The alias server, the shadow worker and the proxy in front of them, as `serve --flywheel` wires them."""

    def __init__(self, spec_path: str):
        import flywheel.spec

        self.spec = load_service_spec(spec_path)
        self.db = str(self.spec.path(self.spec.db))
        store = Store.open(self.db)
        aliases.ensure_aliases(store, self.spec)
        store.close()
        graders = flywheel.spec.load_eval_spec(self.spec.path(self.spec.eval)).graders
        self.models = BackgroundServer(create_alias_app(self.db, options={"dtype": "fp32"})).start()
        self.shadow = ShadowWorker(self.db, self.spec, graders, self.models.url + "/v1", seed=0)
        self.shadow.start()
        self.proxy = BackgroundServer(create_proxy_app(self.models.url, self.db, observer=self.shadow.observe)).start()
        self.app = openai.OpenAI(base_url=self.proxy.url + "/v1", api_key="unused", max_retries=0)

    def send(self, n: int) -> list[str]:
        """The simulated app: labelled requests to `production`, through the proxy."""
        replies = []
        for i in range(n):
            reply = self.app.chat.completions.create(
                model="production", messages=[{"role": "user", "content": f"question {i} about my card"}],
                max_tokens=4, temperature=0, metadata={"label": "card_arrival"})
            replies.append(reply.choices[0].message.content)
        assert self.shadow.drain()
        return replies

    def store(self) -> Store:
        return Store.open(self.db)

    def close(self) -> None:
        self.proxy.stop()
        self.shadow.stop()
        self.models.stop()


@pytest.fixture
def service_factory():
    running = []

    def make(path: str) -> Service:
        running.append(Service(path))
        return running[-1]

    yield make
    for service in running:
        service.close()


def test_shadow_promotes_a_cheaper_equal_candidate_then_the_canary_keeps_it(tmp_path, tiny_model_dir, service_factory):
    tiny = f"local:{tiny_model_dir}"
    service = service_factory(write_service(tmp_path, tiny, tiny))
    service.send(30)
    store = service.store()
    try:
        promoted = store.current_switch("production")
        assert promoted.kind == "promote" and promoted.who == "shadow", store.service_switches()
        assert "cheaper and non-inferior" in promoted.why and "confidence sequence" in promoted.why
        assert store.service_alias("production") == AliasTarget(tiny, SHORT_ID)
        shadow = store.shadow_pairs("shadow")
        assert 5 <= len(shadow) <= 30 and all(p.other_tokens < p.production_tokens for p in shadow)
        assert current_phase(store, service.spec).name == "canary"
        canary_before = len(store.shadow_pairs("canary", promoted.id))  # the requests after the promotion
        assert len(shadow) + canary_before <= 30  # a request in flight at the switch is not paired
    finally:
        store.close()
    service.send(5)  # the canary pairs the new production with the previous one; no drop, no rollback
    store = service.store()
    try:
        assert store.current_switch("production").id == promoted.id
        canary = store.shadow_pairs("canary", promoted.id)
        assert len(canary) == canary_before + 5
        assert all(p.production_model == tiny and p.other_tokens > p.production_tokens for p in canary)
        assert service.spec.canary.pairs > len(canary)
    finally:
        store.close()
    service.send(service.spec.canary.pairs - len(canary))  # the canary's last pairs: it keeps the switch
    store = service.store()
    try:
        kept = store.current_switch("candidate")
        assert (kept.kind, kept.who) == ("keep", "canary") and "no drop after 40 pairs" in kept.why
        assert store.current_switch("production").id == promoted.id  # still the promotion, still reversible
        assert store.service_alias("candidate") == store.service_alias("production")
        assert current_phase(store, service.spec) is None  # no shadow of the previous production; laps may start
        pairs = len(store.shadow_pairs())
    finally:
        store.close()
    service.send(3)
    store = service.store()
    try:
        assert len(store.shadow_pairs()) == pairs
    finally:
        store.close()


def test_a_broken_candidate_is_stopped_in_shadow_and_never_serves(tmp_path, tiny_model_dir, chatty_dir, service_factory):
    tiny, chatty = f"local:{tiny_model_dir}", f"local:{chatty_dir}"
    service = service_factory(write_service(tmp_path, tiny, chatty))
    replies = service.send(20)
    store = service.store()
    try:
        assert store.service_alias("production") == AliasTarget(tiny, LONG_ID)
        assert store.service_alias("candidate") == AliasTarget(tiny, LONG_ID)  # idled: no more shadow traffic
        rejected = store.current_switch("candidate")
        assert rejected.kind == "reject" and "worse" in rejected.why
        pairs = store.shadow_pairs("shadow")
        assert all(p.other_model == chatty for p in pairs) and len(pairs) < 20
        assert all(p.production_model == tiny for p in pairs)
    finally:
        store.close()
    assert all(reply == "" for reply in replies)  # the users only ever got production's answers


def test_a_bad_model_forced_into_production_is_rolled_back_by_the_canary(tmp_path, tiny_model_dir, chatty_dir,
                                                                         service_factory):
    tiny, chatty = f"local:{tiny_model_dir}", f"local:{chatty_dir}"
    service = service_factory(write_service(tmp_path, tiny))
    store = service.store()
    try:
        short = aliases.stored_prompt(store, service.spec, SHORT, "candidate.prompt")
        aliases.set_alias(store, "candidate", AliasTarget(chatty, short), who="operator", why="try it")
        forced = aliases.promote(store, who="operator", why="forced", test="none")
    finally:
        store.close()
    service.send(25)
    store = service.store()
    try:
        undone = store.current_switch("production")
        assert undone.kind == "rollback" and undone.reverts == forced and undone.who == "canary"
        assert "quality dropped" in undone.why
        assert store.service_alias("production") == AliasTarget(tiny, LONG_ID)
        assert len(store.shadow_pairs("canary", forced)) < 25
    finally:
        store.close()


QUICK_TRAIN = {"max_steps": 2, "precision": "fp32", "batch_size": 4, "min_examples": 1, "logging_steps": 1}


def test_a_lap_trains_a_student_on_new_traffic_and_makes_it_the_candidate(tmp_path, tiny_model_dir, chatty_dir,
                                                                          service_factory):
    from flywheel.service.laps import new_captures, queue_lap, run_lap

    chatty, tiny = f"local:{chatty_dir}", f"local:{tiny_model_dir}"
    path = write_service(tmp_path, chatty, shadow={"share": 0.0},
                         lap={"student": tiny, "prompt": SHORT, "train": QUICK_TRAIN, "holdout": 0.3})
    service = service_factory(path)
    service.send(8)
    store = service.store()
    try:
        # the leak guard: a request that is a valid item's user turn never becomes training data
        leak = make_rows()[4]["text"]
        service.app.chat.completions.create(model="production", messages=[{"role": "user", "content": leak}],
                                            max_tokens=4, metadata={"label": "x"})
        assert len(new_captures(store, service.spec)) == 9
        lap = queue_lap(store, service.spec, trigger="on_demand")
        assert lap.captures == 9 and queue_lap(store, service.spec, trigger="on_demand") is None  # one at a time
        events: list[str] = []
        done = run_lap(store, service.spec, lap.id, event=events.append)
        assert done.status == "succeeded", done
        assert "1 dropped by the leak guard" in events[0]
        assert done.decision == "candidate" and "valid:" in done.reason and "held-back traffic:" in done.reason
        assert store.service_alias("candidate") == AliasTarget(done.checkpoint, SHORT_ID)
        assert done.checkpoint.startswith(tiny + "+")
        switch = store.current_switch("candidate")
        assert switch.who == f"lap {lap.id}" and switch.test.startswith("offline")
        assert store.service_alias("production").model == chatty  # production waits for the shadow gate
        assert new_captures(store, service.spec) == [] and queue_lap(store, service.spec, trigger="x") is None
        assert run_lap(store, service.spec, lap.id) == done  # a decided lap is not redone
    finally:
        store.close()


def test_a_lap_over_budget_does_not_start(tmp_path, tiny_model_dir, service_factory):
    from flywheel.service.laps import queue_lap

    tiny = f"local:{tiny_model_dir}"
    service = service_factory(write_service(tmp_path, tiny, shadow={"share": 0.0},
                                            budgets={"per_lap": {"training_steps": 5}},
                                            lap={"train": {"max_steps": 50}}))
    service.send(2)
    store = service.store()
    try:
        lap = queue_lap(store, service.spec, trigger="on_demand")
        assert lap.status == "skipped" and "budgets.per_lap.training_steps" in lap.reason
        assert store.last_lapped_capture() == 0  # its captures wait for the next lap
        assert store.count_jobs().get("queued", 0) == 0
    finally:
        store.close()


def test_a_lap_whose_openai_teacher_would_pass_the_money_budget_does_not_start(tmp_path, tiny_model_dir,
                                                                               service_factory):
    from flywheel.pricing import find_price
    from flywheel.service.laps import TEACHER_MAX_TOKENS, queue_lap

    tiny = f"local:{tiny_model_dir}"
    service = service_factory(write_service(tmp_path, tiny, shadow={"share": 0.0},
                                            lap={"teacher": "openai:gpt-4o-mini", "votes": 3},
                                            budgets={"per_lap": {"money": 0.0001}}))
    service.send(3)
    store = service.store()
    try:
        rows = store.captures_after(0)
        mean_prompt = int(sum(r["prompt_tokens"] for r in rows) / len(rows))
        planned = 3 * 3 * find_price("gpt-4o-mini").cost(mean_prompt, TEACHER_MAX_TOKENS)  # captures x votes
        assert planned > 0.0001
        lap = queue_lap(store, service.spec, trigger="on_demand")
        assert lap.status == "skipped" and lap.reason == (
            f"budgets.per_lap.money: the lap plans ${planned:.4g} on priced models, limit $0.0001")
        roomy = load_service_spec(service.spec.source, ["budgets.per_lap.money=1"])
        assert queue_lap(store, roomy, trigger="on_demand").status == "queued"  # the same captures, within budget
    finally:
        store.close()


def test_the_services_api_starts_a_lap_for_an_admin_key_only(tmp_path, tiny_model_dir):
    """`POST /v1/service/laps` on the API `start_service` runs (the real wiring: proxy, alias server,
    API), through httpx on 127.0.0.1; the queue has no workers, so a queued lap stays queued."""
    import httpx

    from flywheel.api.access import create_key
    from flywheel.api.app import create_api_app
    from flywheel.api.jobs import JobQueue
    from flywheel.api.routes.service import NO_LAP_QUEUED
    from flywheel.service.run import lap_starter, start_service

    spec = load_service_spec(write_service(tmp_path, f"local:{tiny_model_dir}", shadow={"share": 0.0},
                                           ports={"proxy": 0, "models": 0, "api": 0}))
    db = str(spec.path(spec.db))
    store = Store.open(db)
    admin, member, reader = (create_key(store, role, role=role)[0] for role in ("admin", "member", "reader"))
    service = start_service(spec, workers=0)
    try:
        app = openai.OpenAI(base_url=service.urls["proxy"], api_key="unused", max_retries=0)
        for i in range(2):
            app.chat.completions.create(model="production", max_tokens=4,
                                        messages=[{"role": "user", "content": f"question {i} about my card"}])
        with httpx.Client(base_url=service.urls["api"], timeout=60) as http:
            def post(key: str, **kwargs):
                return http.post("v1/service/laps", headers={"Authorization": f"Bearer {key}"}, **kwargs)

            for key in (member, reader):
                refused = post(key, json={})
                assert refused.status_code == 403, refused.text
                assert refused.json()["error"]["code"] == "insufficient_permissions"
            assert http.get("v1/service/laps", headers={"Authorization": f"Bearer {member}"}).status_code == 403
            for body, param in (({"reason": "x", "priority": 1}, "priority"), ({"reason": 3}, "reason"),
                                ({"reason": "x" * 501}, "reason")):
                bad = post(admin, json=body)
                assert bad.status_code == 400 and bad.json()["error"]["param"] == param, bad.text
            assert post(admin, content=b"[1]").status_code == 400
            assert store.service_laps() == [] and not service.queue.wake.is_set()

            started = post(admin, json={"reason": "new phrasings since Monday"})
            assert started.status_code == 201, started.text
            lap = started.json()
            assert (lap["object"], lap["trigger"], lap["status"], lap["captures"]) == ("service.lap", "api", "queued", 2)
            row = store.service_lap(lap["id"])
            assert (row.trigger, row.status, row.captures) == ("api", "queued", 2)
            assert service.queue.wake.is_set()  # the queue was woken for it
            events, _ = store.api_events(lap["id"])
            assert "new phrasings since Monday" in events[0]["message"] and events[0]["type"] == "service.lap.requested"

            again = post(admin)  # no body: a lap is already queued
            assert again.status_code == 409 and again.json()["error"]["message"] == NO_LAP_QUEUED
            listed = http.get("v1/service/laps", params={"limit": 5}, headers={"Authorization": f"Bearer {admin}"})
            assert listed.status_code == 200 and [lap_["id"] for lap_ in listed.json()["data"]] == [lap["id"]]
            assert http.get("v1/service/laps", params={"limit": 0},
                            headers={"Authorization": f"Bearer {admin}"}).status_code == 400
    finally:
        service.stop()
    # every request needs a key (as off loopback): none is a 401; a plain API has no such routes
    keyed = create_api_app(db, workers=0, loopback_role="none", start_lap=lap_starter(spec, JobQueue(db, {}, workers=0)))
    with BackgroundServer(keyed) as server, httpx.Client(base_url=server.url, timeout=60) as http:
        assert http.post("/v1/service/laps").status_code == 401
    with BackgroundServer(create_api_app(db, workers=0)) as server, httpx.Client(base_url=server.url, timeout=60) as http:
        for method in ("GET", "POST"):
            missing = http.request(method, "/v1/service/laps", headers={"Authorization": f"Bearer {admin}"})
            assert missing.status_code == 404 and missing.json()["error"]["code"] == "unknown_url"
    store.close()


def test_dashboard_page_and_cli_show_the_service_escaped(tmp_path):
    import http.client

    from click.testing import CliRunner

    from flywheel.cli import main
    from flywheel.report.review_app import create_app
    from flywheel.store.service import ShadowPair

    path = write_service(tmp_path, "local:teacher", "local:student")
    spec = load_service_spec(path)
    store = Store.open(spec.path(spec.db))
    try:
        aliases.ensure_aliases(store, spec)
        switch = aliases.promote(store, who="<script>x</script>", why="better <b>", test="shadow")
        for i in range(30):
            store.add_shadow_pair(ShadowPair(capture_id=i, phase="canary", switch_id=switch, production_model="local:student",
                                             other_model="local:teacher", production_score=1.0, other_score=float(i % 2),
                                             production_latency_s=0.01, other_latency_s=0.02, production_tokens=10,
                                             other_tokens=40))
        store.create_service_lap("lap-1", trigger="on_demand", capture_ids=[1, 2])
    finally:
        store.close()
    with BackgroundServer(create_app(str(spec.path(spec.db)))) as server:
        conn = http.client.HTTPConnection("127.0.0.1", server.port, timeout=30)
        conn.request("GET", "/service")
        response = conn.getresponse()
        html = response.read().decode()
    assert response.status == 200
    assert "<script>x</script>" not in html and "&lt;script&gt;x&lt;/script&gt;" in html
    assert "local:student" in html and "promote" in html and "lap-1" in html
    assert "1.000 [1.000, 1.000]" in html and "10000" in html  # score and tokens per 1,000 requests
    runner = CliRunner()
    status = runner.invoke(main, ["service", "status", path])
    assert status.exit_code == 0 and "production: local:student" in status.output and "30 pairs" in status.output
    back = runner.invoke(main, ["service", "rollback", path, "--why", "complaints", "--who", "ops"])
    assert back.exit_code == 0 and f"reverts {switch}" in back.output
    again = runner.invoke(main, ["service", "rollback", path, "--why", "again"])
    assert again.exit_code == 1 and "error: nothing to roll back" in again.output
    lap = runner.invoke(main, ["service", "lap", path])
    assert lap.exit_code == 0 and "no lap queued" in lap.output  # a lap is already queued


def test_every_dashboard_point_links_to_its_pairs_and_each_pair_to_its_capture(tmp_path):
    """`/service`'s score rows and windows link to `/service/pairs` (newest first, 100 a page, a
    `before` cursor), each pair to `/service/captures/ID` (the request as stored, escaped, and its
    pairs); over HTTP on the API port, where only an admin key gets in, as for the dashboard."""
    import html as html_lib
    import json
    import re

    import httpx

    from flywheel.api.access import create_key
    from flywheel.api.app import create_api_app
    from flywheel.report.review_app import create_app
    from flywheel.store.service import ShadowPair

    xss = '<script>window.__pwned=1</script><b>card</b>'
    spec = load_service_spec(write_service(tmp_path, "local:teacher", "local:student"))
    db = str(spec.path(spec.db))
    store = Store.open(db)
    try:
        aliases.ensure_aliases(store, spec)
        admin, member, reader = (create_key(store, role, role=role)[0] for role in ("admin", "member", "reader"))
        ids = store.insert_captures([{
            "endpoint": "/v1/chat/completions", "model": "production", "status": 200, "latency_s": 0.05,
            "prompt_tokens": 7, "completion_tokens": 3, "total_tokens": 10, "metadata_json": json.dumps({"app": "help"}),
            "request_json": json.dumps({"model": "production", "temperature": 0, "messages": [
                {"role": "system", "content": "Answer with one label."},
                {"role": "user", "content": f"question {i}: {xss}"}]}),
            "response_json": json.dumps({"choices": [{"message": {"role": "assistant", "content": f"label {i} {xss}"}}]}),
        } for i in range(130)])
        shadow_switch = store.current_switch("candidate").id
        for i, capture_id in enumerate(ids[:25]):
            store.add_shadow_pair(ShadowPair(capture_id=capture_id, phase="shadow", switch_id=shadow_switch,
                                             production_model="local:teacher", other_model="local:student",
                                             production_score=1.0, other_score=float(i % 2), production_latency_s=0.05,
                                             other_latency_s=0.02, production_tokens=10, other_tokens=4))
        promoted = aliases.promote(store, who="shadow", why="non-inferior and cheaper", test="shadow")
        for i, capture_id in enumerate(ids[25:]):
            store.add_shadow_pair(ShadowPair(capture_id=capture_id, phase="canary", switch_id=promoted,
                                             production_model="local:student", other_model="local:teacher",
                                             production_score=0.5, other_score=1.0, production_tokens=4,
                                             other_tokens=None if i == 80 else 10,
                                             other_error="HTTP 500: <i>down</i>" if i == 80 else None))
        pairs = store.shadow_pairs()
    finally:
        store.close()
    capture_of = {p.id: p.capture_id for p in pairs}
    app = create_api_app(db, workers=0, fallback=create_app(db, allowed_hosts=["*"]), report_base="/",
                         loopback_role="none")

    def rows(page: str) -> list[int]:
        return [int(i) for i in re.findall(r'<tr data-pair="(\d+)"', page)]

    def link(page: str, pattern: str) -> str:
        return html_lib.unescape(re.search(pattern, page)[1])

    with BackgroundServer(app) as server, httpx.Client(base_url=server.url, timeout=60,
                                                       headers={"Authorization": f"Bearer {admin}"}) as http:
        dashboard = http.get("/service")
        assert dashboard.status_code == 200, dashboard.text
        # a score row: every pair the student answered in, as production or as the other side
        first = http.get(link(dashboard.text, r'<tr data-model="local:student"><td><a class="pairs" href="([^"]+)"'))
        assert first.status_code == 200 and "model <code>local:student</code>" in first.text
        assert rows(first.text) == sorted(capture_of, reverse=True)[:100]  # newest first, 100 a page
        assert "Newest" not in first.text
        second = http.get(link(first.text, r'<a class="btn" id="older" href="([^"]+)"'))
        assert rows(second.text) == sorted(capture_of, reverse=True)[100:] and 'id="older"' not in second.text
        assert 'id="newest"' in second.text
        # a window: the first 20 shadow pairs, exactly
        window = http.get(link(dashboard.text, r'<a class="window" href="([^"]+)"'))
        assert window.status_code == 200
        assert sorted(capture_of[p] for p in rows(window.text)) == ids[:20]
        # each row names both sides and links to its capture; another project's error text is escaped
        canary = http.get("/service/pairs", params={"phase": "canary", "switch": promoted})
        assert len(rows(canary.text)) == 100 and "HTTP 500: &lt;i&gt;down&lt;/i&gt;" in canary.text
        assert http.get("/service/pairs", params={"model": "local:nobody"}).text.count("No pairs match.") == 1
        assert "No pairs match." in http.get("/service/pairs", params={"since": "2999-01-01"}).text
        assert len(rows(http.get("/service/pairs", params={"until": "2000-01-01T00:00:00Z"}).text)) == 0
        target = link(window.text, r'<a class="capture" href="([^"]+)"')
        capture = http.get(target)
        assert capture.status_code == 200, capture.text
        captured = int(target.rsplit("/", 1)[1])
        i = ids.index(captured)
        assert f"question {i}: &lt;script&gt;window.__pwned=1&lt;/script&gt;&lt;b&gt;card&lt;/b&gt;" in capture.text
        assert f"label {i} &lt;script&gt;" in capture.text and "<script>" not in capture.text
        assert "[system]" in capture.text and "app</span>help" in capture.text and "status 200" in capture.text
        assert "7 + 3 = 10 tokens" in capture.text and "50 ms" in capture.text
        (pair,) = rows(capture.text)
        assert capture_of[pair] == captured and "local:teacher" in capture.text and "1.000" in capture.text

        for missing_id in (999999, 10 ** 30):
            missing = http.get(f"/service/captures/{missing_id}")
            assert missing.status_code == 404 and f"no capture with id {missing_id}" in missing.text
        for query, named in (({"switch": "x"}, "switch: not a whole number"), ({"before": "-1"}, "before:"),
                             ({"phase": "<b>"}, "phase: shadow or canary"), ({"since": "soon"}, "since")):
            bad = http.get("/service/pairs", params=query)
            assert bad.status_code == 400 and named in html_lib.unescape(bad.text), bad.text
        assert "<b>" not in http.get("/service/pairs", params={"phase": "<b>"}).text.split("<main>")[1]

        for key in (member, reader):  # the dashboard's door: a member or reader key is refused
            for path in ("/service", "/service/pairs?model=local:student", f"/service/captures/{captured}",
                         "/service/captures/999999", "/service/pairs?switch=x"):
                refused = http.get(path, headers={"Authorization": f"Bearer {key}"})
                assert refused.status_code == 403 and "needs an admin key" in refused.text, (key, path)
                assert "question" not in refused.text
        assert http.get("/service/pairs", headers={"Authorization": ""}).status_code in (303, 401)
    # the plain review server (`flywheel serve`) shows them as it shows /service: to whoever it lets in
    with BackgroundServer(create_app(db)) as server, httpx.Client(base_url=server.url, timeout=60) as http:
        assert len(rows(http.get("/service/pairs", params={"model": "local:teacher"}).text)) == 100
        assert "question 0: &lt;script&gt;" in http.get(f"/service/captures/{ids[0]}").text


def _wait_for(check, timeout: float = 240.0):
    import time

    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = check()
        if value:
            return value
        time.sleep(0.05)
    raise AssertionError("timed out")


def test_a_lap_whose_job_fails_gives_its_captures_to_the_next_lap(tmp_path, tiny_model_dir, chatty_dir,
                                                                  service_factory):
    from flywheel.api.jobs import JobQueue
    from flywheel.service.laps import LAP_JOB, new_captures, queue_lap
    from flywheel.service.run import LapRunner

    chatty = f"local:{chatty_dir}"
    # min_examples 10 (the default) and 3 captures: the lap's training job fails on its data check
    service = service_factory(write_service(tmp_path, chatty, shadow={"share": 0.0},
                                            lap={"train": {"max_steps": 2, "precision": "fp32", "min_examples": 10},
                                                 "holdout": 0.0}))
    service.send(3)
    queue = JobQueue(service.db, {LAP_JOB: LapRunner(service.spec)}, workers=1, poll_s=0.05)
    store = service.store()
    try:
        first_ids = [r["id"] for r in new_captures(store, service.spec)]
        failed = queue_lap(store, service.spec, trigger="on_demand")
        queue.start()
        queue.notify()
        failed = _wait_for(lambda: (lap := store.service_lap(failed.id)).status in ("failed", "succeeded") and lap)
        assert failed.status == "failed", failed
        assert "at least 10 are needed" in failed.reason and failed.decision is None
        assert store.last_lapped_capture() == 0  # given back
        service.send(2)
        again = queue_lap(store, service.spec, trigger="on_demand")
        assert again.captures == 5 and again.first_capture_id == first_ids[0]  # the failed lap's and the new ones
        assert len(store.service_laps()) == 2
    finally:
        queue.stop()
        store.close()


def test_the_schedule_counts_from_the_last_lap_or_the_services_start(tmp_path):
    from datetime import datetime, timedelta, timezone

    from flywheel.service.laps import due

    spec = load_service_spec(write_service(tmp_path, "local:x", triggers={"every_s": 3600, "new_captures": 50}))
    store = Store.open(spec.path(spec.db))
    try:
        aliases.ensure_aliases(store, spec)
        started = datetime.fromisoformat(store.service_switches()[-1].created_at)
        assert due(store, spec, 3) is None  # just started: the first scheduled lap is an hour away
        assert due(store, spec, 3, at=started + timedelta(seconds=3599)) is None
        assert due(store, spec, 3, at=started + timedelta(seconds=3601)) == "schedule"
        assert due(store, spec, 0, at=started + timedelta(days=1)) is None  # nothing new: no lap
        assert due(store, spec, 50) == "new_captures"
        aliases.set_alias(store, "candidate", AliasTarget("local:y", aliases.stored_prompt(store, spec, SHORT, "prompt")),
                          who="lap", why="test")
        assert due(store, spec, 50) is None  # a candidate under shadow test: laps wait for its decision
        aliases.reject(store, who="shadow", why="worse", test="t")
        assert due(store, spec, 50) == "new_captures"
        store.create_service_lap("lap-1", trigger="schedule", capture_ids=[1, 2])
        lapped = datetime.fromisoformat(store.service_lap("lap-1").created_at)
        assert due(store, spec, 3, at=lapped + timedelta(seconds=1800)) is None
        assert due(store, spec, 3, at=lapped + timedelta(seconds=3601)) == "schedule"
        assert lapped < datetime.now(timezone.utc) + timedelta(seconds=1)
    finally:
        store.close()


def test_a_lap_with_a_teacher_labels_traffic_by_self_consistency(tmp_path, tiny_model_dir, chatty_dir,
                                                                 service_factory):
    import json

    from flywheel.models import ChatRequest, Sampling, cached_model
    from flywheel.service.laps import queue_lap, run_lap

    tiny, chatty = f"local:{tiny_model_dir}", f"local:{chatty_dir}"
    # production (tiny) answers "": without a teacher nothing would be left to train on
    path = write_service(tmp_path, tiny, shadow={"share": 0.0},
                         lap={"teacher": chatty, "votes": 3, "student": tiny, "prompt": SHORT, "holdout": 0.0,
                              "train": QUICK_TRAIN})
    service = service_factory(path)
    service.send(4)
    store = service.store()
    try:
        lap = queue_lap(store, service.spec, trigger="on_demand")
        events: list[str] = []
        done = run_lap(store, service.spec, lap.id, event=events.append)
        assert done.status == "succeeded" and done.checkpoint.startswith(tiny + "+"), done
        assert any(f"{chatty}'s majority of 3 votes" in e for e in events), events
        rows = [json.loads(line) for line in
                (tmp_path / "service" / lap.id / "train.jsonl").read_text(encoding="utf-8").splitlines()]
        assert len(rows) == 4 and all(r["messages"][0] == {"role": "system", "content": SHORT} for r in rows)
        labels = [r["messages"][-1]["content"] for r in rows]
        assert all(labels)  # the teacher's words, not production's empty answers
        # each label is the majority of the teacher's samples for that input, as vote() folds them
        teacher = cached_model(chatty)
        for row, label in zip(rows, labels):
            asks = [ChatRequest(messages=Prompt(messages=[{"role": "system", "content": LONG}]).apply(row["messages"][1:-1]),
                                sampling=Sampling(temperature=0.7, max_tokens=256), repeat=i) for i in range(3)]
            samples = [c.text for c in teacher.generate(asks)]
            assert label in {" ".join(s.split()).casefold() for s in samples}
    finally:
        store.close()


def test_with_a_teacher_the_held_back_gate_grades_productions_own_answers(tmp_path, tiny_model_dir, chatty_dir,
                                                                          service_factory):
    """The teacher's labels are what the student learns; the gate's production side is what production
    answered (here "", which the reference-free grader passes; the chatty teacher's words fail it)."""
    from flywheel.service.laps import queue_lap, run_lap

    tiny, chatty = f"local:{tiny_model_dir}", f"local:{chatty_dir}"
    path = write_service(tmp_path, tiny, shadow={"share": 0.0},
                         lap={"teacher": chatty, "student": tiny, "prompt": SHORT, "holdout": 0.5,
                              "train": QUICK_TRAIN})
    service = service_factory(path)
    service.send(12)
    store = service.store()
    try:
        done = run_lap(store, service.spec, queue_lap(store, service.spec, trigger="on_demand").id)
        assert done.status == "succeeded", done
        assert re.search(r"held-back traffic: traffic [0-9.]+ vs 1\.000", done.reason), done.reason
    finally:
        store.close()


def test_the_held_back_gate_uses_only_what_the_current_production_answered(tmp_path, tiny_model_dir, chatty_dir,
                                                                          service_factory):
    """A lap's range can straddle a switch of production; its answers from before the switch came from
    another system, so they are no evidence about the current one and stay out of the gate."""
    from flywheel.service.laps import _held_back, queue_lap, run_lap

    tiny, chatty = f"local:{tiny_model_dir}", f"local:{chatty_dir}"  # production answers words (a label)
    service = service_factory(write_service(tmp_path, chatty, shadow={"share": 0.0},
                                            lap={"student": tiny, "prompt": SHORT, "holdout": 0.5,
                                                 "train": QUICK_TRAIN}))
    service.send(6)
    store = service.store()
    try:
        production = store.service_alias("production")
        with pytest.raises(AliasError, match=f"prompt {SHORT_ID} is not in"):  # it would fail every request
            aliases.set_alias(store, "production", AliasTarget(chatty, SHORT_ID), who="operator", why="a new prompt")
        assert aliases.stored_prompt(store, service.spec, SHORT, "prompt") == SHORT_ID
        aliases.set_alias(store, "production", AliasTarget(chatty, SHORT_ID), who="operator", why="a new prompt")
        aliases.set_alias(store, "candidate", AliasTarget(chatty, SHORT_ID), who="operator", why="idle")
    finally:
        store.close()
    service.send(6)
    store = service.store()
    try:
        switched = store.current_switch("production").created_at
        after = [c["id"] for c in store.captures_after(0) if c["created_at"] > switched]
        assert len(after) == 6 and production != store.service_alias("production")
        events: list[str] = []
        run_lap(store, service.spec, queue_lap(store, service.spec, trigger="on_demand").id, event=events.append)
        held = sum(_held_back(i, 0.5) for i in after)
        assert any(f"{held} held back" in e for e in events), events
        assert held < sum(_held_back(c["id"], 0.5) for c in store.captures_after(0))  # the rule excluded some
    finally:
        store.close()


def test_traffic_drifts_to_a_new_label_and_a_later_lap_trains_on_it(tmp_path, tiny_model_dir, chatty_dir,
                                                                    service_factory):
    """The app's traffic changes (new phrasings, a label the first lap never saw): the next lap's
    training set is the drifted traffic (none of the old), and its student becomes the candidate."""
    import json

    from flywheel.service.laps import queue_lap, run_lap

    chatty, tiny = f"local:{chatty_dir}", f"local:{tiny_model_dir}"
    service = service_factory(write_service(tmp_path, chatty, shadow={"share": 0.0},
                                            lap={"student": tiny, "prompt": SHORT, "train": QUICK_TRAIN,
                                                 "holdout": 0.0}))

    def send(texts: list[str], label: str) -> None:
        for text in texts:
            service.app.chat.completions.create(model="production", messages=[{"role": "user", "content": text}],
                                                max_tokens=4, temperature=0, metadata={"label": label})

    def trained_on(lap_id: str) -> list[str]:
        lines = (tmp_path / "service" / lap_id / "train.jsonl").read_text(encoding="utf-8").splitlines()
        return [json.loads(line)["messages"][1]["content"] for line in lines]

    before = [f"where is my new card {i}?" for i in range(4)]
    drifted = [f"please stop the transfer I sent to account {i}" for i in range(5)]
    store = service.store()
    try:
        send(before, "card_arrival")
        first = run_lap(store, service.spec, queue_lap(store, service.spec, trigger="on_demand").id)
        assert first.decision == "candidate" and sorted(trained_on(first.id)) == sorted(before)
        send(drifted, "cancel_transfer")  # the drift: new phrasings, a new label
        second = run_lap(store, service.spec, queue_lap(store, service.spec, trigger="on_demand").id)
        assert second.decision == "candidate", second
        assert sorted(trained_on(second.id)) == sorted(drifted)  # the new traffic only, each once
        assert second.checkpoint != first.checkpoint
        assert store.service_alias("candidate") == AliasTarget(second.checkpoint, SHORT_ID)
        assert [s.who for s in store.service_switches("candidate")][:2] == [f"lap {second.id}", f"lap {first.id}"]
    finally:
        store.close()


def test_a_store_whose_aliases_held_prompt_texts_serves_the_same_prompts_after_m022(tmp_path):
    """Stores written before m022 held an alias's system text; they open with stored prompts of it."""
    import sqlite_utils

    from flywheel.store.migrations import MIGRATIONS

    index = [name for name, _ in MIGRATIONS].index("m022_service_prompts_are_stored_prompts")
    db = sqlite_utils.Database(tmp_path / "old.db")
    db["_migrations"].create({"name": str, "applied_at": str}, pk="name")
    for name, fn in MIGRATIONS[:index]:
        fn(db)
        db["_migrations"].insert({"name": name, "applied_at": "2026-12-06T09:30:00.000+00:00"})
    db["service_switches"].insert({"id": 1, "created_at": "t", "alias": "production", "from_model": None,
                                   "from_prompt": None, "to_model": "local:x", "to_prompt": LONG, "who": "service.yaml",
                                   "why": "first", "kind": "set"})
    db["service_switches"].insert({"id": 2, "created_at": "t", "alias": "production", "from_model": "local:x",
                                   "from_prompt": LONG, "to_model": "local:y", "to_prompt": SHORT, "who": "shadow",
                                   "why": "cheaper", "kind": "promote"})
    db["service_aliases"].insert({"alias": "production", "model": "local:y", "prompt": SHORT, "switch_id": 2,
                                  "updated_at": "t"})
    db.conn.close()
    store = Store.open(tmp_path / "old.db")
    try:
        production = store.service_alias("production")
        assert production == AliasTarget("local:y", SHORT_ID)
        assert aliases.prompt_of(store, production).messages == [{"role": "system", "content": SHORT}]
        promoted = store.service_switch(2)
        assert (promoted.from_target, promoted.to_target) == (AliasTarget("local:x", LONG_ID), production)
    finally:
        store.close()


def test_export_prompt_writes_the_file_a_service_alias_reads(tmp_path):
    import json

    from click.testing import CliRunner

    from flywheel.cli import main

    prompt = Prompt(messages=[{"role": "system", "content": "Label."}, {"role": "user", "content": "{{item.text}}"}],
                    demos=[Demo("a", "where is my card?", "card_arrival")], nearest=1)
    db = tmp_path / "f.db"
    store = Store.open(db)
    store.save_prompt(prompt, origin="test")
    store.close()
    out = tmp_path / "p.json"
    result = CliRunner().invoke(main, ["export", "prompt", prompt.id, "--db", str(db), "-o", str(out)])
    assert result.exit_code == 0, result.output
    assert Prompt.from_json(json.loads(out.read_text())) == prompt and f"wrote {prompt.id}" in result.output
    missing = CliRunner().invoke(main, ["export", "prompt", "p-000000000000", "--db", str(db), "-o", str(out)])
    assert missing.exit_code == 2 and "no prompt p-000000000000 in" in missing.output
    best = CliRunner().invoke(main, ["export", "prompt", "best", "--db", str(db), "-o", str(out)])
    assert best.exit_code == 2 and "PROMPT best needs --eval SPEC" in best.output


def test_the_shipped_example_loads_and_its_production_prompt_demonstrates_train_items_only(tmp_path):
    import json
    from pathlib import Path

    example = Path(__file__).resolve().parents[1] / "examples" / "service" / "service.yaml"
    spec = load_service_spec(example, [f"db={tmp_path / 'service.db'}"])
    store = Store.open(spec.path(spec.db))
    try:
        production = aliases.ensure_aliases(store, spec)["production"]
        prompt = aliases.prompt_of(store, production)
    finally:
        store.close()
    assert (len(prompt.demos), prompt.nearest) == (200, 3) and production.model == "local:smollm2"
    rows = [json.loads(line) for line in (example.parents[2] / "evals" / "banking77" / "data.jsonl").read_text(
        encoding="utf-8").splitlines()]
    split = {r["id"]: r["split"] for r in rows}
    assert {split[d.item_key] for d in prompt.demos} == {"train"}  # the gate's valid/test are never demonstrations


def test_with_history_a_lap_trains_and_gates_on_earlier_traffic_too(tmp_path, tiny_model_dir, chatty_dir,
                                                                    service_factory):
    """Earlier captures join the training set (never a held-back one) and, answered by the current
    production, their held-back share joins the gate: more evidence, the same rule."""
    import json

    from flywheel.service.laps import _held_back, queue_lap, run_lap

    chatty, tiny = f"local:{chatty_dir}", f"local:{tiny_model_dir}"
    service = service_factory(write_service(tmp_path, chatty, shadow={"share": 0.0},
                                            lap={"student": tiny, "prompt": SHORT, "train": QUICK_TRAIN,
                                                 "holdout": 0.3, "history": 3}))

    def send(texts: list[str]) -> None:
        for text in texts:
            service.app.chat.completions.create(model="production", messages=[{"role": "user", "content": text}],
                                                max_tokens=4, temperature=0, metadata={"label": "card_arrival"})

    store = service.store()
    try:
        send([f"where is my new card {i}?" for i in range(6)])
        first = run_lap(store, service.spec, queue_lap(store, service.spec, trigger="on_demand").id)
        send([f"please stop the transfer to account {i}" for i in range(6)])
        events: list[str] = []
        second = run_lap(store, service.spec, queue_lap(store, service.spec, trigger="on_demand").id,
                         event=events.append)
        assert first.status == second.status == "succeeded", (first, second)
        captures = {c["id"]: json.loads(c["request_json"])["messages"][-1]["content"] for c in store.captures_after(0)}
        trained = [json.loads(line)["messages"][-2]["content"] for line in
                   (tmp_path / "service" / second.id / "train.jsonl").read_text(encoding="utf-8").splitlines()]
        own = range(second.first_capture_id, second.last_capture_id + 1)
        earlier = [i for i in captures if i < second.first_capture_id][-3:]  # the 3 newest before the lap's own
        expected = [captures[i] for i in [*earlier, *own] if not _held_back(i, 0.3)]
        assert trained == expected and any(captures[i] in trained for i in earlier)
        held = [i for i in [*earlier, *own] if _held_back(i, 0.3)]
        assert any(i in earlier for i in held) and any(f", {len(held)} held back" in e for e in events), (held, events)
    finally:
        store.close()


def test_the_service_purges_captures_past_retention_and_no_lap_takes_them(tmp_path, tiny_model_dir):
    import json
    import time

    from flywheel.service.laps import new_captures
    from flywheel.service.run import start_service

    spec = load_service_spec(write_service(tmp_path, f"local:{tiny_model_dir}", shadow={"share": 0.0},
                                           retention_days=30, ports={"proxy": 0, "models": 0, "api": 0}))
    store = Store.open(spec.path(spec.db))
    old = {"endpoint": "/v1/chat/completions", "model": "production", "status": 200,
           "request_json": json.dumps({"model": "production", "messages": [{"role": "user", "content": "ancient-7731"}]}),
           "response_json": json.dumps({"choices": [{"message": {"role": "assistant", "content": "card_arrival"}}]})}
    store.insert_captures([{**old, "created_at": "2020-01-01T00:00:00.000+00:00"}])
    assert len(new_captures(store, spec)) == 1
    service = start_service(spec, workers=0)
    try:
        app = openai.OpenAI(base_url=service.urls["proxy"], api_key="unused", max_retries=0)
        app.chat.completions.create(model="production", max_tokens=4, messages=[{"role": "user", "content": "recent"}])
        deadline = time.monotonic() + 60
        while True:  # purged at start and the new capture written, both off the request path
            waiting = [json.loads(c["request_json"])["messages"][-1]["content"] for c in new_captures(store, spec)]
            if waiting == ["recent"]:
                break
            assert time.monotonic() < deadline, waiting
            time.sleep(0.2)
    finally:
        service.stop()
    try:
        assert store.list_deletions()[0]["reason"] == "retention (30 days)"
    finally:
        store.close()
