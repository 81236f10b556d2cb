"""`flywheel export model`: merged HF folders (and int8 ones) that transformers and `local:DIR` load."""

import json
import sys

import pytest
from adapter_helpers import QUESTIONS, greedy_texts, make_adapter
from click.testing import CliRunner

from flywheel.cli import main
from flywheel.errors import ModelError
from flywheel.export import ExportError, export_model


@pytest.fixture(scope="module")
def adapter(chatty_dir, tmp_path_factory):
    return make_adapter(chatty_dir, tmp_path_factory.mktemp("export") / "adapter", seed=7, scale=0.5)


def cli(*args):
    return CliRunner().invoke(main, [str(a) for a in args])


def test_merged_export_loads_in_transformers_with_identical_greedy_outputs(chatty_dir, adapter, tmp_path):
    import torch
    from peft import PeftModel
    from transformers import AutoModelForCausalLM, AutoTokenizer

    ref = f"local:{chatty_dir}+{adapter}"
    result = cli("export", "model", ref, "--merge", "-o", tmp_path / "merged", "--json")
    assert result.exit_code == 0, result.output
    out = json.loads(result.output)
    folder = tmp_path / "merged"
    assert out["model_ref"] == f"local:{folder}" and out["quantize"] is None
    assert {"model.safetensors", "config.json", "tokenizer.json", "README.md", "flywheel_export.json"} <= set(out["files"])

    # transformers alone: the merged folder vs the unmerged adapter on its base, greedy token ids
    tokenizer = AutoTokenizer.from_pretrained(folder)
    prompt = tokenizer.apply_chat_template(QUESTIONS[0], tokenize=False, add_generation_prompt=True)
    ids = tokenizer(prompt, return_tensors="pt").input_ids
    merged = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32).eval()
    unmerged = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(chatty_dir, dtype=torch.float32),
                                         str(adapter)).eval()
    plain = AutoModelForCausalLM.from_pretrained(chatty_dir, dtype=torch.float32).eval()
    with torch.inference_mode():
        kwargs = dict(max_new_tokens=10, do_sample=False, pad_token_id=tokenizer.pad_token_id)
        a, b = merged.generate(ids, **kwargs), unmerged.generate(input_ids=ids, **kwargs)
        c = plain.generate(ids, **kwargs)
    assert a.tolist() == b.tolist()
    assert a.tolist() != c.tolist()  # the adapter mattered

    # Flywheel: local:DIR answers exactly as local:BASE+ADAPTER
    assert greedy_texts(out["model_ref"]) == greedy_texts(ref)


def test_model_card_and_lineage_name_base_adapter_and_job(chatty_dir, adapter, store, tmp_path):
    import shutil

    from flywheel.train import TrainingSet, record_training_set
    from flywheel.train.checkpoints import register_checkpoint

    rows = [{"messages": [{"role": "user", "content": f"q{i}"}, {"role": "assistant", "content": "a"}]}
            for i in range(3)]
    training_set = record_training_set(store, TrainingSet("sft", rows, {"eval": "tiny"}))
    job_id = store.create_training_job(backend="local", method="sft", training_set_id=training_set.id,
                                       base_model=f"local:{chatty_dir}", config_json="{}")
    checkpoint = register_checkpoint(store, method="sft", base_model=f"local:{chatty_dir}",
                                     save=lambda d: shutil.copytree(adapter, d), training_set_id=training_set.id,
                                     training_set_hash=training_set.content_hash, config={}, metrics={},
                                     job_id=job_id)
    result = export_model(checkpoint.model_ref, tmp_path / "out")
    card = (tmp_path / "out" / "README.md").read_text()
    lineage = json.loads((tmp_path / "out" / "flywheel_export.json").read_text())
    assert result.adapters[0]["hash"] == checkpoint.adapter_hash
    assert lineage["adapters"][0]["checkpoint_id"] == checkpoint.id and lineage["adapters"][0]["job_id"] == job_id
    assert lineage["base"] == str(chatty_dir)
    for needle in (str(chatty_dir), checkpoint.adapter_hash, checkpoint.id, job_id, training_set.id):
        assert needle in card


