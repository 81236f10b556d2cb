"""flywheel.models.scoring: log-probabilities of candidate replies under a real local model.

The reference is the plain way: one unpadded forward pass over prompt + candidate per pair. The
batched scorer (left-padded prompts, a repeated KV cache, right-padded candidates) must agree.
"""

from __future__ import annotations

import math

import pytest

from flywheel.models import load_model
from flywheel.models.scoring import score_choices

CONVERSATIONS = [
    [{"role": "user", "content": "hi"}],
    [{"role": "system", "content": "You judge answers of a bank's support bot, strictly and fairly."},
     {"role": "user", "content": "Question: where is my card?\nAnswer: it is on its way, give it three days."}],
    [{"role": "user", "content": "Is 'I loved it' positive or negative?"}],
]
CHOICES = ['{"result": "positive"}', '{"result": "negative"}', "x", '{"result": 10}']


@pytest.fixture(scope="module")
def model(chatty_dir):
    m = load_model(f"local:{chatty_dir}", {"dtype": "fp32"})
    yield m
    m.close()


def reference(model, conversation, choice):
    import torch

    hf, tok = model.load()
    prompt = tok(tok.apply_chat_template(conversation, tokenize=False, add_generation_prompt=True),
                 add_special_tokens=False).input_ids
    tokens = tok(choice, add_special_tokens=False).input_ids
    with torch.inference_mode():
        logp = torch.log_softmax(hf(torch.tensor([prompt + tokens])).logits.float(), -1)[0]
    return sum(float(logp[len(prompt) - 1 + i, t]) for i, t in enumerate(tokens))


def test_batched_scores_equal_one_unpadded_pass_per_pair(model):
    got = model.score_choices(CONVERSATIONS, CHOICES)
    assert len(got) == len(CONVERSATIONS) and all(len(row) == len(CHOICES) for row in got)
    for conversation, row in zip(CONVERSATIONS, got):
        for choice, value in zip(CHOICES, row):
            assert value == pytest.approx(reference(model, conversation, choice), abs=1e-3)
            assert value < 0 and math.isfinite(value)


def test_a_shared_system_prompt_runs_once_and_changes_nothing(model):
    from flywheel.models.scoring import _shared_prefix

    system = {"role": "system", "content": "You grade replies. Respond with only a JSON object."}
    conversations = [[system, {"role": "user", "content": text}] for text in ("a", "a longer message here", "mid one")]
    _, tok = model.load()
    prompts = [tok(tok.apply_chat_template(c, tokenize=False, add_generation_prompt=True),
                   add_special_tokens=False).input_ids for c in conversations]
    assert _shared_prefix(prompts) >= 8
    got = model.score_choices(conversations, CHOICES)
    for conversation, row in zip(conversations, got):
        assert row == pytest.approx([reference(model, conversation, c) for c in CHOICES], abs=1e-3)


def test_small_batches_give_the_same_scores(model):
    whole = model.score_choices(CONVERSATIONS, CHOICES)
    one_row_at_a_time = score_choices(model, CONVERSATIONS, CHOICES, max_rows=1)
    for a, b in zip(whole, one_row_at_a_time):
        assert a == pytest.approx(b, abs=1e-4)


def test_empty_inputs(model):
    assert model.score_choices([], CHOICES) == []
    with pytest.raises(ValueError, match="at least one choice"):
        model.score_choices(CONVERSATIONS, [])
    with pytest.raises(ValueError, match="no tokens"):
        model.score_choices(CONVERSATIONS, ["a", ""])


def test_tokens_all_choices_share_are_scored_once_and_counted(model):
    choices = ['{"result": 1}', '{"result": 10}', '{"result": 7}', '{"result": "yes"}']
    got = model.score_choices(CONVERSATIONS, choices)
    for conversation, row in zip(CONVERSATIONS, got):
        assert row == pytest.approx([reference(model, conversation, c) for c in choices], abs=1e-3)
