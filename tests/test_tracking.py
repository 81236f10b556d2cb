"""Tracking: real TensorBoard event files read back with tensorboard's EventAccumulator, a local
MLflow file store read back with the MLflow client, W&B offline files; and `export-tracking`."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import yaml
from click.testing import CliRunner
from conftest import make_rows, spec_dict, write_jsonl
from train_helpers import quick_sft, tiny_eval

from flywheel.cli import main
from flywheel.distill import capture
from flywheel.run_spec import load_run_spec
from flywheel.store import Store
from flywheel.tracking import (TrackingError, iteration_metrics, metric_name, require_trackers,
                               tracking_callback)
from flywheel.train import build_sft_set, load_train_config
from flywheel.train.sft import train_sft
from flywheel.wheel import run_wheel


def scalars(folder: Path) -> dict[str, list[tuple[int, float]]]:
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    acc = EventAccumulator(str(folder))
    acc.Reload()
    return {tag: [(e.step, e.value) for e in acc.Scalars(tag)] for tag in acc.Tags()["scalars"]}


def mlflow_client(uri: str):
    from mlflow.tracking import MlflowClient

    return MlflowClient(tracking_uri=uri)


def test_report_to_takes_a_list_a_word_or_commas_and_rejects_unknown_names():
    assert load_train_config("sft", overrides=["report_to=tensorboard"]).report_to == ["tensorboard"]
    assert load_train_config("sft", overrides=["report_to=tensorboard,mlflow"]).report_to == ["tensorboard", "mlflow"]
    assert load_train_config("sft", values={"report_to": ["wandb"]}).report_to == ["wandb"]
    assert load_train_config("dpo").report_to == []
    with pytest.raises(Exception, match="report_to.0: Input should be 'tensorboard', 'mlflow' or 'wandb'"):
        load_train_config("sft", overrides=["report_to=comet"])
    assert metric_name("loss") == "train/loss" and metric_name("eval_loss") == "eval/loss"
    assert metric_name("train_loss") == "train/train_loss"  # the run's mean, apart from the per-step loss


@pytest.mark.slow
def test_sft_logs_to_tensorboard_and_mlflow(tmp_path, tiny_model_dir):
    spec = tiny_eval(tmp_path, tiny_model_dir, n_per_split=6)
    store = Store.open(tmp_path / "flywheel.db")
    capture(spec, store, "reference:label")
    config = quick_sft(max_steps=3, report_to=["tensorboard", "mlflow"])
    result = train_sft(spec, store, build_sft_set(spec, store), base=spec.model, config=config, evaluate=False,
                       quiet=True)
    store.close()
    # TensorBoard: one folder per job under .flywheel/tracking/, every logged step
    board = scalars(tmp_path / ".flywheel" / "tracking" / result.job_id)
    assert [step for step, _ in board["train/loss"]] == [1, 2, 3]
    assert board["train/loss"][0][1] == pytest.approx(result.metrics["first_loss"], rel=1e-5)
    assert "train/learning_rate" in board
    # MLflow: a local file store beside the database, a finished run named after the job
    client = mlflow_client((tmp_path / "mlruns").as_uri())
    experiment = client.get_experiment_by_name("flywheel-tiny")
    [run] = client.search_runs([experiment.experiment_id])
    assert run.info.run_name == result.job_id and run.info.status == "FINISHED"
    assert run.data.params["lora.r"] == "16" and run.data.params["method"] == "sft"
    assert run.data.tags["flywheel.job_id"] == result.job_id
    history = client.get_metric_history(run.info.run_id, "train/loss")
    assert [m.step for m in history] == [1, 2, 3]
    assert history[-1].value == pytest.approx(result.metrics["last_loss"], rel=1e-5)


@pytest.mark.slow
def test_wandb_runs_offline_into_the_tracking_dir(tmp_path, tiny_model_dir, monkeypatch):
    pytest.importorskip("wandb")
    monkeypatch.delenv("WANDB_API_KEY", raising=False)
    monkeypatch.setenv("WANDB_SILENT", "true")
    spec = tiny_eval(tmp_path, tiny_model_dir, n_per_split=6)
    store = Store.open(tmp_path / "flywheel.db")
    capture(spec, store, "reference:label")
    config = quick_sft(max_steps=2, report_to=["wandb"], tracking_dir=str(tmp_path / "runs"))
    result = train_sft(spec, store, build_sft_set(spec, store), base=spec.model, config=config, evaluate=False,
                       quiet=True)
    store.close()
    [offline] = list((tmp_path / "runs" / "wandb").glob("offline-run-*"))
    [records] = list(offline.glob("*.wandb"))
    logged = wandb_history(records)
    losses = [row for row in logged if "train/loss" in row]
    assert len(losses) == 2 and json.loads(losses[0]["train/loss"]) == pytest.approx(result.metrics["first_loss"])


def wandb_history(path: Path) -> list[dict[str, str]]:
    """The history rows of an offline W&B run file, waiting up to 30 s for them: wandb-core, a
    separate process, may still be writing the file when `finish()` has returned."""
    import time

    deadline = time.monotonic() + 30
    while not (rows := _wandb_history(path)) and time.monotonic() < deadline:
        time.sleep(0.5)
    return rows


def _wandb_history(path: Path) -> list[dict[str, str]]:
    """The history rows of an offline W&B run file: a LevelDB-style log (7-byte file header, 32 KiB
    blocks, records with a 7-byte header: crc32, length, type) of W&B's own protobuf records.
    wandb 0.31 ships no Python reader of it, so the format is read here with its protobuf classes."""
    import struct

    from wandb.proto import wandb_internal_pb2

    data, pos, block, records, partial = path.read_bytes(), 7, 32768, [], b""
    assert data[:4] == b":W&B"
    while pos + 7 <= len(data):
        left = block - pos % block
        if left < 7:
            pos += left
            continue
        _, length, kind = struct.unpack("<IHB", data[pos:pos + 7])
        if kind == 0 and length == 0:  # block padding
            pos += left
            continue
        chunk, pos = data[pos + 7:pos + 7 + length], pos + 7 + length
        if kind == 1:  # a full record
            records.append(chunk)
        elif kind in (2, 3):  # first, middle
            partial += chunk
        elif kind == 4:  # last
            records.append(partial + chunk)
            partial = b""
    rows = []
    for raw in records:
        record = wandb_internal_pb2.Record()
        record.ParseFromString(raw)
        if record.WhichOneof("record_type") == "history":
            rows.append({item.key or "/".join(item.nested_key): item.value_json for item in record.history.item})
    return rows


def test_a_missing_tracker_package_is_one_line_before_anything_runs(tmp_path, tiny_model_dir, monkeypatch):
    import importlib.util

    # The only double here: "is mlflow installed?" answers no, as on a machine without the extra.
    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "mlflow" else real(name, *a))
    with pytest.raises(TrackingError, match=r"pip install 'flywheel\[mlflow\]'"):
        require_trackers(["tensorboard", "mlflow"])
    spec = tiny_eval(tmp_path, tiny_model_dir)
    db = tmp_path / "flywheel.db"
    assert CliRunner().invoke(main, ["capture", str(spec.source), "--teacher", "reference:label",
                                     "--db", str(db)]).exit_code == 0
    result = CliRunner().invoke(main, ["train", "sft", str(spec.source), "--base", spec.model, "-s",
                                       "report_to=mlflow", "-s", "max_steps=1", "--db", str(db)])
    assert result.exit_code == 1
    assert result.output.splitlines() == ["error: report_to: mlflow needs the mlflow package, not installed here: "
                                          "pip install 'flywheel[mlflow]' (or remove mlflow from report_to)"]
    store = Store.open(db)
    assert store.db["training_jobs"].count == 0 and store.db["training_sets"].count == 0
    store.close()


def test_iteration_metrics_split_keyed_and_per_item():
    row = {"split": "test", "score": 0.25, "n": 8, "cost": 0.4, "prompt_tokens": 800, "lap": 2, "ci_low": None}
    metrics = iteration_metrics(row)
    assert metrics["test/score"] == 0.25 and metrics["test/prompt_tokens_per_item"] == 100.0
    assert metrics["test/cost_per_item"] == pytest.approx(0.05) and "test/ci_low" not in metrics


@pytest.fixture(scope="module")
def wheel_run(tmp_path_factory, tiny_model_dir):
    """A finished wheel run: baseline, capture, a 2-step SFT, test at the end."""
    folder = tmp_path_factory.mktemp("wheel")
    write_jsonl(folder / "data.jsonl", make_rows(6))
    (folder / "eval.yaml").write_text(yaml.safe_dump(spec_dict(f"local:{tiny_model_dir}")))
    (folder / "run.yaml").write_text(yaml.safe_dump({"eval": "eval.yaml", "plateau": 9, "stages": [
        {"stage": "capture", "teacher": "reference:label"},
        {"stage": "sft", "config": {"max_steps": 2, "precision": "fp32", "batch_size": 4}}]}))
    store = Store.open(folder / "flywheel.db")
    result = run_wheel(load_run_spec(folder / "run.yaml"), store)
    rows = store.iterations(result.run_id)
    store.close()
    return folder, result.run_id, rows


@pytest.mark.slow
def test_export_a_wheel_run_to_tensorboard(wheel_run):
    folder, run_id, rows = wheel_run
    out = CliRunner().invoke(main, ["export-tracking", run_id, "--to", "tensorboard", "--dir", str(folder / "tb"),
                                    "--db", str(folder / "flywheel.db"), "--json"])
    assert out.exit_code == 0, out.output
    data = json.loads(out.output)
    assert data["iterations"] == len(rows) and data["to"] == "tensorboard"
    board = scalars(folder / "tb" / f"wheel-{run_id}")
    valid = [r for r in rows if r.split == "valid"]
    assert board["valid/score"] == [(r.seq, pytest.approx(r.score)) for r in valid]
    assert [step for step, _ in board["valid/lap"]] == [r.seq for r in valid]
    assert "test/score" in board  # test measured once the wheel stopped
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    acc = EventAccumulator(str(folder / "tb" / f"wheel-{run_id}"))
    acc.Reload()
    assert any("sft" in e.tensor_proto.string_val[0].decode() for e in acc.Tensors("iterations/text_summary"))


@pytest.mark.slow
def test_export_a_wheel_run_to_mlflow_as_a_parent_and_child_runs(wheel_run):
    folder, run_id, rows = wheel_run
    uri = (folder / "exported").as_uri()
    out = CliRunner().invoke(main, ["export-tracking", run_id, "--to", "mlflow", "--mlflow-uri", uri,
                                    "--db", str(folder / "flywheel.db")])
    assert out.exit_code == 0, out.output
    assert out.output.startswith(f"exported wheel run {run_id}: {len(rows)} iterations to mlflow")
    client = mlflow_client(uri)
    experiment = client.get_experiment_by_name("flywheel-tiny")  # the eval's name
    runs = client.search_runs([experiment.experiment_id])
    [parent] = [r for r in runs if "mlflow.parentRunId" not in r.data.tags]
    children = [r for r in runs if r.data.tags.get("mlflow.parentRunId") == parent.info.run_id]
    assert parent.info.run_name == f"wheel-{run_id}" and parent.data.params["status"] == "completed"
    assert len(children) == len(rows)
    by_iteration = {c.data.tags["flywheel.iteration_id"]: c for c in children}
    for row in rows:
        child = by_iteration[row.id]
        assert child.data.params["stage"] == row.stage and child.data.params["split"] == row.split
        assert child.data.metrics["score"] == pytest.approx(row.score)
        assert child.data.metrics["lap"] == row.lap
    sft = [c for c in children if c.data.params["stage"] == "sft"]
    assert sft and all("cost_per_item" in c.data.metrics for c in sft)
    history = client.get_metric_history(parent.info.run_id, "valid/score")
    assert [m.step for m in history] == [r.seq for r in rows if r.split == "valid"]


def test_export_refuses_a_run_that_is_not_a_wheel_run(tmp_path, tiny_model_dir):
    spec = tiny_eval(tmp_path, tiny_model_dir)
    db = tmp_path / "flywheel.db"
    evaluated = CliRunner().invoke(main, ["eval", str(spec.source), "--split", "valid", "--db", str(db), "--json"])
    assert evaluated.exit_code == 0, evaluated.output
    run_id = json.loads(evaluated.output)["run_id"]
    out = CliRunner().invoke(main, ["export-tracking", run_id, "--to", "tensorboard", "--db", str(db)])
    assert out.exit_code == 1 and out.output.startswith("error: ") and "is not a wheel run (kind: eval)" in out.output
    store = Store.open(db)  # nothing stored was touched
    assert store.get_run(run_id).status == "completed"
    store.close()


def test_a_failed_job_ends_its_mlflow_run_as_failed(store, tmp_path):
    from types import SimpleNamespace

    config = load_train_config("sft", values={"report_to": ["mlflow", "tensorboard"]})
    callback = tracking_callback(config, store, "job-x", method="sft", eval_name="tiny")
    state = SimpleNamespace(is_world_process_zero=True, global_step=1)
    callback.on_log(None, state, None, logs={"loss": 2.5, "grad_norm": float("nan"), "note": "text"})
    callback.close(ok=False)  # what run_local does when training raises
    callback.close(ok=True)  # once closed, stays closed
    client = mlflow_client((tmp_path / "mlruns").as_uri())
    [run] = client.search_runs([client.get_experiment_by_name("flywheel-tiny").experiment_id])
    assert run.info.status == "FAILED" and run.data.metrics == {"train/loss": 2.5}  # NaN and text left out
    assert scalars(tmp_path / ".flywheel" / "tracking" / "job-x") == {"train/loss": [(1, 2.5)]}
    assert load_train_config("sft").report_to == [] and tracking_callback(
        load_train_config("sft"), store, "job-y", method="sft") is None


@pytest.mark.slow
def test_export_a_wheel_run_to_wandb_offline(wheel_run, monkeypatch):
    pytest.importorskip("wandb")
    monkeypatch.delenv("WANDB_API_KEY", raising=False)
    monkeypatch.setenv("WANDB_SILENT", "true")
    folder, run_id, rows = wheel_run
    out = CliRunner().invoke(main, ["export-tracking", run_id, "--to", "wandb", "--dir", str(folder / "wb"),
                                    "--db", str(folder / "flywheel.db")])
    assert out.exit_code == 0, out.output
    [offline] = list((folder / "wb" / "wandb").glob("offline-run-*"))
    [records] = list(offline.glob("*.wandb"))
    logged = wandb_history(records)
    valid = [r for r in rows if r.split == "valid"]
    assert [json.loads(row["valid/score"]) for row in logged if "valid/score" in row] == \
        [pytest.approx(r.score) for r in valid]
