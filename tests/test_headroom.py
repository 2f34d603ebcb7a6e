"""What users decide from: the oracle's headroom a router captures, its rank correlation,
the dihedral views the router learns from, the best-model target and a verdict that reads
the curve. Small hand-built cases where the right answer is known."""

from __future__ import annotations

import dataclasses

import pytest
import torch
from tests.test_baselines import COSTS
from torch import nn

from paser import frontier as FR
from paser.calibration import calibrate
from paser.data import Tensors
from paser.errors import ConfigError
from paser.experiments.curves import chosen_on_validation, curve, escalation, rank_correlation
from paser.experiments.main import router_areas
from paser.models import PooledPolicy, create_model
from paser.outcomes import PatchOutcomes, patch_order, usable_views, view, viewed
from paser.patches import PatchGrid
from paser.routing import Router


def test_headroom_captured_is_the_share_of_the_oracles_margin():
    assert FR.headroom_captured(0.83, 0.82, 0.84) == pytest.approx(0.5)
    assert FR.headroom_captured(0.81, 0.82, 0.84) == pytest.approx(-0.5)
    assert FR.headroom_captured(0.83, 0.82, 0.82) is None  # no headroom to capture


def test_the_routers_table_says_so_where_the_oracle_has_no_headroom():
    from paser.experiments.report import _routers_md

    areas = {"Frontier": 0.8289, "Oracle": 0.8220, "Oracle (other views)": 0.8192,
             "PaSeR": 0.8250}
    lines: list[str] = []
    _routers_md(lines.append, {"curve_areas": areas, "headroom_captured": {"PaSeR": None},
                               "reachable_captured": {"PaSeR": None}})
    text = "".join(lines)
    assert "nan" not in text and "the oracle has no headroom over the frontier here" in text
    assert "| PaSeR | 0.8250 | -0.0039 | n/a |" in text


def test_the_headroom_floor_is_the_noise_of_an_iou_difference_on_the_test_split():
    noise = {"margin": {"value": 0.0014, "low": -0.0003, "high": 0.0039}}
    assert FR.headroom_floor(noise) == pytest.approx(0.0021)
    assert FR.headroom_floor(None) == FR.MIN_HEADROOM == 0.005  # no bootstrap: fixed
    flat = {"margin": {"value": 0.0, "low": 0.0, "high": 0.0}}  # PaSeR one model throughout
    assert FR.headroom_floor(flat) == FR.MIN_HEADROOM
    assert FR.headroom_caveat(0.0038, 0.0120).startswith(
        "the oracle's headroom over the frontier (+0.0038 of curve area) is under 0.0120 "
        "(half the width of the bootstrap interval of PaSeR's margin over the frontier, or "
        "0.005 without one)")
    assert FR.headroom_caveat(0.0150, 0.0120) is None  # above the noise: read the shares
    assert FR.headroom_caveat(0.0150, 0.0120, [0.4, None, -0.2]) is None
    assert FR.headroom_caveat(-0.0010, 0.0120) is None  # none: no shares to caveat
    # above the floor, a router above the oracle: its share past 100 % says little; one far
    # under the frontier (PaSeR (paper) on the demo, -111 %) is read as it is
    assert FR.headroom_caveat(0.0038, 0.0021, [1.4]).startswith(
        "a router's curve lies above the oracle's (+0.0038 of curve area over the frontier), "
        "so its share runs past 100 %")
    assert FR.headroom_caveat(0.0128, 0.0028, [0.46, 0.39, -1.11]) is None


