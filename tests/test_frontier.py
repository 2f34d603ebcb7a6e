"""The single-model frontier and the verdict, by hand."""

import numpy as np
import pytest

from paser import frontier as FR

# f0 at 1 GFLOP / 0.5 IoU, f1 under the chord from f0 to f2, f2 at 3 / 0.7, f3 dearer and worse
POINTS = {"f0": (1.0, 0.5), "f1": (2.0, 0.55), "f2": (3.0, 0.7), "f3": (4.0, 0.69)}


def test_hull_drops_models_under_a_chord_and_dearer_models_that_score_no_better():
    assert FR.hull(list(POINTS.values())) == [(1.0, 0.5), (3.0, 0.7)]
    # a model above the chord stays on the hull
    assert FR.hull([(1, 0.5), (2, 0.65), (3, 0.7)]) == [(1, 0.5), (2, 0.65), (3, 0.7)]
    # one on the chord adds nothing a mix of its neighbours does not give: not a vertex
    assert FR.hull([(1, 0.5), (2, 0.625), (3, 0.75)]) == [(1, 0.5), (3, 0.75)]
    curve = FR.frontier_curve(POINTS)
    assert curve["models"] == ["f0", "f2"] and curve["interpolate"] is True


def test_frontier_interpolates_in_gflop_and_inverts():
    v = FR.hull(list(POINTS.values()))
    assert FR.frontier_at(v, 2.0) == pytest.approx(0.6)  # half the images on f0, half on f2
    assert FR.frontier_at(v, 0.5) is None  # cheaper than any model
    assert FR.frontier_at(v, 10.0) == pytest.approx(0.7)  # the best model's IoU
    assert FR.frontier_cost(v, 0.65) == pytest.approx(2.5)
    assert FR.frontier_cost(v, 0.4) == pytest.approx(1.0)
    assert FR.frontier_cost(v, 0.75) is None
    assert FR.frontier_mix(v, ["f0", "f2"], 2.5) == "f0 on 25 % of images, f2 on 75 %"


def test_step_curves_give_their_best_within_a_budget():
    curve = {"gflops": [1.0, 2.0, 3.0], "iou": [0.5, 0.62, 0.66]}
    assert FR.best_within(curve, 0.9) is None
    assert FR.best_within(curve, 2.5) == pytest.approx(0.62)
    grid = np.array([0.5, 1.0, 2.5, 3.5])
    assert FR.curve_values(curve, grid).tolist() == pytest.approx([0.0, 0.5, 0.62, 0.66])


def test_areas_are_means_over_log_spaced_budgets():
    grid = FR.budgets(1.0, 100.0, 3)
    assert grid.tolist() == pytest.approx([1.0, 10.0, 100.0])
    curves = {"flat": {"gflops": [1.0], "iou": [0.5]},
              "late": {"gflops": [1.0, 10.0], "iou": [0.2, 0.8]}}
    areas = FR.areas(curves, 1.0, 100.0, count=3)
    assert areas["flat"] == pytest.approx(0.5)
    assert areas["late"] == pytest.approx((0.2 + 0.8 + 0.8) / 3)


def test_share_above_counts_budgets_where_the_curve_beats_the_frontier():
    frontier = FR.frontier_curve({"f0": (1.0, 0.5), "f1": (4.0, 0.8)})
    # at 1 the curve ties f0; at 2 it has 0.65 against 0.6; at 4 it has 0.7 against 0.8
    curve = {"gflops": [1.0, 2.0], "iou": [0.5, 0.65]}
    grid = FR.budgets(1.0, 4.0, 3)  # 1, 2, 4
    assert grid.tolist() == pytest.approx([1.0, 2.0, 4.0])
    assert FR.share_above(curve, frontier, 1.0, 4.0, count=3) == pytest.approx(2 / 3)


