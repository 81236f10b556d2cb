"""End to end through the CLI: click's CliRunner, and a real subprocess killed with SIGKILL."""

import json
import os
import signal
import sqlite3
import subprocess
import sys
import time

import yaml
from click.testing import CliRunner

from flywheel.cli import main

from conftest import make_rows, spec_dict, write_jsonl


def invoke(*args):
    result = CliRunner().invoke(main, [str(a) for a in args], catch_exceptions=False)
    return result


def test_eval_prints_summary_and_rerun_is_free(tiny_spec, tmp_path):
    db = tmp_path / "cli.db"
    first = invoke("eval", tiny_spec, "--split", "test", "--db", db)
    assert first.exit_code == 0, first.output
    assert "n=4" in first.output and "pass rate" in first.output and "95% CI" in first.output
    assert "model calls 4" in first.output
    second = invoke("eval", tiny_spec, "--split", "test", "--db", db, "--json")
    data = json.loads(second.stdout)
    assert data["model_calls"] == 0 and data["cache_hits"] == 4 and data["n_samples"] == 4
    assert data["graders"][0]["name"] == "label"


def test_runs_list_and_show(tiny_spec, tmp_path):
    db = tmp_path / "cli.db"
    run_id = json.loads(invoke("eval", tiny_spec, "--db", db, "--json").stdout)["run_id"]
    listing = invoke("runs", "list", "--db", db)
    assert run_id[-6:] in listing.output and "completed" in listing.output
    shown = invoke("runs", "show", run_id, "--db", db)
    assert shown.exit_code == 0 and "question 0 about card arrival" in shown.output and "label" in shown.output
    detail = json.loads(invoke("runs", "show", run_id, "--db", db, "--json").stdout)
    samples = detail["iterations"][0]["samples"]
    assert len(samples) == 4 and samples[0]["grades"][0]["grader"] == "label"


def test_errors_are_one_clean_line(tmp_path):
    bad = tmp_path / "bad.yaml"
    bad.write_text("name: [unclosed\n")
    result = CliRunner().invoke(main, ["eval", str(bad), "--db", str(tmp_path / "x.db")])
    assert result.exit_code == 1
    assert result.output.count("\n") == 1 and result.output.startswith("error: ") and "malformed YAML" in result.output
    assert "Traceback" not in result.output


def test_unknown_model_reference_from_cli(tiny_spec, tmp_path):
    result = CliRunner().invoke(main, ["eval", str(tiny_spec), "--model", "gpt5", "--db", str(tmp_path / "x.db")])
    assert result.exit_code == 1 and "unknown model reference 'gpt5'" in result.output


def test_unwritable_db_from_cli(tiny_spec, tmp_path):
    result = CliRunner().invoke(main, ["eval", str(tiny_spec), "--db", str(tmp_path / "no" / "x.db")])
    assert result.exit_code == 1 and "cannot create database" in result.output


def test_usage_error_exits_2(tiny_spec):
    assert CliRunner().invoke(main, ["eval", str(tiny_spec), "--split", "dev"]).exit_code == 2


def test_sigkill_then_same_command_stores_every_item_once(tmp_path, tiny_model_dir):
    rows = [{"id": f"i{n}", "text": f"item number {n}", "label": "x", "split": "test"} for n in range(300)]
    write_jsonl(tmp_path / "data.jsonl", rows)
    spec = spec_dict(f"local:{tiny_model_dir}", model_options={"batch_size": 2})
    spec["sampling"]["max_tokens"] = 12
    (tmp_path / "eval.yaml").write_text(yaml.safe_dump(spec))
    db = tmp_path / "kill.db"
    command = [sys.executable, "-m", "flywheel", "eval", str(tmp_path / "eval.yaml"), "--db", str(db), "--json"]
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}

    proc = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.PIPE, env=env)
    stored = 0
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline and proc.poll() is None:
        if db.exists():
            try:
                with sqlite3.connect(db, timeout=1) as conn:
                    stored = conn.execute("select count(*) from samples").fetchone()[0]
            except sqlite3.OperationalError:
                stored = 0
            if stored >= 16:
                break
        time.sleep(0.02)
    assert proc.poll() is None, "the run finished before it could be killed; make it longer"
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    with sqlite3.connect(db) as conn:
        before = conn.execute("select count(*) from samples").fetchone()[0]
        assert conn.execute("select status from runs").fetchone()[0] == "running"
    assert 16 <= before < 300

    finished = subprocess.run(command, capture_output=True, text=True, env=env, timeout=300)
    assert finished.returncode == 0, finished.stderr
    result = json.loads(finished.stdout)
    assert result["n_samples"] == 300 and result["resumed"] == before
    # nothing stored was paid for again; answers that came back before the kill but were not yet
    # committed come from the completion cache (written the moment they return), not from the model
    assert result["model_calls"] + result["cache_hits"] == 300 - before
    with sqlite3.connect(db) as conn:
        assert conn.execute("select count(*) from runs").fetchone()[0] == 1
        keys = [k for (k,) in conn.execute("select item_key from samples")]
        assert sorted(keys) == sorted(r["id"] for r in rows)
        assert conn.execute("select count(*) from grades").fetchone()[0] == 300


