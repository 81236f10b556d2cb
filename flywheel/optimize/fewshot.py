"""Few-shot bootstrap: demonstrations from train items whose outputs passed the graders.

`bootstrap_demos` collects the pool: the task model's (or a teacher's) outputs on train items,
evaluated and graded like any eval (stored as a `bootstrap` iteration, cached), keeping only the
passing ones; or, with `source: labels`, each train item's reference rendered by `demo_output`
and still passed through the same graders. `select_demos` turns the pool into candidate prompts.
"""

from __future__ import annotations

import random
from collections.abc import Sequence

import graders

from flywheel.data import Item
from flywheel.prompt import Demo, Prompt
from flywheel.store.rows import SampleWithGrades


def labelled_demos(prompt: Prompt, items: Sequence[Item], demo_output: str, grader_set) -> list[Demo]:
    """Demos whose reply is each item's reference (e.g. `{{item.label}}`), kept if they pass."""
    candidates = []
    for item, messages in zip(items, prompt.render_many(list(items))):
        if isinstance(messages, str):
            continue
        try:
            reply = graders.render_template(demo_output, item=item.fields)
        except graders.TemplateVariableError:
            continue
        candidates.append((item, _user_turn(messages), reply))
    grades = grader_set.grade([graders.make_sample(reply) for _, _, reply in candidates],
                              [item.fields for item, _, _ in candidates])
    return [Demo(item_key=item.key, user=user, assistant=reply)
            for (item, user, reply), row in zip(candidates, grades) if all(g["passed"] for g in row)]


def demos_from_samples(samples: Sequence[SampleWithGrades], items_by_key: dict[str, Item], prompt: Prompt) -> list[Demo]:
    """Demos from stored samples that passed every grader (first passing repeat per item)."""
    demos, seen = [], set()
    for sample in samples:
        key = sample.item_key
        if key in seen or sample.error or not sample.grades:
            continue
        if not all(g.passed for g in sample.grades):
            continue
        rendered = prompt.render_base(items_by_key[key])
        demos.append(Demo(item_key=key, user=_user_turn(rendered), assistant=sample.output_text))
        seen.add(key)
    return demos


def _user_turn(messages: Sequence[dict[str, str]]) -> str:
    return next(m["content"] for m in reversed(messages) if m["role"] == "user")


def select_demos(pool: Sequence[Demo], strategy: str, k: int, *, labels: dict[str, str] | None = None,
                 seed: int = 0) -> list[Demo] | None:
    """A fixed demo list for `random` (k in all) or `balanced` (k per label); None for `nearest`.

    `labels` maps item key -> label for the balanced strategy. Order is interleaved by label so
    no label sits only at the far end of the context.
    """
    rng = random.Random(f"{seed}:{strategy}:{k}")
    if strategy == "nearest":
        return None
    if strategy == "random":
        return rng.sample(list(pool), min(k, len(pool)))
    if strategy == "balanced":
        if labels is None:
            raise ValueError("balanced demo selection needs labels")
        by_label: dict[str, list[Demo]] = {}
        for demo in pool:
            by_label.setdefault(labels.get(demo.item_key, ""), []).append(demo)
        chosen_per_label = {label: rng.sample(demos, min(k, len(demos))) for label, demos in sorted(by_label.items())}
        out = []
        for round_ in range(k):
            for label in sorted(chosen_per_label):
                if round_ < len(chosen_per_label[label]):
                    out.append(chosen_per_label[label][round_])
        return out
    raise ValueError(f"unknown demo strategy {strategy!r}")
