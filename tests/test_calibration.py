"""Budget calibration: the bias meets the budget on validation, and the run keeps it."""

from __future__ import annotations

import dataclasses
import json
import shutil

import pytest
import torch
from tests.helpers import paser_here

from paser.calibration import Calibration, calibrate, validation_logits
from paser.data import Tensors, load_stage_data
from paser.errors import CheckpointError, ConfigError
from paser.evaluation import evaluate_router
from paser.models import RoutingPolicy, create_model
from paser.patches import PatchGrid
from paser.routing import Router


@pytest.fixture(scope="module")
def setup():
    """An untrained router whose patch-aware policy gives every (image, patch) its own
    logits, and 24 random 32 x 32 images: 384 patches to route."""
    torch.manual_seed(0)
    grid = PatchGrid(4, 4)
    pool = [create_model("unet_small", 1, 3, c0=2, widths=(4, 4)),
            create_model("unet_tiny", 1, 3)]  # f1 cheaper than f2
    policy = RoutingPolicy(16, 3, head="local", grid=(4, 4))
    torch.nn.init.normal_(policy.local.weight, std=3.0)
    router = Router(create_model("unet_tiny", 1, 3), policy, pool, grid, 2).eval()
    gen = torch.Generator().manual_seed(1)
    data = Tensors(torch.rand(24, 1, 32, 32, generator=gen),
                   torch.randint(0, 3, (24, 32, 32), generator=gen).byte(),
                   [str(i) for i in range(24)])
    return router, data


@pytest.mark.parametrize("share", [0.2, 0.5, 0.8])
@pytest.mark.slow
def test_budget_is_met_within_5_percent(setup, share):
    router, data = setup
    costs = router.costs(32, 32)
    everything = costs.fixed + costs.num_patches * costs.patch[-1]
    budget = costs.fixed + share * (everything - costs.fixed)
    cal = calibrate(router, data, 3, budget_gflops=budget, batch_size=8)
    assert 0.95 * budget <= cal.gflops <= budget
    # what evaluation measures with the bias is what the calibration reported
    res = evaluate_router(router, data, 3, 8, bias=cal.tensor())
    assert res["gflops"] == pytest.approx(cal.gflops)
    # and in batches of another size, whose logits differ in the last bits: still within
    assert evaluate_router(router, data, 3, 5, bias=cal.tensor())["gflops"] <= budget
    assert cal.bias[0] == 0.0 and cal.target == {"budget_gflops": budget}


@pytest.mark.slow
def test_a_larger_budget_never_routes_less(setup):
    router, data = setup
    costs = router.costs(32, 32)
    spent = [calibrate(router, data, 3, budget_gflops=costs.fixed + b, batch_size=8).gflops
             for b in (0.2, 0.6, 1.0)]
    assert spent == sorted(spent)


@pytest.mark.slow
def test_share_on_the_largest_model(setup):
    router, data = setup
    cal = calibrate(router, data, 3, max_frac_large=0.25, batch_size=8)
    assert 0.20 <= cal.fractions[-1] <= 0.25
    none = calibrate(router, data, 3, max_frac_large=0.0, batch_size=8)
    assert none.fractions[-1] == 0.0


def test_budget_at_the_fixed_cost_routes_nothing_and_above_everything_routes_all(setup):
    router, data = setup
    costs = router.costs(32, 32)
    low = calibrate(router, data, 3, budget_gflops=costs.fixed, batch_size=8)
    assert low.fractions[0] == 1.0 and low.gflops == pytest.approx(costs.fixed)
    high = calibrate(router, data, 3, budget_gflops=1e6, batch_size=8)
    assert high.fractions[-1] == 1.0
    # a budget over every patch on the largest model bounds nothing, and says so
    dearest = costs.fixed + costs.num_patches * max(costs.patch)
    assert high.target["above_dearest"] == pytest.approx(dearest)
    assert "above_dearest" not in low.target