def test_combined_adapters_export_matches_the_combination(chatty_dir, adapter, tmp_path):
    other = make_adapter(chatty_dir, tmp_path / "other", seed=8, scale=0.5)
    ref = f"local:{chatty_dir}+{adapter}*0.6+{other}*0.4"
    result = export_model(ref, tmp_path / "combo")
    assert [a["weight"] for a in result.adapters] == [0.6, 0.4]
    assert greedy_texts(result.model_ref) == greedy_texts(ref)


def test_int8_export_loads_and_evaluates(chatty_dir, adapter, tiny_spec, tmp_path):
    pytest.importorskip("torchao")
    from flywheel.models import load_model

    ref = f"local:{chatty_dir}+{adapter}"
    result = cli("export", "model", ref, "--merge", "--quantize", "int8", "-o", tmp_path / "int8", "--json")
    assert result.exit_code == 0, result.output
    out = json.loads(result.output)
    config = json.loads((tmp_path / "int8" / "config.json").read_text())
    assert config["quantization_config"]["quant_method"] == "torchao"
    merged = export_model(ref, tmp_path / "fp32")
    assert out["size_bytes"] < merged.size_bytes

    model = load_model(out["model_ref"], {"dtype": "fp32"})
    weights = model.load()[0].model.layers[0].mlp.up_proj.weight
    assert "Int8" in type(weights).__name__  # quantised weights, not dequantised on load
    assert model.fingerprint != load_model(merged.model_ref).fingerprint
    texts = greedy_texts(out["model_ref"])
    assert all(isinstance(t, str) for t in texts) and any(texts)

    db = tmp_path / "f.db"
    result = cli("eval", tiny_spec, "--split", "valid", "--model", out["model_ref"], "--db", db, "--json")
    assert result.exit_code == 0, result.output
    summary = json.loads(result.output)
    assert summary["n_samples"] == 4 and summary["n_errors"] == 0


def test_adapters_on_a_quantised_model_are_refused(chatty_dir, adapter, tmp_path):
    pytest.importorskip("torchao")
    from flywheel.models import load_model

    export_model(f"local:{chatty_dir}", tmp_path / "q", quantize="int8")
    with pytest.raises(ModelError, match="adapters cannot go on a quantised model"):
        load_model(f"local:{tmp_path / 'q'}+{adapter}").load()
    with pytest.raises(ExportError, match="already quantised"):
        export_model(f"local:{tmp_path / 'q'}", tmp_path / "again")


def test_bad_exports_are_one_line_errors_and_lose_nothing(chatty_dir, adapter, tmp_path):
    existing = tmp_path / "existing"
    existing.mkdir()
    (existing / "keep.txt").write_text("mine")
    ref = f"local:{chatty_dir}+{adapter}"
    cases = [
        (("export", "model", ref, "--merge", "-o", existing), f"error: {existing}: already exists and is not empty"),
        (("export", "model", "openai:gpt-4o-mini", "-o", tmp_path / "x"), "error: openai:gpt-4o-mini: only local:"),
        (("export", "model", f"local:{chatty_dir}+{tmp_path / 'gone'}", "--merge", "-o", tmp_path / "y"),
         f"error: local:{chatty_dir}+{tmp_path / 'gone'}: adapter folder {tmp_path / 'gone'} has no"),
    ]
    for args, start in cases:
        result = cli(*args)
        assert result.exit_code == 1, result.output
        lines = result.output.strip().splitlines()
        assert len(lines) == 1 and lines[0].startswith(start), lines
    assert (existing / "keep.txt").read_text() == "mine" and len(list(existing.iterdir())) == 1
    assert not (tmp_path / "x").exists() and not (tmp_path / "y").exists()
    assert [p.name for p in tmp_path.iterdir() if p.name.startswith(".")] == []  # no staging left behind
    usage = cli("export", "model", ref, "-o", tmp_path / "z")  # adapters without --merge
    assert usage.exit_code == 2 and "pass --merge" in usage.output


