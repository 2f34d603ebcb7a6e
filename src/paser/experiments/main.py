"""The main job's evaluation: every method on the test split, the curves, the report.

Search work (cascade thresholds, IoU matching, oracle actions, the curves) runs on
:class:`~paser.outcomes.PatchOutcomes`: every pool model on every patch, counted once.
Every row of Table 1 is then measured for real by :func:`paser.experiments.methods.measure`
(the chosen thresholds or actions run through the actual forward), so table and curves
come from the same models and the same FLOP tables.
"""

from __future__ import annotations

import json
from dataclasses import asdict
from pathlib import Path

import torch

from paser import frontier as FR
from paser.api import PaSeR
from paser.baselines.monolithic import load_matphase, load_monolithic
from paser.baselines.routed import (
    cascade_sweep,
    fit_cascade,
    match_cascade,
    oracle_actions,
    random_actions,
)
from paser.calibration import calibrate
from paser.config import DataConfig, ExperimentConfig
from paser.cost import FLOP_CONVENTION
from paser.data import StageData
from paser.data.tiles import source_images
from paser.errors import DataError
from paser.experiments import methods as M
from paser.experiments.ablation import run_ablation
from paser.experiments.curves import (
    REACHABLE,
    chosen_areas,
    curve,
    escalation,
    logits_on,
    oracle_curve,
    policy_curve,
    rank_correlation,
    reachable_curve,
)
from paser.experiments.report import (
    add_honest_view,
    assignment_summary,
    is_routed,
    mc_counting,
    method_order,
    plot_assignment,
    plot_curves,
    plot_qualitative,
    plot_tvd,
    table2,
    write_report,
)
from paser.outcomes import PatchOutcomes
from paser.runtime import progress
from paser.train.distributed import machine
from paser.train.finetune import sweep_dir
from paser.train.paper import method_differences, paper_config, paper_dir
from paser.train.pretrain import augmentations
from paser.uncertainty import has_dropout

#: the report's row for PaSeR calibrated to the best single model's IoU within 0.005
BEST_IOU_POINT = "PaSeR (best model's IoU - 0.005)"


def single_models(methods: dict[str, dict], num_models: int) -> dict[str, tuple[float, float]]:
    """The ``(GFLOP, IoU)`` of f0 (one pass) and of each pool model alone."""
    return {name: (methods[name]["gflops"], methods[name]["iou"])
            for name in ["f0", *(f"f{k}" for k in range(1, num_models))]}


def curve_range(fixed: float, singles: dict[str, tuple[float, float]]
                ) -> tuple[float, float, str]:
    """The budgets the curves are compared over: from the fixed cost every routed image pays
    to the dearest single model's GFLOP, and that model's name (fK is the last of the pool,
    not always its dearest)."""
    dearest = max(singles, key=lambda name: singles[name][0])
    return fixed, singles[dearest][0], dearest


def regret_table(methods: dict[str, dict], curves: dict[str, dict], names: list[str]) -> list[dict]:
    """At each PaSeR point's GFLOP: its IoU, the frontier's, the cascade's and the oracle's
    best within that budget (and how far each is from PaSeR)."""
    frontier = list(zip(curves["Frontier"]["gflops"], curves["Frontier"]["iou"], strict=True))
    rows = []
    for name in names:
        g, iou = methods[name]["gflops"], methods[name]["iou"]
        row = {"method": name, "gflops": g, "iou": iou, "frontier": FR.frontier_at(frontier, g),
               "cascade": FR.best_within(curves["IDK-Cascade"], g),
               "oracle": FR.best_within(curves["Oracle"], g)}
        row["above_frontier"] = None if row["frontier"] is None else iou - row["frontier"]
        rows.append(row)
    return rows


def paper_difference(cfg: ExperimentConfig, paper: ExperimentConfig, methods: dict,
                     areas: dict) -> str:
    """How the run's PaSeR differs from PaSeR (paper): the method's settings in which it
    differs, and what that is worth on test (Table 1's IoU and GFLOP, the curve area)."""
    differ = method_differences(cfg, paper)
    how = ("PaSeR differs from it in " + ", ".join(differ) if differ else
           "PaSeR has its method's settings (baselines.paper sets other budgets alone)")
    mine, theirs = methods["PaSeR"], methods["PaSeR (paper)"]
    return (f"{how}; by {mine['iou'] - theirs['iou']:+.4f} IoU at "
            f"{mine['gflops'] - theirs['gflops']:+.3f} GFLOP per image (Table 1) and "
            f"{areas['PaSeR'] - areas['PaSeR (paper)']:+.4f} of curve area")


