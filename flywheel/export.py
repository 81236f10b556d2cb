"""Export a local model reference as one self-contained Hugging Face folder.

    result = export_model("local:smollm2+.flywheel/ckpt/sft-3", "out/banking-sft")           # merged
    result = export_model("local:smollm2+.flywheel/ckpt/sft-3", "out/banking-int8", quantize="int8")
    result.model_ref   # local:out/banking-int8: evaluate it like any model

The adapters of the reference (one, or a weighted combination: flywheel.models.local) are merged
into the base weights with PEFT's `merge_and_unload`, and the folder gets safetensors weights, the
tokenizer with its chat template, the config, a model card (README.md) and `flywheel_export.json`
with the lineage: base model, every adapter's content hash and weight, and the checkpoint, training
job and training set it came from. transformers' `AutoModelForCausalLM.from_pretrained(DIR)` loads
it, and so does vLLM for the unquantised export (untested here: vLLM is not installed).

`quantize="int8"` stores the merged model's linear layers as int8 weights with per-channel scales
(torchao's `Int8WeightOnlyConfig`, through transformers' `TorchAoConfig`; the `quantize` extra).
The folder's config.json carries the `quantization_config`, so transformers (with torchao
installed) and `local:DIR` load it without being told. Embeddings stay in the saved dtype.

The folder is written to a staging folder beside DIR and renamed into place: a failed export
leaves nothing half-written, and an existing DIR is only replaced with `overwrite=True`.
"""

from __future__ import annotations

import json
import math
import pprint
import re
import shlex
import shutil
import tempfile
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from flywheel.errors import FlywheelError

EXPORT_FILE = "flywheel_export.json"
DTYPES = {"fp32": "float32", "bf16": "bfloat16"}


class ExportError(FlywheelError):
    """A model could not be exported; nothing was written to the output folder."""


@dataclass(frozen=True)
class Quantizer:
    """One `--quantize` choice: what it does, and the transformers quantization config it builds."""

    name: str
    summary: str
    build: Callable[[], Any]


def _torchao_int8():
    from transformers import TorchAoConfig

    try:
        from torchao.quantization import Int8WeightOnlyConfig
    except ImportError:
        raise ExportError("--quantize int8 needs torchao; install it with: pip install 'flywheel[quantize]'") from None
    return TorchAoConfig(Int8WeightOnlyConfig())


QUANTIZERS: dict[str, Quantizer] = {q.name: q for q in (
    Quantizer("int8", "int8 weights with per-channel scales (torchao Int8WeightOnlyConfig); runs on CPU",
              _torchao_int8),
)}


@dataclass
class Score:
    """One measured score of the exported model: its split, value and 95% CI."""

    split: str
    score: float
    ci_low: float | None
    ci_high: float | None
    n: int
    run_id: str
    iteration_id: str


@dataclass
class Measurement:
    """How the source model was measured in the store: the eval, the prompt, valid and test scores."""

    eval_name: str
    metric: str
    prompt_id: str | None
    messages: list[dict[str, Any]]
    scores: list[Score]


def measurement_of(store: Any, ref: str) -> Measurement | None:
    """The newest measurement of `ref` in `store` (a `flywheel.store.Store`): the newest valid score,
    the test score with the same prompt (else the newest test score), the eval and the prompt; None
    when the store never measured it."""
    rows = store.model_measurements(ref)
    if not rows:
        return None
    first = next((r for r in rows if r["split"] == "valid"), rows[0])
    same = [r for r in rows if r["prompt_id"] == first["prompt_id"] and r["eval_name"] == first["eval_name"]]
    chosen = [r for split in ("valid", "test")
              if (r := next((r for r in same if r["split"] == split), None)
                  or next((r for r in rows if r["split"] == split and r["eval_name"] == first["eval_name"]), None))]
    try:
        metric = json.loads(first["eval_spec_json"] or "{}").get("objective", {}).get("metric") or "pass_rate"
    except (ValueError, AttributeError):
        metric = "pass_rate"
    prompt_id = first["prompt_id"]
    messages = store.get_prompt(prompt_id)["messages"] if prompt_id else []
    return Measurement(eval_name=first["eval_name"] or "", metric=metric, prompt_id=prompt_id, messages=messages,
                       scores=[Score(split=r["split"], score=r["score"], ci_low=r["ci_low"], ci_high=r["ci_high"],
                                     n=r["n"], run_id=r["run_id"], iteration_id=r["id"]) for r in chosen])


def _fence(text: str, lang: str = "") -> list[str]:
    """A fenced block that `text` cannot close: the fence is longer than any backtick run in it."""
    longest = max((len(run) for run in re.findall(r"`+", text)), default=0)
    fence = "`" * max(3, longest + 1)
    return [fence + lang, text, fence]


def _inline(text: Any) -> str:
    """One-line Markdown-inert text for the card (names from the store, specs and paths)."""
    out = str(text).replace("\r", " ").replace("\n", " ")
    for ch in "\\`*_{}[]<>#|~":
        out = out.replace(ch, "\\" + ch)
    return out