def test_int8_without_torchao_is_a_clear_error(chatty_dir, tmp_path, monkeypatch):
    monkeypatch.setitem(sys.modules, "torchao", None)
    monkeypatch.setitem(sys.modules, "torchao.quantization", None)
    with pytest.raises(ExportError, match=r"needs torchao; install it with: pip install 'flywheel\[quantize\]'"):
        export_model(f"local:{chatty_dir}", tmp_path / "q", quantize="int8")
    assert not (tmp_path / "q").exists()


def test_force_replaces_an_earlier_export(chatty_dir, adapter, tmp_path):
    first = export_model(f"local:{chatty_dir}", tmp_path / "out")
    (tmp_path / "out" / "stale.txt").write_text("old")
    with pytest.raises(ExportError, match="already exists"):
        export_model(f"local:{chatty_dir}+{adapter}", tmp_path / "out")
    second = export_model(f"local:{chatty_dir}+{adapter}", tmp_path / "out", overwrite=True)
    assert not (tmp_path / "out" / "stale.txt").exists() and second.adapters and not first.adapters
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out"]  # no staging or old copy left behind
    assert greedy_texts(second.model_ref) == greedy_texts(f"local:{chatty_dir}+{adapter}")


def test_the_model_card_shows_the_eval_prompt_scores_and_a_call(chatty_dir, adapter, store, tmp_path):
    import re

    import yaml
    from conftest import make_rows, spec_dict, write_jsonl

    from flywheel.harness import run_eval
    from flywheel.models import load_model
    from flywheel.spec import load_eval_spec

    ref = f"local:{chatty_dir}+{adapter}"
    write_jsonl(tmp_path / "data.jsonl", make_rows(3))
    spec = spec_dict(ref, name="support-routing")
    spec["input"][0]["content"] = "Route the ticket.\n```\n# not a heading | not a cell\nOne label only."
    (tmp_path / "eval.yaml").write_text(yaml.safe_dump(spec), encoding="utf-8")
    loaded = load_eval_spec(tmp_path / "eval.yaml")
    model = load_model(ref)
    valid = run_eval(loaded, store, split="valid", model=model)
    test = run_eval(loaded, store, split="test", model=model)

    result = cli("export", "model", ref, "--merge", "-o", tmp_path / "card-out", "--db", store.path, "--json")
    assert result.exit_code == 0, result.output
    card = (tmp_path / "card-out" / "README.md").read_text()
    assert "Eval **support-routing**" in card
    v, t = store.get_iteration(valid.iteration_id), store.get_iteration(test.iteration_id)
    for split, it in (("valid", v), ("test", t)):
        ci = f"{100 * it.ci_low:.1f}% – {100 * it.ci_high:.1f}%"
        assert f"| {split} | {100 * it.score:.1f}% | {ci} | 3 |" in card
    # the prompt, inside a fence its own ``` cannot close
    assert "````json" in card and '"content": "Route the ticket.\\n```\\n# not a heading' in card
    assert "flywheel serve-model local:" in card and "--name card-out" in card
    python = re.search(r"```python\n(.*?)\n```", card, re.S).group(1)
    compile(python, "card.py", "exec")  # pastes as valid Python
    assert "model='card-out'" in python and "Route the ticket." in python
    # ... and answers when pasted, against the folder served as the card says (on a free port here).
    from flywheel.model_server import create_app
    from flywheel.web import BackgroundServer

    exported = json.loads(result.output)["model_ref"]
    with BackgroundServer(create_app(load_model(exported), name="card-out")) as server:
        printed = []
        exec(python.replace("http://127.0.0.1:8000", server.url), {"print": printed.append})
    assert len(printed) == 1 and isinstance(printed[0], str)
    lineage = json.loads((tmp_path / "card-out" / "flywheel_export.json").read_text())
    assert lineage["measured"]["eval_name"] == "support-routing"
    assert [s["split"] for s in lineage["measured"]["scores"]] == ["valid", "test"]


def test_a_model_never_measured_says_so_on_its_card(chatty_dir, tmp_path):
    result = export_model(f"local:{chatty_dir}", tmp_path / "plain")
    card = (tmp_path / "plain" / "README.md").read_text()
    assert result.measured is None and "Not measured in the store" in card and "## Call it" in card
