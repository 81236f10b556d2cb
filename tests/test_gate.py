"""The CI gate (flywheel.gate): evaluate, pair with a baseline, fail on a significant regression or a
blown budget, write a Markdown summary. Outputs come from the dataset (`outputs:`), so a "regressed
prompt" is a column of worse answers; the budget test that needs real token counts uses the tiny model."""

from __future__ import annotations

import json

import pytest
import yaml
from click.testing import CliRunner
from conftest import spec_dict, write_jsonl

from flywheel.cli import main
from flywheel.errors import StoreError
from flywheel.gate import GateBudget, GateError, run_gate
from flywheel.harness import run_eval
from flywheel.spec import load_eval_spec
from flywheel.store import Store

HOSTILE_KEY = "k|<script>alert(1)</script>`x"
LABELS = ["card_arrival", "pin_blocked", "exchange_rate"]


def outputs_spec(tmp_path, field="answer"):
    rows = []
    for i in range(24):
        label = LABELS[i % 3]
        rows.append({"id": HOSTILE_KEY if i == 0 else f"item-{i:02d}", "text": f"question {i}", "label": label,
                     "answer": label, "split": "test",
                     # the regressed column: wrong on the first 12 items, right after
                     "worse": LABELS[(i + 1) % 3] if i < 12 else label})
    write_jsonl(tmp_path / "data.jsonl", rows)
    spec = spec_dict("unused", name="support", outputs={"field": field})
    del spec["model"]
    path = tmp_path / "eval.yaml"
    path.write_text(yaml.safe_dump(spec), encoding="utf-8")
    return path


@pytest.fixture
def main_db(tmp_path):
    """main's store: the baseline run of the same eval, made from the good answers."""
    spec_path = outputs_spec(tmp_path)
    base = Store.open(tmp_path / "main.db")
    try:
        run_eval(load_eval_spec(spec_path), base, split="test")
    finally:
        base.close()
    return tmp_path / "main.db"


def test_the_gate_passes_on_the_same_prompt(tmp_path, store, main_db):
    result = run_gate(load_eval_spec(outputs_spec(tmp_path)), store, str(main_db))
    assert result.passed and result.failures == []
    assert result.paired == 24 and result.newly_failing == []
    [label] = result.graders
    assert label.objective and label.delta == 0 and label.baseline == label.candidate == 1.0


def test_the_gate_fails_on_a_regressed_prompt_and_names_the_items(tmp_path, store, main_db):
    spec = load_eval_spec(outputs_spec(tmp_path), ["outputs.field=worse"])
    result = run_gate(spec, store, str(main_db))
    assert not result.passed
    assert any(f.startswith("significant regression of label: McNemar exact p=") for f in result.failures)
    assert len(result.newly_failing) == 12 and HOSTILE_KEY in result.newly_failing
    [label] = result.graders
    assert label.delta == pytest.approx(-0.5) and label.ci_high < 0 and label.newly_failing == 12
    text = result.markdown()
    assert "❌ failed" in text and "| label (objective) | 100.0% | 50.0% | -50.0 pts |" in text
    # The hostile key sits inside one code span (where GitHub shows tags as text): its backtick
    # cannot close the span and its bar cannot break a table.
    assert "`k/<script>alert(1)</script>'x`" in text


def test_the_cli_exits_1_and_writes_the_summary(tmp_path, main_db):
    outputs_spec(tmp_path)
    summary = tmp_path / "gate.md"
    runner = CliRunner()
    args = ["gate", str(tmp_path / "eval.yaml"), "--baseline", str(main_db), "--db", str(tmp_path / "pr.db")]
    same = runner.invoke(main, args + ["--summary", str(summary)])
    assert same.exit_code == 0, same.output
    assert "gate passed" in same.output and "✅ passed" in summary.read_text()
    worse = runner.invoke(main, args + ["-s", "outputs.field=worse", "--summary", str(summary), "--json"])
    assert worse.exit_code == 1
    data = json.loads(worse.output)
    assert data["passed"] is False and len(data["newly_failing"]) == 12
    assert "Items newly failing (12)" in summary.read_text()


def test_missing_token_counts_fail_a_token_budget_closed(tmp_path, store, main_db):
    spec = load_eval_spec(outputs_spec(tmp_path))
    result = run_gate(spec, store, str(main_db), budget=GateBudget(max_tokens=10_000))
    assert not result.passed and result.usage.missing_tokens == 24
    assert result.failures == ["token budget: 24 of 24 samples report no token count (failing closed: a missing "
                               "count cannot be shown to be under the limit)"]
    # Without a token budget, the same outputs pass: only the budget that needs the count fails.
    assert run_gate(spec, store, str(main_db), budget=GateBudget(max_cost=1.0)).passed


def test_budgets_on_a_real_model_against_a_run_id(tmp_path, store, tiny_model_dir):
    write_jsonl(tmp_path / "data.jsonl", [{"id": f"t{i}", "text": f"question {i}", "label": LABELS[i % 3],
                                           "split": "test"} for i in range(3)])
    path = tmp_path / "eval.yaml"
    path.write_text(yaml.safe_dump(spec_dict(f"local:{tiny_model_dir}")), encoding="utf-8")
    spec = load_eval_spec(path)
    baseline = run_eval(spec, store, split="test")
    roomy = run_gate(spec, store, baseline.run_id, budget=GateBudget(max_tokens=10_000, max_seconds=3600))
    assert roomy.passed, roomy.failures
    assert roomy.usage.missing_tokens == 0 and roomy.usage.tokens > 0
    tight = run_gate(spec, store, baseline.run_id, budget=GateBudget(max_tokens=5, per="total"))
    assert not tight.passed and tight.failures[0].startswith("tokens budget blown:")
    assert "per total > limit 5" in tight.failures[0]


def test_a_baseline_that_is_not_there_is_one_clear_error(tmp_path, store):
    spec = load_eval_spec(outputs_spec(tmp_path))
    with pytest.raises(StoreError, match="no run matches 'run-nope'"):
        run_gate(spec, store, "run-nope")
    with pytest.raises(GateError, match="no store file there"):
        run_gate(spec, store, str(tmp_path / "missing.db"))
    Store.open(tmp_path / "empty.db").close()
    with pytest.raises(GateError, match="no completed run of eval 'support' on split 'test'"):
        run_gate(spec, store, str(tmp_path / "empty.db"))