def router_areas(curves: dict[str, dict], routers: list[str], f0: tuple[float, float],
                 lo: float, hi: float) -> tuple[dict[str, float], dict[str, float]]:
    """Each curve's area over ``[lo, hi]`` and its share of budgets at or above the
    frontier, a router's (``routers``) read with f0's point ``(GFLOP, IoU)`` before its
    own: below its fixed cost a user runs f0 alone."""
    read = {**curves, **{name: FR.from_point(curves[name], f0) for name in routers}}
    above = {name: FR.share_above(c, curves["Frontier"], lo, hi)
             for name, c in read.items() if name != "Frontier"}
    return FR.areas(read, lo, hi), above


def baselines_note(cfg: ExperimentConfig) -> str:
    """How the monolithic models and MatPhase trained: their epochs (each model's own, else
    ``stage1.epochs``), and the pool's where those differ, since Table 1 sets them against
    the models PaSeR routes to."""
    from paser.train.pretrain import model_epochs

    b = cfg.baselines
    specs = [*b.monolithic.values(), *([] if b.matphase is None else b.matphase.members)]
    mine = sorted({model_epochs(cfg, s) for s in specs})
    pool = sorted({model_epochs(cfg, s) for s in (cfg.models.f0, *cfg.models.pool)})
    said = " or ".join(str(e) for e in mine) if mine else str(cfg.stage1.epochs)
    most = "" if cfg.stage1.patience is None else " at most"
    than = ("" if not mine or mine == pool else
            f"; f0 and the pool trained {' or '.join(str(e) for e in pool)}{most}, so Table 1 "
            "sets them against models trained "
            + ("longer" if min(pool) > max(mine) else "otherwise"))
    who = " and ".join(n for n, on in (("Monolithic models", b.monolithic),
                                        ("MatPhase", b.matphase is not None)) if on)
    return (f"{who} train{'s' if who == 'MatPhase' else ''} from scratch on D_pre with stage 1's settings ({said} epochs{most}, batch "
            f"{cfg.stage1.batch_size}{than}); nothing is downloaded.")


def operating_point_note(name: str, cal) -> str:
    """The report's note on an operating point calibrated for it (a
    :class:`~paser.calibration.Calibration`), saying where its target was out of the policy's
    reach: the row is then the routing of best validation mIoU, not what its name says."""
    note = (f"{name}: calibrated on the validation split (validation mIoU {cal.miou:.4f} at "
            f"{cal.gflops:.3f} GFLOP), measured on test.")
    if cal.target.get("reached", True) or "top_miou" not in cal.target:
        return note
    return (note + f" Its target was not met: on validation the policy's routing comes no "
            f"closer than {cal.target['top_miou'] - cal.miou:.4f} to the best single model's "
            f"mIoU ({cal.target.get('top_model', 'the best model')}, "
            f"{cal.target['top_miou']:.4f}), so this row is its routing of best mIoU.")


def tuned_pool_said(paper: ExperimentConfig) -> str:
    """Where PaSeR (paper)'s stage 3 fine-tunes its own copy of the pool (``paper``: its
    config), that its row, curve and rank are of that pool while the frontier and the oracle
    it is read against are of the run's; nothing where its stage 3 does not run."""
    epochs = paper.stage3.epochs
    if not epochs:
        return ""
    return (f", whose stage 3 fine-tunes its own copy of f1..fK ({epochs} epoch"
            f"{'s' * (epochs != 1)}): its row, its curve and its rank correlation are of that "
            "pool, while the single-model frontier, the oracle and the headroom it is read "
            "against are of the run's")


def class_names(paser: PaSeR) -> list[str] | None:
    """The run's class names in class order (its ``classes.yaml``), for the report's IoU of
    each class; None where the run has no codec and its data is not here."""
    try:
        names = list(paser.label_codec.names)
    except DataError:
        return None
    return names if len(names) == paser.config.models.num_classes else None


def one_volume_note(data: DataConfig) -> str | None:
    """The report's caveat where every split is a range of slices of one volume: its
    bootstrap resamples test slices as if independent, but neighbouring slices look alike,
    so its intervals are narrower than another scan's figures would spread. None for other
    data."""
    if data.dataset != "volume":
        return None
    return ("Every split is a range of slices of one volume: the Noise line resamples the "
            "test slices as if independent, but neighbouring slices look alike, so its "
            "intervals understate how far the figures would move on another scan.")


