"""score_model and label_model with the embedded SmolLM2-135M as the judge.

Its judgement is weak; what is tested is that the mechanism is exact on real replies: every grade
is either a number read from the reply and clipped to the range, or a parse error carrying the raw
reply, and a batch of samples is one chat call.
"""

import pytest

import graders
from graders.judge import ReplyParseError, parse_label_reply, parse_score_reply

pytestmark = pytest.mark.slow

models = pytest.importorskip("flywheel.models", reason="flywheel.models is not there yet")

QUESTIONS = [
    ("Where is my new card?", "Your card is on its way and should arrive within 3 working days."),
    ("How do I top up?", "Bananas are yellow."),
    ("Can I get a refund?", "Yes: open the transaction and tap 'Request refund'."),
    ("Why was I charged a fee?", ""),
]


class CountingJudge:
    """Passes every call to the real model and counts the calls (not a stand-in: the replies are SmolLM2's)."""

    def __init__(self, model):
        self.model, self.calls, self.conversations = model, 0, 0

    def chat(self, conversations, **kwargs):
        self.calls += 1
        self.conversations += len(conversations)
        return self.model.chat(conversations, **kwargs)


@pytest.fixture(scope="module")
def judge():
    model = models.load_model("local:smollm2")
    yield CountingJudge(model)
    close = getattr(model, "close", None)
    if close:
        close()


def test_score_model_with_smollm2(judge):
    cfg = {
        "type": "score_model", "name": "helpful", "model": "local:smollm2", "range": [0, 10], "pass_threshold": 5,
        "sampling_params": {"max_completions_tokens": 80, "temperature": 0},
        "input": [{"role": "system", "content": "You rate answers of a bank's support bot from 0 (useless) to 10 (perfect)."},
                  {"role": "user", "content": "Question: {{item.question}}\nAnswer: {{sample.output_text}}"}],
    }
    resolved = []
    grader = graders.build_grader(cfg, judge=lambda ref: resolved.append(ref) or judge)
    before = judge.calls
    grades = grader.grade_batch([a for _, a in QUESTIONS], [{"question": q} for q, _ in QUESTIONS])
    assert resolved == ["local:smollm2"]
    assert judge.calls - before == 1
    for grade in grades:
        reply = grade.details["reply"]
        assert isinstance(reply, str)
        if grade.error is None:
            raw, _ = parse_score_reply(reply)
            assert grade.details["result"] == raw
            assert grade.score == min(10.0, max(0.0, raw))
            assert grade.passed == (grade.score >= 5)
        else:
            assert grade.error == "model_grader_parse_error"
            assert grade.error_details == reply
            assert grade.score == 0.0 and grade.passed is False
            with pytest.raises(ReplyParseError):
                parse_score_reply(reply)


def test_label_model_with_smollm2(judge):
    cfg = {
        "type": "label_model", "name": "on topic", "model": "local:smollm2",
        "input": [{"role": "user", "content": "{{item.prompt}}"}],
        "labels": ["yes", "no"], "passing_labels": ["yes"], "sampling_params": {"max_completions_tokens": 16},
    }
    grader = graders.build_grader(cfg, judge=judge)
    before = judge.calls
    # SmolLM2-135M rarely answers a real question in the asked format; asked to copy a JSON object
    # it does (greedy decoding), which makes the successful branch run on real replies too.
    prompts = [f"Does this answer the question? Question: {q} Answer: {a}" for q, a in QUESTIONS]
    prompts += ['Copy this JSON exactly and write nothing else: {"result": "yes"}',
                'Copy this JSON exactly and write nothing else: {"result": "no"}']
    grades = grader.grade_batch(["-"] * len(prompts), [{"prompt": p} for p in prompts])
    assert judge.calls - before == 1
    assert any(g.error is None for g in grades), [g.details["reply"] for g in grades]
    for grade in grades:
        reply = grade.details["reply"]
        if grade.error is None:
            assert grade.details["label"] == parse_label_reply(reply, ["yes", "no"])
            assert grade.score == (1.0 if grade.details["label"] == "yes" else 0.0)
        else:
            assert grade.error == "model_grader_parse_error" and grade.error_details == reply
            with pytest.raises(ReplyParseError):
                parse_label_reply(reply, ["yes", "no"])
