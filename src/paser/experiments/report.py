"""The run's report: ``results.json``, ``results.csv``, ``report.md`` and ``figures/``.

Tables follow the paper (Table 1: every method; Table 2: PaSeR against the IoU-matched
cascade), plus an honest view that IoU/GFLOP alone hides: IoU/GFLOP rewards the cheapest
model whatever its quality, so each method also gets "gap recovered",
``(IoU - IoU_f0) / (IoU_fK - IoU_f0)``, its GFLOP as a fraction of fK's, and each curve its
normalised area over one common GFLOP range.
"""

from __future__ import annotations

import csv
import io
import json
import math
from pathlib import Path

import numpy as np

from paser import frontier as FR
from paser.cost import FLOP_CONVENTION
from paser.runtime import atomic_write_text, interrupts_held

ROUTED = ("PaSeR", "PaSeR-RandPol", "IDK-Cascade", "IDK-Cascade (IoU match)", "Oracle")


def is_routed(name: str) -> bool:
    """Whether a method routes patches over the pool (and has fractions to report)."""
    return name in ROUTED or name.startswith("PaSeR")


def method_order(num_pool: int, names=()) -> list[str]:
    """Table 1's order: PaSeR, its other configurations and operating points (as in
    ``names``), the routed baselines, the monolithic ones, then the single models."""
    variants = [n for n in names if n.startswith("PaSeR") and n not in ROUTED]
    return ["PaSeR", *variants, *ROUTED[1:], "DeepLabV3+", "SegFormer", "EfficientViT",
            "MatPhase", "f0", "f0 (MC)", *(f"f{k}" for k in range(1, num_pool + 1))]


def add_honest_view(methods: dict[str, dict], top: str) -> None:
    """Gap recovered and GFLOP as a fraction of ``top`` (fK on all patches), in place.

    Gap recovered is None where fK is not above f0: there is no gap to recover, and the
    ratio would give the best methods the lowest figures (fK 1, f0 0)."""
    base, ceil = methods["f0"], methods[top]
    span = ceil["iou"] - base["iou"]
    for m in methods.values():
        m["gap_recovered"] = (m["iou"] - base["iou"]) / span if span > 1e-12 else None
        m["gflops_frac_of_top"] = m["gflops"] / ceil["gflops"]


def table2(methods: dict[str, dict]) -> dict:
    """PaSeR against IDK-Cascade (IoU match): FLOPs saved and IoU/GFLOP gained, in %."""
    p, c = methods["PaSeR"], methods["IDK-Cascade (IoU match)"]
    return {"flops_saved_pct": 100 * (1 - p["gflops"] / c["gflops"]),
            "iou_per_gflop_gain_pct": 100 * (p["iou_per_gflop"] / c["iou_per_gflop"] - 1),
            "iou_difference": p["iou"] - c["iou"]}


def assignment_summary(methods: dict[str, dict], group_names, model_names: list[str],
                       model_groups: list[list[int] | None]) -> dict:
    """Confusion matrices (true group x chosen model, patch counts) of the routed methods and
    their assignment accuracy: the share of patches sent to a model trained on their group
    (``None`` when some group has no model of its own)."""
    correct = [[k for k, gs in enumerate(model_groups) if gs is not None and g in gs]
               for g in range(len(group_names))]
    out = {"groups": list(group_names), "models": model_names, "correct_models": correct,
           "methods": {}}
    for name, m in methods.items():
        if "assignment" not in m:
            continue
        matrix = np.asarray(m["assignment"], dtype=np.int64)
        accuracy = None
        if all(correct) and matrix.sum() > 0:
            hits = sum(int(matrix[g, ks].sum()) for g, ks in enumerate(correct))
            accuracy = hits / int(matrix.sum())
        out["methods"][name] = {"matrix": matrix.tolist(), "accuracy": accuracy}
    return out


def _shares(fractions) -> str:
    """Fractions as percentages, ``12.5 / 80.0 / 7.5 %``."""
    return " / ".join(f"{100 * f:.1f}" for f in fractions) + " %"


def _fmt(v, digits: int = 4) -> str:
    if v is None or (isinstance(v, float) and math.isnan(v)):
        return "n/a"
    return f"{v:.{digits}f}" if isinstance(v, float) else str(v)


def _machines(results: dict) -> str:
    """`` (AMD EPYC, AVX512-BF16, 2 threads, torch 2.14.1; stage 1 on the same kind)``: where the
    figures were measured, and where the pool they measure trained, if elsewhere. One seed
    repeats to the last digit on one kind of machine, not across kinds (their bf16
    kernels differ). Runs from before these were recorded: nothing."""
    from paser.train.distributed import machine_kind, machine_text

    here, trained = machine_kind(results.get("machine")), machine_kind(
        results.get("stage1_machine"))
    if not here:
        return ""
    several = [m for m in (results.get("stage1_machines") or {}).values() if m]
    where = ("; stage 1's models on several kinds of machine (stage1.json)" if several and
             not trained else "" if not trained else "; stage 1 on the same kind"
             if trained == here else f"; stage 1 trained on {machine_text(trained)}")
    return f" ({machine_text(here)}{where})"


