"""Sensitivity to lam and to the number of Monte Carlo samples (paper R5).

(a) lam sweep: for each lam a fresh policy is trained as in stage 2 (same training images:
D_rl, with D_ft under ``stage2.train_on`` rl+ft, in ``stage2.views`` views and
``stage2.crops`` crops; same epochs, batch, learning rate, exploration and
best-on-validation rule) from the run's stage-1 models. The task models are frozen in
stage 2, so what a patch scores under each action does not depend on lam: the outcomes of
those training images, validation and test are computed once
(:class:`paser.outcomes.PatchOutcomes`) and every lam only trains a policy on them.
Each point is the greedy policy on the test split, whose f0 passes draw their dropout masks
as Table 1 and inference do (``mc_seed`` 0): mIoU, mean cost ``c(a)`` per patch (the
reward's cost, stage2.cost) and GFLOP per image.

(b) Monte Carlo samples: f0's entropy map from T = 5 and T = 20 passes over the test
split, summarised as the mean entropy of each patch; a Welch t-test (SciPy, unequal
variances) asks whether the two distributions differ (the paper: p = 0.6986). The passes
keep the run's dropouts on (mc_dropout all or last); a run whose f0 routes with one
deterministic pass (none) is measured with every dropout on, the paper's setting, and the
output says so.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch

from paser.checkpoints import build_router, make_policy
from paser.data import Tensors
from paser.errors import ConfigError
from paser.experiments.finished import open_finished, record_experiment
from paser.experiments.report import p_text, pyplot, save_figure
from paser.outcomes import PatchOutcomes
from paser.routing import Router
from paser.runtime import progress
from paser.train.policy import fit_policy, fractions, greedy_actions, training_outcomes
from paser.uncertainty import mc_predict, seeded

DEFAULT_LAMS = tuple(round(0.1 * i, 1) for i in range(10))


def welch(a, b) -> dict:
    """Welch's t-test of two samples (SciPy ``ttest_ind(equal_var=False)``)."""
    from scipy import stats  # here: scipy.stats takes about 0.5 s to import

    res = stats.ttest_ind(np.asarray(a, dtype=np.float64), np.asarray(b, dtype=np.float64),
                          equal_var=False)
    return {"t_statistic": float(res.statistic), "p_value": float(res.pvalue)}


def entropy_dropout(run_dropout: str) -> str:
    """The dropouts on in the T study: the run's, or every one (the paper's) where the run
    has none on (one deterministic pass, for which T means nothing)."""
    return "all" if run_dropout == "none" else run_dropout


@torch.inference_mode()
def patch_entropies(router: Router, data: Tensors, samples: int, batch_size: int,
                    seed: int = 0, dropout: str = "all") -> torch.Tensor:
    """Mean entropy of f0's ``samples``-pass Monte Carlo output per patch ``[N * P]``, with
    ``dropout``'s dropouts on (:func:`paser.uncertainty.mc_predict`)."""
    device = next(router.parameters()).device
    grid, out = router.grid, []
    with seeded(seed, device):
        for x, _ in data.batches(batch_size):
            x = grid.pad(x.to(device))
            ent = mc_predict(router.f0, x, samples, dropout).entropy  # [B, Hp, Wp]
            out.append(grid.split(ent).mean(dim=(-2, -1)).cpu())
    return torch.cat(out)


def lam_sweep(cfg, router: Router, data, lams, epochs: int | None = None,
              show_progress: bool = True) -> list[dict]:
    """Train one stage-2 policy per lam on shared outcomes; measure each on the test split."""
    s2, device = cfg.stage2, next(router.parameters()).device
    ncls, batch = cfg.models.num_classes, s2.batch_size
    epochs = s2.epochs if epochs is None else epochs
    # the images stage 2 learns from (stage2.train_on, views, crops), not D_rl alone; the
    # test split as Table 1 measures it: f0's dropout masks seeded as at inference, in the
    # report's batches (a mask follows an image's place in its batch)
    caches = {"rl": training_outcomes(cfg, router, data, device),
              "validation": PatchOutcomes.build(router, data.validation, ncls, batch, device),
              "test": PatchOutcomes.build(router, data.test, ncls, cfg.baselines.timing_batch,
                                          device, mc_seed=0)}
    costs = router.costs(*data.rl.images.shape[-2:])
    cost = costs.model_cost(s2.cost).to(device)
    rows = []
    with progress(show_progress) as bar:
        task = bar.add_task("lam sweep", total=len(lams) * max(epochs, 1), info="")
        for lam in lams:
            torch.manual_seed(cfg.seed)
            policy = make_policy(cfg, router.num_models).to(device)

            def tick(epoch, val, lam=lam):
                bar.update(task, advance=1, info=f"lam {lam:g}: val mIoU {val['miou']:.3f}")
            best_state, best_epoch = fit_policy(cfg, policy, caches["rl"], caches["validation"],
                                                cost, lam, epochs, on_epoch=tick)
            policy.load_state_dict(best_state)
            actions = greedy_actions(policy, caches["test"].state, batch)
            rows.append({"lam": float(lam), "iou": caches["test"].miou(actions.cpu()),
                         "mean_cost": float(cost[actions.to(device)].mean()),
                         "gflops": float(costs.gflops(actions).mean()),
                         "fractions": fractions(actions, router.num_models),
                         "best_epoch": best_epoch})
    return rows


