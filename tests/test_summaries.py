import json
import math

from flywheel.store import SampleRecord
from flywheel.summaries import EvalSummary, GradeRow, RunSummary, SampleRow, objective_value, summarise_rows


def _grade(name, score, passed, error=None):
    return {"grader": name, "score": score, "passed": passed, "feedback": "", "error": error}


def _iteration(store):
    run_id = store.create_run(kind="eval", config_key="k")
    iteration_id = store.iteration_for(run_id, 0, stage="eval")
    store.write_samples([
        SampleRecord(iteration_id, "a", 0, "[]", "x", grades=[_grade("sim", 0.7, True), _grade("exact", 0.0, False)]),
        SampleRecord(iteration_id, "b", 0, "[]", "y", grades=[_grade("sim", 0.4, False), _grade("exact", 1.0, True)]),
        SampleRecord(iteration_id, "c", 0, "[]", None, error="model_error: boom"),
    ])
    return run_id, iteration_id


def test_objective_value_rules():
    assert objective_value(None, 0.7, True, "pass_rate") == (1.0, True)
    assert objective_value(None, 0.7, False, "mean_score") == (0.7, False)
    assert objective_value(None, 0.7, True, None) == (0.7, True)
    assert objective_value("model_error", 0.7, True, "mean_score") == (0.0, False)
    assert objective_value(None, None, None, "pass_rate") == (0.0, False)  # ungraded


def test_one_objective_query_for_all_readers(store):
    _, iteration_id = _iteration(store)
    raw = store.objective_scores(iteration_id, "sim")
    assert raw == {("a", 0): (0.7, True), ("b", 0): (0.4, False), ("c", 0): (0.0, False)}
    assert store.objective_scores(iteration_id, "sim", "pass_rate")[("a", 0)] == (1.0, True)
    samples = store.samples_with_grades(iteration_id, objective=("sim", "mean_score"))
    assert [(s.item_key, s.score, s.passed) for s in samples] == [
        ("a", 0.7, True), ("b", 0.4, False), ("c", 0.0, False)]


def test_eval_summary_counts_errored_samples_as_failing(store):
    _, iteration_id = _iteration(store)
    summary = store.eval_summary(iteration_id, "sim", "mean_score")
    assert summary.n_samples == 3 and summary.n_errors == 1 and summary.pass_rate == 0.0
    sim = next(g for g in summary.graders if g.name == "sim")
    assert math.isclose(sim.mean, 1.1 / 3) and sim.pass_rate == 1 / 3 and sim.errors == 1
    assert summary.objective == sim.mean
    assert [g.name for g in store.grader_stats(iteration_id)] == ["exact", "sim"]


def test_summary_is_stored_and_read_back_typed_with_nan(store):
    run_id = store.create_run(kind="eval", config_key="k")
    empty = summarise_rows([], [], objective_grader="x", metric="pass_rate")
    store.finish_run(run_id, "completed", empty.model_copy(update={"wall_s": 2.5}))
    run = store.get_run(run_id)
    back = EvalSummary.of_run(run)
    assert isinstance(back, EvalSummary) and math.isnan(back.objective) and back.wall_s == 2.5
    assert RunSummary.of_run(run).wall_time == 2.5
    assert json.loads(run.summary_json)["n_samples"] == 0


def test_pass_rate_objective_uses_wilson_interval():
    rows = [SampleRow(id=i) for i in range(4)]
    grades = [GradeRow(sample_id=i, grader="g", score=float(i % 2), passed=bool(i % 2)) for i in range(4)]
    summary = summarise_rows(rows, grades, objective_grader="g", metric="pass_rate")
    assert summary.objective == 0.5 and summary.objective_ci[0] < 0.5 < summary.objective_ci[1]


def test_grader_stats_without_ci_count_the_same_way(store):
    _, iteration_id = _iteration(store)
    full, quick = store.grader_stats(iteration_id), store.grader_stats(iteration_id, ci=False)
    assert [(g.name, g.n, round(g.mean, 12), g.pass_rate, g.errors) for g in full] == [
        (g.name, g.n, round(g.mean, 12), g.pass_rate, g.errors) for g in quick]
    assert all(math.isnan(g.ci_low) for g in quick) and not math.isnan(full[0].ci_low)