def same_images_note(data: DataConfig) -> str | None:
    """The report's warning where two splits read the same images (Cityscapes withholds its
    test labels, so ``data.cityscapes_splits`` reads ``val`` as validation and test), saying
    which figures that makes optimistic; None where every split has images of its own."""
    if data.dataset != "cityscapes":
        return None  # the other datasets cut their splits apart (config.py validates slices)
    folders, said = data.cityscapes_splits, []
    if folders["validation"] == folders["test"]:
        said.append(
            f"Validation and test are the same images (Cityscapes folder `{folders['test']}` "
            "for both, data.cityscapes_splits): every model's kept checkpoint (stage 1, the "
            "policy, the baselines), the run's calibration, the operating points and "
            "IDK-Cascade's thresholds were chosen on the images Table 1 scores. Every test "
            "figure is optimistic, PaSeR's, its operating points' and the cascade's most "
            "(their bias and thresholds were fit to these images), and so are the verdict, "
            "Table 2 and the routers' shares of the headroom; give validation images of its "
            "own (data.cityscapes_splits.validation: a folder of some of train's cities) for "
            "figures that are not.")
    if folders["test"] == folders["train"]:
        said.append(f"Test is read from the training folder (Cityscapes `{folders['train']}`, "
                    "data.cityscapes_splits): the models are scored on images they trained "
                    "on, so every test figure is optimistic.")
    elif folders["validation"] == folders["train"]:
        said.append(f"Validation is read from the training folder (Cityscapes "
                    f"`{folders['train']}`, data.cityscapes_splits): the kept checkpoints, "
                    "the calibration and the cascade's thresholds were chosen on images the "
                    "models trained on, so the operating points may miss their targets on "
                    "new images (the test figures are of other images).")
    return " ".join(said) or None


def _tiled_from(data: StageData) -> dict:
    """``tiled_from``: how many images each split's tiles were cut from (train: D_pre, D_rl
    and D_ft together), where the run cut its images into tiles (``data.tile``); the
    ``*_images`` counts are then of tiles."""
    splits = {"train": data.pre.ids + data.rl.ids + data.ft.ids,
              "validation": data.validation.ids, "test": data.test.ids}
    sources = {s: source_images(ids) for s, ids in splits.items()}
    if any(v is None for v in sources.values()):
        return {}
    return {"tiled_from": {s: int(v.max()) + 1 for s, v in sources.items()}}


def _data_files(run_dir: Path) -> str | None:
    """The digest of the data files the run's steps read (:mod:`paser.data.identity`)."""
    from paser.data.identity import read_identity

    ident = read_identity(run_dir)
    return None if ident is None else ident.digest


