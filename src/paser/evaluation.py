"""Evaluate the routing path on a split, streaming: nothing but counts is kept."""

from __future__ import annotations

import torch
from torch.utils.data import Dataset

from paser.data import Tensors, on_disk
from paser.metrics import IoUAccumulator, iou_per_gflop, iou_per_image
from paser.routing import Router


@torch.inference_mode()
def evaluate_router(router: Router, data: Tensors | Dataset, num_classes: int,
                    batch_size: int = 16, lam: float | None = None,
                    cost: torch.Tensor | None = None, bias: torch.Tensor | None = None,
                    mode: str = "greedy", mc_seed: int | None = 0,
                    force_action: int | None = None, num_workers: int = 0) -> dict:
    """Route every image of ``data`` and return dataset-level metrics.

    ``data`` is a split (in memory or on disk, :class:`paser.data.Tensors`) or a dataset,
    streamed from disk by ``num_workers`` reader processes; either way only counts are
    kept, never the predictions.

    Returns ``miou`` (routed), ``f0_miou`` (f0's Monte Carlo prediction alone), ``gflops``
    (mean per image, :data:`paser.cost.FLOP_CONVENTION`), ``iou_per_gflop``,
    ``fractions`` (share of patches per model, ``[K+1]``) and, when ``lam`` and ``cost``
    are given, ``reward`` (mean per-patch reward of the routed actions). Each batch's
    Monte Carlo masks are drawn with ``mc_seed`` (fixed) unless it is ``None``.
    ``force_action=k`` sends every patch to model k instead of asking the policy, which then
    does not run and is not paid for (f0 alone
    with ``0``, the largest model on all patches with ``K``), still through the routing path.
    """
    router.eval()
    device = next(router.parameters()).device
    routed, f0 = IoUAccumulator(num_classes), IoUAccumulator(num_classes)
    counts = torch.zeros(router.num_models, dtype=torch.float64)
    gflops, rewards = 0.0, []
    grid = router.grid
    if not isinstance(data, Tensors):
        data = on_disk(data, num_workers)
    for images, masks in data.batches(batch_size):
        x, y = images.to(device), masks.to(device)
        forced = (None if force_action is None else torch.full(
            (x.shape[0], grid.num_patches), force_action, dtype=torch.long, device=device))
        out = router(x, mode=mode, bias=bias, mc_seed=mc_seed, actions=forced)
        h, w = y.shape[-2:]
        f0_pred = grid.crop(out.mc.pred, h, w)
        routed.update(out.mask.cpu(), y.cpu())
        f0.update(f0_pred.cpu(), y.cpu())
        counts += torch.bincount(out.actions.reshape(-1).cpu(), minlength=router.num_models)
        gflops += float(out.gflops.sum())
        if lam is not None and cost is not None:
            yp = grid.pad(y, mode="constant", value=-1)
            labels = grid.split(yp)
            iou_r = iou_per_image(grid.split(grid.pad(out.mask, mode="constant", value=0)),
                                  labels, num_classes, ignore_index=-1).nan_to_num(0.0)
            iou_0 = iou_per_image(grid.split(out.mc.pred), labels, num_classes,
                                  ignore_index=-1).nan_to_num(0.0)
            paid = cost.to(device)[out.actions.reshape(-1)]
            rewards.append(((1 - lam) * (iou_r - iou_0) - lam * paid).cpu())
    miou = routed.compute()["miou"]
    mean_gflops = gflops / len(data)
    result = {"miou": miou, "f0_miou": f0.compute()["miou"], "gflops": mean_gflops,
              "iou_per_gflop": iou_per_gflop(miou, mean_gflops),
              "fractions": (counts / counts.sum()).tolist(), "images": len(data)}
    if rewards:
        result["reward"] = float(torch.cat(rewards).mean())
    return result
