"""Direct preference optimisation: best vs worst graded output of the same prompt.

    result = train_dpo(spec, store, build_dpo_set(spec, store, min_margin=0.5),
                       base="local:smollm2+.flywheel/ckpt/sft-...")

The platform's advice holds here too: SFT first, then DPO from the SFT model. Starting from an
adapter (`local:BASE+ADAPTER` or a checkpoint id) continues that adapter, and TRL keeps a frozen
copy of it as the reference model; starting from a bare base trains a fresh adapter against the
base. `beta` is the pull towards the reference (higher: more conservative).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

from flywheel.prompt import Prompt
from flywheel.spec import EvalSpec
from flywheel.store import Store
from flywheel.train.config import DPOSpec, dpo_args, to_peft
from flywheel.train.formats import TrainingDataError, TrainingSet, to_hf_dataset
from flywheel.train.local import BuiltTrainer, TrainResult, run_local
from flywheel.train.validation import Monitor, training_prompt, validation_set


def build_dpo_trainer(model, tokenizer, training_set: TrainingSet, config: DPOSpec, output_dir, *, bf16: bool,
                      quiet: bool = False, eval_set: TrainingSet | None = None):
    from peft import PeftModel
    from trl import DPOTrainer

    if training_set.kind != "dpo":
        raise TrainingDataError(f"DPO needs a DPO training set (preference pairs), got a {training_set.kind} set")
    trainer = DPOTrainer(
        model=model, args=dpo_args(config, output_dir, bf16=bf16, quiet=quiet, model=model),
        train_dataset=to_hf_dataset(training_set), processing_class=tokenizer,
        eval_dataset=to_hf_dataset(eval_set) if eval_set is not None else None,
        peft_config=None if isinstance(model, PeftModel) else to_peft(config.lora))
    return BuiltTrainer(trainer, {"pairs": len(training_set)})


def train_dpo(spec: EvalSpec, store: Store, training_set: TrainingSet, *, base: str,
              config: DPOSpec | None = None, evaluate: bool = True, splits: Sequence[str] = ("valid", "test"),
              quiet: bool = False, prompt: Prompt | None = None, monitor: Monitor | None = None,
              resume: str | None = None, callbacks: Sequence[Any] = (), fresh: bool = False,
              on_job: Callable[[str], None] | None = None) -> TrainResult | None:
    """Train with DPO on preference pairs from `base`, register the adapter, evaluate it.

    With `eval_steps`, the DPO loss on `validation_file` (pairs) is the validation loss; the rest
    (checkpoints, valid score, early stopping, resume) is flywheel.train.validation's."""
    config = config or DPOSpec()
    if len(training_set) == 0:
        raise TrainingDataError("empty DPO training set: no preference pairs")
    prompt = training_prompt(spec, store, training_set, prompt)
    eval_set = validation_set("dpo", spec, config, prompt)

    def build(model, tokenizer, output_dir, bf16):
        return build_dpo_trainer(model, tokenizer, training_set, config, output_dir, bf16=bf16, quiet=quiet,
                                 eval_set=eval_set)

    return run_local("dpo", spec, store, training_set, base=base, config=config, build=build,
                     evaluate=evaluate, splits=splits, quiet=quiet, prompt=prompt, monitor=monitor, resume=resume,
                     callbacks=callbacks, fresh=fresh, on_job=on_job)
