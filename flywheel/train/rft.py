"""Reward-based fine-tuning (RFT) with GRPO: the eval's graders are the rewards.

    result = train_rft(spec, store, build_rft_set(spec), base="local:smollm2+.flywheel/ckpt/sft-...")

Each step samples `num_generations` completions for each of `batch_size` prompts, scores them with
`graders.reward_function` of the spec's graders (the same code that grades evals; a grade that
errors rewards 0), and moves the policy towards the completions that beat their group's mean. A
group whose completions all score the same teaches nothing, so GRPO belongs after SFT: from a
model that never passes, every reward is 0. With `beta` 0 (the default) no reference model is run.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

import graders
from flywheel.grading import GraderSet
from flywheel.prompt import Prompt
from flywheel.spec import EvalSpec
from flywheel.store import Store
from flywheel.train.config import RFTSpec, grpo_args, require_vllm, to_peft
from flywheel.train.formats import TrainingDataError, TrainingSet, to_hf_dataset
from flywheel.train.local import BuiltTrainer, TrainResult, run_local
from flywheel.train.validation import Monitor, validation_set


def reward_functions(spec: EvalSpec, names: Sequence[str] | None = None, grader_set: GraderSet | None = None):
    """TRL reward functions for the spec's graders (all, or those named), and what to call to close
    them: the GraderSet built here, or nothing for `grader_set` (the caller's open one, e.g. the wheel's)."""
    owned = grader_set is None
    grader_set = GraderSet(spec.graders) if grader_set is None else grader_set
    close = grader_set.close if owned else (lambda: None)
    chosen = list(names or grader_set.names)
    unknown = [n for n in chosen if n not in grader_set.names]
    if unknown:
        close()
        raise TrainingDataError(f"rft graders: no grader named {unknown[0]!r}; graders: {', '.join(grader_set.names)}")
    return [graders.reward_function(grader_set.runners[grader_set.names.index(n)]) for n in chosen], close


def build_rft_trainer(model, tokenizer, training_set: TrainingSet, config: RFTSpec, output_dir, *, bf16: bool,
                       spec: EvalSpec, quiet: bool = False, grader_set: GraderSet | None = None):
    from peft import PeftModel
    from trl import GRPOTrainer

    if training_set.kind != "rft":
        raise TrainingDataError(f"GRPO needs an RFT training set (prompts), got a {training_set.kind} set")
    rewards, close = reward_functions(spec, config.graders, grader_set)
    if config.reward_weights is not None and len(config.reward_weights) != len(rewards):
        close()
        raise TrainingDataError(f"rft reward_weights: {len(config.reward_weights)} weights for {len(rewards)} graders")
    tokenizer.padding_side = "left"
    trainer = GRPOTrainer(
        model=model, reward_funcs=rewards, train_dataset=to_hf_dataset(training_set), processing_class=tokenizer,
        args=grpo_args(config, output_dir, bf16=bf16, quiet=quiet, model=model,
                       max_completion_length=config.max_completion_length or spec.sampling.max_tokens),
        peft_config=None if isinstance(model, PeftModel) else to_peft(config.lora))
    return BuiltTrainer(trainer, {"prompts": len(training_set), "rewards": [r.__name__ for r in rewards]},
                        close=close)  # the reward graders' sandboxes and judges


def train_rft(spec: EvalSpec, store: Store, training_set: TrainingSet, *, base: str,
               config: RFTSpec | None = None, evaluate: bool = True, splits: Sequence[str] = ("valid", "test"),
               quiet: bool = False, prompt: Prompt | None = None, monitor: Monitor | None = None,
               resume: str | None = None, callbacks: Sequence[Any] = (), fresh: bool = False,
               on_job: Callable[[str], None] | None = None, grader_set=None) -> TrainResult | None:
    """RFT: train with GRPO (rewards: the spec's graders) from `base`, register the adapter, evaluate it.

    GRPO has no validation loss; `valid_subset` scores each saved checkpoint with the graders
    (flywheel.train.validation)."""
    config = config or RFTSpec()
    require_vllm(config)
    validation_set("rft", spec, config, Prompt(messages=spec.messages()))  # refuses eval_steps
    if len(training_set) == 0:
        raise TrainingDataError("empty RFT training set: no prompts")

    def build(model, tokenizer, output_dir, bf16):
        return build_rft_trainer(model, tokenizer, training_set, config, output_dir, bf16=bf16, spec=spec,
                                  quiet=quiet, grader_set=grader_set)

    return run_local("rft", spec, store, training_set, base=base, config=config, build=build,
                     evaluate=evaluate, splits=splits, quiet=quiet, prompt=prompt, monitor=monitor, resume=resume,
                     callbacks=callbacks, fresh=fresh, on_job=on_job)
