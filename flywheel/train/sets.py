"""Training sets out of the store: SFT rows, DPO pairs and RFT prompts.

    sft = build_sft_set(spec, store)                  # passing captured outputs (+ reviewer corrections)
    dpo = build_dpo_set(spec, store, min_margin=0.5)  # best vs worst graded output of the same item
    rft = build_rft_set(spec)                         # the prompt plus the item fields the graders read
    record_training_set(store, sft)                   # content-hashed JSONL under .flywheel/sets/, a row
    both = combine_training_sets([sft_a, sft_b], weights=[2, 1])   # several evals, weighted, one set

Rows are in the platform's formats (`flywheel.train.formats`). Only `train` items (and unlabelled
inputs captured for distillation) are used: valid selects, test reports, neither is trained on. The
input of every row is the student's prompt rendered for the item (the eval's own prompt unless a
stage names a shorter student prompt), not the capture prompt, because the trained model is
measured with that prompt; the target is the captured (teacher) output.
"""

from __future__ import annotations

import json
import math
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

from flywheel.data import Dataset, Item, load_dataset
from flywheel.prompt import Prompt
from flywheel.reviews import preferences, sample_reviews
from flywheel.spec import EvalSpec
from flywheel.store import Store
from flywheel.store.rows import passed_of_rows
from flywheel.train.formats import RFT_RESERVED, TrainingDataError, TrainingSet, load_training_file, validate_rows


# -- reading what the store holds ------------------------------------------------------------------
@dataclass
class _Sample:
    id: int
    item_key: str
    output: str | None
    error: str | None
    capture_id: str
    objective: float = 0.0  # on the eval's objective (flywheel.summaries.objective_value)
    grades: dict[str, dict[str, Any]] = field(default_factory=dict)
    graders: frozenset[str] = frozenset()  # the graders of its iteration

    def passed_all(self) -> bool:
        return passed_of_rows(self.error, ({"grader": k, **g} for k, g in self.grades.items()), self.graders)


def _captures(store: Store, spec: EvalSpec, dataset_id: str, capture_ids: Sequence[str] | None) -> list[dict[str, Any]]:
    if capture_ids:
        rows = store.teacher_captures(list(capture_ids))
        missing = set(capture_ids) - {r["id"] for r in rows}
        if missing:
            raise TrainingDataError(f"{store.path}: no capture {sorted(missing)[0]!r}")
        return rows
    return store.teacher_captures(eval_name=spec.name, dataset_id=dataset_id)


def _captured_samples(store: Store, spec: EvalSpec, captures: list[dict[str, Any]]) -> list[_Sample]:
    samples: dict[int, _Sample] = {}
    objective = (spec.objective_grader, spec.objective.metric)
    graders = store.iteration_graders(c["iteration_id"] for c in captures)
    for capture in captures:
        for row in store.samples_with_grades(capture["iteration_id"], objective=objective):
            samples[row.id] = (_Sample(
                row.id, row.item_key, row.output_text, row.error, capture["id"], objective=row.score,
                grades={g.grader: {"score": g.score, "passed": bool(g.passed), "error": g.error}
                        for g in row.grades}, graders=frozenset(graders[capture["iteration_id"]])))
    return list(samples.values())


def _reviewed(store: Store, dataset_id: str) -> tuple[dict[int, Any], list[Any], dict[int, dict[str, Any]]]:
    """Effective reviews and preferences of samples of this dataset, with those samples."""
    reviews = sample_reviews(store)
    prefs = [p for p in preferences(store) if not p.tie]
    ids = set(reviews) | {i for p in prefs for i in (p.chosen, p.rejected)}
    samples = store.samples_in_dataset(ids, dataset_id)
    return ({k: v for k, v in reviews.items() if k in samples},
            [p for p in prefs if p.chosen in samples and p.rejected in samples], samples)


def _assistant(text: str) -> dict[str, str]:
    return {"role": "assistant", "content": text}


