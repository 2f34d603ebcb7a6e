"""The one evaluation loop: a method streamed over a split, only counts kept.

A method is a predictor ``(images [B, C, H, W], positions [B]) -> Prediction``.
:func:`measure` streams a split (in memory, on disk, or a dataset read by worker
processes) through it and returns IoU (dataset-level mIoU) and each class's IoU, GFLOP
per image (:data:`paser.cost.FLOP_CONVENTION`), IoU/GFLOP and, on request, wall-clock milliseconds
per image (one untimed warm-up batch first), the share of patches per model, the
``assignment`` counts ``[G, K+1]`` of a dataset with sample groups (patches of each group
sent to each model), f0's own IoU and the mean per-patch reward.

The routing path's methods are here (:func:`paser_predictor` and the others below);
the report adds the baselines' (:mod:`paser.experiments.methods`). ``paser evaluate``,
:meth:`paser.PaSeR.evaluate`, calibration, stage 3 and the report all measure through
:func:`measure`, so a method's figures are the same wherever they are read.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import torch
from torch.utils.data import Dataset

from paser.data import Tensors, on_disk
from paser.metrics import IoUAccumulator, iou_per_gflop, iou_per_image, predicted_classes, reward
from paser.patches import PatchGrid
from paser.routing import Router


@dataclass
class Prediction:
    """``mask`` [B, H, W]; ``gflops`` [B]; ``actions`` [B, P] the model of each patch (routed
    methods, and a pool model on all patches); ``f0_mask`` [B, H, W] f0's own prediction
    where the method started from it (routed methods)."""

    mask: torch.Tensor
    gflops: torch.Tensor
    actions: torch.Tensor | None = None
    f0_mask: torch.Tensor | None = None


Predictor = Callable[[torch.Tensor, torch.Tensor], Prediction]


@dataclass
class RewardSpec:
    """What :func:`measure` needs for the mean per-patch reward: the grid the actions are
    on, ``lam`` and the cost of each action ``[K+1]``."""

    grid: PatchGrid
    lam: float
    cost: torch.Tensor


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


@torch.inference_mode()
def measure(predict: Predictor, data: Tensors | Dataset, num_classes: int, batch_size: int,
            device: torch.device, num_models: int | None = None, timed: bool = True,
            rewards: RewardSpec | None = None, num_workers: int = 0,
            per_image: bool = False, on_batch: Callable[[int], None] | None = None) -> dict:
    """Stream ``data`` through ``predict``; see the module docstring for what is returned.

    ``data`` is a split (:class:`paser.data.Tensors`) or a dataset, read by
    ``num_workers`` processes. ``num_models`` (K + 1) turns on ``fractions`` and, with
    sample groups, ``assignment``; ``timed`` the milliseconds; ``rewards`` the
    ``reward``. ``f0_iou`` comes back when the predictions carry f0's. ``per_image`` adds
    ``per_image``: each image's ``intersection``, ``union`` ``[N, C]`` and ``gflops``
    ``[N]`` as arrays (for :func:`paser.frontier.bootstrap`; not JSON). ``on_batch`` is
    called with each batch's number of images once it is measured (a progress bar).
    """
    if not isinstance(data, Tensors):
        data = on_disk(data, num_workers)
    acc = IoUAccumulator(num_classes, keep_images=per_image)
    f0_acc = IoUAccumulator(num_classes)
    image_gflops = []
    counts = torch.zeros(num_models or 1, dtype=torch.float64)
    groups = len(data.group_names) if data.groups is not None and num_models else 0
    confusion = torch.zeros(groups, num_models or 1, dtype=torch.long)
    gflops, seconds, n, paid, f0_seen = 0.0, 0.0, len(data), [], False
    dearest = 0.0  # the most any one image spent
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
        if out.f0_mask is not None:
            f0_acc.update(out.f0_mask.cpu(), y)
            f0_seen = True
        gflops += float(out.gflops.sum())
        dearest = max(dearest, float(out.gflops.max()))
        if per_image:
            image_gflops.append(out.gflops.detach().double().cpu().reshape(-1))
        actions = None if out.actions is None else out.actions.cpu()
        if actions is not None and num_models:
            counts += torch.bincount(actions.reshape(-1), minlength=num_models)
            if groups:  # every patch of an image carries the image's group
                g = data.groups[i:i + batch_size, None].expand_as(actions)
                confusion += torch.bincount((g * num_models + actions).reshape(-1),
                                            minlength=groups * num_models
                                            ).view(groups, num_models)
        if rewards is not None and actions is not None and out.f0_mask is not None:
            paid.append(_patch_rewards(out, actions, y, num_classes, rewards))
        if on_batch is not None:
            on_batch(int(x.shape[0]))
    scores = acc.compute()
    miou, mean_gflops = scores["miou"], gflops / n
    result = {"iou": miou, "per_class": per_class(scores), "gflops": mean_gflops,
              "gflops_max": dearest,
              "iou_per_gflop": iou_per_gflop(miou, mean_gflops),
              "ms_per_image": 1000 * seconds / n if timed else None, "batch_size": batch_size,
              "images": n}
    if f0_seen:
        result["f0_iou"] = f0_acc.compute()["miou"]
    if num_models and counts.sum() > 0:
        result["fractions"] = (counts / counts.sum()).tolist()
    if groups:
        result["assignment"] = confusion.tolist()
    if paid:
        result["reward"] = float(torch.cat(paid).mean())
    if per_image:
        inter, union = acc.image_counts()
        result["per_image"] = {"intersection": inter.numpy(), "union": union.numpy(),
                               "gflops": torch.cat(image_gflops).numpy()}
    return result


class FirstBatches:
    """The first ``most`` batches of ``batch`` images of a split, each read when a round of
    :func:`time_in_turns` first asks for it (a streamed split holds no more in memory);
    ``used`` lists the images of each batch read so far."""

    def __init__(self, data: Tensors, batch: int, most: int):
        self.data, self.batch = data, batch
        self.count = min(most, -(-len(data) // batch))
        self.used: list[int] = []

    def __len__(self) -> int:
        return self.count

    def __getitem__(self, i: int) -> torch.Tensor:
        x = self.data.images[i * self.batch:(i + 1) * self.batch]
        if i == len(self.used):
            self.used.append(int(x.shape[0]))
        return x


@torch.inference_mode()
def time_in_turns(predictors: dict[str, Predictor], batches: Sequence[torch.Tensor],
                  device: torch.device, rounds: int = 5, least: int = 3,
                  budget_s: float = 3.0) -> dict[str, list[float]]:
    """Milliseconds per image of each predictor, in rounds in which the predictors take
    turns on the same batch (round ``r``: ``batches[r % len(batches)]``, each [B, C, H, W];
    each round starting with the next predictor), so a slow spell of a shared machine hits
    all of them alike instead of one, and a routed method is timed on more than one mix.

    At most ``rounds``; after ``least`` it stops once ``budget_s`` seconds have gone. The
    predictors should be warm (measured before): nothing runs untimed here. Returns each
    predictor's ms per image, one per round."""
    names = list(predictors)
    ms: dict[str, list[float]] = {name: [] for name in names}
    began = time.perf_counter()
    for r in range(rounds):
        if r >= least and time.perf_counter() - began > budget_s:
            break
        x = batches[r % len(batches)].to(device)
        idx = torch.arange(x.shape[0])
        for name in names[r % len(names):] + names[:r % len(names)]:
            _sync(device)
            start = time.perf_counter()
            predictors[name](x, idx)
            _sync(device)
            ms[name].append(1000 * (time.perf_counter() - start) / x.shape[0])
    return ms


