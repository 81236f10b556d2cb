"""Projects, roles and rate limits of `flywheel serve --api`, with the real openai SDK against the
real server on 127.0.0.1: another project's object is a 404, a reader's write a 403, a burst past
the limit a 429 that the SDK's own retry then gets through."""

from __future__ import annotations

import time

import httpx
import openai
import pytest
from click.testing import CliRunner

from api_helpers import client_for, completions_source, create_eval, items, jsonl
from flywheel.api.access import create_key
from flywheel.api.app import create_api_app
from flywheel.api.model_access import ServerModels
from flywheel.api.limits import RateLimiter, duration
from flywheel.api.scoped import owned
from flywheel.cli import main
from flywheel.errors import FlywheelError
from flywheel.store import Store
from flywheel.web import BackgroundServer


def keys(db: str, *specs: tuple[str, str]) -> list[str]:
    store = Store.open(db)
    try:
        return [create_key(store, f"{project}-{role}", project=project, role=role)[0] for project, role in specs]
    finally:
        store.close()


def test_objects_are_scoped_to_the_keys_project(tmp_path, tiny_model_dir):
    db = str(tmp_path / "p.db")
    key_a, key_b = keys(db, ("team-a", "member"), ("team-b", "member"))
    offered = ServerModels(local_bases=[str(tiny_model_dir)])  # members name only the server's bases
    with BackgroundServer(create_api_app(db, require_key=True, workers=0, models=offered)) as server:
        a, b = client_for(server.url, key_a), client_for(server.url, key_b)
        uploaded = a.files.create(file=("items.jsonl", jsonl(items(3))), purpose="evals")
        evaluation = create_eval(a)
        run = a.evals.runs.create(evaluation.id, data_source=completions_source(
            tiny_model_dir, {"type": "file_id", "id": uploaded.id}))
        assert [f.id for f in a.files.list()] == [uploaded.id] and [e.id for e in a.evals.list()] == [evaluation.id]
        assert list(b.files.list()) == [] and list(b.evals.list()) == []
        for call in (lambda: b.files.retrieve(uploaded.id), lambda: b.files.content(uploaded.id),
                     lambda: b.files.delete(uploaded.id), lambda: b.evals.retrieve(evaluation.id),
                     lambda: b.evals.delete(evaluation.id), lambda: b.evals.runs.retrieve(run.id, eval_id=evaluation.id),
                     lambda: b.evals.runs.cancel(run.id, eval_id=evaluation.id)):
            with pytest.raises(openai.NotFoundError) as excinfo:
                call()
            assert excinfo.value.body["code"] == "not_found" and excinfo.value.body["type"] == "invalid_request_error"
        # b cannot use a's file in its own eval's run either
        own = create_eval(b)
        with pytest.raises(openai.NotFoundError) as excinfo:
            b.evals.runs.create(own.id, data_source=completions_source(
                tiny_model_dir, {"type": "file_id", "id": uploaded.id}))
        assert excinfo.value.body["param"] == "data_source.source.id"
        with pytest.raises(openai.NotFoundError):
            b.fine_tuning.jobs.retrieve("ftjob-nope")
        # nothing of a's was touched by b's attempts
        assert a.files.retrieve(uploaded.id).id == uploaded.id
        assert a.evals.runs.retrieve(run.id, eval_id=evaluation.id).status == "queued"


def test_a_reader_reads_and_gets_403_on_writes(tmp_path):
    db = str(tmp_path / "r.db")
    member, reader = keys(db, ("team-a", "member"), ("team-a", "reader"))
    with BackgroundServer(create_api_app(db, require_key=True, workers=0)) as server:
        evaluation = create_eval(client_for(server.url, member))
        read_only = client_for(server.url, reader)
        assert [e.id for e in read_only.evals.list()] == [evaluation.id]  # same project: visible
        with pytest.raises(openai.PermissionDeniedError) as excinfo:
            create_eval(read_only)
        error = excinfo.value.body
        assert excinfo.value.status_code == 403
        assert set(error) == {"message", "type", "param", "code"}
        assert error["code"] == "insufficient_permissions" and "reader" in error["message"]
        with pytest.raises(openai.PermissionDeniedError):
            read_only.evals.delete(evaluation.id)
        with pytest.raises(openai.PermissionDeniedError):
            read_only.files.create(file=("items.jsonl", jsonl(items(1))), purpose="evals")
        # grader validate / run store nothing: a reader may call them
        checked = read_only.fine_tuning.alpha.graders.validate(grader={
            "type": "string_check", "name": "x", "input": "{{sample.output_text}}", "reference": "a",
            "operation": "eq"})
        assert checked.grader.name == "x"
        assert client_for(server.url, member).evals.retrieve(evaluation.id).id == evaluation.id  # still there