def test_shares_of_a_headroom_under_the_noise_are_printed_with_a_caveat():
    from paser.experiments.report import _routers_md

    # the audited run: the oracle 0.0038 over the frontier, PaSeR 0.0395 under it
    areas = {"Frontier": 0.8000, "Oracle": 0.8038, "PaSeR": 0.7605}
    share = FR.headroom_captured(areas["PaSeR"], areas["Frontier"], areas["Oracle"])
    assert f"{100 * share:.0f}" == "-1039"
    lines: list[str] = []
    _routers_md(lines.append, {"curve_areas": areas, "headroom_captured": {"PaSeR": share},
                               "headroom_floor": 0.0120})
    text = "".join(lines)
    assert "| PaSeR | 0.7605 | -0.0395 | -1039 % |" in text  # still printed, and qualified:
    assert "**The shares of the headroom are not meaningful on this run**: the oracle's " \
           "headroom over the frontier (+0.0038 of curve area)" in text
    assert "not the dataset's mIoU: it is no ceiling at every budget" in text
    lines.clear()  # above the oracle: its share past 100 % says so
    _routers_md(lines.append, {"curve_areas": areas, "headroom_captured": {"PaSeR": 1.4},
                               "headroom_floor": 0.0021})
    assert "not meaningful on this run**: a router's curve lies above the oracle's" \
        in "".join(lines)
    lines.clear()
    _routers_md(lines.append, {"curve_areas": areas, "headroom_captured": {"PaSeR": share},
                               "headroom_floor": 0.0021})
    assert "not meaningful" not in "".join(lines)  # far under the frontier: read as it is
    line = FR.versus_cascade(0.001, share, -2.0, 5.0, caveat=FR.headroom_caveat(0.0038, 0.012))
    assert "the cascade -200 % (the oracle's headroom over the frontier (+0.0038" in line


def test_a_router_above_the_fixed_cost_reads_as_f0_alone_below_it():
    # f0 (1 GFLOP, 0.5) and f1 (4, 0.9); a router whose cheapest point (2 GFLOP, 0.8) costs
    # more than the range's start: below it a user runs f0, which gives 0.5, not 0
    curves = {"Frontier": {"gflops": [1.0, 4.0], "iou": [0.5, 0.9], "interpolate": True},
              "R": {"gflops": [2.0, 4.0], "iou": [0.8, 0.9]}}
    areas, above = router_areas(curves, ["R"], (1.0, 0.5), 1.0, 4.0)
    grid = FR.budgets(1.0, 4.0)
    expect = [0.5 if g < 2.0 else (0.8 if g < 4.0 else 0.9) for g in grid]
    assert areas["R"] == pytest.approx(sum(expect) / len(expect))
    assert areas["Frontier"] == pytest.approx(FR.areas(curves, 1.0, 4.0)["Frontier"])
    assert FR.areas(curves, 1.0, 4.0)["R"] < areas["R"] - 0.1  # the raw curve: 0 below 2
    # at or above the frontier from its first point on, and at f0's own budget
    frontier = [0.5 + 0.4 * (g - 1) / 3 for g in grid]
    share = sum(e >= f - 1e-9 for e, f in zip(expect, frontier, strict=True)) / len(grid)
    assert above["R"] == pytest.approx(share) and set(above) == {"R"}


def _outcomes(gain_f1: list[float]) -> PatchOutcomes:
    """One class, 1 image of len(gain_f1) patches: f0 has intersection 0 of union 10, f1 has
    10 * gain of 10 (its patch IoU gain is ``gain``)."""
    p = len(gain_f1)
    inter = torch.zeros(1, p, 2, 1)
    inter[0, :, 1, 0] = torch.tensor(gain_f1) * 10
    union = torch.full((1, p, 2, 1), 10.0)
    return PatchOutcomes(torch.zeros(1, 1, 2, 2), inter, union, torch.zeros(1, p, 2),
                         torch.zeros(1, p, 2))


def test_rank_correlation_is_one_for_the_labels_order_and_minus_one_reversed():
    out = _outcomes([0.1, 0.4, 0.2, 0.3])
    truth = torch.tensor([[[0.0, 0.1], [0.0, 0.4], [0.0, 0.2], [0.0, 0.3]]])
    assert rank_correlation(escalation(truth), out) == pytest.approx(1.0)
    assert rank_correlation(-escalation(truth), out) == pytest.approx(-1.0)
    # f0's score is subtracted: a router that prefers f0 everywhere by the same margin
    # ranks as the one that does not
    shifted = truth + torch.tensor([5.0, 0.0])
    assert rank_correlation(escalation(shifted), out) == pytest.approx(1.0)
    assert rank_correlation(torch.zeros(1, 4), out) == 0.0  # a constant ranks nothing