class _Prompter:
    """Renders the eval's prompt (or `prompt`) for train items, once per item."""

    def __init__(self, spec: EvalSpec, prompt: Prompt | None, unlabelled: Sequence[Item] = (),
                 dataset: Dataset | None = None):
        self.spec = spec
        self.dataset = dataset if dataset is not None else load_dataset(spec)
        # Items a row may be built for: train items, and unlabelled inputs captured for distillation.
        self.train: dict[str, Item] = {item.key: item for item in self.dataset.split("train")}
        self.train.update((item.key, item) for item in unlabelled)
        self.prompt = prompt or Prompt(messages=spec.messages())
        self.prompt_id = self.prompt.id
        self._cache: dict[str, list[dict[str, str]]] = {}
        if not self.train:
            raise TrainingDataError(f"{self.dataset.path}: the train split has no items")

    def __call__(self, key: str) -> list[dict[str, str]]:
        if key not in self._cache:
            import graders

            try:
                self._cache[key] = self.prompt.render(self.train[key])
            except graders.TemplateVariableError as exc:
                raise TrainingDataError(f"{self.dataset.path}: item {key!r}: cannot render the prompt: {exc}") from None
        return self._cache[key]


def _source(spec: EvalSpec, prompter: _Prompter, captures: list[dict[str, Any]], **extra: Any) -> dict[str, Any]:
    return {"eval": spec.name, "spec": spec.source, "dataset_id": prompter.dataset.content_hash,
            "prompt_id": prompter.prompt_id, "captures": [c["id"] for c in captures],
            "teachers": sorted({c["teacher"] for c in captures}), **extra}


def _no_captures(store: Store, spec: EvalSpec) -> TrainingDataError:
    return TrainingDataError(
        f"{store.path}: no captures for eval {spec.name!r} and no reviewer corrections: run "
        f"`flywheel capture {spec.source} --teacher MODEL` first (offline: --teacher reference:FIELD for the "
        "labelled answers, or the student itself with --n 8 for best-of-K)")


def _why_nothing_passed(samples: list[_Sample], spec: EvalSpec, min_score: float | None) -> str:
    errored = [s for s in samples if s.error]
    if samples and len(errored) == len(samples):
        return (f"all {len(samples)} captured samples errored (first: {errored[0].error}); the teacher produced "
                "nothing to train on: check the teacher reference and its server")
    best = max((s.objective for s in samples), default=math.nan)
    rule = f"objective score >= {min_score}" if min_score is not None else "pass every grader"
    return (f"none of the {len(samples)} captured samples ({len(errored)} errored) {rule} (best objective score "
            f"{best:.2f}): all captures failed; capture with a stronger teacher, more samples (--n) at a higher "
            "temperature, or --teacher reference:FIELD")


def _unlabelled_items(store: Store, captures: list[dict[str, Any]]) -> list[Item]:
    """The inputs of unlabelled captures, read back from the store."""
    out: list[Item] = []
    for dataset_id in dict.fromkeys(c["dataset_id"] for c in captures if c["split"] == "unlabelled"):
        out += [Item(key=row["key"], fields=row["fields"], split="unlabelled", line=row["line"])
                for row in store.dataset_items(dataset_id)]
    return out