def test_a_budget_per_megapixel_is_the_budget_of_the_validation_images_size(setup):
    router, data = setup
    costs = router.costs(32, 32)
    per_image = costs.fixed + 0.4 * costs.num_patches * max(costs.patch)
    mp = 32 * 32 / 1e6
    by_image = calibrate(router, data, 3, budget_gflops=per_image, batch_size=8)
    by_area = calibrate(router, data, 3, budget_gflops_per_mp=per_image / mp, batch_size=8)
    assert by_area.bias == by_image.bias and by_area.gflops == by_image.gflops
    assert by_area.target == {"budget_gflops": pytest.approx(per_image),
                              "budget_gflops_per_mp": pytest.approx(per_image / mp)}
    with pytest.raises(ConfigError, match=r"--budget-gflops-per-mp .* is below .* GFLOP per "
                       "megapixel"):
        calibrate(router, data, 3, budget_gflops_per_mp=0.5 * costs.fixed / mp)
    with pytest.raises(ConfigError, match="exactly one budget"):
        calibrate(router, data, 3, budget_gflops=1.0, budget_gflops_per_mp=1.0)


def test_a_budget_below_one_deterministic_pass_says_one_pass(setup):
    """f0 run once (mc_dropout none) was reported as "f0's 1 Monte Carlo passes"."""
    router, data = setup
    once = Router(router.f0, router.policy, list(router.pool), router.grid, 1,
                  mc_dropout="none").eval()
    with pytest.raises(ConfigError, match=r"\(f0's one pass \d") as err:
        calibrate(once, data, 3, budget_gflops=0.5 * once.costs(32, 32).fixed)
    assert "Monte Carlo" not in str(err.value)
    with pytest.raises(ConfigError, match=r"\(f0's 2 Monte Carlo passes \d"):
        calibrate(router, data, 3, budget_gflops=0.5 * router.costs(32, 32).fixed)


def test_unreachable_or_ambiguous_budgets_are_clear_errors(setup):
    router, data = setup
    fixed = router.costs(32, 32).fixed
    with pytest.raises(ConfigError, match="below the .* GFLOP every 32 x 32 image pays"):
        calibrate(router, data, 3, budget_gflops=0.9 * fixed)
    with pytest.raises(ConfigError, match="exactly one budget"):
        calibrate(router, data, 3)
    with pytest.raises(ConfigError, match="exactly one budget"):
        calibrate(router, data, 3, budget_gflops=1.0, max_frac_large=0.5)
    with pytest.raises(ConfigError, match=r"in \[0, 1\]"):
        calibrate(router, data, 3, max_frac_large=1.5)


def test_logits_are_those_of_the_routing_path(setup):
    router, data = setup
    logits = validation_logits(router, data, 8)
    with torch.inference_mode():
        out = router(data.images[:8], mc_seed=0)
    assert torch.equal(logits[:8], out.logits)


@pytest.mark.slow
def test_the_run_keeps_its_calibration_for_segment_and_evaluate(mnist_run, tmp_path):
    from paser import PaSeR

    run = tmp_path / "run"
    shutil.copytree(mnist_run, run)
    model = PaSeR.load(run)
    assert model.calibration is None
    cal = model.calibrate(max_frac_large=0.0)
    assert (run / "calibration.json").is_file()
    saved = json.loads((run / "calibration.json").read_text())  # per megapixel beside
    assert saved["gflops_per_megapixel"] == pytest.approx(
        cal.gflops / (cal.height * cal.width / 1e6))
    again = PaSeR.load(run)
    assert again.calibration == cal
    validation = load_stage_data(again.config, progress=False).validation
    res = again.evaluate(validation)  # with the saved bias: what calibrate measured
    assert res["gflops"] == pytest.approx(cal.gflops) and res["fractions"] == cal.fractions
    assert res["fractions"][-1] == 0.0
    images = validation.images[:4]
    assert torch.equal(again.segment(images).actions,
                       again.segment(images, bias=cal.tensor()).actions)


