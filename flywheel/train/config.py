"""Training configs: our pydantic models, and the TRL/PEFT configs built from them.

Users write (or override with `-s key=value`) the small models below; `to_peft`, `sft_args`,
`dpo_args` and `grpo_args` turn them into `peft.LoraConfig` and TRL's `SFTConfig` / `DPOConfig` /
`GRPOConfig`. Nothing outside `flywheel/train/` sees a TRL or PEFT object.

    config = load_train_config("sft", "train.yaml", overrides=["epochs=3", "lora.r=8"])  # flywheel.train.methods

Defaults are the settings measured on the BANKING77 demo (docs/training.md): LoRA r=16 on every
linear layer, loss on assistant tokens only, bf16 where the hardware has it, no gradient
checkpointing unless a step's activations would not fit (a 135M model fits easily; recomputation
costs ~25% per step), Liger kernels on a GPU where they are installed.
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

from flywheel.errors import TrainingError
from flywheel.models.loading import cpu_supports_bf16
from flywheel.spec import SEED_MAX


class _Config(BaseModel):
    model_config = ConfigDict(extra="forbid")


class LoraSpec(_Config):
    r: int = Field(default=16, ge=1, le=1024, description="LoRA rank.")
    alpha: int = Field(default=32, ge=1, description="LoRA scaling numerator (lora_alpha).")
    dropout: float = Field(default=0.0, ge=0.0, lt=1.0, description="Dropout on the LoRA path.")
    target_modules: str | list[str] = Field(
        default="all-linear", description="Modules that get adapters: 'all-linear' or a list of names.")
    # -- LoRA variants and QLoRA (issue 15 part 5; flywheel.train.config.require_quantization) --
    use_dora: bool = Field(default=False, description="DoRA: split each adapted weight into magnitude and "
                           "direction and train both (PEFT's use_dora); slower per step, often better at low rank.")
    use_rslora: bool = Field(default=False, description="rsLoRA: scale the adapter by alpha/sqrt(r) instead of "
                             "alpha/r (PEFT's use_rslora), which keeps high ranks stable.")
    quantize_base: Literal["4bit"] | None = Field(
        default=None, description="QLoRA: load the frozen base in 4-bit NF4 with bitsandbytes (CUDA only); "
        "unset: the base in bf16/fp32.")


class EarlyStoppingSpec(_Config):
    """Stop when the validation metric has not improved for `patience` measurements."""

    metric: Literal["valid_loss", "valid_score"] = Field(
        default="valid_loss", description="valid_loss (needs eval_steps): lower is better; valid_score (needs "
        "save_steps and valid_subset): the eval's objective on the valid subset, higher is better.")
    patience: int = Field(default=2, ge=1, description="Measurements without improvement before stopping.")
    min_delta: float = Field(default=0.0, ge=0, description="Least change that counts as an improvement.")


class TrainConfig(_Config):
    """Settings every local method shares."""

    lora: LoraSpec = Field(default_factory=LoraSpec, description="The LoRA adapter.")
    learning_rate: float = Field(default=5e-4, gt=0, description="Peak AdamW learning rate.")
    epochs: float = Field(default=2.0, gt=0, description="Passes over the training set (unless max_steps).")
    max_steps: int | None = Field(default=None, ge=1, description="Stop after this many optimiser steps.")
    batch_size: int = Field(default=8, ge=1, description="Examples (or packed sequences) per device per step.")
    grad_accum: int = Field(default=1, ge=1, description="Gradient accumulation steps.")
    max_length: int = Field(default=256, ge=8, description="Longest tokenised example; longer ones are cut.")
    precision: Literal["auto", "bf16", "fp32"] = Field(
        default="auto", description="auto: bf16 where the GPU or CPU supports it (AVX512-BF16/AMX), else fp32.")
    warmup_ratio: float = Field(default=0.0, ge=0, le=1, description="Share of steps spent warming up.")
    lr_scheduler: Literal["linear", "cosine", "constant"] = Field(default="linear", description="LR schedule.")
    weight_decay: float = Field(default=0.0, ge=0, description="AdamW weight decay.")
    gradient_checkpointing: bool | Literal["auto"] = Field(
        default="auto", description="Recompute activations in the backward pass to save memory: true, false, or "
        "auto: on when a step's estimated activation memory exceeds 40% of the device's memory (the GPU's, else "
        "the machine's RAM; flywheel.train.config.checkpointing_needed).")
    liger: bool | Literal["auto"] = Field(
        default="auto", description="Liger's fused Triton kernels (RMSNorm, RoPE, SwiGLU, fused linear "
        "cross-entropy) on a CUDA GPU: auto: when the liger-kernel package is installed (pip install "
        "'flywheel[liger]') and a GPU is here; true: required (an error otherwise); false: never.")
    logging_steps: int = Field(default=5, ge=1, description="Steps between logged metrics.")
    seed: int = Field(default=0, ge=0, le=SEED_MAX, description="Seed for data order and adapter init.")
    # -- validation, checkpoints, early stopping (flywheel.train.validation; docs/training.md) --------
    eval_steps: int | None = Field(
        default=None, ge=1, description="Validation loss every N steps on the validation set (off when unset).")
    validation_file: str | None = Field(
        default=None, description="Validation rows: a JSONL in this method's training format (as the platform's "
        "validation_file). Default for SFT: the eval's valid split rendered with the training prompt, answered "
        "by validation_reference.")
    validation_reference: str | None = Field(
        default=None, description="SFT: the assistant answer of a valid-split item, a template such as "
        "'{{item.label}}'; default: the objective grader's reference when it reads item fields only, the captured "
        "reply for items from captures, or the one item field a python objective grader reads that the prompt "
        "does not show.")
    valid_subset: int = Field(
        default=0, ge=0, description="At each saved checkpoint, generate (greedy, the training prompt) on the first "
        "N valid items and grade them with the eval's graders (0: off).")
    save_steps: int | None = Field(
        default=None, ge=1, description="Save (and register) a checkpoint every N steps; training can resume from "
        "the last one. Unset: one adapter at the end.")
    keep: str = Field(
        default="best", description="Checkpoint folders kept after training: "
        "best, all, or N (the N best); pruned ones keep their store rows.")
    early_stopping: EarlyStoppingSpec | None = Field(
        default=None, description="Stop when validation stops improving (metric, patience, min_delta).")

    @field_validator("keep", mode="before")
    @classmethod
    def _keep_number(cls, value: Any) -> Any:
        text = str(value) if isinstance(value, int) and not isinstance(value, bool) else value
        if not isinstance(text, str) or not (text in ("best", "all") or (text.isdigit() and int(text) >= 1)):
            raise ValueError(f"keep must be best, all or a number N >= 1 (the N best checkpoints), not {value!r}")
        return text
    # -- tracking and data checks (issue 15 parts 4 and 7: flywheel.tracking, flywheel.train.datachecks) --
    report_to: list[Literal["tensorboard", "mlflow", "wandb"]] = Field(
        default_factory=list, description="Experiment trackers the trainer logs to (each an optional extra: "
        "pip install 'flywheel[tensorboard]' / '[mlflow]' / '[wandb]'); W&B runs offline unless WANDB_API_KEY is set.")
    tracking_dir: str | None = Field(
        default=None, description="Folder of TensorBoard event files and offline W&B runs (one subfolder per "
        "training job); default .flywheel/tracking/ beside the store.")
    mlflow_tracking_uri: str | None = Field(
        default=None, description="MLflow tracking URI; default a local file store, mlruns/ beside the store.")
    mlflow_experiment: str | None = Field(
        default=None, description="MLflow experiment (and W&B project) name; default flywheel-<eval name>.")
    min_examples: int = Field(
        default_factory=lambda: _env_int("FLYWHEEL_MIN_EXAMPLES", 10), ge=1,
        description="Fewest training examples accepted (the platform's minimum is 10; fewer than 50 warns); "
        "default 10, or the FLYWHEEL_MIN_EXAMPLES environment variable.")

    @field_validator("report_to", mode="before")
    @classmethod
    def _one_or_comma_separated(cls, value: Any) -> Any:
        # `-s report_to=tensorboard` or `-s report_to=tensorboard,mlflow` as well as a YAML list
        if isinstance(value, str):
            return [part.strip() for part in value.split(",") if part.strip() and part.strip() != "none"]
        return value

    @field_validator("early_stopping", mode="before")
    @classmethod
    def _early_stopping_shorthand(cls, value: Any) -> Any:
        # `-s early_stopping=valid_score` reads as `-s early_stopping.metric=valid_score`.
        return {"metric": value} if isinstance(value, str) else value

    @model_validator(mode="after")
    def _validation_fits_together(self) -> "TrainConfig":
        """Fill the one obvious step setting validation asks for, and refuse what cannot work, when the
        config loads (not minutes later when training starts): the checkpoints that `valid_subset` and
        early stopping on `valid_score` score are saved every `save_steps` (default: `eval_steps`);
        early stopping on `valid_loss` measures every `eval_steps` (default: `save_steps`). Unless set,
        `logging_steps` divides both, so each checkpoint's train loss is the one logged at its step."""
        wants_checkpoints = self.valid_subset > 0 or (
            self.early_stopping is not None and self.early_stopping.metric == "valid_score")
        if wants_checkpoints and self.save_steps is None:
            if self.eval_steps is None:
                what = "valid_subset" if self.valid_subset else "early_stopping on valid_score"
                raise ValueError(f"{what} scores the checkpoints saved every save_steps: set save_steps (or "
                                 "eval_steps, which it then defaults to), e.g. save_steps=10")
            self.save_steps = self.eval_steps
        if self.early_stopping is not None and self.early_stopping.metric == "valid_score" and not self.valid_subset:
            raise ValueError("early_stopping on valid_score needs valid_subset (the number of valid items "
                             "scored at each checkpoint), e.g. valid_subset=16")
        if self.early_stopping is not None and self.early_stopping.metric == "valid_loss" and self.eval_steps is None:
            if self.save_steps is None:
                raise ValueError("early_stopping on valid_loss needs eval_steps (validation loss every N steps), "
                                 "e.g. eval_steps=10")
            self.eval_steps = self.save_steps
        steps = math.gcd(self.eval_steps or 0, self.save_steps or 0)
        if steps and "logging_steps" not in self.model_fields_set and steps % self.logging_steps:
            # The train loss shown beside each checkpoint is the last one logged: log on its steps.
            self.logging_steps = max(d for d in range(1, self.logging_steps + 1) if steps % d == 0)
        return self


