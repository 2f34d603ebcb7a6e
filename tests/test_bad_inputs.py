"""Every user entry point against bad input: one clear line on stderr (what, where, what to
do), a non-zero exit status, and a traceback only with --debug.

The CLI runs in this process (``paser.cli.main``), so the sweep costs milliseconds a case;
``tests/test_cli.py`` runs the real ``python -m paser`` for the same contract.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import sys

import numpy as np
import pytest
import torch
import yaml
from PIL import Image

from paser.cli import main
from paser.errors import CheckpointError, DataError

BATTERY = ["--preset", "battery-quick", "stage1.epochs=0", "stage1.batch_size=2",
           "models.f0.epochs=null", "models.pool.0.epochs=null", "models.pool.1.epochs=null"]


def cli(capsys, monkeypatch, *args) -> tuple[int, str]:
    """``paser ARGS`` in this process: (exit status, stderr)."""
    monkeypatch.setattr(sys, "argv", ["paser", *map(str, args)])
    capsys.readouterr()
    try:
        main()
        code = 0
    except SystemExit as exit_:
        code = exit_.code if isinstance(exit_.code, int) else 1
    return code, capsys.readouterr().err


def _png(path, array):
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(array).save(path)


def battery_root(tmp_path, n=3, size=64, label=None):
    """A dataset in the battery layout: images and labels, ``label`` overriding one label."""
    rng = np.random.default_rng(0)
    root = tmp_path / "battery"
    for split in ("train", "validation", "test"):
        for i in range(n):
            _png(root / f"{split}_images" / f"{i}.png",
                 rng.integers(0, 256, (size, size), dtype=np.uint8))
            _png(root / f"{split}_label" / f"{i}.png",
                 rng.choice(np.array([0, 128, 255], np.uint8), (size, size)))
    if label is not None:
        _png(root / "train_label" / "0.png", label)
    return root


def _one_line(err: str) -> str:
    lines = err.strip().splitlines()
    assert len(lines) == 1, err
    assert "Traceback" not in err
    if os.environ.get("PASER_SWEEP_LOG"):  # the messages, for a reader to review
        with open(os.environ["PASER_SWEEP_LOG"], "a") as fh:
            fh.write(lines[0] + "\n")
    return lines[0]


# (arguments after `paser`, text the one line must contain); {tmp} and {run} are filled in
CONFIG_CASES = {
    "unknown preset": (["config", "--preset", "nope"], "unknown preset 'nope'"),
    "unknown key": (["config", "--preset", "battery-quick", "stage1.epoch=3"],
                    "unknown key 'stage1.epoch'"),
    "lam above 1": (["config", "--preset", "battery-quick", "stage2.lam=1.5"], "stage2.lam"),
    "lam below 0": (["config", "--preset", "battery-quick", "stage3.lam=-0.1"], "stage3.lam"),
    "T < 1": (["config", "--preset", "battery-quick", "mc_samples=0"], "mc_samples"),
    "negative epochs": (["config", "--preset", "battery-quick", "stage1.epochs=-1"],
                        "stage1.epochs"),
    "grid of 0": (["config", "--preset", "battery-quick", "grid=[0,4]"], "grid"),
    "not a number": (["config", "--preset", "battery-quick", "stage2.lam=lots"], "stage2.lam"),
    "missing config file": (["config", "--config", "{tmp}/absent.yaml"], "absent.yaml"),
    "overlapping slice ranges": (["config", "--preset", "battery-quick",
                                  "data.slices={{train: [0, 40], validation: [30, 48], "
                                  "test: [51, 60]}}"],
                                 "train [0, 40) and validation [30, 48) share slices 30..39"),
}


@pytest.mark.parametrize("case", list(CONFIG_CASES))
def test_invalid_configs(case, capsys, monkeypatch, tmp_path):
    args, message = CONFIG_CASES[case]
    code, err = cli(capsys, monkeypatch, *[a.format(tmp=tmp_path) for a in args])
    assert code == 2
    line = _one_line(err)
    assert line.startswith("error: ") and message in line, line


def test_debug_shows_the_traceback(capsys, monkeypatch):
    monkeypatch.setattr(sys, "argv", ["paser", "--debug", "config", "--preset", "nope"])
    with pytest.raises(Exception, match="unknown preset"):
        main()


DATA_CASES = {
    "data root missing": (lambda tmp: tmp / "absent", "does not exist"),
    "empty data root": (lambda tmp: (tmp / "empty").mkdir() or tmp / "empty",
                        "folder not found"),
    "corrupt image": (lambda tmp: _corrupt(battery_root(tmp), b"not a png"),
                      "cannot read the image"),
    "truncated image": (lambda tmp: _corrupt(battery_root(tmp), None), "cannot read the image"),
    "label of another size": (lambda tmp: battery_root(tmp, label=np.zeros((32, 32), np.uint8)),
                              "its label"),
    "16-bit label": (lambda tmp: battery_root(tmp, label=np.full((64, 64), 300, np.uint16)),
                     "outside the label codec"),
    "colour label": (lambda tmp: battery_root(tmp, label=np.dstack(
        [np.zeros((64, 64), np.uint8), np.full((64, 64), 255, np.uint8),
         np.zeros((64, 64), np.uint8)])), "outside the label codec"),
    "grid larger than the image": (lambda tmp: battery_root(tmp, size=32),
                                   "grid"),
}


def _corrupt(root, content):
    path = root / "train_images" / "1.png"
    data = path.read_bytes()
    path.write_bytes(content if content is not None else data[:len(data) // 2])
    return root


@pytest.mark.slow
def test_data_check_names_every_unreadable_image_not_the_first_alone(capsys, monkeypatch,
                                                                     tmp_path):
    root = _corrupt(battery_root(tmp_path), b"not a png")
    (root / "train_label" / "2.png").write_bytes(b"")
    code, err = cli(capsys, monkeypatch, "data", "check", root)
    # after the bars of the files it went on to read (the rest of train, the other splits)
    assert code == 2 and "\nerror: 2 problems; fix each and check again:\n" in err, err
    assert "train_images/1.png: cannot read the image" in err
    assert "train_label/2.png" in err and "Traceback" not in err


@pytest.mark.parametrize("case", list(DATA_CASES))
def test_bad_datasets(case, capsys, monkeypatch, tmp_path):
    make, message = DATA_CASES[case]
    root = make(tmp_path)
    extra = ["grid=[64,64]"] if case == "grid larger than the image" else []
    code, err = cli(capsys, monkeypatch, "pretrain", *BATTERY, f"data.root={root}", *extra,
                    "--run-dir", tmp_path / "run")
    assert code == 2
    line = _one_line(err)
    assert message in line, line


def _copy_run(run, tmp_path):
    dst = tmp_path / "run"
    shutil.copytree(run, dst, ignore=shutil.ignore_patterns("onnx", "figures"))
    return dst


def test_bad_runs_and_checkpoints(mnist_run, capsys, monkeypatch, tmp_path):
    out = tmp_path / "out"
    image = tmp_path / "in" / "a.png"
    _png(image, np.zeros((28, 28), np.uint8))
    seg = ["segment", image, "--out", out, "--run-dir"]
    # not a run
    code, err = cli(capsys, monkeypatch, *seg, tmp_path)
    assert code == 2 and "not a run directory (no config.yaml)" in _one_line(err)
    assert f"`paser run --run-dir {tmp_path}`" in err
    # a truncated checkpoint
    run = _copy_run(mnist_run, tmp_path)
    code, err = cli(capsys, monkeypatch, *seg, tmp_path / "quick")  # the runs beside it named
    assert code == 2 and err.strip().endswith(f"or give a run: {run}"), err
    ckpt = run / "checkpoints" / "stage3.pt"
    ckpt.write_bytes(ckpt.read_bytes()[:100])
    code, err = cli(capsys, monkeypatch, *seg, run)
    assert code == 2 and "cannot load the checkpoint" in _one_line(err)
    assert "delete it and re-run" in err
    # a checkpoint of another pool: the config now asks for K = 3 where the run has K = 2
    shutil.rmtree(run)
    run = _copy_run(mnist_run, tmp_path)
    cfg = yaml.safe_load((run / "config.yaml").read_text())
    cfg["models"]["pool"].append(dict(cfg["models"]["pool"][-1]))
    (run / "config.yaml").write_text(yaml.safe_dump(cfg))
    code, err = cli(capsys, monkeypatch, *seg, run)
    line = _one_line(err)
    assert code == 2 and "K = 2 models, the config asks for K = 3" in line, line
    # a config file that is not YAML
    (run / "config.yaml").write_text("models: [unclosed\n")
    code, err = cli(capsys, monkeypatch, *seg, run)
    line = _one_line(err)
    assert code == 2 and "not valid YAML at line 2, column 1" in line, line


@pytest.mark.slow
def test_bad_images_for_segment(mnist_run, capsys, monkeypatch, tmp_path):
    import tifffile

    folder = tmp_path / "in"
    _png(folder / "good.png", np.zeros((28, 28), np.uint8))
    (folder / "corrupt.png").write_bytes(b"\x89PNG\r\n\x1a\n broken")
    good = (folder / "good.png").read_bytes()
    (folder / "truncated.png").write_bytes(good[:len(good) // 2])
    tifffile.imwrite(folder / "nan.tif", np.full((28, 28), np.nan, np.float32))
    tifffile.imwrite(folder / "five.tif", np.zeros((28, 28, 5), np.uint8), planarconfig="contig")
    run_dir = ["--run-dir", mnist_run, "--out", tmp_path / "out", "--workers", "0"]
    code, err = cli(capsys, monkeypatch, "segment", folder, *run_dir)
    assert code == 1  # the good image is written, the rest reported
    assert (tmp_path / "out" / "good_labels.png").is_file()
    failed = [line for line in err.splitlines() if line.startswith("failed: ")]
    assert len(failed) == 4, err
    for name, message in [("corrupt.png", "cannot read the image"),
                          ("truncated.png", "cannot read the image"),
                          ("nan.tif", "NaN or Inf"), ("five.tif", "5 channels")]:
        assert any(name in line and message in line for line in failed), (name, err)
    # no image at all, a missing path
    (tmp_path / "empty").mkdir()
    for path, message in [(tmp_path / "empty", "no image (.png, .tif"),
                          (tmp_path / "absent", "no such file or folder")]:
        code, err = cli(capsys, monkeypatch, "segment", path, *run_dir)
        assert code == 2 and message in _one_line(err)
    for option, message in [(["--engine", "tensorrt"], "--engine tensorrt: use torch or "
                                                       "onnxruntime"),
                            (["--remote", "ftp://x"], "--remote ftp://x: give an http:// or "
                                                     "https:// URL"),
                            (["--budget-gflops", "0.0001"], "below the"),
                            (["--budget-gflops", "nan"], "--budget-gflops nan: give a number"),
                            (["--remote", "http://127.0.0.1:99999"], "port 99999 is not a port"),
                            (["--remote", "http://[::1"], "--remote http://[::1: not a URL"),
                            (["--out", folder / "good.png"], "a file, not a folder")]:
        code, err = cli(capsys, monkeypatch, "segment", folder / "good.png", *run_dir, *option)
        assert code == 2 and message in _one_line(err), err


def test_python_api_rejects_bad_tensors_and_paths(mnist_run, tmp_path):
    from paser import PaSeR

    model = PaSeR.load(mnist_run, device="cpu")
    with pytest.raises(DataError, match="contain NaN or Inf"):
        model.segment(torch.full((1, 1, 28, 28), float("nan")))
    with pytest.raises(DataError, match=r"images have 3 channels, the models expect 1"):
        model.segment(torch.zeros(1, 3, 28, 28))
    with pytest.raises(DataError, match=r"\(an \[H, W, C\] image, as Pillow"):
        model.segment(np.zeros((28, 28, 3), np.uint8))
    with pytest.raises(DataError, match=r"images as a list of 2: give one batch .* or call "
                                        r"segment once per image \(images of different sizes"):
        model.segment([np.zeros((28, 28), np.uint8), np.zeros((32, 32), np.uint8)])
    model.config = model.config.model_copy(update={"models": model.config.models.model_copy(
        update={"in_channels": 3})})  # as a run of colour images
    with pytest.raises(DataError, match=r"\(a gray \[1, H, W\] image for models of 3 channels: "
                                        r"model.prepare\(image\[0\]\) repeats it\)"):
        model.segment(np.zeros((1, 28, 28), np.uint8))
    with pytest.raises(CheckpointError, match="not a run directory"):
        PaSeR.load(tmp_path)
    with pytest.raises(DataError, match="no such file or folder"):
        from paser.segment import find_images

        find_images([tmp_path / "absent"])


def test_loading_no_run_dir_says_one_is_needed():
    """PaSeR.load(None) raised Path's TypeError ("got NoneType")."""
    from paser import PaSeR

    for load, name in ((PaSeR.load, "PaSeR.load"), (PaSeR.load_onnx, "PaSeR.load_onnx")):
        with pytest.raises(CheckpointError, match=r"^run_dir=None: a run directory is needed; "
                           r"give the folder a run was trained into .*config\.yaml\), "
                           rf"e\.g\. {name}\('runs/demo'\)$"):  # the call that was made
            load(None)


