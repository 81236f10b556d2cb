"""Several tasks, one adapter: train on the weighted union of several evals' training sets, then
evaluate the adapter on each eval.

    result = train_multi("sft", [banking, faq], store, base="local:smollm2", weights=[2, 1])
    result.by_eval["faq"]      # [SplitEval(valid ...), SplitEval(test ...)]: paired with the base

Each eval builds its own set from the store (its own captures and its own prompt: every row keeps
the prompt its eval renders), `flywheel.train.sets.combine_training_sets` weights and joins them,
and the method trains once. The checkpoint's `eval_json` keeps the first eval's splits where the
single-eval code reads them, plus `by_eval` with every eval's. The other path, one adapter per eval,
is the ordinary `flywheel train` once per eval; `local:BASE+A*0.5+B*0.5` then combines the adapters
(flywheel.models.local) and `flywheel eval SPEC --model` measures the combination on each eval.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field, replace
from typing import Any

from flywheel.errors import TrainingError
from flywheel.spec import EvalSpec
from flywheel.store import Store
from flywheel.train.checkpoints import resolve_base
from flywheel.train.formats import TrainingDataError
from flywheel.train.local import SplitEval, TrainResult, evaluate_checkpoint
from flywheel.train.methods import load_train_config, training_method
from flywheel.train.run import TrainRequest, run
from flywheel.train.sets import combine_training_sets


@dataclass
class MultiTrainResult:
    """One adapter trained on several evals, measured on each."""

    result: TrainResult
    evals: list[str]
    weights: list[float]
    by_eval: dict[str, list[SplitEval]] = field(default_factory=dict)

    def to_dict(self) -> dict[str, Any]:
        data = self.result.to_dict()
        data.update(evals=self.evals, weights=self.weights,
                    by_eval={name: [asdict(e) for e in evals] for name, evals in self.by_eval.items()})
        return json.loads(json.dumps(data, default=str).replace("NaN", "null"))

    def summary_lines(self) -> list[str]:
        """The single-eval summary, then each eval's splits under its name."""
        head = replace(self.result, evals=[]).summary_lines()
        head[1] += " from " + ", ".join(f"{name} x{weight:g}" for name, weight in zip(self.evals, self.weights))
        for name, evals in self.by_eval.items():
            head.append(f"  eval {name}:")
            head += ["  " + line for line in replace(self.result, evals=evals).summary_lines()[2:]]
        return head


def train_multi(method: str, specs: Sequence[EvalSpec], store: Store, *, base: str, weights: Sequence[float] | None = None,
                config=None, evaluate: bool = True, splits: Sequence[str] = ("valid", "test"), quiet: bool = False,
                launch=None, **set_options: Any) -> MultiTrainResult | None:
    """Build each eval's set, combine them with `weights`, train one adapter from `base` (a `local:`
    model or checkpoint id) and evaluate it on every eval. Returns None on non-main processes.
    `launch`: a flywheel.train.launch.LaunchSpec (accelerate launch; default: this process)."""
    chosen = training_method(method)
    if len(specs) < 1:
        raise TrainingDataError("no eval to train on")
    names = [spec.name for spec in specs]
    if len(set(names)) < len(names):
        raise TrainingDataError(f"eval names must differ to be told apart: {', '.join(names)}")
    base_ref, _ = resolve_base(store, base)
    if not base_ref.startswith("local:"):
        raise TrainingError(f"{base}: several evals train one local adapter; a hosted job takes one eval: "
                            "train each eval on its own")
    config = config or load_train_config(method)
    parts = [chosen.build_set(spec, store, **set_options) for spec in specs]
    training_set = combine_training_sets(parts, weights)
    result = run(TrainRequest(method=chosen.name, spec=specs[0], store=store, base=base, config=config,
                              data=training_set, evaluate=evaluate, splits=splits, quiet=quiet, check_data=False,
                              **({"launch": launch} if launch is not None else {})))
    if result is None:
        return None
    multi = MultiTrainResult(result=result, evals=names, weights=list(training_set.source["weights"]))
    if not evaluate:
        return multi
    multi.by_eval[names[0]] = result.evals
    for spec in specs[1:]:
        multi.by_eval[spec.name] = evaluate_checkpoint(spec, store, result.checkpoint, parent_ref=base_ref,
                                                       splits=splits)
    # evaluate_checkpoint files each eval's splits under the split's name: keep the first eval's
    # there (where single-eval readers look) and every eval's under by_eval.
    stored = {e.split: asdict(e) for e in result.evals}
    stored["by_eval"] = {name: {e.split: asdict(e) for e in evals} for name, evals in multi.by_eval.items()}
    store.update_checkpoint(result.checkpoint.id, eval_json=json.dumps(stored, default=str))
    result.checkpoint = store.get_checkpoint(result.checkpoint.id)  # with its evals
    return multi
