"""string_check (reference §2.1): eq / ne case-sensitive, like = contains, ilike = case-insensitive contains."""

import pytest

import graders


def grader(op, reference="{{item.label}}", input="{{sample.output_text}}"):
    return graders.build_grader({"type": "string_check", "name": "check", "input": input,
                                 "reference": reference, "operation": op})


@pytest.mark.parametrize("op, output, label, expected", [
    ("eq", "card_arrival", "card_arrival", 1.0),
    ("eq", "Card_arrival", "card_arrival", 0.0),
    ("eq", "card_arrival ", "card_arrival", 0.0),   # no trimming
    ("ne", "refund", "card_arrival", 1.0),
    ("ne", "card_arrival", "card_arrival", 0.0),
    ("ne", "Card_arrival", "card_arrival", 1.0),    # case-sensitive
    ("like", "intent: card_arrival.", "card_arrival", 1.0),
    ("like", "intent: Card_Arrival.", "card_arrival", 0.0),
    ("like", "card", "card_arrival", 0.0),           # reference contained in input, not the reverse
    ("like", "card_arrival", "card%", 0.0),          # no SQL wildcards
    ("ilike", "intent: CARD_ARRIVAL", "card_arrival", 1.0),
    ("ilike", "STRASSE", "straße", 1.0),             # full Unicode case folding (casefold)
    ("ilike", "lost card", "card_arrival", 0.0),
    ("like", "anything", "", 1.0),                   # the empty string is contained in every string
])
def test_operations(op, output, label, expected):
    g = grader(op).grade(output, {"label": label})
    assert g.error is None
    assert g.score == expected
    assert g.passed is (expected == 1.0)


def test_feedback_says_why():
    g = grader("ilike").grade("lost card", {"label": "card_arrival"})
    assert g.feedback.startswith("expected 'card_arrival' to be contained in output (case-insensitive); it was not")
    assert grader("eq").grade("refund", {"label": "card_arrival"}).feedback == \
        "expected output to equal 'card_arrival'; got 'refund'"
    assert grader("like").grade("a card_arrival", {"label": "card_arrival"}).feedback == "output contains 'card_arrival'"
    assert grader("eq", input="{{item.other}}").grade("x", {"label": "a", "other": "a"}).feedback == "input equals 'a'"


def test_details_hold_rendered_values():
    g = grader("eq").grade("refund", {"label": "card_arrival"})
    assert g.details == {"name": "check", "type": "string_check", "operation": "eq",
                         "input": "refund", "reference": "card_arrival"}


def test_batch_matches_single():
    g = grader("ilike")
    samples = ["CARD_ARRIVAL", "refund", "x"]
    items = [{"label": "card_arrival"}, {"label": "card_arrival"}, {}]
    batch = g.grade_batch(samples, items)
    assert [b.score for b in batch] == [1.0, 0.0, 0.0]
    assert batch[2].error == "invalid_variable_error"
    assert [g.grade(s, i) for s, i in zip(samples, items)] == batch
    with pytest.raises(ValueError, match="3 samples but 2 items"):
        g.grade_batch(samples, items[:2])


def test_batch_leaves_the_garbage_collector_as_it_was():
    import gc

    g = grader("eq")
    assert gc.isenabled()
    g.grade_batch(["a"] * 10, [{"label": "a"}] * 10)
    assert gc.isenabled()
    gc.disable()
    try:
        g.grade_batch(["a"], [{"label": "a"}])
        assert not gc.isenabled()
    finally:
        gc.enable()
