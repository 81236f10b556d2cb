"""`flywheel rescue` end to end on 127.0.0.1: the platform stand-in (tests/platform_helpers.py) is the
teacher `openai:ft:...` and its stored completions; the student is the tiny real Llama, trained for
a few real steps — far too little to match the teacher, so the certificate must say parity was NOT
shown; `rescue verify` recomputes its hashes and notices an edited file."""

from __future__ import annotations

import json

import pytest
import yaml
from click.testing import CliRunner
from platform_helpers import FT_MODEL, Platform, traffic
from train_helpers import write_eval

from flywheel.certificate import (CertificateInputs, EvalParity, SideCost, build_certificate, verify_certificate,
                                  write_certificate)
from flywheel.cli import main
from flywheel.errors import RescueError
from flywheel.importers.completions import import_completions_api
from flywheel.rescue import RescueSpec, plan_rescue, run_rescue
from flywheel.web import BackgroundServer


@pytest.fixture
def platform():
    stand_in = Platform(traffic(10))
    with BackgroundServer(stand_in.app()) as server:
        stand_in.url = server.url + "/v1"
        yield stand_in


def rescue_spec(tmp_path, tiny_model_dir, platform, **overrides) -> RescueSpec:
    spec_path = write_eval(tmp_path / "eval", f"local:{tiny_model_dir}")
    return RescueSpec(**{"eval": str(spec_path), "teacher": f"openai:{FT_MODEL}",
                         "teacher_options": {"base_url": platform.url}, "student": f"local:{tiny_model_dir}",
                         "student_options": {"dtype": "fp32"},
                         "train": {"precision": "fp32", "max_steps": 2, "batch_size": 4, "learning_rate": 1e-3},
                         **overrides})


def test_dry_run_prices_the_teacher_calls_and_spends_nothing(store, tmp_path, tiny_model_dir, platform):
    import_completions_api(store, base_url=platform.url)
    plan = plan_rescue(rescue_spec(tmp_path, tiny_model_dir, platform), store)
    assert (plan.traffic_train + plan.traffic_held, plan.train_items, plan.test_items) == (10, 4, 4)
    assert plan.teacher_calls == 8 and plan.price_known  # ft:gpt-4o-mini's fine-tuned inference price
    assert "unverified" in plan.price_note and any("unverified" in line for line in plan.summary_lines())
    priced = plan_rescue(rescue_spec(tmp_path, tiny_model_dir, platform,
                                     teacher_options={"base_url": platform.url, "prices": {"input": 1, "output": 2}}), store)
    assert priced.price_note is None and priced.usd == pytest.approx(8 * (40 * 1 + 3 * 2) / 1e6)
    assert plan.usd == pytest.approx(8 * (40 * 0.30 + 3 * 1.20) / 1e6)
    cut = plan_rescue(rescue_spec(tmp_path, tiny_model_dir, platform, budget_usd=plan.usd * 0.7), store)
    assert cut.train_items < 4 and cut.usd <= plan.usd * 0.7
    with pytest.raises(RescueError, match="does not pay for the comparison itself.*Nothing was spent"):
        plan_rescue(rescue_spec(tmp_path, tiny_model_dir, platform, budget_usd=1e-9), store)
    assert platform.chat_calls == 0


def test_rescue_with_too_little_training_says_parity_was_not_shown(store, tmp_path, tiny_model_dir, platform):
    import_completions_api(store, base_url=platform.url)
    rescue = rescue_spec(tmp_path, tiny_model_dir, platform, margin=0.05)
    result = run_rescue(rescue, store, out_dir=tmp_path / "out")
    # 4 train + 4 test items planned; this eval repeats its questions across splits, so the cache pays once
    assert result.teacher_calls == platform.chat_calls == 4
    assert not result.parity_shown and result.statement.startswith("Parity NOT shown")
    cert = json.loads((tmp_path / "out" / "certificate.json").read_text())
    assert cert["eval"]["teacher"] == 1.0 and cert["eval"]["student"] < 1.0 and not cert["eval"]["non_inferior"]
    assert cert["traffic"]["n"] == result.plan.traffic_held
    assert any(a.startswith("More data") or "another base model" in a for a in cert["advice"])
    assert cert["commands"][0].startswith("flywheel serve-model") and f"--name '{FT_MODEL}'" in cert["commands"][0]
    assert {h["role"] for h in cert["hashes"]} >= {"eval spec", "eval data", "training set", "adapter"}
    assert cert["costs"]["teacher"]["usd_per_1k_requests"] > cert["costs"]["student"]["usd_per_1k_requests"] == 0
    html = (tmp_path / "out" / "certificate.html").read_text()
    assert "Parity NOT shown" in html and "<script" not in html
    kept = yaml.safe_load((tmp_path / "out" / "rescue.yaml").read_text())
    assert kept["teacher"] == f"openai:{FT_MODEL}" and kept["margin"] == 0.05
    assert verify_certificate(tmp_path / "out" / "certificate.json").ok
    # an edited number, or an edited data file, no longer verifies
    edited = dict(cert, parity_shown=True)
    (tmp_path / "out" / "edited.json").write_text(json.dumps(edited))
    assert not verify_certificate(tmp_path / "out" / "edited.json").body_ok
    data = tmp_path / "eval" / "data.jsonl"
    data.write_text(data.read_text() + "\n")
    runner = CliRunner().invoke(main, ["rescue", "verify", str(tmp_path / "out" / "certificate.json")])
    assert runner.exit_code == 1 and "eval data: CHANGED" in runner.output


