"""The review server, over real HTTP on 127.0.0.1 (uvicorn in a thread)."""

import http.client
import re
import urllib.parse

import pytest
from click.testing import CliRunner

from flywheel.cli import main
from flywheel.report.review_app import _safe_next, create_app, word_diff
from flywheel.reviews import preferences, sample_reviews
from flywheel.web import BackgroundServer

from report_helpers import XSS, build_run, default_outcome, sample_id


def request(server, method, path, body=None, headers=None):
    conn = http.client.HTTPConnection("127.0.0.1", server.port, timeout=30)
    data = urllib.parse.urlencode(body).encode() if body is not None else None
    hdrs = {"Content-Type": "application/x-www-form-urlencoded"} if body is not None else {}
    conn.request(method, path, body=data, headers={**hdrs, **(headers or {})})
    response = conn.getresponse()
    text = response.read().decode()
    conn.close()
    return response.status, dict(response.getheaders()), text


@pytest.fixture
def run(store):
    def outcome(k, i):
        o = default_outcome(k, i)
        if i == 1:
            o.output = XSS
        return o

    return build_run(store, n_items=60, outcome=outcome, item_text=lambda i: XSS if i == 3 else f"question {i}")


@pytest.fixture
def reviewing(store, run):
    with BackgroundServer(create_app(store.path, review=True, reviewer="ana")) as server:
        yield server


@pytest.fixture
def read_only(store, run):
    with BackgroundServer(create_app(store.path)) as server:
        yield server


def token_of(html):
    return re.search(r'name="token" value="([^"]+)"', html).group(1)


def compare_path(run, a=0, b=1, **extra):
    return "/compare?" + urllib.parse.urlencode({"a": run["iterations"][a], "b": run["iterations"][b], **extra})


def test_pages_render_and_escape_everything(read_only, run, store):
    status, headers, html = request(read_only, "GET", "/")
    assert status == 200 and run["run_id"] in html and "read-only" in html
    assert "default-src 'none'" in headers["content-security-policy"]
    status, _, html = request(read_only, "GET", f"/runs/{run['run_id']}")
    assert status == 200 and "#2 sft" in html and "<svg" in html and "Judge vs human" in html
    status, _, html = request(read_only, "GET", compare_path(run))
    assert status == 200
    assert "<script" not in html and "<img" not in html and "<b>bold" not in html
    assert "&lt;/script&gt;&lt;script&gt;window.__pwned=1&lt;/script&gt;" in html
    assert "McNemar" in html and "Prompt diff" in html
    sid = sample_id(store, run["iterations"][1], "item-00001")
    status, _, html = request(read_only, "GET", f"/samples/{sid}")
    assert status == 200 and "<script" not in html and "&lt;img src=x" in html


def test_compare_puts_regressions_first_filters_and_pages(read_only, run):
    _, _, html = request(read_only, "GET", compare_path(run))
    statuses = re.findall(r'data-status="(\w+)"', html)
    assert len(statuses) == 50 and statuses[0] == "regression"
    assert re.search(r'class="chip regression"[^>]*>Regressions<b>(\d+)</b>', html)
    _, _, html = request(read_only, "GET", compare_path(run, f="regression"))
    statuses = re.findall(r'data-status="(\w+)"', html)
    assert statuses and set(statuses) == {"regression"}
    _, _, html = request(read_only, "GET", compare_path(run, page=1))
    assert "page 2 of 2" in html and len(re.findall(r'data-status="', html)) == 10
    _, _, html = request(read_only, "GET", compare_path(run, q="question 17"))
    assert re.findall(r'data-key="([^"]+)"', html) == ["item-00017"]
    _, _, html = request(read_only, "GET", compare_path(run, g="judge"))
    assert '<option value="judge" selected>' in html
    _, _, html = request(read_only, "GET", compare_path(run, a=2, b=2))  # one iteration alone
    assert "McNemar" not in html and len(re.findall(r'data-status="', html)) == 50


def test_search_finds_items_and_outputs(read_only, run):
    _, _, html = request(read_only, "GET", "/search?q=question+42")
    assert html.count("item-00042") >= 3  # one result per iteration
    _, _, html = request(read_only, "GET", "/search?q=" + urllib.parse.quote("window.__pwned=1"))
    assert "item-00001" in html and "item-00003" in html and "<script>" not in html
    _, _, html = request(read_only, "GET", "/search?q=100%25")
    assert "0 samples" in html


