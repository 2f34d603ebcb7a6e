"""`paser segment`: any image file in, label maps, overlays, routing maps, JSON and CSV out."""

from __future__ import annotations

import csv
import json
from pathlib import Path

import numpy as np
import pytest
import tifffile
import torch
from PIL import Image
from tests.helpers import paser_here

from paser.data.battery import decode_label
from paser.errors import DataError
from paser.segment import find_images, read_input, segment_files
from paser.volumes import split_inputs

RNG = np.random.default_rng(0)


def test_8_and_16_bit_grayscale_are_scaled_by_their_range(tmp_path):
    a8 = RNG.integers(0, 256, (5, 7), dtype=np.uint8)
    Image.fromarray(a8).save(tmp_path / "a.png")
    a16 = RNG.integers(0, 65536, (5, 7), dtype=np.uint16)
    Image.fromarray(a16).save(tmp_path / "b.png")
    tifffile.imwrite(tmp_path / "c.tif", a16)
    x8, notes8 = read_input(tmp_path / "a.png", 1)
    assert x8.shape == (1, 5, 7) and np.allclose(x8[0], a8 / 255.0) and notes8 == []
    for name in ("b.png", "c.tif"):
        x16, notes = read_input(tmp_path / name, 1)
        assert np.allclose(x16[0], a16 / 65535.0) and notes == []


def test_colour_becomes_luminance_and_gray_is_repeated_for_rgb_models(tmp_path):
    rgb = RNG.integers(0, 256, (6, 4, 3), dtype=np.uint8)
    Image.fromarray(rgb).save(tmp_path / "rgb.png")
    x, notes = read_input(tmp_path / "rgb.png", 1)
    want = rgb.astype(np.float64) / 255 @ np.array([0.2125, 0.7154, 0.0721])  # skimage rgb2gray
    assert x.shape == (1, 6, 4) and np.allclose(x[0], want, atol=1e-6)
    assert notes == ["RGB converted to grayscale (luminance) for 1-channel models"]
    same = np.repeat(rgb[..., :1], 3, axis=-1)  # a grayscale scan saved as RGB: kept as is
    Image.fromarray(same[..., 0]).save(tmp_path / "gray.jpg", quality=100)
    Image.fromarray(np.dstack([same, np.full((6, 4), 255, np.uint8)])).save(tmp_path / "a.png")
    x, notes = read_input(tmp_path / "a.png", 1)
    assert np.allclose(x[0], same[..., 0] / 255) and notes == ["alpha channel dropped"]
    g, notes = read_input(tmp_path / "gray.jpg", 3)
    assert g.shape == (3, 6, 4) and notes == ["grayscale repeated to 3 channels for RGB models"]


def test_16_bit_rgb_tiff_stacks_and_floats(tmp_path):
    rgb16 = RNG.integers(0, 65536, (4, 5, 3), dtype=np.uint16)
    tifffile.imwrite(tmp_path / "rgb16.tif", rgb16, photometric="rgb")
    x, notes = read_input(tmp_path / "rgb16.tif", 3)
    assert np.allclose(x, np.moveaxis(rgb16, -1, 0) / 65535.0) and notes == []
    stack = RNG.integers(0, 256, (3, 4, 5), dtype=np.uint8)
    tifffile.imwrite(tmp_path / "stack.tif", stack, photometric="minisblack")
    x, notes = read_input(tmp_path / "stack.tif", 1)
    assert np.allclose(x[0], stack[0] / 255) and notes[0].startswith(
        "a stack of 3 pages (TIFF axes QYX); the first one read")
    f = np.array([[-2.0, 0.0], [2.0, 6.0]], dtype=np.float32)
    tifffile.imwrite(tmp_path / "f.tif", f)
    x, notes = read_input(tmp_path / "f.tif", 1)
    assert np.allclose(x[0], [[0, 0.25], [0.5, 1]]) and "min-max scaled" in notes[0]


def test_unreadable_and_mismatched_inputs_name_the_file(tmp_path):
    (tmp_path / "bad.png").write_bytes(b"not a png")
    with pytest.raises(DataError, match="bad.png: cannot read the image"):
        read_input(tmp_path / "bad.png", 1)
    Image.fromarray(np.zeros((4, 4, 3), np.uint8)).save(tmp_path / "rgb.png")
    with pytest.raises(DataError, match="rgb.png: 3 channels, and the models take 2"):
        read_input(tmp_path / "rgb.png", 2)