def test_views_map_the_patch_grid_onto_itself():
    grid = PatchGrid(2, 2)
    x = torch.arange(16.0).view(1, 1, 4, 4)
    patches = grid.split(x)
    for v in range(8):
        seen, order = grid.split(view(x, v)), patch_order(grid, v)
        for p in range(4):  # position p of the view holds the view of patch order[p]
            assert torch.equal(seen[p], view(patches[order[p]], v))
    assert usable_views(grid, 4, 4, 8) == list(range(8))
    assert usable_views(grid, 4, 6, 8) == [0, 1, 2, 3]  # no quarter turn of a 4 x 6 image
    assert usable_views(grid, 5, 4, 8) == [0]  # padding would move
    assert usable_views(PatchGrid(1, 2), 4, 4, 8) == [0, 1, 2, 3]


def test_an_equivariant_pool_has_the_same_outcomes_in_every_view():
    """Models of 1 x 1 convolutions commute with mirrors and turns, so every view's outcomes,
    put back in the image's patch order, are the image's own: views add draws only where
    the models are not equivariant."""
    torch.manual_seed(0)
    grid = PatchGrid(2, 2)
    pool = [nn.Conv2d(1, 3, 1), nn.Conv2d(1, 3, 1)]
    router = Router(nn.Conv2d(1, 3, 1), nn.Identity(), pool, grid, 1, mc_dropout="none").eval()
    gen = torch.Generator().manual_seed(1)
    data = Tensors(torch.rand(3, 1, 8, 8, generator=gen),
                   torch.randint(0, 3, (3, 8, 8), generator=gen).byte(), ["a", "b", "c"])
    base = PatchOutcomes.build(router, data, 3, 2, torch.device("cpu"), mc_seed=0)
    for v in range(1, 8):
        other = PatchOutcomes.build(router, viewed(data, v), 3, 2, torch.device("cpu"),
                                    mc_seed=0).to_image_order(grid, v)
        assert torch.equal(other.inter, base.inter) and torch.equal(other.union, base.union)
        assert torch.allclose(other.entropy, base.entropy, atol=1e-6)


def test_training_outcomes_hold_every_view_of_every_image(tmp_path):
    from paser.config import load_config
    from paser.data import StageData
    from paser.train.policy import training_outcomes

    torch.manual_seed(0)
    grid = PatchGrid(2, 2)
    router = Router(create_model("unet_tiny", 1, 3), PooledPolicy((2, 2), 3, 2), [
        create_model("unet_tiny", 1, 3), create_model("unet_tiny", 1, 3)], grid, 1,
        mc_dropout="none").eval()
    gen = torch.Generator().manual_seed(2)
    split = Tensors(torch.rand(2, 1, 16, 16, generator=gen),
                    torch.randint(0, 3, (2, 16, 16), generator=gen).byte(), ["a", "b"])
    data = StageData(split, split, split, split, split)
    cfg = load_config("battery-quick", overrides=["stage2.views=4", "stage2.train_on=rl"])
    out = training_outcomes(cfg, router, data, torch.device("cpu"), mc_seed=0)
    assert out.inter.shape[:3] == (8, 4, 3)  # 2 images x 4 views, 4 patches, 3 models
    first = PatchOutcomes.build(router, split, 3, 16, torch.device("cpu"), mc_seed=0)
    assert torch.equal(out.inter[:2], first.inter)  # the images themselves come first
    mirrored = PatchOutcomes.build(router, viewed(split, 1), 3, 16, torch.device("cpu"),
                                   mc_seed=0)
    assert torch.equal(out.inter[2:4], mirrored.inter)
    # whole images have nothing around them to crop from: said, not ignored
    cropped = load_config("battery-quick", overrides=["stage2.crops=2"])
    with pytest.raises(ConfigError, match="stage2.crops=2: the router's training images"):
        training_outcomes(cropped, router, data, torch.device("cpu"), mc_seed=0)