@pytest.mark.slow  # `paser calibrate` and `paser evaluate` in processes
def test_cli_calibrate(mnist_run, tmp_path):
    run = tmp_path / "run"
    shutil.copytree(mnist_run, run)
    res = paser_here("calibrate", "--run-dir", str(run), "--budget-gflops", "0")
    assert res.returncode == 2 and "below the" in res.stderr and "give at least" in res.stderr
    for alone in ([], ["--max-frac-large", "0.5"]):  # --best-iou alone: what it needs
        res = paser_here("calibrate", "--run-dir", str(run), *alone, "--best-iou")
        assert res.returncode == 2 and "--best-iou goes with --budget-gflops" in res.stderr
    res = paser_here("calibrate", "--run-dir", str(run), "--max-frac-large", "0.5")
    assert res.returncode == 0, res.stderr
    assert "calibrated" in res.stdout and "uncalibrated" in res.stdout
    assert "target: at most 50.0% of patches on the largest model;" in res.stdout
    from paser import PaSeR

    model = PaSeR.load(run)
    assert Calibration.load(run, model.router.policy_digest).target == {"max_frac_large": 0.5}
    torch.nn.init.zeros_(model.router.policy.head.bias)  # as if the run was trained again
    with pytest.raises(CheckpointError, match="made for another policy"):
        Calibration.load(run, model.router.policy_digest)
    saved = json.loads((run / "calibration.json").read_text())
    saved["policy"] = "0" * 64  # made for another policy: `paser calibrate` replaces it
    (run / "calibration.json").write_text(json.dumps(saved))
    res = paser_here("evaluate", "--run-dir", str(run), "--split", "validation")
    assert res.returncode == 2 and "made for another policy" in res.stderr
    # a paser run stopped while it calibrated: segment and evaluate refuse the calibration
    # of before until `paser calibrate` (or paser run) makes one
    steps = run / "steps.json"
    ledger = json.loads(steps.read_text()) if steps.is_file() else {}
    steps.write_text(json.dumps({**ledger, "calibrate": {"started": "x"}}))
    with pytest.raises(CheckpointError, match="calibrate is being trained again"):
        PaSeR.load(run)
    res = paser_here("calibrate", "--run-dir", str(run), "--max-frac-large", "0.3")
    assert res.returncode == 0, res.stderr
    assert PaSeR.load(run).calibration.target == {"max_frac_large": 0.3}
    assert "calibrate" not in json.loads(steps.read_text())
    res = paser_here("calibrate", "--run-dir", str(run), "--max-tvd", "0.1")
    lam = PaSeR.load(run).config.stage2.lam
    assert res.returncode == 0 and ("was trained at lam" in res.stdout) == (lam != 0), lam
    (run / "calibration.json").write_text("{")
    res = paser_here("evaluate", "--run-dir", str(run), "--split", "validation")
    assert res.returncode == 2 and "calibration.json" in res.stderr


@pytest.mark.slow
def test_quality_targets_pick_from_an_exact_sweep(setup):
    from paser.calibration import price_sweep, sweep_actions
    from paser.outcomes import PatchOutcomes

    router, data = setup
    costs = router.costs(32, 32)
    out = PatchOutcomes.build(router, data, 3, 8, torch.device("cpu"), mc_seed=0)
    logits = validation_logits(router, data, 8)
    patch = torch.tensor(costs.patch)
    rel = patch / patch.max()
    ts = price_sweep(logits, rel)
    actions = sweep_actions(logits, rel, ts)
    miou, gflops = out.miou_many(actions), costs.gflops(actions).mean(-1)
    alone = [out.miou(torch.full((24, 16), k)) for k in range(3)]
    top = max(alone)
    # the least GFLOP within 0.01 of the best single model's mIoU, and what evaluation then
    # measures
    cal = calibrate(router, data, 3, iou_within_top=0.01, batch_size=8)
    ok = miou >= top - 0.01
    assert cal.gflops == pytest.approx(float(gflops[ok].min()))
    assert cal.miou >= top - 0.01 - 1e-9 and cal.target["top_miou"] == pytest.approx(top)
    assert cal.target["top_model"] == f"f{alone.index(top)}"
    # the best mIoU within a budget: no swept setting within it scores more, nor the most
    # generous routing within it (the call without best_iou; a helper saw it score more)
    for share in (0.2, 0.5, 0.8):
        budget = costs.fixed + share * (float(gflops.max()) - costs.fixed)
        best = calibrate(router, data, 3, budget_gflops=budget, best_iou=True, batch_size=8)
        plain = calibrate(router, data, 3, budget_gflops=budget, batch_size=8)
        assert best.gflops <= budget
        assert best.target == {"budget_gflops": budget, "best_iou": True}
        assert best.miou >= float(miou[gflops <= budget + 1e-9].max()) - 1e-9
        assert best.miou >= plain.miou - 1e-9
    assert best.describe_target() == {"budget_gflops": f"{budget:g}", "best_iou": "true"}
    assert best.target_text() == (f"a budget of {budget:.4g} GFLOP per image, the best mIoU "
                                  "within it")
    # in words for a line of output; a calibration of before 2026-12-03 names no top model
    words = dataclasses.replace(cal, target={"iou_within_top": 0.01, "top_miou": 0.8})
    assert words.target_text() == ("the least GFLOP within 0.01 mIoU of the best single model "
                                   "(validation mIoU 0.8000)")
    dear = dataclasses.replace(cal, target={"budget_gflops": 12345.6, "above_dearest": 2.5})
    assert dear.target_text() == ("a budget of 12,346 GFLOP per image; more than every patch "
                                  "on the largest model costs (2.5): it bounds nothing")


