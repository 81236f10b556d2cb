"""Random but real PEFT LoRA adapters on a small model folder, for the adapter and export tests."""

from __future__ import annotations

from pathlib import Path

QUESTIONS = [[{"role": "user", "content": f"question {i} about my card and the exchange rate"}] for i in range(6)]


def make_adapter(base_dir: Path, target: Path, *, seed: int, scale: float = 1.0, r: int = 4,
                 alpha: int | None = None, target_modules=("q_proj", "v_proj", "o_proj", "up_proj", "down_proj")) -> Path:
    """Save a LoRA adapter for `base_dir` with random (non-zero) A and B, so it changes outputs."""
    import torch
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    base = AutoModelForCausalLM.from_pretrained(base_dir, dtype=torch.float32)
    model = get_peft_model(base, LoraConfig(r=r, lora_alpha=alpha or 2 * r, target_modules=list(target_modules)))
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, param in model.named_parameters():
            if "lora_" in name:
                param.copy_(torch.randn(param.shape, generator=generator) * scale)
    model.save_pretrained(target)
    return target


def greedy_texts(ref: str, questions=QUESTIONS, max_tokens: int = 8, **options) -> list[str]:
    """Greedy replies of a model reference to `questions` through Flywheel's model loader."""
    from flywheel.models import ChatRequest, Sampling, load_model

    model = load_model(ref, {"dtype": "fp32", **options})
    try:
        return [c.text for c in model.generate([ChatRequest(q, Sampling(max_tokens=max_tokens)) for q in questions])]
    finally:
        model.close()
