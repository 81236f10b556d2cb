"""Hyper-parameter search (flywheel/train/search.py): the space checked against the method's config
before anything trains, real Optuna studies of real TRL trials on the tiny model, every trial in
the store, pruning on a constructed case, the best chosen by the paired rule, the wall budget."""

from __future__ import annotations

import json
from types import SimpleNamespace

import pytest
import yaml
from click.testing import CliRunner
from conftest import make_rows, spec_dict, write_jsonl
from train_helpers import quick_sft, tiny_eval, write_eval

from flywheel.cli import main
from flywheel.distill import capture
from flywheel.errors import SpecError
from flywheel.harness import run_eval
from flywheel.prompt import Prompt
from flywheel.run_spec import load_run_spec
from flywheel.spec import load_eval_spec
from flywheel.stages.training import TrainStage
from flywheel.store import Store
from flywheel.train import SFTSpec, build_sft_set
from flywheel.train.search import SearchSpec, Trial, choose_best, load_search_spec, run_search
from flywheel.wheel import run_wheel


def write_space(tmp_path, data, name="space.yaml"):
    path = tmp_path / name
    path.write_text(yaml.safe_dump(data), encoding="utf-8")
    return path


# -- the space -------------------------------------------------------------------------------------
def test_a_space_loads_with_kinds_coerced(tmp_path):
    path = write_space(tmp_path, {"learning_rate": {"low": "1e-5", "high": 1e-3, "log": True},
                                  "lora.r": {"choices": [4, 8]}, "lr_scheduler": {"choices": ["linear", "cosine"]},
                                  "epochs": {"low": 1, "high": 3, "step": 1}})
    search = load_search_spec("sft", path, trials=4)
    assert search.trials == 4 and search.sampler == "tpe" and search.space["learning_rate"].low == 1e-5
    dpo = load_search_spec("dpo", write_space(tmp_path, {"beta": {"choices": ["0.05", 0.2]}}), sampler="grid")
    assert dpo.space["beta"].choices == [0.05, 0.2] and dpo.sampler == "grid"  # coerced by DPOSpec
    full = load_search_spec("sft", write_space(tmp_path, {"space": {"lora.r": {"choices": [4]}}, "trials": 2,
                                                          "sampler": "random"}))
    assert full.trials == 2 and full.sampler == "random"


@pytest.mark.parametrize("method,space,message", [
    ("sft", {"lora.rank": {"choices": [4]}}, "lora.rank: unknown key for sft (did you mean 'lora.r'?)"),
    ("sft", {"beta": {"low": 0.1, "high": 0.5}}, "beta: unknown key for sft"),
    ("sft", {"lora": {"choices": [4]}}, "lora: unknown key for sft"),
    ("sft", {"lora.r": {"low": 0, "high": 8}}, "lora.r: 0 is not a valid value: Input should be greater than or equal to 1"),
    ("sft", {"batch_size": {"low": 1.5, "high": 8}}, "batch_size: an integer setting needs integer low/high/step"),
    ("sft", {"lr_scheduler": {"low": 1, "high": 2}}, "lr_scheduler: not a number, so it takes choices"),
    ("sft", {"lr_scheduler": {"choices": ["linear", "stepwise"]}}, "lr_scheduler: 'stepwise' is not a valid value"),
    ("sft", {"learning_rate": {"low": 1e-3, "high": 1e-5}}, "learning_rate: low (0.001) must be below high"),
    ("sft", {"learning_rate": {"low": 0, "high": 1e-3, "log": True}}, "learning_rate: log needs low > 0"),
    ("sft", {"learning_rate": {"low": 1e-5}}, "learning_rate: a distribution needs choices, or both low and high"),
    ("sft", {"learning_rate": {"low": 1e-5, "high": 1e-3, "spread": 2}}, "learning_rate.spread: unknown field"),
    ("dpo", {"beta": {"low": 0.1, "high": 5}}, "beta: 5.0 is not a valid value"),
])
def test_bad_spaces_are_one_line_naming_file_and_key(tmp_path, method, space, message):
    path = write_space(tmp_path, space)
    with pytest.raises(SpecError) as caught:
        load_search_spec(method, path)
    assert str(caught.value).startswith(f"{path}: ") and message in str(caught.value), str(caught.value)


