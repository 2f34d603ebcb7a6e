"""Sensitivity (paper R5): the Welch t-test plumbing, patch entropies, the lam sweep on a
tiny finished run, and what lands in results.json, report.md and figures/."""

import json

import numpy as np
import pytest
import torch
from tests.helpers import IOU_ABS

from paser.config import load_config
from paser.errors import CheckpointError
from paser.experiments import sensitivity as sens


def test_welch_is_scipys_unequal_variance_test_and_finds_a_shift():
    from scipy import stats

    rng = np.random.default_rng(0)
    a, b = rng.normal(0, 1, 200), rng.normal(0, 3, 150)
    res = sens.welch(a, b)
    ref = stats.ttest_ind(a, b, equal_var=False)
    assert res["p_value"] == pytest.approx(ref.pvalue) and res["t_statistic"] == pytest.approx(
        ref.statistic)
    # by hand: t = (mean_a - mean_b) / sqrt(var_a / n_a + var_b / n_b)
    t = (a.mean() - b.mean()) / np.sqrt(a.var(ddof=1) / 200 + b.var(ddof=1) / 150)
    assert res["t_statistic"] == pytest.approx(t)
    assert sens.welch(a, a + 1.0)["p_value"] < 1e-6  # a real shift is found


def test_a_p_value_under_0_0001_is_not_printed_as_0():
    """On a run of real-like slices the T study printed 'Welch p = 0.0000' (p = 3.0e-12)
    in its output, report.md and mc_entropy.png, as if the test were certain."""
    from paser.experiments.report import p_text

    assert p_text(0.69861) == "0.6986" and p_text(0.0001) == "0.0001"
    assert p_text(8.04e-7) == "8.0e-07" and p_text(0.0) == "0.0e+00"


def test_no_finished_run_is_a_clear_error(tmp_path):
    with pytest.raises(CheckpointError, match="no results.json"):
        sens.run_sensitivity(tmp_path)


def test_a_results_json_that_is_no_report_is_refused_before_the_sweep(mnist_run, tmp_path,
                                                                       monkeypatch):
    """A results.json without 'methods' (not a report of paser run) ran the whole sweep and
    then failed in the report with a traceback, KeyError: 'methods'."""
    import shutil

    run_dir = tmp_path / "run"
    shutil.copytree(mnist_run, run_dir)
    (run_dir / "results.json").write_text("{}")
    trained = []
    monkeypatch.setattr(sens, "fit_policy", lambda *args, **kwargs: trained.append(1))
    with pytest.raises(CheckpointError, match=r"results.json: not a report of `paser run` \(no "
                       r"'methods'\); write the report again first: paser run --run-dir "):
        sens.run_sensitivity(run_dir, lams=[0.0], samples=(2, 3), epochs=1,
                             show_progress=False)
    assert trained == [] and (run_dir / "results.json").read_text() == "{}"


@pytest.mark.slow
def test_sensitivity_writes_the_sweep_and_the_t_test_into_the_run(mnist_run, monkeypatch):
    trained_at, fit = [], sens.fit_policy

    def spy(cfg, policy, rl, val, cost, lam, *args, **kwargs):
        trained_at.append(lam)
        return fit(cfg, policy, rl, val, cost, lam, *args, **kwargs)

    monkeypatch.setattr(sens, "fit_policy", spy)
    out = sens.run_sensitivity(mnist_run, lams=[0.0, 1.0], samples=(2, 6), epochs=2,
                               show_progress=False)
    assert trained_at == [0.0, 1.0]  # each policy trained at its own price (the routing
    # below cannot show it: this tiny run keeps f0 at any price)
    results = json.loads((mnist_run / "results.json").read_text())
    free, dear = out["lam_sweep"]
    assert (free["lam"], dear["lam"]) == (0.0, 1.0)
    # the tiny run's f0 is barely trained and its entropy is flat: at either price the
    # policy keeps every patch on f0 (two runs agreed to the last digit)
    assert free["fractions"] == dear["fractions"] == [1.0, 0.0, 0.0]
    assert free["iou"] == dear["iou"] == pytest.approx(0.0431, abs=IOU_ABS)
    for r in (free, dear):  # f0 everywhere: f0's test mIoU at the fixed cost, nothing paid
        assert r["iou"] == pytest.approx(results["methods"]["f0 (MC)"]["iou"], abs=1e-9)
        assert r["mean_cost"] == 0.0 and r["gflops"] == pytest.approx(results["costs"]["fixed"])
    assert dear["gflops"] <= free["gflops"]  # a dearer price never buys more
    # T = 2 and T = 6 passes give nearly the same mean entropy per patch, near log 2 = 0.693
    assert out["entropy"]["2"]["n"] == out["entropy"]["6"]["n"] == 12  # 12 images, P = 1
    assert out["entropy"]["2"]["mean"] == pytest.approx(0.6450, abs=0.005)
    assert out["entropy"]["6"]["mean"] == pytest.approx(0.6472, abs=0.005)
    # 0.002 nats apart, but on so flat a map (std 0.0008) that the t-test finds it (p 8e-7;
    # with the weights of a single seed for every model it was 0.377)
    assert out["p_value"] < 0.01
    stored = dict(results["experiments"]["sensitivity"])
    assert stored.pop("measured_on") and stored == json.loads(json.dumps(out))
    text = (mnist_run / "report.md").read_text()
    assert "Sensitivity to lam" in text and f"p = {out['p_value']:.1e}" in text  # under 1e-4
    # the run routes with every dropout on: the T study measures that, and says so
    assert out["dropout"] == out["run_dropout"] == "all"
    assert "T = 2 against T = 6, dropout all as the run routes: " in text
    for fig in ("sensitivity_lam.png", "mc_entropy.png"):
        assert (mnist_run / "figures" / fig).stat().st_size > 1000