class SFTSpec(TrainConfig):
    """Supervised fine-tuning on passing outputs."""

    loss: Literal["assistant", "all"] = Field(
        default="assistant", description="assistant: loss on assistant tokens only; all: on every token.")
    packing: bool = Field(
        default=False, description="Pack short examples into max_length blocks (padding-free).")
    group_by_length: bool = Field(
        default=True, description="Batch examples of similar length together, so batches carry little padding.")


class DPOSpec(TrainConfig):
    """Direct preference optimisation on best-vs-worst pairs."""

    learning_rate: float = Field(default=5e-5, gt=0, description="Peak AdamW learning rate.")
    epochs: float = Field(default=1.0, gt=0, description="Passes over the pairs (unless max_steps).")
    beta: float = Field(default=0.1, gt=0, le=2, description="Strength of the pull towards the reference model.")
    loss_type: str = Field(default="sigmoid", description="TRL DPO loss (sigmoid, ipo, hinge, ...).")


class RFTSpec(TrainConfig):
    """Reward-based fine-tuning with GRPO; rewards are the eval's graders."""

    learning_rate: float = Field(default=2e-5, gt=0, description="Peak AdamW learning rate.")
    epochs: float = Field(default=1.0, gt=0, description="Passes over the prompts (unless max_steps).")
    batch_size: int = Field(default=2, ge=1, description="Prompts per step (each sampled num_generations times).")
    num_generations: int = Field(default=4, ge=2, description="Completions sampled per prompt (the group).")
    max_completion_length: int | None = Field(
        default=None, ge=1, description="Most new tokens per completion; the eval's sampling.max_tokens when unset.")
    temperature: float = Field(default=1.0, gt=0, le=2, description="Sampling temperature of the group.")
    beta: float = Field(default=0.0, ge=0, description="KL penalty to the reference model (0: none, no ref pass).")
    graders: list[str] | None = Field(
        default=None, description="Grader names used as rewards (summed by TRL); all of the eval's when unset.")
    reward_weights: list[float] | None = Field(default=None, description="One weight per reward grader.")
    # Generation on vLLM (TRL's own options; docs/scale.md has the `trl vllm-serve` command pair).
    use_vllm: bool = Field(default=False, description="Generate the groups with vLLM instead of transformers "
                           "(needs the vllm package and a GPU).")
    vllm_mode: Literal["server", "colocate"] = Field(
        default="colocate", description="colocate: vLLM inside each training process; server: a separate "
        "`trl vllm-serve` process (vllm_server_base_url).")
    vllm_server_base_url: str | None = Field(
        default=None, description="server mode: URL of `trl vllm-serve` (default http://0.0.0.0:8000).")
    vllm_gpu_memory_utilization: float = Field(
        default=0.3, gt=0, le=1, description="colocate mode: share of GPU memory vLLM may take.")
    vllm_tensor_parallel_size: int = Field(
        default=1, ge=1, description="colocate mode: GPUs each vLLM engine spans.")


