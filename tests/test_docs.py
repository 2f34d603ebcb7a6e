"""The README and docs/ as written: every `paser` and `make` command in a shell block parses
against the real command line, every Python example compiles and its `paser` imports
resolve (the small ones, marked `<!-- docs-test: run -->`, run), config-shaped YAML
validates, every relative link resolves, the README fits on a screen, and
docs/configuration.md is what the code generates. Nothing trains: a few seconds."""

from __future__ import annotations

import ast
import importlib
import re
import shlex
from dataclasses import dataclass
from pathlib import Path

import pytest
import typer
import yaml

import paser.config
from paser.cli import app

try:  # typer >= 0.2x builds its commands on a click of its own, whose errors are these
    from typer.exceptions import TyperException as UsageError
except ImportError:  # older typer builds on click itself
    from click import UsageError

ROOT = Path(__file__).resolve().parents[1]
DOCS = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]
RUN_MARK = "<!-- docs-test: run -->"
SHELL = {"bash", "sh", "shell", "console"}
PASER = {"paser", ".venv/bin/paser"}
REGENERATE = "paser config --doc > docs/configuration.md"


@dataclass
class Block:
    """A fenced code block: its file, the line of its first content line, its language,
    its text, and whether the line before its fence is the run mark."""

    path: Path
    line: int
    lang: str
    text: str
    run: bool

    @property
    def where(self) -> str:
        return f"{self.path.relative_to(ROOT)}:{self.line}"


def fenced_blocks(path: Path) -> list[Block]:
    blocks, lines = [], path.read_text().splitlines()
    i = 0
    while i < len(lines):
        m = re.match(r"^```(\S*)\s*$", lines[i])
        if not m:
            i += 1
            continue
        start = i + 1
        end = next(j for j in range(start, len(lines)) if lines[j].startswith("```"))
        before = next((lines[j] for j in range(i - 1, -1, -1) if lines[j].strip()), "")
        blocks.append(Block(path, start + 1, m.group(1).lower(), "\n".join(lines[start:end]),
                            before.strip() == RUN_MARK))
        i = end + 1
    return blocks


BLOCKS = [b for p in DOCS for b in fenced_blocks(p)]


def shell_commands(block: Block) -> list[tuple[str, list[str]]]:
    """``(file:line, argv)`` of each command in a shell block: continuation lines joined,
    comments and leading ``NAME=value`` environment settings dropped."""
    out, lines = [], block.text.splitlines()
    i = 0
    while i < len(lines):
        first, text = i, lines[i]
        while text.endswith("\\") and i + 1 < len(lines):
            i += 1
            text = text[:-1] + " " + lines[i]
        i += 1
        argv = shlex.split(text, comments=True)
        while argv and re.fullmatch(r"[A-Za-z_][A-Za-z0-9_]*=.*", argv[0]):
            argv = argv[1:]
        if argv:
            out.append((f"{block.path.relative_to(ROOT)}:{block.line + first}", argv))
    return out


COMMANDS = [c for b in BLOCKS if b.lang in SHELL for c in shell_commands(b)]
PASER_COMMANDS = [c for c in COMMANDS if c[1][0] in PASER]
MAKE_COMMANDS = [c for c in COMMANDS if c[1][0] == "make"]
PYTHON_BLOCKS = [b for b in BLOCKS if b.lang == "python"]


def check_paser(argv: list[str]) -> None:
    """Resolve the subcommand path and let the command line parse the rest, as `paser`
    would, without invoking anything. Raises its usage error when the line does not parse."""
    cmd, args, name = typer.main.get_command(app), argv[1:], "paser"
    while hasattr(cmd, "list_commands"):  # a group: its own flags, then a subcommand
        flags = {o for p in cmd.params for o in p.opts} | {"--help"}
        while args and args[0].startswith("-"):
            if args[0] not in flags:
                raise UsageError(f"'{name}' has no option {args[0]}")
            args = args[1:]
        sub = cmd.get_command(None, args[0]) if args else None
        if sub is None:
            raise UsageError(f"'{name}' has no command {args[0] if args else '(none)'}; it "
                             f"has {', '.join(cmd.list_commands(None))}")
        name, cmd, args = args[0], sub, args[1:]
    try:
        cmd.make_context(name, list(args))
    except typer.Exit as done:  # --help
        assert done.exit_code == 0