def test_loading_an_onnx_export_as_a_run_says_how_to_load_it(tmp_path):
    """PaSeR.load on the folder paser export wrote said 'not a run directory (no
    config.yaml); train one into it first', as if it were an empty folder."""
    from paser import PaSeR

    run, elsewhere = tmp_path / "run", tmp_path / "exported"
    (run / "checkpoints").mkdir(parents=True)
    (run / "config.yaml").write_text("{}")
    for export in (run / "onnx", elsewhere):
        export.mkdir()
        (export / "manifest.json").write_text("{}")
    onnx, at = re.escape(str(run / "onnx")), re.escape(str(run))
    with pytest.raises(CheckpointError, match=(
            rf"^{onnx}: an ONNX export \(paser export's manifest.json\), not a run directory; "
            rf".*: PaSeR.load_onnx\('{at}', export_dir='{onnx}'\), or paser segment "
            rf"--run-dir {at} --engine onnxruntime --onnx {onnx}$")):
        PaSeR.load(run / "onnx")
    with pytest.raises(CheckpointError, match=r"PaSeR.load_onnx\(run_dir, export_dir=.* "
                                              r"--run-dir <run> --engine onnxruntime"):
        PaSeR.load_onnx(elsewhere)


def test_ctrl_c_says_how_the_command_goes_on(capsys, monkeypatch):
    """typer turns Ctrl-C into its exit status 130; the line says what to run next."""
    import paser.config

    def interrupt(*args, **kwargs):
        raise KeyboardInterrupt

    monkeypatch.setattr(paser.config, "load_config", interrupt)
    code, err = cli(capsys, monkeypatch, "config", "--preset", "battery-quick")
    assert code == 130
    assert _one_line(err) == "interrupted"  # config writes nothing to continue from
    from paser.cli import interrupted

    assert "--resume" in interrupted(["--debug", "pretrain", "--run-dir", "r"])


