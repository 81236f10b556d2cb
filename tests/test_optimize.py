"""Prompt search end to end on the tiny real model, plus the pure parts (proposal checks, decisions)."""

import json

import pytest
import yaml
from click.testing import CliRunner

from flywheel.cli import main
from flywheel.optimize import optimize_prompt
from flywheel.optimize.fewshot import select_demos
from flywheel.optimize.propose import check_proposal, extract_instruction
from flywheel.optimize.search import _decide, Candidate
from flywheel.prompt import Demo, Prompt
from flywheel.spec import load_eval_spec
from flywheel.summaries import RunSummary

from conftest import LABELS, make_rows, spec_dict, write_jsonl

OPTIMIZE = {
    "minibatch": 4, "finalists": 2,
    "variants": [{"name": "terse", "system": "Label only: " + ", ".join(LABELS)}],
    "fewshot": {"source": "labels", "demo_output": "{{item.label}}", "label_field": "label",
                "strategies": ["balanced", "random", "nearest"], "k": [1]},
    "proposer": {"rounds": 1, "proposals": 2, "beam": 1, "max_tokens": 24},
}


def write_spec(tmp_path, model_dir, rows=None, **optimize):
    write_jsonl(tmp_path / "data.jsonl", rows or make_rows(6))
    data = spec_dict(f"local:{model_dir}", optimize={**OPTIMIZE, **optimize})
    (tmp_path / "eval.yaml").write_text(yaml.safe_dump(data))
    return load_eval_spec(tmp_path / "eval.yaml")


def test_search_stores_every_candidate_with_lineage(tmp_path, tiny_model_dir, store):
    spec = write_spec(tmp_path, tiny_model_dir)
    result = optimize_prompt(spec, store)
    origins = [c.origin for c in result.candidates]
    assert origins[:2] == ["baseline", "variant:terse"]
    assert {"fewshot:balanced:k=1", "fewshot:random:k=1", "fewshot:nearest:k=1"} <= set(origins)
    # Every candidate is a stored prompt and a minibatch iteration whose parent is its parent's.
    iterations = {it.id: it for it in store.iterations(result.run_id)}
    for c in result.candidates:
        assert store.prompt_row(c.prompt.id)["origin"] == c.origin
        row = iterations[c.minibatch.iteration_id]
        assert row.n == 4 and row.split == "valid" and row.decision in ("finalist", "dropped")
        if c.parent:
            assert row.parent_id == c.parent.minibatch.iteration_id
    balanced = next(c for c in result.candidates if c.origin == "fewshot:balanced:k=1")
    assert sorted(d.assistant for d in balanced.prompt.demos) == sorted(LABELS)
    # Proposals from the tiny random model are garbage: each is either rejected with a reason or scored.
    assert len(result.rejected) + sum(o.startswith("proposer") for o in origins) == 2
    for r in result.rejected:  # invalid proposals, and rewrites that do not beat their parent
        assert r["reason"] and any(it.decision in ("invalid", "dropped") and it.reason == r["reason"]
                                   for it in store.iterations(result.run_id))
    assert result.test_comparison["n"] == 6  # baseline and winner reported on test
    assert store.get_run(result.run_id).status == "completed"


def test_rerun_is_free_and_selection_is_identical(tmp_path, tiny_model_dir, store):
    spec = write_spec(tmp_path, tiny_model_dir)
    first = optimize_prompt(spec, store)
    second = optimize_prompt(spec, store)
    assert first.model_calls > 0 and second.model_calls == 0
    assert [c.describe() for c in first.candidates] == [c.describe() for c in second.candidates]


