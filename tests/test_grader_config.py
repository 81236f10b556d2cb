"""Grader configs: every platform type parses, round-trips, and bad input names the field."""

import json
from pathlib import Path

import pytest

import graders
from graders import GraderConfigError, load_graders, parse_grader

FIXTURES = Path(__file__).resolve().parent.parent / "fixtures" / "graders"
PLATFORM = json.loads((FIXTURES / "platform_graders.json").read_text())


def sc(**over):
    base = {"type": "string_check", "name": "x", "input": "{{sample.output_text}}",
            "reference": "{{item.label}}", "operation": "eq"}
    base.update(over)
    return base


@pytest.mark.parametrize("obj", PLATFORM, ids=[g["type"] for g in PLATFORM])
def test_platform_configs_round_trip(obj):
    cfg = parse_grader(obj)
    assert cfg.type == obj["type"]
    dumped = cfg.model_dump(by_alias=True, exclude_none=True)
    assert dumped == obj
    assert parse_grader(json.loads(json.dumps(dumped))) == cfg


def test_every_type_is_covered_by_the_fixture():
    from graders.registry import EXTENSION_GRADER_TYPES

    platform = [t for t in graders.GRADER_TYPES if t not in EXTENSION_GRADER_TYPES]
    assert sorted(g["type"] for g in PLATFORM) == sorted(platform)


def test_unknown_type_lists_known_and_suggests():
    with pytest.raises(GraderConfigError) as e:
        parse_grader({"type": "exct", "name": "x"})
    msg = str(e.value)
    assert msg.startswith("type: unknown grader 'exct'; known: string_check, text_similarity")
    assert "(did you mean 'string_check'?)" in msg
    assert isinstance(e.value, ValueError)


def test_close_typo_suggests_the_type():
    with pytest.raises(GraderConfigError, match=r"did you mean 'label_model'"):
        parse_grader({"type": "label_modle"})


def test_missing_field_names_the_field():
    obj = sc()
    del obj["input"]
    with pytest.raises(GraderConfigError) as e:
        parse_grader(obj)
    assert str(e.value) == "input: field required"
    assert e.value.errors == [("input", "field required")]


def test_missing_type():
    with pytest.raises(GraderConfigError, match=r"^type: field required; one of: string_check"):
        parse_grader({"name": "x"})


def test_not_an_object():
    with pytest.raises(GraderConfigError, match="a grader must be an object, got list"):
        parse_grader([1, 2])


def test_bad_enum_shows_choices_and_value():
    with pytest.raises(GraderConfigError) as e:
        parse_grader(sc(operation="contains"))
    assert str(e.value) == "operation: input should be 'eq', 'ne', 'like' or 'ilike' (got 'contains')"


def test_unknown_field_suggests_the_right_name():
    obj = sc()
    obj["refrence"] = obj.pop("reference")
    with pytest.raises(GraderConfigError) as e:
        parse_grader(obj)
    assert "reference: field required" in str(e.value)
    assert "refrence: unknown field (did you mean 'reference'?)" in str(e.value)


def test_neq_spelling_is_accepted_as_ne():
    assert parse_grader(sc(operation="neq")).operation == "ne"


def test_max_completion_tokens_spelling_is_accepted():
    obj = dict(PLATFORM[2])
    obj["sampling_params"] = {"max_completion_tokens": 99}
    cfg = parse_grader(obj)
    assert cfg.sampling_params.max_completions_tokens == 99
    assert cfg.model_dump(by_alias=True, exclude_none=True)["sampling_params"] == {"max_completions_tokens": 99}


def test_nested_errors_name_the_path_inside_multi():
    obj = json.loads(json.dumps(PLATFORM[5]))
    obj["graders"]["arguments"]["evaluation_metric"] = "blue"
    del obj["graders"]["function_name"]["operation"]
    with pytest.raises(GraderConfigError) as e:
        parse_grader(obj)
    lines = str(e.value).splitlines()
    assert "graders.function_name.operation: field required" in lines
    assert any(line.startswith("graders.arguments.evaluation_metric: input should be 'cosine'") for line in lines)


def test_message_errors_name_the_message_index():
    obj = json.loads(json.dumps(PLATFORM[2]))
    obj["input"][1]["role"] = "bot"
    obj["input"].append({"role": "user", "content": 5})
    with pytest.raises(GraderConfigError) as e:
        parse_grader(obj)
    assert str(e.value).splitlines() == [
        "input[1].role: input should be 'user', 'assistant', 'system' or 'developer' (got 'bot')",
        "input[2].content: must be a string, a content part or a list of parts (got int)",
    ]


def test_multi_cannot_nest_multi():
    obj = {"type": "multi", "name": "m", "graders": {"inner": dict(PLATFORM[5])}, "calculate_output": "inner"}
    with pytest.raises(GraderConfigError, match=r"^graders.inner.type: a multi grader cannot contain another multi grader$"):
        parse_grader(obj)


