"""flywheel.train.run: the one training door (CLI, wheel, API), its request checks, reuse of an
identical job, the worker's result file, and the platform names that derive from the methods table."""

from __future__ import annotations

import json

import pytest
from click.testing import CliRunner
from train_helpers import quick_sft, write_eval

from flywheel.api.errors import ApiError
from flywheel.api.routes.fine_tuning import parse_method
from flywheel.cli import main
from flywheel.errors import SpecError
from flywheel.spec import load_eval_spec
from flywheel.train import TrainRequest, TrainResult, run
from flywheel.train.checkpoints import Checkpoint
from flywheel.train.launch import LaunchSpec
from flywheel.errors import TrainingError
from flywheel.train.local import SplitEval
from flywheel.train.methods import HOSTED_TYPES, METHODS, hosted_method
from flywheel.train.search import SearchSpec


def test_a_train_result_round_trips_through_the_worker_result_file():
    checkpoint = Checkpoint(id="ckpt-1", method="sft", backend="local", model_ref="local:m+/a", base_model="local:m",
                            path="/a", adapter_hash="abc", training_set_id="ts-sft-1", training_set_hash="h",
                            parent_id=None, job_id="job-1", config={"epochs": 1.0}, metrics={"steps": 2},
                            evals={}, step=2)
    split = SplitEval(split="valid", iteration_id="it-1", parent_iteration_id="it-0", n=4, score=0.5, ci=(0.1, 0.9),
                      parent_score=0.25, diff=0.25, diff_ci=(-0.1, 0.6), p_mcnemar=0.5, improvements=1,
                      regressions=0, decision="inconclusive")
    result = TrainResult(method="sft", checkpoint=checkpoint, job_id="job-1", training_set_id="ts-sft-1",
                         metrics={"steps": 2, "processes": 2}, evals=[split], stop_reason="end")
    assert TrainResult.from_dict(json.loads(json.dumps(result.to_dict()))) == result


def test_the_request_is_checked_before_anything_trains(tmp_path, tiny_model_dir, store):
    spec = load_eval_spec(write_eval(tmp_path, f"local:{tiny_model_dir}"))
    with pytest.raises(TrainingError, match="give --base"):
        run(TrainRequest(method="sft", spec=spec, store=store))
    search = SearchSpec(space={"lora.r": {"choices": [2, 4]}})
    with pytest.raises(SpecError, match="a search's trials train in this process"):
        run(TrainRequest(method="sft", spec=spec, store=store, base=f"local:{tiny_model_dir}", search=search,
                         launch=LaunchSpec(kind="accelerate", num_processes=2, cpu=True)))
    with pytest.raises(ValueError, match="need kind: accelerate"):
        LaunchSpec(num_processes=2)
    assert store.db["training_jobs"].count == 0


def test_an_identical_request_reuses_the_checkpoint_its_job_chose(tmp_path, tiny_model_dir, store):
    spec_path = write_eval(tmp_path, f"local:{tiny_model_dir}")
    captured = CliRunner().invoke(main, ["capture", str(spec_path), "--teacher", "reference:label",
                                         "--db", str(store.path)])
    assert captured.exit_code == 0, captured.output
    spec = load_eval_spec(spec_path)
    logged: list[str] = []

    def request():
        return TrainRequest(method="sft", spec=spec, store=store, base=f"local:{tiny_model_dir}",
                            config=quick_sft(max_steps=2, min_examples=1), evaluate=False, quiet=True, reuse=True,
                            log=logged.append)

    first = run(request())
    assert not first.reused and first.metrics["steps"] == 2
    again = run(request())
    assert again.reused and again.checkpoint.id == first.checkpoint.id and again.job_id == first.job_id
    assert f"reusing {first.checkpoint.id}, trained before" in logged
    assert store.db["training_jobs"].count == 1  # trained once
    # without reuse (the CLI's default) the same request trains a new job
    fresh = run(TrainRequest(method="sft", spec=spec, store=store, base=f"local:{tiny_model_dir}",
                             config=quick_sft(max_steps=2, min_examples=1), evaluate=False, quiet=True))
    assert not fresh.reused and fresh.job_id != first.job_id


def test_the_platforms_method_names_and_rft_graders_derive_from_the_tables():
    from graders.registry import GRADER_TABLE

    assert HOSTED_TYPES == tuple(m.hosted_type for m in METHODS.values())
    assert {hosted_method(m.hosted_type).name for m in METHODS.values()} == set(METHODS)
    with pytest.raises(SpecError, match="unknown platform method type 'grpo'"):
        hosted_method("grpo")
    refused = [row.name for row in GRADER_TABLE if not row.hosted_rft]
    assert {"label_model", "pii", "blocklist"} <= set(refused)

    def body(grader):
        return {"method": {"type": "reinforcement", "reinforcement": {"grader": grader}}}

    for kind in ("pii", "blocklist"):
        with pytest.raises(ApiError, match=f"{kind} graders cannot be RFT rewards"):
            parse_method(body({"type": kind, "name": "x", "input": "{{sample.output_text}}", "blocklist": ["a"]}))
    inside = {"type": "multi", "name": "m", "calculate_output": "a", "graders": {"a": {
        "type": "label_model", "name": "a", "model": "local:m", "input": [], "labels": ["x"], "passing_labels": ["x"]}}}
    with pytest.raises(ApiError, match="label_model graders cannot be RFT rewards"):
        parse_method(body(inside))
    beta = parse_method({"method": {"type": "dpo", "dpo": {"hyperparameters": {"beta": 0.2}}}})
    assert beta["dpo"]["hyperparameters"]["beta"] == 0.2
    with pytest.raises(ApiError, match="unknown supervised hyper-parameter"):
        parse_method({"method": {"type": "supervised", "supervised": {"hyperparameters": {"beta": 0.2}}}})
