"""Multi-iteration runs written straight through Store methods, for report and review tests.

The harness makes one iteration per run today; later stages (prompt search, SFT, DPO) add more
with parent lineage and decisions. `build_run` writes such a run directly: an eval with a rule
grader and a judge grader, a dataset, prompts, and per iteration the samples and grades that an
`outcome(iteration, item_index)` function decides. The benchmark uses it too.
"""

from __future__ import annotations

import json
from collections.abc import Callable, Sequence
from dataclasses import dataclass

from flywheel.stats import wilson_ci
from flywheel.prompt import Prompt
from flywheel.store import SampleRecord, Store

LABELS = ["card_arrival", "pin_blocked", "exchange_rate", "lost_card"]
XSS = '</script><script>window.__pwned=1</script><img src=x onerror="window.__pwned=2"><b>bold</b>'

SPEC = {
    "name": "support-intents",
    "graders": [
        {"type": "string_check", "name": "label", "input": "{{sample.output_text}}",
         "reference": "{{item.label}}", "operation": "ilike"},
        {"type": "score_model", "name": "judge", "model": "openai:judge", "input": [], "pass_threshold": 0.5},
    ],
    "objective": {"grader": "label", "metric": "pass_rate"},
}


@dataclass
class Outcome:
    output: str | None
    passed: bool
    judge_passed: bool | None = None
    error: str | None = None
    feedback: str | None = None


def default_outcome(iteration: int, index: int) -> Outcome:
    """Iteration k gets item i right when (i + k) % 5 != 0 for k>0; the baseline when i % 2 == 0."""
    label = LABELS[index % len(LABELS)]
    right = index % 2 == 0 if iteration == 0 else (index * 7 + iteration) % 5 != 0
    return Outcome(output=label if right else LABELS[(index + 1) % len(LABELS)] + " (I think)", passed=right,
                   judge_passed=right if index % 3 else not right)


def build_run(store: Store, n_items: int = 12, stages: Sequence[tuple[str, str | None]] = (
        ("eval", "measured"), ("prompt", "promoted"), ("sft", "rejected")),
        outcome: Callable[[int, int], Outcome] = default_outcome, run_id: str = "run-test-000001",
        item_text: Callable[[int], str] | None = None, model_ref: str = "local:tiny",
        prompts: Sequence[str] | None = None, feedback_text: str | None = None, split: str = "test",
        kind: str = "wheel", prompt_tokens: Sequence[int] | None = None) -> dict:
    """Write one run with len(stages) iterations over n_items items; returns ids by name."""
    eval_id = f"e-{run_id}"
    store.save_eval(eval_id, SPEC["name"], "<test>", json.dumps(SPEC))
    dataset_id = f"d-{run_id}"
    items = []
    for i in range(n_items):
        text = item_text(i) if item_text else f"Where is my card? question {i}"
        items.append({"dataset_id": dataset_id, "key": f"item-{i:05d}", "split": "test", "line": i + 1,
                      "fields_json": json.dumps({"text": text, "label": LABELS[i % len(LABELS)]})})
    with store.db.conn:
        store.db["datasets"].insert({"id": dataset_id, "path": "data.jsonl", "n_items": n_items, "created_at": "2026"},
                                    ignore=True)
        store.db["items"].insert_all(items, ignore=True, batch_size=1000)
    store.create_run(id=run_id, kind=kind, eval_id=eval_id, dataset_id=dataset_id, model_ref=model_ref,
                     split=split, config_key=run_id)
    prompt_texts = list(prompts or ["Answer with one label.", "Answer with exactly one label from the list.\nNo prose.",
                                    "Answer with exactly one label from the list.\nNo prose."])
    iteration_ids = []
    for k, (stage, decision) in enumerate(stages):
        messages = [{"role": "system", "content": prompt_texts[min(k, len(prompt_texts) - 1)]},
                    {"role": "user", "content": "{{item.text}}"}]
        prompt = Prompt(messages=messages)
        prompt_id = prompt.id
        store.save_prompt(prompt, origin=stage)
        iteration_id = store.iteration_for(
            run_id, k, stage=stage, model_ref=model_ref if stage != "sft" else f"{model_ref}+ckpt/sft-{k}",
            prompt_id=prompt_id, split=split, parent_id=iteration_ids[-1] if iteration_ids else None)
        records, passes = [], 0
        for i in range(n_items):
            o = outcome(k, i)
            text = item_text(i) if item_text else f"Where is my card? question {i}"
            grades = []
            if o.error is None:
                grades = [{"grader": "label", "score": float(o.passed), "passed": o.passed,
                           "feedback": feedback_text or (f"expected {LABELS[i % len(LABELS)]!r}" + ("" if o.passed else f", got {o.output!r}"))},
                          {"grader": "judge", "score": 0.9 if o.judge_passed else 0.2,
                           "passed": bool(o.judge_passed), "feedback": "judge: " + ("helpful" if o.judge_passed else "off-label")}]
            passes += int(o.passed and o.error is None)
            records.append(SampleRecord(
                iteration_id=iteration_id, item_key=f"item-{i:05d}", repeat=0,
                input_json=json.dumps([{"role": "system", "content": messages[0]["content"]},
                                       {"role": "user", "content": text}]),
                output_text=o.output, prompt_tokens=prompt_tokens[k] if prompt_tokens else 40, completion_tokens=6, latency_s=0.05, cost=0.0,
                error=o.error, grades=grades))
        store.write_samples(records)
        low, high = wilson_ci(passes, n_items)
        store.update_iteration(iteration_id, n=n_items, score=passes / n_items, ci_low=low, ci_high=high,
                               prompt_tokens=(prompt_tokens[k] if prompt_tokens else 40) * n_items,
                               completion_tokens=6 * n_items, cost=0.0,
                               wall_s=1.5 + k, decision=decision,
                               reason={"promoted": "beats parent on valid (p=0.01)", "rejected": "no significant gain"}.get(decision or "", None))
        iteration_ids.append(iteration_id)
    store.finish_run(run_id, "completed", {"n_samples": n_items * len(stages)})
    return {"run_id": run_id, "iterations": iteration_ids, "eval_id": eval_id, "dataset_id": dataset_id}