def test_a_grid_needs_countable_values_and_enqueued_keys_must_be_in_the_space(tmp_path):
    path = write_space(tmp_path, {"learning_rate": {"low": 1e-5, "high": 1e-3}})
    with pytest.raises(SpecError, match="learning_rate: a grid needs choices, or a step for a float range"):
        load_search_spec("sft", path, sampler="grid")
    path = write_space(tmp_path, {"space": {"lora.r": {"choices": [4, 8]}}, "enqueue": [{"lora.alpha": 8}]})
    with pytest.raises(SpecError, match=r"enqueue\[0\]: lora.alpha: not a key of the space"):
        load_search_spec("sft", path)


def test_the_cli_refuses_a_bad_space_before_training(tmp_path, tiny_model_dir):
    spec = write_eval(tmp_path, f"local:{tiny_model_dir}")
    db = tmp_path / "flywheel.db"
    runner = CliRunner()
    assert runner.invoke(main, ["capture", str(spec), "--teacher", "reference:label", "--db", str(db)]).exit_code == 0
    space = write_space(tmp_path, {"lora.rnak": {"choices": [4, 8]}})
    result = runner.invoke(main, ["train", "sft", str(spec), "--base", f"local:{tiny_model_dir}", "--search",
                                  str(space), "--trials", "2", "--db", str(db)])
    assert result.exit_code == 1
    [line] = result.output.strip().splitlines()
    assert line.startswith(f"error: {space}: lora.rnak: unknown key for sft (did you mean 'lora.r'?); known: "
                           "lora.r, lora.alpha, lora.dropout, lora.target_modules, ")
    store = Store.open(db)
    assert store.db["training_jobs"].count == 0 and store.db["training_searches"].count == 0
    store.close()
    usage = runner.invoke(main, ["train", "sft", str(spec), "--base", f"local:{tiny_model_dir}", "--trials", "2"])
    assert usage.exit_code == 2 and "--trials, --sampler and --wall-s need --search" in usage.output


# -- choosing the best -----------------------------------------------------------------------------
def test_the_leader_wins_only_when_a_paired_test_separates_it(tmp_path):
    """Three fixed sets of valid outputs (no model): all right, one wrong, fifteen wrong."""
    rows = []
    for i in range(20):
        rows.append({"id": f"v{i}", "text": f"q{i}", "label": "pin_blocked", "split": "valid",
                     "a": "pin_blocked", "b": "pin_blocked" if i else "card_arrival",
                     "c": "pin_blocked" if i < 5 else "card_arrival"})
    write_jsonl(tmp_path / "data.jsonl", rows)
    store = Store.open(tmp_path / "flywheel.db")
    iterations, spec = {}, None
    for column in "abc":
        data = spec_dict("unused", outputs={"field": column})
        data.pop("model")
        (tmp_path / f"{column}.yaml").write_text(yaml.safe_dump(data))
        spec = load_eval_spec(tmp_path / f"{column}.yaml")
        iterations[column] = run_eval(spec, store, split="valid").iteration_id

    def trial(number, column, score, r, steps=10):
        return Trial(number=number, params={"lora.r": r}, state="complete", valid_iteration_id=iterations[column],
                     valid_score=score, steps=steps, config={"lora": {"r": r}, "batch_size": 4, "grad_accum": 1})

    best, reason, comparisons = choose_best(store, spec, [trial(0, "a", 1.0, 16), trial(1, "b", 0.95, 4),
                                                          trial(2, "c", 0.25, 8)], finalists=3)
    assert best == 1, reason  # no test separates 0 from 1, and 1 is simpler (r=4)
    assert "no paired test separates it from trial(s) 1" in reason and "LoRA r=4" in reason
    assert [c["leader_significantly_better"] for c in comparisons] == [False, True]
    best, reason, _ = choose_best(store, spec, [trial(0, "a", 1.0, 16), trial(2, "c", 0.25, 8),
                                                Trial(number=3, params={}, state="pruned")], finalists=3)
    assert best == 0 and "significantly better than the other finalists" in reason and "McNemar" in reason
    best, _, _ = choose_best(store, spec, [trial(0, "a", 1.0, 16), trial(1, "b", 0.95, 4)], finalists=1)
    assert best == 0  # one finalist: no comparison
    # Equally simple (same rank, same examples): the leader stays, however long it took.
    slow, fast = trial(0, "a", 1.0, 8), trial(1, "b", 0.95, 8)
    slow.wall_s, fast.wall_s = 75.0, 65.0
    best, reason, _ = choose_best(store, spec, [fast, slow], finalists=2)
    assert best == 0 and reason.startswith("trial 0 leads on valid (1.000); no paired test separates it from "
                                           "trial(s) 1") and reason.endswith("none of them is simpler (LoRA r=8, "
                                                                             "40 examples trained), so it stays")
    store.close()


