"""score_model / label_model mechanics.

The judge here is a scripted in-process JudgeModel: it answers with canned reply texts so that
the tests can check the parsing, clipping, batching and error recording EXACTLY. It is a test
double for the model only (a real model's replies are not controllable); the same graders run
against the embedded SmolLM2 in test_graders_judge_smollm2.py.
"""

import json

import pytest

import graders
from graders.judge import JudgeModel, ReplyParseError, parse_label_reply, parse_score_reply


class ScriptedJudge:
    """Replies with `replies[i]` to the i-th conversation of every call; records the calls."""

    def __init__(self, replies=None, *, by_content=None, error=None):
        self.replies = replies
        self.by_content = by_content
        self.error = error
        self.calls = []

    def chat(self, conversations, *, temperature=0.0, max_tokens=256, seed=None, response_format=None):
        self.calls.append({"conversations": conversations, "temperature": temperature, "max_tokens": max_tokens,
                           "seed": seed, "response_format": response_format})
        if self.error:
            raise self.error
        if self.by_content:
            return [self.by_content(c) for c in conversations]
        return list(self.replies[: len(conversations)])


SCORE = {
    "type": "score_model", "name": "helpful", "model": "judge-a",
    "input": [{"role": "system", "content": "Grade the answer."},
              {"role": "user", "content": "Q: {{item.q}}\nA: {{sample.output_text}}"}],
    "range": [0, 10], "pass_threshold": 7,
}
LABEL = {
    "type": "label_model", "name": "correct", "model": "judge-b",
    "input": [{"role": "user", "content": [{"type": "input_text", "text": "Expected {{item.label}}, got {{sample.output_text}}"}]}],
    "labels": ["correct", "incorrect"], "passing_labels": ["correct"],
}


def test_scripted_judge_satisfies_the_protocol():
    assert isinstance(ScriptedJudge([]), JudgeModel)


@pytest.mark.parametrize("reply, value", [
    ('{"steps": [], "result": 0.8}', 0.8),
    ('Sure! Here is my grade:\n```json\n{"steps": [{"description": "d", "conclusion": "ok"}], "result": 7}\n```\nThanks', 7.0),
    ('{"result": "0.25"}', 0.25),
    ("6", 6.0),
    (" 6.5. ", 6.5),
    ('{"note": "x"} then {"result": 3}', 3.0),
    ('{"result": -2e1}', -20.0),
])
def test_parse_score_reply(reply, value):
    assert parse_score_reply(reply)[0] == value


@pytest.mark.parametrize("reply, reason", [
    ("", "empty"),
    ("I think it deserves an 8 out of 10.", "no JSON object with a numeric 'result'"),
    ('{"score": 8}', "no JSON object with a numeric 'result'"),
    ('{"result": "high"}', "'result' is not a number"),
    ('{"result": true}', "'result' is not a number"),
    ('{"result": NaN}', "not a finite number"),
    ('{"result": 8', "no JSON object"),
])
def test_parse_score_reply_errors(reply, reason):
    with pytest.raises(ReplyParseError, match=reason):
        parse_score_reply(reply)


@pytest.mark.parametrize("reply, label", [
    ('{"result": "correct"}', "correct"),
    ("incorrect", "incorrect"),
    ('"Correct".', "correct"),
    ("  INCORRECT\n", "incorrect"),
    ('The answer: {"label": "incorrect"}', "incorrect"),
])
def test_parse_label_reply(reply, label):
    assert parse_label_reply(reply, ["correct", "incorrect"]) == label


@pytest.mark.parametrize("reply", ["", "The answer is correct", "maybe", '{"result": "right"}'])
def test_parse_label_reply_errors(reply):
    with pytest.raises(ReplyParseError):
        parse_label_reply(reply, ["correct", "incorrect"])


def test_label_case_match_must_be_unambiguous():
    assert parse_label_reply("Yes", ["yes", "no"]) == "yes"
    with pytest.raises(ReplyParseError):
        parse_label_reply("yes", ["Yes", "YES"])


def test_score_model_batches_one_call_and_clips():
    judge = ScriptedJudge(['{"steps": [{"description": "facts", "conclusion": "all right"}], "result": 9}',
                           '{"result": 14}', '{"result": -3}', "no idea", '{"result": 7}'])
    resolved = []
    g = graders.build_grader(SCORE, judge=lambda model: resolved.append(model) or judge)
    items = [{"q": f"question {i}"} for i in range(5)]
    grades = g.grade_batch([f"answer {i}" for i in range(5)], items)
    assert resolved == ["judge-a"]
    assert len(judge.calls) == 1 and len(judge.calls[0]["conversations"]) == 5
    assert [x.score for x in grades] == [9.0, 10.0, 0.0, 0.0, 7.0]
    assert [x.passed for x in grades] == [True, True, False, False, True]  # 7 >= 7
    assert grades[0].feedback == "judge scored 9 in [0, 10] (threshold 7): pass; judge: all right"
    assert grades[1].feedback.startswith("judge scored 10 (clipped from 14) in [0, 10]")
    assert grades[1].details["result"] == 14.0
    bad = grades[3]
    assert bad.error == "model_grader_parse_error" and bad.error_details == "no idea"
    assert bad.details["reply"] == "no idea" and bad.score == 0.0 and not bad.passed
    assert "could not read the judge's reply" in bad.feedback