def test_the_server_path_form_of_a_wheel_run_needs_an_admin(tmp_path):
    db = str(tmp_path / "w.db")
    member, admin = keys(db, ("default", "member"), ("default", "admin"))
    with BackgroundServer(create_api_app(db, require_key=True, workers=0)) as server, httpx.Client() as http:
        body = {"path": str(tmp_path / "no-such-run.yaml")}
        refused = http.post(server.url + "/v1/flywheel/runs", json=body, headers={"Authorization": f"Bearer {member}"})
        assert refused.status_code == 403 and refused.json()["error"]["code"] == "insufficient_permissions"
        allowed = http.post(server.url + "/v1/flywheel/runs", json=body, headers={"Authorization": f"Bearer {admin}"})
        assert allowed.status_code == 400 and allowed.json()["error"]["param"] == "path"  # past the role check


def test_loopback_without_a_key_is_the_default_project_and_a_key_picks_its_own(tmp_path):
    db = str(tmp_path / "l.db")
    (key_a,) = keys(db, ("team-a", "member"))
    with BackgroundServer(create_api_app(db, workers=0)) as server:
        anonymous, team = client_for(server.url), client_for(server.url, key_a)
        mine = create_eval(anonymous)
        theirs = create_eval(team)
        assert [e.id for e in anonymous.evals.list()] == [mine.id]
        assert [e.id for e in team.evals.list()] == [theirs.id]
    store = Store.open(db)
    try:
        assert store.api_get("api_evals", mine.id)["project"] == "default"
        assert store.api_get("api_evals", theirs.id)["project"] == "team-a"
    finally:
        store.close()


def test_rows_from_before_projects_belong_to_the_default_project():
    assert owned({"id": "x", "project": None}, "default") is not None
    assert owned({"id": "x", "project": None}, "team-a") is None
    assert owned({"id": "x", "project": "team-a"}, "team-a") is not None


def test_a_burst_past_the_limit_is_a_429_that_the_sdk_retry_gets_through(tmp_path):
    db = str(tmp_path / "rl.db")
    key_a, key_b = keys(db, ("team-a", "member"), ("team-b", "member"))
    app = create_api_app(db, require_key=True, workers=0, rate_limit_rpm=120, rate_limit_burst=2)
    with BackgroundServer(app) as server, httpx.Client() as http:
        headers = {"Authorization": f"Bearer {key_a}"}
        first = http.get(server.url + "/v1/evals", headers=headers)
        assert first.status_code == 200
        assert first.headers["x-ratelimit-limit-requests"] == "120"
        assert first.headers["x-ratelimit-remaining-requests"] == "1"
        assert first.headers["x-ratelimit-reset-requests"].endswith("ms")
        assert http.get(server.url + "/v1/evals", headers=headers).status_code == 200
        refused = http.get(server.url + "/v1/evals", headers=headers)
        assert refused.status_code == 429
        assert refused.json()["error"]["code"] == "rate_limit_exceeded"
        assert refused.json()["error"]["type"] == "requests"
        assert refused.headers["retry-after"] == "1" and 0 < int(refused.headers["retry-after-ms"]) <= 500
        assert refused.headers["x-ratelimit-remaining-requests"] == "0"
        # another key has its own bucket
        assert http.get(server.url + "/v1/evals", headers={"Authorization": f"Bearer {key_b}"}).status_code == 200

        no_retry = client_for(server.url, key_a)
        with pytest.raises(openai.RateLimitError) as excinfo:
            for _ in range(3):
                no_retry.evals.list()
        assert excinfo.value.body["code"] == "rate_limit_exceeded"
        # the SDK's own retry reads retry-after-ms and gets through
        retrying = openai.OpenAI(base_url=server.url + "/v1", api_key=key_a, max_retries=3, timeout=30)
        started = time.monotonic()
        for _ in range(4):
            assert list(retrying.evals.list()) == []
        assert time.monotonic() - started > 0.4  # it waited for tokens rather than being let through


