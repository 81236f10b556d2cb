"""Vision models: the local image-text-to-text backend on a tiny LLaVA built from its config, the
`openai:` backend's image parts checked by a real HTTP server, and `serve-model` taking images."""

from __future__ import annotations

import base64
import hashlib

import openai
import pytest
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import JSONResponse
from starlette.routing import Route
from vision_helpers import (data_url, image_bytes, tiny_idefics3_dir, tiny_vlm_dir,  # noqa: F401 - fixtures
                            write_vision_eval)

from flywheel.harness import run_eval
from flywheel.images import check_image_bytes, image_part
from flywheel.model_server import create_app
from flywheel.models import ChatRequest, Sampling, load_model
from flywheel.models.loading import is_vision_model
from flywheel.models.vision import VisionModel
from flywheel.spec import load_eval_spec
from flywheel.web import BackgroundServer


def _ask(colour: str, question: str = "Which colour?") -> ChatRequest:
    return ChatRequest(messages=[
        {"role": "system", "content": "Name the colour."},
        {"role": "user", "content": [image_part(check_image_bytes(image_bytes(colour))), {"type": "text", "text": question}]},
    ], sampling=Sampling(max_tokens=5))


# -- the local backend -----------------------------------------------------------------------------
def test_a_vlm_folder_loads_as_a_vision_model(tiny_vlm_dir, tiny_model_dir):
    assert is_vision_model(str(tiny_vlm_dir)) and not is_vision_model(str(tiny_model_dir))
    model = load_model(f"local:{tiny_vlm_dir}", {"batch_size": 4, "dtype": "fp32"})
    assert isinstance(model, VisionModel) and model.reads_images
    assert model.fingerprint.startswith("vlm-dir:")
    with pytest.raises(Exception, match="unknown option"):
        load_model(f"local:{tiny_vlm_dir}", {"engine": "hf"})


def test_batched_generation_equals_one_at_a_time_and_sees_the_image(tiny_vlm_dir):
    model = load_model(f"local:{tiny_vlm_dir}", {"batch_size": 4, "dtype": "fp32"})
    requests = [_ask(c) for c in ("red", "green", "blue", "yellow", "red")]
    batched = model.generate(requests)
    single = [model.generate([r])[0] for r in requests]
    assert [c.text for c in batched] == [c.text for c in single]
    assert all(c.error is None and c.prompt_tokens > 16 for c in batched)  # 16 image tokens + text
    assert batched[0].text == batched[4].text  # same image, same answer
    # The image reaches the model: different pixels change the logits of the first new token.
    import torch

    net, processor = model.load()
    logits = []
    for colour in ("red", "blue"):
        from flywheel.models.vision import processor_messages

        messages, images = processor_messages(_ask(colour).messages)
        text = processor.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
        with torch.inference_mode():
            logits.append(net(**processor(text=[text], images=[images], return_tensors="pt")).logits[0, -1])
    assert not torch.allclose(logits[0], logits[1])


def test_idefics3_with_image_splitting_batches_like_one_at_a_time(tiny_idefics3_dir):
    """Another architecture and processor: image tokens vary with each image's size and shape."""
    model = load_model(f"local:{tiny_idefics3_dir}", {"batch_size": 4, "dtype": "fp32"})
    assert isinstance(model, VisionModel)
    requests = [ChatRequest(messages=[{"role": "user", "content": [
        image_part(check_image_bytes(image_bytes(colour, size=size))), {"type": "text", "text": "Which?"}]}],
        sampling=Sampling(max_tokens=5)) for colour, size in (("red", (24, 20)), ("blue", (64, 30)), ("green", (20, 64)))]
    batched = model.generate(requests)
    single = [model.generate([r])[0] for r in requests]
    assert [(c.text, c.prompt_tokens) for c in batched] == [(c.text, c.prompt_tokens) for c in single]
    assert len({c.prompt_tokens for c in batched}) == 3  # a wide image is split into more tiles


def test_text_only_requests_still_work(tiny_vlm_dir):
    model = load_model(f"local:{tiny_vlm_dir}", {"dtype": "fp32"})
    out = model.generate([ChatRequest(messages=[{"role": "user", "content": "hi"}], sampling=Sampling(max_tokens=3)),
                          _ask("red")])
    assert all(c.error is None for c in out)


def test_eval_on_a_vlm_then_an_unchanged_rerun_makes_no_model_call(tmp_path, tiny_vlm_dir, store):
    path = write_vision_eval(tmp_path, f"local:{tiny_vlm_dir}", model_options={"batch_size": 4, "dtype": "fp32"})
    spec = load_eval_spec(path)
    first = run_eval(spec, store, split="test")
    assert (first.n_samples, first.n_errors, first.model_calls, first.cache_hits) == (4, 0, 4, 0)
    again = run_eval(spec, store, split="test")
    assert (again.model_calls, again.cache_hits) == (0, 4)
    # A changed image is a changed key: only the items showing it are generated again.
    (tmp_path / "images/red.png").write_bytes(image_bytes((200, 30, 30)))
    changed = run_eval(spec, store, split="test")
    assert (changed.model_calls, changed.cache_hits) == (1, 3)


