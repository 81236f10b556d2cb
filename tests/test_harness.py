import json
import time

import pytest
import yaml

from flywheel.errors import FlywheelError, TooManyErrors
from flywheel.harness import run_eval
from flywheel.models import Completion, Model
from flywheel.spec import load_eval_spec

from conftest import make_rows, spec_dict, write_jsonl


def test_eval_stores_every_sample_and_grade(tiny_spec, store):
    result = run_eval(load_eval_spec(tiny_spec), store, split="test")
    assert result.n_samples == 4 and result.model_calls == 4 and result.cache_hits == 0
    samples = store.samples_with_grades(result.iteration_id)
    assert [s.item_key for s in sorted(samples, key=lambda s: s.item_key)] == [f"test-{i}" for i in range(4)]
    for sample in samples:
        assert json.loads(sample.input_json)[1]["content"].startswith("question ")
        assert sample.completion_tokens > 0 and sample.prompt_tokens > 0
        assert [g.grader for g in sample.grades] == ["label"]
    run = store.get_run(result.run_id)
    assert run.status == "completed"
    assert json.loads(run.summary_json)["n_samples"] == 4


def test_a_run_id_given_by_the_caller_names_the_run_and_resumes_only_that_run(tiny_spec, store):
    spec = load_eval_spec(tiny_spec)
    first = run_eval(spec, store, split="test", limit=2, run_id="run-given-1", command="same")
    second = run_eval(spec, store, split="test", limit=2, run_id="run-given-2", command="same")
    # Identical evals, identical commands: each run is the one its caller named, with its own iteration.
    assert (first.run_id, second.run_id) == ("run-given-1", "run-given-2")
    assert [it.id for it in store.iterations("run-given-1")] == [first.iteration_id] != [second.iteration_id]
    assert second.model_calls == 0  # the completion cache still answers
    again = run_eval(spec, store, split="test", limit=2, run_id="run-given-1")
    assert (again.run_id, again.iteration_id) == (first.run_id, first.iteration_id)
    with pytest.raises(FlywheelError, match="run run-given-1 is the run of another eval"):
        run_eval(spec, store, split="valid", limit=2, run_id="run-given-1")


def test_unchanged_rerun_makes_zero_model_calls(tiny_spec, store):
    spec = load_eval_spec(tiny_spec)
    first = run_eval(spec, store, split="valid")
    second = run_eval(spec, store, split="valid")
    assert second.run_id != first.run_id
    assert second.model_calls == 0 and second.cache_hits == 4
    assert (second.pass_rate, second.graders) == (first.pass_rate, first.graders)
    out_first = [s.output_text for s in store.samples_with_grades(first.iteration_id)]
    assert sorted(out_first) == sorted(s.output_text for s in store.samples_with_grades(second.iteration_id))


def test_cache_key_covers_sampling_and_repeats(tiny_spec, store):
    run_eval(load_eval_spec(tiny_spec), store, split="test")
    changed = run_eval(load_eval_spec(tiny_spec, ["sampling.max_tokens=3"]), store, split="test")
    assert changed.model_calls == 4
    repeated = run_eval(load_eval_spec(tiny_spec, ["sampling.max_tokens=3", "sampling.repeats=2"]), store, split="test")
    assert repeated.n_samples == 8 and repeated.model_calls == 4 and repeated.cache_hits == 4


def test_limit_and_split(tiny_spec, store):
    result = run_eval(load_eval_spec(tiny_spec), store, split="train", limit=2)
    assert result.n_samples == 2 and result.split == "train"


def test_item_missing_a_field_is_an_error_row(tmp_path, tiny_model_dir, store):
    rows = make_rows()
    del rows[-1]["text"]  # the last test item cannot be rendered
    write_jsonl(tmp_path / "data.jsonl", rows)
    (tmp_path / "eval.yaml").write_text(yaml.safe_dump(spec_dict(f"local:{tiny_model_dir}")))
    result = run_eval(load_eval_spec(tmp_path / "eval.yaml"), store, split="test")
    assert result.n_samples == 4 and result.n_errors == 1 and result.model_calls == 3
    errored = [s for s in store.samples_with_grades(result.iteration_id) if s.error]
    assert len(errored) == 1 and "invalid_variable_error" in errored[0].error
    assert "item.text" in errored[0].error
    # The errored item is not cached: a rerun pays only for it (and still cannot render it).
    assert run_eval(load_eval_spec(tmp_path / "eval.yaml"), store, split="test").model_calls == 0


