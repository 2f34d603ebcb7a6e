"""`paser compare`: finished runs side by side, with hand-computed figures and spreads."""

from __future__ import annotations

import json
import math

import pytest
import yaml
from tests.helpers import paser_here

from paser.errors import CheckpointError
from paser.experiments.compare import compare_runs, format_comparison, saved_vs_singles

#: single models at (GFLOP, mIoU): f0 (0.1, 0.70), f1 (1.0, 0.80), f2 (3.0, 0.85)
FRONTIER = {"gflops": [0.1, 1.0, 3.0], "iou": [0.70, 0.80, 0.85],
            "models": ["f0", "f1", "f2"], "interpolate": True}


def results(paser_iou: float, paser_gflops: float, captured: float, **extra) -> dict:
    methods = {"f0": {"iou": 0.70, "gflops": 0.1}, "f1": {"iou": 0.80, "gflops": 1.0},
               "f2": {"iou": 0.85, "gflops": 3.0},
               "PaSeR": {"iou": paser_iou, "gflops": paser_gflops}}
    return {"seed": 0, "preset": "battery-quick", "models": ["f0", "f1", "f2"],
            "methods": methods, "curves": {"Frontier": FRONTIER},
            "curve_areas": {"Frontier": 0.80, "PaSeR": 0.81, "IDK-Cascade": 0.805,
                            "Oracle": 0.82},
            "headroom_captured": {"PaSeR": captured, "IDK-Cascade": 0.25},
            "table2": {"flops_saved_pct": 12.0}, "data_files": "abc",
            "data_seeds": {"split": 42}} | extra


def run(tmp_path, name: str, seed: int, res: dict, **config) -> str:
    folder = tmp_path / name
    folder.mkdir()
    (folder / "results.json").write_text(json.dumps(res | {"seed": seed}))
    cfg = {"seed": seed, "stage2": {"lam": 0.1},
           "models": {"pool": [{"epochs": 40}, {"epochs": 40}]}}
    for key, value in config.items():  # models__pool__1__epochs=30 -> models.pool[1].epochs
        *path, last = key.split("__")
        node = cfg
        for part in path:
            node = node[int(part)] if isinstance(node, list) else node[part]
        node[last] = value
    (folder / "config.yaml").write_text(yaml.safe_dump(cfg))
    return str(folder)


def test_saved_against_the_single_models_at_equal_iou():
    # 0.825 lies halfway from f1 to f2: the frontier needs 2.0 GFLOP, PaSeR spends 1.5
    assert saved_vs_singles(results(0.825, 1.5, 0.5)) == pytest.approx(25.0)
    # above every single model: compared with the best one's GFLOP (3.0)
    assert saved_vs_singles(results(0.86, 2.4, 0.5)) == pytest.approx(20.0)
    # under the frontier: 0.75 needs 0.55 GFLOP, PaSeR spends 1.1 (100 % more)
    assert saved_vs_singles(results(0.75, 1.1, 0.5)) == pytest.approx(-100.0)


def test_seeds_side_by_side_with_their_spread(tmp_path):
    dirs = [run(tmp_path, "s0", 0, results(0.825, 1.5, 0.5)),
            run(tmp_path, "s1", 1, results(0.825, 1.5, 0.3)),
            run(tmp_path, "s2", 2, results(0.825, 1.5, 0.4, table2={"flops_saved_pct": -3.0}))]
    out = compare_runs(dirs)
    assert [r["seed"] for r in out["runs"]] == [0, 1, 2]
    assert out["differ"] == {"seed": [0, 1, 2]} and not out["data_differ"]
    cap = out["figures"]["captured %"]
    assert cap["mean"] == pytest.approx(40.0) and cap["sd"] == pytest.approx(10.0)
    assert (cap["min"], cap["max"]) == pytest.approx((30.0, 50.0))
    assert out["figures"]["PaSeR area - frontier"]["mean"] == pytest.approx(0.01)
    assert out["figures"]["PaSeR area - cascade"]["mean"] == pytest.approx(0.005)
    assert out["figures"]["f2"]["sd"] == pytest.approx(0.0)
    assert out["holds"]["fewer GFLOP than the IoU-matched cascade (Table 2)"] == [2, 3]
    text = format_comparison(out)
    assert ("They differ only in their seed: the spread is the training's draw on the same "
            "data") in text
    assert "| 1 | 0.7000 | 0.8000 | 0.8500 | 0.8250 | 1.500 | 25.0 |" in text
    assert "| sd | | 0.0000 |" in text
    assert "- fewer GFLOP than the IoU-matched cascade (Table 2): 2 of 3 runs" in text


