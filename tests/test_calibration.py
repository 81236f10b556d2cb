"""flywheel.calibration and `flywheel graders calibrate`: judge agreement with reference labels."""

from __future__ import annotations

import json
import math
import random

import pytest
from click.testing import CliRunner

from flywheel.calibration import calibrate, multiclass_kappa, rank_auc, score_bins
from flywheel.cli import main
from flywheel.errors import DataError
from flywheel.models import load_model
from flywheel.reviews import cohen_kappa

EXACT = {"type": "string_check", "name": "exact", "input": "{{sample.output_text}}",
         "reference": "{{item.expected}}", "operation": "eq"}


def test_multiclass_kappa_is_cohens_kappa_on_two_classes():
    rng = random.Random(3)
    for _ in range(50):
        pairs = [(rng.choice("pf"), rng.choice("pf")) for _ in range(rng.randint(1, 30))]
        table = Counter2(pairs)
        expected = cohen_kappa(table["pp"], table["pf"], table["fp"], table["ff"])
        got = multiclass_kappa(pairs)
        assert (math.isnan(got) and math.isnan(expected)) or got == pytest.approx(expected)


def Counter2(pairs):
    # cohen_kappa's cells are (judge, human); pairs here are (reference, judged)
    return {"pp": sum(a == "p" and b == "p" for a, b in pairs), "pf": sum(a == "f" and b == "p" for a, b in pairs),
            "fp": sum(a == "p" and b == "f" for a, b in pairs), "ff": sum(a == "f" and b == "f" for a, b in pairs)}


def test_kappa_values():
    assert multiclass_kappa([("a", "a"), ("b", "b"), ("c", "c")]) == 1.0
    # judged always "a": agreement equals chance
    assert multiclass_kappa([("a", "a"), ("b", "a"), ("a", "a"), ("b", "a")]) == 0.0
    assert math.isnan(multiclass_kappa([]))


def test_rank_auc_and_bins():
    assert rank_auc([1, 2, 3, 4], [False, False, True, True]) == 1.0
    assert rank_auc([1, 1], [False, True]) == 0.5
    assert math.isnan(rank_auc([1, 2], [True, True]))
    bins = score_bins(0, 10, [0, 1.9, 2, 10, 5], [False, False, True, True, True], [True, True, True, True, False])
    assert [b.n for b in bins] == [2, 1, 0, 0, 1]
    assert bins[0].reference_pass_rate == 0.0 and bins[4].mean_score == 10


def rows(*triples):
    return [(i + 1, {"output": o, "expected": e, "label": lab}) for i, (o, e, lab) in enumerate(triples)]


def test_string_check_against_pass_fail_references():
    data = rows(("a", "a", True), ("a", "b", False), ("a", "a", "fail"), ("b", "b", "pass"))
    [result] = calibrate([EXACT], data, judge=None)
    # judge passes rows 1, 3, 4; reference passes 1, 4
    assert result.n == 4 and result.errors == 0
    assert result.pass_accuracy == 0.75
    assert result.pass_kappa == pytest.approx(cohen_kappa(2, 1, 0, 1))
    assert result.label_accuracy is None and result.bins == []


def test_missing_fields_and_unreadable_references_name_the_line():
    with pytest.raises(DataError, match=r"data.jsonl:2: no 'label' field"):
        calibrate([EXACT], [(1, {"output": "a", "label": True}), (2, {"output": "a"})], judge=None, source="data.jsonl")
    with pytest.raises(DataError, match=r"x.csv:1: reference 'maybe' is not true/false"):
        calibrate([EXACT], [(1, {"output": "a", "expected": "a", "label": "maybe"})], judge=None, source="x.csv")


def test_a_local_judge_label_table_adds_up(chatty_dir):
    judge = load_model(f"local:{chatty_dir}", {"dtype": "fp32"})
    label = {"type": "label_model", "name": "sentiment", "model": "x", "labels": ["positive", "negative"],
             "passing_labels": ["positive"], "input": [{"role": "user", "content": "{{sample.output_text}}"}]}
    score = {"type": "score_model", "name": "happy", "model": "x", "range": [1, 5],
             "input": [{"role": "user", "content": "{{sample.output_text}}"}]}
    data = [(i + 1, {"output": f"message {i}", "label": "positive" if i % 2 else "negative"}) for i in range(6)]
    try:
        by_label, by_score = calibrate([label, score], data, judge=judge, passing=["positive"])
    finally:
        judge.close()
    assert by_label.constrained and by_label.errors == 0
    assert sum(sum(row.values()) for row in by_label.confusion.values()) == 6
    hits = sum(by_label.confusion.get(lab, {}).get(lab, 0) for lab in ("positive", "negative"))
    assert by_label.label_accuracy == hits / 6 == by_label.pass_accuracy
    assert sum(b.n for b in by_score.bins) == 6 and 0 <= by_score.auc <= 1