def sample_id(store: Store, iteration_id: str, key: str, repeat: int = 0) -> int:
    return store.db.execute("select id from samples where iteration_id = ? and item_key = ? and repeat = ?",
                            [iteration_id, key, repeat]).fetchone()[0]


SEARCH_PROMPTS = ["Answer with one label.", "Answer with exactly one label from the list.\nNo prose.",
                  "You route support tickets. Read the ticket carefully, think about which of the labels fits "
                  "best, and answer with exactly one label from the list, nothing else."]


def build_wheel_with_search(store: Store, wheel_id: str = "run-wheel-000009",
                            search_id: str = "run-search-000009") -> dict:
    """A wheel run whose optimize stage ran a prompt search: the search measured three finalists on
    all of valid (the baseline, the winner and a longer one passed over), the wheel measured the
    baseline and the winner itself."""
    search = build_run(store, n_items=12, run_id=search_id, split="valid", kind="optimize", prompts=SEARCH_PROMPTS,
                       stages=(("prompt-valid", "incumbent"), ("prompt-valid", "promoted"), ("prompt-valid", "rejected")),
                       prompt_tokens=[40, 40, 95])  # the passed-over finalist: as good, more than twice the prompt
    store.update_iteration(search["iterations"][2], reason="proposer:1: no better on valid than the cheaper winner")
    wheel = build_run(store, n_items=12, run_id=wheel_id, split="valid", prompts=SEARCH_PROMPTS[:2],
                      stages=(("eval", "incumbent"), ("optimize", "promoted")))
    base, best = wheel["iterations"]
    cost = {"n": 12, "prompt_tokens": 40.0, "completion_tokens": 6.0, "latency_s": 0.05, "money_per_1k": 0.0}
    outcome = {"stage": "optimize", "decision": "promoted", "reason": "promoted variant", "lap": 1, "wall_s": 2.0,
               "rule": "significantly better", "search_run": search_id}
    store.finish_run(wheel_id, "completed", {"stages": [], "elapsed_s": 30.0, "result": {
        "stopped": "target met", "minimise": "prompt_tokens", "stages": [outcome], "wall_s": 30.0,
        "milestones": [{"label": "baseline", "iteration_id": base, "model_ref": "local:tiny",
                        "valid": store.get_iteration(base).score,
                        "test": None, "prompt_id": store.get_iteration(base).prompt_id, "cost": cost},
                       {"label": "best prompt", "iteration_id": best, "model_ref": "local:tiny",
                        "valid": store.get_iteration(best).score,
                        "test": None, "prompt_id": store.get_iteration(best).prompt_id, "cost": cost}]}})
    return {"wheel": wheel, "search": search}