@pytest.mark.slow
def test_the_tvd_target_moves_the_assignment_at_most_that_far(setup):
    from paser.train.policy import tvd

    router, data = setup
    own = evaluate_router(router, data, 3, 8)
    for limit in (0.0, 0.1, 0.3):
        cal = calibrate(router, data, 3, max_tvd=limit, batch_size=8)
        assert tvd(cal.fractions, own["fractions"]) <= limit + 1e-9
        assert cal.target["max_tvd"] == limit and cal.gflops <= own["gflops"] + 1e-9
    wide = calibrate(router, data, 3, max_tvd=0.3, batch_size=8)
    assert wide.gflops < own["gflops"]  # the budget buys cheaper routing
    with pytest.raises(ConfigError, match="total variation"):
        calibrate(router, data, 3, max_tvd=1.5)


def test_the_best_iou_within_a_budget_is_the_cheaper_of_tied_settings():
    import copy

    from paser.calibration import price_sweep, sweep_actions

    # pointwise models that compute one function: f1 a copy of f0, f2 the same followed by
    # an identity convolution (dearer, and exactly equal), so every routing ties in mIoU
    torch.manual_seed(0)
    f0 = torch.nn.Conv2d(1, 3, 1)
    identity = torch.nn.Conv2d(3, 3, 1, bias=False)
    with torch.no_grad():
        identity.weight.copy_(torch.eye(3)[:, :, None, None])
    pool = [copy.deepcopy(f0), torch.nn.Sequential(copy.deepcopy(f0), identity)]
    policy = RoutingPolicy(16, 3, head="local", grid=(4, 4))
    torch.nn.init.normal_(policy.local.weight, std=3.0)
    router = Router(f0, policy, pool, PatchGrid(4, 4), 1, mc_dropout="none").eval()
    gen = torch.Generator().manual_seed(1)
    data = Tensors(torch.rand(12, 1, 32, 32, generator=gen),
                   torch.randint(0, 3, (12, 32, 32), generator=gen).byte(),
                   [str(i) for i in range(12)])
    costs = router.costs(32, 32)
    logits = validation_logits(router, data, 8)
    rel = torch.tensor(costs.patch) / max(costs.patch)
    gflops = costs.gflops(sweep_actions(logits, rel, price_sweep(logits, rel))).mean(-1)
    assert costs.patch[0] == 0 < costs.patch[1] < costs.patch[2]
    assert len(set(gflops.tolist())) > 3  # the sweep's settings cost differently
    best = calibrate(router, data, 3, budget_gflops=float(gflops.max()), best_iou=True,
                     batch_size=8)
    assert best.gflops == pytest.approx(costs.fixed) and best.fractions[0] == 1.0


def test_max_frac_large_bounds_the_dearest_model_wherever_it_lies_in_the_pool(setup):
    router, data = setup
    flipped = Router(router.f0, router.policy, list(reversed(router.pool)), router.grid, 2).eval()
    assert flipped.costs(32, 32).patch[1] > flipped.costs(32, 32).patch[2]  # f1 the dearest
    assert (
        0.20 <= calibrate(flipped, data, 3, max_frac_large=0.25, batch_size=8).fractions[1] <= 0.25
    )


