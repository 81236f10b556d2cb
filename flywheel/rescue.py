"""`flywheel rescue`: keep what a platform fine-tune learned in a model you own, with evidence.

    rescue = load_rescue_spec("rescue.yaml")            # or RescueSpec(eval=..., teacher="openai:ft:...")
    plan = plan_rescue(rescue, store)                   # teacher calls and their price, nothing spent
    result = run_rescue(rescue, store, out_dir="rescue-out")   # distil, train, compare, certify

The teacher is the user's fine-tune (`openai:ft:...`, reached through `teacher_options.base_url`
or $OPENAI_BASE_URL); the student a local open model (`local:smollm2` by default, or any HF
folder). The rescue

1. **distils**: imported stored completions of the teacher (flywheel.importers.completions) are its
   answers already — free SFT rows (flywheel.proxy.captures.sft_example), except a held-back share
   kept for the comparison; the eval's train items are answered by the teacher (flywheel.distill.
   capture, graded by the eval's graders, only passing answers kept: flywheel.train.sets.build_sft_set);
2. **trains** the student with SFT through the one training door (flywheel.train.run);
3. **compares** student and teacher on the eval's test split (flywheel.harness.run_eval, paired
   per item) and on held-back traffic, and writes the parity certificate (flywheel.certificate).

Money: each teacher call is priced from its usage (flywheel.pricing: `ft:` models at the platform's
fine-tuned inference rate). The plan estimates tokens before anything is spent; with `budget_usd`
the eval's train items the teacher answers are cut to what fits after the test comparison, and a
budget that cannot pay for the comparison itself stops the rescue before the first call.
"""

from __future__ import annotations

import json
import math
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Callable

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError

from flywheel.distill import InputsSpec
from flywheel.errors import RescueError, SpecError
from flywheel.store import Store
from flywheel.store.rows import Capture, SampleWithGrades

DEFAULT_STUDENT = "local:smollm2"


class _Settings(BaseModel):
    model_config = ConfigDict(extra="forbid")


class TrafficSpec(_Settings):
    """Which imported stored completions (captures) are the teacher's traffic."""

    model: str | None = Field(default=None, description="Captures of this model (default: the teacher's name).")
    metadata: dict[str, str] = Field(default_factory=dict, description="Metadata values a capture must carry.")
    since: str | None = Field(default=None, description="Only captures at or after this date/time.")
    until: str | None = Field(default=None, description="Only captures before this date/time.")
    holdout: float = Field(default=0.2, ge=0, lt=1, description="Share held back from training for the comparison.")


class RescueSpec(_Settings):
    """A rescue: the run-spec template `flywheel rescue` writes for the user to keep and rerun."""

    eval: str = Field(description="The eval spec (e.g. from `flywheel import openai-eval`), relative to this file.")
    teacher: str = Field(description="The platform fine-tune, e.g. openai:ft:gpt-4o-mini-2024-07-18:acme::abc123.")
    teacher_options: dict[str, Any] = Field(default_factory=dict,
                                            description="Options of the teacher model (base_url, prices, concurrency).")
    student: str = Field(default=DEFAULT_STUDENT, description="The local student: local:NAME or local:PATH.")
    student_options: dict[str, Any] = Field(default_factory=dict, description="Options of the student (dtype, ...).")
    traffic: TrafficSpec | None = Field(default_factory=TrafficSpec,
                                        description="Imported stored completions to train on and hold back (null: none).")
    unlabelled: InputsSpec | None = Field(default=None, description=(
        "Inputs with no reference (flywheel.distill.InputsSpec: a file of items, or proxy captures): the teacher "
        "answers each `n` times at `temperature` and the majority answer is kept by self-consistency "
        "(flywheel.distill.capture_unlabelled). Paid calls, cut to the budget after the eval's train items."))
    samples_per_item: int = Field(default=1, ge=1, le=16, description="Teacher answers per eval train item.")
    train_limit: int | None = Field(default=None, ge=0, description="At most this many eval train items for the teacher.")
    margin: float = Field(default=0.05, gt=0, lt=1, description="Non-inferiority margin on the objective (absolute).")
    budget_usd: float | None = Field(default=None, ge=0, description="Most USD the teacher's calls may cost.")
    student_usd_per_hour: float = Field(default=0.0, ge=0,
                                        description="What the student's machine costs per hour (0: hardware you own).")
    train: dict[str, Any] = Field(default_factory=dict, description="SFT settings (flywheel.train SFTSpec fields).")
    seed: int = Field(default=0, description="Seed of the held-back split and the statistics.")

    @property
    def teacher_name(self) -> str:
        """The model name the app sends (and the student will be served under)."""
        return self.teacher.split(":", 1)[1] if self.teacher.startswith("openai:") else self.teacher


