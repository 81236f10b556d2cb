"""What is checked before training: the environment (`preflight`) and the data (`check_training_set`).

The data checks are the ones the hosted platform runs on an uploaded training file, here run on
every set before local training (`flywheel train`, the wheel's weight stages), printed, and
stored with the set (`training_sets.checks_json`):

* **size** — at least `min_examples` (10, the platform's minimum) or training stops with one line;
  fewer than 50 warns;
* **tokens** — per-example token counts with the base model's tokenizer and chat template, against
  `max_length` (how many examples would be cut) and the model's context (`max_position_embeddings`);
* **duplicates** — identical examples (the second and later copies are counted);
* **grader pass share** — the share of examples whose assistant answer passes every grader of the
  eval: each example's prompt is matched to a train item (rendered with the set's prompt, else the
  eval's), and the answer graded with the eval's graders that need no model (judge graders are
  skipped: not cheap). For sets built from the store, the captures' own pass counts are shown too.

    check = check_training_set(training_set, config, spec=spec, store=store, base="local:smollm2")
    print("\\n".join(check.lines()))
    check.raise_for_errors()
"""

from __future__ import annotations

import json
import math
from collections.abc import Callable
from typing import Any

from pydantic import BaseModel, Field

import graders
from flywheel.data import load_dataset
from flywheel.grading import GraderSet
from flywheel.models import parse_model_ref
from flywheel.models.loading import LocalWeights
from flywheel.prompt import Prompt
from flywheel.tools import render_chat
from flywheel.tracking import require_trackers
from flywheel.train.checkpoints import resolve_base
from flywheel.train.config import RFTSpec, require_quantization, require_vllm
from flywheel.train.formats import TrainingDataError, TrainingSet, chat_messages
from flywheel.train.launch import is_main_process
from flywheel.train.sets import record_training_set

WARN_BELOW = 50
MAX_GRADED = 2000  # examples graded for the pass share (the rest are not: the check must stay cheap)
_JUDGE_TYPES = ('"score_model"', '"label_model"')


def preflight(config) -> None:
    """Before anything is stored or loaded: the trackers' packages (report_to), QLoRA's hardware,
    and for RFT with `use_vllm` the vllm package."""
    require_trackers(config.report_to)
    require_quantization(config.lora)
    if isinstance(config, RFTSpec):
        require_vllm(config)


class DataCheck(BaseModel):
    """The checks of one training set, as stored in `training_sets.checks_json`."""

    kind: str = Field(description="sft, dpo or rft.")
    examples: int = Field(description="Examples (rows) in the set.")
    min_examples: int = Field(description="Fewest examples accepted.")
    duplicates: int = Field(description="Examples identical to an earlier one.")
    duplicate_lines: list[int] = Field(default_factory=list, description="1-based lines of the first duplicates.")
    tokens_min: int | None = Field(default=None, description="Fewest tokens in an example (chat template included).")
    tokens_mean: float | None = Field(default=None, description="Mean tokens per example.")
    tokens_max: int | None = Field(default=None, description="Most tokens in an example.")
    tokens_total: int | None = Field(default=None, description="Tokens over the set (the longer side of DPO pairs).")
    max_length: int = Field(description="The config's max_length: longer examples are cut.")
    context: int | None = Field(default=None, description="The base model's context (max_position_embeddings).")
    truncated: int | None = Field(default=None, description="Examples longer than max_length.")
    over_context: int | None = Field(default=None, description="Examples longer than the model's context.")
    graded: int = Field(default=0, description="Examples whose answer was graded for the pass share.")
    passed: int = Field(default=0, description="Graded examples whose answer passes every (cheap) grader.")
    pass_share: float | None = Field(default=None, description="passed / graded; None when nothing was graded.")
    graders: list[str] = Field(default_factory=list, description="The graders used for the pass share.")
    pass_note: str = Field(default="", description="How the pass share was found, or why there is none.")
    store_pass: str | None = Field(default=None, description="Sets from the store: the captures' own pass counts.")
    warnings: list[str] = Field(default_factory=list, description="Printed, training goes on.")
    errors: list[str] = Field(default_factory=list, description="Training does not start.")

    def lines(self) -> list[str]:
        """What is printed before training."""
        out = [f"data checks ({self.kind}): {self.examples} examples, {self.duplicates} duplicates"]
        if self.tokens_max is not None:
            out.append(f"  tokens per example: min {self.tokens_min}, mean {self.tokens_mean:.0f}, max {self.tokens_max}"
                       f" ({self.tokens_total} in all); {self.truncated} longer than max_length={self.max_length}"
                       + (f", {self.over_context} longer than the model's context {self.context}"
                          if self.context else ""))
        if self.pass_share is not None:
            out.append(f"  graders pass {self.passed}/{self.graded} answers ({self.pass_share:.0%}): {self.pass_note}")
        elif self.pass_note:
            out.append(f"  grader pass share: {self.pass_note}")
        if self.store_pass:
            out.append(f"  {self.store_pass}")
        out += [f"  warning: {w}" for w in self.warnings] + [f"  error: {e}" for e in self.errors]
        return out

    def raise_for_errors(self, where: str = "training set") -> None:
        """TrainingDataError (one line: the first error, and how many more) when a check failed."""
        if self.errors:
            more = f" (and {len(self.errors) - 1} more)" if len(self.errors) > 1 else ""
            raise TrainingDataError(f"{where}: {self.errors[0]}{more}")