def test_the_lam_sweep_learns_from_the_images_stage_2_learns_from(mnist_run, monkeypatch):
    """Each lam's policy is trained as in stage 2: on D_rl in stage2.views views (and D_ft
    under train_on rl+ft), not on D_rl alone, which gave battery-quick's sweep 316 training
    patches where its stage 2 learns from 632."""
    from paser.checkpoints import build_router
    from paser.data import load_stage_data

    cfg = load_config(config_file=mnist_run / "config.yaml", overrides=["stage2.views=2"])
    router = build_router(cfg, mnist_run, torch.device("cpu")).eval()
    data = load_stage_data(cfg, progress=False, run_dir=mnist_run)
    learnt_from, fit = [], sens.fit_policy

    def spy(cfg, policy, train, *args, **kwargs):
        learnt_from.append(len(train.state))
        return fit(cfg, policy, train, *args, **kwargs)

    monkeypatch.setattr(sens, "fit_policy", spy)
    sens.lam_sweep(cfg, router, data, [0.0, 0.5], epochs=1, show_progress=False)
    assert len(data.rl) == 8  # the image and its mirror: 16 training images for each lam
    assert learnt_from == [16, 16]


def test_the_lam_sweep_sees_the_test_split_as_table_1_and_segment_do(mnist_run, monkeypatch):
    """The test split's outcomes draw f0's dropout masks as inference and Table 1 do
    (mc_seed 0), not from the global generator: on battery-paper (T = 5) a policy keeping
    every patch on f0 scored 0.1934 in the sweep where Table 1's f0 (MC) scored 0.1861."""
    from paser.checkpoints import build_router
    from paser.data import load_stage_data
    from paser.outcomes import PatchOutcomes

    cfg = load_config(config_file=mnist_run / "config.yaml")
    router = build_router(cfg, mnist_run, torch.device("cpu")).eval()
    data = load_stage_data(cfg, progress=False, run_dir=mnist_run)
    seen = []

    def keep_f0(policy, states, batch):  # every patch on f0, whatever the policy says
        seen.append(states)
        return torch.zeros(len(states), router.grid.num_patches, dtype=torch.long)

    monkeypatch.setattr(sens, "greedy_actions", keep_f0)
    torch.manual_seed(123)  # the global generator's draw must not matter
    (row,) = sens.lam_sweep(cfg, router, data, [0.5], epochs=1, show_progress=False)
    as_table_1 = PatchOutcomes.build(router, data.test, cfg.models.num_classes,
                                     cfg.baselines.timing_batch, torch.device("cpu"), mc_seed=0)
    assert cfg.mc_samples == 2 and cfg.mc_dropout == "all"  # f0's passes differ by their masks
    assert torch.equal(seen[0], as_table_1.state)
    results = json.loads((mnist_run / "results.json").read_text())
    assert row["iou"] == pytest.approx(results["methods"]["f0 (MC)"]["iou"], abs=1e-9)


