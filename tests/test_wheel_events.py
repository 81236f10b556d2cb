"""The wheel's one event stream (`flywheel.events.WheelEvent`): what a tiny-model wheel emits
(training steps with their loss, an estimate of the time left), the console's one line per stage
when stdout is not a terminal, the run row's latest event that the review app's panel reads."""

from __future__ import annotations

import yaml
from click.testing import CliRunner

from flywheel.cli import main
from flywheel.events import Throttle, WheelEvent
from flywheel.report.review_app import live_panel
from flywheel.run_spec import load_run_spec
from flywheel.wheel import run_wheel

from conftest import make_rows, spec_dict, write_jsonl

FAST = {"precision": "fp32", "batch_size": 4}


def write_run(tmp_path, model_dir, stages):
    write_jsonl(tmp_path / "data.jsonl", make_rows(6))
    (tmp_path / "eval.yaml").write_text(yaml.safe_dump(spec_dict(f"local:{model_dir}")))
    (tmp_path / "run.yaml").write_text(yaml.safe_dump({"eval": "eval.yaml", "plateau": 9, "stages": stages}))
    return tmp_path / "run.yaml"


def test_a_wheel_emits_training_steps_with_loss_and_an_eta(tmp_path, tiny_model_dir, store):
    stages = [{"stage": "capture", "teacher": "reference:label"},
              {"stage": "sft", "config": {"max_steps": 3, "logging_steps": 1, "save_steps": 3, "valid_subset": 2,
                                          **FAST}}]
    events: list[WheelEvent] = []
    panels = []

    def on_event(event: WheelEvent) -> None:
        events.append(event)
        # The review app's panel reads the run row meanwhile: at the second step, the first is stored.
        if event.kind == "train" and sum(e.kind == "train" for e in events) == 2:
            [run] = [r for r in store.list_runs(50) if r.kind == "wheel"]
            panels.append(live_panel(store.run_live(run.id)))

    result = run_wheel(load_run_spec(write_run(tmp_path, tiny_model_dir, stages)), store, on_event=on_event)
    train = [e for e in events if e.kind == "train"]
    assert train and all(e.stage == "sft" and e.lap == 1 and e.unit == "steps" for e in train)
    assert train[-1].done == train[-1].total == 3
    assert any(e.loss is not None and e.loss > 0 for e in train)
    assert [e.stage for e in events if e.kind == "stage_done"] == ["baseline", "capture", "sft"]
    assert any(e.kind == "evaluate" and e.step == "evaluate valid" and e.done == e.total for e in events)
    assert any(e.kind == "checkpoint" and "valid_score" in e.message for e in events)
    # Once a stage finished, every step of a later one estimates the time left.
    after_capture = events[[e.kind == "stage_done" and e.stage == "capture" for e in events].index(True):]
    assert all(e.eta_s is not None and e.eta_s >= 0 for e in after_capture if e.kind in ("train", "evaluate"))
    assert all(e.incumbent_score is not None for e in after_capture)
    assert events[-1].kind == "finished" and result.stopped in events[-1].message
    # While it ran the run row held its latest event; finished, it holds none.
    [panel] = panels
    assert panel is not None and panel["where"] == "lap 1/1 · stage 2/2 sft" and panel["step"].startswith("train ")
    assert store.run_live(result.run_id) is None


def test_without_a_terminal_the_wheel_prints_one_line_per_stage(tmp_path, tiny_model_dir):
    stages = [{"stage": "capture", "teacher": "reference:label"}]
    out = CliRunner().invoke(main, ["run", str(write_run(tmp_path, tiny_model_dir, stages)),
                                    "--db", str(tmp_path / "w.db")])
    assert out.exit_code == 0, out.output
    lines = out.output.splitlines()
    assert lines[0].startswith("baseline valid ")
    assert lines[1].startswith("lap 1 stage 1/1 capture -> captured in ")
    assert lines[2].startswith("stopped: ")
    assert not any("evaluate" in line or "(incumbent valid" in line for line in lines)
    quiet = CliRunner().invoke(main, ["run", str(tmp_path / "run.yaml"), "--db", str(tmp_path / "q.db"), "--json"])
    assert quiet.exit_code == 0 and quiet.output.lstrip().startswith("{"), quiet.output


def test_the_throttle_keeps_boundaries_and_last_steps():
    throttle = Throttle(3600)
    step = dict(kind="train", done=1, total=5)
    assert throttle.passes(WheelEvent(**step))
    assert not throttle.passes(WheelEvent(**{**step, "done": 2}))
    assert throttle.passes(WheelEvent(**{**step, "done": 5}))  # a step's last unit always shows
    assert throttle.passes(WheelEvent(kind="evaluate", done=1, total=9))  # per kind
    assert throttle.passes(WheelEvent(kind="stage_done", message="x"))