def load_rescue_spec(path: str | Path, overrides: dict[str, Any] | None = None) -> RescueSpec:
    """Read a rescue spec (YAML); SpecError lines `file: field: message`."""
    from flywheel.spec import read_yaml

    data = read_yaml(Path(path))
    try:
        return RescueSpec.model_validate({**(data or {}), **(overrides or {})})
    except ValidationError as exc:
        raise SpecError("\n".join(f"{path}: {'.'.join(map(str, e['loc'])) or '(top)'}: {e['msg']}"
                                  for e in exc.errors())) from None


# -- the plan ----------------------------------------------------------------------------------------
@dataclass
class TeacherCalls:
    purpose: str
    calls: int
    usd: float


@dataclass
class RescuePlan:
    """What a rescue will do and spend, before anything is spent."""

    eval_name: str
    teacher: str
    student: str
    traffic_train: int
    traffic_held: int
    train_items: int  # eval train items the teacher will answer (after the budget)
    train_items_available: int
    test_items: int
    unlabelled_inputs: int  # inputs with no reference the teacher answers (after the budget)
    unlabelled_available: int
    calls: list[TeacherCalls]
    usd_per_call: float
    budget_usd: float | None
    price_known: bool
    price_note: str | None = None  # why the price needs checking (flywheel.pricing.UNVERIFIED_NOTE)

    @property
    def teacher_calls(self) -> int:
        return sum(c.calls for c in self.calls)

    @property
    def usd(self) -> float:
        return sum(c.usd for c in self.calls)

    def to_dict(self) -> dict[str, Any]:
        return {**asdict(self), "teacher_calls": self.teacher_calls, "usd": self.usd}

    def summary_lines(self) -> list[str]:
        lines = [f"rescue of {self.teacher} into {self.student} on eval {self.eval_name}",
                 f"  traffic: {self.traffic_train} stored completions to train on (free: the teacher's own replies), "
                 f"{self.traffic_held} held back for the comparison"]
        for c in self.calls:
            lines.append(f"  teacher calls, {c.purpose}: {c.calls} (≈ ${c.usd:.4f})")
        lines.append(f"  total: {self.teacher_calls} teacher calls, ≈ ${self.usd:.4f} at ${self.usd_per_call:.6f} a call"
                     + ("" if self.price_known else " (no known price for this model: set teacher_options.prices)"))
        if self.price_note:
            lines.append(f"  note: {self.price_note}")
        if self.train_items < self.train_items_available:
            lines.append(f"  budget ${self.budget_usd:g}: the teacher answers {self.train_items} of "
                         f"{self.train_items_available} eval train items")
        if self.unlabelled_inputs < self.unlabelled_available:
            lines.append(f"  budget ${self.budget_usd:g}: the teacher answers {self.unlabelled_inputs} of "
                         f"{self.unlabelled_available} unlabelled inputs")
        return lines


def _spec_path(rescue: RescueSpec, base_dir: Path | None) -> Path:
    path = Path(rescue.eval)
    return path if path.is_absolute() else (base_dir or Path.cwd()) / path