def test_ctrl_c_while_the_commands_load_exits_130(capsys, monkeypatch):
    """Ctrl-C in the third of a second ``paser`` (and ``python -m paser``) takes to load its
    commands, before any began, exits with 130 and says so, as it does later: it ended
    with a KeyboardInterrupt traceback, killed by SIGINT (status -2)."""
    import builtins

    from paser.__main__ import main as paser_command

    real_import = builtins.__import__

    def ctrl_c(name, *args, **kwargs):
        if name == "paser.cli":
            raise KeyboardInterrupt
        return real_import(name, *args, **kwargs)

    monkeypatch.setattr(builtins, "__import__", ctrl_c)
    with pytest.raises(SystemExit) as stop:
        paser_command()
    assert (stop.value.code, capsys.readouterr().err) == (130, "interrupted\n")


def test_out_of_memory_is_one_line_with_what_to_do(capsys, monkeypatch, tmp_path):
    """``paser data synth --height 100000 ...`` and its kind end in a MemoryError from numpy."""
    import paser.data.synthetic

    def too_large(*args, **kwargs):
        raise MemoryError

    monkeypatch.setattr(paser.data.synthetic, "generate_dataset", too_large)
    code, err = cli(capsys, monkeypatch, "data", "synth", "--out", tmp_path / "synth")
    assert code == 2
    assert _one_line(err).startswith("error: out of memory: ")
    assert "data.stream=always" in err


