"""docs/walkthrough.md cannot drift: every `flywheel ...` line in its code blocks parses against the real
CLI (click's make_context, nothing executed) and every repository file it names exists."""

from __future__ import annotations

import re
import shlex
from pathlib import Path

import click
import pytest

from flywheel.cli import main

ROOT = Path(__file__).resolve().parent.parent
WALKTHROUGH = ROOT / "docs" / "walkthrough.md"
# A path inside the repository, as the walkthrough names one (outputs go under /tmp or are bare names).
REPO_PATH = re.compile(r"^(examples|evals|docs|fixtures|flywheel|graders|tests)/")


def walkthrough_commands() -> list[list[str]]:
    """The argument lists of the `flywheel ...` lines in the walkthrough's shell code blocks (```bash)."""
    commands: list[list[str]] = []
    block: str | None = None  # the open fence's language
    for line in WALKTHROUGH.read_text().splitlines():
        if line.startswith("```"):
            block = None if block is not None else line[3:].strip()
            continue
        if block not in ("bash", "sh", "shell"):
            continue
        # A command substitution `$(...)` is one word once the shell ran it.
        words = shlex.split(re.sub(r"\$\([^)]*\)", "SUBSTITUTED", line), comments=True)
        # `VAR=value flywheel ...` and `time flywheel ...`: the command starts at `flywheel`.
        while words and (words[0] == "time" or re.fullmatch(r"[A-Z_]+=\S*", words[0])):
            words = words[1:]
        if words and words[0] == "flywheel":
            commands.append(words[1:])
    return commands


def parse(args: list[str]) -> click.Context:
    """Parse ARGS down to the leaf command the way `flywheel` would, without invoking anything."""
    command: click.Command = main
    name, parent = "flywheel", None
    while True:
        ctx = command.make_context(name, list(args), parent=parent)
        if not isinstance(command, click.Group):
            return ctx
        protected = ctx._protected_args if hasattr(ctx, "_protected_args") else ctx.protected_args  # click < 8.2
        name, sub, args = command.resolve_command(ctx, [*protected, *ctx.args])
        assert sub is not None, f"flywheel {name}: no such command"
        command, parent = sub, ctx


def test_the_walkthrough_covers_the_whole_path() -> None:
    leaves = [args[0] for args in walkthrough_commands()]
    for step in ("eval", "run", "report", "serve", "gate"):
        assert step in leaves, f"docs/walkthrough.md runs no `flywheel {step}`"


@pytest.mark.parametrize("args", walkthrough_commands(), ids=lambda a: " ".join(a))
def test_each_command_parses_and_names_files_that_exist(args: list[str], monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.chdir(ROOT)  # the walkthrough runs from the repository root
    ctx = parse(args)
    assert ctx.command.callback is not None
    for word in args:
        for value in word.split("="):
            if REPO_PATH.match(value):
                assert (ROOT / value).exists(), f"docs/walkthrough.md names {value}, which is not in the repository"


def test_the_readme_tour_links_the_walkthrough() -> None:
    assert "docs/walkthrough.md" in (ROOT / "README.md").read_text()


def test_the_walkthrough_links_files_that_exist() -> None:
    links = re.findall(r"\]\(([^)#]+)(?:#[^)]*)?\)", WALKTHROUGH.read_text())
    local = [link for link in links if "://" not in link]
    assert local, "docs/walkthrough.md links no file of the repository"
    for link in local:
        assert (WALKTHROUGH.parent / link).resolve().exists(), f"docs/walkthrough.md links {link}, which does not exist"


def test_the_walkthrough_task_is_a_valid_task() -> None:
    """The shipped task loads as the commands load it: 64 tickets, four departments, every split."""
    from flywheel.data import load_dataset
    from flywheel.run_spec import load_run_spec
    from flywheel.spec import load_eval_spec

    folder = ROOT / "examples" / "walkthrough"
    spec = load_eval_spec(folder / "eval.yaml")
    run_spec = load_run_spec(folder / "run.yaml")
    assert [stage.stage for stage in run_spec.stages] == ["optimize", "capture", "sft"]
    assert spec.optimize_config().fewshot.label_field == "department"  # `balanced` needs it
    items = load_dataset(spec).items
    assert len(items) == 64
    assert {i.fields["department"] for i in items} == {"billing", "technical", "shipping", "account"}
    assert {i.split for i in items} == {"train", "valid", "test"}
