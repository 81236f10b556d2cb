"""Robustness: bad inputs through the real CLI, two writers at once, kill -9 mid-eval.

1. A corpus of bad inputs (eval specs, data files, CLI arguments, environment, damaged or foreign
   stores), each replayed through the real CLI (click's CliRunner, in process) against a copy of a
   store that already holds a finished eval. Each outcome is one of
     clean      exit 1 or 2, no traceback
     traceback  an exception escaped the CLI (a bug)
     silent     exit 0: the bad input was accepted
   and, independently, damaged: a row of the pre-existing store was lost or changed (or a foreign
   store file was written to).
2. Two-writer pairs: the same eval started twice on one store (`python -m flywheel eval`, real
   processes, a fresh file each): half start together (they race the first migrations and the
   run's creation), half start the second once the first has stored samples (it finds the first's
   running run and works on the same iteration).
   Counted: crashes (non-zero exit or a traceback), samples lost or duplicated.
3. kill -9 trials: a 60-item eval on the tiny model is SIGKILLed at a random moment, then the
   same command is run again. Counted: samples lost (fewer than 60, or generated work not
   committed) and duplicated; model calls paid twice.

The model is conftest.py's tiny Llama (SmolLM2's tokenizer, random 2-layer weights).

    PYTHONPATH=$PWD python benchmarks/robustness.py                 # everything (~5-10 min on 2 cores)
    PYTHONPATH=$PWD python benchmarks/robustness.py --pairs 4 --kills 4
    PYTHONPATH=$PWD python benchmarks/robustness.py --baseline /work/main   # corpus on other code too
    PYTHONPATH=$PWD python benchmarks/robustness.py --kill-tests 20         # the suite's kill tests under a CPU hog

`--kill-tests N` runs instead the suite's kill / resume tests (the wheel's, the evals', the
server's) N times each under a busy process per core (benchmarks/kill_tests_under_load.py).
"""

from __future__ import annotations

import argparse
import json
import os
import random
import shutil
import signal
import sqlite3
import subprocess
import sys
import tempfile
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Callable

import yaml

# benchmarks/graders.py would shadow the graders package: drop this folder from the import path.
sys.path[:] = [p for p in sys.path if Path(p or ".").resolve() != Path(__file__).resolve().parent]

LABELS = ["card_arrival", "pin_blocked", "exchange_rate"]
ENV = {**os.environ, "PYTHONUNBUFFERED": "1", "OMP_WAIT_POLICY": "PASSIVE"}
# Subprocesses run from a neutral folder, so `python -m flywheel` imports the code on PYTHONPATH,
# not a checkout that happens to be the current directory (what --baseline relies on).
NEUTRAL_CWD = tempfile.gettempdir()


# -- the tiny model and a valid eval --------------------------------------------------------------
def build_tiny_model(target: Path) -> Path:
    """conftest.py's tiny Llama: SmolLM2's tokenizer and chat template, random 2-layer weights."""
    if (target / "config.json").exists():
        return target
    import torch
    from transformers import AutoTokenizer, LlamaConfig, LlamaForCausalLM

    from flywheel.models.loading import materialise_embedded

    tokenizer = AutoTokenizer.from_pretrained(materialise_embedded("smollm2"))
    config = LlamaConfig(
        vocab_size=len(tokenizer), hidden_size=32, intermediate_size=64, num_hidden_layers=2,
        num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=4096,
        tie_word_embeddings=True, bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id)
    torch.manual_seed(0)
    target.mkdir(parents=True, exist_ok=True)
    LlamaForCausalLM(config).save_pretrained(target)
    tokenizer.save_pretrained(target)
    return target


def rows(n_per_split: int = 4) -> list[dict[str, Any]]:
    out = []
    for split in ("train", "valid", "test"):
        for i in range(n_per_split):
            label = LABELS[i % len(LABELS)]
            out.append({"id": f"{split}-{i}", "text": f"question {i} about {label}", "label": label, "split": split})
    return out


def jsonl(data: list[dict[str, Any]]) -> str:
    return "".join(json.dumps(r) + "\n" for r in data)


def spec(model: str, **changes: Any) -> dict[str, Any]:
    base = {
        "name": "tiny",
        "dataset": {"path": "data.jsonl", "id_field": "id"},
        "split": {"column": "split"},
        "input": [{"role": "system", "content": "Answer with one label: " + ", ".join(LABELS)},
                  {"role": "user", "content": "{{item.text}}"}],
        "model": model,
        "sampling": {"temperature": 0, "max_tokens": 6},
        "graders": [{"type": "string_check", "name": "label", "input": "{{sample.output_text}}",
                     "reference": "{{item.label}}", "operation": "ilike"}],
    }
    for key, value in changes.items():
        target = base
        *parents, last = key.split(".")
        for part in parents:
            target = target.setdefault(part, {})
        if value is DELETE:
            target.pop(last, None)
        else:
            target[last] = value
    return base