def test_a_run_without_monte_carlo_is_studied_with_every_dropout_on_and_told_so():
    from paser.experiments.report import dropout_said

    assert sens.entropy_dropout("none") == "all"  # T passes of none would all be alike
    assert sens.entropy_dropout("last") == "last" and sens.entropy_dropout("all") == "all"
    said = dropout_said({"dropout": "all", "run_dropout": "none"})
    assert said == (", dropout all: the run's f0 routes with mc_dropout none (one "
                    "deterministic pass), so this measures the paper's Monte Carlo dropout, "
                    "not what the run uses")


def test_the_same_number_of_passes_twice_is_refused(mnist_run, tmp_path):
    """--samples 5 --samples 5 compared one seeded entropy map with itself and reported
    'Welch p = 1.0000' as if T made no difference."""
    from tests.helpers import paser_here

    from paser.errors import ConfigError

    res = paser_here("experiment", "sensitivity", "--run-dir", str(tmp_path), "--samples", "5",
                     "--samples", "5")
    assert res.returncode == 2 and res.stdout == ""
    assert res.stderr == ("error: --samples [5, 5]: give two different numbers of passes, each "
                          "at least 1 (e.g. --samples 5 --samples 20)\n")
    before = (mnist_run / "results.json").read_text()
    with pytest.raises(ConfigError, match=r"samples \[3, 3\]: give two different numbers"):
        sens.run_sensitivity(mnist_run, lams=[0.0], samples=(3, 3), epochs=1,
                             show_progress=False)
    assert (mnist_run / "results.json").read_text() == before  # nothing measured or written


def test_patch_entropies_are_per_patch_means_and_seeded(mnist_run):
    from paser.checkpoints import build_router
    from paser.data import load_stage_data

    cfg = load_config(config_file=mnist_run / "config.yaml")
    router = build_router(cfg, mnist_run, torch.device("cpu")).eval()
    test = load_stage_data(cfg).test
    from paser.uncertainty import mc_predict, seeded

    e = sens.patch_entropies(router, test, 3, len(test), seed=1)
    assert e.shape == (len(test),) and (e >= 0).all() and (e <= np.log(2) + 1e-6).all()
    with torch.inference_mode(), seeded(1, torch.device("cpu")):  # one patch = the image
        by_hand = mc_predict(router.f0, router.grid.pad(test.images), 3).entropy.mean((1, 2))
    assert torch.allclose(e, by_hand)
    assert torch.equal(e, sens.patch_entropies(router, test, 3, len(test), seed=1))


@pytest.mark.slow  # `paser experiment` in processes
def test_cli_refuses_a_lam_outside_0_1_and_a_folder_without_a_run(tmp_path):
    from tests.helpers import paser_here

    res = paser_here("experiment", "sensitivity", "--run-dir", str(tmp_path), "--lam", "1.5")
    assert res.returncode == 2 and "every lam must lie in [0, 1]" in res.stderr
    res = paser_here("experiment", "sensitivity", "--run-dir", str(tmp_path))
    assert res.returncode == 2 and "no results.json" in res.stderr
    assert len(res.stderr.strip().splitlines()) == 1


def test_cli_states_the_split_the_flop_convention_and_the_cost_of_its_table(monkeypatch, tmp_path):
    """evaluate and calibrate name the FLOP convention beside every GFLOP; the lam sweep's
    table printed GFLOP and a mean cost with no split, convention or unit."""
    from tests.helpers import paser_here

    out = {"lam_sweep": [{"lam": 0.0, "iou": 0.8638, "mean_cost": 0.6812, "gflops": 3.366},
                         {"lam": 0.5, "iou": 0.8003, "mean_cost": 0.0, "gflops": 0.171}],
           "cost": "flops", "dropout": "all", "run_dropout": "none", "p_value": 0.9155}
    monkeypatch.setattr(sens, "run_sensitivity", lambda *args: out)
    res = paser_here("experiment", "sensitivity", "--run-dir", str(tmp_path), "--lam", "0",
                     "--lam", "0.5")
    assert res.returncode == 0, res.stderr
    lines = res.stdout.splitlines()
    assert lines[0] == ("a policy per lam, greedy on the test split; GFLOP per image "
                        "(torch.utils.flop_counter; one multiply-add counts as 2 FLOPs; f0's "
                        "passes and the policy included); mean cost: the reward's c(a) per "
                        "patch (flops)")
    assert lines[1:4] == ["  lam    mIoU  mean cost    GFLOP",
                          "    0  0.8638     0.6812    3.366",
                          "  0.5  0.8003     0.0000    0.171"]
