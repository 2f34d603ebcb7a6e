"""benchmarks/bench.py (`make bench`) as a user runs it: its results file and its errors
for settings it cannot measure, with a stand-in for the measurement itself."""

import json
import sys
from pathlib import Path

import pytest
import torch


@pytest.fixture
def bench(monkeypatch):
    monkeypatch.syspath_prepend(str(Path(__file__).resolve().parents[1] / "benchmarks"))
    import bench

    monkeypatch.setattr(bench, "bench_layout", lambda batch, repeats: {"f0": [1.0, 2.0]})
    monkeypatch.setattr(bench, "_print_layout", lambda r: None)
    return bench


def run(bench, monkeypatch, *argv):
    monkeypatch.setattr(sys, "argv", ["bench.py", *argv])
    bench.main()


def test_a_run_stopped_while_writing_keeps_the_last_results(bench, monkeypatch, tmp_path):
    out = tmp_path / "cpu.json"
    run(bench, monkeypatch, "--only", "layout", "--device", "cpu", "--out", str(out))
    before = out.read_text()
    assert json.loads(before)["layout"] == {"f0": [1.0, 2.0]}

    def stopped(self, text, *args, **kwargs):  # half the text written, then Ctrl-C
        with open(self, "w") as fh:
            fh.write(text[: len(text) // 2])
        raise KeyboardInterrupt

    monkeypatch.setattr(Path, "write_text", stopped)
    with pytest.raises(KeyboardInterrupt):
        run(bench, monkeypatch, "--only", "layout", "--device", "cpu", "--out", str(out))
    assert out.read_text() == before  # whole, as the finished run left it
    assert [p.name for p in tmp_path.iterdir()] == ["cpu.json"]  # no temporary file left


def test_a_results_file_that_is_not_json_is_named(bench, monkeypatch, tmp_path, capsys):
    out = tmp_path / "cpu.json"
    out.write_text('{"layout": {"f0": [1.0,')
    with pytest.raises(SystemExit) as e:
        run(bench, monkeypatch, "--only", "layout", "--device", "cpu", "--out", str(out))
    assert e.value.code == 2
    err = capsys.readouterr().err
    assert f"{out} is not a results file" in err and "--out another file" in err
    assert out.read_text() == '{"layout": {"f0": [1.0,'


@pytest.mark.parametrize("argv, message", [
    (["--device", "gpu"], "--device gpu: not a torch device"),
    (["--device", "cuda"], "--device cuda: CUDA is not available here; --device cpu"),
])
def test_a_device_it_cannot_use_is_an_error(bench, monkeypatch, tmp_path, capsys, argv,
                                            message):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    with pytest.raises(SystemExit) as e:
        run(bench, monkeypatch, *argv, "--out", str(tmp_path / "x.json"))
    assert e.value.code == 2 and message in capsys.readouterr().err
    assert not (tmp_path / "x.json").exists()


def test_cpu_only_parts_asked_for_on_cuda_are_an_error(bench, monkeypatch, tmp_path, capsys):
    """Before, `--only layout --device cuda` measured nothing and said only "nothing new to
    write"."""
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    with pytest.raises(SystemExit) as e:
        run(bench, monkeypatch, "--only", "inference", "--only", "layout", "--only", "train",
            "--device", "cuda", "--out", str(tmp_path / "x.json"))
    assert e.value.code == 2
    assert "--only layout train: measured on the CPU only; add --device cpu" in (
        capsys.readouterr().err)
    assert not (tmp_path / "x.json").exists()


@pytest.mark.parametrize("flag", ["--repeats", "--batch", "--rounds", "--images"])
def test_counts_of_none_are_an_error(bench, monkeypatch, tmp_path, capsys, flag):
    """Before, `--only train --repeats 0` ran the part's warm-up and then stopped on
    statistics.StatisticsError: no median for empty data."""
    with pytest.raises(SystemExit) as e:
        run(bench, monkeypatch, "--only", "layout", "--device", "cpu", flag, "0",
            "--out", str(tmp_path / "x.json"))
    assert e.value.code == 2
    assert f"argument {flag}: 0: at least 1" in capsys.readouterr().err
    assert not (tmp_path / "x.json").exists()


def test_the_volume_frontier_names_its_unit(bench, capsys):
    """Before, the volume part wrote PaSeR's 0.934 s per megavoxel as "paser_ms": 0.934
    (paser.frontier.wall_clock's names, of milliseconds per image)."""
    rows = {"PaSeR": {"s_per_megavoxel": 0.9, "miou": 0.83},
            "f0 alone": {"s_per_megavoxel": 0.3, "miou": 0.80},
            "f1 alone": {"s_per_megavoxel": 1.2, "miou": 0.86}}
    f = bench.volume_frontier(rows)
    assert f == {"paser_s_per_megavoxel": 0.9, "paser_miou": 0.83,
                 "frontier_s_per_megavoxel_at_equal_miou": pytest.approx(0.3 + 0.9 / 2),
                 "ratio": pytest.approx(0.9 / 0.75), "met": False}
    row = {"megavoxels_per_s": 1.0, "seconds": 1.0, "peak_rss_mib": 900.0, "miou": 0.8,
           "gflops_per_slice": 1.0}
    bench._print_volume({"slice": [1024, 1024], "tile": [128, 128], "data": "mosaic",
                         "rows": {"2": {"PaSeR": row}}, "frontier": {"2": f},
                         "peak_rss_mib_paser": [900.0], "depths": [2], "met_memory": True})
    assert "PaSeR 0.900 s/Mvox against the frontier's 0.750 at equal IoU: missed" in (
        capsys.readouterr().out)


def test_a_child_that_fails_says_why(bench, monkeypatch, tmp_path):
    """Before, the memory and train-memory parts ran their child with check=True and
    capture_output: its error was swallowed, and the bench stopped on "Command [...]
    returned non-zero exit status 1." (as with --workers -1, which DataLoader refuses)."""
    script = tmp_path / "child.py"
    script.write_text("import sys\nsys.exit('ValueError: num_workers option should be "
                      "non-negative')\n")
    monkeypatch.setattr(bench, "__file__", str(script))
    monkeypatch.setattr(bench, "ensure_test_data", lambda images: tmp_path)
    with pytest.raises(RuntimeError, match=r"memory failed \(exit status 1\): ValueError: "
                                           "num_workers option should be non-negative"):
        bench.bench_memory(16, 8, -1)


@pytest.mark.parametrize("argv, message", [
    (["--cluster-layouts", "2"], "argument --cluster-layouts: '2' is not WORKERSxTHREADS"),
    (["--cluster-layouts", "1x2", "0x2"], "argument --cluster-layouts: 0x2: at least 1 worker"),
    (["--cluster-slices", "1"], "--cluster-slices 1: a volume has at least 2 slices"),
    (["--workers", "-1"], "argument --workers: -1: at least 0"),
    (["--segment-images", "1001"], "--segment-images 1001: at most 1000"),
])
def test_settings_it_cannot_measure_are_an_error(bench, monkeypatch, tmp_path, capsys, argv,
                                                 message):
    """Before, --cluster-layouts 2 stopped on 'not enough values to unpack' after the part
    had segmented its volume, 0x2 asked for a cluster of no workers, --cluster-slices 1 wrote
    a one-page TIFF (an image) and stopped on the same unpacking, --workers -1 reached
    DataLoader's refusal in the child, and --segment-images 1001 segmented 1,000."""
    with pytest.raises(SystemExit) as e:
        run(bench, monkeypatch, "--only", "layout", "--device", "cpu", *argv,
            "--out", str(tmp_path / "x.json"))
    assert e.value.code == 2 and message in capsys.readouterr().err
    assert not (tmp_path / "x.json").exists()


def test_cluster_layouts_are_read_as_workers_and_threads(bench):
    assert bench.layout("2x1") == (2, 1) and bench.layout("1X2") == (1, 2)


def test_the_memory_total_counts_every_reader(bench, monkeypatch, tmp_path, capsys):
    """Before, --workers 2 added one reader's peak RSS: 'peak RSS 1023 MiB (+ reader 435
    MiB) = 1458 MiB' for two readers of up to 435 MiB each."""
    seen = []

    def child(argv, what):
        seen.append(argv)
        return {"images": 16, "seconds": 4.0, "peak_rss_mib": 1023.0,
                "rss_before_eval_mib": 700.0, "peak_rss_worker_mib": 435.0,
                "fractions": [0.5, 0.35, 0.15], "gflops": 12.8}

    monkeypatch.setattr(bench, "child", child)
    monkeypatch.setattr(bench, "ensure_test_data", lambda images: tmp_path)
    r = bench.bench_memory(16, 8, 2)
    assert seen == [["--memory-child", str(tmp_path), "--batch", "8", "--workers", "2"]]
    assert r["peak_total_mib"] == 1023 + 2 * 435 and r["met"] is True
    bench._print_memory(r)
    assert "(batch 8, 2 reader processes): 4 s, peak RSS 1023 MiB (+ 2 x reader 435 MiB) = " \
           "1893 MiB" in capsys.readouterr().out
    assert bench.bench_memory(16, 8, 0)["peak_total_mib"] == 1023  # no reader: 0 of them
