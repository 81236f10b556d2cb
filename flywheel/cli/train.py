"""Fine-tuning: `flywheel train <method>` (one command per row of the methods table) and `train export`."""

from __future__ import annotations

import json

import click

from flywheel.cli.common import FlywheelGroup, db_option, echo, json_option, main, parse_options, store_at


class _TrainGroup(FlywheelGroup):
    """`flywheel train`: one subcommand per training method, built from the methods table when asked
    for (so `flywheel --help` does not import the training stack), plus `export`."""

    def list_commands(self, ctx):
        from flywheel.train.methods import METHODS

        return [*METHODS, *super().list_commands(ctx)]

    def get_command(self, ctx, name):
        from flywheel.train.methods import METHODS

        return _train_command(METHODS[name]) if name in METHODS else super().get_command(ctx, name)


@main.group("train", cls=_TrainGroup)
def train_group() -> None:
    """Fine-tune on captured data: sft, dpo or rft (GRPO); locally with TRL, or hosted."""


# Options of each method's set builder (flywheel.train.methods: TrainingMethod.set_options).
_SET_OPTIONS = {
    "min_score": click.option("--min-score", type=float, default=None, help="Keep captures scoring at least this on "
                              "the objective (default: those that pass every grader)."),
    "max_per_item": click.option("--max-per-item", default=1, show_default=True, type=click.IntRange(min=1),
                                 help="Distinct passing outputs kept per item."),
    "min_margin": click.option("--min-margin", default=0.5, show_default=True, type=click.FloatRange(min=0),
                               help="Least objective-score gap between the preferred and the rejected output."),
}