def test_max_errors_gives_up_and_marks_the_run_failed(tmp_path, tiny_model_dir, store):
    rows = make_rows()
    for row in rows:
        if row["split"] == "test":
            del row["text"]
    rows[0]["text"] = "one row keeps the field so the template check passes"
    write_jsonl(tmp_path / "data.jsonl", rows)
    (tmp_path / "eval.yaml").write_text(yaml.safe_dump(spec_dict(f"local:{tiny_model_dir}")))
    with pytest.raises(TooManyErrors, match="more than --max-errors 1"):
        run_eval(load_eval_spec(tmp_path / "eval.yaml"), store, split="test", max_errors=1)
    run = store.list_runs()[0]
    assert run.status == "failed"
    assert store.db["samples"].count == 4  # what was done is kept


def test_grader_that_throws_is_recorded(tmp_path, tiny_model_dir, store):
    write_jsonl(tmp_path / "data.jsonl", make_rows())
    data = spec_dict(f"local:{tiny_model_dir}")
    data["graders"].append({"type": "python", "name": "boom",
                            "source": "def grade(sample, item):\n    raise ValueError('no luck')\n"})
    (tmp_path / "eval.yaml").write_text(yaml.safe_dump(data))
    result = run_eval(load_eval_spec(tmp_path / "eval.yaml"), store, split="test")
    assert result.n_samples == 4
    boom = next(g for g in result.graders if g.name == "boom")
    assert boom.errors == 4 and boom.mean == 0
    grades = [g for s in store.samples_with_grades(result.iteration_id) for g in s.grades if g.grader == "boom"]
    assert all(g.error == "python_grader_runtime_error" and "no luck" in g.error_details for g in grades)


# -- commit cadence and failures before the first sample ----------------------------------------------
class SlowModel(Model):
    """A model whose every request takes `delay` seconds (time is what the test is about); it
    records the size of each generate call, i.e. of each chunk the harness commits."""

    ref = "slow:test"

    def __init__(self, delay: float):
        self.delay = delay
        self.calls: list[int] = []

    @property
    def fingerprint(self) -> str:
        return "slow-test"

    @property
    def preferred_batch_size(self) -> int:
        return 16

    @property
    def min_chunk_size(self) -> int:
        return 1

    def generate(self, requests):
        self.calls.append(len(requests))
        time.sleep(self.delay * len(requests))
        return [Completion(text="card_arrival", prompt_tokens=1, completion_tokens=1) for _ in requests]


def test_long_batches_are_committed_every_few_seconds(tmp_path, store, monkeypatch):
    rows = [{"id": f"i{n}", "text": f"item {n}", "label": "card_arrival", "split": "test"} for n in range(40)]
    write_jsonl(tmp_path / "data.jsonl", rows)
    (tmp_path / "eval.yaml").write_text(yaml.safe_dump(spec_dict("local:smollm2")))
    spec = load_eval_spec(tmp_path / "eval.yaml")
    model = SlowModel(delay=0.05)  # a 16-item batch takes 0.8 s: longer than the 0.2 s commit target
    monkeypatch.setenv("FLYWHEEL_COMMIT_EVERY_S", "0.2")
    writes: list[int] = []
    real_write = store.write_samples
    monkeypatch.setattr(store, "write_samples", lambda records: writes.append(len(records)) or real_write(records))
    result = run_eval(spec, store, split="test", model=model)
    assert result.n_samples == 40 and store.db["samples"].count == 40
    assert model.calls[0] == 16  # one model batch first ...
    assert max(model.calls[1:]) <= 5  # ... then chunks sized to about 0.2 s of generation
    assert sum(writes) == 40 and len(writes) >= 8