def setting_line(results: dict) -> str:
    """The report's first line: device, seeds, lam, what the splits hold (tiles, where the
    run cut its images into them, and how many images they came from), grid and T."""
    data_seeds = ", ".join(f"{k} seed {v}" for k, v in results.get("data_seeds", {}).items())
    h, wd = results["image_size"]
    tiled = results.get("tiled_from")
    if tiled:
        def images(n: int) -> str:
            return f"{n} image{'s' * (n != 1)}"

        splits = (f"test tiles {results['test_images']} of {h} x {wd} from "
                  f"{images(tiled['test'])} (train {results['train_images']} tiles from "
                  f"{images(tiled['train'])}, validation {results['validation_images']} tiles "
                  f"from {images(tiled['validation'])}; below, an image is one of these tiles)")
    else:
        splits = f"test images {results['test_images']} of {h} x {wd}" + (
            f" (train {results['train_images']}, validation {results['validation_images']})"
            if "train_images" in results else "")
    return (f"- device: {results['device']}{_machines(results)}; seed {results['seed']}"
            f"{f' (data: {data_seeds})' if data_seeds else ''}; lam {results['lam']}; "
            + splits
            + (f"; data files {results['data_files']}" if results.get("data_files") else "")
            + f"; grid {results['grid'][0]} x {results['grid'][1]}; "
            f"T = {results['mc_samples']}\n")


def markdown(results: dict) -> str:
    """``report.md``: setting, Table 1, Table 2, routing fractions, curves, notes."""
    methods = results["methods"]
    out = io.StringIO()
    w = out.write
    w(f"# PaSeR report: {results.get('preset') or 'custom config'}\n\n")
    w(setting_line(results))
    w(f"- FLOPs: {results['flop_convention']}; GFLOP per image at inference, all Monte Carlo "
      "passes, the policy and every routed model included"
      + (f"; {mc_counting(results['costs'])}" if "costs" in results else "") + ".\n")
    w(f"- ms/image: wall-clock on this device in this run, batches of "
      f"{results['timing_batch']} images, after one warm-up batch; one pass per method, one "
      "method after another, so on a shared machine a slow spell lands on whichever ran "
      "then" + (" (the wall-clock line below times PaSeR and the single models in turns)"
                if "rounds" in results.get("wall_clock", {}) else "") + ".\n\n")
    if "verdict" in results:
        w(f"**Verdict: {results['verdict']}.**\n\n")
    if results.get("versus_cascade"):
        w(f"Against the cascade: {results['versus_cascade']}.\n\n")
    if results.get("noise"):
        w(f"Noise: {FR.noise_line(results['noise'])}.\n\n")
    if results.get("wall_clock"):
        wc = results["wall_clock"]
        w(wall_clock_line(wc, wc.get("images", results.get("timing_batch"))) + "\n\n")
    if "headroom_captured" in results:
        _routers_md(w, results)
    if "pool" in results:
        _pool_md(w, results["pool"], methods)
    w("## Table 1: every method on the test split\n\n")
    mp = results["image_size"][0] * results["image_size"][1] / 1e6
    w(f"GFLOP per image of {results['image_size'][0]} x {results['image_size'][1]}, and per "
      "megapixel (GFLOP/MP: comparable across image sizes).\n\n")
    w("| method | IoU | GFLOP | GFLOP/MP | IoU/GFLOP | ms/image | gap recovered | GFLOP / "
      f"{results['top_model']} |\n|---|---|---|---|---|---|---|---|\n")
    for name, m in methods.items():
        w(f"| {name} | {_fmt(m['iou'])} | {_fmt(m['gflops'], 3)} | "
          f"{_fmt(None if m['gflops'] is None else m['gflops'] / mp, 2)} | "
          f"{_fmt(m['iou_per_gflop'])} | "
          f"{_fmt(m['ms_per_image'], 2)} | {_fmt(m.get('gap_recovered'), 3)} | "
          f"{_fmt(m.get('gflops_frac_of_top'), 3)} |\n")
    _per_class_md(w, results)
    t2 = results["table2"]
    w("\n## Table 2: PaSeR against IDK-Cascade (IoU match)\n\n")
    match, tol = results["cascade"]["iou_match"], results["cascade"]["tolerance"]
    if methods["IDK-Cascade (IoU match)"]["iou"] >= methods["PaSeR"]["iou"]:
        w("The matched cascade uses the cheapest thresholds whose test IoU is at least "
          "PaSeR's (the least upper bound on its curve), so FLOPs are compared at equal or "
          "better IoU.\n\n")
    elif match["reached"]:
        w(f"The cascade never reaches PaSeR's IoU: the cheapest thresholds within {tol} "
          "below it are shown.\n\n")
    else:
        w(f"The cascade never comes within {tol} of PaSeR's IoU: its most accurate "
          "thresholds are shown.\n\n")
    w("| FLOPs saved | IoU/GFLOP gain | IoU difference |\n|---|---|---|\n")
    w(f"| {FR.nz(t2['flops_saved_pct'], 1):.1f} % | {FR.nz(t2['iou_per_gflop_gain_pct'], 1):+.1f} % | "
      f"{FR.nz(t2['iou_difference'], 4):+.4f} |\n")
    w("\n## Routing: share of test patches per model\n\n")
    names = results["models"]
    w("| method | " + " | ".join(names) + " |\n|---|" + "---|" * len(names) + "\n")
    for name, m in methods.items():
        if "fractions" in m:
            w(f"| {name} | " + " | ".join(f"{100 * f:.1f} %" for f in m["fractions"]) + " |\n")
    if "assignment" in results:
        _assignment_md(w, results["assignment"])
    if "tvd_sweep" in results:
        of = results["tvd_sweep"][0].get("of", "PaSeR") if results["tvd_sweep"] else "PaSeR"
        w(f"\n## Budget by total variation (TVD sweep of {of})\n\n")
        w("Stage 3 from the same stage-2 policy (lam = 0), lam rising until the validation "
          "assignment distribution is the threshold away from the starting policy's; the last "
          "epoch within it is kept.\n\n")
        w("| TVD threshold | test IoU | GFLOP | IoU/GFLOP | val TVD reached | epoch kept "
          "| lam there | fractions |\n|---|---|---|---|---|---|---|---|\n")
        for r in results["tvd_sweep"]:
            w(f"| {100 * r['tvd_threshold']:.0f} % | {_fmt(r['iou'])} | {_fmt(r['gflops'], 3)} | "
              f"{_fmt(r['iou_per_gflop'])} | {_fmt(r['val_tvd'], 3)} | {r['epoch']} | "
              f"{_fmt(r['lam'], 3)} | "
              + _shares(r.get("fractions", [])) + " |\n")
    experiments = results.get("experiments", {})
    sens, robust = experiments.get("sensitivity"), experiments.get("robustness")
    if robust:
        _robustness_md(w, robust)
    if sens:
        _sensitivity_md(w, sens)
    if "regret" in results:
        _regret_md(w, results)
    if "ablation" in results:
        _ablation_md(w, results["ablation"], results.get("headroom_floor"))
    w("\n## IoU-vs-GFLOP curves (test split)\n\n")
    lo, hi = results["curve_range"]
    spaced = "evenly in log GFLOP" if results.get("curve_budgets") == "log" else "evenly"
    w(f"Area under each curve: the mean over budgets spaced {spaced} from {lo:.3f} to "
      f"{hi:.3f} GFLOP of the best IoU within the budget (the frontier interpolated between "
      "its models); higher is better. Share of those budgets where a curve is at or above "
      "the single-model frontier in brackets.\n\n")
    above = results.get("share_above_frontier", {})
    for name, area in results["curve_areas"].items():
        share = f" ({100 * above[name]:.0f} % of budgets at or above the frontier)" \
            if name in above else ""
        w(f"- {name}: {area:.4f}{share}\n")
    w(f"- PaSeR's point {'is' if results['paser_on_or_above_cascade'] else 'is NOT'} on or "
      "above the cascade's curve (at PaSeR's GFLOP, IoU at least the cascade's best).\n")
    extra = [f for k, f in (("assignment", "assignment.png"), ("tvd_sweep", "tvd.png"))
             if k in results]
    if robust:
        extra.append("robustness_routing.png")
    if sens:
        extra += ["sensitivity_lam.png", "mc_entropy.png"]
    w("\nFigures: " + ", ".join(f"`figures/{f}`" for f in ["iou_vs_gflop.png",
                                                            "qualitative.png", *extra]) + ".\n")
    w("\n## Notes\n\n")
    for note in results["notes"]:
        w(f"- {note}\n")
    return out.getvalue()