def inline_commands(path: Path) -> list[tuple[str, list[str]]]:
    """``(file:line, argv)`` of each `paser ...` in a code span of the prose (outside
    fenced blocks), such as "run `paser segment --budget-gflops`"."""
    out, fenced = [], False
    for n, line in enumerate(path.read_text().splitlines(), 1):
        if line.startswith("```"):
            fenced = not fenced
        elif not fenced:
            out += [(f"{path.relative_to(ROOT)}:{n}", ["paser", *m.group(1).split()])
                    for m in re.finditer(r"`(?:\.venv/bin/)?paser ([^`]+)`", line)]
    return out


INLINE = [c for p in DOCS for c in inline_commands(p)]


def options_exist(argv: list[str]) -> list[str]:
    """The ``--options`` of an inline command that its (sub)command does not have; a
    placeholder command (``paser COMMAND --help``) has none to check."""
    cmd, args = typer.main.get_command(app), argv[1:]
    while hasattr(cmd, "list_commands") and args and not args[0].startswith("-"):
        if args[0].isupper() or args[0].startswith("<"):
            return []
        sub = cmd.get_command(None, args[0])
        if sub is None:
            return [f"(no command {args[0]})"]
        cmd, args = sub, args[1:]
    opts = {o for p in cmd.params for o in p.opts} | {"--help"}
    return [a.split("=")[0] for a in args if a.startswith("--") and a.split("=")[0] not in opts]


def make_targets() -> set[str]:
    text = (ROOT / "Makefile").read_text()
    return set(re.findall(r"^([A-Za-z0-9_-]+)\s*:(?!=)", text, flags=re.M))


def test_the_checker_finds_the_commands_and_examples():
    assert len(PASER_COMMANDS) > 30
    assert {"make demo", "make test", "make test-fast"} <= {" ".join(a) for _, a in MAKE_COMMANDS}
    assert sum(b.run for b in PYTHON_BLOCKS) >= 2


def test_the_checker_refuses_what_paser_would_refuse():
    for argv in (["paser", "segmnt", "x"], ["paser", "segment", "x", "--out", "y"],
                 ["paser", "calibrate", "--run-dir", "r", "--budget-gflops", "lots"],
                 ["paser", "data", "check"], ["paser", "--verbose", "presets"]):
        with pytest.raises(UsageError):
            check_paser(argv)
    check_paser(["paser", "--debug", "segment", "DIR", "--run-dir", "<run-dir>", "--out", "o"])


@pytest.mark.parametrize("where, argv", PASER_COMMANDS, ids=[w for w, _ in PASER_COMMANDS])
def test_paser_command_parses(where, argv):
    try:
        check_paser(argv)
    except UsageError as err:
        pytest.fail(f"{where}: {shlex.join(argv)}\n  {err.format_message()}")


def test_the_inline_checker_finds_what_paser_lacks():
    assert len(INLINE) > 100
    assert options_exist(["paser", "segment", "--budget"]) == ["--budget"]
    assert options_exist(["paser", "segmnt"]) == ["(no command segmnt)"]
    assert options_exist(["paser", "segment", "--budget-gflops", "--overwrite"]) == []
    assert options_exist(["paser", "data", "check", "--help"]) == []


@pytest.mark.parametrize("where, argv", INLINE, ids=[w for w, _ in INLINE])
def test_inline_command_options_exist(where, argv):
    assert not options_exist(argv), f"{where}: `{' '.join(argv)}` has no {options_exist(argv)}"


