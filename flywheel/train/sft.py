"""Supervised fine-tuning: a LoRA adapter trained on passing outputs, loss on assistant tokens only.

    result = train_sft(spec, store, build_sft_set(spec, store), base="local:smollm2")

Rows are tokenised here (`datasets.tokenize_sft`), so the loss mask does not depend on the chat
template carrying `{% generation %}` markers (SmolLM2's does not); TRL's `SFTTrainer` then
truncates, optionally packs, collates and trains. Sequences in a batch are grouped by length so
little compute goes to padding; bf16 is used where the hardware has it.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

from flywheel.prompt import Prompt
from flywheel.spec import EvalSpec
from flywheel.store import Store
from flywheel.train.config import SFTSpec, sft_args, to_peft
from flywheel.train.formats import TrainingDataError, TrainingSet, set_has_images, tokenize_sft
from flywheel.train.local import BuiltTrainer, TrainResult, run_local
from flywheel.train.validation import Monitor, training_prompt, validation_set


def build_sft_trainer(model, tokenizer, training_set: TrainingSet, config: SFTSpec, output_dir, *, bf16: bool,
                      quiet: bool = False, compact_loss: bool = True, eval_set: TrainingSet | None = None):
    """TRL's SFTTrainer for an SFT set, with its token statistics; `eval_set` (SFT rows) is the
    validation set its `eval_loss` is computed on every `eval_steps`.

    `compact_loss` (the default) uses flywheel.train.sft_loss's trainer: on CPU it projects only
    labelled positions through the LM head and trains with eager attention, the same loss curve at
    about half the CPU time; False keeps TRL's own SFTTrainer, which scores every position there.
    """
    from datasets import Dataset
    from peft import PeftModel
    from trl import SFTTrainer

    from flywheel.train.sft_loss import CompactLossSFTTrainer

    if training_set.kind != "sft":
        raise TrainingDataError(f"SFT needs an SFT training set, got a {training_set.kind} set")
    from transformers import ProcessorMixin

    if isinstance(tokenizer, ProcessorMixin):  # a vision-language model (flywheel.train.vision)
        from flywheel.train.vision import build_vision_sft_trainer

        return build_vision_sft_trainer(model, tokenizer, training_set, config, output_dir, bf16=bf16, quiet=quiet)
    if set_has_images(training_set):
        raise TrainingDataError("the training set has images, but the base is a text model (it would train on "
                                "the text alone): train a vision-language model (docs/vision.md)")
    rows, stats = tokenize_sft(training_set, tokenizer, loss=config.loss)
    eval_rows = tokenize_sft(eval_set, tokenizer, loss=config.loss)[0] if eval_set is not None else None
    if eval_set is not None:
        stats["valid_rows"] = len(eval_rows)
    trainer = (CompactLossSFTTrainer if compact_loss else SFTTrainer)(
        model=model, args=sft_args(config, output_dir, bf16=bf16, quiet=quiet, model=model),
        train_dataset=Dataset.from_list(rows), processing_class=tokenizer,
        eval_dataset=Dataset.from_list(eval_rows) if eval_rows is not None else None,
        peft_config=None if isinstance(model, PeftModel) else to_peft(config.lora))
    return BuiltTrainer(trainer, stats)


def train_sft(spec: EvalSpec, store: Store, training_set: TrainingSet, *, base: str,
              config: SFTSpec | None = None, evaluate: bool = True, splits: Sequence[str] = ("valid", "test"),
              quiet: bool = False, prompt: Prompt | None = None, monitor: Monitor | None = None,
              resume: str | None = None, callbacks: Sequence[Any] = (), fresh: bool = False,
              on_job: Callable[[str], None] | None = None) -> TrainResult | None:
    """Train an SFT adapter on `training_set` from `base` (a `local:` reference, a checkpoint id, or
    `local:BASE+ADAPTER` to continue an adapter), register it, and evaluate it on `splits`.

    With `eval_steps` the validation loss is measured on `validation_file` or the eval's valid split
    (rendered with `prompt`, the training prompt); see flywheel.train.validation for checkpoints,
    the valid score, early stopping, `monitor` and `resume`."""
    config = config or SFTSpec()
    if len(training_set) == 0:
        raise TrainingDataError("empty SFT training set: nothing to train on")
    from flywheel.train.vision import screen_images

    if set_has_images(training_set):  # the platform's image rules: what would be skipped is not trained on
        training_set, _ = screen_images(training_set)
    prompt = training_prompt(spec, store, training_set, prompt)
    eval_set = validation_set("sft", spec, config, prompt)

    def build(model, tokenizer, output_dir, bf16):
        return build_sft_trainer(model, tokenizer, training_set, config, output_dir, bf16=bf16, quiet=quiet,
                                 eval_set=eval_set)

    return run_local("sft", spec, store, training_set, base=base, config=config, build=build,
                     evaluate=evaluate, splits=splits, quiet=quiet, prompt=prompt, monitor=monitor, resume=resume,
                     callbacks=callbacks, fresh=fresh, on_job=on_job)
