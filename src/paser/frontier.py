"""The single-model frontier: what a user gets without routing, and PaSeR measured against it.

A user who does not route picks one model of the pool for every image, or splits whole
images between two of them. The points ``(GFLOP, IoU)`` of f0, f1, ..., fK alone, and the
straight lines between them (a share ``s`` of the images on one model and ``1 - s`` on the
other costs and scores the mix of the two), span what is reachable; its upper hull, rising
in IoU, is the **frontier**. Routing is worth running only where it stands above it.

Routed curves (PaSeR, the cascade, the oracle) are step curves: at a budget ``g`` a curve
gives the best IoU of its points with GFLOP ``<= g``. The frontier is interpolated linearly
in GFLOP, as its definition says. Areas are means over budgets spaced evenly in log GFLOP,
from the fixed cost every routed image pays to the dearest single model's GFLOP: a linear
grid would weight the expensive end, where users operate least.

GFLOP follow :data:`paser.cost.FLOP_CONVENTION` (a multiply-add counts 2).
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

Point = tuple[float, float]


def hull(points: Sequence[Point]) -> list[Point]:
    """The frontier's vertices ``[(GFLOP, IoU), ...]``, cheapest first, IoU rising.

    The upper concave hull of ``points`` (sorted by GFLOP, a point under the chord of its
    neighbours dropped), cut where IoU stops rising: a dearer model that scores no better
    is never worth picking. Of models at the same GFLOP only the best is kept (the chord
    test cannot drop the worse one where the two are the cheapest).
    """
    out: list[Point] = []
    for p in sorted((float(x), float(y)) for x, y in points):
        if out and out[-1][0] == p[0]:  # sorted: p scores at least as well for the same GFLOP
            out.pop()
        while len(out) >= 2:
            (x1, y1), (x2, y2) = out[-2], out[-1]
            if (x2 - x1) * (p[1] - y1) - (y2 - y1) * (p[0] - x1) >= 0:  # out[-1] not above
                out.pop()
            else:
                break
        out.append(p)
    rising: list[Point] = []
    for x, y in out:
        if not rising or y > rising[-1][1]:
            rising.append((x, y))
    return rising


def frontier_at(vertices: Sequence[Point], gflops: float) -> float | None:
    """The frontier's IoU at a budget of ``gflops`` per image (``None`` below the cheapest
    model; the best model's IoU above the dearest)."""
    xs, ys = zip(*vertices, strict=True)
    if gflops < xs[0] - 1e-12:
        return None
    return float(np.interp(gflops, xs, ys))


def frontier_cost(vertices: Sequence[Point], iou: float) -> float | None:
    """The least GFLOP per image at which the frontier reaches ``iou`` (``None`` when no
    single model or mix of two does)."""
    xs, ys = zip(*vertices, strict=True)
    if iou > ys[-1] + 1e-12:
        return None
    if iou <= ys[0]:
        return float(xs[0])
    return float(np.interp(iou, ys, xs))  # ys rise strictly along the hull


def frontier_mix(vertices: Sequence[Point], names: Sequence[str], gflops: float) -> str:
    """How the frontier spends ``gflops``: ``"f1 on 63 % of images, f2 on 37 %"``.

    ``names`` are the models of ``vertices`` in their order."""
    xs = [x for x, _ in vertices]
    if gflops <= xs[0]:
        return f"{names[0]} on every image"
    if gflops >= xs[-1]:
        return f"{names[-1]} on every image"
    i = int(np.searchsorted(xs, gflops)) - 1
    share = (gflops - xs[i]) / (xs[i + 1] - xs[i])
    return f"{names[i]} on {100 * (1 - share):.0f} % of images, {names[i + 1]} on {100 * share:.0f} %"


def best_within(curve: dict, gflops: float) -> float | None:
    """A step curve's best IoU at GFLOP ``<= gflops`` (``None`` below its cheapest point)."""
    xs, ys = np.asarray(curve["gflops"]), np.asarray(curve["iou"])
    ok = xs <= gflops + 1e-12
    return float(ys[ok].max()) if ok.any() else None


def from_point(curve: dict, point: Point) -> dict:
    """A router's step curve read with ``point`` (f0 alone) before its own points: below
    the router's fixed cost (its policy, its f0 passes) a user runs f0 alone."""
    return {"gflops": [point[0], *curve["gflops"]], "iou": [point[1], *curve["iou"]]}