def test_a_configs_budget_below_the_fixed_cost_names_the_config_key(setup, monkeypatch,
                                                                     tmp_path):
    """`paser run` with operating_point.budget_gflops below f0's and the policy's cost
    failed after training with '--budget-gflops 0.1 is below ...': an option the user had
    not given."""
    from paser.api import PaSeR
    from paser.config import load_config
    from paser.run import calibrate_run

    router, data = setup

    class Trained:  # the run's model, on the fixture's router and images
        def calibrate(self, batch_size, **target):
            return calibrate(router, data, 3, batch_size=batch_size, **target)

    monkeypatch.setattr(PaSeR, "load", lambda *args, **kwargs: Trained())
    cfg = load_config(preset="battery-quick", overrides=[
        "operating_point.iou_within_top=null", "operating_point.budget_gflops=0.001"])
    with pytest.raises(ConfigError) as err:
        calibrate_run(cfg, tmp_path, echo=lambda line: None)
    fixed = router.costs(32, 32).fixed
    assert str(err.value).startswith(f"operating_point.budget_gflops 0.001 is below the "
                                     f"{fixed:.6g} GFLOP every 32 x 32 image pays")
    assert "--budget-gflops" not in str(err.value)
    assert str(err.value).endswith("run the same command again with it set")


def test_a_configs_budget_below_the_fixed_cost_is_refused_before_training(tmp_path):
    """The same budget, refused by stage 1 before it trains anything: the models' FLOPs do
    not depend on their weights, and calibrating after hours of training to learn that the
    budget cannot be met wasted them."""
    from tests.helpers import TINY_DATA

    from paser.config import load_config
    from paser.patches import PatchGrid
    from paser.train.pretrain import pretrain, probe_budget

    cfg = load_config(preset="battery-quick", overrides=[
        *TINY_DATA, f"data.cache_dir={tmp_path / 'data'}",
        "operating_point.iou_within_top=null", "operating_point.budget_gflops=0.0001"])
    with pytest.raises(ConfigError) as err:
        pretrain(cfg, tmp_path / "run", show_progress=False)
    message = str(err.value)
    assert message.startswith("key 'operating_point.budget_gflops': 0.0001 is below the ")
    assert "GFLOP every 32 x 32 image pays" in message and "(f0's one pass " in message
    assert message.endswith("give at least that; nothing was trained")
    assert not list((tmp_path / "run").glob("checkpoints/*.pt"))
    # a budget f0 and the policy fit in trains as before (nothing refused up front)
    fits = load_config(preset="battery-quick", overrides=[
        *TINY_DATA, "operating_point.iou_within_top=null", "operating_point.budget_gflops=1"])
    probe_budget(fits, PatchGrid(2, 2, halo=8), 32, 32)


def test_the_budget_probe_builds_f0_and_the_policy_alone_and_refuses_as_calibration(
        monkeypatch):
    """It built and counted every pool model too, which the fixed cost leaves out: 2.5 s
    of its 2.6 s on cityscapes-segformer's SegFormer pool, in every training process."""
    from tests.helpers import TINY_DATA

    import paser.train.pretrain as P
    from paser.checkpoints import build_model, make_policy, model_roles
    from paser.config import load_config

    overrides = [*TINY_DATA, "operating_point.iou_within_top=null", "mc_dropout=last"]
    cfg = load_config(preset="battery-quick", overrides=overrides)
    grid = PatchGrid(*cfg.grid, halo=cfg.halo)
    # what calibration measures: the router of every model, as a trained run loads it
    models = [build_model(cfg, spec, initial=False) for _, spec in model_roles(cfg)]
    router = Router(models[0], make_policy(cfg, len(models)), models[1:], grid,
                    cfg.mc_samples, cfg.models.in_channels, cfg.mc_dropout,
                    state=cfg.stage2.state, num_classes=cfg.models.num_classes)
    fixed = router.costs(32, 32).fixed
    built = []
    monkeypatch.setattr(P, "build_model", lambda cfg, spec, **kw: built.append(spec)
                        or build_model(cfg, spec, **kw))

    def probe(budget: float) -> None:
        P.probe_budget(load_config(preset="battery-quick", overrides=[
            *overrides, f"operating_point.budget_gflops={budget!r}"]), grid, 32, 32)

    probe(fixed)  # what calibration accepts
    with pytest.raises(ConfigError, match="budget_gflops': .* is below the .* GFLOP every "
                       "32 x 32 image pays"):
        probe(fixed * (1 - 1e-6))
    assert built == [cfg.models.f0, cfg.models.f0]