def test_score_model_renders_messages_and_asks_for_json():
    judge = ScriptedJudge(['{"result": 5}'])
    g = graders.build_grader(SCORE, judge=judge)
    grade = g.grade("Your card arrives in 3 days.", {"q": "Where is my card?"})
    conversation = judge.calls[0]["conversations"][0]
    assert conversation[0]["role"] == "system"
    assert conversation[0]["content"].startswith("Grade the answer.\n\nRespond with only a JSON object")
    assert '"result": <a number from 0 to 10>' in conversation[0]["content"]
    assert conversation[1] == {"role": "user", "content": "Q: Where is my card?\nA: Your card arrives in 3 days."}
    assert judge.calls[0]["response_format"]["json_schema"]["schema"]["required"] == ["steps", "result"]
    assert judge.calls[0]["temperature"] == 0.0 and judge.calls[0]["max_tokens"] == 512
    assert grade.details["messages"] == conversation and grade.score == 5.0 and not grade.passed


def test_sampling_params_reach_the_judge():
    cfg = dict(SCORE, sampling_params={"temperature": 0.7, "max_completions_tokens": 99, "seed": 3})
    judge = ScriptedJudge(['{"result": 1}'])
    graders.build_grader(cfg, judge=judge).grade("a", {"q": "b"})
    call = judge.calls[0]
    assert (call["temperature"], call["max_tokens"], call["seed"]) == (0.7, 99, 3)


def test_default_threshold_is_middle_of_range():
    cfg = {k: v for k, v in SCORE.items() if k != "pass_threshold"}
    g = graders.build_grader(cfg, judge=ScriptedJudge(['{"result": 5}', '{"result": 4.99}']))
    assert [x.passed for x in g.grade_batch(["a", "b"], [{"q": 1}, {"q": 2}])] == [True, False]


def test_judge_failure_is_a_server_error_grade():
    g = graders.build_grader(SCORE, judge=ScriptedJudge(error=ConnectionError("judge unreachable")))
    grades = g.grade_batch(["a", "b"], [{"q": 1}, {"q": 2}])
    assert all(x.error == "model_grader_server_error" for x in grades)
    assert grades[0].error_details == "ConnectionError: judge unreachable"
    short = graders.build_grader(SCORE, judge=ScriptedJudge(['{"result": 1}']))
    grades = short.grade_batch(["a", "b"], [{"q": 1}, {"q": 2}])
    assert all(x.error == "model_grader_server_error" for x in grades)
    assert "returned 1 replies for 2 conversations" in grades[0].error_details


def test_resolver_failure_is_a_server_error_grade():
    def resolver(model):
        raise RuntimeError(f"unknown model {model}")

    grade = graders.build_grader(SCORE, judge=resolver).grade("a", {"q": 1})
    assert grade.error == "model_grader_server_error" and "unknown model judge-a" in grade.error_details


def test_missing_variable_skips_the_judge_for_that_sample_only():
    judge = ScriptedJudge(['{"result": 8}'])
    grades = graders.build_grader(SCORE, judge=judge).grade_batch(["a", "b"], [{}, {"q": "ok"}])
    assert grades[0].error == "invalid_variable_error"
    assert grades[1].score == 8.0
    assert len(judge.calls[0]["conversations"]) == 1


def test_no_judge_is_a_usage_error():
    with pytest.raises(ValueError, match="needs a judge model"):
        graders.build_grader(SCORE)


def test_label_model():
    def by_content(conversation):
        text = conversation[-1]["content"]
        if "got card_arrival" in text:
            return '{"result": "correct"}'
        if "got refund" in text:
            return "Incorrect"
        return "I am not sure"

    judge = ScriptedJudge(by_content=by_content)
    g = graders.build_grader(LABEL, judge=judge)
    grades = g.grade_batch(["card_arrival", "refund", "???"], [{"label": "card_arrival"}] * 3)
    assert len(judge.calls) == 1
    assert [x.score for x in grades] == [1.0, 0.0, 0.0]
    assert [x.passed for x in grades] == [True, False, False]
    assert grades[0].details["label"] == "correct"
    assert grades[0].feedback == "judge chose 'correct' (passing: 'correct'): pass"
    assert grades[1].details["label"] == "incorrect" and grades[1].error is None
    assert grades[2].error == "model_grader_parse_error" and grades[2].error_details == "I am not sure"
    schema = judge.calls[0]["response_format"]["json_schema"]["schema"]
    assert schema["properties"]["result"]["enum"] == ["correct", "incorrect"]
    assert judge.calls[0]["conversations"][0][0]["role"] == "system"  # instruction added


def test_developer_role_becomes_system_and_images_are_rejected():
    cfg = json.loads(json.dumps(LABEL))
    cfg["input"].insert(0, {"role": "developer", "content": "Be strict."})
    judge = ScriptedJudge(["correct"])
    graders.build_grader(cfg, judge=judge).grade("x", {"label": "x"})
    assert judge.calls[0]["conversations"][0][0]["content"].startswith("Be strict.\n\nRespond with only")
    cfg["input"].append({"role": "user", "content": [{"type": "input_image", "image_url": "{{item.url}}"}]})
    grade = graders.build_grader(cfg, judge=ScriptedJudge(["correct"])).grade("x", {"label": "x", "url": "u"})
    assert grade.error == "other_error" and "input_image part" in grade.error_details