#: single rounds of the wall-clock timing whose ratios differ more than this many times
#: over: the machine was too unsteady to read a ratio from them
UNSTEADY = 2.0


def wall_clock_line(wc: dict, batch: int | None) -> str:
    """The report's wall-clock line: PaSeR's ms against the single models' at its IoU, how
    they were timed and how far single rounds of the timing spread."""
    need = wc["frontier_ms_at_equal_iou"]
    head = (f"Wall clock on this device: PaSeR {wc['paser_ms']:.1f} ms per image; "
            + (f"the single models need {need:.1f} ms for its IoU ({wc['ratio']:.2f} x)"
               if need is not None else "no single model reaches its IoU"))
    if "rounds" not in wc:  # results from before the timing in turns
        return (head + " (ms measured one method after another in this run, batches of "
                f"{batch}; `make bench` times them side by side).")
    spread = wc.get("ratio_range")
    batches, images = wc.get("batches", 1), wc.get("images", batch)
    # the images of each batch timed (an int: the results of a day that kept one size)
    total = sum(images) if isinstance(images, list) else (images or 0) * batches
    line = (head + f" (medians of {wc['rounds']} rounds in which PaSeR and the single models "
            "each timed the same batch in turn, "
            + (f"over the split's first {total} test images in {batches} batches"
               if batches > 1 else f"one batch of {total} test images")
            + (f"; single rounds gave {spread[0]:.2f} to {spread[1]:.2f} x" if spread else "")
            + ").")
    if spread and spread[0] > 0 and spread[1] / spread[0] > UNSTEADY:
        line += (f" The rounds disagree by more than {UNSTEADY:g} x: this machine's timing "
                 "was too unsteady here to read a ratio from (shared cores; fewer "
                 "num_threads steady it).")
    return (line + " A few batches on a machine that may be shared give a rough figure; "
            "`make bench` (benchmarks/bench.py) times whole splits in turns.")


