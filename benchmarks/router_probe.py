"""What a router could reach on a finished run, measured offline on its test split (issue 33):

1. **A dense target.** Every pixel's first-order effect on the split's mIoU when pool model
   k replaces f0 there (:func:`pixel_gain`; summed over a patch it is exactly
   :meth:`paser.outcomes.PatchOutcomes.dataset_gain`). A small convolutional network on
   f0's probabilities and entropy (and optionally the image) learns it on D_rl and D_ft,
   pixel by pixel: 2.6 million targets instead of 640 patch gains. Its prediction, summed
   over a patch, routes the patch.
2. **Finer and coarser decisions.** The oracle, the dense router and a one-feature entropy
   rule, each routing blocks of 16, 32, 64 and 128 pixels: each model's per-pixel
   predictions are the run's (made on its own patches with their halo), a block's cost is
   the run's patch cost scaled by its area with the halo, ``((b + 2 halo) / (p + 2
   halo))^2``. Finer blocks there keep the context of the run's patches, which real
   patches of that size would not have: an upper bound for finer grids.
3. **A look at f1 before f2.** A learned two-step cascade: a router on f0's output sends
   each patch to f0, f1 or f2 (:func:`patch_features`, a small MLP fit to the patch gains);
   on the patches sent to f1, a second one that also sees f1's output (its entropy, where
   it changes f0's answer) moves those where f2 should beat f1 on to f2, which then costs
   f1 and f2 (:func:`cascade_actions`). Beside it, the same first router alone (one step)
   and the cascade with a perfect second step (the true gain of f2 over f1): how much
   seeing f1 could add, and how much it does.
4. **More images of the same kind.** The shipped router (the run's own stage-2 config),
   retrained on a random quarter, half, three quarters and all of D_rl and D_ft's images,
   several draws of the images and of the initial weights at each share: whether the
   captured share still rises with the number of training images (so that more labelled
   images, or cross-fitted outcomes on D_pre's, would pay) or has levelled off.
5. **Settings chosen on validation.** The report reads each routed method's curve at a
   budget as the best test mIoU of any of its settings within it: the cascade's 43 x 43
   thresholds, PaSeR's price sweep. A user cannot choose by the test labels: at each
   budget, of the settings whose test GFLOP fit, the one of best validation mIoU, at its
   test mIoU (:func:`paser.experiments.curves.chosen_on_validation`; f0 alone a candidate
   of both). PaSeR (also with a second knob, an offset on fK's score) and the cascade,
   read both ways, and Table 2 with both calibrated by the run's own rule on validation.

Curve areas are the report's (its budgets, its single-model frontier); "captured" is the
share of the oracle's margin over the frontier (:func:`paser.frontier.headroom_captured`).

    .venv/bin/python benchmarks/router_probe.py runs/demo --seeds 0 1 2 [--parts cascade images]

Writes ``benchmarks/results/router_probe.json`` (or ``--results``; one entry per run directory; ``--parts``
replaces only those parts of an entry, each as it finishes).
"""

from __future__ import annotations

import argparse
import json
import os
import time
from collections.abc import Callable
from functools import partial
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from paser.api import PaSeR
from paser.baselines.routed import cascade_actions as cascade_actions_on
from paser.baselines.routed import cascade_gflops, threshold_grid
from paser.calibration import price_sweep, sweep_actions
from paser.checkpoints import make_policy
from paser.experiments.curves import (
    chosen_on_validation,
    curve,
    escalation,
    logits_on,
    policy_curve,
    rank_correlation,
)
from paser.experiments.finished import open_finished
from paser.frontier import areas, budgets, from_point, headroom_captured
from paser.metrics import confusion_counts
from paser.outcomes import PatchOutcomes
from paser.patches import PatchGrid
from paser.routing import Router
from paser.runtime import atomic_write_text
from paser.train.policy import fit_policy, training_outcomes
from paser.uncertainty import entropy

RESULTS = Path(__file__).parent / "results" / "router_probe.json"
SPLITS = ("rl", "ft", "validation", "test")


