"""Inference never imports training: loading and using a run reaches paser.checkpoints and
paser.runtime, never paser.train, and the leaf module imports nothing of paser but its
errors."""

from __future__ import annotations

import ast
import subprocess
import sys
from pathlib import Path

import pytest

SRC = Path(__file__).parents[1] / "src" / "paser"
INFERENCE = ["paser.api", "paser.segment", "paser.export", "paser.serve.server",
             "paser.serve.client", "paser.data", "paser.checkpoints", "paser.evaluation"]


def imported(path: Path) -> set[str]:
    """The modules a file imports, at the top or inside functions."""
    names = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            names.add(node.module)
        elif isinstance(node, ast.Import):
            names.update(a.name for a in node.names)
    return names


def test_inference_modules_never_import_training():
    files = [SRC / "api.py", SRC / "segment.py", SRC / "export.py", SRC / "checkpoints.py",
             SRC / "evaluation.py", *(SRC / "serve").glob("*.py"), *(SRC / "data").glob("*.py")]
    bad = {f.name: sorted(m for m in imported(f) if m.startswith("paser.train"))
           for f in files}
    assert not {k: v for k, v in bad.items() if v}


@pytest.mark.slow  # a fresh interpreter
def test_loading_them_loads_nothing_of_training():
    # nor torchvision or torch._dynamo (3 to 4 s of every start), also where the run is
    # routed by the reference policy (the paper's method: a ResNet basic block)
    code = ("import sys\n" + "".join(f"import {m}\n" for m in INFERENCE)
            + "from paser.models.policy import RoutingPolicy\nRoutingPolicy(16, 3)\n"
            + "print(sorted(m for m in sys.modules if m.startswith('paser.train')"
            + " or m in ('torchvision', 'timm', 'torch._dynamo')))")
    assert _last_line(code) == "[]"


def test_the_runtime_leaf_imports_only_the_errors():
    ours = {m for m in imported(SRC / "runtime.py") if m.startswith("paser")}
    assert ours == {"paser.errors"}
    assert not {m for m in imported(SRC / "ranks.py") if m.startswith("paser")}
    assert not {m for m in imported(SRC / "errors.py") if m.startswith("paser")}


def _last_line(code: str) -> str:
    """The last line ``code`` prints in a fresh interpreter."""
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                         timeout=120)
    assert out.returncode == 0, out.stderr[-2000:]
    return out.stdout.splitlines()[-1]


@pytest.mark.slow  # a fresh interpreter
def test_the_command_line_loads_torch_only_for_a_command_that_needs_it():
    code = ("import sys\nfrom paser import cli\nsys.argv = ['paser', 'presets']\n"
            "cli.entry()\nprint('torch' in sys.modules)\n")
    assert _last_line(code) == "False"  # `paser presets` in 0.2 s, not 1.3


@pytest.mark.slow  # a fresh interpreter
def test_naming_the_synthetic_set_loads_no_scipy():
    # every run loaded names its synthetic set (registry.synthetic_root): scipy.ndimage,
    # which only generating it needs, took 0.3 s of each `paser segment` start
    code = ("import sys\nfrom paser.data.synthetic import generator_fingerprint\n"
            "generator_fingerprint()\nprint('scipy.ndimage' in sys.modules)\n")
    assert _last_line(code) == "False"
