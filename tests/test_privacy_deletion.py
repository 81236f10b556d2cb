"""Capture -> redact -> export -> SFT training set, and deletion of every copy with lineage.

Real store files, the real CLI, real Presidio; the database files and the artefact folders are
searched byte for byte after a deletion.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from click.testing import CliRunner

from flywheel.cli import main
from flywheel.privacy.lineage import row_hash
from flywheel.store import Store
from flywheel.train.formats import load_training_file
from flywheel.train.sets import load_training_set, record_training_set

pytest.importorskip("presidio_analyzer")

EMAILS = {"u1": "zoe.zebra@example.org", "u2": "gil.giraffe@example.net"}
MARKERS = {"u1": "zebra7781", "u2": "giraffe4410"}


def capture(user: str, n: int, day: str) -> dict:
    question = f"Hi, I am {MARKERS[user]} case {n}; mail {EMAILS[user]} or call +44 20 7946 0{n}18"
    request = {"model": "gpt-4o-mini", "messages": [{"role": "user", "content": question}], "metadata": {"user": user}}
    response = {"id": f"c{n}", "object": "chat.completion", "model": "gpt-4o-mini",
                "choices": [{"index": 0, "message": {"role": "assistant", "content": f"Sent to {EMAILS[user]}."},
                             "finish_reason": "stop"}]}
    return {"created_at": f"{day}T10:00:0{n}.000+00:00", "endpoint": "/v1/chat/completions", "upstream": "http://up/v1",
            "model": "gpt-4o-mini", "stream": 0, "status": 200, "latency_s": 0.1,
            "metadata_json": json.dumps({"user": user}), "request_json": json.dumps(request),
            "response_json": json.dumps(response), "error": None}


@pytest.fixture
def db(tmp_path) -> str:
    path = tmp_path / "flywheel.db"
    store = Store.open(path)
    store.insert_captures([capture("u1", 1, "2026-11-01"), capture("u2", 2, "2026-11-02"),
                           capture("u1", 3, "2026-11-03")])
    store.close()
    return str(path)


def run(*args: str) -> str:
    result = CliRunner().invoke(main, list(args))
    assert result.exit_code == 0, result.output
    return result.output


def every_byte(root: Path) -> bytes:
    return b"".join(p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file())


def test_capture_redact_export_sft_set_keeps_no_raw_email(db, tmp_path):
    out = tmp_path / "export.jsonl"
    summary = json.loads(run("captures", "export", "-o", str(out), "--record-set", "--db", db, "--json"))
    assert summary["written"] == 3 and summary["redaction"]["entities"]["EMAIL_ADDRESS"] == 6
    # the training path: `flywheel train sft --data export.jsonl` loads and records the file as a set
    store = Store.open(db)
    recorded = record_training_set(store, load_training_file("sft", out))
    set_row = store.get_training_set(summary["training_set_id"])
    store.close()
    assert recorded.id == summary["training_set_id"]  # the same rows: the same set
    files = out.read_bytes() + every_byte(tmp_path / ".flywheel")
    for email in EMAILS.values():
        assert email.encode() not in files
    assert b"<EMAIL_ADDRESS_1>" in files and b"zebra7781" in files  # the rest of the text is kept
    rows = [json.loads(line) for line in out.read_text().splitlines()]
    assert rows[0]["messages"][1]["content"] == "Sent to <EMAIL_ADDRESS_1>."  # same pseudonym in the reply
    redaction = json.loads(set_row["redaction_json"])
    assert redaction["policy"]["operator"] == "replace" and redaction["entities"]["PHONE_NUMBER"] == 3
    raw = json.loads(run("captures", "export", "-o", str(tmp_path / "raw.jsonl"), "--redact", "none", "--db", db,
                         "--json"))
    assert raw["redaction"] is None and EMAILS["u1"] in (tmp_path / "raw.jsonl").read_text()


def test_delete_removes_every_copy_and_marks_checkpoints(db, tmp_path):
    run("captures", "export", "-o", str(tmp_path / "all.jsonl"), "--record-set", "--db", db)
    run("captures", "export", "-o", str(tmp_path / "raw.jsonl"), "--redact", "none", "--db", db)
    only_u2 = json.loads(run("captures", "export", "-o", str(tmp_path / "u2.jsonl"), "--metadata", "user=u2",
                             "--record-set", "--db", db, "--json"))
    store = Store.open(db)
    (full_set,) = [r["id"] for r in store.list_training_sets() if r["n_rows"] == 3]
    for ckpt, training_set, parent in (("ckpt-a", full_set, None), ("ckpt-b", None, "ckpt-a"),
                                       ("ckpt-c", only_u2["training_set_id"], None)):
        store.insert_checkpoint({"id": ckpt, "method": "sft", "backend": "local", "model_ref": "local:x",
                                 "base_model": "local:x", "training_set_id": training_set, "parent_id": parent})
    store.close()
    before = (Path(db).read_bytes() + every_byte(tmp_path / ".flywheel") + (tmp_path / "raw.jsonl").read_bytes())
    assert b"zebra7781" in before and EMAILS["u1"].encode() in before

    dry = json.loads(run("captures", "delete", "--metadata", "user=u1", "--dry-run", "--db", db, "--json"))
    assert dry["dry_run"] and dry["captures"] == [1, 3] and dry["checkpoints"] == ["ckpt-a", "ckpt-b"]
    assert b"zebra7781" in (tmp_path / "all.jsonl").read_bytes()  # a dry run changes nothing

    result = json.loads(run("captures", "delete", "--metadata", "user=u1", "--db", db, "--json"))
    assert result["captures"] == [1, 3] and result["checkpoints"] == ["ckpt-a", "ckpt-b"]
    assert {e["path"].rsplit("/", 1)[-1]: e["rows_removed"] for e in result["exports"]} == {"all.jsonl": 2,
                                                                                          "raw.jsonl": 2}
    assert [(t["id"], t["rows_removed"], t["rows_left"]) for t in result["training_sets"]] == [(full_set, 2, 1)]

    for path in [Path(db), Path(db + "-wal"), Path(db + "-shm"), *tmp_path.rglob("*")]:
        if path.is_file():
            data = path.read_bytes()
            assert b"zebra7781" not in data and EMAILS["u1"].encode() not in data, path
    assert b"giraffe4410" in (tmp_path / "all.jsonl").read_bytes()  # other users' rows stay

    store = Store.open(db)
    marks = {r["id"]: r["trained_on_deleted"] for r in store.db["checkpoints"].rows}
    assert marks == {"ckpt-a": result["id"], "ckpt-b": result["id"], "ckpt-c": None}
    assert len(load_training_set(store, full_set)) == 1  # its recorded hash follows the rewrite
    (deletion,) = store.list_deletions()
    assert deletion["n_captures"] == 2 and json.loads(deletion["capture_ids_json"]) == [1, 3]
    assert [c.id for c in store.query_captures()] == [2]
    assert store.capture_copy_hashes([1, 3]) == set()
    store.close()


def test_delete_by_id_and_before_and_refusals(db, tmp_path):
    assert "deleted 1 captures" in run("captures", "delete", "--id", "2", "--db", db)
    assert "deleted 1 captures" in run("captures", "delete", "--before", "2026-11-02", "--db", db)
    assert "deleted 0 captures" in run("captures", "delete", "--id", "99", "--db", db)
    nothing = CliRunner().invoke(main, ["captures", "delete", "--db", db])
    assert nothing.exit_code == 1 and "refusing to delete everything" in nothing.output
    bad = CliRunner().invoke(main, ["captures", "delete", "--before", "last week", "--db", db])
    assert bad.exit_code == 1 and bad.output.startswith("error: --before 'last week'")
    store = Store.open(db)
    assert [c.id for c in store.query_captures()] == [3]  # a refused command deleted nothing
    store.close()


def test_drop_rows_finds_rows_holding_unicode_line_separators(tmp_path):
    from flywheel.privacy.lineage import drop_rows

    rows = [{"text": "keep\u2028me"}, {"text": "drop\u0085me"}, {"text": "and\u2029me"}]
    path = tmp_path / "set.jsonl"
    path.write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows), encoding="utf-8")
    assert drop_rows(path, {row_hash(rows[1]), row_hash(rows[2])}) == (2, 1)
    assert path.read_text(encoding="utf-8") == json.dumps(rows[0], ensure_ascii=False) + "\n"


def test_row_hash_ignores_key_order():
    assert row_hash({"a": 1, "b": "é"}) == row_hash(json.loads('{"b": "é", "a": 1}'))


def test_deleted_text_leaves_no_bytes_even_where_sqlite_keeps_freed_cells(db):
    """Many SQLite builds leave deleted cells in free page space (secure_delete off by default;
    Debian's turns it on). The deletion turns it on itself and truncates the WAL, while another
    connection stays open, as the proxy's writer does."""
    from flywheel.privacy.deletion import delete_captures

    writer = Store.open(db)  # an idle second connection keeps the WAL file alive
    store = Store.open(db)
    store.db.execute("pragma secure_delete=off")
    assert b"zebra7781" in Path(db).read_bytes() + (Path(db + "-wal").read_bytes() if Path(db + "-wal").exists() else b"")
    delete_captures(store, metadata={"user": "u1"})
    for suffix in ("", "-wal"):
        path = Path(db + suffix)
        if path.exists():
            assert b"zebra7781" not in path.read_bytes(), path
    store.close()
    writer.close()


def test_export_without_presidio_is_one_clean_error_and_writes_nothing(db, tmp_path, monkeypatch):
    import sys

    from graders import pii

    pii._cached.cache_clear()
    monkeypatch.setitem(sys.modules, "presidio_analyzer", None)  # as if the privacy extra were not installed
    out = tmp_path / "export.jsonl"
    result = CliRunner().invoke(main, ["captures", "export", "-o", str(out), "--db", db])
    pii._cached.cache_clear()
    assert result.exit_code == 1, result.output
    assert result.output == ("error: PII detection needs Microsoft Presidio: pip install 'flywheel[privacy]' "
                             "(presidio-analyzer, presidio-anonymizer)\n")
    assert not out.exists()
    assert "wrote 3 examples" in run("captures", "export", "-o", str(out), "--redact", "none", "--db", db)