def test_test_split_is_never_read_during_selection(tmp_path, tiny_model_dir, store):
    rows = make_rows(6)
    first = optimize_prompt(write_spec(tmp_path, tiny_model_dir, rows), store)
    # Same train/valid, entirely different test items: selection must not move at all.
    for row in rows:
        if row["split"] == "test":
            row["text"] = "completely different test text " + row["id"]
            row["label"] = "pin_blocked"
    (tmp_path / "b").mkdir()
    second = optimize_prompt(write_spec(tmp_path / "b", tiny_model_dir, rows), store)
    strip = lambda c: {k: v for k, v in c.describe().items() if k != "test_score"}
    assert [strip(c) for c in first.candidates] == [strip(c) for c in second.candidates]
    assert first.valid_comparison == second.valid_comparison and first.reason == second.reason
    # No iteration before the final report ever stored a sample of a test item.
    test_keys = {r["id"] for r in rows if r["split"] == "test"}
    for run in (first.run_id, second.run_id):
        for it in store.iterations(run):
            keys = {s.item_key for s in store.samples_with_grades(it.id)}
            assert (it.stage == "test-report") == bool(keys & test_keys), it.stage


def test_budget_limits_candidates(tmp_path, tiny_model_dir, store):
    spec = write_spec(tmp_path, tiny_model_dir, budget={"max_candidates": 3})
    result = optimize_prompt(spec, store)
    assert len(result.candidates) == 3
    assert any("max_candidates 3 reached" in note for note in result.notes)


def test_cli_optimize(tmp_path, tiny_model_dir):
    write_spec(tmp_path, tiny_model_dir, proposer=None)
    result = CliRunner().invoke(main, ["optimize", str(tmp_path / "eval.yaml"), "--db", str(tmp_path / "o.db")])
    assert result.exit_code == 0, result.output
    assert "baseline" in result.stdout and "fewshot:nearest:k=1" in result.stdout and "McNemar" in result.stdout
    data = json.loads(CliRunner().invoke(main, ["optimize", str(tmp_path / "eval.yaml"), "--db",
                                                str(tmp_path / "o.db"), "--json"]).stdout)
    assert data["model_calls"] == 0 and data["winner"]["origin"]


def test_proposal_checks():
    parent = Prompt(messages=[{"role": "user", "content": "Classify: {{item.text}}"}])
    assert check_proposal(parent, "   ").rejected == "empty proposal"
    assert check_proposal(parent, "Classify:  {{item.text}}").rejected == "unchanged proposal"
    assert "drops template variable(s) {{item.text}}" in check_proposal(parent, "Classify the message.").rejected
    assert "unknown item field" in check_proposal(parent, "{{item.text}} {{item.nope}}", {"text"}).rejected
    ok = check_proposal(parent, "Give the intent of: {{ item.text }}", {"text"})
    assert ok.rejected is None and ok.prompt.messages[0]["content"] == "Give the intent of: {{ item.text }}"
    assert extract_instruction("Sure!\n<<<\nNew rule\n>>> done") == "New rule"
    assert extract_instruction("<<< unterminated") == "unterminated"


def test_select_demos_balanced_and_random():
    pool = [Demo(f"k{i}", f"q{i}", LABELS[i % 3]) for i in range(9)]
    labels = {d.item_key: d.assistant for d in pool}
    balanced = select_demos(pool, "balanced", 2, labels=labels)
    assert len(balanced) == 6 and sorted(d.assistant for d in balanced[:3]) == sorted(LABELS)
    assert len(select_demos(pool, "random", 4)) == 4
    assert select_demos(pool, "nearest", 2) is None


@pytest.mark.parametrize("diff,p,expected", [(0.2, 0.01, True), (0.2, 0.2, False), (-0.1, 0.01, False)])
def test_decision_needs_a_significant_gain(tmp_path, diff, p, expected):
    spec = load_eval_spec("evals/banking77/eval.yaml")
    base, other = Candidate(Prompt([]), "baseline"), Candidate(Prompt([]), "fewshot:x")
    cmp = {"n": 100, "diff": diff, "ci_low": diff - 0.1, "ci_high": diff + 0.1, "p_mcnemar": p,
           "improvements": 12, "regressions": 2}
    promoted, reason = _decide(spec, spec.optimize_config(), base, other, cmp)
    assert promoted is expected and ("promoted" in reason) is expected
    assert _decide(spec, spec.optimize_config(), base, base, cmp)[0] is False


