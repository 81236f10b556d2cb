"""docs/reference.md: generated from the spec models, every field described, kept up to date; a block
that a command does not use (`optimize:` for `flywheel eval`) is not validated by it."""

import yaml
from click.testing import CliRunner

from flywheel.cli import main
from flywheel.docs_reference import REFERENCE_PATH, models_documented, render_reference, undocumented_fields
from flywheel.errors import SpecError
from flywheel.spec import load_eval_spec

import pytest


def test_every_field_of_the_spec_models_has_a_description():
    names = {m.__name__ for m in models_documented()}
    # the eval spec, the optimize block, the run spec, every stage and every training method's config
    assert {"EvalSpec", "OptimizeSpec", "FewShotSpec", "RunSpec", "OptimizeStageSpec", "CaptureStageSpec",
            "TrainStageSpec", "SFTSpec", "DPOSpec", "RFTSpec"} <= names
    assert undocumented_fields() == []


def test_docs_reference_md_is_what_the_generator_writes():
    assert REFERENCE_PATH.read_text(encoding="utf-8") == render_reference(), \
        "docs/reference.md is stale: run python -m flywheel.docs_reference"


def test_the_reference_names_the_balanced_strategys_label_field():
    text = render_reference()
    section = text[text.index("### FewShotSpec"):text.index("### ProposerSpec")]
    label = next(line for line in section.splitlines() if line.startswith("| `label_field`"))
    assert "balanced" in label and "required" in label.lower()
    assert "| `minibatch` | int | `40` |" in text


def test_eval_ignores_a_mistake_in_the_optimize_block_that_optimize_reports(tiny_spec, tmp_path):
    data = yaml.safe_load(tiny_spec.read_text())
    data["optimize"] = {"fewshot": {"strategies": ["balanced"]}, "minibtach": 3}  # no label_field, a typo
    tiny_spec.write_text(yaml.safe_dump(data))
    db = str(tmp_path / "x.db")
    ran = CliRunner().invoke(main, ["eval", str(tiny_spec), "--split", "test", "--db", db])
    assert ran.exit_code == 0, ran.output
    searched = CliRunner().invoke(main, ["optimize", str(tiny_spec), "--db", db])
    assert searched.exit_code == 1
    assert "eval.yaml: optimize.fewshot: label_field: required by the balanced strategy" in searched.output
    assert "eval.yaml: optimize.minibtach: unknown field" in searched.output
    data["optimize"] = "search hard"  # the syntax is still checked: a mapping
    tiny_spec.write_text(yaml.safe_dump(data))
    with pytest.raises(SpecError, match="optimize: Input should be a valid dictionary"):
        load_eval_spec(tiny_spec)


def test_a_wheel_with_an_optimize_stage_reports_a_bad_optimize_block_before_it_starts(tmp_path, tiny_model_dir,
                                                                                      store):
    from conftest import make_rows, spec_dict, write_jsonl
    from flywheel.run_spec import load_run_spec
    from flywheel.wheel import run_wheel

    write_jsonl(tmp_path / "data.jsonl", make_rows(6))
    spec = spec_dict(f"local:{tiny_model_dir}", optimize={"fewshot": {"strategies": ["balanced"]}})
    (tmp_path / "eval.yaml").write_text(yaml.safe_dump(spec))
    (tmp_path / "run.yaml").write_text(yaml.safe_dump({"eval": "eval.yaml", "stages": [
        {"stage": "capture", "teacher": "reference:label"}, {"stage": "optimize"}]}))
    with pytest.raises(SpecError, match=r"eval\.yaml: optimize\.fewshot: label_field: required by the balanced"):
        run_wheel(load_run_spec(tmp_path / "run.yaml"), store)
    assert store.db.execute("select count(*) from runs").fetchone()[0] == 0  # nothing ran, nothing stored
