"""The public surface flywheel codes against."""

import dataclasses
import json
import subprocess
import sys
from pathlib import Path

import pytest

import graders

FIXTURES = Path(__file__).resolve().parent.parent / "fixtures" / "graders"


def test_graders_does_not_import_flywheel_or_heavy_libraries():
    code = ("import sys, graders\n"
            "cfg = graders.parse_grader({'type': 'string_check', 'name': 'x', 'input': 'a', 'reference': 'a', 'operation': 'eq'})\n"
            "assert graders.build_grader(cfg).grade('a', {}).score == 1.0\n"
            "print(sorted({m.split('.')[0] for m in sys.modules} & {'flywheel', 'torch', 'nltk', 'sentence_transformers', 'transformers'}))\n")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "[]"


def test_public_names():
    for name in ("parse_grader", "load_graders", "build_grader", "make_sample", "render_template", "reward_function",
                 "Grade", "GraderConfigError", "TemplateVariableError", "JudgeModel", "ERROR_KINDS"):
        assert hasattr(graders, name), name
    assert issubclass(graders.GraderConfigError, ValueError)


def test_grade_is_frozen_and_errors_are_known_kinds():
    g = graders.Grade(score=1.0, passed=True, feedback="ok")
    with pytest.raises(dataclasses.FrozenInstanceError):
        g.score = 0.0
    with pytest.raises(ValueError, match="unknown grade error kind"):
        graders.Grade(score=0, passed=False, feedback="", error="oops")
    failed = graders.Grade.failure("other_error", "boom")
    assert (failed.score, failed.passed, failed.error) == (0.0, False, "other_error")
    assert set(graders.ERROR_KINDS) >= {"invalid_variable_error", "model_grader_parse_error", "python_grader_runtime_error",
                                        "formula_parse_error", "model_grader_server_error", "other_error"}


def test_every_platform_grader_runs_from_its_json():
    class Judge:
        def chat(self, conversations, **kw):
            return ['{"result": 0.9}' if "score" in kw["response_format"]["json_schema"]["name"] else '{"result": "correct"}'
                    for _ in conversations]

    item = {"label": "card_arrival", "reference_answer": "Your card will arrive soon.", "question": "Card?",
            "max_words": 10, "function": "f", "arguments": "{}"}
    sample = graders.make_sample("card_arrival", output_tools=[{"id": "1", "type": "function", "function": {"name": "f", "arguments": "{}"}}])
    results = {}
    for cfg in graders.load_graders(FIXTURES / "platform_graders.json"):
        with graders.build_grader(cfg, judge=lambda model: Judge()) as g:
            grade = g.grade(sample, item)
        assert grade.error is None, (cfg.type, grade)
        assert isinstance(grade.feedback, str) and grade.feedback
        json.dumps(grade.to_dict())
        results[cfg.type] = grade.score
    assert results["string_check"] == 1.0 and results["score_model"] == 0.9 and results["label_model"] == 1.0
    assert results["python"] == 1.0 and results["multi"] == 1.0
    assert 0.0 < results["text_similarity"] < 1.0


def test_bad_sample_type_is_a_recorded_error():
    g = graders.build_grader({"type": "string_check", "name": "x", "input": "{{sample.output_text}}", "reference": "a", "operation": "eq"})
    grade = g.grade_batch([42], [{}])[0]
    assert grade.error == "sample_parse_error"


def test_validate_and_run_like_the_platform_endpoints():
    multi = json.loads((FIXTURES / "platform_graders.json").read_text())[5]
    assert graders.validate_grader(dict(multi, graders=list(multi["graders"].values())))["grader"]["graders"].keys() == {
        "function_name", "arguments"}
    out = graders.run_grader({"type": "string_check", "name": "s", "input": "{{sample.output_json.intent}}",
                              "reference": "{{item.label}}", "operation": "eq"},
                             '{"intent": "refund"}', {"label": "refund"})
    assert out["reward"] == 1.0 and out["passed"] is True
    assert out["metadata"]["errors"]["invalid_variable_error"] is False
    assert set(graders.ERROR_KINDS) <= set(out["metadata"]["errors"])
    bad = graders.run_grader({"type": "python", "name": "p", "source": "def grade(s, i):\n    return 'x'\n"}, "hi")
    assert bad["reward"] == 0.0
    assert bad["metadata"]["errors"]["python_grader_runtime_error"] is True
    assert "not a number" in bad["metadata"]["errors"]["python_grader_runtime_error_details"]
    sub = graders.run_grader(multi, "", {"function": "f", "arguments": "{}"})
    assert sub["metadata"]["errors"]["invalid_variable_error"] is True and sub["sub_rewards"] == {
        "function_name": 0.0, "arguments": 0.0}
