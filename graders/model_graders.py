"""`score_model` and `label_model`: a judge model grades the sample (reference §2.3, §2.4).

The templated `input` messages are rendered, an instruction naming the expected JSON is added to
the system message (the hosted platform forces the same shape with structured outputs, which we
also request through `response_format`), and all conversations of a batch go to the judge in ONE
`chat` call. A reply that cannot be read is a `model_grader_parse_error` grade carrying the raw
reply; a judge that fails is a `model_grader_server_error` grade. Nothing raises.

* score_model: the reply's `result` is clipped to `range` (default [0, 1]); passes iff
  score >= pass_threshold (the middle of `range` when omitted).
* label_model: the reply must name one of `labels` (exactly, or case-insensitively when that is
  unambiguous); score 1 and pass iff the label is in `passing_labels`.

A judge that can score candidate replies (`score_choices`, e.g. flywheel's local models) is not
asked to write at all: it picks among the allowed replies by its own probabilities
(graders.constrained), so it never fails to answer.
"""

from __future__ import annotations

from typing import Any

from graders import constrained as constrained_judging
from graders.base import Grader
from graders.config import LabelModelGraderConfig, Message, ScoreModelGraderConfig
from graders.errors import TemplateVariableError
from graders.grade import Grade, passes, shorten
from graders.judge import (
    JudgeModel,
    ReplyParseError,
    label_response_format,
    parse_label_reply,
    parse_score_reply,
    score_response_format,
)
from graders.templates import Template


class UnsupportedContent(ValueError):
    """An image or audio part: the judges here take text only."""


class _RenderedMessage:
    __slots__ = ("role", "parts")

    def __init__(self, message: Message):
        # the platform's 'developer' role is a system message to chat templates that lack it
        self.role = "system" if message.role == "developer" else message.role
        content = message.content if isinstance(message.content, list) else [message.content]
        self.parts: list[Template | str] = []
        for part in content:
            if isinstance(part, str):
                self.parts.append(Template(part))
            elif part.type in ("input_text", "output_text"):
                self.parts.append(Template(part.text))
            else:
                self.parts.append(part.type)  # rendered as an error: text-only judges

    def render(self, item: dict[str, Any], sample: dict[str, Any]) -> dict[str, str]:
        texts = []
        for part in self.parts:
            if isinstance(part, str):
                raise UnsupportedContent(f"the judge input has an {part} part; judges here take text only")
            texts.append(part.render(item, sample))
        return {"role": self.role, "content": "\n".join(texts)}


class _JudgeGrader(Grader):
    """Shared machinery: render conversations, one batched chat call, parse each reply."""

    default_max_tokens = 512

    def __init__(self, config: Any, judge: Any):
        super().__init__(config)
        if judge is None:
            raise ValueError(
                f"{config.type} grader {config.name!r} needs a judge model: "
                "build_grader(config, judge=resolver) where resolver maps a model string to a model with chat()"
            )
        self._judge_source = judge
        self._judge: JudgeModel | None = None
        self.messages = [_RenderedMessage(m) for m in config.input]
        params = getattr(config, "sampling_params", None)
        self.temperature = params.temperature if params and params.temperature is not None else 0.0
        self.max_tokens = params.max_completions_tokens if params and params.max_completions_tokens else self.default_max_tokens
        self.seed = params.seed if params else None

    def judge(self) -> JudgeModel:
        """The judge model, resolved from the config's `model` on first use."""
        if self._judge is None:
            source = self._judge_source
            self._judge = source if hasattr(source, "chat") else source(self.config.model)
        return self._judge

    def instruction(self, constrained: bool = False) -> str:
        raise NotImplementedError

    def choices(self) -> list[str]:
        """The replies a constrained judge chooses among."""
        raise NotImplementedError

    def read_choices(self, logprobs: list[float], details: dict[str, Any]) -> Grade:
        """The grade of one constrained judgement (log-probabilities aligned with `choices`)."""
        raise NotImplementedError

    def constrained(self) -> bool:
        """True when the judge scores candidate replies; a judge that fails to resolve is not."""
        try:
            return constrained_judging.can_score_choices(self.judge())
        except Exception:  # noqa: BLE001 - the chat path reports it as a server error
            return False

    def response_format(self) -> dict[str, Any]:
        raise NotImplementedError

    def conversation(self, sample: dict[str, Any], item: dict[str, Any],
                     constrained: bool = False) -> list[dict[str, str]]:
        rendered = [m.render(item, sample) for m in self.messages]
        instruction = self.instruction(constrained)
        if rendered and rendered[0]["role"] == "system":
            rendered[0] = {"role": "system", "content": rendered[0]["content"].rstrip() + "\n\n" + instruction}
        else:
            rendered.insert(0, {"role": "system", "content": instruction})
        return rendered

    def _grade_one(self, sample: dict[str, Any], item: dict[str, Any]) -> Grade:
        return self._grade_prepared([sample], [item])[0]

    def _grade_prepared(self, samples: list[Any], items: list[dict[str, Any]]) -> list[Grade]:
        out: list[Grade | None] = [None] * len(samples)
        pending: list[tuple[int, list[dict[str, str]]]] = []
        constrained = self.constrained()
        for i, (sample, item) in enumerate(zip(samples, items)):
            if isinstance(sample, Exception):
                out[i] = self._failure("sample_parse_error", str(sample))
                continue
            try:
                pending.append((i, self.conversation(sample, item, constrained)))
            except TemplateVariableError as e:
                out[i] = self._failure("invalid_variable_error", str(e))
            except UnsupportedContent as e:
                out[i] = self._failure("other_error", str(e))
        if not pending:
            return out  # type: ignore[return-value]
        if constrained:
            return self._grade_constrained(pending, out)
        conversations = [c for _, c in pending]
        try:
            replies = self.judge().chat(
                conversations, temperature=self.temperature, max_tokens=self.max_tokens,
                seed=self.seed, response_format=self.response_format(),
            )
            if len(replies) != len(conversations):
                raise RuntimeError(f"the judge returned {len(replies)} replies for {len(conversations)} conversations")
        except Exception as e:
            for i, conversation in pending:
                out[i] = self._failure(
                    "model_grader_server_error", f"{type(e).__name__}: {e}", model=self.config.model,
                    messages=conversation,
                )
            return out  # type: ignore[return-value]
        for (i, conversation), reply in zip(pending, replies):
            details = {"name": self.name, "type": self.type, "model": self.config.model,
                       "messages": conversation, "reply": reply}
            if not isinstance(reply, str):
                out[i] = Grade.failure("model_grader_server_error", f"the judge returned {type(reply).__name__}, not text",
                                       details=details)
                continue
            try:
                out[i] = self.read_reply(reply, details)
            except ReplyParseError as e:
                out[i] = Grade.failure(
                    "model_grader_parse_error", reply,
                    feedback=f"could not read the judge's reply: {e}: {shorten(repr(reply), 120)}",
                    details={**details, "parse_error": str(e)},
                )
        return out  # type: ignore[return-value]

    def _grade_constrained(self, pending: list[tuple[int, list[dict[str, str]]]],
                           out: list[Grade | None]) -> list[Grade]:
        choices = self.choices()
        try:
            rows = constrained_judging.ask(self.judge(), [c for _, c in pending], choices)
        except Exception as e:
            for i, conversation in pending:
                out[i] = self._failure("model_grader_server_error", f"{type(e).__name__}: {e}",
                                       model=self.config.model, messages=conversation)
            return out  # type: ignore[return-value]
        for (i, conversation), row in zip(pending, rows):
            out[i] = self.read_choices(row, {"name": self.name, "type": self.type, "model": self.config.model,
                                             "messages": conversation, "choices": choices})
        return out  # type: ignore[return-value]

    def read_reply(self, reply: str, details: dict[str, Any]) -> Grade:
        raise NotImplementedError