def _traffic(rescue: RescueSpec, store: Store) -> tuple[list[Capture], list[Capture]]:
    """(train, held back) imported stored completions of the teacher; held back by a seeded hash
    of each completion's id, so a rerun holds back the same ones."""
    import hashlib

    from flywheel.proxy.captures import parse_when, sft_example

    if rescue.traffic is None:
        return [], []
    chosen = rescue.traffic
    rows = store.query_captures(metadata=chosen.metadata, since=parse_when(chosen.since),
                                until=parse_when(chosen.until, end=True, option="until"),
                                model=chosen.model or rescue.teacher_name, outcome="ok")
    rows = [r for r in rows if sft_example(r) is not None]
    train, held = [], []
    for row in rows:
        key = f"{rescue.seed}:{row.response_id or row.id}".encode()
        share = int(hashlib.sha256(key).hexdigest()[:8], 16) / 0xFFFFFFFF
        (held if share < chosen.holdout else train).append(row)
    return train, held


def _usd_per_call(rescue: RescueSpec, spec: Any, items: list[Any], traffic: list[Capture]) -> tuple[float, bool]:
    """Estimated USD of one teacher call: the traffic's mean usage when there is some, else ~4
    characters a token of the rendered prompts and the spec's max_tokens."""
    from flywheel.pricing import FREE, find_price
    from flywheel.prompt import Prompt

    price = find_price(rescue.teacher_name, rescue.teacher_options.get("prices"))
    used = [r for r in traffic if r.prompt_tokens is not None]
    if used:
        prompt = sum(r.prompt_tokens for r in used) / len(used)
        completion = sum(r.completion_tokens or 0 for r in used) / len(used)
    else:
        rendered = Prompt(messages=spec.messages()).render_many(items[:200]) if items else []
        texts = [json.dumps(m) for m in rendered if not isinstance(m, str)]
        prompt = sum(len(t) for t in texts) / max(len(texts), 1) / 4
        completion = spec.sampling.max_tokens or 64
    return price.cost(math.ceil(prompt), math.ceil(completion)), price != FREE


def _unlabelled_inputs(rescue: RescueSpec, spec: Any, store: Store, base_dir: Path | None) -> Any:
    """The rescue's unlabelled inputs (flywheel.distill.load_inputs: the same reader `flywheel capture` uses)."""
    from flywheel.distill import load_inputs

    return load_inputs(spec, rescue.unlabelled, store, base_dir)


def _price_note(rescue: RescueSpec) -> str | None:
    from flywheel.pricing import UNVERIFIED_NOTE, unverified_price

    return UNVERIFIED_NOTE if unverified_price(rescue.teacher_name, rescue.teacher_options.get("prices")) else None


def plan_rescue(rescue: RescueSpec, store: Store, *, base_dir: Path | None = None) -> RescuePlan:
    """Count the teacher calls a rescue makes and price them; nothing is called."""
    from flywheel.data import load_dataset
    from flywheel.spec import load_eval_spec

    spec = load_eval_spec(_spec_path(rescue, base_dir))
    dataset = load_dataset(spec)
    train_items, test_items = dataset.split("train"), dataset.split("test")
    if not test_items:
        raise RescueError(f"{spec.source}: eval {spec.name!r} has no test items: the comparison needs a held-back split")
    available = len(train_items) if rescue.train_limit is None else min(rescue.train_limit, len(train_items))
    traffic_train, traffic_held = _traffic(rescue, store)
    per_call, known = _usd_per_call(rescue, spec, train_items + test_items, traffic_train + traffic_held)
    test_usd = per_call * len(test_items)
    n = rescue.samples_per_item
    teach = available
    inputs_available = len(_unlabelled_inputs(rescue, spec, store, base_dir).items) if rescue.unlabelled else 0
    votes = rescue.unlabelled.n if rescue.unlabelled else 0  # calls per input: the self-consistency vote
    unlabelled = inputs_available
    if rescue.budget_usd is not None:
        if test_usd > rescue.budget_usd:
            raise RescueError(f"budget ${rescue.budget_usd:g} does not pay for the comparison itself: the teacher "
                              f"answering {len(test_items)} test items costs ≈ ${test_usd:.4f}; raise --budget-usd "
                              "or use an eval with fewer test items. Nothing was spent.")
        if per_call > 0:
            left = rescue.budget_usd - test_usd
            teach = min(available, int(left / (per_call * n)))
            left -= teach * n * per_call
            unlabelled = min(inputs_available, int(left / (per_call * votes))) if votes else 0
    calls = [TeacherCalls(f"answer {teach} eval train items x{n} (training data)", teach * n, teach * n * per_call),
             TeacherCalls(f"answer {len(test_items)} eval test items (the comparison)", len(test_items), test_usd)]
    if rescue.unlabelled:
        calls.insert(1, TeacherCalls(f"answer {unlabelled} unlabelled inputs x{votes} (kept by self-consistency)",
                                     unlabelled * votes, unlabelled * votes * per_call))
    return RescuePlan(eval_name=spec.name, teacher=rescue.teacher, student=rescue.student,
                      traffic_train=len(traffic_train), traffic_held=len(traffic_held), train_items=teach,
                      train_items_available=available, test_items=len(test_items), unlabelled_inputs=unlabelled,
                      unlabelled_available=inputs_available, calls=calls, usd_per_call=per_call,
                      budget_usd=rescue.budget_usd, price_known=known, price_note=_price_note(rescue))