def test_read_only_server_refuses_reviews(read_only, run, store):
    _, _, html = request(read_only, "GET", compare_path(run))
    assert 'action="/reviews"' not in html
    status, _, html = request(read_only, "POST", "/reviews", {"sample_id": "1", "verdict": "fail"})
    assert status == 403 and "--review" in html
    assert store.db["reviews"].count == 0


def test_reviews_are_recorded_and_feed_training(reviewing, run, store):
    _, _, html = request(reviewing, "GET", compare_path(run))
    token = token_of(html)
    a = sample_id(store, run["iterations"][0], "item-00002")
    b = sample_id(store, run["iterations"][1], "item-00002")
    status, headers, _ = request(reviewing, "POST", "/reviews", {
        "token": token, "sample_id": b, "verdict": "fail", "next": compare_path(run), "anchor": "row-0-0"})
    assert status == 303 and headers["location"] == compare_path(run) + "#row-0-0"
    request(reviewing, "POST", "/reviews", {"token": token, "sample_id": b, "other_sample_id": a,
                                            "preference": "other", "next": "/"})
    request(reviewing, "POST", "/reviews", {"token": token, "sample_id": b, "correction": "exchange_rate",
                                            "note": "label is in the item", "next": "/"})
    rows = list(store.db.query("select * from reviews order by id"))
    assert [(r["verdict"], r["preference"], r["correction"], r["reviewer"]) for r in rows] == [
        ("fail", None, None, "ana"), (None, "other", None, "ana"), (None, None, "exchange_rate", "ana")]
    # What the training-set builders read (tests/test_train_datasets.py turns these into SFT rows and DPO pairs).
    assert sample_reviews(store, run_ids=[run["run_id"]])[b].correction == "exchange_rate"
    assert [(p.chosen, p.rejected) for p in preferences(store, run_ids=[run["run_id"]])] == [(a, b)]
    _, _, html = request(reviewing, "GET", compare_path(run))
    assert "human: fail" in html and "preferred: A" in html and "exchange_rate" in html
    _, _, html = request(reviewing, "GET", f"/runs/{run['run_id']}")
    assert re.search(r'data-grader="judge".*?agreement-rate"><strong>(0\.0|100\.0)%', html, re.S)


def test_writes_need_token_local_host_and_same_origin(reviewing, run, store):
    sid = sample_id(store, run["iterations"][1], "item-00002")
    _, _, html = request(reviewing, "GET", "/")
    status, _, _ = request(reviewing, "POST", "/reviews", {"token": "guess", "sample_id": sid, "verdict": "fail"})
    assert status == 403
    token = token_of(request(reviewing, "GET", compare_path(run))[2])
    status, _, _ = request(reviewing, "POST", "/reviews", {"token": token, "sample_id": sid, "verdict": "fail"},
                           headers={"Origin": "http://evil.example"})
    assert status == 403
    status, _, _ = request(reviewing, "GET", "/", headers={"Host": "evil.example"})  # DNS rebinding
    assert status == 400
    status, _, html = request(reviewing, "POST", "/reviews", {"token": token, "sample_id": sid, "verdict": "maybe"})
    assert status == 400 and "verdict &#39;maybe&#39;" in html
    status, headers, _ = request(reviewing, "POST", "/reviews", {"token": token, "sample_id": sid, "verdict": "pass",
                                                                 "next": "//evil.example/x", "anchor": "x\"><"})
    assert status == 303 and headers["location"] == "/"
    assert [r["verdict"] for r in store.db.query("select verdict from reviews")] == ["pass"]


def test_safe_next_and_word_diff():
    assert _safe_next("/compare?a=1") == "/compare?a=1"
    for bad in ("//evil.example", "https://evil.example", "/\\evil", "", None, "javascript:alert(1)"):
        assert _safe_next(bad) == "/"
    left, right = word_diff("the card is lost", "the card arrived")
    assert ("-", "is lost") in left and ("+", "arrived") in right


def test_missing_things_are_404_pages(read_only):
    assert request(read_only, "GET", "/runs/nope")[0] == 404
    assert request(read_only, "GET", "/samples/999999")[0] == 404
    assert request(read_only, "GET", "/compare?a=x&b=y")[0] == 404


