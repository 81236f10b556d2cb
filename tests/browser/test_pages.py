"""The report and the review server in headless Chromium (Debian's chromium, driven by playwright).

`make test` installs chromium when it is missing (see the Makefile's `browser` target); outside CI
these tests are skipped on a machine without it. Set FLYWHEEL_SCREENSHOTS=DIR to keep screenshots.
"""

from __future__ import annotations

import json
import os
import re
import shutil
from pathlib import Path

import pytest

from flywheel.report.compare import compare_iterations, load_run_view
from flywheel.report.html import write_report
from flywheel.report.review_app import create_app
from flywheel.reviews import preferences, sample_reviews
from flywheel.web import BackgroundServer

from report_helpers import XSS, build_run, default_outcome, sample_id

CHROMIUM = os.environ.get("FLYWHEEL_CHROMIUM", "/usr/bin/chromium")
ARGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-background-networking",
        "--disable-component-update", "--disable-sync", "--no-first-run"]


@pytest.fixture(scope="module")
def browser():
    if not Path(CHROMIUM).exists():
        if os.environ.get("CI"):
            pytest.fail(f"{CHROMIUM} is missing: `make browser` installs it")
        pytest.skip(f"{CHROMIUM} is missing: `make browser` installs it")
    playwright_api = pytest.importorskip("playwright.sync_api")
    with playwright_api.sync_playwright() as p:
        b = p.chromium.launch(executable_path=CHROMIUM, args=ARGS)
        yield b
        b.close()


@pytest.fixture
def page(browser):
    context = browser.new_context(viewport={"width": 1440, "height": 900})
    pg = context.new_page()
    pg.errors = []
    pg.on("pageerror", lambda exc: pg.errors.append(str(exc)))
    yield pg
    context.close()


def keep_screenshot(page, tmp_path: Path, name: str) -> Path:
    path = tmp_path / f"{name}.png"
    page.screenshot(path=str(path))
    if os.environ.get("FLYWHEEL_SCREENSHOTS"):
        target = Path(os.environ["FLYWHEEL_SCREENSHOTS"])
        target.mkdir(parents=True, exist_ok=True)
        shutil.copy(path, target / path.name)
    return path


def outcome(k, i):
    o = default_outcome(k, i)
    if i == 1:
        o.output = XSS
    if k == 2 and i == 5:
        o.error = "model_error: " + XSS
    return o


@pytest.fixture
def run(store):
    return build_run(store, n_items=120, outcome=outcome,
                     item_text=lambda i: XSS if i == 3 else f"My card has not arrived after {i} days. What now?")