def test_find_images_in_folders_files_and_errors(tmp_path):
    for sub in ("sub", ".ipynb_checkpoints", "out"):
        (tmp_path / "d" / sub).mkdir(parents=True)
    for name in ("d/b.png", "d/sub/a.TIF", "d/notes.txt", "c.jpeg", "d/s.bmp",
                 "d/._b.png", "d/.ipynb_checkpoints/b.png", "d/out/b_labels.png"):
        (tmp_path / name).write_bytes(b"x")
    # hidden files and folders (macOS resource forks, notebooks' copies) and the output
    # folder inside the input are not inputs
    found = find_images([tmp_path / "d", tmp_path / "c.jpeg"], exclude=tmp_path / "d" / "out")
    assert [f.name for f in found] == ["b.png", "s.bmp", "a.TIF", "c.jpeg"]
    with pytest.raises(DataError, match="d/x: no such file or folder"):
        find_images([tmp_path / "d" / "x"])
    (tmp_path / "e").mkdir()
    with pytest.raises(DataError, match=r"no image \(.png, .tif, .tiff, .jpg, .jpeg, .jpe, .jfif, "
                       r".bmp, .webp, .gif, .pgm, .ppm\) in .*give image files"):
        find_images([tmp_path / "e"])
    (tmp_path / "e" / "scan.jp2").write_bytes(b"x")  # a format it does not read: named
    with pytest.raises(DataError, match=r"e; skipped 1 file in a format paser does not read "
                       r"\(1 .jp2; e.g. .*scan.jp2\): convert them to TIFF or PNG"):
        find_images([tmp_path / "e"])
    (tmp_path / "e" / "scan.jp2").unlink()
    (tmp_path / "e" / "b.png").write_bytes(b"x")
    with pytest.raises(DataError, match="same stem 'b':"):
        find_images([tmp_path / "d", tmp_path / "e"])
    # every shared stem named at once, not one a call (a folder of scan.png and scan.tif)
    for stem in ("c", "f"):
        (tmp_path / "e" / f"{stem}.png").write_bytes(b"x")
        (tmp_path / "e" / f"{stem}.tif").write_bytes(b"x")
    with pytest.raises(DataError, match=r"same stem 'b' \(so do 2 more stems: 'c', 'f'\): "
                                        "their outputs would overwrite each other"):
        find_images([tmp_path / "d", tmp_path / "e"])


def test_a_mistyped_input_names_the_path_it_was_likely_meant_to_be(tmp_path):
    """``scn.tif`` for ``scan.tif``: 'no such file or folder' alone left the user to find
    the typo; the path beside it whose name is close is named, an HDF5 key kept."""
    (tmp_path / "scan.tif").write_bytes(b"x")
    (tmp_path / "beamline.h5").write_bytes(b"x")
    (tmp_path / "recon.zarr").mkdir()
    for typed, meant in (("scn.tif", "scan.tif"), ("recon.zar", "recon.zarr"),
                         ("beamlin.h5:/entry/data", "beamline.h5:/entry/data")):
        with pytest.raises(DataError) as err:
            split_inputs([f"{tmp_path}/{typed}"])
        assert str(err.value) == (f"{tmp_path}/{typed}: no such file or folder; did you mean "
                                  f"{tmp_path}/{meant}?")
    with pytest.raises(DataError) as err:  # nothing close: nothing named
        find_images([tmp_path / "other.png"])
    assert str(err.value) == f"{tmp_path / 'other.png'}: no such file or folder"


def test_a_run_directory_as_out_is_refused_before_anything_is_written(tmp_path):
    """``--out`` a run's own folder (the --run-dir typed twice, or another run's): the
    outputs landed among its files, and an image named ``results.png`` or
    ``calibration.tif`` wrote over the run's results.json or calibration.json."""
    run = tmp_path / "run"
    (run / "checkpoints").mkdir(parents=True)
    (run / "config.yaml").write_text("seed: 0\n")
    (tmp_path / "calibration.png").write_bytes(b"x")
    res = paser_here("segment", str(tmp_path / "calibration.png"), "--run-dir", str(run),
                     "--out", str(run))
    assert res.returncode == 2
    assert res.stderr.strip() == (
        f"error: --out {run}: a run directory (config.yaml, checkpoints/); the outputs, named "
        "by the inputs (<stem>.json, <stem>_labels.png), would lie among its files and could "
        "replace them (results.json, calibration.json): give them a folder of their own, e.g. "
        f"{run / 'segmented'}")
    assert sorted(p.name for p in run.iterdir()) == ["checkpoints", "config.yaml"]