def test_cli_prints_the_table_and_json(tmp_path):
    (tmp_path / "graders.json").write_text(json.dumps([EXACT]))
    (tmp_path / "data.csv").write_text("output,expected,label\na,a,pass\na,b,fail\nb,b,fail\n")
    runner = CliRunner()
    db = str(tmp_path / "f.db")
    result = runner.invoke(main, ["graders", "calibrate", str(tmp_path / "graders.json"),
                                  "--data", str(tmp_path / "data.csv"), "--db", db])
    assert result.exit_code == 0, result.output
    assert "exact (string_check): n=3 errors=0 pass/fail accuracy 0.667" in result.output
    result = runner.invoke(main, ["graders", "calibrate", str(tmp_path / "graders.json"),
                                  "--data", str(tmp_path / "data.csv"), "--json", "--no-save", "--db", db])
    assert json.loads(result.output)[0]["pass_accuracy"] == pytest.approx(2 / 3)
    from flywheel.store import Store

    store = Store.open(db)
    try:
        [row] = store.latest_calibrations(["exact", "other"])  # --no-save stored nothing
        assert store.db.execute("select count(*) from judge_calibrations").fetchone()[0] == 1
    finally:
        store.close()
    assert row["grader"] == "exact" and row["n"] == 3 and row["pass_accuracy"] == pytest.approx(2 / 3)
    assert row["data_path"].endswith("data.csv") and len(row["data_hash"]) == 16


def test_cli_bad_data_is_one_error_line(tmp_path):
    (tmp_path / "graders.json").write_text(json.dumps([EXACT]))
    (tmp_path / "data.jsonl").write_text('{"output": "a", "label": true}\n{"output": "b"}\n')
    result = CliRunner().invoke(main, ["graders", "calibrate", str(tmp_path / "graders.json"),
                                       "--data", str(tmp_path / "data.jsonl"), "--db", str(tmp_path / "f.db")])
    assert result.exit_code == 1
    assert result.output.strip().endswith("data.jsonl:2: no 'label' field (fields: output)")
    assert result.output.count("error:") == 1


def test_the_review_server_shows_the_newest_calibration_beside_judge_vs_human(store):
    import http.client

    from report_helpers import build_run

    from flywheel.calibration import Calibration, save_calibrations
    from flywheel.report.review_app import create_app
    from flywheel.web import BackgroundServer

    run = build_run(store, n_items=4)
    judge_cfg = {"type": "score_model", "name": "judge", "model": "openai:judge", "input": []}
    old = Calibration(grader="judge", type="score_model", n=10, errors=0, pass_accuracy=0.5, pass_kappa=0.0)
    new = Calibration(grader="judge", type="score_model", n=48, errors=1, pass_accuracy=0.9375, pass_kappa=0.875,
                      auc=0.66, constrained=True)
    save_calibrations(store, [old], [judge_cfg], data_path="old.jsonl")
    save_calibrations(store, [new], [judge_cfg], data_path="labelled.jsonl")
    with BackgroundServer(create_app(store.path)) as server:
        conn = http.client.HTTPConnection("127.0.0.1", server.port, timeout=30)
        conn.request("GET", f"/runs/{run['run_id']}")
        page = conn.getresponse().read().decode()
        conn.close()
    table = page[page.index('id="calibrations"'):]
    table = table[:table.index("</table>")]
    assert "labelled.jsonl" in table and "old.jsonl" not in table
    assert "93.8%" in table and "0.88" in table and "0.66" in table and "constrained" in table


def test_cli_free_text_turns_constrained_judging_off(tmp_path, chatty_dir):
    label = {"type": "label_model", "name": "sentiment", "model": f"local:{chatty_dir}", "labels": ["positive", "negative"],
             "passing_labels": ["positive"], "input": [{"role": "user", "content": "{{sample.output_text}}"}],
             "sampling_params": {"max_completions_tokens": 4}}
    (tmp_path / "graders.json").write_text(json.dumps([label]))
    (tmp_path / "data.jsonl").write_text("".join(json.dumps({"output": f"text {i}", "label": lab}) + "\n"
                                                 for i, lab in enumerate(["positive", "negative"] * 2)))
    out = {}
    for flags in ([], ["--free-text"]):
        result = CliRunner().invoke(main, ["graders", "calibrate", str(tmp_path / "graders.json"), "--data",
                                           str(tmp_path / "data.jsonl"), "--json", "--no-save", *flags])
        assert result.exit_code == 0, result.output
        out[bool(flags)] = json.loads(result.output)[0]
    assert out[False]["constrained"] is True and out[False]["errors"] == 0
    # the tiny random model never writes a label: read as free text, every grade is a parse error
    assert out[True]["constrained"] is False and out[True]["errors"] == 4