# -- real searches on the tiny model ---------------------------------------------------------------
@pytest.fixture(scope="module")
def captured(tmp_path_factory, tiny_model_dir):
    folder = tmp_path_factory.mktemp("search")
    spec = tiny_eval(folder, tiny_model_dir, n_per_split=6)
    store = Store.open(folder / "flywheel.db")
    capture(spec, store, "reference:label")
    yield spec, store, build_sft_set(spec, store)
    store.close()


def _search(**fields) -> SearchSpec:
    return SearchSpec.model_validate(fields)


def test_grid_enumerates_every_combination_and_records_each_trial(captured):
    spec, store, training_set = captured
    search = _search(space={"lora.r": {"choices": [2, 4]}, "learning_rate": {"choices": [1e-2, 2e-2]}},
                     trials=10, sampler="grid", pruning=False)
    lines = []
    result = run_search("sft", spec, store, training_set, search, base=spec.model, config=quick_sft(max_steps=2),
                        splits=("valid",), log=lines.append)
    assert sorted((t.params["lora.r"], t.params["learning_rate"]) for t in result.trials) == [
        (2, 0.01), (2, 0.02), (4, 0.01), (4, 0.02)]
    assert result.stopped_by == "grid exhausted" and all(t.state == "complete" for t in result.trials)
    rows = store.search_trials(result.id)
    assert [r["number"] for r in rows] == [0, 1, 2, 3]
    for row, trial in zip(rows, result.trials):
        job = store.db["training_jobs"].get(row["job_id"])
        ckpt = store.get_checkpoint(row["checkpoint_id"])
        assert job["status"] == "succeeded" and job["checkpoint_id"] == row["checkpoint_id"]
        config = ckpt.config
        assert (config["lora"]["r"], config["learning_rate"]) == (trial.params["lora.r"], trial.params["learning_rate"])
        assert json.loads(row["params_json"]) == trial.params and row["state"] == "complete"
        assert store.get_iteration(row["valid_iteration_id"]).split == "valid"
        assert row["valid_score"] == trial.valid_score and row["steps"] == 2 and row["wall_s"] > 0
    saved = store.get_training_search(result.id)
    assert saved["status"] == "succeeded" and saved["best_trial"] == result.best is not None
    assert saved["best_checkpoint_id"] == result.checkpoint.id == result.trials[result.best].checkpoint_id
    assert saved["reason"] == result.reason and saved["signal"] == "loss"
    assert json.loads(saved["settings_json"])["sampler"] == "grid"
    table = result.summary_lines()
    assert "lora.r" in table[1] and "learning_rate" in table[1] and len(table) >= 2 + 4 + 1
    assert len([line for line in lines if line.startswith("  trial ")]) == 4
    assert json.loads(json.dumps(result.to_dict()))["trials"][0]["params"]


def test_tpe_runs_n_trials_with_pruning_on_a_constructed_case(captured):
    """Two trials learn (lr 2e-2); the third barely moves (lr 1e-9), so at step 3 its training loss
    is above the median of the first two at the same step (same data order): pruned."""
    spec, store, training_set = captured
    search = _search(space={"learning_rate": {"low": 1e-9, "high": 5e-2, "log": True}}, trials=4,
                     sampler="tpe", prune_startup_trials=2, prune_warmup_steps=3, seed=1,
                     enqueue=[{"learning_rate": 2e-2}, {"learning_rate": 3e-2}, {"learning_rate": 1e-9}])
    result = run_search("sft", spec, store, training_set, search, base=spec.model, config=quick_sft(max_steps=6),
                        splits=("valid",))
    assert len(result.trials) == 4 == len(store.search_trials(result.id)) and result.stopped_by == "4 trials"
    pruned = result.trials[2]
    assert pruned.state == "pruned" and pruned.checkpoint_id is None and "pruned at step" in pruned.error
    assert pruned.steps is not None and pruned.steps < 6
    job = store.db["training_jobs"].get(pruned.job_id)
    assert job["status"] == "pruned" and "median" in job["error"]
    assert [t.state for t in result.trials[:2]] == ["complete", "complete"]
    assert result.best in (0, 1, 3) and result.trials[result.best].state == "complete"
    row = store.search_trials(result.id)[2]
    assert row["state"] == "pruned" and row["job_id"] == pruned.job_id and row["checkpoint_id"] is None


