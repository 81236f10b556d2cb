"""`flywheel import openai-eval` / `flywheel export openai-eval`: platform definitions to a spec and back,
end to end through the CLI; the imported spec runs with `flywheel eval` on a tiny model."""

from __future__ import annotations

import json
import re

import pytest
from click.testing import CliRunner

from api_helpers import CRITERIA, completions_source, items, jsonl
from flywheel.cli import main


def write_platform_files(tmp_path, tiny_model_dir):
    evaluation = {"object": "eval", "id": "eval_abc", "name": "intents",
                  "data_source_config": {"type": "custom", "item_schema": {"type": "object"}},
                  "testing_criteria": [{**c, "id": f"{c['name']}-1234"} for c in CRITERIA]}
    (tmp_path / "eval.json").write_text(json.dumps(evaluation))
    run = {"object": "eval.run", "data_source": completions_source(tiny_model_dir, {"type": "file_id", "id": "file-x"})}
    (tmp_path / "run.json").write_text(json.dumps(run))
    (tmp_path / "items.jsonl").write_bytes(jsonl(items(6)))


def test_import_runs_and_exports_back(tmp_path, tiny_model_dir):
    write_platform_files(tmp_path, tiny_model_dir)
    runner = CliRunner()
    out = tmp_path / "imported"
    result = runner.invoke(main, ["import", "openai-eval", str(tmp_path / "eval.json"), str(tmp_path / "items.jsonl"),
                                  "--run", str(tmp_path / "run.json"), "--out", str(out)])
    assert result.exit_code == 0, result.output
    assert "2 graders" in result.output and "6 items" in result.output
    ran = runner.invoke(main, ["eval", str(out / "eval.yaml"), "--split", "all", "--db", str(tmp_path / "f.db"),
                               "--json"])
    assert ran.exit_code == 0, ran.output
    assert json.loads(ran.stdout)["n_samples"] == 6

    exported = runner.invoke(main, ["export", "openai-eval", str(out / "eval.yaml")])
    assert exported.exit_code == 0, exported.output
    bodies = json.loads(exported.stdout)
    assert bodies["eval"]["testing_criteria"] == CRITERIA  # ids dropped on import, schema kept
    source = bodies["run"]["data_source"]
    assert source["model"] == f"local:{tiny_model_dir}"
    assert source["input_messages"]["template"][1] == {"role": "user", "content": "{{item.text}}"}
    assert [row["item"] for row in source["source"]["content"]] == [row["item"] for row in items(6)]


def test_export_takes_a_split_and_names_large_items_by_file_id(tmp_path, tiny_spec):
    from flywheel.api.convert import export_openai_eval
    from flywheel.spec import load_eval_spec

    runner = CliRunner()
    valid = runner.invoke(main, ["export", "openai-eval", str(tiny_spec), "--split", "valid"])
    assert valid.exit_code == 0, valid.output
    content = json.loads(valid.stdout)["run"]["data_source"]["source"]["content"]
    assert len(content) == 4 and {row["item"]["split"] for row in content} == {"valid"}

    out = tmp_path / "items.jsonl"
    written = runner.invoke(main, ["export", "openai-eval", str(tiny_spec), "--split", "test", "--items-out",
                                   str(out), "--file-id", "file-abc"])
    assert written.exit_code == 0, written.output
    assert json.loads(written.stdout)["run"]["data_source"]["source"] == {"type": "file_id", "id": "file-abc"}
    rows = [json.loads(line) for line in out.read_text().splitlines()]
    assert len(rows) == 4 and all(set(r) == {"item"} and r["item"]["split"] == "test" for r in rows)

    # over the inline limit: by reference, never inline; the CLI asks where to write the file
    large = export_openai_eval(load_eval_spec(tiny_spec), inline_limit=100)
    assert large.bodies["run"]["data_source"]["source"]["type"] == "file_id"
    assert large.items == 12 and large.items_jsonl.count("\n") == 12


def test_import_names_the_bad_line(tmp_path, tiny_model_dir):
    write_platform_files(tmp_path, tiny_model_dir)
    (tmp_path / "items.jsonl").write_text('{"item": {"text": "a"}}\n{"text": "no wrapper"}\n')
    result = CliRunner().invoke(main, ["import", "openai-eval", str(tmp_path / "eval.json"),
                                       str(tmp_path / "items.jsonl"), "--out", str(tmp_path / "o")])
    assert result.exit_code == 1
    assert "items.jsonl:2: expected" in result.output


