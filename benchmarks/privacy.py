"""Privacy: PII detection quality and speed, redaction throughput, and the proxy's added latency.

    .venv/bin/python benchmarks/privacy.py                   # 300 messages, 200 proxy round trips
    .venv/bin/python benchmarks/privacy.py --messages 200 --round-trips 100

Part 1 scores detection on Faker-made support messages (tests/privacy_helpers.py, a seed the
recognisers were not tuned on): recall and precision per entity kind, for Flywheel's detector
(graders/pii.py) and, as the baseline in the same run, Presidio's stock pattern recognisers for
the same kinds with the same NLP-less engine (what `AnalyzerEngine` gives without a spaCy model;
its email check made offline, as ours). Person names have no stock pattern recogniser: without an
NER model the baseline finds none.

Part 2 times detection and redaction per message (messages/s), both detectors, one thread; CPU
time (thread_time) beside wall time, since a loaded machine stretches the wall figure.

Part 3 starts an echo upstream (answers each chat call at once with "Noted: " + the user's text, so
the reply holds the same PII and is analysed separately) and `flywheel proxy` three times in front of it: plain, `--redact`, and
`--redact --block-output-pii`, each its own process; one keep-alive client alternates direct and
proxied round trips with 500-character Faker messages. Added latency = median(proxy with the
option) - median(plain proxy). Prints markdown tables and the load average.
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

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "tests"))
sys.path.insert(0, str(ROOT / "benchmarks"))

from serving import free_port, start, stop, table  # noqa: E402

SEED = 2026


def stock_detector(entities):
    """Presidio's predefined pattern recognisers for `entities`, no NLP model (email check offline)."""
    from presidio_analyzer import AnalyzerEngine, RecognizerRegistry
    from presidio_analyzer.nlp_engine import NlpEngineProvider
    from presidio_analyzer.predefined_recognizers import EmailRecognizer

    import tldextract

    from graders.pii import Entity

    offline = tldextract.TLDExtract(suffix_list_urls=(), cache_dir=None)
    nlp = NlpEngineProvider(nlp_configuration={"nlp_engine_name": "no_op",
                                               "models": [{"lang_code": "en", "model_name": "no_op"}]}).create_engine()
    registry = RecognizerRegistry(supported_languages=["en"])
    registry.load_predefined_recognizers(nlp_engine=nlp, languages=["en"])
    for recognizer in registry.recognizers:
        if isinstance(recognizer, EmailRecognizer):
            recognizer.validate_result = lambda text: offline(text.rsplit("@", 1)[-1]).fqdn != ""
    analyzer = AnalyzerEngine(nlp_engine=nlp, registry=registry, supported_languages=["en"])

    class Stock:
        def detect(self, text):
            found = analyzer.analyze(text=text, language="en", entities=list(entities), score_threshold=0.35)
            return [Entity(r.entity_type, r.start, r.end, text[r.start:r.end], r.score) for r in found]
    return Stock()


def bench_quality(n: int):
    from privacy_helpers import fake_messages, score

    from graders.pii import DEFAULT_ENTITIES, get_detector

    messages = fake_messages(n, seed=SEED)
    ours, stock = score(get_detector(), messages), score(stock_detector(DEFAULT_ENTITIES), messages)
    lines = ["| entity | in data | recall (ours) | precision (ours) | recall (stock) | precision (stock) |",
             "|---|---|---|---|---|---|"]
    for kind in sorted(set(ours) | set(stock)):
        o, s = ours.get(kind, {}), stock.get(kind, {})
        cell = lambda d, k: "—" if d.get(k) is None or d[k] != d[k] else f"{d[k]:.3f}"  # noqa: E731
        lines.append(f"| {kind} | {o.get('truth') or s.get('truth') or 0} | {cell(o, 'recall')} | "
                     f"{cell(o, 'precision')} | {cell(s, 'recall')} | {cell(s, 'precision')} |")
    return "\n".join(lines), messages


def bench_speed(messages):
    from graders.pii import DEFAULT_ENTITIES, get_detector
    from flywheel.privacy.redact import Redactor

    ours, stock, redactor = get_detector(), stock_detector(DEFAULT_ENTITIES), Redactor()
    rows = []
    chars = sum(len(m.text) for m in messages) / len(messages)
    for name, fn in (("detect, stock Presidio patterns", lambda m: stock.detect(m.text)),
                     ("detect, flywheel (graders.pii)", lambda m: ours.detect(m.text)),
                     ("redact a conversation (message + reply quoting it)", lambda m: redactor.redact_json(
                         {"messages": [{"role": "user", "content": m.text},
                                       {"role": "assistant", "content": "Noted: " + m.text}]}))):
        fn(messages[0])
        started, cpu_started = time.perf_counter(), time.thread_time()
        for m in messages:
            fn(m)
        elapsed, cpu = time.perf_counter() - started, time.thread_time() - cpu_started
        rows.append((f"{name}: messages/s; ms each, wall / CPU",
                     f"{len(messages) / elapsed:.0f}; {1000 * elapsed / len(messages):.2f} / {1000 * cpu / len(messages):.2f}"))
    rows.insert(0, ("messages, mean length", f"{len(messages)}, {chars:.0f} characters"))
    return rows