def test_synth_into_a_file_says_to_give_a_folder(capsys, monkeypatch, tmp_path):
    """--out naming a file was the file system's 'File exists' on <file>/train_images."""
    (tmp_path / "synth.png").write_bytes(b"x")
    code, err = cli(capsys, monkeypatch, "data", "synth", "--out", tmp_path / "synth.png")
    assert code == 2 and _one_line(err) == (
        f"error: {tmp_path / 'synth.png'}: a file, not a folder; the synthetic set is written "
        "into a new or empty folder: give --out a folder")
    assert (tmp_path / "synth.png").read_bytes() == b"x"


def test_a_file_system_refusal_is_one_line_with_the_path(capsys, monkeypatch, tmp_path):
    import errno

    import paser.data.synthetic

    def refused(out, *args, **kwargs):
        raise PermissionError(errno.EACCES, "Permission denied", str(out / "train_images"))

    monkeypatch.setattr(paser.data.synthetic, "generate_dataset", refused)
    code, err = cli(capsys, monkeypatch, "data", "synth", "--out", tmp_path / "synth")
    assert code == 2 and _one_line(err) == (
        f"error: {tmp_path / 'synth' / 'train_images'}: Permission denied; check the path "
        "and its permissions (and free space)")


@pytest.mark.parametrize("where", ["here", "on a cluster"])
def test_ctrl_c_in_a_volume_says_how_many_of_its_slices_are_kept(where, mnist_run, capsys,
                                                                 monkeypatch, tmp_path):
    """Stopped in its third chunk of two slices, scan.tif keeps four of its six slices: the
    line said only 'what finished is kept', and with --scheduler still did after the local
    line gave the count (the cluster's tasks run here in order: tests.helpers.InlineClient)."""
    import tifffile
    from tests.helpers import inline_cluster

    from paser import PaSeR

    if where == "on a cluster":
        inline_cluster(monkeypatch)

    tifffile.imwrite(tmp_path / "scan.tif", np.zeros((6, 28, 28), np.uint8),
                     photometric="minisblack")
    calls, stop, segment = [0], [5], PaSeR.segment

    def counted(self, *args, **kwargs):
        calls[0] += 1
        if calls[0] == stop[0]:
            raise KeyboardInterrupt
        return segment(self, *args, **kwargs)

    monkeypatch.setattr(PaSeR, "segment", counted)
    args = ["segment", tmp_path / "scan.tif", "--run-dir", mnist_run, "--out", tmp_path / "out",
            "--chunk", "2", *(["--scheduler", "inline"] if where == "on a cluster" else [])]
    code, err = cli(capsys, monkeypatch, *args)
    assert code == 130 and err.strip().splitlines()[-1] == (
        "interrupted; what finished is kept (4 of 6 slices of scan): run the same command "
        "again to continue where it stopped"), err
    calls[0], stop[0] = 0, 0
    code, err = cli(capsys, monkeypatch, *args)
    assert code == 0 and calls[0] == 2, err  # the two slices not kept, and no more