def test_the_wall_budget_stops_new_trials(captured):
    spec, store, training_set = captured
    search = _search(space={"lora.r": {"choices": [2, 4, 8]}}, trials=3, sampler="random", wall_s=0.5)
    result = run_search("sft", spec, store, training_set, search, base=spec.model, config=quick_sft(max_steps=1),
                        splits=("valid", "test"))
    assert len(result.trials) == 1 and result.stopped_by == "the wall-clock budget"
    assert result.best == 0 and result.test is not None and result.test.split == "test"
    assert store.get_training_search(result.id)["stopped_by"] == "the wall-clock budget"


def test_train_cli_search_json(tmp_path, tiny_model_dir):
    spec = write_eval(tmp_path, f"local:{tiny_model_dir}")
    db = tmp_path / "flywheel.db"
    runner = CliRunner()
    assert runner.invoke(main, ["capture", str(spec), "--teacher", "reference:label", "--db", str(db)]).exit_code == 0
    space = write_space(tmp_path, {"lora.r": {"choices": [2, 4]}})
    result = runner.invoke(main, ["train", "sft", str(spec), "--base", f"local:{tiny_model_dir}", "--search",
                                  str(space), "--trials", "2", "--sampler", "random", "--split", "valid",
                                  "-s", "max_steps=1", "-s", "precision=fp32", "--db", str(db), "--json"])
    assert result.exit_code == 0, result.output
    data = json.loads(result.stdout)
    assert len(data["trials"]) == 2 and data["best"] in (0, 1) and data["reason"]
    assert {t["state"] for t in data["trials"]} == {"complete"} and data["checkpoint"]["id"].startswith("sft-")
    assert SFTSpec().lora.r == 16  # the base config is untouched by the trials
    text = runner.invoke(main, ["train", "sft", str(spec), "--base", f"local:{tiny_model_dir}", "--search",
                                str(space), "--trials", "1", "--split", "valid", "-s", "max_steps=1",
                                "-s", "precision=fp32", "--db", str(db)])
    assert text.exit_code == 0, text.output
    lines = text.stdout.splitlines()
    assert lines[0].startswith("sft search search-sft-") and "stopped by 1 trial;" in lines[0]
    assert lines[1].split()[:3] == ["trial", "state", "lora.r"] and lines[2].split()[:2] == ["0", "complete"]
    assert lines[3] == "best: trial 0, the only completed trial (valid " + lines[3].split("(valid ", 1)[1]
    assert "  trial 0 lora.r=" in text.stderr  # progress goes to stderr


# -- the wheel's `search:` block and the reports ---------------------------------------------------
def _write_run(tmp_path, model_dir, stages):
    write_jsonl(tmp_path / "data.jsonl", make_rows(6))
    (tmp_path / "eval.yaml").write_text(yaml.safe_dump(spec_dict(f"local:{model_dir}")))
    (tmp_path / "run.yaml").write_text(yaml.safe_dump({"eval": "eval.yaml", "plateau": 9, "stages": stages}))
    return tmp_path / "run.yaml"


def test_a_bad_search_block_is_one_line_when_the_run_spec_loads(tmp_path):
    path = _write_run(tmp_path, tmp_path, [{"stage": "dpo", "search": {"space": {"lora.rank": {"choices": [4]}}}}])
    with pytest.raises(SpecError) as caught:
        load_run_spec(path)
    assert str(caught.value) == (f"{path}: stages[0].dpo: search: lora.rank: unknown key for dpo (did you mean "
                                 f"'lora.r'?); known: " + str(caught.value).split("; known: ", 1)[1])
    assert "\n" not in str(caught.value)