@torch.inference_mode()
def dense_outcomes(router, split, batch: int = 16) -> dict[str, torch.Tensor]:
    """The padded images, f0's probabilities, the labels (-1 unlabelled), every model's
    predicted classes ``[N, K+1, H, W]`` and the pool's probabilities ``[N, K, C, H, W]``
    (stitched from its patches)."""
    grid = router.grid
    out: dict[str, list] = {"image": [], "probs": [], "label": [], "pred": [], "pool": []}
    for images, masks in split.batches(batch):
        x = grid.pad(images)
        mc = router.observe(x, 0)
        pool = torch.stack([grid.merge(router.run_local(k, grid.context(x)))
                            for k in range(1, router.num_models)], 1)
        out["image"].append(x)
        out["probs"].append(mc.probs)
        out["label"].append(grid.pad(masks, mode="constant", value=-1))
        out["pred"].append(torch.cat([mc.probs.argmax(1)[:, None], pool.argmax(2)], 1))
        out["pool"].append(pool)
    return {k: torch.cat(v) for k, v in out.items()}


def pixel_gain(label: torch.Tensor, pred: torch.Tensor, num_classes: int) -> torch.Tensor:
    """``[N, K, H, W]``: each pixel's first-order effect on the split's mIoU when model k
    (1..K) replaces f0 there, ``sum_c dI_c / U_c - I_c dU_c / U_c^2`` with ``I``, ``U`` the
    split's totals with every pixel on f0 (unscaled: a patch's sum times ``N P / classes
    present`` is its :meth:`~paser.outcomes.PatchOutcomes.dataset_gain`)."""
    labelled = (label >= 0)[:, None]

    def onehot(z: torch.Tensor) -> torch.Tensor:
        return F.one_hot(z.clamp_min(0), num_classes).permute(0, 3, 1, 2).double() * labelled

    truth, base = onehot(label), onehot(pred[:, 0])
    inter, union = (truth * base).sum((0, 2, 3)), ((truth + base) > 0).double().sum((0, 2, 3))
    present = union > 0
    w_i = torch.where(present, 1 / union.clamp_min(1), 0.0)[None, :, None, None]
    w_u = torch.where(present, -inter / union.clamp_min(1).square(), 0.0)[None, :, None, None]
    gains = []
    for k in range(1, pred.shape[1]):
        other = onehot(pred[:, k])
        d_i = truth * other - truth * base
        d_u = ((truth + other) > 0).double() - ((truth + base) > 0).double()
        gains.append((d_i * w_i + d_u * w_u).sum(1))
    return torch.stack(gains, 1).float()


def features(d: dict, image: bool) -> torch.Tensor:
    """The dense router's input: f0's probabilities and entropy, and the image if asked."""
    parts = [d["probs"], entropy(d["probs"])[:, None]]
    return torch.cat(parts + ([d["image"]] if image else []), 1)


class DenseRouter(nn.Module):
    """Three 3 x 3 convolutions of ``width`` channels at half resolution, then one gain per
    pool model and pixel (of the half-resolution map)."""

    def __init__(self, in_channels: int, num_pool: int, width: int = 16):
        super().__init__()
        self.net = nn.Sequential(
            nn.Conv2d(in_channels, width, 3, padding=1), nn.ReLU(),
            nn.Conv2d(width, width, 3, padding=1), nn.ReLU(),
            nn.Conv2d(width, width, 3, padding=1), nn.ReLU(),
            nn.Conv2d(width, num_pool, 1))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(F.avg_pool2d(x, 2))


