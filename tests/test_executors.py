"""`--executor ray`: an eval's chunks generated and graded in Ray tasks on a real local cluster
(2 CPUs), the store written by the driver alone; compared with the local executor sample by sample."""

from __future__ import annotations

import json
from contextlib import closing
import sqlite3

import pytest
from conftest import make_rows, spec_dict, write_jsonl

from flywheel.executors import RayExecutor, generate_and_grade
from flywheel.harness import run_eval
from flywheel.models import ChatRequest, Sampling
from flywheel.spec import parse_eval_spec
from flywheel.store import Store

ray = pytest.importorskip("ray")


@pytest.fixture(scope="module")
def ray_cluster():
    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False)
    yield
    ray.shutdown()


def tiny_spec(tmp_path, chatty_dir, n_per_split=6):
    write_jsonl(tmp_path / "data.jsonl", make_rows(n_per_split))
    return parse_eval_spec(spec_dict(f"local:{chatty_dir}", model_options={"dtype": "fp32"}),
                           source="eval.yaml", base_dir=tmp_path)


def samples(db, iteration_id):
    with sqlite3.connect(db) as conn:
        rows = conn.execute("SELECT s.item_key, s.repeat, s.output_text, s.error FROM samples s "
                            "WHERE s.iteration_id = ? ORDER BY s.item_key, s.repeat", (iteration_id,)).fetchall()
        grades = conn.execute("SELECT count(*) FROM grades g JOIN samples s ON g.sample_id = s.id "
                              "WHERE s.iteration_id = ?", (iteration_id,)).fetchone()[0]
    return rows, grades


def test_one_task_generates_and_grades_in_process(tmp_path, chatty_dir):
    spec = tiny_spec(tmp_path, chatty_dir)
    requests = [ChatRequest(messages=[{"role": "user", "content": f"q{i}"}], sampling=Sampling(max_tokens=4))
                for i in range(3)]
    items = [{"label": "card_arrival"}] * 3
    result = generate_and_grade(spec.model, spec.model_options, spec.graders, requests, items)
    assert len(result.completions) == 3 and all(c.error is None and c.text for c in result.completions)
    assert [[g["grader"] for g in row] for row in result.grades] == [["label"]] * 3


def test_ray_executor_stores_what_the_local_executor_stores(tmp_path, chatty_dir, ray_cluster):
    spec = tiny_spec(tmp_path, chatty_dir, n_per_split=10)
    local_db, ray_db = tmp_path / "local.db", tmp_path / "ray.db"
    with closing(Store.open(local_db)) as store:
        local = run_eval(spec, store, split="test")
    executor = RayExecutor(chunk_size=3)  # 4 tasks of 3, 3, 3, 1 samples
    with closing(Store.open(ray_db)) as store:
        fanned = run_eval(spec, store, split="test", executor=executor)
    assert fanned.n_samples == local.n_samples == 10 and fanned.n_errors == 0
    assert fanned.model_calls == 10 and fanned.pass_rate == local.pass_rate
    local_rows, local_grades = samples(local_db, local.iteration_id)
    ray_rows, ray_grades = samples(ray_db, fanned.iteration_id)
    assert ray_rows == local_rows  # greedy: the same texts, each (item, repeat) once
    assert ray_grades == local_grades == 10
    assert not executor._started_here  # it joined the cluster it found and leaves it running


def test_a_ray_run_killed_half_way_resumes(tmp_path, chatty_dir, ray_cluster):
    spec = tiny_spec(tmp_path, chatty_dir, n_per_split=9)
    db = tmp_path / "flywheel.db"
    seen = []

    def die_after_first_chunk(done, total):
        seen.append(done)
        if done >= 3:
            raise KeyboardInterrupt  # as if Ctrl-C arrived right after a commit

    with closing(Store.open(db)) as store:
        with pytest.raises(KeyboardInterrupt):
            run_eval(spec, store, split="test", executor=RayExecutor(chunk_size=3), progress=die_after_first_chunk)
    with closing(Store.open(db)) as store:
        resumed = run_eval(spec, store, split="test", executor=RayExecutor(chunk_size=3))
    assert resumed.resumed == 3 and resumed.model_calls == 6 and resumed.n_samples == 9
    rows, grades = samples(db, resumed.iteration_id)
    assert len(rows) == 9 and len({(k, r) for k, r, _, _ in rows}) == 9 and grades == 9