def test_report_compare_filter_and_search(page, run, store, tmp_path):
    path = write_report(store, [run["run_id"]], tmp_path / "report.html").path
    requests = []
    page.on("request", lambda r: requests.append(r.url))
    from playwright.sync_api import expect

    page.goto(Path(path).as_uri())
    page.wait_for_selector("body[data-ready='1']")
    assert requests == [Path(path).as_uri()]  # nothing but the file itself
    assert page.evaluate("window.__pwned") is None and page.errors == []
    # The payloads show as text.
    assert XSS in page.locator("#rows").inner_text() or XSS in page.content().replace("&lt;", "<").replace("&gt;", ">")
    rows = page.locator("#rows .row")
    assert rows.count() == 50 and rows.first.get_attribute("data-status") == "regression"
    keep_screenshot(page, tmp_path, "report-top")
    page.locator("#compare").scroll_into_view_if_needed()
    keep_screenshot(page, tmp_path, "report-compare")

    # Switch the compared iterations: #2 sft against #0 eval.
    page.select_option("#sel-b", "2")
    view = load_run_view(store, [run["run_id"]])
    cmp = compare_iterations(store, view, run["iterations"][0], run["iterations"][2])
    p = cmp.stats["p_mcnemar"]
    expected_p = "p < 0.001" if p < 0.001 else f"p = {p:.3f}"
    mcnemar = page.locator("#mcnemar").inner_text()
    assert expected_p in mcnemar and f"{cmp.stats['regressions']} regressed" in mcnemar
    assert "#2 sft" in page.locator("#verdict").inner_text()
    assert "b=2" in page.evaluate("location.hash")

    # Filter: only regressions, then errors.
    page.click("#filters [data-filter='regression']")
    statuses = set(page.locator("#rows .row").evaluate_all("rs => rs.map(r => r.dataset.status)"))
    assert statuses == {"regression"}
    assert page.locator("#rows .row").count() == min(50, cmp.stats["counts"]["regression"])
    page.click("#filters [data-filter='errors']")
    assert page.locator("#rows .row").count() == 1
    assert "model_error: " + XSS in page.locator("#rows .row").first.inner_text()
    keep_screenshot(page, tmp_path, "report-errors")

    # Search across item fields and outputs; then page through everything.
    page.click("#filters [data-filter='all']")
    page.fill("#q", "after 17 days")
    expect(page.locator("#rows .row")).to_have_count(1)  # the page's CSP forbids wait_for_function
    assert page.locator("#rows .row").first.get_attribute("data-key") == "item-00017"
    page.fill("#q", "")
    expect(page.locator("#rows .row")).to_have_count(50)
    page.click("#next")
    assert "51–100 of 120" in page.locator("#shown").inner_text()
    # The iteration table's A/B buttons pick a pair too.
    page.click("button.pick[data-side='a'][data-idx='1']")
    assert page.locator("#sel-a").input_value() == "1"
    assert page.evaluate("window.__pwned") is None and page.errors == []


def test_review_in_the_server_reaches_the_store(page, run, store, tmp_path):
    with BackgroundServer(create_app(store.path, review=True, reviewer="ana")) as server:
        page.goto(f"{server.url}/runs/{run['run_id']}")
        keep_screenshot(page, tmp_path, "serve-run")
        page.click("text=vs parent >> nth=0")
        page.wait_for_selector("#rows .row")
        keep_screenshot(page, tmp_path, "serve-compare")
        first = page.locator("#rows .row").first
        key = first.get_attribute("data-key")
        assert first.get_attribute("data-status") == "regression"
        b_id = sample_id(store, run["iterations"][1], key)
        a_id = sample_id(store, run["iterations"][0], key)

        # Mark B's output as failing, then prefer A's.
        first.locator(".side-b .mark-fail").click()
        page.wait_for_load_state()
        assert [r["verdict"] for r in store.db.query("select verdict from reviews where sample_id = ?", [b_id])] == ["fail"]
        row = page.locator(f"#rows .row[data-key='{key}']")
        assert "human: fail" in row.inner_text()
        row.locator(".prefer-a").click()
        page.wait_for_load_state()
        assert "preferred: A" in page.locator(f"#rows .row[data-key='{key}']").inner_text()

        # Correct the output on the sample page.
        page.goto(f"{server.url}/samples/{b_id}")
        page.fill("textarea[name=correction]", "card_arrival (corrected)")
        page.fill("textarea[name=note]", "the item says the card is late")
        page.click("#review-form button[type=submit]")
        page.wait_for_selector("#history")
        assert "card_arrival (corrected)" in page.locator("#history").inner_text()
        keep_screenshot(page, tmp_path, "serve-sample")

        # Verdicts now show judge-vs-human agreement on the run page.
        page.goto(f"{server.url}/runs/{run['run_id']}")
        assert page.locator("#agreement tr[data-grader='judge']").count() == 1
        assert page.errors == []

    # What the training-set builders read (tests/test_train_datasets.py turns these into rows and pairs).
    assert sample_reviews(store, run_ids=[run["run_id"]])[b_id].correction == "card_arrival (corrected)"
    assert (a_id, b_id) in [(p.chosen, p.rejected) for p in preferences(store, run_ids=[run["run_id"]])]
    reviewers = {r["reviewer"] for r in store.db.query("select reviewer from reviews")}
    assert reviewers == {"ana"}