DELETE = object()
GRADER = {"type": "string_check", "name": "label", "input": "{{sample.output_text}}", "reference": "{{item.label}}",
          "operation": "ilike"}


# -- the corpus -------------------------------------------------------------------------------------
@dataclass
class Case:
    category: str
    name: str
    args: list[str]  # {dir}, {db}, {run}, {spec}, {tiny} are filled in
    files: dict[str, str | bytes] = field(default_factory=dict)
    env: dict[str, str] = field(default_factory=dict)
    db: Callable[[Path], None] | None = None  # turns the case's store copy into a bad store
    hold_lock: bool = False

    def with_args(self, args: list[str]) -> "Case":
        self.args = args
        return self


def yaml_text(data: Any) -> str:
    return yaml.safe_dump(data, allow_unicode=True)


def spec_case(name: str, text: str | bytes | dict, data: str | bytes | None = None, data_name: str = "data.jsonl",
              extra: list[str] | None = None) -> Case:
    files: dict[str, str | bytes] = {"eval.yaml": text if isinstance(text, (str, bytes)) else yaml_text(text)}
    files[data_name] = data if data is not None else jsonl(rows())
    return Case("spec", name, ["eval", "{dir}/eval.yaml", "--db", "{db}", *(extra or [])], files)


def data_case(name: str, data: str | bytes, fmt: str = "jsonl", **dataset: Any) -> Case:
    changes: dict[str, Any] = {"dataset": {"path": f"data.{fmt}", **dataset}}
    if fmt == "csv" or "id_field" not in dataset and fmt != "jsonl":
        changes["split"] = {"ratios": {"test": 1.0}}
    case = spec_case(name, spec("local:{tiny}", **changes), data, f"data.{fmt}")
    case.category = "data"
    return case