def test_verdict_says_what_routing_saves_or_why_it_does_not_pay():
    frontier = FR.frontier_curve({"f0": (1.0, 0.5), "f1": (3.0, 0.7)})
    saves = FR.verdict((2.0, 0.65), frontier)
    # the single models need 2.5 GFLOP for 0.65: 20 % saved
    assert saves.startswith("routing saves 20.0 % of GFLOP against the single models at equal")
    assert "f0 on 25 % of images, f1 on 75 %" in saves
    above = FR.verdict((2.0, 0.75), frontier)
    assert above.startswith("routing pays: IoU 0.7500 at 2.000 GFLOP is above every single")
    oracle = {"gflops": [1.0, 2.0], "iou": [0.5, 0.64]}
    miss = FR.verdict((2.0, 0.55), frontier, oracle, fixed_gflops=1.2)
    assert miss.startswith("routing does not pay on this data: IoU 0.5500 at 2.000 GFLOP is "
                           "0.0500 below")
    assert "the oracle's routing of this pool (the labels known) would give 0.6400 there" in miss
    assert "60 % of its GFLOP" in miss
    headroomless = FR.verdict((2.0, 0.55), frontier, {"gflops": [2.0], "iou": [0.58]})
    assert "even the oracle's routing of this pool (the labels known) stays 0.0200 under it" in headroomless
    # on the frontier, and the oracle no better: no regret to blame
    on = FR.verdict((2.0, 0.59999), frontier, {"gflops": [2.0], "iou": [0.6]})
    assert "regret" not in on and "the oracle's routing of this pool gives no more there" in on


def test_versus_cascade_says_which_of_the_trained_router_and_the_cascade_is_ahead():
    ahead = FR.versus_cascade(0.0013, 0.37, 0.28, -1.24)
    assert ahead == ("the trained router is above the training-free entropy cascade "
                     "(IDK-Cascade): PaSeR's curve area +0.0013 against the cascade's; of "
                     "the oracle's headroom PaSeR "
                     "captures 37 %, the cascade 28 %; at PaSeR's IoU, the cascade uses 1.2 % "
                     "fewer GFLOP than PaSeR (Table 2)")
    tie = FR.versus_cascade(-0.0001, 0.17, 0.18, 6.9)
    assert tie.startswith("the training-free entropy cascade (IDK-Cascade), which needs no "
                          "policy, does as well on this data or better: PaSeR's curve area "
                          "-0.0001 against it")
    assert tie.endswith("at PaSeR's IoU, PaSeR uses 6.9 % fewer GFLOP than the cascade (Table 2)")
    assert "headroom" not in FR.versus_cascade(0.0, None, None, 0.0)  # no headroom: no shares
    # a margin that rounds to nothing reads as nothing, never as a -0.0 loss
    even = FR.versus_cascade(-0.00003, None, None, -0.04)
    assert "curve area +0.0000 against it" in even and "-0.0" not in even
    assert even.endswith("PaSeR and the cascade use the same GFLOP (within 0.1 %) (Table 2)")
    # the margin with each method's settings chosen on validation, where the report has it
    chosen = FR.versus_cascade(0.0013, 0.37, 0.28, -1.24, chosen_margin=0.003)
    assert chosen == ahead.replace("the cascade 28 %;", "the cascade 28 %; with each budget's "
                                   "setting chosen on validation, as a user must choose it (the "
                                   "curves read the best on test), PaSeR's area is "
                                   "+0.0030 against the cascade's;")
    # Table 2's -96.8 %: PaSeR spends 1.968 x the cascade's GFLOP, the cascade 49.2 % fewer
    double = FR.versus_cascade(-0.0010, 0.1, 0.2, -96.8, equal_iou=False)
    assert double.endswith("where the cascade comes closest to PaSeR's IoU (it never reaches "
                           "it), the cascade uses 49.2 % fewer GFLOP than PaSeR (Table 2)")


def test_wall_clock_compares_milliseconds_at_equal_iou():
    singles = {"f0": (3.0, 0.79), "f1": (20.0, 0.85), "f2": (60.0, 0.84)}
    wc = FR.wall_clock((10.0, 0.83), singles)  # f0 and f1 split 1:2 reach 0.83: 3 + 17 * 2/3
    assert wc["frontier_ms_at_equal_iou"] == pytest.approx(3 + 17 * 2 / 3)
    assert wc["ratio"] == pytest.approx(10 / (3 + 17 * 2 / 3)) and wc["met"]
    assert not FR.wall_clock((15.0, 0.83), singles)["met"]
    above = FR.wall_clock((30.0, 0.86), singles)  # no single model reaches it
    assert above["frontier_ms_at_equal_iou"] is None and above["met"]