def test_a_failing_task_is_error_rows_not_a_crash(tmp_path, ray_cluster):
    write_jsonl(tmp_path / "data.jsonl", make_rows(4))
    # A model folder whose config names no known architecture: it passes the check at load, and
    # every task raises loading it.
    (tmp_path / "empty-model").mkdir()
    (tmp_path / "empty-model" / "config.json").write_text('{"model_type": "no-such-architecture"}')
    spec = parse_eval_spec(spec_dict(f"local:{tmp_path / 'empty-model'}"), source="eval.yaml", base_dir=tmp_path)
    with closing(Store.open(tmp_path / "f.db")) as store:
        result = run_eval(spec, store, split="test", executor=RayExecutor(chunk_size=2))
    assert result.n_samples == 4 and result.n_errors == 4
    rows, _ = samples(tmp_path / "f.db", result.iteration_id)
    assert all(error.startswith("executor_error: ray task failed") for *_, error in rows)
    assert json.loads(json.dumps(result.to_dict()))["n_errors"] == 4


def test_a_flywheel_error_in_a_task_stops_the_run_as_it_does_locally(tmp_path, ray_cluster, monkeypatch):
    from flywheel.errors import ModelError

    monkeypatch.delenv("FLYWHEEL_TEST_NO_SUCH_KEY", raising=False)
    write_jsonl(tmp_path / "data.jsonl", make_rows(2))
    # api.openai.com without a key: the worker refuses before any network call.
    spec = parse_eval_spec(spec_dict("openai:gpt-4o-mini", model_options={"api_key_env": "FLYWHEEL_TEST_NO_SUCH_KEY",
                                                              "base_url": "https://api.openai.com/v1"}),
                           source="eval.yaml", base_dir=tmp_path)
    with closing(Store.open(tmp_path / "f.db")) as store:
        with pytest.raises(ModelError, match=r"no API key: set \$FLYWHEEL_TEST_NO_SUCH_KEY"):
            run_eval(spec, store, split="test", executor=RayExecutor(chunk_size=1))


# -- `executor:` in a run spec: the wheel's evaluations on Ray ---------------------------------------
def write_run(folder, chatty_dir, **run):
    import yaml

    folder.mkdir(parents=True, exist_ok=True)
    write_jsonl(folder / "data.jsonl", make_rows(5))
    spec = spec_dict(f"local:{chatty_dir}", model_options={"dtype": "fp32"}, optimize={
        "minibatch": 4, "finalists": 1,
        "fewshot": {"source": "labels", "demo_output": "{{item.label}}", "label_field": "label",
                    "strategies": ["balanced"], "k": [1]}})
    (folder / "eval.yaml").write_text(yaml.safe_dump(spec))
    (folder / "run.yaml").write_text(yaml.safe_dump({"eval": "eval.yaml", "plateau": 9, "report": False,
                                                     "stages": [{"stage": "optimize"}], **run}))
    return folder / "run.yaml"


def wheel_samples(db):
    with sqlite3.connect(db) as conn:
        return conn.execute("SELECT i.stage, i.split, i.score, s.item_key, s.repeat, s.output_text, s.error "
                            "FROM samples s JOIN iterations i ON i.id = s.iteration_id").fetchall()


