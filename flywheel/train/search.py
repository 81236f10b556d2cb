"""Hyper-parameter search: many training jobs over a space of settings, the best chosen on `valid`.

A search space names keys of the method's config (`learning_rate`, `batch_size`, `epochs`,
`lora.r`, `lora.alpha`, `lora.dropout`, `beta` for DPO, ...) with a distribution each:

    learning_rate: {low: 1.0e-5, high: 1.0e-3, log: true}   # a float range (log-uniform)
    lora.r: {choices: [8, 16, 32]}                          # categorical
    epochs: {low: 1, high: 3, step: 1}                      # int/float range with a step

Optuna samples the trials (`tpe`: Bayesian TPE; `random`; `grid`: every combination of choices
and stepped ranges). Every trial is a real training job in the store (its row in
`training_search_trials` points at the job and the checkpoint) evaluated on `valid`. A MedianPruner
is fed the trial's loss as training runs: the eval loss TRL reports when the trainer evaluates an
eval_dataset, else the training loss; a trial whose loss is worse than the median of earlier trials
at the same step is stopped (optuna.TrialPruned) and recorded as `pruned`.

The winner: the top `finalists` completed trials by valid score are paired item by item with the
leader (flywheel.promotion's test: McNemar for pass/fail, bootstrap CI otherwise). The leader wins
when it is significantly better than each; otherwise the simplest of those no test separates from
it wins (lowest LoRA rank, then fewest examples trained, then least wall time).

    search = load_search_spec("sft", "space.yaml", trials=6)
    result = run_search("sft", spec, store, training_set, search, base="local:smollm2", config=SFTSpec())
    print("\\n".join(result.summary_lines()))
"""

from __future__ import annotations

import difflib
import json
import math
import time
import types
import typing
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator

from flywheel.errors import FlywheelError, SpecError
from flywheel.harness import paired_comparison
from flywheel.promotion import describe_test, significantly_better
from flywheel.spec import SEED_MAX, EvalSpec, format_validation_error, read_yaml
from flywheel.store import Store, now
from flywheel.train.checkpoints import resolve_base
from flywheel.train.config import TrainConfig
from flywheel.train.methods import training_method
from flywheel.train.sets import record_training_set

SAMPLERS = ("tpe", "random", "grid")
Scalar = str | int | float | bool | None


class _Config(BaseModel):
    model_config = ConfigDict(extra="forbid")


class Distribution(_Config):
    """Where one setting's values come from: `choices`, or a `low`..`high` range."""

    low: float | None = Field(default=None, description="Smallest value of a range.")
    high: float | None = Field(default=None, description="Largest value of a range.")
    log: bool = Field(default=False, description="Sample the range log-uniformly (low must be > 0).")
    step: float | None = Field(default=None, gt=0, description="Spacing of a range's values (a grid needs it "
                               "for floats); ints step by 1 unless told.")
    choices: list[Scalar] | None = Field(default=None, min_length=1, description="The values to pick from.")

    @model_validator(mode="after")
    def _one_kind(self) -> "Distribution":
        if self.choices is not None:
            if self.low is not None or self.high is not None or self.log or self.step is not None:
                raise ValueError("give either choices or low/high, not both")
            return self
        if self.low is None or self.high is None:
            raise ValueError("a distribution needs choices, or both low and high")
        if not self.low < self.high:
            raise ValueError(f"low ({self.low:g}) must be below high ({self.high:g})")
        if self.log and self.low <= 0:
            raise ValueError("log needs low > 0")
        if self.log and self.step is not None:
            raise ValueError("a log range takes no step")
        return self


class SearchSpec(_Config):
    """A hyper-parameter search: the space, how it is sampled, pruned and budgeted."""

    space: dict[str, Distribution] = Field(min_length=1, description="Config key (dotted: lora.r) -> distribution.")
    trials: int = Field(default=10, ge=1, description="Most trials (a grid stops when every point is tried).")
    sampler: Literal["tpe", "random", "grid"] = Field(default="tpe", description="tpe: Optuna's Bayesian TPE; "
                                                        "random; grid: every combination.")
    startup_trials: int | None = Field(default=None, ge=0, description="TPE: random trials before it models the "
                                       "results (default: a third of the trials, at least 2).")
    wall_s: float | None = Field(default=None, gt=0, description="Wall-clock budget of the whole search: no trial "
                                 "starts once it is spent.")
    pruning: bool = Field(default=True, description="Stop trials whose loss is worse than the median of earlier "
                          "trials at the same step (Optuna MedianPruner).")
    prune_startup_trials: int = Field(default=2, ge=0, description="Trials that finish before any is pruned.")
    prune_warmup_steps: int = Field(default=2, ge=0, description="Steps of each trial before it may be pruned.")
    finalists: int = Field(default=3, ge=1, description="Best trials by valid score paired against the leader.")
    seed: int = Field(default=0, ge=0, le=SEED_MAX, description="Seed of the sampler.")
    enqueue: list[dict[str, Scalar]] = Field(default_factory=list, description="Configurations tried first, in "
                                             "order (e.g. the defaults): each maps some of the space's keys to values.")