def echo_app():
    from starlette.applications import Starlette
    from starlette.responses import JSONResponse
    from starlette.routing import Route

    async def chat(request):
        body = json.loads(await request.body())
        text = "Noted: " + body["messages"][-1]["content"]  # not the same string: analysed on its own
        return JSONResponse({"id": "chatcmpl-echo", "object": "chat.completion", "created": 0, "model": "echo",
                             "choices": [{"index": 0, "message": {"role": "assistant", "content": text},
                                          "finish_reason": "stop"}],
                             "usage": {"prompt_tokens": 120, "completion_tokens": 120, "total_tokens": 240}})

    async def health(request):
        return JSONResponse({"status": "ok"})

    return Starlette(routes=[Route("/v1/chat/completions", chat, methods=["POST"]),
                             Route("/health", health, methods=["GET"])])


def bench_proxy(round_trips: int):
    import httpx2
    from privacy_helpers import fake_messages

    bodies = [json.dumps({"model": "echo", "messages": [{"role": "user", "content": m.text[:500]}]}).encode()
              for m in fake_messages(50, seed=SEED + 1, min_chars=500)]
    pii_per_message = statistics.mean(len(m.spans) for m in fake_messages(50, seed=SEED + 1, min_chars=500))
    upstream_port = free_port()
    upstream = f"http://127.0.0.1:{upstream_port}"
    procs = [start([sys.executable, __file__, "--echo-upstream", str(upstream_port)], upstream + "/health")]
    variants = {"plain": [], "--redact": ["--redact"], "--redact --block-output-pii": ["--redact", "--block-output-pii"]}
    urls, dbs = {}, {}
    try:
        for name, flags in variants.items():
            port = free_port()
            dbs[name] = Path(tempfile.mkdtemp()) / "captures.db"
            urls[name] = f"http://127.0.0.1:{port}"
            procs.append(start([sys.executable, "-m", "flywheel", "proxy", "--upstream", upstream + "/v1", "--port",
                                str(port), "--db", str(dbs[name]), *flags], urls[name] + "/v1/health"))
        times = {"direct": [], **{name: [] for name in variants}}
        targets = [("direct", upstream), *urls.items()]
        headers = {"content-type": "application/json", "authorization": "Bearer sk-bench"}
        with httpx2.Client() as client:
            for i in range(20 + round_trips):
                body = bodies[i % len(bodies)]
                for name, url in targets:
                    started = time.perf_counter()
                    response = client.post(url + "/v1/chat/completions", content=body, headers=headers)
                    if i >= 20:
                        times[name].append(time.perf_counter() - started)
                    assert response.status_code == 200, response.text
    finally:
        for proc in reversed(procs):
            stop(proc)
    from flywheel.store import Store

    store = Store.open(dbs["--redact"])
    stored = "".join(r.request_json or "" for r in store.query_captures())
    store.close()
    median = {name: 1000 * statistics.median(v) for name, v in times.items()}
    p90 = {name: 1000 * statistics.quantiles(v, n=10)[8] for name, v in times.items()}
    from flywheel.privacy.redact import Redactor

    redactor, cpu = Redactor(), []
    for body in bodies * 2:
        text = json.loads(body)["messages"][0]["content"]
        row = {"request_json": body.decode(), "response_json": json.dumps(
            {"choices": [{"index": 0, "message": {"role": "assistant", "content": "Noted: " + text}}]})}
        started = time.thread_time()
        redactor.redact_capture(row)
        cpu.append(time.thread_time() - started)
    from flywheel.privacy.policy import ProxyPrivacy

    screen, screen_cpu = ProxyPrivacy(block_output_pii="reject"), []
    for body in bodies * 2:
        request = json.loads(body)
        reply = {"choices": [{"index": 0, "message": {"role": "assistant",
                                                      "content": "Noted: " + request["messages"][0]["content"]}}]}
        started = time.thread_time()
        screen.screen(request, reply)
        screen_cpu.append(time.thread_time() - started)
    rows = [("request: 500 characters, PII entities per message (mean)", f"{pii_per_message:.1f}"),
            ("CPU to screen one reply (--block-output-pii), median (p90)",
             f"{1000 * statistics.median(screen_cpu):.2f} ms ({1000 * statistics.quantiles(screen_cpu, n=10)[8]:.2f})"),
            ("CPU to redact one such capture (request + reply), median (p90)",
             f"{1000 * statistics.median(cpu):.2f} ms ({1000 * statistics.quantiles(cpu, n=10)[8]:.2f})")]
    rows += [(f"{name}: median (p90) of {round_trips}", f"{median[name]:.2f} ms ({p90[name]:.2f})") for name in times]
    rows += [("added by --redact, median (goal < 10 ms)", f"**{median['--redact'] - median['plain']:.2f} ms**"),
             ("added by --redact --block-output-pii, median",
              f"{median['--redact --block-output-pii'] - median['plain']:.2f} ms"),
             ("stored requests holding <..._n> pseudonyms", f"{stored.count('_1>')} tags")]
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--messages", type=int, default=300)
    parser.add_argument("--round-trips", type=int, default=200)
    parser.add_argument("--proxy-only", action="store_true", help="Only part 3 (proxy round trips).")
    parser.add_argument("--echo-upstream", type=int, default=None, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.echo_upstream:
        import uvicorn

        uvicorn.run(echo_app(), host="127.0.0.1", port=args.echo_upstream, log_level="warning")
        return
    print(f"machine: {os.cpu_count()} cores, load average {os.getloadavg()[0]:.1f} at start\n")
    if not args.proxy_only:
        quality, messages = bench_quality(args.messages)
        print(f"Detection on {args.messages} Faker messages (seed {SEED}):\n\n{quality}\n")
        print(table("speed, one thread", bench_speed(messages)) + f"\n\nload average {os.getloadavg()[0]:.1f}\n")
    print(table("proxy round trips", bench_proxy(args.round_trips)))
    print(f"\nload average {os.getloadavg()[0]:.1f} at the end")


if __name__ == "__main__":
    main()