# -- building TRL / PEFT configs (only here) -------------------------------------------------------
def resolve_bf16(precision: str) -> bool:
    """Whether to train in bf16: asked for, or `auto` on hardware with native bf16."""
    if precision == "fp32":
        return False
    if precision == "bf16":
        return True
    import torch

    if torch.cuda.is_available():
        return torch.cuda.is_bf16_supported()
    return cpu_supports_bf16()


def to_peft(lora: LoraSpec):
    from peft import LoraConfig

    return LoraConfig(r=lora.r, lora_alpha=lora.alpha, lora_dropout=lora.dropout,
                      target_modules=lora.target_modules, task_type="CAUSAL_LM",
                      use_dora=lora.use_dora, use_rslora=lora.use_rslora)


def _env_int(name: str, default: int) -> int:
    import os

    value = os.environ.get(name, "").strip()
    return int(value) if value.isdigit() else default


def require_quantization(lora: LoraSpec) -> None:
    """With `lora.quantize_base`, bitsandbytes and a CUDA GPU must be here: say so before anything loads."""
    if lora.quantize_base is None:
        return
    import importlib.util

    if not _has_cuda():
        raise TrainingError(f"lora.quantize_base={lora.quantize_base}: QLoRA needs a CUDA GPU (bitsandbytes 4-bit "
                            "kernels); none here: unset lora.quantize_base to train the base in bf16/fp32")
    if importlib.util.find_spec("bitsandbytes") is None:
        raise TrainingError(f"lora.quantize_base={lora.quantize_base}: the bitsandbytes package is not installed: "
                            "pip install bitsandbytes, or unset lora.quantize_base")