def _train_command(method):
    """`flywheel train <method>`: one command per row of the methods table."""

    def command(spec_paths, weights, base, config_path, settings, data, splits, no_eval, options, db, as_json,
                launcher, num_processes, accelerate_config, cpu, resume, search_path, trials, sampler, wall_s,
                **set_options):
        from flywheel.spec import load_eval_spec
        from flywheel.train import TrainRequest, load_train_config, run

        launch = _launch_spec(launcher, num_processes, accelerate_config, cpu, search_path=search_path, trials=trials,
                              sampler=sampler, wall_s=wall_s, no_eval=no_eval, resume=resume, base=base,
                              reset=bool(data or settings or config_path or len(spec_paths) > 1))
        specs = [load_eval_spec(path) for path in spec_paths]
        weight_list = _spec_flags(len(specs), weights, data=data, search_path=search_path, resume=resume)
        config = None if resume else load_train_config(method.name, config_path, list(settings))
        search = None
        if search_path:  # checked against the method's config before anything trains
            from flywheel.train.search import load_search_spec

            search = load_search_spec(method.name, search_path, base=config, trials=trials, sampler=sampler,
                                      wall_s=wall_s)
        with store_at(db) as store:
            if len(specs) > 1:  # one adapter on the weighted union of the evals' sets (flywheel.train.multi)
                from flywheel.train.multi import train_multi

                result = train_multi(method.name, specs, store, base=base, weights=weight_list, config=config,
                                     evaluate=not no_eval, splits=splits, quiet=as_json, launch=launch,
                                     **set_options)
            else:
                result = run(TrainRequest(
                    method=method.name, spec=specs[0], store=store, base=base, config=config, data=data,
                    set_options=set_options, evaluate=not no_eval, splits=splits, resume=resume, search=search,
                    launch=launch, hosted_options=parse_options(options), quiet=as_json,
                    log=None if as_json else lambda line: echo(line, err=True)))
        if result is None:  # a non-main process under accelerate launch
            return
        echo(json.dumps(result.to_dict(), indent=2) if as_json else "\n".join(result.summary_lines()))

    options = [
        click.argument("spec_paths", metavar="SPEC...", nargs=-1, required=True, type=click.Path(dir_okay=False)),
        click.option("--weights", default=None, help="With several SPECs: how many times an epoch goes over each "
                     "eval's rows, comma-separated (default 1 each), e.g. 2,1 or 1,0.5."),
        click.option("--base", default=None, help="local:MODEL[+ADAPTER], a checkpoint id, or openai:MODEL (hosted)."),
        click.option("--resume", default=None, metavar="JOB", help="Continue a killed local job from its last saved "
                     "step (it must have trained with save_steps); a re-run of the same command resumes too."),
        click.option("-c", "--config", "config_path", type=click.Path(dir_okay=False), help="Training config YAML."),
        click.option("-s", "--set", "settings", multiple=True, help="Override a training setting: key.path=value."),
        click.option("--data", default=None, help="Train on a platform JSONL file or a recorded set id (ts-...)."),
        click.option("--split", "splits", multiple=True, default=("valid", "test"), show_default=True,
                     type=click.Choice(["valid", "test"]), help="Evaluate the checkpoint on these splits."),
        click.option("--no-eval", is_flag=True, help="Register the checkpoint without evaluating it."),
        click.option("-o", "--option", "options", multiple=True, help="Hosted backend option key=value."),
        *(_SET_OPTIONS[name] for name in method.set_options), db_option, json_option,
        click.option("--launcher", type=click.Choice(["local", "accelerate"]), default="local", show_default=True,
                     help="local: train here; accelerate: run this command under `accelerate launch`."),
        click.option("--num-processes", type=click.IntRange(min=1), default=None,
                     help="Processes for --launcher accelerate (default: the accelerate config's)."),
        click.option("--accelerate-config", default=None, help="accelerate config file, or a shipped template: "
                     "ddp, deepspeed_zero2, deepspeed_zero3, fsdp (flywheel/train/accelerate_configs)."),
        click.option("--cpu", is_flag=True, help="With --launcher accelerate: CPU processes over gloo."),
        click.option("--search", "search_path", type=click.Path(dir_okay=False), default=None,
                     help="Hyper-parameter search over a YAML space of config keys (docs/training.md, Hyper-parameter search)."),
        click.option("--trials", type=click.IntRange(min=1), default=None, help="--search: most trials (default 10)."),
        click.option("--sampler", type=click.Choice(["tpe", "random", "grid"]), default=None,
                     help="--search: tpe (Bayesian, the default), random or grid."),
        click.option("--wall-s", type=click.FloatRange(min=0, min_open=True), default=None,
                     help="--search: wall-clock budget; no trial starts once it is spent."),
    ]
    for option in reversed(options):
        command = option(command)
    command.__doc__ = method.summary[0].upper() + method.summary[1:] + "."
    return click.command(method.name)(command)




def _launch_spec(launcher, num_processes, accelerate_config, cpu, *, search_path, trials, sampler, wall_s, no_eval,
                 resume, base, reset: bool):
    """The flags' rules (usage errors, exit 2), then the LaunchSpec they give, resolved and checked."""
    from pathlib import Path

    from pydantic import ValidationError

    from flywheel.train.launch import LaunchSpec
    from flywheel.train.run import check_launch

    try:  # the launcher rules live with LaunchSpec (a weight stage's `launcher` too)
        launch = LaunchSpec(kind=launcher, num_processes=num_processes, config_file=accelerate_config, cpu=cpu)
    except ValidationError as exc:
        raise click.UsageError(_launch_flags(exc.errors()[0]["msg"].removeprefix("Value error, "))) from None
    if not search_path and (trials or sampler or wall_s):
        raise click.UsageError("--trials, --sampler and --wall-s need --search")
    if search_path and no_eval:
        raise click.UsageError("--search scores every trial on valid: drop --no-eval")
    if resume and (base or reset):
        raise click.UsageError("--resume continues one job with its own base, data and config: give its SPEC "
                               "alone, without --base, --data, -s and -c")
    if not resume and not base:
        raise click.UsageError("give --base (or --resume JOB)")
    launch = launch.resolved(Path.cwd())  # a missing config file is one clean error before anything starts
    check_launch(launch, searching=search_path is not None)
    return launch


