"""How fast are the API's list/retrieve endpoints over 10,000 output items, and does the queue
finish 100 eval jobs submitted at once — all of them, each once?

Latency: a store with one API eval run linked to a harness run of N samples (two graders each,
written through Store methods as the report benchmark does), served by `create_api_app` in a
background uvicorn thread; each endpoint is called R times over one kept-alive httpx connection
and p50/p95 are printed. The baseline in the same run is the same endpoints over a 100-sample
run (the ratio shows how they scale) and `/v1/health` (the floor of the HTTP stack).

Queue: J runs of K items each on a tiny random Llama (SmolLM2's tokenizer) are created at once
through the real openai SDK; the table shows the wall time until all finished with 1 and 2
workers, against the baseline of calling `run_eval` in a loop on the same specs (no server, no
queue), and checks that every job succeeded once (attempts = 1, one harness run per API run).

    .venv/bin/python benchmarks/api.py                       # N=10000, R=200, J=100, K=2
    .venv/bin/python benchmarks/api.py --jobs 30 --items 2   # a smaller queue run
    .venv/bin/python benchmarks/api.py --skip-latency --skip-queue --repeats 500   # access + rate limit only
    .venv/bin/python benchmarks/api.py --skip-latency --skip-queue --skip-limits --contention  # workers

Access: the list endpoints without a key or limit (the baseline), with the rate limiter on (a
limit never reached, so every request pays the bucket and its headers), and with a key too
(hash lookup per request); p50 / p95 and the p95 ratio to the baseline.

Contention (`--contention`): `GET /v1/evals` latency idle, while an eval run generates on the tiny
model, and while an SFT job trains it, with one worker as a thread of the server vs as a process.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

# The script's own folder would shadow the `graders` package with benchmarks/graders.py.
sys.path[0] = str(Path(__file__).resolve().parents[1] / "tests")

import httpx  # noqa: E402

from api_helpers import client_for, completions_source, create_eval, items, wait_run  # noqa: E402
from report_helpers import build_run  # noqa: E402

from flywheel.api.app import create_api_app  # noqa: E402
from flywheel.store import Store, now  # noqa: E402
from flywheel.web import BackgroundServer  # noqa: E402


def linked_run(store: Store, n: int, tag: str) -> tuple[str, str, str]:
    """An API eval + run whose output items are the n samples of a harness run; (eval, run, item) ids."""
    ids = build_run(store, n_items=n, stages=(("eval", "measured"),), run_id=f"run-bench-{tag}")
    criteria = [{"type": "string_check", "name": "label", "input": "{{sample.output_text}}",
                 "reference": "{{item.label}}", "operation": "ilike", "id": "label-1"},
                {"type": "score_model", "name": "judge", "model": "openai:judge", "input": [], "id": "judge-1"}]
    eval_id, run_id = f"eval_bench{tag}", f"evalrun_bench{tag}"
    store.api_insert("api_evals", {"id": eval_id, "created_at": now(), "name": "bench", "metadata_json": "{}",
                                   "project": "default",
                                   "data_source_config_json": json.dumps({"type": "custom", "schema": {}}),
                                   "testing_criteria_json": json.dumps(criteria)})
    source = {"type": "completions", "model": "local:tiny", "source": {"type": "file_content", "content": []},
              "input_messages": {"type": "template", "template": [{"role": "user", "content": "{{item.text}}"}]}}
    store.api_insert("api_eval_runs", {"id": run_id, "eval_id": eval_id, "created_at": now(), "name": "bench",
                                       "project": "default",
                                       "status": "completed", "model": "local:tiny", "data_source_json": json.dumps(source),
                                       "metadata_json": "{}", "run_id": ids["run_id"],
                                       "iteration_id": ids["iterations"][0], "dataset_path": ""})
    # as a finished run keeps them (flywheel.api.runners.eval_runs.EvalRunRunner.settle)
    store.api_update("api_eval_runs", run_id, result_json=json.dumps(store.result_counts(ids["iterations"][0])))
    middle = store.db.execute("select id from samples where iteration_id = ? order by id limit 1 offset ?",
                              [ids["iterations"][0], n // 2]).fetchone()[0]
    return eval_id, run_id, f"outputitem_{middle}"


def timed(http: httpx.Client, path: str, repeats: int) -> tuple[float, float]:
    http.get(path).raise_for_status()  # warm
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        response = http.get(path)
        times.append((time.perf_counter() - start) * 1000)
        response.raise_for_status()
    times.sort()
    return statistics.median(times), times[int(0.95 * (len(times) - 1))]


def latency(n: int, repeats: int) -> None:
    with tempfile.TemporaryDirectory() as tmp:
        db = str(Path(tmp) / "bench.db")
        store = Store.open(db)
        started = time.perf_counter()
        big = linked_run(store, n, "big")
        small = linked_run(store, 100, "small")
        print(f"stored {n} + 100 output items in {time.perf_counter() - started:.1f}s", file=sys.stderr)
        store.close()
        with BackgroundServer(create_api_app(db, workers=0)) as server, \
                httpx.Client(base_url=server.url) as http:
            floor = timed(http, "/v1/health", repeats)
            print(f"\n| endpoint ({repeats} calls) | {n} items p50 / p95 ms | 100 items p50 / p95 ms | p95 ratio |")
            print("|---|---|---|---|")
            print(f"| GET /v1/health (floor) | {floor[0]:.1f} / {floor[1]:.1f} | | |")
            for label, template in [
                    ("list evals", "/v1/evals"),
                    ("list runs", "/v1/evals/{e}/runs"),
                    ("retrieve run (counts)", "/v1/evals/{e}/runs/{r}"),
                    ("list output items (first 20)", "/v1/evals/{e}/runs/{r}/output_items"),
                    ("list output items (100 after the middle)", "/v1/evals/{e}/runs/{r}/output_items?limit=100&after={i}"),
                    ("list output items status=fail", "/v1/evals/{e}/runs/{r}/output_items?status=fail"),
                    ("retrieve output item (middle)", "/v1/evals/{e}/runs/{r}/output_items/{i}")]:
                rows = []
                for e, r, i in (big, small):
                    if "{i}" in template and e == small[0]:
                        i = small[2]
                    rows.append(timed(http, template.format(e=e, r=r, i=i), repeats))
                print(f"| {label} | {rows[0][0]:.1f} / {rows[0][1]:.1f} | {rows[1][0]:.1f} / {rows[1][1]:.1f} "
                      f"| {rows[0][1] / rows[1][1]:.2f} |")


def limits(n: int, repeats: int) -> None:
    """Access checks and the rate limiter on the list endpoints: the same store served without a key
    or limit (baseline), with a limit (keyless: by client address), and with a key and a limit."""
    from flywheel.api.access import create_key

    with tempfile.TemporaryDirectory() as tmp:
        db = str(Path(tmp) / "limits.db")
        store = Store.open(db)
        eval_id, run_id, _ = linked_run(store, n, "lim")
        key, _ = create_key(store, "bench")
        store.close()
        setups = [("no key, no limit (baseline)", {}, {}),
                  ("rate limit, no key", {"rate_limit_rpm": 10**9}, {}),
                  ("key + rate limit", {"rate_limit_rpm": 10**9, "require_key": True},
                   {"Authorization": f"Bearer {key}"})]
        paths = [("list evals", "/v1/evals"), ("list output items (20)", f"/v1/evals/{eval_id}/runs/{run_id}/output_items")]
        results = {}
        for label, options, headers in setups:
            with BackgroundServer(create_api_app(db, workers=0, **options)) as server, \
                    httpx.Client(base_url=server.url, headers=headers) as http:
                for name, path in paths:
                    results[label, name] = timed(http, path, repeats)
        print(f"\n| access setup ({repeats} calls, {n} items) | " + " | ".join(f"{name} p50 / p95 ms" for name, _ in paths)
              + " | p95 vs baseline |")
        print("|---|" + "---|" * len(paths) + "---|")
        base = setups[0][0]
        for label, _, _ in setups:
            cells = " | ".join(f"{results[label, name][0]:.2f} / {results[label, name][1]:.2f}" for name, _ in paths)
            ratios = ", ".join(f"{results[label, name][1] / results[base, name][1]:.2f}" for name, _ in paths)
            print(f"| {label} | {cells} | {ratios} |")
        # The same work without HTTP around it: what each request pays, in microseconds.
        from flywheel.api.access import Access, hash_key
        from flywheel.api.limits import RateLimiter

        store = Store.open(db)
        limiter = RateLimiter(10**9)
        access = Access(None, store=lambda: store, require_key=True, limiter=limiter)
        scope = {"headers": [(b"authorization", f"Bearer {key}".encode())]}
        calls = 20_000
        costs = {}
        for label, work in [("RateLimiter.take + headers", lambda: limiter.take("key_x").headers()),
                            ("sha256 of the key", lambda: hash_key(key)),
                            ("key check (hash + indexed lookup)", lambda: access.identify(scope))]:
            started = time.perf_counter()
            for _ in range(calls):
                work()
            costs[label] = (time.perf_counter() - started) / calls * 1e6
        store.close()
        print("\n| per request, in process | µs |\n|---|---|")
        for label, micros in costs.items():
            print(f"| {label} | {micros:.1f} |")


def contention(repeats: int, model_dir: Path, tmp: Path) -> None:
    """List latency while a job runs, with the workers as threads of the server vs as processes."""
    chat = [{"messages": [{"role": "user", "content": f"question {i}"},
                          {"role": "assistant", "content": "card_arrival"}]} for i in range(8)]
    rows = {}
    for mode in ("threads", "processes"):
        db = str(tmp / f"contention-{mode}.db")
        app = create_api_app(db, workers=1, worker_processes=mode == "processes")
        with BackgroundServer(app) as server, httpx.Client(base_url=server.url) as http:
            client = client_for(server.url)
            evaluation = create_eval(client)
            rows[mode, "idle"] = timed(http, "/v1/evals", repeats)
            run = client.evals.runs.create(evaluation.id, data_source=completions_source(
                model_dir, {"type": "file_content", "content": items(2000)}, max_tokens=16))
            while not client.evals.runs.output_items.list(run.id, eval_id=evaluation.id, limit=1).data:
                time.sleep(0.05)  # generating (past loading the model): samples are being stored
            rows[mode, "eval run generating"] = timed(http, "/v1/evals", repeats)
            client.evals.runs.cancel(run.id, eval_id=evaluation.id)
            wait_run(client, evaluation.id, run.id)
            training = client.files.create(file=("train.jsonl", "".join(json.dumps(r) + "\n" for r in chat).encode()),
                                           purpose="fine-tune")
            job = client.fine_tuning.jobs.create(model=f"local:{model_dir}", training_file=training.id, method={
                "type": "supervised", "supervised": {"hyperparameters": {"n_epochs": 50, "batch_size": 1}}})
            while not any(e.type == "metrics" for e in client.fine_tuning.jobs.list_events(job.id).data):
                time.sleep(0.05)
            rows[mode, "SFT job training"] = timed(http, "/v1/evals", repeats)
            client.fine_tuning.jobs.cancel(job.id)
            while client.fine_tuning.jobs.retrieve(job.id).status not in ("cancelled", "succeeded", "failed"):
                time.sleep(0.1)
    print(f"\n| GET /v1/evals ({repeats} calls) while | workers as threads p50 / p95 ms | as processes p50 / p95 ms "
          "| p95 threads / processes |")
    print("|---|---|---|---|")
    for what in ("idle", "eval run generating", "SFT job training"):
        t, p = rows["threads", what], rows["processes", what]
        print(f"| {what} | {t[0]:.1f} / {t[1]:.1f} | {p[0]:.1f} / {p[1]:.1f} | {t[1] / p[1]:.2f} |")


def tiny_model(folder: Path) -> Path:
    from serving_helpers import build_chatty_model

    from flywheel.models.loading import materialise_embedded

    return build_chatty_model(folder / "tiny", materialise_embedded("smollm2"))


def queue(jobs: int, n_items: int, workers: int, model_dir: Path, tmp: Path) -> tuple[float, str]:
    db = str(tmp / f"queue-{workers}.db")
    with BackgroundServer(create_api_app(db, workers=workers)) as server:
        client = client_for(server.url)
        evaluation = create_eval(client)
        started = time.perf_counter()
        runs = [client.evals.runs.create(evaluation.id, data_source=completions_source(
            model_dir, {"type": "file_content", "content": items(n_items)}, max_tokens=2)) for _ in range(jobs)]
        submitted = time.perf_counter() - started
        for run in runs:
            wait_run(client, evaluation.id, run.id, timeout=1800)
        wall = time.perf_counter() - started
        statuses = [client.evals.runs.retrieve(r.id, eval_id=evaluation.id).status for r in runs]
    store = Store.open(db)
    try:
        attempts = [a for (a,) in store.db.execute("select attempts from api_jobs").fetchall()]
        per_run = store.db.execute("select count(*) from runs group by command").fetchall()
        samples = store.db.execute("select count(*) from samples").fetchone()[0]
    finally:
        store.close()
    ok = (statuses.count("completed") == jobs and len(attempts) == jobs and set(attempts) == {1}
          and len(per_run) == jobs and {c for (c,) in per_run} == {1} and samples == jobs * n_items)
    check = (f"{statuses.count('completed')}/{jobs} completed, attempts {sorted(set(attempts))}, "
             f"{samples} samples{'' if ok else ' — CHECK FAILED'} (submitted in {submitted:.1f}s)")
    return wall, check


def direct(jobs: int, n_items: int, model_dir: Path, tmp: Path) -> float:
    """The baseline: the same evals through `run_eval` in a loop, one process, no server or queue."""
    from flywheel.api.runners.eval_runs import build_spec
    from flywheel.harness import run_eval
    from flywheel.models import load_model

    store = Store.open(tmp / "direct.db")
    data = tmp / "direct.jsonl"
    data.write_text("".join(json.dumps(i["item"]) + "\n" for i in items(n_items)))
    from api_helpers import CRITERIA

    eval_row = {"id": "eval_x", "name": "tiny-api", "testing_criteria_json": json.dumps(CRITERIA)}
    source = json.dumps(completions_source(model_dir, {}, max_tokens=2))
    model = None
    started = time.perf_counter()
    for index in range(jobs):
        spec = build_spec(eval_row, {"id": f"r{index}", "data_source_json": source, "dataset_path": str(data)})
        model = model or load_model(spec.model, spec.model_options)
        run_eval(spec, store, model=model)
    store.close()
    return time.perf_counter() - started


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--items-stored", type=int, default=10_000)
    parser.add_argument("--repeats", type=int, default=200)
    parser.add_argument("--jobs", type=int, default=100)
    parser.add_argument("--items", type=int, default=2)
    parser.add_argument("--skip-latency", action="store_true")
    parser.add_argument("--skip-queue", action="store_true")
    parser.add_argument("--skip-limits", action="store_true")
    parser.add_argument("--contention", action="store_true", help="Also: list latency while jobs run, "
                        "workers as threads vs processes.")
    args = parser.parse_args()
    print(f"load average: {os.getloadavg()[0]:.2f} {os.getloadavg()[1]:.2f} {os.getloadavg()[2]:.2f}")
    if not args.skip_latency:
        latency(args.items_stored, args.repeats)
    if not args.skip_limits:
        limits(min(args.items_stored, 1000), args.repeats)
    if args.contention:
        with tempfile.TemporaryDirectory() as name:
            contention(args.repeats, tiny_model(Path(name)), Path(name))
    if not args.skip_queue:
        with tempfile.TemporaryDirectory() as name:
            tmp = Path(name)
            model_dir = tiny_model(tmp)
            base = direct(args.jobs, args.items, model_dir, tmp)
            print(f"\n| {args.jobs} eval jobs x {args.items} items | wall s | jobs/s | vs run_eval loop | check |")
            print("|---|---|---|---|---|")
            print(f"| run_eval loop (baseline, no server) | {base:.1f} | {args.jobs / base:.1f} | 1.00 | |")
            for workers in (1, 2):
                wall, check = queue(args.jobs, args.items, workers, model_dir, tmp)
                print(f"| API queue, {workers} worker(s) | {wall:.1f} | {args.jobs / wall:.1f} | {wall / base:.2f} "
                      f"| {check} |")
    print(f"\nload average after: {os.getloadavg()[0]:.2f} {os.getloadavg()[1]:.2f} {os.getloadavg()[2]:.2f}")


if __name__ == "__main__":
    main()