# -- the run -----------------------------------------------------------------------------------------
@dataclass
class RescueResult:
    """What `run_rescue` did: the plan, the student it trained, the certificate it wrote."""

    plan: RescuePlan
    student: str  # the trained student's model reference (base + adapter)
    checkpoint_id: str
    training_rows: int
    teacher_calls: int
    teacher_usd: float
    parity_shown: bool
    statement: str
    certificate_json: str
    certificate_html: str
    spec_path: str  # the rescue spec written for the user to keep
    wall_s: float
    notes: list[str] = field(default_factory=list)

    def to_dict(self) -> dict[str, Any]:
        return {**asdict(self), "plan": self.plan.to_dict()}

    def summary_lines(self) -> list[str]:
        return [f"student {self.student} trained on {self.training_rows} rows (checkpoint {self.checkpoint_id})",
                f"teacher calls {self.teacher_calls} (≈ ${self.teacher_usd:.4f}); wall {self.wall_s:.1f}s",
                *[f"note: {n}" for n in self.notes], self.statement,
                f"certificate: {self.certificate_html} (+ {Path(self.certificate_json).name}); "
                f"rescue spec kept at {self.spec_path}"]


def _fold(text: str | None) -> str:
    return " ".join((text or "").split()).casefold()


def _user_text(messages: list[dict[str, Any]]) -> str:
    last = next((m.get("content") for m in reversed(messages) if m.get("role") == "user"), "")
    if isinstance(last, list):
        last = "".join(p.get("text", "") for p in last if isinstance(p, dict))
    return str(last or "")


