"""The command line reads as before: every command's --help is pinned, and a mistyped
command is a one-line usage error (status 2), not a traceback."""

from __future__ import annotations

import re
import sys
from pathlib import Path

import click
import pytest
import typer
from typer.testing import CliRunner

from paser.cli import app, main

PINNED = Path(__file__).parent / "data" / "cli_help.txt"


def walk(cmd, path=()):
    """Every command under ``cmd`` (groups too) with its path: ``(cmd, ["data", "check"])``."""
    yield cmd, list(path)
    for name in sorted(getattr(cmd, "commands", {})):
        yield from walk(cmd.commands[name], [*path, name])


def help_at(path: list[str], columns: int) -> str:
    r = CliRunner().invoke(app, [*path, "--help"], env={"COLUMNS": str(columns), "TERM": "dumb"},
                           terminal_width=columns, prog_name="paser")
    assert r.exit_code == 0, (path, r.output)
    return r.output


def every_help(columns: int = 100) -> str:
    """Every command's --help at 100 columns, as ``tests/data/cli_help.txt`` holds it."""
    return "\n".join(f"$ paser {' '.join([*path, '--help'])}\n{help_at(path, columns)}"
                      for _, path in walk(typer.main.get_command(app)))


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


def test_every_option_name_is_whole_at_80_columns():
    """typer's rich table shrank its name column with its help column at 80 columns:
    `paser segment --help` showed "--budget-gflops…" and "--max-gflops-pe…"."""
    for cmd, path in walk(typer.main.get_command(app)):
        text = help_at(path, 80)
        assert "…" not in text, path
        assert max(map(len, text.splitlines())) <= 80, path
        for param in cmd.params:
            if isinstance(param, click.Option) and not param.hidden:
                for name in [*param.opts, *param.secondary_opts]:
                    assert re.search(rf"(^|[\s,/]){re.escape(name)}(\s|,|$)", text, re.M), \
                        (path, name)


def test_help_paragraphs_wrap_at_the_terminal_not_at_the_docstring():
    """At 80 columns, `paser --help` had lines of one word ('a', 'and', 'where it'): typer
    kept each docstring's line breaks and the terminal wrapped them again. Each command's
    summary (its first paragraph) is listed whole, not cut at 45 characters with '...'."""
    text = help_at([], 80)
    listed = " ".join(text.split("Commands:")[1].split())
    group = typer.main.get_command(app)
    for name, cmd in group.commands.items():
        for paragraph in (cmd.help or "").split("\n\n"):
            assert "\n" not in paragraph, name
        assert f"{name} {cmd.help.split(chr(10) * 2)[0]}" in listed, name
    assert "..." not in listed
