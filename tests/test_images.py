"""flywheel.images and image parts in eval specs: checks, limits, hashes, rendering, clear errors.

Images are made with Pillow in the tests; the bad ones (a truncated PNG, a GIF, 11 images in one
example, an 11 MB file) each fail the eval with one line naming the item, and leave the store empty.
"""

from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path

import pytest
from click.testing import CliRunner
import yaml
from vision_helpers import data_url, image_bytes, vision_spec, write_vision_eval

from flywheel import images
from flywheel.cli import main
from flywheel.data import Item, load_dataset
from flywheel.errors import SpecError
from flywheel.harness import cache_key, run_eval
from flywheel.images import ImageAccess, ImageError, check_image_bytes, hashed_view, load_image, render_parts, thumbnail_data_url
from flywheel.models import ChatRequest
from flywheel.outputs import DataOutputs
from flywheel.spec import load_eval_spec, parse_eval_spec
from flywheel.store import Store


# -- bytes -----------------------------------------------------------------------------------------
@pytest.mark.parametrize("fmt,media", [("PNG", "image/png"), ("JPEG", "image/jpeg"), ("WEBP", "image/webp")])
def test_supported_formats_load_with_size_and_hash(fmt, media):
    data = image_bytes("blue", size=(30, 10), fmt=fmt)
    image = check_image_bytes(data)
    assert (image.media_type, image.width, image.height) == (media, 30, 10)
    assert image.sha256 == hashlib.sha256(data).hexdigest()
    assert image.data_url.startswith(f"data:{media};base64,")
    assert load_image(image.data_url).sha256 == image.sha256


def test_gif_is_refused_by_name():
    with pytest.raises(ImageError, match="GIF image; supported formats: JPEG, PNG, WEBP"):
        check_image_bytes(image_bytes("red", fmt="GIF"))