def budgets(lo: float, hi: float, count: int = 64) -> np.ndarray:
    """``count`` budgets spaced evenly in log GFLOP from ``lo`` to ``hi``."""
    return np.geomspace(lo, max(hi, lo * (1 + 1e-9)), count)


def curve_values(curve: dict, grid: np.ndarray, interpolate: bool = False) -> np.ndarray:
    """A curve's IoU at each budget of ``grid``: its best within the budget (0 below its
    cheapest point), or with ``interpolate`` the frontier's linear interpolation."""
    if interpolate:
        vertices = list(zip(curve["gflops"], curve["iou"], strict=True))
        return np.array([frontier_at(vertices, g) or 0.0 for g in grid])
    return np.array([best_within(curve, g) or 0.0 for g in grid])


def frontier_curve(points: dict[str, Point]) -> dict:
    """The frontier as a curve entry of ``results.json``: its vertices, the models at
    them, and ``"interpolate": True`` (read between vertices linearly, not as steps)."""
    names = {(float(x), float(y)): name for name, (x, y) in points.items()}
    vertices = hull(list(points.values()))
    return {"gflops": [x for x, _ in vertices], "iou": [y for _, y in vertices],
            "models": [names[v] for v in vertices], "interpolate": True}


def areas(curves: dict[str, dict], lo: float, hi: float, count: int = 64) -> dict[str, float]:
    """Mean IoU of each curve over ``count`` log-spaced budgets in ``[lo, hi]``."""
    grid = budgets(lo, hi, count)
    return {name: float(curve_values(c, grid, c.get("interpolate", False)).mean())
            for name, c in curves.items()}


def share_above(curve: dict, frontier: dict, lo: float, hi: float, count: int = 64,
                tol: float = 1e-9) -> float:
    """Share of ``count`` log-spaced budgets in ``[lo, hi]`` where ``curve`` is at or above
    the frontier."""
    grid = budgets(lo, hi, count)
    mine = curve_values(curve, grid)
    theirs = curve_values(frontier, grid, interpolate=True)
    return float(np.mean(mine >= theirs - tol))


def curve_saving(curve: dict, frontier: dict) -> tuple[float, Point, float] | None:
    """The largest share of GFLOP any point of a routed ``curve`` saves against the frontier
    at equal IoU: ``(saving, (GFLOP, IoU) of that point, the frontier's GFLOP for that
    IoU)``, or ``None`` when no point is cheaper than the frontier at its IoU. A point above
    every single model is compared with the best one's GFLOP."""
    vertices = list(zip(frontier["gflops"], frontier["iou"], strict=True))
    best = None
    for g, iou in zip(curve["gflops"], curve["iou"], strict=True):
        need = frontier_cost(vertices, iou)
        need = vertices[-1][0] if need is None else need
        if g < need * (1 - 1e-6) and (best is None or 1 - g / need > best[0]):
            best = (1 - g / need, (float(g), float(iou)), float(need))
    return best


def headroom_captured(area: float, frontier_area: float, oracle_area: float) -> float | None:
    """The share of the oracle's headroom over the frontier that a curve captures:
    ``(area - frontier) / (oracle - frontier)`` (``None`` when the oracle has none)."""
    room = oracle_area - frontier_area
    return None if room <= 1e-12 else (area - frontier_area) / room


#: the oracle's least margin over the frontier (curve area, IoU) whose shares are read,
#: where the test split's bootstrap gives no noise scale: the report's IoU-match tolerance
#: (baselines.iou_match_tol's default), a difference it already treats as none
MIN_HEADROOM = 0.005


def headroom_floor(noise: dict | None) -> float:
    """The oracle's least margin over the frontier (curve area, IoU) whose shares
    (:func:`headroom_captured`) mean something: the noise of an IoU difference on this
    test split, half the width of :func:`bootstrap`'s interval of PaSeR's margin over the
    frontier (``noise``), or :data:`MIN_HEADROOM` where that interval is missing or has no
    width (PaSeR on one model in every resample)."""
    if noise is None:
        return MIN_HEADROOM
    m = noise["margin"]
    half = (m["high"] - m["low"]) / 2
    return float(half) if np.isfinite(half) and half > 0 else MIN_HEADROOM


