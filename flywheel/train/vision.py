"""Vision fine-tuning: training sets with images, screened by the platform's rules, and LoRA SFT of
a local vision-language model with TRL.

A vision SFT row is the platform's chat JSONL with image parts in user messages (reference §5.4):

    {"messages": [{"role": "user", "content": [
        {"type": "image_url", "image_url": {"url": "data:image/png;base64,...", "detail": "low"}},
        {"type": "text", "text": "Which colour is this?"}]},
      {"role": "assistant", "content": "red"}]}

Sets built from the store already have this shape (prompts render images as data URLs), so
`TrainingSet.to_jsonl` exports and `load_training_file` imports them. `screen_images` applies the
platform's skip rules before training or upload and reports what it skipped and why: more than 10
images, an image over 10 MB, a format other than JPEG/PNG/WEBP, a corrupt or unreadable image.
The platform also skips examples showing people, faces, children or CAPTCHAs; telling those apart
needs a vision model of its own, which cannot be run honestly here, so those rules are NOT applied
and the report says so.

    kept, report = screen_images(load_training_file("sft", "vision.jsonl"))
    report.summary()   # "kept 48 of 50 examples; skipped 1 unsupported_format, 1 too_many_images; ..."

Local training: `load_for_training` loads a vision model folder through the one loader
(flywheel.models.loading: AutoModelForImageTextToText + AutoProcessor, any adapter checked against
the base), and `build_sft_trainer` hands a processor to
`build_vision_sft_trainer`: TRL's SFTTrainer with a collator that runs the processor on each batch
and learns only the assistant turns (spans found by rendering each prefix of the conversation, as
for text rows), never the image tokens.
"""

from __future__ import annotations

import json
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from flywheel.errors import TrainingError
from flywheel.images import (ImageAccess, ImageError, check_image_count, image_detail, image_part, iter_image_urls,
                             load_image, map_image_parts)
from flywheel.models.vision import processor_messages
from flywheel.train.config import sft_args, to_peft
from flywheel.train.formats import TrainingDataError, TrainingSet, common_prefix, row_messages
from flywheel.train.local import BuiltTrainer

NOT_CHECKED = ("the platform also skips examples with people, faces, children or CAPTCHAs; flywheel does not "
               "detect those (it would need a vision model of its own), so such examples are kept: check them "
               "yourself before a hosted upload")


@dataclass
class ScreenReport:
    """What `screen_images` kept and skipped (by reason, with the first few lines named)."""

    rows: int
    kept: int
    images: int
    skipped: dict[str, int] = field(default_factory=dict)
    examples: list[str] = field(default_factory=list)
    not_checked: str = NOT_CHECKED

    def summary(self) -> str:
        skipped = ", ".join(f"{n} {reason}" for reason, n in sorted(self.skipped.items())) or "none"
        return (f"kept {self.kept} of {self.rows} examples ({self.images} images); skipped: {skipped}"
                + (f" (e.g. {'; '.join(self.examples[:3])})" if self.examples else ""))

    def to_dict(self) -> dict[str, Any]:
        return {"rows": self.rows, "kept": self.kept, "images": self.images, "skipped": dict(self.skipped),
                "examples": list(self.examples), "not_checked": self.not_checked}


def screen_images(training_set: TrainingSet, root: Path | None = None) -> tuple[TrainingSet, ScreenReport]:
    """Drop the examples the platform would skip for their images and report why. Images given by
    path or URL are inlined as data URLs in the kept rows, so the set is self-contained. A set
    without images comes back unchanged. Raises TrainingDataError when nothing is left."""
    if root is None and training_set.source.get("file"):
        root = Path(training_set.source["file"]).parent
    kept: list[dict[str, Any]] = []
    reasons: Counter[str] = Counter()
    examples: list[str] = []
    total_images = 0
    for line, row in enumerate(training_set.rows, start=1):
        try:
            new_row, count = _inline_row(training_set.kind, row, root)
        except ImageError as exc:
            reasons[exc.reason] += 1
            if len(examples) < 5:
                examples.append(f"row {line}: {exc}")
            continue
        total_images += count
        kept.append(new_row)
    report = ScreenReport(rows=len(training_set.rows), kept=len(kept), images=total_images, skipped=dict(reasons),
                          examples=examples)
    if not kept:
        raise TrainingDataError(f"every example was skipped by the image rules: {report.summary()}")
    if not reasons and kept == training_set.rows:
        return training_set, report
    source = {**training_set.source, "image_screening": report.to_dict()}
    return TrainingSet(training_set.kind, kept, source), report


def _inline_row(kind: str, row: dict[str, Any], root: Path | None) -> tuple[dict[str, Any], int]:
    access = ImageAccess(root=root)  # files beside the training file; no URL is fetched
    messages = row_messages(kind, row)
    check_image_count(messages)
    count = sum(1 for _ in iter_image_urls(messages))
    if count == 0:
        return row, 0

    def inline(messages: list[dict[str, Any]]) -> list[dict[str, Any]]:
        return map_image_parts(messages, lambda part, url: image_part(load_image(url, access), image_detail(part)))

    if kind == "dpo":
        new = {**row, "input": {**row["input"], "messages": inline(row["input"]["messages"])},
               "preferred_output": inline(row["preferred_output"]),
               "non_preferred_output": inline(row["non_preferred_output"])}
    else:
        new = {**row, "messages": inline(row["messages"])}
    return new, count


