import base64
import hashlib
import json
import re

import pytest
from click.testing import CliRunner

from flywheel.prompt import Prompt
from flywheel.cli import main
from flywheel.harness import run_eval
from flywheel.report.compare import (compare_iterations, default_pair, load_run_view, mcnemar_exact, paired_stats,
                                     prompt_diff)
from flywheel.report.html import decorate_iterations, kpis, render_report, script_json, write_report
from flywheel.spec import load_eval_spec

from report_helpers import XSS, Outcome, build_run, default_outcome


def _data(html: str) -> dict:
    match = re.search(r'<script type="application/json" id="fw-data">(.*?)</script>', html, re.S)
    return json.loads(match.group(1))


def test_report_of_a_multi_iteration_run(store):
    ids = build_run(store, n_items=20)
    html = render_report(store, [ids["run_id"]])
    # trajectory, iteration table, grader breakdown, comparison shell
    assert "<svg" in html and html.count("<circle") == 3
    for text in ("#0 eval", "#1 prompt", "#2 sft", "promoted", "rejected", "beats parent on valid",
                 "score_model", "Compare two iterations"):
        assert text in html
    data = _data(html)
    assert [it["label"] for it in data["iterations"]] == ["#0 eval", "#1 prompt", "#2 sft"]
    assert [g["name"] for g in data["graders"]] == ["label", "judge"] and data["graders"][1]["model"]
    assert len(data["items"]["keys"]) == 20 and all(len(s["k"]) == 20 for s in data["samples"])
    # default comparison: the best iteration (#1) against its parent (#0)
    assert (data["initial"]["a"], data["initial"]["b"]) == (0, 1)
    assert data["prompts"][data["iterations"][1]["prompt_id"]][0][1].startswith("Answer with exactly")


def test_report_makes_no_request_and_allows_only_its_own_script(store):
    ids = build_run(store, n_items=5)
    html = render_report(store, [ids["run_id"]])
    assert not re.search(r"(src|href)\s*=\s*[\"']?(https?:)?//", html)
    assert "@import" not in html and "url(" not in html
    assert re.findall(r"https?://", html) == []
    csp = re.search(r'http-equiv="Content-Security-Policy" content="([^"]+)"', html).group(1)
    assert "default-src 'none'" in csp and "connect-src" not in csp  # falls back to none
    script = re.search(r"<script>(.*?)</script>", html, re.S).group(1)
    digest = base64.b64encode(hashlib.sha256(script.encode()).digest()).decode()
    assert f"'sha256-{digest}'" in csp
    assert html.count("<script") == 2  # the data block and the page's own script


def test_every_field_is_escaped(store):
    def outcome(k, i):
        o = default_outcome(k, i)
        if i == 1:
            o.output = XSS
        if i == 2:
            o.error = XSS
        return o

    ids = build_run(store, n_items=6, outcome=outcome, item_text=lambda i: XSS, model_ref="local:" + XSS,
                    prompts=[XSS, "plain"], feedback_text=XSS)
    store.db["evals"].update(ids["eval_id"], {"name": XSS})
    html = render_report(store, [ids["run_id"]])
    assert "window.__pwned" not in html.replace("window.__pwned=", "")  # never as live markup…
    assert "<img" not in html and "<b>bold" not in html and "</script><script>" not in html
    assert "&lt;/script&gt;&lt;script&gt;window.__pwned=1" in html  # …but visible as text (title, model)
    data = _data(html)
    assert XSS in data["S"] and data["items"]["fields"][0][0] == ["text", XSS]
    assert data["prompts"][data["iterations"][0]["prompt_id"]][0][1] == XSS


def test_script_json_cannot_close_its_element():
    text = script_json({"x": "</script><!-- \u2028 & >"})
    assert "<" not in text and ">" not in text and "&" not in text and "\u2028" not in text
    assert json.loads(text) == {"x": "</script><!-- \u2028 & >"}