def quantization_config(lora: LoraSpec, bf16: bool):
    """transformers' BitsAndBytesConfig for a QLoRA base (4-bit NF4, double quantisation), or None."""
    if lora.quantize_base is None:
        return None
    import torch
    from transformers import BitsAndBytesConfig

    return BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_use_double_quant=True,
                              bnb_4bit_compute_dtype=torch.bfloat16 if bf16 else torch.float32)


# -- memory: gradient checkpointing by estimate, Liger by availability -------------------------------
# Checkpointing goes on when a step's activations would take more than this share of the device's memory
# (the rest holds the weights, the optimiser state of the adapter, the allocator's slack and the KV-free
# forward's temporaries).
CHECKPOINTING_SHARE = 0.4


def activation_bytes(*, hidden: int, layers: int, intermediate: int, vocab: int, tokens: int,
                     dtype_bytes: int = 2) -> int:
    """Estimated bytes of activations a LoRA training step keeps for its backward pass.

    Per token and layer: ~16 hidden-sized tensors (norm inputs and outputs, q/k/v/o projections and
    their LoRA inputs, the residual stream; attention scores are not kept with SDPA/flash kernels)
    and 3 intermediate-sized ones (gate, up and their product); plus the fp32 logits of the loss.

    >>> activation_bytes(hidden=896, layers=24, intermediate=4864, vocab=151936, tokens=8192) // 2**30  # Qwen2.5-0.5B, 8 x 1024
    15
    """
    per_token = layers * (16 * hidden + 3 * intermediate) * dtype_bytes + vocab * 4
    return tokens * per_token