def mc_counting(costs: dict, runs_them: str = "the routers and f0 (MC)") -> str:
    """How f0's Monte Carlo passes are counted, with the paper's count beside ours where the
    two differ (``costs``: :meth:`paser.routing.CostTable.to_dict`; ``runs_them``: the
    methods whose GFLOP hold the passes)."""
    t, shared = costs["mc_samples"], costs.get("f0_shared", 0.0)
    if t <= 1:
        return "f0 runs one pass"
    if shared <= 0:
        return f"f0's {t} Monte Carlo passes are each counted in full"
    full = t * costs["f0_pass"]
    return (f"f0's layers before its first active dropout run once for its {t} Monte Carlo "
            f"passes and are counted once ({shared:.3f} of its {costs['f0_pass']:.3f} GFLOP "
            f"a pass): f0 with {t} passes {costs['f0_mc']:.3f} GFLOP; every pass counted in "
            f"full, as the paper counts them, {full:.3f} ({full - costs['f0_mc']:.3f} more "
            f"per image for {runs_them})")


#: the methods whose IoU of each class the report gives (those of them the run has)
PER_CLASS_METHODS = ("PaSeR", "PaSeR (paper)", "IDK-Cascade", "Oracle", "MatPhase")


def _per_class_md(w, results: dict) -> None:
    """Each class's test IoU under the routers and every single model: where routing's
    savings cost a rare class, it shows here, not in the mean."""
    methods = results["methods"]
    shown = [m for m in (*PER_CLASS_METHODS, *results["models"])
             if m in methods and methods[m].get("per_class") is not None]
    if not shown:
        return
    count = len(methods[shown[0]]["per_class"])
    names = results.get("classes") or [f"class {c}" for c in range(count)]
    w("\n### IoU of each class (test)\n\n")
    w("Over the whole split, as the mIoU above is their mean (a class neither labelled nor "
      "predicted anywhere: n/a).\n\n")
    w("| class | " + " | ".join(shown) + " |\n|---|" + "---|" * len(shown) + "\n")
    for c, name in enumerate(names):
        w(f"| {name} | " + " | ".join(_fmt(methods[m]["per_class"][c]) for m in shown) + " |\n")


def _routers_md(w, results: dict) -> None:
    """What each router captures of what routing this pool could give."""
    areas, captured = results["curve_areas"], results["headroom_captured"]
    ranks = results.get("rank_correlation", {})
    reach = results.get("reachable_captured", {})
    reach_name = next((n for n in areas if n.startswith("Oracle (")), None)
    w("## The routers against the frontier and the oracle (test split)\n\n")
    w("Headroom captured: (curve area - frontier area) / (oracle area - frontier area), the "
      "share of what the oracle's routing of this pool (labels known) adds over the best "
      "single models that a router gets (1: all of it; 0: none; below 0: under the frontier). Rank correlation: "
      "Spearman's, over the test patches, between the router's preference to move a patch "
      "off f0 and the best pool model's true gain there (the cascade: f0's entropy on the "
      "patch). A router's curve counts as f0 alone below its fixed cost. The oracle "
      "maximises per-patch reward, not the dataset's mIoU: it is no ceiling at every budget, "
      "and can sit under the frontier.\n\n")
    room = areas["Oracle"] - areas["Frontier"]
    w(f"Frontier area {areas['Frontier']:.4f}; oracle {areas['Oracle']:.4f} "
      f"({room:+.4f} over the frontier)")
    if reach_name is not None:
        part = FR.headroom_captured(areas[reach_name], areas["Frontier"], areas["Oracle"])
        w(f"; {reach_name} {areas[reach_name]:.4f}, "
          + ("the oracle has no headroom over the frontier here" if part is None else
             f"{_pct(part)} of the oracle's headroom")
          + ". That curve routes each patch by its true gains measured on the other "
          "mirrored and turned views of its image: what a patch's gain owes to its content "
          "survives a mirror, what it owes to one draw of the models' errors on that exact "
          "arrangement of pixels does not, and no router can see the second. Its share is "
          "an estimate of the reachable part; the last column is each router's share of it")
    w(".\n\n")
    caveat = FR.headroom_caveat(room, results.get("headroom_floor"),
                                list(results.get("headroom_captured", {}).values()))
    if caveat is not None:
        w(f"**The shares of the headroom are not meaningful on this run**: {caveat}.\n\n")
    floor = results.get("headroom_floor")
    if reach and reach_name is not None and floor is not None:
        # the last column divides by this curve's margin: under the noise, as the oracle's
        reach_room = areas[reach_name] - areas["Frontier"]
        if 1e-12 < reach_room < floor:
            w(f"**The shares of the reachable part are not meaningful on this run**: "
              f"{reach_name} is {reach_room:+.4f} of curve area over the frontier, under "
              f"{floor:.4f} (the noise of an IoU difference on this test split), so a share "
              "of it is mostly noise and can run to hundreds of percent.\n\n")
    w("| router | curve area | above the frontier | headroom captured | rank correlation |"
      + (" of the reachable part |" if reach else "") + "\n|---|---|---|---|---|"
      + ("---|" if reach else "") + "\n")
    for name, share in captured.items():
        area = areas[name]  # started from f0's point, as its share of the headroom
        w(f"| {name} | {area:.4f} | {area - areas['Frontier']:+.4f} | "
          f"{_pct(share)} | {_fmt(ranks.get(name), 3)} |"
          + (f" {_pct(reach.get(name))} |" if reach else "") + "\n")
    w("\n")