def test_truncated_png_fails_to_decode():
    data = image_bytes("red", size=(64, 64))
    with pytest.raises(ImageError, match="corrupt PNG image"):
        check_image_bytes(data[: len(data) // 2])


def test_over_ten_megabytes_is_refused_before_decoding():
    big = image_bytes("red")[:64] + b"\0" * (10 * 1024 * 1024)
    with pytest.raises(ImageError, match=r"image is 10\.0 MB, over the 10\.0 MB limit"):
        check_image_bytes(big)


def test_not_an_image_and_bad_data_urls():
    with pytest.raises(ImageError, match="not an image"):
        check_image_bytes(b"hello world, not pixels")
    with pytest.raises(ImageError, match="not valid base64"):
        load_image("data:image/png;base64,@@@")
    with pytest.raises(ImageError, match="says image/jpeg but the bytes are image/png"):
        load_image(data_url(image_bytes("red"), "image/jpeg"))
    with pytest.raises(ImageError, match="expected an image path"):
        load_image(None)


def test_paths_resolve_against_a_root_and_missing_files_say_so(tmp_path):
    (tmp_path / "a.png").write_bytes(image_bytes("green"))
    inside = ImageAccess(root=tmp_path)
    assert load_image("a.png", inside).media_type == "image/png"
    assert load_image(f"file://{tmp_path / 'a.png'}", inside).media_type == "image/png"
    with pytest.raises(ImageError, match="image file not found"):
        load_image("missing.png", inside)


# -- what a reference may reach (issue 26, item 6) ---------------------------------------------------
def test_files_outside_the_dataset_folder_are_refused(tmp_path):
    data, outside = tmp_path / "data", tmp_path / "secret"
    data.mkdir()
    outside.mkdir()
    (outside / "s.png").write_bytes(image_bytes("red"))
    (data / "link.png").symlink_to(outside / "s.png")
    access = ImageAccess(root=data)
    for ref in ("../secret/s.png", str(outside / "s.png"), f"file://{outside / 's.png'}", "link.png"):
        with pytest.raises(ImageError, match="is outside the dataset folder"):
            load_image(ref, access)
    # a folder the spec allows is fine, and without any folder no file is read at all
    assert load_image("../secret/s.png", ImageAccess(root=data, folders=(outside,))).media_type == "image/png"
    with pytest.raises(ImageError, match="no dataset folder"):
        load_image(str(outside / "s.png"))
    with pytest.raises(ImageError, match="another host"):
        load_image("file://evil.example/etc/passwd", access)


def test_devices_and_pipes_are_refused_unread(tmp_path):
    (tmp_path / "zero.png").symlink_to("/dev/zero")
    with pytest.raises(ImageError, match="outside the dataset folder"):
        load_image("zero.png", ImageAccess(root=tmp_path))
    with pytest.raises(ImageError, match="not a regular file"):  # /dev itself allowed: still refused unread
        load_image("/dev/zero", ImageAccess(root=tmp_path, folders=(Path("/dev"),)))
    os.mkfifo(tmp_path / "pipe.png")  # opening it blocking would wait for a writer for ever
    with pytest.raises(ImageError, match="not a regular file"):
        load_image("pipe.png", ImageAccess(root=tmp_path))


def _png_header(width: int, height: int) -> bytes:
    """A PNG whose header claims width x height (the pixels are never there): what a bomb's
    header says before its few hundred kB of zlib decode to gigabytes."""
    import struct
    import zlib

    def chunk(kind: bytes, body: bytes) -> bytes:
        return struct.pack(">I", len(body)) + kind + body + struct.pack(">I", zlib.crc32(kind + body))

    return (b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", struct.pack(">IIBBBBB", width, height, 8, 0, 0, 0, 0))
            + chunk(b"IDAT", zlib.compress(b"\0" * 1024)) + chunk(b"IEND", b""))


@pytest.mark.parametrize("side", [12_500, 40_000])  # 156 Mpx (Pillow only warns), 1.6 Gpx (Pillow raises)
def test_decompression_bombs_are_refused_before_decoding(tmp_path, side):
    bomb = _png_header(side, 12_500)
    with pytest.raises(ImageError, match="decompression bomb.*MAX_IMAGE_PIXELS") as caught:
        check_image_bytes(bomb)
    assert caught.value.reason == "image_too_large"
    (tmp_path / "bomb.png").write_bytes(bomb)
    with pytest.raises(ImageError, match="decompression bomb"):
        load_image("bomb.png", ImageAccess(root=tmp_path))
    assert thumbnail_data_url(data_url(bomb)) is None


def test_a_spec_reads_no_url_and_no_file_outside_unless_it_says_so(tmp_path):
    (tmp_path / "secret").mkdir()
    (tmp_path / "secret/s.png").write_bytes(image_bytes("blue"))
    path = _bad_eval(tmp_path / "e", "../secret/s.png")
    result = CliRunner().invoke(main, ["eval", str(path), "--split", "test", "--db", str(tmp_path / "f.db")])
    assert result.exit_code == 1
    assert "data.jsonl:2 (item 'bad-2'): input[0].content[0].image_url: ../secret/s.png: " in result.output
    assert "is outside the dataset folder" in result.output
    _store_is_empty(tmp_path / "f.db")
    spec = yaml.safe_load(path.read_text())
    spec["dataset"]["images"] = {"folders": ["../secret"]}
    path.write_text(yaml.safe_dump(spec))
    assert CliRunner().invoke(main, ["eval", str(path), "--split", "test", "--db", str(tmp_path / "f.db")]).exit_code == 0


def test_http_images_are_not_fetched_unless_the_spec_opts_in(tmp_path):
    from starlette.applications import Starlette
    from starlette.responses import Response
    from starlette.routing import Route

    from flywheel.web import BackgroundServer

    hits = []

    def serve(request):
        hits.append(request.url.path)
        return Response(image_bytes("red"), media_type="image/png")

    with BackgroundServer(Starlette(routes=[Route("/cat.png", serve)])) as server:
        path = _bad_eval(tmp_path / "e", server.url + "/cat.png")
        before = load_eval_spec(path).fingerprint()
        result = CliRunner().invoke(main, ["eval", str(path), "--split", "test", "--db", str(tmp_path / "f.db")])
        assert result.exit_code == 1 and "not fetched unless the spec sets dataset.images.fetch: true" in result.output
        assert hits == []
        spec = yaml.safe_load(path.read_text())
        spec["dataset"]["images"] = {"fetch": True}
        path.write_text(yaml.safe_dump(spec))
        assert load_eval_spec(path).fingerprint() == before  # allowing a read changes no result
        result = CliRunner().invoke(main, ["eval", str(path), "--split", "test", "--db", str(tmp_path / "f.db")])
        assert result.exit_code == 0, result.output
        assert hits and set(hits) == {"/cat.png"}


def test_http_urls_are_fetched_and_checked(tmp_path):
    from starlette.applications import Starlette
    from starlette.responses import Response
    from starlette.routing import Route

    from flywheel.web import BackgroundServer

    png = image_bytes("yellow")
    app = Starlette(routes=[Route("/cat.png", lambda r: Response(png, media_type="image/png")),
                            Route("/anim.gif", lambda r: Response(image_bytes(fmt="GIF"), media_type="image/gif"))])
    fetching = ImageAccess(fetch=True)
    with BackgroundServer(app) as server:
        assert load_image(server.url + "/cat.png", fetching).sha256 == hashlib.sha256(png).hexdigest()
        with pytest.raises(ImageError, match="GIF"):
            load_image(server.url + "/anim.gif", fetching)
        with pytest.raises(ImageError, match="HTTP 404"):
            load_image(server.url + "/nothing.png", fetching)


# -- cache keys --------------------------------------------------------------------------------------
def test_cache_key_covers_image_content_not_its_spelling():
    red, blue = image_bytes("red"), image_bytes("blue")

    def request(data):
        return ChatRequest(messages=[{"role": "user", "content": [
            images.image_part(check_image_bytes(data)), {"type": "text", "text": "colour?"}]}])

    assert cache_key("m", request(red)) == cache_key("m", request(red))
    assert cache_key("m", request(red)) != cache_key("m", request(blue))
    view = hashed_view(request(red).messages)
    assert view[0]["content"][0] == {"type": "image", "sha256": hashlib.sha256(red).hexdigest(), "detail": None}
    text = [{"role": "user", "content": "hi"}]
    assert hashed_view(text) == text  # text keys do not move


# -- spec and rendering ----------------------------------------------------------------------------
def test_spec_parts_validate_and_render(tmp_path):
    path = write_vision_eval(tmp_path, "local:smollm2")
    spec = load_eval_spec(path)
    dataset = load_dataset(spec)
    item = dataset.items[0]
    rendered = render_parts(spec.messages(), item)
    assert rendered[0] == {"role": "system", "content": "Name the colour: red, green, blue or yellow."}
    image, text = rendered[1]["content"]
    assert image["type"] == "image_url" and image["image_url"]["detail"] == "low"
    assert image["image_url"]["url"] == data_url((tmp_path / "images/red.png").read_bytes())
    assert text == {"type": "text", "text": "Which colour is this?"}


def test_spec_errors_name_the_part(tmp_path):
    bad = vision_spec("local:smollm2")
    bad["input"][1]["content"][0] = {"type": "input_image", "image_url": "{{sample.output_text}}"}
    with pytest.raises(SpecError, match=r"input: \[1\]\.content\[0\]\.image_url: template .* item.<field> only"):
        parse_eval_spec(bad, source="eval.yaml")
    bad["input"][1]["content"][0] = {"type": "input_image"}
    with pytest.raises(SpecError, match="exactly one of `image_url` or `file_id`"):
        parse_eval_spec(bad, source="eval.yaml")
    bad["input"][1]["content"][0] = {"type": "input_image", "image_url": "x.png", "detail": "ultra"}
    with pytest.raises(SpecError, match="detail"):
        parse_eval_spec(bad, source="eval.yaml")


def test_string_grader_over_an_image_field_is_a_one_line_error():
    spec = vision_spec("local:smollm2")
    spec["graders"] = [{"type": "string_check", "name": "same", "input": "{{sample.output_text}}",
                        "reference": "{{item.image}}", "operation": "eq"}]
    with pytest.raises(SpecError) as info:
        parse_eval_spec(spec, source="eval.yaml")
    message = str(info.value)
    assert "\n" not in message
    assert message.startswith("eval.yaml: graders[0].reference: {{item.image}} is an image")
    spec["graders"] = [{"type": "multi", "name": "m", "calculate_output": "a", "graders": {"a": {
        "type": "text_similarity", "name": "a", "input": "{{item.image}}", "reference": "x",
        "evaluation_metric": "fuzzy_match"}}}]
    with pytest.raises(SpecError, match=r"graders\[0\]\.graders\.a\.input: \{\{item\.image\}\} is an image"):
        parse_eval_spec(spec, source="eval.yaml")


def test_text_only_parts_render_as_a_string():
    messages = [{"role": "user", "content": [{"type": "input_text", "text": "Q: {{item.q}}"}]}]
    item = Item(key="1", fields={"q": "why"}, split="test", line=1)
    assert render_parts(messages, item) == [{"role": "user", "content": "Q: why"}]


# -- bad images fail the eval, with nothing stored ---------------------------------------------------
def _store_is_empty(path) -> None:
    store = Store.open(path)
    try:
        for table in ("evals", "datasets", "runs", "iterations", "samples", "completion_cache"):
            assert store.db[table].count == 0, table
    finally:
        store.close()


def _bad_eval(tmp_path, image_value, n_images: int = 1):
    rows = [{"id": "ok-1", "image": "images/red.png", "label": "red", "split": "test"},
            {"id": "bad-2", "image": image_value, "label": "red", "split": "test"}]
    parts = [{"type": "input_image", "image_url": "{{item.image}}"} for _ in range(n_images)]
    overrides = {"input": [{"role": "user", "content": [*parts, {"type": "input_text", "text": "colour?"}]}],
                 "outputs": {"field": "label"}}
    path = write_vision_eval(tmp_path, "local:smollm2", rows=rows, **overrides)
    data = yaml.safe_load(path.read_text())
    data.pop("model")
    path.write_text(yaml.safe_dump(data))
    return path


@pytest.mark.parametrize("case,expected", [
    ("truncated", r"corrupt PNG image"),
    ("gif", r"GIF image; supported formats: JPEG, PNG, WEBP"),
    ("big", r"image is 11\.0 MB, over the 10\.0 MB limit"),
    ("eleven", r"more than 10 images in one example"),
])
def test_bad_images_fail_the_eval_naming_the_item_and_store_nothing(tmp_path, case, expected):
    folder = tmp_path / "e"
    value, n_images = "images/bad.png", 1
    if case == "eleven":
        value, n_images = "images/red.png", 11
    path = _bad_eval(folder, value, n_images)
    if case == "truncated":
        data = image_bytes("red", size=(64, 64))
        (folder / "images/bad.png").write_bytes(data[: len(data) // 2])
    elif case == "gif":
        (folder / "images/bad.png").write_bytes(image_bytes("red", fmt="GIF"))
    elif case == "big":
        with open(folder / "images/bad.png", "wb") as handle:
            handle.write(image_bytes("red"))
            handle.write(os.urandom(11 * 1024 * 1024 - len(image_bytes("red"))))
    spec = load_eval_spec(path)
    db = tmp_path / "flywheel.db"
    store = Store.open(db)
    try:
        with pytest.raises(ImageError) as info:
            run_eval(spec, store, split="test", model=DataOutputs.for_spec(spec, load_dataset(spec)))
    finally:
        store.close()
    message = str(info.value)
    assert "\n" not in message
    import re

    assert re.search(expected, message), message
    if case == "eleven":
        assert message.startswith("data.jsonl:1 (item 'ok-1')")  # every item has 11: the first one fails
    else:
        assert message.startswith("data.jsonl:2 (item 'bad-2'): input[0].content[0].image_url: images/bad.png: ")
    _store_is_empty(db)


def test_cli_prints_one_error_line(tmp_path):
    from click.testing import CliRunner

    folder = tmp_path / "e"
    path = _bad_eval(folder, "images/anim.gif")
    (folder / "images/anim.gif").write_bytes(image_bytes("red", fmt="GIF"))
    result = CliRunner().invoke(main, ["eval", str(path), "--split", "test", "--db", str(tmp_path / "f.db")])
    assert result.exit_code == 1
    lines = [line for line in result.output.splitlines() if line.strip()]
    assert lines == ["error: data.jsonl:2 (item 'bad-2'): input[0].content[0].image_url: images/anim.gif: "
                     "GIF image; supported formats: JPEG, PNG, WEBP"], result.output


def test_graded_outputs_of_an_image_eval_store_inline_images(tmp_path):
    path = _bad_eval(tmp_path / "e", "images/green.png")
    spec = load_eval_spec(path)
    store = Store.open(tmp_path / "f.db")
    try:
        result = run_eval(spec, store, split="test", model=DataOutputs.for_spec(spec, load_dataset(spec)))
        assert result.n_samples == 2 and result.n_errors == 0
        rows = store.db.execute("select input_json from samples order by item_key").fetchall()
        urls = [list(images.iter_image_urls(json.loads(r[0]))) for r in rows]
        assert [len(u) for u in urls] == [1, 1]
        assert load_image(urls[0][0]).sha256 == hashlib.sha256((tmp_path / "e/images/green.png").read_bytes()).hexdigest()
    finally:
        store.close()


def test_thumbnails_are_small_inline_jpegs():
    big = image_bytes("blue", size=(900, 700))
    thumb = thumbnail_data_url(data_url(big))
    assert thumb.startswith("data:image/jpeg;base64,")
    image = load_image(thumb)
    assert max(image.width, image.height) <= images.THUMB_SIDE
    assert len(image.data) <= images.THUMB_MAX_BYTES
    assert thumbnail_data_url("https://example.com/cat.png") is None  # never fetched


def test_proxy_captures_with_images_become_a_vision_eval(tmp_path):
    from test_outputs import capture as capture_row

    red, blue = data_url(image_bytes("red")), data_url(image_bytes("blue"))
    rows = []
    for url, answer in ((red, "red"), (blue, "blue")):
        row = capture_row("2026-11-03T12:00:00.000+00:00", "q", answer, {"usecase": "colours"})
        request = json.loads(row["request_json"])
        request["messages"][1]["content"] = [{"type": "text", "text": "Which colour?"},
                                             {"type": "image_url", "image_url": {"url": url}}]
        row["request_json"] = json.dumps(request)
        rows.append(row)
    traffic = Store.open(tmp_path / "traffic.db")
    traffic.insert_captures(rows)
    traffic.close()
    spec = {"name": "traffic", "dataset": {"captures": {"db": "traffic.db"}},
            "input": [{"role": "user", "content": [{"type": "input_image", "image_url": "{{item.image}}"},
                                                   {"type": "input_text", "text": "{{item.input}}"}]}],
            "outputs": {"field": "output"},
            "graders": [{"type": "string_check", "name": "ok", "input": "{{sample.output_text}}",
                         "reference": "red", "operation": "eq"}]}
    (tmp_path / "t.yaml").write_text(yaml.safe_dump(spec))
    loaded = load_eval_spec(tmp_path / "t.yaml")
    store = Store.open(tmp_path / "f.db")
    try:
        result = run_eval(loaded, store, split="test")
        assert result.n_samples == 2 and result.n_errors == 0 and result.pass_rate == 0.5
        inputs = [json.loads(r[0]) for r in store.db.execute("select input_json from samples order by item_key")]
    finally:
        store.close()
    assert [m[0]["content"][1] for m in inputs] == [{"type": "text", "text": "Which colour?"}] * 2
    assert [load_image(m[0]["content"][0]["image_url"]["url"]).data for m in inputs] == \
        [image_bytes("red"), image_bytes("blue")]


def test_an_image_prompt_for_a_text_model_fails_before_anything_is_stored(tmp_path, tiny_model_dir):
    from flywheel.errors import ModelError

    spec = load_eval_spec(write_vision_eval(tmp_path / "e", f"local:{tiny_model_dir}"))
    db = tmp_path / "f.db"
    store = Store.open(db)
    try:
        with pytest.raises(ModelError, match=r"is a text model: it does not read images"):
            run_eval(spec, store, split="test")
    finally:
        store.close()
    _store_is_empty(db)
