"""Local vision-language models: transformers' image-text-to-text classes and their processors.

`local:<folder>` whose config.json has a `vision_config` (LLaVA, Idefics3/SmolVLM, Qwen2-VL,
PaliGemma, ...) loads here instead of `flywheel.models.local`: `AutoModelForImageTextToText` for
the weights, `AutoProcessor` for the chat template, tokenizer and image processor (both loaded,
with any adapters, by flywheel.models.loading). Requests are
the same `ChatRequest`s as for text models, with images as Chat Completions parts holding data
URLs (flywheel.images); they are generated in left-padded batches of `batch_size` with
transformers' `generate`, and go through the same store and completion cache as text models.

    model = load_model("local:/models/tiny-llava", {"batch_size": 8})
    model.generate([ChatRequest(messages=[{"role": "user", "content": [
        {"type": "image_url", "image_url": {"url": "data:image/png;base64,..."}},
        {"type": "text", "text": "What colour is this?"}]}])])
"""

from __future__ import annotations

import threading
import time
from pathlib import Path
from typing import Any

from flywheel.errors import ModelError
from flywheel.images import image_url_of, load_image
from flywheel.models.base import ChatRequest, Completion, Model
from flywheel.models.loading import DTYPES, LocalWeights, load_for_inference, output_settings

OPTIONS = ("dtype", "batch_size", "device")


def processor_messages(messages: list[dict[str, Any]]) -> tuple[list[dict[str, Any]], list[Any]]:
    """Chat Completions messages as a processor's chat template wants them (`{type: image}`
    placeholders and `{type: text}` parts, `developer` read as `system`), and the images in order
    (Pillow, RGB)."""
    out, images = [], []
    for message in messages:
        role = "system" if message["role"] == "developer" else message["role"]
        content = message.get("content")
        if isinstance(content, list):
            parts = []
            for part in content:
                url = image_url_of(part)
                if url is not None:
                    images.append(load_image(url).pil())
                    parts.append({"type": "image"})
                elif isinstance(part, dict) and part.get("type") in ("text", "input_text", "output_text"):
                    parts.append({"type": "text", "text": str(part.get("text", ""))})
            out.append({"role": role, "content": parts})
        else:
            out.append({"role": role, "content": [{"type": "text", "text": "" if content is None else str(content)}]})
    return out, images