def _pct(v) -> str:
    return "n/a" if v is None else f"{100 * v:.0f} %"


def _pool_md(w, pool: dict, methods: dict[str, dict]) -> None:
    w("## The pool\n\n")
    w("| model | test IoU | GFLOP | stage-1 epochs | best epoch | converged |\n"
      "|---|---|---|---|---|---|\n")
    for role, info in pool["models"].items():
        m = methods.get(role, {})
        conv = {True: "yes (early stop)", False: "no (epoch cap)", None: "n/a (no patience)"}[
            info.get("converged")]
        cap = f" of {info['epoch_cap']}" if info.get("epoch_cap") is not None else ""
        w(f"| {role} | {_fmt(m.get('iou'))} | {_fmt(m.get('gflops'), 3)} | "
          f"{info.get('epochs')}{cap} | {info.get('best_epoch')} | {conv} |\n")
    for a, b in pool.get("inverted", []):
        w(f"\nWarning: {b} scores below {a} on test ({methods[b]['iou']:.4f} < "
          f"{methods[a]['iou']:.4f}) although it costs more: the pool is not ordered by "
          "quality (a model under-trained, or too large for the data).\n")
    for a, b in pool.get("cost_order", []):
        w(f"\nWarning: {a} costs more than {b} ({methods[a]['gflops']:.3f} > "
          f"{methods[b]['gflops']:.3f} GFLOP) but comes first in models.pool: the IDK cascade "
          f"escalates in the listed order (to {a} before {b})"
          + (", and 'PaSeR (f1's GFLOP)' is not the cheapest pool model's point" if a == "f1"
             else "") + "; list models.pool cheapest first.\n")
    if pool.get("improving"):
        names = ", ".join(pool["improving"])
        w(f"\nStill improving at the epoch cap: {names} (best epoch among the last tenth of "
          "the epochs, or the last 3). More training may lift them: `models.f0.epochs`, "
          "`models.pool.<i>.epochs`, or, on few labelled slices, "
          "`stage1.min_epoch_images`.\n")
    w("\n")


def _regret_md(w, results: dict) -> None:
    w("\n## Against the single-model frontier (test split)\n\n")
    w("At each PaSeR point's GFLOP: what the single models give for that cost (one model, "
      "or whole images split between two), the point's IoU minus theirs (one point's "
      "margin, not the curve areas' difference of the routers' table), and the cascade's "
      "and the oracle's best within it.\n\n")
    w("| method | GFLOP | IoU | frontier | IoU - frontier | IDK-Cascade | Oracle |\n"
      "|---|---|---|---|---|---|---|\n")
    for r in results["regret"]:
        w(f"| {r['method']} | {_fmt(r['gflops'], 3)} | {_fmt(r['iou'])} | {_fmt(r['frontier'])} | "
          f"{_signed(r['above_frontier'])} | {_fmt(r['cascade'])} | {_fmt(r['oracle'])} |\n")


def _ablation_md(w, a: dict, floor: float | None = None) -> None:
    w("\n## Ablation: objective x state x uncertainty\n\n")
    w(a["description"] + "\n\n")
    caveat = FR.headroom_caveat(a.get("oracle_margin", {}).get("test", 0.0), floor,
                                [r.get("test_headroom") for r in a.get("rows", [])])
    if caveat is not None:
        w(f"The headroom column is not meaningful: {caveat}.\n\n")
    w("| variant | objective | state | uncertainty | fixed GFLOP | val area - frontier | "
      "test area - frontier | headroom | rank | test IoU | test GFLOP | train patches | "
      "train s |\n"
      "|---|---|---|---|---|---|---|---|---|---|---|---|---|\n")
    for r in a["rows"]:
        head = r.get("test_headroom")
        w(f"| {r['name']} | {r['objective']} | {r['state']} | {r['uncertainty']} | "
          f"{r['fixed_gflops']:.3f} | {_signed(r['val_margin'])} | {_signed(r['test_margin'])} | "
          f"{'n/a' if head is None else f'{100 * head:.0f} %'} | "
          f"{_fmt(r.get('test_rank'), 3)} | "
          f"{_fmt(r['test_iou'])} | {_fmt(r['test_gflops'], 3)} | "
          f"{r.get('train_patches', 'n/a')} | {r['seconds']:.1f} |\n")


def _signed(v) -> str:
    return "n/a" if v is None else f"{v:+.4f}"