def test_a_failed_volume_is_exit_status_1_and_a_model_past_the_last_a_usage_error(
        mnist_run, capsys, monkeypatch, tmp_path):
    import tifffile

    from paser.cli.deploy import _model_index
    from paser.errors import ConfigError

    recon = np.full((4, 28, 28), 0.5, np.float32)
    recon[1, 3, 4] = np.nan  # refused: the run does not fill NaN
    tifffile.imwrite(tmp_path / "recon.tif", recon, photometric="minisblack")
    code, err = cli(capsys, monkeypatch, "segment", tmp_path / "recon.tif", "--run-dir",
                    mnist_run, "--out", tmp_path / "out")
    assert code == 1 and "1 of 1 volumes failed" in err, err
    with pytest.raises(ConfigError, match="--model f3: this run has f0, f1, f2"):
        _model_index("f3", 3)


@pytest.mark.parametrize("made", [False, True])
def test_baselines_without_a_config_name_the_options_that_give_one(made, capsys, monkeypatch,
                                                                   tmp_path):
    """`paser baselines` on a missing or empty run folder trained with battery-quick
    silently, as train-policy and finetune there do not."""
    run = tmp_path / "run"
    if made:
        run.mkdir()
    code, err = cli(capsys, monkeypatch, "baselines", "--run-dir", run)
    assert code == 2 and _one_line(err) == (
        f"error: {run}: not a run directory (no config.yaml), so no config to train the "
        f"baselines with; give one: paser baselines --run-dir {run} --preset NAME (or --config "
        f"FILE), or train stage 1 into it first: paser pretrain --run-dir {run} --preset NAME")
    assert (list(run.iterdir()) == []) if made else not run.exists()


@pytest.mark.parametrize("command", ["run", "pretrain", "baselines", "train-policy", "evaluate",
                                     "segment"])
def test_a_run_dir_that_is_a_file_is_named_as_one(command, capsys, monkeypatch, tmp_path):
    """A --run-dir that names a file (a report, a checkpoint) was 'File exists' or
    'Not a directory' from the file system, naming steps.json inside it."""
    (tmp_path / "report.md").write_text("# a report\n")
    args = [command, "--run-dir", tmp_path / "report.md"]
    if command == "segment":
        _png(tmp_path / "a.png", np.zeros((28, 28), np.uint8))
        args += [tmp_path / "a.png", "--out", tmp_path / "out"]
    code, err = cli(capsys, monkeypatch, *args)
    line = _one_line(err)
    assert code == 2 and f"{tmp_path / 'report.md'}: a file, not a" in line, line
    assert (tmp_path / "report.md").read_text() == "# a report\n"


