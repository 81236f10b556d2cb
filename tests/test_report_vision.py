"""Thumbnails in the HTML report and the review app: inline, small, escaped, nothing fetched."""

from __future__ import annotations

import json
import os
import re
import urllib.request
from pathlib import Path

import pytest
import yaml
from vision_helpers import image_bytes, write_vision_eval

from flywheel.data import load_dataset
from flywheel.harness import run_eval
from flywheel.images import THUMB_SIDE, load_image
from flywheel.outputs import DataOutputs
from flywheel.report.html import render_report, write_report
from flywheel.report.review_app import create_app
from flywheel.spec import load_eval_spec
from flywheel.web import BackgroundServer

# An <img> element whose source is fetched over the network.
EXTERNAL_IMG = re.compile(r"""<img\b[^>]*\bsrc\s*=\s*["']?\s*(https?:)?//""", re.I)
XSS_FIELD = '"><img src=https://evil.example/x.png onerror=alert(1)>'


@pytest.fixture
def vision_run(tmp_path, store):
    rows = [{"id": f"t{i}", "image": f"images/{c}.png", "label": c, "note": XSS_FIELD, "split": "test"}
            for i, c in enumerate(["red", "green", "blue", "red"])]
    path = write_vision_eval(tmp_path, "local:smollm2", rows=rows, outputs={"field": "label"})
    (tmp_path / "images/blue.png").write_bytes(image_bytes("blue", size=(1200, 900)))  # a big one: downscaled
    data = yaml.safe_load(path.read_text())
    data.pop("model")
    path.write_text(yaml.safe_dump(data))
    spec = load_eval_spec(path)
    result = run_eval(spec, store, split="test", model=DataOutputs.for_spec(spec, load_dataset(spec)))
    return result


def _payload(html: str) -> dict:
    match = re.search(r'<script type="application/json" id="fw-data">(.*?)</script>', html, re.S)
    assert match, "report payload not found"
    return json.loads(match.group(1))


def test_report_inlines_small_thumbnails_and_no_external_image(vision_run, store, tmp_path):
    html = render_report(store, [vision_run.run_id])
    assert not EXTERNAL_IMG.search(html)
    payload = _payload(html)
    thumbs = payload["items"]["thumbs"]
    assert [len(t) for t in thumbs] == [1, 1, 1, 1]
    strings = payload["S"]
    urls = [strings[t[0]] for t in thumbs]
    assert all(u.startswith("data:image/jpeg;base64,") for u in urls)
    assert urls[0] == urls[3]  # the same image is stored once in the page's string table
    big = load_image(urls[2])
    assert max(big.width, big.height) <= THUMB_SIDE
    assert len(html) < 200_000  # a 1200x900 input does not blow the page up
    # The prompt shows the image part by its template, not by bytes.
    [prompt] = payload["prompts"].values()
    assert prompt[1] == ["user", "[image: {{item.image}}]Which colour is this?"]


def test_report_in_chromium_shows_thumbnails_and_fetches_nothing(vision_run, store, tmp_path):
    chromium = os.environ.get("FLYWHEEL_CHROMIUM", "/usr/bin/chromium")
    if not Path(chromium).exists():
        pytest.skip(f"{chromium} is missing: `make browser` installs it")
    sync_api = pytest.importorskip("playwright.sync_api")
    path = write_report(store, [vision_run.run_id], tmp_path / "report.html").path
    with sync_api.sync_playwright() as p:
        browser = p.chromium.launch(executable_path=chromium, args=["--headless", "--no-sandbox", "--disable-gpu"])
        try:
            page = browser.new_page()
            requests, errors = [], []
            page.on("request", lambda r: requests.append(r.url))
            page.on("pageerror", lambda exc: errors.append(str(exc)))
            page.goto(Path(path).as_uri())
            page.wait_for_selector("body[data-ready='1']")
            images = page.locator("#rows img.thumb")
            assert images.count() == 4
            sources = [images.nth(i).get_attribute("src") for i in range(4)]
            assert all(s.startswith("data:image/jpeg;base64,") for s in sources)
            assert page.evaluate("Array.from(document.images).every(i => i.complete && i.naturalWidth > 0)")
            assert [u for u in requests if not u.startswith("data:")] == [Path(path).as_uri()]
            assert errors == [] and XSS_FIELD in page.locator("#rows").inner_text()
        finally:
            browser.close()


def test_review_app_sample_page_shows_escaped_inline_thumbnails(vision_run, store):
    sample_id = store.db.execute("select id from samples where item_key = 't2'").fetchone()[0]
    with BackgroundServer(create_app(str(store.path))) as server:
        with urllib.request.urlopen(f"{server.url}/samples/{sample_id}") as response:
            html = response.read().decode()
    sources = re.findall(r'<img[^>]*\ssrc="([^"]*)"', html)
    assert len(sources) == 1 and sources[0].startswith("data:image/jpeg;base64,")
    assert max(load_image(sources[0]).width, load_image(sources[0]).height) <= THUMB_SIDE
    assert not EXTERNAL_IMG.search(html)
    assert "[image: data:image/png;base64,...]Which colour is this?" in html
    assert XSS_FIELD not in html and "&#34;&gt;&lt;img src=https://evil.example" in html
