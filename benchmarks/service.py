"""The service (docs/service.md): proxy overhead with shadowing on, and requests lost during switches.

    .venv/bin/python benchmarks/service.py                       # 400 round trips, 20 switches
    .venv/bin/python benchmarks/service.py --round-trips 200 --switches 10
    .venv/bin/python benchmarks/service.py --part story --measure 250   # the shipped example, ~25 min

Part 1, overhead: a canned upstream (answers every chat call at once, so model time does not
drown the measurement) behind three doors in ONE process, as `serve --flywheel` runs them: direct,
the capture proxy alone, and the capture proxy with the shadow worker observing every call
(share 1.0: each request is queued for the candidate and both answers are graded by banking77's
graders on a background thread). Round trips from one keep-alive client rotate over the three
doors, so all see the same load; the added latency is the difference of the medians (p50) and of
the 95th percentiles against direct. Goal: < 5 ms added at p50 with shadowing on.

Part 2, switches: the alias model server with the embedded SmolLM2 answering `production`; four
client threads send requests (max_tokens 1) while the main thread promotes and rolls back the
aliases `--switches` times. Every reply must be a 200 from one of the two targets: the count of
failed requests is the figure (goal 0). Prints markdown tables and the load average.

Part 3, the story (`--part story`, ~25 min; not part of `all`): examples/service/service.yaml run
for real as a user runs it (`flywheel serve --flywheel` as a child process, its own store and free
ports), `examples/service/simulate.py` traffic through the proxy; one `kill -9` mid-lap and a
restart; then drifted phrasings; then a broken candidate and a forced broken production. Prints
the online score, tokens per 1,000 requests and latency of production before the first lap, after
the first promotion and around the drift laps, and each lap's decisions with their times from the
trigger.
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from benchmarks.serving import CANNED, canned_app  # noqa: E402

BANKING = ROOT / "evals" / "banking77" / "eval.yaml"


def quantile(values: list[float], p: int) -> float:
    """The p-th percentile (p50: the median); nan without values."""
    if not values:
        return float("nan")
    if p == 50 or len(values) < 2:
        return statistics.median(values)
    return statistics.quantiles(values, n=100)[p - 1]


def load() -> str:
    return " ".join(f"{v:.2f}" for v in os.getloadavg())


def _spec(db: Path, production: str, candidate: str, share: float = 1.0):
    from flywheel.service.spec import ServiceSpec

    return ServiceSpec.model_validate({
        "eval": str(BANKING), "db": str(db), "production": {"model": production, "prompt": "Long prompt. " * 20},
        "candidate": {"model": candidate, "prompt": "Short."}, "shadow": {"share": share, "min_pairs": 10**9},
        "canary": {"share": share}})


def overhead(round_trips: int) -> None:
    import httpx2

    from flywheel.proxy.server import create_proxy_app
    from flywheel.service import aliases
    from flywheel.service.shadow import ShadowWorker
    from flywheel.spec import load_eval_spec
    from flywheel.store import Store
    from flywheel.web import BackgroundServer

    folder = Path(tempfile.mkdtemp(prefix="service-bench-"))
    spec = _spec(folder / "s.db", "local:canned-a", "local:canned-b")
    store = Store.open(spec.db)
    aliases.ensure_aliases(store, spec)
    store.close()
    upstream = BackgroundServer(canned_app()).start()
    shadow = ShadowWorker(spec.db, spec, load_eval_spec(BANKING).graders, upstream.url + "/v1", seed=0)
    shadow.start()
    plain = BackgroundServer(create_proxy_app(upstream.url, str(folder / "plain.db")), access_log=False).start()
    shadowed = BackgroundServer(create_proxy_app(upstream.url, spec.db, observer=shadow.observe),
                                access_log=False).start()
    doors = {"direct": upstream.url, "proxy": plain.url, "proxy + shadow": shadowed.url}
    body = {"model": "production", "messages": [{"role": "user", "content": "Where is my new card?"}],
            "max_tokens": 12, "metadata": {"label": "card_arrival"}}
    times: dict[str, list[float]] = {name: [] for name in doors}
    with httpx2.Client(timeout=60) as client:
        for name, url in doors.items():  # warm up each door
            client.post(url + "/v1/chat/completions", json=body)
        for i in range(round_trips):
            for name, url in list(doors.items())[i % 3:] + list(doors.items())[:i % 3]:
                started = time.perf_counter()
                response = client.post(url + "/v1/chat/completions", json=body)
                times[name].append(time.perf_counter() - started)
                assert response.status_code == 200 and response.json()["choices"] == CANNED["choices"]
    shadow.drain(600)
    for server in (shadowed, plain, upstream):
        server.stop()
    shadow.stop()
    store = Store.open(spec.db)
    pairs = len(store.shadow_pairs())
    store.close()

    def q(values: list[float], p: int) -> float:
        return quantile(values, p) * 1000

    print(f"\n### Request-path overhead, {round_trips} round trips per door ({pairs} shadow pairs graded, "
          f"{shadow.dropped} dropped; load average {load()})\n")
    print("| door | p50 ms | p95 ms | added p50 ms | added p95 ms |")
    print("|---|---:|---:|---:|---:|")
    for name, values in times.items():
        print(f"| {name} | {q(values, 50):.2f} | {q(values, 95):.2f} | {q(values, 50) - q(times['direct'], 50):+.2f} "
              f"| {q(values, 95) - q(times['direct'], 95):+.2f} |")


def switches(n: int, threads: int = 4) -> None:
    import httpx2

    from flywheel.service import aliases
    from flywheel.service.serving import create_alias_app
    from flywheel.store import Store
    from flywheel.store.service import AliasTarget
    from flywheel.web import BackgroundServer

    folder = Path(tempfile.mkdtemp(prefix="service-bench-"))
    spec = _spec(folder / "s.db", "local:smollm2", "local:smollm2")
    store = Store.open(spec.db)
    aliases.ensure_aliases(store, spec)
    short = AliasTarget("local:smollm2", aliases.stored_prompt(store, spec, "Short.", "candidate.prompt"))
    server = BackgroundServer(create_alias_app(spec.db)).start()
    stop = threading.Event()
    outcomes: list[int] = []
    body = {"model": "production", "messages": [{"role": "user", "content": "Where is my card?"}], "max_tokens": 1}

    def client() -> None:
        with httpx2.Client(timeout=120) as http:
            while not stop.is_set():
                try:
                    outcomes.append(http.post(server.url + "/v1/chat/completions", json=body).status_code)
                except httpx2.HTTPError:
                    outcomes.append(0)

    workers = [threading.Thread(target=client) for _ in range(threads)]
    for worker in workers:
        worker.start()
    started = time.perf_counter()
    for i in range(n):
        time.sleep(0.2)
        aliases.promote(store, who="bench", why=f"switch {i}", test="benchmark")
        time.sleep(0.2)
        aliases.rollback(store, who="bench", why=f"back {i}")  # idles candidate on production's target
        aliases.set_alias(store, "candidate", short, who="bench", why="next")
    stop.set()
    for worker in workers:
        worker.join()
    wall = time.perf_counter() - started
    server.stop()
    store.close()
    failed = sum(1 for status in outcomes if status != 200)
    print(f"\n### Requests during {2 * n} switches over {wall:.1f} s, {threads} clients (load average {load()})\n")
    print("| requests | failed | goal |")
    print("|---:|---:|---|")
    print(f"| {len(outcomes)} | {failed} | 0 |")


EXAMPLE = ROOT / "examples" / "service" / "service.yaml"


class ServiceProcess:
    """`flywheel serve --flywheel SERVICE_YAML` as a child process (its own process group), as a user
    starts it; `kill9()` is `kill -9` of the whole group."""

    def __init__(self, spec_path: Path, log: Path):
        self.spec_path, self.log = spec_path, log
        self.process: Any = None

    def start(self, urls: dict[str, str]) -> float:
        """Start it and wait until the proxy and the alias server answer; seconds taken."""
        import subprocess

        import httpx2

        started = time.monotonic()
        env = {**os.environ, "OMP_WAIT_POLICY": "PASSIVE", "PYTHONPATH": str(ROOT)}
        with self.log.open("a") as log:
            self.process = subprocess.Popen([sys.executable, "-m", "flywheel", "serve", "--flywheel",
                                             str(self.spec_path)], stdout=log, stderr=subprocess.STDOUT, env=env,
                                            start_new_session=True)
        while True:
            try:
                if httpx2.get(urls["models"].removesuffix("/v1") + "/health", timeout=2).status_code == 200 and \
                        httpx2.get(urls["api"] + "v1/health", timeout=2).status_code == 200:
                    return time.monotonic() - started
            except httpx2.HTTPError:
                pass
            if self.process.poll() is not None:
                raise RuntimeError(f"the service exited with {self.process.returncode}: see {self.log}")
            time.sleep(0.5)

    def kill9(self) -> None:
        import signal

        os.killpg(self.process.pid, signal.SIGKILL)
        self.process.wait()

    def stop(self) -> None:
        import signal

        if self.process is not None and self.process.poll() is None:
            os.killpg(self.process.pid, signal.SIGTERM)
            self.process.wait(timeout=120)


def _free_port() -> int:
    import socket

    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def story(measure_n: int, max_minutes: float) -> None:
    """Part 3: examples/service/service.yaml run for real, as a user would: `flywheel serve --flywheel`
    as a child process (SmolLM2 on this CPU), driven by examples/service/simulate.py through its proxy;
    one `kill -9` of the service mid-lap and a restart; a broken candidate and a forced broken production."""
    import yaml

    sys.path.insert(0, str(EXAMPLE.parent))
    import simulate

    from flywheel.service import aliases
    from flywheel.service.shadow import current_phase
    from flywheel.service.spec import load_service_spec
    from flywheel.store import Store
    from flywheel.store.service import AliasTarget

    folder = Path(tempfile.mkdtemp(prefix="service-story-"))
    data = yaml.safe_load(EXAMPLE.read_text(encoding="utf-8"))
    for key in ("eval", "run"):
        data[key] = str((EXAMPLE.parent / data[key]).resolve())
    data["production"]["prompt"]["file"] = str(EXAMPLE.parent / data["production"]["prompt"]["file"])
    data["db"] = str(folder / "service.db")
    data["ports"] = {"proxy": _free_port(), "models": _free_port(), "api": _free_port()}
    data["triggers"]["check_every_s"] = 2
    spec_path = folder / "service.yaml"
    spec_path.write_text(yaml.safe_dump(data, sort_keys=False), encoding="utf-8")
    spec = load_service_spec(spec_path)
    urls = {"proxy": f"http://127.0.0.1:{spec.ports.proxy}/v1", "models": f"http://127.0.0.1:{spec.ports.models}/v1",
            "api": f"http://127.0.0.1:{spec.ports.api}/"}
    service = ServiceProcess(spec_path, folder / "service.log")
    started = time.monotonic()
    print(f"service up in {service.start(urls):.1f} s: {urls} (log {service.log})", flush=True)
    url, store = urls["proxy"], Store.open(spec.path(spec.db))
    deadline = time.monotonic() + max_minutes * 60
    measured: list[tuple[str, str, Any]] = []
    events: list[str] = []
    sent = {"n": 0, "failed": 0}
    killed: dict[str, Any] = {}

    def kill_mid_lap() -> None:
        """Once: kill -9 the service while a lap trains, restart it, check nothing moved."""
        running = [lap for lap in store.service_laps(limit=3) if lap.status == "running"]
        if killed or not running:
            return
        lap = running[0]
        if _seconds(lap.created_at, store_now()) < 45:  # into its training
            return
        before = (store.service_aliases(), len(store.captures_after(0)), lap.captures, lap.first_capture_id,
                  lap.last_capture_id)
        service.kill9()
        restart = service.start(urls)
        after_lap = store.service_lap(lap.id)
        after = (store.service_aliases(), len(store.captures_after(0)), after_lap.captures, after_lap.first_capture_id,
                 after_lap.last_capture_id)
        killed.update(lap=lap.id, at=_seconds(lap.created_at, store_now()), same=before == after, restart=restart)
        events.append(f"kill -9 of the service {killed['at']:.0f} s into lap {lap.id} (status {lap.status}); "
                      f"restarted in {restart:.1f} s; aliases, captures and the lap's capture range unchanged: "
                      f"{before == after}")
        print(events[-1], flush=True)

    def traffic(n: int, drift: bool = False, seed: int = 0) -> Any:
        t = simulate.send(url, n, drift=drift, seed=seed + sent["n"])
        sent["n"] += t.sent
        sent["failed"] += t.failed
        return t

    def measure(label: str, drift: bool = False) -> None:
        production = aliases.target(store, "production")
        t = traffic(measure_n, drift, seed=991)
        measured.append((label, production.model.rsplit("/", 1)[-1], t))
        print(f"{label}: {t.accuracy:.1%} of {t.labelled}, {t.prompt_tokens / max(t.sent, 1):.0f} prompt tokens/request",
              flush=True)

    def settle(label: str, drift: bool = False, laps: int = 3) -> None:
        """Send traffic until a lap's student is promoted and its canary ends (or `laps` laps were
        decided without one); each decided lap and its switches become an event line."""
        seen = {lap.id for lap in store.service_laps()}
        while time.monotonic() < deadline and laps > 0:
            traffic(40, drift)
            kill_mid_lap()
            decided = [lap for lap in reversed(store.service_laps()) if lap.id not in seen and lap.decision is not None]
            if not decided or (decided[-1].decision == "candidate" and current_phase(store, spec) is not None):
                continue
            for lap in decided:
                seen.add(lap.id)
                laps -= 1
                switches = [s for s in reversed(store.service_switches()) if s.created_at >= lap.created_at]
                line = [f"{label}: lap {lap.id} ({lap.trigger}, {lap.captures} captures"
                        + (", resumed after the kill" if killed.get("lap") == lap.id else "")
                        + f") -> {lap.decision} after {_seconds(lap.created_at, lap.finished_at):.0f} s: "
                        f"{(lap.reason or '')[:400]}"]
                for switch in switches:
                    line.append(f"{switch.kind} {switch.alias} by {switch.who} at "
                                f"+{_seconds(lap.created_at, switch.created_at):.0f} s from the trigger "
                                f"({switch.test or '-'}: {switch.why[:200]})")
                events.append("\n  - ".join(line))
                print(events[-1], flush=True)
            if any(s.kind == "promote" for s in store.service_switches("production", limit=3)
                   if s.created_at >= decided[0].created_at):
                return
        events.append(f"{label}: no promotion within {laps} more laps or the time limit")

    try:
        measure("1. before any lap (prompted SmolLM2)")
        settle("to the first promotion")
        measure("2. after the first promotion")
        measure("3. drifted phrasings, before a drift lap", drift=True)
        settle("drift lap", drift=True)
        measure("4. drifted phrasings, after the drift laps", drift=True)
        # a broken candidate: the untuned base with the student's one-line prompt
        broken = AliasTarget(spec.lap.student or "local:smollm2",
                             aliases.stored_prompt(store, spec, spec.lap.prompt, "lap.prompt"))
        aliases.set_alias(store, "candidate", broken, who="benchmark", why="a broken candidate", test=None)
        before = len(store.shadow_pairs())
        while time.monotonic() < deadline and store.service_alias("candidate") == broken:
            traffic(20)
        rejected = store.service_switches("candidate", limit=1)[0]
        events.append(f"broken candidate: {rejected.kind} by {rejected.who} after "
                      f"{len(store.shadow_pairs()) - before} shadow pairs ({rejected.why[:160]})")
        print(events[-1], flush=True)
        # the same broken model forced into production: the canary must roll it back
        aliases.set_alias(store, "candidate", broken, who="benchmark", why="forced", test=None)
        forced = aliases.promote(store, who="operator", why="forced for the benchmark", test="none")
        while time.monotonic() < deadline and store.current_switch("production").id == forced:
            traffic(20)
        back = store.service_switches("production", limit=1)[0]
        events.append(f"forced broken production: {back.kind} by {back.who} after "
                      f"{len(store.shadow_pairs('canary', forced))} canary pairs ({back.why[:160]})")
        print(events[-1], flush=True)
        import httpx2

        page = httpx2.get(urls["api"] + "service", timeout=60)  # loopback: the admin's view
        shown = [lap.id for lap in store.service_laps() if lap.id in page.text]
        events.append(f"dashboard /service: HTTP {page.status_code}, {len(page.text):,} bytes, shows {len(shown)} of "
                      f"{len(store.service_laps())} laps and {page.text.count('rollback')} mentions of rollback")
        print(events[-1], flush=True)
    finally:
        service.stop()
        store.close()
    print(f"\n### examples/service/service.yaml on this machine ({sent['n']} requests, {sent['failed']} failed, "
          f"{(time.monotonic() - started) / 60:.1f} min, load average {load()})\n")
    print("| traffic | production serves | online score | prompt tokens / 1k requests | all tokens / 1k requests "
          "| latency p50 / p95 (s) |")
    print("|---|---|---:|---:|---:|---:|")
    for label, model, t in measured:
        lat = sorted(t.latencies_s)
        print(f"| {label} | {model} | {t.accuracy:.1%} (n={t.labelled}) | {1000 * t.prompt_tokens / max(t.sent, 1):,.0f} "
              f"| {1000 * (t.prompt_tokens + t.completion_tokens) / max(t.sent, 1):,.0f} "
              f"| {quantile(lat, 50):.2f} / {quantile(lat, 95):.2f} |")
    print("\n" + "\n".join(f"- {e}" for e in events))


def store_now() -> str:
    from flywheel.store import now

    return now()


def _seconds(start: str | None, end: str | None) -> float:
    from datetime import datetime

    if not start or not end:
        return float("nan")
    return (datetime.fromisoformat(end) - datetime.fromisoformat(start)).total_seconds()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--round-trips", type=int, default=400)
    parser.add_argument("--switches", type=int, default=20)
    parser.add_argument("--part", choices=["all", "overhead", "switches", "story"], default="all")
    parser.add_argument("--measure", type=int, default=100, help="story: requests per measured window.")
    parser.add_argument("--max-minutes", type=float, default=60.0, help="story: give up after this long.")
    args = parser.parse_args()
    print(f"load average before: {load()}")
    if args.part in ("all", "overhead"):
        overhead(args.round_trips)
    if args.part in ("all", "switches"):
        switches(args.switches)
    if args.part == "story":
        story(args.measure, args.max_minutes)


if __name__ == "__main__":
    main()