@pytest.mark.parametrize("layout", [("images", "masks"), ("test/images", "test/masks"),
                                    ("test_images", "test_label")])
def test_a_dataset_folder_given_to_segment_names_its_images(tmp_path, layout):
    """A user's training folder given to ``paser segment``: its masks, of the images'
    names, are found as images too; the error says to give the images, not to rename."""
    images, masks = (tmp_path / "mydata" / part for part in layout)
    for folder in (images, masks):
        folder.mkdir(parents=True)
        (folder / "a.png").write_bytes(b"x")
    said = (f"{tmp_path / 'mydata'}: a dataset folder, its masks beside its images "
            f"({images / 'a.png'} and {masks / 'a.png'} share the stem 'a'); paser segment "
            f"reads every image under a folder, masks included: give the images to segment, "
            f"e.g. {images}")
    for find in (find_images, split_inputs):  # split_inputs: the command's own path
        with pytest.raises(DataError) as err:
            find([tmp_path / "mydata"])
        assert str(err.value) == said
    assert find_images([images]) == [images / "a.png"]


def _inputs(folder):
    folder.mkdir()
    Image.fromarray(RNG.integers(0, 256, (28, 28), dtype=np.uint8)).save(folder / "a.png")
    Image.fromarray(RNG.integers(0, 65536, (40, 33), dtype=np.uint16)).save(folder / "b.png")
    Image.fromarray(RNG.integers(0, 256, (30, 30, 3), dtype=np.uint8)).save(folder / "c.jpg")
    (folder / "d.png").write_bytes(b"broken")
    return folder


@pytest.mark.slow
def test_segment_files_writes_every_output_and_skips_a_bad_file(mnist_run, tmp_path):
    from paser import PaSeR

    model = PaSeR.load(mnist_run)
    files = find_images([_inputs(tmp_path / "in")])
    results = segment_files(model, files, tmp_path / "out")
    assert [r.ok for r in results] == [True, True, True, False]
    assert "d.png: cannot read the image" in results[3].error
    for r, (h, w) in zip(results[:3], [(28, 28), (40, 33), (30, 30)], strict=True):
        x, _ = read_input(r.input, 1)
        out = model.segment(torch.from_numpy(x)[None])
        labels = np.asarray(Image.open(tmp_path / "out" / f"{r.stem}_labels.png"))
        assert labels.shape == (h, w)
        assert np.array_equal(decode_label(labels), out.mask[0].numpy())  # the dataset codec
        for kind in ("overlay", "routing"):
            img = Image.open(tmp_path / "out" / f"{r.stem}_{kind}.png")
            assert img.size == (w, h) and img.mode == "RGB"
        record = json.loads((tmp_path / "out" / f"{r.stem}.json").read_text())
        assert record["actions"] == out.actions[0].view(1, 1).tolist()
        assert record["gflops"] == pytest.approx(float(out.gflops[0]))
        assert record["flop_convention"].startswith("torch.utils.flop_counter")
        assert record["ms"] > 0 and record["height"] == h
    assert json.loads((tmp_path / "out" / "c.json").read_text())["notes"] == [
        "RGB converted to grayscale (luminance) for 1-channel models"]
    rows = list(csv.DictReader(open(tmp_path / "out" / "summary.csv")))
    assert [r["status"] for r in rows] == ["ok", "ok", "ok", "failed"]
    assert "cannot read" in rows[3]["error"]
    # a later call with one more image (and one done: skipped) keeps the rows of the others
    Image.fromarray(RNG.integers(0, 256, (20, 24), dtype=np.uint8)).save(tmp_path / "e.png")
    segment_files(model, [files[1], tmp_path / "e.png"], tmp_path / "out")
    rows = list(csv.DictReader(open(tmp_path / "out" / "summary.csv")))
    assert [Path(r["input"]).name for r in rows] == ["a.png", "c.jpg", "d.png", "b.png", "e.png"]
    assert [r["status"] for r in rows] == ["ok", "ok", "failed", "ok", "ok"]
    # the labels alone: the same label PNG, no previews, and the record says what it wrote
    lean = segment_files(model, files[:1], tmp_path / "lean", previews=False)
    assert lean[0].ok and sorted(p.name for p in (tmp_path / "lean").glob("*.png")) == [
        f"{lean[0].stem}_labels.png"]
    assert (tmp_path / "lean" / f"{lean[0].stem}_labels.png").read_bytes() == (
        tmp_path / "out" / f"{lean[0].stem}_labels.png").read_bytes()
    assert json.loads((tmp_path / "lean" / f"{lean[0].stem}.json").read_text())["outputs"] == {
        "labels": f"{lean[0].stem}_labels.png"}
    # over a folder with previews, an overwrite without them leaves none of the old ones
    segment_files(model, files[:1], tmp_path / "out", previews=False, overwrite=True)
    assert not (tmp_path / "out" / f"{lean[0].stem}_overlay.png").exists()
    assert not (tmp_path / "out" / f"{lean[0].stem}_routing.png").exists()