def test_serve_binds_loopback_and_is_read_only_by_default(monkeypatch, store):
    import flywheel.report.review_app as server_module

    calls = []
    monkeypatch.setattr(server_module, "serve_reports", lambda db, **kw: calls.append((db, kw)))
    result = CliRunner().invoke(main, ["serve", "--db", store.path])
    assert result.exit_code == 0, result.output
    assert calls == [(store.path, {"host": "127.0.0.1", "port": 8765, "review": False, "reviewer": None,
                                   "on_ready": calls[0][1]["on_ready"]})]
    result = CliRunner().invoke(main, ["serve", "--db", store.path, "--host", "0.0.0.0", "--review"])
    assert "warning: listening on 0.0.0.0" in result.output and calls[1][1]["review"] is True


def test_empty_store(tmp_path):
    with BackgroundServer(create_app(str(tmp_path / "empty.db"))) as server:
        status, _, html = request(server, "GET", "/")
        assert status == 200 and "No runs in this store yet" in html


def test_on_the_api_port_the_pages_need_a_key_and_show_its_project_only(store):
    """The review app mounted beside the API (off loopback: keys required) checks the same keys,
    projects and roles as /v1: a login sets an HttpOnly, SameSite=Strict cookie; another project's
    run reads as a missing one."""
    from flywheel.api.access import create_key
    from flywheel.api.app import create_api_app

    mine = build_run(store, n_items=4, run_id="run-team-a-000001", item_text=lambda i: f"team-a secret {i}")
    theirs = build_run(store, n_items=4, run_id="run-team-b-000001", item_text=lambda i: f"team-b secret {i}")
    cli_run = build_run(store, n_items=4, run_id="run-cli-0000001", item_text=lambda i: f"cli secret {i}")
    for run_id, project in ((mine["run_id"], "team-a"), (theirs["run_id"], "team-b")):
        store.api_insert("api_wheel_runs", {"id": f"fwrun_{project}", "created_at": "2026-12-07T00:00:00",
                                            "status": "succeeded", "run_id": run_id, "spec_path": "x",
                                            "project": project})
    key_a, _ = create_key(store, "a", project="team-a", role="reader")
    key_default, _ = create_key(store, "d", project="default", role="member")
    app = create_api_app(store.path, require_key=True, workers=0, fallback=create_app(store.path, review=True),
                         report_base="/")
    with BackgroundServer(app) as server:
        for path in ("/", f"/runs/{theirs['run_id']}", "/search?q=secret"):
            status, headers, html = request(server, "GET", path)
            assert status == 303 and headers["location"] == "/login" and "secret" not in html
        assert request(server, "POST", "/login", {"key": "fw-wrong"})[0] == 401
        status, headers, _ = request(server, "POST", "/login", {"key": key_a})
        assert status == 303
        cookie = headers["set-cookie"]
        assert "HttpOnly" in cookie and "SameSite=Strict" in cookie
        session = {"Cookie": cookie.split(";", 1)[0]}
        assert request(server, "GET", "/v1/evals", headers=session)[0] == 401  # /v1 takes bearer keys only
        status, _, html = request(server, "GET", "/", headers=session)
        assert status == 200 and mine["run_id"] in html
        assert theirs["run_id"] not in html and cli_run["run_id"] not in html
        hidden = request(server, "GET", f"/runs/{theirs['run_id']}", headers=session)
        missing = request(server, "GET", "/runs/run-none-0000001", headers=session)
        assert hidden[0] == missing[0] == 404
        assert hidden[2].replace(theirs["run_id"], "X") == missing[2].replace("run-none-0000001", "X")
        their_sample = sample_id(store, theirs["iterations"][0], "item-00001")
        assert request(server, "GET", f"/samples/{their_sample}", headers=session)[0] == 404
        status, _, html = request(server, "GET", "/search?q=secret", headers=session)
        assert status == 200 and "team-a secret" in html and "team-b secret" not in html and "cli secret" not in html
        # a reader reads; recording a review needs a member
        token = token_of(request(server, "GET", compare_path(mine), headers=session)[2])
        own_sample = sample_id(store, mine["iterations"][1], "item-00001")
        assert request(server, "POST", "/reviews", {"token": token, "sample_id": own_sample, "verdict": "fail"},
                       headers=session)[0] == 403
        # a bearer key works too; the CLI's runs belong to `default`
        status, _, html = request(server, "GET", "/", headers={"Authorization": f"Bearer {key_default}"})
        assert status == 200 and cli_run["run_id"] in html and mine["run_id"] not in html
        # a member of default may not review team-b's sample
        token = token_of(request(server, "GET", compare_path(cli_run),
                                 headers={"Authorization": f"Bearer {key_default}"})[2])
        status, _, _ = request(server, "POST", "/reviews", {"token": token, "sample_id": their_sample,
                                                            "verdict": "fail"},
                               headers={"Authorization": f"Bearer {key_default}"})
        assert status == 400
    assert list(store.db.query("select * from reviews")) == []