def checkpointing_needed(activations: int, device_bytes: int, share: float = CHECKPOINTING_SHARE) -> bool:
    """Whether `gradient_checkpointing: auto` turns recomputation on: the activations exceed `share`
    of the device's memory.

    >>> checkpointing_needed(10 * 2**30, 80 * 2**30), checkpointing_needed(40 * 2**30, 80 * 2**30)
    (False, True)
    """
    return activations > share * device_bytes


def device_memory_bytes() -> int:
    """Memory of the device training runs on: the first GPU's, else the machine's RAM."""
    import os

    import torch

    if torch.cuda.is_available():
        return torch.cuda.get_device_properties(0).total_memory
    return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")


def resolve_gradient_checkpointing(config: TrainConfig, model: Any, *, bf16: bool) -> bool:
    """`gradient_checkpointing` as the trainer gets it: as set, or for `auto` by the estimate of a
    full step (batch_size x max_length tokens) on `model`'s shapes against this device's memory."""
    if isinstance(config.gradient_checkpointing, bool):
        return config.gradient_checkpointing
    if model is None:
        return False
    text = model.config.get_text_config(decoder=True)
    shapes = [getattr(text, name, None) for name in ("hidden_size", "num_hidden_layers", "intermediate_size",
                                                     "vocab_size")]
    if not all(isinstance(value, int) for value in shapes):
        return False  # an architecture whose shapes are named otherwise: leave recomputation off
    hidden, layers, intermediate, vocab = shapes
    activations = activation_bytes(hidden=hidden, layers=layers, intermediate=intermediate, vocab=vocab,
                                   tokens=config.batch_size * config.max_length, dtype_bytes=2 if bf16 else 4)
    return checkpointing_needed(activations, device_memory_bytes())


def resolve_liger(liger: bool | str) -> bool:
    """Whether the trainer uses Liger kernels: `auto` when liger-kernel is installed and a CUDA GPU is
    here; `true` requires both (TrainingError, one line, otherwise); `false` never."""
    import importlib.util

    if liger is False:
        return False
    installed = importlib.util.find_spec("liger_kernel") is not None
    if liger is True:
        if not installed:
            raise TrainingError("liger=true: the liger-kernel package is not installed: pip install "
                                "'flywheel[liger]' (on a machine with a CUDA GPU), or set liger=auto")
        if not _has_cuda():
            raise TrainingError("liger=true: Liger's kernels are Triton kernels for a CUDA GPU; none here: "
                                "set liger=auto")
        return True
    return installed and _has_cuda()


def _common(config: TrainConfig, output_dir: Path, bf16: bool, quiet: bool, model: Any = None) -> dict[str, Any]:
    return dict(
        output_dir=str(output_dir),
        learning_rate=config.learning_rate,
        num_train_epochs=config.epochs,
        max_steps=config.max_steps or -1,
        per_device_train_batch_size=config.batch_size,
        gradient_accumulation_steps=config.grad_accum,
        warmup_steps=config.warmup_ratio,  # transformers 5: a float < 1 is a ratio of the total steps
        lr_scheduler_type=config.lr_scheduler,
        weight_decay=config.weight_decay,
        activation_checkpointing=resolve_gradient_checkpointing(config, model, bf16=bf16),
        use_liger_kernel=resolve_liger(config.liger),
        logging_steps=config.logging_steps,
        seed=config.seed,
        data_seed=config.seed,
        bf16=bf16,
        fp16=False,
        # Checkpoints every save_steps into the job's folder (resumable); flywheel.train.validation
        # registers each one. Without save_steps the adapter is saved once, by flywheel.train.checkpoints.
        save_strategy="steps" if config.save_steps else "no",
        save_steps=config.save_steps or 500,
        save_total_limit=None,
        eval_strategy="steps" if config.eval_steps else "no",
        eval_steps=config.eval_steps,
        per_device_eval_batch_size=config.batch_size,
        prediction_loss_only=True,
        report_to=[],
        disable_tqdm=quiet,
        dataloader_num_workers=0,
        dataloader_pin_memory=_has_cuda(),
        use_cpu=not _has_cuda(),  # transformers refuses bf16 without a GPU unless told the CPU is meant
    )