@pytest.mark.slow  # `paser segment` in processes
def test_images_and_slices_that_fill_the_lowest_eighth_of_their_type_are_noted(mnist_run,
                                                                               tmp_path):
    """12-bit camera data in 16-bit files reaches an 8-bit-trained run nearly black: each
    such image or slice says so in its notes, and the command once on the terminal. Full
    range and all-zero (fill) pixels get no note."""
    from paser.data.images import DIM_NOTE

    inputs = tmp_path / "in"
    inputs.mkdir()
    twelve = RNG.integers(0, 4096, (28, 28)).astype(np.uint16)
    twelve[0, 0] = 4095
    Image.fromarray(twelve).save(inputs / "dim.png")
    Image.fromarray(twelve * 16).save(inputs / "full.png")
    tifffile.imwrite(inputs / "v.tif", np.stack([twelve, twelve, 0 * twelve]),
                     photometric="minisblack")
    res = paser_here("segment", str(inputs), "--run-dir", str(mnist_run), "--out",
                     str(tmp_path / "o"))
    assert res.returncode == 0, res.stderr
    assert "note: the pixels of 1 of 2 images fill only the lowest eighth" in res.stdout
    assert "  note: the pixels of 2 of 3 slices fill only the lowest eighth" in res.stdout
    with open(tmp_path / "o" / "summary.csv") as fh:
        notes = {Path(r["input"]).name: r["notes"] for r in csv.DictReader(fh)}
    assert notes["dim.png"].startswith(f"{DIM_NOTE} (uint16 values up to 4095, 6.2 % of it")
    assert DIM_NOTE not in notes["full.png"]
    slices = json.loads((tmp_path / "o" / "v.json").read_text())["slices"]
    assert [any(n.startswith(DIM_NOTE) for n in s.get("notes", [])) for s in slices] == [
        True, True, False]