def test_the_wall_clock_headline_reads_the_medians_of_rounds_in_turns():
    ious = {"PaSeR": 0.83, "f0": 0.79, "f1": 0.85}
    # round 2 is a slow spell on PaSeR alone; the median leaves it out
    ms = {"PaSeR": [10.0, 40.0, 11.0], "f0": [3.0, 3.0, 3.0], "f1": [21.0, 20.0, 19.0]}
    wc = FR.wall_clock_in_turns(ms, ious)
    assert wc["rounds"] == 3 and wc["ms_per_image"] == {"PaSeR": 11.0, "f0": 3.0, "f1": 20.0}
    # the frontier at 0.83: f0 and f1 split 1:2, 3 + 17 * 2/3 ms
    assert wc["frontier_ms_at_equal_iou"] == pytest.approx(3 + 17 * 2 / 3)
    assert wc["ratio"] == pytest.approx(11 / (3 + 17 * 2 / 3))
    lows = [10 / (3 + 18 * 2 / 3), 40 / (3 + 17 * 2 / 3), 11 / (3 + 16 * 2 / 3)]
    assert wc["ratio_range"] == pytest.approx([min(lows), max(lows)])
    assert FR.wall_clock_in_turns(ms, {**ious, "PaSeR": 0.9})["ratio_range"] is None


def _counts(inter, union, gflops):
    return {"intersection": np.asarray(inter), "union": np.asarray(union),
            "gflops": np.asarray(gflops, dtype=float)}


def test_the_bootstrap_reads_every_method_on_the_same_resample_of_the_images():
    # four images, one class: f0 right on 5 of 10 pixels of each, f1 on 8 at 3 x the cost
    f0 = _counts([[5]] * 4, [[10]] * 4, [1.0] * 4)
    f1 = _counts([[8]] * 4, [[10]] * 4, [3.0] * 4)
    # PaSeR is f1 on every image: on the frontier in every resample, no margin
    same = FR.bootstrap(f1, {"f0": f0, "f1": f1}, draws=200)
    assert same["images"] == 4 and same["draws"] == 200
    assert same["margin"] == pytest.approx({"value": 0.0, "low": 0.0, "high": 0.0}, abs=1e-12)
    assert same["share_above"] == 0.0
    # PaSeR: f1's IoU at 2 GFLOP on every image; the frontier gives 0.5 + 0.3 / 2 there
    better = _counts([[8]] * 4, [[10]] * 4, [2.0] * 4)
    cascade = _counts([[8]] * 4, [[10]] * 4, [2.5] * 4)
    up = FR.bootstrap(better, {"f0": f0, "f1": f1}, cascade, draws=200)
    assert up["margin"]["value"] == pytest.approx(0.8 - 0.65)
    assert up["margin"]["low"] == pytest.approx(0.15) and up["share_above"] == 1.0
    assert up["table2"] == pytest.approx({"value": 20.0, "low": 20.0, "high": 20.0})
    line = FR.noise_line(up)
    assert line.startswith("over 200 bootstrap resamples of the 4 test images (95 % intervals)")
    assert "within the noise" not in line and "Table 2's GFLOP saved" in line
    # PaSeR ahead on two images and behind on two: the sign is the draw's
    mixed = _counts([[10], [10], [3], [3]], [[10]] * 4, [2.0] * 4)
    noisy = FR.bootstrap(mixed, {"f0": f0, "f1": f1}, draws=500)
    assert noisy["margin"]["low"] < 0 < noisy["margin"]["high"]
    assert "the verdict's sign is within the noise of this test split" in FR.noise_line(noisy)
    with pytest.raises(ValueError, match="same images"):
        FR.bootstrap(better, {"f0": _counts([[5]] * 3, [[10]] * 3, [1.0] * 3)})


