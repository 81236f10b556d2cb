"""Distributed training: the same `flywheel.train.run`, on every process of `accelerate launch`.

    flywheel train sft eval.yaml --base local:smollm2 --launcher accelerate --num-processes 2 --cpu
    flywheel train sft eval.yaml --base local:smollm2 --launcher accelerate --accelerate-config deepspeed_zero2

`launch_training` starts `python -m accelerate.commands.launch [options] -m flywheel.train.worker
REQUEST.json RESULT.json` as a subprocess whose output streams to this terminal. Every process runs
the same TRL trainer (flywheel.train.local.run_local); only the main process writes the job's
metrics events to the store as it trains, registers the checkpoint (once) and writes the result
file that flywheel.train.run reads back (and evaluates the checkpoint from). A failing or interrupted launch raises TrainingError after
the processes have stopped; the job is then marked failed by the main process.

`--accelerate-config` is a file, or the name of a template shipped in
flywheel/train/accelerate_configs/ (ddp, deepspeed_zero2, deepspeed_zero3, fsdp): copy one
and edit it for a cluster (num_machines, machine_rank, main_process_ip; see docs/scale.md).
"""

from __future__ import annotations

import importlib.util
import os
import shlex
import signal
import socket
import subprocess
import sys
from pathlib import Path
from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, model_validator

from flywheel.errors import SpecError, TrainingError

CONFIG_DIR = Path(__file__).parent / "accelerate_configs"


class LaunchInterrupted(TrainingError):
    """Ctrl-C or SIGTERM reached the launcher: every process was stopped (the wheel stops too)."""


def templates() -> dict[str, Path]:
    """The accelerate config templates shipped with flywheel, by name."""
    return {path.stem: path for path in sorted(CONFIG_DIR.glob("*.yaml"))}


class LaunchSpec(BaseModel):
    """How a training run is started: in this process, or under `accelerate launch`. The one place
    for the launcher rules: the CLI's `--launcher` options and a weight stage's `launcher` setting
    both build it."""

    model_config = ConfigDict(extra="forbid")

    kind: Literal["local", "accelerate"] = Field(
        default="local", description="local: train in this process; accelerate: `accelerate launch` subprocesses "
        "(DDP, DeepSpeed or FSDP per the config file).")
    num_processes: int | None = Field(
        default=None, ge=1, description="Processes to start (accelerate's --num_processes); default: the config's.")
    config_file: str | None = Field(
        default=None, description="An accelerate config file (a stage's: relative to the run spec's folder) or a "
        "shipped template: " + ", ".join(templates()))
    cpu: bool = Field(default=False, description="CPU processes over gloo, even where a GPU exists.")
    main_process_port: int | None = Field(
        default=None, ge=1, le=65535, description="Rendezvous port of the main process (default: a free one here).")

    @model_validator(mode="after")
    def _accelerate_settings_need_accelerate(self) -> "LaunchSpec":
        if self.kind == "local" and (self.num_processes or self.config_file or self.cpu or self.main_process_port):
            raise ValueError("num_processes, config_file, cpu and main_process_port need kind: accelerate")
        name = self.config_file
        if name and name not in templates() and not name.endswith((".yaml", ".yml", ".json")):
            raise ValueError(f"config_file: {name!r} is neither a shipped template ({', '.join(templates())}) "
                             "nor a .yaml/.json file")
        return self

    def resolved(self, base_dir: str | Path) -> "LaunchSpec":
        """This launch with its config file found: relative to `base_dir`, else as given, else a shipped
        template (SpecError names both choices when it is none of them)."""
        if not self.config_file:
            return self
        local = Path(base_dir) / self.config_file
        if local.is_file():
            return self.model_copy(update={"config_file": str(local.resolve())})
        resolve_accelerate_config(self.config_file)
        return self


def resolve_accelerate_config(value: str) -> Path:
    """A config file path, or the shipped template of that name; SpecError names both choices."""
    path = Path(value).expanduser()
    if path.is_file():
        return path
    shipped = templates()
    if value in shipped:
        return shipped[value]
    raise SpecError(f"--accelerate-config: no file {value!r} and no template of that name; "
                    f"templates: {', '.join(shipped)}")


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def accelerate_command(spec: LaunchSpec, argv: list[str]) -> list[str]:
    """The `accelerate launch` command line that runs `python -m <argv>` (a module and its arguments,
    e.g. flywheel.train.worker REQUEST.json RESULT.json) on every process."""
    command = [sys.executable, "-m", "accelerate.commands.launch"]
    if spec.config_file:
        command += ["--config_file", str(resolve_accelerate_config(spec.config_file))]
    if spec.num_processes:
        command += ["--num_processes", str(spec.num_processes)]
    if spec.cpu:
        # accelerate's own --cpu starts one process (more need mpirun); torchrun's launcher with
        # ACCELERATE_USE_CPU set (launch_env) starts N processes that meet over gloo instead.
        several = (spec.num_processes or 1) > 1
        command += ["--multi_gpu"] if several else ["--cpu"]
    if spec.main_process_port:
        command += ["--main_process_port", str(spec.main_process_port)]
    elif not _multi_node(spec):
        # A free port: several launches on one machine must not meet at 29500. Several nodes must
        # agree on one, so there the config's (or accelerate's default) stands.
        command += ["--main_process_port", str(_free_port())]
    return command + ["-m", *argv]


