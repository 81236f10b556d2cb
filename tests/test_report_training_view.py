"""The report's training section: the loss curves and checkpoint scores of the job that trained a
measured checkpoint, as inline, escaped SVG (a monitor's stop reason is user text)."""

from __future__ import annotations

import json
import re

from click.testing import CliRunner
from train_helpers import quick_sft, tiny_eval

from flywheel.cli import main
from flywheel.distill import capture
from flywheel.report.html import render_report
from flywheel.store import Store
from flywheel.train import build_sft_set
from flywheel.train.sft import train_sft
from flywheel.train.validation import ValidationPoint


def test_the_report_draws_the_jobs_curves_and_checkpoints(tmp_path, tiny_model_dir):
    spec = tiny_eval(tmp_path, tiny_model_dir, n_per_split=4)
    store = Store.open(tmp_path / "flywheel.db")
    capture(spec, store, "reference:label")
    seen: list[ValidationPoint] = []

    def monitor(point: ValidationPoint):
        seen.append(point)
        return "<script>alert('pruned')</script>" if point.step >= 4 else None

    result = train_sft(spec, store, build_sft_set(spec, store), base=spec.model, splits=("valid",), quiet=True,
                       config=quick_sft(max_steps=8, eval_steps=2, save_steps=2, valid_subset=2, keep="1"),
                       monitor=monitor)
    # The monitor saw each valid loss and each valid score, and its answer stopped the job at step 4.
    assert [(p.step, p.metric) for p in seen] == [(2, "valid_loss"), (2, "valid_score"), (4, "valid_loss")]
    assert result.stop_reason == "<script>alert('pruned')</script>" and result.metrics["steps"] == 4
    assert [c["step"] for c in result.checkpoints] == [2, 4]
    html = render_report(store, [store.get_iteration(result.evals[0].iteration_id).run_id])
    section = html[html.index('id="training"'):]
    section = section[:section.index("</section>")]
    assert result.job_id in section and all(c["id"] in section for c in result.checkpoints)
    assert 'aria-label="train and valid loss by step"' in section
    assert section.count("<polyline") == 2  # train and valid loss
    assert len(re.findall(r'<circle[^>]*r="3"', section)) == 2  # valid loss at steps 2 and 4
    assert len(re.findall(r'<circle[^>]*r="5"', section)) == 2  # valid score of each checkpoint
    assert "folder pruned" in section and "best" in section
    assert "<script>alert" not in html and "&lt;script&gt;alert(&#39;pruned&#39;)&lt;/script&gt;" in section
    assert "http://" not in section and "https://" not in section
    # What `flywheel train` prints names the command; the checkpoint id (or the job id) is the report's.
    assert f"  report: flywheel report {result.checkpoint.id} -o report.html" in result.summary_lines()
    store.close()
    db = str(tmp_path / "flywheel.db")
    for given in (result.checkpoint.id, result.job_id):
        out = CliRunner().invoke(main, ["report", given, "-o", str(tmp_path / "r.html"), "--db", db, "--json"])
        assert out.exit_code == 0, out.output
        assert json.loads(out.stdout)["iterations"] == 2  # the parent and the checkpoint, on valid
        page = (tmp_path / "r.html").read_text(encoding="utf-8")
        assert 'aria-label="train and valid loss by step"' in page and result.job_id in page
    other = next(c["id"] for c in result.checkpoints if not c["best"])
    out = CliRunner().invoke(main, ["report", other, "-o", str(tmp_path / "o.html"), "--db", db])
    assert out.exit_code == 1 and out.output.count("\n") == 1
    assert f"is not the one its job chose; report that one: flywheel report {result.checkpoint.id}" in out.output
    assert not (tmp_path / "o.html").exists()
