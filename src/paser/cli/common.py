"""What the commands share: the app, its groups, the common options, and how a training
command resolves its config (:func:`paser.config.resolve_config`)."""

from __future__ import annotations

import contextlib
import shutil
from pathlib import Path

import typer

from paser.config import list_presets

# Help is click's plain two-column list, not typer's rich table: at 80 columns the table's
# seven columns shrink together, cutting option names ("--budget-gflops…") and leaving the
# help 19 columns; the list never cuts a name and gives the help 46.
PLAIN_HELP = {"rich_markup_mode": None}

app = typer.Typer(add_completion=False, no_args_is_help=True, **PLAIN_HELP,
                  help="Parsimonious segmentation: route each patch to the cheapest good model.")
data_app = typer.Typer(no_args_is_help=True, **PLAIN_HELP,
                       help="Datasets: generate the synthetic battery set, check a dataset folder.")
app.add_typer(data_app, name="data")
experiment_app = typer.Typer(help="The paper's further experiments on a finished run.",
                             no_args_is_help=True, **PLAIN_HELP)
app.add_typer(experiment_app, name="experiment")

state = {"debug": False}

PRESET = typer.Option(None, "--preset", help="a shipped preset: " + ", ".join(list_presets())
                      + " (`paser presets`)")
CONFIG = typer.Option(None, "--config", help="a YAML config file", exists=False)
RUN_DIR = typer.Option(..., "--run-dir", help="the run directory (config, checkpoints, metrics)")
OVERRIDES = typer.Argument(None, help="key=value overrides, e.g. stage2.epochs=5 data.root=/data")
RESUME = typer.Option(False, "--resume", help="continue from the last completed epoch")
DEVICES = typer.Option(None, "--devices", min=1, help="processes per node for data-parallel "
                       "training (GPUs; on CPU, processes over gloo); default the config's "
                       "distributed.devices (1)")
NUM_NODES = typer.Option(None, "--num-nodes", min=1, help="machines (launch the same command "
                         "on each; see docs/training.md)")
PRECISION = typer.Option(None, "--precision", help="32-true, bf16-mixed, 16-mixed (CUDA) or auto "
                         "(bf16-mixed where the device computes bf16 natively)")


def _version(shown: bool) -> None:
    if shown:
        import platform

        import torch

        from paser import __version__

        typer.echo(f"paser {__version__} (torch {torch.__version__}, Python "
                   f"{platform.python_version()})")
        raise typer.Exit()


@app.callback()
def _main(debug: bool = typer.Option(False, "--debug", help="show tracebacks on errors"),
          version: bool = typer.Option(False, "--version", callback=_version, is_eager=True,
                                       help="print paser's version (and torch's) and exit")
          ) -> None:
    state["debug"] = debug


@contextlib.contextmanager
def config_kept_on_error(run_dir: Path):
    """A training command that fails on its config or data before any checkpoint changed
    leaves the run as it was: its ``config.yaml`` and its ledger ``steps.json`` are put
    back, or removed where it had none (an override the command refused is not kept for
    evaluate and segment to read, a folder with no config is not left looking like a run,
    and a finished stage is not left marked as begun, which `paser run` would resume and
    redo every later step for), and a run folder the command made is removed (a mistyped
    --run-dir is not left as a run). Only what this process wrote: refused because another
    process holds the folder, it leaves that process's files (and folder) alone."""
    from paser.checkpoints import checkpoint_files
    from paser.errors import PaserError
    from paser.runtime import atomic_write_text, holds_run_dir

    run_dir = Path(run_dir)
    existed = run_dir.exists()
    kept = {name: (run_dir / name).read_bytes() if (run_dir / name).is_file() else None
            for name in ("config.yaml", "steps.json")}
    ckpts = checkpoint_files(run_dir)
    try:
        yield
    except PaserError:
        # a process writes a run's files only once it holds the folder; one that never took
        # it either wrote nothing or wrote before any process locked it (none did: no lock)
        mine = holds_run_dir(run_dir) or not (run_dir / ".paser.lock").exists()
        if mine and run_dir.is_dir() and checkpoint_files(run_dir) == ckpts:  # (not a file)
            if not existed:
                shutil.rmtree(run_dir, ignore_errors=True)
            for name, before in kept.items():
                path = run_dir / name
                if before is not None and path.is_file() and path.read_bytes() != before:
                    atomic_write_text(before.decode(), path)
                elif before is None and existed:  # (one it made: gone with the folder)
                    path.unlink(missing_ok=True)
        raise


@contextlib.contextmanager
def working(what: str):
    """Say what a slow step with no bar of its own is doing: a spinner on a terminal (gone
    when it ends), nothing in a log."""
    from rich.console import Console

    console = Console(stderr=True)
    if not console.is_terminal:
        yield
        return
    with console.status(f"{what}..."):
        yield
