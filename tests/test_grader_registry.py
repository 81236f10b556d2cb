import typing

import pytest

import graders
from graders import registry


def test_every_list_derives_from_the_table():
    names = [row.name for row in registry.GRADER_TABLE]
    assert list(graders.GRADER_TYPES) == names == list(registry.CONFIG_CLASSES)
    union = typing.get_args(typing.get_args(registry.GraderConfig)[0])
    assert list(union) == [row.config for row in registry.GRADER_TABLE]
    assert "multi" not in registry.SUB_GRADER_TYPES and "label_model" not in registry.HOSTED_RFT_TYPES
    assert registry.MODEL_GRADER_TYPES == {"score_model", "label_model"}


def test_build_dispatches_through_the_table():
    config = graders.parse_grader({"type": "multi", "name": "m", "calculate_output": "a + b", "graders": {
        "a": {"type": "string_check", "name": "a", "input": "{{sample.output_text}}", "reference": "x", "operation": "eq"},
        "b": {"type": "string_check", "name": "b", "input": "{{sample.output_text}}", "reference": "y", "operation": "ne"}}})
    with graders.build_grader(config) as grader:
        assert type(grader).__name__ == "MultiGrader" and grader.grade("x", {}).score == 2.0


def test_a_grader_name_cannot_be_empty():
    with pytest.raises(graders.GraderConfigError, match="name"):
        graders.parse_grader({"type": "string_check", "name": "", "input": "a", "reference": "b", "operation": "eq"})


def test_uses_model_looks_inside_multi():
    assert registry.uses_model({"type": "label_model"})
    assert not registry.uses_model({"type": "multi", "graders": {"a": {"type": "python"}}})
    assert registry.uses_model({"type": "multi", "graders": {"a": {"type": "python"}, "j": {"type": "score_model"}}})
