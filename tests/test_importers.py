"""Importing what a platform user can download: stored completions, from a file or through the real
openai SDK against a local stand-in of the platform (tests/platform_helpers.py)."""

from __future__ import annotations

import json

import pytest
import yaml
from click.testing import CliRunner
from platform_helpers import FT_MODEL, Platform, stored_completion, traffic

from flywheel.cli import main
from flywheel.errors import PlatformImportError, SpecError
from flywheel.importers.completions import import_completions_api, import_completions_file
from flywheel.importers.prompts import import_prompts_file
from flywheel.store import Store
from flywheel.proxy.captures import sft_example
from flywheel.web import BackgroundServer


def write_lines(path, rows):
    path.write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")
    return path


def test_from_api_walks_every_page_and_keeps_metadata_dates_and_messages(store, tmp_path):
    platform = Platform(traffic(45))  # 3 pages of 20 (the SDK's limit is ours: 100; the server caps at 20)
    with BackgroundServer(platform.app()) as server:
        saved = tmp_path / "download.jsonl"
        result = import_completions_api(store, base_url=server.url + "/v1", save=saved)
    assert result.imported == 45 and result.models == {FT_MODEL: 45}
    assert result.metadata_keys == ["prompt_version", "usecase"]
    rows = store.query_captures()
    assert [r.response_id for r in rows][:2] == ["chatcmpl-stored0000", "chatcmpl-stored0001"]
    assert rows[0].created_at.startswith("2026-05-28") and json.loads(rows[0].metadata_json)["usecase"] == "triage"
    example = sft_example(rows[1])  # the proxy's own SFT reader sees an ordinary capture
    assert [m["role"] for m in example["messages"]] == ["system", "user", "assistant"]
    assert example["messages"][-1]["content"] == "pin_blocked"
    # the saved download imports again, and is refused as duplicates: nothing more is stored
    with pytest.raises(PlatformImportError, match=r"download.jsonl:1: id: chatcmpl-stored0000 is already imported"):
        import_completions_file(store, saved)
    assert len(store.query_captures()) == 45


def test_a_truncated_api_listing_stores_nothing(store):
    with BackgroundServer(Platform(traffic(3), truncate=True).app()) as server:
        with pytest.raises(PlatformImportError, match="page 1: has_more is true but the page gives no new last_id"):
            import_completions_api(store, base_url=server.url + "/v1")
    assert store.query_captures() == []


@pytest.mark.parametrize("mutate, message", [
    (lambda rows: rows[1].update(object="chat.completion.chunk"), r"bad.jsonl:2: object: expected 'chat.completion'"),
    (lambda rows: rows[2].pop("input_messages"), r"bad.jsonl:3: input_messages: missing"),
    (lambda rows: rows[2].update(created="yesterday"), r"bad.jsonl:3: created: expected an integer, got a string"),
    (lambda rows: rows[0]["input_messages"][1].update(role="robot"), r"bad.jsonl:1: input_messages\[1\]: role: 'robot'"),
    (lambda rows: rows[0]["metadata"].update(n=3), r"bad.jsonl:1: metadata.n: values are strings"),
    (lambda rows: rows.append(dict(rows[0])), r"bad.jsonl:5: id: chatcmpl-stored0000 appears twice \(first at .*bad.jsonl:1\)"),
])
def test_bad_downloads_are_one_line_errors_and_store_nothing(store, tmp_path, mutate, message):
    rows = traffic(4)
    mutate(rows)
    with pytest.raises(PlatformImportError, match=message) as caught:
        import_completions_file(store, write_lines(tmp_path / "bad.jsonl", rows))
    assert "\n" not in str(caught.value)
    assert store.query_captures() == []


def test_a_file_of_pages_must_end_with_the_last_page(store, tmp_path):
    rows = traffic(3)
    pages = [{"object": "list", "data": rows[:2], "has_more": True, "last_id": rows[1]["id"]}]
    with pytest.raises(PlatformImportError, match=r"pages.jsonl:1: has_more: .* truncated"):
        import_completions_file(store, write_lines(tmp_path / "pages.jsonl", pages))
    assert store.query_captures() == []
    pages.append({"object": "list", "data": rows[2:], "has_more": False, "last_id": rows[2]["id"]})
    assert import_completions_file(store, write_lines(tmp_path / "pages.jsonl", pages)).imported == 3


def test_cli_imports_a_file_and_errors_in_one_line(tmp_path):
    db = str(tmp_path / "f.db")
    good = write_lines(tmp_path / "good.jsonl", [stored_completion(1, "q about pin blocked", "pin_blocked")])
    ok = CliRunner().invoke(main, ["import", "openai-completions", str(good), "--db", db])
    assert ok.exit_code == 0 and "imported 1 stored completions" in ok.output
    again = CliRunner().invoke(main, ["import", "openai-completions", str(good), "--db", db])
    assert again.exit_code == 1 and again.output.count("\n") == 1 and "already imported" in again.output
    usage = CliRunner().invoke(main, ["import", "openai-completions", "--db", db])
    assert usage.exit_code == 2


