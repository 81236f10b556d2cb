"""Constrained judging: the judge chooses among the allowed answers by its own probabilities.

A small local judge asked for `{"result": "yes"}` often writes something else; a judge that can
score candidate replies (`score_choices`, see `graders.judge.ChoiceScorer`) is instead asked how
likely each allowed reply is, and the likeliest wins, so it always answers:

* label_model: the candidates are `{"result": "<label>"}` for every label. The probabilities,
  normalised over the labels, go into the grade's details; the label is the argmax.
* score_model: the candidates are `{"result": <v>}` for a grid of values in `range` (the integers
  when the range spans 4 to 20 whole numbers, else 11 evenly spaced values). The score is the
  probability-weighted mean of the grid (G-Eval's weighting: finer than the argmax, and still in
  the range); the argmax value is stored as `result`.

Candidates are JSON objects with the closing brace, so none is a prefix of another (`1` vs `10`).
Each candidate's log-probability is the sum over its tokens: the exact probability of writing that
whole reply, which is what greedy decoding restricted to these replies would compare.
"""

from __future__ import annotations

import json
import math
from typing import Any

from graders.grade import Grade, passes

#: Score grids: whole numbers when the range spans at least this many and at most MAX_INTEGERS.
MIN_INTEGERS, MAX_INTEGERS = 4, 20
GRID_POINTS = 11


class FreeText:
    """A judge seen only through `chat`: model graders then read its free-text reply.

    `build_grader(cfg, judge=FreeText(model))` turns constrained judging off, e.g. to measure
    what it buys (`flywheel graders calibrate --free-text`, benchmarks/judges.py).
    """

    def __init__(self, model: Any):
        self.model = model

    def chat(self, conversations: list[list[dict[str, str]]], **kwargs: Any) -> list[str]:
        return self.model.chat(conversations, **kwargs)


def can_score_choices(judge: Any) -> bool:
    """True when the judge offers `score_choices(conversations, choices)`."""
    return callable(getattr(judge, "score_choices", None))


def label_choices(labels: list[str]) -> list[str]:
    """The candidate replies of a label_model judge: one JSON object per label."""
    return [json.dumps({"result": label}, ensure_ascii=False) for label in labels]


def score_values(low: float, high: float) -> list[float]:
    """The candidate scores of a score_model judge over `range` [low, high]."""
    if float(low).is_integer() and float(high).is_integer() and MIN_INTEGERS <= high - low <= MAX_INTEGERS:
        return [float(v) for v in range(int(low), int(high) + 1)]
    step = (high - low) / (GRID_POINTS - 1)
    return [round(low + i * step, 10) for i in range(GRID_POINTS)]


def score_choices_text(values: list[float]) -> list[str]:
    """The candidate replies for score values: `{"result": 7}`, `{"result": 0.3}`."""
    return ['{"result": ' + (str(int(v)) if float(v).is_integer() else f"{v:g}") + "}" for v in values]


def ask(judge: Any, conversations: list[list[dict[str, str]]], choices: list[str]) -> list[list[float]]:
    """The judge's log-probabilities of each choice per conversation, checked for shape and value."""
    rows = judge.score_choices(conversations, choices)
    if len(rows) != len(conversations):
        raise RuntimeError(f"the judge scored {len(rows)} conversations of {len(conversations)}")
    for row in rows:
        if len(row) != len(choices) or not all(isinstance(v, (int, float)) and not math.isnan(v) for v in row):
            raise RuntimeError(f"the judge returned {row!r} for {len(choices)} choices")
    return [[float(v) for v in row] for row in rows]


def normalise(logprobs: list[float]) -> list[float]:
    """Probabilities over the choices (a softmax of their log-probabilities)."""
    top = max(logprobs)
    if top == -math.inf:
        return [1.0 / len(logprobs)] * len(logprobs)
    weights = [math.exp(v - top) for v in logprobs]
    total = sum(weights)
    return [w / total for w in weights]


def label_grade(labels: list[str], passing: list[str], choices: list[str], logprobs: list[float],
                details: dict[str, Any]) -> Grade:
    """The label_model grade of one constrained judgement."""
    probs = normalise(logprobs)
    best = max(range(len(labels)), key=lambda i: probs[i])
    label = labels[best]
    ok = label in passing
    shown = ", ".join(map(repr, passing))
    feedback = (f"judge chose {label!r} with probability {probs[best]:.2f} among the labels "
                f"(passing: {shown}): {'pass' if ok else 'fail'}")
    details.update(reply=choices[best], label=label, passing_labels=list(passing), constrained=True,
                   probabilities=dict(zip(labels, probs)), logprobs=dict(zip(labels, logprobs)))
    return Grade(score=1.0 if ok else 0.0, passed=ok, feedback=feedback, details=details)


def score_grade(values: list[float], low: float, high: float, threshold: float, choices: list[str],
                logprobs: list[float], details: dict[str, Any]) -> Grade:
    """The score_model grade of one constrained judgement: the probability-weighted score."""
    probs = normalise(logprobs)
    best = max(range(len(values)), key=lambda i: probs[i])
    expected = sum(p * v for p, v in zip(probs, values))
    score = min(high, max(low, expected))
    ok = passes(score, threshold)
    feedback = (f"judge scored {score:.3g} in [{low:g}, {high:g}] (probability-weighted; most likely "
                f"{values[best]:g} at {probs[best]:.2f}) (threshold {threshold:g}): {'pass' if ok else 'fail'}")
    keys = [f"{v:g}" for v in values]
    details.update(reply=choices[best], result=values[best], expected=expected, steps=[], constrained=True,
                   range=[low, high], pass_threshold=threshold,
                   probabilities=dict(zip(keys, probs)), logprobs=dict(zip(keys, logprobs)))
    return Grade(score=score, passed=ok, feedback=feedback, details=details)
