"""GRPO with TRL on the tiny model: the eval's graders are the rewards.

The tiny random model never produces a label, so a pass/fail grader would reward every completion
0 and teach nothing (as on the demo before SFT). A fuzzy-match grader gives graded rewards that
differ inside a group, so the policy gradient is not zero and the adapter must move.
"""

from __future__ import annotations

import pytest
from train_helpers import events, quick_rft, tiny_eval

from flywheel.train import TrainingDataError, build_rft_set
from flywheel.train.rft import reward_functions, train_rft

FUZZY = {"type": "text_similarity", "name": "close", "input": "{{sample.output_text}}",
         "reference": "{{item.label}}", "evaluation_metric": "fuzzy_match", "pass_threshold": 0.8}


def test_rewards_are_the_spec_graders(tmp_path, tiny_model_dir):
    spec = tiny_eval(tmp_path, tiny_model_dir, graders=[FUZZY])
    [reward], close = reward_functions(spec)
    try:
        scores = reward(prompts=["p", "p"], completions=[[{"role": "assistant", "content": "card_arrival"}],
                                                         [{"role": "assistant", "content": "zzz"}]],
                        label=["card_arrival", "card_arrival"], completion_ids=[[1], [2]])
        assert scores[0] == 1.0 and scores[1] < 0.5 and reward.__name__ == "close"
    finally:
        close()
    with pytest.raises(TrainingDataError, match="no grader named 'nope'"):
        reward_functions(spec, ["nope"])


def test_grpo_steps_move_the_adapter_and_log_rewards(tmp_path, tiny_model_dir, store):
    spec = tiny_eval(tmp_path, tiny_model_dir, graders=[FUZZY], objective={"metric": "mean_score"})
    result = train_rft(spec, store, build_rft_set(spec), base=spec.model, config=quick_rft(),
                        splits=("valid",), quiet=True)
    m = result.metrics
    assert m["steps"] == 2 and m["rewards"] == ["close"]
    assert m["adapter_tensors_changed"] == m["adapter_tensors"] > 0
    logged = events(store, result.job_id)
    assert all("reward" in e and "rewards/close/mean" in e for e in logged if "loss" in e)
    assert 0.0 <= m["mean_reward"] <= 1.0
    [valid] = result.evals
    assert store.get_iteration(valid.iteration_id).stage == "rft"


# -- generation on vLLM: TRL's options pass through; a clear error where vLLM is missing ------------
def test_vllm_options_reach_trl(tmp_path):
    from flywheel.train.config import grpo_args

    config = quick_rft(use_vllm=True, vllm_mode="server", vllm_server_base_url="http://10.0.0.5:8000",
                       vllm_tensor_parallel_size=2, vllm_gpu_memory_utilization=0.5)
    args = grpo_args(config, tmp_path, bf16=False, max_completion_length=8)
    assert (args.use_vllm, args.vllm_mode, args.vllm_server_base_url) == (True, "server", "http://10.0.0.5:8000")
    assert (args.vllm_tensor_parallel_size, args.vllm_gpu_memory_utilization) == (2, 0.5)
    assert grpo_args(quick_rft(), tmp_path, bf16=False, max_completion_length=8).use_vllm is False


def test_use_vllm_without_vllm_is_one_clean_error_and_no_job(tmp_path, tiny_model_dir):
    import importlib.util
    import sqlite3

    from click.testing import CliRunner
    from train_helpers import write_eval

    from flywheel.cli import main

    if importlib.util.find_spec("vllm") is not None:
        pytest.skip("vllm is installed here: the guard has nothing to refuse")
    spec = write_eval(tmp_path, f"local:{tiny_model_dir}")
    db = tmp_path / "flywheel.db"
    result = CliRunner().invoke(main, ["train", "rft", str(spec), "--base", f"local:{tiny_model_dir}",
                                       "-s", "use_vllm=true", "-s", "vllm_mode=server", "--db", str(db)])
    assert result.exit_code == 1
    assert result.output == ("error: rft: use_vllm is set but the vllm package is not installed here: "
                             "pip install vllm (on a machine with a GPU), or set use_vllm=false\n")
    bad = CliRunner().invoke(main, ["train", "rft", str(spec), "--base", f"local:{tiny_model_dir}",
                                    "-s", "vllm_mode=remote", "--db", str(db)])
    assert bad.exit_code == 1 and "vllm_mode" in bad.output
    with sqlite3.connect(db) as conn:
        assert conn.execute("SELECT count(*) FROM training_jobs").fetchone()[0] == 0