def test_the_curve_areas_differences_are_named_as_areas(tmp_path):
    # 'PaSeR - frontier' was the curve areas' difference (0.81 - 0.80), while the report's
    # table of that name gives one point's IoU margin (PaSeR 0.825 at 1.5 GFLOP against
    # the frontier's 0.8125 there): one name, two figures
    out = compare_runs([run(tmp_path, "s0", 0, results(0.825, 1.5, 0.5,
                                                       curve_areas_chosen_on_validation={
                                                           "PaSeR": 0.809,
                                                           "IDK-Cascade": 0.806}))])
    figures = out["runs"][0]["figures"]
    assert figures["PaSeR area - frontier"] == pytest.approx(0.01)
    assert figures["PaSeR area - cascade"] == pytest.approx(0.005)
    assert figures["PaSeR area - cascade, chosen on validation"] == pytest.approx(0.003)
    assert figures["PaSeR (paper) area - frontier"] is None
    assert not any(name.startswith(("PaSeR - ", "PaSeR (paper) - ")) for name in figures)
    text = format_comparison(out)
    assert ("| run | seed | PaSeR area - frontier | captured % | of reachable % | "
            "cascade captured % | PaSeR area - cascade |") in text


def test_shares_a_report_says_not_to_read_are_said_not_to_be_read(tmp_path):
    # the oracle is 0.02 of curve area over the frontier, under this split's noise (0.03):
    # the report warns that a share of it is mostly noise; compare gave the shares' mean
    # and sd as it gives any figure
    noisy = run(tmp_path, "s0", 0, results(0.825, 1.5, 0.5, headroom_floor=0.03))
    steady = run(tmp_path, "s1", 1, results(0.825, 1.5, 0.3, headroom_floor=0.004))
    out = compare_runs([noisy, steady])
    assert list(out["shares_not_meaningful"]) == [noisy]
    assert out["shares_not_meaningful"][noisy].startswith(
        "the oracle's headroom over the frontier (+0.0200 of curve area) is under 0.0300")
    text = format_comparison(out)
    assert (f"The shares of the oracle's headroom of {noisy} (captured %, of reachable %, "
            "cascade captured %) are not meaningful, as its report says: the oracle's "
            "headroom over the frontier (+0.0200 of curve area) is under 0.0300") in text
    assert f"headroom of {steady}" not in text


def test_what_the_runs_differ_in_and_what_a_report_lacks(tmp_path):
    old = results(0.825, 1.5, 0.5)
    del old["table2"]  # an older report
    dirs = [run(tmp_path, "a", 0, old),
            run(tmp_path, "b", 0, results(0.825, 1.5, 0.3, data_files="def"),
                models__pool__1__epochs=30)]
    out = compare_runs(dirs)
    assert out["differ"] == {"models.pool.1.epochs": [40, 30]} and out["data_differ"]
    assert out["runs"][0]["figures"]["Table 2 %"] is None
    t2 = out["figures"]["Table 2 %"]
    assert t2["runs"] == 1 and t2["mean"] == pytest.approx(12.0) and t2["sd"] is None
    text = format_comparison(out)
    assert ("They differ in `models.pool.1.epochs` (40 / 30): the spread mixes these "
            "settings with the draw.") in text
    assert "Their data differ" in text
    assert math.isclose(out["figures"]["captured %"]["mean"], 40.0)


