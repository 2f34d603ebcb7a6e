"""The experiment scripts of benchmarks/ as a user runs them: what they refuse before they
touch a folder, and what they keep of their results file."""

import json
from pathlib import Path

import pytest


@pytest.fixture
def scripts(monkeypatch):
    monkeypatch.syspath_prepend(str(Path(__file__).resolve().parents[1] / "benchmarks"))


def finished_run(folder: Path, captured: dict) -> Path:
    """The files of a finished run that focus_pool.py copies and reads."""
    folder.mkdir(parents=True)
    (folder / "steps.json").write_text(json.dumps({"stage1": {}, "stage2": {}}))
    (folder / "stage1.json").write_text(json.dumps(
        {"models": {"f0": {"test_miou": 0.81234}, "f1": {"test_miou": 0.85}}}))
    (folder / "results.json").write_text(json.dumps({
        "curve_areas": {"PaSeR": 0.84, "IDK-Cascade": 0.83, "Oracle": 0.82, "Frontier": 0.835},
        "headroom_captured": captured, "rank_correlation": {"PaSeR": 0.5},
        "table2": {"flops_saved_pct": 12.34},
        "methods": {"PaSeR": {"iou": 0.84, "gflops": 1.5}}}))
    return folder


@pytest.mark.parametrize("out", [".", "focus", ".."])
def test_focus_pool_refuses_an_output_that_would_delete_its_source(scripts, tmp_path, out):
    import focus_pool

    src = finished_run(tmp_path / "runs" / "demo", {"PaSeR": 0.4})
    with pytest.raises(SystemExit, match="would replace the source run"):
        focus_pool.copy_run(src, src / out)
    assert (src / "results.json").is_file() and (src / "steps.json").is_file()


def test_focus_pool_refuses_a_source_that_is_not_a_finished_run(scripts, tmp_path):
    import focus_pool

    out = tmp_path / "focus"
    out.mkdir()
    (out / "keep").write_text("an earlier output")
    with pytest.raises(SystemExit, match="no results.json"):
        focus_pool.copy_run(tmp_path / "missing", out)
    assert (out / "keep").read_text() == "an earlier output"


def test_focus_pool_reads_a_run_whose_oracle_has_no_headroom(scripts, tmp_path):
    import focus_pool

    # the oracle under the frontier: the report gives no shares (None), which
    # focus_pool.py read after its whole run, and stopped on round(None)
    run = finished_run(tmp_path / "run", {"PaSeR": None, "IDK-Cascade": None})
    fig = focus_pool.figures(run)
    assert fig["captured"] == {"PaSeR": None, "IDK-Cascade": None}
    assert fig["test_miou"] == {"f0": 0.8123, "f1": 0.85}
    assert fig["paser_minus_cascade"] == 0.01


def augment_row(seed: int, mode: str, miou: float, patience: int = 10) -> dict:
    """A row of augment.py's results, as its pretrain() makes it (``stage1`` abridged)."""
    return {"seed": seed, "augment": mode, "seconds": 1.0,
            "settings": {"stage1": {"augment": mode != "off", "patience": patience},
                         "epochs": [40, 40, 40]},
            "models": {"f0": {"test_miou": miou, "epochs": 40, "best_epoch": 39}}}


@pytest.fixture
def augment(scripts, monkeypatch, tmp_path):
    import augment

    monkeypatch.setattr(augment, "RESULTS", tmp_path / "augment.json")
    monkeypatch.setattr(augment, "DATA", tmp_path / "data")
    return augment


def run_augment(augment, monkeypatch, *argv, fail_on_seed=None):
    import sys

    def pretrain(run_dir, args):  # a stand-in for `paser pretrain`: the seed's f0 mIoU
        seed = int(next(a for a in args if a.startswith("seed=")).removeprefix("seed="))
        if seed == fail_on_seed:
            raise RuntimeError("paser pretrain failed")
        mode = run_dir.name.split("_")[-2]
        row = augment_row(seed, mode, 0.5 + seed / 10)
        return {k: v for k, v in row.items() if k not in ("seed", "augment")}

    monkeypatch.setattr(augment, "pretrain", pretrain)
    monkeypatch.setattr(sys, "argv", ["augment.py", *argv])
    augment.main()
    return json.loads(augment.RESULTS.read_text()) if augment.RESULTS.exists() else None


