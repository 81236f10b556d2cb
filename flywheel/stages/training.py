"""The training stages (`sft`, `dpo`, `rft`): a LoRA checkpoint trained from the incumbent.

The student is trained and measured with its own prompt: `student_prompt` when the stage names
one (a tuned model needs neither the label list nor long instructions: distilling them into the
weights is the point), else the tuned incumbent's prompt, else the eval's plain prompt; never the
teacher's demonstrations. SFT starts from the incumbent's model; DPO and RFT polish a tuned model
(the incumbent when it is tuned, else the best checkpoint this run trained). Before RFT trains, a
probe samples the start model on train prompts: when every group of samples scores the same, there
is no reward signal and the stage says so instead of training.
"""

from __future__ import annotations

import random
import re
from typing import Any, Literal

from pydantic import Field, ValidationError, model_validator

from flywheel.errors import FlywheelError, SpecError
from flywheel.models import model_cache
from flywheel.models.memory import release_memory
from flywheel.prompt import Prompt
from flywheel.spec import MessageSpec
from flywheel.stages.base import Candidate, Incumbent, StageOutcome, StageSpecBase, WheelContext
from flywheel.tracking import TrackingError, require_trackers
from flywheel.train.launch import LaunchInterrupted, LaunchSpec
from flywheel.train.methods import METHODS, load_train_config, training_method
from flywheel.train.run import TrainRequest, check_launch, run
from flywheel.train.search import SearchSpec

PROBE_PROMPTS = 16


class TrainStageSpec(StageSpecBase):
    stage: Literal[tuple(METHODS)] = Field(  # type: ignore[valid-type]
        description="Fine-tune with TRL + PEFT: " + "; ".join(f"{m.name}: {m.summary}" for m in METHODS.values()))
    config: dict[str, Any] = Field(default_factory=dict, description="Training settings (docs/training.md).")
    student_prompt: list[MessageSpec] | None = Field(
        default=None, description="Messages the student is trained and measured with (e.g. a one-line system "
        "message and the user template); the incumbent's (tuned) or the eval's prompt when unset.")
    min_score: float | None = Field(default=None, description="SFT: objective score a capture needs.")
    max_per_item: int = Field(default=1, ge=1, description="SFT: distinct passing outputs kept per item.")
    min_margin: float = Field(default=0.5, ge=0, description="DPO: best-minus-worst score a pair needs.")
    search: SearchSpec | None = Field(
        default=None, description="Hyper-parameter search instead of one training job: a space of config keys "
        "(on top of `config`), trials, sampler, wall_s ... (docs/training.md); the best trial is proposed.")
    launcher: LaunchSpec = Field(default_factory=LaunchSpec, description="local, or accelerate with "
                                 "num_processes / config_file / cpu (issue 17; docs/scale.md).")

    @model_validator(mode="after")
    def _search_keys_exist(self) -> "TrainStageSpec":
        """A search's keys and bounds are checked against the method's config when the run spec loads."""
        if self.search is not None:
            from flywheel.errors import SpecError
            from flywheel.train.search import check_enqueued, check_space

            config_class = training_method(self.stage).config
            try:
                base = config_class.model_validate(self.config)
            except ValidationError:
                base = None  # the config's own errors are reported by _config_is_valid
            try:
                check_space(self.stage, self.search.space, base)
                check_enqueued(self.search)
            except SpecError as exc:
                raise ValueError(f"search: {exc}") from None
        return self

    @model_validator(mode="after")
    def _config_is_valid(self) -> "TrainStageSpec":
        # The training settings are checked when the run spec loads, not when the stage is reached.

        try:
            config = load_train_config(self.stage, values=self.config)
        except SpecError as exc:
            # `train config: keep: ...` reads `config.keep: ...`; a check across fields names its own fields.
            raise ValueError("; ".join(re.sub(r"^train config: (?:([\w.]+): )?", lambda m: f"config.{m[1]}: " if m[1]
                                              else "config: ", line) for line in str(exc).splitlines())) from None
        try:  # a tracker whose package is missing would only fail the stage, after the stages before it
            require_trackers(config.report_to)
        except TrackingError as exc:
            raise ValueError(f"config.{exc}") from None

        try:
            check_launch(self.launcher, searching=self.search is not None)
        except SpecError as exc:
            raise ValueError(str(exc)) from None
        return self