def test_the_noise_line_says_when_table_2s_sign_is_within_the_noise():
    # the demo's seed 0: 6.3 % saved against the matched cascade, -1.2 to 13.4 % over the
    # resamples; the line gave the interval but said nothing, as if the 6.3 % were a finding
    noise = {"images": 80, "draws": 1000, "level": 0.95, "share_above": 0.888,
             "margin": {"value": 0.0011, "low": -0.0007, "high": 0.0031},
             "table2": {"value": 6.27, "low": -1.21, "high": 13.41}}
    line = FR.noise_line(noise)
    assert line.endswith("; Table 2's GFLOP saved against the IoU-matched cascade 6.3 % (-1.2 "
                         "to 13.4 %, the cascade's thresholds fixed): which of PaSeR and the "
                         "cascade is cheaper at that IoU is within the noise of this test split")
    sure = {**noise, "table2": {"value": 6.27, "low": 1.5, "high": 13.41}}
    assert FR.noise_line(sure).endswith("(1.5 to 13.4 %, the cascade's thresholds fixed)")


def test_the_bootstrap_of_tiles_resamples_their_images_each_with_all_its_tiles():
    # two images of two tiles each, f0 and f1 as above on every tile; PaSeR at 2 GFLOP
    # right on every pixel of image a's tiles and on 6 of 10 of b's: a resample of the
    # images gives margins +0.35 (a, a), +0.15 (a, b) or -0.05 (b, b), above 0 in 3 of 4
    f0 = _counts([[5]] * 4, [[10]] * 4, [1.0] * 4)
    f1 = _counts([[8]] * 4, [[10]] * 4, [3.0] * 4)
    paser = _counts([[10], [10], [6], [6]], [[10]] * 4, [2.0] * 4)
    images = FR.bootstrap(paser, {"f0": f0, "f1": f1}, draws=2000, groups=np.array([0, 0, 1, 1]))
    assert (images["images"], images["tiles"]) == (2, 4)
    assert images["margin"] == pytest.approx({"value": 0.15, "low": -0.05, "high": 0.35})
    assert 0.72 < images["share_above"] < 0.78
    tiles = FR.bootstrap(paser, {"f0": f0, "f1": f1}, draws=2000)  # the tiles as if images
    assert "tiles" not in tiles and tiles["share_above"] > 0.9  # 15 of 16: too sure
    assert FR.noise_line(images).startswith(
        "over 2,000 bootstrap resamples of the 2 test images its 4 test tiles were cut from, "
        "each image with all its tiles (95 % intervals)")
    # GFLOP are a mean over the tiles a resample holds: image a has one tile at 1 GFLOP, b
    # three at 3, the cascade 4 on each: Table 2 75 % (a, a), 37.5 % (a, b), 25 % (b, b)
    cheap = _counts([[8]] * 4, [[10]] * 4, [1.0, 3.0, 3.0, 3.0])
    cascade = _counts([[8]] * 4, [[10]] * 4, [4.0] * 4)
    t2 = FR.bootstrap(cheap, {"f0": f0, "f1": f1}, cascade, draws=2000,
                      groups=np.array([7, 3, 3, 3]))["table2"]
    assert t2 == pytest.approx({"value": 37.5, "low": 25.0, "high": 75.0})
    # one image: nothing to resample, no interval (not one of zero width, which would
    # read as certainty), and the line says so
    one = FR.bootstrap(paser, {"f0": f0, "f1": f1}, draws=200, groups=np.zeros(4, int))
    assert (one["images"], one["tiles"], one["draws"]) == (1, 4, 0)
    assert one["margin"]["value"] == pytest.approx(0.15)
    assert np.isnan([one["margin"]["low"], one["margin"]["high"], one["share_above"]]).all()
    assert FR.noise_line(one).startswith("the test split is one image (4 tiles): too few to "
                                         "resample, so there is no interval; PaSeR's IoU minus "
                                         "the single-model frontier's at its GFLOP is +0.1500")
    assert FR.headroom_floor(one) == FR.MIN_HEADROOM
    alone = FR.bootstrap(_counts([[8]], [[10]], [2.0]), {"f0": _counts([[5]], [[10]], [1.0])})
    assert alone["draws"] == 0 and "tiles" not in alone
    with pytest.raises(ValueError, match=r"\(3,\) groups for 4 items"):
        FR.bootstrap(paser, {"f0": f0, "f1": f1}, groups=np.array([0, 0, 1]))