def test_time_chunks_keep_repeats_together_and_respect_the_model_floor(tmp_path, store, monkeypatch):
    rows = [{"id": f"i{n}", "text": f"item {n}", "label": "card_arrival", "split": "test"} for n in range(12)]
    write_jsonl(tmp_path / "data.jsonl", rows)
    (tmp_path / "eval.yaml").write_text(yaml.safe_dump(spec_dict("local:smollm2", sampling={"repeats": 3})))
    spec = load_eval_spec(tmp_path / "eval.yaml")

    class Floored(SlowModel):
        @property
        def min_chunk_size(self) -> int:
            return 4

    model = Floored(delay=0.05)
    monkeypatch.setenv("FLYWHEEL_COMMIT_EVERY_S", "0.01")
    seen: list[list[tuple[str, int]]] = []
    real = model.generate
    model.generate = lambda requests: seen.append([r.messages[-1]["content"] for r in requests]) or real(requests)
    result = run_eval(spec, store, split="test", model=model)
    assert result.n_samples == 36
    assert all(len(call) % 3 == 0 for call in seen)  # the 3 repeats of an item are always in one call
    assert min(model.calls) >= 4 and model.calls[0] == 18  # 16 rounded up to whole items, then >= the floor


def test_failure_before_the_first_sample_leaves_no_running_run(tiny_spec, store, monkeypatch):
    spec = load_eval_spec(tiny_spec, ["model=openai:gpt-4o-mini", "model_options={api_key_env: NO_SUCH_KEY_FOR_TEST}"])
    monkeypatch.delenv("OPENAI_BASE_URL", raising=False)
    with pytest.raises(Exception, match="no API key"):
        run_eval(spec, store, split="test")
    (run,) = store.list_runs()
    assert run.status == "failed" and "no API key" in json.loads(run.summary_json)["error"]


class StreamingModel(SlowModel):
    """Streams completions one by one; fails with `error` after `fail_after` of them (if set)."""

    def __init__(self, fail_after: int | None = None, error: Exception | None = None):
        super().__init__(delay=0.0)
        self.fail_after, self.error = fail_after, error
        self.streamed: list[int] = []

    @property
    def streams(self) -> bool:
        return True

    def stream(self, requests):
        self.streamed.append(len(requests))
        for index in range(len(requests)):
            if index == self.fail_after:
                raise self.error
            yield index, Completion(text="card_arrival", prompt_tokens=1, completion_tokens=1)


def streaming_spec(tmp_path, n: int):
    rows = [{"id": f"i{k}", "text": f"item {k}", "label": "card_arrival", "split": "test"} for k in range(n)]
    write_jsonl(tmp_path / "data.jsonl", rows)
    (tmp_path / "eval.yaml").write_text(yaml.safe_dump(spec_dict("local:smollm2")))
    return load_eval_spec(tmp_path / "eval.yaml")


def test_a_streaming_model_gets_every_request_in_one_call_and_rows_commit_as_they_finish(tmp_path, store,
                                                                                        monkeypatch):
    spec = streaming_spec(tmp_path, 40)
    model = StreamingModel()
    monkeypatch.setenv("FLYWHEEL_COMMIT_EVERY_S", "1e-9")
    writes: list[int] = []
    real_write = store.write_samples
    monkeypatch.setattr(store, "write_samples", lambda records: writes.append(len(records)) or real_write(records))
    result = run_eval(spec, store, split="test", model=model)
    assert result.n_samples == 40 and result.model_calls == 40 and store.db["samples"].count == 40
    assert model.streamed == [40] and model.calls == []  # one stream, no batch calls
    assert sum(writes) == 40 and len(writes) == 40  # committed row by row, as they finished


def test_a_stream_that_breaks_keeps_what_finished_and_generates_the_rest(tmp_path, store):
    spec = streaming_spec(tmp_path, 12)
    model = StreamingModel(fail_after=5, error=RuntimeError("engine fell over"))
    result = run_eval(spec, store, split="test", model=model)
    assert result.n_samples == 12 and store.db["samples"].count == 12 and result.model_calls == 12
    assert model.streamed == [12] and model.calls == [7]  # the 7 not yet done, in one generate call
    assert all(s.output_text == "card_arrival" and not s.error
               for s in store.samples_with_grades(result.iteration_id))


def test_a_flywheel_error_mid_stream_stops_the_eval_but_keeps_the_finished_rows(tmp_path, store):
    from flywheel.errors import ModelError

    spec = streaming_spec(tmp_path, 12)
    model = StreamingModel(fail_after=5, error=ModelError("the weights file is gone"))
    with pytest.raises(ModelError, match="weights file is gone"):
        run_eval(spec, store, split="test", model=model)
    assert store.db["samples"].count == 5 and model.calls == []