def test_graders_validate_and_run(tmp_path):
    path = tmp_path / "graders.json"
    path.write_text(json.dumps([{"type": "string_check", "name": "label", "input": "{{sample.output_text}}",
                                 "reference": "{{item.label}}", "operation": "ilike"}]))
    assert "ok  string_check  label" in invoke("graders", "validate", path).output
    ran = json.loads(invoke("graders", "run", path, "--item", '{"label": "card_arrival"}', "--sample",
                            "Card_Arrival", "--json").stdout)
    assert ran["reward"] == 1.0 and ran["metadata"]["errors"]["invalid_variable_error"] is False
    missing = invoke("graders", "run", path, "--item", "{}", "--sample", "x", "--json")
    assert missing.exit_code == 1  # a grader that errors fails the command, --json or not
    missing = json.loads(missing.stdout)
    assert missing["reward"] == 0.0 and missing["metadata"]["errors"]["invalid_variable_error"] is True


def test_graders_run_prints_one_row_per_grader_and_fails_on_an_error(tmp_path):
    path = tmp_path / "graders.json"
    path.write_text(json.dumps([
        {"type": "string_check", "name": "label", "input": "{{sample.output_text}}", "reference": "{{item.label}}",
         "operation": "ilike"},
        {"type": "python", "name": "crash", "source": "def grade(sample, item):\n    raise ValueError('boom')\n"}]))
    ran = invoke("graders", "run", path, "--item", '{"label": "card_arrival"}', "--sample", "Card_Arrival")
    assert ran.exit_code == 1
    lines = ran.output.splitlines()
    assert len(lines) < 12 and "{" not in ran.output  # a table, not the run response's JSON
    label = next(line for line in lines if "label" in line and "string_check" in line)
    assert "1.000" in label and "yes" in label
    crash = next(line for line in lines if "crash" in line)
    assert "python_grader_runtime_error" in crash and "no" in crash.split("python")[1]
    path.write_text(json.dumps(json.loads(path.read_text())[:1]))
    ok = invoke("graders", "run", path, "--item", '{"label": "x"}', "--sample", "y")
    assert ok.exit_code == 0 and "label" in ok.output and "0.000" in ok.output  # failing is not erroring
    path.write_text('{"type": "string_chek", "name": "x"}')
    bad = CliRunner().invoke(main, ["graders", "validate", str(path)])
    assert bad.exit_code == 1 and "did you mean 'string_check'" in bad.output


def test_serve_refuses_options_that_would_do_nothing(tmp_path):
    db = str(tmp_path / "f.db")
    for args, message in ((["--api", "--rate-burst", "5"], "--rate-burst needs --rate-limit"),
                          (["--rate-limit", "60"], "--rate-limit needs --api"),
                          (["--worker-processes"], "--worker-processes needs --api")):
        result = CliRunner().invoke(main, ["serve", *args, "--port", "0", "--db", db])
        assert result.exit_code == 2 and message in result.output, (args, result.output)
    assert not os.path.exists(db)  # refused before anything was opened


def test_an_eval_where_every_sample_errored_fails_with_the_first_error(tmp_path, tiny_spec):
    db = str(tmp_path / "f.db")
    judge = {"type": "score_model", "name": "judge", "model": "local:/nonexistent", "range": [0, 1],
             "pass_threshold": 0.5, "input": [{"role": "user", "content": "Score {{sample.output_text}}"}]}
    spec = yaml.safe_load(tiny_spec.read_text())
    spec["graders"] = [*spec["graders"], judge]
    tiny_spec.write_text(yaml.safe_dump(spec))
    result = CliRunner().invoke(main, ["eval", str(tiny_spec), "--split", "test", "--db", db])
    assert result.exit_code == 1, result.output
    last = result.output.strip().splitlines()[-1]
    assert last.startswith("error: ") and "grader 'judge' failed on every sample; the first, item " in last
    assert "/nonexistent" in last

    unreachable = ["eval", str(tiny_spec), "--split", "test", "--db", db, "--model", "openai:gpt-x",
                   "-s", "model_options={base_url: 'http://127.0.0.1:9/v1', api_key_env: HOME}", "-s", f"graders={[spec['graders'][0]]}"]
    result = CliRunner().invoke(main, unreachable)
    assert result.exit_code == 1, result.output
    assert "every sample failed; the first, item " in result.output.strip().splitlines()[-1]
    listed = CliRunner().invoke(main, ["runs", "list", "--db", db])
    assert listed.output.count("failed") == 2, listed.output