def corpus() -> list[Case]:
    tiny = "local:{tiny}"
    cases: list[Case] = []
    # Eval specs.
    good = spec(tiny)
    cases += [
        spec_case("not UTF-8", yaml_text(good).encode() + b"description: caf\xe9\n"),
        spec_case("lone surrogate", yaml_text(good) + 'description: "x \\ud800"\n'),
        spec_case("malformed YAML", "name: [unclosed\n"),
        spec_case("tab indentation", "name: x\ndataset:\n\tpath: data.jsonl\n"),
        spec_case("top level is a list", "- name: x\n"),
        spec_case("empty file", ""),
        spec_case("deeply nested YAML", "a: " + "[" * 5000 + "]" * 5000 + "\n"),
        spec_case("missing name", spec(tiny, name=DELETE)),
        spec_case("missing dataset", spec(tiny, dataset=DELETE)),
        spec_case("missing input", spec(tiny, input=DELETE)),
        spec_case("missing graders", spec(tiny, graders=DELETE)),
        spec_case("unknown top-level field", spec(tiny, colour="blue")),
        spec_case("name is a list", spec(tiny, name=[1, 2])),
        spec_case("unknown grader type", spec(tiny, graders=[{**GRADER, "type": "string_chek"}])),
        spec_case("grader missing reference", spec(tiny, graders=[{k: v for k, v in GRADER.items() if k != "reference"}])),
        spec_case("string_check bad operation", spec(tiny, graders=[{**GRADER, "operation": "regex"}])),
        spec_case("text_similarity bad metric", spec(tiny, graders=[{"type": "text_similarity", "name": "s",
                  "input": "{{sample.output_text}}", "reference": "{{item.label}}", "evaluation_metric": "bleurt"}])),
        spec_case("duplicate grader names", spec(tiny, graders=[GRADER, GRADER])),
        spec_case("objective names no grader", spec(tiny, objective={"grader": "nope"})),
        spec_case("graders not a list", spec(tiny, graders=GRADER)),
        spec_case("python grader without grade()", spec(tiny, graders=[{"type": "python", "name": "p",
                  "source": "def score(sample, item):\n    return 1.0\n"}])),
        spec_case("python grader syntax error", spec(tiny, graders=[{"type": "python", "name": "p",
                  "source": "def grade(sample, item)\n    return 1\n"}])),
        spec_case("multi grader bad formula", spec(tiny, graders=[{"type": "multi", "name": "m",
                  "graders": {"a": GRADER}, "calculate_output": "a +* 2"}])),
        spec_case("multi grader unknown variable", spec(tiny, graders=[{"type": "multi", "name": "m",
                  "graders": {"a": GRADER}, "calculate_output": "a + b"}])),
        spec_case("split ratios NaN", spec(tiny, split={"ratios": {"train": float("nan"), "test": 1.0}})),
        spec_case("split ratios inf", spec(tiny, split={"ratios": {"train": float("inf")}})),
        spec_case("split ratios negative", spec(tiny, split={"ratios": {"train": -0.5, "test": 1.5}})),
        spec_case("split ratios sum 0.5", spec(tiny, split={"ratios": {"train": 0.25, "test": 0.25}})),
        spec_case("split ratios unknown split", spec(tiny, split={"ratios": {"dev": 1.0}})),
        spec_case("temperature -1", spec(tiny, **{"sampling.temperature": -1})),
        spec_case("temperature NaN", spec(tiny, **{"sampling.temperature": float("nan")})),
        spec_case("max_tokens 0", spec(tiny, **{"sampling.max_tokens": 0})),
        spec_case("max_tokens 10^12", spec(tiny, **{"sampling.max_tokens": 10**12})),
        spec_case("repeats 0", spec(tiny, **{"sampling.repeats": 0})),
        spec_case("top_p 0", spec(tiny, **{"sampling.top_p": 0})),
        spec_case("input role robot", spec(tiny, input=[{"role": "robot", "content": "x"}])),
        spec_case("input empty", spec(tiny, input=[])),
        spec_case("input template {{foo.x}}", spec(tiny, input=[{"role": "user", "content": "{{foo.x}}"}])),
        spec_case("input template {{sample.output_text}}",
                  spec(tiny, input=[{"role": "user", "content": "{{sample.output_text}}"}])),
        spec_case("input template {{item..x}}", spec(tiny, input=[{"role": "user", "content": "{{item..x}}"}])),
        spec_case("input template missing field", spec(tiny, input=[{"role": "user", "content": "{{item.nope}}"}])),
        spec_case("model without scheme", spec("gpt5")),
        spec_case("model local:/etc", spec("local:/etc")),
        spec_case("model local:/nonexistent", spec("local:/nonexistent")),
        spec_case("model local:<a file>", spec("local:{dir}/data.jsonl")),
        spec_case("dtype int3", spec(tiny, model_options={"dtype": "int3"})),
        spec_case("batch_size 0", spec(tiny, model_options={"batch_size": 0})),
        spec_case("unknown local option", spec(tiny, model_options={"batch_sise": 4})),
        spec_case("openai base_url not a url", spec("openai:x", model_options={"base_url": "not a url"})),
        spec_case("openai base_url a number", spec("openai:x", model_options={"base_url": 8000})),
        spec_case("openai without a key", spec("openai:gpt-4o-mini", model_options={"api_key_env": "FW_NO_SUCH_KEY"})),
        spec_case("openai concurrency 0", spec("openai:x", model_options={"concurrency": 0})),
        spec_case("dataset file missing", spec(tiny, dataset={"path": "nope.jsonl"})),
        spec_case("dataset path is a folder", spec(tiny, dataset={"path": "."})),
        spec_case("dataset format xml", spec(tiny, dataset={"path": "data.jsonl", "format": "xml"})),
        spec_case("dataset column mapped but absent", spec(tiny, dataset={"path": "data.jsonl",
                  "columns": {"text": "text", "label": "category"}})),
        spec_case("response_format a string", spec(tiny, response_format="json")),
        spec_case("spec file missing", "x").with_args(["eval", "{dir}/missing.yaml", "--db", "{db}"]),
        spec_case("spec path is a folder", "x").with_args(["eval", "{dir}", "--db", "{db}"]),
    ]
    # Data files.
    row = {"id": "a", "text": "t", "label": "l", "split": "test"}
    cases += [
        data_case("JSONL invalid line", jsonl(rows()) + '{"id": "z", "text": \n', id_field="id"),
        data_case("JSONL truncated last line", jsonl(rows()) + '{"id": "z", "te', id_field="id"),
        data_case("JSONL array row", jsonl(rows()) + "[1, 2]\n", id_field="id"),
        data_case("JSONL null row", "null\n", id_field="id"),
        data_case("JSONL empty", "", id_field="id"),
        data_case("JSONL blank lines only", "\n \n\t\n", id_field="id"),
        data_case("JSONL not UTF-8", jsonl(rows()).encode() + b'{"id": "\xff"}\n', id_field="id"),
        data_case("JSONL raw control char", '{"id": "a", "text": "x\x01y", "label": "l", "split": "test"}\n',
                  id_field="id"),
        data_case("JSONL id null", jsonl([{**row, "id": None}]), id_field="id"),
        data_case("JSONL id object", jsonl([{**row, "id": {"a": 1}}]), id_field="id"),
        data_case("JSONL id list", jsonl([{**row, "id": [1]}]), id_field="id"),
        data_case("JSONL id float", jsonl([{**row, "id": 1.5}]), id_field="id"),
        data_case("JSONL id bool", jsonl([{**row, "id": True}]), id_field="id"),
        data_case("JSONL duplicate ids", jsonl([row, row]), id_field="id"),
        data_case("JSONL id missing", jsonl([{k: v for k, v in row.items() if k != "id"}]), id_field="id"),
        data_case("JSONL split value dev", jsonl([{**row, "split": "dev"}]), id_field="id"),
        data_case("JSONL split missing", jsonl([{k: v for k, v in row.items() if k != "split"}]), id_field="id"),
        data_case("JSONL lone surrogate escape", '{"id": "a", "text": "x\\ud800", "label": "l", "split": "test"}\n',
                  id_field="id"),
        data_case("JSONL nested 100k deep", '{"id": "a", "text": ' + "[" * 100000 + "]" * 100000 +
                  ', "label": "l", "split": "test"}\n', id_field="id"),
        data_case("JSONL 5000-digit integer", '{"id": "a", "text": ' + "9" * 5000 +
                  ', "label": "l", "split": "test"}\n', id_field="id"),
        data_case("JSONL template field absent", jsonl([{"id": "a", "label": "l", "split": "test"}]), id_field="id"),
        data_case("CSV unterminated quote", 'text,label\n"never closed,x\nb,y\n', "csv"),
        data_case("CSV text after quote", 'text,label\n"a"b,x\n', "csv"),
        data_case("CSV duplicate header", "text,label,text\na,b,c\n", "csv"),
        data_case("CSV empty header name", "text,,label\na,b,c\n", "csv"),
        data_case("CSV fewer values", "text,label\na,b\nc\n", "csv"),
        data_case("CSV more values", "text,label\na,b,c\n", "csv"),
        data_case("CSV empty file", "", "csv"),
        data_case("CSV header only", "text,label\n", "csv"),
        data_case("CSV not UTF-8", b"text,label\ncaf\xe9,x\n", "csv"),
        data_case("CSV template column absent", "words,label\na,b\n", "csv"),
    ]
    # CLI arguments and environment.
    def arg_case(name: str, args: list[str], env: dict[str, str] | None = None, files: dict | None = None) -> Case:
        base_files: dict[str, str | bytes] = {"eval.yaml": yaml_text(spec(tiny)), "data.jsonl": jsonl(rows())}
        return Case("cli", name, args, {**base_files, **(files or {})}, env or {})

    graders_file = {"g.json": json.dumps(GRADER)}
    cases += [
        arg_case("-s name=[1", ["eval", "{spec}", "--db", "{db}", "-s", "name=[1"]),
        arg_case("-s without =", ["eval", "{spec}", "--db", "{db}", "-s", "novalue"]),
        arg_case("-s empty key", ["eval", "{spec}", "--db", "{db}", "-s", "=3"]),
        arg_case("-s through a scalar", ["eval", "{spec}", "--db", "{db}", "-s", "name.x=1"]),
        arg_case("-s max_tokens=abc", ["eval", "{spec}", "--db", "{db}", "-s", "sampling.max_tokens=abc"]),
        arg_case("-s lone surrogate", ["eval", "{spec}", "--db", "{db}", "-s", 'name="\\ud800"']),
        arg_case("--split dev", ["eval", "{spec}", "--db", "{db}", "--split", "dev"]),
        arg_case("--limit 0", ["eval", "{spec}", "--db", "{db}", "--limit", "0"]),
        arg_case("--limit abc", ["eval", "{spec}", "--db", "{db}", "--limit", "abc"]),
        arg_case("--max-errors -1", ["eval", "{spec}", "--db", "{db}", "--max-errors", "-1"]),
        arg_case("--model gpt5", ["eval", "{spec}", "--db", "{db}", "--model", "gpt5"]),
        arg_case("--model local:/etc", ["eval", "{spec}", "--db", "{db}", "--model", "local:/etc"]),
        arg_case("--model local:", ["eval", "{spec}", "--db", "{db}", "--model", "local:"]),
        arg_case("--db in a missing folder", ["eval", "{spec}", "--db", "{dir}/no/x.db"]),
        arg_case("--db is a folder", ["eval", "{spec}", "--db", "{dir}"]),
        arg_case("report -o into a missing folder", ["report", "{run}", "--db", "{db}", "-o", "{dir}/no/r.html"]),
        arg_case("report -o is a folder", ["report", "{run}", "--db", "{db}", "-o", "{dir}"]),
        arg_case("report unknown run", ["report", "run-nope", "--db", "{db}", "-o", "{dir}/r.html"]),
        arg_case("runs show unknown run", ["runs", "show", "run-nope", "--db", "{db}"]),
        arg_case("runs list --limit 0", ["runs", "list", "--db", "{db}", "--limit", "0"]),
        arg_case("graders run --item [1]", ["graders", "run", "{dir}/g.json", "--item", "[1]", "--sample", "x"],
                 files=graders_file),
        arg_case("graders run --item null", ["graders", "run", "{dir}/g.json", "--item", "null", "--sample", "x"],
                 files=graders_file),
        arg_case("graders run --item not JSON", ["graders", "run", "{dir}/g.json", "--item", "{x", "--sample", "x"],
                 files=graders_file),
        arg_case("graders validate missing file", ["graders", "validate", "{dir}/nope.json"]),
        arg_case("graders validate not JSON", ["graders", "validate", "{dir}/g.json"], files={"g.json": "{oops"}),
        arg_case("graders validate unknown type", ["graders", "validate", "{dir}/g.json"],
                 files={"g.json": json.dumps({**GRADER, "type": "exact"})}),
        arg_case("graders validate python without grade()", ["graders", "validate", "{dir}/g.json"],
                 files={"g.json": json.dumps({"type": "python", "name": "p", "source": "x = 1\n"})}),
        arg_case("graders validate not UTF-8", ["graders", "validate", "{dir}/g.json"], files={"g.json": b"\xff\xfe{"}),
        arg_case("run without spec or --resume", ["run", "--db", "{db}"]),
        arg_case("run --resume unknown", ["run", "--resume", "run-nope", "--db", "{db}"]),
        arg_case("run spec missing", ["run", "{dir}/nope.yaml", "--db", "{db}"]),
        arg_case("run spec unknown stage", ["run", "{dir}/run.yaml", "--db", "{db}"],
                 files={"run.yaml": yaml_text({"eval": "eval.yaml", "stages": [{"stage": "magic"}]})}),
        arg_case("run spec eval missing", ["run", "{dir}/run.yaml", "--db", "{db}"],
                 files={"run.yaml": yaml_text({"eval": "nope.yaml", "stages": [{"stage": "optimize"}]})}),
        arg_case("run spec no stages", ["run", "{dir}/run.yaml", "--db", "{db}"],
                 files={"run.yaml": yaml_text({"eval": "eval.yaml", "stages": []})}),
        arg_case("proxy --upstream without scheme", ["proxy", "--upstream", "localhost:8000", "--db", "{db}"]),
        arg_case("proxy --port 99999", ["proxy", "--upstream", "http://127.0.0.1:9/v1", "--port", "99999"]),
        arg_case("captures export -o into a missing folder", ["captures", "export", "-o", "{dir}/no/x.jsonl",
                                                              "--db", "{db}"]),
        arg_case("captures list --metadata without =", ["captures", "list", "--metadata", "novalue", "--db", "{db}"]),
        arg_case("FLYWHEEL_DB_TIMEOUT=abc", ["runs", "list", "--db", "{db}"], env={"FLYWHEEL_DB_TIMEOUT": "abc"}),
        arg_case("FLYWHEEL_DB_TIMEOUT=nan", ["runs", "list", "--db", "{db}"], env={"FLYWHEEL_DB_TIMEOUT": "nan"}),
        arg_case("FLYWHEEL_COMMIT_EVERY_S=-1", ["eval", "{spec}", "--db", "{db}"],
                 env={"FLYWHEEL_COMMIT_EVERY_S": "-1"}),
        arg_case("unknown command", ["evaluate", "{spec}"]),
    ]
    # Stores.
    def db_case(name: str, damage: Callable[[Path], None], args: list[str] | None = None) -> Case:
        return Case("db", name, args or ["runs", "list", "--db", "{db}"],
                    {"eval.yaml": yaml_text(spec(tiny)), "data.jsonl": jsonl(rows())}, db=damage)

    def sql(*statements: str) -> Callable[[Path], None]:
        def damage(path: Path) -> None:
            with sqlite3.connect(path) as conn:
                for statement in statements:
                    conn.execute(statement)
            conn.close()
        return damage

    def junk(path: Path) -> None:
        path.write_bytes(b"this is not sqlite" * 100)

    def truncate(path: Path) -> None:
        data = path.read_bytes()
        path.write_bytes(data[: len(data) // 2])

    def folder(path: Path) -> None:
        path.unlink()
        path.mkdir()

    eval_args = ["eval", "{spec}", "--db", "{db}"]
    cases += [
        db_case("not a database", junk), db_case("not a database (eval)", junk, eval_args),
        db_case("truncated file", truncate), db_case("truncated file (eval)", truncate, eval_args),
        db_case("user_version 99", sql("pragma user_version = 99")),
        db_case("user_version 99 (eval)", sql("pragma user_version = 99"), eval_args),
        db_case("unknown migration", sql("insert into _migrations values ('m999_future', 'x')")),
        db_case("unknown migration (eval)", sql("insert into _migrations values ('m999_future', 'x')"), eval_args),
        db_case("table grades missing", sql("drop table grades")),
        db_case("table grades missing (eval)", sql("drop table grades"), eval_args),
        db_case("table runs missing", sql("drop table runs")),
        db_case("column samples.error missing (eval)", sql("alter table samples drop column error"), eval_args),
        db_case("_migrations missing", sql("drop table _migrations")),
        db_case("database is a folder", folder),
        Case("db", "write lock held > timeout (eval)", eval_args,
             {"eval.yaml": yaml_text(spec(tiny)), "data.jsonl": jsonl(rows())}, {"FLYWHEEL_DB_TIMEOUT": "1"},
             hold_lock=True),
    ]
    return cases


# -- replaying the corpus ---------------------------------------------------------------------------
def snapshot(path: Path) -> set[tuple[str, str]]:
    """Every row of every table, as (table, JSON of the row)."""
    rows_seen = set()
    with sqlite3.connect(path) as conn:
        tables = [t for (t,) in conn.execute("select name from sqlite_master where type = 'table'")]
        for table in tables:
            for row in conn.execute(f"select * from [{table}]"):
                rows_seen.add((table, json.dumps(row, default=str)))
    conn.close()
    return rows_seen


def file_state(path: Path) -> tuple[bytes, bytes]:
    """The store file's bytes and its WAL's (an absent WAL and an empty one are the same: no write)."""
    wal = Path(f"{path}-wal")
    return (path.read_bytes() if path.is_file() else b"<absent>", wal.read_bytes() if wal.is_file() else b"")


def replay(work: Path, tiny: Path) -> list[dict[str, Any]]:
    """Run every case; return one result row per case."""
    from click.testing import CliRunner

    from flywheel.cli import main

    base_dir = work / "base"
    base_dir.mkdir(parents=True)
    (base_dir / "data.jsonl").write_text(jsonl(rows()))
    (base_dir / "eval.yaml").write_text(yaml_text(spec(f"local:{tiny}")))
    base_db = base_dir / "base.db"
    made = CliRunner().invoke(main, ["eval", str(base_dir / "eval.yaml"), "--db", str(base_db), "--json"])
    if made.exit_code != 0:
        raise SystemExit(f"the base eval failed: {made.output[-2000:]} {made.exception!r}")
    run_id = json.loads(made.stdout)["run_id"]
    with sqlite3.connect(base_db) as conn:
        conn.execute("pragma wal_checkpoint(truncate)")
    conn.close()
    before = snapshot(base_db)

    results = []
    for index, case in enumerate(corpus()):
        folder = work / f"case{index:03d}"
        folder.mkdir()
        db = folder / "store.db"
        shutil.copy(base_db, db)
        for name, content in case.files.items():
            text = content.replace("{tiny}", str(tiny)).replace("{dir}", str(folder)) if isinstance(content, str) \
                else content
            (folder / name).write_bytes(text.encode("utf-8", "surrogatepass") if isinstance(text, str) else text)
        if case.db:
            case.db(db)
        foreign = file_state(db) if case.db else None
        args = [a.replace("{dir}", str(folder)).replace("{db}", str(db)).replace("{run}", run_id)
                 .replace("{spec}", str(folder / "eval.yaml")).replace("{tiny}", str(tiny)) for a in case.args]
        holder = None
        if case.hold_lock:
            holder = subprocess.Popen([sys.executable, "-c", "import sqlite3,sys,time; c=sqlite3.connect(sys.argv[1]); "
                                       "c.execute('begin immediate'); print('locked', flush=True); time.sleep(120)",
                                       str(db)], stdout=subprocess.PIPE, text=True)
            holder.stdout.readline()
        started = time.perf_counter()
        try:
            result = CliRunner().invoke(main, args, env=case.env)
        finally:
            if holder:
                holder.kill()
                holder.wait()
        seconds = time.perf_counter() - started
        escaped = result.exception is not None and not isinstance(result.exception, SystemExit)
        output = result.output or ""
        if escaped or "Traceback" in output:
            outcome = "traceback"
        elif result.exit_code == 0:
            outcome = "silent"
        else:
            outcome = "clean"
        if case.db:
            damaged = file_state(db) != foreign
        else:
            damaged = not before <= snapshot(db) if db.is_file() else True
        first = next((line for line in output.splitlines() if line.strip().lower().startswith("error")), "")
        if escaped:
            first = f"{type(result.exception).__name__}: {str(result.exception)[:200]}"
        results.append({"category": case.category, "name": case.name, "outcome": outcome, "damaged": damaged,
                        "exit": result.exit_code, "message": first[:240], "seconds": round(seconds, 2)})
    return results


# -- two writers, kill -9 -----------------------------------------------------------------------------
def many_items(folder: Path, tiny: Path, n: int, **options: Any) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    data = [{"id": f"i{k}", "text": f"item number {k}", "label": "x", "split": "test"} for k in range(n)]
    (folder / "data.jsonl").write_text(jsonl(data))
    body = spec(f"local:{tiny}", model_options=options)
    body["sampling"]["max_tokens"] = 12
    (folder / "eval.yaml").write_text(yaml_text(body))
    return folder / "eval.yaml"


PAIR_ITEMS = 200  # batch 2: long enough on the tiny model for the two processes to overlap


def two_writers(work: Path, tiny: Path, pairs: int) -> dict[str, Any]:
    crashes, lost, duplicated, shared, messages = 0, 0, 0, 0, []
    for trial in range(pairs):
        folder = work / f"pair{trial:02d}"
        path = many_items(folder, tiny, PAIR_ITEMS, batch_size=2)
        db = folder / "pair.db"
        command = [sys.executable, "-m", "flywheel", "eval", str(path), "--db", str(db), "--json"]
        procs = [subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=ENV,
                                  cwd=NEUTRAL_CWD)]
        if trial % 2:
            # The second starts once the first has stored samples: it finds the first's running run
            # (the case that ended in an IntegrityError traceback).
            deadline = time.monotonic() + 300
            while time.monotonic() < deadline and procs[0].poll() is None:
                try:
                    with sqlite3.connect(db, timeout=1) as conn:
                        if conn.execute("select count(*) from samples").fetchone()[0] >= 4:
                            break
                except sqlite3.Error:
                    pass
                time.sleep(0.01)
        procs.append(subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=ENV,
                                      cwd=NEUTRAL_CWD))
        for proc in procs:
            out, err = proc.communicate(timeout=600)
            if proc.returncode != 0 or "Traceback" in err:
                crashes += 1
                messages.append(err.strip().splitlines()[-1] if err.strip() else f"exit {proc.returncode}")
        with sqlite3.connect(db) as conn:
            groups = conn.execute("select iteration_id, count(*), count(distinct item_key) from samples"
                                  " group by iteration_id").fetchall()
        conn.close()
        shared += len(groups) == 1  # both worked on one iteration
        lost += sum(PAIR_ITEMS - distinct for _, _, distinct in groups) if groups else PAIR_ITEMS
        duplicated += sum(n - distinct for _, n, distinct in groups)
    return {"pairs": pairs, "crashes": crashes, "lost": lost, "duplicated": duplicated, "shared": shared,
            "messages": messages[:5]}


