"""The main job's evaluation: every method on the test split, the curves, the report.

Search work (cascade thresholds, IoU matching, oracle actions, the curves) runs on
:class:`~paser.outcomes.PatchOutcomes`: every pool model on every patch, counted once.
Every row of Table 1 is then measured for real by :func:`paser.experiments.methods.measure`
(the chosen thresholds or actions run through the actual forward), so table and curves
come from the same models and the same FLOP tables.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch

from paser.api import PaSeR
from paser.baselines.monolithic import load_matphase, load_monolithic
from paser.baselines.routed import (
    cascade_sweep,
    fit_cascade,
    match_cascade,
    oracle_actions,
    pareto,
    random_actions,
)
from paser.config import ExperimentConfig
from paser.cost import FLOP_CONVENTION
from paser.data import StageData
from paser.experiments import methods as M
from paser.experiments.report import (
    ROUTED,
    add_honest_view,
    assignment_summary,
    curve_areas,
    method_order,
    plot_assignment,
    plot_curves,
    plot_qualitative,
    plot_tvd,
    table2,
    write_report,
)
from paser.outcomes import PatchOutcomes
from paser.train.common import progress
from paser.train.finetune import sweep_dir


def policy_curve(router, test: PatchOutcomes, points: int, batch: int) -> dict:
    """PaSeR's IoU-vs-GFLOP curve: a bias ``beta * k / K`` on the logits of model k, for
    ``beta`` from "everything on f0" to "everything on fK"."""
    device = next(router.parameters()).device
    with torch.inference_mode():
        router.policy.eval()
        logits = torch.cat([router.policy(test.state[i:i + batch].to(device)).cpu()
                            for i in range(0, len(test.state), batch)])
    k = logits.shape[-1] - 1
    span = float(logits.max() - logits.min()) + 1.0
    betas = torch.linspace(-span * k, span * k, 4 * points + 1)
    ramp = torch.arange(k + 1, dtype=torch.float32) / k
    actions = (logits[None] + betas[:, None, None, None] * ramp).argmax(-1)  # [S, N, P]
    costs = router.costs(*test.state.shape[-2:])
    return _curve(test.miou_many(actions), costs.gflops(actions).mean(-1))


def oracle_curve(test: PatchOutcomes, costs, cost: torch.Tensor, points: int) -> dict:
    patch_iou = test.patch_iou()
    acts = torch.stack([oracle_actions(patch_iou, cost, lam)
                        for lam in torch.linspace(0, 1, points).tolist()])
    return _curve(test.miou_many(acts), costs.gflops(acts, policy=False).mean(-1))


def _curve(miou: torch.Tensor, gflops: torch.Tensor) -> dict:
    xs, ys = pareto(gflops, miou)
    return {"gflops": xs, "iou": ys}


def evaluate_all(cfg: ExperimentConfig, run_dir: Path, data: StageData, device: torch.device,
                 show_progress: bool = True) -> tuple[dict, str]:
    """Measure every method, write results and figures into ``run_dir``; return the
    results and the markdown report."""
    paser = PaSeR.load(run_dir, device=str(device))
    router = paser.router
    b = cfg.baselines
    ncls, tb, nmod = cfg.models.num_classes, b.timing_batch, router.num_models
    h, w = data.test.images.shape[-2:]
    costs = router.costs(h, w)
    cost = costs.model_cost(cfg.stage2.cost)
    lam = cfg.stage3.lam if cfg.stage3.lam is not None else cfg.stage2.lam
    notes: list[str] = []

    val_out = PatchOutcomes.build(router, data.validation, ncls, tb, device, mc_seed=0)
    test_out = PatchOutcomes.build(router, data.test, ncls, tb, device, mc_seed=0)
    paser_pred = M.paser_predictor(router)
    preds: dict[str, M.Predictor] = {"PaSeR": paser_pred}
    preds["PaSeR-RandPol"] = M.fixed_actions_predictor(
        router, random_actions(len(data.test), router.grid.num_patches, nmod, cfg.seed))
    cascade = fit_cascade(val_out, costs, cost, lam, b.cascade_points)
    preds["IDK-Cascade"] = M.cascade_predictor(router, cascade)
    oracle = oracle_actions(test_out.patch_iou(), cost, lam)
    preds["Oracle"] = M.fixed_actions_predictor(router, oracle)
    monolithic = {name: load_monolithic(cfg, run_dir, name, device) for name in b.monolithic}
    for name, model in monolithic.items():
        preds[name] = M.whole_image_predictor(model, cfg.models.in_channels)
    if b.matphase is not None:
        preds["MatPhase"] = M.matphase_predictor(load_matphase(cfg, run_dir, device),
                                                 cfg.models.in_channels)
    preds["f0"] = M.f0_predictor(router, monte_carlo=False)
    preds["f0 (MC)"] = M.f0_predictor(router, monte_carlo=True)
    for k in range(1, nmod):
        preds[f"f{k}"] = M.patch_model_predictor(router, k)

    results: dict[str, dict] = {}
    with progress(show_progress) as bar:
        task = bar.add_task("evaluation", total=len(preds) + 1, info="")
        for name, predict in preds.items():
            bar.update(task, info=name)
            results[name] = M.measure(predict, data.test, ncls, tb, device,
                                      nmod if name in ROUTED else None)
            bar.advance(task)
            if name == "IDK-Cascade":  # the IoU match needs PaSeR's test IoU
                match = match_cascade(test_out, costs, results["PaSeR"]["iou"], b.iou_match_tol,
                                      b.curve_points)
                results["IDK-Cascade (IoU match)"] = M.measure(
                    M.cascade_predictor(router, match), data.test, ncls, tb, device, nmod)
        bar.update(task, info="curves")
        _, c_miou, c_gflops = cascade_sweep(test_out, costs, b.curve_points)
        curves = {"PaSeR": policy_curve(router, test_out, b.curve_points, tb),
                  "IDK-Cascade": _curve(c_miou, c_gflops),
                  "Oracle": oracle_curve(test_out, costs, cost, b.curve_points)}
        bar.advance(task)

    sweep = _tvd_sweep(cfg, run_dir, data, device, show_progress)
    order = [m for m in method_order(nmod - 1) if m in results]
    methods = {m: results[m] for m in order}
    top = f"f{nmod - 1}"
    add_honest_view(methods, top)
    areas, crange = curve_areas(curves)
    pg, pi = methods["PaSeR"]["gflops"], methods["PaSeR"]["iou"]
    reach = [y for x, y in zip(curves["IDK-Cascade"]["gflops"], curves["IDK-Cascade"]["iou"],
                               strict=True) if x <= pg]
    on_or_above = pi >= (max(reach) if reach else 0.0) - 1e-9
    if b.matphase is not None:
        notes.append("MatPhase is re-implemented from its published description (ensemble of "
                     "whole-image UNets, a pixel-level IDK gate on the first member's entropy, "
                     "a small fusion CNN), not from its authors' code.")
    notes.append("IDK-Cascade uses f0's Monte Carlo mean (T passes, as PaSeR) and pays for "
                 "every model that ran on a patch; it has no policy. Its thresholds were "
                 f"grid-searched on validation (CE + {lam} * cost): {cascade.taus}.")
    notes.append(f"IDK-Cascade (IoU match): the cheapest thresholds whose test IoU is at least "
                 f"PaSeR's (the least upper bound on the cascade's curve; within "
                 f"{b.iou_match_tol} below it only if the cascade never reaches it): "
                 f"{match.taus}"
                 + ("" if match.reached else " (PaSeR's IoU was never reached: the most "
                    "accurate thresholds are used)") + ".")
    notes.append("Oracle: per patch, the action with the highest true reward at the run's "
                 "lam, knowing the label; its ms/image is the routing with those actions "
                 "(finding them needs every model on every patch and the label).")
    notes.append("PaSeR-RandPol and Oracle do not run the policy and are not charged for it.")
    notes.append(f"Monolithic models{' and MatPhase' if b.matphase is not None else ''} "
                 f"train from scratch on D_pre with stage 1's epochs ({cfg.stage1.epochs}) and "
                 f"batch size; nothing is downloaded.")
    summary = {
        "preset": cfg.preset, "seed": cfg.seed, "lam": lam, "device": str(device),
        "flop_convention": FLOP_CONVENTION, "test_images": len(data.test),
        "image_size": [h, w], "grid": list(cfg.grid), "mc_samples": cfg.mc_samples,
        "timing_batch": tb, "models": ["f0", *(f"f{k}" for k in range(1, nmod))],
        "top_model": top, "methods": methods, "table2": table2(methods),
        "cascade": {"fit": vars(cascade), "iou_match": vars(match),
                    "tolerance": b.iou_match_tol},
        "oracle_fractions": (torch.bincount(oracle.reshape(-1), minlength=nmod).double()
                             / oracle.numel()).tolist(),
        "costs": costs.to_dict(), "curves": curves, "curve_areas": areas,
        "curve_range": crange, "paser_on_or_above_cascade": bool(on_or_above),
        "notes": notes,
    }
    figures = run_dir / "figures"
    if data.test.groups is not None:
        specs = [cfg.models.f0, *cfg.models.pool]
        summary["assignment"] = assignment_summary(methods, data.test.group_names,
                                                   summary["models"],
                                                   [s.groups for s in specs])
        plot_assignment(figures / "assignment.png", summary["assignment"])
    if sweep:
        summary["tvd_sweep"] = sweep
        plot_tvd(figures / "tvd.png", sweep)
    plot_curves(figures / "iou_vs_gflop.png", methods, curves)
    _qualitative(figures / "qualitative.png", router, data, nmod)
    return summary, write_report(run_dir, summary)


def _tvd_sweep(cfg: ExperimentConfig, run_dir: Path, data: StageData, device: torch.device,
               show_progress: bool) -> list[dict]:
    """PaSeR of each TVD-sweep variant on the test split, with where its fine-tuning stopped."""
    rows = []
    for threshold in cfg.stage3.tvd_sweep:
        where = sweep_dir(run_dir, threshold, cfg)
        router = PaSeR.load(run_dir, device=str(device),
                            stage3=where / "checkpoints" / "stage3.pt").router
        row = M.measure(M.paser_predictor(router), data.test, cfg.models.num_classes,
                        cfg.baselines.timing_batch, device, router.num_models)
        best = json.loads((where / "stage3.json").read_text())["best"] or {}
        rows.append({"tvd_threshold": threshold, **row, "val_tvd": best.get("tvd", 0.0),
                     "epoch": best.get("epoch", -1), "lam": best.get("lam")})
    return rows


@torch.inference_mode()
def _qualitative(path: Path, router, data: StageData, nmod: int, count: int = 4) -> None:
    device = next(router.parameters()).device
    x = data.test.images[:count].to(device)
    out = router(x, mc_seed=0)
    plot_qualitative(path, x.cpu(), data.test.masks[:count], out.mask.cpu(), out.actions.cpu(),
                     out.mc.entropy.cpu(), router.grid, ["f0", *(f"f{k}" for k in range(1, nmod))])


__all__ = ["evaluate_all"]