def per_class(scores: dict) -> list[float | None]:
    """Each class's IoU over the split (:meth:`IoUAccumulator.compute`'s ``per_class``),
    None for a class neither predicted nor labelled anywhere (JSON has no NaN)."""
    return [None if math.isnan(v) else v for v in scores["per_class"]]


def _patch_rewards(out: Prediction, actions: torch.Tensor, y: torch.Tensor, num_classes: int,
                   spec: RewardSpec) -> torch.Tensor:
    """The per-patch reward ``[B * P]`` of a batch's routed prediction against f0's."""
    grid = spec.grid
    labels = grid.split(grid.pad(y, mode="constant", value=-1))
    iou_r, iou_0 = (iou_per_image(grid.split(grid.pad(m.cpu(), mode="constant", value=0)),
                                  labels, num_classes, ignore_index=-1).nan_to_num(0.0)
                    for m in (out.mask, out.f0_mask))
    return reward(iou_r - iou_0, spec.cost.cpu()[actions.reshape(-1)], spec.lam)


def paser_predictor(router: Router, mc_seed: int | None = 0, bias: torch.Tensor | None = None,
                    mode: str = "greedy") -> Predictor:
    """PaSeR: the policy's actions (greedy by default, with a calibration's ``bias`` on
    its logits), f0's Monte Carlo masks drawn with ``mc_seed`` (fixed unless ``None``)."""
    def predict(x, idx):
        out = router(x, mode=mode, mc_seed=mc_seed, bias=bias)
        return Prediction(out.mask, out.gflops, out.actions, _f0_mask(router, out, x))
    return predict


