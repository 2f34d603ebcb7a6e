"""What the further experiments share: open a finished run, add an entry to its report."""

from __future__ import annotations

import hashlib
import json
import re
from dataclasses import dataclass
from pathlib import Path

import torch

from paser.checkpoints import checkpoint_files, read_record, run_config
from paser.config import ExperimentConfig
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
    cfg = run_config(run_dir)
    results = read_record(run_dir / "results.json", "a report", "write the report again "
                          f"first: paser run --run-dir {run_dir}")
    if "methods" not in results:  # the report written again at the end would need them
        raise CheckpointError(f"{run_dir / 'results.json'}: not a report of `paser run` (no "
                              "'methods'); write the report again first: paser run --run-dir "
                              f"{run_dir}")
    measured = results.get("measured_on")
    if measured is not None and not measured_now(run_dir, measured):
        raise CheckpointError(
            f"{run_dir}: its report (results.json) was made on other models or another "
            "calibration than the run has now (a stage command or paser calibrate ran since); "
            f"write the report again first: paser run --run-dir {run_dir}")
    from paser.data.identity import since_trained

    changed = since_trained(cfg.data, run_dir, "test")
    if changed:
        raise CheckpointError(f"{run_dir}: {changed}; the experiment's figures would not "
                              f"match its report: paser run --run-dir {run_dir} trains on "
                              "them first")
    device = setup(cfg)
    return FinishedRun(run_dir, cfg, device,
                       load_stage_data(cfg, progress=show_progress, run_dir=run_dir))


def models_state(run_dir: Path, by_time: bool = False) -> str:
    """A digest of the run's trained models and calibration (f0..fK, the policy, stage 3,
    ``calibration.json``) by what the files hold: what an experiment on the finished run,
    or its report, measured; the same for a run folder copied or archived. ``by_time``: by
    their sizes and modification times, as runs before 2026-12-06 recorded it."""
    from paser.runtime import file_sha256

    names = [name for name in checkpoint_files(run_dir)
             if re.fullmatch(r"f\d+\.pt|policy\.pt|stage3\.pt", name)]
    files = [(name, run_dir / "checkpoints" / name) for name in names]
    if (run_dir / "calibration.json").is_file():
        files.append(("calibration.json", run_dir / "calibration.json"))
    models = {name: ((path.stat().st_size, path.stat().st_mtime_ns) if by_time
                     else file_sha256(path)) for name, path in files}
    return hashlib.sha1(json.dumps(sorted(models.items())).encode()).hexdigest()[:12]


def states_now(run_dir: Path) -> tuple[str, str]:
    """The run's :func:`models_state` both ways (by content, as recorded now; by time, as
    before 2026-12-06): a ``measured_on`` that is either is of the models as they are."""
    return models_state(run_dir), models_state(run_dir, by_time=True)


def measured_now(run_dir: Path, measured: str | None) -> bool:
    """Whether a ``measured_on`` digest is of the run's models and calibration as they
    are now (:func:`states_now`)."""
    return measured is not None and measured in states_now(run_dir)


def record_experiment(run_dir: Path, name: str, entry: dict) -> None:
    """Store ``entry`` as ``results.json["experiments"][name]`` (with the
    :func:`models_state` it measured, ``measured_on``) and rewrite the report.

    results.json is read again here, so experiments that ran one after another on the same
    run keep each other's entries."""
    results = json.loads((run_dir / "results.json").read_text())
    entry = {**entry, "measured_on": models_state(run_dir)}
    kept, dropped = kept_experiments(run_dir)  # none measured on other models than this one
    drop_figures(run_dir, [d for d in dropped if d != name])  # its own: just drawn
    results["experiments"] = {**kept, name: entry}
    write_report(run_dir, results)


#: the figures each experiment writes into the run's ``figures/``
FIGURES = {"robustness": ("robustness_routing.png",),
           "sensitivity": ("sensitivity_lam.png", "mc_entropy.png")}


def drop_figures(run_dir: Path, names: list[str]) -> None:
    """Remove the figures of the experiments ``names`` (dropped: of other models)."""
    for name in names:
        for figure in FIGURES.get(name, ()):
            (run_dir / "figures" / figure).unlink(missing_ok=True)


def kept_experiments(run_dir: Path) -> tuple[dict, list[str]]:
    """The experiments of the run's report before it is written again: those measured on
    the models as they are now (kept), and the names of those whose models changed since
    (dropped: their figures would be of other models)."""
    try:
        before = json.loads((run_dir / "results.json").read_text()).get("experiments", {})
    except (OSError, ValueError, AttributeError):
        return {}, []
    now = states_now(run_dir)  # the checkpoints read once for every entry
    kept = {k: v for k, v in before.items()
            if isinstance(v, dict) and v.get("measured_on") in now}
    return kept, [k for k in before if k not in kept]