class TrainStage:
    """Build the method's set from the store, train (or reuse a checkpoint trained before a kill),
    and propose the checkpoint with the student prompt."""

    spec_class = TrainStageSpec

    def __init__(self, spec: TrainStageSpec):
        self.spec = spec
        self.method = training_method(spec.stage)

    def student_prompt(self, wheel: WheelContext, incumbent: Incumbent) -> Prompt:
        if self.spec.student_prompt:
            return Prompt(messages=[m.model_dump() for m in self.spec.student_prompt])
        if incumbent.tuned:
            return Prompt(messages=incumbent.prompt.messages)
        return Prompt(messages=wheel.spec.messages())

    def run(self, wheel: WheelContext, incumbent: Incumbent) -> StageOutcome:
        method, spec = self.method, self.spec
        name = method.name
        base, prompt = incumbent.model_ref, self.student_prompt(wheel, incumbent)
        if method.starts_tuned and not incumbent.tuned:
            tuned = wheel.best_tuned(incumbent)
            if tuned is None:
                raise FlywheelError(f"{name} polishes a tuned model and this run has none yet: put an sft stage "
                                    "before it")
            base, measured_with = tuned  # the tuned model keeps the prompt it was trained and measured with
            prompt = Prompt(messages=[m.model_dump() for m in spec.student_prompt]) if spec.student_prompt \
                else Prompt(messages=measured_with.messages)
        wheel.store.save_prompt(prompt, origin="student")
        config = load_train_config(name, values=spec.config)
        if method.grader_rewards:  # no reward signal, nothing to learn
            probe = self.reward_probe(wheel, base, prompt, config)
            if probe is not None:
                return StageOutcome(name, "failed", probe, lap=wheel.lap)
        if spec.search is not None:
            return self.search(wheel, None, base, prompt, config)

        # With save_steps the job registers a checkpoint every N steps and returns the best (by the valid
        # score, else the valid loss); a wheel killed mid-training resumes the job from its last saved step,
        # and one killed after it finished reuses its checkpoint.
        try:
            launch = spec.launcher.resolved(wheel.base_dir)
            # Local training reports its steps (loss) and checkpoint scores to the run's live view.
            progress = wheel.training_progress() if launch.kind == "local" else {}
            if launch.kind == "local":
                _free_loaded_models()
            result = run(self.request(wheel, base, prompt, config, launch=launch, **progress))
        except LaunchInterrupted as exc:
            # Ctrl-C stops the wheel (resumable), as it does a local stage; it is no stage failure.
            raise KeyboardInterrupt(str(exc)) from None
        checkpoint_id, model_ref, metrics = result.checkpoint.id, result.checkpoint.model_ref, result.metrics
        if len(result.checkpoints) > 1:
            wheel.log(f"  {name}: best of {len(result.checkpoints)} checkpoints: {result.best_reason}")
        if result.stop_reason:
            wheel.log(f"  {name}: {result.stop_reason}")
        loss = (f", loss {metrics['first_loss']:.3g} -> {metrics['last_loss']:.3g}"
                if metrics.get("first_loss") is not None and metrics.get("last_loss") is not None else "")
        reward = (f", reward {metrics['first_reward']:.3g} -> {metrics['last_reward']:.3g}"
                  if metrics.get("first_reward") is not None else "")
        rows = _rows(wheel, result.checkpoint)
        detail = f"checkpoint {checkpoint_id} ({rows} rows{loss}{reward}; student prompt {prompt.id})"
        return StageOutcome(name, "proposed", detail, lap=wheel.lap,
                            proposal=Candidate(model_ref, prompt, detail, origin=f"{name}:{checkpoint_id}"))

    def request(self, wheel: WheelContext, base: str, prompt: Prompt, config, **options: Any):
        """The stage's TrainRequest: the method's set built with the student prompt from the wheel's
        loaded dataset, no evaluation (the wheel measures), reuse of what this stage trained before."""
        return TrainRequest(method=self.method.name, spec=wheel.spec, store=wheel.store, base=base, config=config,
                            set_options={key: getattr(self.spec, key) for key in self.method.set_options},
                            prompt=prompt, dataset=getattr(wheel, "dataset", None),
                            grader_set=getattr(wheel, "grader_set", None), evaluate=False, splits=("valid",),
                            reuse=True, quiet=True, run_id=wheel.run_id,
                            log=lambda line: wheel.log(f"  {line}"), **options)

    def search(self, wheel: WheelContext, training_set, base: str, prompt: Prompt, config) -> StageOutcome:
        """Run the stage's hyper-parameter search (or reuse one this run finished before a kill) and
        propose its best trial's checkpoint; `training_set` None builds the method's set."""
        name = self.method.name
        _free_loaded_models()
        result = run(self.request(wheel, base, prompt, config, search=self.spec.search, data=training_set,
                                  check_data=training_set is None))
        if result.checkpoint is None:
            return StageOutcome(name, "failed", f"search {result.id}: {result.reason}", lap=wheel.lap)
        checkpoint = result.checkpoint
        rows = _rows(wheel, checkpoint)
        detail = f"search {result.id}, best {checkpoint.id}: {result.reason} ({rows} rows; student prompt {prompt.id})"
        return StageOutcome(name, "proposed", detail, lap=wheel.lap,
                            proposal=Candidate(checkpoint.model_ref, prompt, detail, origin=f"{name}:{checkpoint.id}"))

    def reward_probe(self, wheel: WheelContext, base: str, prompt: Prompt, config) -> str | None:
        """Sample the start model `num_generations` times on a few train prompts and grade them with
        the reward graders: None when some group's rewards differ (GRPO can learn), else why not."""
        items = wheel.dataset.split("train")
        chosen = sorted(random.Random(config.seed).sample(items, min(PROBE_PROMPTS, len(items))), key=lambda i: i.key)
        k = config.num_generations
        iteration_id = wheel.sample("rft-probe", base, prompt, chosen, repeats=k, temperature=config.temperature,
                                    max_tokens=config.max_completion_length)
        graders_used = config.graders or wheel.grader_set.names
        weights = dict(zip(graders_used, config.reward_weights or [1.0] * len(graders_used)))
        groups: dict[str, list[float]] = {}
        for sample in wheel.store.samples_with_grades(iteration_id):
            reward = sum(weights[g.grader] * (g.score or 0.0) for g in sample.grades if g.grader in weights)
            groups.setdefault(sample.item_key, []).append(reward)
        varied = sum(1 for rewards in groups.values() if max(rewards) - min(rewards) > 1e-9)
        if varied:
            wheel.log(f"  reward probe: {varied}/{len(groups)} groups of {k} samples differ in reward")
            return None
        mean = sum(sum(r) for r in groups.values()) / max(1, sum(len(r) for r in groups.values()))
        return (f"no reward signal: in {len(groups)} groups of {k} samples from {base}, every group scored the "
                f"same (mean reward {mean:.3f}); GRPO would learn nothing, so RFT did not train")


def _rows(wheel: WheelContext, checkpoint) -> int | str:
    """The rows of the set a checkpoint trained on (its recorded `n_rows`)."""
    row = wheel.store.get_training_set(checkpoint.training_set_id) if checkpoint.training_set_id else None
    return row["n_rows"] if row else "?"


def _free_loaded_models() -> None:
    """Before training in this process: drop the process's loaded models (the teacher's inference
    copy; each is loaded again when next asked for) and hand their pages back, so training's own
    copy does not stack on them."""
    model_cache().clear()
    release_memory()