def headroom_caveat(room: float, floor: float | None, shares=()) -> str | None:
    """Why shares of the oracle's headroom ``room`` (its curve area minus the frontier's)
    are not to be read: ``room`` positive but under ``floor`` (:func:`headroom_floor`),
    where a share is mostly noise; or one of ``shares`` over 100 % (a router above the
    oracle: the oracle maximises per-patch reward, not dataset mIoU, so its headroom is no
    ceiling). A share under -100 % is read as it is: a router under the frontier by more than
    the oracle's headroom. None where the shares can be read (or there are none)."""
    if floor is None or room <= 1e-12:
        return None
    if room < floor:
        return (f"the oracle's headroom over the frontier ({room:+.4f} of curve area) is under "
                f"{floor:.4f} (half the width of the bootstrap interval of PaSeR's margin "
                f"over the frontier, or {MIN_HEADROOM} without one), so a share of it is "
                "mostly noise and can run to hundreds of percent")
    if any(s is not None and s > 1 for s in shares):
        return (f"a router's curve lies above the oracle's ({room:+.4f} of curve area over "
                "the frontier), so its share runs past 100 %: the oracle maximises per-patch "
                "reward, not the dataset's mIoU, and its headroom is no ceiling here")
    return None


def verdict(point: Point, frontier: dict, oracle_curve: dict | None = None,
            fixed_gflops: float | None = None, curve: dict | None = None,
            lo: float | None = None, hi: float | None = None,
            f0: Point | None = None) -> str:
    """The one line a user decides from: what routing saves against the single models at
    equal IoU (their frontier: each image segmented whole by one of them, in the cheapest
    mix that reaches the IoU), or why it does not pay on this data.

    ``point`` is PaSeR's ``(GFLOP, IoU)``; ``frontier`` a :func:`frontier_curve`;
    ``oracle_curve`` (the oracle's routing of the same pool, the labels known) and ``fixed_gflops`` (what every
    routed image pays before any patch is routed) say which part holds a miss back.
    ``curve`` (PaSeR's whole curve, every operating point calibration reaches) with the
    budget range ``lo``, ``hi``: the line reads it too, so an operating point that misses
    (a degenerate target) is not taken for routing that does not pay. ``f0``: f0's own
    ``(GFLOP, IoU)``, read before the curve (:func:`from_point`), as the report's table of
    the routers reads it: below the fixed cost a user runs f0 alone.
    """
    g, iou = point
    vertices = list(zip(frontier["gflops"], frontier["iou"], strict=True))
    names = frontier["models"]
    at = frontier_at(vertices, g)
    top_g, top_iou = vertices[-1]
    need = frontier_cost(vertices, iou)
    along = ""
    pays_along = False
    saving = None
    if curve is not None and lo is not None and hi is not None:
        curve = curve if f0 is None else from_point(curve, f0)
        share = share_above(curve, frontier, lo, hi)
        margin = areas({"c": curve, "f": frontier}, lo, hi)
        margin = margin["c"] - margin["f"]
        saving = curve_saving(curve, frontier)
        pays_along = margin > 0 and share >= 0.5
        along = (f"; along its curve it is at or above the frontier on {100 * share:.0f} % of "
                 f"budgets (curve area {margin:+.4f})")
    if need is None:
        return (f"routing pays: IoU {iou:.4f} at {g:.3f} GFLOP is above every single model "
                f"(the best, {names[-1]}, scores {top_iou:.4f} at {top_g:.3f} GFLOP: "
                f"{100 * g / top_g:.0f} % of its GFLOP for {iou - top_iou:+.4f} IoU){along}")
    if need > g * (1 + 1e-6):
        return (f"routing saves {100 * (1 - g / need):.1f} % of GFLOP against the single "
                f"models at equal IoU: {iou:.4f} at {g:.3f} GFLOP, where the single models need "
                f"{need:.3f} ({frontier_mix(vertices, names, need)}){along}")
    below = max((at or 0.0) - iou, 0.0)
    if pays_along and saving is not None:
        s, (sg, si), sneed = saving
        return (f"routing pays on this data, but not at this operating point{along}, and "
                f"saves up to {100 * s:.1f} % of GFLOP at equal IoU ({si:.4f} at {sg:.3f} "
                f"GFLOP, where the single models need {sneed:.3f}); the operating point, IoU "
                f"{iou:.4f} at {g:.3f} GFLOP, is {below:.4f} below the single models at that "
                f"cost: calibrate to another target (paser calibrate --budget-gflops or "
                f"--iou-within-top)")
    why = []
    if oracle_curve is not None:
        best = best_within(oracle_curve, g)
        if best is not None and at is not None and best < at:
            why.append(f"even the oracle's routing of this pool (the labels known) stays "
                       f"{at - best:.4f} under it at "
                       "that cost, so the pool's spread or the fixed cost is what holds it back")
        elif best is not None and best - iou >= 5e-5:
            why.append(f"the oracle's routing of this pool (the labels known) would give "
                       f"{best:.4f} there: the policy's "
                       f"regret ({best - iou:.4f}) is what holds it back")
        elif best is not None:
            why.append(f"the oracle's routing of this pool gives no more there ({best:.4f}): "
                       "the pool has little better to offer at that cost")
    if fixed_gflops is not None and g > 0:
        why.append(f"the fixed cost (f0 and the policy, {fixed_gflops:.3f} GFLOP) is "
                   f"{100 * fixed_gflops / g:.0f} % of its GFLOP")
    where = "" if at is None else f" ({frontier_mix(vertices, names, g)}: {at:.4f})"
    return (f"routing does not pay on this data: IoU {iou:.4f} at {g:.3f} GFLOP is {below:.4f} "
            f"below what the single models give for that cost{where}, which reach it with "
            f"{need:.3f} GFLOP" + ("; " + "; ".join(why) if why else "") + along)