@pytest.mark.slow
def test_cli_segment_exit_status_and_messages(mnist_run, tmp_path):
    inputs = _inputs(tmp_path / "in")
    tifffile.imwrite(inputs / "v.tif", RNG.integers(0, 256, (20, 28, 28), dtype=np.uint8),
                     photometric="minisblack")  # a stack of 20 slices: a volume
    res = paser_here("segment", str(inputs), "--run-dir", str(mnist_run), "--out", str(tmp_path / "o"))
    assert res.returncode == 1
    assert "failed:" in res.stderr and "d.png" in res.stderr
    assert "3 of 4 images segmented in" in res.stdout
    assert "v.tif: 20 x 28 x 28 (0.01568 megavoxels)" in res.stdout
    assert (tmp_path / "o" / "c_labels.png").is_file()
    assert tifffile.imread(tmp_path / "o" / "v_labels.tif").shape == (20, 28, 28)
    res = paser_here("segment", str(inputs), "--run-dir", str(mnist_run), "--out", str(tmp_path / "o"))
    assert "3 of 4 images were segmented before" in res.stdout  # the failed one again
    assert "segmented before (skipped)" in res.stdout
    # --overwrite starts the volume and the images over under one claim: the next call
    # finds both done (the images' claim had replaced the volume's)
    paser_here("segment", str(inputs), "--run-dir", str(mnist_run), "--out", str(tmp_path / "o"),
          "--overwrite")
    res = paser_here("segment", str(inputs), "--run-dir", str(mnist_run), "--out", str(tmp_path / "o"))
    assert "3 of 4 images were segmented before" in res.stdout
    assert "segmented before (skipped)" in res.stdout
    # the images' records with no manifest (an older paser's folder): refused for both,
    # not taken over by the volume's claim
    (tmp_path / "o" / ".paser-segment.json").unlink()
    for name in ("v.json", "volumes.csv"):  # the volume's own markers gone
        (tmp_path / "o" / name).unlink()
    res = paser_here("segment", str(inputs), "--run-dir", str(mnist_run), "--out", str(tmp_path / "o"))
    assert res.returncode == 2 and "holds paser's outputs" in res.stderr
    res = paser_here("segment", str(tmp_path / "nothing"), "--run-dir", str(mnist_run), "--out",
                str(tmp_path / "o2"))
    assert res.returncode == 2 and "no such file or folder" in res.stderr
    # a budget per megapixel, above every patch on the largest model: said so, and used
    res = paser_here("segment", str(inputs / "a.png"), "--run-dir", str(mnist_run), "--out",
                str(tmp_path / "o3"), "--budget-gflops-per-mp", "1e6", "--no-previews")
    assert res.returncode == 0, res.stderr
    assert "calibrated for this call on" in res.stdout and "bounds nothing" in res.stdout
    assert "GFLOP/MP" in res.stdout and not (tmp_path / "o3" / "a_overlay.png").exists()
    assert "with reading and writing" in res.stdout
    res = paser_here("segment", str(inputs / "a.png"), "--run-dir", str(mnist_run), "--out",
                str(tmp_path / "o3"), "--budget-gflops-per-mp", "1e6", "--no-previews")
    assert "1 of 1 images were segmented before" in res.stdout  # no rate of what took no time
    assert "1 of 1 images segmented in " in res.stdout and "(0 now, 1 before)" in res.stdout
    assert "with reading and writing" not in res.stdout
    res = paser_here("segment", str(inputs / "a.png"), "--run-dir", str(mnist_run), "--out",
                str(tmp_path / "o4"), "--model", "f1", "--budget-gflops-per-mp", "50")
    assert res.returncode == 2 and "drop --budget-gflops-per-mp" in res.stderr
    from paser import runtime

    assert not [k for k in runtime._HELD if str(tmp_path) in k]  # the calls let go of --out


def test_a_subfolder_that_cannot_be_listed_is_named_not_passed_over(tmp_path, monkeypatch):
    import os

    (tmp_path / "in" / "locked").mkdir(parents=True)
    (tmp_path / "in" / "a.png").write_bytes(b"x")
    scandir = os.scandir

    def refuse(path="."):  # as a folder of mode 000 does to a user who is not its owner
        if str(path).endswith("locked"):
            raise PermissionError(13, "Permission denied", str(path))
        return scandir(path)

    monkeypatch.setattr(os, "scandir", refuse)
    with pytest.raises(DataError, match=r"in/locked: cannot list the folder \(Permission "
                       r"denied\); make it readable, or move it out of the inputs"):
        find_images([tmp_path / "in"])


def test_summary_rows_of_earlier_calls_are_kept_once_by_absolute_path(tmp_path, monkeypatch):
    """write_rows, as every call into a folder ends: one row per input the folder holds,
    matched by absolute path from any working folder; a line a crash cut off and an older
    version's columns (no 'input path') are read as they can be."""
    from paser.segment import INPUT_PATH, canonical, write_rows

    header = ["input", "status", "gflops", INPUT_PATH]
    out, a, b = tmp_path / "summary.csv", tmp_path / "A", tmp_path / "B"
    a.mkdir(), b.mkdir()

    def row(spelling: str, status: str = "ok") -> list:
        return [spelling, status, "1.0", canonical(spelling)]

    def read() -> list[list[str]]:
        return list(csv.reader(open(out, newline="")))

    monkeypatch.chdir(a)
    write_rows(out, header, [row("a.png"), row("b.png", "failed")])
    monkeypatch.chdir(b)  # the same file spelled from elsewhere: replaced, not twice
    write_rows(out, header, [row(str(a / "b.png"))])
    assert [r[0] for r in read()[1:]] == ["a.png", str(a / "b.png")]
    write_rows(out, header, [row("a.png")])  # B's own a.png: another input, both kept
    assert [r[3] for r in read()[1:]] == [str(a / "a.png"), str(a / "b.png"), str(b / "a.png")]
    with open(out, "a", newline="") as fh:
        fh.write('"/x/cut.p')  # a crash mid-line
    write_rows(out, header, [])
    assert len(read()) == 4 and all(len(r) == 4 for r in read())
    # a file of a version before the 'input path' column: its inputs resolved from here
    out.write_text("input,status,gflops\nc.png,ok,2.0\n")
    write_rows(out, header, [row("d.png")])
    assert read() == [header, ["c.png", "ok", "2.0", str(b / "c.png")],
                      ["d.png", "ok", "1.0", str(b / "d.png")]]


