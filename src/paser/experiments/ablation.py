"""The report's ablation: which objective, policy state and uncertainty step pay for routing.

From the run's own configuration, one setting at a time changes: the stage-2 objective
(REINFORCE, the exact expected reward, gain regression), the gain (the patch's mIoU or its
effect on the split's mIoU), the state the policy sees, which images it learns from, and
f0's uncertainty step (T, where its dropout stays on, entropy or margin). Each variant trains
a fresh policy on the outcomes of the run's frozen stage-1 pool on the images stage 2 learns
from (D_rl, and D_ft with ``stage2.train_on: rl+ft``; pooled or reference policy as the
run's config says) and is scored by its curve against the single-model frontier. "this
run" is the run's own configuration trained afresh in the same way (its own draw of initial
weights), so that every row is one training of one procedure: it differs from the shipped
router (the report's routers table) by that draw.

- ``val_margin`` / ``test_margin``: the mean over 64 budgets spaced evenly in log GFLOP,
  from f0's GFLOP to the dearest model's, of the curve's best IoU within the budget minus
  the frontier's; below a variant's fixed cost (f0's passes and its policy) it counts as f0
  alone. ``best_on_validation`` names the variant with the best validation margin;
- the operating point at the variant's own lam (test IoU and GFLOP);
- the patches it learnt from and its training seconds (the policy only: the outcomes are
  shared).
"""

from __future__ import annotations

import time

import torch

from paser import frontier as FR
from paser.checkpoints import make_policy
from paser.config import ExperimentConfig, apply_override, validate
from paser.experiments.curves import (
    escalation,
    logits_on,
    oracle_curve,
    policy_curve,
    rank_correlation,
)
from paser.outcomes import PatchOutcomes
from paser.routing import Router
from paser.runtime import progress
from paser.train.policy import fit_policy, greedy_actions, training_outcomes

DESCRIPTION = (
    "From the run's own configuration, one setting changes at a time; each variant trains a "
    "fresh policy on the outcomes of the run's frozen stage-1 pool on the images its stage 2 "
    "learns from. 'this run' is the run's own configuration trained afresh in the same way "
    "(another draw of its initial weights than the shipped router's). Area - frontier: the "
    "mean over 64 budgets spaced evenly in log GFLOP, from f0's GFLOP to the dearest model's, "
    "of the curve's best IoU within the budget minus the single-model frontier's (below a "
    "variant's fixed cost it counts as f0 alone), on validation and on test. Test IoU and "
    "GFLOP: the variant at its own lam, uncalibrated. Train patches: how many it learnt from; "
    "train s: the policy's training alone (the outcomes are shared). Headroom: the test "
    "margin as a share of the oracle's (the same pool routed patch by patch knowing the "
    "labels); rank: Spearman's correlation, over the "
    "test patches, between the variant's preference to move a patch off f0 and the best pool "
    "model's true gain there.")

#: uncertainty steps: (label, T, dropout, signal)
UNCERTAINTY = [("T=5 all entropy (paper)", 5, "all", "entropy"),
               ("T=2 all entropy", 2, "all", "entropy"),
               ("T=5 last entropy", 5, "last", "entropy"),
               ("T=1 single pass entropy", 1, "none", "entropy"),
               ("T=1 single pass margin", 1, "none", "margin")]


def variants(cfg: ExperimentConfig) -> list[tuple[str, list[str]]]:
    """``(name, overrides)``: the run's configuration, then one change at a time."""
    s2 = cfg.stage2
    out: list[tuple[str, list[str]]] = [("this run", [])]
    for objective in ("reinforce", "expected", "gain"):
        if objective != s2.objective:  # REINFORCE samples from one policy: no ensemble
            out.append((f"objective {objective}", [f"stage2.objective={objective}"]
                        + (["stage2.members=1"] if objective == "reinforce" else [])))
    out.append((f"gain {'patch' if s2.gain == 'dataset' else 'dataset'}",
                [f"stage2.gain={'patch' if s2.gain == 'dataset' else 'dataset'}"]))
    for state in ("paper", "probs", "image"):
        if state != s2.state:
            out.append((f"state {state}", [f"stage2.state={state}"]))
    if s2.policy == "pooled" and s2.objective != "reinforce":
        other = 1 if s2.members > 1 else 5
        out.append((f"{other} member{'s' if other > 1 else ''}", [f"stage2.members={other}"]))
    if s2.train_on == "rl+ft":
        out.append(("trained on D_rl only", ["stage2.train_on=rl"]))
    mine = (cfg.mc_samples, cfg.mc_dropout, cfg.uncertainty)
    for label, t, dropout, signal in UNCERTAINTY:
        if (t, dropout, signal) != mine:
            out.append((f"uncertainty {label}", [f"mc_samples={t}", f"mc_dropout={dropout}",
                                                 f"uncertainty={signal}"]))
    return out


def _with(cfg: ExperimentConfig, overrides: list[str]) -> ExperimentConfig:
    raw = cfg.model_dump(mode="json")
    for item in overrides:
        apply_override(raw, item)
    return validate(raw, "ablation")


def _uncertainty_label(cfg: ExperimentConfig) -> str:
    return f"T={cfg.mc_samples} {cfg.mc_dropout} {cfg.uncertainty}"


def _margin(curve: dict, frontier: dict, f0: tuple[float, float], lo: float, hi: float) -> float:
    """Mean of curve minus frontier over log-spaced budgets; f0 alone below the curve."""
    grid = FR.budgets(lo, hi)
    mine = FR.curve_values(FR.from_point(curve, f0), grid)
    theirs = FR.curve_values(frontier, grid, interpolate=True)
    return float((mine - theirs).mean())