def passes_without_dropout(cfg: ExperimentConfig, routers: dict) -> list[str]:
    """A note for each router whose f0 runs T > 1 Monte Carlo passes without a dropout
    layer to draw them: T equal answers, each paid for."""
    return [f"{name}: f0 ({cfg.models.f0.name}) has no dropout, so its T = {r.mc_samples} "
            f"Monte Carlo passes are one answer computed {r.mc_samples} times, each paid for; "
            "use an f0 with dropout, or mc_samples=1 mc_dropout=none"
            for name, r in routers.items()
            if r.mc_samples > 1 and r.mc_dropout != "none" and not has_dropout(r.f0)]


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
    top = f"f{nmod - 1}"
    notes: list[str] = []

    val_out = PatchOutcomes.build(router, data.validation, ncls, tb, device, mc_seed=0)
    test_out = PatchOutcomes.build(router, data.test, ncls, tb, device, mc_seed=0)
    bias = paser.calibration.tensor() if paser.calibration is not None else None
    preds: dict[str, M.Predictor] = {"PaSeR": M.paser_predictor(router, bias=bias)}
    paper_run = paper_dir(run_dir) if paper_config(cfg) is not None else None
    paper = PaSeR.load(paper_run, device=str(device)) if paper_run is not None else None
    if paper is not None:
        preds["PaSeR (paper)"] = M.paser_predictor(paper.router)
    # operating points users ask for, calibrated on validation (not saved in the run)
    points = {BEST_IOU_POINT: {"iou_within_top": 0.005},
              "PaSeR (f1's GFLOP)": {"budget_gflops": costs.num_patches * costs.patch[1],
                                     "best_iou": True}}
    calibrations = {}
    for name, target in (points.items() if b.operating_points else ()):
        if target.get("budget_gflops", costs.fixed) < costs.fixed:
            notes.append(f"{name}: left out; f1 alone ({target['budget_gflops']:.3g} GFLOP) "
                         f"costs less than PaSeR's fixed cost ({costs.fixed:.3g}: f0 and "
                         "the policy), so no routing fits that budget.")
            continue
        calibrations[name] = calibrate(router, data.validation, ncls, batch_size=tb,
                                       outcomes=val_out, **target)
        preds[name] = M.paser_predictor(router, bias=calibrations[name].tensor())
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
    single_names = ["f0", *(f"f{k}" for k in range(1, nmod))]
    # each image's counts of these, for the verdict's bootstrap over the test images
    resampled = {"PaSeR", *single_names}
    with progress(show_progress) as bar:
        task = bar.add_task("evaluation", total=len(preds) + 1, info="")
        for name, predict in preds.items():
            bar.update(task, info=name)
            results[name] = M.measure(predict, data.test, ncls, tb, device,
                                      nmod if is_routed(name) else None,
                                      per_image=name in resampled)
            bar.advance(task)
            if name == "IDK-Cascade":  # the IoU match needs PaSeR's test IoU
                match = match_cascade(test_out, costs, results["PaSeR"]["iou"], b.iou_match_tol,
                                      b.curve_points)
                results["IDK-Cascade (IoU match)"] = M.measure(
                    M.cascade_predictor(router, match), data.test, ncls, tb, device, nmod,
                    per_image=True)
        per_image = {name: results[name].pop("per_image") for name in list(results)
                     if "per_image" in results[name]}
        # the headline's ms: PaSeR and the single models in turns on the first batches
        # (each pass above ran alone, and a shared machine's slow spell can hit one)
        bar.update(task, info="wall clock in turns")
        firsts = M.FirstBatches(data.test, tb, 5)  # read as the rounds reach them
        turns = M.time_in_turns({name: preds[name] for name in ["PaSeR", *single_names]},
                                firsts, device)
        timed_on = firsts.used  # the images of each batch timed
        bar.update(task, info="curves")
        _, c_miou, c_gflops = cascade_sweep(test_out, costs, b.curve_points)
        curves = {"PaSeR": policy_curve(router, test_out, tb),
                  "IDK-Cascade": curve(c_miou, c_gflops),
                  "Oracle": oracle_curve(test_out, costs, cost, b.curve_points)}
        reach_curve = reachable_curve(router, data.test, test_out, tb, device)
        if reach_curve is not None:
            curves[REACHABLE] = reach_curve
        # how each router ranks the test patches against what moving them is worth
        ranks = {"PaSeR": rank_correlation(escalation(logits_on(router, test_out.state, tb)),
                                           test_out),
                 "IDK-Cascade": rank_correlation(test_out.entropy[..., 0], test_out)}
        if paper is not None:
            # its stage 3 fine-tunes its own copy of the pool: its curve and its ranking are
            # of the pool it routes to, not of the run's
            paper_out = PatchOutcomes.build(paper.router, data.test, ncls, tb, device, mc_seed=0)
            curves["PaSeR (paper)"] = policy_curve(paper.router, paper_out, tb)
            ranks["PaSeR (paper)"] = rank_correlation(
                escalation(logits_on(paper.router, paper_out.state, tb)), paper_out)
        bar.advance(task)

    sweep = _tvd_sweep(cfg, run_dir, data, device, show_progress)
    order = [m for m in method_order(nmod - 1, results) if m in results]
    methods = {m: results[m] for m in order}
    add_honest_view(methods, top)
    singles = single_models(methods, nmod)
    curves["Frontier"] = FR.frontier_curve(singles)
    lo, hi, dearest = curve_range(costs.fixed, singles)
    routers = [name for name in curves if name not in ("Frontier", "Oracle", REACHABLE)]
    # below a router's fixed cost (PaSeR (paper)'s T passes and its policy) a user runs f0
    # alone: its point starts every router's curve here, as in the ablation's margins, for
    # its area, its share of budgets above the frontier and its share of the headroom
    areas, above = router_areas(curves, routers, singles["f0"], lo, hi)
    pg, pi = methods["PaSeR"]["gflops"], methods["PaSeR"]["iou"]
    reach = [y for x, y in zip(curves["IDK-Cascade"]["gflops"], curves["IDK-Cascade"]["iou"],
                               strict=True) if x <= pg]
    on_or_above = pi >= (max(reach) if reach else 0.0) - 1e-9
    paser_rows = [m for m in methods if m.startswith("PaSeR") and m != "PaSeR-RandPol"]
    verdict = FR.verdict((pg, pi), curves["Frontier"], curves["Oracle"], costs.fixed,
                         curves["PaSeR"], lo, hi, f0=singles["f0"])
    captured = {name: FR.headroom_captured(areas[name], areas["Frontier"], areas["Oracle"])
                for name in routers}
    # the same two routers with each budget's setting chosen on validation, as a user must
    f0_val = M.measure(preds["f0"], data.validation, ncls, tb, device, timed=False)["iou"]
    chosen = chosen_areas(router, val_out, test_out, tb, b.curve_points, FR.budgets(lo, hi),
                          (f0_val, singles["f0"][1], singles["f0"][0]))
    captured_reachable = ({name: FR.headroom_captured(areas[name], areas["Frontier"],
                                                      areas[REACHABLE]) for name in routers}
                          if REACHABLE in areas else {})
    t2 = table2(methods)
    noise = FR.bootstrap(per_image["PaSeR"], {name: per_image[name] for name in singles},
                         per_image["IDK-Cascade (IoU match)"], seed=cfg.seed,
                         groups=source_images(data.test.ids))
    floor = FR.headroom_floor(noise)
    caveat = FR.headroom_caveat(areas["Oracle"] - areas["Frontier"], floor,
                                list(captured.values()))
    pool = pool_summary(run_dir, methods, nmod)
    notes[:0] = passes_without_dropout(
        cfg, {"PaSeR": router} | ({} if paper is None else {"PaSeR (paper)": paper.router}))
    if (same := same_images_note(cfg.data)) is not None:
        notes.insert(0, same)  # first: it qualifies every figure after it
    if (one := one_volume_note(cfg.data)) is not None:
        notes.insert(0, one)
    if pool["precision"] not in (None, "32-true"):
        notes.append(f"Stage 1 (f0 and the pool) trained with {pool['precision']} autocast "
                     f"(distributed.precision {cfg.distributed.precision}, stage1.json); its "
                     "weights, optimizer and every evaluation are 32-bit.")
    notes.append("The single-model frontier is what a user gets without routing: one model "
                 "of the pool on every image, or whole images split between two of them (the "
                 "upper hull of the points of " + ", ".join(singles) + ", linear in GFLOP). "
                 f"Curve areas are the mean IoU over 64 budgets spaced evenly in log GFLOP from "
                 f"the fixed cost ({lo:.3f}) to the dearest single model's GFLOP ({dearest}, "
                 f"{hi:.3f}).")
    if paser.calibration is not None:
        notes.append(f"PaSeR runs at the run's calibrated operating point "
                     f"({paser.calibration.target_text()}; "
                     "calibrated on the validation split).")
    notes += [operating_point_note(name, cal) for name, cal in calibrations.items()]
    if paper is not None:
        notes.append("PaSeR (paper): the paper's method (stage2.objective "
                     f"{paper.config.stage2.objective}, T = {paper.config.mc_samples}, "
                     f"dropout {paper.config.mc_dropout}, state {paper.config.stage2.state}, "
                     f"{paper.config.stage2.policy} policy, lam {paper.config.stage2.lam}, "
                     f"cost {paper.config.stage2.cost}) trained on the same stage-1 pool "
                     "(stages 2 and 3 in paper/)" + tuned_pool_said(paper.config) + "; "
                     f"{mc_counting(paper.router.costs(h, w).to_dict(), 'PaSeR (paper)')}. "
                     f"{paper_difference(cfg, paper.config, methods, areas)}.")
    if b.matphase is not None:
        notes.append("MatPhase is re-implemented from its published description (ensemble of "
                     "whole-image UNets, a pixel-level IDK gate on the first member's entropy, "
                     "a small fusion CNN), not from its authors' code.")
    notes.append(f"IDK-Cascade uses f0 as PaSeR sees it (T = {router.mc_samples}, dropout "
                 f"{router.mc_dropout}) and pays for every model that ran on a patch; it has no "
                 f"policy. Its thresholds were grid-searched on validation (CE + {lam} * cost): "
                 f"{cascade.taus}.")
    notes.append(f"IDK-Cascade (IoU match): the cheapest thresholds whose test IoU is at least "
                 f"PaSeR's (the least upper bound on the cascade's curve; within "
                 f"{b.iou_match_tol} below it only if the cascade never reaches it): "
                 f"{match.taus}"
                 + ("" if match.reached else " (PaSeR's IoU was never reached: the most "
                    "accurate thresholds are used)") + ".")
    notes.append("Oracle: per patch, the action with the highest true reward at the run's "
                 "lam, knowing the label; its ms/image is the routing with those actions "
                 "(finding them needs every model on every patch and the label). The Oracle "
                 "curve is the best of that oracle at every lam and of the true dataset-mIoU "
                 "gains priced per GFLOP. It maximises per-patch reward (and first-order "
                 "gains), which do not add up to the dataset's mIoU: it is not a ceiling on "
                 "dataset mIoU at every budget, and its curve can sit under the single-model "
                 "frontier (here its curve area minus the frontier's: "
                 f"{areas['Oracle'] - areas['Frontier']:+.4f}).")
    if caveat is not None:
        notes.append(f"Headroom captured: {caveat}.")
    if REACHABLE in curves and augmentations(cfg, h, w):
        notes.append(f"{REACHABLE} overstates what a router can reach on this run: the pool "
                     "trained on mirrored and turned images (stage1.augment), so its models "
                     "answer nearly alike on every view of a patch, and a view is not a new "
                     "draw of their errors; read the reachable part as an upper bound.")
    notes.append("PaSeR-RandPol and Oracle do not run the policy and are not charged for it.")
    if monolithic or b.matphase is not None:
        notes.append(baselines_note(cfg))
    summary = {
        "preset": cfg.preset, "seed": cfg.seed, "lam": lam, "device": str(device),
        # where these figures were measured, and where stage 1 trained the pool they measure
        "machine": machine(device), "stage1_machine": pool["machine"],
        **({"stage1_machines": pool["machines"]} if pool["machines"] else {}),
        # what drew the data: the split's seed, and the generator's where paser made the set
        "data_seeds": {"split": cfg.data.split_seed} | (
            {"synthetic": cfg.data.synthetic.seed}
            if cfg.data.dataset == "battery" and cfg.data.root is None else {}),
        "flop_convention": FLOP_CONVENTION, "test_images": len(data.test),
        "train_images": len(data.pre) + len(data.rl) + len(data.ft),
        "validation_images": len(data.validation), "data_files": _data_files(run_dir),
        **_tiled_from(data),
        "image_size": [h, w], "megapixels_per_image": h * w / 1e6,
        "grid": list(cfg.grid), "mc_samples": cfg.mc_samples,
        "mc_dropout": cfg.mc_dropout, "uncertainty": cfg.uncertainty,
        "objective": cfg.stage2.objective,
        "timing_batch": tb, "models": ["f0", *(f"f{k}" for k in range(1, nmod))],
        "top_model": top, "classes": class_names(paser), "methods": methods, "table2": t2,
        "cascade": {"fit": vars(cascade), "iou_match": vars(match),
                    "tolerance": b.iou_match_tol},
        "oracle_fractions": (torch.bincount(oracle.reshape(-1), minlength=nmod).double()
                             / oracle.numel()).tolist(),
        "costs": costs.to_dict(), "curves": curves, "curve_areas": areas,
        "curve_range": [lo, hi], "curve_budgets": "log", "share_above_frontier": above,
        "headroom_captured": captured, "headroom_floor": floor, "rank_correlation": ranks,
        "reachable_captured": captured_reachable,
        "regret": regret_table(methods, curves, paser_rows), "verdict": verdict,
        "noise": noise,
        "versus_cascade": FR.versus_cascade(
            areas["PaSeR"] - areas["IDK-Cascade"], captured["PaSeR"],
            captured["IDK-Cascade"], t2["flops_saved_pct"],
            methods["IDK-Cascade (IoU match)"]["iou"] >= pi, caveat,
            chosen["PaSeR"] - chosen["IDK-Cascade"]),
        "curve_areas_chosen_on_validation": chosen,
        "wall_clock": {**FR.wall_clock_in_turns(turns, {n: methods[n]["iou"] for n in turns}),
                       "batches": len(timed_on), "images": timed_on},
        "operating_points": {name: asdict(cal) for name, cal in calibrations.items()},
        "pool": pool,
        "paser_on_or_above_cascade": bool(on_or_above),
        "notes": notes,
    }
    if b.ablation:
        summary["ablation"] = run_ablation(cfg, router, data, val_out, test_out,
                                           show_progress=show_progress)
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
    _qualitative(figures / "qualitative.png", router, data, nmod, bias,
                 summary["classes"] or [f"class {c}" for c in range(ncls)])
    from paser.experiments.finished import drop_figures, kept_experiments, models_state

    kept, dropped = kept_experiments(run_dir)  # `paser experiment` entries, on these models
    drop_figures(run_dir, dropped)
    summary["measured_on"] = models_state(run_dir)  # what `paser experiment` checks
    if kept:
        summary["experiments"] = kept
    if dropped:
        notes.append(f"Experiments of an earlier report dropped, their models changed since: "
                     f"{', '.join(dropped)} (run `paser experiment` again).")
    return summary, write_report(run_dir, summary)


