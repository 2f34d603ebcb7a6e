"""What the further experiments share: open a finished run, add an entry to its report."""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import torch

from paser.config import ExperimentConfig, load_config
from paser.data import StageData, load_stage_data
from paser.errors import CheckpointError
from paser.experiments.report import write_report
from paser.train.common import setup


@dataclass
class FinishedRun:
    """A run directory that `paser run` completed: its config, device and data."""

    run_dir: Path
    cfg: ExperimentConfig
    device: torch.device
    data: StageData


def open_finished(run_dir: str | Path, show_progress: bool = True) -> FinishedRun:
    """The run's saved config and data; a clear error if `paser run` did not finish there."""
    run_dir = Path(run_dir)
    if not (run_dir / "results.json").is_file():
        raise CheckpointError(f"{run_dir}: no results.json; finish `paser run` into this folder "
                              "first (the experiment reuses its models and report)")
    cfg = load_config(config_file=run_dir / "config.yaml")
    device = setup(cfg)
    return FinishedRun(run_dir, cfg, device, load_stage_data(cfg, progress=show_progress))


def record_experiment(run_dir: Path, name: str, entry: dict) -> None:
    """Store ``entry`` as ``results.json["experiments"][name]`` and rewrite the report.

    results.json is read again here, so experiments that ran one after another on the same
    run keep each other's entries."""
    results = json.loads((run_dir / "results.json").read_text())
    results.setdefault("experiments", {})[name] = entry
    write_report(run_dir, results)