# -- openai: the request shape, checked by a server ------------------------------------------------
class ImageCheckingServer:
    """An OpenAI-compatible endpoint that refuses (400) any image part not in the Chat Completions
    shape with a base64 data URL, and answers with the sha256 prefix of each image it got."""

    def __init__(self):
        self.bodies: list[dict] = []
        self.app = Starlette(routes=[Route("/v1/chat/completions", self.chat, methods=["POST"])])

    async def chat(self, request: Request) -> JSONResponse:
        body = await request.json()
        self.bodies.append(body)
        digests = []
        for message in body["messages"]:
            if isinstance(message["content"], str):
                continue
            for part in message["content"]:
                if part["type"] == "text":
                    continue
                inner = part.get("image_url")
                if part["type"] != "image_url" or not isinstance(inner, dict) or set(inner) - {"url", "detail"}:
                    return JSONResponse({"error": {"message": f"bad part {part}"}}, status_code=400)
                head, _, payload = inner["url"].partition(",")
                if head not in ("data:image/png;base64", "data:image/jpeg;base64", "data:image/webp;base64"):
                    return JSONResponse({"error": {"message": f"bad url {head}"}}, status_code=400)
                if inner.get("detail", "auto") not in ("auto", "low", "high"):
                    return JSONResponse({"error": {"message": "bad detail"}}, status_code=400)
                digests.append(hashlib.sha256(base64.b64decode(payload)).hexdigest()[:8])
        return JSONResponse({
            "id": "c1", "object": "chat.completion", "created": 0, "model": body["model"],
            "choices": [{"index": 0, "finish_reason": "stop",
                         "message": {"role": "assistant", "content": " ".join(digests) or "no image"}}],
            "usage": {"prompt_tokens": 10, "completion_tokens": 2, "total_tokens": 12}})


def test_openai_backend_sends_image_parts_as_the_chat_api_expects(tmp_path, store):
    server = ImageCheckingServer()
    write_vision_eval(tmp_path, "openai:vision")  # writes the images
    digest = {c: hashlib.sha256((tmp_path / f"images/{c}.png").read_bytes()).hexdigest()[:8]
              for c in ("red", "green", "blue")}
    rows = [{"id": f"t{i}", "image": f"images/{c}.png", "label": c, "digest": digest[c], "split": "test"}
            for i, c in enumerate(digest)]
    grader = {"type": "string_check", "name": "digest", "input": "{{sample.output_text}}",
              "reference": "{{item.digest}}", "operation": "eq"}
    with BackgroundServer(server.app) as running:
        path = write_vision_eval(tmp_path, "openai:vision", rows=rows, graders=[grader],
                                 model_options={"base_url": running.url + "/v1", "max_retries": 0})
        result = run_eval(load_eval_spec(path), store, split="test")
    # Every answer is the hash of the image the server decoded: the bytes arrived intact.
    assert (result.n_errors, result.model_calls, result.pass_rate) == (0, 3, 1.0)
    user = server.bodies[0]["messages"][1]
    assert user["content"][0]["image_url"]["detail"] == "low"
    assert user["content"][1] == {"type": "text", "text": "Which colour is this?"}


# -- serve-model -----------------------------------------------------------------------------------
def test_serve_model_takes_image_parts_through_the_openai_sdk(tiny_vlm_dir):
    model = load_model(f"local:{tiny_vlm_dir}", {"dtype": "fp32"})
    red = data_url(image_bytes("red"))
    with BackgroundServer(create_app(model, name="tiny-vlm")) as running:
        client = openai.OpenAI(base_url=running.url + "/v1", api_key="x", max_retries=0)
        messages = [{"role": "user", "content": [{"type": "image_url", "image_url": {"url": red, "detail": "low"}},
                                                 {"type": "text", "text": "Which colour?"}]}]
        reply = client.chat.completions.create(model="tiny-vlm", messages=messages, max_tokens=4, temperature=0)
        direct = model.generate([ChatRequest(messages=messages, sampling=Sampling(max_tokens=4))])[0]
        assert reply.choices[0].message.content == direct.text
        assert reply.usage.prompt_tokens == direct.prompt_tokens
        bad = [{"role": "user", "content": [{"type": "image_url", "image_url": {"url": data_url(image_bytes(fmt="GIF"), "image/gif")}}]}]
        with pytest.raises(openai.BadRequestError, match=r"messages\[0\]\.content\[0\]: GIF image"):
            client.chat.completions.create(model="tiny-vlm", messages=bad, max_tokens=2)
        remote = [{"role": "user", "content": [{"type": "image_url", "image_url": {"url": "https://example.com/a.png"}}]}]
        with pytest.raises(openai.BadRequestError, match="only base64 data URLs"):
            client.chat.completions.create(model="tiny-vlm", messages=remote, max_tokens=2)


def test_a_text_model_server_refuses_images(tiny_model_dir):
    model = load_model(f"local:{tiny_model_dir}", {"dtype": "fp32"})
    with BackgroundServer(create_app(model, name="tiny")) as running:
        client = openai.OpenAI(base_url=running.url + "/v1", api_key="x", max_retries=0)
        messages = [{"role": "user", "content": [{"type": "image_url", "image_url": {"url": data_url(image_bytes())}}]}]
        with pytest.raises(openai.BadRequestError, match="does not read images"):
            client.chat.completions.create(model="tiny", messages=messages, max_tokens=2)


def test_a_local_text_model_refuses_image_requests(tiny_model_dir):
    from flywheel.errors import ModelError

    model = load_model(f"local:{tiny_model_dir}", {"dtype": "fp32"})
    with pytest.raises(ModelError, match="is a text model: it does not read images"):
        model.generate([_ask("red")])
