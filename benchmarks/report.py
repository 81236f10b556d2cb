"""How big is a report of a 10,000-sample run, and how fast does it open in headless Chromium?

Writes synthetic runs through the Store (items ~100 chars, outputs ~80 chars, two graders with
feedback), renders `flywheel report`, then opens the file in Debian's chromium with playwright and
reads two marks from the page: first contentful paint, and `fw-rendered` (the comparison table's
first page is in the DOM). The baseline is the same report with pagination off (every row
rendered at once), so the ratio shows what paging buys. It also times the review server's
comparison page over the same store.

    .venv/bin/python benchmarks/report.py            # prints a markdown table
"""

from __future__ import annotations

import random
import statistics
import sys
import tempfile
import time
import urllib.request
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))

from report_helpers import LABELS, Outcome, build_run  # noqa: E402

from flywheel.report.html import write_report  # noqa: E402
from flywheel.store import Store  # noqa: E402

CHROMIUM = "/usr/bin/chromium"
ARGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-background-networking",
        "--disable-component-update", "--disable-sync", "--no-first-run"]
WORDS = ("card arrive delivery pin blocked exchange rate lost stolen transfer pending refund top up fee "
         "account verify identity cash withdrawal atm declined country currency").split()


def _sentence(rng: random.Random, n: int) -> str:
    return " ".join(rng.choice(WORDS) for _ in range(n)).capitalize() + "."


def make_store(path: Path, n_items: int, n_iterations: int) -> Store:
    rng = random.Random(0)
    texts = [_sentence(rng, 16) for _ in range(n_items)]
    answers = [[_sentence(rng, 12) for _ in range(n_items)] for _ in range(n_iterations)]

    def outcome(k: int, i: int) -> Outcome:
        right = rng.random() < (0.55 + 0.1 * k)
        return Outcome(output=(LABELS[i % 4] if right else LABELS[(i + 1) % 4]) + ": " + answers[k][i],
                       passed=right, judge_passed=rng.random() < 0.6)

    store = Store.open(path)
    stages = [("eval", "measured")] + [("prompt", "promoted")] * (n_iterations - 1)
    build_run(store, n_items=n_items, stages=stages, outcome=outcome, item_text=lambda i: texts[i],
              prompts=[f"Prompt variant {k}: answer with one label, then one sentence." for k in range(n_iterations)])
    return store


def first_render(browser, url: str, loads: int = 3) -> tuple[float, float]:
    """Median (first contentful paint, fw-rendered) in ms over fresh pages."""
    fcps, readies = [], []
    for _ in range(loads):
        context = browser.new_context(viewport={"width": 1440, "height": 900})
        page = context.new_page()
        page.goto(url, wait_until="load")
        page.wait_for_selector("body[data-ready='1']")
        time.sleep(0.2)  # let the paint timing entry land
        fcp = page.evaluate("(performance.getEntriesByName('first-contentful-paint')[0] || {}).startTime || -1")
        ready = page.evaluate("performance.getEntriesByName('fw-rendered')[0].startTime")
        fcps.append(fcp)
        readies.append(ready)
        context.close()
    return statistics.median(fcps), statistics.median(readies)


def serve_compare_ms(db: Path, a: str, b: str) -> tuple[float, float]:
    from flywheel.report.review_app import create_app
    from flywheel.web import BackgroundServer

    with BackgroundServer(create_app(str(db))) as server:
        url = f"{server.url}/compare?a={urllib.request.quote(a)}&b={urllib.request.quote(b)}"
        times = []
        for _ in range(2):  # the second request hits the comparison cache
            started = time.perf_counter()
            urllib.request.urlopen(url).read()
            times.append(1000 * (time.perf_counter() - started))
    return times[0], times[1]


def main() -> None:
    from playwright.sync_api import sync_playwright

    configs = [(10_000, 1), (5_000, 2), (10_000, 2)]
    rows = []
    with tempfile.TemporaryDirectory() as tmp, sync_playwright() as p:
        browser = p.chromium.launch(executable_path=CHROMIUM, args=ARGS)
        for n_items, n_iterations in configs:
            db = Path(tmp) / f"r{n_items}x{n_iterations}.db"
            store = make_store(db, n_items, n_iterations)
            run_id = "run-test-000001"
            variants = [("paged (50 rows)", {})]
            if (n_items, n_iterations) == (5_000, 2):
                variants.append(("baseline: all rows", {"page_size": 0}))
            for name, options in variants:
                out = Path(tmp) / f"r{n_items}x{n_iterations}{name[:4]}.html"
                result = write_report(store, [run_id], out, **options)
                fcp, ready = first_render(browser, out.as_uri())
                rows.append((f"{n_items:,} items × {n_iterations}", f"{n_items * n_iterations:,}", name,
                             f"{result.bytes / 1e6:.2f} MB", f"{result.seconds:.2f} s", f"{fcp:.0f} ms", f"{ready:.0f} ms"))
            its = [it.id for it in store.iterations(run_id)]
            store.close()
            cold, warm = serve_compare_ms(db, its[0], its[-1])
            rows[-1 if len(variants) == 1 else -2] += (f"{cold:.0f} / {warm:.0f} ms",)
        browser.close()
    header = ("run", "samples", "report", "file size", "write", "first paint", "table rendered", "serve /compare cold / warm")
    print("| " + " | ".join(header) + " |")
    print("|" + "---|" * len(header))
    for row in rows:
        print("| " + " | ".join(row + ("",) * (len(header) - len(row))) + " |")
    paged = next(r for r in rows if r[0].startswith("5,000") and r[2].startswith("paged"))
    full = next(r for r in rows if r[2].startswith("baseline"))
    ratio = float(full[6].split()[0]) / float(paged[6].split()[0])
    print(f"\npaging renders the 10,000-sample report's table {ratio:.1f}x faster than rendering every row")


if __name__ == "__main__":
    main()