def test_rows_appended_after_an_older_versions_header_go_under_todays(tmp_path):
    """SummaryLog appends as images finish: under a summary.csv of an older version (other
    columns), its header and rows are first rewritten in today's columns, so an interrupted
    call's rows do not land under other names."""
    from paser.segment import INPUT_PATH, Segmented, SummaryLog, _header

    out = tmp_path / "summary.csv"
    out.write_text("input,status,gflops\nold.png,ok,2.0\n")
    log = SummaryLog(out, ["f0", "f1"])
    log.append(Segmented(str(tmp_path / "new.png"), "new", ok=False, error="x"))
    rows = list(csv.DictReader(open(out, newline="")))
    assert list(rows[0]) == _header(["f0", "f1"])
    assert [(r["input"], r["status"], r["gflops"], r["error"]) for r in rows] == [
        ("old.png", "ok", "2.0", ""), (str(tmp_path / "new.png"), "failed", "", "x")]
    assert rows[1][INPUT_PATH] == str(tmp_path / "new.png")
    SummaryLog(out, ["f0", "f1"])  # today's header: left as it is
    assert len(list(csv.DictReader(open(out, newline="")))) == 2


def test_a_file_name_that_is_not_utf8_is_kept_in_the_summary_as_its_bytes(tmp_path):
    """A name in another encoding (Python keeps its bytes as surrogates) crashed the summary
    (UnicodeEncodeError), and every call again; it is written, read back and matched as its
    own bytes (a helper's audit)."""
    import os

    from paser.segment import INPUT_PATH, _ours, canonical, write_rows

    name = os.fsdecode(b"latin\xe9.png")
    header = ["input", "status", INPUT_PATH]
    out = tmp_path / "summary.csv"
    write_rows(out, header, [[name, "ok", canonical(name)], ["b.png", "ok", canonical("b.png")]])
    assert b"latin\xe9.png,ok," in out.read_bytes() and _ours(out)
    write_rows(out, header, [[name, "failed", canonical(name)]])  # the same input: replaced
    assert out.read_bytes().count(b"latin\xe9.png,") == 1
    assert b"latin\xe9.png,failed," in out.read_bytes()


def test_a_per_megapixel_budget_says_where_padded_tiles_spent_past_it(capsys):
    """Images whose sides are not multiples of the run's tile pay for their padded last
    tiles: a per-megapixel budget then says why the call spent past it (a helper's audit:
    130 x 130 images spent 2.5 x the budget, and the call said they pay per pixel)."""
    from types import SimpleNamespace

    from paser.cli.deploy import _padding_note, sizes_pay

    tiled = SimpleNamespace(tile=(128, 128))
    odd = [SimpleNamespace(height=130, width=130)] * 2
    _padding_note(tiled, odd, 221.4, 90)
    note = capsys.readouterr().out
    assert "221.40 GFLOP/MP spent against the budget of 90" in note
    assert "their tiles hold 3.88 x their pixels" in note and "up to 349.01 GFLOP/MP" in note
    _padding_note(tiled, [SimpleNamespace(height=256, width=384)], 120.0, 90)  # no padding
    _padding_note(tiled, odd, 92.0, 90)  # within 5 % of it
    _padding_note(SimpleNamespace(tile=None), odd, 221.4, 90)  # routed whole
    assert capsys.readouterr().out == ""
    assert "128 x 128 tiles they are cut into" in sizes_pay(tiled)