def test_a_certificate_with_parity_escapes_what_it_shows(tmp_path):
    (tmp_path / "data.jsonl").write_text("{}\n")
    parity = EvalParity(eval_name="<b>x</b>", split="test", n=200, objective="label", teacher=0.90, student=0.91,
                        diff=0.01, ci_low=-0.02, ci_high=0.04, low_one_sided=-0.015, non_inferior=True, test="paired")
    side = SideCost(model="m", usd_per_1k_requests=0.0, basis="owned")
    cert = build_certificate(CertificateInputs(teacher="openai:ft:a", student="local:s+ckpt", served_name="ft:a",
                                               margin=0.05, eval_parity=parity, traffic=None, disagreements=[],
                                               costs={"teacher": side, "student": side},
                                               files=[("eval data", str(tmp_path / "data.jsonl"))]))
    assert cert.parity_shown and cert.statement.startswith("Parity shown") and not cert.advice
    json_path, html_path = write_certificate(cert, tmp_path)
    assert "&lt;b&gt;x&lt;/b&gt;" in html_path.read_text() and "<b>x</b>" not in html_path.read_text()
    assert verify_certificate(json_path).ok


def test_cli_dry_run(tmp_path, tiny_model_dir, platform):
    spec = rescue_spec(tmp_path, tiny_model_dir, platform)
    path = tmp_path / "rescue.yaml"
    path.write_text(yaml.safe_dump(spec.model_dump(mode="json")))
    out = CliRunner().invoke(main, ["rescue", "--spec", str(path), "--dry-run", "--db", str(tmp_path / "f.db")])
    assert out.exit_code == 0, out.output
    assert "teacher calls, answer 4 eval test items" in out.output and platform.chat_calls == 0


def test_rescue_of_a_learnable_teacher_shows_parity_with_unlabelled_inputs_kept_by_self_consistency(
        store, tmp_path, tiny_model_dir):
    """The stand-in fine-tune answers every question `yes` (and the eval's reference is `yes`): a
    teacher the tiny student learns in 80 real steps (one-token replies, `sampling.max_tokens: 1`,
    used for the traffic comparison too), so parity IS shown — on the eval (both right on
    every item) and on held-back traffic (the student's replies equal the stored ones)."""
    stand_in = Platform(traffic(24, answer="yes"), answer="yes")
    inputs = tmp_path / "inputs.jsonl"
    inputs.write_text("".join(json.dumps({"id": f"u{i}", "text": f"new customer message {i}"}) + "\n" for i in range(4)))
    with BackgroundServer(stand_in.app()) as server:
        stand_in.url = server.url + "/v1"
        import_completions_api(store, base_url=stand_in.url)
        rescue = rescue_spec(tmp_path, tiny_model_dir, stand_in, margin=0.3, traffic={"holdout": 0.5},
                             unlabelled={"path": str(inputs), "id_field": "id", "n": 3, "temperature": 0.7},
                             train={"precision": "fp32", "max_steps": 80, "batch_size": 4, "learning_rate": 0.01,
                                    "lr_scheduler": "constant", "lora": {"r": 32, "alpha": 64}})
        eval_spec = tmp_path / "eval" / "eval.yaml"  # one-word replies: the 2-layer student does not learn to stop
        eval_spec.write_text(yaml.safe_dump({**yaml.safe_load(eval_spec.read_text()),
                                             "sampling": {"temperature": 0, "max_tokens": 1}}))
        data = tmp_path / "eval" / "data.jsonl"
        data.write_text("".join(json.dumps({**json.loads(line), "label": "yes"}) + "\n"
                                for line in data.read_text().splitlines()))
        plan = plan_rescue(rescue, store)
        assert (plan.unlabelled_inputs, plan.calls[1].calls) == (4, 12)  # 4 inputs x 3 votes
        result = run_rescue(rescue, store, out_dir=tmp_path / "out")
    # paid: 4 train items + 12 votes + 4 test items, less the test questions the train items already asked
    assert result.teacher_calls == stand_in.chat_calls and stand_in.chat_calls >= 12 + 4
    cert = json.loads((tmp_path / "out" / "certificate.json").read_text())
    assert result.parity_shown, (result.statement, [(d["student"], d["teacher"]) for d in cert["disagreements"][:5]])
    assert result.statement.startswith("Parity shown") and not cert["advice"]
    assert (cert["eval"]["teacher"], cert["eval"]["student"]) == (1.0, 1.0) and cert["eval"]["non_inferior"]
    assert cert["traffic"]["agreed"] == cert["traffic"]["n"] == plan.traffic_held and cert["traffic"]["non_inferior"]
    # every unlabelled input reached the vote (the teacher agrees with itself) and became a training row
    assert result.training_rows == plan.traffic_train + 4 + 4
    kept = yaml.safe_load((tmp_path / "out" / "rescue.yaml").read_text())
    assert kept["unlabelled"]["path"] == str(inputs) and kept["unlabelled"]["n"] == 3
    assert verify_certificate(tmp_path / "out" / "certificate.json").ok
