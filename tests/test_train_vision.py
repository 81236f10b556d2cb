"""Vision fine-tuning: vision JSONL out and in, the platform's image skip rules, a capture on a
tiny VLM, a few LoRA SFT steps on it with TRL, and the hosted backend's vision job."""

from __future__ import annotations

import json

import pytest
from vision_helpers import (data_url, image_bytes, tiny_idefics3_dir, tiny_vlm_dir,  # noqa: F401 - fixtures
                            write_vision_eval)

from flywheel.distill import capture
from flywheel.images import iter_image_urls, load_image
from flywheel.models import load_model
from flywheel.models.vision import VisionModel
from flywheel.spec import load_eval_spec
from flywheel.train import SFTSpec, TrainingDataError, build_sft_set
from flywheel.train.formats import TrainingSet, load_training_file
from flywheel.train.sft import train_sft
from flywheel.train.formats import set_has_images
from flywheel.train.vision import NOT_CHECKED, VisionSFTCollator, screen_images


def _row(colour: str, n_images: int = 1, url: str | None = None) -> dict:
    url = url or data_url(image_bytes(colour))
    parts = [{"type": "image_url", "image_url": {"url": url, "detail": "low"}} for _ in range(n_images)]
    return {"messages": [{"role": "system", "content": "Name the colour."},
                         {"role": "user", "content": [*parts, {"type": "text", "text": "Which colour?"}]},
                         {"role": "assistant", "content": colour}]}