def write_rescue_spec(rescue: RescueSpec, path: str | Path) -> Path:
    """The rescue as a YAML run spec the user keeps (`flywheel rescue --spec rescue.yaml` reruns it)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    header = ("# flywheel rescue spec: rerun with `flywheel rescue --spec " + path.name + "` (docs/rescue.md)\n")
    path.write_text(header + yaml.safe_dump(rescue.model_dump(mode="json"), sort_keys=False, allow_unicode=True),
                    encoding="utf-8")
    return path


def _side_cost(model: str, samples: list[SampleWithGrades], *, price: Any = None, usd_per_hour: float = 0.0,
               price_note: str | None = None) -> Any:
    from flywheel.certificate import SideCost

    ok = [s for s in samples if not s.error and not s.cache_hit] or [s for s in samples if not s.error]
    latencies = sorted(float(s.latency_s) * 1000 for s in ok if s.latency_s is not None)
    prompt = sum(s.prompt_tokens or 0 for s in ok) / max(len(ok), 1)
    completion = sum(s.completion_tokens or 0 for s in ok) / max(len(ok), 1)
    mean = sum(latencies) / len(latencies) if latencies else None
    p95 = latencies[min(len(latencies) - 1, int(0.95 * len(latencies)))] if latencies else None
    if price is not None:
        usd = price.cost(round(prompt), round(completion)) * 1000
        basis = (f"list price ${price.input:g} / ${price.output:g} per 1M tokens in / out"
                 + (f" ({price_note})" if price_note else ""))
    else:
        usd = (mean or 0) / 1000 * 1000 / 3600 * usd_per_hour
        basis = (f"machine time at ${usd_per_hour:g}/hour, one request at a time (an upper bound)" if usd_per_hour
                 else "hardware you own (set student_usd_per_hour to price it)")
    return SideCost(model=model, usd_per_1k_requests=usd, basis=basis, latency_ms_mean=mean, latency_ms_p95=p95,
                    prompt_tokens_mean=prompt, completion_tokens_mean=completion)


def _eval_parity(store: Store, spec: Any, teacher_iter: str, student_iter: str, margin: float,
                 seed: int) -> tuple[Any, list[Any], list[SampleWithGrades], list[SampleWithGrades]]:
    from flywheel.certificate import Disagreement, EvalParity, GraderDiff
    from flywheel.harness import paired_comparison
    from flywheel.promotion import describe_test, non_inferior
    from flywheel.stats import paired_stats

    cmp = paired_comparison(store, spec, teacher_iter, student_iter)  # b − a: student − teacher
    objective = (spec.objective_grader, spec.objective.metric)
    teacher_samples = store.samples_with_grades(teacher_iter, objective)
    student_samples = store.samples_with_grades(student_iter, objective)
    by_key_t = {(s.item_key, s.repeat): s for s in teacher_samples}
    by_key_s = {(s.item_key, s.repeat): s for s in student_samples}
    keys = sorted(set(by_key_t) & set(by_key_s))
    graders_diff = []
    for grader in [g["name"] for g in spec.graders]:
        def score(sample: SampleWithGrades) -> tuple[float, bool]:
            grade = sample.grade(grader)
            return (float(grade.score or 0), bool(grade.passed)) if grade and not sample.error else (0.0, False)
        pairs = [(score(by_key_t[k]), score(by_key_s[k])) for k in keys]
        st = paired_stats([a[0] for a, _ in pairs], [b[0] for _, b in pairs], [a[1] for a, _ in pairs],
                          [b[1] for _, b in pairs], seed=seed)
        graders_diff.append(GraderDiff(grader=grader, n=st["n"], teacher=st["mean_a"], student=st["mean_b"],
                                       diff=st["diff"], ci_low=st["ci_low"], ci_high=st["ci_high"]))
    parity = EvalParity(eval_name=spec.name, split="test", n=cmp["n"], objective=spec.objective_grader,
                        teacher=cmp["mean_a"], student=cmp["mean_b"], diff=cmp["diff"], ci_low=cmp["ci_low"],
                        ci_high=cmp["ci_high"], low_one_sided=cmp["low_one_sided"], non_inferior=non_inferior(cmp, margin),
                        test=f"paired over {cmp['n']} items; {describe_test(cmp, spec.objective.metric)}; one-sided "
                             f"paired bootstrap 95% lower bound {cmp['low_one_sided']:+.3f} vs −{margin:g}",
                        graders=graders_diff)
    disagreements = []
    for k in keys:
        t, s = by_key_t[k], by_key_s[k]
        if bool(t.passed) != bool(s.passed):
            try:
                text = _user_text(json.loads(t.input_json or "[]"))
            except (TypeError, ValueError):
                text = ""
            disagreements.append(Disagreement(where="eval", key=str(k[0]), input=text[:500],
                                              teacher=(t.output_text or "")[:500], student=(s.output_text or "")[:500]))
    return parity, disagreements, teacher_samples, student_samples


def _traffic_parity(student_model: Any, held: list[Capture], spec: Any, margin: float) -> tuple[Any, list[Any]]:
    from flywheel.certificate import Disagreement, TrafficParity
    from flywheel.models import ChatRequest, Sampling
    from flywheel.proxy.captures import reply_message
    from flywheel.stats import wilson_ci

    if not held:
        return None, []
    sampling = Sampling(temperature=0.0, max_tokens=spec.sampling.max_tokens or 64)
    requests = [ChatRequest(json.loads(r.request_json)["messages"], sampling) for r in held]
    outputs = student_model.generate(requests)
    agreed, disagreements = 0, []
    for row, request, out in zip(held, requests, outputs):
        teacher = (reply_message(json.loads(row.response_json)) or {}).get("content") or ""
        if out.error is None and _fold(out.text) == _fold(teacher):
            agreed += 1
        else:
            disagreements.append(Disagreement(where="traffic", key=str(row.response_id or row.id),
                                              input=_user_text(list(request.messages))[:500], teacher=teacher[:500],
                                              student=(out.text if out.error is None else f"error: {out.error}")[:500]))
    low, high = wilson_ci(agreed, len(held))
    return TrafficParity(n=len(held), agreed=agreed, agreement=agreed / len(held), ci_low=low, ci_high=high,
                         non_inferior=low >= 1 - margin), disagreements


def run_rescue(rescue: RescueSpec, store: Store, *, out_dir: str | Path, base_dir: Path | None = None,
               log: Callable[[str], None] | None = None) -> RescueResult:
    """Distil the teacher into the student, train, compare and write the certificate (module docstring)."""
    from flywheel.certificate import CertificateInputs, build_certificate, write_certificate
    from flywheel.data import load_dataset
    from flywheel.distill import capture
    from flywheel.harness import run_eval
    from flywheel.models import load_model
    from flywheel.pricing import find_price
    from flywheel.proxy.captures import sft_example
    from flywheel.spec import load_eval_spec
    from flywheel.train import SFTSpec, TrainRequest
    from flywheel.train import run as train
    from flywheel.train.formats import TrainingDataError, TrainingSet
    from flywheel.train.sets import build_sft_set, record_training_set

    say = log or (lambda line: None)
    started = time.perf_counter()
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    spec_path = _spec_path(rescue, base_dir)
    spec = load_eval_spec(spec_path)
    dataset = load_dataset(spec)
    plan = plan_rescue(rescue, store, base_dir=base_dir)
    for line in plan.summary_lines():
        say(line)
    try:
        train_config = SFTSpec(**{"seed": rescue.seed, **rescue.train})
    except ValidationError as exc:
        first = exc.errors()[0]
        raise SpecError(f"train.{'.'.join(map(str, first['loc']))}: {first['msg']}") from None
    notes: list[str] = []
    traffic_train, traffic_held = _traffic(rescue, store)

    # 1. distil: the teacher's stored replies, and its answers to the eval's train items
    rows = [row for row in (sft_example(c) for c in traffic_train) if row is not None]
    captured = None
    if plan.train_items:
        say(f"teacher answers {plan.train_items} eval train items")
        captured = capture(spec, store, rescue.teacher, n=rescue.samples_per_item, split="train",
                           limit=plan.train_items, teacher_options=rescue.teacher_options, dataset=dataset,
                           temperature=0.0 if rescue.samples_per_item == 1 else None)
        try:
            rows += build_sft_set(spec, store, captures=[captured.id], dataset=dataset, include_reviews=False).rows
        except TrainingDataError as exc:
            notes.append(f"no eval train item answered by the teacher passed the graders ({exc})")
    unlabelled = None
    if plan.unlabelled_inputs:
        from flywheel.distill import capture_unlabelled
        from flywheel.prompt import Prompt

        inputs = _unlabelled_inputs(rescue.model_copy(update={"unlabelled": rescue.unlabelled.model_copy(
            update={"limit": plan.unlabelled_inputs})}), spec, store, base_dir)
        chosen = rescue.unlabelled
        say(f"teacher answers {len(inputs.items)} unlabelled inputs x{chosen.n} (self-consistency)")
        unlabelled = capture_unlabelled(spec, store, rescue.teacher, inputs=inputs, prompt=Prompt(messages=spec.messages()),
                                        n=chosen.n, temperature=chosen.temperature, min_agreement=chosen.min_agreement,
                                        seed=rescue.seed, teacher_options=rescue.teacher_options, dataset=dataset)
        try:
            rows += build_sft_set(spec, store, captures=[unlabelled.id], dataset=dataset, include_reviews=False).rows
        except TrainingDataError as exc:
            notes.append(f"no unlabelled input reached self-consistency ({exc})")
    if not rows:
        raise RescueError("nothing to train on: import the teacher's stored completions (flywheel import "
                          "openai-completions) or give an eval whose train items the teacher answers correctly")
    training_set = record_training_set(store, TrainingSet("sft", rows, {
        "eval": spec.name, "dataset_id": dataset.content_hash, "method": "sft", "rescue_of": rescue.teacher,
        "counts": {"traffic_rows": len(traffic_train), "rows": len(rows)}, "captures": [
            c.id for c in (captured, unlabelled) if c is not None]}))
    say(f"training {rescue.student} on {len(rows)} rows")
    trained = train(TrainRequest(method="sft", spec=spec, store=store, base=rescue.student, config=train_config,
                                 data=training_set, dataset=dataset, evaluate=False, quiet=True, log=say))
    student_ref = trained.checkpoint.model_ref

    # 2. compare on the eval's test items (paired), and on held-back traffic
    teacher_model = load_model(rescue.teacher, rescue.teacher_options)
    try:
        say(f"teacher answers {plan.test_items} test items")
        teacher_run = run_eval(spec, store, split="test", model=teacher_model, stage="rescue-teacher", dataset=dataset)
    finally:
        teacher_model.close()
    student_model = load_model(student_ref, rescue.student_options)
    try:
        say("student answers the test items and the held-back traffic")
        student_run = run_eval(spec, store, split="test", model=student_model, stage="rescue-student", dataset=dataset)
        traffic, traffic_disagree = _traffic_parity(student_model, traffic_held, spec, rescue.margin)
    finally:
        student_model.close()
    parity, disagreements, teacher_samples, student_samples = _eval_parity(
        store, spec, teacher_run.iteration_id, student_run.iteration_id, rescue.margin, rescue.seed)
    price = find_price(rescue.teacher_name, rescue.teacher_options.get("prices"))
    spent = [s for s in teacher_samples if not s.cache_hit]
    for paid in (captured, unlabelled):
        if paid is not None:
            spent += [s for s in store.samples_with_grades(paid.iteration_id, details=False) if not s.cache_hit]
    teacher_usd = sum(price.cost(s.prompt_tokens or 0, s.completion_tokens or 0) for s in spent)
    teacher_calls = len(spent)  # answers served from the harness cache were not paid again
    costs = {"teacher": _side_cost(rescue.teacher, teacher_samples, price=price, price_note=plan.price_note),
             "student": _side_cost(student_ref, student_samples, usd_per_hour=rescue.student_usd_per_hour)}

    # 3. the certificate, with the data it vouches for written beside it
    held_path = out / "held-back-traffic.jsonl"
    held_path.write_text("".join(json.dumps({"id": r.response_id or r.id, "request": json.loads(r.request_json),
                                             "response": json.loads(r.response_json)}, ensure_ascii=False) + "\n"
                                 for r in traffic_held), encoding="utf-8")
    kept = {"eval": str(spec_path.resolve())}
    if rescue.unlabelled is not None and rescue.unlabelled.path is not None:  # paths the kept spec resolves anywhere
        kept["unlabelled"] = rescue.unlabelled.model_copy(update={"path": str(
            (base_dir or Path.cwd()).joinpath(rescue.unlabelled.path).resolve())})
    kept_spec = write_rescue_spec(rescue.model_copy(update=kept), out / "rescue.yaml")
    files = [("eval spec", str(spec_path)), ("eval data", str(dataset.path)), ("training set", training_set.path),
             ("held-back traffic", str(held_path)), ("rescue spec", str(kept_spec))]
    cert = build_certificate(CertificateInputs(
        teacher=rescue.teacher, student=student_ref, served_name=rescue.teacher_name, margin=rescue.margin,
        eval_parity=parity, traffic=traffic, disagreements=disagreements + traffic_disagree, costs=costs, files=files,
        teacher_calls=teacher_calls, teacher_usd=teacher_usd, training_rows=len(rows), student_base=rescue.student,
        adapter_path=trained.checkpoint.path))
    json_path, html_path = write_certificate(cert, out)
    return RescueResult(plan=plan, student=student_ref, checkpoint_id=trained.checkpoint.id, training_rows=len(rows),
                        teacher_calls=teacher_calls, teacher_usd=teacher_usd, parity_shown=cert.parity_shown,
                        statement=cert.statement, certificate_json=str(json_path), certificate_html=str(html_path),
                        spec_path=str(kept_spec), wall_s=time.perf_counter() - started, notes=notes)
