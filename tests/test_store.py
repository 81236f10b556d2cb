import sqlite3

import pytest

from flywheel.errors import StoreError
from flywheel.store.migrations import MIGRATIONS, apply_migrations
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
    assert store.write_samples([_record(iteration, "a")]) == 1
    # A failure mid-batch (a malformed grade) rolls back the whole batch: no sample without grades.
    broken = _record(iteration, "c")
    broken.grades = [{"score": 1.0, "passed": True}]
    with pytest.raises(KeyError):
        store.write_samples([_record(iteration, "b"), broken])
    assert store.done_keys(iteration) == {("a", 0)}
    assert [len(s["grades"]) for s in store.samples_with_grades(iteration)] == [1]
    assert set(store.cached(["k-a", "k-b"])) == {"k-a"}


def test_a_sample_stored_twice_is_kept_once(store):
    # What a second process running the same eval does: its copy is skipped, grades included.
    run = store.create_run(kind="eval")
    iteration = store.iteration_for(run, 0, stage="eval")
    store.write_samples([_record(iteration, "a")])
    second = _record(iteration, "a")
    second.output_text = "other"
    assert store.write_samples([_record(iteration, "b"), second]) == 1
    assert store.done_keys(iteration) == {("a", 0), ("b", 0)}
    stored = store.samples_with_grades(iteration)
    assert [(s["item_key"], s["output_text"], len(s["grades"])) for s in stored] == [("a", "out", 1), ("b", "out", 1)]


def test_errors_are_never_cached(store):
    run = store.create_run(kind="eval")
    iteration = store.iteration_for(run, 0, stage="eval")
    store.write_samples([_record(iteration, "a", error="model_error: boom")])
    assert store.cached(["k-a"]) == {}


def test_iteration_for_is_stable(store):
    run = store.create_run(kind="eval")
    assert store.iteration_for(run, 0, stage="eval") == store.iteration_for(run, 0, stage="eval")


# -- robustness: concurrent opens, busy writers, newer or damaged databases -------------------------
_OPEN_AND_WRITE = """
import sys
from flywheel.store import Store
store = Store.open(sys.argv[1])
run = store.create_run(kind="eval")
store.iteration_for(run, 0, stage="eval")
store.close()
print("ok")
"""


def test_fresh_database_opened_by_many_processes_at_once(tmp_path):
    # The first open of a new file races the migrations; every process must succeed.
    import subprocess
    import sys

    for trial in range(3):
        db = tmp_path / f"race{trial}.db"
        procs = [subprocess.Popen([sys.executable, "-c", _OPEN_AND_WRITE, str(db)], stdout=subprocess.PIPE,
                                  stderr=subprocess.PIPE, text=True) for _ in range(4)]
        outs = [p.communicate(timeout=120) for p in procs]
        assert [p.returncode for p in procs] == [0] * 4, [err for _, err in outs]
        with sqlite3.connect(db) as conn:
            assert conn.execute("select count(*) from _migrations").fetchone()[0] == len(MIGRATIONS)
            assert conn.execute("select count(*) from runs").fetchone()[0] == 4
            assert conn.execute("pragma user_version").fetchone()[0] == len(MIGRATIONS)


def test_fresh_database_opened_by_threads_at_once(tmp_path):
    import threading

    db = tmp_path / "threads.db"
    errors: list[BaseException] = []

    def work() -> None:
        try:
            Store.open(db).close()
        except BaseException as exc:  # noqa: BLE001 - collected for the assertion
            errors.append(exc)

    threads = [threading.Thread(target=work) for _ in range(6)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert errors == []


def test_busy_database_waits_then_names_the_holder(tmp_path, monkeypatch):
    import subprocess
    import sys

    db = tmp_path / "busy.db"
    Store.open(db).close()
    holder = subprocess.Popen(
        [sys.executable, "-c", "import sqlite3,sys,time; c=sqlite3.connect(sys.argv[1]); "
         "c.execute('begin immediate'); print('locked', flush=True); time.sleep(60)", str(db)],
        stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline().strip() == "locked"
        monkeypatch.setenv("FLYWHEEL_DB_TIMEOUT", "0.5")
        store = Store.open(db)  # reading and an up-to-date schema need no write lock
        with pytest.raises(StoreError) as caught:
            store.create_run(kind="eval")
        message = str(caught.value)
        assert "\n" not in message and str(db) in message and "database is busy" in message
        assert f"pid {holder.pid}" in message and "0.5 s" in message
        store.close()
    finally:
        holder.kill()
        holder.wait()
    # Once the holder is gone the same store works again.
    store = Store.open(db)
    store.create_run(kind="eval")
    store.close()


def test_database_from_a_newer_flywheel_is_refused_untouched(tmp_path):
    db = tmp_path / "future.db"
    Store.open(db).close()
    with sqlite3.connect(db) as conn:
        conn.execute("insert into _migrations values ('m999_from_the_future', 'x')")
    before = db.read_bytes()
    with pytest.raises(StoreError, match=r"newer flywheel.*m999_from_the_future.*this version knows schema version"):
        Store.open(db)
    assert db.read_bytes() == before

    db2 = tmp_path / "future2.db"
    Store.open(db2).close()
    with sqlite3.connect(db2) as conn:
        conn.execute("pragma user_version = 99")
    with pytest.raises(StoreError, match=r"schema version 99.*knows schema version"):
        Store.open(db2)


def test_database_missing_a_table_is_one_line_error(tmp_path):
    db = tmp_path / "damaged.db"
    Store.open(db).close()
    with sqlite3.connect(db) as conn:
        conn.execute("drop table grades")
    with pytest.raises(StoreError, match=r"damaged\.db: damaged store: table grades missing") as caught:
        Store.open(db)
    assert "\n" not in str(caught.value)


def test_old_database_without_user_version_is_migrated(tmp_path):
    # A store written before user_version was set, with only the first migrations applied.
    import sqlite_utils

    db = sqlite_utils.Database(tmp_path / "old.db")
    db["_migrations"].create({"name": str, "applied_at": str}, pk="name")
    for name, fn in MIGRATIONS[:4]:
        fn(db)
        db["_migrations"].insert({"name": name, "applied_at": "x"})
    db.conn.close()
    store = Store.open(tmp_path / "old.db")
    assert store.db["_migrations"].count == len(MIGRATIONS)
    assert store.db.execute("pragma user_version").fetchone()[0] == len(MIGRATIONS)
    store.close()


def test_database_missing_a_column_is_one_line_error(tmp_path):
    db = tmp_path / "drift.db"
    Store.open(db).close()
    with sqlite3.connect(db) as conn:
        conn.execute("alter table samples drop column finish_reason")
    with pytest.raises(StoreError, match=r"damaged store: column samples\.finish_reason missing"):
        Store.open(db)


def test_a_sqlite_file_that_is_not_a_flywheel_store_is_refused_untouched(tmp_path):
    db = tmp_path / "other.db"
    with sqlite3.connect(db) as conn:
        conn.execute("create table notes (body text)")
    before = db.read_bytes()
    with pytest.raises(StoreError, match=r"other\.db: not a flywheel store: it has tables \(notes\)"):
        Store.open(db)
    assert db.read_bytes() == before
