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
    [reward], grader_set = reward_functions(spec)
    try:
        scores = reward(prompts=["p", "p"], completions=[[{"role": "assistant", "content": "card_arrival"}],
                                                         [{"role": "assistant", "content": "zzz"}]],
                        label=["card_arrival", "card_arrival"], completion_ids=[[1], [2]])
        assert scores[0] == 1.0 and scores[1] < 0.5 and reward.__name__ == "close"
    finally:
        grader_set.close()
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
    assert store.get_iteration(valid.iteration_id)["stage"] == "rft"