def _right_and_wrong() -> tuple[nn.Module, nn.Module]:
    """A pool model that reads the class off the input's value (0 or 0.5), and one that
    answers class 2 everywhere at 9 x its FLOPs."""
    right = nn.Conv2d(1, 3, 1)
    wrong = nn.Conv2d(1, 3, 3, padding=1)
    with torch.no_grad():
        right.weight.copy_(torch.tensor([0.0, 20.0, 0.0]).view(3, 1, 1, 1))
        right.bias.copy_(torch.tensor([0.0, -5.0, -100.0]))
        wrong.weight.zero_()
        wrong.bias.copy_(torch.tensor([0.0, 0.0, 10.0]))
    return right, wrong


def test_the_quality_target_is_the_best_single_model_not_the_last():
    """A pool whose last model is its worst: f2 predicts a class that is never there, f1
    reads the label off the input. The target must be f1's IoU, not f2's (which f0 alone
    beats, so "f2's IoU" would send every patch to f0)."""

    right, wrong = _right_and_wrong()
    grid = PatchGrid(2, 2)
    gen = torch.Generator().manual_seed(0)
    masks = torch.randint(0, 2, (6, 8, 8), generator=gen)
    images = masks[:, None].float() / 2
    data = Tensors(images, masks.byte(), [str(i) for i in range(6)])
    f0 = nn.Conv2d(1, 3, 1)
    with torch.no_grad():  # f0: right on class 0, noisy elsewhere
        f0.weight.zero_()
        f0.bias.copy_(torch.tensor([0.1, 0.0, 0.0]))
    policy = PooledPolicy((2, 2), 3, 2, gain_head=True)
    with torch.no_grad():  # predicted gains: f1 +0.5, f2 +0.2 on every patch
        last = policy.mlp[-1]
        last.weight.zero_()
        last.bias.copy_(torch.tensor([[0.5, 0.2]]))
    router = Router(f0, policy, [right, wrong], grid, 1, mc_dropout="none").eval()
    cal = calibrate(router, data, 3, iou_within_top=0.005, batch_size=6)
    assert cal.target["top_model"] == "f1"
    assert cal.target["top_miou"] == pytest.approx(1.0)
    assert cal.miou >= 1.0 - 0.005 and cal.fractions[1] == pytest.approx(1.0)


def test_verdict_reads_the_curve_when_the_point_misses():
    """The nano-CT case: the operating point sits on a degenerate target (f0 alone), yet
    the curve is above the frontier almost everywhere; the line must say routing pays."""
    frontier = FR.frontier_curve({"f0": (1.0, 0.55), "f1": (3.0, 0.57), "f2": (9.0, 0.54)})
    curve = {"gflops": [1.0, 1.1, 1.3, 1.5, 2.0, 3.0],
             "iou": [0.55, 0.553, 0.558, 0.562, 0.568, 0.5705]}
    line = FR.verdict((1.0, 0.548), frontier, None, 1.0, curve, 1.0, 9.0)
    assert line.startswith("routing pays on this data, but not at this operating point")
    share = FR.share_above(curve, frontier, 1.0, 9.0)
    assert share > 0.9 and f"on {100 * share:.0f} % of budgets" in line
    # 0.562 at 1.5 GFLOP where the frontier needs 1 + 2 * 0.6 = 2.2: 31.8 % saved, the most
    assert "saves up to 31.8 % of GFLOP at equal IoU (0.5620 at 1.500 GFLOP" in line
    # a curve under the frontier leaves the plain verdict
    under = {"gflops": [1.0, 3.0], "iou": [0.55, 0.56]}
    miss = FR.verdict((1.0, 0.548), frontier, None, 1.0, under, 1.0, 9.0)
    assert miss.startswith("routing does not pay on this data")
    assert FR.curve_saving(under, frontier) is None


