"""Routed baselines (cascade, oracle, random) by hand and against the real forward."""

import pytest
import torch
from tests.helpers import TINY

from paser.baselines.monolithic import MatPhase, role_name, train_baselines
from paser.baselines.routed import (
    cascade_actions,
    cascade_forward,
    cascade_gflops,
    fit_cascade,
    match_cascade,
    oracle_actions,
    pareto,
    random_actions,
    threshold_grid,
)
from paser.config import load_config
from paser.data import Tensors
from paser.frontier import areas
from paser.models import RoutingPolicy, create_model
from paser.outcomes import PatchOutcomes
from paser.patches import PatchGrid
from paser.routing import CostTable, Router
from paser.train.common import MetricLog

COSTS = CostTable(f0_pass=1.0, mc_samples=2, policy=0.5, patch=[0.0, 0.25, 2.0],
                  params=[10, 30, 60], num_patches=2)


def test_cascade_actions_stop_at_the_first_confident_model():
    entropy = torch.tensor([[[0.1, 0.9, 0.0], [0.8, 0.2, 0.5], [0.8, 0.9, 0.1]]])  # N=1 P=3
    taus = torch.tensor([0.5, 0.5])
    assert cascade_actions(entropy, taus).tolist() == [[0, 1, 2]]
    many = cascade_actions(entropy, torch.tensor([[0.5, 0.5], [1.0, 1.0], [0.0, 0.0]]))
    assert many.tolist() == [[[0, 1, 2]], [[0, 0, 0]], [[2, 2, 2]]]


def test_cascade_pays_for_every_model_that_ran():
    actions = torch.tensor([[0, 2], [1, 1]])
    # f0: 2 passes of 1.0; patch ending at f2 paid f1 (0.25) and f2 (2.0); no policy
    assert cascade_gflops(actions, COSTS).tolist() == pytest.approx([2.0 + 2.25, 2.0 + 0.5])


def test_oracle_takes_the_best_true_reward_and_ties_go_cheap():
    patch_iou = torch.tensor([[[0.5, 0.9, 0.95], [0.8, 0.8, 0.8]]])
    cost = torch.tensor([0.0, 0.1, 0.6])
    # lam 0.5: patch 0 rewards (0, 0.15, -0.075) -> f1; patch 1 ties at 0 gain -> f0
    assert oracle_actions(patch_iou, cost, 0.5).tolist() == [[1, 0]]
    assert oracle_actions(patch_iou, cost, 0.0).tolist() == [[2, 0]]


def test_random_actions_are_uniform_and_seeded():
    a = random_actions(500, 16, 3, seed=1)
    assert torch.equal(a, random_actions(500, 16, 3, seed=1))
    shares = torch.bincount(a.reshape(-1), minlength=3) / a.numel()
    assert torch.allclose(shares, torch.full((3,), 1 / 3), atol=0.02)


def _outcomes(entropy, nll, inter, union):
    return PatchOutcomes(torch.zeros(len(entropy), 2, 4, 4), inter, union, entropy, nll)


def test_fit_cascade_minimises_ce_plus_cost_and_match_is_cheapest_reaching():
    torch.manual_seed(0)
    n, p = 20, 2
    entropy = torch.rand(n, p, 3)
    nll = torch.rand(n, p, 3)
    inter = torch.randint(0, 5, (n, p, 3, 2))
    union = inter + torch.randint(0, 5, (n, p, 3, 2))
    out = _outcomes(entropy, nll, inter, union)
    cost = torch.tensor([0.0, 0.3, 0.7])
    fit = fit_cascade(out, COSTS, cost, lam=0.5, points=5)
    # brute force over the same grid
    best = min(
        (float((nll.gather(-1, cascade_actions(entropy, t)[..., None])[..., 0]
                + 0.5 * cost.cumsum(0)[cascade_actions(entropy, t)]).mean()), t.tolist())
        for t in threshold_grid(entropy, 5))
    assert fit.objective == pytest.approx(best[0], rel=1e-5)
    assert fit.taus == pytest.approx(best[1])
    target = out.miou(torch.full((n, p), 2, dtype=torch.long)) - 0.01
    match = match_cascade(out, COSTS, target, tol=0.0, points=5)
    assert match.reached and match.miou >= target
    assert match.gflops <= float(cascade_gflops(torch.full((n, p), 2), COSTS).mean()) + 1e-9
    unreachable = match_cascade(out, COSTS, 2.0, tol=0.0, points=5)
    assert not unreachable.reached


