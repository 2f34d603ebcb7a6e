"""`paser run`: the whole job on a tiny set, its report, and skipping what is done."""

import csv
import json

import pytest
from tests.helpers import IOU_ABS, TINY, TINY_DATA, single_model_routes

from paser.config import load_config
from paser.run import fingerprints, in_one_process, run

BASELINES = [
    "baselines.matphase.members=[{name: unet_tiny}, {name: unet_tiny}]",
    "baselines.matphase.fusion_channels=4", "baselines.timing_batch=2",
    "baselines.cascade_points=3", "baselines.curve_points=3",
    "baselines.paper.stage2.epochs=2", "baselines.paper.stage2.batch_size=2",
    "baselines.paper.stage3.epochs=1", "baselines.paper.stage3.batch_size=2",
]
ROUTED = ["PaSeR-RandPol", "IDK-Cascade", "IDK-Cascade (IoU match)", "Oracle"]
SINGLE = ["MatPhase", "f0", "f0 (MC)", "f1", "f2"]
# battery-quick as shipped: the paper's method beside PaSeR, and the operating point at f2's
# IoU (f1's GFLOP only where f1 alone costs more than f0 and the router)
KEYS = ["PaSeR", "PaSeR (paper)", "PaSeR (best model's IoU - 0.005)", *ROUTED, *SINGLE]
#: each method's test mIoU in the job (two runs agreed to the last digit). One epoch on 9
#: images: f0, distilled from f2, already beats f1 and f2, so routing keeps every patch on it
IOU = {"PaSeR": 0.2167, "PaSeR (paper)": 0.0511, "PaSeR (best model's IoU - 0.005)": 0.2167,
       "PaSeR-RandPol": 0.1326, "IDK-Cascade": 0.2747, "IDK-Cascade (IoU match)": 0.2167,
       "Oracle": 0.2747, "MatPhase": 0.1682, "f0": 0.2167, "f0 (MC)": 0.2167, "f1": 0.0585,
       "f2": 0.0462}