def _spec_flags(n_specs: int, weights: str | None, *, data, search_path, resume) -> list[float] | None:
    """The rules of the flags that depend on how many SPECs were given; the --weights as floats."""
    weight_list = _weights(weights, n_specs)
    if weight_list and n_specs == 1:
        raise click.UsageError("--weights weighs several SPECs against each other; give two or more")
    if n_specs > 1 and data:
        raise click.UsageError("--data trains on one file; drop it to build and combine each eval's set")
    if n_specs > 1 and search_path:
        raise click.UsageError("--search tunes one eval's training; give one SPEC")
    if resume and search_path:
        raise click.UsageError("--resume continues one job; --search starts new ones: give one of them")
    return weight_list


def _launch_flags(message: str) -> str:
    """A LaunchSpec rule in the words of `flywheel train`'s options."""
    for field, flag in (("num_processes", "--num-processes"), ("config_file", "--accelerate-config"),
                        ("cpu", "--cpu"), ("kind: accelerate", "--launcher accelerate")):
        message = message.replace(field, flag)
    return message.replace(", --cpu and main_process_port", " and --cpu")


def _weights(text: str | None, n_specs: int) -> list[float] | None:
    """`--weights 2,1` as floats, one per SPEC (a usage error otherwise)."""
    if text is None:
        return None
    try:
        weights = [float(part) for part in text.split(",")]
    except ValueError:
        raise click.UsageError(f"--weights {text!r}: expected comma-separated numbers, e.g. 2,1") from None
    if len(weights) != n_specs:
        raise click.UsageError(f"--weights {text!r}: {len(weights)} weight(s) for {n_specs} SPEC(s); give one per SPEC")
    if any(not w > 0 or w == float("inf") for w in weights):
        raise click.UsageError(f"--weights {text!r}: weights must be positive numbers")
    return weights


@train_group.command("export")
@click.argument("kind", metavar="METHOD")
@click.argument("spec_path", metavar="SPEC", type=click.Path(dir_okay=False))
@click.option("-o", "--output", required=True, type=click.Path(dir_okay=False), help="Platform-format JSONL to write.")
@click.option("--hf", "hf_dir", default=None, type=click.Path(file_okay=False), help="Also save a HF dataset here.")
@click.option("--min-score", type=float, default=None, help="SFT: objective score a capture must reach.")
@click.option("--min-margin", default=0.5, show_default=True, type=click.FloatRange(min=0), help="DPO: least gap.")
@db_option
@json_option
def train_export_command(kind, spec_path, output, hf_dir, min_score, min_margin, db, as_json):
    """Build a training set from the store, record it, and write it as platform JSONL (and HF)."""
    from flywheel.spec import load_eval_spec
    from flywheel.train import record_training_set, to_hf_dataset, training_method

    spec = load_eval_spec(spec_path)
    with store_at(db) as store:
        options = {"min_score": min_score, "min_margin": min_margin, "max_per_item": 1}
        method = training_method(kind)
        training_set = record_training_set(store, method.build_set(
            spec, store, **{k: options[k] for k in method.set_options}))
    path = training_set.to_jsonl(output)
    with store_at(db) as store:  # recorded, so that `captures delete` finds copies in it
        from flywheel.privacy.lineage import record_export

        record_export(store, path, kind, training_set.rows, source={"training_set": training_set.id})
    if hf_dir:
        to_hf_dataset(training_set).save_to_disk(hf_dir)
    summary = {"id": training_set.id, "kind": kind, "rows": len(training_set), "path": str(path),
               "content_hash": training_set.content_hash, "hf": hf_dir, "source": training_set.source}
    echo(json.dumps(summary, indent=2) if as_json else
               f"wrote {len(training_set)} {kind} rows to {path} (set {training_set.id})")
