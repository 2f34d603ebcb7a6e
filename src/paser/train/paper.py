"""PaSeR (paper): the paper's method trained on the run's own stage-1 pool, beside the
shipped PaSeR, so that both are reported side by side.

The paper's method (:data:`PAPER_METHOD`: REINFORCE, T = 5 Monte Carlo passes over every
dropout, f0's prediction and entropy as the state, the reference policy, lam 0.5 and the
parameter cost) is laid over the run's config, then ``baselines.paper``, a nested mapping
of the settings this run gives it (its epochs and learning rates, another lam). Stages 2 and 3 of that config (and its TVD sweep, if it has one) train into
``<run>/paper/``, which holds copies of the run's stage-1 checkpoints, so it is a run
directory of its own (``PaSeR.load`` reads it). ``None``, or settings that change nothing, means the shipped PaSeR is the paper's.
"""

from __future__ import annotations

import shutil
from pathlib import Path
from typing import Any

from paser.checkpoints import PAPER_DIR
from paser.config import ExperimentConfig, validate
from paser.train.common import prepare_run_dir

#: the method settings of the paper (Srikishan et al., AAAI 2024), laid over a run's config
PAPER_METHOD: dict[str, Any] = {
    "mc_samples": 5, "mc_dropout": "all", "uncertainty": "entropy",
    "stage2": {"objective": "reinforce", "gain": "patch", "policy": "cnn", "state": "paper",
               "head": "global", "stride": 1, "lam": 0.5, "cost": "params",
               "alpha": [0.7, 0.95], "weight_decay": 0.0, "train_on": "rl", "members": 1,
               "views": 1, "crops": 0},
    "operating_point": {"iou_within_top": None, "budget_gflops": None, "max_tvd": None},
}


def _merge(base: dict, over: dict) -> dict:
    out = dict(base)
    for key, value in over.items():
        out[key] = _merge(base[key], value) if isinstance(value, dict) and isinstance(
            base.get(key), dict) else value
    return out


def paper_config(cfg: ExperimentConfig) -> ExperimentConfig | None:
    """The run's config with :data:`PAPER_METHOD` and ``baselines.paper`` laid over it, or
    ``None`` when that is unset or changes nothing the method depends on (the shipped PaSeR
    is the paper's)."""
    over = cfg.baselines.paper
    if over is None:
        return None
    raw = cfg.model_dump(mode="json")
    merged = _merge(_merge(raw, PAPER_METHOD), over)
    merged["baselines"]["paper"] = None
    # the paper calibrates nothing: its policy routes as trained
    merged["operating_point"] = dict(PAPER_METHOD["operating_point"])
    paper = validate(merged, "key 'baselines.paper'")
    mine = cfg.model_copy(update={"baselines": cfg.baselines.model_copy(update={"paper": None})})
    same = paper.model_dump(exclude={"stage3"}) == mine.model_dump(exclude={"stage3"})
    return None if same else paper


def method_differences(cfg: ExperimentConfig, paper: ExperimentConfig) -> list[str]:
    """The settings of :data:`PAPER_METHOD` in which the run's own method ``cfg`` differs
    from the paper's as the run trains it (``paper``, :func:`paper_config`), each as
    ``"key value (paper: value)"``, in PAPER_METHOD's order."""
    mine, theirs = cfg.model_dump(mode="json"), paper.model_dump(mode="json")
    out = []
    for key, value in PAPER_METHOD.items():
        if key == "operating_point":  # the report's notes say where PaSeR is calibrated
            continue
        subkeys = [(key, k) for k in value] if isinstance(value, dict) else [(key,)]
        for path in subkeys:
            a, b = mine, theirs
            for part in path:
                a, b = a[part], b[part]
            if a != b:
                out.append(f"{'.'.join(path)} {a} (paper: {b})")
    return out


def paper_dir(run_dir: str | Path) -> Path:
    return Path(run_dir) / PAPER_DIR


def train_paper(cfg: ExperimentConfig, run_dir: str | Path, resume: bool = False,
                show_progress: bool = True) -> Path | None:
    """Stages 2 and 3 of the paper's method on the run's stage-1 models, into
    ``<run>/paper/``; returns that folder (``None`` when there is nothing to train)."""
    from paser.train.finetune import finetune, tvd_sweep
    from paser.train.policy import train_policy

    paper = paper_config(cfg)
    if paper is None:
        return None
    out = paper_dir(run_dir)
    out, paper = prepare_run_dir(out, paper, resume)
    (out / "checkpoints").mkdir(parents=True, exist_ok=True)
    source = Path(run_dir) / "checkpoints"
    for k in range(len(cfg.models.pool) + 1):
        shutil.copy2(source / f"f{k}.pt", out / "checkpoints" / f"f{k}.pt")
    shutil.copy2(Path(run_dir) / "stage1.json", out / "stage1.json")
    train_policy(paper, out, resume, show_progress)
    finetune(paper, out, resume, show_progress)
    if paper.stage3.tvd_sweep:  # the paper's budget by total variation, on its own policy
        tvd_sweep(paper, out, resume, show_progress)
    return out