class VisionModel(Model):
    """A transformers image-text-to-text model, optionally with a PEFT LoRA adapter merged in."""

    reads_images = True

    def __init__(self, ref: str, base: str, adapter: str | None = None, *, dtype: str | None = None,
                 batch_size: int = 8, device: str | None = None, **unknown: Any):
        if unknown:
            raise ModelError(f"{ref}: model_options: unknown option(s) for local vision models: "
                             f"{', '.join(sorted(unknown))}; known: {', '.join(OPTIONS)}")
        if not isinstance(batch_size, int) or isinstance(batch_size, bool) or batch_size < 1:
            raise ModelError(f"{ref}: model_options.batch_size must be a positive integer, got {batch_size!r}")
        if dtype is not None and dtype not in DTYPES:
            raise ModelError(f"{ref}: model_options.dtype: unknown dtype {dtype!r}; use {', '.join(DTYPES)}")
        self.ref = ref
        self.base = base
        self.weights = LocalWeights.of(ref, base, adapter)  # the base and every adapter folder, checked
        self.dtype_name = dtype
        self.batch_size = batch_size
        self.device_name = device
        self._model = None
        self._processor = None
        self._fingerprint: str | None = None
        self._lock = threading.Lock()
        self._generating = threading.RLock()  # one generation at a time per model (as LocalModel)

    @property
    def adapter(self) -> Path | None:
        """The one adapter (weight 1) on the base, or None; a combination is not one adapter."""
        return self.weights.adapter

    @property
    def preferred_batch_size(self) -> int:
        return self.batch_size

    @property
    def min_chunk_size(self) -> int:
        return max(1, self.batch_size // 4)

    @property
    def fingerprint(self) -> str:
        """The weights by content and the options that change outputs (dtype, device type), as for
        text models (flywheel.models.local), marked `vlm-`."""
        if self._fingerprint is None:
            self._fingerprint = ("vlm-" + self.weights.base_fingerprint()
                                 + output_settings(self.dtype_name, self.device_name)
                                 + self.weights.adapters_fingerprint())
        return self._fingerprint

    def load(self):
        """Load processor and weights (once); returns (model, processor)."""
        with self._lock:
            if self._model is None:
                self._model, self._processor = self._load()
        return self._model, self._processor

    def _load(self):
        model, processor = load_for_inference(self.weights, dtype=self.dtype_name, device=self.device_name)
        processor.tokenizer.padding_side = "left"
        return model, processor

    def generate(self, requests: list[ChatRequest]) -> list[Completion]:
        if not requests:
            return []
        if any(r.tools for r in requests):
            raise ModelError(f"{self.ref}: tools are not supported by local vision models")
        with self._generating:
            return self._generate(requests)

    def _generate(self, requests: list[ChatRequest]) -> list[Completion]:
        self.load()
        prepared = [processor_messages(r.messages) for r in requests]
        # One batch shares sampling settings, and either every row has images or none has.
        groups: dict[Any, list[int]] = {}
        for index, request in enumerate(requests):
            groups.setdefault((request.sampling, bool(prepared[index][1])), []).append(index)
        results: list[Completion | None] = [None] * len(requests)
        for (sampling, _), indexes in groups.items():
            for start in range(0, len(indexes), self.batch_size):
                chunk = indexes[start:start + self.batch_size]
                completions = self._generate_batch([prepared[i] for i in chunk], sampling,
                                                   min(requests[i].repeat for i in chunk))
                for index, completion in zip(chunk, completions):
                    results[index] = completion
        return results  # type: ignore[return-value]

    def _generate_batch(self, rows: list[tuple[list[dict[str, Any]], list[Any]]], sampling,
                        repeat: int) -> list[Completion]:
        import torch

        model, processor = self.load()
        started = time.perf_counter()
        texts = [processor.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
                 for messages, _ in rows]
        images = [imgs for _, imgs in rows]
        kwargs: dict[str, Any] = {"text": texts, "padding": True, "return_tensors": "pt"}
        if any(images):
            kwargs["images"] = images
        inputs = processor(**kwargs).to(model.device)
        if "pixel_values" in inputs and inputs["pixel_values"].is_floating_point():
            inputs["pixel_values"] = inputs["pixel_values"].to(model.dtype)
        tokenizer = processor.tokenizer
        options: dict[str, Any] = dict(max_new_tokens=sampling.max_tokens, pad_token_id=tokenizer.pad_token_id,
                                       eos_token_id=tokenizer.eos_token_id)
        if sampling.greedy:
            options.update(do_sample=False, temperature=None, top_p=None, top_k=None)
        else:
            torch.manual_seed(sampling.seed * 1000 + repeat)
            options.update(do_sample=True, temperature=sampling.temperature, top_p=sampling.top_p, top_k=0)
        with torch.inference_mode():
            output = model.generate(**inputs, **options)
        width = inputs["input_ids"].shape[1]
        prompt_lengths = inputs["attention_mask"].sum(dim=1).tolist()
        elapsed = time.perf_counter() - started  # every row of a `generate` batch waits for all of it
        out = []
        for row, prompt_tokens in zip(output[:, width:].tolist(), prompt_lengths):
            ids, finish = [], "length"
            for token in row:
                if token == tokenizer.eos_token_id:
                    finish = "stop"
                    break
                if token == tokenizer.pad_token_id and tokenizer.pad_token_id != tokenizer.eos_token_id:
                    continue
                ids.append(token)
            out.append(Completion(text=tokenizer.decode(ids, skip_special_tokens=True).strip(),
                                  prompt_tokens=int(prompt_tokens), completion_tokens=len(ids) + (finish == "stop"),
                                  finish_reason=finish, latency_s=elapsed))
        return out

    def close(self) -> None:
        with self._generating:  # after the generation in flight, if any
            self._model = None
            self._processor = None