# a full `paser run` (about 20 s): every test that reads it is marked slow
@pytest.fixture(scope="module")
def job(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("run")
    cfg = load_config(preset="battery-quick",
                      overrides=[*TINY_DATA, *BASELINES, f"data.cache_dir={tmp / 'c'}"])
    lines: list[str] = []
    results = run(cfg, tmp / "run", show_progress=False, echo=lines.append)
    return tmp / "run", cfg, results, lines


@pytest.mark.slow
def test_results_hold_every_method_with_the_same_fields(job):
    run_dir, cfg, results, _ = job
    assert json.loads((run_dir / "results.json").read_text()) == results
    assert list(results["methods"]) == KEYS
    assert {k: m["iou"] for k, m in results["methods"].items()} == pytest.approx(IOU, abs=IOU_ABS)
    for name, m in results["methods"].items():
        assert m["gflops"] > 0 and m["ms_per_image"] > 0
        assert m["iou_per_gflop"] == pytest.approx(m["iou"] / m["gflops"])
        if name.startswith("PaSeR") or name in ROUTED:
            assert sum(m["fractions"]) == pytest.approx(1.0)
    for key in ("flop_convention", "device", "preset", "lam", "seed"):
        assert key in results
    assert results["data_seeds"] == {"split": 42, "synthetic": 0}  # what drew the data
    costs = results["costs"]
    # f0's one pass in 64-bit as the table holds it (in 32-bit it moved with the batch size)
    assert results["methods"]["f0"]["gflops"] == pytest.approx(costs["f0_pass"], rel=1e-12)
    methods = results["methods"]
    # single models cost what their tables say: f0 one pass, f0 (MC) T passes, f2 all patches
    assert methods["f0"]["gflops"] == pytest.approx(costs["f0_pass"])
    assert methods["f0 (MC)"]["gflops"] == pytest.approx(costs["f0_mc"])
    assert methods["f2"]["gflops"] == pytest.approx(costs["patch"][2] * costs["num_patches"])
    if methods["f2"]["iou"] > methods["f0"]["iou"]:  # a gap to recover (else none: None)
        assert methods["f2"]["gap_recovered"] == pytest.approx(1.0)
        assert methods["f0"]["gap_recovered"] == pytest.approx(0.0)
    else:
        assert methods["f2"]["gap_recovered"] is None is methods["f0"]["gap_recovered"]
    # the oracle knows the labels: no policy over this pool gets a higher reward, and at the
    # same lam its routed IoU is at least f0's
    assert methods["Oracle"]["iou"] >= methods["f0 (MC)"]["iou"] - 1e-9
    assert methods["Oracle"]["iou"] >= methods["PaSeR"]["iou"] - 1e-9  # the learnt router's ceiling
    # a method that sends every patch to one model scores that model's IoU
    assert single_model_routes(methods) == ["PaSeR", "PaSeR (best model's IoU - 0.005)",
                                            "IDK-Cascade (IoU match)"]
    t2 = results["table2"]
    ratio = methods["PaSeR"]["gflops"] / methods["IDK-Cascade (IoU match)"]["gflops"]
    assert t2["flops_saved_pct"] == pytest.approx(100 * (1 - ratio))


@pytest.mark.slow
def test_report_files(job):
    run_dir, _, results, lines = job
    rows = list(csv.DictReader((run_dir / "results.csv").open()))
    assert [r["method"] for r in rows] == KEYS
    assert float(rows[0]["iou"]) == pytest.approx(results["methods"]["PaSeR"]["iou"])
    assert float(rows[0]["iou_carbon"]) == pytest.approx(results["methods"]["PaSeR"]["per_class"][1])
    text = (run_dir / "report.md").read_text()
    assert "Table 1" in text and "Table 2" in text and "| IDK-Cascade (IoU match) |" in text
    assert "; seed 0 (data: split seed 42, synthetic seed 0);" in text
    # each table says which split its figures are of (the routing shares and the curve
    # areas are of the test split, as Table 1 is)
    assert "\n## Routing: share of test patches per model\n" in text
    assert "\n## The routers against the frontier and the oracle (test split)\n" in text
    # PaSeR (paper)'s stage 3 tunes a pool of its own, which its figures are of
    assert ("(stages 2 and 3 in paper/), whose stage 3 fine-tunes its own copy of f1..fK (1 "
            "epoch): its row, its curve and its rank correlation are of that pool") in text
    # the table of PaSeR's points gives each point's IoU margin, not an area
    assert "| method | GFLOP | IoU | frontier | IoU - frontier | IDK-Cascade | Oracle |" in text
    # each class's IoU: the run's class names, and the mIoU is their mean
    assert results["classes"] == ["pore", "carbon", "nickel"]
    for name in ("PaSeR", "IDK-Cascade", "Oracle", "f0", "f1", "f2"):
        m = results["methods"][name]
        present = [v for v in m["per_class"] if v is not None]
        assert m["iou"] == pytest.approx(sum(present) / len(present))
    row = results["methods"]["PaSeR"]["per_class"]
    assert "| class | PaSeR | PaSeR (paper) | IDK-Cascade | Oracle |" in text
    assert f"| carbon | {row[1]:.4f} |" in text
    assert any("Table 1" in line for line in lines)  # printed as well
    for fig in ("iou_vs_gflop.png", "qualitative.png"):
        assert (run_dir / "figures" / fig).stat().st_size > 1000


@pytest.mark.slow
def test_the_report_measures_paser_against_the_single_model_frontier(job):
    import subprocess
    import sys
    from pathlib import Path

    from paser import frontier as FR
    from paser.experiments.main import router_areas

    run_dir, cfg, results, _ = job
    m = results["methods"]
    frontier = results["curves"]["Frontier"]
    # the frontier is the hull of the single models, read linearly between them
    assert frontier == FR.frontier_curve({k: (m[k]["gflops"], m[k]["iou"])
                                          for k in ("f0", "f1", "f2")})
    lo, hi = results["curve_range"]
    assert lo == pytest.approx(results["costs"]["fixed"]) and hi == pytest.approx(m["f2"]["gflops"])
    # a router's curve starts from f0's point: below its fixed cost a user runs f0 alone
    routers = {"PaSeR", "PaSeR (paper)", "IDK-Cascade"}
    areas, above = router_areas(results["curves"], sorted(routers),
                                (m["f0"]["gflops"], m["f0"]["iou"]), lo, hi)
    assert results["curve_areas"] == pytest.approx(areas)
    assert results["share_above_frontier"] == pytest.approx(above)
    assert set(above) == routers | {"Oracle", "Oracle (other views)"}
    # the report gives each router one area, in the routers' table and in the curves' list
    text = (run_dir / "report.md").read_text()
    for name in routers:
        assert f"| {name} | {areas[name]:.4f} |" in text and f"- {name}: {areas[name]:.4f}" in text
    # every router's share of the oracle's headroom and its rank correlation with the gains
    assert set(results["headroom_captured"]) == routers == set(results["rank_correlation"])
    assert set(results["reachable_captured"]) == routers
    assert all(-1 <= v <= 1 for v in results["rank_correlation"].values())
    every = results["curve_areas"]  # each share of (router - frontier) / (oracle - frontier)
    for name in routers:
        assert results["headroom_captured"][name] == FR.headroom_captured(
            every[name], every["Frontier"], every["Oracle"])
        assert results["reachable_captured"][name] == FR.headroom_captured(
            every[name], every["Frontier"], every["Oracle (other views)"])
    # the cascade ranks the test patches by f0's entropy on them
    import torch

    from paser.api import PaSeR
    from paser.experiments.curves import rank_correlation
    from paser.experiments.finished import open_finished
    from paser.outcomes import PatchOutcomes

    test_out = PatchOutcomes.build(PaSeR.load(run_dir, device="cpu").router,
                                   open_finished(run_dir, show_progress=False).data.test,
                                   cfg.models.num_classes, 2, torch.device("cpu"), mc_seed=0)
    assert results["rank_correlation"]["IDK-Cascade"] == pytest.approx(
        rank_correlation(test_out.entropy[..., 0], test_out))
    # PaSeR (paper)'s stage 3 fine-tunes its own copy of the pool: it is ranked against the
    # gains of the pool it routes to (it was ranked against the run's, whose gains differ)
    from paser.experiments.curves import escalation, logits_on
    from paser.train.paper import paper_dir

    paper = PaSeR.load(paper_dir(run_dir), device="cpu").router
    paper_out = PatchOutcomes.build(paper, open_finished(run_dir, show_progress=False).data.test,
                                    cfg.models.num_classes, 2, torch.device("cpu"), mc_seed=0)
    preference = escalation(logits_on(paper, paper_out.state, 2))
    # the two pools' gains differ (on 8 test patches the two correlations can still tie)
    assert not torch.equal(paper_out.dataset_gain(), test_out.dataset_gain())
    assert results["rank_correlation"]["PaSeR (paper)"] == pytest.approx(
        rank_correlation(preference, paper_out))
    # the regret rows: at each PaSeR point, the frontier, cascade and oracle there
    rows = {r["method"]: r for r in results["regret"]}
    assert set(rows) == {"PaSeR", "PaSeR (paper)", "PaSeR (best model's IoU - 0.005)"}
    p = rows["PaSeR"]
    assert p["frontier"] == pytest.approx(FR.frontier_at(
        list(zip(frontier["gflops"], frontier["iou"], strict=True)), m["PaSeR"]["gflops"]))
    assert p["above_frontier"] == pytest.approx(m["PaSeR"]["iou"] - p["frontier"])
    # the verdict users decide from, in the report and the printed summary
    assert results["verdict"].startswith("routing ")
    assert f"**Verdict: {results['verdict']}.**" in text
    # and beside it, the trained router against the training-free cascade, from the same figures
    areas = results["curve_areas"]
    assert results["versus_cascade"] == FR.versus_cascade(
        areas["PaSeR"] - areas["IDK-Cascade"], results["headroom_captured"]["PaSeR"],
        results["headroom_captured"]["IDK-Cascade"], results["table2"]["flops_saved_pct"],
        m["IDK-Cascade (IoU match)"]["iou"] >= m["PaSeR"]["iou"], None,
        results["curve_areas_chosen_on_validation"]["PaSeR"]
        - results["curve_areas_chosen_on_validation"]["IDK-Cascade"])
    assert set(results["curve_areas_chosen_on_validation"]) == {"PaSeR", "IDK-Cascade"}
    assert f"Against the cascade: {results['versus_cascade']}." in text
    assert "## Against the single-model frontier" in text and "## The pool" in text
    assert "## The routers against the frontier and the oracle" in text
    # PaSeR runs at its calibrated operating point; the paper's method beside it
    cal = json.loads((run_dir / "calibration.json").read_text())
    assert cal["target"]["iou_within_top"] == 0.005
    assert (run_dir / "paper" / "checkpoints" / "stage3.pt").is_file()
    assert results["pool"]["models"]["f2"]["epochs"] == 1
    # battery-quick's precision auto, with the tests' PASER_BF16=0: 32-bit, and no note of bf16
    assert results["pool"]["precision"] == "32-true"
    assert not any("autocast" in note for note in results["notes"])
    # every ablation row trained a policy and was scored on validation and test
    ablation = results["ablation"]
    names = [r["name"] for r in ablation["rows"]]
    assert names[0] == "this run" and "objective reinforce" in names
    assert "uncertainty T=5 all entropy (paper)" in names and "state image" in names
    assert all(r["seconds"] >= 0 and r["fixed_gflops"] > 0 for r in ablation["rows"])
    # battery-quick's router learns from D_rl and D_ft; the variant on D_rl alone from fewer
    rows = {r["name"]: r for r in ablation["rows"]}
    assert rows["trained on D_rl only"]["train_patches"] < rows["this run"]["train_patches"]
    assert "## Ablation" in text
    # the independent check of the shared tools reads the same results
    tool = Path(__file__).resolve().parents[2] / "shared" / "tools" / "frontier.py"
    if tool.is_file():
        res = subprocess.run([sys.executable, str(tool), str(run_dir)], capture_output=True,
                             text=True, timeout=60)
        assert f"PaSeR {m['PaSeR']['iou']:.4f}" in res.stdout


def test_paser_run_trains_in_one_process_with_the_configs_precision():
    cfg = load_config(preset="battery-quick", overrides=[
        "distributed.devices=2", "distributed.num_nodes=2", "distributed.precision=bf16-mixed"])
    one = in_one_process(cfg).distributed
    assert (one.devices, one.num_nodes, one.precision) == (1, 1, "bf16-mixed")


def test_a_finished_16_mixed_run_writes_its_report_again_on_the_cpu(tmp_path, monkeypatch):
    """A GPU run of 16-mixed, its report written again on a CPU: stage 1 and the baselines
    (the steps that train at the precision) finished, so nothing trains in 16-mixed and
    `paser run` goes on (it refused with 'precision 16-mixed ... needs CUDA'); one that
    would train stage 1 is still refused, before its run folder is made."""
    import paser.run
    from paser.config import save_config
    from paser.errors import ConfigError
    from paser.run import Steps, fingerprint_variants

    class Went(Exception):
        """run() got past its check of the devices."""

    def went(cfg):
        raise Went

    monkeypatch.setattr(paser.run, "setup", went)
    cfg = load_config(preset="battery-quick", overrides=[
        "device=cpu", "distributed.precision=16-mixed", f"data.cache_dir={tmp_path / 'c'}"])
    with pytest.raises(ConfigError, match="precision 16-mixed .* needs CUDA"):
        run(cfg, tmp_path / "new", show_progress=False, echo=lambda line: None)
    assert not (tmp_path / "new").exists()
    done = tmp_path / "done"
    done.mkdir()
    save_config(cfg, done / "config.yaml")
    fps = fingerprint_variants(cfg)[0]
    steps = Steps(done)
    steps.mark("stage1", fps["stage1"])
    with pytest.raises(ConfigError, match="needs CUDA"):  # the baselines would train
        run(cfg, done, show_progress=False, echo=lambda line: None)
    steps.mark("baselines", fps["baselines"])
    with pytest.raises(Went):
        run(cfg, done, show_progress=False, echo=lambda line: None)
    with pytest.raises(ConfigError, match="needs CUDA"):  # --force trains stage 1 again
        run(cfg, done, force=True, show_progress=False, echo=lambda line: None)


def test_the_pool_summary_carries_stage1s_precision(tmp_path):
    from paser.experiments.main import pool_summary

    methods = {"f0": {"iou": 0.8, "gflops": 0.2}, "f1": {"iou": 0.7, "gflops": 1.0}}
    assert pool_summary(tmp_path, methods, 2)["precision"] is None  # no stage1.json: unsaid
    (tmp_path / "stage1.json").write_text(json.dumps({"precision": "bf16-mixed", "models": {}}))
    summary = pool_summary(tmp_path, methods, 2)
    assert summary["precision"] == "bf16-mixed" and summary["inverted"] == [["f0", "f1"]]
    assert summary["improving"] == []


def test_a_model_that_scores_below_another_is_inverted_only_if_it_costs_more(tmp_path):
    from paser.experiments.main import pool_summary

    # a user's pool listed out of order of cost: f2 is the cheapest of the pool
    methods = {"f0": {"iou": 0.80, "gflops": 0.2}, "f1": {"iou": 0.85, "gflops": 1.0},
               "f2": {"iou": 0.60, "gflops": 0.1}}
    assert pool_summary(tmp_path, methods, 3)["inverted"] == []
    assert pool_summary(tmp_path, methods, 3)["cost_order"] == [["f1", "f2"]]
    methods["f2"]["gflops"] = 3.0  # the dearest and the worst: below both
    assert pool_summary(tmp_path, methods, 3)["inverted"] == [["f0", "f2"], ["f1", "f2"]]
    assert pool_summary(tmp_path, methods, 3)["cost_order"] == []


def test_the_curves_run_to_the_dearest_model_not_the_last():
    from paser.experiments.main import curve_range

    singles = {"f0": (0.011, 0.24), "f1": (0.024, 0.30), "f2": (0.0004, 0.10)}
    assert curve_range(0.012, singles) == (0.012, 0.024, "f1")


def test_the_report_says_which_models_were_still_improving_at_their_cap(tmp_path):
    from paser.experiments.main import pool_summary
    from paser.experiments.report import _pool_md

    methods = {"f0": {"iou": 0.8, "gflops": 0.2}, "f1": {"iou": 0.82, "gflops": 1.0},
               "f2": {"iou": 0.83, "gflops": 3.0}}
    models = {  # best epochs count from 0: of 40, the last tenth is 36 to 39; of 30, 27 to 29
        "f0": {"epochs": 40, "epoch_cap": 40, "best_epoch": 36, "converged": False},
        "f1": {"epochs": 40, "epoch_cap": 40, "best_epoch": 35, "converged": False},
        "f2": {"epochs": 30, "epoch_cap": 30, "best_epoch": 27, "converged": False}}
    (tmp_path / "stage1.json").write_text(json.dumps({"models": models}))
    pool = pool_summary(tmp_path, methods, 3)
    assert pool["improving"] == ["f0", "f2"]  # f1's best lies 5 epochs back
    models["f2"].update(epochs=20, best_epoch=19, converged=True)  # stopped early: a plateau
    (tmp_path / "stage1.json").write_text(json.dumps({"models": models}))
    assert pool_summary(tmp_path, methods, 3)["improving"] == ["f0"]
    parts: list[str] = []
    _pool_md(parts.append, pool, methods)
    text = "".join(parts)
    assert "Still improving at the epoch cap: f0, f2 (" in text and "min_epoch_images" in text


@pytest.mark.slow
def test_a_bad_baseline_name_fails_before_any_training(tmp_path):
    from paser.errors import ConfigError

    cfg = load_config(preset="battery-quick", overrides=[
        *TINY, f"data.cache_dir={tmp_path / 'c'}",
        "baselines.monolithic={SegFormer: {name: 'smp:Segformer:no_such_encoder'}}"])
    with pytest.raises(ConfigError, match="baselines.monolithic.SegFormer"):
        run(cfg, tmp_path / "run", show_progress=False, echo=lambda line: None)
    assert not (tmp_path / "run" / "checkpoints").exists()


@pytest.mark.parametrize("key", ["stage3.tvd_threshold=0.05", "stage3.tvd_sweep=[0, 0.05]"])
def test_a_tvd_budget_on_a_full_information_policy_fails_before_any_training(key, tmp_path):
    from paser.errors import ConfigError

    # battery-quick's router regresses gains: stage 3 refused the budget after stages 1, 2
    cfg = load_config(preset="battery-quick", overrides=[
        *TINY_DATA, f"data.cache_dir={tmp_path / 'c'}", "stage2.train_on=rl",
        "stage3.epochs=1", key])
    with pytest.raises(ConfigError) as err:
        run(cfg, tmp_path / "run", show_progress=False, echo=lambda line: None)
    assert not (tmp_path / "run" / "checkpoints").exists()
    assert str(err.value) == (
        f"key '{key.split('=')[0]}': the TVD budget fine-tunes a REINFORCE policy "
        "(stage2.objective=reinforce); a full-information policy meets a budget by "
        "calibration (operating_point.max_tvd)")


@pytest.mark.slow
def test_rerun_skips_and_a_changed_key_reruns_only_what_depends_on_it(job):
    run_dir, cfg, results, _ = job
    lines: list[str] = []
    again = run(cfg, run_dir, show_progress=False, echo=lines.append)
    assert again == results
    assert sum("skipped" in line for line in lines) == 7
    changed = cfg.model_copy(update={"baselines": cfg.baselines.model_copy(
        update={"iou_match_tol": 0.01})})
    before, after = fingerprints(cfg), fingerprints(changed)
    assert [k for k in before if before[k] != after[k]] == ["report"]
    lam = cfg.model_copy(update={"stage2": cfg.stage2.model_copy(update={"lam": 0.3})})
    after = fingerprints(lam)
    # PaSeR (paper) fixes its own lam: not trained again
    assert [k for k in before if before[k] != after[k]] == ["stage2", "stage3", "tvd",
                                                            "calibrate", "report"]
    # how the data is read changes nothing it learns
    read = cfg.model_copy(update={"data": cfg.data.model_copy(update={
        "workers": 0, "cache_dir": run_dir / "elsewhere", "stream": "always"})})
    assert fingerprints(read) == before
    assert fingerprints(read, legacy=True) != fingerprints(cfg, legacy=True)
    # nor where its folder lies (the files' digest says whether they are the same data),
    # only whether one is given (the generated set is not a folder of one's own)
    at = [cfg.model_copy(update={"data": cfg.data.model_copy(update={"root": run_dir / p})})
          for p in ("a", "b")]
    assert fingerprints(at[0]) == fingerprints(at[1]) != before
    assert fingerprints(at[0], root=True) != fingerprints(at[1], root=True)  # as before
    # a key added since runs were made hashes nothing at the value that does what they did
    # (a run of the day before data.nonfinite is not trained again), and retrains set to
    # another
    from paser.run import hashed_part

    raw = cfg.model_dump(mode="json")
    assert "nonfinite" not in hashed_part(raw, "data")
    fill = cfg.model_copy(update={"data": cfg.data.model_copy(update={"nonfinite": "fill"})})
    assert fingerprints(fill)["stage1"] != before["stage1"]
    # and a rerun says what changed and what runs again
    from paser.run import config_changes

    assert config_changes(cfg, lam) == [
        f"stage2.lam: {json.dumps(cfg.stage2.lam)} -> 0.3",
        "changed since this run was made: stage2, stage3, tvd, calibrate, report (and "
        "what reads them) run again"]
    assert config_changes(cfg, cfg) == [] and config_changes(None, cfg) == []
    threads = cfg.model_copy(update={"num_threads": 2})  # nothing redone, and it says what
    assert config_changes(cfg, threads)[-1] == (  # a fresh run with it would differ by
        "changed since this run was made: no step depends on it (nothing is redone); "
        "num_threads changes the order PyTorch sums in on the CPU, so a fresh run with it "
        "can differ in the last digits")


@pytest.mark.slow
def test_a_rebuilt_step_makes_the_steps_that_read_it_run_again(job):
    run_dir, cfg, _, _ = job
    (run_dir / "stage2.json").unlink()  # stage 2's output is gone: it runs again
    lines: list[str] = []
    run(cfg, run_dir, show_progress=False, echo=lines.append)
    status = {line.split("]")[0][1:]: line for line in lines if line.startswith("[")
              and ("skipped" in line or "running" in line or "keeping" in line)}
    assert "skipped" in status["stage1"] and "skipped" in status["baselines"]
    for name in ("stage2", "report"):
        assert "running" in status[name], name
    assert status["stage2"] == "[stage2] running (finished before, but stage2.json is missing)"
    assert status["stage3"] == (  # stage 3 is off in this config: the step keeps stage 2's
        "[stage3] off in this config (stage3.epochs: 0): keeping stage 2's policy and the pool "
        "as the deployed router (a step it reads was redone in this run)")


@pytest.mark.slow
def test_a_missing_stage1_json_is_written_again_without_redoing_what_reads_the_models(
        job, tmp_path):
    import shutil

    run_dir, cfg, _, _ = job
    shutil.copytree(run_dir, tmp_path / "run")
    run_dir = tmp_path / "run"
    results = json.loads((run_dir / "results.json").read_text())  # (other tests rewrite it)
    summary = json.loads((run_dir / "stage1.json").read_text())
    policy = (run_dir / "checkpoints" / "policy.pt").read_bytes()
    (run_dir / "stage1.json").unlink()
    lines: list[str] = []
    again = run(cfg, run_dir, show_progress=False, echo=lines.append)
    # it deleted the policy and stage 3 and trained stages 2, 3, PaSeR (paper) and the report
    # again on models it had kept as they were
    assert "[stage1] running (finished before, but stage1.json is missing)" in lines
    assert ("[stage1] every model trained before with these settings is kept: stage1.json is "
            "written again, nothing after it is redone") in lines
    for name in ("stage2", "stage3", "calibrate", "paper", "baselines", "report"):
        assert f"[{name}] done before with this config: skipped (--force to redo)" in lines
    assert (run_dir / "checkpoints" / "policy.pt").read_bytes() == policy
    assert json.loads((run_dir / "stage1.json").read_text())["models"] == summary["models"]
    assert again == results


@pytest.mark.slow
def test_a_step_recorded_by_another_version_of_paser_runs_again_and_says_why(job):
    run_dir, cfg, _, _ = job
    ledger = json.loads((run_dir / "steps.json").read_text())
    ledger["report"]["fingerprint"] = "0123456789ab"  # hashed as no version of paser here does
    (run_dir / "steps.json").write_text(json.dumps(ledger))
    lines: list[str] = []
    run(cfg, run_dir, show_progress=False, echo=lines.append)
    assert "[report] running (finished before by a version of paser that recorded its " \
           "settings differently; run again to be sure it matches this config)" in lines
    assert sum("skipped" in line for line in lines) == 6


def test_a_run_made_before_a_key_was_added_is_not_trained_again():
    from paser.run import fingerprint_variants, hashed_part
    from paser.train.pretrain import model_fingerprint

    # stage1.ema came on 2026-12-05: runs before it hashed stage 1 without it, runs since
    # with it at null (beside data.nonfinite left out); a config at null matches every mix,
    # one with a decay none of them
    cfg = load_config(preset="battery-paper")
    assert cfg.stage1.ema is None
    raw = cfg.model_dump(mode="json")
    old = json.loads(json.dumps(raw))
    del old["stage1"]["ema"]  # the config as a run before the key saved it
    assert hashed_part(raw, "stage1") == hashed_part(old, "stage1", added=frozenset())
    # what paser hashed for battery-paper on 2026-12-05 at 21:50 (fabba7b), when only
    # data.nonfinite was listed: a key added to a config section without being listed in
    # run.ADDED changes these, and every run made before is trained again
    variants = fingerprint_variants(cfg)
    assert "ba9c0d3511bb" in {v["stage1"] for v in variants}
    assert "ea8977962aae" in {v["report"] for v in variants}
    assert "7306dddc775e" in {v["stage2"] for v in variants}  # the legacy hashing
    assert model_fingerprint(cfg, "f0") == "fe1fc85ad1a9"
    decay = cfg.model_copy(update={"stage1": cfg.stage1.model_copy(update={"ema": 0.99})})
    assert not {v["stage1"] for v in fingerprint_variants(decay)} & {
        v["stage1"] for v in variants}
    assert model_fingerprint(cfg, "f2") != model_fingerprint(cfg, "f2", added=True)
    assert model_fingerprint(decay, "f2") == model_fingerprint(decay, "f2", added=True)


@pytest.mark.slow
def test_the_same_seed_gives_identical_metrics(job, tmp_path):
    """A second CPU run of the whole job with the same config and seed: every method's IoU,
    GFLOP and routing, and every stage's metrics, are identical (timings aside)."""
    run_dir, cfg, results, _ = job
    again = run(cfg, tmp_path / "again", show_progress=False, echo=lambda line: None)
    for name, m in results["methods"].items():
        other = again["methods"][name]
        for key in ("iou", "gflops", "fractions", "gap_recovered"):
            assert other.get(key) == m.get(key), (name, key)
    for stage in ("stage1", "stage2", "stage3"):
        path = run_dir / "metrics" / f"{stage}.jsonl"
        assert path.is_file() == (tmp_path / "again" / "metrics" / f"{stage}.jsonl").is_file()
        if not path.is_file():  # stage 3 is off in battery-quick: no epoch, no line
            continue
        a = path.read_text().splitlines()
        b = (tmp_path / "again" / "metrics" / f"{stage}.jsonl").read_text().splitlines()
        strip = [{k: v for k, v in json.loads(line).items() if "seconds" not in k} for line in a]
        assert strip == [{k: v for k, v in json.loads(line).items() if "seconds" not in k}
                         for line in b], stage


def test_a_stage_started_over_removes_what_was_built_on_it(tmp_path):
    from paser.train.common import drop_downstream

    ckpt = tmp_path / "checkpoints"
    ckpt.mkdir()
    names = ["f1.pt", "policy.pt", "policy_last.pt", "stage3.pt"]
    for name in names:
        (ckpt / name).write_text("x")
    drop_downstream(tmp_path, "stage2")
    assert sorted(p.name for p in ckpt.iterdir()) == ["f1.pt", "policy.pt", "policy_last.pt"]
    drop_downstream(tmp_path, "stage1")
    assert sorted(p.name for p in ckpt.iterdir()) == ["f1.pt"]
    # a TVD variant's fine-tuning under way was built on them too: not resumed from
    variant = tmp_path / "tvd" / "0.1" / "checkpoints"
    variant.mkdir(parents=True)
    for name in ("stage3.pt", "stage3_last.pt"):
        (variant / name).write_text("x")
    drop_downstream(tmp_path, "stage2")
    assert sorted(p.name for p in variant.iterdir()) == ["stage3.pt"]


def test_a_step_begun_again_leaves_the_steps_that_read_it_unfinished(tmp_path):
    from paser.checkpoints import unfinished_steps
    from paser.run import Steps, readers

    steps = Steps(tmp_path)
    for name in ("stage1", "stage2", "stage3", "paper", "baselines"):
        steps.mark(name, f"fp-{name}", seconds=1.0, data="d")
    steps.undo(readers("stage1"), after="stage1")  # as paser run begins stage 1 again
    steps.start("stage1", "fp-stage1", data="d")
    # as the next run reads it, after this one was cut short once stage 1 finished again:
    # PaSeR (paper), trained on copies of the stage-1 models replaced, is not skipped (nor
    # resumed); the baselines read nothing of stage 1
    again = Steps(tmp_path)
    assert again.done["paper"] == {"seconds": 1.0, "data": "d", "started": "",
                                   "after": "stage1"}
    assert not again.finished("paper", "fp-paper") and not again.started("paper", "fp-paper")
    assert again.finished("baselines", "fp-baselines")
    # nor is the run loaded as if its policy were of these models
    assert unfinished_steps(tmp_path) == ["stage1", "stage2", "stage3"]


def test_a_finished_step_is_done_only_with_all_its_files():
    from paser.run import outputs

    cfg = load_config(preset="battery-quick", overrides=[*TINY_DATA, *BASELINES])
    assert outputs(cfg, "stage1") == ["stage1.json", "checkpoints/f0.pt", "checkpoints/f1.pt",
                                      "checkpoints/f2.pt"]
    assert "report.md" in outputs(cfg, "report")


@pytest.mark.slow
def test_a_finished_run_holds_every_file_its_steps_name(job):
    from paser.run import outputs

    run_dir, cfg, _, _ = job
    assert all((run_dir / f).exists() for step in ("stage1", "stage2", "baselines", "report")
               for f in outputs(cfg, step))


def test_a_calibration_no_longer_asked_for_is_removed_and_said(tmp_path):
    from paser.run import Steps, drop_calibration

    (tmp_path / "calibration.json").write_text("{}")
    steps = Steps(tmp_path)
    steps.mark("calibrate", "abc")
    lines: list[str] = []
    drop_calibration(tmp_path, steps, lines.append)
    assert not (tmp_path / "calibration.json").exists() and "calibrate" not in Steps(tmp_path).done
    assert lines and "removed (made by an earlier paser run" in lines[0]


def test_a_rewritten_report_keeps_the_experiments_made_on_its_models(tmp_path):
    from paser.experiments.finished import kept_experiments, models_state

    (tmp_path / "checkpoints").mkdir()
    (tmp_path / "checkpoints" / "policy.pt").write_text("a")
    now = models_state(tmp_path)
    (tmp_path / "results.json").write_text(json.dumps({"experiments": {
        "sensitivity": {"rows": [1], "measured_on": now},
        "robustness": {"measured_on": "0ld"}}}))
    kept, dropped = kept_experiments(tmp_path)
    assert kept == {"sensitivity": {"rows": [1], "measured_on": now}}
    assert dropped == ["robustness"]
    # by what the files hold: a run folder copied or unpacked (new times) keeps them, and
    # an entry recorded by time, as before 2026-12-06, still counts
    import os

    os.utime(tmp_path / "checkpoints" / "policy.pt", ns=(1, 1))
    assert models_state(tmp_path) == now
    old = models_state(tmp_path, by_time=True)
    (tmp_path / "results.json").write_text(json.dumps({"experiments": {
        "sensitivity": {"measured_on": old}}}))
    assert kept_experiments(tmp_path) == ({"sensitivity": {"measured_on": old}}, [])
    (tmp_path / "checkpoints" / "policy.pt").write_text("bb")  # trained again
    assert kept_experiments(tmp_path) == ({}, ["sensitivity"])
    from paser.experiments.finished import drop_figures

    (tmp_path / "figures").mkdir()
    for name in ("robustness_routing.png", "mc_entropy.png", "iou_vs_gflop.png"):
        (tmp_path / "figures" / name).write_bytes(b"png")
    drop_figures(tmp_path, ["robustness"])  # its figures would be of other models
    assert sorted(p.name for p in (tmp_path / "figures").iterdir()) == [
        "iou_vs_gflop.png", "mc_entropy.png"]


class _Stop(Exception):
    pass


def _stop_at(start: str, lines: list[str]):
    """An echo for `run` that keeps its lines and stops the run at the first that begins
    with ``start`` (what the test reads is said by then)."""
    def echo(line: str) -> None:
        lines.append(line)
        if line.startswith(start):
            raise _Stop
    return echo


@pytest.mark.slow
def test_a_run_knows_its_data_by_their_files_bytes_not_where_they_lie(job, tmp_path):
    import shutil

    import numpy as np
    from PIL import Image

    from paser.data.identity import data_identity, read_identity
    from paser.run import record_stage, start_stage
    from paser.train.pretrain import pretrain

    run_dir, cfg, _, _ = job
    shutil.copytree(run_dir, tmp_path / "run")
    shutil.copytree(cfg.data.cache_dir, tmp_path / "c")
    moved = cfg.model_copy(update={"data": cfg.data.model_copy(update={
        "cache_dir": tmp_path / "c"})})
    run_dir = tmp_path / "run"

    def ledger() -> dict:
        return json.loads((run_dir / "steps.json").read_text())

    def trained(role: str) -> dict:
        return json.loads((run_dir / "checkpoints" / f"{role}.trained.json").read_text())

    # the same bytes elsewhere (copied: other modification times): nothing is redone
    lines: list[str] = []
    run(moved, run_dir, show_progress=False, echo=lines.append)
    assert sum("skipped" in line for line in lines) == 7
    before = read_identity(run_dir)
    assert ledger()["stage1"]["data"] == trained("f1")["data"] == before.digest
    # a run made before paser knew its data says so, takes the files as they are, and
    # from then on knows them (in steps.json and for each stage-1 model)
    (run_dir / "steps.json").write_text(json.dumps(
        {k: {f: v for f, v in r.items() if f != "data"} for k, r in ledger().items()}))
    for role in ("f0", "f1", "f2"):
        (run_dir / "checkpoints" / f"{role}.trained.json").write_text(json.dumps(
            {"fingerprint": trained(role)["fingerprint"]}))
    (run_dir / "data.json").unlink()
    lines = []
    run(moved, run_dir, show_progress=False, echo=lines.append)
    assert sum("skipped" in line for line in lines) == 7
    assert any(line.startswith("[data] this run's steps were finished by a version of "
                               "paser that did not record") for line in lines)
    assert ledger()["report"]["data"] == trained("f0")["data"] == before.digest
    assert read_identity(run_dir) == before
    # a mask corrected in place at the same size
    mask = next((tmp_path / "c").glob("*/train_label/*.png"))
    pixels = np.array(Image.open(mask))
    pixels[0, 0] = 0 if pixels[0, 0] else 255
    Image.fromarray(pixels).save(mask)
    now = data_identity(moved.data, run_dir)
    assert now.changes(before) == f"1 file rewritten (train_label/{mask.name})"
    # `paser pretrain --resume` of the finished stage trains nothing: it still read the
    # files of before (the ledger and the run's record keep them)
    start_stage(run_dir, moved, "stage1")
    pretrain(moved, run_dir, show_progress=False, resume=True)  # every model finished
    record_stage(run_dir, moved, "stage1", changed=False)
    assert ledger()["stage1"]["data"] == before.digest and read_identity(run_dir) == before
    assert trained("f1")["data"] == trained("f0")["data"] == before.digest
    # the run says what changed, and every step that read it runs again
    lines = []
    with pytest.raises(_Stop):
        run(moved, run_dir, show_progress=False, echo=_stop_at("[stage1] running", lines))
    assert lines[-2:] == [
        "[data] the files the run reads changed since its steps read them: 1 file rewritten "
        f"(train_label/{mask.name}); the steps that read them run again",
        "[stage1] running (the data's files changed since it ran)"]
    # a model trained on the files before is not kept; trained on these, it is
    weights = (run_dir / "checkpoints" / "f1.pt").read_bytes()
    pretrain(moved, run_dir, show_progress=False, reuse=True, files=now.digest)
    assert trained("f1")["data"] == now.digest
    retrained = (run_dir / "checkpoints" / "f1.pt").read_bytes()
    assert retrained != weights
    pretrain(moved, run_dir, show_progress=False, reuse=True)  # finds the digest itself
    assert (run_dir / "checkpoints" / "f1.pt").read_bytes() == retrained


def test_what_changed_in_a_datasets_files_is_said_by_kind():
    from paser.data.identity import Identity

    before = Identity({"train": {"a.png": "1", "b.png": "2", "c.png": "3"},
                       "test": {"d.png": "4"}})
    after = Identity({"train": {"a.png": "1", "b.png": "9", "e.png": "5"},
                      "test": {"c.png": "3"}})
    assert after.changes(before) == (
        "1 file added (e.png); 1 file removed (d.png); 1 file rewritten (b.png); "
        "1 file moved to another split (c.png)")
    assert before.changes(before) == "the same files"
    assert before.digest == Identity(dict(reversed(before.files.items()))).digest
    assert after.digest != before.digest


@pytest.mark.slow
def test_a_run_being_trained_again_or_calibrated_elsewhere_is_not_used_as_it_was(job, tmp_path):
    import shutil

    from paser.api import PaSeR
    from paser.errors import CheckpointError

    run_dir, cfg, _, _ = job
    shutil.copytree(run_dir, tmp_path / "run")
    run_dir = tmp_path / "run"
    ledger = json.loads((run_dir / "steps.json").read_text())
    # stopped while stage 2 trained again: its settings are in config.yaml, its policy is
    # the one before; nothing loads it as if it were done
    (run_dir / "steps.json").write_text(json.dumps({**ledger, "stage2": {"started": "x"}}))
    with pytest.raises(CheckpointError, match=r"stage2 is being trained again, or was "
                       r"stopped while it was .* paser run --run-dir .* \(it resumes\)"):
        PaSeR.load(run_dir)
    # a calibration begun and not finished keeps the run loadable uncalibrated (paser run
    # calibrates so)
    (run_dir / "steps.json").write_text(json.dumps({**ledger, "calibrate": {"started": "x"}}))
    PaSeR.load(run_dir, calibrated=False)
    with pytest.raises(CheckpointError, match="calibrate is being trained again"):
        PaSeR.load(run_dir)
    (run_dir / "steps.json").write_text(json.dumps(ledger))
    # stage 3 ran: its checkpoint gone is not replaced by stage 2's policy in silence
    (run_dir / "checkpoints" / "stage3.pt").rename(tmp_path / "stage3.pt")
    with pytest.raises(CheckpointError, match=r"stage3.pt: checkpoint not found; .*paser run "
                       r"--run-dir .* \(it skips what is done\), or paser finetune"):
        PaSeR.load(run_dir)
    (tmp_path / "stage3.pt").rename(run_dir / "checkpoints" / "stage3.pt")
    # paser calibrate made another target since: paser run calibrates to its own again,
    # and says so (the report then matches what segment uses)
    cal = json.loads((run_dir / "calibration.json").read_text())
    cal["target"] = {"budget_gflops": 0.05}
    (run_dir / "calibration.json").write_text(json.dumps(cal))
    lines: list[str] = []
    with pytest.raises(_Stop):
        run(cfg, run_dir, show_progress=False, echo=_stop_at("[calibrate] running", lines))
    assert lines[-1] == (
        "[calibrate] running (calibration.json holds another target (budget_gflops 0.05), "
        "made by paser calibrate since: calibrated again to this config's operating_point, "
        "which paser segment then uses; set operating_point to keep the other)")
    assert sum("skipped" in line for line in lines) == 3  # stages 1 to 3
    # a calibration cut short starts over: it was said to be 'resuming'
    ledger = json.loads((run_dir / "steps.json").read_text())
    done = ledger["calibrate"]
    ledger["calibrate"] = {"started": done.pop("fingerprint"),
                           **{k: v for k, v in done.items() if k != "seconds"}}
    (run_dir / "steps.json").write_text(json.dumps(ledger))
    lines.clear()
    with pytest.raises(_Stop):
        run(cfg, run_dir, show_progress=False, echo=_stop_at("[calibrate]", lines))
    assert lines[-1].startswith("[calibrate] running ("), lines[-1]


def test_a_calibration_the_last_run_made_is_not_said_to_be_paser_calibrates(tmp_path):
    from paser.run import other_calibration

    cfg = load_config(preset="battery-quick")
    # the last paser run calibrated to its own operating point; the config now asks for
    # another: the [config] lines say why it is made again, not "made by paser calibrate"
    (tmp_path / "calibration.json").write_text(json.dumps(
        {"target": {"iou_within_top": 0.005, "top_miou": 0.8, "top_model": "f2"}}))
    wider = cfg.model_copy(update={"operating_point": cfg.operating_point.model_copy(
        update={"iou_within_top": 0.01})})
    assert other_calibration(wider, tmp_path, before=cfg) is None
    assert other_calibration(cfg, tmp_path, before=cfg) is None
    # a target that neither config asks for was made by paser calibrate since
    (tmp_path / "calibration.json").write_text(json.dumps({"target": {"budget_gflops": 0.05}}))
    assert other_calibration(wider, tmp_path, before=cfg) == (
        "calibration.json holds another target (budget_gflops 0.05), made by paser calibrate "
        "since: calibrated again to this config's operating_point, which paser segment then "
        "uses; set operating_point to keep the other")


def test_a_models_record_cut_short_is_refused_naming_it_not_a_traceback(tmp_path):
    from paser.errors import CheckpointError
    from paser.run import Steps, stamp_unrecorded
    from paser.train.pretrain import trained_on

    cfg = load_config(preset="battery-quick")
    (tmp_path / "checkpoints").mkdir()
    record = tmp_path / "checkpoints" / "f0.trained.json"
    record.write_text('{"fingerprint": "4a1f98479d3f", "mach')  # a copy stopped mid-file
    said = (rf"^{record}: cannot read it \(Unterminated string .*\); it records what f0 was "
            r"trained with and on. Delete it: f0.pt is kept, and stage 1 trains f0 again the "
            r"next time it runs$")
    # paser run reads it before any step (a JSONDecodeError traceback before), the report
    # where it says where the pool trained
    with pytest.raises(CheckpointError, match=said):
        stamp_unrecorded(tmp_path, Steps(tmp_path), None, None)
    with pytest.raises(CheckpointError, match=said):
        trained_on(cfg, tmp_path)
    record.unlink()  # as the error says: the model is taken as of unknown origin
    assert trained_on(cfg, tmp_path)["machines"]["f0"] is None


@pytest.mark.slow
def test_a_run_cut_short_after_a_step_was_redone_redoes_what_reads_it_next_time(job, tmp_path):
    import shutil

    run_dir, cfg, results, _ = job
    shutil.copytree(run_dir, tmp_path / "run")
    run_dir = tmp_path / "run"
    with pytest.raises(_Stop):  # --force redid stages 1 and 2, then was stopped
        run(cfg, run_dir, force=True, show_progress=False, echo=_stop_at("[stage3]", []))
    lines: list[str] = []
    again = run(cfg, run_dir, show_progress=False, echo=lines.append)
    assert again["methods"]["PaSeR (paper)"]["iou"] == results["methods"]["PaSeR (paper)"]["iou"]
    # PaSeR (paper) was trained on copies of the stage-1 models: trained again on these,
    # not skipped as finished
    assert "[paper] running (a step it reads, stage1, was redone since it ran)" in lines
    assert "[stage2] done before with this config: skipped (--force to redo)" in lines
    # and --force asked for every step: those it did not reach are redone, the baselines too
    assert "[baselines] running (paser run --force was stopped before it redid it)" in lines


def test_steps_of_another_config_on_data_in_memory_are_not_said_to_be_of_an_older_paser(
        tmp_path):
    from paser.data.identity import Identity
    from paser.run import Steps, fingerprint_variants, stamp_unrecorded

    # a folder of a noisy-MNIST run (built in memory: its steps record no data files) run
    # again with battery-quick: those steps run again, nothing to stamp or say
    mnist = fingerprints(load_config(preset="mnist-noisy"))
    cfg = load_config(preset="battery-quick")
    steps = Steps(tmp_path)
    steps.mark("stage1", mnist["stage1"], seconds=1.0)
    ident = Identity({"train": {"train_images/a.png": "ab12"}})
    lines: list[str] = []
    stamp_unrecorded(tmp_path, steps, ident, None, lines.append, fingerprint_variants(cfg))
    assert lines == [] and Steps(tmp_path).done["stage1"] == {
        "fingerprint": mnist["stage1"], "seconds": 1.0}
    # a step of this config with no record of its files was finished by an older paser
    steps.mark("stage1", fingerprints(cfg)["stage1"], seconds=1.0)
    stamp_unrecorded(tmp_path, steps, ident, None, lines.append, fingerprint_variants(cfg))
    assert lines[0].startswith("[data] this run's steps were finished by a version of paser "
                               "that did not record what its data's files were")
    assert Steps(tmp_path).done["stage1"]["data"] == ident.digest


def test_a_changed_pool_model_key_is_named_alone():
    from paser.run import config_changes

    cfg = load_config(preset="battery-quick")
    pool = [m.model_copy() for m in cfg.models.pool]
    pool[1] = pool[1].model_copy(update={"epochs": 7})
    other = cfg.model_copy(update={"models": cfg.models.model_copy(update={"pool": pool})})
    assert config_changes(cfg, other)[0] == (
        f"models.pool.1.epochs: {json.dumps(cfg.models.pool[1].epochs)} -> 7")


def test_records_hashed_with_the_datas_path_are_kept_when_the_data_move(tmp_path):
    """Steps and stage-1 models recorded by a paser that hashed data.root's path are
    recorded again under today's fingerprint at the next run, so a later move of the data
    finds them done; a calibrate step begun and stopped, with no calibration, is dropped."""
    from paser.run import Steps, drop_calibration, fingerprint_variants, rehash_records
    from paser.train.pretrain import _trained_file, model_fingerprint

    a, b = (load_config(preset="battery-quick", overrides=[
        "data.dataset=folder", f"data.root={tmp_path / p}"]) for p in ("a", "b"))
    old = fingerprints(a, root=True)
    assert old != fingerprints(a) and fingerprints(a) == fingerprints(b)
    steps = Steps(tmp_path)
    steps.mark("stage1", old["stage1"], data="d")
    steps.mark("report", "0123456789ab", data="d")  # no version's: left as it is
    (tmp_path / "checkpoints").mkdir()
    _trained_file(tmp_path, "f1").write_text(json.dumps(
        {"fingerprint": model_fingerprint(a, "f1", root=True), "data": "d"}))
    rehash_records(a, tmp_path, steps, fingerprint_variants(a))
    again = Steps(tmp_path)
    assert again.finished("stage1", fingerprints(b)["stage1"])
    assert again.done["stage1"]["data"] == "d" and again.done["report"]["fingerprint"] == (
        "0123456789ab")
    assert json.loads(_trained_file(tmp_path, "f1").read_text()) == {
        "fingerprint": model_fingerprint(b, "f1"), "data": "d"}
    steps.start("calibrate", "x")
    drop_calibration(tmp_path, steps, print)
    assert "calibrate" not in Steps(tmp_path).done


def test_a_key_a_step_depends_on_trains_it_again_and_those_after_it():
    cfg = load_config(preset="battery-quick")
    before = fingerprints(cfg)

    def changed(*overrides: str) -> list[str]:
        after = fingerprints(load_config(preset="battery-quick", overrides=list(overrides)))
        return [step for step in before if before[step] != after[step]]

    # the halo: what every pool model sees, so stage 1 and all after it
    assert {"stage1", "stage2", "calibrate", "report"} <= set(changed("halo=16"))
    # the uncertainty the router reads: not stage 1, but the router and after it
    uncertainty = changed("uncertainty=margin")
    assert "stage1" not in uncertainty and {"stage2", "report"} <= set(uncertainty)
    # the last pool model: f0 distils from it, so stage 1 again
    assert "stage1" in changed("models.pool.1.epochs=41")


def test_the_settings_the_runs_method_differs_from_the_papers_in_are_named():
    from paser.train.paper import method_differences, paper_config

    cfg = load_config(preset="battery-quick")
    assert method_differences(cfg, paper_config(cfg)) == [
        "mc_samples 1 (paper: 5)", "mc_dropout none (paper: all)",
        "stage2.objective gain (paper: reinforce)", "stage2.gain dataset (paper: patch)",
        "stage2.policy pooled (paper: cnn)", "stage2.lam 0.1 (paper: 0.5)",
        "stage2.cost flops (paper: params)", "stage2.weight_decay 0.0001 (paper: 0.0)",
        "stage2.train_on rl+ft (paper: rl)", "stage2.members 5 (paper: 1)"]
    # the paper's method at the run's lam 0 (mnist-noisy's baselines.paper): lam is no
    # difference there
    mnist = load_config(preset="mnist-noisy")
    assert not any(d.startswith("stage2.lam") for d in method_differences(
        mnist, paper_config(mnist)))
    from paser.experiments.main import paper_difference

    paper = paper_config(cfg)  # the paper's method beside itself, other budgets alone
    methods = {"PaSeR": {"iou": 0.85, "gflops": 1.8}, "PaSeR (paper)": {"iou": 0.84, "gflops": 1.5}}
    assert paper_difference(paper, paper, methods, {"PaSeR": 0.84, "PaSeR (paper)": 0.82}) == (
        "PaSeR has its method's settings (baselines.paper sets other budgets alone); by "
        "+0.0100 IoU at +0.300 GFLOP per image (Table 1) and +0.0200 of curve area")


@pytest.mark.slow
def test_the_report_says_how_paser_differs_from_the_papers_method_and_by_how_much(job):
    """The note of PaSeR (paper) gave the paper's settings alone: which of the run's differ,
    and what that is worth, took reading the header, the ablation and two tables."""
    run_dir, _, results, _ = job
    m, areas = results["methods"], results["curve_areas"]
    note = next(n for n in results["notes"] if n.startswith("PaSeR (paper): "))
    assert ("PaSeR differs from it in mc_samples 1 (paper: 5), mc_dropout none (paper: all), "
            "stage2.objective gain (paper: reinforce), ") in note
    assert note.endswith(
        f"; by {m['PaSeR']['iou'] - m['PaSeR (paper)']['iou']:+.4f} IoU at "
        f"{m['PaSeR']['gflops'] - m['PaSeR (paper)']['gflops']:+.3f} GFLOP per image "
        f"(Table 1) and {areas['PaSeR'] - areas['PaSeR (paper)']:+.4f} of curve area.")
    assert note in (run_dir / "report.md").read_text()