@pytest.mark.parametrize("ledger", ['{"stage1": {"fingerpr', '["stage1"]'])
def test_an_unreadable_steps_json_is_refused_by_name(ledger, capsys, monkeypatch, tmp_path):
    """A truncated steps.json stopped `paser run` with a JSONDecodeError traceback, and
    loading the run ignored it: a stage stopped mid-way loaded as if finished."""
    from paser.checkpoints import unfinished_steps

    (tmp_path / "run").mkdir()
    (tmp_path / "run" / "steps.json").write_text(ledger)
    code, err = cli(capsys, monkeypatch, "run", "--run-dir", tmp_path / "run")
    # the refused run leaves the folder as it found it: no config.yaml of its own
    assert sorted(p.name for p in (tmp_path / "run").iterdir()
                  if p.name != ".paser.lock") == ["steps.json"]
    line = _one_line(err)
    assert code == 2 and f"{tmp_path / 'run' / 'steps.json'}: cannot read it (" in line, line
    assert line.endswith(f"delete it and `paser run --run-dir {tmp_path / 'run'}` runs every "
                         "step again")
    assert (tmp_path / "run" / "steps.json").read_text() == ledger
    with pytest.raises(CheckpointError, match="steps.json: cannot read it"):
        unfinished_steps(tmp_path / "run")


def test_a_run_refused_for_a_folder_in_use_leaves_the_other_process_files(capsys, monkeypatch,
                                                                          tmp_path):
    """A refused command put back or removed config.yaml and steps.json as they were when
    it started, even where it was refused because another process held the folder: the
    config.yaml that process wrote meanwhile was deleted under it."""
    import paser.runtime as runtime

    run = tmp_path / "run"
    run.mkdir()
    theirs = {"config.yaml": "seed: 3\n", "steps.json": "{}"}

    def held_elsewhere(path, blocking):  # the other process locked it and wrote its files
        for name, text in theirs.items():
            (run / name).write_text(text)
        path.write_text("4242")
        return None

    monkeypatch.setattr(runtime, "_lock", held_elsewhere)
    code, err = cli(capsys, monkeypatch, "run", "--preset", "battery-quick", "--run-dir", run)
    assert code == 2 and "is in use by another paser process (pid 4242)" in err, err
    assert {p.name: p.read_text() for p in run.iterdir()} == {**theirs, ".paser.lock": "4242"}


def test_python_api_evaluate_checks_its_data_as_segment_checks_images(mnist_run):
    """A column of the wrong kind, count or size was a bare AttributeError, IndexError or
    RuntimeError from deep in the models; NaN or 0..255 float images gave an mIoU."""
    from paser import PaSeR
    from paser.data import Tensors

    model = PaSeR.load(mnist_run, device="cpu")
    images, masks = torch.rand(4, 1, 28, 28), torch.zeros(4, 28, 28, dtype=torch.uint8)
    for data, message in [
            ((images, masks), r"data of type tuple: give paser.data.Tensors\(images, masks, "),
            (Tensors(images, masks[:2], list("abcd")), "4 images, 2 masks and 4 ids"),
            (Tensors(images, masks[:, :20], list("abcd")), r"masks of shape \(4, 20, 28\)"),
            (Tensors(images[:0], masks[:0], []), r"images of shape \(0, 1, 28, 28\)"),
            (Tensors(images.expand(4, 3, 28, 28), masks, list("abcd")),
             "images have 3 channels, the models expect 1"),
            (Tensors(images * 255, masks, list("abcd")), r"outside \[0, 1\]"),
            (Tensors(torch.full_like(images, float("nan")), masks, list("abcd")), "NaN")]:
        with pytest.raises(DataError, match=message):
            model.evaluate(data)
    with pytest.raises(DataError, match="batch_size 0: give a whole number, 1 or more"):
        model.evaluate(Tensors(images, masks, list("abcd")), batch_size=0)
    stored = Tensors((images * 255).to(torch.uint8), masks, list("abcd"))  # scaled as segment's
    assert model.evaluate(stored)["miou"] == model.evaluate(
        Tensors(stored.images / 255, masks, list("abcd")))["miou"]


def test_python_api_refuses_files_of_several_sizes_for_a_run_routed_whole(mnist_run,
                                                                          monkeypatch):
    """A run without a tile routes images whole, a batch of one size: evaluate and
    calibrate(data=...) of a file dataset of several sizes failed on a bare TypeError,
    'cannot unpack non-iterable NoneType object' (its size, read as every image's)."""
    from torch.utils.data import Dataset

    from paser import PaSeR

    class Files(Dataset):  # what paser's file datasets offer (paser.data.battery)
        sizes, ids, channels, size = [(28, 28), (40, 28)], ["a", "b"], 1, None

        def __len__(self):
            return 2

        def image(self, i):
            return torch.rand(1, *self.sizes[i])

        def mask(self, i):
            return torch.zeros(self.sizes[i], dtype=torch.uint8)

        def size_range(self):
            return "28 x 28 to 40 x 28"

    model = PaSeR.load(mnist_run, device="cpu")
    monkeypatch.setattr(PaSeR, "tile", property(lambda self: None))  # data.tile null
    said = (r"data: its images are 28 x 28 to 40 x 28, and this run routes images whole "
            r"\(data.tile null\), a batch of one size; give images of one size, or cut them "
            r"into tiles of one: paser.data.tiles.Tiles\(data, \(H, W\)\)")
    with pytest.raises(DataError, match=said):
        model.evaluate(Files())
    with pytest.raises(DataError, match=said):
        model.calibrate(1.0, save=False, data=Files())


