"""The model interface every backend implements.

A `Model` turns a batch of `ChatRequest`s into `Completion`s. Its `fingerprint` identifies the
weights (or remote model id) without loading them, so the completion cache can answer before any
weights are read. `chat` is the small protocol `graders.JudgeModel` expects from a judge.
"""

from __future__ import annotations

import abc
from dataclasses import dataclass, field
from typing import Any, Iterator


@dataclass(frozen=True)
class Sampling:
    temperature: float = 0.0
    max_tokens: int = 64
    top_p: float = 1.0
    seed: int = 0

    @property
    def greedy(self) -> bool:
        return self.temperature == 0.0


@dataclass(frozen=True)
class ChatRequest:
    messages: list[dict[str, str]]
    sampling: Sampling = field(default_factory=Sampling)
    repeat: int = 0
    response_format: dict[str, Any] | None = None
    tools: list[dict[str, Any]] | None = None  # function definitions (flywheel.tools)
    tool_choice: Any = None


@dataclass
class Completion:
    text: str
    prompt_tokens: int = 0
    completion_tokens: int = 0
    finish_reason: str = "stop"
    latency_s: float = 0.0
    cost: float = 0.0
    error: str | None = None
    tool_calls: list[dict[str, Any]] | None = None  # platform shape: [{id, type, function: {name, arguments}}]


class Model(abc.ABC):
    """A chat model. Subclasses load lazily: constructing one reads no weights."""

    ref: str
    # True: a vision-language model (flywheel.models.vision); False: a text model; None: unknown (remote).
    reads_images: bool | None = None

    @property
    @abc.abstractmethod
    def fingerprint(self) -> str:
        """Stable id of what produces the outputs: a weights hash, or a remote model id."""

    @abc.abstractmethod
    def generate(self, requests: list[ChatRequest]) -> list[Completion]:
        """Complete every request; a per-request failure is a Completion with `error` set."""

    def stream(self, requests: list[ChatRequest]) -> Iterator[tuple[int, Completion]]:
        """Complete every request, yielding (request index, completion) as each is done.

        This default yields once `generate` returns; a model whose engine finishes requests one by
        one (the local continuous decoder) yields them as they finish and says so in `streams`.
        """
        yield from enumerate(self.generate(requests))

    @property
    def streams(self) -> bool:
        """True when `stream` yields completions as they finish, before the last one is done."""
        return False

    @property
    def preferred_batch_size(self) -> int:
        return 16

    @property
    def min_chunk_size(self) -> int:
        """Fewest requests worth one `generate` call: the harness, which commits by time, never
        shrinks a chunk below this (a remote model needs enough to fill its concurrent slots)."""
        return self.preferred_batch_size

    def chat(
        self,
        conversations: list[list[dict[str, str]]],
        *,
        temperature: float = 0.0,
        max_tokens: int = 256,
        seed: int | None = None,
        response_format: dict[str, Any] | None = None,
    ) -> list[str]:
        """The judge protocol of `graders`: one reply text per conversation."""
        sampling = Sampling(temperature=temperature, max_tokens=max_tokens, seed=seed or 0)
        completions = self.generate(
            [ChatRequest(messages=c, sampling=sampling, response_format=response_format) for c in conversations]
        )
        for completion in completions:
            if completion.error:
                raise RuntimeError(completion.error)
        return [c.text for c in completions]

    def close(self) -> None:
        """Release weights, connections or worker processes."""
