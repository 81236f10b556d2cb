"""`/v1/flywheel/runs`: the wheel submitted over HTTP (inline specs + an uploaded items file), its
events and result, and a bad spec refused with the spec's own error line."""

from __future__ import annotations

import time

import httpx
import pytest

from api_helpers import jsonl
from conftest import make_rows, spec_dict
from flywheel.api.app import create_api_app
from flywheel.store import Store
from flywheel.web import BackgroundServer


@pytest.fixture
def server(tmp_path):
    with BackgroundServer(create_api_app(str(tmp_path / "flywheel.db"))) as running:
        yield running


def upload_items(http) -> str:
    data = jsonl([{"item": row} for row in make_rows(6)])
    response = http.post("/files", files={"file": ("rows.jsonl", data)}, data={"purpose": "evals"})
    assert response.status_code == 200, response.text
    return response.json()["id"]


def test_a_wheel_run_over_http(server, tiny_model_dir, tmp_path):
    with httpx.Client(base_url=server.url + "/v1", timeout=30) as http:
        file_id = upload_items(http)
        eval_spec = spec_dict(f"local:{tiny_model_dir}")
        created = http.post("/flywheel/runs", json={"run_spec": {"stages": [{"stage": "optimize"}], "target": 0.0},
                                                    "eval_spec": eval_spec, "file_id": file_id})
        assert created.status_code == 200, created.text
        run = created.json()
        assert (run["object"], run["status"]) == ("flywheel.run", "queued")
        deadline = time.monotonic() + 300
        while run["status"] in ("queued", "running"):
            assert time.monotonic() < deadline
            time.sleep(0.2)
            run = http.get(f"/flywheel/runs/{run['id']}").json()
        assert run["status"] == "succeeded", run["error"]
        assert run["result"]["stopped"].startswith("target 0.0 reached")
        events = http.get(f"/flywheel/runs/{run['id']}/events", params={"limit": 100}).json()["data"]
        messages = [e["message"] for e in events]
        assert messages[0] == "Wheel run started." and messages[-1] == "Wheel run succeeded."
        assert any(m.startswith("baseline:") for m in messages)
        # Each event is a typed WheelEvent: the baseline's items evaluated, its end as a stage.
        assert any(e["type"] == "wheel.evaluate" and e["data"]["done"] == e["data"]["total"] > 0 for e in events)
        assert any(e["type"] == "wheel.stage_done" and e["data"]["stage"] == "baseline" for e in events)
        assert [r["id"] for r in http.get("/flywheel/runs").json()["data"]] == [run["id"]]

        bad = dict(eval_spec, graders=[{"type": "string_chek", "name": "x"}])
        refused = http.post("/flywheel/runs", json={"run_spec": {"stages": [{"stage": "optimize"}]},
                                                    "eval_spec": bad, "file_id": file_id})
        assert refused.status_code == 400 and "graders[0]" in refused.json()["error"]["message"]
        # The same submission again: its own wheel run, linked by the id the API chose, not by a command.
        twin = http.post("/flywheel/runs", json={"run_spec": {"stages": [{"stage": "optimize"}], "target": 0.0},
                                                 "eval_spec": eval_spec, "file_id": file_id}).json()
        while twin["status"] in ("queued", "running"):
            assert time.monotonic() < deadline
            time.sleep(0.2)
            twin = http.get(f"/flywheel/runs/{twin['id']}").json()
        assert twin["status"] == "succeeded", twin["error"]
    assert twin["run_id"] != run["run_id"]
    store = Store.open(tmp_path / "flywheel.db")
    try:
        for obj in (run, twin):
            wheel = store.get_run(obj["run_id"])
            assert wheel["kind"] == "wheel" and wheel["status"] == "completed" and wheel["command"] == f"api:{obj['id']}"
            assert obj["result"]["run_id"] == obj["run_id"]
    finally:
        store.close()


def test_a_submitted_spec_cannot_widen_image_access(tmp_path):
    from flywheel.api.routes.wheel_runs import write_specs
    from flywheel.web import ApiError

    for images in ({"folders": ["/"]}, {"fetch": True}):
        body = {"run_spec": {}, "eval_spec": {**spec_dict("local:smollm2"), "dataset": {"images": images}}}
        with pytest.raises(ApiError) as caught:
            write_specs(tmp_path / "run", body, [])
        assert caught.value.param == "eval_spec.dataset.images"
    assert not (tmp_path / "run").exists()


def test_a_wheel_run_over_http_lists_its_training_steps(server, tiny_model_dir):
    """The run object's events carry the SFT stage's training steps with their loss and the time left."""
    stages = [{"stage": "capture", "teacher": "reference:label"},
              {"stage": "sft", "config": {"max_steps": 2, "logging_steps": 1, "precision": "fp32", "batch_size": 4}}]
    with httpx.Client(base_url=server.url + "/v1", timeout=30) as http:
        run = http.post("/flywheel/runs", json={"run_spec": {"stages": stages}, "eval_spec":
                                               spec_dict(f"local:{tiny_model_dir}"), "file_id": upload_items(http)}).json()
        deadline = time.monotonic() + 300
        while run["status"] in ("queued", "running"):
            assert time.monotonic() < deadline
            time.sleep(0.2)
            run = http.get(f"/flywheel/runs/{run['id']}").json()
        assert run["status"] == "succeeded", run["error"]
        events = http.get(f"/flywheel/runs/{run['id']}/events", params={"limit": 1000}).json()["data"]
    steps = [e["data"] for e in events if e["type"] == "wheel.train"]
    assert steps and steps[-1]["done"] == steps[-1]["total"] == 2 and steps[-1]["stage"] == "sft"
    assert any(s["loss"] is not None for s in steps) and all(s["eta_s"] is not None for s in steps)
    assert any(e["message"].startswith("lap 1 sft: train 2/2 steps loss ") for e in events)