def _fmt_score(value: float | None, metric: str) -> str:
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return "–"
    return f"{100 * value:.1f}%" if metric == "pass_rate" else f"{value:.3f}"


@dataclass
class ExportResult:
    """What `export_model` wrote."""

    path: str
    model_ref: str
    source_ref: str
    base: str
    adapters: list[dict[str, Any]] = field(default_factory=list)
    quantize: str | None = None
    dtype: str = "fp32"
    size_bytes: int = 0
    files: list[str] = field(default_factory=list)
    measured: Measurement | None = None
    served_name: str = ""

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    def summary_lines(self) -> list[str]:
        """What `flywheel export model` prints."""
        what = "merged" + (f", {self.quantize}" if self.quantize else "") + f", {self.dtype}"
        lines = [f"exported {self.source_ref} to {self.path} ({what}, {self.size_bytes / 1e6:.1f} MB)"]
        for adapter in self.adapters:
            job = f", job {adapter['job_id']}" if adapter.get("job_id") else ""
            lines.append(f"  adapter {adapter['path']} x{adapter['weight']:g} (hash {adapter['hash']}{job})")
        lines.append(f"  evaluate it as {self.model_ref}")
        return lines


def _adapter_lineage(path: Path, weight: float) -> dict[str, Any]:
    from flywheel.models.loading import dir_fingerprint
    from flywheel.train.checkpoints import LINEAGE_FILE

    entry: dict[str, Any] = {"path": str(path), "weight": weight, "hash": dir_fingerprint(path)[:16]}
    lineage_path = path / LINEAGE_FILE
    if lineage_path.is_file():  # written by register_checkpoint: the checkpoint, job and training set
        try:
            lineage = json.loads(lineage_path.read_text(encoding="utf-8"))
        except ValueError:
            lineage = {}
        entry.update({k: lineage.get(k) for k in ("id", "method", "base_model", "job_id", "training_set_id",
                                                   "training_set_hash", "parent_id")})
        entry["checkpoint_id"] = entry.pop("id")
    return entry


def _model_card(result: ExportResult, base_source: str) -> str:
    lines = [
        "---", "library_name: transformers", "pipeline_tag: text-generation", "tags: [flywheel"
        + (", lora-merged" if result.adapters else "") + (f", {result.quantize}" if result.quantize else "") + "]",
        "---", "", f"# {Path(result.path).name}", "",
        f"Exported by Flywheel from `{result.source_ref}`"
        + (" with the LoRA adapters merged into the weights" if result.adapters else "")
        + (f", {QUANTIZERS[result.quantize].summary}" if result.quantize else "") + ".", "",
        "## Lineage", "", f"- base model: `{result.base}` (`{base_source}`)",
    ]
    for adapter in result.adapters:
        lines.append(f"- adapter `{adapter['path']}`, weight {adapter['weight']:g}, content hash `{adapter['hash']}`")
        for key in ("checkpoint_id", "method", "job_id", "training_set_id", "training_set_hash", "parent_id"):
            if adapter.get(key):
                lines.append(f"  - {key.replace('_', ' ')}: `{adapter[key]}`")
    lines += _measured_lines(result.measured)
    lines += _call_lines(result)
    lines += ["", "## Use with transformers", "", "```python", "from transformers import AutoModelForCausalLM, AutoTokenizer",
              f'model = AutoModelForCausalLM.from_pretrained("{result.path}")',
              f'tokenizer = AutoTokenizer.from_pretrained("{result.path}")', "```", "",
              f"With Flywheel: `flywheel eval SPEC --model {result.model_ref}`."
              + (" Loading needs torchao (`pip install 'flywheel[quantize]'`)." if result.quantize else ""), ""]
    return "\n".join(lines)


def _measured_lines(measured: Measurement | None) -> list[str]:
    if measured is None:
        return ["", "## Measured", "", "Not measured in the store it was exported from: "
                "`flywheel eval SPEC --model local:DIR` measures it."]
    lines = ["", "## Measured", "", f"Eval **{_inline(measured.eval_name)}**, objective "
             f"{'pass rate' if measured.metric == 'pass_rate' else 'mean score'}, 95% CI; the source model "
             "before export (the merge is exact in fp32).", "",
             "| split | score | 95% CI | items | run |", "|---|---:|---:|---:|---|"]
    for s in measured.scores:
        ci = f"{_fmt_score(s.ci_low, measured.metric)} – {_fmt_score(s.ci_high, measured.metric)}"
        lines.append(f"| {_inline(s.split)} | {_fmt_score(s.score, measured.metric)} | {ci} | {s.n} | "
                     f"{_inline(s.run_id)} |")
    lines += ["", f"Measured with this prompt ({_inline(measured.prompt_id or '–')}); "
              "`{{item.…}}` fields come from each item:", ""]
    lines += _fence(json.dumps(measured.messages, indent=2, ensure_ascii=False), "json")
    return lines