# -- the space, checked against the method's config ------------------------------------------------
def _config_keys(model: type[BaseModel], prefix: str = "") -> list[str]:
    keys = []
    for name, info in model.model_fields.items():
        inner = info.annotation
        if isinstance(inner, type) and issubclass(inner, BaseModel):
            keys += _config_keys(inner, f"{prefix}{name}.")
        else:
            keys.append(prefix + name)
    return keys


def _kind(annotation: Any) -> str:
    """int, float, or choice (anything else: strings, literals, booleans, lists)."""
    args = typing.get_args(annotation) if typing.get_origin(annotation) in (typing.Union, types.UnionType) else ()
    types_ = [a for a in args if a is not type(None)] or [annotation]
    if len(types_) == 1 and types_[0] is int:
        return "int"
    if len(types_) == 1 and types_[0] is float:
        return "float"
    return "choice"


def key_kind(config_class: type[TrainConfig], key: str, method: str) -> str:
    """The kind of a dotted config key; SpecError (with the known keys) when the method has no such key."""
    model: type[BaseModel] = config_class
    parts = key.split(".")
    for i, part in enumerate(parts):
        info = model.model_fields.get(part)
        inner = info.annotation if info else None
        nested = isinstance(inner, type) and issubclass(inner, BaseModel)
        if info is None or (i < len(parts) - 1 and not nested) or (i == len(parts) - 1 and nested):
            known = _config_keys(config_class)
            close = difflib.get_close_matches(key, known, n=1)
            hint = f" (did you mean {close[0]!r}?)" if close else ""
            raise SpecError(f"{key}: unknown key for {method}{hint}; known: {', '.join(known)}")
        if nested:
            model = inner
    return _kind(info.annotation)


def _with(values: dict[str, Any], key: str, value: Any) -> dict[str, Any]:
    """A copy of nested `values` with dotted `key` set to `value`."""
    out = json.loads(json.dumps(values, default=str))
    target = out
    *parents, last = key.split(".")
    for part in parents:
        target = target.setdefault(part, {})
    target[last] = value
    return out


def _read(config: BaseModel, key: str) -> Any:
    value: Any = config
    for part in key.split("."):
        value = getattr(value, part)
    return value


def check_space(method: str, space: dict[str, Distribution], base: TrainConfig | None = None) -> dict[str, str]:
    """Check every key and every bound or choice against the method's config class (with `base`'s
    other settings); returns key -> kind (int, float, choice). Choices are replaced by the values
    the config coerces them to (so `'1e-4'` becomes 1e-4). Raises SpecError as `key: message`."""
    config_class = training_method(method).config
    values = (base or config_class()).model_dump()
    kinds = {}
    for key, dist in space.items():
        kind = kinds[key] = key_kind(config_class, key, method)
        if dist.choices is None and kind == "choice":
            raise SpecError(f"{key}: not a number, so it takes choices, not low/high")
        if kind == "int" and dist.choices is None:
            bad = [v for v in (dist.low, dist.high, dist.step) if v is not None and float(v) != int(v)]
            if bad:
                raise SpecError(f"{key}: an integer setting needs integer low/high/step, got {bad[0]:g}")
        candidates = dist.choices if dist.choices is not None else [dist.low, dist.high]
        checked = []
        for value in candidates:
            if kind == "int" and dist.choices is None:
                value = int(value)
            try:
                config = config_class.model_validate(_with(values, key, value))
            except ValidationError as exc:
                err = exc.errors()[0]
                raise SpecError(f"{key}: {value!r} is not a valid value: {err['msg']}") from None
            checked.append(_read(config, key))
        if dist.choices is not None:
            if not all(isinstance(v, Scalar) for v in checked):  # type: ignore[arg-type]
                raise SpecError(f"{key}: choices must be single values (numbers, strings, booleans)")
            dist.choices = checked
    return kinds


