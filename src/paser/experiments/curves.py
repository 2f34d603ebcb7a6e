"""The report's IoU-vs-GFLOP curves: PaSeR's (every operating point calibration can reach)
and the oracle's, on cached outcomes (:class:`~paser.outcomes.PatchOutcomes`)."""

from __future__ import annotations

import torch

from paser.baselines.routed import cascade_sweep, oracle_actions, pareto
from paser.calibration import price_sweep, sweep_actions
from paser.outcomes import PatchOutcomes

#: the curve of :func:`reachable_curve` in the report
REACHABLE = "Oracle (other views)"


def logits_on(router, states: torch.Tensor, batch: int) -> torch.Tensor:
    """The policy's logits ``[N, P, K+1]`` on cached states, batch by batch."""
    device = next(router.parameters()).device
    with torch.inference_mode():
        router.policy.eval()
        return torch.cat([router.policy(states[i:i + batch].to(device)).float().cpu()
                          for i in range(0, len(states), batch)])


def priced_actions(scores: torch.Tensor, costs) -> torch.Tensor:
    """Actions ``[S, N, P]`` of scores ``[N, P, K+1]`` (logits, or gains over f0) with the
    calibration's price ``t * GFLOP(k) / GFLOP(fK)`` taken off, for a dense sweep of ``t``
    (:func:`paser.calibration.price_sweep`)."""
    patch = torch.tensor(costs.patch, dtype=torch.float64)
    rel = patch / patch.max()
    return sweep_actions(scores, rel, price_sweep(scores, rel))


def policy_curve(router, test: PatchOutcomes, batch: int) -> dict:
    """PaSeR's IoU-vs-GFLOP curve: the calibration's bias ``-t * GFLOP(k) / GFLOP(fK)`` on
    the policy's logits for a dense sweep of ``t``, from "everything on fK" to "everything
    on f0" (:func:`paser.calibration.price_sweep`): every point is an operating point
    ``paser calibrate`` can reach."""
    logits = logits_on(router, test.state, batch)
    costs = router.costs(*test.state.shape[-2:])
    actions = priced_actions(logits, costs)  # [S, N, P]
    return curve(test.miou_many(actions), costs.gflops(actions).mean(-1))


def oracle_curve(test: PatchOutcomes, costs, cost: torch.Tensor, points: int) -> dict:
    """Perfect routing of the pool, knowing the labels: the best of the oracle at every
    lam of the reward (patch gains, ``cost``) and of the dataset gain priced per GFLOP."""
    patch_iou = test.patch_iou()
    acts = torch.stack([oracle_actions(patch_iou, cost, lam)
                        for lam in torch.linspace(0, 1, points).tolist()])
    acts = torch.cat([acts, priced_actions(test.dataset_gain(), costs)])
    return curve(test.miou_many(acts), costs.gflops(acts, policy=False).mean(-1))


def reachable_curve(router, data, test: PatchOutcomes, batch: int, device) -> dict | None:
    """An estimate of what any router can reach on this split: routing each patch by its
    true gains (labels known) measured on the *other* dihedral views of its image
    (mirrored, turned; :func:`paser.outcomes.usable_views`), averaged. What a patch's gain
    owes to its image's content survives a mirror; what it owes to one draw of the models'
    errors on that exact arrangement of pixels does not, and no router can see it. The
    oracle keeps both; this keeps the first. ``None`` when the image has no other view."""
    from paser.outcomes import usable_views, viewed

    h, w = test.state.shape[-2:]
    views = usable_views(router.grid, h, w, 8)[1:]
    if not views:
        return None
    ncls = test.inter.shape[-1]
    gains = torch.stack([
        PatchOutcomes.build(router, viewed(data, v), ncls, batch, device, mc_seed=0)
        .to_image_order(router.grid, v).dataset_gain() for v in views]).mean(0)
    costs = router.costs(h, w)
    acts = priced_actions(gains.double(), costs)
    return curve(test.miou_many(acts), costs.gflops(acts, policy=False).mean(-1))