def kill_trials(work: Path, tiny: Path, trials: int, seed: int = 0) -> dict[str, Any]:
    rng = random.Random(seed)
    path = many_items(work / "kill", tiny, 60)
    command = [sys.executable, "-m", "flywheel", "eval", str(path), "--json"]
    # A reference run, never interrupted, for the outputs.
    reference_db = work / "kill" / "reference.db"
    subprocess.run(command + ["--db", str(reference_db)], env=ENV, capture_output=True, check=True, cwd=NEUTRAL_CWD)
    with sqlite3.connect(reference_db) as conn:
        reference = dict(conn.execute("select item_key, output_text from samples"))
    conn.close()
    env = {**ENV, "FLYWHEEL_COMMIT_EVERY_S": "0.05"}
    lost = duplicated = paid_twice = killed_mid = different = 0
    stored_at_kill = []
    for trial in range(trials):
        db = work / "kill" / f"trial{trial:02d}.db"
        proc = subprocess.Popen(command + ["--db", str(db)], stdout=subprocess.PIPE, stderr=subprocess.PIPE, env=env,
                                cwd=NEUTRAL_CWD)
        target = rng.randint(1, 59)  # kill once this many samples are stored (or earlier, while loading)
        deadline = time.monotonic() + 120
        while proc.poll() is None and time.monotonic() < deadline:
            try:
                with sqlite3.connect(db, timeout=1) as conn:
                    if conn.execute("select count(*) from samples").fetchone()[0] >= target:
                        break
            except sqlite3.Error:
                pass
            time.sleep(0.002)
        proc.send_signal(signal.SIGKILL)
        proc.wait()
        with sqlite3.connect(db) as conn:
            before = conn.execute("select count(*) from samples").fetchone()[0]
        conn.close()
        stored_at_kill.append(before)
        killed_mid += 0 < before < 60
        done = subprocess.run(command + ["--db", str(db)], env=env, capture_output=True, text=True, timeout=600,
                              cwd=NEUTRAL_CWD)
        result = json.loads(done.stdout) if done.returncode == 0 else {}
        # Per iteration: a kill that lands after the run was marked completed makes the rerun a new
        # run (answered from the cache), which is a second iteration, not a duplicate.
        with sqlite3.connect(db) as conn:
            groups = conn.execute("select iteration_id, count(*), count(distinct item_key) from samples"
                                  " group by iteration_id").fetchall()
            iteration = result.get("iteration_id") or (groups[-1][0] if groups else "")
            outputs = dict(conn.execute("select item_key, output_text from samples where iteration_id = ?",
                                        [iteration]))
        conn.close()
        lost += 60 - len(outputs)
        duplicated += sum(n - distinct for _, n, distinct in groups)
        paid_twice += max(0, result.get("model_calls", 60) - (60 - before))
        different += sum(outputs.get(k) != v for k, v in reference.items())
    return {"trials": trials, "killed_mid_eval": killed_mid, "stored_at_kill": stored_at_kill, "lost": lost,
            "duplicated": duplicated, "paid_twice": paid_twice, "outputs_differing_from_reference": different}