def block_sums(maps: torch.Tensor, side: int) -> torch.Tensor:
    """``[N, P, ...]`` sums of ``[N, ..., H, W]`` over square blocks of ``side`` pixels
    (row-major, the patch order)."""
    n, lead = maps.shape[0], maps.shape[1:-2]
    h, w = maps.shape[-2:]
    grid = PatchGrid(h // side, w // side)
    flat = maps.reshape(n, -1, h, w)
    sums = grid.split(flat).sum((-2, -1))  # [N * P, prod(lead)]
    return sums.view(n, grid.num_patches, *lead)


def train_dense(data: dict, num_classes: int, seed: int, image: bool, patch: int,
                epochs: int = 60) -> tuple[DenseRouter, torch.Tensor, torch.Tensor]:
    """A :class:`DenseRouter` fit to the pixel gains of D_rl and D_ft, the epoch of least
    error on validation over the run's patches (``patch`` pixels a side) kept; with its
    input's mean and deviation."""
    torch.manual_seed(seed)
    x = torch.cat([features(data[s], image) for s in ("rl", "ft")])
    g = torch.cat([pixel_gain(data[s]["label"], data[s]["pred"], num_classes)
                   for s in ("rl", "ft")])
    scale = g.abs().mean()
    target = F.avg_pool2d(g / scale, 2)
    mu, sd = x.mean((0, 2, 3), keepdim=True), x.std((0, 2, 3), keepdim=True) + 1e-6
    xv = (features(data["validation"], image) - mu) / sd
    dv = data["validation"]
    gv = F.avg_pool2d(pixel_gain(dv["label"], dv["pred"], num_classes) / scale, 2)
    net = DenseRouter(x.shape[1], g.shape[1])
    opt = torch.optim.AdamW(net.parameters(), lr=3e-3, weight_decay=1e-4)
    best, best_state = float("inf"), None
    side = patch // 2  # one patch of the half-resolution map
    for _ in range(epochs):
        net.train()
        order = torch.randperm(len(x))
        for i in range(0, len(x), 16):
            idx = order[i:i + 16]
            loss = F.mse_loss(net((x[idx] - mu) / sd), target[idx])
            opt.zero_grad()
            loss.backward()
            opt.step()
        net.eval()
        with torch.no_grad():
            err = F.mse_loss(block_sums(net(xv), side), block_sums(gv, side)).item()
        if err < best:
            best, best_state = err, {k: v.clone() for k, v in net.state_dict().items()}
    net.load_state_dict(best_state)
    return net.eval(), mu, sd


def check_blocks(blocks: list[int], height: int, width: int) -> None:
    """Refuse block sizes that do not tile the run's padded images: ``PatchGrid(h // side,
    w // side)`` would cut them into other blocks than the row says (48 on 128 pixels:
    blocks of 64), and a block past the image into none."""
    bad = [b for b in blocks if b < 1 or height % b or width % b]
    if bad:
        raise SystemExit(f"--blocks {' '.join(map(str, bad))}: each block must divide the "
                         f"run's padded images, {height} x {width} pixels")


def block_outcomes(d: dict, side: int, num_classes: int, state: torch.Tensor) -> PatchOutcomes:
    """Outcomes of every model on blocks of ``side`` pixels, from per-pixel predictions."""
    n, models = d["pred"].shape[:2]
    h, w = d["label"].shape[-2:]
    grid = PatchGrid(h // side, w // side)
    labels = grid.split(d["label"])
    counts = [confusion_counts(grid.split(d["pred"][:, k]), labels, num_classes,
                               ignore_index=-1) for k in range(models)]
    inter, union = [c[0] for c in counts], [c[1] for c in counts]
    shape = (n, grid.num_patches, models, num_classes)
    zeros = torch.zeros(shape[:3])
    return PatchOutcomes(state, torch.stack(inter, 1).view(shape),
                         torch.stack(union, 1).view(shape), zeros, zeros)


def routed_curve(out: PatchOutcomes, scores: torch.Tensor, patch_cost: torch.Tensor,
                 fixed: float) -> dict:
    """The IoU-vs-GFLOP curve of routing by ``scores`` [N, P, K+1] priced per GFLOP."""
    rel = patch_cost / patch_cost.max()
    scores = scores.double()
    acts = sweep_actions(scores, rel, price_sweep(scores, rel))
    return curve(out.miou_many(acts), fixed + patch_cost[acts].sum(-1).mean(-1))


def with_f0(gains: torch.Tensor) -> torch.Tensor:
    return torch.cat([torch.zeros_like(gains[..., :1]), gains], -1)


def patch_features(d: dict, patch: int, second: bool) -> torch.Tensor:
    """Per patch ``[N * P, F]``: f0's entropy (mean, max, std), mean top probability and
    share of each predicted class, the image's mean and std; with ``second`` also f1's
    entropy and top probability, the share of pixels where f1 changes f0's answer, the mean
    L1 distance of their probabilities and the change of each class's share."""
    h, w = d["label"].shape[-2:]
    grid = PatchGrid(h // patch, w // patch)
    ncls = d["probs"].shape[1]

    def stats(probs: torch.Tensor) -> tuple[list[torch.Tensor], torch.Tensor]:
        p = grid.split(probs)  # [N * P, C, h, w]
        e = entropy(p)
        share = F.one_hot(p.argmax(1), ncls).float().mean((1, 2))
        return [e.mean((1, 2)), e.amax((1, 2)), e.std((1, 2)), p.amax(1).mean((1, 2))], share

    first, share0 = stats(d["probs"])
    image = grid.split(d["image"])
    cols = first + [image.mean((1, 2, 3)), image.std((1, 2, 3)), *share0.T]
    if second:
        more, share1 = stats(d["pool"][:, 0])
        p0, p1 = grid.split(d["probs"]), grid.split(d["pool"][:, 0])
        cols += more + [(p0.argmax(1) != p1.argmax(1)).float().mean((1, 2)),
                        (p1 - p0).abs().sum(1).mean((1, 2)), *(share1 - share0).T]
    return torch.stack(cols, 1)


def fit_mlp(x: torch.Tensor, y: torch.Tensor, xv: torch.Tensor, yv: torch.Tensor, seed: int,
            epochs: int = 300) -> Callable[[torch.Tensor], torch.Tensor]:
    """A two-layer MLP (32 wide) from standardised ``x`` to ``y`` [n, k] (squared error),
    the epoch of least error on ``(xv, yv)`` kept; returns the predictor of ``y``."""
    torch.manual_seed(seed)
    mu, sd, scale = x.mean(0), x.std(0) + 1e-6, y.abs().mean()
    net = nn.Sequential(nn.Linear(x.shape[1], 32), nn.ReLU(), nn.Linear(32, 32), nn.ReLU(),
                        nn.Linear(32, y.shape[1]))
    opt = torch.optim.AdamW(net.parameters(), lr=3e-3, weight_decay=1e-3)
    best, best_state = float("inf"), None
    for _ in range(epochs):
        net.train()
        order = torch.randperm(len(x))
        for i in range(0, len(x), 64):
            idx = order[i:i + 64]
            loss = F.mse_loss(net((x[idx] - mu) / sd), y[idx] / scale)
            opt.zero_grad()
            loss.backward()
            opt.step()
        net.eval()
        with torch.no_grad():
            err = F.mse_loss(net((xv - mu) / sd), yv / scale).item()
        if err < best:
            best, best_state = err, {k: v.clone() for k, v in net.state_dict().items()}
    net.load_state_dict(best_state)
    net.eval()
    return lambda z: net((z - mu) / sd).detach() * scale


def cascade_actions(gains: torch.Tensor, upgrade: torch.Tensor, rel: torch.Tensor,
                    ts: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """A two-step cascade over a pool f0, f1, f2 at each price of ``ts`` [S]: predicted
    gains ``[..., 2]`` of f1 and f2 over f0 choose f0, f1 or f2 (``argmax(gain - t rel)``);
    a patch on f1 moves on to f2 where ``upgrade`` [...] (f2's predicted gain over f1, f1's
    output seen) beats ``t * rel[2]``, and then pays both. Returns the actions ``[S, ...]``
    and their relative costs ``[S, ...]``."""
    t = ts.view(-1, *([1] * gains[..., 0].dim())).double()
    first = (with_f0(gains.double())[None] - t[..., None] * rel.double()).argmax(-1)
    up = (first == 1) & (upgrade.double()[None] > t * rel[2])
    cost = rel.double()[first] + up * rel[2].double()
    return torch.where(up, 2, first), cost


def probe(run_dir: Path, seeds: list[int], blocks: list[int], parts: list[str],
          save: Callable[[dict], None] = lambda out: None) -> dict:
    """The entry of ``run_dir``: the report's figures and each part of ``parts``, handed to
    ``save`` as each part finishes (a later part that fails, or Ctrl-C, keeps the earlier)."""
    run = open_finished(run_dir, show_progress=False)
    router = PaSeR.load(run_dir, device="cpu").router.eval()
    ncls = run.cfg.models.num_classes
    # before any part runs: a wrong flag found later would lose the others' work
    if "cascade" in parts and router.num_models != 3:
        raise SystemExit("the cascade probe needs a pool of two models (f1, f2); "
                         f"{run_dir} has {router.num_models - 1}: leave cascade out of --parts")
    if {"dense", "cascade"} & set(parts):
        h, w = router.grid.pad(next(run.data.test.batches(1))[0]).shape[-2:]
        side = (h // router.grid.rows, w // router.grid.cols)
        if side[0] != side[1]:  # they sum maps over square blocks
            raise SystemExit(f"the dense and cascade parts need square patches; {run_dir}'s "
                             f"are {side[0]} x {side[1]} pixels: --parts images protocol")
        if "dense" in parts:
            check_blocks(blocks, h, w)
    results = json.loads((run_dir / "results.json").read_text())
    lo, hi = results["curve_range"]
    frontier = results["curves"]["Frontier"]
    test_out = PatchOutcomes.build(router, run.data.test, ncls, 16, torch.device("cpu"),
                                   mc_seed=0)
    costs = router.costs(*test_out.state.shape[-2:])

    def area_and_capture(c: dict, oracle: dict) -> tuple[float, float]:
        # below a router's fixed cost a user runs f0 alone (the frontier's first vertex),
        # as in the report: a router with a costlier policy starts from there too
        c = from_point(c, (frontier["gflops"][0], frontier["iou"][0]))
        a = areas({"Frontier": frontier, "c": c, "oracle": oracle}, lo, hi)
        return a["c"] - a["Frontier"], headroom_captured(a["c"], a["Frontier"], a["oracle"])

    out: dict = {"run_dir": str(run_dir), "report": {
        k: results["headroom_captured"].get(k) for k in ("PaSeR", "IDK-Cascade")}}
    out["report"]["rank_PaSeR"] = results["rank_correlation"]["PaSeR"]
    capture = partial(area_and_capture, oracle=results["curves"]["Oracle"])
    if "images" in parts:
        out["images"] = images_probe(run, router, test_out, capture)
        save(out)
    if "protocol" in parts:
        out["protocol"] = protocol_probe(run, router, test_out, capture, results)
        save(out)
    if not {"dense", "cascade"} & set(parts):
        return out
    data = {s: dense_outcomes(router, getattr(run.data, s)) for s in SPLITS}
    test = data["test"]
    patch = test["label"].shape[-1] // router.grid.cols
    halo = router.grid.halo
    # the pixel gains add up to the report's patch gains
    per_patch = block_sums(pixel_gain(test["label"], test["pred"], ncls), patch)
    present = (test_out.union[:, :, 0].sum((0, 1)) > 0).sum()
    scale = test_out.inter.shape[0] * test_out.inter.shape[1] / present
    assert torch.allclose(per_patch * scale, test_out.dataset_gain()[..., 1:], atol=1e-4)
    if "cascade" in parts:
        out["cascade"] = cascade_probe(data, test_out, patch, ncls, costs, seeds, capture)
        save(out)
    if "dense" not in parts:
        return out
    dense_rows, dense_maps = [], []
    for seed in seeds:
        for image in (False, True):
            start = time.perf_counter()
            net, mu, sd = train_dense(data, ncls, seed, image, patch)
            with torch.no_grad():
                maps = F.interpolate(net((features(test, image) - mu) / sd),
                                     scale_factor=2, mode="nearest") / 4
            scores = with_f0(block_sums(maps, patch))
            c = routed_curve(test_out, scores, torch.tensor(costs.patch, dtype=torch.float64),
                             costs.fixed)
            margin, captured = area_and_capture(c, results["curves"]["Oracle"])
            row = {"seed": seed, "input": "probs+entropy" + ("+image" if image else ""),
                   "margin": margin, "captured": captured,
                   "rank": rank_correlation(escalation(scores), test_out),
                   "seconds": time.perf_counter() - start}
            dense_rows.append(row)
            print(json.dumps(row), flush=True)
            if not image:
                dense_maps.append(maps)
    out["dense"] = dense_rows
    save(out)

    maps = torch.stack(dense_maps).mean(0)  # the seeds' dense routers, averaged
    ent = entropy(test["probs"])
    train_ent = torch.cat([entropy(data[s]["probs"]) for s in ("rl", "ft")])
    train_gain = torch.cat([pixel_gain(data[s]["label"], data[s]["pred"], ncls)
                            for s in ("rl", "ft")])
    # one feature: each pool model's gain as a multiple of f0's entropy, fit on D_rl + D_ft
    slope = (train_gain * train_ent[:, None]).sum((0, 2, 3)) / train_ent.square().sum()
    rows = []
    for side in blocks:
        blk = block_outcomes(test, side, ncls, test_out.state)
        cost = torch.tensor(costs.patch, dtype=torch.float64) * (
            (side + 2 * halo) / (patch + 2 * halo)) ** 2
        oracle = routed_curve(blk, blk.dataset_gain(), cost, costs.fixed)
        row = {"block": side, "per_image": blk.inter.shape[1]}
        for name, scores in (("dense router", with_f0(block_sums(maps, side))),
                             ("entropy rule", with_f0(block_sums(ent[:, None] * slope[None, :, None, None], side)))):
            row[name] = dict(zip(("margin", "captured"),
                                 area_and_capture(routed_curve(blk, scores, cost, costs.fixed),
                                                  oracle), strict=True))
        a = areas({"Frontier": frontier, "oracle": oracle}, lo, hi)
        row["oracle margin"] = a["oracle"] - a["Frontier"]
        rows.append(row)
        print(json.dumps(row), flush=True)
    out["blocks"] = rows
    return out


def cascade_probe(data: dict, test_out: PatchOutcomes, patch: int, num_classes: int, costs,
                  seeds: list[int], capture) -> list[dict]:
    """Part 3 of the module's docstring: one step, a learned two-step cascade, and the
    cascade with a perfect second step, for each seed of the MLPs."""
    from scipy.stats import spearmanr

    feats = {s: (patch_features(data[s], patch, False), patch_features(data[s], patch, True))
             for s in SPLITS}
    gains = {s: block_outcomes(data[s], patch, num_classes, torch.zeros(0)).dataset_gain()
             [..., 1:].flatten(0, 1).float() for s in SPLITS}

    x1 = torch.cat([feats[s][0] for s in ("rl", "ft")])
    x2 = torch.cat([torch.cat(feats[s], 1) for s in ("rl", "ft")])
    g = torch.cat([gains[s] for s in ("rl", "ft")])
    v1, v2, gv = feats["validation"][0], torch.cat(feats["validation"], 1), gains["validation"]
    t1, t2, gt = feats["test"][0], torch.cat(feats["test"], 1), gains["test"]
    cost = torch.tensor(costs.patch, dtype=torch.float64)
    rel = cost / cost.max()
    n, p = test_out.inter.shape[:2]
    true_up = gt[:, 1] - gt[:, 0]

    def routed(pred: torch.Tensor, upgrade: torch.Tensor | None) -> dict:
        scores = with_f0(pred.view(n, p, 2)).double()
        if upgrade is None:
            return routed_curve(test_out, scores, cost, costs.fixed)
        acts, rel_cost = cascade_actions(pred.view(n, p, 2), upgrade.view(n, p), rel,
                                         price_sweep(scores, rel))
        return curve(test_out.miou_many(acts), costs.fixed + rel_cost.sum(-1).mean(-1) * cost.max())

    rows = []
    for seed in seeds:
        pred = fit_mlp(x1, g, v1, gv, seed)(t1)  # f1's and f2's gains over f0, from f0
        up = fit_mlp(x2, (g[:, 1] - g[:, 0])[:, None], v2, (gv[:, 1] - gv[:, 0])[:, None],
                     seed)(t2)[:, 0]
        row = {"seed": seed,
               "rank f2 over f1, f0 seen": float(spearmanr(pred[:, 1] - pred[:, 0], true_up).statistic),
               "rank f2 over f1, f0 and f1 seen": float(spearmanr(up, true_up).statistic)}
        for name, upgrade in (("one step", None), ("two steps", up),
                              ("two steps, perfect second", true_up)):
            row[name] = dict(zip(("margin", "captured"), capture(routed(pred, upgrade)),
                                 strict=True))
        rows.append(row)
        print(json.dumps(row), flush=True)
    return rows


def within_top(cfg) -> float:
    """How far under the best single model's validation mIoU Table 2's calibration may
    land: the run's ``operating_point.iou_within_top``, or where its operating point is
    another target (or none), 0.005, the report's row "PaSeR (best model's IoU - 0.005)"."""
    within = cfg.operating_point.iou_within_top
    return 0.005 if within is None else within


def protocol_probe(run, router, test_out: PatchOutcomes, capture, results: dict,
                   offsets: int = 41) -> dict:
    """Part 5 of the module's docstring: PaSeR (its price sweep, and with a second knob, an
    offset on fK's score) and the IDK cascade (its threshold grid), each as the report draws
    it (the test envelope) and chosen on validation (:func:`chosen_on_validation`); and
    Table 2 with both methods calibrated by one rule on validation (the cheapest setting
    within :func:`within_top` of the best single model's validation mIoU)."""
    cfg, device = run.cfg, torch.device("cpu")
    ncls, batch = cfg.models.num_classes, cfg.baselines.timing_batch
    outs = {"validation": PatchOutcomes.build(router, run.data.validation, ncls, batch, device,
                                              mc_seed=0), "test": test_out}
    costs = router.costs(*test_out.state.shape[-2:])
    patch = torch.tensor(costs.patch, dtype=torch.float64)
    rel = patch / patch.max()
    logits = {s: logits_on(router, o.state, batch).double() for s, o in outs.items()}
    ts = price_sweep(logits["validation"], rel)
    gap = float((logits["validation"].amax(-1) - logits["validation"].amin(-1)).max())
    knob = torch.linspace(-gap, gap, offsets, dtype=torch.float64)
    knob = torch.cat([knob, torch.zeros(1, dtype=torch.float64)]).unique()

    def priced(split: str, offset: float) -> tuple[torch.Tensor, torch.Tensor]:
        scores = logits[split].clone()
        scores[..., -1] += offset
        acts = sweep_actions(scores, rel, ts)
        return outs[split].miou_many(acts), costs.gflops(acts).mean(-1)

    def cascade(split: str) -> tuple[torch.Tensor, torch.Tensor]:
        acts = cascade_actions_on(outs[split].entropy, taus)
        return outs[split].miou_many(acts), cascade_gflops(acts, costs).mean(-1)

    taus = threshold_grid(outs["validation"].entropy, 41, extremes=True, quantiles=True)
    families = {
        "PaSeR": {s: priced(s, 0.0) for s in outs},
        "PaSeR, offset on fK": {s: tuple(torch.stack(t) for t in zip(
            *(priced(s, float(b)) for b in knob), strict=True)) for s in outs},
        "IDK-Cascade": {s: cascade(s) for s in outs},
    }
    singles = outs["validation"].miou_many(torch.arange(router.num_models)[:, None, None]
                                           .expand(-1, *logits["validation"].shape[:2]))
    target = float(singles.max()) - within_top(cfg)
    grid = budgets(*results["curve_range"])
    front, oracle = (results["curve_areas"][k] for k in ("Frontier", "Oracle"))
    # f0 alone, a candidate of both: on test the frontier's first vertex (the report's f0,
    # one pass), on validation f0 as the outcomes hold it (the same where T = 1, as here)
    vertex = (results["curves"]["Frontier"]["gflops"][0], results["curves"]["Frontier"]["iou"][0])
    f0 = {"validation": (float(outs["validation"].miou_many(torch.zeros(
              1, *outs["validation"].entropy.shape[:2], dtype=torch.long))), vertex[0]),
          "test": (vertex[1], vertex[0])}

    def chosen_capture(fam: dict) -> tuple[float, float | None]:
        vm = torch.cat([torch.tensor([f0["validation"][0]]), fam["validation"][0].flatten()])
        test = (torch.cat([torch.tensor([f0["test"][0]]), fam["test"][0].flatten()]),
                torch.cat([torch.tensor([f0["test"][1]]), fam["test"][1].flatten()]))
        area = sum(chosen_on_validation(vm, test, grid)) / len(grid)
        return area - front, headroom_captured(area, front, oracle)

    out: dict = {"table2_target": target, "table2_within": within_top(cfg)}
    for name, fam in families.items():
        envelope = capture(curve(*(t.flatten() for t in fam["test"])))
        chosen = chosen_capture(fam)
        vm, vg = (t.flatten() for t in fam["validation"])
        ok = vm >= target - 1e-12
        i = int(torch.where(ok, vg, torch.inf).argmin()) if ok.any() else int(vm.argmax())
        tm, tg = (t.flatten() for t in fam["test"])
        out[name] = {"envelope": dict(zip(("margin", "captured"), envelope, strict=True)),
                     "chosen on validation": dict(zip(("margin", "captured"), chosen,
                                                      strict=True)),
                     "settings": int(vm.numel()),
                     "point": {"miou": float(tm[i]), "gflops": float(tg[i])}}
        print(json.dumps({name: out[name]}), flush=True)
    return out


def images_probe(run, router, test_out: PatchOutcomes, capture,
                 shares=(0.25, 0.5, 0.75, 1.0), draws: int = 6) -> list[dict]:
    """Part 4 of the module's docstring: the shipped router retrained on a share of its
    training images (``draws`` draws of the images and of the initial weights per share),
    its test curve's margin over the frontier and captured share."""
    cfg, device = run.cfg, torch.device("cpu")
    nmod, batch = router.num_models, cfg.baselines.timing_batch
    train = training_outcomes(cfg, router, run.data, device, mc_seed=0)
    val = PatchOutcomes.build(router, run.data.validation, cfg.models.num_classes, batch,
                              device, mc_seed=0)
    cost = router.costs(*test_out.state.shape[-2:]).model_cost(cfg.stage2.cost)
    rows = []
    for share in shares:
        for draw in range(draws):
            gen = torch.Generator().manual_seed(1000 * draw + round(100 * share))
            keep = torch.randperm(len(train.state), generator=gen)[
                :round(share * len(train.state))].sort().values
            torch.manual_seed(draw)
            policy = make_policy(cfg, nmod)
            with torch.inference_mode(False):
                state, _ = fit_policy(cfg, policy, train.rows(keep), val, cost)
            policy.load_state_dict(state)
            probe = Router(router.f0, policy, list(router.pool), router.grid, cfg.mc_samples,
                           router.in_channels, cfg.mc_dropout, cfg.uncertainty,
                           cfg.stage2.state, cfg.models.num_classes)
            margin, captured = capture(policy_curve(probe, test_out, batch))
            rank = rank_correlation(escalation(logits_on(probe, test_out.state, batch)), test_out)
            rows.append({"share": share, "images": len(keep), "draw": draw, "margin": margin,
                         "captured": captured, "rank": rank})
            print(json.dumps(rows[-1]), flush=True)
    return rows


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("run_dirs", nargs="+", type=Path)
    ap.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    ap.add_argument("--blocks", type=int, nargs="+", default=[16, 32, 64, 128])
    ap.add_argument("--parts", nargs="+", choices=("dense", "cascade", "images", "protocol"),
                    default=["dense", "cascade", "images", "protocol"],
                    help="dense: the dense router and the block sizes (parts 1, 2); "
                         "cascade: part 3; images: part 4; protocol: part 5")
    ap.add_argument("--results", type=Path, default=RESULTS,
                    help="the JSON file to update (default: the committed benchmarks/results/router_probe.json)")
    args = ap.parse_args()
    if "OMP_NUM_THREADS" not in os.environ:  # the machine it was measured on: 2 cores
        torch.set_num_threads(2)
    saved = json.loads(args.results.read_text()) if args.results.is_file() else {}
    for run_dir in args.run_dirs:
        def save(out: dict, key: str = str(run_dir)) -> None:
            saved[key] = {**saved.get(key, {}), **out}
            atomic_write_text(json.dumps(saved, indent=1), args.results)

        save(probe(run_dir, args.seeds, args.blocks, args.parts, save))


if __name__ == "__main__":
    main()