def chosen_on_validation(val_miou: torch.Tensor, test: tuple[torch.Tensor, torch.Tensor],
                         budgets) -> list[float]:
    """A family of settings read as a user can choose among them, without the test labels:
    at each budget, of the settings whose GFLOP on test is within it (what they spend can
    be measured without labels), the one of best validation mIoU, and its test mIoU (0
    where none fits). ``val_miou`` ``[S]``; ``test``: (mIoU, GFLOP) ``[S]`` on test. The
    report's curves are instead read at each budget as the best test mIoU of any setting
    within it, which credits a family with a choice made on the test labels: the larger
    the family (the cascade's pairs of thresholds), the more."""
    vm = val_miou.flatten().double()
    tm, tg = (t.flatten().double() for t in test)
    values = []
    for g in budgets:
        ok = tg <= float(g) + 1e-12
        values.append(float(tm[int(torch.where(ok, vm, -torch.inf).argmax())])
                      if ok.any() else 0.0)
    return values


def chosen_areas(router, val: PatchOutcomes, test: PatchOutcomes, batch: int, points: int,
                 budgets, f0: tuple[float, float, float]) -> dict[str, float]:
    """PaSeR's and the IDK cascade's mean test mIoU over ``budgets`` with each budget's
    setting chosen by validation mIoU (:func:`chosen_on_validation`): PaSeR's prices swept over
    its validation logits, the cascade's ``points`` quantiles of validation's patch
    entropies for each threshold; f0 alone a candidate of both (below a router's fixed
    cost a user runs it, as the report's curves read), ``f0`` its validation mIoU, test
    mIoU and GFLOP (the report's single f0, one pass)."""
    def priced(split: PatchOutcomes, logits: torch.Tensor, ts: torch.Tensor
               ) -> tuple[torch.Tensor, torch.Tensor]:
        costs = router.costs(*split.state.shape[-2:])
        patch = torch.tensor(costs.patch, dtype=torch.float64)
        actions = sweep_actions(logits, patch / patch.max(), ts)
        return split.miou_many(actions), costs.gflops(actions).mean(-1)

    val_logits = logits_on(router, val.state, batch)
    patch = torch.tensor(router.costs(*val.state.shape[-2:]).patch, dtype=torch.float64)
    ts = price_sweep(val_logits, patch / patch.max())
    families = {
        "PaSeR": (priced(val, val_logits, ts),
                  priced(test, logits_on(router, test.state, batch), ts)),
        "IDK-Cascade": tuple(cascade_sweep(split, router.costs(*split.state.shape[-2:]), points,
                                           grid_on=val)[1:] for split in (val, test))}
    head = torch.tensor(f0, dtype=torch.float64)  # f0 alone: validation, test mIoU, GFLOP
    out = {}
    for method, ((vm, _), (tm, tg)) in families.items():
        test_points = (torch.cat([head[1:2], tm.double()]), torch.cat([head[2:], tg.double()]))
        out[method] = sum(chosen_on_validation(torch.cat([head[:1], vm.double()]), test_points,
                                               budgets)) / len(budgets)
    return out


def escalation(scores: torch.Tensor) -> torch.Tensor:
    """How strongly a router wants each patch off f0 ``[N, P]``, from its scores ``[N, P,
    K+1]`` (logits or predicted rewards): the best pool model's score minus f0's."""
    return scores[..., 1:].amax(-1) - scores[..., 0]


def rank_correlation(preference: torch.Tensor, outcomes: PatchOutcomes) -> float:
    """Spearman's rank correlation, over every patch of a split, between a router's
    preference to move a patch off f0 ``[N, P]`` (:func:`escalation`; the cascade: f0's
    entropy on the patch) and what moving it is truly worth: the best pool model's
    first-order gain of the split's mIoU (:meth:`PatchOutcomes.dataset_gain`). 1: the
    router ranks patches as the labels do; 0: no better than chance."""
    from scipy.stats import spearmanr

    truth = outcomes.dataset_gain()[..., 1:].amax(-1).double().flatten()
    preference = preference.double().flatten()
    if bool((preference == preference[0]).all() or (truth == truth[0]).all()):
        return 0.0  # a constant ranks nothing
    return float(spearmanr(preference.numpy(), truth.numpy()).statistic)


def curve(miou: torch.Tensor, gflops: torch.Tensor) -> dict:
    xs, ys = pareto(gflops, miou)
    return {"gflops": xs, "iou": ys}