def single_points(outcomes: PatchOutcomes, costs) -> dict[str, tuple[float, float]]:
    """Each model alone on every patch of a split, ``{"f0": (GFLOP, mIoU), ...}``: f0 at one
    pass on the whole image, fk at its cost on each of the image's patches."""
    n, p, k1 = outcomes.inter.shape[:3]
    return {f"f{k}": (costs.f0_pass if k == 0 else costs.patch[k] * p,
                      outcomes.miou(torch.full((n, p), k))) for k in range(k1)}


def run_ablation(cfg: ExperimentConfig, router: Router, data, val_out: PatchOutcomes,
                 test_out: PatchOutcomes, show_progress: bool = True) -> dict:
    """Train and score every variant (see the module doc); the ``ablation`` entry of
    ``results.json``."""
    device = next(router.parameters()).device
    ncls, batch = cfg.models.num_classes, cfg.baselines.timing_batch
    h, w = data.test.images.shape[-2:]
    nmod = router.num_models
    pool = {"rl": training_outcomes(cfg, router, data, device, mc_seed=0),
            "validation": val_out, "test": test_out}
    built: dict[tuple, dict[str, PatchOutcomes]] = {}
    built_rl: dict[tuple, PatchOutcomes] = {}

    def outcomes(vcfg: ExperimentConfig, probe: Router) -> dict[str, PatchOutcomes]:
        """The splits' outcomes as ``probe`` sees them (f0's state); the pool's outputs are
        the run's, computed once. What the policy trains on also depends on which images
        and views stage 2 takes."""
        key = (vcfg.mc_samples, vcfg.mc_dropout, vcfg.uncertainty, vcfg.stage2.state)
        if key not in built:
            built[key] = {name: PatchOutcomes.build(probe, getattr(data, name), ncls, batch,
                                                    device, mc_seed=0, pool_from=base)
                          for name, base in pool.items() if name != "rl"}
        s2 = vcfg.stage2
        rl_key = (*key, s2.train_on, s2.views, s2.crops)
        if rl_key not in built_rl:
            built_rl[rl_key] = training_outcomes(vcfg, probe, data, device, 0, pool["rl"])
        return built[key] | {"rl": built_rl[rl_key]}

    deterministic = Router(router.f0, router.policy, list(router.pool), router.grid, 1,
                           router.in_channels, "none", "entropy", "paper", ncls)
    singles, oracle_margin = {}, {}
    for name in ("validation", "test"):
        o = outcomes(_with(cfg, ["mc_samples=1", "mc_dropout=none", "uncertainty=entropy",
                                 "stage2.state=paper"]), deterministic)[name]
        costs = router.costs(h, w)  # f0's one pass and the pool's patches: the same tables
        singles[name] = points = single_points(o, costs)
        oracle = oracle_curve(o, costs, costs.model_cost(cfg.stage2.cost), 41)
        oracle_margin[name] = _margin(oracle, FR.frontier_curve(points), points["f0"],
                                      points["f0"][0], max(g for g, _ in points.values()))
    rows = []
    todo = variants(cfg)
    with progress(show_progress) as bar:
        task = bar.add_task("ablation", total=len(todo), info="")
        for name, overrides in todo:
            bar.update(task, info=name)
            vcfg = _with(cfg, overrides)
            torch.manual_seed(cfg.seed)
            policy = make_policy(vcfg, nmod).to(device)
            probe = Router(router.f0, policy, list(router.pool), router.grid, vcfg.mc_samples,
                           router.in_channels, vcfg.mc_dropout, vcfg.uncertainty,
                           vcfg.stage2.state, ncls)
            split = outcomes(vcfg, probe)
            costs = probe.costs(h, w)
            cost = costs.model_cost(vcfg.stage2.cost).to(device)
            tick = time.perf_counter()
            state, _ = fit_policy(vcfg, policy, split["rl"], split["validation"], cost)
            seconds = time.perf_counter() - tick
            policy.load_state_dict(state)
            row = {"name": name, "objective": vcfg.stage2.objective, "gain": vcfg.stage2.gain,
                   "policy": vcfg.stage2.policy, "state": vcfg.stage2.state,
                   "uncertainty": _uncertainty_label(vcfg), "fixed_gflops": costs.fixed,
                   "train_patches": int(split["rl"].inter.shape[:2].numel()),
                   "seconds": seconds}
            for which in ("validation", "test"):
                o = split[which]
                curve = policy_curve(probe, o, batch)
                frontier = FR.frontier_curve(singles[which])
                lo, hi = singles[which]["f0"][0], max(g for g, _ in singles[which].values())
                row["val_margin" if which == "validation" else "test_margin"] = _margin(
                    curve, frontier, singles[which]["f0"], lo, hi)
            row["test_headroom"] = (row["test_margin"] / oracle_margin["test"]
                                    if oracle_margin["test"] > 1e-12 else None)
            row["test_rank"] = rank_correlation(
                escalation(logits_on(probe, split["test"].state, batch)), split["test"])
            actions = greedy_actions(policy, split["test"].state, batch)
            row["test_iou"] = split["test"].miou(actions.cpu())
            row["test_gflops"] = float(costs.gflops(actions.cpu()).mean())
            rows.append(row)
            bar.advance(task)
    return {"description": DESCRIPTION, "oracle_margin": oracle_margin,
            "rows": rows, "best_on_validation": max(rows, key=lambda r: r["val_margin"])["name"]}