def test_augment_keeps_the_rows_a_smaller_call_did_not_measure(augment, monkeypatch):
    overrides = [f"data.cache_dir={augment.DATA / 'demo_data'}"]
    rows = [augment_row(s, m, 0.1) for s in (0, 1, 2) for m in ("off", "views+jitter")]
    augment.RESULTS.write_text(json.dumps({"demo": {"overrides": overrides, "rows": rows}}))
    saved = run_augment(augment, monkeypatch, "--data", "demo", "--seeds", "1", "--only", "off")
    assert list(saved) == ["demo"]
    assert [(r["seed"], r["augment"], r["models"]["f0"]["test_miou"])
            for r in saved["demo"]["rows"]] == [
        (0, "off", 0.1), (0, "views+jitter", 0.1), (1, "off", 0.6), (1, "views+jitter", 0.1),
        (2, "off", 0.1), (2, "views+jitter", 0.1)]


def test_augment_keeps_an_entry_of_other_settings_beside(augment, monkeypatch):
    overrides = [f"data.cache_dir={augment.DATA / 'demo_data'}"]
    rows = [augment_row(0, "off", 0.1, patience=4)]
    augment.RESULTS.write_text(json.dumps({"demo": {"overrides": overrides, "rows": rows}}))
    saved = run_augment(augment, monkeypatch, "--data", "demo", "--seeds", "0", "--only", "off")
    (old,) = [k for k in saved if k.startswith("demo (an earlier battery-quick, replaced ")]
    assert saved[old]["rows"] == rows
    assert [r["models"]["f0"]["test_miou"] for r in saved["demo"]["rows"]] == [0.5]


def test_augment_keeps_the_rows_measured_before_a_seed_fails(augment, monkeypatch):
    with pytest.raises(RuntimeError, match="paser pretrain failed"):
        run_augment(augment, monkeypatch, "--data", "demo", "--seeds", "0", "1", fail_on_seed=1)
    saved = json.loads(augment.RESULTS.read_text())
    assert [(r["seed"], r["augment"]) for r in saved["demo"]["rows"]] == [
        (0, "off"), (0, "views+jitter")]



@pytest.mark.parametrize("pool", [{"f0": 0.8, "f1": 0.81},
                                  {"f0": 0.8, "f1": 0.81, "f2": 0.82, "f3": 0.83}])
def test_membranes_reads_a_pool_of_another_size(scripts, tmp_path, pool):
    import membranes

    # --extra may change the pool: the summary read f0, f1 and f2 alone (a KeyError after
    # the whole run with one pool model, f3 left out with three)
    (tmp_path / "results.json").write_text(json.dumps({
        "models": list(pool), "methods": {"PaSeR": {"iou": 0.9, "gflops": 1.0},
                                          **{k: {"iou": v} for k, v in pool.items()}},
        "curve_areas": {}, "headroom_captured": {"PaSeR": None}, "reachable_captured": {},
        "table2": {"flops_saved_pct": 1.0}, "verdict": "v", "versus_cascade": "c"}))
    assert membranes.summary(tmp_path, 2.0)["pool"] == pool


def test_augment_refuses_a_setting_it_does_not_have(augment, monkeypatch):
    # crops are a setting of the folders alone: on the demo it ran nothing and stopped on
    # an IndexError (after writing an entry of no rows where the key was new)
    with pytest.raises(SystemExit, match="--only views\\+jitter\\+crops: not a setting of "
                                         "--data demo; its settings: off, views\\+jitter"):
        run_augment(augment, monkeypatch, "--data", "demo", "--only", "views+jitter+crops")
    with pytest.raises(SystemExit, match="--only crops: not a setting"):
        run_augment(augment, monkeypatch, "--data", "demo", "--only", "off", "crops")
    assert not augment.RESULTS.exists()


def test_augment_writes_where_results_says(augment, monkeypatch, tmp_path):
    # a trial run wrote into the committed benchmarks/results/augment.json: --results
    # keeps it apart
    elsewhere = tmp_path / "trial.json"
    run_augment(augment, monkeypatch, "--data", "demo", "--seeds", "0", "--only", "off",
                "--results", str(elsewhere))
    assert not augment.RESULTS.exists()
    assert [r["models"]["f0"]["test_miou"]
            for r in json.loads(elsewhere.read_text())["demo"]["rows"]] == [0.5]