# -- SFT -------------------------------------------------------------------------------------------
def build_sft_set(spec: EvalSpec, store: Store, *, min_score: float | None = None, max_per_item: int = 1,
                  captures: Sequence[str] | None = None, include_reviews: bool = True,
                  prompt: Prompt | None = None, dataset: Dataset | None = None) -> TrainingSet:
    """SFT rows from captured outputs that pass every grader (or reach `min_score` on the objective),
    at most `max_per_item` distinct outputs per item (best first), plus reviewer corrections
    (and outputs a reviewer marked `pass`) of train items. Raises TrainingDataError when empty.
    `dataset`: the eval's loaded dataset, when the caller holds one (else it is loaded here)."""
    dataset = dataset if dataset is not None else load_dataset(spec)
    capture_rows = _captures(store, spec, dataset.content_hash, captures)
    prompter = _Prompter(spec, prompt, _unlabelled_items(store, capture_rows), dataset)
    samples = _captured_samples(store, spec, capture_rows)
    reviews, _, reviewed = _reviewed(store, prompter.dataset.content_hash) if include_reviews else ({}, [], {})
    if not capture_rows and not reviews:
        raise _no_captures(store, spec)

    def eligible(s: _Sample) -> bool:
        if s.error or s.output is None or not s.output.strip():
            return False
        return s.objective >= min_score if min_score is not None else s.passed_all()

    skipped_split = sum(1 for s in samples if s.item_key not in prompter.train)
    by_item: dict[str, list[_Sample]] = {}
    for s in samples:
        if s.item_key in prompter.train and eligible(s):
            by_item.setdefault(s.item_key, []).append(s)
    rows: list[dict[str, Any]] = []
    seen: set[str] = set()

    def add(key: str, target: str) -> bool:
        row = {"messages": [*prompter(key), _assistant(target)]}
        fingerprint = json.dumps(row, sort_keys=True)
        if fingerprint in seen:
            return False
        seen.add(fingerprint)
        rows.append(row)
        return True

    for key in prompter.train:  # dataset order: deterministic rows, so a deterministic hash
        kept = 0
        for s in sorted(by_item.get(key, []), key=lambda s: (-s.objective, len(s.output or ""), s.id)):
            if kept >= max_per_item:
                break
            kept += add(key, s.output)  # type: ignore[arg-type]
    from_captures = len(rows)
    for sample_id, review in sorted(reviews.items()):
        sample = reviewed[sample_id]
        if sample["item_key"] not in prompter.train:
            continue
        if review.correction is not None:
            add(sample["item_key"], review.correction)
        elif review.verdict == "pass" and sample.get("output_text"):
            add(sample["item_key"], sample["output_text"])
    source = _source(spec, prompter, capture_rows, method="sft",
                     filter={"min_score": min_score, "max_per_item": max_per_item, "rule": "min_score" if min_score
                             is not None else "passed_all"},
                     counts={"captured_samples": len(samples), "passing": sum(map(len, by_item.values())),
                             "items_with_pass": len(by_item), "rows": len(rows), "rows_from_reviews": len(rows) - from_captures,
                             "unlabelled_items_with_pass": sum(1 for k in by_item if prompter.train[k].split == "unlabelled"),
                             "skipped_not_train": skipped_split})
    if not rows:
        raise TrainingDataError(f"empty SFT training set for eval {spec.name!r}: "
                                + _why_nothing_passed([s for s in samples if s.item_key in prompter.train], spec, min_score))
    return TrainingSet("sft", rows, source)