def _has_cuda() -> bool:
    import torch

    return torch.cuda.is_available()


def sft_args(config: SFTSpec, output_dir: Path, *, bf16: bool, quiet: bool = False, model: Any = None):
    """TRL's SFTConfig; `model` (the loaded base) sizes `gradient_checkpointing: auto`. Packing is TRL's
    best-fit-decreasing packing, padding-free: the packed rows are one sequence whose position ids
    restart at each example, which FlashAttention reads as sequence boundaries and transformers' SDPA and
    eager masks turn into a block-diagonal mask (tests/test_train_packing.py: packed and unpacked losses
    agree)."""
    from trl import SFTConfig

    return SFTConfig(
        **_common(config, output_dir, bf16, quiet, model),
        max_length=config.max_length,
        packing=config.packing,
        packing_strategy="bfd",
        # Our rows arrive tokenised with their loss mask (flywheel.train.formats.tokenize_sft), so TRL
        # only truncates, packs and collates them.
        dataset_kwargs={},
        train_sampling_strategy="group_by_length" if config.group_by_length and not config.packing else "random",
        remove_unused_columns=True,
    )


def dpo_args(config: DPOSpec, output_dir: Path, *, bf16: bool, quiet: bool = False, model: Any = None):
    """TRL's DPOConfig; `model` sizes `gradient_checkpointing: auto` (TRL 1.x has disabled DPO's
    padding-free mode, so DPO batches are padded)."""
    from trl import DPOConfig

    return DPOConfig(
        **_common(config, output_dir, bf16, quiet, model),
        max_length=config.max_length,
        beta=config.beta,
        loss_type=[config.loss_type],
    )


def grpo_args(config: RFTSpec, output_dir: Path, *, bf16: bool, max_completion_length: int, quiet: bool = False,
              model: Any = None):
    from trl import GRPOConfig

    common = _common(config, output_dir, bf16, quiet, model)
    # TRL counts completions per device batch: prompts per step x generations per prompt.
    common["per_device_train_batch_size"] = config.batch_size * config.num_generations
    # GRPO has no validation loss (flywheel.train.validation refuses eval_steps for rft); TRL still
    # checks the eval batch against the group size.
    common.update(eval_strategy="no", per_device_eval_batch_size=common["per_device_train_batch_size"])
    return GRPOConfig(
        **common,
        num_generations=config.num_generations,
        max_completion_length=max_completion_length,
        temperature=config.temperature,
        beta=config.beta,
        reward_weights=config.reward_weights,
        log_completions=False,
        use_vllm=config.use_vllm,
        vllm_mode=config.vllm_mode,
        vllm_server_base_url=config.vllm_server_base_url,
        vllm_gpu_memory_utilization=config.vllm_gpu_memory_utilization,
        vllm_tensor_parallel_size=config.vllm_tensor_parallel_size,
    )


def require_vllm(config: RFTSpec) -> None:
    """With `use_vllm`, vLLM must be importable here: say so before any model is loaded."""
    import importlib.util

    if config.use_vllm and importlib.util.find_spec("vllm") is None:
        raise TrainingError("rft: use_vllm is set but the vllm package is not installed here: "
                            "pip install vllm (on a machine with a GPU), or set use_vllm=false")