def test_the_flop_convention_is_said_with_the_gflop(tmp_path):
    conv = "torch.utils.flop_counter; one multiply-add counts as 2 FLOPs"
    dirs = [run(tmp_path, "s0", 0, results(0.825, 1.5, 0.5, flop_convention=conv)),
            run(tmp_path, "s1", 1, results(0.825, 1.5, 0.3, flop_convention=conv))]
    text = format_comparison(compare_runs(dirs))
    # 'PaSeR GFLOP' was printed with no word of how the FLOPs were counted
    assert text.endswith(f"GFLOP: per image at inference ({conv}).\n")
    other = run(tmp_path, "old", 2, results(0.825, 1.5, 0.4))  # a report without the record
    text = format_comparison(compare_runs([*dirs, other]))
    assert (f"Their FLOPs are counted otherwise ({conv} / not recorded): their GFLOP figures "
            "do not compare.") in text
    assert "GFLOP: per image" not in text


def test_what_is_not_a_finished_run_is_refused(tmp_path):
    good = run(tmp_path, "good", 0, results(0.825, 1.5, 0.5))
    (tmp_path / "empty").mkdir()
    with pytest.raises(CheckpointError, match="no results.json; finish `paser run`"):
        compare_runs([good, tmp_path / "empty"])
    with pytest.raises(CheckpointError, match="is given twice"):
        compare_runs([good, good + "/"])
    (tmp_path / "empty" / "results.json").write_text("{not json")
    (tmp_path / "empty" / "config.yaml").write_text("seed: 0\n")
    with pytest.raises(CheckpointError, match="cannot read its report or config"):
        compare_runs([tmp_path / "empty"])


def test_the_command_prints_markdown_or_json(tmp_path):
    dirs = [run(tmp_path, "s0", 0, results(0.825, 1.5, 0.5)),
            run(tmp_path, "s1", 1, results(0.825, 1.5, 0.3))]
    md = paser_here("compare", *dirs)
    assert md.returncode == 0 and md.stdout.startswith("# 2 runs compared\n")
    js = paser_here("compare", "--json", *dirs)
    assert json.loads(js.stdout)["figures"]["captured %"]["mean"] == pytest.approx(40.0)
    missing = paser_here("compare", dirs[0], str(tmp_path / "nowhere"))
    assert missing.returncode == 2 and "nowhere: no results.json" in missing.stderr


def test_a_figure_at_zero_does_not_hold(tmp_path):
    # run 1: Table 2 exactly 0 %, PaSeR's area equal to the cascade's and under the frontier's
    tied = results(0.825, 1.5, 0.5, table2={"flops_saved_pct": 0.0},
                   curve_areas={"Frontier": 0.81, "PaSeR": 0.805, "IDK-Cascade": 0.805,
                                "Oracle": 0.82})
    out = compare_runs([run(tmp_path, "s0", 0, results(0.825, 1.5, 0.5)),
                        run(tmp_path, "s1", 1, tied)])
    assert out["holds"] == {"PaSeR's curve area above the frontier's": [1, 2],
                            "PaSeR's curve area above the cascade's": [1, 2],
                            "fewer GFLOP than the IoU-matched cascade (Table 2)": [1, 2]}


def test_pools_trained_on_other_kinds_of_machine_are_named(tmp_path):
    from paser.experiments.report import setting_line

    amd = {"cpu": "AMD EPYC", "bf16": "AVX512-BF16", "threads": 2, "torch": "2.14.1"}
    intel = amd | {"cpu": "Intel Xeon", "bf16": "AMX"}
    dirs = [run(tmp_path, "a", 0, results(0.825, 1.5, 0.5, stage1_machine=amd)),
            run(tmp_path, "b", 1, results(0.825, 1.5, 0.5, stage1_machine=intel)),
            run(tmp_path, "c", 2, results(0.825, 1.5, 0.5))]  # a run from before
    text = format_comparison(compare_runs(dirs))
    assert ("Their pools trained on different kinds of machine (AMD EPYC, AVX512-BF16, 2 "
            "threads, torch 2.14.1 / Intel Xeon, AMX, 2 threads, torch 2.14.1)") in text
    assert "different kinds of machine" not in format_comparison(compare_runs(dirs[::2]))
    base = {"device": "cpu", "seed": 0, "lam": 0.1, "image_size": [128, 128],
            "test_images": 80, "grid": [2, 2], "mc_samples": 1}
    assert setting_line(base).startswith("- device: cpu; seed 0")  # a report from before
    assert setting_line(base | {"machine": amd, "stage1_machine": amd}).startswith(
        "- device: cpu (AMD EPYC, AVX512-BF16, 2 threads, torch 2.14.1; stage 1 on the same "
        "kind); seed 0")
    assert "; stage 1 trained on Intel Xeon, AMX, 2 threads" in setting_line(
        base | {"machine": amd, "stage1_machine": intel})