def fixed_actions_predictor(router: Router, actions: torch.Tensor, mc_seed: int = 0) -> Predictor:
    """The routing path with given actions ``[N, P]`` per image (random policy, oracle);
    the policy does not run and is not paid for."""
    def predict(x, idx):
        out = router(x, actions=actions[idx].to(x.device), mc_seed=mc_seed)
        return Prediction(out.mask, out.gflops, out.actions, _f0_mask(router, out, x))
    return predict


def _f0_mask(router: Router, out, x: torch.Tensor) -> torch.Tensor:
    return router.grid.crop(out.mc.pred, *x.shape[-2:])


def f0_predictor(router: Router, monte_carlo: bool, mc_seed: int | None = 0) -> Predictor:
    """f0 alone: one deterministic pass (dropout off), or the mean of T Monte Carlo passes
    (what routing starts from, :meth:`Router.alone`); every patch on action 0."""
    grid = router.grid

    def predict(x, idx):
        if monte_carlo:
            return _alone(router.alone(0, x, mc_seed))
        h, w = x.shape[-2:]
        router.f0.eval()
        pred = grid.crop(predicted_classes(router.f0(grid.pad(x))), h, w)
        actions = torch.zeros(x.shape[0], grid.num_patches, dtype=torch.long)
        return Prediction(pred, torch.full((x.shape[0],), router.costs(h, w).f0_pass,
                                           dtype=torch.float64), actions)
    return predict


def patch_model_predictor(router: Router, k: int) -> Predictor:
    """Pool model ``f_k`` alone on every patch (no f0, no policy, not paid for;
    :meth:`Router.alone`)."""
    return lambda x, idx: _alone(router.alone(k, x))


def _alone(out) -> Prediction:
    return Prediction(out.mask, out.gflops, out.actions)


def evaluate_router(router: Router, data: Tensors | Dataset, num_classes: int,
                    batch_size: int = 16, lam: float | None = None,
                    cost: torch.Tensor | None = None, bias: torch.Tensor | None = None,
                    mode: str = "greedy", mc_seed: int | None = 0,
                    model: int | None = None, num_workers: int = 0,
                    on_batch: Callable[[int], None] | None = None) -> dict:
    """The routing path on every image of ``data``, through :func:`measure`.

    Returns ``miou`` (routed), ``per_class`` (each class's IoU, None where a class
    is neither labelled nor predicted), ``f0_miou`` (f0's Monte Carlo prediction, which routing
    starts from), ``gflops`` (mean per image, :data:`paser.cost.FLOP_CONVENTION`),
    ``gflops_max`` (the most one image spent), ``iou_per_gflop``, ``fractions`` (share of patches per model, ``[K+1]``), ``images``
    and, when ``lam`` and ``cost`` are given, ``reward`` (mean per-patch reward of the
    routed actions). ``model=k`` measures one model alone instead, as the report does:
    f0 with its Monte Carlo passes for 0, pool model k on every patch otherwise (no f0, no
    policy). ``on_batch``: :func:`measure`'s.
    """
    router.eval()
    device = next(router.parameters()).device
    if model is None:
        predict = paser_predictor(router, mc_seed, bias, mode)
    elif model == 0:
        predict = f0_predictor(router, monte_carlo=True, mc_seed=mc_seed)
    else:
        predict = patch_model_predictor(router, model)
    spec = None if lam is None or cost is None else RewardSpec(router.grid, lam, cost)
    r = measure(predict, data, num_classes, batch_size, device, router.num_models,
                timed=False, rewards=spec, num_workers=num_workers, on_batch=on_batch)
    out = {"miou": r["iou"], "per_class": r["per_class"],
           "f0_miou": r.get("f0_iou", r["iou"] if model == 0 else None),
           "gflops": r["gflops"], "gflops_max": r["gflops_max"],
           "iou_per_gflop": r["iou_per_gflop"],
           "fractions": r["fractions"], "images": r["images"]}
    if "reward" in r:
        out["reward"] = r["reward"]
    return out