# -- prompt objects ---------------------------------------------------------------------------------
def test_prompts_from_api_become_prompt_versions_an_eval_spec_names(store, tmp_path, monkeypatch):
    from conftest import make_rows, spec_dict, write_jsonl
    from platform_helpers import SYSTEM, prompt_versions

    from flywheel.importers.prompts import import_prompts_api
    from flywheel.spec import load_eval_spec

    with BackgroundServer(Platform([], prompts=prompt_versions()).app()) as server:
        result = import_prompts_api(store, base_url=server.url + "/v1", save=tmp_path / "prompts.jsonl")
    assert [(v["id"], v["version"]) for v in result.versions] == [("pmpt_triage", "1"), ("pmpt_triage", "2"),
                                                                  ("pmpt_greet", "1")]
    newest = store.platform_prompt_version("pmpt_triage")
    assert newest["version"] == "2" and newest["created_at"].startswith("2026-02")
    assert newest["messages"] == [{"role": "developer", "content": SYSTEM},
                                  {"role": "user", "content": "Customer: {{item.question}}"}]
    # an eval spec names the version; its variables map to the item's fields; loaded, it is the input
    write_jsonl(tmp_path / "data.jsonl", make_rows())
    spec_path = tmp_path / "eval.yaml"
    data = {k: v for k, v in spec_dict("local:smollm2").items() if k != "input"}
    spec_path.write_text(yaml.safe_dump({**data, "prompt": {"id": "pmpt_triage", "version": "1",
                                                            "variables": {"question": "text"}}}))
    spec = load_eval_spec(spec_path, store=store)
    assert spec.messages() == [{"role": "developer", "content": "Answer with one label."},
                               {"role": "user", "content": "{{item.text}}"}]
    assert "prompt" not in spec.model_dump()  # the spec's content (and fingerprint) is the messages
    spec_path.write_text(yaml.safe_dump({**data, "prompt": {"id": "pmpt_triage", "variables": {"question": "text"}}}))
    assert load_eval_spec(spec_path, store=store).messages()[0]["content"] == SYSTEM  # unset version: the newest
    # found through the default store ($FLYWHEEL_DB) when the caller gives none
    monkeypatch.setenv("FLYWHEEL_DB", str(store.path))
    assert load_eval_spec(spec_path).messages()[0]["content"] == SYSTEM
    # not imported, or both input and prompt: one line naming the file and the field
    spec_path.write_text(yaml.safe_dump({**data, "prompt": {"id": "pmpt_triage", "version": "9"}}))
    with pytest.raises(SpecError, match=r"eval.yaml: prompt: pmpt_triage version 9 is not imported"):
        load_eval_spec(spec_path, store=store)
    spec_path.write_text(yaml.safe_dump({**spec_dict("local:smollm2"), "prompt": {"id": "pmpt_triage"}}))
    with pytest.raises(SpecError, match=r"eval.yaml: prompt: give either `input` messages or `prompt`"):
        load_eval_spec(spec_path, store=store)
    spec_path.write_text(yaml.safe_dump({**data, "prompt": {"id": "pmpt_triage", "versoin": "1"}}))
    with pytest.raises(SpecError, match=r"eval.yaml: prompt.versoin"):
        load_eval_spec(spec_path, store=store)
    # the saved download imports into a fresh store, and twice is refused whole
    other = Store.open(tmp_path / "other.db")
    try:
        assert import_prompts_file(other, tmp_path / "prompts.jsonl").imported == 3
        with pytest.raises(PlatformImportError, match=r"prompts.jsonl:1: id/version: pmpt_triage version 1 is already"):
            import_prompts_file(other, tmp_path / "prompts.jsonl")
        assert len(other.platform_prompt_versions()) == 3
    finally:
        other.close()


def _versions():
    from platform_helpers import prompt_versions

    return prompt_versions()


@pytest.mark.parametrize("mutate, message", [
    (lambda rows: rows[0].update(object="prompt.template"), r"bad.jsonl:1: object: expected 'prompt.version' or 'prompt'"),
    (lambda rows: rows[1].update(version=2), r"bad.jsonl:2: version: expected a string"),
    (lambda rows: rows[2].pop("id"), r"bad.jsonl:3: id: missing"),
    (lambda rows: rows[2].pop("messages"), r"bad.jsonl:3: instructions/messages: the version has neither"),
    (lambda rows: rows[0]["messages"][0].update(role="robot"), r"bad.jsonl:1: messages\[0\]: role: 'robot'"),
    (lambda rows: rows[1]["messages"][0]["content"][0].update(type="input_image"),
     r"bad.jsonl:2: messages\[0\]: content\[0\]: type: 'input_image': only text prompts"),
    (lambda rows: rows[0].update(instructions="Hi {{first name}}"), r"bad.jsonl:1: instructions: variable \{\{first name\}\}"),
    (lambda rows: rows[0].update(variables={"question": 3}), r"bad.jsonl:1: variables.question: a variable is a name"),
    (lambda rows: rows[0].update(created_at="2026-01-01"), r"bad.jsonl:1: created_at: expected an integer"),
    (lambda rows: rows.append(dict(rows[1])), r"bad.jsonl:4: id/version: pmpt_triage version 2 appears twice"),
])
def test_bad_prompt_downloads_are_one_line_errors_and_store_nothing(store, tmp_path, mutate, message):
    rows = _versions()
    mutate(rows)
    with pytest.raises(PlatformImportError, match=message) as caught:
        import_prompts_file(store, write_lines(tmp_path / "bad.jsonl", rows))
    assert "\n" not in str(caught.value)
    assert store.platform_prompt_versions() == [] and store.db["prompts"].count == 0


def test_cli_imports_prompts(tmp_path):
    db = str(tmp_path / "f.db")
    path = write_lines(tmp_path / "p.jsonl", _versions())
    ok = CliRunner().invoke(main, ["import", "openai-prompts", str(path), "--db", db])
    assert ok.exit_code == 0 and "imported 3 prompt versions" in ok.output and "pmpt_triage@2" in ok.output
    bad = CliRunner().invoke(main, ["import", "openai-prompts", str(path), "--db", db])
    assert bad.exit_code == 1 and bad.output.count("\n") == 1 and "already imported" in bad.output
