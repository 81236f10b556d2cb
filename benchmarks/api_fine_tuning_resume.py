"""What an API fine-tuning job's resumable checkpoints cost, and what they save after a crash.

    .venv/bin/python benchmarks/api_fine_tuning_resume.py                 # 40 rows, 2 epochs, batch 4: 20 steps
    .venv/bin/python benchmarks/api_fine_tuning_resume.py --rows 64 --epochs 3

SFT of the embedded SmolLM2 on BANKING77 train rows (the query -> its intent label, as platform chat
examples), in one process, same rows, seed and steps, with the configs the API's runner builds
(`flywheel.api.runners.fine_tuning`):

1. `plain`: `train_config` alone (what a job ran before: one adapter at the end, nothing to resume);
2. `checkpointed`: `job_train_config` (a resumable checkpoint about every 10% of the steps);
3. `+ validation`: the same with a validation file (the first `--valid` valid rows): its loss at
   every checkpoint;
4. `crash + resume`: the checkpointed job crashes (an exception at step ~60%, after a save), then
   the same job resumes (`run_local(resume=JOB)`, as the API does after a kill): the wall time and
   steps of the resumed part vs a restart from scratch (the whole `checkpointed` run).

Load average is printed beside every timing: the machine is shared.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

DEMO = ROOT / "evals" / "banking77" / "data.jsonl"


def load() -> str:
    return " ".join(f"{v:.2f}" for v in os.getloadavg())


def chat_rows(split: str, n: int) -> list[dict]:
    rows = []
    for line in DEMO.read_text(encoding="utf-8").splitlines():
        item = json.loads(line)
        if item["split"] == split and len(rows) < n:
            rows.append({"messages": [{"role": "user", "content": item["text"]},
                                      {"role": "assistant", "content": item["label"]}]})
    return rows


class Crash(Exception):
    """The simulated kill."""


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rows", type=int, default=40)
    parser.add_argument("--valid", type=int, default=16)
    parser.add_argument("--epochs", type=int, default=2)
    parser.add_argument("--batch", type=int, default=4)
    parser.add_argument("--model", default="local:smollm2")
    parser.add_argument("--repeats", type=int, default=2, help="runs of plain and checkpointed each (best kept)")
    args = parser.parse_args()

    from transformers import TrainerCallback

    from flywheel.api.runners.fine_tuning import job_spec, job_train_config, train_config
    from flywheel.store import Store
    from flywheel.train.formats import load_training_file
    from flywheel.train.local import run_local
    from flywheel.train.sft import build_sft_trainer

    folder = Path(tempfile.mkdtemp(prefix="bench-api-resume-"))
    train_path, valid_path = folder / "train.jsonl", folder / "valid.jsonl"
    for path, rows in ((train_path, chat_rows("train", args.rows)), (valid_path, chat_rows("valid", args.valid))):
        path.write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")
    store = Store.open(folder / "flywheel.db")
    training_set = load_training_file("sft", str(train_path))
    valid_set = load_training_file("sft", str(valid_path))
    row = {"id": "ftjob-bench", "seed": 0, "method_json": json.dumps({"type": "supervised", "supervised": {
        "hyperparameters": {"n_epochs": args.epochs, "batch_size": args.batch}}})}
    spec = job_spec(row, args.model, str(train_path))

    def train(config, eval_set=None, callbacks=(), resume=None):
        def build(model, tokenizer, output_dir, bf16):
            return build_sft_trainer(model, tokenizer, training_set, config, output_dir, bf16=bf16, quiet=True,
                                     eval_set=eval_set)

        started, before = time.perf_counter(), load()
        result = run_local("sft", spec, store, training_set, base=args.model, config=config, build=build,
                           evaluate=False, quiet=True, callbacks=callbacks, resume=resume, fresh=True)
        return result, time.perf_counter() - started, f"{before} -> {load()}"

    plain = train_config(row)
    checkpointed = job_train_config(row, rows=len(training_set))
    validated = job_train_config(row, rows=len(training_set), validation_path=str(valid_path))
    rows = []
    train(plain.model_copy(update={"max_steps": 2}))  # warm-up (first model load, kernels), not counted
    for repeat in range(args.repeats):  # interleaved, so a load swing hits both
        for name, config in (("plain (one adapter at the end)", plain),
                             (f"checkpointed (every {checkpointed.save_steps})", checkpointed)):
            result, wall, at = train(config)
            rows.append((f"{name} #{repeat + 1}", result.metrics["steps"], wall, at,
                         len(store.job_checkpoints(result.job_id))))
    total = rows[0][1]
    base_wall = min(r[2] for r in rows if r[0].startswith("plain"))
    checkpointed_wall = min(r[2] for r in rows if r[0].startswith("checkpointed"))
    result, wall, at = train(validated, eval_set=valid_set)
    rows.append((f"+ validation ({len(valid_set)} rows)", result.metrics["steps"], wall, at,
                 len(store.job_checkpoints(result.job_id))))

    crash_at = max(checkpointed.save_steps + 1, int(total * 0.6))

    class CrashAt(TrainerCallback):
        def on_step_end(self, args_, state, control, **kwargs):
            if state.global_step == crash_at:
                raise Crash(f"killed at step {crash_at}")

    started, before = time.perf_counter(), load()
    try:
        train(checkpointed, callbacks=[CrashAt()])
    except Crash:
        pass
    crashed_wall = time.perf_counter() - started
    job_id = store.db.execute("select id from training_jobs where status = 'failed' order by created_at desc"
                              " limit 1").fetchone()[0]
    resumed, wall, at = train(checkpointed, resume=job_id)
    from_step = resumed.metrics["resumed_from_step"]
    rows.append((f"crashed at step {crash_at}", crash_at, crashed_wall, f"{before} -> {load()}",
                 from_step // checkpointed.save_steps))
    rows.append((f"resumed from step {from_step}", total - from_step, wall, at,
                 len(store.job_checkpoints(job_id))))

    print(f"\nSFT {args.model}, {len(training_set)} rows, {args.epochs} epochs, batch {args.batch}: {total} steps\n")
    print("| run | steps trained | wall s | x best plain | checkpoints | load avg (1/5/15) before -> after |")
    print("|---|---|---|---|---|---|")
    for name, steps, wall_s, at_, ckpts in rows:
        print(f"| {name} | {steps} | {wall_s:.1f} | {wall_s / base_wall:.2f} | {ckpts} | {at_} |")
    print(f"\ncheckpointed / plain (best of {args.repeats} each): x{checkpointed_wall / base_wall:.2f}")
    print(f"after the crash: resuming trained {total - from_step} of {total} steps in {wall:.1f}s; a restart from "
          f"scratch would train {total} ({checkpointed_wall:.1f}s): x{wall / checkpointed_wall:.2f} of the time")
    store.close()


if __name__ == "__main__":
    main()