def test_iou_match_is_the_least_upper_bound_on_the_cascade_curve():
    # one patch per image; f0 is right on images 0-3, f1 (and f2) on every image, and
    # f0's entropy rises with the image index: escalating the i most uncertain images
    # gives exactly the curve points (IoU, GFLOP) that the match must choose among
    n = 10
    entropy = torch.stack([torch.linspace(0, 1, n), torch.zeros(n), torch.zeros(n)], -1)[:, None]
    right = torch.tensor([[[1, 0], [1, 0], [1, 0]]])  # inter per class, union = 1 for class 0
    wrong = torch.tensor([[[0, 0], [1, 0], [1, 0]]])
    inter = torch.cat([right.expand(4, -1, -1), wrong.expand(n - 4, -1, -1)])[:, None]
    union = torch.zeros_like(inter)
    union[..., 0] = 1
    out = _outcomes(entropy, torch.zeros(n, 1, 3), inter, union)
    costs = CostTable(f0_pass=1.0, mc_samples=1, policy=0.5, patch=[0.0, 0.25, 2.0],
                      params=[10, 30, 60], num_patches=1)
    # f0 everywhere: 4 of 10 images right (IoU 0.4 ... 1.0 as the wrong ones escalate)
    match = match_cascade(out, costs, 0.75, tol=0.005, points=11)
    assert match.reached and match.miou == pytest.approx(0.8)  # 0.7 < 0.75 <= 0.8
    assert match.gflops == pytest.approx(1.0 + 0.25 * 4 / 10)  # the four most uncertain
    # an exact hit is its own least upper bound
    assert match_cascade(out, costs, 0.8, points=11).miou == pytest.approx(0.8)
    # unreachable: within tol below the best the cascade can do, else its best, not reached
    assert match_cascade(out, costs, 1.004, tol=0.005, points=11).reached
    best = match_cascade(out, costs, 1.5, tol=0.005, points=11)
    assert not best.reached and best.miou == pytest.approx(1.0)


def test_cascade_sweep_quantiles_reach_every_share_of_patches():
    entropy = torch.rand(50, 4, 3, generator=torch.Generator().manual_seed(0))
    taus = threshold_grid(entropy, 11, extremes=True, quantiles=True)
    shares = {round(float((cascade_actions(entropy, t) > 0).float().mean()), 2) for t in taus}
    # escalated share of patches in steps of 10 % (quantile ties aside), plus none and all
    assert {0.0, 0.1, 0.2, 0.5, 0.9, 1.0} <= shares


def test_cascade_sweep_caps_the_grid_and_scores_it_in_chunks(monkeypatch):
    import paser.baselines.routed as routed
    gen = torch.Generator().manual_seed(0)
    n, p = 6, 2
    inter = torch.randint(0, 5, (n, p, 4, 2), generator=gen)
    out = _outcomes(torch.rand(n, p, 4, generator=gen), torch.rand(n, p, 4, generator=gen),
                    inter, inter + torch.randint(0, 5, (n, p, 4, 2), generator=gen))
    costs = CostTable(f0_pass=1.0, mc_samples=2, policy=0.5, patch=[0.0, 0.25, 1.0, 2.0],
                      params=[10, 20, 30, 60], num_patches=p)
    taus, miou, gflops = routed.cascade_sweep(out, costs, points=41, max_settings=1000)
    assert len(taus) == 10 ** 3  # K = 3: 8 quantiles + 2 extremes per model
    monkeypatch.setattr(routed, "_SWEEP_CHUNK", 7 * n * p * 4)  # 7 settings per chunk
    chunked = routed.cascade_sweep(out, costs, points=41, max_settings=1000)
    assert torch.equal(chunked[0], taus) and torch.allclose(chunked[1], miou)
    assert torch.allclose(chunked[2], gflops)
    assert float(miou[0]) == pytest.approx(out.miou(torch.full((n, p), 3)))  # never stop