def test_import_keeps_rows_with_unicode_line_separators(tmp_path, tiny_model_dir):
    write_platform_files(tmp_path, tiny_model_dir)
    rows = [{"item": {"text": f"a{sep}b", "label": "x"}} for sep in ("\u2028", "\u2029", "\u0085")]
    (tmp_path / "items.jsonl").write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows))
    result = CliRunner().invoke(main, ["import", "openai-eval", str(tmp_path / "eval.json"),
                                       str(tmp_path / "items.jsonl"), "--out", str(tmp_path / "o")])
    assert result.exit_code == 0, result.output
    imported = (tmp_path / "o" / "data.jsonl").read_text(encoding="utf-8").split("\n")
    assert [json.loads(line)["text"] for line in imported if line] == ["a\u2028b", "a\u2029b", "a\u0085b"]


# A platform job object as `GET /v1/fine_tuning/jobs/{id}` shows it (reference §5.5).
PLATFORM_JOB = {
    "object": "fine_tuning.job", "id": "ftjob-abc123", "model": "gpt-4o-mini-2024-07-18", "created_at": 1721764800,
    "fine_tuned_model": None, "organization_id": "org-123", "result_files": [], "status": "queued",
    "validation_file": "file-val", "training_file": "file-train", "seed": 7, "suffix": "intents",
    "hyperparameters": {"n_epochs": 3, "batch_size": "auto", "learning_rate_multiplier": "auto"},
    "method": {"type": "supervised", "supervised": {"hyperparameters": {
        "n_epochs": 3, "batch_size": "auto", "learning_rate_multiplier": 2}}},
    "metadata": {"team": "a"}, "integrations": [], "trained_tokens": None, "error": None,
}
CHAT_ROWS = [{"messages": [{"role": "user", "content": f"q {i}"}, {"role": "assistant", "content": "card_arrival"}]}
             for i in range(4)]


def test_import_openai_job_queues_a_job_the_api_shows(tmp_path, tiny_model_dir):
    import yaml

    from flywheel.api.app import create_api_app
    from flywheel.web import BackgroundServer
    from api_helpers import client_for

    (tmp_path / "job.json").write_text(json.dumps(PLATFORM_JOB))
    (tmp_path / "train.jsonl").write_bytes(jsonl(CHAT_ROWS))
    (tmp_path / "valid.jsonl").write_bytes(jsonl(CHAT_ROWS[:2]))
    db = str(tmp_path / "f.db")
    runner = CliRunner()
    args = ["import", "openai-job", str(tmp_path / "job.json"), "--training-file", str(tmp_path / "train.jsonl"),
            "--db", db]
    no_model = runner.invoke(main, args)
    assert no_model.exit_code == 1 and "give the local base to train with --model" in no_model.output
    no_validation = runner.invoke(main, [*args, "--model", f"local:{tiny_model_dir}"])
    assert no_validation.exit_code == 1 and "validation_file: file-val is a platform file" in no_validation.output
    done = runner.invoke(main, [*args, "--model", f"local:{tiny_model_dir}", "--validation-file",
                                str(tmp_path / "valid.jsonl"), "--config-out", str(tmp_path / "sft.yaml"), "--json"])
    assert done.exit_code == 0, done.output
    job = json.loads(done.stdout)
    config = yaml.safe_load((tmp_path / "sft.yaml").read_text())
    assert (config["epochs"], config["learning_rate"], config["seed"]) == (3.0, 1e-3, 7)  # 2 x our 5e-4
    with BackgroundServer(create_api_app(db, workers=0)) as server:
        client = client_for(server.url)
        shown = client.fine_tuning.jobs.retrieve(job["id"])
        assert (shown.status, shown.model, shown.user_provided_suffix, shown.metadata) == (
            "queued", f"local:{tiny_model_dir}", "intents", {"team": "a"})
        assert shown.method.supervised.hyperparameters.n_epochs == 3
        assert client.files.content(shown.training_file).read() == jsonl(CHAT_ROWS)
        assert client.files.retrieve(shown.validation_file).filename == "valid.jsonl"