def _multi_node(spec: LaunchSpec) -> bool:
    if not spec.config_file:
        return False
    import yaml

    path = resolve_accelerate_config(spec.config_file)
    try:
        config = yaml.safe_load(path.read_text(encoding="utf-8")) or {}
    except (OSError, yaml.YAMLError) as exc:
        raise SpecError(f"{path}: not a readable accelerate config: {str(exc).splitlines()[0]}") from None
    return isinstance(config, dict) and int(config.get("num_machines") or 1) > 1


def launch_env(spec: LaunchSpec) -> dict[str, str]:
    """The environment of the launched processes: this one, plus the CPU switches when asked."""
    env = dict(os.environ)
    if spec.cpu:
        env["ACCELERATE_USE_CPU"] = "true"
        env["CUDA_VISIBLE_DEVICES"] = ""
    return env


def launch_training(spec: LaunchSpec, argv: list[str], *, stdout=None) -> int:
    """Run `python -m <argv>` (flywheel.train.worker) under `accelerate launch`; returns 0 or raises.

    Output streams through (stdout to `stdout` when given). Ctrl-C (or SIGTERM) is passed on to the launcher, which stops every process;
    LaunchInterrupted (a TrainingError) then says so."""
    if importlib.util.find_spec("accelerate") is None:
        raise TrainingError("--launcher accelerate needs the accelerate package: pip install accelerate")
    command = accelerate_command(spec, argv)
    env = launch_env(spec)
    # The children import the same flywheel as this process, wherever it came from.
    here = str(Path(__file__).resolve().parents[2])
    env["PYTHONPATH"] = os.pathsep.join(p for p in (here, env.get("PYTHONPATH")) if p)
    env.setdefault("OMP_NUM_THREADS", "1")
    process = subprocess.Popen(command, env=env, start_new_session=True, stdout=stdout)
    interrupted = None

    def forward(signum, frame):  # noqa: ARG001 - signal handler signature
        nonlocal interrupted
        interrupted = signum
        # SIGINT to the launcher and every worker: each worker's KeyboardInterrupt marks the job
        # failed on the main process (flywheel.train.local.run_local) before it exits.
        _signal_group(process, signal.SIGINT)

    previous = {sig: signal.getsignal(sig) for sig in (signal.SIGINT, signal.SIGTERM)}
    in_main_thread = _in_main_thread()
    if in_main_thread:
        for sig in previous:
            signal.signal(sig, forward)
    try:
        try:
            code = process.wait()
        except BaseException:
            _signal_group(process, signal.SIGINT)
            raise
        finally:
            try:
                code = process.wait(timeout=60)
            except subprocess.TimeoutExpired:
                _signal_group(process, signal.SIGKILL)
                code = process.wait()
    finally:
        if in_main_thread:
            for sig, handler in previous.items():
                signal.signal(sig, handler)
    if interrupted is not None:
        raise LaunchInterrupted(f"accelerate launch interrupted ({signal.Signals(interrupted).name}); "
                            "every process was stopped and the job marked failed")
    if code != 0:
        raise TrainingError(f"accelerate launch exited with status {code} (its output is above); "
                            f"command: {shlex.join(command)}")
    return code


def _signal_group(process: subprocess.Popen, signum: int) -> None:
    try:
        os.killpg(process.pid, signum)
    except ProcessLookupError:
        pass


def _in_main_thread() -> bool:
    import threading

    return threading.current_thread() is threading.main_thread()


def is_main_process() -> bool:
    """Whether this is the main process of an `accelerate launch` (True when not launched)."""
    try:
        from accelerate import PartialState
        from accelerate.utils import parse_flag_from_env

        # Under `accelerate launch` on CPUs (flywheel.train.launch), the state must know it is a
        # CPU run before the Trainer asks, or it settles on one process.
        return PartialState(cpu=parse_flag_from_env("ACCELERATE_USE_CPU")).is_main_process
    except Exception:  # noqa: BLE001 - without accelerate state there is one process
        return True