# -- DPO -------------------------------------------------------------------------------------------
def build_dpo_set(spec: EvalSpec, store: Store, *, min_margin: float = 0.5, captures: Sequence[str] | None = None,
                  include_reviews: bool = True, prompt: Prompt | None = None,
                  dataset: Dataset | None = None) -> TrainingSet:
    """DPO pairs: per train item, the best vs the worst graded captured output when their objective
    scores differ by at least `min_margin` (ties broken by passing every grader, then length), plus
    reviewer preferences and corrections (the correction preferred over the reviewed output)."""
    if min_margin < 0:
        raise TrainingDataError(f"min_margin must be >= 0, got {min_margin}")
    prompter = _Prompter(spec, prompt, dataset=dataset)
    capture_rows = _captures(store, spec, prompter.dataset.content_hash, captures)
    samples = _captured_samples(store, spec, capture_rows)
    reviews, prefs, reviewed = _reviewed(store, prompter.dataset.content_hash) if include_reviews else ({}, [], {})
    if not capture_rows and not reviews and not prefs:
        raise _no_captures(store, spec)

    by_item: dict[str, list[_Sample]] = {}
    for s in samples:
        if s.item_key in prompter.train and s.error is None and s.output is not None:
            by_item.setdefault(s.item_key, []).append(s)
    rows: list[dict[str, Any]] = []
    seen: set[str] = set()
    margins: list[float] = []

    def add(key: str, chosen: str, rejected: str) -> None:
        if chosen == rejected:
            return
        row = {"input": {"messages": prompter(key)}, "preferred_output": [_assistant(chosen)],
               "non_preferred_output": [_assistant(rejected)]}
        fingerprint = json.dumps(row, sort_keys=True)
        if fingerprint not in seen:
            seen.add(fingerprint)
            rows.append(row)

    for key in prompter.train:
        group = by_item.get(key, [])
        if len(group) < 2:
            continue
        ranked = sorted(group, key=lambda s: (-s.objective, not s.passed_all(), len(s.output or ""), s.id))
        best, worst = ranked[0], ranked[-1]
        margin = best.objective - worst.objective
        if margin >= min_margin and margin > 0 and best.output != worst.output:
            margins.append(margin)
            add(key, best.output, worst.output)  # type: ignore[arg-type]
    from_captures = len(rows)
    for p in prefs:
        chosen, rejected = reviewed[p.chosen], reviewed[p.rejected]
        if chosen["item_key"] in prompter.train and chosen["output_text"] and rejected["output_text"]:
            add(chosen["item_key"], chosen["output_text"], rejected["output_text"])
    for sample_id, review in sorted(reviews.items()):
        sample = reviewed[sample_id]
        if review.correction is not None and sample["item_key"] in prompter.train and sample.get("output_text"):
            add(sample["item_key"], review.correction, sample["output_text"])
    source = _source(spec, prompter, capture_rows, method="dpo", filter={"min_margin": min_margin},
                     counts={"captured_samples": len(samples), "items_with_two_outputs":
                             sum(1 for g in by_item.values() if len(g) >= 2), "pairs": len(rows),
                             "pairs_from_reviews": len(rows) - from_captures,
                             "mean_margin": sum(margins) / len(margins) if margins else None})
    if not rows:
        if samples and all(s.error for s in samples):
            raise TrainingDataError(f"no DPO pairs for eval {spec.name!r}: " + _why_nothing_passed(samples, spec, None))
        raise TrainingDataError(
            f"no DPO pairs for eval {spec.name!r}: {source['counts']['items_with_two_outputs']} train items have two "
            f"or more captured outputs, but in none do the best and worst differ by min_margin={min_margin}; "
            "capture more samples per item (--n 4 or more) at temperature > 0 from a model that sometimes fails")
    return TrainingSet("dpo", rows, source)


# -- RFT -------------------------------------------------------------------------------------------
def build_rft_set(spec: EvalSpec, *, prompt: Prompt | None = None,
                  limit: int | None = None, dataset: Dataset | None = None) -> TrainingSet:
    """RFT prompts: per train item, the rendered prompt plus every item field (what the graders read
    as `{{item.x}}`), in the platform's reinforcement format."""
    prompter = _Prompter(spec, prompt, dataset=dataset)
    rows = []
    for key, item in list(prompter.train.items())[:limit]:
        clash = [name for name in RFT_RESERVED if name in item.fields]
        if clash:
            raise TrainingDataError(
                f"{prompter.dataset.path}: item {key!r} has a field named {clash[0]!r}, which the reinforcement "
                f"format reserves ({', '.join(RFT_RESERVED)}); rename it with dataset.columns")
        rows.append({"messages": prompter(key), **item.fields})
    source = _source(spec, prompter, [], method="rft", counts={"prompts": len(rows)})
    return TrainingSet("rft", rows, source)


# -- several evals ---------------------------------------------------------------------------------
COMBINABLE = ("sft", "dpo")  # RFT rewards come from one eval's graders