def check_enqueued(search: "SearchSpec") -> None:
    """Enqueued configurations may only name keys of the space."""
    for i, params in enumerate(search.enqueue):
        unknown = sorted(set(params) - set(search.space))
        if unknown:
            raise SpecError(f"enqueue[{i}]: {unknown[0]}: not a key of the space ({', '.join(search.space)})")


def grid_values(key: str, dist: Distribution, kind: str) -> list[Any]:
    """The values a grid tries for one key: its choices, or its range by `step` (ints: 1)."""
    if dist.choices is not None:
        return list(dist.choices)
    if kind == "float" and dist.step is None:
        raise SpecError(f"{key}: a grid needs choices, or a step for a float range")
    step = dist.step or 1
    count = int(math.floor((dist.high - dist.low) / step + 1e-9)) + 1
    values = [dist.low + i * step for i in range(count)]
    return [int(round(v)) for v in values] if kind == "int" else [round(v, 12) for v in values]


def load_search_spec(method: str, path: str | Path, *, base: TrainConfig | None = None,
                     **overrides: Any) -> SearchSpec:
    """A search from a YAML file: a mapping of config keys to distributions (the space), or a full
    search (`space:` plus trials, sampler, ...). `overrides` (trials=, sampler=, wall_s=; None
    ignored) win over the file. Every key is checked against the method's config before any training.

    Errors are one line naming the file and the key: `space.yaml: lora.rank: unknown key for sft ...`."""
    source = str(path)
    data = read_yaml(Path(path))
    if "space" not in data:
        data = {"space": data}
    data.update({k: v for k, v in overrides.items() if v is not None})
    try:
        search = SearchSpec.model_validate(data)
    except ValidationError as exc:
        text = format_validation_error(source, exc)
        raise SpecError(text.replace(f"{source}: space.", f"{source}: ")) from None
    try:
        kinds = check_space(method, search.space, base)
        check_enqueued(search)
        if search.sampler == "grid":
            for key, dist in search.space.items():
                grid_values(key, dist, kinds[key])
    except SpecError as exc:
        raise SpecError(f"{source}: {exc}") from None
    return search


# -- records ---------------------------------------------------------------------------------------
@dataclass
class Trial:
    """One configuration tried: its params, state (complete, pruned, failed), valid score and loss."""

    number: int
    params: dict[str, Any]
    state: str = "running"
    job_id: str | None = None
    checkpoint_id: str | None = None
    model_ref: str | None = None
    valid_iteration_id: str | None = None
    valid_score: float | None = None
    loss: float | None = None
    steps: int | None = None
    wall_s: float | None = None
    error: str | None = None
    config: dict[str, Any] = field(default_factory=dict, repr=False)

    def cost_key(self) -> tuple[float, float, float]:
        """Simplest first: LoRA rank, then examples trained (steps x batch x accumulation), then wall time
        (`choose_best` puts the valid score before wall time)."""
        c = self.config
        examples = (self.steps or 0) * c.get("batch_size", 1) * c.get("grad_accum", 1)
        return (c.get("lora", {}).get("r", 0), examples, self.wall_s or 0.0)


@dataclass
class SearchResult:
    id: str
    method: str
    sampler: str
    signal: str
    metric: str
    trials: list[Trial]
    best: int | None
    checkpoint: Any  # flywheel.train.checkpoints.Checkpoint of the best trial
    reason: str
    comparisons: list[dict[str, Any]]
    stopped_by: str
    wall_s: float
    budget_s: float | None
    test: Any = None  # flywheel.train.local.SplitEval of the best trial on test, when asked

    def to_dict(self) -> dict[str, Any]:
        data = asdict(self)
        for trial in data["trials"]:
            trial.pop("config", None)
        return json.loads(json.dumps(data, default=str).replace("NaN", "null"))

    def summary_lines(self) -> list[str]:
        """The table `flywheel train --search` prints: every configuration, then the winner and why."""
        keys = sorted({k for t in self.trials for k in t.params})
        head = ["trial", "state", *keys, "valid", f"{self.signal}", "steps", "wall s", "checkpoint"]
        rows = [[str(t.number), t.state, *(_fmt(t.params.get(k)) for k in keys), _fmt(t.valid_score),
                 _fmt(t.loss), _fmt(t.steps), _fmt(t.wall_s, 1), t.checkpoint_id or (t.error or "")[:40]]
                for t in self.trials]
        widths = [max(len(r[i]) for r in [head, *rows]) for i in range(len(head))]
        lines = [f"{self.method} search {self.id}: {len(self.trials)} trials ({self.sampler}), "
                 f"{self.wall_s:.0f}s" + (f" of a {self.budget_s:.0f}s budget" if self.budget_s else "")
                 + f"; stopped by {self.stopped_by}; pruning fed by {self.signal}",
                 "  " + "  ".join(h.ljust(w) for h, w in zip(head, widths))]
        lines += ["  " + "  ".join(c.ljust(w) for c, w in zip(r, widths)) for r in rows]
        lines.append(f"best: {self.reason}")
        if self.checkpoint is not None:
            lines.append(f"  checkpoint {self.checkpoint.id}: {self.checkpoint.model_ref}")
        lines.append(f"  the table as HTML: flywheel report {self.id} -o search.html")
        if self.test is not None:
            t = self.test
            lines.append(f"  test  {t.score:.3f} [{t.ci[0]:.3f}, {t.ci[1]:.3f}] vs base {t.parent_score:.3f}: "
                         f"diff {t.diff:+.3f} [{t.diff_ci[0]:+.3f}, {t.diff_ci[1]:+.3f}] -> {t.decision}")
        return lines