def test_the_cpus_bf16_is_recorded_only_where_the_cpu_computed(monkeypatch):
    """A GPU run's record carried the CPU's bf16 (AMX), which says nothing of the GPU's."""
    import torch

    from paser.train import distributed as D

    monkeypatch.setattr(D, "_cpuinfo", lambda: {"model name": "Intel Xeon",
                                               "flags": "fpu avx512f amx_bf16 amx_tile"})
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda device=None: "NVIDIA H100")
    on_cpu, on_gpu = D.machine(torch.device("cpu")), D.machine(torch.device("cuda"))
    assert on_cpu["bf16"] == "AMX" and "gpu" not in on_cpu
    assert on_gpu["gpu"] == "NVIDIA H100" and "bf16" not in on_gpu
    assert D.machine_text(on_gpu).startswith("NVIDIA H100, Intel Xeon, ")
    assert "AMX" not in D.machine_text(on_gpu)


def test_a_gpu_runs_record_from_before_reads_as_one_written_now(tmp_path):
    """Records of GPU runs written before kept the CPU's bf16: they read and compare as
    today's (the same kind of machine, no CPU's bf16 in the report's line)."""
    from paser.config import load_config
    from paser.experiments.report import setting_line
    from paser.train.pretrain import trained_on

    now = {"gpu": "NVIDIA H100", "cpu": "AMD EPYC", "threads": 2, "torch": "2.14.1"}
    before = now | {"bf16": "AVX512-BF16"}
    (tmp_path / "checkpoints").mkdir()
    for role, m in (("f0", now), ("f1", before), ("f2", now)):  # f1 kept from before
        (tmp_path / "checkpoints" / f"{role}.trained.json").write_text(
            json.dumps({"fingerprint": "x", "machine": m}))
    assert trained_on(load_config(preset="battery-quick"), tmp_path) == {"machine": now}
    base = {"device": "cuda", "seed": 0, "lam": 0.1, "image_size": [128, 128],
            "test_images": 80, "grid": [2, 2], "mc_samples": 1}
    assert setting_line(base | {"machine": now, "stage1_machine": before}).startswith(
        "- device: cuda (NVIDIA H100, AMD EPYC, 2 threads, torch 2.14.1; stage 1 on the same "
        "kind); seed 0")
    cpu = {"cpu": "AMD EPYC", "bf16": "AVX512-BF16", "threads": 2, "torch": "2.14.1"}
    assert "AVX512-BF16" in setting_line(base | {"machine": cpu})  # the CPU's own: kept


def test_a_pool_whose_models_trained_on_several_machines_says_so(tmp_path):
    from paser.config import load_config
    from paser.experiments.report import setting_line
    from paser.train.pretrain import trained_on

    amd = {"cpu": "AMD EPYC", "bf16": "AVX512-BF16", "threads": 2, "torch": "2.14.1"}
    intel = amd | {"cpu": "Intel Xeon", "bf16": "AMX"}
    cfg = load_config(preset="battery-quick")
    (tmp_path / "checkpoints").mkdir()

    def record(**machines):
        for role, m in machines.items():
            (tmp_path / "checkpoints" / f"{role}.trained.json").write_text(
                json.dumps({"fingerprint": "x", **({"machine": m} if m else {})}))
        return trained_on(cfg, tmp_path)

    assert record(f0=amd, f1=amd, f2=amd) == {"machine": amd}
    kept = record(f1=intel)  # f1 kept from a call on another machine
    assert kept == {"machine": None, "machines": {"f0": amd, "f1": intel, "f2": amd}}
    assert record(f1=None)["machines"]["f1"] is None  # recorded before machines were
    base = {"device": "cpu", "seed": 0, "lam": 0.1, "image_size": [128, 128],
            "test_images": 80, "grid": [2, 2], "mc_samples": 1, "machine": amd}
    assert "; stage 1's models on several kinds of machine (stage1.json)" in setting_line(
        base | {"stage1_machine": None, "stage1_machines": kept["machines"]})