def test_import_openai_job_refuses_bad_files_and_keeps_nothing(tmp_path, tiny_model_dir):
    from flywheel.store import Store

    (tmp_path / "job.json").write_text(json.dumps({**PLATFORM_JOB, "validation_file": None,
                                                   "method": {"type": "dpo"}}))
    (tmp_path / "train.jsonl").write_bytes(jsonl(CHAT_ROWS))
    (tmp_path / "bad.jsonl").write_bytes(jsonl(CHAT_ROWS[:1]) + b"{oops\n")
    db = str(tmp_path / "g.db")
    base = ["import", "openai-job", str(tmp_path / "job.json"), "--model", f"local:{tiny_model_dir}", "--db", db]
    wrong_kind = CliRunner().invoke(main, [*base, "--training-file", str(tmp_path / "train.jsonl")])
    assert wrong_kind.exit_code == 1
    assert wrong_kind.output.startswith(f"error: {tmp_path / 'train.jsonl'}: training_file ")
    assert "dpo jobs need dpo rows" in wrong_kind.output
    broken = CliRunner().invoke(main, [*base, "--training-file", str(tmp_path / "bad.jsonl")])
    assert broken.exit_code == 1 and "bad.jsonl:2: invalid JSON" in broken.output
    for project in ("../x", "t\u0663am"):  # the names `keys create` refuses
        named = CliRunner().invoke(main, [*base, "--training-file", str(tmp_path / "train.jsonl"), "--project", project])
        assert named.exit_code == 1 and named.output.startswith("error: project must be 1-64 ASCII"), named.output
    store = Store.open(db)
    try:
        assert store.api_list("api_files")[0] == [] and store.api_list("api_fine_tuning_jobs")[0] == []
        assert not list((store.artefact_dir / "api" / "files").glob("*"))
    finally:
        store.close()


def test_import_the_platforms_rft_job_fixture(tmp_path, tiny_model_dir):
    from pathlib import Path

    from flywheel.store import Store

    fixture = json.loads((Path(__file__).resolve().parents[1] / "fixtures/hosted_finetuning/rft_succeeded.json")
                         .read_text())["created"]
    (tmp_path / "prompts.jsonl").write_bytes(jsonl([{"messages": [{"role": "user", "content": "q"}], "label": "a"}]))
    db = str(tmp_path / "r.db")
    base = ["import", "openai-job", str(tmp_path / "job.json"), "--training-file", str(tmp_path / "prompts.jsonl"),
            "--model", f"local:{tiny_model_dir}", "--db", db]
    (tmp_path / "job.json").write_text(json.dumps(fixture))  # its grader is abbreviated: no input / reference
    refused = CliRunner().invoke(main, base)
    assert refused.exit_code == 1
    assert refused.output.startswith(f"error: {tmp_path / 'job.json'}: method.reinforcement.grader: ")
    grader = {"type": "string_check", "name": "label", "input": "{{sample.output_text}}",
              "reference": "{{item.label}}", "operation": "eq"}
    fixture["method"]["reinforcement"]["grader"] = grader
    (tmp_path / "job.json").write_text(json.dumps(fixture))
    done = CliRunner().invoke(main, [*base, "--json", "--config-out", str(tmp_path / "rft.yaml")])
    assert done.exit_code == 0, done.output
    job = json.loads(done.stdout)
    assert job["method"]["reinforcement"]["grader"] == grader
    assert job["method"]["reinforcement"]["hyperparameters"]["reasoning_effort"] == "medium"
    assert (job["seed"], job["metadata"]) == (7, {"flywheel_eval": "tiny"})
    assert "num_generations" in (tmp_path / "rft.yaml").read_text()
    store = Store.open(db)
    try:
        assert len(store.api_list("api_files")[0]) == 1 and len(store.api_list("api_jobs")[0]) == 1
    finally:
        store.close()


# The job's result file (reference §5.8: step, train_loss, train_accuracy, valid_loss, ...); validation
# columns are empty on steps the platform did not validate.
METRICS_CSV = ("step,train_loss,train_accuracy,valid_loss,valid_mean_token_accuracy\n"
               "1,2.5,0.40,,\n2,1.9,0.55,2.1,0.50\n3,1.2,0.71,,\n4,0.8,0.83,1.0,0.79\n")