# -- screening -------------------------------------------------------------------------------------
def test_screening_skips_what_the_platform_would_and_says_why(tmp_path):
    (tmp_path / "blue.png").write_bytes(image_bytes("blue"))
    truncated = image_bytes("red", size=(64, 64))
    rows = [
        _row("red"),
        _row("blue", url="blue.png"),  # a path, relative to the JSONL file: inlined
        _row("red", url=data_url(image_bytes(fmt="GIF"), "image/gif")),
        _row("red", n_images=11),
        _row("red", url=data_url(truncated[: len(truncated) // 2])),
        _row("red", url="missing.png"),
        _row("red", url=data_url(image_bytes()[:64] + b"\0" * (10 * 1024 * 1024 + 1))),
    ]
    path = tmp_path / "vision.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    loaded = load_training_file("sft", path)
    assert set_has_images(loaded)
    kept, report = screen_images(loaded)
    assert (report.rows, report.kept, report.images) == (7, 2, 2)
    assert report.skipped == {"unsupported_format": 1, "too_many_images": 1, "corrupt_image": 1,
                              "unreadable_image": 1, "image_too_large": 1}
    assert report.examples[0].startswith("row 3: GIF image")
    assert report.not_checked == NOT_CHECKED and "people, faces, children or CAPTCHAs" in NOT_CHECKED
    assert "kept 2 of 7 examples (2 images); skipped: 1 corrupt_image" in report.summary()
    # Kept rows are self-contained: the path became a data URL of the same bytes.
    urls = [url for row in kept.rows for url in iter_image_urls(row["messages"])]
    assert all(u.startswith("data:image/png;base64,") for u in urls)
    assert load_image(urls[1]).data == image_bytes("blue")
    assert kept.source["image_screening"]["skipped"]["too_many_images"] == 1
    with pytest.raises(TrainingDataError, match="every example was skipped"):
        screen_images(TrainingSet("sft", rows[2:4], {}))


def test_text_sets_pass_screening_unchanged():
    rows = [{"messages": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "yo"}]}]
    training_set = TrainingSet("sft", rows, {})
    kept, report = screen_images(training_set)
    assert kept is training_set and report.skipped == {} and not set_has_images(training_set)


# -- capture, export, import, SFT ------------------------------------------------------------------
@pytest.fixture
def vision_eval(tmp_path, tiny_vlm_dir):
    path = write_vision_eval(tmp_path, f"local:{tiny_vlm_dir}", model_options={"batch_size": 4, "dtype": "fp32"})
    return load_eval_spec(path)


def test_capture_on_a_vlm_stores_graded_samples_with_their_images(vision_eval, store, tiny_vlm_dir):
    result = capture(vision_eval, store, f"local:{tiny_vlm_dir}", n=2, temperature=0.8)
    assert result.n_samples == 8 and result.n_errors == 0
    rows = store.db.execute("select input_json, output_text from samples").fetchall()
    assert len(rows) == 8
    for input_json, output in rows:
        assert len(list(iter_image_urls(json.loads(input_json)))) == 1 and output is not None
    assert store.db.execute("select count(*) from grades").fetchone()[0] == 8


def test_sft_set_exports_and_imports_as_the_platform_vision_jsonl(vision_eval, store, tmp_path):
    capture(vision_eval, store, "reference:label")
    training_set = build_sft_set(vision_eval, store)
    assert len(training_set) == 4 and set_has_images(training_set)
    user = training_set.rows[0]["messages"][1]
    assert user["role"] == "user" and user["content"][0]["type"] == "image_url"
    assert user["content"][0]["image_url"]["url"].startswith("data:image/png;base64,")
    assert user["content"][0]["image_url"]["detail"] == "low"
    assert training_set.rows[0]["messages"][-1]["role"] == "assistant"
    exported = training_set.to_jsonl(tmp_path / "out.jsonl")
    back = load_training_file("sft", exported)
    assert back.rows == training_set.rows and back.content_hash == training_set.content_hash


@pytest.mark.parametrize("which", ["llava", "idefics3"])
def test_collator_learns_assistant_tokens_only_never_image_tokens(which, request):
    folder = request.getfixturevalue("tiny_vlm_dir" if which == "llava" else "tiny_idefics3_dir")
    model = load_model(f"local:{folder}")
    net, processor = model.load()
    from flywheel.train.vision import image_token_id

    image_id = image_token_id(net, processor)
    collator = VisionSFTCollator(processor, loss="assistant", image_token_id=image_id)
    batch = collator([{"messages": json.dumps(_row("green")["messages"])},
                      {"messages": json.dumps(_row("blue", n_images=2)["messages"])}])
    if which == "llava":
        assert batch["pixel_values"].shape[0] == 3  # three images in the batch
    for row in range(2):
        learned = batch["labels"][row][batch["labels"][row] != -100]
        text = processor.tokenizer.decode(learned)
        assert text.startswith(["green", "blue"][row]) and "<|im_end|>" in text and "Which colour" not in text
    assert not bool(((batch["input_ids"] == image_id) & (batch["labels"] != -100)).any())
    everything = VisionSFTCollator(processor, loss="all", image_token_id=image_id)(
        [{"messages": json.dumps(_row("green")["messages"])}])
    labelled = everything["labels"][0] != -100
    assert int(labelled.sum()) == int((everything["input_ids"][0] != image_id).sum())


def test_text_models_refuse_image_sets(vision_eval, store, tiny_model_dir):
    capture(vision_eval, store, "reference:label")
    training_set = build_sft_set(vision_eval, store)
    with pytest.raises(TrainingDataError, match="the base is a text model"):
        train_sft(vision_eval, store, training_set, base=f"local:{tiny_model_dir}",
                  config=SFTSpec(max_steps=1), evaluate=False, quiet=True)


@pytest.mark.slow
@pytest.mark.parametrize("which", ["llava", "idefics3"])
def test_a_few_lora_sft_steps_on_a_tiny_vlm_lower_the_loss_and_evaluate(which, vision_eval, store, request):
    folder = request.getfixturevalue("tiny_vlm_dir" if which == "llava" else "tiny_idefics3_dir")
    capture(vision_eval, store, "reference:label")
    training_set = build_sft_set(vision_eval, store)
    config = SFTSpec(max_steps=8, batch_size=4, learning_rate=1e-2, logging_steps=1, precision="fp32",
                     lora={"r": 4, "alpha": 8})
    result = train_sft(vision_eval, store, training_set, base=f"local:{folder}", config=config,
                       splits=("test",), quiet=True)
    metrics = result.metrics
    assert metrics["vision"] is True and metrics["images"] == 4 and metrics["steps"] == 8
    assert metrics["last_loss"] < metrics["first_loss"]
    assert metrics["adapter_tensors_changed"] > 0
    model = load_model(result.checkpoint.model_ref, {"dtype": "fp32"})
    assert isinstance(model, VisionModel) and model.adapter is not None
    [test] = result.evals
    assert test.split == "test" and test.n == 4
    # The merged adapter changes what the model says about the same images.
    parent = store.db.execute("select output_text from samples where iteration_id = ? order by item_key",
                              [test.parent_iteration_id]).fetchall()
    tuned = store.db.execute("select output_text from samples where iteration_id = ? order by item_key",
                             [test.iteration_id]).fetchall()
    assert parent != tuned


# -- hosted ----------------------------------------------------------------------------------------
def test_hosted_vision_job_uploads_screened_rows_and_logs_the_skips(vision_eval, store, monkeypatch, tmp_path):
    from test_train_hosted import _options, _serve

    from flywheel.train.hosted import train_hosted
    from flywheel.train.methods import load_train_config

    rows = [_row("red"), _row("green"), _row("red", url=data_url(image_bytes(fmt="GIF"), "image/gif")),
            _row("blue", n_images=11)]
    path = tmp_path / "v.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    replay = _serve("sft_succeeded.json", monkeypatch)
    try:
        result = train_hosted("sft", vision_eval, store, load_training_file("sft", path),
                              base="openai:gpt-4o-2024-08-06", config=load_train_config("sft"), evaluate=False,
                              **_options(replay))
    finally:
        replay.server.stop()
    [upload] = replay.uploads
    uploaded = [json.loads(line) for line in upload["content"].splitlines()]
    assert uploaded == [rows[0], rows[1]]  # vision JSONL rows, data URLs as they were
    [body] = replay.requests
    assert body["method"]["type"] == "supervised" and body["model"] == "gpt-4o-2024-08-06"
    [event] = [e for e in store.training_events(result.job_id) if (e["message"] or "").startswith("image screening")]
    assert event["level"] == "warn"
    data = json.loads(event["data_json"])
    assert data["skipped"] == {"unsupported_format": 1, "too_many_images": 1} and data["kept"] == 2
    assert "CAPTCHAs" in event["message"]


# -- the CLI ---------------------------------------------------------------------------------------
def test_cli_exports_vision_jsonl_and_trains_on_an_imported_file(vision_eval, store, tmp_path, tiny_vlm_dir):
    from click.testing import CliRunner

    from flywheel.cli import main

    capture(vision_eval, store, "reference:label")
    runner = CliRunner()
    out = tmp_path / "vision.jsonl"
    result = runner.invoke(main, ["train", "export", "sft", vision_eval.source, "-o", str(out), "--db", str(store.path)])
    assert result.exit_code == 0, result.output
    rows = [json.loads(line) for line in out.read_text().splitlines()]
    assert len(rows) == 4 and all(set_has_images(TrainingSet("sft", [r], {})) for r in rows)
    hf = runner.invoke(main, ["train", "export", "sft", vision_eval.source, "-o", str(out), "--hf", str(tmp_path / "hf"),
                              "--db", str(store.path)])
    assert hf.exit_code == 1 and "this training set has images" in hf.output
    rows.append(_row("red", url=data_url(image_bytes(fmt="GIF"), "image/gif")))
    out.write_text("".join(json.dumps(r) + "\n" for r in rows))
    result = runner.invoke(main, ["train", "sft", vision_eval.source, "--base", f"local:{tiny_vlm_dir}", "--data",
                                  str(out), "-s", "max_steps=2", "-s", "batch_size=2", "-s", "precision=fp32",
                                  "--no-eval", "--json", "--db", str(store.path)])
    assert result.exit_code == 0, result.output
    metrics = json.loads(result.output[result.output.index("{"):])["metrics"]
    assert metrics["rows"] == 4 and metrics["steps"] == 2
    assert metrics["image_screening"]["skipped"] == {"unsupported_format": 1}


def test_a_vision_adapter_trained_on_another_base_is_refused_in_one_line(tiny_vlm_dir, tmp_path):
    """Training and inference load vision adapters through the one loader, which checks the base."""
    from peft import LoraConfig

    from flywheel.errors import ModelError
    from flywheel.train.local import load_for_training

    folder = tmp_path / "adapter"
    config = LoraConfig(r=4, target_modules=["q_proj"])
    config.base_model_name_or_path = "someone/another-vlm"
    config.save_pretrained(folder)
    ref = f"local:{tiny_vlm_dir}+{folder}"
    with pytest.raises(ModelError) as training:
        load_for_training(ref, bf16=False)
    with pytest.raises(ModelError) as inference:
        load_model(ref, {"dtype": "fp32"}).load()
    for refused in (training.value, inference.value):
        assert "adapter was trained on 'someone/another-vlm'" in str(refused) and "\n" not in str(refused)