def combine_training_sets(parts: Sequence[TrainingSet], weights: Sequence[float] | None = None, *,
                          seed: int = 0) -> TrainingSet:
    """One training set from the sets of several evals (of one kind), weighted.

    Each row keeps its own eval's rendered prompt. A part of weight w contributes its rows floor(w)
    times plus a seeded sample of the fraction left (0.5: half of them, 2: each twice), so a weight
    is how many times an epoch goes over that eval's rows. The source records every part (eval,
    dataset, prompt, rows, content hash, weight, rows used) and its own source.

    >>> a = TrainingSet("sft", [{"messages": [{"role": "user", "content": str(i)}]} for i in range(4)], {"eval": "a"})
    >>> b = TrainingSet("sft", [{"messages": [{"role": "user", "content": "b"}]}], {"eval": "b"})
    >>> len(combine_training_sets([a, b], [0.5, 3]))
    5
    """
    import random

    if not parts:
        raise TrainingDataError("no training sets to combine")
    weights = [1.0] * len(parts) if weights is None else [float(w) for w in weights]
    if len(weights) != len(parts):
        raise TrainingDataError(f"{len(weights)} weights for {len(parts)} evals: give one weight per eval "
                                "(e.g. --weights 2,1)")
    bad = [w for w in weights if not math.isfinite(w) or w <= 0]
    if bad:
        raise TrainingDataError(f"weights must be positive numbers, got {bad[0]}")
    kinds = {part.kind for part in parts}
    if len(kinds) > 1:
        raise TrainingDataError(f"cannot combine training sets of different kinds: {', '.join(sorted(kinds))}")
    kind = parts[0].kind
    if kind not in COMBINABLE:
        raise TrainingDataError(f"{kind} sets cannot be combined across evals (their rewards are one eval's "
                                f"graders); combine {' or '.join(COMBINABLE)} sets")
    names = [str(part.source.get("eval") or f"set{i}") for i, part in enumerate(parts)]
    if len(set(names)) < len(names):
        raise TrainingDataError(f"the same eval appears twice among {', '.join(names)}: weight it instead")
    rows: list[dict[str, Any]] = []
    described = []
    for index, (part, weight, name) in enumerate(zip(parts, weights, names)):
        whole, fraction = int(weight), weight - int(weight)
        chosen = [row for _ in range(whole) for row in part.rows]
        extra = round(fraction * len(part.rows))
        if extra:  # a seeded sample, in the part's own order
            picked = sorted(random.Random(f"{seed}:{index}:{part.content_hash}").sample(range(len(part.rows)), extra))
            chosen += [part.rows[i] for i in picked]
        if not chosen:
            raise TrainingDataError(f"eval {name!r}: weight {weight:g} of {len(part.rows)} rows leaves no row")
        rows += chosen
        described.append({"eval": name, "weight": weight, "rows": len(part.rows), "rows_used": len(chosen),
                          "content_hash": part.content_hash, "id": part.id, "dataset_id": part.source.get("dataset_id"),
                          "prompt_id": part.source.get("prompt_id"), "source": part.source})
    source = {"eval": "+".join(names), "evals": names, "weights": weights, "method": kind, "seed": seed,
              "dataset_id": "+".join(str(d.get("dataset_id")) for d in described), "parts": described,
              "counts": {"rows": len(rows)}}
    return TrainingSet(kind, rows, source)


def record_training_set(store: Store, training_set: TrainingSet) -> TrainingSet:
    """Write the set's JSONL under .flywheel/sets/ and record it (once per content hash)."""
    validate_rows(training_set.kind, training_set.rows, f"{training_set.kind} training set")
    digest = training_set.content_hash
    set_id = f"ts-{training_set.kind}-{digest[:12]}"
    path = store.artefact_dir / "sets" / f"{set_id}.jsonl"
    if not path.exists():
        staging = path.with_suffix(".partial")
        training_set.to_jsonl(staging)
        staging.replace(path)
    store.add_training_set(
        {"id": set_id, "kind": training_set.kind, "eval_name": training_set.source.get("eval"),
         "dataset_id": training_set.source.get("dataset_id"), "content_hash": digest, "n_rows": len(training_set),
         "path": str(path), "source_json": json.dumps(training_set.source, ensure_ascii=False, default=str)})
    training_set.id, training_set.path = set_id, str(path)
    return training_set


def load_training_set(store: Store, set_id: str) -> TrainingSet:
    """A recorded set by id; its JSONL must still hash to what was recorded."""
    row = store.get_training_set(set_id)
    if row is None:
        raise TrainingDataError(f"{store.path}: no training set {set_id!r}")
    loaded = load_training_file(row["kind"], row["path"])
    loaded.source = json.loads(row["source_json"] or "{}")
    if loaded.content_hash != row["content_hash"]:
        raise TrainingDataError(f"{row['path']}: content changed since it was recorded as {set_id}")
    loaded.id, loaded.path = set_id, row["path"]
    return loaded