def pool_summary(run_dir: Path, methods: dict[str, dict], num_models: int) -> dict:
    """Each model's stage-1 training (epochs, whether it converged) from ``stage1.json``;
    ``inverted``: pairs where a dearer model scores below a cheaper one on test;
    ``improving``: models that ran to their epoch cap with their best epoch among the last
    tenth of it (at least the last 3), which more training may lift; ``cost_order``: pairs
    of pool models listed dearer first (the cascade escalates in the listed order)."""
    path = run_dir / "stage1.json"
    summary = json.loads(path.read_text()) if path.is_file() else {}
    stage1 = summary.get("models", {})
    keys = ("epochs", "epoch_cap", "patience", "best_epoch", "converged", "validation_miou")
    models = {role: {k: info.get(k) for k in keys} for role, info in stage1.items()}
    names = ["f0", *(f"f{k}" for k in range(1, num_models))]
    cost_order = [[a, b] for i, a in enumerate(names[1:], 1) for b in names[i + 1:]
                  if methods[a]["gflops"] > methods[b]["gflops"]]
    # cheapest first: a user's pool need not be listed in order of cost
    names.sort(key=lambda name: methods[name]["gflops"])
    inverted = [[a, b] for i, a in enumerate(names) for b in names[i + 1:]
                if methods[b]["iou"] < methods[a]["iou"]
                and methods[b]["gflops"] > methods[a]["gflops"]]
    improving = [role for role, m in models.items()
                 if m["epochs"] and m["epochs"] == m["epoch_cap"] and m["best_epoch"] is not None
                 and m["best_epoch"] >= m["epochs"] - max(3, m["epochs"] // 10)]
    # stage 1's arithmetic (32-true, bf16-mixed: distributed.precision; older runs: unsaid)
    return {"models": models, "inverted": inverted, "improving": improving,
            "cost_order": cost_order, "precision": summary.get("precision"),
            "machine": summary.get("machine"), "machines": summary.get("machines")}


def _tvd_sweep(cfg: ExperimentConfig, run_dir: Path, data: StageData, device: torch.device,
               show_progress: bool) -> list[dict]:
    """PaSeR of each TVD-sweep variant on the test split, with where its fine-tuning stopped
    (the run's own sweep, or else PaSeR (paper)'s, which then says so in ``of``)."""
    paper = paper_config(cfg)
    if not cfg.stage3.tvd_sweep and paper is not None and paper.stage3.tvd_sweep:
        return [r | {"of": "PaSeR (paper)"} for r in _tvd_sweep(paper, paper_dir(run_dir),
                                                                 data, device, show_progress)]
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
def _qualitative(path: Path, router, data: StageData, nmod: int,
                 bias: torch.Tensor | None, names: list[str], count: int = 4) -> None:
    """The first test images routed as the report's PaSeR routes them (at the run's
    calibrated operating point, ``bias``); ``names``: the classes, in class order."""
    device = next(router.parameters()).device
    x = data.test.images[:count].to(device)
    out = router(x, bias=bias, mc_seed=0)
    plot_qualitative(path, x.cpu(), data.test.masks[:count], out.mask.cpu(), out.actions.cpu(),
                     out.mc.entropy.cpu(), router.grid, ["f0", *(f"f{k}" for k in range(1, nmod))],
                     names)


__all__ = ["evaluate_all"]
