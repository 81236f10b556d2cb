"""`reward_function`: a grader as a TRL reward function.

TRL's GRPOTrainer calls each reward function as
`fn(prompts=..., completions=..., completion_ids=..., **columns)` where `columns` are the dataset's
other columns (one value per completion) plus `trainer_state`, `log_extra`, `log_metric`, and
expects one float per completion. Completions are strings, or for conversational datasets lists of
messages (`[{"role": "assistant", "content": "..."}]`). The same grader is thus the eval metric,
the DPO pair selector and the RL reward.
"""

from __future__ import annotations

import re
from collections.abc import Callable
from typing import Any

from graders.base import Grader
from graders.build import build_grader
from graders.templates import make_sample

# Keyword arguments TRL adds that are not dataset columns.
TRL_EXTRA_KWARGS = ("completion_ids", "trainer_state", "log_extra", "log_metric", "environments")


def completion_sample(completion: Any) -> dict[str, Any]:
    """The `sample` namespace for one TRL completion (a string or a list of messages)."""
    if isinstance(completion, str):
        return make_sample(completion)
    if isinstance(completion, dict):
        completion = [completion]
    if isinstance(completion, list):
        texts, tools = [], []
        for message in completion:
            if not isinstance(message, dict) or message.get("role", "assistant") != "assistant":
                continue
            texts.append(_content_text(message.get("content")))
            tools.extend(message.get("tool_calls") or [])
        return make_sample("".join(texts), output_tools=tools)
    raise TypeError(f"a completion must be a string or a list of messages, got {type(completion).__name__}")


def _content_text(content: Any) -> str:
    if content is None:
        return ""
    if isinstance(content, str):
        return content
    if isinstance(content, list):  # multimodal parts: keep the text ones
        return "".join(p.get("text", "") for p in content if isinstance(p, dict) and p.get("type") in ("text", "output_text", "input_text"))
    return str(content)


def reward_function(grader: Any, judge: Any = None, **build_options: Any) -> Callable[..., list[float]]:
    """A TRL reward function scoring each completion with `grader`.

    `grader` is a `Grader`, a config, or a platform-shaped dict. The dataset columns TRL passes
    become the item (`{{item.label}}` reads the `label` column; `{{item.prompt}}` the prompt).
    A grade that errored scores 0.0, like the platform's. The function's `__name__` is the
    grader's name (TRL logs rewards under it) and `.grader` is the Grader it uses.

    >>> reward = reward_function({"type": "string_check", "name": "label_match",
    ...     "input": "{{sample.output_text}}", "reference": "{{item.label}}", "operation": "ilike"})
    >>> reward(prompts=["q1", "q2"], completions=["It is REFUND", "no idea"], label=["refund", "refund"])
    [1.0, 0.0]
    """
    runner = grader if isinstance(grader, Grader) else build_grader(grader, judge=judge, **build_options)

    def reward(prompts: list[Any] | None = None, completions: list[Any] | None = None, **columns: Any) -> list[float]:
        completions = list(completions or [])
        n = len(completions)
        samples, items = [], []
        for i in range(n):
            item = {}
            for key, values in columns.items():
                if key in TRL_EXTRA_KWARGS:
                    continue
                if isinstance(values, (list, tuple)) and len(values) == n:
                    item[key] = values[i]
            if prompts is not None and len(prompts) == n and "prompt" not in item:
                item["prompt"] = prompts[i]
            items.append(item)
            samples.append(completion_sample(completions[i]))
        return [float(g.score) for g in runner.grade_batch(samples, items)]

    reward.__name__ = re.sub(r"\W+", "_", runner.name).strip("_") or runner.type
    reward.__qualname__ = reward.__name__
    reward.grader = runner  # type: ignore[attr-defined]
    return reward