# -- local training ------------------------------------------------------------------------------
class VisionSFTCollator:
    """Batches of vision SFT rows (`{"messages": <JSON text>}`) as model inputs with labels.

    The processor makes input ids, attention mask and pixel values for the whole batch (right
    padded); labels keep only assistant turns (loss "assistant") or every non-image token ("all")."""

    def __init__(self, processor, loss: str = "assistant", image_token_id: int | None = None):
        if loss not in ("assistant", "all"):
            raise TrainingDataError(f"loss must be 'assistant' or 'all', got {loss!r}")
        self.processor = processor
        self.loss = loss
        self.image_token_id = image_token_id

    def _encode(self, messages: list[dict[str, Any]], images: list[Any], generation_prompt: bool) -> list[int]:
        text = self.processor.apply_chat_template(messages, tokenize=False, add_generation_prompt=generation_prompt)
        kwargs: dict[str, Any] = {"text": [text], "return_tensors": None}
        if images:
            kwargs["images"] = [images]
        return list(self.processor(**kwargs)["input_ids"][0])

    def row(self, raw: list[dict[str, Any]]) -> tuple[str, list[Any], list[tuple[int, int]]]:
        """(full text, images, assistant token spans) of one conversation."""
        messages, images = processor_messages(raw)
        text = self.processor.apply_chat_template(messages, tokenize=False)
        spans: list[tuple[int, int]] = []
        if self.loss == "assistant":
            full = self._encode(messages, images, False)
            for index, message in enumerate(raw):
                if message["role"] != "assistant" or not message.get("weight", 1):
                    continue
                seen = sum(1 for m in messages[:index] for p in m["content"] if p["type"] == "image")
                start = common_prefix(self._encode(messages[:index], images[:seen], True), full)
                end = common_prefix(self._encode(messages[:index + 1], images[:seen], False), full)
                spans.append((start, end))
        return text, images, spans

    def __call__(self, features: list[dict[str, Any]]) -> dict[str, Any]:
        import torch

        rows = [self.row(json.loads(f["messages"])) for f in features]
        tokenizer = self.processor.tokenizer
        side, tokenizer.padding_side = tokenizer.padding_side, "right"
        try:
            kwargs: dict[str, Any] = {"text": [r[0] for r in rows], "padding": True, "return_tensors": "pt"}
            if any(r[1] for r in rows):
                kwargs["images"] = [r[1] for r in rows]
            batch = dict(self.processor(**kwargs))
        finally:
            tokenizer.padding_side = side
        ids, mask = batch["input_ids"], batch["attention_mask"]
        if self.loss == "all":
            labels = ids.clone()
            labels[mask == 0] = -100
        else:
            labels = torch.full_like(ids, -100)
            for index, (_, _, spans) in enumerate(rows):
                for start, end in spans:
                    labels[index, start:end] = ids[index, start:end]
        if self.image_token_id is not None:
            labels[ids == self.image_token_id] = -100
        batch["labels"] = labels
        return batch


def image_token_id(model, processor) -> int | None:
    """The id of the image placeholder token, from the processor or the model config."""
    for source in (processor, model.config):
        for name in ("image_token_id", "image_token_index"):
            value = getattr(source, name, None)
            if isinstance(value, int):
                return value
    return None


def build_vision_sft_trainer(model, processor, training_set: TrainingSet, config, output_dir, *, bf16: bool,
                             quiet: bool = False):
    """TRL's SFTTrainer for a vision SFT set on a vision-language model (LoRA), with the screening
    report and token statistics as the job's stats."""
    from datasets import Dataset
    from peft import PeftModel
    from trl import SFTTrainer

    if training_set.kind != "sft":
        raise TrainingDataError(f"vision SFT needs an SFT training set, got a {training_set.kind} set")
    if config.packing:
        raise TrainingError("packing is not supported for vision rows (image tokens cannot be split across "
                            "packed sequences); leave packing off")
    kept, report = screen_images(training_set)
    args = sft_args(config, output_dir, bf16=bf16, quiet=quiet, model=model)
    # Rows are processed per batch by our collator (pixels and loss mask), so TRL neither tokenises
    # nor drops the `messages` column, and batches cannot be grouped by a length it never sees.
    args.dataset_kwargs = {"skip_prepare_dataset": True}
    args.remove_unused_columns = False
    args.train_sampling_strategy = "random"
    args.max_length = None  # cutting a row could cut image tokens away from their features
    collator = VisionSFTCollator(processor, loss=config.loss, image_token_id=image_token_id(model, processor))
    dataset = Dataset.from_list([{"messages": json.dumps(row["messages"], ensure_ascii=False)} for row in kept.rows])
    trainer = SFTTrainer(model=model, args=args, train_dataset=dataset, processing_class=processor,
                         data_collator=collator,
                         peft_config=None if isinstance(model, PeftModel) else to_peft(config.lora))
    # train_sft screened the set already: its report (in the set's source) has what was skipped.
    screening = training_set.source.get("image_screening") or report.to_dict()
    return BuiltTrainer(trainer, {"vision": True, "images": report.images, "image_screening": screening})