def test_the_papers_method_learns_from_its_images_as_they_are():
    """PaSeR (paper) keeps the paper's training data when the run's router learns from
    more draws (views, crops)."""
    from paser.config import load_config
    from paser.train.paper import paper_config

    paper = paper_config(load_config("battery-quick",
                                     overrides=["stage2.views=4", "stage2.crops=3"]))
    assert (paper.stage2.views, paper.stage2.crops, paper.stage2.objective) == (1, 0, "reinforce")


def test_chosen_on_validation_by_hand():
    """Each budget's setting chosen without the test labels: of those whose test GFLOP fit,
    the best on validation, read at its test mIoU; the report's reading takes the best on
    test."""
    # A and B spend 1, C spends 2 on test; validation prefers B to A, test A to B
    val = torch.tensor([0.70, 0.80, 0.90])
    test = (torch.tensor([0.85, 0.75, 0.875], dtype=torch.float64),
            torch.tensor([1.0, 1.0, 2.0], dtype=torch.float64))
    assert chosen_on_validation(val, test, [0.5, 1.0, 2.0]) == [0.0, 0.75, 0.875]
    # a dearer setting that validation prefers and test does not is still what a user gets
    val, test = torch.tensor([0.70, 0.80]), (torch.tensor([0.85, 0.80]), torch.tensor([1.0, 2.0]))
    assert chosen_on_validation(val, test, [1.0, 2.0]) == pytest.approx([0.85, 0.80])
    # the report's curves read the best of every setting on test
    c = curve(*test)
    assert [FR.best_within(c, g) for g in (1.0, 2.0)] == pytest.approx([0.85, 0.85])


def test_chosen_by_the_test_labels_is_the_reports_reading_and_bounds_any_other_choice():
    """Choosing each budget's setting by its test mIoU gives back the report's curve as it
    is read (the best within each budget); choosing by any other split gives at most that."""
    gen = torch.Generator().manual_seed(0)
    grid = FR.budgets(0.5, 4.0)
    for _ in range(20):
        tm, tg = torch.rand(30, generator=gen).double(), 0.5 + 3.5 * torch.rand(30, generator=gen).double()
        other = torch.rand(30, generator=gen)
        by_test = chosen_on_validation(tm, (tm, tg), grid)
        assert by_test == pytest.approx(FR.curve_values(curve(tm, tg), grid).tolist())
        by_other = chosen_on_validation(other, (tm, tg), grid)
        assert all(o <= t + 1e-12 for o, t in zip(by_other, by_test, strict=True))


#: test_baselines' cost table (f0 1 GFLOP a pass, T = 2, policy 0.5, patches 0 / 0.25 / 2)
#: for the 4 patches of :func:`_two_pool_outcomes`
_FOUR_PATCHES = dataclasses.replace(COSTS, num_patches=4)


def _two_pool_outcomes() -> PatchOutcomes:
    """One image of 4 patches, one class, a union of 10 pixels under every action: patch IoU
    gains over f0 of f1 ``[0.4, 0.1, 0.3, 0.0]`` and of f2 ``[0.0, 0.2, 0.1, 0.05]`` (the
    best pool model is not the last on every patch)."""
    f0 = torch.full((4,), 2.0)
    inter = torch.stack([f0, f0 + 10 * torch.tensor([0.4, 0.1, 0.3, 0.0]),
                         f0 + 10 * torch.tensor([0.0, 0.2, 0.1, 0.05])], -1)[None, :, :, None]
    zeros = torch.zeros(1, 4, 3)
    return PatchOutcomes(torch.zeros(1, 2, 4, 4), inter, torch.full_like(inter, 10.0), zeros,
                         zeros)


