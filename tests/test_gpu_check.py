"""benchmarks/gpu_check.py --dry-run: the whole GPU check on CPU with tiny shapes (no GPU figure here)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def test_the_dry_run_prints_one_table_with_every_engine_and_trainer(tmp_path):
    out = tmp_path / "check.json"
    env = {**os.environ, "PYTHONPATH": str(ROOT), "CUDA_VISIBLE_DEVICES": ""}
    done = subprocess.run([sys.executable, str(ROOT / "benchmarks" / "gpu_check.py"), "--dry-run", "--json", str(out)],
                          capture_output=True, text=True, env=env, timeout=300)
    assert done.returncode == 0, done.stderr[-2000:]
    table = [line for line in done.stdout.splitlines() if line.startswith("| tiny-dry-run |")]
    assert [line.split(" | ")[1] for line in table] == [
        "generation, engine continuous", "generation, engine hf", "LoRA SFT, flywheel", "LoRA SFT, trl defaults"]
    rows = json.loads(out.read_text())["rows"]
    assert all(row["new_tokens_s"] > 0 and row["tokens"] > 0 for row in rows[:2])
    flywheel, trl = rows[2], rows[3]
    assert flywheel["packing"] is True and trl["packing"] is False  # Flywheel's trainer packs, TRL's defaults pad
    assert flywheel["tokens_s"] > 0 and trl["tokens_s"] > 0 and flywheel["mfu"] is None  # no GPU: no MFU
    assert "CPU (dry run)" in done.stdout


def test_the_shapes_are_the_published_qwen_shapes():
    shapes = {p.stem: json.loads(p.read_text()) for p in (ROOT / "benchmarks" / "gpu_shapes").glob("qwen*.json")}
    assert shapes["qwen2.5-0.5b"]["hidden_size"] == 896 and shapes["qwen2.5-0.5b"]["num_hidden_layers"] == 24
    assert shapes["qwen2.5-1.5b"]["hidden_size"] == 1536 and shapes["qwen2.5-1.5b"]["intermediate_size"] == 8960
    assert all("config.json" in shape["_source"] for shape in shapes.values())
