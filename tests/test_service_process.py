"""`flywheel serve --flywheel service.yaml` as a real process: traffic through its proxy, a lap on
demand, kill -9 mid-lap, restart: the lap resumes over the same captures, none lost or counted
twice, and the aliases do not move until the lap's decision is recorded."""

from __future__ import annotations

import os
import re
import signal
import subprocess
import sys
import time

import openai
import pytest
import yaml
from conftest import make_rows, spec_dict, write_jsonl

from flywheel.service.spec import load_service_spec
from flywheel.store import Store

LONG = "You are a careful support assistant. " * 12 + "Answer with one label."


def _start(path: str, log) -> tuple[subprocess.Popen, dict[str, str]]:
    process = subprocess.Popen([sys.executable, "-m", "flywheel", "serve", "--flywheel", path],
                               stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
    deadline = time.monotonic() + 180
    while time.monotonic() < deadline:
        text = open(log.name, encoding="utf-8").read()
        found = re.search(r"service: proxy (\S+), models (\S+), api (\S+)", text)
        if found:
            return process, {"proxy": found.group(1), "models": found.group(2), "api": found.group(3)}
        assert process.poll() is None, text
        time.sleep(0.2)
    raise AssertionError(open(log.name).read())


def _wait(check, timeout: float = 240.0):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = check()
        if value:
            return value
        time.sleep(0.1)
    raise AssertionError("timed out")


@pytest.mark.slow
def test_kill_9_mid_lap_then_restart_resumes_the_lap(tmp_path, tiny_model_dir, chatty_dir):
    from flywheel.service.laps import queue_lap

    write_jsonl(tmp_path / "data.jsonl", make_rows())
    chatty, tiny = f"local:{chatty_dir}", f"local:{tiny_model_dir}"
    (tmp_path / "eval.yaml").write_text(yaml.safe_dump(spec_dict(chatty)))
    path = tmp_path / "service.yaml"
    path.write_text(yaml.safe_dump({
        "eval": "eval.yaml", "db": "service.db", "production": {"model": chatty, "prompt": LONG},
        "shadow": {"share": 0.0}, "redact": True, "ports": {"proxy": 0, "models": 0, "api": 0},
        "triggers": {"check_every_s": 0.2},
        "lap": {"student": tiny, "prompt": "One label.", "holdout": 0.0,
                "train": {"max_steps": 40, "precision": "fp32", "batch_size": 2, "min_examples": 1,
                          "save_steps": 1}}}))
    spec = load_service_spec(path)
    db = str(spec.path(spec.db))
    log = open(tmp_path / "service.log", "w")
    process, urls = _start(str(path), log)
    try:
        app = openai.OpenAI(base_url=urls["proxy"], api_key="unused", max_retries=0)
        for i in range(6):
            app.chat.completions.create(model="production", max_tokens=4, metadata={"label": "card_arrival"},
                                        messages=[{"role": "user", "content": f"where is my card {i}? mail a@b.com"}])
        store = Store.open(db)
        try:
            captures = store.query_captures()
            assert len(captures) == 6 and all("a@b.com" not in c.request_json for c in captures)  # redacted
            aliases_before = store.service_aliases()
            lap = queue_lap(store, spec, trigger="on_demand")
            # the lap is running and training has saved a step: kill the whole process group
            _wait(lambda: store.db.execute("select count(*) from training_jobs").fetchone()[0] > 0)
            os.killpg(process.pid, signal.SIGKILL)
            process.wait(30)
            killed = store.service_lap(lap.id)
            assert killed.decision is None and store.service_aliases() == aliases_before
        finally:
            store.close()
        process, urls = _start(str(path), log)
        store = Store.open(db)
        try:
            done = _wait(lambda: (l := store.service_lap(lap.id)).decision and l, timeout=300)
            assert done.status == "succeeded" and done.captures == 6
            assert (done.first_capture_id, done.last_capture_id) == (captures[0].id, captures[-1].id)
            assert len(store.query_captures()) == 6 and len(store.service_laps()) == 1  # nothing counted twice
            switches = [s for s in store.service_switches() if s.who == f"lap {lap.id}"]
            assert len(switches) == (1 if done.decision == "candidate" else 0)
            assert store.service_alias("production") == aliases_before["production"]
        finally:
            store.close()
    finally:
        if process.poll() is None:
            os.killpg(process.pid, signal.SIGTERM)
            try:
                process.wait(30)
            except subprocess.TimeoutExpired:
                os.killpg(process.pid, signal.SIGKILL)
        log.close()
