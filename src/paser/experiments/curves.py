"""The report's IoU-vs-GFLOP curves: PaSeR's (every operating point calibration can reach)
and the oracle's, on cached outcomes (:class:`~paser.outcomes.PatchOutcomes`)."""

from __future__ import annotations

import torch

from paser.baselines.routed import oracle_actions, pareto
from paser.calibration import price_sweep, sweep_actions
from paser.outcomes import PatchOutcomes


def logits_on(router, states: torch.Tensor, batch: int) -> torch.Tensor:
    """The policy's logits ``[N, P, K+1]`` on cached states, batch by batch."""
    device = next(router.parameters()).device
    with torch.inference_mode():
        router.policy.eval()
        return torch.cat([router.policy(states[i:i + batch].to(device)).float().cpu()
                          for i in range(0, len(states), batch)])


def policy_curve(router, test: PatchOutcomes, batch: int) -> dict:
    """PaSeR's IoU-vs-GFLOP curve: the calibration's bias ``-t * GFLOP(k) / GFLOP(fK)`` on
    the policy's logits for a dense sweep of ``t``, from "everything on fK" to "everything
    on f0" (:func:`paser.calibration.price_sweep`): every point is an operating point
    ``paser calibrate`` can reach."""
    logits = logits_on(router, test.state, batch)
    costs = router.costs(*test.state.shape[-2:])
    patch = torch.tensor(costs.patch, dtype=torch.float64)
    rel = patch / patch.max()
    actions = sweep_actions(logits, rel, price_sweep(logits, rel))  # [S, N, P]
    return curve(test.miou_many(actions), costs.gflops(actions).mean(-1))


def oracle_curve(test: PatchOutcomes, costs, cost: torch.Tensor, points: int) -> dict:
    """Perfect routing of the pool, knowing the labels: the best of the oracle at every
    lam of the reward (patch gains, ``cost``) and of the dataset gain priced per GFLOP."""
    patch_iou = test.patch_iou()
    acts = torch.stack([oracle_actions(patch_iou, cost, lam)
                        for lam in torch.linspace(0, 1, points).tolist()])
    gain = test.dataset_gain()
    patch = torch.tensor(costs.patch, dtype=torch.float64)
    priced = sweep_actions(gain, patch / patch.max(), price_sweep(gain, patch / patch.max()))
    acts = torch.cat([acts, priced])
    return curve(test.miou_many(acts), costs.gflops(acts, policy=False).mean(-1))


def curve(miou: torch.Tensor, gflops: torch.Tensor) -> dict:
    xs, ys = pareto(gflops, miou)
    return {"gflops": xs, "iou": ys}
