"""Does a large upload hold up other clients? `/v1/health` latency while a file of SIZE MB is
uploaded and checked, against the baseline of `/v1/health` on an idle server in the same run.

A background uvicorn thread serves `create_api_app`; one thread uploads a valid evals JSONL file
of SIZE MB (`POST /v1/files`) while the main thread calls `/v1/health` every 20 ms and records the
slowest answer seen during the upload. Before the check moved off the event loop, a 47 MB file
held every other client for 22.9 s; the bound in tests/test_api_input.py is ordering (health
answers while the upload is being checked), this script gives the number.

    .venv/bin/python benchmarks/api_upload.py            # SIZE=47
    .venv/bin/python benchmarks/api_upload.py --size 10
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import tempfile
import threading
import time
from pathlib import Path

sys.path[0] = str(Path(__file__).resolve().parents[1])


def health_latencies(client, url: str, until: threading.Event, pause_s: float = 0.02) -> list[float]:
    seen = []
    while not until.is_set():
        started = time.perf_counter()
        assert client.get(url + "/v1/health").status_code == 200
        seen.append(time.perf_counter() - started)
        time.sleep(pause_s)
    return seen


def main() -> None:
    import httpx

    from flywheel.api.app import create_api_app
    from flywheel.web import BackgroundServer

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--size", type=int, default=47, help="upload size in MB")
    args = parser.parse_args()
    line = (json.dumps({"item": {"text": "question about card arrival " * 4, "label": "card_arrival"}}) + "\n").encode()
    data = line * (args.size * 1024 * 1024 // len(line))
    with tempfile.TemporaryDirectory() as folder, \
            BackgroundServer(create_api_app(str(Path(folder) / "b.db"), workers=0,
                                            max_upload_bytes=(args.size + 8) * 1024 * 1024)) as server, \
            httpx.Client(timeout=300) as client:
        idle_done = threading.Event()
        threading.Timer(2.0, idle_done.set).start()
        idle = health_latencies(client, server.url, idle_done)
        upload_done = threading.Event()
        result: dict[str, float] = {}

        def upload() -> None:
            started = time.perf_counter()
            with httpx.Client(timeout=600) as uploader:
                response = uploader.post(server.url + "/v1/files", files={"file": ("big.jsonl", data)},
                                         data={"purpose": "evals"})
            result["status"] = response.status_code
            result["wall_s"] = time.perf_counter() - started
            upload_done.set()

        thread = threading.Thread(target=upload)
        thread.start()
        busy = health_latencies(client, server.url, upload_done)
        thread.join()
    print(f"upload: {len(data) / 1e6:.1f} MB, status {result['status']}, {result['wall_s']:.2f} s")
    print(f"{'/v1/health':<28}{'p50 ms':>10}{'max ms':>10}{'n':>6}")
    for name, values in (("idle (baseline)", idle), ("during the upload", busy)):
        print(f"{name:<28}{statistics.median(values) * 1e3:>10.1f}{max(values) * 1e3:>10.1f}{len(values):>6}")
    print(f"max during / p50 idle: {max(busy) / statistics.median(idle):.1f}x")


if __name__ == "__main__":
    main()