def _call_lines(result: ExportResult) -> list[str]:
    """A ready-to-paste call: serve the folder, then the openai SDK with the measured prompt."""
    messages = (result.measured.messages if result.measured else []) or [{"role": "user", "content": "Hello"}]
    python = "\n".join([
        "from openai import OpenAI", "",
        'client = OpenAI(base_url="http://127.0.0.1:8000/v1", api_key="unused")',
        f"messages = {pprint.pformat(messages, width=100, sort_dicts=False)}",
        "reply = client.chat.completions.create(", f"    model={result.served_name!r}, messages=messages, temperature=0)",
        "print(reply.choices[0].message.content)"])
    return ["", "## Call it", "", "Serve the folder on an OpenAI-compatible API:", "",
            *_fence(f"flywheel serve-model {shlex.quote(result.model_ref)} --port 8000 "
                    f"--name {shlex.quote(result.served_name)}", "sh"),
            "", "then call it with the openai SDK (replace the `{{item.…}}` fields with your input):", "",
            *_fence(python, "python")]


def _folder_size(folder: Path) -> tuple[int, list[str]]:
    files = sorted(p for p in folder.rglob("*") if p.is_file())
    return sum(p.stat().st_size for p in files), [p.relative_to(folder).as_posix() for p in files]


def export_model(ref: str, output: str | Path, *, quantize: str | None = None, dtype: str = "fp32",
                 overwrite: bool = False, store: Any = None) -> ExportResult:
    """Write `ref` (a `local:` model, with its adapters merged) to `output` as a HF folder.

    `quantize`: None or a name in QUANTIZERS ("int8"); `dtype`: "fp32" or "bf16", the dtype of the
    saved weights (of the unquantised layers, and of the activations, when quantised). `store`:
    where `ref` was measured; the model card then shows the eval, the prompt and the scores."""
    import torch

    from flywheel.models import parse_model_ref
    from flywheel.models.loading import LocalWeights, load_adapters, load_base, quantisation_of

    if dtype not in DTYPES:
        raise ExportError(f"unknown dtype {dtype!r}; use {' or '.join(DTYPES)}")
    if quantize is not None and quantize not in QUANTIZERS:
        raise ExportError(f"unknown quantisation {quantize!r}; known: {', '.join(QUANTIZERS)}")
    scheme, name, adapter = parse_model_ref(ref)
    if scheme != "local":
        raise ExportError(f"{ref}: only local: models can be exported (the weights of {scheme}: models are not here)")
    weights = LocalWeights.of(ref, name, adapter)  # validates the base and every adapter folder
    out = Path(output)
    if out.exists() and (not out.is_dir() or any(out.iterdir())) and not overwrite:
        raise ExportError(f"{out}: already exists and is not empty; choose another folder or pass --force")
    quantization = QUANTIZERS[quantize].build() if quantize else None  # fails early without torchao
    base_path = weights.base_path()
    if quantisation_of(base_path):
        raise ExportError(f"{ref}: {base_path} is already quantised ({quantisation_of(base_path)}); "
                          "export from the unquantised model")
    out.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f".{out.name}-", dir=out.parent))
    try:
        # Merge in fp32 (exact), then store in the chosen dtype.
        model, tokenizer = load_base(weights, dtype="fp32")
        model = load_adapters(weights, model)
        model = model.to(getattr(torch, DTYPES[dtype]))
        model.config.use_cache = True
        if quantization is not None:
            merged = staging / ".merged"
            model.save_pretrained(merged)
            tokenizer.save_pretrained(merged)  # a loadable folder: the one loader reads both
            del model
            model, _ = load_base(LocalWeights.of(ref, str(merged)), dtype=dtype, quantization=quantization)
            model.save_pretrained(staging)
            shutil.rmtree(merged)
        else:
            model.save_pretrained(staging)
        del model
        tokenizer.save_pretrained(staging)
        target_ref = f"local:{out}"
        result = ExportResult(path=str(out), model_ref=target_ref, source_ref=ref, base=name,
                              adapters=[_adapter_lineage(path, weight) for path, weight in weights.adapters],
                              quantize=quantize, dtype=dtype,
                              measured=measurement_of(store, ref) if store is not None else None,
                              served_name=re.sub(r"[^A-Za-z0-9._-]+", "-", out.name).strip("-") or "model")
        (staging / "README.md").write_text(_model_card(result, base_path), encoding="utf-8")
        lineage = {"source_ref": ref, "base": name, "base_path": base_path,
                   "source_fingerprint": weights.base_fingerprint() + weights.adapters_fingerprint(),
                   "adapters": result.adapters, "quantize": quantize, "dtype": dtype,
                   "measured": asdict(result.measured) if result.measured else None}
        (staging / EXPORT_FILE).write_text(json.dumps(lineage, indent=2, default=str), encoding="utf-8")
        if out.exists():
            old = out.with_name(f".{out.name}-old-{staging.name}")
            out.rename(old)
            staging.rename(out)
            shutil.rmtree(old, ignore_errors=True)
        else:
            staging.rename(out)
    except FlywheelError:
        raise
    except Exception as exc:  # noqa: BLE001 - one clean line; the staging folder goes
        raise ExportError(f"exporting {ref} to {out} failed ({type(exc).__name__}: {str(exc).splitlines()[0]}); "
                          "nothing was written") from exc
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    result.size_bytes, result.files = _folder_size(out)
    return result