# -- the parts -------------------------------------------------------------------------------------
def _conversations(kind: str, row: dict[str, Any]) -> list[list[dict[str, Any]]]:
    """The conversations a row trains on (DPO: prompt + each answer; RFT: the prompt alone)."""
    if kind == "sft":
        return [row["messages"]]
    if kind == "dpo":
        prompt = row["input"]["messages"]
        return [prompt + row["preferred_output"], prompt + row["non_preferred_output"]]
    return [row["messages"]]


def _answer(kind: str, row: dict[str, Any]) -> tuple[list[dict[str, Any]], str | None]:
    """(prompt messages, the answer graded) of a row; RFT rows have no answer."""
    if kind == "sft":
        messages = row["messages"]
        last = max((i for i, m in enumerate(messages) if m["role"] == "assistant"), default=None)
        if last is None:
            return messages, None
        content = messages[last].get("content")
        return messages[:last], content if isinstance(content, str) else None
    if kind == "dpo":
        content = row["preferred_output"][-1].get("content")
        return row["input"]["messages"], content if isinstance(content, str) else None
    return row["messages"], None


def _duplicates(rows: list[dict[str, Any]]) -> list[int]:
    seen: set[str] = set()
    lines = []
    for line, row in enumerate(rows, 1):
        key = json.dumps(row, sort_keys=True, ensure_ascii=False)
        if key in seen:
            lines.append(line)
        seen.add(key)
    return lines


def token_counts(training_set: TrainingSet, tokenizer) -> list[int]:
    """Tokens of each example as the trainer sees it (chat template, tools; DPO: the longer answer)."""
    counts = []
    for row in training_set.rows:
        longest = 0
        for conversation in _conversations(training_set.kind, row):
            text = render_chat(tokenizer, chat_messages(conversation), row.get("tools"),
                               add_generation_prompt=training_set.kind == "rft")
            longest = max(longest, len(tokenizer(text, add_special_tokens=False).input_ids))
        counts.append(longest)
    return counts


def _prompt_key(messages: list[dict[str, Any]]) -> str:
    return json.dumps([(m.get("role"), m.get("content")) for m in messages], ensure_ascii=False)


def grader_pass_share(training_set: TrainingSet, spec, store=None, dataset=None) -> tuple[int, int, list[str], str]:
    """(graded, passed, graders, note): each example's answer graded with the eval's model-free
    graders, against the train item whose rendered prompt is the example's prompt."""
    if training_set.kind == "rft":
        return 0, 0, [], "not applicable: RFT prompts carry no answer"

    cheap = [g for g in spec.graders if not any(t in json.dumps(g) for t in _JUDGE_TYPES)]
    if not cheap:
        return 0, 0, [], "not graded: every grader of the eval needs a judge model (not cheap)"
    prompts = []
    prompt_id = training_set.source.get("prompt_id")
    if store is not None and prompt_id:
        try:
            prompts.append(Prompt.from_json(store.get_prompt(prompt_id)))
        except Exception:  # noqa: BLE001 - a prompt gone from the store: the eval's own is still tried
            pass
    prompts.append(Prompt(messages=spec.messages()))
    items: dict[str, Any] = {}
    for item in (dataset if dataset is not None else load_dataset(spec)).split("train"):
        for prompt in prompts:
            try:
                items.setdefault(_prompt_key(prompt.render(item)), item)
            except Exception:  # noqa: BLE001 - an item the prompt cannot render matches no row
                continue
    matched = []
    for row in training_set.rows:
        messages, answer = _answer(training_set.kind, row)
        item = items.get(_prompt_key(messages))
        if item is not None and answer is not None:
            matched.append((answer, item))
        if len(matched) >= MAX_GRADED:
            break
    if not matched:
        return 0, 0, [], ("not graded: no example's prompt matches a train item rendered with the set's or the "
                          "eval's prompt")

    grader_set = GraderSet(cheap)
    try:
        results = grader_set.grade([graders.make_sample(answer) for answer, _ in matched],
                                   [item.fields for _, item in matched])
    finally:
        grader_set.close()
    passed = sum(1 for grades in results if grades and all(g["passed"] and not g["error"] for g in grades))
    skipped = len(spec.graders) - len(cheap)
    note = (f"{len(matched)} of {len(training_set)} examples matched to train items"
            + (f"; {skipped} judge grader(s) skipped" if skipped else ""))
    return len(matched), passed, grader_set.names, note