def nz(x: float, digits: int) -> float:
    """``x`` rounded to ``digits`` for printing, without a negative zero (-0.0 % read as a
    loss where there is none)."""
    return round(float(x), digits) + 0.0


def versus_cascade(area_margin: float, captured: float | None, cascade_captured: float | None,
                   flops_saved_pct: float, equal_iou: bool = True,
                   caveat: str | None = None, chosen_margin: float | None = None) -> str:
    """The verdict's second line: the trained router against the training-free entropy
    cascade, the simplest alternative a user has. ``area_margin`` is PaSeR's curve area minus
    the cascade's (the same budgets as the frontier's), ``captured`` and ``cascade_captured``
    their shares of the oracle's headroom (:func:`headroom_captured`, ``None`` without
    headroom), ``flops_saved_pct`` Table 2's: PaSeR's GFLOP saved against the cascade
    matched to its IoU (negative: the cascade is cheaper there), ``equal_iou`` whether the
    matched cascade reaches PaSeR's IoU (else it is the closest it comes, Table 2 says),
    ``caveat`` why the shares are not to be read (:func:`headroom_caveat`),
    ``chosen_margin`` the same area margin with each method's settings chosen on
    validation (:func:`paser.experiments.curves.chosen_on_validation`)."""
    shares = ("" if captured is None or cascade_captured is None else
              f"; of the oracle's headroom PaSeR captures {100 * captured:.0f} %, the cascade "
              f"{100 * cascade_captured:.0f} %" + (f" ({caveat})" if caveat else ""))
    head = ("the trained router is above the training-free entropy cascade (IDK-Cascade): "
            f"PaSeR's curve area {nz(area_margin, 4):+.4f} against the cascade's"
            if nz(area_margin, 4) > 0 else
            "the training-free entropy cascade (IDK-Cascade), which needs no policy, does as "
            f"well on this data or better: PaSeR's curve area {nz(area_margin, 4):+.4f} against it")
    where = ("at PaSeR's IoU" if equal_iou else
             "where the cascade comes closest to PaSeR's IoU (it never reaches it)")
    # Table 2's figure is PaSeR's saving, 1 - P / C; the cascade's is 1 - C / P
    point = (f"{where}, PaSeR and the cascade use the same GFLOP (within 0.1 %)"
             if nz(flops_saved_pct, 1) == 0 else
             f"{where}, PaSeR uses {flops_saved_pct:.1f} % fewer GFLOP than the cascade"
             if flops_saved_pct > 0 else
             f"{where}, the cascade uses {100 * (1 - 1 / (1 - flops_saved_pct / 100)):.1f} % "
             "fewer GFLOP than PaSeR")
    chosen = ("" if chosen_margin is None else
              f"; with each budget's setting chosen on validation, as a user must choose it "
              f"(the curves read the best on test), PaSeR's area is {nz(chosen_margin, 4):+.4f} "
              "against the cascade's")
    return f"{head}{shares}{chosen}; {point} (Table 2)"