def run_sensitivity(run_dir: str | Path, lams=DEFAULT_LAMS, samples=(5, 20),
                    epochs: int | None = None, show_progress: bool = True) -> dict:
    """Both sensitivity studies on a finished run; written into its ``results.json``
    (``experiments.sensitivity``), ``report.md`` and ``figures/``. Returns that entry.

    ``samples``: two different numbers of Monte Carlo passes (the same number twice would
    compare one seeded entropy map with itself: p = 1 whatever f0 does)."""
    if len(samples) != 2 or min(samples) < 1 or samples[0] == samples[1]:
        raise ConfigError(f"samples {list(samples)}: give two different numbers of Monte Carlo "
                          "passes, each at least 1 (e.g. 5 and 20)")
    run = open_finished(run_dir, show_progress)
    cfg, data = run.cfg, run.data
    router = build_router(cfg, run.run_dir, run.device).eval()
    sweep = lam_sweep(cfg, router, data, list(lams), epochs, show_progress)
    dropout = entropy_dropout(router.mc_dropout)
    ent = {t: patch_entropies(router, data.test, t, cfg.stage2.batch_size, cfg.seed, dropout)
           for t in samples}
    a, b = (ent[t].numpy() for t in samples[:2])
    out = {"lam_sweep": sweep, "cost": cfg.stage2.cost,
           "epochs": cfg.stage2.epochs if epochs is None else epochs,
           "mc_samples": list(samples), "dropout": dropout, "run_dropout": router.mc_dropout,
           "entropy_unit": "mean entropy per patch (nats)",
           "entropy": {str(t): {"mean": float(v.mean()), "std": float(v.std()),
                                "n": int(v.numel())} for t, v in ent.items()},
           **welch(a, b)}
    figures = run.run_dir / "figures"
    _plot_lam(figures / "sensitivity_lam.png", sweep, cfg.stage2.cost)
    _plot_entropy(figures / "mc_entropy.png", ent, out["p_value"], dropout)
    record_experiment(run.run_dir, "sensitivity", out)
    return out


#: what c(a) is under each stage2.cost, for the lam figure's axis
COST_AXIS = {"params": "share of f0..fK's parameters",
             "flops": "share of f0..fK's GFLOP on a patch"}


def lam_labels(rows: list[dict], close: float = 0.02) -> list[tuple[float, float, str]]:
    """One label per point of the lam figure, ``(mean cost, mIoU, "0, 0.1")``: lams whose
    points lie within ``close`` of each other (a share of each axis's span) share one, as
    lams that train the same policy do, so their labels do not print over each other."""
    xs, ys = [r["mean_cost"] for r in rows], [r["iou"] for r in rows]
    dx, dy = (max(max(v) - min(v), 1e-12) for v in (xs, ys))
    groups: list[list[dict]] = []
    for r in rows:
        for g in groups:
            if (abs(r["mean_cost"] - g[0]["mean_cost"]) <= close * dx
                    and abs(r["iou"] - g[0]["iou"]) <= close * dy):
                g.append(r)
                break
        else:
            groups.append([r])
    return [(g[0]["mean_cost"], g[0]["iou"], ", ".join(f"{r['lam']:g}" for r in g))
            for g in groups]


def _plot_lam(path: Path, rows: list[dict], cost: str) -> None:
    """Mean cost against test mIoU, one point per lam (paper Fig. 5b); ``cost`` is
    stage2.cost, what c(a) measures."""
    plt = pyplot()
    fig, ax = plt.subplots(figsize=(5.5, 3.8))
    ax.plot([r["mean_cost"] for r in rows], [r["iou"] for r in rows], "o-", color="C0")
    xs = [r["mean_cost"] for r in rows]
    middle = (min(xs) + max(xs)) / 2
    for x, y, text in lam_labels(rows):
        right = x > middle  # written towards the middle, inside the axes
        ax.annotate(f"lam {text}", (x, y), fontsize=7, textcoords="offset points",
                    xytext=(-4 if right else 4, 3), ha="right" if right else "left")
    ax.margins(0.08)
    ax.set_xlabel(f"mean cost per patch c(a): {COST_AXIS.get(cost, cost)} "
                  f"(stage2.cost {cost})", fontsize=8)
    ax.set_ylabel("test mIoU")
    ax.set_title("policy trained at each lam", fontsize=9)
    ax.grid(alpha=0.3)
    save_figure(fig, path)


def _plot_entropy(path: Path, ent: dict[int, torch.Tensor], p_value: float,
                  dropout: str) -> None:
    """Box plot of the patch entropies for each number of Monte Carlo samples."""
    plt = pyplot()
    fig, ax = plt.subplots(figsize=(4.5, 3.8))
    ax.boxplot([v.numpy() for v in ent.values()], showfliers=False)
    ax.set_xticks(range(1, len(ent) + 1), [f"T = {t}" for t in ent])
    ax.set_ylabel("mean entropy per patch (nats)")
    ax.set_title(f"dropout {dropout}; Welch t-test p = {p_text(p_value)}", fontsize=9)
    ax.grid(alpha=0.3)
    save_figure(fig, path)