def test_multi_accepts_a_list_keyed_by_name():
    obj = {"type": "multi", "name": "m", "graders": [sc(name="a"), sc(name="b", operation="ne")],
           "calculate_output": "a - b"}
    cfg = parse_grader(obj)
    assert list(cfg.graders) == ["a", "b"]
    assert cfg.model_dump(by_alias=True, exclude_none=True)["graders"]["b"]["operation"] == "ne"


def test_multi_formula_is_checked_at_parse_time():
    base = {"type": "multi", "name": "m", "graders": {"a": sc()}}
    with pytest.raises(GraderConfigError, match=r"^calculate_output: unknown variable\(s\) 'b'; the sub-grader keys are a$"):
        parse_grader({**base, "calculate_output": "a + b"})
    with pytest.raises(GraderConfigError, match=r"^calculate_output: expected a number, a name or '\(' at position 4"):
        parse_grader({**base, "calculate_output": "a + * 2"})
    with pytest.raises(GraderConfigError, match=r"unknown function '__import__'"):
        parse_grader({**base, "calculate_output": "__import__(a)"})


def test_label_model_passing_labels_must_be_labels():
    obj = dict(PLATFORM[3], passing_labels=["correct", "great"])
    with pytest.raises(GraderConfigError, match=r"^passing_labels: must be a subset of labels; not in labels: 'great'$"):
        parse_grader(obj)


def test_score_model_range_must_be_ordered():
    with pytest.raises(GraderConfigError, match=r"^range: must be \[min, max\] with min < max"):
        parse_grader(dict(PLATFORM[2], range=[5, 1]))
    assert parse_grader(dict(PLATFORM[2], range=[1, 10])).score_range == (1.0, 10.0)


def test_python_source_must_compile_and_be_small():
    with pytest.raises(GraderConfigError, match=r"^source: is not valid Python: line 1"):
        parse_grader({"type": "python", "name": "p", "source": "def grade(:"})
    big = "x = 1\n" * 50_000
    with pytest.raises(GraderConfigError, match=r"^source: is \d+ bytes; the limit is 262144"):
        parse_grader({"type": "python", "name": "p", "source": big})


def test_malformed_template_variable_is_a_config_error():
    with pytest.raises(GraderConfigError, match=r"^input: template \{\{foo.bar\}\}: unknown namespace 'foo'"):
        parse_grader(sc(input="{{ foo.bar }}"))


def test_load_graders_json_and_yaml(tmp_path):
    assert [c.type for c in load_graders(FIXTURES / "platform_graders.json")] == [g["type"] for g in PLATFORM]
    yaml_cfgs = load_graders(FIXTURES / "graders.yaml")
    assert [c.name for c in yaml_cfgs] == ["exact intent", "rouge", "combined"]
    single = tmp_path / "one.yaml"
    single.write_text("type: string_check\nname: a\ninput: x\nreference: y\noperation: like\n")
    assert load_graders(single)[0].operation == "like"
    wrapped = tmp_path / "eval.json"
    wrapped.write_text(json.dumps({"testing_criteria": [sc()]}))
    assert len(load_graders(wrapped)) == 1


def test_load_graders_errors_name_the_file_and_index(tmp_path):
    path = tmp_path / "graders.yaml"
    path.write_text("- type: string_check\n  name: ok\n  input: a\n  reference: b\n  operation: eq\n- type: exct\n  name: bad\n")
    with pytest.raises(GraderConfigError) as e:
        load_graders(path)
    assert str(e.value).startswith(f"{path}: [1].type: unknown grader 'exct'")
    bad = tmp_path / "bad.json"
    bad.write_text("{not json")
    with pytest.raises(GraderConfigError, match=r"bad.json: not valid JSON"):
        load_graders(bad)
    with pytest.raises(GraderConfigError, match=r"missing.yaml: cannot read the file"):
        load_graders(tmp_path / "missing.yaml")


def test_prefixed_errors_for_callers():
    try:
        parse_grader({"type": "exct"})
    except GraderConfigError as e:
        assert str(e.prefixed("graders[2]", source="evals/x.yaml")).startswith(
            "evals/x.yaml: graders[2].type: unknown grader 'exct'"
        )


def test_python_grader_without_grade_function_is_refused():
    import graders

    with pytest.raises(graders.GraderConfigError, match="defines no top-level grade"):
        graders.parse_grader({"type": "python", "name": "p", "source": "def score(sample, item):\n    return 1.0\n"})
    with pytest.raises(graders.GraderConfigError, match="defines no top-level grade"):
        # A nested grade is not module-level.
        graders.parse_grader({"type": "python", "name": "p",
                              "source": "def outer():\n    def grade(sample, item):\n        return 1.0\n"})
    for source in ("def grade(sample, item):\n    return 1.0\n", "grade = lambda sample, item: 1.0\n",
                   "from math import floor as grade\n", "try:\n    def grade(s, i):\n        return 1\nexcept Exception:\n    pass\n"):
        graders.parse_grader({"type": "python", "name": "p", "source": source})
