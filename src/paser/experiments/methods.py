"""Every method of the paper's Table 1, measured by the same code on the same test split.

Each method is a predictor ``(images [B, C, H, W], positions [B]) -> Prediction``. One
function, :func:`measure`, streams the test split through any predictor in batches of a
fixed size and returns IoU (dataset-level mIoU), GFLOP per image (counted from the same
FLOP tables, :data:`paser.cost.FLOP_CONVENTION`), IoU/GFLOP, wall-clock milliseconds per
image (one untimed warm-up batch first) and, for routed methods, the share of patches per
model and, when the data has sample groups (noisy MNIST's blur types), the
``assignment`` counts ``[G, K+1]``: patches of each group sent to each model.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch import nn

from paser.baselines.monolithic import MatPhase, padded_gflops, whole_padded
from paser.baselines.routed import CascadeFit, cascade_forward
from paser.data import Tensors
from paser.metrics import IoUAccumulator, iou_per_gflop, predicted_classes
from paser.routing import Router


@dataclass
class Prediction:
    """``mask`` [B, H, W]; ``gflops`` [B]; ``actions`` [B, P] for routed methods."""

    mask: torch.Tensor
    gflops: torch.Tensor
    actions: torch.Tensor | None = None


Predictor = Callable[[torch.Tensor, torch.Tensor], Prediction]


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


@torch.inference_mode()
def measure(predict: Predictor, data: Tensors, num_classes: int, batch_size: int,
            device: torch.device, num_models: int | None = None, timed: bool = True) -> dict:
    """Stream ``data`` through ``predict``; see the module docstring for what is returned."""
    acc = IoUAccumulator(num_classes)
    counts = torch.zeros(num_models or 1, dtype=torch.float64)
    groups = len(data.group_names) if data.groups is not None and num_models else 0
    confusion = torch.zeros(groups, num_models or 1, dtype=torch.long)
    gflops, seconds, n = 0.0, 0.0, len(data)
    if timed:  # warm-up: first-call allocations and lazy initialisation are not timed
        predict(data.images[:batch_size].to(device), torch.arange(min(batch_size, n)))
    for i, (x, y) in zip(range(0, n, batch_size), data.batches(batch_size), strict=True):
        x = x.to(device)
        _sync(device)
        start = time.perf_counter()
        out = predict(x, torch.arange(i, i + x.shape[0]))
        _sync(device)
        seconds += time.perf_counter() - start
        acc.update(out.mask.cpu(), y)
        gflops += float(out.gflops.sum())
        if out.actions is not None and num_models:
            counts += torch.bincount(out.actions.reshape(-1).cpu(), minlength=num_models)
            if groups:  # every patch of an image carries the image's group
                g = data.groups[i:i + batch_size, None].expand_as(out.actions.cpu())
                confusion += torch.bincount((g * num_models + out.actions.cpu()).reshape(-1),
                                            minlength=groups * num_models
                                            ).view(groups, num_models)
    miou, mean_gflops = acc.compute()["miou"], gflops / n
    result = {"iou": miou, "gflops": mean_gflops, "iou_per_gflop": iou_per_gflop(miou, mean_gflops),
              "ms_per_image": 1000 * seconds / n if timed else None, "batch_size": batch_size}
    if num_models and counts.sum() > 0:
        result["fractions"] = (counts / counts.sum()).tolist()
    if groups:
        result["assignment"] = confusion.tolist()
    return result


def paser_predictor(router: Router, mc_seed: int = 0, bias: torch.Tensor | None = None
                    ) -> Predictor:
    """PaSeR: greedy actions of the policy (with a calibration's ``bias`` on its logits),
    fixed Monte Carlo seed."""
    def predict(x, idx):
        out = router(x, mc_seed=mc_seed, bias=bias)
        return Prediction(out.mask, out.gflops, out.actions)
    return predict


def fixed_actions_predictor(router: Router, actions: torch.Tensor, mc_seed: int = 0) -> Predictor:
    """The routing path with given actions ``[N, P]`` per test image (random policy,
    oracle); the policy does not run and is not paid for."""
    def predict(x, idx):
        out = router(x, actions=actions[idx].to(x.device), mc_seed=mc_seed)
        return Prediction(out.mask, out.gflops, out.actions)
    return predict


def cascade_predictor(router: Router, fit: CascadeFit, mc_seed: int = 0) -> Predictor:
    def predict(x, idx):
        pred, actions, gflops = cascade_forward(router, x, fit.taus, mc_seed)
        return Prediction(pred, gflops, actions)
    return predict


def f0_predictor(router: Router, monte_carlo: bool, mc_seed: int = 0) -> Predictor:
    """f0 alone: one deterministic pass (dropout off), or the mean of T Monte Carlo passes."""
    grid = router.grid

    def predict(x, idx):
        h, w = x.shape[-2:]
        costs = router.costs(h, w)
        xp = grid.pad(x)
        if monte_carlo:
            pred, g = router.observe(xp, mc_seed).pred, costs.f0_mc
        else:
            router.f0.eval()
            pred, g = predicted_classes(router.f0(xp)), costs.f0_pass
        return Prediction(grid.crop(pred, h, w), torch.full((x.shape[0],), g))
    return predict


def patch_model_predictor(router: Router, k: int) -> Predictor:
    """Pool model ``f_k`` on every patch, alone (no f0, no policy)."""
    grid, model = router.grid, router.pool[k - 1]

    def predict(x, idx):
        h, w = x.shape[-2:]
        logits = grid.merge(grid.centre(model(grid.context(grid.pad(x)))))
        g = router.costs(h, w).patch[k] * grid.num_patches
        return Prediction(grid.crop(predicted_classes(logits), h, w), torch.full((x.shape[0],), g))
    return predict


def _whole(segment: Callable[[torch.Tensor], torch.Tensor],
           gflops_at: Callable[[int, int], float]) -> Predictor:
    """A method with the same cost for every image of a size: ``segment(x)`` gives the
    prediction, ``gflops_at(h, w)`` its cost, counted once per size."""
    cache: dict[tuple[int, int], float] = {}

    def predict(x, idx):
        h, w = x.shape[-2:]
        if (h, w) not in cache:
            cache[h, w] = gflops_at(h, w)
        return Prediction(segment(x), torch.full((x.shape[0],), cache[h, w]))
    return predict


def whole_image_predictor(model: nn.Module, in_channels: int) -> Predictor:
    """A monolithic model on the whole image (padded to a multiple of 32, cropped back)."""
    return _whole(lambda x: predicted_classes(whole_padded(model, x)),
                  lambda h, w: padded_gflops(model, in_channels, h, w))


def matphase_predictor(model: MatPhase, in_channels: int) -> Predictor:
    """MatPhase: every member and the fusion CNN on the whole image."""
    return _whole(model, lambda h, w: model.gflops(in_channels, h, w))


__all__ = ["Prediction", "Predictor", "cascade_predictor", "f0_predictor",
           "fixed_actions_predictor", "matphase_predictor", "measure",
           "paser_predictor", "patch_model_predictor", "whole_image_predictor"]
