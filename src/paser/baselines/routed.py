"""Baselines that route patches over PaSeR's own pool: random policy, oracle, IDK cascade.

They share f0, f1..fK and the patch grid with PaSeR, so the only thing that differs is
how a patch's model is chosen. Choices are searched on :class:`~paser.outcomes.PatchOutcomes`
(every model's counts on every patch, computed once), which scores any assignment
exactly; the chosen settings are then run for real (:func:`cascade_forward`, or the
routing path with fixed actions) for the reported IoU, GFLOP and milliseconds.

IDK cascade (Wang et al. 2017), per patch: f0 (its Monte Carlo mean, as PaSeR sees it);
if f0's mean entropy on the patch exceeds ``tau_0``, run f1; if f1's exceeds ``tau_1``,
run f2; and so on. Every model that ran on a patch is paid for, and there is no policy.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from paser.metrics import predicted_classes, reward
from paser.outcomes import PatchOutcomes
from paser.routing import CostTable, Router
from paser.uncertainty import entropy


def random_actions(num_images: int, num_patches: int, num_models: int, seed: int
                   ) -> torch.Tensor:
    """PaSeR-RandPol: uniformly random actions ``[N, P]``, reproducible from ``seed``."""
    gen = torch.Generator().manual_seed(seed)
    return torch.randint(0, num_models, (num_images, num_patches), generator=gen)


def oracle_actions(patch_iou: torch.Tensor, cost: torch.Tensor, lam: float) -> torch.Tensor:
    """Per patch, the action with the highest true reward ``[N, P]`` (ties: the cheaper).

    ``patch_iou`` [N, P, K+1] with the label known; ``cost`` [K+1], ``cost[0] = 0``.
    """
    value = reward(patch_iou - patch_iou[..., :1], cost.to(patch_iou), lam)
    # argmax returns the first maximum: models are ordered by cost, so ties go cheap
    return value.argmax(-1)


def cascade_actions(patch_entropy: torch.Tensor, taus: torch.Tensor) -> torch.Tensor:
    """Final model of each patch ``[..., P]`` under thresholds ``taus`` [..., K].

    ``patch_entropy`` [N, P, K+1]; ``taus`` [K] or [S, K] for S settings at once (result
    [S, N, P]). A patch stops at the first model k whose entropy is at most ``tau_k``;
    the last model always stops.
    """
    k = patch_entropy.shape[-1] - 1
    if taus.dim() == 2:
        stop = patch_entropy[None, ..., :k] <= taus[:, None, None, :]
    else:
        stop = patch_entropy[..., :k] <= taus
    stop = torch.cat([stop, torch.ones_like(stop[..., :1])], -1)
    return stop.float().argmax(-1)  # the first True


def cumulative(per_model: torch.Tensor) -> torch.Tensor:
    """What a patch that ends at model a has paid: ``sum_{j <= a} per_model[j]``."""
    return per_model.cumsum(0)


def cascade_gflops(actions: torch.Tensor, costs: CostTable) -> torch.Tensor:
    """GFLOP per image ``[..., N]``: T passes of f0 and every model each patch ran through."""
    paid = cumulative(torch.tensor(costs.patch, dtype=torch.float64))
    return costs.f0_mc + paid[actions].sum(-1)


def threshold_grid(patch_entropy: torch.Tensor, points: int, spread: float = 1.0,
                   extremes: bool = False, quantiles: bool = False) -> torch.Tensor:
    """Every combination ``[S, K]`` of ``points`` thresholds per model within
    mean +/- ``spread`` std of that model's patch entropies, or, with ``quantiles``, at
    ``points`` evenly spaced quantiles of them (so every share of patches, in steps of
    1 / (points - 1), stops at that model). ``extremes`` adds "never stop" and "always
    stop", so all-f0 and all-fK are among the settings."""
    k = patch_entropy.shape[-1] - 1
    axes = []
    for m in range(k):
        e = patch_entropy[..., m].reshape(-1).double()
        if quantiles:
            values = torch.quantile(e, torch.linspace(0, 1, points, dtype=torch.float64))
        else:
            mean, std = e.mean(), e.std()
            values = torch.linspace(float(mean - spread * std), float(mean + spread * std),
                                    points, dtype=torch.float64)
        if extremes:
            values = torch.cat([torch.tensor([-1.0], dtype=torch.float64), values,
                                torch.tensor([float(e.max()) + 1], dtype=torch.float64)])
        axes.append(values)
    return torch.cartesian_prod(*axes).reshape(-1, k).float()


@dataclass
class CascadeFit:
    """The thresholds chosen and what they give on the split they were chosen on."""

    taus: list[float]
    miou: float
    gflops: float
    objective: float | None = None
    reached: bool | None = None


