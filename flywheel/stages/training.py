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

import json
import random
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator

from flywheel.errors import FlywheelError
from flywheel.prompt import Prompt
from flywheel.spec import MessageSpec
from flywheel.stages.base import Candidate, Incumbent, StageOutcome, StageSpecBase, WheelContext
from flywheel.train.methods import METHODS, load_train_config, training_method
from flywheel.train.search import SearchSpec

PROBE_PROMPTS = 16


class StageLauncher(BaseModel):
    """How a weight stage runs its trainer: in the wheel's process, or under `accelerate launch`
    (flywheel.train.launch: the same `flywheel train` command on every process; docs/scale.md)."""

    model_config = ConfigDict(extra="forbid")

    kind: Literal["local", "accelerate"] = Field(
        default="local", description="local: train in the wheel's process; accelerate: `accelerate launch` "
        "subprocesses (DDP, DeepSpeed or FSDP per the config file).")
    num_processes: int | None = Field(default=None, ge=1, description="Processes to start (default: the config's).")
    config_file: str | None = Field(
        default=None, description="An accelerate config file (relative to the run spec's folder) or a shipped "
        "template: ddp, deepspeed_zero2, deepspeed_zero3, fsdp.")
    cpu: bool = Field(default=False, description="CPU processes over gloo, even where a GPU exists.")
    main_process_port: int | None = Field(default=None, ge=1, le=65535,
                                          description="Rendezvous port (default: a free one here).")

    @model_validator(mode="after")
    def _accelerate_settings_need_accelerate(self) -> "StageLauncher":
        if self.kind == "local" and (self.num_processes or self.config_file or self.cpu or self.main_process_port):
            raise ValueError("num_processes, config_file, cpu and main_process_port need kind: accelerate")
        return self

    def launch_spec(self, base_dir):
        """The CLI's LaunchSpec, a relative config file resolved against `base_dir` (else a template)."""
        from pathlib import Path

        from flywheel.train.launch import LaunchSpec

        config = self.config_file
        if config and (Path(base_dir) / config).is_file():
            config = str((Path(base_dir) / config).resolve())
        return LaunchSpec(launcher="accelerate", num_processes=self.num_processes, accelerate_config=config,
                          cpu=self.cpu, main_process_port=self.main_process_port)


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
    launcher: StageLauncher = Field(default_factory=StageLauncher, description="local, or accelerate with "
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
                base = None  # the config's own errors are reported when the stage runs
            try:
                check_space(self.stage, self.search.space, base)
                check_enqueued(self.search)
            except SpecError as exc:
                raise ValueError(f"search: {exc}") from None
        return self

    @model_validator(mode="after")
    def _config_is_valid(self) -> "TrainStageSpec":
        # The training settings are checked when the run spec loads, not when the stage is reached.
        from flywheel.errors import SpecError

        from flywheel.tracking import TrackingError, require_trackers

        try:
            config = load_train_config(self.stage, values=self.config)
        except SpecError as exc:
            raise ValueError(str(exc).replace("train config: ", "config.")) from None
        try:  # a tracker whose package is missing would only fail the stage, after the stages before it
            require_trackers(config.report_to)
        except TrackingError as exc:
            raise ValueError(f"config.{exc}") from None
        if self.launcher.kind == "accelerate" and self.search is not None:
            raise ValueError("launcher: a search's trials train in this process; drop `launcher` or `search`")
        if self.launcher.kind == "accelerate" and self.launcher.config_file:
            from flywheel.train.launch import templates

            name = self.launcher.config_file
            if name not in templates() and not name.endswith((".yaml", ".yml", ".json")):
                raise ValueError(f"launcher.config_file: {name!r} is neither a shipped template "
                                 f"({', '.join(templates())}) nor a .yaml/.json file")
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
        from flywheel.train.checkpoints import resolve_base

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
        if name == "rft":
            probe = self.reward_probe(wheel, base, prompt, config)
            if probe is not None:
                return StageOutcome(name, "failed", probe, lap=wheel.lap)
        options = {key: getattr(spec, key) for key in method.set_options}
        training_set = method.build_set(wheel.spec, wheel.store, prompt=prompt, **options)
        wheel.log(f"  {name}: {len(training_set)} rows, from {base}")
        from flywheel.train.datachecks import run_data_checks

        run_data_checks(training_set, config, spec=wheel.spec, store=wheel.store, base=base, log=wheel.log)
        if spec.search is not None:
            return self.search(wheel, training_set, base, prompt, config)
        base_ref, parent_id = resolve_base(wheel.store, base)
        done = wheel.store.find_checkpoint(method=name, training_set_hash=training_set.content_hash,
                                           config_json=json.dumps(config.model_dump()),
                                           base_model=base_ref.split("+", 1)[0])
        if done and done["parent_id"] == parent_id:  # trained before a kill: never train twice
            checkpoint_id, model_ref, metrics = done["id"], done["model_ref"], json.loads(done["metrics_json"] or "{}")
            wheel.log(f"  reusing {checkpoint_id}, trained before")
        else:
            if spec.launcher.kind == "accelerate":
                checkpoint_id, model_ref, metrics = self.launch(wheel, training_set, base, config)
            else:
                # With save_steps the job registers a checkpoint every N steps and returns the best (by the valid
                # score, else the valid loss); a wheel killed mid-training resumes the job from its last saved step.
                result = method.train(wheel.spec, wheel.store, training_set, base=base, config=config, evaluate=False,
                                      quiet=True, prompt=prompt)
                checkpoint_id, model_ref, metrics = result.checkpoint.id, result.checkpoint.model_ref, result.metrics
                if len(result.checkpoints) > 1:
                    wheel.log(f"  {name}: best of {len(result.checkpoints)} checkpoints: {result.best_reason}")
                if result.stop_reason:
                    wheel.log(f"  {name}: {result.stop_reason}")
        loss = (f", loss {metrics['first_loss']:.3g} -> {metrics['last_loss']:.3g}"
                if metrics.get("first_loss") is not None and metrics.get("last_loss") is not None else "")
        reward = (f", reward {metrics['first_reward']:.3g} -> {metrics['last_reward']:.3g}"
                  if metrics.get("first_reward") is not None else "")
        detail = f"checkpoint {checkpoint_id} ({len(training_set)} rows{loss}{reward}; student prompt {prompt.id})"
        return StageOutcome(name, "proposed", detail, lap=wheel.lap,
                            proposal=Candidate(model_ref, prompt, detail, origin=f"{name}:{checkpoint_id}"))

    def search(self, wheel: WheelContext, training_set, base: str, prompt: Prompt, config) -> StageOutcome:
        """Run the stage's hyper-parameter search (or reuse one this run finished before a kill) and
        propose its best trial's checkpoint."""
        from flywheel.train.checkpoints import load_checkpoint, resolve_base
        from flywheel.train.search import run_search
        from flywheel.train.sets import record_training_set

        name, search = self.method.name, self.spec.search
        training_set = record_training_set(wheel.store, training_set)  # its id names the search's data
        base_ref, _ = resolve_base(wheel.store, base)
        done = [s for s in wheel.store.training_searches([wheel.run_id])
                if s["status"] == "succeeded" and s["method"] == name and s["base_model"] == base_ref
                and s["training_set_id"] == training_set.id and s["settings_json"] == search.model_dump_json()
                and s["best_checkpoint_id"]]
        if done:
            row = done[-1]
            checkpoint, reason, search_id = load_checkpoint(wheel.store, row["best_checkpoint_id"]), row["reason"], row["id"]
            wheel.log(f"  reusing search {search_id}, finished before")
        else:
            result = run_search(name, wheel.spec, wheel.store, training_set, search, base=base, config=config,
                                splits=("valid",), run_id=wheel.run_id, log=wheel.log)
            if result.checkpoint is None:
                return StageOutcome(name, "failed", f"search {result.id}: {result.reason}", lap=wheel.lap)
            checkpoint, reason, search_id = result.checkpoint, result.reason, result.id
        detail = f"search {search_id}, best {checkpoint.id}: {reason} ({len(training_set)} rows; student prompt {prompt.id})"
        return StageOutcome(name, "proposed", detail, lap=wheel.lap,
                            proposal=Candidate(checkpoint.model_ref, prompt, detail, origin=f"{name}:{checkpoint.id}"))

    def launch(self, wheel: WheelContext, training_set, base: str, config) -> tuple[str, str, dict[str, Any]]:
        """Train under `accelerate launch` (`flywheel train METHOD --data ts-... --no-eval --json` on
        every process); the main process registers the checkpoint, whose id comes back as JSON."""
        import tempfile
        from pathlib import Path

        import yaml

        from flywheel.train.launch import LaunchInterrupted, launch_training

        store = wheel.store
        scratch = store.artefact_dir / "tmp"
        scratch.mkdir(parents=True, exist_ok=True)
        launch = self.spec.launcher.launch_spec(wheel.base_dir)
        with tempfile.TemporaryDirectory(prefix=f"launch-{self.method.name}-", dir=scratch) as folder:
            config_path, out_path = Path(folder) / "config.yaml", Path(folder) / "result.json"
            config_path.write_text(yaml.safe_dump(config.model_dump(mode="json")), encoding="utf-8")
            argv = ["train", self.method.name, str(Path(wheel.spec.source).resolve()), "--base", base,
                    "-c", str(config_path), "--data", str(training_set.id), "--no-eval", "--json",
                    "--db", str(Path(store.path).resolve())]
            wheel.log(f"  {self.method.name}: accelerate launch, {launch.num_processes or 'config'} processes"
                      + (" on CPU" if launch.cpu else ""))
            with out_path.open("w", encoding="utf-8") as out:
                try:
                    launch_training(launch, argv, stdout=out)
                except LaunchInterrupted as exc:
                    # Ctrl-C stops the wheel (resumable), as it does a local stage; it is no stage failure.
                    raise KeyboardInterrupt(str(exc)) from None
            try:
                result = json.loads(out_path.read_text(encoding="utf-8"))
            except ValueError:
                raise FlywheelError(f"{self.method.name}: accelerate launch printed no result: "
                                    f"{out_path.read_text(encoding='utf-8')[-300:]!r}") from None
        checkpoint = result["checkpoint"]
        return checkpoint["id"], checkpoint["model_ref"], result.get("metrics") or {}

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
            reward = sum(weights[g["grader"]] * (g["score"] or 0.0) for g in sample["grades"] if g["grader"] in weights)
            groups.setdefault(sample["item_key"], []).append(reward)
        varied = sum(1 for rewards in groups.values() if max(rewards) - min(rewards) > 1e-9)
        if varied:
            wheel.log(f"  reward probe: {varied}/{len(groups)} groups of {k} samples differ in reward")
            return None
        mean = sum(sum(r) for r in groups.values()) / max(1, sum(len(r) for r in groups.values()))
        return (f"no reward signal: in {len(groups)} groups of {k} samples from {base}, every group scored the "
                f"same (mean reward {mean:.3f}); GRPO would learn nothing, so RFT did not train")