def test_the_wheel_page_in_the_app_is_the_reports_story(store, tmp_path):
    """One set of partials: the app's run page of a wheel run shows the milestones, the chart with
    every candidate measured on valid (the passed-over finalist linked to its search run), the
    search's table and the split column, as the static report does."""
    from flywheel.report.html import render_report
    from report_helpers import build_wheel_with_search

    built = build_wheel_with_search(store)
    wheel_id, search_id = built["wheel"]["run_id"], built["search"]["run_id"]
    with BackgroundServer(create_app(store.path)) as server:
        status, _, page = request(server, "GET", f"/runs/{wheel_id}")
    report = render_report(store, [wheel_id])
    for html, link in ((page, f'href="/runs/{search_id}"'), (report, f'href="#search-{search_id}"')):
        assert 'id="milestones"' in html and "best prompt" in html and 'id="wheel"' in html
        assert html.count('class="point ') == 3  # two measured by the wheel, one finalist passed over
        assert 'class="point passed-over"' in html and f"<a {link}><circle" in html
        assert f'id="search-{search_id}"' in html and "no better on valid than the cheaper winner" in html
        assert '<th>split</th>' in html and '<td class="split">valid</td>' in html
    assert status == 200


def test_ft_names_and_api_run_names_show_in_the_app(store):
    run = build_run(store, n_items=4, run_id="run-api-000001", model_ref="local:tiny+ckpt/sft-9")
    store.insert_checkpoint({"id": "ckpt-9", "method": "sft", "model_ref": "local:tiny+ckpt/sft-9"})
    store.api_insert("api_fine_tuning_jobs", {"id": "ftjob-abc", "created_at": "2026",
                                              "model": "local:tiny", "fine_tuned_model": "ft:tiny:support:abc",
                                              "checkpoint_id": "ckpt-9", "project": "default"})
    store.api_insert("api_evals", {"id": "eval_1", "created_at": "2026", "name": "support", "project": "default"})
    store.api_insert("api_eval_runs", {"id": "evalrun_1", "eval_id": "eval_1", "created_at": "2026",
                                       "name": "nightly <b>check</b>", "model": "ft:tiny:support:abc",
                                       "run_id": run["run_id"], "status": "completed", "project": "default"})
    with BackgroundServer(create_app(store.path)) as server:
        _, _, runs = request(server, "GET", "/")
        _, _, page = request(server, "GET", f"/runs/{run['run_id']}")
    assert '<span class="api-name">nightly &lt;b&gt;check&lt;/b&gt;</span>' in runs and "evalrun_1" in runs
    assert '<strong class="ft">ft:tiny:support:abc</strong>' in runs
    assert '<strong class="api-name">nightly &lt;b&gt;check&lt;/b&gt;</strong>' in page and "evalrun_1" in page
    assert page.count('<strong class="ft">ft:tiny:support:abc</strong>') >= 2  # the header and each iteration


def test_on_the_api_port_the_service_dashboard_needs_an_admin_key(store):
    """The service dashboard shows live traffic of every project: on the API port a member or reader
    key gets a 403, an admin key the page (docs/security.md)."""
    from flywheel.api.access import create_key
    from flywheel.api.app import create_api_app

    keys = {role: create_key(store, role, project="team-a", role=role)[0] for role in ("admin", "member", "reader")}
    app = create_api_app(store.path, require_key=True, workers=0, fallback=create_app(store.path), report_base="/")
    with BackgroundServer(app) as server:
        seen = {role: request(server, "GET", "/service", headers={"Authorization": f"Bearer {key}"})
                for role, key in keys.items()}
    assert seen["member"][0] == seen["reader"][0] == 403
    assert "admin key" in seen["reader"][2]
    assert seen["admin"][0] == 200