def test_a_run_spec_executor_sends_the_wheels_evaluations_to_ray(tmp_path, chatty_dir, ray_cluster, monkeypatch):
    from flywheel.run_spec import load_run_spec
    from flywheel.wheel import run_wheel

    chunks = []
    real_map = RayExecutor.map

    def counting_map(self, *args):  # the real Ray tasks run; this only counts what they were given
        for index, result in real_map(self, *args):
            chunks.append(len(result.completions))
            yield index, result

    local_spec = load_run_spec(write_run(tmp_path / "local", chatty_dir))
    with closing(Store.open(tmp_path / "local" / "f.db")) as store:
        local = run_wheel(local_spec, store)
    assert not chunks  # no executor block: every evaluation ran here
    monkeypatch.setattr(RayExecutor, "map", counting_map)
    fanned_spec = load_run_spec(write_run(tmp_path / "ray", chatty_dir), ["executor={kind: ray, chunk_size: 2}"])
    assert fanned_spec.executor.kind == "ray"
    with closing(Store.open(tmp_path / "ray" / "f.db")) as store:
        fanned = run_wheel(fanned_spec, store)
        eval_ids = {row.eval_id for row in store.list_runs(limit=1000)}
    # The baseline's 5 valid samples went out as Ray tasks of <= 2 samples; the rest of the wheel's
    # measurements were answered by the completion cache (test items repeat valid's texts here), and
    # the search's own minibatches stay in this process.
    assert sorted(chunks) == [1, 2, 2]
    assert [(o.stage, o.decision) for o in fanned.stages] == [(o.stage, o.decision) for o in local.stages]
    scores = lambda result: {k: v for k, v in result.test.items() if k != "test_iterations"}  # noqa: E731
    assert fanned.baseline_valid == local.baseline_valid and scores(fanned) == scores(local)
    assert sorted(wheel_samples(tmp_path / "ray" / "f.db"), key=repr) == \
        sorted(wheel_samples(tmp_path / "local" / "f.db"), key=repr)
    with closing(Store.open(tmp_path / "local" / "f.db")) as store:
        assert eval_ids == {row.eval_id for row in store.list_runs(limit=1000)}  # the same eval: no fingerprint change


def test_a_bad_run_spec_executor_is_one_line(tmp_path, chatty_dir):
    from click.testing import CliRunner

    from flywheel.cli import main

    path = write_run(tmp_path, chatty_dir, executor={"kind": "ray", "adress": "auto"})
    result = CliRunner().invoke(main, ["run", str(path), "--db", str(tmp_path / "f.db")])
    assert result.exit_code == 1 and "Traceback" not in result.output
    assert result.output.strip().splitlines() == [f"error: {path}: executor.adress: unknown field"]


def test_an_eval_spec_executor_is_used_by_flywheel_eval_and_the_flag_overrides_it(tmp_path, chatty_dir,
                                                                                   ray_cluster, monkeypatch):
    import yaml
    from click.testing import CliRunner

    from flywheel.cli import main

    write_jsonl(tmp_path / "data.jsonl", make_rows(3))
    spec = spec_dict(f"local:{chatty_dir}", model_options={"dtype": "fp32"}, executor={"kind": "ray", "chunk_size": 1})
    (tmp_path / "eval.yaml").write_text(yaml.safe_dump(spec))
    chunks = []
    real_map = RayExecutor.map

    def counting_map(self, *args):
        for index, result in real_map(self, *args):
            chunks.append(len(result.completions))
            yield index, result

    monkeypatch.setattr(RayExecutor, "map", counting_map)
    local = CliRunner().invoke(main, ["eval", str(tmp_path / "eval.yaml"), "--executor", "local",
                                      "--db", str(tmp_path / "local.db"), "--json"])
    assert local.exit_code == 0, local.output
    assert chunks == []  # --executor local wins over the spec's block
    fanned = CliRunner().invoke(main, ["eval", str(tmp_path / "eval.yaml"), "--db", str(tmp_path / "ray.db"), "--json"])
    assert fanned.exit_code == 0, fanned.output
    assert chunks == [1, 1, 1]  # the spec's block: one Ray task per sample
    eval_ids = []
    for db in ("local.db", "ray.db"):
        with sqlite3.connect(tmp_path / db) as conn:
            eval_ids += [r[0] for r in conn.execute("SELECT id FROM evals")]
    assert len(eval_ids) == 2 and eval_ids[0] == eval_ids[1]  # the same fingerprint with and without the block
    assert json.loads(fanned.output)["pass_rate"] == json.loads(local.output)["pass_rate"]