def test_import_openai_job_keeps_the_platforms_metrics_and_maps_hyperparameters(tmp_path, tiny_model_dir):
    import yaml

    from flywheel.store import Store

    job = {**PLATFORM_JOB, "validation_file": None, "status": "succeeded", "result_files": ["file-res"],
           "fine_tuned_model": "ft:gpt-4o-mini-2024-07-18:acme::abc123", "trained_tokens": 5120}
    (tmp_path / "job.json").write_text(json.dumps(job))
    (tmp_path / "train.jsonl").write_bytes(jsonl(CHAT_ROWS))
    (tmp_path / "step_metrics.csv").write_text(METRICS_CSV)
    db = str(tmp_path / "m.db")
    done = CliRunner().invoke(main, ["import", "openai-job", str(tmp_path / "job.json"), "--training-file",
                                     str(tmp_path / "train.jsonl"), "--model", f"local:{tiny_model_dir}",
                                     "--result-file", str(tmp_path / "step_metrics.csv"),
                                     "--config-out", str(tmp_path / "sft.yaml"), "--db", db])
    assert done.exit_code == 0, done.output
    assert "platform metrics kept (4 steps, final train_loss 0.8, train_accuracy 0.83, valid_loss 1" in done.output
    config = yaml.safe_load((tmp_path / "sft.yaml").read_text())
    assert (config["epochs"], config["learning_rate"], config["seed"]) == (3.0, 1e-3, 7)  # method.supervised's
    beside = json.loads((tmp_path / "sft.platform-metrics.json").read_text())
    store = Store.open(db)
    try:
        (queued,), _ = store.api_list("api_fine_tuning_jobs")
        kept = store.platform_job_metrics(queued["id"])
    finally:
        store.close()
    assert kept == beside
    assert kept["steps"][0] == {"step": 1, "train_loss": 2.5, "train_accuracy": 0.4, "valid_loss": None,
                                "valid_mean_token_accuracy": None}
    assert kept["final"]["valid_loss"] == 1.0 and kept["best"] == {"train_loss": 0.8, "valid_loss": 1.0}
    assert kept["platform_job"]["id"] == "ftjob-abc123" and kept["platform_job"]["trained_tokens"] == 5120
    assert kept["platform_job"]["fine_tuned_model"] == "ft:gpt-4o-mini-2024-07-18:acme::abc123"


@pytest.mark.parametrize("text, message", [
    ("", r"m.csv:1: empty"),
    ("train_loss,valid_loss\n1.0,2.0\n", r"m.csv:1: step: missing from the header"),
    ("step,train_loss\n1,0.5\n2,lots\n", r"m.csv:3: train_loss: 'lots' is not a number"),
    ("step,train_loss\n1,0.5\n2,nan\n", r"m.csv:3: train_loss: 'nan' is not a finite number"),
    ("step,train_loss\n2,0.5\n2,0.4\n", r"m.csv:3: step: 2 after 2; steps increase"),
    ("step,train_loss\n1.5,0.5\n", r"m.csv:2: step: expected a whole number"),
    ("step,train_loss,valid_loss\n1,0.5,0.6\n2,0.4\n", r"m.csv:3: 2 values for 3 columns"),
    ("step,train_loss,train_loss\n1,0.5,0.5\n", r"m.csv:1: train_loss: appears twice"),
    ("step,train_loss\n", r"m.csv: no step rows"),
])
def test_a_bad_result_file_is_one_line_and_queues_nothing(tmp_path, tiny_model_dir, text, message):
    from flywheel.store import Store

    (tmp_path / "job.json").write_text(json.dumps({**PLATFORM_JOB, "validation_file": None}))
    (tmp_path / "train.jsonl").write_bytes(jsonl(CHAT_ROWS))
    (tmp_path / "m.csv").write_text(text)
    db = str(tmp_path / "b.db")
    out = CliRunner().invoke(main, ["import", "openai-job", str(tmp_path / "job.json"), "--training-file",
                                    str(tmp_path / "train.jsonl"), "--model", f"local:{tiny_model_dir}",
                                    "--result-file", str(tmp_path / "m.csv"), "--db", db])
    assert out.exit_code == 1 and out.output.count("\n") == 1
    assert re.search(message, out.output), out.output
    store = Store.open(db)
    try:
        assert store.api_list("api_files")[0] == [] and store.api_list("api_fine_tuning_jobs")[0] == []
    finally:
        store.close()
