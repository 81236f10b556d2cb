"""Do the kill / resume tests hold under load? Each runs N times (default 20) while a busy process
spins on every core, and the table shows runs, failures and the median time of each.

The tests are the suite's own (pytest node ids below): the wheel's SIGKILL-at-several-stages test,
the eval kill tests (chunked and streamed 60-item evals, a kill before the commit of a remote
eval, the same eval twice at once), and the server-kill tests (a run killed with the server,
workers that die with it, a second process on the store). The baseline in the same run is each
test's median without the hog (`--baseline-runs`, default 3): the ratio shows what the load costs.
This is a benchmark, not part of `make test`: it takes a while.

    .venv/bin/python benchmarks/kill_tests_under_load.py         # 20 runs each under the hog (also: robustness.py --kill-tests)
    .venv/bin/python benchmarks/kill_tests_under_load.py --runs 3 -k wheel  # the tests whose id contains "wheel"
"""

from __future__ import annotations

import argparse
import multiprocessing
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]

TESTS = [
    "tests/test_wheel.py::test_sigkill_at_several_stages_then_resume",
    "tests/test_wheel.py::test_a_kill_right_after_the_final_checkpoint_registers_does_not_train_it_again",
    "tests/test_robustness.py::test_kill_near_the_end_of_a_60_item_eval_keeps_what_was_generated",
    "tests/test_robustness.py::test_a_kill_before_the_commit_re_pays_no_call_that_came_back",
    "tests/test_robustness.py::test_the_same_remote_eval_twice_at_once_pays_each_call_once",
    "tests/test_api_jobs.py::test_a_run_killed_with_the_server_finishes_after_restart",
    "tests/test_api_jobs.py::test_a_second_process_on_the_store_neither_steals_a_live_job_nor_loses_a_dead_ones",
    "tests/test_api_workers.py::test_worker_processes_die_with_a_killed_server_and_their_job_finishes_after_restart",
    "tests/test_api_workers.py::test_no_worker_outlives_a_server_sigkilled_five_times",
    "tests/test_service_process.py::test_kill_9_mid_lap_then_restart_resumes_the_lap",
]


def _spin() -> None:
    while True:
        pass


def run_once(test: str) -> tuple[bool, float]:
    """One pytest run of `test` (slow tests included); (passed, seconds)."""
    env = {**os.environ, "PYTHONPATH": str(ROOT), "OMP_WAIT_POLICY": "PASSIVE"}
    started = time.perf_counter()
    done = subprocess.run([sys.executable, "-m", "pytest", "-q", "-x", "-p", "no:cacheprovider", test],
                          cwd=ROOT, env=env, capture_output=True, text=True)
    return done.returncode == 0, time.perf_counter() - started


def measure(tests: list[str], runs: int) -> dict[str, tuple[int, float]]:
    """test -> (failures, median seconds) over `runs` runs."""
    out = {}
    for test in tests:
        results = [run_once(test) for _ in range(runs)]
        out[test] = (sum(not ok for ok, _ in results), statistics.median(s for _, s in results))
        print(f"  {test.split('::')[-1][:70]}: {out[test][0]} of {runs} failed", file=sys.stderr, flush=True)
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--runs", type=int, default=20, help="runs of each test under the hog")
    parser.add_argument("--baseline-runs", type=int, default=3, help="runs of each test without the hog")
    parser.add_argument("-k", default="", help="only the tests whose id contains this text")
    args = parser.parse_args()
    tests = [t for t in TESTS if args.k in t]
    print("baseline (no hog)", file=sys.stderr)
    baseline = measure(tests, args.baseline_runs) if args.baseline_runs else {}
    hogs = [multiprocessing.Process(target=_spin, daemon=True) for _ in range(os.cpu_count() or 1)]
    for hog in hogs:
        hog.start()
    try:
        print(f"under a CPU hog ({len(hogs)} busy processes)", file=sys.stderr)
        loaded = measure(tests, args.runs)
    finally:
        for hog in hogs:
            hog.terminate()
            hog.join()
    print(f"{'test':<90} {'runs':>5} {'failures':>9} {'median s':>9} {'vs idle':>8}")
    for test in tests:
        failures, median = loaded[test]
        ratio = f"{median / baseline[test][1]:.2f}x" if test in baseline and baseline[test][1] else "-"
        print(f"{test:<90} {args.runs:>5} {failures:>9} {median:>9.1f} {ratio:>8}")


if __name__ == "__main__":
    main()