def test_python_api_load_names_a_stage3_checkpoint_that_is_not_one(mnist_run, tmp_path):
    """A missing one was told to run `paser run --run-dir` on its grandparent folder, and
    the policy's checkpoint a bare KeyError: 'pool'."""
    from paser import PaSeR

    with pytest.raises(CheckpointError, match=r"stage3=.*absent.pt: not a file; give a "
                                              r"checkpoint paser finetune wrote: .*stage3.pt"):
        PaSeR.load(mnist_run, device="cpu", stage3=tmp_path / "absent.pt")
    with pytest.raises(CheckpointError, match=r"policy.pt: not a stage-3 checkpoint"):
        PaSeR.load(mnist_run, device="cpu", stage3=mnist_run / "checkpoints" / "policy.pt")


def test_python_api_refuses_a_remote_url_it_cannot_reach(mnist_run):
    """``use_remote("ftp://...")`` was taken, and every patch then fell back to f0 as if the
    server were down: a silent loss of quality."""
    pytest.importorskip("httpx")
    from paser import PaSeR
    from paser.errors import ConfigError

    model = PaSeR.load(mnist_run, device="cpu")
    with pytest.raises(ConfigError, match="--remote ftp://x: give an http:// or https:// URL"):
        model.use_remote("ftp://x")
    assert model.router.remote is None


@pytest.mark.parametrize(
    ("shape", "said"),
    [  # a thumbnail left the deepest norm layer one pixel: torch's 'Expected more than 1
        # value per channel when training', naming neither the image nor what to do
        ((3, 2), r"too small for the run's models .* nearer the one the run trained on "
                 r"\(32 x 32\)"),
        # a strip a few pixels high, pooled, left a convolution a side narrower than its
        # kernel: torch's 'Calculated padded input size per channel: (2 x 52). Kernel size:
        # (3 x 3). Kernel size can't be greater than actual input size'
        ((3, 200), r"too small for the run's models \(pooled, a side of it is narrower than "
                   r"their deeper layers' kernels\); .* \(32 x 32\)"),
    ],
)
def test_an_image_too_small_for_the_models_says_so(mnist_run, capsys, monkeypatch, tmp_path,
                                                    shape, said):
    """From PaSeR.segment and paser segment alike."""
    from paser import PaSeR

    h, w = shape
    with pytest.raises(DataError, match=rf"a {h} x {w} image is {said}"):
        PaSeR.load(mnist_run, device="cpu").segment(torch.rand(1, 1, h, w))
    _png(tmp_path / "in" / "small.png", np.zeros((w, h), np.uint8))
    code, err = cli(capsys, monkeypatch, "segment", tmp_path / "in" / "small.png", "--run-dir",
                    mnist_run, "--out", tmp_path / "out", "--workers", "0")
    assert code == 1 and f"small.png: a {w} x {h} image is too small" in err, err


def test_a_folder_dataset_with_no_image_says_so(capsys, monkeypatch, tmp_path):
    """An empty images/ was '0 images are too few for data.holdout [0.1, 0.1]', as if a larger
    share would help."""
    root = tmp_path / "mydata"
    (root / "images").mkdir(parents=True)
    (root / "masks").mkdir()
    (root / "images" / "notes.txt").write_text("scans to come\n")
    (root / "classes.yaml").write_text("classes: {0: background, 1: particle}\n")
    code, err = cli(capsys, monkeypatch, "data", "check", root)
    line = _one_line(err)
    assert code == 2 and f"{root / 'images'}: no image (.png, .tif" in line, line
    assert f"each with its mask of the same name in {root / 'masks'}" in line


@pytest.mark.slow
def test_a_results_json_cut_short_is_written_again_or_named(mnist_run, capsys, monkeypatch,
                                                            tmp_path):
    """A report cut short (a full disk, a copy stopped) was a JSONDecodeError traceback from
    paser run, paser serve and the experiments."""
    from paser import PaSeR
    from paser.serve.server import run_image_size

    run = _copy_run(mnist_run, tmp_path)
    (run / "results.json").write_text('{"methods": {')
    code, err = cli(capsys, monkeypatch, "experiment", "sensitivity", "--run-dir", run)
    line = _one_line(err)
    assert code == 2 and f"{run / 'results.json'}: cannot read it (" in line, line
    assert f"write the report again first: paser run --run-dir {run}" in line
    assert run_image_size(PaSeR.load(run, device="cpu")) == (32, 32)  # from the split
    from paser.config import load_config
    from paser.run import run as paser_run

    said = []
    paser_run(load_config(config_file=run / "config.yaml"), run, show_progress=False,
              echo=said.append)
    assert "[report] running (its results.json cannot be read: Expecting" in "\n".join(said)
    assert "methods" in json.loads((run / "results.json").read_text())