def test_escalation_and_rank_correlation_take_the_best_pool_model():
    from paser.experiments.curves import oracle_curve

    assert escalation(torch.tensor([[[0.0, 0.5, 0.2], [0.0, 0.1, 0.3]]])).tolist() == [
        [pytest.approx(0.5), pytest.approx(0.3)]]
    out = _two_pool_outcomes()
    # the truth is each patch's best gain, 0.4 / 0.2 / 0.3 / 0.05: this order ranks it exactly
    assert rank_correlation(torch.tensor([[0.4, 0.2, 0.3, 0.05]]), out) == pytest.approx(1.0)
    assert rank_correlation(torch.tensor([[0.0, 0.2, 0.1, 0.05]]), out) == pytest.approx(-0.4)
    # the oracle routes without the policy: its cheapest point is f0's T passes alone
    oracle = oracle_curve(out, _FOUR_PATCHES, _FOUR_PATCHES.model_cost("params"), 5)
    assert oracle["gflops"][0] == pytest.approx(2.0) and oracle["iou"][0] == pytest.approx(0.2)
    assert oracle["iou"][-1] == pytest.approx(0.2 + (0.4 + 0.2 + 0.3 + 0.05) / 4)


def test_the_ablation_reads_each_variant_against_the_single_models():
    from paser.experiments.ablation import _margin, single_points

    # a pool model alone pays all 4 patches
    points = single_points(_two_pool_outcomes(), _FOUR_PATCHES)
    assert points == {"f0": (1.0, pytest.approx(0.2)), "f1": (1.0, pytest.approx(0.4)),
                      "f2": (8.0, pytest.approx(0.2875))}
    # a variant's curve starts from f0's point: below its first setting it is f0 alone
    frontier = FR.frontier_curve({"f0": (1.0, 0.5), "f1": (4.0, 0.9)})
    margin = _margin({"gflops": [2, 4], "iou": [0.8, 0.9]}, frontier, (1.0, 0.5), 1.0, 4.0)
    budgets = FR.budgets(1.0, 4.0)
    mine = [0.5 if b < 2 else 0.8 if b < 4 else 0.9 for b in budgets]
    assert margin == pytest.approx(float((mine - (0.5 + 0.4 * (budgets - 1) / 3)).mean()))


def test_the_verdict_reads_the_curve_as_the_routers_table_does_from_f0s_point():
    """T > 1: PaSeR's cheapest setting (every patch on f0, its Monte Carlo mean, 1.5 GFLOP
    with the policy) scores 0.55, under f0's one pass (0.6 at 1 GFLOP). The routers' table
    reads the curve from f0's point; the verdict's curve area must be the table's."""
    frontier = FR.frontier_curve({"f0": (1.0, 0.6), "f1": (4.0, 0.9)})
    curve = {"gflops": [1.5, 2.0, 3.0], "iou": [0.55, 0.75, 0.85]}
    areas, above = router_areas({"Frontier": frontier, "PaSeR": curve}, ["PaSeR"],
                                (1.0, 0.6), 1.5, 4.0)
    margin = areas["PaSeR"] - areas["Frontier"]
    assert f"{margin:+.4f}" == "-0.0200"  # raw, the curve gives -0.0349: 0.55 below 2 GFLOP
    line = FR.verdict((2.0, 0.75), frontier, None, 1.5, curve, 1.5, 4.0, f0=(1.0, 0.6))
    assert line.endswith(f"on {100 * above['PaSeR']:.0f} % of budgets (curve area -0.0200)")


