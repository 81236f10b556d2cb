"""Local transformers models: the embedded SmolLM2, any local folder or hub id, plus LoRA adapters.

The weights (the embedded GGUF model, folders, hub ids, adapters) are found, checked and loaded by
flywheel.models.loading; this module decodes.

Generation is batched (flywheel.models.decoding): prompts are rendered with the model's chat
template, the prefix they share (the system prompt, usually) is computed once, and requests stream
through one running batch that they join and leave as they finish. Greedy decoding (temperature 0)
is deterministic for a given set of requests.

Adapters: `local:BASE+A` merges one PEFT adapter into the base on load; `local:BASE+A*0.7+B*0.3`
combines several with PEFT's `add_weighted_adapter` ("cat": the result is exactly the weighted sum
of the adapters' weight deltas) and merges that (flywheel.models.loading.load_adapters).
"""

from __future__ import annotations

import threading
import time
from pathlib import Path
from typing import Any, Iterator

from flywheel.errors import ModelError
from flywheel.models.base import ChatRequest, Completion, Model
from flywheel.models.kv_cache import cache_kwarg, output_cache
from flywheel.models.loading import DTYPES, LocalWeights, load_for_inference, output_settings


# Below this many shared tokens, copying a prefix cache costs more than recomputing it.
MIN_PREFIX_TOKENS = 8
# "continuous": flywheel.models.decoding's continuous-batching loop; "hf": one transformers
# `generate` call per fixed batch (the reference the loop is tested against).
DECODERS = ("continuous", "hf")
# The running batch of the continuous decoder holds this many rows per unit of batch_size (128 at
# the default 32). A latency/throughput trade: every row in the batch waits for every other row's
# steps, so short rows admitted all at once (a student's 200 items) each take about the whole
# decode; 4 (not 8) halves that for a few percent of throughput (docs/benchmarks.md, issue 30).
RUNNING_BATCH_FACTOR = 4


