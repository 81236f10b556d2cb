"""Several LoRA adapters on one base: `local:BASE+A+B` and `local:BASE+A*0.7+B*0.3`."""

import json

import pytest
from adapter_helpers import greedy_texts, make_adapter
from click.testing import CliRunner

from flywheel.cli import main
from flywheel.errors import ModelError
from flywheel.models import format_model_ref, load_model, parse_adapters, parse_model_ref


@pytest.fixture(scope="module")
def adapters(chatty_dir, tmp_path_factory):
    folder = tmp_path_factory.mktemp("adapters")
    return (make_adapter(chatty_dir, folder / "a", seed=1, scale=0.5),
            make_adapter(chatty_dir, folder / "b", seed=2, scale=0.5, r=8, alpha=4,  # another rank and scaling
                         target_modules=("q_proj", "k_proj", "gate_proj")))


@pytest.mark.parametrize("ref", ["local:smollm2+ckpt/a", "local:smollm2+ckpt/a+ckpt/b",
                                 "local:smollm2+ckpt/a*0.7+ckpt/b*0.3", "local:m+x*-1.5+y*2.0"])
def test_refs_round_trip(ref):
    scheme, name, adapter = parse_model_ref(ref)
    assert format_model_ref(scheme, name, parse_adapters(adapter)) == ref


def test_adapter_weights_parse():
    assert parse_adapters("a+b*0.3") == [("a", 1.0), ("b", 0.3)]
    assert parse_adapters(None) == []
    with pytest.raises(ModelError, match="adapter weight 'x' of 'b' is not a number"):
        parse_adapters("a+b*x", "local:m+a+b*x")
    with pytest.raises(ModelError, match="empty adapter"):
        parse_adapters("a++b")


def test_combined_weights_are_the_weighted_sum_of_deltas(chatty_dir, adapters):
    a, b = adapters
    states = {}
    for key, ref in {"base": f"local:{chatty_dir}", "a": f"local:{chatty_dir}+{a}", "b": f"local:{chatty_dir}+{b}",
                     "ab": f"local:{chatty_dir}+{a}*0.7+{b}*0.3"}.items():
        model = load_model(ref, {"dtype": "fp32"})
        states[key] = {k: v.clone() for k, v in model.load()[0].state_dict().items()}
        model.close()
    changed = 0
    for name, base in states["base"].items():
        expected = base + 0.7 * (states["a"][name] - base) + 0.3 * (states["b"][name] - base)
        assert (states["ab"][name] - expected).abs().max() < 1e-5, name
        changed += bool((states["ab"][name] != base).any())
    assert changed >= 6  # both adapters' modules moved: q, v, o, up, down from a; k, gate from b


def test_combination_changes_outputs_and_fingerprint(chatty_dir, adapters):
    a, b = adapters
    single = load_model(f"local:{chatty_dir}+{a}")
    both = load_model(f"local:{chatty_dir}+{a}+{b}")
    weighted = load_model(f"local:{chatty_dir}+{a}*0.7+{b}*0.3")
    swapped = load_model(f"local:{chatty_dir}+{a}*0.3+{b}*0.7")
    prints = {m.fingerprint for m in (single, both, weighted, swapped)}
    assert len(prints) == 4  # every adapter's hash and weight is in the cache key
    assert weighted.fingerprint.startswith(single.fingerprint + "*0.7+adapter:")
    assert greedy_texts(f"local:{chatty_dir}+{a}+{b}") != greedy_texts(f"local:{chatty_dir}+{a}")


def test_combination_evaluates_through_flywheel_eval(chatty_dir, adapters, tmp_path):
    import yaml
    from conftest import make_rows, spec_dict, write_jsonl

    write_jsonl(tmp_path / "data.jsonl", make_rows())
    spec = tmp_path / "eval.yaml"
    spec.write_text(yaml.safe_dump(spec_dict(f"local:{chatty_dir}", model_options={"dtype": "fp32"})))
    a, b = adapters
    ref = f"local:{chatty_dir}+{a}*0.5+{b}*0.5"
    result = CliRunner().invoke(main, ["eval", str(spec), "--split", "valid", "--model", ref, "--db",
                                       str(tmp_path / "f.db"), "--json"], catch_exceptions=False)
    assert result.exit_code == 0, result.output
    summary = json.loads(result.output)
    assert summary["n_samples"] == 4 and summary["n_errors"] == 0 and summary["model"] == ref


def test_missing_adapter_is_one_line_error(chatty_dir, adapters, tiny_spec, tmp_path):
    a, _ = adapters
    gone = tmp_path / "gone"
    result = CliRunner().invoke(main, ["eval", str(tiny_spec), "--model", f"local:{chatty_dir}+{a}+{gone}",
                                       "--db", str(tmp_path / "f.db")])
    assert result.exit_code == 1
    assert result.output.strip().splitlines() == [f"error: local:{chatty_dir}+{a}+{gone}: adapter folder {gone} "
                                                  "has no adapter_config.json"]


def test_adapters_on_different_bases_are_refused(chatty_dir, tiny_model_dir, adapters, tmp_path):
    a, _ = adapters
    other = make_adapter(tiny_model_dir, tmp_path / "other", seed=3)
    with pytest.raises(ModelError, match="adapters trained on different base models cannot be combined"):
        load_model(f"local:{chatty_dir}+{a}+{other}")
    # one adapter of another base on this base: refused when loading
    model = load_model(f"local:{tiny_model_dir}+{a}")
    with pytest.raises(ModelError, match="adapter was trained on"):
        model.load()


def test_combination_cannot_be_trained_further(chatty_dir, adapters):
    a, b = adapters
    model = load_model(f"local:{chatty_dir}+{a}+{b}")
    with pytest.raises(ModelError, match="merge it first"):
        _ = model.adapter
    assert load_model(f"local:{chatty_dir}+{a}").adapter == a.resolve()
    from flywheel.train.local import load_for_training

    with pytest.raises(ModelError, match="a weighted combination of adapters is not one adapter; merge it first"):
        load_for_training(f"local:{chatty_dir}+{a}*0.5+{b}", bf16=False)


def test_served_name_of_a_combination(chatty_dir, adapters):
    from flywheel.model_server import served_name

    a, b = adapters
    assert served_name(f"local:{chatty_dir}+{a}") == f"{chatty_dir.name}-a"
    assert served_name(f"local:{chatty_dir}+{a}*0.7+{b}") == f"{chatty_dir.name}-ax0.7-b"