def fit_cascade(val: PatchOutcomes, costs: CostTable, cost: torch.Tensor, lam: float,
                points: int = 11) -> CascadeFit:
    """Grid-search thresholds on validation minimising mean patch ``CE + lam * cost``,
    with ``cost`` [K+1] the reward's cost of each model, paid for every model that ran."""
    taus = threshold_grid(val.entropy, points)
    actions = cascade_actions(val.entropy, taus)  # [S, N, P]
    nll = val.nll[None].expand(len(taus), -1, -1, -1).gather(-1, actions[..., None])[..., 0]
    paid = cumulative(cost.double())[actions]
    objective = (nll.double() + lam * paid).mean((1, 2))
    best = int(objective.argmin())
    return CascadeFit(taus[best].tolist(), val.miou(actions[best]),
                      float(cascade_gflops(actions[best], costs).mean()), float(objective[best]))


_SWEEP_CHUNK = 20_000_000  # action entries scored at once: bounds the sweep's memory


def cascade_sweep(split: PatchOutcomes, costs: CostTable, points: int = 41,
                  max_settings: int = 50_000, grid_on: PatchOutcomes | None = None
                  ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Thresholds ``[S, K]`` with their mIoU ``[S]`` and mean GFLOP ``[S]`` on ``split``:
    ``points`` quantiles of each model's patch entropies (on ``grid_on``, by default
    ``split`` itself) and the two extremes, so the cascade's curve has a point for every
    1 / (points - 1) of patches escalated.

    With many pool models the grid grows as (points + 2) ** K: ``points`` is lowered
    until it has at most ``max_settings`` settings, which are scored in chunks.
    """
    k = split.entropy.shape[-1] - 1
    while points > 2 and (points + 2) ** k > max_settings:
        points -= 1
    taus = threshold_grid((split if grid_on is None else grid_on).entropy, points,
                          extremes=True, quantiles=True)
    per_setting = max(1, split.entropy[..., 0].numel() * (k + 1))
    chunk = max(1, _SWEEP_CHUNK // per_setting)
    miou, gflops = [], []
    for start in range(0, len(taus), chunk):
        actions = cascade_actions(split.entropy, taus[start:start + chunk])
        miou.append(split.miou_many(actions))
        gflops.append(cascade_gflops(actions, costs).mean(-1))
    return taus, torch.cat(miou), torch.cat(gflops)


def match_cascade(split: PatchOutcomes, costs: CostTable, target: float, tol: float = 0.005,
                  points: int = 41) -> CascadeFit:
    """IDK-Cascade (IoU match): the least upper bound of ``target`` on the cascade's curve,
    i.e. the cheapest thresholds whose mIoU on ``split`` is at least ``target``, so the
    two methods are compared at (at least) equal IoU.

    If no thresholds reach ``target``, the cheapest within ``tol`` below it; if none
    comes that close, the most accurate ones (``reached=False``).
    """
    taus, miou, gflops = cascade_sweep(split, costs, points)
    for ok in (miou >= target, miou >= target - tol):
        if ok.any():
            best = int(torch.where(ok, gflops, torch.inf).argmin())
            return CascadeFit(taus[best].tolist(), float(miou[best]), float(gflops[best]),
                              reached=True)
    best = int(miou.argmax())
    return CascadeFit(taus[best].tolist(), float(miou[best]), float(gflops[best]), reached=False)


def pareto(gflops: torch.Tensor, miou: torch.Tensor) -> tuple[list[float], list[float]]:
    """The upper-left frontier of (GFLOP, mIoU) points, sorted by GFLOP."""
    order = torch.argsort(gflops.double() - 1e-12 * miou.double())
    xs, ys, best = [], [], -1.0
    for i in order.tolist():
        if float(miou[i]) > best:
            xs.append(float(gflops[i]))
            ys.append(float(miou[i]))
            best = float(miou[i])
    return xs, ys


@torch.inference_mode()
def cascade_forward(router: Router, x: torch.Tensor, taus: list[float] | torch.Tensor,
                    mc_seed: int | None = 0) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Run the IDK cascade for real on a batch ``[B, C, H, W]``.

    Returns the prediction ``[B, H, W]``, the final model per patch ``[B, P]`` and GFLOP per
    image ``[B]``. Each pool model runs once per batch, on the patches still undecided.
    """
    grid = router.grid
    h, w = x.shape[-2:]
    xp = grid.pad(x)
    mc = router.observe(xp, mc_seed)
    patches = grid.context(xp)
    probs = grid.split(mc.probs).clone()
    active = entropy(probs).mean((-2, -1)) > float(taus[0])
    actions = torch.zeros(len(patches), dtype=torch.long, device=x.device)
    for k in range(1, router.num_models):
        idx = active.nonzero(as_tuple=True)[0]
        if not idx.numel():
            break
        out = router.run_local(k, patches.index_select(0, idx))
        probs.index_copy_(0, idx, out)
        actions[idx] = k
        if k < len(router.pool):
            active = torch.zeros_like(active)
            active[idx] = entropy(out).mean((-2, -1)) > float(taus[k])
    actions = actions.view(x.shape[0], grid.num_patches)
    pred = grid.crop(predicted_classes(grid.merge(probs)), h, w)
    return pred, actions, cascade_gflops(actions.cpu(), router.costs(h, w))
