"""benchmarks/gpu.py, the script a lent GPU runs once: its ``--smoke`` mode runs the same
code on CPU at tiny shapes, so that it still works the day a GPU is there."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
SCRIPT = ROOT / "benchmarks" / "gpu.py"
PARTS = {"inference", "stage1", "run"}
ROW = {"batch": 1, "precision": "fp32", "method": "PaSeR", "ms_per_image": 2.5,
       "peak_memory_mib": None}


@pytest.fixture(scope="module")
def smoke(tmp_path_factory) -> dict:
    """The JSON of one ``--smoke`` run, as `python benchmarks/gpu.py --smoke` writes it."""
    out = tmp_path_factory.mktemp("gpu") / "smoke.json"
    path = [str(ROOT / "src"), *filter(None, [os.environ.get("PYTHONPATH")])]
    env = {**os.environ, "OMP_NUM_THREADS": "1",  # one thread, as every test (conftest.py)
           "PYTHONPATH": os.pathsep.join(path)}
    res = subprocess.run([sys.executable, str(SCRIPT), "--smoke", "--out", str(out)],
                         capture_output=True, text=True, env=env, timeout=600)
    assert res.returncode == 0, res.stdout[-3000:] + res.stderr[-3000:]
    return json.loads(out.read_text())


@pytest.fixture
def gpu(monkeypatch):
    """The script as a module (it imports bench.py beside it), its clock started now (the
    deadline counts from its import); SIGTERM's handler restored afterwards."""
    monkeypatch.syspath_prepend(str(SCRIPT.parent))
    import gpu

    monkeypatch.setattr(gpu, "START", time.monotonic())
    handler = signal.getsignal(signal.SIGTERM)
    yield gpu
    signal.signal(signal.SIGTERM, handler)


@pytest.mark.slow
def test_smoke_runs_every_part(smoke):
    parts = smoke["parts"]
    assert set(parts) == PARTS
    assert {name: p["status"] for name, p in parts.items()} == dict.fromkeys(PARTS, "ok")
    assert smoke["environment"]["smoke"] is True
    assert smoke["environment"]["device"] == "cpu"


@pytest.mark.slow
def test_smoke_times_every_method_at_every_batch_and_precision(smoke):
    inf = smoke["parts"]["inference"]
    setting = smoke["environment"]["setting"]
    assert setting["batches"] == [1, 2] and setting["precisions"] == ["fp32", "bf16"]
    methods = {"PaSeR", "f1 (whole image)", "f2 (whole image)", "IDK-Cascade (same assignment)",
               "f0, T passes", "policy", "f1 on its patches", "f2 on its patches",
               "dispatch (as is)", "dispatch (one host sync)"}
    cells = {(r["method"], r["batch"], r["precision"]) for r in inf["rows"]}
    assert cells == {(m, b, p) for m in methods for b in (1, 2) for p in ("fp32", "bf16")}
    assert inf["skipped"] == []
    for row in inf["rows"]:
        assert 0 < row["ms_per_image"] < 60_000, row
        assert "peak_memory_mib" in row and row["peak_memory_mib"] is None  # CPU
    paser = [r for r in inf["rows"] if r["method"] == "PaSeR"]
    assert all(0 < r["gflops"] < r["gflops"] / r["gflop_ratio_to_f2"] for r in paser)


@pytest.mark.slow
def test_smoke_routes_the_fixed_mix_and_the_candidate_dispatch_agrees(smoke):
    checks = smoke["parts"]["inference"]["checks"]
    assert checks == {b: {"fixed_mix_routed": True, "one_sync_dispatch_equals_dispatch": True}
                      for b in ("1", "2")}


@pytest.mark.slow
def test_smoke_trains_one_bf16_epoch_per_model(smoke):
    s1 = smoke["parts"]["stage1"]
    assert s1["precision"] == "bf16-mixed" and "--precision bf16-mixed" in s1["command"]
    assert s1["returncode"] == 0 and s1["images"]["pre"] > 0
    assert set(s1["models"]) == {"f0", "f1", "f2"}
    for m in s1["models"].values():
        assert m["epoch_seconds"] > 0 and m["images_per_s"] > 0
    assert s1["images_per_s"] == pytest.approx(s1["images"]["pre"] / s1["epoch_seconds"])