@pytest.mark.slow  # `paser calibrate` in this process, on a copy of a finished run
def test_cli_calibrate_says_it_replaces_the_calibration_the_report_measured(mnist_run, tmp_path):
    """The report measured PaSeR at the run's calibration; `paser calibrate` to another
    target replaced it with only "saved to ...", and evaluate's "PaSeR (calibrated)" row then
    no longer matched the report's PaSeR."""
    from paser.experiments.finished import models_state

    run = tmp_path / "run"
    shutil.copytree(mnist_run, run)
    res = paser_here("calibrate", "--run-dir", str(run), "--max-frac-large", "0.5")
    assert res.returncode == 0, res.stderr
    assert "note: this replaces" not in res.stdout  # the run had none: nothing replaced
    results = json.loads((run / "results.json").read_text())  # as paser run writes it again
    (run / "results.json").write_text(json.dumps(results | {"measured_on": models_state(run)}))
    saved = json.loads((run / "calibration.json").read_text())
    res = paser_here("calibrate", "--run-dir", str(run), "--max-frac-large", "0.25")
    assert res.returncode == 0, res.stderr
    assert (f"note: this replaces the calibration at which report.md and results.json measured "
            f"PaSeR (at most 50.0% of patches on the largest model: validation mIoU "
            f"{saved['miou']:.4f} at {saved['gflops']:.3f} GFLOP per image): their PaSeR rows "
            "are not what `paser segment` and `paser evaluate` now route at; the next `paser "
            "run` writes the report again at this one") in res.stdout
    res = paser_here("calibrate", "--run-dir", str(run), "--max-frac-large", "0.2")
    assert "note: this replaces" not in res.stdout  # the report was of neither
    res = paser_here("evaluate", "--run-dir", str(run), "--split", "validation")
    assert res.returncode == 0, res.stderr
    assert res.stdout.splitlines()[1] == ("PaSeR calibrated on validation to at most 20.0% of "
                                          "patches on the largest model (calibration.json)")


@pytest.mark.slow  # `paser evaluate` in this process, on a finished noisy-MNIST run
def test_cli_evaluate_runs_on_a_dataset_built_in_memory_and_agrees_with_the_report(mnist_run):
    """`paser evaluate` on a `--preset mnist-noisy` run (the paper's R4) stopped with "built
    in memory, not read from files: use load_stage_data": it opened every split as files."""
    results = json.loads((mnist_run / "results.json").read_text())
    res = paser_here("evaluate", "--run-dir", str(mnist_run))
    assert res.returncode == 0, res.stderr
    lines = res.stdout.splitlines()
    assert lines[0].startswith("test split, 12 images of 32 x 32; GFLOP per image "
                               "(torch.utils.flop_counter; one multiply-add counts as 2 FLOPs;")
    rows = {line[:20].strip(): line[20:].split() for line in lines[2:6]}
    for row, method in (("PaSeR", "PaSeR"), ("f1 on all patches", "f1")):
        assert rows[row][:2] == [f"{results['methods'][method]['iou']:.4f}",
                                 f"{results['methods'][method]['gflops']:.3f}"], (row, rows)
    train = paser_here("evaluate", "--run-dir", str(mnist_run), "--split", "train")
    assert train.returncode == 0, train.stderr
    assert train.stdout.startswith("train split, 24 images of 32 x 32;")
    bad = paser_here("evaluate", "--run-dir", str(mnist_run), "--split", "val")
    assert bad.returncode == 2
    assert bad.stderr == "error: unknown split 'val'; use one of train, validation, test\n"