@pytest.mark.slow
def test_an_images_ms_leaves_out_counting_the_flops_of_a_new_size(mnist_run, tmp_path,
                                                                  monkeypatch):
    from paser import PaSeR

    model = PaSeR.load(mnist_run)
    files = find_images([_inputs(tmp_path / "in")])[:3]  # three sizes
    segment, counted_before = model.segment, []

    def timed(x, **kwargs):  # what `ms` times: the cost table of this size is there already
        size = model.router.grid.padded_size(*model.routed_size(*x.shape[-2:]))
        counted_before.append(size in model.router._costs)
        return segment(x, **kwargs)

    monkeypatch.setattr(model, "segment", timed)
    assert all(r.ok for r in segment_files(model, files, tmp_path / "out", previews=False))
    assert counted_before == [True, True, True]


def test_segment_reads_and_writes_in_its_own_process_on_two_cores(monkeypatch):
    from paser.runtime import default_workers

    for cores, workers in ((1, 0), (2, 0), (4, 2), (64, 2)):
        monkeypatch.setattr("os.sched_getaffinity", lambda pid, n=cores: set(range(n)),
                            raising=False)
        assert default_workers() == workers


def test_the_writer_is_sent_labels_as_bytes_and_the_image_only_for_previews(mnist_run,
                                                                          tmp_path):
    from paser import PaSeR
    from paser.segment import _Inputs, segment_image

    model = PaSeR.load(mnist_run)
    files = find_images([_inputs(tmp_path / "in")])[:1]
    item = _Inputs(files, 1, model.intensity)[0]
    _, lean = segment_image(model, files[0], item, tmp_path, previews=False)
    _, full = segment_image(model, files[0], item, tmp_path, previews=True)
    assert lean[2] is None and full[2].shape == item[0].shape
    assert lean[3].dtype == full[3].dtype == np.uint8


def test_the_previews_show_each_pixels_class_and_each_patchs_model(tmp_path):
    from paser.data.registry import BATTERY_CODEC
    from paser.patches import PatchGrid
    from paser.segment import CLASS_COLOURS, DEGRADED_COLOUR, MODEL_COLOURS, write_outputs

    # a black image: each preview pixel is its colour alone, times the blend's alpha
    mask = np.random.default_rng(0).integers(0, 3, (12, 16))
    actions, degraded = np.array([0, 2, 1, 2]), np.array([False, False, False, True])
    names = write_outputs(tmp_path, "x", np.zeros((1, 12, 16), np.float32), mask, actions,
                          PatchGrid(2, 2), BATTERY_CODEC, degraded)
    overlay = np.asarray(Image.open(tmp_path / names["overlay"]))
    assert np.array_equal(overlay, (0.45 * CLASS_COLOURS[mask]).astype(np.uint8))
    routing = np.asarray(Image.open(tmp_path / names["routing"]))
    for p, (r, c) in enumerate([(0, 0), (0, 8), (6, 0), (6, 8)]):  # patches of 6 x 8
        colour = DEGRADED_COLOUR if degraded[p] else MODEL_COLOURS[actions[p]]
        inside = routing[r + 1:r + 6, c + 1:c + 8].reshape(-1, 3)  # its borders are white
        assert (inside == (0.4 * colour).astype(np.uint8)).all(), p
    assert (routing[6] == 255).all() and (routing[:, 8] == 255).all()
    labels = np.asarray(Image.open(tmp_path / names["labels"]))
    assert np.array_equal(decode_label(labels), mask)