def test_the_wheel_runs_a_search_stage_and_its_report_shows_the_table(tmp_path, tiny_model_dir, store):
    stages = [{"stage": "capture", "teacher": "reference:label"},
              {"stage": "sft", "config": {"max_steps": 1, "precision": "fp32", "batch_size": 4},
               "search": {"space": {"lora.r": {"choices": [2, 4]}}, "sampler": "grid", "trials": 5}}]
    result = run_wheel(load_run_spec(_write_run(tmp_path, tiny_model_dir, stages)), store,
                       report_dir=str(tmp_path / "reports"))
    sft = result.stages[1]
    assert sft.decision in ("promoted", "rejected") and "search search-sft-" in sft.reason, sft.reason
    [search] = store.training_searches([result.run_id])
    assert search["status"] == "succeeded" and len(store.search_trials(search["id"])) == 2
    assert search["best_checkpoint_id"] in sft.reason
    # Resumed after a kill, the stage finds the finished search of its run and trains nothing.
    run_spec = load_run_spec(tmp_path / "run.yaml")
    stage = TrainStage(run_spec.stages[1])
    spec = load_eval_spec(tmp_path / "eval.yaml")
    logged = []
    wheel = SimpleNamespace(spec=spec, store=store, run_id=result.run_id, lap=1, log=logged.append)
    prompt = Prompt(messages=spec.messages())
    jobs = store.db["training_jobs"].count
    again = stage.search(wheel, build_sft_set(spec, store, prompt=prompt), spec.model, prompt,
                         SFTSpec(max_steps=1, precision="fp32", batch_size=4))
    assert logged == [f"  reusing search {search['id']}, finished before"] and again.decision == "proposed"
    assert store.db["training_jobs"].count == jobs and len(store.training_searches([result.run_id])) == 1
    html = open(result.report_path, encoding="utf-8").read()
    assert f'id="{search["id"]}"' in html and "★ best" in html and "Hyper-parameter search" in html
    page = tmp_path / "search.html"
    out = CliRunner().invoke(main, ["report", search["id"], "-o", str(page), "--db", str(store.path)])
    assert out.exit_code == 0, out.output
    text = page.read_text(encoding="utf-8")
    assert "<script" not in text and text.count("<tr") == 3 and search["reason"].split(" (")[0] in text


def test_a_dpo_search_over_beta_from_an_sft_checkpoint(tmp_path, tiny_model_dir, store):
    from train_helpers import quick_dpo

    from flywheel.train import build_dpo_set
    from flywheel.train.sft import train_sft

    spec = tiny_eval(tmp_path, tiny_model_dir)
    capture(spec, store, "reference:label")
    capture(spec, store, spec.model, n=2, temperature=1.0)
    sft = train_sft(spec, store, build_sft_set(spec, store), base=spec.model, config=quick_sft(max_steps=2),
                    evaluate=False, quiet=True)
    search = load_search_spec("dpo", write_space(tmp_path, {"beta": {"choices": [0.05, 0.5]}}), sampler="grid")
    result = run_search("dpo", spec, store, build_dpo_set(spec, store), search, base=sft.checkpoint.id,
                        config=quick_dpo(max_steps=2), splits=("valid",))
    assert sorted(t.params["beta"] for t in result.trials) == [0.05, 0.5]
    for trial in result.trials:
        ckpt = store.get_checkpoint(trial.checkpoint_id)
        assert ckpt.parent_id == sft.checkpoint.id and ckpt.config["beta"] == trial.params["beta"]
    assert result.checkpoint is not None and result.checkpoint.method == "dpo"


def test_a_failing_trial_is_recorded_and_the_search_goes_on(captured):
    """liger=true is refused here (no liger-kernel package, no CUDA GPU): that trial's job fails, the
    other trial completes and wins."""
    spec, store, training_set = captured
    search = _search(space={"liger": {"choices": [True, False]}}, sampler="grid", trials=2, pruning=False)
    result = run_search("sft", spec, store, training_set, search, base=spec.model, config=quick_sft(max_steps=1),
                        splits=("valid",))
    by_liger = {t.params["liger"]: t for t in result.trials}
    failed, done = by_liger[True], by_liger[False]
    assert failed.state == "failed" and "liger=true" in failed.error
    assert store.db["training_jobs"].get(failed.job_id)["status"] == "failed"
    assert store.search_trials(result.id)[failed.number]["state"] == "failed"
    assert done.state == "complete" and result.best == done.number
    assert "the only completed trial" in result.reason