def test_user_text_reaches_the_terminal_escaped(tmp_path, tiny_model_dir):
    """Grader names, error texts and outputs are user text: no raw ESC/CSI/OSC byte reaches the
    operator's terminal through `flywheel eval` or `flywheel runs show`, and rich markup in them
    cannot open a style or a link."""
    import yaml

    write_jsonl(tmp_path / "data.jsonl", make_rows())
    spec = spec_dict(f"local:{tiny_model_dir}")
    evil = "\x1b]52;c;ZXZpbA==\x07\x1b[2J\x9b31m[link=http://x]"
    spec["graders"].append({"type": "python", "name": "evil",
                            "source": f"def grade(sample, item):\n    raise ValueError({evil!r})\n"})
    path = tmp_path / "eval.yaml"
    path.write_text(yaml.safe_dump(spec), encoding="utf-8")
    db = tmp_path / "cli.db"
    ran = invoke("eval", path, "--split", "test", "--db", db)
    assert "evil" in ran.output
    run_id = json.loads(invoke("runs", "list", "--db", db, "--json").stdout)[0]["id"]
    shown = invoke("runs", "show", run_id, "--db", db)
    assert "ValueError" in shown.output and "\\x1b]52" in shown.output
    for output in (ran.output, shown.output):
        assert not any(c in output for c in "\x1b\x07\x9b"), repr(output[:400])


HOSTILE = "\x1b]52;c;ZXZpbA==\x07\x1b[2J\x9b31m\u202e[link=http://x]"
RAW_CONTROL = "\x1b\x07\x9b\u202e"


def test_result_printers_and_cli_lines_escape_user_text(tmp_path, capsys):
    """Every printer of user text escapes control characters and rich markup: the optimize and
    wheel results, the captures table and the plain CLI lines (here `graders validate`)."""
    from types import SimpleNamespace as NS

    from flywheel.proxy.captures import print_captures
    from flywheel.report.console import print_optimize_result, print_wheel_result

    prompt = NS(demos=[], nearest=None)
    parent = NS(origin=HOSTILE, parent=None, prompt=prompt, minibatch=None, valid=None, test=None)
    child = NS(origin=HOSTILE, parent=parent, prompt=prompt, minibatch=None, valid=None, test=None)
    print_optimize_result(NS(run_id=HOSTILE, candidates=[parent, child], winner=child, rejected=[{"reason": HOSTILE}],
                             notes=[HOSTILE], reason=HOSTILE, valid_comparison={}, test_comparison={}, model_calls=1,
                             tokens=2, tokens_measured=1, wall_s=0.1))
    stage = NS(lap=1, stage=HOSTILE, valid=None, decision=HOSTILE, wall_s=1.0, reason=HOSTILE)
    print_wheel_result(NS(run_id=HOSTILE, stages=[stage], stopped=HOSTILE, milestones=[], minimise="cost", test=None,
                          lap_wall_s={1: 1.0}, model_calls=1, tokens=2, tokens_measured=1, cost=0.0, wall_s=1.0,
                          report_path=HOSTILE))
    row = {"id": HOSTILE, "created_at": HOSTILE, "model": HOSTILE, "status": HOSTILE, "latency_ms": 1.0,
           "prompt_tokens": 1, "completion_tokens": 1, "metadata": {HOSTILE: HOSTILE}, "input": HOSTILE,
           "output": HOSTILE, "error": None}
    print_captures([row, {**row, "error": HOSTILE}])
    printed = capsys.readouterr().out
    assert printed.count("\\x1b]52") >= 10, printed  # every hostile field was printed, escaped
    assert "[link=" in printed and not any(c in printed for c in RAW_CONTROL), repr(printed[:600])

    path = tmp_path / "graders.json"
    path.write_text(json.dumps([{"type": "string_check", "name": HOSTILE, "input": "{{sample.output_text}}",
                                 "reference": "x", "operation": "eq"}]))
    shown = invoke("graders", "validate", path).output
    assert "\\x1b]52" in shown and not any(c in shown for c in RAW_CONTROL), repr(shown)
