"""Templates (reference §1): paths, indexes, whitespace, JSON rendering, missing variables."""

import pytest

import graders
from graders import TemplateVariableError, make_sample, render_template

ITEM = {"a": {"b": "deep"}, "list": ["x", {"k": 3}], "n": 2.5, "flag": True, "none": None,
        "messages": [{"role": "user", "content": "hi"}], "a key": "spaced"}


@pytest.mark.parametrize("text, expected", [
    ("{{item.a.b}}", "deep"),
    ("{{ item.a.b }}", "deep"),
    ("<{{item.list[0]}}|{{item.list[1].k}}>", "<x|3>"),
    ("{{item.list[-1].k}}", "3"),
    ("{{item.list.0}}", "x"),
    ("{{item.messages[0].content}}", "hi"),
    ('{{item["a key"]}}', "spaced"),
    ("{{item.n}} {{item.flag}} {{item.none}}", "2.5 true null"),
    ("{{item.a}}", '{"b": "deep"}'),
    ("{{item.list}}", '["x", {"k": 3}]'),
    ("no templates", "no templates"),
    ("{{sample.output_text}}", '{"email": "a@b.c"}'),
    ("{{sample.output_json.email}}", "a@b.c"),
])
def test_render(text, expected):
    assert render_template(text, item=ITEM, sample=make_sample('{"email": "a@b.c"}')) == expected


@pytest.mark.parametrize("text, variable, reason", [
    ("{{item.missing}}", "item.missing", "item has no key 'missing'"),
    ("{{item.a.c}}", "item.a.c", "item.a has no key 'c' (keys: b)"),
    ("{{item.list[5]}}", "item.list[5]", "item.list has 2 element(s); no index 5"),
    ("{{item.n.x}}", "item.n.x", "item.n is a number, it has no key 'x'"),
    ("{{item.a[0]}}", "item.a[0]", "item.a is an object, not a list"),
    ("{{sample.output_json.x}}", "sample.output_json.x", "output was not valid JSON"),
    ("{{other.x}}", "other.x", "unknown namespace 'other'"),
    ("{{item.a b}}", "item.a b", "cannot parse the path"),
])
def test_missing_variable_raises_naming_it(text, variable, reason):
    with pytest.raises(TemplateVariableError) as e:
        render_template(text, item=ITEM, sample=make_sample("plain text"))
    assert e.value.variable == variable
    assert reason in str(e.value)
    assert str(e.value).startswith("{{" + variable + "}}")


def test_make_sample_shapes():
    s = make_sample("plain")
    assert s["output_text"] == "plain" and s["output_json"] is None and s["output_tools"] == []
    assert s["choices"][0]["message"] == {"role": "assistant", "content": "plain"}
    assert make_sample("[1, 2]")["output_json"] == [1, 2]
    assert make_sample('{"a": 1}', output_json={"b": 2})["output_json"] == {"b": 2}
    tools = [{"id": "c1", "type": "function", "function": {"name": "f", "arguments": "{}"}}]
    s = make_sample("", output_tools=tools)
    assert render_template("{{sample.output_tools[0].function.name}}", sample=s) == "f"
    assert s["choices"][0]["finish_reason"] == "tool_calls"


def test_missing_variable_is_an_invalid_variable_error_grade():
    g = graders.build_grader({"type": "string_check", "name": "x", "input": "{{sample.output_text}}",
                              "reference": "{{item.label}}", "operation": "eq"})
    grade = g.grade("card_arrival", {"intent": "card_arrival"})
    assert grade.error == "invalid_variable_error"
    assert grade.score == 0.0 and grade.passed is False
    assert "{{item.label}}" in grade.error_details and "item has no key 'label'" in grade.error_details