def test_comparison_puts_regressions_first_with_paired_stats(store):
    ids = build_run(store, n_items=40)
    view = load_run_view(store, [ids["run_id"]])
    cmp = compare_iterations(store, view, ids["iterations"][0], ids["iterations"][1])
    statuses = [r.status for r in cmp.rows]
    assert statuses == sorted(statuses, key=["regression", "improvement", "changed", "same"].index)
    assert cmp.stats["counts"]["regression"] == cmp.stats["regressions"] == 4
    assert cmp.stats["improvements"] == 16 and cmp.stats["n"] == 40
    assert cmp.stats["diff"] == pytest.approx(0.8 - 0.5)
    assert cmp.stats["ci_low"] < cmp.stats["diff"] < cmp.stats["ci_high"]
    first = cmp.rows[0]
    assert first.a["passed"] and not first.b["passed"] and first.delta == -1.0
    assert [c["field"] for c in cmp.config if c["changed"]] == ["stage", "prompt", "parent", "decision"]
    # judged by another grader, the same pair classifies differently
    view.objective = {"grader": "judge", "metric": "pass_rate"}
    by_judge = compare_iterations(store, view, ids["iterations"][0], ids["iterations"][1])
    assert by_judge.stats["regressions"] != cmp.stats["regressions"]


def test_items_are_matched_by_key_and_repeat(store):
    def outcome(k, i):
        return default_outcome(k, i) if not (k == 1 and i == 0) else Outcome(output=None, passed=False, error="boom")

    ids = build_run(store, n_items=3, outcome=outcome, stages=[("eval", "measured"), ("prompt", "rejected")])
    store.db.execute("delete from grades where sample_id in (select id from samples where iteration_id = ? and"
                     " item_key = 'item-00002')", [ids["iterations"][1]])
    store.db.execute("delete from samples where iteration_id = ? and item_key = 'item-00002'", [ids["iterations"][1]])
    view = load_run_view(store, [ids["run_id"]])
    cmp = compare_iterations(store, view, *ids["iterations"])
    by_key = {r.key: r for r in cmp.rows}
    assert by_key["item-00002"].status == "only_a" and by_key["item-00002"].b is None
    assert by_key["item-00000"].status == "regression" and by_key["item-00000"].b["error"] == "boom"
    assert cmp.stats["n"] == 2


def test_mcnemar_and_bootstrap_reference_values():
    scipy_stats = pytest.importorskip("scipy.stats")
    for b, c in [(4, 16), (0, 7), (30, 31), (120, 90), (0, 0)]:
        expected = scipy_stats.binomtest(min(b, c), b + c, 0.5).pvalue if b + c else 1.0
        assert mcnemar_exact(b, c) == pytest.approx(expected, rel=1e-9)
    stats = paired_stats([0, 1, 0, 1], [1, 1, 1, 1], [False, True, False, True], [True] * 4)
    assert (stats["diff"], stats["regressions"], stats["improvements"]) == (0.5, 0, 2)
    assert 0 <= stats["ci_low"] <= 0.5 <= stats["ci_high"] <= 1


def test_default_pair_and_prompt_diff():
    its = [{"id": "r/0", "score": 0.5}, {"id": "r/1", "score": 0.7, "parent_id": "r/0"},
           {"id": "r/2", "score": 0.9, "parent_id": "r/1"}, {"id": "r/3", "score": 0.6, "parent_id": "r/2"}]
    assert default_pair(its) == ("r/1", "r/2")
    assert default_pair(its[:1]) == ("r/0", "r/0")
    ops = prompt_diff([{"role": "system", "content": "a\nb"}], [{"role": "system", "content": "a\nc"}])
    assert ops == [(" ", "[system]"), (" ", "a"), ("-", "b"), ("+", "c")]


def test_report_of_real_eval_runs_side_by_side(tiny_spec, store, tmp_path):
    """Two harness runs (different prompts, same items) in one report; the CLI writes it."""
    spec = load_eval_spec(tiny_spec)
    first = run_eval(spec, store, split="test")
    second = run_eval(spec, store, split="test", prompt=Prompt(messages=[{"role": "user", "content": "Label: {{item.text}}"}]))
    db = store.path
    store.close()
    out = tmp_path / "r.html"
    result = CliRunner().invoke(main, ["report", first.run_id, second.run_id, "-o", str(out), "--db", db, "--json"])
    assert result.exit_code == 0, result.output
    info = json.loads(result.output)
    assert info["iterations"] == 2 and info["samples"] == 8 and info["bytes"] == out.stat().st_size
    html = out.read_text()
    data = _data(html)
    assert len(data["iterations"]) == 2 and data["items"]["keys"] == sorted(data["items"]["keys"])
    assert data["items"]["fields"][0][1][0] == "text"  # dataset fields, not just the rendered input
    assert "Label: {{item.text}}" in json.dumps(data["prompts"])
    missing = CliRunner().invoke(main, ["report", "no-such-run", "-o", str(out), "--db", db])
    assert missing.exit_code == 1 and "no run matches 'no-such-run'" in missing.output