def test_pareto_and_area_by_hand():
    xs, ys = pareto(torch.tensor([3.0, 1.0, 2.0, 4.0]), torch.tensor([0.6, 0.5, 0.4, 0.7]))
    assert xs == [1.0, 3.0, 4.0] and ys == pytest.approx([0.5, 0.6, 0.7])
    # budgets 1, 2, 4 (log-spaced): the best within each is 0.5, 0.5, 0.7
    area = areas({"c": {"gflops": xs, "iou": ys}}, 1.0, 4.0, count=3)["c"]
    assert area == pytest.approx((0.5 + 0.5 + 0.7) / 3)


def _router(halo=0):
    torch.manual_seed(0)
    grid = PatchGrid(2, 2, halo=halo)
    pool = [create_model("unet", c0=2, widths=[4, 4]), create_model("unet", c0=4, widths=[8, 8])]
    return Router(create_model("unet_tiny").eval(), RoutingPolicy(4, 3).eval(),
                  [m.eval() for m in pool], grid, mc_samples=3)


@pytest.mark.parametrize("halo", [0, 4])
def test_cascade_forward_matches_the_tables_and_a_direct_flop_count(halo):
    from torch.utils.flop_counter import FlopCounterMode

    router = _router(halo)
    data = Tensors(torch.rand(3, 1, 32, 32), torch.randint(0, 3, (3, 32, 32), dtype=torch.uint8),
                   ["a", "b", "c"])
    out = PatchOutcomes.build(router, data, 3, batch_size=3, device=torch.device("cpu"),
                              mc_seed=0)
    taus = torch.quantile(out.entropy[..., :2].reshape(-1, 2), 0.5, dim=0)
    pred, actions, gflops = cascade_forward(router, data.images, taus, mc_seed=0)
    assert torch.equal(actions, cascade_actions(out.entropy, taus))
    assert len(actions.unique()) > 1
    from paser.metrics import IoUAccumulator
    acc = IoUAccumulator(3)
    acc.update(pred, data.masks.long())
    assert acc.compute()["miou"] == pytest.approx(out.miou(actions), abs=1e-9)
    costs = router.costs(32, 32)
    for b in range(3):
        with FlopCounterMode(display=False) as counter:
            _, one, g = cascade_forward(router, data.images[b:b + 1], taus, mc_seed=b)
        assert g.item() == pytest.approx(counter.get_total_flops() / 1e9, rel=0.01)
        assert g.item() == pytest.approx(cascade_gflops(one, costs).item())
    assert torch.allclose(gflops, cascade_gflops(actions, costs))


def test_matphase_gate_and_cost():
    from torch.utils.flop_counter import FlopCounterMode

    torch.manual_seed(0)
    members = [create_model("unet_tiny"), create_model("unet_tiny")]
    mp = MatPhase(members, 1, 3, channels=4).eval()
    x = torch.rand(2, 1, 32, 32)
    with torch.no_grad():
        probs = mp.member_probs(x)
        assert torch.equal(mp.gated(x, probs, float("inf")), probs[:, :3].argmax(1))
        assert torch.equal(mp.gated(x, probs, -1.0), mp.fuse(x, probs).argmax(1))
    with FlopCounterMode(display=False) as counter, torch.no_grad():
        mp(x[:1])
    assert mp.gflops(1, 32, 32) == pytest.approx(counter.get_total_flops() / 1e9, rel=0.01)
    assert role_name("DeepLabV3+") == "base_deeplabv3plus"
    assert role_name("IDK-Cascade (IoU match)") == "base_idk_cascade_iou_match"