def test_a_keys_own_rpm_overrides_the_servers(tmp_path):
    db = str(tmp_path / "own.db")
    store = Store.open(db)
    slow, _ = create_key(store, "slow", rpm=1)
    store.close()
    for limit in (1000, None):  # a key's own limit holds with or without the server's
        app = create_api_app(db, require_key=True, workers=0, rate_limit_rpm=limit)
        with BackgroundServer(app) as server, httpx.Client() as http:
            headers = {"Authorization": f"Bearer {slow}"}
            assert http.get(server.url + "/v1/evals", headers=headers).status_code == 200
            refused = http.get(server.url + "/v1/evals", headers=headers)
            assert refused.status_code == 429 and refused.headers["x-ratelimit-limit-requests"] == "1"
            assert int(refused.headers["retry-after"]) > 50  # one request a minute
            keyless = http.get(server.url + "/v1/evals")
            assert keyless.status_code == 401 and "x-ratelimit-limit-requests" not in keyless.headers


def test_limiter_refills_at_rpm_per_minute():
    limiter = RateLimiter(rpm=6000, burst=1)  # 100 a second
    assert limiter.take("k").allowed and not limiter.take("k").allowed
    time.sleep(0.03)
    assert limiter.take("k").allowed
    assert (duration(0.02), duration(1.5), duration(360)) == ("20ms", "1.5s", "6m0s")


def test_keys_cli_create_list_revoke(tmp_path):
    db = str(tmp_path / "k.db")
    runner = CliRunner()
    created = runner.invoke(main, ["keys", "create", "--name", "ci", "--project", "team-a", "--role", "reader",
                                   "--rpm", "30", "--db", db])
    assert created.exit_code == 0, created.output
    key = created.stdout.strip()
    listed = runner.invoke(main, ["keys", "list", "--db", db])
    assert "team-a" in listed.output and "reader" in listed.output and "rpm=30" in listed.output
    assert key not in listed.output
    key_id = listed.output.split()[0]
    with BackgroundServer(create_api_app(db, require_key=True, workers=0)) as server:
        assert list(client_for(server.url, key).evals.list()) == []
        assert runner.invoke(main, ["keys", "revoke", key_id, "--db", db]).exit_code == 0
        with pytest.raises(openai.AuthenticationError):
            client_for(server.url, key).evals.list()
    for name in ("a b", "t\u0663am", "../x", "x" * 65, ""):  # t٣am: an Arabic-Indic digit passes str.isalnum
        bad = runner.invoke(main, ["keys", "create", "--project", name, "--db", db])
        assert bad.exit_code == 1 and bad.output.startswith("error: project must be 1-64 ASCII"), (name, bad.output)
    missing = runner.invoke(main, ["keys", "revoke", "key_nope", "--db", db])
    assert missing.exit_code == 1 and "no API key 'key_nope'" in missing.output


def test_serve_rate_limit_options_reach_the_server(tmp_path):
    import signal

    from test_api_jobs import start_server

    proc, url = start_server(tmp_path / "s.db", "--rate-limit", "60", "--rate-burst", "1")
    try:
        with httpx.Client() as http:
            first = http.get(url + "/v1/evals")
            second = http.get(url + "/v1/evals")
        assert first.status_code == 200 and first.headers["x-ratelimit-limit-requests"] == "60"
        assert second.status_code == 429 and second.headers["retry-after"] == "1"
    finally:
        proc.send_signal(signal.SIGTERM)
        proc.wait(timeout=60)


def test_loopback_is_recognised_by_parsing_the_address():
    from flywheel.web import is_loopback

    for host in ("127.0.0.1", "127.0.0.2", "127.255.255.254", "::1", "[::1]", "::ffff:127.0.0.1", "localhost",
                 "LOCALHOST."):
        assert is_loopback(host), host
    for host in ("10.0.0.1", "0.0.0.0", "::", "::ffff:10.0.0.1", "localhost.evil.com", "127.0.0.1.nip.io", "", None):
        assert not is_loopback(host), host


