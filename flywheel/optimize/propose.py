"""Reflective instruction rewrites (GEPA / OPRO style) and the checks a proposal must pass.

The proposer model sees the current instruction, a few failing examples with the model's output
and the graders' feedback, and writes a new instruction. A proposal that is empty, unchanged, or
drops an `{{item.x}}` placeholder the task needs is rejected with a reason and never evaluated.
"""

from __future__ import annotations

import re
from collections.abc import Sequence
from dataclasses import dataclass

from flywheel.prompt import TEMPLATE_VARS, Prompt

PROPOSER_SYSTEM = (
    "You improve the instruction given to a language model for a task. You are shown the current "
    "instruction and examples the model got wrong, with the grader's feedback. Write a better "
    "instruction that would make the model answer these correctly. Keep every placeholder written "
    "in double braces exactly as it is. Reply with the new instruction only, between <<< and >>>."
)


@dataclass(frozen=True)
class Failure:
    input: str
    output: str
    feedback: str


@dataclass(frozen=True)
class Proposal:
    prompt: Prompt | None
    text: str
    rejected: str | None = None  # why it is not evaluated


def instruction_index(prompt: Prompt) -> int:
    """The message a rewrite replaces: the first system message, else the first message."""
    return next((i for i, m in enumerate(prompt.messages) if m["role"] in ("system", "developer")), 0)


def proposer_messages(prompt: Prompt, failures: Sequence[Failure]) -> list[dict[str, str]]:
    instruction = prompt.messages[instruction_index(prompt)]["content"]
    shown = "\n\n".join(
        f"Example {n}\nInput: {f.input}\nModel output: {f.output}\nGrader feedback: {f.feedback}"
        for n, f in enumerate(failures, start=1))
    return [
        {"role": "system", "content": PROPOSER_SYSTEM},
        {"role": "user", "content": f"Current instruction:\n<<<\n{instruction}\n>>>\n\n{shown}\n\n"
                                    "New instruction, between <<< and >>>:"},
    ]


def extract_instruction(reply: str) -> str:
    """The text between <<< and >>> (or after <<<, or the whole reply), trimmed."""
    match = re.search(r"<<<\s*(.*?)\s*(?:>>>|$)", reply, re.S)
    return (match.group(1) if match else reply).strip()


def check_proposal(parent: Prompt, text: str, known_fields: set[str] | None = None) -> Proposal:
    """Turn a proposer reply into a candidate prompt, or a rejection with its reason."""
    index = instruction_index(parent)
    old = parent.messages[index]["content"]
    if not text.strip():
        return Proposal(None, text, "empty proposal")
    if " ".join(text.split()) == " ".join(old.split()):
        return Proposal(None, text, "unchanged proposal")
    needed = set(TEMPLATE_VARS.findall(old))
    kept = set(TEMPLATE_VARS.findall(text))
    if needed - kept:
        return Proposal(None, text, "drops template variable(s) " + ", ".join(f"{{{{{v}}}}}" for v in sorted(needed - kept)))
    if known_fields is not None:
        unknown = {v for v in kept if v.split(".", 1)[1].split(".")[0].split("[")[0] not in known_fields}
        if unknown:
            return Proposal(None, text, "names unknown item field(s) " + ", ".join(sorted(unknown)))
    messages = [dict(m) for m in parent.messages]
    messages[index] = {"role": messages[index]["role"], "content": text}
    return Proposal(Prompt(messages=messages, demos=list(parent.demos), nearest=parent.nearest), text)
