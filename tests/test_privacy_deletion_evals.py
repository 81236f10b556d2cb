"""Deleting a user's captures follows them into evals: a `dataset.captures` eval, an API
`stored_completions` run (its items file, recorded outputs, samples, grades and cache), a report,
and the row of a malformed call through the proxy. Afterwards no byte of the user's text is in any
file under the store's folder (the database, its -wal and -shm, .flywheel/...); the other user's is.
"""

from __future__ import annotations

import json
from pathlib import Path

import httpx
import yaml
from click.testing import CliRunner

from api_helpers import client_for, wait_run
from flywheel.api.app import create_api_app
from flywheel.cli import main
from flywheel.harness import run_eval
from flywheel.proxy.server import create_proxy_app
from flywheel.report.html import write_report
from flywheel.spec import load_eval_spec
from flywheel.store import Store
from flywheel.web import BackgroundServer

MARKERS = {"u1": "qzebra7781marker", "u2": "qgiraffe4410marker"}
CHECK = [{"type": "string_check", "name": "said", "input": "{{sample.output_text}}", "reference": "Noted",
          "operation": "like"}]


def capture(user: str, n: int) -> dict:
    question = f"my code is {MARKERS[user]}-{n}"
    request = {"model": "gpt-4o-mini", "messages": [{"role": "user", "content": question}], "metadata": {"user": user}}
    response = {"id": f"chatcmpl-{user}-{n}", "object": "chat.completion", "model": "gpt-4o-mini",
                "choices": [{"index": 0, "message": {"role": "assistant", "content": f"Noted {MARKERS[user]}"},
                             "finish_reason": "stop"}]}
    return {"created_at": f"2026-11-0{n}T10:00:00.000+00:00", "endpoint": "/v1/chat/completions",
            "upstream": "http://up/v1", "model": "gpt-4o-mini", "stream": 0, "status": 200, "latency_s": 0.1,
            "metadata_json": json.dumps({"user": user}), "request_json": json.dumps(request),
            "response_json": json.dumps(response), "response_id": response["id"], "error": None}


def hits(root: Path, marker: str) -> list[str]:
    """Files under `root` whose bytes hold `marker` (UTF-8, as SQLite and JSON files store it)."""
    return sorted(str(p.relative_to(root)) for p in root.rglob("*") if p.is_file() and marker.encode() in p.read_bytes())


def test_deleting_a_users_captures_removes_every_copy(tmp_path):
    db = tmp_path / "flywheel.db"
    store = Store.open(db)
    store.insert_captures([capture("u1", 1), capture("u2", 2), capture("u1", 3)])
    # a dataset.captures eval (graded as captured), and a report of it
    spec_path = tmp_path / "traffic.yaml"
    spec_path.write_text(yaml.safe_dump({
        "name": "traffic", "dataset": {"captures": {"db": "flywheel.db"}}, "outputs": {"field": "output"},
        "input": [{"role": "user", "content": "{{item.input}}"}], "graders": CHECK}))
    captured = run_eval(load_eval_spec(spec_path), store, split="test")
    assert captured.n_samples == 3
    (store.artefact_dir / "reports").mkdir(parents=True)
    write_report(store, [captured.run_id], store.artefact_dir / "reports" / "traffic.html")
    store.close()
    # an API eval run over the stored completions (graded as stored: recorded outputs, cached)
    with BackgroundServer(create_api_app(str(db))) as server:
        client = client_for(server.url)
        evaluation = client.evals.create(name="logs", data_source_config={"type": "stored_completions"},
                                         testing_criteria=CHECK)
        run = client.evals.runs.create(evaluation.id, data_source={
            "type": "completions", "source": {"type": "stored_completions"}})
        run = wait_run(client, evaluation.id, run.id)
        assert run.status == "completed", run.error
        assert run.result_counts.total == 3
    # a malformed call through the proxy: stored as a 400 with the caller's metadata
    with BackgroundServer(create_proxy_app("http://127.0.0.1:9/v1", str(db))) as proxy:
        broken = ('{"model": "gpt-4o-mini", "metadata": {"user": "u1"}, "messages": [{"role": "user", '
                  f'"content": "{MARKERS["u1"]}-broken"}}]')  # one bracket short
        reply = httpx.post(proxy.url + "/v1/chat/completions", content=broken.encode(),
                           headers={"content-type": "application/json"})
        assert reply.status_code == 400
    store = Store.open(db)
    report_of_run = store.find_run(store.api_get("api_eval_runs", run.id)["run_id"])
    write_report(store, [report_of_run.id], store.artefact_dir / "reports" / "api.html")
    assert store.match_capture_ids(metadata={"user": "u1"}) == [1, 3, 4]
    cached = store.db.execute("select count(*) from completion_cache").fetchone()[0]
    store.close()
    assert hits(tmp_path, MARKERS["u1"]) and hits(tmp_path, MARKERS["u2"])

    result = CliRunner().invoke(main, ["captures", "delete", "--metadata", "user=u1", "--db", str(db), "--json"])
    assert result.exit_code == 0, result.output
    summary = json.loads(result.output)
    assert summary["captures"] == [1, 3, 4] and summary["eval_items"] == 4 and not summary["wal_busy"]
    assert len(summary["reports"]) == 2

    assert hits(tmp_path, MARKERS["u1"]) == []  # the db, -wal, -shm, .flywheel/api/runs, reports
    assert MARKERS["u2"].encode() in db.read_bytes()
    api_files = sorted((tmp_path / ".flywheel" / "api" / "runs").iterdir())
    assert [p.name for p in api_files if MARKERS["u2"].encode() in p.read_bytes()] == [
        f"{run.id}.jsonl", f"{run.id}.outputs.json"]
    store = Store.open(db)
    try:
        assert [c.id for c in store.query_captures()] == [2]
        assert [r["key"] for r in store.dataset_items(store.get_run(captured.run_id).dataset_id)] == ["2"]
        assert [s.item_key for s in store.samples_with_grades(captured.iteration_id)] == ["2"]
        api_samples = store.samples_with_grades(store.iterations(report_of_run.id)[0].id)
        assert [s.output_text for s in api_samples] == [f"Noted {MARKERS['u2']}"]
        assert all(s.grades for s in api_samples)
        assert store.db.execute("select count(*) from completion_cache").fetchone()[0] == cached - 2
    finally:
        store.close()


def test_a_malformed_bodys_metadata_is_salvaged_within_bounds():
    from flywheel.proxy.server import salvage_metadata

    assert salvage_metadata('{"model": "m", "metadata": {"user": "u1"}, "messages": [') == {"user": "u1"}
    assert salvage_metadata('[{"metadata" : {"user": "u2", "n": "1"}}') == {"user": "u2", "n": "1"}
    assert salvage_metadata('{"metadata": {"user": ') is None  # cut inside: nothing to trust
    assert salvage_metadata("not json at all") is None
    hostile = '"metadata":{"k":"' * 200_000  # a megabyte of unclosed strings: bounded work, no error
    assert salvage_metadata(hostile) is None
    assert salvage_metadata('"metadata":' + "{" * 50_000) is None  # deep nesting: no RecursionError