def test_the_bootstrap_of_whole_images_reads_as_before_to_the_last_bit():
    # the resamples of whole images and their mean GFLOP as before tiles were grouped
    # (weights @ gflops / n on C-ordered weights): results.json of such a run must not move
    rng = np.random.default_rng(4)
    n = 40

    def some():
        return _counts(rng.integers(0, 5, (n, 3)), rng.integers(5, 20, (n, 3)),
                       rng.uniform(1, 5, n))

    paser, f0, f1, cascade = some(), some(), some(), some()
    got = FR.bootstrap(paser, {"f0": f0, "f1": f1}, cascade, draws=500, seed=3)
    draw = np.random.default_rng(3)
    weights = np.vstack([np.ones(n), draw.multinomial(n, np.full(n, 1 / n), size=500)])
    saved = 100 * (1 - (weights @ paser["gflops"] / n) / (weights @ cascade["gflops"] / n))
    tail = 100 * (1 - 0.95) / 2
    assert got["table2"]["value"] == saved[0]
    assert [got["table2"]["low"], got["table2"]["high"]] == list(
        np.percentile(saved[1:], [tail, 100 - tail]))


def test_the_frontier_is_read_linearly_between_models_and_a_curve_as_steps():
    frontier = FR.frontier_curve({"f0": (1.0, 0.5), "f1": (4.0, 0.8)})
    # budgets 1, 2, 4 (log-spaced): the frontier mixes f0 and f1 in proportion, 0.6 at 2
    assert FR.areas({"f": frontier}, 1.0, 4.0, count=3)["f"] == pytest.approx((0.5 + 0.6 + 0.8) / 3)
    routed = {"gflops": [1.0, 3.0], "iou": [0.5, 0.7]}  # a router's settings: the best within
    assert FR.areas({"r": routed}, 1.0, 4.0, count=3)["r"] == pytest.approx((0.5 + 0.5 + 0.7) / 3)


def test_the_verdict_reads_the_curve_and_a_curve_above_every_model_saves_against_the_best():
    frontier = FR.frontier_curve({"f0": (1, 0.5), "f1": (4, 0.8)})
    # a curve above the frontier in area (+0.024) but on under half the budgets (48 %) does
    # not pay along its curve, and its point under the frontier does not either
    curve = {"gflops": [1.0, 2.1], "iou": [0.5, 0.8]}
    line = FR.verdict((2.0, 0.55), frontier, None, 1.0, curve, 1.0, 4.0)
    assert line.startswith("routing does not pay on this data") and "48 % of budgets" in line
    # a setting above every model: compared with the best model's GFLOP
    best = FR.frontier_curve({"f0": (1, 0.5), "f1": (3, 0.7)})
    assert FR.curve_saving({"gflops": [2.0], "iou": [0.75]}, best) == (
        pytest.approx(1 / 3), (2.0, 0.75), 3.0)


def test_of_two_models_at_the_same_cost_the_hull_keeps_the_better_even_the_cheapest_two():
    # f1 the same architecture as f0: 4 patches of a quarter of the image cost what f0 does
    # on the whole. f0 is then dominated and no vertex, whether the pair is first or not
    curve = FR.frontier_curve({"f0": (1.0, 0.5), "f1": (1.0, 0.7), "f2": (3.0, 0.9)})
    assert curve["models"] == ["f1", "f2"] and curve["gflops"] == [1.0, 3.0]
    assert FR.hull([(0.5, 0.3), (1.0, 0.5), (1.0, 0.7)]) == [(0.5, 0.3), (1.0, 0.7)]
    v = FR.hull([(1.0, 0.5), (1.0, 0.7), (3.0, 0.9)])
    # 0.6 is what f1 alone gives at 1 GFLOP: f1 on every image, not f0 (which gives 0.5)
    assert FR.frontier_cost(v, 0.6) == pytest.approx(1.0)
    assert FR.frontier_mix(v, curve["models"], 1.0) == "f1 on every image"
    assert FR.frontier_mix(v, curve["models"], 2.0) == "f1 on 50 % of images, f2 on 50 %"