def _robustness_md(w, r: dict) -> None:
    w("\n## Robustness to unseen noise (Table 3)\n\n")
    pool = ", ".join(f"{k} {v['epochs']} epochs" for k, v in r["noisy_pool"].items())
    w(f"Salt-and-pepper noise on {100 * r['amount']:g} % of the pixels (seed {r['seed']}; "
      f"{100 * r['pixels_changed']:.2f} % of test pixels changed value). Noisy variants of "
      f"the pool ({pool}) trained from {r['trained_from']} on {r['training_data']}; f0 and "
      "the policy untouched. IoU clean: clean test split, deployed pool (Table 1). IoU "
      "noisy: noisy test split, noisy pool. The last two columns cross them: the noisy "
      "split with the deployed pool, and the clean split with the noisy pool. "
      + _operating_point(r) + "\n\n")
    w("| method | IoU clean | IoU noisy | degradation | GFLOP clean / noisy | "
      "IoU noisy, deployed pool | IoU clean, noisy pool |\n|---|---|---|---|---|---|---|\n")
    for name, row in r["table"].items():
        w(f"| {name} | {_fmt(row['iou_clean'])} | {_fmt(row['iou_noisy'])} | "
          f"{row['degradation_pct']:.2f} % | {_fmt(row['gflops_clean'], 3)} / "
          f"{_fmt(row['gflops_noisy'], 3)} | {_fmt(row['iou_noisy_original_models'])} | "
          f"{_fmt(row['iou_clean_noisy_models'])} |\n")
    w(f"\nShare of patches per model ({' / '.join(r['models'])}):\n\n")
    for name, row in r["table"].items():
        if "fractions_clean" in row:
            w(f"- {name}: clean {_shares(row['fractions_clean'])}, noisy "
              f"{_shares(row['fractions_noisy'])} (above f0: "
              f"{100 * row['share_above_f0_clean']:.1f} % -> "
              f"{100 * row['share_above_f0_noisy']:.1f} %)\n")


def _operating_point(r: dict) -> str:
    """Where the robustness study's PaSeR routes (an entry without the key predates it)."""
    if "paser_operating_point" not in r:
        return ("PaSeR: the policy's own choices, without the run's calibration if it has "
                "one (measured before the study applied it; run it again to match Table 1).")
    target = r["paser_operating_point"]
    if target is None:
        return "PaSeR routes at its policy's own choices (the run has no calibration)."
    return ("PaSeR routes at the run's calibrated operating point ("
            + ", ".join(f"{k} {v}" for k, v in target.items())
            + "), as in Table 1 and `paser segment`, with the noisy pool too.")


def _sensitivity_md(w, s: dict) -> None:
    w("\n## Sensitivity to lam (a policy trained at each lam)\n\n")
    w(f"Stage 2 from the same stage-1 models, {s['epochs']} epochs per lam; test split. "
      f"Mean cost: the reward's c(a) per patch ({s['cost']}).\n\n")
    w("| lam | IoU | mean cost | GFLOP | fractions |\n|---|---|---|---|---|\n")
    for r in s["lam_sweep"]:
        w(f"| {r['lam']:g} | {_fmt(r['iou'])} | {_fmt(r['mean_cost'], 3)} | "
          f"{_fmt(r['gflops'], 3)} | {_shares(r['fractions'])} |\n")
    t = s["mc_samples"]
    w(f"\n## Sensitivity to the number of Monte Carlo samples\n\n"
      f"f0's {s['entropy_unit']} on the test split, T = {t[0]} against T = {t[1]}"
      f"{dropout_said(s)}: ")
    w(", ".join(f"T = {k}: {v['mean']:.4f} +/- {v['std']:.4f} (n = {v['n']})"
                for k, v in s["entropy"].items()))
    w(f". Welch t-test: t = {s['t_statistic']:.3f}, p = {p_text(s['p_value'])} "
      "(the paper: p = 0.6986).\n")


def p_text(p: float) -> str:
    """A p-value to 4 decimals, as the paper gives its 0.6986, or where it is under 0.0001
    in scientific notation: 4 decimals print 3e-7 as 0.0000, as if the test were certain."""
    return f"{p:.1e}" if p < 1e-4 else f"{p:.4f}"


def dropout_said(s: dict) -> str:
    """Which dropouts the T study kept on, and where that is not how the run routes."""
    if "dropout" not in s:  # an entry from before the study recorded it: every dropout
        return ", every dropout on (mc_dropout all)"
    if s["dropout"] == s["run_dropout"]:
        return f", dropout {s['dropout']} as the run routes"
    return (f", dropout {s['dropout']}: the run's f0 routes with mc_dropout "
            f"{s['run_dropout']} (one deterministic pass), so this measures the paper's Monte "
            "Carlo dropout, not what the run uses")


def _assignment_md(w, a: dict) -> None:
    w("\n## Model assignment: true group (rows) vs chosen model (columns)\n\n")
    w("Correct model per group: " + ", ".join(
        f"{g} -> {'/'.join(a['models'][k] for k in ks) or 'none'}"
        for g, ks in zip(a["groups"], a["correct_models"], strict=True)) + ".\n")
    for name, m in a["methods"].items():
        w(f"\n**{name}**: assignment accuracy {_fmt(m['accuracy'], 3)}\n\n")
        w("| group | " + " | ".join(a["models"]) + " |\n|---|" + "---|" * len(a["models"]) + "\n")
        for g, row in zip(a["groups"], m["matrix"], strict=True):
            w(f"| {g} | " + " | ".join(str(v) for v in row) + " |\n")