@pytest.mark.parametrize("where, argv", MAKE_COMMANDS, ids=[w for w, _ in MAKE_COMMANDS])
def test_make_target_exists(where, argv):
    targets = [a for a in argv[1:] if not a.startswith("-") and "=" not in a]
    missing = set(targets) - make_targets()
    assert not missing, f"{where}: the Makefile has no target {sorted(missing)}"


@pytest.mark.parametrize("where, argv", [c for c in COMMANDS if c[1][0].endswith("python")
                                         and c[1][1:2] != ["-c"]])
def test_python_script_exists(where, argv):
    assert (ROOT / argv[1]).is_file(), f"{where}: no script {argv[1]}"


def _check_imports(tree: ast.AST, where: str) -> None:
    for node in ast.walk(tree):
        if isinstance(node, ast.ImportFrom) and (node.module or "").split(".")[0] == "paser":
            module = importlib.import_module(node.module)
            for alias in node.names:
                if not hasattr(module, alias.name):
                    try:
                        importlib.import_module(f"{node.module}.{alias.name}")
                    except ImportError:
                        pytest.fail(f"{where}: cannot import {alias.name} from {node.module}")
        elif isinstance(node, ast.Import):
            for alias in node.names:
                if alias.name.split(".")[0] == "paser":
                    importlib.import_module(alias.name)


@pytest.mark.parametrize("block", PYTHON_BLOCKS, ids=[b.where for b in PYTHON_BLOCKS])
def test_python_example_compiles_and_imports(block):
    code = compile(block.text, block.where, "exec")
    _check_imports(ast.parse(block.text), block.where)
    if block.run:
        exec(code, {"__name__": "docs_example"})


YAML_BLOCKS = [b for b in BLOCKS if b.lang == "yaml"]


@pytest.mark.parametrize("block", YAML_BLOCKS, ids=[b.where for b in YAML_BLOCKS])
def test_yaml_example_parses_and_configs_validate(block):
    doc = yaml.safe_load(block.text)
    assert isinstance(doc, dict), f"{block.where}: not a mapping"
    if set(doc) <= set(paser.config.ExperimentConfig.model_fields):  # a config, not classes.yaml
        paser.config.validate(doc, block.where)


def _slug(heading: str) -> str:
    """GitHub's anchor of a heading."""
    text = re.sub(r"[^\w\- ]", "", heading.strip().lower())
    return text.replace(" ", "-")


def _anchors(path: Path) -> set[str]:
    text = re.sub(r"^```.*?^```", "", path.read_text(), flags=re.M | re.S)
    return {_slug(h) for h in re.findall(r"^#+\s+(.*)$", text, flags=re.M)}


LINKS = [(f"{p.relative_to(ROOT)}", target) for p in DOCS
         for target in re.findall(r"\[[^\]]*\]\(([^)\s]+)\)", p.read_text())
         if not re.match(r"[a-z]+:", target)]


@pytest.mark.parametrize("source, target", LINKS, ids=[f"{s}->{t}" for s, t in LINKS])
def test_relative_link_resolves(source, target):
    file, _, anchor = target.partition("#")
    path = (ROOT / source).parent / file if file else ROOT / source
    assert path.exists(), f"{source}: links to {target}, which does not exist"
    if anchor and path.suffix == ".md":
        assert anchor in _anchors(path), f"{source}: {file or source} has no heading #{anchor}"


def test_readme_fits_on_a_screen():
    lines = (ROOT / "README.md").read_text().count("\n")
    assert lines <= 200, f"README.md has {lines} lines; move the detail to docs/"


def test_configuration_reference_is_generated_from_the_code():
    written = (ROOT / "docs" / "configuration.md").read_text()
    assert written == paser.config.reference(), (
        f"docs/configuration.md is stale; regenerate it: {REGENERATE}")