@pytest.mark.slow
def test_export_to_a_file_says_so(mnist_run, capsys, monkeypatch, tmp_path):
    """It was the file system's 'File exists', as for segment --out before."""
    pytest.importorskip("onnxruntime")
    (tmp_path / "model.onnx").write_bytes(b"")
    code, err = cli(capsys, monkeypatch, "export", "--run-dir", mnist_run, "--out",
                    tmp_path / "model.onnx")
    line = _one_line(err)
    assert code == 2 and line.endswith("model.onnx: a file, not a folder; give a folder for "
                                       "the export"), line


def test_a_run_dir_or_data_folder_that_is_missing_or_a_file_says_which(capsys, monkeypatch,
                                                                         tmp_path):
    (tmp_path / "notes.txt").write_text("x")
    (tmp_path / "a.png").write_bytes(b"")
    seg = ["segment", tmp_path / "a.png", "--out", tmp_path / "out", "--run-dir"]
    code, err = cli(capsys, monkeypatch, *seg, tmp_path / "absent")
    assert code == 2 and "absent: no such folder; train one into it first" in _one_line(err)
    code, err = cli(capsys, monkeypatch, "data", "check", tmp_path / "notes.txt")
    assert code == 2 and "notes.txt: a file, not a dataset folder; give the folder" in (
        _one_line(err))


def test_python_api_evaluates_noisy_float_images_a_little_outside_0_1(tmp_path):
    """Images with noise added (a robustness test) stray a little past [0, 1]: they were
    evaluated before evaluate checked its data, and must still be, to the same mIoU;
    0..255 floats are still refused."""
    from tests.helpers import bands_run

    from paser.data import Tensors
    from paser.evaluation import evaluate_router

    model = bands_run(tmp_path)
    g = torch.Generator().manual_seed(0)
    images = torch.rand(4, model.config.models.in_channels, 16, 16, generator=g)
    masks = torch.randint(0, 3, (4, 16, 16), generator=g, dtype=torch.uint8)
    noisy = Tensors(images + 0.05 * torch.randn(images.shape, generator=g), masks, list("abcd"))
    assert float(noisy.images.min()) < -0.05 and float(noisy.images.max()) > 1.05
    direct = evaluate_router(model.router, noisy, 3, 16, bias=model._bias(None))
    assert model.evaluate(noisy)["miou"] == direct["miou"]
    with pytest.raises(DataError, match=r"outside \[0, 1\]"):
        model.evaluate(Tensors(images * 255, masks, list("abcd")))


@pytest.mark.parametrize("inputs", ["image", "volume", "both", "both on a cluster"])
def test_a_refused_out_folder_prints_the_error_alone(inputs, mnist_run, capsys, monkeypatch,
                                                      tmp_path):
    """--out made with other settings is refused before anything runs: the refusal printed
    after an empty progress bar ('segment 0/1 0:00:00'), which read as a start."""
    import tifffile
    from tests.helpers import inline_cluster

    cluster = ["--scheduler", "inline"] if inputs.endswith("on a cluster") else []
    if cluster:
        inline_cluster(monkeypatch)
    _png(tmp_path / "in" / "a.png", np.zeros((28, 28), np.uint8))
    tifffile.imwrite(tmp_path / "in" / "scan.tif", np.zeros((4, 28, 28), np.uint8),
                     photometric="minisblack")
    given = {"image": ["a.png"], "volume": ["scan.tif"]}.get(inputs, ["a.png", "scan.tif"])
    args = ["segment", *(tmp_path / "in" / name for name in given), "--run-dir", mnist_run,
            "--out", tmp_path / "out", "--workers", "0", *cluster]
    code, err = cli(capsys, monkeypatch, *args)
    assert code == 0, err
    code, err = cli(capsys, monkeypatch, *args, "--model", "f0")
    assert code == 2 and _one_line(err) == (
        f"error: {tmp_path / 'out'} holds the outputs of other settings (--model: routed there, "
        "f0 (unet_tiny) now); give another --out, or --overwrite to start over"), err
