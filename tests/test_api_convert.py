"""`flywheel import openai-eval` / `flywheel export openai-eval`: platform definitions to a spec and back,
end to end through the CLI; the imported spec runs with `flywheel eval` on a tiny model."""

from __future__ import annotations

import json

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


def test_import_names_the_bad_line(tmp_path, tiny_model_dir):
    write_platform_files(tmp_path, tiny_model_dir)
    (tmp_path / "items.jsonl").write_text('{"item": {"text": "a"}}\n{"text": "no wrapper"}\n')
    result = CliRunner().invoke(main, ["import", "openai-eval", str(tmp_path / "eval.json"),
                                       str(tmp_path / "items.jsonl"), "--out", str(tmp_path / "o")])
    assert result.exit_code == 1
    assert "items.jsonl:2: expected" in result.output