def write_report(run_dir: Path, results: dict) -> str:
    """Write results.json, results.csv and report.md; return the markdown.

    results.csv has no ``flop_convention`` of its own: its ``gflops`` are results.json's,
    GFLOP per image under :data:`paser.cost.FLOP_CONVENTION` (docs/experiments.md lists its
    columns and says so)."""
    atomic_write_text(json.dumps(results, indent=2), run_dir / "results.json")
    buf = io.StringIO()
    cols = ["method", "iou", "gflops", "iou_per_gflop", "ms_per_image", "batch_size",
            "gap_recovered", "gflops_frac_of_top", "fractions"]
    classes = results.get("classes") or []  # each class's IoU, last: iou_<class name>
    writer = csv.writer(buf)
    writer.writerow(cols + [f"iou_{c}" for c in classes])
    for name, m in results["methods"].items():
        per_class = m.get("per_class") or [None] * len(classes)
        writer.writerow([name] + [" ".join(f"{f:.4f}" for f in m[c]) if c == "fractions" and c in m
                                  else m.get(c, "") for c in cols[1:]]
                        + ["" if v is None else v for v in per_class[:len(classes)]])
    atomic_write_text(buf.getvalue(), run_dir / "results.csv")
    text = markdown(results)
    atomic_write_text(text, run_dir / "report.md")
    return text


#: the colour of each curve in iou_vs_gflop.png; a method's point takes its curve's
CURVE_COLOURS = {"PaSeR": "C0", "IDK-Cascade": "C1", "Oracle": "C2", "PaSeR (paper)": "C4"}


def curve_of(name: str) -> str | None:
    """The curve a method's point lies on (its operating points are PaSeR's: calibrated
    biases; the IoU-matched cascade is a point of the cascade's curve); None for the rest."""
    if name in CURVE_COLOURS:
        return name
    if name.startswith("IDK-Cascade"):
        return "IDK-Cascade"
    if name.startswith("PaSeR (") and name != "PaSeR (paper)":
        return "PaSeR"
    return None


def point_colours(names) -> dict[str, object]:
    """Each method's colour: its curve's, or else one of tab20's that no curve uses."""
    plt = pyplot()
    free = [plt.cm.tab20(i) for i in (6, 10, 12, 16, 18, 7, 11, 13, 17, 19)]  # no grey
    out, i = {}, 0
    for name in names:
        if (on := curve_of(name)) is not None:
            out[name] = CURVE_COLOURS[on]
        else:
            out[name], i = free[i % len(free)], i + 1
    return out


def plot_curves(path: Path, methods: dict[str, dict], curves: dict[str, dict]) -> None:
    plt = pyplot()
    fig, ax = plt.subplots(figsize=(10.5, 5))
    styles = CURVE_COLOURS
    for name, c in curves.items():
        if c.get("interpolate"):  # the single-model frontier: linear in GFLOP between models,
            # so drawn through many points: on the log axis a straight line would bow above it
            g = np.geomspace(min(c["gflops"]), max(c["gflops"]), 400)
            ax.plot(g, np.interp(g, c["gflops"], c["iou"]), "--", color="black", lw=1.6,
                    zorder=2, label="single-model frontier")
            continue
        ax.step(c["gflops"], c["iou"], where="post", color=styles.get(name, "C7"), alpha=0.75,
                label=f"{name} curve")
    colours = point_colours(methods)
    for i, (name, m) in enumerate(methods.items()):
        # the first drawn on top: PaSeR's point is often an operating point's too (the same
        # calibration target), which drawn after it hid the headline's marker
        ax.scatter(m["gflops"], m["iou"], marker="o*sD^v<>phX8d"[i % 13], s=60,
                   zorder=3 + (len(methods) - i) / (len(methods) + 1),
                   color=colours[name], edgecolor="black", linewidth=0.5, label=name)
    ax.set_xscale("log")
    ax.set_xlabel(f"GFLOP per image ({FLOP_CONVENTION})", fontsize=8)
    ax.set_ylabel("test mIoU")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7, loc="upper left", bbox_to_anchor=(1.01, 1.0))  # off the points
    save_figure(fig, path, dpi=120)


