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
    assert [len(s.grades) for s in store.samples_with_grades(iteration)] == [1]


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
    assert [(s.item_key, s.output_text, len(s.grades)) for s in stored] == [("a", "out", 1), ("b", "out", 1)]


def test_errors_are_never_cached(store):
    run = store.create_run(kind="eval")
    iteration = store.iteration_for(run, 0, stage="eval")
    store.write_samples([_record(iteration, "a", error="model_error: boom")])
    # the harness caches a completion as it returns (`cache_completions`), an error never
    store.cache_completions([{"key": "k-a", "model_fingerprint": "m", "output_text": "", "error": "model_error: boom"},
                             {"key": "k-b", "model_fingerprint": "m", "output_text": "out"}])
    assert set(store.cached(["k-a", "k-b"])) == {"k-b"}


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


def test_one_timestamp_type_python_and_sql_write_the_same_text():
    from datetime import datetime, timezone

    from flywheel.store import timestamp, timestamp_from_unix, unix_seconds
    from flywheel.store.migrations import TIMESTAMP_SQL_FORMAT

    moment = datetime(2026, 12, 6, 14, 3, 7, 123456, tzinfo=timezone.utc)
    sql = sqlite3.connect(":memory:").execute(f"select strftime('{TIMESTAMP_SQL_FORMAT}', ?)",
                                              [moment.isoformat()]).fetchone()[0]
    assert timestamp(moment) == sql == "2026-12-06T14:03:07.123+00:00"
    assert timestamp_from_unix(1796565787) == "2026-12-06T14:03:07.000+00:00"
    assert unix_seconds("2026-12-06T14:03:07.999+00:00") == 1796565787 and unix_seconds(None) is None


def test_every_timestamp_column_is_text(store):
    for table in store.db.table_names():
        for column in store.db[table].columns:
            if column.name.endswith("_at"):
                assert column.type == "TEXT", f"{table}.{column.name} is {column.type}"


def test_timestamp_migration_converts_a_store_made_by_the_previous_schema(tmp_path):
    # A store as the last schema before m016 left it: API tables with unix seconds (INTEGER
    # columns), a hosted job's events without milliseconds, `_migrations` in SQLite's own format.
    import sqlite_utils

    from flywheel.api.routes.evals import eval_object
    from flywheel.api.routes.fine_tuning import event_object, job_object

    index = [name for name, _ in MIGRATIONS].index("m016_one_timestamp_type")
    db = sqlite_utils.Database(tmp_path / "old.db")
    db["_migrations"].create({"name": str, "applied_at": str}, pk="name")
    for name, fn in MIGRATIONS[:index]:
        fn(db)
        db["_migrations"].insert({"name": name, "applied_at": "2026-12-01 09:30:00"})
    for n, eval_id in enumerate(["eval_z", "eval_a", "eval_m"]):  # rowid order is not id order
        db["api_evals"].insert({"id": eval_id, "created_at": 1796565787 + n, "name": eval_id, "metadata_json": "{}",
                                "data_source_config_json": "{}", "testing_criteria_json": "[]", "project": "default"})
    db["api_eval_runs"].insert({"id": "evalrun_1", "eval_id": "eval_a", "created_at": 1796565800, "name": "r",
                                "status": "queued", "data_source_json": "{}", "project": "default"})
    db["api_fine_tuning_jobs"].insert({"id": "ftjob-1", "created_at": 1796565787, "finished_at": None,
                                       "status": "queued", "model": "m", "method_json": '{"type": "supervised", '
                                       '"supervised": {"hyperparameters": {}}}', "metadata_json": "{}",
                                       "project": "default"})
    db["api_events"].insert({"object_id": "ftjob-1", "created_at": 1796565790, "level": "info", "type": "message",
                             "message": "hi"})
    db["api_jobs"].insert({"id": "job_1", "kind": "fine_tuning", "object_id": "ftjob-1", "status": "running",
                           "created_at": 1796565787, "started_at": 1796565788, "finished_at": None})
    db["runs"].insert({"id": "run-1", "kind": "eval", "status": "completed", "started_at": "2026-12-06T14:03:07.123+00:00",
                       "finished_at": "not a time"})
    db["training_sets"].insert({"id": "ts-1", "created_at": "2026-12-06T14:00:00.000+00:00", "kind": "sft"})
    db["training_jobs"].insert({"id": "tj-1", "created_at": "2026-12-06T14:00:00.000+00:00", "training_set_id": "ts-1"})
    db["training_events"].insert({"job_id": "tj-1", "created_at": "2026-12-06T14:03:07+00:00", "message": "remote"})
    db.conn.close()

    store = Store.open(tmp_path / "old.db")
    evals, _ = store.api_list("api_evals", order="asc")
    assert [e["id"] for e in evals] == ["eval_z", "eval_a", "eval_m"]  # creation order survives the rebuild
    assert [e["created_at"] for e in evals] == ["2026-12-06T14:03:07.000+00:00", "2026-12-06T14:03:08.000+00:00",
                                                "2026-12-06T14:03:09.000+00:00"]
    assert store.api_get("api_eval_runs", "evalrun_1")["created_at"] == "2026-12-06T14:03:20.000+00:00"
    job = store.api_get("api_jobs", "job_1")
    assert (job["created_at"], job["started_at"], job["finished_at"]) == (
        "2026-12-06T14:03:07.000+00:00", "2026-12-06T14:03:08.000+00:00", None)
    assert store.get_run("run-1").started_at == "2026-12-06T14:03:07.123+00:00"
    assert store.get_run("run-1").finished_at == "not a time"  # not a date: left as it was
    assert store.training_events("tj-1")[0]["created_at"] == "2026-12-06T14:03:07.000+00:00"
    applied = {row["name"]: row["applied_at"] for row in store.db.query("select * from _migrations")}  # schema
    assert applied["m001_initial"] == "2026-12-01T09:30:00.000+00:00"
    assert store.db.execute("pragma foreign_key_check").fetchall() == []
    # The platform API still reports unix seconds.
    assert eval_object(evals[0])["created_at"] == 1796565787
    ft = job_object(store, store.api_get("api_fine_tuning_jobs", "ftjob-1"))
    assert (ft["created_at"], ft["finished_at"]) == (1796565787, None)
    events, _ = store.api_events("ftjob-1")
    assert event_object(events[0])["created_at"] == 1796565790
    # New rows written after the migration go through the same door.
    store.add_api_event("ftjob-1", "after")
    events, _ = store.api_events("ftjob-1")
    assert isinstance(event_object(events[0])["created_at"], int) and events[0]["created_at"].endswith("+00:00")
    store.close()


def test_each_store_area_stands_alone():
    # Every `self.x` a mixin uses is its own or StoreBase's: an area never leans on another area.
    import ast
    import inspect

    from flywheel.store import StoreBase
    from flywheel.store.api import ApiStore
    from flywheel.store.captures import CapturesStore
    from flywheel.store.privacy import PrivacyStore
    from flywheel.store.reviews import ReviewsStore
    from flywheel.store.runs import RunsStore
    from flywheel.store.training import TrainingStore

    for area in (RunsStore, CapturesStore, ReviewsStore, TrainingStore, PrivacyStore, ApiStore):
        tree = ast.parse(inspect.getsource(area))
        used = {node.attr for node in ast.walk(tree) if isinstance(node, ast.Attribute)
                and isinstance(node.value, ast.Name) and node.value.id == "self"}
        foreign = sorted(name for name in used - {"db", "path"}
                         if not hasattr(StoreBase, name) and name not in vars(area))
        assert foreign == [], f"{area.__name__} uses {foreign} from another area"