def _fmt(value: Any, digits: int = 3) -> str:
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return "–"
    if isinstance(value, float):
        return f"{value:.{digits}f}" if digits != 3 or 1e-3 <= abs(value) < 1e4 or value == 0 else f"{value:.3g}"
    return str(value)


# -- pruning: the trial's loss, reported to Optuna as training runs --------------------------------
def pruning_callback(trial, losses: list[tuple[int, float]], signal: list[str]):
    """A TrainerCallback that reports the loss to `trial` (negated: the study maximises) and raises
    optuna.TrialPruned when the pruner says so. It reads `eval_loss` when the trainer evaluates
    (an eval_dataset with an eval strategy), else the training `loss`; `signal[0]` says which."""
    import optuna
    from transformers import TrainerCallback

    class Reporter(TrainerCallback):
        key = "loss"

        def on_train_begin(self, args, state, control, **kwargs):
            self.key = "eval_loss" if str(getattr(args, "eval_strategy", "no")).lower() not in (
                "no", "intervalstrategy.no") else "loss"
            signal[:] = [self.key]

        def on_log(self, args, state, control, logs=None, **kwargs):
            value = (logs or {}).get(self.key)
            if not isinstance(value, (int, float)) or not math.isfinite(value):
                return
            step = state.global_step
            losses.append((step, float(value)))
            trial.report(-float(value), step)
            if trial.should_prune():
                raise optuna.TrialPruned(f"pruned at step {step}: {self.key} {value:.4g} is worse than the median "
                                         "of earlier trials at this step")

    return Reporter()


# -- the search ------------------------------------------------------------------------------------
def _optuna():
    try:
        import optuna
    except ImportError:
        raise FlywheelError("a hyper-parameter search needs Optuna: pip install 'flywheel[search]'") from None
    return optuna