class ScoreModelGrader(_JudgeGrader):
    type = "score_model"

    def __init__(self, config: ScoreModelGraderConfig, judge: Any):
        super().__init__(config, judge)
        self.low, self.high = config.score_range
        mid = (self.low + self.high) / 2
        self.threshold = config.pass_threshold if config.pass_threshold is not None else mid

    def instruction(self, constrained: bool = False) -> str:
        if constrained:  # the judge writes no steps: it only chooses the result
            return f'Respond with only a JSON object of this form: {{"result": <a number from {self.low:g} to {self.high:g}>}}'
        return (
            "Respond with only a JSON object of this form: "
            '{"steps": [{"description": "<what you checked>", "conclusion": "<what you found>"}], '
            f'"result": <a number from {self.low:g} to {self.high:g}>}}'
        )

    def response_format(self) -> dict[str, Any]:
        return score_response_format(self.low, self.high)

    def choices(self) -> list[str]:
        return constrained_judging.score_choices_text(constrained_judging.score_values(self.low, self.high))

    def read_choices(self, logprobs: list[float], details: dict[str, Any]) -> Grade:
        return constrained_judging.score_grade(
            constrained_judging.score_values(self.low, self.high), self.low, self.high, self.threshold,
            self.choices(), logprobs, details)

    def read_reply(self, reply: str, details: dict[str, Any]) -> Grade:
        raw, steps = parse_score_reply(reply)
        score = min(self.high, max(self.low, raw))
        ok = passes(score, self.threshold)
        reason = ""
        if steps and isinstance(steps[-1], dict) and steps[-1].get("conclusion"):
            reason = f"; judge: {shorten(str(steps[-1]['conclusion']), 160)}"
        clipped = f" (clipped from {raw:g})" if score != raw else ""
        feedback = (
            f"judge scored {score:g}{clipped} in [{self.low:g}, {self.high:g}] "
            f"(threshold {self.threshold:g}): {'pass' if ok else 'fail'}{reason}"
        )
        details.update(result=raw, steps=steps, range=[self.low, self.high], pass_threshold=self.threshold)
        return Grade(score=score, passed=ok, feedback=feedback, details=details)


class LabelModelGrader(_JudgeGrader):
    type = "label_model"
    default_max_tokens = 64

    def __init__(self, config: LabelModelGraderConfig, judge: Any):
        super().__init__(config, judge)
        self.labels = list(config.labels)
        self.passing = set(config.passing_labels)

    def instruction(self, constrained: bool = False) -> str:
        options = ", ".join(f'"{label}"' for label in self.labels)
        return f'Respond with only a JSON object of this form: {{"result": "<label>"}} where <label> is one of {options}.'

    def response_format(self) -> dict[str, Any]:
        return label_response_format(self.labels)

    def choices(self) -> list[str]:
        return constrained_judging.label_choices(self.labels)

    def read_choices(self, logprobs: list[float], details: dict[str, Any]) -> Grade:
        return constrained_judging.label_grade(self.labels, list(self.config.passing_labels), self.choices(),
                                               logprobs, details)

    def read_reply(self, reply: str, details: dict[str, Any]) -> Grade:
        label = parse_label_reply(reply, self.labels)
        ok = label in self.passing
        passing = ", ".join(map(repr, self.config.passing_labels))
        feedback = f"judge chose {label!r} (passing: {passing}): {'pass' if ok else 'fail'}"
        details.update(label=label, passing_labels=list(self.config.passing_labels))
        return Grade(score=1.0 if ok else 0.0, passed=ok, feedback=feedback, details=details)