def test_a_cascade_stops_where_the_entropy_is_at_most_its_threshold():
    entropy = torch.tensor([[[0.5, 0.3, 0.0]]])  # one patch: f0's 0.5, f1's 0.3
    assert cascade_actions(entropy, torch.tensor([0.5, 0.5])).tolist() == [[0]]  # 0.5 <= 0.5
    # several settings at once: each row of thresholds is one cascade
    taus = torch.tensor([[0.5, 0.5], [0.4, 0.3], [0.4, 0.2]])
    assert cascade_actions(entropy, taus).tolist() == [[[0]], [[1]], [[2]]]


@pytest.mark.slow
def test_baselines_resumed_after_a_new_config_was_cut_short_train_that_config(tmp_path,
                                                                              monkeypatch):
    """The baselines again with another learning rate, cut short in MatPhase's first
    member: --resume must not take the second member, nor MatPhase's fusion, of the
    settings before for the new one's; they end as a fresh call's."""
    def cfg_with(*extra):
        return load_config(preset="battery-quick", overrides=[
            *TINY, "baselines.matphase.members=[{name: unet, kwargs: {c0: 2, widths: [4, 4]}}, "
            "{name: unet, kwargs: {c0: 2, widths: [4, 4, 4]}}]", *extra,
            f"data.cache_dir={tmp_path / 'cache'}"])

    run, fresh = tmp_path / "run", tmp_path / "fresh"
    train_baselines(cfg_with(), run, show_progress=False)
    changed = cfg_with("stage1.lr=0.01")
    real_write = MetricLog.write

    def dying_write(self, record):
        real_write(self, record)
        raise KeyboardInterrupt  # the first member finished its only epoch

    monkeypatch.setattr(MetricLog, "write", dying_write)
    with pytest.raises(KeyboardInterrupt):
        train_baselines(changed, run, show_progress=False)
    monkeypatch.undo()
    train_baselines(None, run, resume=True, show_progress=False)
    train_baselines(changed, fresh, show_progress=False)
    same = {}
    for name in ("base_matphase_m0", "base_matphase_m1", "base_matphase"):
        a = torch.load(run / "checkpoints" / f"{name}.pt", weights_only=False)["model"]
        b = torch.load(fresh / "checkpoints" / f"{name}.pt", weights_only=False)["model"]
        same[name] = all(torch.equal(v, b[k]) for k, v in a.items())
    assert same == dict.fromkeys(same, True)


@pytest.mark.slow
def test_matphase_fusion_killed_mid_way_resumes_after_its_last_epoch(tmp_path, monkeypatch):
    """Stopped in the fusion CNN's second epoch (of 3), --resume trains its last two epochs
    only (one batch each), not all three again, and ends with a fresh call's MatPhase."""
    from paser.baselines import monolithic

    cfg = load_config(preset="battery-quick", overrides=[
        *TINY, "baselines.matphase.members=[{name: unet, kwargs: {c0: 2, widths: [4, 4]}}]",
        "baselines.matphase.fusion_epochs=3", "stage1.batch_size=8",
        f"data.cache_dir={tmp_path / 'cache'}"])
    run, fresh = tmp_path / "run", tmp_path / "fresh"
    real_ce, steps = monolithic.masked_ce, []

    def counted_ce(*args):
        steps.append(len(steps))
        if steps == [0, 1] and dying:
            raise KeyboardInterrupt  # in the fusion's second epoch, before its checkpoint
        return real_ce(*args)

    monkeypatch.setattr(monolithic, "masked_ce", counted_ce)
    dying = True
    with pytest.raises(KeyboardInterrupt):
        train_baselines(cfg, run, show_progress=False)
    dying, steps[:] = False, []
    train_baselines(None, run, resume=True, show_progress=False)
    assert len(steps) == 2
    train_baselines(cfg, fresh, show_progress=False)
    a = torch.load(run / "checkpoints" / "base_matphase.pt", weights_only=False)
    b = torch.load(fresh / "checkpoints" / "base_matphase.pt", weights_only=False)
    assert a["tau"] == b["tau"]
    assert all(torch.equal(v, b["model"][k]) for k, v in a["model"].items())
