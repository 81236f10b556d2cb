import sqlite3

import pytest

from flywheel.errors import StoreError
from flywheel.migrations import MIGRATIONS, apply_migrations
from flywheel.store import SampleRecord, Store


def test_schema_and_wal(store):
    tables = set(store.db.table_names())
    for name in ("evals", "datasets", "items", "runs", "iterations", "prompts", "samples", "grades",
                 "completion_cache", "_migrations"):
        assert name in tables
    assert store.db.execute("pragma journal_mode").fetchone()[0] == "wal"


def test_migrations_are_idempotent(store):
    assert apply_migrations(store.db) == []
    assert store.db["_migrations"].count == len(MIGRATIONS)


def test_unwritable_database_path(tmp_path):
    with pytest.raises(StoreError, match="folder .* does not exist"):
        Store.open(tmp_path / "missing" / "flywheel.db")
    (tmp_path / "file").write_text("x")
    with pytest.raises(StoreError, match="does not exist"):
        Store.open(tmp_path / "file" / "flywheel.db")
    # /proc refuses new files even to root, so this is unwritable for every user.
    with pytest.raises(StoreError, match=r"/proc/flywheel\.db: cannot open database"):
        Store.open("/proc/flywheel.db")


def test_database_path_that_is_a_folder(tmp_path):
    with pytest.raises(StoreError, match=r"cannot open database"):
        Store.open(tmp_path)


def test_not_a_database(tmp_path):
    path = tmp_path / "junk.db"
    path.write_bytes(b"this is not sqlite" * 100)
    with pytest.raises(StoreError, match=r"junk\.db: cannot open database"):
        Store.open(path)


def _record(iteration_id, key, **kw):
    return SampleRecord(iteration_id=iteration_id, item_key=key, repeat=0, input_json="[]",
                        output_text="out", grades=[{"grader": "g", "score": 1.0, "passed": True}],
                        cache_key=f"k-{key}", model_fingerprint="m", **kw)


def test_sample_and_grades_commit_together(store):
    run = store.create_run(kind="eval")
    iteration = store.iteration_for(run, 0, stage="eval")
    store.write_samples([_record(iteration, "a")])
    # A duplicate sample violates the unique index: neither sample nor grade of the batch lands.
    with pytest.raises(sqlite3.IntegrityError):
        store.write_samples([_record(iteration, "b"), _record(iteration, "a")])
    assert store.done_keys(iteration) == {("a", 0)}
    assert store.db["grades"].count == 1
    assert set(store.cached(["k-a", "k-b"])) == {"k-a"}


def test_errors_are_never_cached(store):
    run = store.create_run(kind="eval")
    iteration = store.iteration_for(run, 0, stage="eval")
    store.write_samples([_record(iteration, "a", error="model_error: boom")])
    assert store.cached(["k-a"]) == {}


def test_iteration_for_is_stable(store):
    run = store.create_run(kind="eval")
    assert store.iteration_for(run, 0, stage="eval") == store.iteration_for(run, 0, stage="eval")
