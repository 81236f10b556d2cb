from pathlib import Path

import pytest
import yaml

from flywheel.errors import SpecError
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
