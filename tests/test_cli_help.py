"""The command line reads as before: every command's --help is pinned, and a mistyped
command is a one-line usage error (status 2), not a traceback."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest
import typer
from typer.testing import CliRunner

from paser.cli import app, main

PINNED = Path(__file__).parent / "data" / "cli_help.txt"


def every_help() -> str:
    """Every command's --help at 100 columns, as ``tests/data/cli_help.txt`` holds it."""
    def walk(cmd, path):
        yield path
        for name in sorted(getattr(cmd, "commands", {})):
            yield from walk(cmd.commands[name], [*path, name])

    runner, out = CliRunner(), []
    for path in walk(typer.main.get_command(app), []):
        r = runner.invoke(app, [*path, "--help"], env={"COLUMNS": "100", "TERM": "dumb"},
                          terminal_width=100, prog_name="paser")
        assert r.exit_code == 0, (path, r.output)
        out.append(f"$ paser {' '.join([*path, '--help'])}\n{r.output}")
    return "\n".join(out)


def test_every_commands_help_reads_as_pinned():
    """A change to a command's help is deliberate: regenerate the pinned file with
    ``python -c "from tests.test_cli_help import every_help; print(every_help(), end='')"
    > tests/data/cli_help.txt`` and review the diff."""
    assert every_help() == PINNED.read_text()


def test_a_mistyped_command_is_a_usage_error(monkeypatch, capsys):
    monkeypatch.setattr(sys, "argv", ["paser", "segmnt"])
    with pytest.raises(SystemExit) as exit_:
        main()
    err = capsys.readouterr().err
    assert exit_.value.code == 2 and "No such command 'segmnt'" in err
    assert "Traceback" not in err


def test_help_paragraphs_wrap_at_the_terminal_not_at_the_docstring():
    """At 80 columns, `paser --help` had lines of one word ('a', 'and', 'where it'): typer
    kept each docstring's line breaks and the terminal wrapped them again."""
    r = CliRunner().invoke(app, ["--help"], env={"COLUMNS": "80", "TERM": "dumb"},
                           terminal_width=80, prog_name="paser")
    rows = [line.strip("│ ").split() for line in r.output.splitlines() if line.startswith("│")]
    # a wrapped row continues its sentence: short ones are only the ends of sentences
    assert all(len(" ".join(w)) > 20 or w[-1].endswith((".", ")")) for w in rows if w)
    group = typer.main.get_command(app)
    for name, cmd in group.commands.items():
        for paragraph in (cmd.help or "").split("\n\n"):
            assert "\n" not in paragraph, name