@pytest.mark.slow
def test_smoke_run_finishes_every_step(smoke):
    run = smoke["parts"]["run"]
    assert run["returncode"] == 0 and "paser run --preset battery-paper" in run["command"]
    assert list(run["steps"]) == ["stage1", "stage2", "stage3", "baselines", "report"]
    assert all(v["finished"] and v["seconds"] >= 0 for v in run["steps"].values())
    assert run["every_step_finished"] is True


@pytest.mark.slow
def test_smoke_records_peak_memory_of_every_part(smoke):
    # on CPU there is no GPU memory to count: the fields are there, null
    assert {name: p["peak_memory_mib"] for name, p in smoke["parts"].items()} == dict.fromkeys(
        PARTS)


def test_a_part_past_the_deadline_is_skipped_with_why(gpu, tmp_path, monkeypatch):
    out = tmp_path / "out.json"
    gpu.main(["--smoke", "--out", str(out), "--deadline", "0"])
    parts = json.loads(out.read_text())["parts"]
    assert {p["status"] for p in parts.values()} == {"skipped"}
    assert "before the deadline" in parts["inference"]["why"]


def test_a_failed_part_is_recorded_and_the_next_still_runs(gpu, tmp_path, monkeypatch):
    def broken(device, s, part, budget, save):
        part["rows"] = [ROW]  # what a part saved before it failed stays
        raise RuntimeError("CUDA error: out of memory")

    def stage1(device, s, part, budget, work):
        part["models"] = {}

    monkeypatch.setattr(gpu, "bench_inference", broken)
    monkeypatch.setattr(gpu, "bench_stage1", stage1)
    out = tmp_path / "out.json"
    gpu.main(["--smoke", "--out", str(out), "--only", "inference", "--only", "stage1"])
    parts = json.loads(out.read_text())["parts"]
    assert parts["inference"]["status"] == "failed"
    assert parts["inference"]["error"] == "RuntimeError: CUDA error: out of memory"
    assert parts["inference"]["rows"] == [ROW]
    assert parts["stage1"]["status"] == "ok"
    assert set(parts) == {"inference", "stage1"}  # --only: the others were not run


def test_the_environment_says_whether_the_tree_is_its_commit(gpu, tmp_path):
    """Before, only HEAD was recorded: cuda.json names commit 108b01f, docs/benchmarks.md
    the tree of 718ff16, and nothing in the JSON said which files ran."""
    def git(*argv):
        subprocess.run(["git", "-c", "user.name=t", "-c", "user.email=t@t", *argv],
                       cwd=tmp_path, check=True, capture_output=True)

    (tmp_path / "benchmarks" / "results").mkdir(parents=True)
    (tmp_path / "benchmarks" / "gpu.py").write_text("a")
    (tmp_path / "benchmarks" / "results" / "cuda.json").write_text("{}")
    git("init", "-q")
    git("add", ".")
    git("commit", "-qm", "x")
    head = subprocess.run(["git", "rev-parse", "HEAD"], cwd=tmp_path, capture_output=True,
                          text=True).stdout.strip()
    assert gpu.tree(tmp_path) == {"commit": head, "tree_modified": False}
    (tmp_path / "benchmarks" / "results" / "cuda.json").write_text('{"parts": {}}')
    (tmp_path / "new.txt").write_text("untracked")
    assert gpu.tree(tmp_path)["tree_modified"] is False  # its own results, untracked files
    (tmp_path / "benchmarks" / "gpu.py").write_text("b")
    assert gpu.tree(tmp_path) == {"commit": head, "tree_modified": True}
    assert gpu.tree(tmp_path / "benchmarks") == {"commit": head, "tree_modified": True}
    assert gpu.tree(tmp_path.parent / "nowhere") == {"commit": None, "tree_modified": None}


@pytest.mark.parametrize("text", ['{"parts": {', "[]", '{"parts": []}'])
def test_a_results_file_it_cannot_read_is_named(gpu, tmp_path, text):
    """Before, --only on a cut-short or foreign --out stopped on a JSONDecodeError (or an
    AttributeError) traceback that did not name the file."""
    out = tmp_path / "cuda.json"
    out.write_text(text)
    with pytest.raises(SystemExit) as e:
        gpu.main(["--smoke", "--only", "run", "--deadline", "0", "--out", str(out)])
    assert str(e.value).startswith(f"{out} is not a results file of this script")
    assert str(e.value).endswith("or --out another file")
    assert out.read_text() == text  # left as it was
