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
