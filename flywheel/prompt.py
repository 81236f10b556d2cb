"""Prompts: message templates plus optional few-shot demonstrations.

A `Prompt` renders the chat messages for one item. Demonstrations are inserted as user/assistant
turns just before the final user message, either a fixed list (`demos`) or, with
`nearest: k`, the k demonstrations whose input is most similar (by embedding) to the item's.

    >>> from flywheel.data import Item
    >>> prompt = Prompt(messages=[{"role": "system", "content": "One label."},
    ...                           {"role": "user", "content": "{{item.text}}"}])
    >>> prompt.render(Item(key="1", fields={"text": "Where is my card?"}, split="test", line=1))
    [{'role': 'system', 'content': 'One label.'}, {'role': 'user', 'content': 'Where is my card?'}]

A prompt's `id` is a content hash, so the same prompt is stored once whatever found it.
"""

from __future__ import annotations

import hashlib
import json
import re
from dataclasses import dataclass, field
from typing import Any

import graders

from flywheel.data import Item
from flywheel.images import render_parts
from graders.embeddings import default_embedder

INSTRUCTION_ROLES = ("system", "developer")
TEMPLATE_VARS = re.compile(r"\{\{\s*(item\.[^}]*?)\s*\}\}")


@dataclass(frozen=True)
class Demo:
    """One demonstration: the rendered user turn and the assistant reply that passed the graders."""

    item_key: str
    user: str
    assistant: str

    def turns(self) -> list[dict[str, str]]:
        return [{"role": "user", "content": self.user}, {"role": "assistant", "content": self.assistant}]


@dataclass
class Prompt:
    messages: list[dict[str, str]]
    demos: list[Demo] = field(default_factory=list)
    nearest: int = 0  # > 0: pick this many of `demos` per item, by embedding similarity

    @property
    def id(self) -> str:
        return "p-" + hashlib.sha256(json.dumps(self.to_json(), sort_keys=True).encode()).hexdigest()[:12]

    def to_json(self) -> dict[str, Any]:
        data: dict[str, Any] = {"messages": self.messages}
        if self.demos:
            data["demos"] = [d.__dict__ for d in self.demos]
        if self.nearest:
            data["nearest"] = self.nearest
        return data

    @classmethod
    def from_json(cls, data: dict[str, Any] | list[dict[str, str]]) -> "Prompt":
        if isinstance(data, list):  # a bare message list
            return cls(messages=data)
        return cls(messages=data["messages"], demos=[Demo(**d) for d in data.get("demos", [])],
                   nearest=data.get("nearest", 0))

    def render_base(self, item: Item) -> list[dict[str, Any]]:
        """The messages with templates filled; raises graders.TemplateVariableError, and
        flywheel.images.ImageError (naming the item) for an image that cannot be used."""
        if not any(isinstance(m["content"], list) for m in self.messages):
            return [{"role": m["role"], "content": graders.render_template(m["content"], item=item.fields)}
                    for m in self.messages]

        return render_parts(self.messages, item)

    def render(self, item: Item, chosen: list[Demo] | None = None) -> list[dict[str, str]]:
        """Messages for one item, with demonstrations before the last user turn."""
        base = self.render_base(item)
        demos = chosen if chosen is not None else ([] if self.nearest else self.demos)
        demos = [d for d in demos if d.item_key != item.key]  # an item never demonstrates itself
        if not demos:
            return base
        last_user = max(i for i, m in enumerate(base) if m["role"] == "user")
        turns = [t for d in demos for t in d.turns()]
        return base[:last_user] + turns + base[last_user:]

    def instructions(self) -> list[dict[str, Any]]:
        """The prompt's own turns that are not the conversation: its system (and developer) messages."""
        return [m for m in self.messages if m["role"] in INSTRUCTION_ROLES]

    def over(self, template: list[dict[str, Any]]) -> "Prompt":
        """This prompt's instructions and demonstrations over another message template's conversation
        (how a served prompt is evaluated on an eval's items)."""
        return Prompt(messages=[*self.instructions(), *(m for m in template if m["role"] not in INSTRUCTION_ROLES)],
                      demos=self.demos, nearest=self.nearest)

    def apply(self, messages: list[dict[str, Any]]) -> list[dict[str, Any]]:
        """An app's messages as this prompt answers them: the app's system messages replaced by the
        prompt's instructions, its demonstrations (all, or the `nearest` to the last user turn) put
        before the last user turn. The app's conversation is kept as sent."""
        conversation = [m for m in messages if m["role"] not in INSTRUCTION_ROLES]
        base = [*self.instructions(), *conversation]
        users = [i for i, m in enumerate(base) if m["role"] == "user"]
        if not self.demos or not users:
            return base
        last = users[-1]
        query = base[last]["content"] if isinstance(base[last]["content"], str) else ""
        demos = pick_nearest(self, [query])[0] if self.nearest else self.demos
        return base[:last] + [t for d in demos for t in d.turns()] + base[last:]

    def render_many(self, items: list[Item]) -> list[list[dict[str, str]] | str]:
        """Render every item; an item that cannot be rendered gives an error string instead."""
        chosen: list[list[Demo] | None] = [None] * len(items)
        if self.nearest and self.demos:
            chosen = nearest_demos(self, items)
        out: list[list[dict[str, str]] | str] = []
        for item, demos in zip(items, chosen):
            try:
                out.append(self.render(item, demos))
            except graders.TemplateVariableError as exc:
                out.append(f"invalid_variable_error: {exc}")
        return out


def nearest_demos(prompt: Prompt, items: list[Item]) -> list[list[Demo] | None]:
    """For each item, the `prompt.nearest` demos whose user turn is closest to the item's (never the
    item itself)."""
    queries: list[str] = []
    for item in items:
        try:
            base = prompt.render_base(item)
            queries.append(next(m["content"] for m in reversed(base) if m["role"] == "user"))
        except (graders.TemplateVariableError, StopIteration):
            queries.append("")
    return pick_nearest(prompt, queries, [item.key for item in items])


def pick_nearest(prompt: Prompt, queries: list[str], exclude: list[str | None] | None = None) -> list[list[Demo]]:
    """For each query, the `prompt.nearest` demos whose user turn is most similar (by embedding), most
    similar last (right before the query); a demo whose item key is the query's `exclude` is skipped."""
    import numpy as np

    embedder = default_embedder()
    pool = embedder.embed([d.user for d in prompt.demos])
    similarity = embedder.embed([q if isinstance(q, str) else "" for q in queries]) @ pool.T
    picks: list[list[Demo]] = []
    for skip, row in zip(exclude or [None] * len(queries), similarity):
        order = [i for i in np.argsort(-row, kind="stable") if prompt.demos[i].item_key != skip]
        picks.append([prompt.demos[i] for i in reversed(order[: prompt.nearest])])
    return picks