def test_finalists_that_no_test_separates_go_to_the_cheapest(tmp_path, tiny_model_dir, store):
    # The tiny random model scores 0 everywhere: no paired test separates any finalist from the best,
    # so the winner is the finalist with the fewest prompt tokens per item, not the first in order.
    spec = write_spec(tmp_path, tiny_model_dir, finalists=3, proposer=None)
    result = optimize_prompt(spec, store)
    finalists = [c for c in result.candidates if c.valid is not None]
    tokens = {c.origin: c.valid.summary.prompt_tokens / c.valid.summary.n_samples for c in finalists}
    cheapest = min(finalists, key=lambda c: (tokens[c.origin], finalists.index(c)))
    assert len(set(tokens.values())) > 1 and tokens["baseline"] > tokens[cheapest.origin]
    assert result.winner.origin == cheapest.origin


def test_a_rewrite_that_does_not_beat_its_parent_is_dropped(tmp_path, tiny_model_dir, chatty_dir, store):
    # The chatty model writes non-empty instructions; the tiny task model scores 0 with any of them,
    # which never beats the parent: every rewrite is dropped with both scores, none goes further.
    spec = write_spec(tmp_path, tiny_model_dir, proposer={"model": f"local:{chatty_dir}", "rounds": 1,
                                                           "proposals": 2, "beam": 1, "max_tokens": 24})
    result = optimize_prompt(spec, store)
    assert not [c for c in result.candidates if c.origin.startswith("proposer")]
    dropped = [r for r in result.rejected if "does not beat its parent" in r["reason"]]
    assert dropped and all("0.000 vs 0.000, same demonstrations" in r["reason"] for r in dropped)
    rows = [it for it in store.iterations(result.run_id) if it.decision == "dropped"
            and "does not beat its parent" in (it.reason or "")]
    assert len(rows) == len(dropped)


def test_token_figures_and_scores_say_what_they_count(tmp_path, tiny_model_dir):
    """Console, --json and the report's KPIs show the same two token figures, each named (paid by every
    model call; of the run's iterations), and the search's best is labelled minibatch or all of valid."""
    from flywheel.report.compare import load_run_view
    from flywheel.report.html import decorate_iterations, fmt_tokens, kpis
    from flywheel.store import Store

    write_spec(tmp_path, tiny_model_dir, proposer=None, fewshot=None)
    db = str(tmp_path / "o.db")
    first = json.loads(CliRunner().invoke(main, ["optimize", str(tmp_path / "eval.yaml"), "--db", db, "--json"]).stdout)
    assert first["tokens"] > 0 and first["tokens_measured"] > 0
    store = Store.open(tmp_path / "o.db")
    try:
        assert first["tokens_measured"] == store.measured_tokens(first["run_id"])
        assert RunSummary.of_run(store.get_run(first["run_id"])).tokens_paid == first["tokens"]
        view = load_run_view(store, [first["run_id"]])
        decorate_iterations(view)
        figures = {k["label"]: k for k in kpis(view)}
    finally:
        store.close()
    assert figures["tokens measured"]["value"] == fmt_tokens(first["tokens_measured"])
    assert f"{fmt_tokens(first['tokens'])} paid (all model calls)" in figures["tokens measured"]["detail"]
    assert "best (all of valid)" in figures and not any(label.startswith("best (minibatch") for label in figures)
    again = CliRunner().invoke(main, ["optimize", str(tmp_path / "eval.yaml"), "--db", db])  # all cached
    assert again.exit_code == 0, again.output
    assert "all of valid" in again.output and "minibatch" in again.output
    assert "tokens paid 0 (all model calls)" in again.output
    assert f"tokens measured {first['tokens_measured']:,} (this run's iterations)" in again.output