def test_a_cancel_from_progress_mid_stream_stops_it_without_generating_the_rest(tmp_path, store, monkeypatch):
    spec = streaming_spec(tmp_path, 40)
    model = StreamingModel()  # preferred batch 16: the first commit comes after 16 finished rows
    monkeypatch.setenv("FLYWHEEL_COMMIT_EVERY_S", "60")

    class Cancelled(Exception):
        pass

    def progress(done, total):
        if done:
            raise Cancelled

    with pytest.raises(Cancelled):
        run_eval(spec, store, split="test", model=model, progress=progress)
    assert store.db["samples"].count == 16 and model.calls == []


# -- the completion cache key: every option that changes outputs, none that does not ---------------
def _key(ref: str, options: dict) -> str:
    from flywheel.harness import cache_key
    from flywheel.models import ChatRequest, Sampling, load_model

    request = ChatRequest([{"role": "user", "content": "hello"}], Sampling(max_tokens=4))
    return cache_key(load_model(ref, options).fingerprint, request)


@pytest.mark.parametrize("changed", [{"dtype": "bf16"}, {"dtype": "fp16"}, {"engine": "hf"}, {"device": "cuda"}],
                         ids=["dtype-bf16", "dtype-fp16", "engine", "device"])
def test_an_option_that_changes_outputs_changes_the_cache_key(tiny_model_dir, changed):
    base = {"dtype": "fp32", "device": "cpu", "engine": "continuous"}
    assert _key(f"local:{tiny_model_dir}", {**base, **changed}) != _key(f"local:{tiny_model_dir}", base)


@pytest.mark.parametrize("neutral", [{"batch_size": 1}, {"batch_size": 64}, {"prefix_cache": False}],
                         ids=["batch-1", "batch-64", "no-prefix-cache"])
def test_an_option_that_leaves_outputs_alone_keeps_the_cache_key(tiny_model_dir, neutral):
    base = {"dtype": "fp32", "device": "cpu"}
    assert _key(f"local:{tiny_model_dir}", {**base, **neutral}) == _key(f"local:{tiny_model_dir}", base)


def test_auto_dtype_is_keyed_as_the_dtype_it_resolves_to(tiny_model_dir):
    from flywheel.models.loading import pick_dtype

    resolved = {"torch.float32": "fp32", "torch.bfloat16": "bf16", "torch.float16": "fp16"}[str(pick_dtype("auto"))]
    ref = f"local:{tiny_model_dir}"
    assert _key(ref, {"dtype": "auto"}) == _key(ref, {}) == _key(ref, {"dtype": resolved})


def test_adapter_weights_content_and_quantisation_change_the_cache_key(tiny_model_dir, tmp_path):
    import shutil

    from adapter_helpers import make_adapter

    ref = f"local:{tiny_model_dir}"
    adapter = make_adapter(tiny_model_dir, tmp_path / "adapter", seed=1)
    plain, tuned = _key(ref, {}), _key(f"{ref}+{adapter}", {})
    weighted = _key(f"{ref}+{adapter}*0.5", {})
    make_adapter(tiny_model_dir, tmp_path / "adapter", seed=2)  # other weights in the same folder
    retrained = _key(f"{ref}+{adapter}", {})
    assert len({plain, tuned, weighted, retrained}) == 4
    quantised = tmp_path / "quantised"
    shutil.copytree(tiny_model_dir, quantised)
    config = json.loads((quantised / "config.json").read_text())
    config["quantization_config"] = {"quant_method": "torchao"}
    (quantised / "config.json").write_text(json.dumps(config))
    assert _key(f"local:{quantised}", {}) != plain


def test_an_eval_in_another_dtype_is_not_answered_from_the_cache(tiny_spec, store):
    """Issue 26 item 11: an fp32 eval on a store that evaluated the same model in bf16 got the bf16 outputs."""
    bf16 = run_eval(load_eval_spec(tiny_spec, ["model_options.dtype=bf16"]), store, split="valid")
    assert bf16.model_calls == 4
    fp32 = run_eval(load_eval_spec(tiny_spec, ["model_options.dtype=fp32"]), store, split="valid")
    assert fp32.model_calls == 4 and fp32.cache_hits == 0
    # another batch size decodes the same rows: the cache answers
    batched = run_eval(load_eval_spec(tiny_spec, ["model_options.dtype=fp32", "model_options.batch_size=1"]),
                       store, split="valid")
    assert batched.model_calls == 0 and batched.cache_hits == 4