def test_read_only_server_has_no_review_controls(page, run, store):
    with BackgroundServer(create_app(store.path)) as server:
        page.goto(f"{server.url}/compare?a={run['iterations'][0]}&b={run['iterations'][1]}")
        assert page.locator("form[action='/reviews']").count() == 0
        assert "read-only" in page.locator("nav").inner_text()
        assert page.evaluate("window.__pwned") is None
        assert re.search(r"\d+ regressed", page.locator("#mcnemar").inner_text())


def test_the_wheel_story_is_the_same_in_the_report_and_the_app(page, store, tmp_path):
    """The score-vs-cost chart shows every candidate measured on valid; the passed-over finalist
    links to its search: an anchor in the report, the search run's page in the app."""
    from report_helpers import build_wheel_with_search

    built = build_wheel_with_search(store)
    wheel_id, search_id = built["wheel"]["run_id"], built["search"]["run_id"]

    def check_story(where):
        assert page.locator("#wheel svg.chart circle.point").count() == 3
        assert page.locator("#wheel svg.chart circle.point.passed-over").count() == 1
        assert page.locator("#milestones tbody tr").count() == 2
        assert page.locator(f"#search-{search_id} tbody tr").count() == 3  # its finalists; one passed over
        assert page.locator("#iterations td.split").first.inner_text() == "valid"
        page.locator("#wheel").scroll_into_view_if_needed()
        keep_screenshot(page, tmp_path, f"wheel-{where}")
        page.locator("#wheel svg.chart circle.point.passed-over").click()

    page.goto(Path(write_report(store, [wheel_id], tmp_path / "wheel.html").path).as_uri())
    page.wait_for_selector("body[data-ready='1']")
    check_story("report")
    assert page.evaluate("location.hash") == f"#search-{search_id}"
    with BackgroundServer(create_app(store.path)) as server:
        page.goto(f"{server.url}/runs/{wheel_id}")
        check_story("app")
        page.wait_for_url(f"**/runs/{search_id}")
        assert page.locator("#iterations tbody tr").count() == 3  # the search run's own page
    assert page.errors == []


def test_the_run_page_shows_a_run_in_progress(page, run, store):
    """While a wheel runs, its page has an "in progress" panel from the run's latest WheelEvent
    (kept on the run row by the wheel); a finished run has none."""
    from flywheel.events import WheelEvent
    from flywheel.wheel import WheelState

    event = WheelEvent(kind="train", lap=1, laps=2, stage="sft", position=2, positions=5, step="train", done=12,
                       total=40, unit="steps", loss=1.234, elapsed_s=95, eta_s=130, incumbent_score=0.667,
                       incumbent_cost="113 prompt tokens/item")
    store.db["runs"].update(run["run_id"], {"status": "running"})
    store.save_run_state(run["run_id"], WheelState(live=event, live_at="2026-12-07T10:00:00"))
    with BackgroundServer(create_app(store.path)) as server:
        page.goto(f"{server.url}/runs/{run['run_id']}")
        text = page.locator("#in-progress").inner_text()
        assert "lap 1/2 · stage 3/5 sft" in text and "train 12/40 steps" in text and "loss 1.234" in text
        assert "elapsed 1:35" in text and "left ~2:10" in text and "valid 0.667, 113 prompt tokens/item" in text
        store.db["runs"].update(run["run_id"], {"status": "completed"})
        page.goto(f"{server.url}/runs/{run['run_id']}")
        assert page.locator("#in-progress").count() == 0
        assert page.errors == []


