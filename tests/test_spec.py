from pathlib import Path

import pytest
import yaml

from flywheel.errors import SpecError
from flywheel.executors import build_executor
from flywheel.spec import load_eval_spec

from conftest import spec_dict


def write(tmp_path: Path, data) -> Path:
    path = tmp_path / "eval.yaml"
    path.write_text(data if isinstance(data, str) else yaml.safe_dump(data), encoding="utf-8")
    return path


def test_loads_bundled_demo():
    spec = load_eval_spec("evals/banking77/eval.yaml")
    assert spec.name == "banking77"
    assert spec.dataset_path.name == "data.jsonl" and spec.dataset_path.exists()
    assert spec.objective_grader == "label"
    assert spec.sampling.temperature == 0


def test_malformed_yaml_names_file_and_line(tmp_path):
    path = write(tmp_path, "name: x\ninput: [\n  - role: user\n")
    with pytest.raises(SpecError) as err:
        load_eval_spec(path)
    message = str(err.value)
    assert message.startswith(f"{path}:") and "malformed YAML" in message
    assert len(message.splitlines()) == 1


def test_unknown_field_is_named(tmp_path):
    path = write(tmp_path, spec_dict("local:smollm2", temprature=0.5))
    with pytest.raises(SpecError, match=r"eval\.yaml: temprature: unknown field"):
        load_eval_spec(path)


def test_nested_field_error_has_path(tmp_path):
    path = write(tmp_path, spec_dict("local:smollm2", sampling={"max_tokens": 0}))
    with pytest.raises(SpecError, match=r"eval\.yaml: sampling\.max_tokens: Input should be greater"):
        load_eval_spec(path)


def test_unknown_grader_type_is_named(tmp_path):
    data = spec_dict("local:smollm2")
    data["graders"][0]["type"] = "string_chek"
    with pytest.raises(SpecError, match=r"eval\.yaml: graders\[0\]: .*string_chek"):
        load_eval_spec(write(tmp_path, data))


def test_objective_must_name_a_grader(tmp_path):
    data = spec_dict("local:smollm2", objective={"grader": "nope"})
    with pytest.raises(SpecError, match="objective.grader: no grader named 'nope'"):
        load_eval_spec(write(tmp_path, data))


def test_missing_spec_file(tmp_path):
    with pytest.raises(SpecError, match="spec file not found"):
        load_eval_spec(tmp_path / "absent.yaml")


def test_overrides_parse_values(tmp_path):
    spec = load_eval_spec(write(tmp_path, spec_dict("local:smollm2")),
                          ["sampling.max_tokens=3", "model=local:other/model"])
    assert spec.sampling.max_tokens == 3 and spec.model == "local:other/model"


def test_fingerprint_tracks_content(tmp_path):
    a = load_eval_spec(write(tmp_path, spec_dict("local:smollm2")))
    b = load_eval_spec(write(tmp_path, spec_dict("local:smollm2")), ["sampling.max_tokens=7"])
    assert a.fingerprint() != b.fingerprint()
    assert a.fingerprint() == load_eval_spec(write(tmp_path, spec_dict("local:smollm2"))).fingerprint()


def test_ratios_must_sum_to_one(tmp_path):
    data = spec_dict("local:smollm2", split={"ratios": {"train": 0.5, "test": 0.2}})
    with pytest.raises(SpecError, match="split.ratios: split ratios must sum to 1"):
        load_eval_spec(write(tmp_path, data))


# -- bad input is one clean error ---------------------------------------------------------------------
def test_spec_that_is_not_utf8(tmp_path):
    path = tmp_path / "eval.yaml"
    path.write_bytes(yaml.safe_dump(spec_dict("local:smollm2")).encode() + b"description: caf\xe9\n")
    with pytest.raises(SpecError, match=r"eval\.yaml:\d+: not UTF-8 text \(byte \d+: 0xe9\)"):
        load_eval_spec(path)


def test_spec_with_a_lone_surrogate(tmp_path):
    path = write(tmp_path, yaml.safe_dump(spec_dict("local:smollm2")) + 'description: "bad \\ud800 here"\n')
    with pytest.raises(SpecError, match=r"eval\.yaml: description: text holds a lone surrogate"):
        load_eval_spec(path)


@pytest.mark.parametrize("override", ["name=[1", "name={a", "sampling.max_tokens=: :"])
def test_override_that_is_not_yaml(tmp_path, override):
    path = write(tmp_path, spec_dict("local:smollm2"))
    with pytest.raises(SpecError, match=r"eval\.yaml: override .*malformed YAML"):
        load_eval_spec(path, [override])


@pytest.mark.parametrize("field", ["sampling.seed", "split.seed", "optimize.seed"])
@pytest.mark.parametrize("value", ["1000000000000000000000000000000", "-1", "4294967296"])
def test_seeds_are_bounded_to_what_numpy_and_torch_accept(tmp_path, field, value):
    path = write(tmp_path, spec_dict("local:smollm2"))
    with pytest.raises(SpecError, match=rf"eval\.yaml: {field}: Input should be (greater|less) than or equal to"):
        spec = load_eval_spec(path, [f"{field}={value}"])
        spec.optimize_config()  # the `optimize:` block is validated by the commands that search prompts
    assert load_eval_spec(path, [f"{field}=4294967295"]).optimize_config()


@pytest.mark.parametrize("ratio", [".nan", ".inf", "-.inf"])
def test_split_ratios_must_be_finite(tmp_path, ratio):
    path = write(tmp_path, spec_dict("local:smollm2"))
    with pytest.raises(SpecError, match=r"split\.ratios: split ratios must be finite"):
        load_eval_spec(path, [f"split.ratios={{train: {ratio}, test: 1.0}}"])


@pytest.mark.parametrize("content, message", [
    ("{{foo.x}}", r"input: \[1\]\.content: template \{\{foo\.x\}\}: unknown namespace 'foo'"),
    ("{{sample.output_text}}", r"template \{\{sample\.output_text\}\}: input messages can use item\.<field> only"),
    ("{{item..x}}", r"template \{\{item\.\.x\}\}: cannot parse"),
])
def test_input_templates_must_name_item_fields(tmp_path, content, message):
    spec = spec_dict("local:smollm2")
    spec["input"][1]["content"] = content
    with pytest.raises(SpecError, match=message):
        load_eval_spec(write(tmp_path, spec))


def test_an_executor_block_leaves_the_fingerprint_alone(tmp_path):
    plain = load_eval_spec(write(tmp_path, spec_dict("local:smollm2")))
    fanned = load_eval_spec(write(tmp_path, spec_dict("local:smollm2", executor={"kind": "ray", "address": "auto"})))
    assert fanned.executor.kind == "ray" and fanned.executor.address == "auto"
    assert fanned.fingerprint() == plain.fingerprint()  # stored results and caches stay comparable
    assert build_executor(fanned.executor).address == "auto" and plain.executor is None


def test_a_bad_executor_block_is_one_line(tmp_path):
    path = write(tmp_path, spec_dict("local:smollm2", executor={"kind": "dask"}))
    with pytest.raises(SpecError, match=r"eval\.yaml: executor\.kind: Input should be 'local' or 'ray'") as err:
        load_eval_spec(path)
    assert len(str(err.value).splitlines()) == 1
    with pytest.raises(SpecError, match=r"eval\.yaml: executor\.adress: unknown field"):
        load_eval_spec(write(tmp_path, spec_dict("local:smollm2", executor={"kind": "ray", "adress": "auto"})))