def test_a_quality_target_the_policys_routing_cannot_meet_says_so_and_what_to_ask():
    """The best single model is f1, but the policy ranks f1 under f0 and f2 at every price:
    its sweep goes from every patch on f2 (mIoU 0: it predicts a class never there) to every
    patch on f0, never by f1 (mIoU 1). Within 0.005 of 1 is out of reach; the best the
    routing gives is kept, and the target must say it was not met, by how much, and what to
    ask for instead."""
    right, wrong = _right_and_wrong()
    masks = torch.zeros(2, 8, 8, dtype=torch.long)
    masks[:, :, 4:] = 1  # half class 0, half class 1, in every patch
    data = Tensors(masks[:, None].float() / 2, masks.byte(), ["a", "b"])
    f0 = nn.Conv2d(1, 3, 1)
    with torch.no_grad():  # f0: class 0 everywhere, IoU 0.5 on class 0, 0 on class 1
        f0.weight.zero_()
        f0.bias.copy_(torch.tensor([1.0, 0.0, 0.0]))
    policy = PooledPolicy((2, 2), 3, 2, gain_head=True)
    with torch.no_grad():  # predicted gains: f1 -10, f2 +5 on every patch
        policy.mlp[-1].weight.zero_()
        policy.mlp[-1].bias.copy_(torch.tensor([[-10.0, 5.0]]))
    router = Router(f0, policy, [right, wrong], PatchGrid(2, 2), 1, mc_dropout="none").eval()
    cal = calibrate(router, data, 3, iou_within_top=0.005, batch_size=2)
    assert cal.target["top_model"] == "f1" and cal.target["top_miou"] == pytest.approx(1.0)
    # f0 on every patch: class 0 IoU 0.5, class 1 IoU 0 -> 0.25, above f2's 0
    assert cal.fractions == pytest.approx([1.0, 0.0, 0.0]) and cal.miou == pytest.approx(0.25)
    assert cal.target["reached"] is False
    assert cal.target_text() == (
        "the least GFLOP within 0.005 mIoU of the best single model (f1, validation mIoU "
        "1.0000); not met: the policy's routing comes within 0.7500 of it at best "
        "(validation mIoU 0.2500, kept), so ask for --iou-within-top 0.75 or more, or a "
        "budget (--budget-gflops)")
    met = calibrate(router, data, 3, iou_within_top=0.75, batch_size=2)
    assert "reached" not in met.target and "not met" not in met.target_text()


def test_the_report_says_where_an_operating_points_quality_target_was_not_met():
    from paser.calibration import Calibration
    from paser.experiments.main import operating_point_note

    cal = Calibration(bias=[0.0, -1.0, -9.0], strength=9.0,
                      target={"iou_within_top": 0.005, "top_miou": 0.8612, "top_model": "f1"},
                      gflops=1.234, fractions=[0.5, 0.2, 0.3], miou=0.8421, uncalibrated={},
                      images=40, height=128, width=128)
    met = "P: calibrated on the validation split (validation mIoU 0.8421 at 1.234 GFLOP), " \
          "measured on test."
    assert operating_point_note("P", cal) == met
    missed = dataclasses.replace(cal, target={**cal.target, "reached": False})
    assert operating_point_note("P", missed) == met + (
        " Its target was not met: on validation the policy's routing comes no closer than "
        "0.0191 to the best single model's mIoU (f1, 0.8612), so this row is its routing of "
        "best mIoU.")


def test_shares_of_a_reachable_part_under_the_noise_are_printed_with_a_caveat():
    from paser.experiments.report import _routers_md

    # the oracle well over the frontier (+0.0150), its other views barely (+0.0005): PaSeR's
    # +0.0060 is 40 % of the oracle's headroom but 1200 % of the reachable part, mostly noise
    areas = {"Frontier": 0.8000, "Oracle": 0.8150, "Oracle (other views)": 0.8005,
             "PaSeR": 0.8060}
    share = FR.headroom_captured(areas["PaSeR"], areas["Frontier"], areas["Oracle (other views)"])
    results = {"curve_areas": areas, "headroom_floor": 0.0020,
               "headroom_captured": {"PaSeR": FR.headroom_captured(0.8060, 0.8000, 0.8150)},
               "reachable_captured": {"PaSeR": share}}
    lines: list[str] = []
    _routers_md(lines.append, results)
    text = "".join(lines)
    assert "| PaSeR | 0.8060 | +0.0060 | 40 % | n/a | 1200 % |" in text
    assert "**The shares of the reachable part are not meaningful on this run**: Oracle (other " \
           "views) is +0.0005 of curve area over the frontier, under 0.0020" in text
    assert "The shares of the headroom are not meaningful" not in text  # the oracle's are
    lines.clear()
    _routers_md(lines.append, {**results, "curve_areas": {**areas, "Oracle (other views)": 0.8100}})
    assert "not meaningful" not in "".join(lines)