def _sampler(search: SearchSpec, kinds: dict[str, str]):
    optuna = _optuna()

    if search.sampler == "grid":
        grid = {k: grid_values(k, d, kinds[k]) for k, d in search.space.items()}
        return optuna.samplers.GridSampler(grid, seed=search.seed), math.prod(len(v) for v in grid.values())
    if search.sampler == "random":
        return optuna.samplers.RandomSampler(seed=search.seed), None
    startup = search.startup_trials if search.startup_trials is not None else max(2, search.trials // 3)
    return optuna.samplers.TPESampler(seed=search.seed, n_startup_trials=startup), None


def _suggest(trial, key: str, dist: Distribution, kind: str, grid: bool) -> Any:
    if grid:
        return trial.suggest_categorical(key, grid_values(key, dist, kind))
    if dist.choices is not None:
        return trial.suggest_categorical(key, dist.choices)
    if kind == "int":
        return trial.suggest_int(key, int(dist.low), int(dist.high), step=int(dist.step or 1), log=dist.log)
    return trial.suggest_float(key, dist.low, dist.high, step=dist.step, log=dist.log)


def run_search(method: str, spec: EvalSpec, store: Store, training_set, search: SearchSpec, *, base: str,
               config: TrainConfig | None = None, splits: Sequence[str] = ("valid", "test"),
               run_id: str | None = None, log: Callable[[str], None] | None = None) -> SearchResult:
    """Run `search.trials` training jobs of `method` from `base` on `training_set`, each with
    settings sampled from `search.space` on top of `config`; evaluate each on valid, choose the
    best by a paired test among the finalists, and evaluate it on test when `splits` has it."""
    optuna = _optuna()

    chosen = training_method(method)
    base_ref, _ = resolve_base(store, base)
    if not base_ref.startswith("local:"):
        raise SpecError(f"{base}: a search trains locally; its base must be a local: model or a local checkpoint")
    if len(training_set) == 0:
        raise FlywheelError(f"empty {method} training set: nothing to search over")
    config = config or chosen.config()
    kinds = check_space(method, search.space, config)
    sampler, grid_size = _sampler(search, kinds)
    n_trials = min(search.trials, grid_size) if grid_size else search.trials
    say = log or (lambda message: None)
    record_training_set(store, training_set)
    search_id = store.create_training_search(
        method=method, eval_name=spec.name, base_model=base_ref, training_set_id=training_set.id, run_id=run_id,
        sampler=search.sampler, settings_json=search.model_dump_json())
    pruner = (optuna.pruners.MedianPruner(n_startup_trials=search.prune_startup_trials,
                                          n_warmup_steps=search.prune_warmup_steps)
              if search.pruning else optuna.pruners.NopPruner())
    optuna.logging.set_verbosity(optuna.logging.WARNING)
    study = optuna.create_study(direction="maximize", sampler=sampler, pruner=pruner)
    check_enqueued(search)
    for params in search.enqueue:
        study.enqueue_trial(params)
    trials: list[Trial] = []
    signal = ["loss"]
    base_values = config.model_dump()

    def objective(optuna_trial) -> float:
        params = {k: _suggest(optuna_trial, k, d, kinds[k], grid_size is not None) for k, d in search.space.items()}
        values = base_values
        for key, value in params.items():
            values = _with(values, key, value)
        trial_config = chosen.config.model_validate(values)
        trial = Trial(number=optuna_trial.number, params=params, config=trial_config.model_dump())
        trials.append(trial)
        started, clock = now(), time.perf_counter()
        store.save_search_trial(search_id, trial.number, state="running", params_json=json.dumps(params),
                                started_at=started)
        losses: list[tuple[int, float]] = []
        callback = pruning_callback(optuna_trial, losses, signal)
        try:
            result = chosen.train(spec, store, training_set, base=base, config=trial_config, evaluate=True,
                                  splits=("valid",), quiet=True, callbacks=[callback])
        except (optuna.TrialPruned, FlywheelError) as exc:
            trial.state = "pruned" if isinstance(exc, optuna.TrialPruned) else "failed"
            trial.job_id = store.newest_training_job(started)
            if trial.job_id and trial.state == "pruned":
                store.update_training_job(trial.job_id, status="pruned", error=str(exc), finished_at=now())
            trial.error = str(exc)
            trial.loss, trial.steps = (losses[-1][1], losses[-1][0]) if losses else (None, None)
            raise
        else:
            valid = result.evals[0]
            trial.state, trial.job_id, trial.checkpoint_id = "complete", result.job_id, result.checkpoint.id
            trial.model_ref, trial.valid_iteration_id, trial.valid_score = (
                result.checkpoint.model_ref, valid.iteration_id, valid.score)
            trial.loss = losses[-1][1] if losses else result.metrics.get("last_loss")
            trial.steps = result.metrics.get("steps")
            return valid.score
        finally:
            trial.wall_s = time.perf_counter() - clock
            store.save_search_trial(
                search_id, trial.number, state=trial.state, job_id=trial.job_id, checkpoint_id=trial.checkpoint_id,
                valid_iteration_id=trial.valid_iteration_id, valid_score=trial.valid_score, loss=trial.loss,
                steps=trial.steps, wall_s=trial.wall_s, error=trial.error, finished_at=now())
            say(f"  trial {trial.number} {_params_text(params)}: {trial.state}"
                + (f", valid {trial.valid_score:.3f}" if trial.valid_score is not None else "")
                + (f", {signal[0]} {trial.loss:.4g}" if trial.loss is not None else "")
                + f" ({trial.wall_s:.0f}s)" + (f": {trial.error}" if trial.error else ""))

    clock = time.perf_counter()
    say(f"{method} search {search_id}: up to {n_trials} trials ({search.sampler})"
        + (f" within {search.wall_s:.0f}s" if search.wall_s else ""))
    try:
        study.optimize(objective, n_trials=n_trials, timeout=search.wall_s, catch=(FlywheelError,),
                       gc_after_trial=True)
    except BaseException as exc:
        store.update_training_search(search_id, status="failed", error=f"{type(exc).__name__}: {exc}",
                                     finished_at=now(), wall_s=time.perf_counter() - clock)
        raise
    wall = time.perf_counter() - clock
    stopped_by = ("the wall-clock budget" if search.wall_s and len(trials) < n_trials and wall >= search.wall_s
                  else "grid exhausted" if grid_size and grid_size <= search.trials
                  else f"{n_trials} trial" + ("s" if n_trials != 1 else ""))
    best, reason, comparisons = choose_best(store, spec, trials, search.finalists)
    checkpoint = test = None
    if best is not None:
        from flywheel.train.checkpoints import load_checkpoint
        from flywheel.train.local import evaluate_checkpoint

        checkpoint = load_checkpoint(store, trials[best].checkpoint_id)
        if "test" in splits:
            [test] = evaluate_checkpoint(spec, store, checkpoint, parent_ref=base_ref, splits=("test",))
            checkpoint = store.get_checkpoint(checkpoint.id)  # with its evals
    store.update_training_search(
        search_id, status="succeeded" if best is not None else "failed", finished_at=now(), wall_s=wall,
        signal=signal[0], stopped_by=stopped_by, best_trial=best, reason=reason,
        best_checkpoint_id=checkpoint.id if checkpoint else None)
    return SearchResult(id=search_id, method=method, sampler=search.sampler, signal=signal[0],
                        metric=spec.objective.metric, trials=trials, best=best, checkpoint=checkpoint,
                        reason=reason, comparisons=comparisons, stopped_by=stopped_by, wall_s=wall,
                        budget_s=search.wall_s, test=test)


def _params_text(params: dict[str, Any]) -> str:
    return ", ".join(f"{k}={_fmt(v)}" for k, v in params.items())


def choose_best(store: Store, spec: EvalSpec, trials: Sequence[Trial],
                finalists: int) -> tuple[int | None, str, list[dict[str, Any]]]:
    """(best trial number, reason, paired comparisons): the leader by valid score, unless a simpler
    finalist is not significantly worse, in which case the simplest such finalist."""
    done = sorted((t for t in trials if t.state == "complete"), key=lambda t: (-t.valid_score, t.cost_key()))
    if not done:
        return None, "no trial completed: nothing to choose", []
    metric = spec.objective.metric
    leader, others = done[0], done[1:finalists]
    comparisons, tied = [], [leader]
    for other in others:
        cmp = paired_comparison(store, spec, other.valid_iteration_id, leader.valid_iteration_id)
        better = significantly_better(cmp, metric)
        comparisons.append({"leader": leader.number, "trial": other.number, "n": cmp["n"], "diff": cmp["diff"],
                            "ci": [cmp["ci_low"], cmp["ci_high"]], "p_mcnemar": cmp["p_mcnemar"],
                            "leader_significantly_better": better, "test": describe_test(cmp, metric)})
        if not better:
            tied.append(other)
    head = f"trial {leader.number} leads on valid ({leader.valid_score:.3f})"
    if len(done) == 1:
        return leader.number, f"trial {leader.number}, the only completed trial (valid {leader.valid_score:.3f})", []
    if len(tied) == 1:
        tests = "; ".join(f"vs trial {c['trial']}: {c['test']}" for c in comparisons)
        return leader.number, f"{head} and is significantly better than the other finalists ({tests})", comparisons
    # Simpler means a lower rank or fewer examples trained; between equally simple trials the higher
    # valid score wins, and wall time (which moves with the machine's load) only breaks exact ties.
    winner = min(tied, key=lambda t: (*t.cost_key()[:2], -t.valid_score, t.cost_key()[2]))
    untested = ", ".join(str(t.number) for t in tied if t is not leader)
    tests = "; ".join(f"vs trial {c['trial']}: {c['test']}" for c in comparisons if not c["leader_significantly_better"])
    r, examples, _ = winner.cost_key()
    if winner is leader:
        return leader.number, (f"{head}; no paired test separates it from trial(s) {untested} ({tests}), but none "
                               f"of them is simpler (LoRA r={r:g}, {examples:g} examples trained), so it stays"), \
            comparisons
    simplest = (f"trial {winner.number} is the simplest of them (LoRA r={r:g}, {examples:g} examples trained, "
                f"valid {winner.valid_score:.3f})")
    return winner.number, (f"{head} but no paired test separates it from trial(s) {untested} ({tests}); "
                           f"{simplest}"), comparisons