# -- main ---------------------------------------------------------------------------------------------
def summary_table(results: list[dict[str, Any]]) -> str:
    lines = ["| category | cases | clean | traceback | silent | damaged |", "|---|---|---|---|---|---|"]
    for category in sorted({r["category"] for r in results}) + ["all"]:
        chosen = [r for r in results if category in ("all", r["category"])]
        count = {k: sum(r["outcome"] == k for r in chosen) for k in ("clean", "traceback", "silent")}
        lines.append(f"| {category} | {len(chosen)} | {count['clean']} | {count['traceback']} | {count['silent']} | "
                     f"{sum(r['damaged'] for r in chosen)} |")
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--pairs", type=int, default=20)
    parser.add_argument("--kills", type=int, default=20)
    parser.add_argument("--baseline", default=None, help="Another checkout: replay the corpus on its code too.")
    parser.add_argument("--corpus-only", action="store_true", help="Replay the corpus only and print JSON.")
    parser.add_argument("--tiny", default=None, help="Folder of the tiny model (built when missing).")
    parser.add_argument("--verbose", action="store_true", help="List every case.")
    parser.add_argument("--kill-tests", type=int, default=None, metavar="N",
                        help="Run the suite's kill / resume tests N times each under a CPU hog, and only that.")
    args = parser.parse_args()
    if args.kill_tests is not None:
        sys.argv = [sys.argv[0], "--runs", str(args.kill_tests)]
        sys.path.insert(0, str(Path(__file__).resolve().parent))
        from kill_tests_under_load import main as kill_tests

        kill_tests()
        return

    with tempfile.TemporaryDirectory(prefix="fw-robust-") as tmp:
        work = Path(tmp)
        tiny = build_tiny_model(Path(args.tiny) if args.tiny else work / "tiny")
        if args.corpus_only:
            print(json.dumps(replay(work / "corpus", tiny)))
            return
        (work / "corpus").mkdir()
        started = time.perf_counter()
        results = replay(work / "corpus", tiny)
        corpus_s = time.perf_counter() - started
        print(f"## Bad inputs through the CLI ({len(results)} cases, {corpus_s:.0f} s)\n")
        print(summary_table(results))
        if args.baseline:
            env = {**ENV, "PYTHONPATH": args.baseline}
            done = subprocess.run([sys.executable, __file__, "--corpus-only", "--tiny", str(tiny)], env=env,
                                  capture_output=True, text=True, cwd=args.baseline)
            try:
                baseline = json.loads(done.stdout.strip().splitlines()[-1])
            except (IndexError, ValueError):
                print(f"\nbaseline failed: {done.stderr[-2000:]}")
            else:
                print(f"\nBaseline ({args.baseline}):\n")
                print(summary_table(baseline))
                worse = {r["name"] for r in baseline if r["outcome"] != "clean" or r["damaged"]}
                print("\nBaseline not clean: " + "; ".join(f"{r['name']} ({r['outcome']})"
                                                           for r in baseline if r["name"] in worse))
        bad = [r for r in results if r["outcome"] != "clean" or r["damaged"]]
        for r in (results if args.verbose else bad):
            print(f"- [{r['category']}] {r['name']}: {r['outcome']}{' DAMAGED' if r['damaged'] else ''}, "
                  f"exit {r['exit']}: {r['message']}")
        if args.pairs:
            started = time.perf_counter()
            pairs = two_writers(work / "pairs", tiny, args.pairs)
            print(f"\n## Two writers, same eval, same store ({time.perf_counter() - started:.0f} s)\n")
            print("| pairs | crashes | samples lost | samples duplicated | pairs that shared one run |")
            print("|---|---|---|---|---|")
            print(f"| {pairs['pairs']} | {pairs['crashes']} | {pairs['lost']} | {pairs['duplicated']} | "
                  f"{pairs['shared']} |")
            for message in pairs["messages"]:
                print(f"- {message}")
        if args.kills:
            started = time.perf_counter()
            kills = kill_trials(work / "kills", tiny, args.kills)
            print(f"\n## kill -9 during a 60-item eval, then the same command ({time.perf_counter() - started:.0f} s)\n")
            print("| trials | killed mid-eval | lost | duplicated | model calls paid twice | outputs != uninterrupted |")
            print("|---|---|---|---|---|---|")
            print(f"| {kills['trials']} | {kills['killed_mid_eval']} | {kills['lost']} | {kills['duplicated']} | "
                  f"{kills['paid_twice']} | {kills['outputs_differing_from_reference']} |")
            print(f"\nsamples stored at the kill: {kills['stored_at_kill']}")
        print(f"\nload average: {os.getloadavg()[0]:.2f} {os.getloadavg()[1]:.2f} {os.getloadavg()[2]:.2f}")


if __name__ == "__main__":
    main()
