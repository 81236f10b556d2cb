"""graders.reward_function: called exactly as TRL's GRPOTrainer calls reward functions."""

from types import SimpleNamespace

import pytest

import graders

LABEL = {"type": "string_check", "name": "label match", "input": "{{sample.output_text}}",
         "reference": "{{item.label}}", "operation": "ilike"}


def test_plain_completions_with_trl_keyword_arguments():
    reward = graders.reward_function(LABEL)
    scores = reward(prompts=["Where is my card?", "Refund?"], completions=["card_arrival", "no idea"],
                    completion_ids=[[1, 2], [3]], label=["card_arrival", "refund"], trainer_state=object(),
                    log_extra=lambda *a: None, log_metric=lambda *a: None)
    assert scores == [1.0, 0.0]
    assert reward.__name__ == "label_match"
    assert isinstance(reward.grader, graders.Grader)


def test_conversational_completions_and_prompt_in_item():
    reward = graders.reward_function({"type": "python", "name": "echo",
                                      "source": "def grade(s, i):\n    return float(i['prompt'][0]['content'] in s['output_text'])\n"})
    prompts = [[{"role": "user", "content": "ping"}], [{"role": "user", "content": "pong"}]]
    completions = [[{"role": "assistant", "content": "ping back"}], [{"role": "assistant", "content": "nothing"}]]
    try:
        assert reward(prompts=prompts, completions=completions) == [1.0, 0.0]
    finally:
        reward.grader.close()


def test_errors_score_zero():
    reward = graders.reward_function(LABEL)
    assert reward(prompts=["p"], completions=["x"]) == [0.0]  # no `label` column: invalid variable -> 0


def test_a_built_grader_and_multi_reward():
    multi = {"type": "multi", "name": "format+label", "calculate_output": "0.2 * fmt + 0.8 * label",
             "graders": {"fmt": {"type": "python", "name": "fmt", "source": "def grade(s, i):\n    return float(s['output_json'] is not None)\n"},
                         "label": dict(LABEL, name="label")}}
    with graders.build_grader(multi) as g:
        reward = graders.reward_function(g)
        assert reward(prompts=["a", "b", "c"], completions=['{"intent": "refund"}', "refund", '"x"'],
                      label=["refund", "refund", "refund"]) == pytest.approx([1.0, 0.8, 0.2])


def test_through_trls_own_reward_code():
    """TRL's GRPOTrainer._calculate_rewards, run for real on a minimal trainer state."""
    torch = pytest.importorskip("torch")
    from trl import GRPOTrainer

    reward = graders.reward_function(LABEL)
    trainer = SimpleNamespace(
        accelerator=SimpleNamespace(device=torch.device("cpu"), is_main_process=True),
        args=SimpleNamespace(report_to=[]), state=SimpleNamespace(global_step=0),
        reward_funcs=[reward], reward_processing_classes=[None], reward_func_names=[reward.__name__],
        _log_completion_extra=lambda *a, **k: None, _log_metric=lambda *a, **k: None, environments=None,
    )
    inputs = [{"prompt": [{"role": "user", "content": "q1"}], "label": "card_arrival"},
              {"prompt": [{"role": "user", "content": "q2"}], "label": "refund"},
              {"prompt": [{"role": "user", "content": "q3"}], "label": "refund"}]
    completions = [[{"role": "assistant", "content": "Card_Arrival"}],
                   [{"role": "assistant", "content": "lost card"}],
                   [{"role": "assistant", "content": "REFUND please"}]]
    rewards = GRPOTrainer._calculate_rewards(trainer, inputs, [x["prompt"] for x in inputs], completions, [[1], [2], [3]])
    assert rewards.tolist() == [[1.0], [0.0], [1.0]]