def wall_clock(point: Point, singles: dict[str, Point]) -> dict:
    """PaSeR's measured milliseconds per image against the single models' at equal IoU.

    ``point`` is PaSeR's ``(ms, IoU)``, ``singles`` each single model's ``(ms, IoU)`` as
    measured beside it: the frontier is the same hull as for GFLOP (one model, or whole
    images split between two), in milliseconds. ``met`` when PaSeR takes at most what the
    frontier needs for its IoU (``None`` when no single model or mix of two reaches it:
    then every routed millisecond buys IoU no single model gives).
    """
    ms, iou = point
    need = frontier_cost(hull(singles.values()), iou)
    return {"paser_ms": ms, "paser_iou": iou, "frontier_ms_at_equal_iou": need,
            "ratio": None if need is None else ms / need,
            "met": True if need is None else ms <= need * (1 + 1e-9)}


def wall_clock_in_turns(ms: dict[str, list[float]], ious: dict[str, float]) -> dict:
    """:func:`wall_clock` on milliseconds timed in turns
    (:func:`paser.evaluation.time_in_turns`): ``ms`` holds PaSeR's and each single model's
    ms per image, one per round, ``ious`` their IoU. The figures are of the medians over
    rounds; beside them ``rounds``, ``ms_per_image`` (each method's median) and
    ``ratio_range``, the least and the most ratio of a single round (None where no single
    model reaches PaSeR's IoU)."""
    med = {name: float(np.median(v)) for name, v in ms.items()}
    singles = [name for name in ms if name != "PaSeR"]
    out = wall_clock((med["PaSeR"], ious["PaSeR"]), {n: (med[n], ious[n]) for n in singles})
    count = len(ms["PaSeR"])
    ratios = [wall_clock((ms["PaSeR"][r], ious["PaSeR"]),
                         {n: (ms[n][r], ious[n]) for n in singles})["ratio"]
              for r in range(count)]
    return {**out, "rounds": count, "ms_per_image": med,
            "ratio_range": None if None in ratios else [min(ratios), max(ratios)]}


def _resampled_miou(weights: np.ndarray, counts: dict) -> np.ndarray:
    """Dataset-level mIoU ``[B]`` of a method on ``B`` resamples of its images, each
    resample the images' multiplicities ``weights`` ``[B, N]``."""
    inter = weights @ np.asarray(counts["intersection"], dtype=np.float64)
    union = weights @ np.asarray(counts["union"], dtype=np.float64)
    present = union > 0
    ratio = np.where(present, inter / np.maximum(union, 1), 0.0)
    return ratio.sum(1) / np.maximum(present.sum(1), 1)


