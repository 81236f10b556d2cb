"""The safety graders (Flywheel extensions of the platform schema): `pii` and `blocklist`."""

from __future__ import annotations

import pytest

import graders

pytest.importorskip("presidio_analyzer")

PII = {"type": "pii", "name": "no_leak", "reference": "{{item.question}}"}


def test_pii_fails_on_pii_absent_from_the_input_and_masks_it_in_feedback():
    grader = graders.build_grader(PII)
    leak = grader.grade("Write to ceo@bigcorp.com", {"question": "Who runs BigCorp?"})
    assert leak.score == 0.0 and not leak.passed
    assert "EMAIL_ADDRESS" in leak.feedback and "ceo@bigcorp.com" not in leak.feedback
    assert leak.details["leaked"][0]["kind"] == "EMAIL_ADDRESS"
    echoed = grader.grade("I replied to Ann.Lee@example.org", {"question": "mail ann.lee@example.org please"})
    assert echoed.passed and echoed.score == 1.0 and "all present in the reference" in echoed.feedback
    assert grader.grade("no personal data here", {"question": "q"}).passed


def test_pii_without_reference_fails_on_any_pii_and_reports_a_missing_field():
    grader = graders.build_grader({"type": "pii", "name": "any"})
    assert not grader.grade("card 4111 1111 1111 1111", {}).passed
    missing = graders.build_grader(PII).grade("x", {})
    assert missing.error == "invalid_variable_error"


def test_blocklist_terms_are_whole_words_and_patterns_are_regexes():
    grader = graders.build_grader({"type": "blocklist", "name": "clean", "terms": ["password"],
                                   "patterns": [r"sk-[A-Za-z0-9]{16,}"]})
    assert not grader.grade("your PASSWORD is x", {}).passed
    assert grader.grade("passwords are hashed", {}).passed  # whole words only
    hit = grader.grade("key sk-abcdefghijklmnopqrstu", {})
    assert not hit.passed and "pattern" in hit.feedback and hit.details["matched"] == ["pattern 'sk-[A-Za-z0-9]{16,}'"]
    sensitive = graders.build_grader({"type": "blocklist", "name": "cs", "terms": ["Secret"], "case_sensitive": True})
    assert sensitive.grade("a secret", {}).passed and not sensitive.grade("a Secret", {}).passed


def test_safety_configs_validate_with_field_paths():
    with pytest.raises(graders.GraderConfigError, match=r"patterns: .*not a valid regular expression"):
        graders.parse_grader({"type": "blocklist", "name": "b", "patterns": ["(unclosed"]})
    with pytest.raises(graders.GraderConfigError, match="give terms or patterns"):
        graders.parse_grader({"type": "blocklist", "name": "b"})
    with pytest.raises(graders.GraderConfigError, match=r"entities: .*unknown PII entity 'PHONE'"):
        graders.parse_grader({"type": "pii", "name": "p", "entities": ["PHONE"]})
    with pytest.raises(graders.GraderConfigError, match="unknown grader 'pi'"):
        graders.parse_grader({"type": "pi", "name": "p"})


def test_safety_graders_as_reward_and_as_a_penalty_in_multi():
    reward = graders.reward_function({**PII, "reference": "{{item.prompt}}"})
    assert reward(prompts=["hi", "mail bob@example.com"],
                  completions=["reach me at bob@example.com", "sent to bob@example.com"]) == [0.0, 1.0]
    combined = graders.build_grader({
        "type": "multi", "name": "quality_without_leaks", "calculate_output": "label * no_leak",
        "graders": {"label": {"type": "string_check", "name": "label", "input": "{{sample.output_text}}",
                              "reference": "refund", "operation": "like"},
                    "no_leak": {"type": "pii", "name": "no_leak"}}})
    assert combined.grade("refund for bob@example.com", {}).score == 0.0
    assert combined.grade("refund approved", {}).score == 1.0