@pytest.mark.slow
def test_a_cap_holds_every_image_in_segment_evaluate_and_the_library(mnist_run, tmp_path,
                                                                      capsys, monkeypatch):
    from tests.test_bad_inputs import cli

    from paser import PaSeR
    from paser.errors import ConfigError

    model = PaSeR.load(mnist_run)
    x = torch.rand(6, 1, 32, 32, generator=torch.Generator().manual_seed(0))
    costs = model.router.costs(32, 32)
    fixed_per_mp = costs.fixed / (32 * 32 / 1e6)
    dear = torch.tensor([0.0] + [50.0] * (model.router.num_models - 1))  # f0 never chosen
    free = model.segment(x, bias=dear)
    assert (free.actions > 0).all()
    model.cap(fixed_per_mp)  # room for f0 and the policy only: every patch stays on f0
    held = model.segment(x, bias=dear)
    assert (held.actions == 0).all() and held.gflops.tolist() == pytest.approx(
        [costs.fixed] * 6)
    with pytest.raises(ConfigError, match=r"max_gflops_per_mp 1: give a number of GFLOP per "
                                          r"megapixel of at least"):
        model.cap(1)
    with pytest.raises(ConfigError, match=r"max_gflops_per_mp inf: give a finite number"):
        model.cap(float("inf"))
    from paser.data import Tensors

    data = Tensors(x, torch.zeros(6, 32, 32, dtype=torch.long), [str(i) for i in range(6)])
    model.calibration = None  # evaluate routes with the run's own choices: some patches dear
    capped = model.evaluate(data)
    assert capped["fractions"][0] == 1.0  # capped: f0 everywhere
    assert capped["gflops_max"] == pytest.approx(costs.fixed)  # the dearest image too
    model.cap(None)
    assert torch.equal(model.segment(x, bias=dear).actions, free.actions)
    from paser.cli.deploy import _capped

    dearest = (costs.fixed + max(costs.patch) * costs.num_patches) / (32 * 32 / 1e6)
    assert model.cap(dearest) == pytest.approx(dearest)
    capsys.readouterr()
    _capped(model, dearest)  # every patch on the dearest model fits: it bounds nothing
    assert capsys.readouterr().out.startswith(f"note: the cap of {dearest:g} GFLOP/MP bounds "
                                              "nothing")
    _capped(model, (fixed_per_mp + dearest) / 2)
    assert capsys.readouterr().out == ""
    model.cap(None)

    inputs = _inputs(tmp_path / "in")
    (inputs / "d.png").unlink()
    cap = 2 * fixed_per_mp
    import sys

    from paser.cli import main

    monkeypatch.setattr(sys, "argv", ["paser", "segment", str(inputs), "--run-dir",
                                      str(mnist_run), "--out", str(tmp_path / "o"),
                                      "--max-gflops-per-mp", str(cap)])
    capsys.readouterr()
    main()
    printed = capsys.readouterr().out
    assert "3 of 3 images segmented" in printed and "past the cap" not in printed
    for row in csv.DictReader(open(tmp_path / "o" / "summary.csv")):  # routed whole: each
        record = json.loads((tmp_path / "o" / f"{Path(row['input']).stem}.json").read_text())
        assert record["gflops"] <= cap * record["height"] * record["width"] / 1e6 * (1 + 1e-9)
    # a run that cuts images into tiles holds each tile: a 40 x 33 image pays for 4 tiles
    from types import SimpleNamespace

    from paser.cli.deploy import _cap_note

    tiled = SimpleNamespace(tile=(32, 32))
    _cap_note(tiled, [SimpleNamespace(gflops=cap * 4 * 32 * 32 / 1e6, height=40, width=33),
                      SimpleNamespace(gflops=cap * 32 * 32 / 1e6, height=32, width=32)], cap)
    assert capsys.readouterr().out == (
        f"note: 1 image spent past the cap of {cap:g} GFLOP/MP per their own pixels (up to "
        f"{cap * 4 * 32 * 32 / (40 * 33):.2f}): the cap holds each 32 x 32 tile they are cut "
        "into, and their last tiles are padded past the image (f0 and the policy run on whole "
        "tiles); images whose sides are multiples of 32 x 32 stay within it\n")
    # another cap is another folder's settings, not a resume of this one
    code, err = cli(capsys, monkeypatch, "segment", inputs, "--run-dir", mnist_run, "--out",
                    tmp_path / "o", "--max-gflops-per-mp", 3 * fixed_per_mp)
    assert code == 2 and "--max-gflops-per-mp: " in err
    code, err = cli(capsys, monkeypatch, "segment", inputs, "--run-dir", mnist_run, "--out",
                    tmp_path / "o2", "--max-gflops-per-mp", "1")
    assert code == 2 and "--max-gflops-per-mp 1.0: give a number of GFLOP per megapixel" in err
    code, err = cli(capsys, monkeypatch, "segment", inputs, "--run-dir", mnist_run, "--out",
                    tmp_path / "o3", "--model", "f1", "--max-gflops-per-mp", cap)
    assert code == 2 and "drop --max-gflops-per-mp" in err