def bootstrap(point: dict, singles: dict[str, dict], matched: dict | None = None,
              draws: int = 1000, level: float = 0.95, seed: int = 0,
              groups: np.ndarray | None = None) -> dict:
    """How much of the verdict is the draw of the test images: the same figures on
    ``draws`` resamples of the images (with replacement), as intervals at ``level``.

    Each argument holds a method's per-image counts (:func:`paser.evaluation.measure` with
    ``per_image``): ``point`` PaSeR's, ``singles`` f0's and each pool model's alone,
    ``matched`` the IoU-matched cascade's. Every method is read on the same resample, so the
    intervals are of differences. Returns ``images``, ``draws``, ``level`` and intervals
    ``{"value", "low", "high"}`` of ``margin`` (PaSeR's IoU minus the frontier's at its
    GFLOP, the verdict's sign: positive where routing saves GFLOP at equal IoU) and, with
    ``matched``, ``table2`` (Table 2's GFLOP saved against the cascade, in %) and
    ``cascade_iou_difference``. ``share_above``: the share of resamples with a positive
    margin. The cascade's thresholds stay those chosen on the whole split.

    ``groups`` ``[N]``: the image each item was cut from, where the items are tiles
    (:func:`paser.data.tiles.source_images`): the images are resampled, each with all its
    tiles, since tiles of one image do not vary apart; ``images`` is then their count and
    ``tiles`` the items'.
    """
    n = len(point["gflops"])
    if n == 0 or any(len(c["gflops"]) != n for c in singles.values()):
        raise ValueError("bootstrap: every method needs the same images' counts")
    rng = np.random.default_rng(seed)
    groups = np.arange(n) if groups is None else np.asarray(groups)
    if groups.shape != (n,):
        raise ValueError(f"bootstrap: {groups.shape} groups for {n} items")
    _, groups = np.unique(groups, return_inverse=True)
    count = int(groups.max()) + 1
    draws = draws if count > 1 else 0  # one image: every resample is the split itself
    weights = np.vstack([np.ones(count),
                         rng.multinomial(count, np.full(count, 1 / count), size=draws)])
    # each item as often as its image; C order, as the weights were: the same BLAS path, so
    # runs on whole images read the same figures as before to the last bit
    weights = np.ascontiguousarray(weights[:, groups])

    def mean_gflops(c: dict) -> np.ndarray:
        return weights @ np.asarray(c["gflops"], dtype=np.float64) / weights.sum(1)

    pg, pi = mean_gflops(point), _resampled_miou(weights, point)
    models = [(mean_gflops(c), _resampled_miou(weights, c)) for c in singles.values()]
    margin = np.full(len(weights), np.nan)
    for b in range(len(weights)):  # a hull of a handful of points per resample
        at = frontier_at(hull([(g[b], i[b]) for g, i in models]), pg[b])
        if at is not None:
            margin[b] = pi[b] - at
    tail = 100 * (1 - level) / 2

    def interval(values: np.ndarray) -> dict:
        rest = values[1:][np.isfinite(values[1:])]
        low, high = (np.percentile(rest, [tail, 100 - tail]) if rest.size else (np.nan,) * 2)
        return {"value": float(values[0]), "low": float(low), "high": float(high)}

    out = {"images": count, **({"tiles": n} if count < n else {}), "draws": draws,
           "level": level, "margin": interval(margin),
           "share_above": float(np.mean(margin[1:] > 0)) if draws else float("nan")}
    if matched is not None:
        cg, ci = mean_gflops(matched), _resampled_miou(weights, matched)
        out["table2"] = interval(100 * (1 - pg / cg))
        out["cascade_iou_difference"] = interval(pi - ci)
    return out


def noise_line(noise: dict) -> str:
    """The report's line under the verdict: how far the test split's draw moves it."""
    m = noise["margin"]
    if not noise["draws"]:
        tiles = f" ({noise['tiles']} tiles)" if "tiles" in noise else ""
        return (f"the test split is one image{tiles}: too few to resample, so there is no "
                f"interval; PaSeR's IoU minus the single-model frontier's at its GFLOP is "
                f"{nz(m['value'], 4):+.4f} on it, one draw; give the test split more images")
    pct = f"{100 * noise['level']:.0f} %"
    within = m["low"] <= 0 <= m["high"]
    what = (f"{noise['images']} test images its {noise['tiles']} test tiles were cut from, "
            "each image with all its tiles" if "tiles" in noise
            else f"{noise['images']} test images")
    line = (f"over {noise['draws']:,} bootstrap resamples of the {what} "
            f"({pct} intervals), PaSeR's IoU minus the single-model frontier's at its "
            f"GFLOP is {nz(m['value'], 4):+.4f} ({nz(m['low'], 4):+.4f} to "
            f"{nz(m['high'], 4):+.4f}; positive in "
            f"{100 * noise['share_above']:.0f} % of resamples)"
            + (": the verdict's sign is within the noise of this test split" if within else ""))
    if "table2" in noise:
        t = noise["table2"]
        line += (f"; Table 2's GFLOP saved against the IoU-matched cascade "
                 f"{nz(t['value'], 1):.1f} % ({nz(t['low'], 1):.1f} to {nz(t['high'], 1):.1f} "
                 "%, the cascade's thresholds fixed)"
                 # the same test as the verdict's: an interval holding 0 leaves the sign open
                 + (": which of PaSeR and the cascade is cheaper at that IoU is within the "
                    "noise of this test split" if t["low"] <= 0 <= t["high"] else ""))
    return line


__all__ = ["MIN_HEADROOM", "areas", "best_within", "bootstrap", "budgets", "curve_saving",
           "curve_values", "frontier_at", "frontier_cost", "frontier_curve", "frontier_mix",
           "headroom_captured", "headroom_caveat", "headroom_floor", "hull", "noise_line", "nz",
           "share_above", "verdict", "versus_cascade", "wall_clock", "wall_clock_in_turns"]