def test_with_an_eval_dataset_the_pruner_is_fed_the_eval_loss(tmp_path):
    """The callback reads `eval_loss` when the trainer evaluates (real TrainingArguments, a real
    Optuna trial): training losses are then ignored, and a worse eval loss than the median prunes."""
    import optuna
    from transformers import TrainerControl, TrainerState, TrainingArguments

    from flywheel.train.search import pruning_callback

    study = optuna.create_study(direction="maximize",
                                pruner=optuna.pruners.MedianPruner(n_startup_trials=0, n_warmup_steps=0))
    earlier = study.ask()
    earlier.report(-1.0, 2)
    study.tell(earlier, 0.5)
    losses, signal = [], ["loss"]
    callback = pruning_callback(study.ask(), losses, signal)
    args = TrainingArguments(output_dir=str(tmp_path), eval_strategy="steps", eval_steps=2, report_to=[],
                             use_cpu=True)
    state, control = TrainerState(), TrainerControl()
    state.global_step = 2
    callback.on_train_begin(args, state, control)
    assert signal == ["eval_loss"]
    callback.on_log(args, state, control, logs={"loss": 9.0})
    assert losses == []
    with pytest.raises(optuna.TrialPruned, match="pruned at step 2: eval_loss 5 is worse than the median"):
        callback.on_log(args, state, control, logs={"eval_loss": 5.0})
    assert losses == [(2, 5.0)]
    no_eval = TrainingArguments(output_dir=str(tmp_path), report_to=[], use_cpu=True)
    callback.on_train_begin(no_eval, state, control)
    assert signal == ["loss"]


def test_a_search_with_validation_prunes_on_eval_loss_and_compares_each_trials_best_checkpoint(captured):
    """End to end, no constructed TrainingArguments: trials validate every 2 steps and save a scored
    checkpoint there. The pruner is fed TRL's eval_loss (recorded as the search's signal); the trial
    that barely learns (lr 1e-9) has a worse eval loss at step 2 than the two before it: pruned. A
    completed trial is its job's best checkpoint by the graders, and that is what the search pairs."""
    from flywheel.train.checkpoints import load_checkpoint
    from flywheel.train.validation import choose_best as best_of_job

    spec, store, training_set = captured
    search = _search(space={"learning_rate": {"low": 1e-9, "high": 5e-2, "log": True}}, trials=3,
                     sampler="tpe", prune_startup_trials=2, prune_warmup_steps=2, seed=1,
                     enqueue=[{"learning_rate": 2e-2}, {"learning_rate": 3e-2}, {"learning_rate": 1e-9}])
    config = quick_sft(max_steps=6, eval_steps=2, valid_subset=3, keep="all")
    assert config.save_steps == 2  # defaulted from eval_steps
    result = run_search("sft", spec, store, training_set, search, base=spec.model, config=config,
                        splits=("valid",))
    assert result.signal == "eval_loss" and store.get_training_search(result.id)["signal"] == "eval_loss"
    assert "pruning fed by eval_loss" in result.summary_lines()[0]
    assert [t.state for t in result.trials] == ["complete", "complete", "pruned"]
    pruned = result.trials[2]
    assert pruned.error.startswith("pruned at step 2: eval_loss") and pruned.steps == 2
    assert store.get_training_job(pruned.job_id).status == "pruned"
    assert store.job_checkpoints(pruned.job_id) == []  # pruned at the evaluation, before the step was saved
    # The loss the pruner saw is the job's stored validation loss, not a training loss.
    for trial in result.trials[:2]:
        points = [json.loads(e["data_json"]) for e in store.training_events(trial.job_id) if e["type"] == "validation"]
        valid_losses = {p["step"]: p["valid_loss"] for p in points if "valid_loss" in p}
        assert sorted(valid_losses) == [2, 4, 6] and trial.loss == pytest.approx(valid_losses[6])
        job = store.get_training_job(trial.job_id)
        saved = [load_checkpoint(store, c.id) for c in store.job_checkpoints(trial.job_id)]
        assert [c.step for c in saved] == [2, 4, 6] and all("valid_score" in c.metrics for c in saved)
        chosen, _ = best_of_job(saved)
        assert trial.checkpoint_id == job.checkpoint_id == chosen.id
        valid = store.get_iteration(trial.valid_iteration_id)
        assert valid.split == "valid" and store.get_run(valid.run_id).model_ref == chosen.model_ref
    assert result.checkpoint.id == result.trials[result.best].checkpoint_id