def plot_qualitative(path: Path, images, labels, preds, actions, entropies, grid,
                     model_names: list[str], class_names: list[str]) -> None:
    """Rows of test images: input, label, PaSeR prediction, routing map, entropy map.

    Label and prediction share one colour per class (``class_names``, in class order;
    unlabelled pixels white), with a legend for them and one for the routing map."""
    from matplotlib.colors import ListedColormap
    from matplotlib.patches import Patch

    plt = pyplot()

    n, ncls = len(images), len(class_names)
    fig, axes = plt.subplots(n, 5, figsize=(12, 2.5 * n), squeeze=False)
    cmap = ListedColormap(["#1f77b4", "#ff7f0e", "#2ca02c", "#d62728", "#9467bd"][:len(model_names)])
    palette = plt.cm.Set2 if ncls <= 8 else plt.cm.tab20b  # neither has the routing map's colours
    classes = ListedColormap([palette(c % palette.N) for c in range(ncls)]
                             ).with_extremes(bad="white")

    def by_class(mask):  # values outside 0..C-1 (unlabelled, 255) are masked: white
        a = np.asarray(mask)
        return np.ma.masked_where((a < 0) | (a >= ncls), a)

    entropy = f"f0 entropy (black 0, white ln {ncls} = {math.log(ncls):.2f} nats)"
    for r in range(n):
        h, w = labels[r].shape
        rmap = np.kron(actions[r].reshape(grid.rows, grid.cols).numpy(),
                       np.ones((math.ceil(h / grid.rows), math.ceil(w / grid.cols))))[:h, :w]
        panels = [(images[r][0], "gray", "input"), (by_class(labels[r]), classes, "label"),
                  (by_class(preds[r]), classes, "PaSeR"), (rmap, cmap, "routing"),
                  (entropies[r][:h, :w], "magma", entropy)]
        for c, (img, cm, title) in enumerate(panels):
            ax = axes[r, c]
            kw = ({"vmin": 0, "vmax": len(model_names) - 1} if title == "routing" else
                  {"vmin": 0, "vmax": ncls - 1} if cm is classes else
                  # one scale for every row: 0 (certain) to ln C (every class alike)
                  {"vmin": 0, "vmax": math.log(ncls)} if title == entropy else {})
            ax.imshow(img if cm is classes else np.asarray(img), cmap=cm,
                      interpolation="nearest", **kw)
            ax.set_xticks([])
            ax.set_yticks([])
            if title == "routing":  # the patch borders
                for k in range(1, grid.rows):
                    ax.axhline(k * h / grid.rows - 0.5, color="white", lw=0.8)
                for k in range(1, grid.cols):
                    ax.axvline(k * w / grid.cols - 0.5, color="white", lw=0.8)
            if r == 0:
                ax.set_title(title, fontsize=8)
    routing = [Patch(facecolor=cmap(i), edgecolor="none", label=f"routed to {m}")
               for i, m in enumerate(model_names)]
    unlabelled = any(bool((np.asarray(m) >= ncls).any() or (np.asarray(m) < 0).any())
                     for m in labels)
    legend = [Patch(facecolor=classes(c), edgecolor="none", label=name)
              for c, name in enumerate(class_names)]
    if unlabelled:
        legend.append(Patch(facecolor="white", edgecolor="grey", label="unlabelled"))
    cols = min(len(legend), 7)
    rows = math.ceil(len(legend) / cols)
    fig.legend(handles=legend, loc="lower left", ncol=cols, fontsize=8, frameon=False,
               title="label and prediction", title_fontsize=8, bbox_to_anchor=(0.0, 0.0))
    fig.legend(handles=routing, loc="lower right", ncol=len(routing), fontsize=8,
               title="routing map", title_fontsize=8, frameon=False, bbox_to_anchor=(1.0, 0.0))
    room = 0.35 + 0.25 * rows  # inches: the legends' titles and rows
    save_figure(fig, path, dpi=100, rect=(0, room / (2.5 * n), 1, 1))


def pyplot():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def save_figure(fig, path: Path, dpi: int = 110, rect=(0, 0, 1, 1)) -> None:
    """Lay out (in ``rect`` of the figure), write (creating the folder) and close a figure.

    Ctrl-C is held while matplotlib draws: its C++ reads each image's transform through
    numpy and turns an interruption there into 'ValueError: Invalid affine transformation
    matrix' (a paser run stopped as its report drew the qualitative figure: exit status 1
    and a traceback, not 130 and how to go on); it is handled once the figure is written."""
    path.parent.mkdir(parents=True, exist_ok=True)
    with interrupts_held():
        fig.tight_layout(rect=rect)
        fig.savefig(path, dpi=dpi)
    pyplot().close(fig)


def plot_assignment(path: Path, assignment: dict) -> None:
    """One confusion matrix per routed method: true group vs chosen model, with counts."""
    plt = pyplot()
    items = list(assignment["methods"].items())
    fig, axes = plt.subplots(1, len(items), figsize=(3.2 * len(items), 3.2), squeeze=False)
    for ax, (name, m) in zip(axes[0], items, strict=True):
        matrix = np.asarray(m["matrix"])
        ax.imshow(matrix, cmap="Blues", vmin=0, vmax=max(int(matrix.max()), 1))
        for (r, c), v in np.ndenumerate(matrix):
            ax.text(c, r, str(v), ha="center", va="center", fontsize=8,
                    color="white" if v > matrix.max() / 2 else "black")
        ax.set_xticks(range(len(assignment["models"])), assignment["models"], fontsize=8)
        ax.set_yticks(range(len(assignment["groups"])), assignment["groups"], fontsize=8)
        ax.set_xlabel("chosen model", fontsize=8)
        ax.set_title(f"{name}\naccuracy {_fmt(m['accuracy'], 3)}", fontsize=9)
    save_figure(fig, path, dpi=110)


def plot_tvd(path: Path, sweep: list[dict]) -> None:
    """IoU/GFLOP and IoU against the TVD threshold (paper Fig. 12)."""
    plt = pyplot()
    x = [100 * r["tvd_threshold"] for r in sweep]
    fig, ax = plt.subplots(figsize=(5.5, 3.8))
    lines = ax.plot(x, [r["iou_per_gflop"] for r in sweep], "o-", color="C0", markersize=9,
                    label="IoU / GFLOP (left)")
    ax.set_xlabel("TVD threshold (%)")
    ax.set_ylabel("IoU / GFLOP", color="C0")
    ax.set_title(f"GFLOP per image: {FLOP_CONVENTION}", fontsize=7)
    twin = ax.twinx()
    lines += twin.plot(x, [r["iou"] for r in sweep], "s--", color="C3", markersize=5,
                       label="test mIoU (right)")
    twin.set_ylabel("test mIoU", color="C3")
    ax.legend(handles=lines, fontsize=8, loc="best")
    ax.grid(alpha=0.3)
    save_figure(fig, path, dpi=110)
