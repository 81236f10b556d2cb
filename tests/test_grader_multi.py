"""multi (reference §2.6): sub-graders combined by the formula; sub-scores reported; errors recorded."""

import json
from pathlib import Path

import pytest

import graders

FIXTURES = Path(__file__).resolve().parent.parent / "fixtures" / "graders"
TOOL_CALL = json.loads((FIXTURES / "platform_graders.json").read_text())[5]


def tool_sample(name, arguments):
    return graders.make_sample("", output_tools=[{"id": "c", "type": "function",
                                                  "function": {"name": name, "arguments": arguments}}])


def test_platform_tool_call_example():
    g = graders.build_grader(TOOL_CALL)
    item = {"function": "get_weather", "arguments": '{"city": "Paris"}'}
    perfect = g.grade(tool_sample("get_weather", '{"city": "Paris"}'), item)
    assert perfect.score == 1.0 and perfect.passed
    assert perfect.details["sub_scores"] == {"function_name": 1.0, "arguments": 1.0}
    half = g.grade(tool_sample("get_time", '{"city": "Paris"}'), item)
    assert half.score == 0.5 and not half.passed
    assert half.details["sub_passed"] == {"function_name": False, "arguments": True}
    assert half.feedback.startswith("0.5 * function_name + 0.5 * arguments = 0.5 with function_name=0, arguments=1; "
                                    "function_name: expected input to equal 'get_weather'")


def test_formula_uses_every_operator():
    cfg = {"type": "multi", "name": "m", "calculate_output": "min(1, sqrt(a ^ 2) + abs(-b) / 2 - floor(0.5) * log(exp(1)))",
           "graders": {"a": {"type": "string_check", "name": "a", "input": "{{sample.output_text}}", "reference": "x", "operation": "like"},
                       "b": {"type": "string_check", "name": "b", "input": "{{sample.output_text}}", "reference": "y", "operation": "like"}}}
    g = graders.build_grader(cfg)
    assert [x.score for x in g.grade_batch(["x", "y", "xy", "z"], [{}] * 4)] == [1.0, 0.5, 1.0, 0.0]


def test_sub_grader_error_makes_the_multi_grade_error():
    g = graders.build_grader(TOOL_CALL)
    grade = g.grade(graders.make_sample("no tools"), {"function": "f", "arguments": "{}"})
    assert grade.error == "invalid_variable_error"
    assert grade.error_details.startswith("function_name: {{sample.output_tools[0].function.name}}")
    assert grade.details["sub_errors"] == {"function_name": "invalid_variable_error", "arguments": "invalid_variable_error"}


def test_formula_runtime_failure_is_a_formula_error():
    cfg = {"type": "multi", "name": "m", "calculate_output": "1 / a",
           "graders": {"a": {"type": "string_check", "name": "a", "input": "{{sample.output_text}}", "reference": "x", "operation": "eq"}}}
    g = graders.build_grader(cfg)
    assert g.grade("x", {}).score == 1.0
    bad = g.grade("y", {})
    assert bad.error == "formula_parse_error" and bad.error_details == "1 / a: division by zero"


def test_judge_sub_graders_are_batched():
    class CountingJudge:
        calls = 0

        def chat(self, conversations, **kw):
            CountingJudge.calls += 1
            return ['{"result": 1}'] * len(conversations)

    cfg = {"type": "multi", "name": "m", "calculate_output": "(judge + exact) / 2",
           "graders": {"judge": {"type": "score_model", "name": "j", "model": "m", "input": [{"role": "user", "content": "{{sample.output_text}}"}]},
                       "exact": {"type": "string_check", "name": "e", "input": "{{sample.output_text}}", "reference": "a", "operation": "eq"}}}
    g = graders.build_grader(cfg, judge=CountingJudge())
    assert [x.score for x in g.grade_batch(["a", "b", "c"], [{}] * 3)] == [1.0, 0.5, 0.5]
    assert CountingJudge.calls == 1


def test_multi_with_python_sub_grader_closes_its_workers():
    cfg = {"type": "multi", "name": "m", "calculate_output": "p * 2",
           "graders": {"p": {"type": "python", "name": "p", "source": "def grade(s, i):\n    return 0.25\n"}}}
    with graders.build_grader(cfg, sandbox=graders.SandboxLimits(timeout_s=5, workers=1)) as g:
        assert g.grade("x", {}).score == 0.5
        pool = g.graders["p"].pool
    assert pool._idle == []


@pytest.mark.parametrize("formula, expected", [("a + b", 2.0), ("(a + b) / 2", 1.0), ("a ^ 2 * 3", 3.0)])
def test_formula_variants(formula, expected):
    sub = {"type": "string_check", "name": "s", "input": "{{sample.output_text}}", "reference": "x", "operation": "eq"}
    g = graders.build_grader({"type": "multi", "name": "m", "graders": {"a": sub, "b": dict(sub)}, "calculate_output": formula})
    assert g.grade("x", {}).score == expected