def test_loopback_role_none_needs_a_key_and_reader_reads_only(tmp_path):
    db = str(tmp_path / "lr.db")
    with BackgroundServer(create_api_app(db, workers=0, loopback_role="none")) as server, httpx.Client() as http:
        refused = http.get(server.url + "/v1/evals")
        assert refused.status_code == 401 and refused.json()["error"]["code"] == "invalid_api_key"
    with BackgroundServer(create_api_app(db, workers=0, loopback_role="reader")) as server, httpx.Client() as http:
        assert http.get(server.url + "/v1/evals").status_code == 200
        assert http.post(server.url + "/v1/evals", json={}).status_code == 403
    with pytest.raises(FlywheelError):
        create_api_app(db, loopback_role="root")


def test_host_and_origin_are_checked_whatever_the_bind(tmp_path):
    db = str(tmp_path / "h.db")
    with BackgroundServer(create_api_app(db, workers=0)) as server, httpx.Client() as http:
        assert http.get(server.url + "/v1/health").status_code == 200
        rebound = http.get(server.url + "/v1/health", headers={"Host": "evil.example:80"})
        assert rebound.status_code == 400 and rebound.json()["error"]["code"] == "invalid_host"
        cross = http.post(server.url + "/v1/evals", json={}, headers={"Origin": "http://evil.example"})
        assert cross.status_code == 403
        assert http.get(server.url + "/v1/health", headers={"Host": "127.0.0.2:1"}).status_code == 200
    with BackgroundServer(create_api_app(db, workers=0, allowed_hosts=["flywheel.internal"])) as server, \
            httpx.Client() as http:
        assert http.get(server.url + "/v1/health", headers={"Host": "flywheel.internal:8765"}).status_code == 200
        assert http.get(server.url + "/v1/health").status_code == 400  # only the configured names


def test_invalid_keys_are_rate_limited_per_client_address(tmp_path):
    db = str(tmp_path / "guess.db")
    (key_a,) = keys(db, ("team-a", "member"))
    app = create_api_app(db, require_key=True, workers=0, rate_limit_rpm=60, rate_limit_burst=2)
    with BackgroundServer(app) as server, httpx.Client() as http:
        codes = [http.get(server.url + "/v1/evals", headers={"Authorization": f"Bearer fw-guess{i}"}).status_code
                 for i in range(4)]
        assert codes[:2] == [401, 401] and codes[2:] == [429, 429]
        # a valid key has its own bucket
        assert http.get(server.url + "/v1/evals", headers={"Authorization": f"Bearer {key_a}"}).status_code == 200


def test_serve_security_options_reach_the_server(tmp_path):
    import signal

    from test_api_jobs import start_server

    providers = tmp_path / "providers.yaml"
    providers.write_text("local_bases: []\n", encoding="utf-8")
    proc, url = start_server(tmp_path / "s.db", "--loopback-role", "reader", "--providers", str(providers),
                             "--allowed-host", "127.0.0.1")
    try:
        with httpx.Client() as http:
            assert http.get(url + "/v1/evals").status_code == 200
            assert http.post(url + "/v1/evals", json={}).status_code == 403  # a reader, not the old admin
            assert http.get(url + "/v1/health", headers={"Host": "localhost"}).status_code == 400  # not listed
    finally:
        proc.send_signal(signal.SIGTERM)
        proc.wait(timeout=60)
    bad = tmp_path / "bad.yaml"
    bad.write_text("openai: [{base_url: x}]\n", encoding="utf-8")
    result = CliRunner().invoke(main, ["serve", "--api", "--db", str(tmp_path / "s.db"), "--providers", str(bad)])
    assert result.exit_code == 1 and "bad.yaml: openai.0.api_key_env" in result.output
    result = CliRunner().invoke(main, ["serve", "--api", "--db", str(tmp_path / "s.db"), "--host", "0.0.0.0"])
    assert result.exit_code == 1 and "--allowed-host" in result.output
    result = CliRunner().invoke(main, ["serve", "--db", str(tmp_path / "s.db"), "--loopback-role", "none"])
    assert result.exit_code == 2 and "need --api" in result.output