def _store_pass(source: dict[str, Any]) -> str | None:
    counts = source.get("counts") or {}
    if "captured_samples" not in counts:
        return None
    passing = counts.get("passing", counts.get("items_with_two_outputs"))
    return (f"from the store: {passing} of {counts['captured_samples']} captured samples "
            + ("passed the set's filter" if "passing" in counts else "are in items with two or more outputs")
            + (f"; {counts['rows_from_reviews']} rows from reviews" if counts.get("rows_from_reviews") else ""))


# -- the whole check -------------------------------------------------------------------------------
def check_training_set(training_set: TrainingSet, config, *, spec=None, store=None, tokenizer=None,
                       context: int | None = None, dataset=None) -> DataCheck:
    """The checks of `training_set` under `config` (min_examples, max_length); token counts with
    `tokenizer` when given, the pass share with `spec`'s graders when given (over `dataset`, the
    eval's loaded dataset, when the caller holds one)."""
    rows = training_set.rows
    duplicate_lines = _duplicates(rows)
    check = DataCheck(kind=training_set.kind, examples=len(rows), min_examples=config.min_examples,
                      duplicates=len(duplicate_lines), duplicate_lines=duplicate_lines[:10],
                      max_length=config.max_length, context=context, store_pass=_store_pass(training_set.source))
    if len(rows) < config.min_examples:
        check.errors.append(f"{len(rows)} examples; at least {config.min_examples} are needed (min_examples; the "
                            "platform's minimum is 10): capture more, or lower min_examples to train anyway")
    elif len(rows) < WARN_BELOW:
        check.warnings.append(f"only {len(rows)} examples: {WARN_BELOW} or more usually train better")
    if duplicate_lines:
        check.warnings.append(f"{len(duplicate_lines)} duplicate examples (first at line {duplicate_lines[0]}): "
                              "they weigh twice")
    if tokenizer is not None and rows:
        counts = token_counts(training_set, tokenizer)
        check.tokens_min, check.tokens_max, check.tokens_total = min(counts), max(counts), sum(counts)
        check.tokens_mean = check.tokens_total / len(counts)
        check.truncated = sum(1 for c in counts if c > config.max_length)
        check.over_context = sum(1 for c in counts if context and c > context)
        if check.truncated:
            check.warnings.append(f"{check.truncated} of {len(rows)} examples are longer than max_length="
                                  f"{config.max_length} and will be cut (longest {check.tokens_max} tokens)")
        if context and config.max_length > context:
            check.warnings.append(f"max_length={config.max_length} is beyond the model's context of {context} tokens")
    if spec is not None and rows:
        check.graded, check.passed, check.graders, check.pass_note = grader_pass_share(training_set, spec, store, dataset)
        check.pass_share = check.passed / check.graded if check.graded else None
        if check.pass_share is not None and check.pass_share < 0.5:
            check.warnings.append(f"only {check.pass_share:.0%} of the graded answers pass the eval's graders: "
                                  "the model will learn to fail")
    return check


def tokenizer_and_context(base_ref: str):
    """The tokenizer of a `local:` base (or checkpoint) and its context length; (None, None) for others."""
    scheme, name, adapter = parse_model_ref(base_ref)
    if scheme != "local":
        return None, None
    from transformers import AutoConfig, AutoTokenizer

    path = LocalWeights.of(base_ref, name, adapter).base_path()
    tokenizer = AutoTokenizer.from_pretrained(path)
    model_config = AutoConfig.from_pretrained(path)
    context = getattr(model_config, "max_position_embeddings", None) or getattr(model_config, "n_positions", None)
    return tokenizer, int(context) if context and math.isfinite(context) else None


def run_data_checks(training_set: TrainingSet, config, *, spec, store, base: str, dataset=None,
                    log: Callable[[str], None] | None = None) -> DataCheck:
    """Check the set before training: print the lines (`log`), store them with the set (main
    process), and raise TrainingDataError when a check fails (every process, so all stop)."""

    preflight(config)
    base_ref, _ = resolve_base(store, base)
    tokenizer, context = tokenizer_and_context(base_ref)
    check = check_training_set(training_set, config, spec=spec, store=store, tokenizer=tokenizer, context=context,
                               dataset=dataset)
    if is_main_process():
        if log is not None:
            for line in check.lines():
                log(line)
        if len(training_set):
            record_training_set(store, training_set)
            store.update_training_set(training_set.id, checks_json=check.model_dump_json())
    check.raise_for_errors(training_set.id or f"{training_set.kind} training set")
    return check