class LocalModel(Model):
    """A transformers causal LM, optionally with a PEFT LoRA adapter on top.

    `base` is an embedded name (`smollm2`), a folder or a hub id; `adapter` a PEFT adapter folder.
    """

    reads_images = False  # vision-language models load as flywheel.models.vision.VisionModel

    def __init__(self, ref: str, base: str, adapter: str | None = None, *, dtype: str | None = None,
                 batch_size: int = 32, device: str | None = None, prefix_cache: bool = True,
                 decoder: str = "continuous", compile: bool = False):
        self.ref = ref
        self.base = base
        self.weights = LocalWeights.of(ref, base, adapter)  # the base and every adapter folder, checked
        self.dtype_name = dtype
        self.batch_size = batch_size
        self.device_name = device
        self._model = None
        self._tokenizer = None
        self._fingerprint: str | None = None
        self.prefix_cache = prefix_cache
        if decoder not in DECODERS:
            raise ModelError(f"{ref}: unknown decoder {decoder!r}; use {' or '.join(DECODERS)} (model_options.engine)")
        self.decoder = decoder
        if not isinstance(compile, bool) or (compile and decoder != "hf"):
            raise ModelError(f"{ref}: model_options.compile must be true or false, and applies to engine hf only "
                             f"(a static KV cache and torch.compile), got compile={compile!r} on engine {decoder}")
        self.compile = compile
        self._last_decode_stats = None  # the continuous decoder's DecodeStats of the last call (tests, benchmarks)
        self._prefix_memo: tuple[tuple[int, ...], Any] | None = None
        self._lock = threading.Lock()
        # One generation at a time per loaded model, whichever thread asks (the API's chat, its eval
        # workers and a wheel share one model through flywheel.models.cached_model); re-entrant so a
        # judge that is this very model can score inside a stream.
        self._generating = threading.RLock()
        if dtype is not None and dtype not in DTYPES:
            raise ModelError(f"{ref}: model_options.dtype: unknown dtype {dtype!r}; use {', '.join(DTYPES)}")
        if not isinstance(batch_size, int) or isinstance(batch_size, bool) or batch_size < 1:
            raise ModelError(f"{ref}: model_options.batch_size must be a positive integer, got {batch_size!r}")

    @property
    def adapters(self) -> list[tuple[Path, float]]:
        """(folder, weight) per adapter, in the reference's order."""
        return list(self.weights.adapters)

    @property
    def adapter(self) -> Path | None:
        """The one adapter (weight 1) on the base, or None; a combination is not one adapter."""
        return self.weights.adapter

    @property
    def preferred_batch_size(self) -> int:
        return self.batch_size

    @property
    def min_chunk_size(self) -> int:
        # A local batch is generated as one; committing more often means smaller batches, so
        # a quarter batch is the floor (throughput falls below it faster than it is worth).
        return max(1, self.batch_size // 4)

    # -- identity ---------------------------------------------------------------------------------
    @property
    def fingerprint(self) -> str:
        """The weights (base and adapters by content) and every option that changes outputs: the
        resolved dtype and device type, and the decoder. batch_size and prefix_cache are left out:
        they change how rows are grouped, not what a row decodes to (the decoders are tested for
        that), so a cache filled at one batch size answers another."""
        if self._fingerprint is None:
            settings = (output_settings(self.dtype_name, self.device_name) + f"/{self.decoder}"
                        + ("+compile" if self.compile else ""))
            self._fingerprint = (self.weights.base_fingerprint() + settings
                                 + self.weights.adapters_fingerprint())
        return self._fingerprint

    # -- loading ----------------------------------------------------------------------------------
    def load(self):
        """Load tokenizer and weights (once); returns (model, tokenizer)."""
        with self._lock:
            if self._model is None:
                self._model, self._tokenizer = self._load()
        return self._model, self._tokenizer

    def _load(self):
        model, tokenizer = load_for_inference(self.weights, dtype=self.dtype_name, device=self.device_name)
        tokenizer.padding_side = "left"
        return model, tokenizer

    # -- generation -------------------------------------------------------------------------------
    def render_prompt(self, messages: list[dict[str, str]], tools: list[dict[str, Any]] | None = None,
                      tool_choice: Any = None) -> str:
        _, tokenizer = self.load()
        if tools:  # the template's own tool rendering, else the Hermes convention (flywheel.tools)
            from flywheel.tools import render_with_tools

            return render_with_tools(tokenizer, messages, tools, tool_choice)
        return tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)

    def generate(self, requests: list[ChatRequest]) -> list[Completion]:
        results: list[Completion | None] = [None] * len(requests)
        for index, completion in self.stream(requests):
            results[index] = completion
        return results  # type: ignore[return-value]

    def stream(self, requests: list[ChatRequest]) -> Iterator[tuple[int, Completion]]:
        """Complete the requests, yielding (request index, completion) as each finishes.

        With the continuous decoder a request is yielded the step it ends, while the others run on.
        One stream (or `generate`, `score_choices`) runs at a time per model; another thread waits.
        """
        if not requests:
            return
        with self._generating:
            yield from self._stream(requests)

    def _stream(self, requests: list[ChatRequest]) -> Iterator[tuple[int, Completion]]:
        from flywheel.images import has_images

        if any(has_images(r.messages) for r in requests):  # the chat template would print the bytes as text
            raise ModelError(f"{self.ref} is a text model: it does not read images (docs/vision.md)")
        _, tokenizer = self.load()
        token_ids = [tokenizer(self.render_prompt(r.messages, r.tools, r.tool_choice), add_special_tokens=False).input_ids
                     for r in requests]
        # Requests decoded together must share sampling settings.
        groups: dict[Any, list[int]] = {}
        for index in range(len(requests)):
            groups.setdefault(requests[index].sampling, []).append(index)
        for sampling, indexes in groups.items():
            rows = [token_ids[i] for i in indexes]
            repeats = [requests[i].repeat for i in indexes]
            if self._use_continuous():
                done = self._stream_continuous(rows, sampling, repeats)
            else:
                done = enumerate(self._generate_hf(rows, sampling, repeats))
            for position, completion in done:
                request = requests[indexes[position]]
                if request.tools:
                    from flywheel.tools import attach_tool_calls

                    attach_tool_calls([request], [completion])
                yield indexes[position], completion

    @property
    def streams(self) -> bool:
        return self._use_continuous()

    def _use_continuous(self) -> bool:
        """The continuous loop edits the KV cache column-wise: plain full-attention caches only."""
        if self.decoder != "continuous":
            return False
        model, _ = self.load()
        config = model.config.get_text_config(decoder=True)
        layer_types = getattr(config, "layer_types", None)
        if layer_types:
            return set(layer_types) == {"full_attention"}
        return not getattr(config, "sliding_window", None)

    def _stream_continuous(self, rows: list[list[int]], sampling, repeats: list[int]) -> Iterator[tuple[int, Completion]]:
        """(row index, completion) as the continuous decoder finishes each row; a completion's
        latency is its row's own time in the loop, admission to last token (`DecodeResult`)."""
        from flywheel.models.decoding import Decoder

        model, tokenizer = self.load()
        prefix_len = self._shared_prefix(rows)
        prefix_cache = self._prefix_kv(tuple(rows[0][:prefix_len])) if prefix_len else None
        decoder = Decoder(model, eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id,
                          max_batch=self.batch_size * RUNNING_BATCH_FACTOR, prefill_batch=self.batch_size)
        for index, result in decoder.stream(rows, max_new_tokens=sampling.max_tokens, prefix_len=prefix_len,
                                            prefix_cache=prefix_cache, temperature=sampling.temperature,
                                            top_p=sampling.top_p, seed=sampling.seed * 1000 + min(repeats)):
            self._last_decode_stats = decoder.stats
            yield index, self._completion(result.tokens, rows[index], result.latency_s)

    def _completion(self, tokens: list[int], prompt: list[int], latency_s: float) -> Completion:
        """Decode generated ids (cut at EOS) into a Completion."""
        _, tokenizer = self.load()
        eos = tokenizer.eos_token_id
        ids, finish = [], "length"
        for token in tokens:
            if token == eos:
                finish = "stop"
                break
            ids.append(token)
        text = tokenizer.decode(ids, skip_special_tokens=True).strip()
        return Completion(text=text, prompt_tokens=len(prompt), completion_tokens=len(ids) + (finish == "stop"),
                          finish_reason=finish, latency_s=latency_s)

    def _generate_hf(self, rows: list[list[int]], sampling, repeats: list[int]) -> list[Completion]:
        """transformers `generate` per length-sorted batch of `batch_size` rows."""
        order = sorted(range(len(rows)), key=lambda i: (len(rows[i]), i))
        results: list[Completion | None] = [None] * len(rows)
        for start in range(0, len(order), self.batch_size):
            chunk = order[start:start + self.batch_size]
            for index, completion in zip(chunk, self._generate_batch(
                    [rows[i] for i in chunk], sampling, [repeats[i] for i in chunk])):
                results[index] = completion
        return results  # type: ignore[return-value]

    def _shared_prefix(self, rows: list[list[int]]) -> int:
        """Length of the token prefix every row shares, leaving each row at least one own token."""
        if not self.prefix_cache or self.compile:  # a static cache is allocated by generate, not copied in
            return 0
        shortest = min(len(r) for r in rows)
        length = 0
        first = rows[0]
        while length < shortest - 1 and all(r[length] == first[length] for r in rows):
            length += 1
        return length if length >= MIN_PREFIX_TOKENS else 0

    def _prefix_kv(self, prefix: tuple[int, ...]):
        """KV cache of a prompt prefix (the system prompt, usually), computed once and reused."""
        import torch

        memo = self._prefix_memo
        if memo is None or memo[0] != prefix:
            model, _ = self.load()
            with torch.inference_mode():
                out = model(input_ids=torch.tensor([prefix], device=model.device), use_cache=True)
            memo = self._prefix_memo = (prefix, output_cache(out))
        return memo[1]

    def _batch_inputs(self, rows: list[list[int]]):
        """input_ids, attention_mask and (optionally) a prefilled cache for one batch.

        Without a shared prefix, rows are left-padded. With one, the layout is
        [prefix][padding][own tokens]: the prefix's KV cache is computed once and copied per row,
        and position ids (from the attention mask's cumulative sum) stay those of the unpadded
        prompt, so the model sees exactly the same sequence either way.
        """
        import copy

        import torch

        model, tokenizer = self.load()
        pad = tokenizer.pad_token_id
        prefix_len = self._shared_prefix(rows)
        width = max(len(r) for r in rows)
        ids, mask = [], []
        for row in rows:
            gap = width - len(row)
            ids.append(row[:prefix_len] + [pad] * gap + row[prefix_len:])
            mask.append([1] * prefix_len + [0] * gap + [1] * (len(row) - prefix_len))
        cache = None
        if prefix_len:
            cache = copy.deepcopy(self._prefix_kv(tuple(rows[0][:prefix_len])))
            cache.batch_repeat_interleave(len(rows))
        device = model.device
        return torch.tensor(ids, device=device), torch.tensor(mask, device=device), cache

    def _generate_batch(self, rows: list[list[int]], sampling, repeats: list[int]) -> list[Completion]:
        import torch

        model, tokenizer = self.load()
        started = time.perf_counter()
        input_ids, attention_mask, cache = self._batch_inputs(rows)
        kwargs: dict[str, Any] = dict(
            max_new_tokens=sampling.max_tokens,
            pad_token_id=tokenizer.pad_token_id,
            eos_token_id=tokenizer.eos_token_id,
        )
        if cache is not None:
            kwargs[cache_kwarg(model)] = cache
        if self.compile:  # a static KV cache, and the forward compiled (CUDA graphs on a GPU: reduce-overhead)
            from transformers import CompileConfig

            kwargs.update(cache_implementation="static", compile_config=CompileConfig(
                mode="reduce-overhead" if model.device.type == "cuda" else "default"))
            kwargs["compile_config"]._compile_all_devices = True  # also on CPU, where transformers would skip it
        if sampling.greedy:
            kwargs.update(do_sample=False, temperature=None, top_p=None, top_k=None)
        else:
            torch.manual_seed(sampling.seed * 1000 + min(repeats))
            kwargs.update(do_sample=True, temperature=sampling.temperature, top_p=sampling.top_p, top_k=0)
        with torch.inference_mode():
            output = model.generate(input_ids=input_ids, attention_mask=attention_mask, **kwargs)
        new_tokens = output[:, input_ids.shape[1]:]
        elapsed = time.perf_counter() - started  # every row of a `generate` batch waits for all of it
        return [self._completion(row, prompt, elapsed) for row, prompt in zip(new_tokens.tolist(), rows)]

    def score_choices(self, conversations: list[list[dict[str, str]]], choices: list[str]) -> list[list[float]]:
        """Log-probability of each choice as the reply to each conversation (constrained judging)."""
        from flywheel.models.scoring import score_choices

        with self._generating:
            return score_choices(self, conversations, choices)

    def close(self) -> None:
        with self._generating:  # after the generation in flight, if any
            self._model = None
            self._tokenizer = None
            self._prefix_memo = None