def test_the_service_dashboard_shows_an_admin_the_service_and_links_a_lap_to_its_samples(page, tmp_path,
                                                                                          tiny_model_dir, chatty_dir):
    """`/service` on the service's API port (as `start_service` mounts it) over a store with a
    service's history: aliases, a lap decided by its real offline gate, a promotion, shadow and canary
    pairs, a rollback. An admin sees it all and follows the lap to its samples; a member is refused."""
    import yaml
    from conftest import make_rows, spec_dict, write_jsonl

    from flywheel.api.access import create_key
    from flywheel.api.app import create_api_app
    from flywheel.data import load_dataset
    from flywheel.prompt import Prompt
    from flywheel.service import aliases
    from flywheel.service.laps import offline_valid
    from flywheel.service.spec import load_service_spec
    from flywheel.spec import load_eval_spec
    from flywheel.store import Store, now
    from flywheel.store.service import AliasTarget, ShadowPair

    production, student = f"local:{chatty_dir}", f"local:{tiny_model_dir}"
    write_jsonl(tmp_path / "data.jsonl", make_rows())
    (tmp_path / "eval.yaml").write_text(yaml.safe_dump(spec_dict(production)))
    (tmp_path / "service.yaml").write_text(yaml.safe_dump(
        {"eval": "eval.yaml", "db": "service.db", "production": {"model": production, "prompt": "Answer: " + XSS}}))
    spec = load_service_spec(tmp_path / "service.yaml")
    db = str(spec.path(spec.db))
    store = Store.open(db)
    try:
        aliases.ensure_aliases(store, spec)
        admin, member = (create_key(store, role, role=role)[0] for role in ("admin", "member"))
        ids = store.insert_captures([{"endpoint": "/v1/chat/completions", "model": "production", "status": 200,
                                      "latency_s": 0.05, "request_json": json.dumps({"messages": [
                                          {"role": "user", "content": f"question {i} {XSS}"}]})} for i in range(8)])
        lap = store.create_service_lap("lap-20261207-1", trigger="new_captures", capture_ids=ids)
        eval_spec = load_eval_spec(spec.path(spec.eval))
        short = Prompt(messages=[{"role": "system", "content": "One label."}])
        store.save_prompt(short, origin="test")
        new = AliasTarget(student, short.id)
        gate = offline_valid(store, spec, eval_spec, load_dataset(eval_spec), lap.id,
                             aliases.target(store, "production"), new)
        set_id = aliases.set_alias(store, "candidate", new, who=f"lap {lap.id}", why=gate.reason, test="offline")
        store.update_service_lap(lap.id, status="succeeded", decision="candidate", reason=gate.reason,
                                 checkpoint=student, finished_at=now())
        for phase, switch in (("shadow", set_id), ("canary", None)):
            if phase == "canary":
                switch = aliases.promote(store, who="shadow", why="non-inferior and cheaper", test="confidence sequence")
            ours, theirs = (student, production) if phase == "canary" else (production, student)
            for i, capture_id in enumerate(ids):  # the student: cheaper, faster, worse once in production
                store.add_shadow_pair(ShadowPair(
                    capture_id=capture_id, phase=phase, switch_id=switch, production_model=ours, other_model=theirs,
                    production_score=1.0 if ours == production else float(i % 2), other_score=1.0,
                    production_latency_s=0.1 if ours == production else 0.02,
                    other_latency_s=0.1 if theirs == production else 0.02,
                    production_tokens=120 if ours == production else 30, other_tokens=120 if theirs == production else 30))
        rollback = aliases.rollback(store, who="canary", why="quality dropped", test="confidence sequence")
        n_switches = len(store.service_switches())
    finally:
        store.close()

    app = create_api_app(db, workers=0, fallback=create_app(db, allowed_hosts=["*"]), report_base="/",
                         loopback_role="none", start_lap=lambda store, trigger: None)
    failed: list[str] = []
    console: list[str] = []
    page.on("response", lambda r: failed.append(f"{r.status} {r.url}") if r.status >= 400 else None)
    page.on("console", lambda m: console.append(m.text) if m.type == "error" else None)
    with BackgroundServer(app) as server:
        page.goto(f"{server.url}/service")  # no key: the login form
        page.fill("input[name=key]", admin)
        page.click("form[action='/login'] button")
        page.goto(f"{server.url}/service")
        assert page.locator("h1").inner_text() == "Service"
        keep_screenshot(page, tmp_path, "service-dashboard")
        table = page.locator("#aliases").inner_text()
        assert "production" in table and production in table and "candidate" in table
        assert XSS in table and page.evaluate("window.__pwned") is None  # the prompt's text shows as text
        assert "8 requests to production" in page.locator(".sub").first.inner_text()
        laps = page.locator(f"#laps tr[data-lap='{lap.id}']").inner_text()
        assert "new_captures" in laps and "candidate" in laps and "valid:" in laps
        assert page.locator("#switches tbody tr").count() == n_switches
        undone = page.locator("#switches tbody tr", has_text=f"rollback of {rollback.reverts}")
        assert undone.count() == 1 and "quality dropped" in undone.inner_text() and "canary" in undone.inner_text()
        assert page.locator("#switches tbody tr", has_text="promote").count() >= 1
        # after the rollback production serves the first model again; its online score is per alias
        scores = page.locator(f"#scores tr[data-model='{production}'] td").all_inner_texts()
        assert scores[1:5] == ["candidate, production", "16", "1.000", "[1.000, 1.000]"]  # 8 shadow + 8 canary pairs
        assert scores[5:] == ["120000", "100 ms", "100 ms"]  # tokens per 1,000 requests, latency p50 and p95
        scores = page.locator(f"#scores tr[data-model='{student}'] td").all_inner_texts()
        assert scores[1:4] == ["–", "16", "0.750"] and scores[5:] == ["30000", "20 ms", "20 ms"]
        assert page.locator("#over-time tbody tr").count() == 2  # the shadow and the canary windows

        page.click(f"#laps tr[data-lap='{lap.id}'] a.gate")  # the lap's offline gate: production vs student
        page.wait_for_url(re.compile(r"/compare\?a="))
        page.wait_for_selector("#rows .row")
        sample_link = page.locator("a[href^='/samples/']").first
        href = sample_link.get_attribute("href")
        sample_link.click()
        page.wait_for_url(f"**{href}")
        assert f"{lap.id}-" in page.locator("main").inner_text()  # a sample of the lap's gate
        keep_screenshot(page, tmp_path, "service-lap-sample")
        assert failed == [] and console == [] and page.errors == []

        # every point links to its samples: a score row to the pairs its model answered in, a window
        # to its pairs, a pair to the live request behind it
        page.goto(f"{server.url}/service")
        page.click(f"#scores tr[data-model='{student}'] a.pairs")
        page.wait_for_url(re.compile(r"/service/pairs\?model="))
        assert page.locator("#pairs tbody tr").count() == 16  # 8 shadow + 8 canary
        page.go_back()
        page.locator("#over-time a.window").first.click()
        page.wait_for_url(re.compile(r"/service/pairs\?phase=shadow"))
        assert page.locator("#pairs tbody tr").count() == 8
        assert set(page.locator("#pairs tbody tr td:nth-child(2)").all_inner_texts()) == {"shadow"}
        keep_screenshot(page, tmp_path, "service-window-pairs")
        page.locator("#pairs a.capture").first.click()
        page.wait_for_url(re.compile(r"/service/captures/\d+$"))
        assert page.locator("h1").inner_text().startswith("Capture ")
        request = page.locator("#request .diff").inner_text()
        assert "question 7" in request and XSS in request and page.evaluate("window.__pwned") is None
        # this test pairs each capture in both gates: its shadow and its canary pair, both sides' scores
        pairs = page.locator("#pairs tbody tr").all_inner_texts()
        assert len(pairs) == 2 and "shadow" in pairs[0] and "canary" in pairs[1]
        assert all(production in p and student in p for p in pairs)
        keep_screenshot(page, tmp_path, "service-capture")
        assert failed == [] and console == [] and page.errors == []

        page.context.clear_cookies()
        page.goto(f"{server.url}/login")
        page.fill("input[name=key]", member)
        page.click("form[action='/login'] button")
        refused = page.goto(f"{server.url}/service")
        assert refused.status == 403 and "needs an admin key" in page.content()
        assert page.locator("#aliases").count() == 0
        for path in ("/service/pairs", f"/service/captures/{ids[0]}"):
            refused = page.goto(f"{server.url}{path}")
            assert refused.status == 403 and "needs an admin key" in page.content() and "question" not in page.content()
