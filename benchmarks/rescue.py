"""`flywheel rescue` on BANKING77: a served stand-in for the platform's fine-tune, distilled into a
local student, compared paired on the same test items.

    .venv/bin/python benchmarks/rescue.py                       # 48 traffic, 16 train, 40 test items
    .venv/bin/python benchmarks/rescue.py --traffic 96 --test 80 --steps 40

The teacher: no platform fine-tune can be reached from here, so a tuned adapter stands in for it:
SmolLM2 with an SFT adapter trained on the labels of other BANKING77 train items (`--teacher-items
0`: the untuned embedded model), served by `flywheel serve-model local:smollm2+ADAPTER --name
ft:gpt-4o-mini-2024-07-18:acme::abc123`
(its own process; the rescue reaches it as `openai:ft:...` through the openai SDK, as it would the
platform). Its "stored completions" are its answers to the first N unlabelled BANKING77 queries,
written as the download `flywheel import openai-completions` reads and imported from it.
The student: `local:smollm2` with a LoRA adapter trained by the rescue (SFT) on the teacher's stored
replies and its graded answers to the eval's train items; 25% of the traffic is held back.
Both answer the same test items (paired). Teacher calls are priced at the fine-tuned list price of
flywheel/pricing.py (marked unverified there), the student at 0 (hardware you own).

Prints a markdown table; record it in docs/benchmarks.md with the load average it prints.
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
sys.path.insert(0, str(ROOT / "benchmarks"))

FT_NAME = "ft:gpt-4o-mini-2024-07-18:acme::abc123"
DEMO = ROOT / "evals" / "banking77"


def write_eval(folder: Path, n_train: int, n_test: int) -> Path:
    """The bundled eval on the first n_train train and n_test test items (same prompt and grader)."""
    import yaml

    rows = [json.loads(line) for line in (DEMO / "data.jsonl").read_text().splitlines() if line.strip()]
    kept = [r for r in rows if r["split"] == "train"][:n_train] + [r for r in rows if r["split"] == "test"][:n_test]
    (folder / "data.jsonl").write_text("".join(json.dumps(r) + "\n" for r in kept))
    spec = yaml.safe_load((DEMO / "eval.yaml").read_text())
    spec.pop("optimize", None)
    (folder / "eval.yaml").write_text(yaml.safe_dump(spec, sort_keys=False))
    return folder / "eval.yaml"


def tune_teacher(work: Path, items: int, steps: int) -> str:
    """The stand-in fine-tune: local:smollm2 with an SFT adapter trained on the labels of BANKING77
    train items the rescue does not use (`reference:label`, flywheel.distill), in its own store."""
    from flywheel.distill import capture
    from flywheel.spec import load_eval_spec
    from flywheel.store import Store
    from flywheel.train import SFTSpec, TrainRequest
    from flywheel.train import run as train
    from flywheel.train.sets import build_sft_set

    folder = work / "platform"
    folder.mkdir()
    rows = [json.loads(line) for line in (DEMO / "data.jsonl").read_text().splitlines() if line.strip()]
    kept = [r for r in rows if r["split"] == "train"][-items:] + [r for r in rows if r["split"] == "test"][-10:]
    (folder / "data.jsonl").write_text("".join(json.dumps(r) + "\n" for r in kept))
    (folder / "eval.yaml").write_text((work / "eval.yaml").read_text())
    spec = load_eval_spec(folder / "eval.yaml")
    store = Store.open(folder / "platform.db")
    try:
        captured = capture(spec, store, "reference:label", n=1)
        rows_set = build_sft_set(spec, store, captures=[captured.id], include_reviews=False)
        trained = train(TrainRequest(method="sft", spec=spec, store=store, base="local:smollm2", data=rows_set,
                                     config=SFTSpec(max_steps=steps, batch_size=8, learning_rate=1e-3),
                                     evaluate=False, quiet=True))
        return trained.checkpoint.model_ref
    finally:
        store.close()


def stored_traffic(base_url: str, spec_path: Path, n: int, out: Path) -> Path:
    """Ask the served teacher the first n unlabelled queries; write them as a stored-completions download."""
    import openai

    from flywheel.spec import load_eval_spec

    system = load_eval_spec(spec_path).messages()[0]
    queries = [json.loads(line) for line in (DEMO / "unlabelled.jsonl").read_text().splitlines()[:n]]
    client = openai.OpenAI(base_url=base_url, api_key="unused", max_retries=0)
    lines = []
    for index, query in enumerate(queries):
        messages = [system, {"role": "user", "content": query["text"]}]
        reply = client.chat.completions.create(model=FT_NAME, messages=messages, temperature=0, max_tokens=12)
        body = reply.model_dump(mode="json")
        body.update(id=f"chatcmpl-stored{index:04d}", metadata={"usecase": "banking"},
                    input_messages=[{"id": f"m{index}-{i}", **m} for i, m in enumerate(messages)])
        lines.append(json.dumps(body) + "\n")
    out.write_text("".join(lines))
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--traffic", type=int, default=48, help="Stored completions of the teacher to import.")
    parser.add_argument("--train", type=int, default=16, help="Eval train items the teacher answers (paid).")
    parser.add_argument("--test", type=int, default=40, help="Eval test items both answer (paired).")
    parser.add_argument("--steps", type=int, default=30, help="SFT steps of the student.")
    parser.add_argument("--margin", type=float, default=0.05, help="Non-inferiority margin.")
    parser.add_argument("--teacher-items", type=int, default=160,
                        help="Train items the stand-in fine-tune is tuned on (0: the embedded model untuned).")
    parser.add_argument("--teacher-steps", type=int, default=40, help="SFT steps of the stand-in fine-tune.")
    args = parser.parse_args()

    from serving import free_port, start, stop

    from flywheel.importers.completions import import_completions_file
    from flywheel.rescue import RescueSpec, run_rescue
    from flywheel.store import Store

    load_start = os.getloadavg()[0]
    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp)
        spec_path = write_eval(work, args.train, args.test)
        started = time.perf_counter()
        teacher_ref = tune_teacher(work, args.teacher_items, args.teacher_steps) if args.teacher_items else "local:smollm2"
        tune_s = time.perf_counter() - started
        port = free_port()
        base = f"http://127.0.0.1:{port}"
        server = start([sys.executable, "-m", "flywheel", "serve-model", teacher_ref, "--name", FT_NAME,
                        "--port", str(port)], base + "/health")
        store = Store.open(work / "flywheel.db")
        try:
            started = time.perf_counter()
            download = stored_traffic(base + "/v1", spec_path, args.traffic, work / "stored.jsonl")
            traffic_s = time.perf_counter() - started
            import_completions_file(store, download)
            rescue = RescueSpec(eval=str(spec_path), teacher=f"openai:{FT_NAME}",
                                teacher_options={"base_url": base + "/v1", "concurrency": 8},
                                traffic={"holdout": 0.25}, margin=args.margin,
                                train={"max_steps": args.steps, "batch_size": 8, "learning_rate": 1e-3})
            started = time.perf_counter()
            result = run_rescue(rescue, store, out_dir=work / "out")
            wall = time.perf_counter() - started
            cert = json.loads(Path(result.certificate_json).read_text())
        finally:
            store.close()
            stop(server)
    ev, costs, traffic = cert["eval"], cert["costs"], cert["traffic"]
    stand_in = (f"local:smollm2 + an SFT adapter ({args.teacher_items} train items, {args.teacher_steps} steps)"
                if args.teacher_items else "local:smollm2, untuned")
    print(f"## flywheel rescue on BANKING77 (stand-in teacher: {stand_in}, served as {FT_NAME})\n")
    print("| side | test score (paired n) | cost per 1,000 requests | latency mean / p95 (ms) |")
    print("|---|---|---|---|")
    for side, score in (("teacher", ev["teacher"]), ("student", ev["student"])):
        c = costs[side]
        latency = (f"{c['latency_ms_mean']:.0f} / {c['latency_ms_p95']:.0f}" if c["latency_ms_mean"] is not None
                   else "—")
        print(f"| {side} `{c['model'][:60]}` | {score:.3f} ({ev['n']}) | ${c['usd_per_1k_requests']:.4f} | {latency} |")
    print(f"\n* student − teacher on the test items: {ev['diff']:+.3f}, 95% paired CI [{ev['ci_low']:+.3f}, "
          f"{ev['ci_high']:+.3f}], one-sided lower bound {ev['low_one_sided']:+.3f} vs −{args.margin:g}")
    if traffic:
        print(f"* held-back traffic: the student's reply equals the stored one on {traffic['agreed']}/{traffic['n']}")
    print(f"* verdict: {cert['statement']}")
    print(f"* teacher calls paid by the rescue: {cert['teacher_calls']} (≈ ${cert['teacher_usd']:.5f}); "
          f"training rows {cert['training_rows']} ({result.plan.traffic_train} stored completions + graded answers)")
    print(f"* wall time of the rescue: {wall:.0f} s (before it: tuning the stand-in {tune_s:.0f} s, making the "
          f"{args.traffic} stored completions {traffic_s:.0f} s)")
    print(f"* load average: {load_start:.1f} at the start, {os.getloadavg()[0]:.1f} at the end "
          f"({os.cpu_count()} CPUs)")


if __name__ == "__main__":
    main()
