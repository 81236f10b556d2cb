"""SFT loss that projects only the labelled positions through the LM head, on CPU.

TRL's `SFTTrainer` computes the loss with a fused LM head that, on devices without Triton (CPUs),
scores *every* position (trl/trainer/utils.py: "every position is scored instead") and masks the
result afterwards. With the loss on assistant tokens only, a BANKING77 row has ~5 labelled
positions out of ~110, yet each step projected all of them through the 49,152-word vocabulary,
recomputed that in the backward pass and ran fp32 softmax statistics over it: about half of every
step's time (profiled on the demo). `CompactLossSFTTrainer` asks the model for the logits of the
labelled positions only (transformers' `logits_to_keep` with an index tensor) and computes the same
loss, the labelled tokens' summed negative log-likelihood over their count, plus TRL's `entropy` and
`mean_token_accuracy` metrics from those few logits. Elsewhere (a GPU, packing, label smoothing,
another loss type) it leaves TRL's own computation alone.

It also trains with HF's eager attention on CPU: for short rows (~110 tokens) torch's CPU SDPA
kernels took about twice the time of eager's matmul + softmax, forward and backward (measured
36 vs 16 ms of CPU per layer at batch 8, bf16), about a tenth of a step. The model's attention
setting is restored when training ends, so a model reused for generation keeps SDPA.

Under bf16 autocast it also stops PEFT casting each LoRA layer's input to the adapter's fp32 dtype:
autocast casts it straight back to bf16 for the matmul, so every LoRA layer copied its activations
twice for nothing (`aten::copy_` was 12% of a step's CPU time; the loss is unchanged, the step
7-12% cheaper in CPU seconds, benchmarks/training.py).
"""

from __future__ import annotations

import torch
from peft.helpers import disable_input_dtype_casting
from trl import SFTTrainer


class CompactLossSFTTrainer(SFTTrainer):
    """TRL's SFTTrainer with the loss computed on the labelled positions only (see the module)."""

    def train(self, *args, **kwargs):
        """TRL's training loop, with eager attention on CPU while it runs (see the module)."""
        config = self.model.config
        attention = getattr(config, "_attn_implementation", None)
        switch = attention == "sdpa" and self.args.device.type == "cpu"
        if switch:
            config._attn_implementation = "eager"
        try:
            # Autocast casts the LoRA input to bf16 itself; PEFT's cast to fp32 first is a wasted copy.
            with disable_input_dtype_casting(self.model, active=bool(self.args.bf16)):
                return super().train(*args, **kwargs)
        finally:
            if switch:
                config._attn_implementation = attention

    def _compact_loss_applies(self, inputs) -> bool:
        return (inputs["input_ids"].device.type not in ("cuda", "xpu")
                and "attention_mask" in inputs and "labels" in inputs
                and self.args.loss_type == "nll" and self.label_smoother is None
                and self.compute_loss_func is None and not self.aux_loss_enabled
                and self.accelerator.parallelism_config is None)

    def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
        if not self._compact_loss_applies(inputs):
            return super().compute_loss(model, inputs, return_outputs=return_outputs,
                                        num_items_in_batch=num_items_in_batch)
        mode = "train" if self.model.training else "eval"
        targets_all = inputs["labels"][:, 1:]  # the logits at position t predict token t + 1
        positions = (targets_all != -100).any(dim=0).nonzero().squeeze(1)
        if positions.numel() == 0:
            positions = positions.new_zeros(1)  # keeps the loss connected to the graph: a zero, not 0/0
        model_inputs = {k: v for k, v in inputs.items() if k != "labels"}
        outputs = model(**model_inputs, use_cache=False, logits_to_keep=positions)
        log_probs = outputs.logits.float().log_softmax(dim=-1)  # [batch, positions, vocab]
        targets = targets_all[:, positions]
        valid = targets != -100
        token_log_probs = log_probs.gather(-1, targets.clamp(min=0).unsqueeze(-1)).squeeze(-1)
        token_log_probs = token_log_probs.masked_fill(~valid, 0.0)
        num_tokens = valid.sum() if num_items_in_batch is None else num_items_in_batch
        loss = -token_log_probs.sum() / torch.as_tensor(num_tokens).clamp(min=1)
        if self.args.average_tokens_across_devices and num_items_in_batch is not None:
            loss = loss * (self.accelerator.num_processes // self.get_tp_size())

        with torch.no_grad():
            entropy = -(log_probs.exp() * log_probs).sum(dim=-1).masked_fill(~valid, 0.0)
            correct = (log_probs.argmax(dim=-1) == targets) & valid
            gather = self.accelerator.gather_for_metrics
            n_valid = gather(valid.sum()).sum()
            n_entropy = gather(entropy.sum()).sum()
            n_correct = gather(correct.sum()).sum()
            self._metrics[mode]["entropy"].append((n_entropy / n_valid).item() if n_valid > 0 else 0.0)
            self._metrics[mode]["mean_token_accuracy"].append((n_correct / n_valid).item() if n_valid > 0 else 0.0)
            if mode == "train":
                self._total_train_tokens += gather(inputs["attention_mask"].sum()).sum().item() // self._tp_size
            self._metrics[mode]["num_tokens"] = [self._total_train_tokens]
        return (loss, outputs) if return_outputs else loss