def test_identical_configs_on_other_data_are_not_called_the_machines_spread(tmp_path):
    dirs = [run(tmp_path, "a", 0, results(0.825, 1.5, 0.5)),
            run(tmp_path, "b", 0, results(0.825, 1.5, 0.5, data_files="def"))]
    out = compare_runs(dirs)
    assert out["differ"] == {} and out["data_differ"]
    text = format_comparison(out)
    assert "Their configurations are identical (the seed too).\nTheir data differ" in text
    assert "the spread is the machine's and the code's" not in text


def test_how_the_data_is_read_is_not_a_setting_of_the_spread(tmp_path):
    """`make demo`'s data.cache_dir=runs/data beside a run without it: only the seed differs
    in what the runs learn (paser run retrains nothing for these keys)."""
    dirs = [run(tmp_path, "s0", 0, results(0.825, 1.5, 0.5)),
            run(tmp_path, "s1", 1, results(0.825, 1.5, 0.3))]
    config = yaml.safe_load((tmp_path / "s1" / "config.yaml").read_text())
    config["data"] = {"cache_dir": "runs/data", "workers": 0}
    (tmp_path / "s1" / "config.yaml").write_text(yaml.safe_dump(config))
    out = compare_runs(dirs)
    assert out["differ"] == {"seed": [0, 1]}
    assert out["differ_neutral"] == {"data.cache_dir": [None, "runs/data"],
                                     "data.workers": [None, 0]}
    text = format_comparison(out)
    assert "They differ only in their seed: the spread is the training's draw on the same" in text
    assert ("How they read their data differs (`data.cache_dir` (None / runs/data), "
            "`data.workers` (None / 0)): that changes no figure.") in text


def test_a_report_older_than_the_runs_models_or_config_is_refused(tmp_path):
    """After `paser train-policy stage2.lam=0.3` (or a paser run of it stopped before its
    report), config.yaml says lam 0.3 while results.json is still the lam 0.1 report: read
    together, the runs "differ in stage2.lam" with the same figures."""
    from paser.config import load_config, save_config
    from paser.experiments.finished import models_state
    from paser.run import fingerprints

    cfg = load_config(preset="battery-quick")
    folder = tmp_path / "r"
    folder.mkdir()
    save_config(cfg, folder / "config.yaml")
    (folder / "steps.json").write_text(json.dumps(
        {"report": {"fingerprint": fingerprints(cfg)["report"]}}))
    (folder / "results.json").write_text(json.dumps(
        results(0.825, 1.5, 0.5, measured_on=models_state(folder))))
    assert compare_runs([folder])["figures"]["PaSeR IoU"]["mean"] == pytest.approx(0.825)

    (folder / "checkpoints").mkdir()
    (folder / "checkpoints" / "policy.pt").write_bytes(b"a policy trained since")
    with pytest.raises(CheckpointError, match="made on other models or another calibration"
                       ".*paser run --run-dir"):
        compare_runs([folder])
    (folder / "checkpoints" / "policy.pt").unlink()

    save_config(cfg.model_copy(update={"stage2": cfg.stage2.model_copy(update={"lam": 0.3})}),
                folder / "config.yaml")
    with pytest.raises(CheckpointError, match="not written for the config in its config.yaml"):
        compare_runs([folder])
    res = paser_here("compare", str(folder))
    assert res.returncode == 2 and "r/results.json: it was not written" in res.stderr

    # how the data is read changes no figure: the report is still the run's
    save_config(cfg.model_copy(update={"data": cfg.data.model_copy(update={"workers": 0})}),
                folder / "config.yaml")
    assert compare_runs([folder])["figures"]["PaSeR GFLOP"]["mean"] == pytest.approx(1.5)
