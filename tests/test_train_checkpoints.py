"""Checkpoint registration is atomic: whatever fails, nothing is half-registered."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from flywheel.train import CheckpointError, load_checkpoint, register_checkpoint
from flywheel.train.checkpoints import checkpoint_dir, resolve_base


def _save_adapter(folder: Path) -> None:
    folder.mkdir(parents=True)
    (folder / "adapter_config.json").write_text(json.dumps({"base_model_name_or_path": "x", "r": 2}))
    (folder / "adapter_model.safetensors").write_bytes(b"weights")


def _register(store, save, **overrides):
    job_id = overrides.pop("job_id", None) or store.create_training_job(backend="local", method="sft",
                                                                        base_model="local:smollm2")
    kwargs = dict(method="sft", base_model="local:smollm2", save=save, training_set_id=None, training_set_hash="h",
                  config={"lr": 1}, metrics={"loss": 0.5}, job_id=job_id)
    kwargs.update(overrides)
    return register_checkpoint(store, **kwargs), job_id


def _nothing_registered(store) -> None:
    assert store.db.execute("select count(*) from checkpoints").fetchone()[0] == 0
    folder = checkpoint_dir(store)
    assert not folder.exists() or list(folder.iterdir()) == []


def test_a_good_save_registers_folder_row_and_job_together(store):
    checkpoint, job_id = _register(store, _save_adapter)
    assert Path(checkpoint.path).is_dir() and checkpoint.model_ref == f"local:smollm2+{checkpoint.path}"
    assert checkpoint.adapter_hash and checkpoint.metrics == {"loss": 0.5}
    assert store.db.execute("select status, checkpoint_id from training_jobs where id = ?",
                            [job_id]).fetchone() == ("succeeded", checkpoint.id)
    assert resolve_base(store, checkpoint.id) == (checkpoint.model_ref, checkpoint.id)
    assert resolve_base(store, checkpoint.model_ref) == (checkpoint.model_ref, checkpoint.id)
    assert resolve_base(store, "local:smollm2") == ("local:smollm2", None)


def test_a_save_that_fails_half_way_leaves_nothing(store):
    def crash(folder: Path) -> None:
        _save_adapter(folder)
        raise OSError(28, "No space left on device")

    with pytest.raises(CheckpointError, match="No space left on device.*nothing was registered"):
        _register(store, crash)
    _nothing_registered(store)


def test_a_save_without_an_adapter_leaves_nothing(store):
    with pytest.raises(CheckpointError, match="wrote no adapter_config.json; nothing was registered"):
        _register(store, lambda folder: folder.mkdir())
    _nothing_registered(store)


def test_a_failing_row_insert_removes_the_saved_folder(store):
    # A job id that does not exist violates the foreign key: the insert fails after the rename.
    with pytest.raises(CheckpointError, match="nothing was registered"):
        _register(store, _save_adapter, job_id="job-that-does-not-exist")
    _nothing_registered(store)


def test_missing_checkpoints_and_folders_are_clear(store):
    with pytest.raises(CheckpointError, match="no checkpoint 'sft-nope'"):
        load_checkpoint(store, "sft-nope")
    checkpoint, _ = _register(store, _save_adapter)
    import shutil

    shutil.rmtree(checkpoint.path)
    with pytest.raises(CheckpointError, match="adapter folder .* is missing"):
        load_checkpoint(store, checkpoint.id)


def test_a_job_that_cannot_be_marked_done_leaves_no_checkpoint_row(store):
    # The row and its job's "succeeded" are one transaction: a failure between them (here a trigger;
    # in life a kill) leaves neither, so a resumed wheel never sees a final checkpoint of a running job.
    store.db.execute("create trigger no_finish before update of status on training_jobs"
                     " begin select raise(abort, 'disk gone'); end")
    with pytest.raises(CheckpointError, match="disk gone"):
        _register(store, _save_adapter)
    _nothing_registered(store)
    assert store.db.execute("select status from training_jobs").fetchall() == [("running",)]
