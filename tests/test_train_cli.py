"""`flywheel capture` and `flywheel train` end to end through click's CliRunner."""

from __future__ import annotations

import json

from click.testing import CliRunner
from train_helpers import write_eval

from flywheel.cli import main

QUICK = ["-s", "max_steps=2", "-s", "precision=fp32", "-s", "batch_size=4", "-s", "learning_rate=0.01"]


def run(*args: str):
    return CliRunner().invoke(main, [str(a) for a in args], catch_exceptions=False)


def test_capture_train_and_export(tmp_path, tiny_model_dir):
    spec = write_eval(tmp_path, f"local:{tiny_model_dir}")
    db = tmp_path / "flywheel.db"
    captured = run("capture", spec, "--teacher", "reference:label", "--db", db, "--json")
    assert captured.exit_code == 0, captured.output
    assert json.loads(captured.output)["n_passed"] == 4
    trained = run("train", "sft", spec, "--base", f"local:{tiny_model_dir}", *QUICK, "--no-eval", "--db", db, "--json")
    assert trained.exit_code == 0, trained.output
    result = json.loads(trained.output)  # nothing else on stdout
    assert result["method"] == "sft" and result["metrics"]["steps"] == 2
    assert result["checkpoint"]["model_ref"].startswith(f"local:{tiny_model_dir}+")
    text = run("train", "sft", spec, "--base", result["checkpoint"]["id"], *QUICK, "--no-eval", "--db", db)
    assert text.exit_code == 0 and text.stdout.startswith("sft checkpoint sft-"), text.output  # the bar is on stderr
    exported = run("train", "export", "sft", spec, "-o", tmp_path / "out.jsonl", "--hf", tmp_path / "hf", "--db", db)
    assert exported.exit_code == 0 and "wrote 4 sft rows" in exported.output
    assert len((tmp_path / "out.jsonl").read_text().splitlines()) == 4
    assert (tmp_path / "hf" / "dataset_info.json").exists()


def test_bad_input_is_one_clean_error(tmp_path, tiny_model_dir):
    spec = write_eval(tmp_path, f"local:{tiny_model_dir}")
    db = tmp_path / "flywheel.db"
    nothing = run("train", "sft", spec, "--base", f"local:{tiny_model_dir}", "--db", db)
    assert nothing.exit_code == 1 and "error: " in nothing.output and "flywheel capture" in nothing.output
    bad_key = run("train", "sft", spec, "--base", f"local:{tiny_model_dir}", "-s", "colour=blue", "--db", db)
    assert bad_key.exit_code == 1 and "error: train config: colour: unknown field" in bad_key.output
    (tmp_path / "empty.jsonl").write_text("")
    empty = run("train", "dpo", spec, "--base", f"local:{tiny_model_dir}", "--data", tmp_path / "empty.jsonl",
                "--db", db)
    assert empty.exit_code == 1 and "empty training set" in empty.output
    leak = run("capture", spec, "--teacher", "reference:label", "--n", "0", "--db", db)
    assert leak.exit_code == 2  # a usage error