def test_write_report_counts(store, tmp_path):
    ids = build_run(store, n_items=7)
    result = write_report(store, [ids["run_id"]], tmp_path / "x.html")
    assert (result.iterations, result.samples) == (3, 21) and result.bytes > 10_000


def test_run_without_samples_still_renders(store):
    run_id = store.create_run(kind="eval", config_key="x")
    assert "No scored iterations yet" in render_report(store, [run_id])
    store.iteration_for(run_id, 0, stage="eval")
    data = _data(render_report(store, [run_id]))
    assert data["iterations"][0]["score"] is None and data["samples"] == [{**data["samples"][0], "k": []}]


def test_mean_score_objective_compares_scores_not_passes(store):
    """A spec's `mean_score` metric (spec.py's spelling) must score samples by the grader's score."""
    from report_helpers import SPEC

    spec = {**SPEC, "objective": {"grader": "judge", "metric": "mean_score"}}
    store.save_eval("e-run-test-000001", SPEC["name"], "<test>", json.dumps(spec))
    ids = build_run(store, n_items=6)
    view = load_run_view(store, [ids["run_id"]])
    assert view.objective == {"grader": "judge", "metric": "mean_score"}
    cmp = compare_iterations(store, view, *ids["iterations"][:2])
    scores = {row.a["score"] for row in cmp.rows} | {row.b["score"] for row in cmp.rows}
    assert scores <= {0.9, 0.2} and scores == {0.9, 0.2}  # the judge's scores, not 1.0/0.0 passes
    html = render_report(store, [ids["run_id"]])
    assert "judge mean score" in html and _data(html)["metric"] == "mean_score"


def _wheel_like_run(store, run_id="run-wheel-000001"):
    """Two valid iterations (baseline, promoted prompt) and the wheel's test report of each."""
    store.create_run(id=run_id, kind="wheel", config_key=run_id)
    ids = {}
    for seq, (name, stage, split, parent, score) in enumerate([
            ("v0", "eval", "valid", None, 0.5), ("v1", "prompt", "valid", "v0", 0.8),
            ("t0", "test-report", "test", "v0", 0.4), ("t1", "test-report", "test", "v1", 0.55)]):
        ids[name] = store.iteration_for(run_id, seq, stage=stage, split=split, parent_id=ids.get(parent))
        store.update_iteration(ids[name], score=score, n=10, wall_s=1.0)
    return ids


def test_test_rows_compare_with_test_rows_never_with_valid(store):
    _wheel_like_run(store)
    view = load_run_view(store, ["run-wheel-000001"])
    rows = decorate_iterations(view)
    # v1 vs v0 (valid), t0: the baseline's test report has nothing to compare with, t1 vs t0 (test)
    assert [(r["split"], r["delta_fmt"]) for r in rows] == [
        ("valid", "–"), ("valid", "+30.0 pts"), ("test", "–"), ("test", "+15.0 pts")]
    best = next(k for k in kpis(view) if k["label"] == "best (all of valid)")
    assert best["value"] == "80.0%"  # the best on the baseline's split (valid), not a test score


def test_header_shows_the_runs_wall_time(store):
    _wheel_like_run(store)
    store.finish_run("run-wheel-000001", "completed", {"elapsed_s": 496.0, "wall_s": 496.0})
    time_kpi = next(k for k in kpis(load_run_view(store, ["run-wheel-000001"])) if k["label"] == "time")
    assert time_kpi["value"] == "8 min 16 s" and time_kpi["detail"] == "4.0 s evaluating"
    assert "8 min 16 s" in render_report(store, ["run-wheel-000001"])
    # No wall time in the summary: finished_at - started_at.
    _wheel_like_run(store, "run-wheel-000002")
    store.finish_run("run-wheel-000002", "completed", {"n_samples": 40})
    with store.db.conn:
        store.db["runs"].update("run-wheel-000002", {"started_at": "2026-11-30T10:00:00.000+00:00",
                                                     "finished_at": "2026-11-30T10:01:30.500+00:00"})
    time_kpi = next(k for k in kpis(load_run_view(store, ["run-wheel-000002"])) if k["label"] == "time")
    assert time_kpi["value"] == "1 min 30 s"
