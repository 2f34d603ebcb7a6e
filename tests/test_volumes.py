"""Volumes in and out: multi-page TIFF, zarr, HDF5 and folders of slices segmented slice by
slice, equal to the slices segmented alone; resumed chunk by chunk after an interruption."""

from __future__ import annotations

import csv
import json
import os
import re
import warnings
from pathlib import Path

import h5py
import numpy as np
import pytest
import tifffile
import torch
import zarr
from PIL import Image
from tests.helpers import Interrupted, bands_run, paser_here

from paser.data.images import read_array
from paser.errors import DataError
from paser.volumes import field_of_view_record, open_volume, segment_volumes, split_inputs

DEPTH, SIDE = 24, 16


@pytest.fixture()
def setup(tmp_path):
    vol = np.random.default_rng(0).integers(0, 256, (DEPTH, SIDE, SIDE), dtype=np.uint8)
    return bands_run(tmp_path), vol, tmp_path  # f0 and f1


def _each_slice(m, vol: np.ndarray, only: int | None = None) -> list:
    """Each slice segmented as an image on its own (its routing output)."""
    return [m.segment(torch.from_numpy(s / 255.0)[None, None].float(), only=only) for s in vol]


def _labels(m, outs: list) -> np.ndarray:
    """The slices' labels in the run's codec, stacked."""
    return np.stack([m.label_codec.encode(o.mask[0].numpy()) for o in outs])


def _alone(m, vol: np.ndarray) -> np.ndarray:
    """Each slice segmented as an image on its own, in the run's codec."""
    return _labels(m, _each_slice(m, vol))


def _stopped_at(monkeypatch, m, n: int, run) -> None:
    """``run()`` with the model's ``n``-th slice interrupted (Ctrl-C), the model then as it
    was."""
    calls, segment = [0], type(m).segment

    def counted(self, x, *a, **k):
        calls[0] += 1
        if calls[0] == n:
            raise Interrupted
        return segment(self, x, *a, **k)

    monkeypatch.setattr(type(m), "segment", counted)
    with pytest.raises(Interrupted):
        run()
    monkeypatch.setattr(type(m), "segment", segment)


@pytest.mark.slow
def test_tiff_zarr_hdf5_and_a_folder_give_the_slices_segmented_alone(setup):
    m, vol, tmp = setup
    tifffile.imwrite(tmp / "scan.tif", vol, photometric="minisblack")
    zarr.open_array(str(tmp / "z.zarr"), mode="w", shape=vol.shape, chunks=(5, 8, 8),
                    dtype="uint8")[:] = vol
    with h5py.File(tmp / "f.h5", "w") as fh:
        fh.create_dataset("/entry/data", data=vol, chunks=(1, SIDE, SIDE))
    (tmp / "slices").mkdir()
    for z in range(DEPTH):  # natural order: s2 before s10
        Image.fromarray(vol[z]).save(tmp / "slices" / f"s{z}.png")
    files, volumes = split_inputs([tmp / "scan.tif", tmp / "z.zarr", f"{tmp / 'f.h5'}:/entry/data",
                                   tmp / "slices"], stack=True)
    assert files == [] and [v.kind for v in volumes] == ["tiff", "zarr", "hdf5", "stack"]
    results = segment_volumes(m, volumes, tmp / "out", chunk=5)
    alone = _each_slice(m, vol)
    want = _labels(m, alone)
    assert all(r.record is not None for r in results), [r.error for r in results]
    assert np.array_equal(tifffile.imread(tmp / "out" / "scan_labels.tif"), want)
    assert np.array_equal(tifffile.imread(tmp / "out" / "slices_labels.tif"), want)
    assert np.array_equal(zarr.open(str(tmp / "out" / "z_labels.zarr"), mode="r")[:], want)
    assert np.array_equal(zarr.open(str(tmp / "out" / "f_entry_data_labels.zarr"),
                                    mode="r")[:], want)
    with tifffile.TiffFile(tmp / "out" / "scan_labels.tif") as tif:
        assert tif.is_bigtiff and len(tif.pages) == DEPTH
    assert json.loads((tmp / "out" / "f_entry_data.json").read_text())["dataset"] == "/entry/data"
    only = segment_volumes(m, split_inputs([tmp / "f.h5"])[1], tmp / "h5")  # its one dataset
    assert only[0].record["dataset"] == "/entry/data" and only[0].record["input"].endswith("f.h5")
    assert np.array_equal(zarr.open(str(tmp / "h5" / "f_labels.zarr"), mode="r")[:], want)
    rec = json.loads((tmp / "out" / "scan.json").read_text())
    assert "dataset" not in rec
    assert len(rec["slices"]) == DEPTH and [s["slice"] for s in rec["slices"]] == list(range(DEPTH))
    codes = np.array(m.label_codec.values)
    fractions = [(want == v).mean() for v in codes]
    assert list(rec["class_fractions"].values()) == pytest.approx(fractions)
    assert sum(rec["patch_share"].values()) == pytest.approx(1.0)
    assert rec["gflops"] == pytest.approx(DEPTH * rec["gflops_per_slice"])
    assert [s["gflops"] for s in rec["slices"]] == pytest.approx([float(o.gflops[0]) for o in alone])
    counts = np.sum([np.bincount(o.actions.flatten().numpy(), minlength=2) for o in alone], 0)
    assert list(rec["patch_share"].values()) == pytest.approx((counts / counts.sum()).tolist())
    # an untrained policy: it may send every patch to one model; the other forced, alone
    other = int(np.argmin(counts))
    forced = segment_volumes(m, split_inputs([tmp / "scan.tif"])[1], tmp / "other", only=other)
    rec = forced[0].record
    assert list(rec["patch_share"].values()) == [float(k == other) for k in range(2)]
    assert rec["only"].startswith(f"f{other}")
    assert [s["gflops"] for s in rec["slices"]] == pytest.approx(
        [float(o.gflops[0]) for o in _each_slice(m, vol, only=other)])
    assert not list((tmp / "out").glob(".*.parts"))  # whole volumes: the parts are gone
    assert (tmp / "out" / "volumes.csv").read_text().count("\n") == 5
    # a later call into the folder with one of them (done: skipped) and a new one lists
    # all five, each once, the earlier calls' rows first
    tifffile.imwrite(tmp / "more.tif", vol, photometric="minisblack")
    segment_volumes(m, split_inputs([tmp / "z.zarr", tmp / "more.tif"])[1], tmp / "out")
    rows = list(csv.DictReader(open(tmp / "out" / "volumes.csv")))
    assert [r["input"] for r in rows] == [str(tmp / "scan.tif"), f"{tmp / 'f.h5'}:/entry/data",
                                         str(tmp / "slices"), str(tmp / "z.zarr"),
                                         str(tmp / "more.tif")]
    assert [r["status"] for r in rows] == ["ok"] * 5


def test_a_volume_failing_on_an_error_that_names_no_input_is_named(setup, monkeypatch):
    """A volume of slices too small for the run's models failed with "failed: a 6 x 6 image
    is too small for the run's models (...)" locally, naming no volume (on a cluster the
    client named it): among several volumes the line did not say which. It now begins
    with the volume, as every other volume's failure does, and a volume whose error names
    it already is not named twice."""
    m, vol, tmp = setup
    tifffile.imwrite(tmp / "tiny.tif", vol[:, :6, :6], photometric="minisblack")
    tifffile.imwrite(tmp / "nan.tif", np.full((2, 8, 8), np.nan, np.float32),
                     photometric="minisblack")
    why = ("a 6 x 6 image is too small for the run's models (their deepest layers would see "
           "one pixel of it); give it at a size nearer the one the run trained on")
    real = m.cost_table

    def cost_table(height, width):  # as PaSeR._sized says it of a conv run's models
        if (height, width) == (6, 6):
            raise DataError(why)
        return real(height, width)

    monkeypatch.setattr(m, "cost_table", cost_table)
    tiny, nan = segment_volumes(m, split_inputs([tmp / "tiny.tif", tmp / "nan.tif"])[1],
                                tmp / "out")
    assert tiny.error == f"{tmp / 'tiny.tif'}: {why}"
    assert nan.error == (f"{tmp / 'nan.tif'}: no finite pixel to fit an intensity window on "
                         "(every pixel NaN or Inf); give data.window=[lo,hi]")  # named once
    rows = list(csv.DictReader(open(tmp / "out" / "volumes.csv")))
    assert [r["error"] for r in rows] == [tiny.error, nan.error]


def test_a_failure_naming_the_volumes_file_is_not_named_twice():
    import types

    from paser.volumes import failure

    # an HDF5 dataset's error names its file: it read 'scan.h5:/data: scan.h5: cannot read'
    h5 = types.SimpleNamespace(source="scan.h5:/data", path="scan.h5")
    assert failure(h5, "scan.h5: cannot read the HDF5 file (bad)") == (
        "scan.h5: cannot read the HDF5 file (bad)")
    assert failure(h5, "a 6 x 6 image is too small") == "scan.h5:/data: a 6 x 6 image is too small"
    assert failure(types.SimpleNamespace(source="a.tif", path=""), "x") == "a.tif: x"


@pytest.mark.slow
def test_a_volumes_csv_of_an_older_paser_is_rewritten_under_the_new_columns(setup):
    """volumes.csv gained the remote figures' columns: a folder written before keeps its
    rows, under the new header, the new columns blank; without --remote no bytes are sent."""
    m, vol, tmp = setup
    for name in ("a.tif", "b.tif"):
        tifffile.imwrite(tmp / name, vol[:2], photometric="minisblack")
    segment_volumes(m, split_inputs([tmp / "a.tif"])[1], tmp / "out")
    old = ["input", "status", "shape", "megavoxels", "gflops", "ms per slice", "patch share",
           "class fractions", "output", "error", "input path"]  # before the remote figures
    [row] = csv.DictReader(open(tmp / "out" / "volumes.csv"))
    with open(tmp / "out" / "volumes.csv", "w", newline="") as fh:
        csv.writer(fh).writerows([old, [row[k] for k in old]])
    segment_volumes(m, split_inputs([tmp / "b.tif"])[1], tmp / "out")
    lines = list(csv.reader(open(tmp / "out" / "volumes.csv")))
    assert lines[0][8:11] == ["degraded patches", "bytes sent", "bytes whole volume"]
    rows = [dict(zip(lines[0], line, strict=True)) for line in lines[1:]]
    assert [r["input"] for r in rows] == [str(tmp / "a.tif"), str(tmp / "b.tif")]
    assert rows[0]["output"] == "a_labels.tif" and rows[0]["degraded patches"] == ""
    assert (rows[1]["degraded patches"], rows[1]["bytes sent"]) == ("0", "")
    assert "remote" not in json.loads((tmp / "out" / "b.json").read_text())


def _tiff_and_zarr(vol, tmp, stem: str = "scan") -> list:
    """``vol`` as ``<stem>.tif`` and as ``z.zarr`` (chunks of 4 slices), read as volumes."""
    tifffile.imwrite(tmp / f"{stem}.tif", vol, photometric="minisblack")
    zarr.open_array(str(tmp / "z.zarr"), mode="w", shape=vol.shape, chunks=(4, 16, 16),
                    dtype="uint8")[:] = vol
    return split_inputs([tmp / f"{stem}.tif", tmp / "z.zarr"])[1]


def test_a_volume_killed_half_way_continues_with_what_is_missing(setup, monkeypatch):
    m, vol, tmp = setup
    volumes = _tiff_and_zarr(vol, tmp)
    segment_volumes(m, volumes, tmp / "whole", chunk=4)
    calls, stop = [0], [13]
    segment = type(m).segment

    def counted(self, x, *a, **k):
        calls[0] += 1
        if calls[0] == stop[0]:
            raise Interrupted
        return segment(self, x, *a, **k)

    monkeypatch.setattr(type(m), "segment", counted)
    with pytest.raises(Interrupted):  # in the first volume's fourth chunk
        segment_volumes(m, volumes, tmp / "out", chunk=4)
    assert len(list((tmp / "out" / ".scan.parts").glob("0*.json"))) == 3
    # chunks left by paser before their input's identity was kept are taken as they are
    made = tmp / "out" / ".scan.parts" / "volume.json"
    kept = json.loads(made.read_text())
    assert {"input_path", "stat", "signature"} <= set(kept["volume"])
    for key in ("input_path", "stat", "signature"):
        del kept["volume"][key]
    made.write_text(json.dumps(kept))
    calls[0], stop[0] = 0, 0
    segment_volumes(m, volumes, tmp / "out", chunk=16)  # goes on in the chunks it began
    assert calls[0] == 2 * DEPTH - 12  # the 12 slices of the 3 finished chunks not redone
    assert (tmp / "out" / "scan_labels.tif").read_bytes() == (
        tmp / "whole" / "scan_labels.tif").read_bytes()
    assert np.array_equal(zarr.open(str(tmp / "out" / "z_labels.zarr"), mode="r")[:],
                          zarr.open(str(tmp / "whole" / "z_labels.zarr"), mode="r")[:])
    calls[0] = 0
    again = segment_volumes(m, volumes, tmp / "out", chunk=4)
    assert calls[0] == 0 and all(r.resumed for r in again)
    # a copy (or a touch) changes the file's times, not its content: still done
    tifffile.imwrite(tmp / "scan.tif", vol, photometric="minisblack")
    again = segment_volumes(m, volumes, tmp / "out", chunk=4)
    assert calls[0] == 0 and all(r.resumed for r in again)


def test_a_zarr_chunk_removed_or_cut_short_since_it_was_done_is_done_again(setup,
                                                                            monkeypatch):
    """A zarr output's chunk counts as done only with its chunk files at the sizes written,
    and its array's metadata readable (a helper's audit: a chunk file removed or cut short
    between two calls was taken as done, and the labels kept a hole or an unreadable
    chunk; a zarr.json cut short failed the volume on every call)."""
    from paser.volumes import chunks_to_do, zarr_chunk_files

    m, vol, tmp = setup
    z = _tiff_and_zarr(vol, tmp)[1:]
    segment_volumes(m, z, tmp / "whole", chunk=4)
    whole = zarr.open(str(tmp / "whole" / "z_labels.zarr"), mode="r")[:]
    for out in ("out", "meta"):
        _stopped_at(monkeypatch, m, 13, lambda out=out: segment_volumes(m, z, tmp / out,
                                                                          chunk=4))
    labels = tmp / "out" / "z_labels.zarr"
    first, second = zarr_chunk_files(labels, 0), zarr_chunk_files(labels, 1)
    assert first and second and chunks_to_do(z[0], tmp / "out", 4) == [
        (12, 16), (16, 20), (20, 24)]
    for name in first:
        (labels / name).unlink()
    for name, size in second.items():
        (labels / name).write_bytes((labels / name).read_bytes()[:size // 2])
    assert chunks_to_do(z[0], tmp / "out", 4) == [(0, 4), (4, 8), (12, 16), (16, 20),
                                                  (20, 24)]
    segment_volumes(m, z, tmp / "out", chunk=4)
    assert np.array_equal(zarr.open(str(labels), mode="r")[:], whole)
    meta = tmp / "meta" / "z_labels.zarr" / "zarr.json"
    meta.write_text(meta.read_text()[:50])
    [res] = segment_volumes(m, z, tmp / "meta", chunk=4)
    assert res.error == "" and np.array_equal(zarr.open(str(meta.parent), mode="r")[:], whole)


def _resumed_on_other_threads(setup, monkeypatch):
    """A TIFF volume segmented on 1 thread, stopped at its 9th slice and resumed on 2: the
    run model, the volume, the test's folder and the resumed call's result."""
    m, vol, tmp = setup
    tifffile.imwrite(tmp / "scan.tif", vol, photometric="minisblack")
    volume = split_inputs([tmp / "scan.tif"])[1]
    _stopped_at(monkeypatch, m, 9, lambda: segment_volumes(m, volume, tmp / "out", chunk=4))
    torch.set_num_threads(2)
    [res] = segment_volumes(m, volume, tmp / "out", chunk=4)
    return m, volume, tmp, res


def test_a_volume_resumed_on_other_threads_records_both_and_says_so(setup, monkeypatch,
                                                                  capsys):
    """Another thread count (or device) adds in another order and can move a few voxels, so
    a volume resumed with another --threads is not one uninterrupted call's, byte for byte.
    Its record kept only the device of the call that finished it; now each slice keeps its
    device and threads, the volume all of them, and its line says they differ."""
    from paser.cli.deploy import _volume_lines

    m, volume, tmp, res = _resumed_on_other_threads(setup, monkeypatch)
    rec = res.record
    assert [s["threads"] for s in rec["slices"]] == [1] * 8 + [2] * (DEPTH - 8)
    assert {s["device"] for s in rec["slices"]} == {"cpu"} and rec["device"] == "cpu"
    assert rec["threads"] == [1, 2]
    _volume_lines([res], tmp / "out")
    assert "  note: its slices were segmented on 1 / 2 threads (calls with other --device" in (
        capsys.readouterr().out)
    [res] = segment_volumes(m, volume, tmp / "again", chunk=4)
    assert res.record["threads"] == [2]
    _volume_lines([res], tmp / "again")
    assert "note" not in capsys.readouterr().out


def test_a_volume_resumed_on_a_gpu_with_other_threads_is_not_said_to_differ(setup,
                                                                            monkeypatch,
                                                                            capsys):
    """The CPU's thread count orders the CPU's sums alone: a volume resumed on the same GPU
    with another --threads (the default, all cores, on another node) was said to have
    labels that 'can differ from one uninterrupted call's in a few voxels'. Its record
    still keeps the threads."""
    from paser.cli.deploy import _volume_lines

    m, volume, tmp, res = _resumed_on_other_threads(setup, monkeypatch)
    for s in res.record["slices"]:  # as a call on a GPU records them
        s["device"] = "cuda:0"
    res.record["device"] = "cuda:0"
    _volume_lines([res], tmp / "out")
    assert res.record["threads"] == [1, 2]
    assert "note" not in capsys.readouterr().out


def test_a_volume_stopped_as_its_parts_are_removed_leaves_none_behind(setup, monkeypatch):
    """Stopped after its record is written, before its parts are gone (Ctrl-C in the
    removal of a thousand parts): the next call takes the volume as done and removes them,
    rather than keep a hidden uncompressed copy of its labels for good."""
    import shutil

    import paser.volumes as V

    m, vol, tmp = setup
    volumes = _tiff_and_zarr(vol, tmp)
    segment_volumes(m, volumes, tmp / "whole", chunk=8)
    rmtree = shutil.rmtree

    def stopped(path, *a, **k):
        if Path(path).name.endswith(".parts"):
            raise Interrupted
        return rmtree(path, *a, **k)

    monkeypatch.setattr(V.shutil, "rmtree", stopped)
    for one in volumes:  # a TIFF output (its labels' parts) and a zarr one
        with pytest.raises(Interrupted):
            segment_volumes(m, [one], tmp / "out", chunk=8)
    assert sorted(p.name for p in (tmp / "out").glob(".*.parts")) == [".scan.parts", ".z.parts"]
    assert len(list((tmp / "out" / ".scan.parts").glob("0*.npy"))) == DEPTH // 8
    monkeypatch.setattr(V.shutil, "rmtree", rmtree)
    calls, segment = [0], type(m).segment

    def counted(self, x, *a, **k):
        calls[0] += 1
        return segment(self, x, *a, **k)

    monkeypatch.setattr(type(m), "segment", counted)
    again = segment_volumes(m, volumes, tmp / "out", chunk=8)
    assert calls[0] == 0 and [r.resumed for r in again] == [True, True]
    assert not list((tmp / "out").glob(".*.parts"))
    assert sorted(p.name for p in (tmp / "out").iterdir()) == sorted(
        p.name for p in (tmp / "whole").iterdir())
    assert (tmp / "out" / "scan_labels.tif").read_bytes() == (
        tmp / "whole" / "scan_labels.tif").read_bytes()


def test_a_call_stopped_in_its_second_volume_lists_the_first_in_volumes_csv(setup,
                                                                             monkeypatch):
    """volumes.csv lists every volume the folder holds: one finished before the call was
    stopped too, as summary.csv lists the images finished before."""
    m, vol, tmp = setup
    for name in ("a", "b"):
        tifffile.imwrite(tmp / f"{name}.tif", vol, photometric="minisblack")
    volumes = split_inputs([tmp / "a.tif", tmp / "b.tif"])[1]
    _stopped_at(monkeypatch, m, DEPTH + 3,  # in b's first chunk
                lambda: segment_volumes(m, volumes, tmp / "out", chunk=8))
    assert (tmp / "out" / "a.json").is_file() and not (tmp / "out" / "b.json").exists()
    rows = list(csv.DictReader(open(tmp / "out" / "volumes.csv")))
    assert [(r["input"], r["status"], r["output"]) for r in rows] == [
        (str(tmp / "a.tif"), "ok", "a_labels.tif")]
    assert rows[0]["shape"] == f"{DEPTH}x{SIDE}x{SIDE}"
    segment_volumes(m, volumes, tmp / "out", chunk=8)
    rows = list(csv.DictReader(open(tmp / "out" / "volumes.csv")))
    assert [(r["input"], r["status"]) for r in rows] == [(str(tmp / "a.tif"), "ok"),
                                                         (str(tmp / "b.tif"), "ok")]


def test_a_volume_stopped_says_how_many_of_its_slices_are_kept(setup, monkeypatch):
    from paser.volumes import VolumeInterrupted

    m, vol, tmp = setup
    tifffile.imwrite(tmp / "scan.tif", vol, photometric="minisblack")
    volumes = split_inputs([tmp / "scan.tif"])[1]
    calls, segment = [0], type(m).segment

    def counted(self, x, *a, **k):
        calls[0] += 1
        if calls[0] == 11:  # in the third chunk of 5 slices
            raise KeyboardInterrupt
        return segment(self, x, *a, **k)

    monkeypatch.setattr(type(m), "segment", counted)
    with pytest.raises(VolumeInterrupted, match=f"^10 of {DEPTH} slices of scan$"):
        segment_volumes(m, volumes, tmp / "out", chunk=5)
    calls[0] = 0
    with pytest.raises(VolumeInterrupted, match=f"^20 of {DEPTH} slices of scan$"):
        segment_volumes(m, volumes, tmp / "out", chunk=5)  # the 10 kept, and 2 chunks more


def test_finishing_a_tiff_volume_says_it_writes_the_labels(setup):
    """Putting a TIFF's slices together takes a minute for a thousand large ones: the bar
    says so, from finish_volume, which both a local run and a cluster's client call (zarr
    labels are whole already: nothing to say)."""
    from paser.volumes import finish_volume, prepare_volume, segment_chunk

    m, vol, tmp = setup
    tifffile.imwrite(tmp / "scan.tif", vol[:4], photometric="minisblack")
    zarr.open_array(str(tmp / "z.zarr"), mode="w", shape=(4, SIDE, SIDE),
                    dtype="uint8")[:] = vol[:4]
    said = {}
    for volume in split_inputs([tmp / "scan.tif", tmp / "z.zarr"])[1]:
        labels, size = prepare_volume(volume, tmp / "out", 4)
        segment_chunk(m, volume, 0, 4, tmp / "out", labels)
        said[volume.stem] = []
        finish_volume(m, volume, tmp / "out", size,
                      on_slices=lambda *call, stem=volume.stem: said[stem].append(call))
    assert said == {"scan": [(0, 0, "writing scan_labels.tif")], "z": []}
    assert np.array_equal(tifffile.imread(tmp / "out" / "scan_labels.tif"), _alone(m, vol[:4]))


@pytest.mark.slow
def test_another_input_of_the_same_name_is_refused_not_mixed(setup, monkeypatch):
    """An interrupted a/scan.tif, then b/scan.tif into the same folder: b is refused (it
    would take or destroy a's chunks); a resumes as its own; b goes into another folder.
    A finished volume keeps its outputs against a later call's namesake too, and a volume
    written again in place (reconstructed anew) is segmented again, not skipped."""
    m, vol, tmp = setup
    (tmp / "a").mkdir()
    (tmp / "b").mkdir()
    tifffile.imwrite(tmp / "a" / "scan.tif", vol, photometric="minisblack")
    tifffile.imwrite(tmp / "b" / "scan.tif", 255 - vol, photometric="minisblack")
    _stopped_at(monkeypatch, m, 9, lambda: segment_volumes(  # two chunks of a/scan.tif done
        m, split_inputs([tmp / "a" / "scan.tif"])[1], tmp / "out", chunk=4))
    b = split_inputs([tmp / "b" / "scan.tif"])[1]
    [res] = segment_volumes(m, b, tmp / "out", chunk=4)
    assert res.record is None and res.error == (
        f"{tmp / 'b' / 'scan.tif'}: {tmp / 'out' / 'scan.json'} holds the outputs of "
        f"{tmp / 'a' / 'scan.tif'}, another input named 'scan'; segment this one into another "
        "--out (or rename it), or start the folder over with --overwrite")
    [res] = segment_volumes(m, split_inputs([tmp / "a" / "scan.tif"])[1], tmp / "out", chunk=4)
    assert res.record["input"] == str(tmp / "a" / "scan.tif")
    assert np.array_equal(tifffile.imread(tmp / "out" / "scan_labels.tif"), _alone(m, vol))
    [res] = segment_volumes(m, b, tmp / "out", chunk=4)  # a finished one keeps its outputs
    assert "holds the outputs of" in res.error
    [res] = segment_volumes(m, b, tmp / "other", chunk=4)
    assert np.array_equal(tifffile.imread(tmp / "other" / "scan_labels.tif"),
                          _alone(m, 255 - vol))
    # a/scan.tif reconstructed again, same shape and type: not skipped, its new labels
    tifffile.imwrite(tmp / "a" / "scan.tif", 255 - vol, photometric="minisblack")
    [res] = segment_volumes(m, split_inputs([tmp / "a" / "scan.tif"])[1], tmp / "out", chunk=4)
    assert not res.resumed
    assert np.array_equal(tifffile.imread(tmp / "out" / "scan_labels.tif"),
                          _alone(m, 255 - vol))
    # interrupted, then written again: the chunks of its old content are not taken
    _stopped_at(monkeypatch, m, 9, lambda: segment_volumes(
        m, split_inputs([tmp / "a" / "scan.tif"])[1], tmp / "new", chunk=4))
    tifffile.imwrite(tmp / "a" / "scan.tif", vol, photometric="minisblack")
    segment_volumes(m, split_inputs([tmp / "a" / "scan.tif"])[1], tmp / "new", chunk=4)
    assert np.array_equal(tifffile.imread(tmp / "new" / "scan_labels.tif"), _alone(m, vol))


def test_a_float_volume_under_a_run_of_8_bit_images_is_scaled_by_one_window(setup):
    """The run has no intensity window: the volume's own, fitted once, scales every slice
    (per slice, one hot voxel rescaled its whole slice)."""
    m, vol, tmp = setup
    assert m.intensity.window is None
    recon = vol.astype(np.float32) * 4.0 - 100.0
    recon[1] = recon[0]
    recon[1, 0, 0] = 5000.0  # slice 1: slice 0 and one hot voxel
    tifffile.imwrite(tmp / "recon.tif", recon, photometric="minisblack")
    [res] = segment_volumes(m, split_inputs([tmp / "recon.tif"])[1], tmp / "out", chunk=5)
    window = res.record["intensity"]["window"]
    assert "this volume" in res.record["intensity"]["fitted_on"]
    # why the run keeps none, not three guesses (this hand-made run has no intensity.json)
    assert res.record["intensity"]["fitted_on"].endswith(
        "(the run keeps no window: it has no intensity.json: made before 2026-12-04, when "
        "runs kept none, or the file was removed)")
    picks = sorted({round(z) for z in np.linspace(0, DEPTH - 1, 16)})
    lo, hi = np.percentile(recon[picks].reshape(-1), (0.5, 99.5))
    assert window == pytest.approx([lo, hi], rel=1e-5)
    scaled = np.clip((recon - window[0]) / (window[1] - window[0]), 0, 1)
    want = np.stack([m.label_codec.encode(m.segment(torch.from_numpy(s)[None, None]).mask[0]
                                          .numpy()) for s in scaled])
    labels = tifffile.imread(tmp / "out" / "recon_labels.tif")
    assert np.array_equal(labels, want)
    assert (labels[1] != labels[0]).mean() < 0.05  # the hot voxel changes its surroundings only
    # a record of a paser that scaled such a volume slice by slice: done again, not kept
    from paser.volumes import read_done

    [again] = split_inputs([tmp / "recon.tif"])[1]
    assert read_done(again, tmp / "out") is not None
    record = json.loads((tmp / "out" / "recon.json").read_text())
    record["intensity"] = {"mode": "window", "window": None, "percentiles": [0.5, 99.5]}
    (tmp / "out" / "recon.json").write_text(json.dumps(record))
    assert read_done(again, tmp / "out") is None
    # chunks a paser began that way (its parts keep no window): started over, not finished
    # slice by slice under the window fitted now
    from paser.volumes import prepare_volume

    prepare_volume(again, tmp / "part", 5, m.intensity)
    parts = tmp / "part" / ".recon.parts"
    (parts / "00000.json").write_text("{}")  # a chunk done
    made = json.loads((parts / "volume.json").read_text())
    assert made["window"] == pytest.approx(window)
    prepare_volume(again, tmp / "part", 5, m.intensity)
    assert (parts / "00000.json").is_file()  # its own parts: kept
    del made["window"]
    (parts / "volume.json").write_text(json.dumps(made))
    prepare_volume(again, tmp / "part", 5, m.intensity)
    assert not (parts / "00000.json").exists()
    assert json.loads((parts / "volume.json").read_text())["window"] == pytest.approx(window)


def test_volume_inputs_that_cannot_be_read_say_what_to_do(tmp_path):
    with h5py.File(tmp_path / "f.h5", "w") as fh:
        fh.create_dataset("/a/b", data=np.zeros((2, 4, 4), np.uint8))
    with pytest.raises(DataError, match="no dataset /c in .*f.h5; it has /a/b"):
        open_volume(f"{tmp_path / 'f.h5'}:/c")
    zarr.open_group(str(tmp_path / "g.zarr"), mode="w")
    zarr.open_array(str(tmp_path / "g.zarr" / "x"), mode="w", shape=(2, 4, 4), dtype="uint8")
    with pytest.raises(DataError, match="a zarr group, not an array; give one of its arrays "
                                        r"\(.*g.zarr/x\)"):
        open_volume(tmp_path / "g.zarr")
    x = open_volume(tmp_path / "g.zarr" / "x")  # as the refusal says (OME-Zarr's levels)
    assert (x.stem, x.shape) == ("g_x", (2, 4, 4))
    zarr.open_array(str(tmp_path / "t.zarr"), mode="w", shape=(1, 1, 2, 4, 4), dtype="uint8")
    t = open_volume(tmp_path / "t.zarr")  # one time point, one channel
    assert t.shape == (2, 4, 4) and t.read(0, 2).shape == (2, 4, 4)
    zarr.open_array(str(tmp_path / "zc.zarr"), mode="w", shape=(2, 3, 8, 8), dtype="uint8")
    with pytest.raises(DataError, match=r"shape \(2, 3, 8, 8\); a volume is slices x height x "
                                        "width"):
        open_volume(tmp_path / "zc.zarr")
    for spec in (f"{tmp_path / 'f.h5'}", f"{tmp_path / 'f.h5'}:/"):  # its only dataset
        only = open_volume(spec)
        assert (only.key, only.shape, only.stem) == ("/a/b", (2, 4, 4), "f")
        assert only.read(0, 2).shape == (2, 4, 4)
    with h5py.File(tmp_path / "e.h5", "w"):
        pass
    with pytest.raises(DataError, match=r"e.h5: an HDF5 file with no dataset in it; save the "
                       r"volume in it as a dataset \(h5py: create_dataset\('data', "
                       r"data=volume\)\)$"):
        open_volume(f"{tmp_path / 'e.h5'}")
    with h5py.File(tmp_path / "f.h5", "a") as fh:
        fh.create_dataset("/z", data=np.zeros((2, 4, 4), np.uint8))
    for spec, message in ((f"{tmp_path / 'f.h5'}", r"an HDF5 file of 2 datasets: name one as "
                           r".*f.h5:/path/in/file; it has /a/b, /z"),
                          (f"{tmp_path / 'f.h5'}:/", "name one as"),
                          (f"{tmp_path / 'f.h5'}:/gone", "no dataset /gone")):
        with pytest.raises(DataError, match=message):
            open_volume(spec)
    with h5py.File(tmp_path / "f.h5", "a") as fh:
        fh["link"] = h5py.SoftLink("/nowhere")  # dangling
    with pytest.raises(DataError, match="/link in .*f.h5 is a soft link to /nowhere, which "
                                        r"is not in the file \(a dangling link\)"):
        open_volume(f"{tmp_path / 'f.h5'}:/link")
    assert open_volume(f"{tmp_path / 'f.h5'}:a/b").shape == (2, 4, 4)  # no leading slash
    (tmp_path / "s").mkdir()
    Image.fromarray(np.zeros((4, 4), np.uint8)).save(tmp_path / "s" / "a1.png")
    Image.fromarray(np.zeros((4, 5), np.uint8)).save(tmp_path / "s" / "a2.png")
    with pytest.raises(DataError, match="a2.png: 4 x 5 uint8, but .*a1.png is 4 x 4 uint8"):
        open_volume(tmp_path / "s")
    (tmp_path / "c").mkdir()
    Image.fromarray(np.zeros((4, 4), np.uint8)).save(tmp_path / "c" / "a1.png")
    Image.fromarray(np.zeros((4, 4, 3), np.uint8)).save(tmp_path / "c" / "a2.png")
    with pytest.raises(DataError, match="a2.png: 4 x 4 uint8 colour, but .*a1.png is 4 x 4 "
                                        "uint8; the slices of a stack share one size, type, "
                                        "colour and number of channels"):
        open_volume(tmp_path / "c")
    tifffile.imwrite(tmp_path / "s" / "v.tif", np.zeros((3, 4, 4), np.uint8),
                     photometric="minisblack")
    files, volumes = split_inputs([tmp_path / "s"])  # not --stack: images, and a stack
    assert [f.name for f in files] == ["a1.png", "a2.png"]
    assert [(v.stem, v.depth) for v in volumes] == [("v", 3)]
    # channels as pages, and two stacks in one file, are not slices of one volume
    zc = np.zeros((4, 3, 8, 8), np.uint8)
    tifffile.imwrite(tmp_path / "zc.ome.tif", zc, ome=True, metadata={"axes": "ZCYX"})
    with pytest.raises(DataError, match=r"its pages hold 3 channels \(TIFF axes ZCYX, shape "
                                        r"4 x 3 x 8 x 8\)"):
        open_volume(tmp_path / "zc.ome.tif")
    tifffile.imwrite(tmp_path / "tz.ome.tif", np.zeros((2, 3, 8, 8), np.uint8), ome=True,
                     metadata={"axes": "TZYX"})
    assert open_volume(tmp_path / "tz.ome.tif").shape == (6, 8, 8)  # time points in turn
    with tifffile.TiffWriter(tmp_path / "two.tif") as tif:
        for side in (8, 8, 6, 6):
            tif.write(np.zeros((side, side), np.uint8), metadata=None)
    with pytest.raises(DataError, match=r"more than one stack of pages \(2 x 8 x 8 uint8, "
                                        r"then 2 x 6 x 6 uint8\)"):
        open_volume(tmp_path / "two.tif")
    # nested groups, an HDF5 group as the key, a page stack inside a --stack folder, none
    inner = zarr.open_group(str(tmp_path / "nested.zarr"), mode="w").require_group("0")
    zarr.open_array(str(tmp_path / "nested.zarr" / "0" / "0"), mode="w", shape=(2, 4, 4),
                    dtype="uint8")
    assert inner is not None
    with pytest.raises(DataError, match=r"give one of its arrays \(.*nested.zarr/0/0\)"):
        open_volume(tmp_path / "nested.zarr")
    with pytest.raises(DataError, match=r"/a in .*f.h5 is a group, not a dataset; it has /a/b"):
        open_volume(f"{tmp_path / 'f.h5'}:a")
    tifffile.imwrite(tmp_path / "c" / "a3.tif", np.zeros((2, 4, 4), np.uint8),
                     photometric="minisblack")
    (tmp_path / "c" / "a2.png").unlink()
    with pytest.raises(DataError, match="a3.tif: 2 pages in one file of a --stack folder"):
        open_volume(tmp_path / "c")
    zarr.open_array(str(tmp_path / "none.zarr"), mode="w", shape=(0, 4, 4), dtype="uint8")
    with pytest.raises(DataError, match=r"none.zarr: no slices \(an array of shape"):
        open_volume(tmp_path / "none.zarr")
    # a gray + alpha stack (ExtraSamples alpha) is gray: alpha dropped, as from an image
    la = np.random.default_rng(0).integers(0, 255, (3, 8, 9, 2), dtype=np.uint8)
    tifffile.imwrite(tmp_path / "la.tif", la, photometric="minisblack",
                     extrasamples=["unassalpha"])
    gray = open_volume(tmp_path / "la.tif")
    assert gray.shape == (3, 8, 9) and np.array_equal(gray.read(0, 3), la[..., 0])
    # paser segment: one input that cannot be opened fails alone, the others go on
    (tmp_path / "scans").mkdir()
    for name in ("a.tif", "b.ome.tif", "c.tif"):
        tifffile.imwrite(tmp_path / "scans" / name, zc if name == "b.ome.tif" else
                         np.zeros((3, 4, 4), np.uint8), photometric="minisblack",
                         **({"ome": True, "metadata": {"axes": "ZCYX"}}
                            if name == "b.ome.tif" else {}))
    _, volumes = split_inputs([tmp_path / "scans", f"{tmp_path / 'f.h5'}:/gone/x"],
                              keep_failed=True)
    assert [(v.stem, v.depth, "3 channels" in v.error or "no dataset" in v.error)
            for v in volumes] == [("f_gone_x", 0, True), ("a", 3, False),
                                  ("b.ome", 0, True), ("c", 3, False)]
    # without h5py every HDF5 input would fail alike: the command stops before it loads
    import sys

    from paser.volumes import MissingPackage

    with pytest.MonkeyPatch.context() as mp:
        mp.setitem(sys.modules, "h5py", None)
        with pytest.raises(MissingPackage, match=r"f.h5:/gone/x: reading it needs the h5py package: "
                                                 r"pip install 'paser\[volumes\]'"):
            split_inputs([tmp_path / "scans", f"{tmp_path / 'f.h5'}:/gone/x"], keep_failed=True)
        # paser segment: said before the run loads (a folder that is no run: not reached)
        res = paser_here("segment", f"{tmp_path / 'f.h5'}:/gone/x", "--run-dir",
                         tmp_path / "no-run", "--out", tmp_path / "o")
        assert res.returncode == 2 and "needs the h5py package" in res.stderr, res.stderr


def test_a_volume_path_that_is_not_there_stops_the_command_as_an_image_path_does(tmp_path):
    """A mistyped ``recon.zarr`` or ``scan.h5:/data`` was opened as a volume that failed
    ("no such zarr array", exit status 1, a volumes.csv row written into --out) where a
    mistyped ``scan.tif`` stops the command at once with status 2: a missing path is the
    same mistake whatever its suffix. An array its zarr group does not hold fails alone, as
    a dataset its HDF5 file does not hold, naming the arrays the group has."""
    zarr.open_group(str(tmp_path / "g.zarr"), mode="w")
    zarr.open_array(str(tmp_path / "g.zarr" / "0"), mode="w", shape=(2, 4, 4), dtype="uint8")
    for spec in (tmp_path / "gone.zarr", tmp_path / "gone.zarr" / "0", tmp_path / "gone.h5",
                 f"{tmp_path / 'gone.h5'}:/entry/data"):
        with pytest.raises(DataError, match=f"^{re.escape(str(spec))}: no such file or folder$"):
            split_inputs([tmp_path / "g.zarr" / "0", spec], keep_failed=True)
    with pytest.raises(DataError, match=r"g.zarr/5: no such array in .*g.zarr; it has "
                                        r".*g.zarr/0$"):
        open_volume(tmp_path / "g.zarr" / "5")
    _, volumes = split_inputs([tmp_path / "g.zarr" / "5", tmp_path / "g.zarr" / "0"],
                              keep_failed=True)
    assert [(v.stem, "no such array" in v.error) for v in volumes] == [("g_5", True),
                                                                      ("g_0", False)]
    res = paser_here("segment", tmp_path / "gone.zarr", "--run-dir", tmp_path / "no-run",
                     "--out", tmp_path / "o")
    assert res.returncode == 2 and "gone.zarr: no such file or folder" in res.stderr, res.stderr
    assert not (tmp_path / "o").exists()


def test_a_path_inside_a_zarr_array_names_the_array(tmp_path):
    """``labels.zarr/0`` where ``labels.zarr`` is itself an array (OME-Zarr's way of naming
    a level, on a plain array) said 'no such array in labels.zarr; it has none', as if the
    store were empty: it now says the store is the array to give."""
    zarr.open_array(str(tmp_path / "labels.zarr"), mode="w", shape=(2, 4, 4), dtype="uint8")
    with pytest.raises(DataError, match=r"^.*labels.zarr/0: .*labels.zarr is an array itself, "
                                        r"not a group of arrays; give .*labels.zarr$"):
        open_volume(tmp_path / "labels.zarr" / "0")
    zarr.open_group(str(tmp_path / "g.zarr"), mode="w")  # an empty group has none
    with pytest.raises(DataError, match=r"g.zarr/0: no such array in .*g.zarr; it has none$"):
        open_volume(tmp_path / "g.zarr" / "0")


def test_a_dataset_or_array_named_the_other_formats_way_says_how_to_name_it(tmp_path):
    """``scan.h5/entry/data`` (a zarr group's way) and ``scan.zarr:0`` (an HDF5 file's way)
    stopped the command with "no such file or folder" alone, though the file is there: the
    error now says how to name the dataset or the array."""
    with h5py.File(tmp_path / "scan.h5", "w") as fh:
        fh.create_dataset("/entry/data", data=np.zeros((2, 4, 4), np.uint8))
    zarr.open_group(str(tmp_path / "g.zarr"), mode="w")
    zarr.open_array(str(tmp_path / "g.zarr" / "0"), mode="w", shape=(2, 4, 4), dtype="uint8")
    for spec, meant in ((f"{tmp_path / 'scan.h5'}/entry/data",
                         f"a dataset in an HDF5 file is named with a colon: "
                         f"{tmp_path / 'scan.h5'}:/entry/data"),
                        (f"{tmp_path / 'g.zarr'}:0", "an array in a zarr group is named as a "
                                                    f"path in it: {tmp_path / 'g.zarr'}/0"),
                        (f"{tmp_path / 'g.zarr'}:/0", f"in it: {tmp_path / 'g.zarr'}/0")):
        with pytest.raises(DataError, match=f"^{re.escape(spec)}: no such file or folder; "
                                            f".*{re.escape(meant)}$"):
            split_inputs([spec], keep_failed=True)
    with pytest.raises(DataError, match=r"gone.h5/x: no such file or folder$"):
        split_inputs([f"{tmp_path / 'gone.h5'}/x"])  # no file to name: nothing to suggest
    assert split_inputs([f"{tmp_path / 'scan.h5'}:/entry/data"])[1][0].shape == (2, 4, 4)


def test_a_stack_folder_that_is_out_is_refused_before_its_labels_join_it(setup):
    """``paser segment slices/ --stack --out slices/`` wrote slices_labels.tif (8 pages)
    into the stack, and the same command again failed on it ("8 pages in one file of a
    --stack folder"): a folder of images that is --out is refused, and a --stack folder now
    is too, with nothing written; an --out inside it is not one of its slices, and goes."""
    m, vol, tmp = setup
    (tmp / "slices").mkdir()
    for z in range(3):
        tifffile.imwrite(tmp / "slices" / f"s{z}.tif", vol[z])
    with pytest.raises(DataError, match=r"slices: the --stack folder is --out, where the "
                                        r"outputs are written; give an --out outside it$"):
        split_inputs([tmp / "slices"], stack=True, exclude=tmp / "slices" / ".")
    assert sorted(p.name for p in (tmp / "slices").iterdir()) == ["s0.tif", "s1.tif", "s2.tif"]
    [stack] = split_inputs([tmp / "slices"], stack=True, exclude=tmp / "slices" / "seg")[1]
    [res] = segment_volumes(m, [stack], tmp / "slices" / "seg")
    assert res.record is not None and res.record["shape"] == [3, SIDE, SIDE]
    [again] = segment_volumes(m, split_inputs([tmp / "slices"], stack=True)[1],
                              tmp / "slices" / "seg")
    assert again.resumed and stack.depth == 3


def test_an_input_given_twice_however_spelt_is_one_input(tmp_path, monkeypatch):
    """One image or volume named twice, relative and absolute (or a folder and a file in
    it), was refused as 'two inputs of the same stem whose outputs would overwrite each
    other; rename one': it is one input, segmented once."""
    tifffile.imwrite(tmp_path / "scan.tif", np.zeros((3, 4, 4), np.uint8), photometric="minisblack")
    zarr.open_array(str(tmp_path / "z.zarr"), mode="w", shape=(2, 4, 4), dtype="uint8")
    (tmp_path / "imgs").mkdir()
    for name in ("a", "b"):
        Image.fromarray(np.zeros((4, 4), np.uint8)).save(tmp_path / "imgs" / f"{name}.png")
    monkeypatch.chdir(tmp_path)
    files, volumes = split_inputs(["imgs/a.png", tmp_path / "imgs" / "a.png", "imgs",
                                   "scan.tif", tmp_path / "scan.tif", "z.zarr/", "./z.zarr"])
    assert [str(f) for f in files] == ["imgs/a.png", "imgs/b.png"]
    assert [v.stem for v in volumes] == ["scan", "z"]
    (tmp_path / "other").mkdir()  # two files of one stem still are two inputs
    Image.fromarray(np.zeros((4, 4), np.uint8)).save(tmp_path / "other" / "a.png")
    with pytest.raises(DataError, match=r"have the same stem 'a'"):
        split_inputs(["imgs/a.png", "other/a.png"])


def test_a_zarr_store_that_is_out_or_holds_it_is_refused(tmp_path):
    """``paser segment scan.zarr/0 --out scan.zarr`` wrote its label array, record and
    summary into the input's store, among its arrays: refused now, with nothing written;
    an --out beside the store goes."""
    zarr.open_group(str(tmp_path / "scan.zarr"), mode="w")
    zarr.open_array(str(tmp_path / "scan.zarr" / "0"), mode="w", shape=(2, 4, 4),
                    dtype="uint8")
    for out in ("scan.zarr", "scan.zarr/seg"):
        with pytest.raises(DataError, match=rf"scan.zarr/0: --out .*{out} is the zarr store "
                                            r".*scan.zarr or inside it, where the outputs "
                                            r"would lie among its arrays; give an --out "
                                            r"outside it$"):
            split_inputs([tmp_path / "scan.zarr" / "0"], exclude=tmp_path / out)
    assert sorted(p.name for p in (tmp_path / "scan.zarr").iterdir()) == ["0", "zarr.json"]
    assert len(split_inputs([tmp_path / "scan.zarr" / "0"], exclude=tmp_path / "seg")[1]) == 1


def test_an_array_of_too_few_or_too_many_axes_says_what_to_give(tmp_path):
    """A 2-D array (one image) and a 5-D one of several time points and channels were
    refused with "a volume is slices x height x width (x channels)" alone, where a 4-D one
    says which array to give: each now says what to do."""
    zarr.open_array(str(tmp_path / "tc.zarr"), mode="w", shape=(2, 3, 2, 4, 4), dtype="uint8")
    zarr.open_array(str(tmp_path / "one.zarr"), mode="w", shape=(4, 4), dtype="uint8")
    with h5py.File(tmp_path / "f.h5", "w") as fh:
        fh.create_dataset("/image", data=np.zeros((4, 4), np.uint8))
    with pytest.raises(DataError, match=r"tc.zarr: an array of shape \(2, 3, 2, 4, 4\); a "
                                        r"volume is slices x height x width \(x up to 4 "
                                        r"channels last\): give one channel's 3-D array"):
        open_volume(tmp_path / "tc.zarr")
    for spec in (tmp_path / "one.zarr", f"{tmp_path / 'f.h5'}:/image"):
        with pytest.raises(DataError, match=r": an array of shape \(4, 4\), not a volume "
                                            r"\(slices x height x width\): save one image as "
                                            r"an image file \(TIFF, PNG\) to segment it, or "
                                            r"as an array of shape \(1, height, width\)$"):
            open_volume(spec)


def test_a_capped_volume_past_the_cap_per_its_voxels_says_why(tmp_path, capsys):
    """A volume of 20 x 20 slices under --max-gflops-per-mp 60 and a run of 128 x 128 tiles
    printed "1092.81 GFLOP/MP, capped at 60" and nothing more, where images past the cap
    get a note that each tile is held to it and the padding of the last tiles is paid for:
    a volume now gets the same note, and one within the cap none."""
    from types import SimpleNamespace

    from paser.cli.deploy import _volume_lines

    def volume(side: int, gflops: float):
        megavoxels = 8 * side * side / 1e6
        return SimpleNamespace(source=f"v{side}.tif", resumed=False, error="", record={
            "shape": [8, side, side], "megavoxels": megavoxels, "gflops": gflops,
            "gflops_per_slice": gflops / 8, "cap_gflops_per_mp": 60.0, "ms_per_slice": 1.0,
            "output": f"v{side}_labels.tif"})

    capsys.readouterr()
    _volume_lines([volume(20, 8 * 0.437), volume(256, 8 * 3.878)], tmp_path, (128, 128))
    lines = capsys.readouterr().out.splitlines()
    assert len(lines) == 3 and "1092.50 GFLOP/MP, capped at 60" in lines[0]
    assert lines[1] == (
        "  note: past the cap of 60 GFLOP/MP per its own voxels: the cap holds each 128 x 128 "
        "tile its slices of 20 x 20 are cut into, and their last tiles are padded past the "
        "slice (f0 and the policy run on whole tiles); slices whose sides are multiples of "
        "128 x 128 stay within it")
    assert "59.17 GFLOP/MP, capped at 60" in lines[2]
    _volume_lines([volume(20, 8 * 0.437)], tmp_path, None)  # routed whole: no tiles to say
    assert len(capsys.readouterr().out.splitlines()) == 1


@pytest.mark.slow
def test_a_volume_labelled_on_some_slices_trains_by_slice_ranges(tmp_path, monkeypatch):
    """A float32 zarr reconstruction with a TIFF label volume labelled on every third slice:
    the splits are the labelled slices of their ranges, in tiles, with the window fitted
    on the training slices; streamed from reader processes, the same tensors."""
    import pickle

    from paser.config import load_config
    from paser.data import data_intensity, load_stage_data, open_split

    rng = np.random.default_rng(0)
    vol = rng.normal(0.3, 0.1, (30, 20, 20)).astype(np.float32)
    labels = np.full((30, 20, 20), 255, np.uint8)
    labels[::3] = (vol[::3] > 0.3) * 40  # classes 0 and 40
    zarr.open_array(str(tmp_path / "recon.zarr"), mode="w", shape=vol.shape,
                    chunks=(4, 20, 20), dtype="float32")[:] = vol
    tifffile.imwrite(tmp_path / "labels.tif", labels, photometric="minisblack")
    (tmp_path / "classes.yaml").write_text("classes: {0: pore, 40: solid}\n")
    over = ["data.dataset=volume", f"data.root={tmp_path}", "data.volume=recon.zarr",
            "data.labels=labels.tif",
            "data.slices={train: [0, 18], validation: [18, 24], test: [24, 30]}",
            "data.tile=[16, 16]", "models.num_classes=2", "stage1.class_weights=null",
            "stage1.min_epoch_images=null"]
    cfg = load_config(preset="battery-quick", overrides=over)
    train = open_split(cfg.data, "train")
    assert train.z == [0, 3, 6, 9, 12, 15] and train.ids[1] == "recon_z00003"
    window = data_intensity(cfg.data).window
    assert window == pytest.approx(tuple(np.percentile(vol[:18:3].ravel(), [0.5, 99.5])),
                                   rel=1e-5)
    assert torch.equal(train.mask(1), torch.from_numpy((vol[3] > 0.3).astype(np.uint8)))
    data = load_stage_data(cfg, progress=False)
    assert len(data.validation) == 2 * 4 and data.validation.images.shape[1:] == (1, 16, 16)
    streamed = load_stage_data(load_config(preset="battery-quick", overrides=[
        *over, "data.stream=always", "data.workers=1"]), progress=False)
    assert torch.equal(next(streamed.test.batches(8))[0], next(data.test.batches(8))[0])
    pickle.dumps(train)  # what reader processes receive
    # the run knows the data by the files it reads: the zarr store's (its metadata too),
    # the label volume and the class map; slices labelled since train again
    from paser.data.identity import data_identity

    ident = data_identity(cfg.data, tmp_path / "run")
    assert ident.files["train"].keys() == ident.files["test"].keys()
    names = {n.rsplit("/", 1)[-1] for n in ident.files["train"]}
    assert "labels.tif" in names and names & {".zarray", "zarr.json"}  # zarr 2 or 3
    assert list(ident.files["class map"]) == ["classes.yaml"]
    labels[1] = 0
    tifffile.imwrite(tmp_path / "labels.tif", labels, photometric="minisblack")
    (tmp_path / "recon.zarr" / ".DS_Store").write_bytes(b"x")  # not part of the array
    hashed: list[str] = []
    import paser.data.identity as identity

    monkeypatch.setattr(identity, "file_sha256",
                        lambda f, h=identity.file_sha256: hashed.append(f) or h(f))
    (tmp_path / "run" / "data.json").unlink()  # nothing known: each file read once
    assert data_identity(cfg.data, tmp_path / "run").changes(ident) == (
        "1 file rewritten (labels.tif)")
    assert len(hashed) == len(set(hashed)) == len(ident.files["train"]) + 1
    with pytest.raises(DataError, match=r"no labelled slice in test's range \[25, 26\)"):
        open_split(load_config(preset="battery-quick", overrides=[
            *over[:4], "data.slices={train: [0, 18], validation: [18, 24], test: [25, 26]}"]
        ).data, "test")


def test_a_tiff_written_a_page_at_a_time_is_one_volume(setup):
    """tifffile.TiffWriter.write in a loop stores each page as a series of its own: the
    file is still one stack, segmented whole (it gave page 0 alone before)."""
    m, vol, tmp = setup
    with tifffile.TiffWriter(tmp / "loop.tif") as tif:
        for page in vol:
            tif.write(page, photometric="minisblack")
    volume = open_volume(tmp / "loop.tif")
    assert volume.shape == vol.shape and np.array_equal(volume.read(3, 7), vol[3:7])
    # its chunks are read by page index: tifffile's series would parse every page each time
    tifffile.imwrite(tmp / "whole.tif", vol)
    assert volume.paged and not open_volume(tmp / "whole.tif").paged
    files, volumes = split_inputs([tmp / "loop.tif"])
    assert files == [] and [v.depth for v in volumes] == [DEPTH]
    [res] = segment_volumes(m, volumes, tmp / "out", chunk=10)
    assert np.array_equal(tifffile.imread(tmp / "out" / "loop_labels.tif"), _alone(m, vol))
    assert res.record["intensity"]["mode"] == "type range"  # uint8: by its type, as trained


def test_a_volume_with_bad_voxels_leaves_no_half_output(setup):
    m, vol, tmp = setup
    recon = vol.astype(np.float32)
    recon[-1, 0, 0] = np.nan  # outside the field of view, in the last chunk
    zarr.open_array(str(tmp / "nan.zarr"), mode="w", shape=recon.shape,
                    dtype="float32")[:] = recon
    [res] = segment_volumes(m, split_inputs([tmp / "nan.zarr"])[1], tmp / "out", chunk=8)
    assert "NaN" in res.error and res.record is None
    assert not (tmp / "out" / "nan_labels.zarr").exists()
    assert not (tmp / "out" / ".nan.parts").exists()


def test_a_reconstruction_written_as_nan_outside_its_circle_has_that_field_of_view(setup,
                                                                                 capsys):
    """NaN outside the circle, read by a run that fills non-finite voxels (data.nonfinite
    fill): the outside is found as for a finite fill, left out of the class counts, and the
    record says NaN as text (JSON has no NaN)."""
    from paser.data.images import Intensity

    m, vol, tmp = setup
    yy, xx = np.mgrid[:SIDE, :SIDE]
    outside = (yy - 7.5) ** 2 + (xx - 7.5) ** 2 > 7.5 ** 2
    recon = vol.astype(np.float32) / 255
    recon[:, outside] = np.nan
    tifffile.imwrite(tmp / "nanfov.tif", recon, photometric="minisblack")
    m._intensity = Intensity((0.0, 1.0), nonfinite="fill")
    [res] = segment_volumes(m, split_inputs([tmp / "nanfov.tif"])[1], tmp / "out", chunk=10)
    assert not res.error, res.error
    fov = res.record["field_of_view"]
    assert fov["fill"] == "nan" and fov["outside_voxels"] == DEPTH * int(outside.sum())
    labels = tifffile.imread(tmp / "out" / "nanfov_labels.tif")
    inside = [int(np.count_nonzero(labels[:, ~outside] == v)) for v in m.label_codec.values]
    assert list(res.record["class_fractions"].values()) == pytest.approx(
        [n / sum(inside) for n in inside])
    json.loads((tmp / "out" / "nanfov.json").read_text(),
               parse_constant=lambda c: pytest.fail(f"{c} in the record"))
    from paser.cli.deploy import _volume_lines

    capsys.readouterr()
    _volume_lines([res], tmp / "out")
    assert (f"{fov['share_outside']:.1%} of the voxels lie outside the field of view (at the "
            "fill nan on every slice, joined to the border)") in capsys.readouterr().out


def test_label_volumes_of_booleans_or_with_a_last_axis_of_one_train(tmp_path):
    from paser.config import load_config
    from paser.data import open_split
    from paser.data import slices as S

    rng = np.random.default_rng(1)
    vol = rng.random((9, 12, 12)).astype(np.float32)
    truth = vol > 0.5
    zarr.open_array(str(tmp_path / "v.zarr"), mode="w", shape=vol.shape,
                    dtype="float32")[:] = vol
    (tmp_path / "classes.yaml").write_text("classes: {0: pore, 1: solid}\nignore: null\n")
    for name, labels in (("bool", truth), ("last1", truth.astype(np.uint8)[..., None])):
        zarr.open_array(str(tmp_path / f"{name}.zarr"), mode="w", shape=labels.shape,
                        dtype=labels.dtype)[:] = labels
        cfg = load_config(preset="battery-quick", overrides=[
            "data.dataset=volume", f"data.root={tmp_path}", "data.volume=v.zarr",
            f"data.labels={name}.zarr", "models.num_classes=2", "stage1.class_weights=null",
            "data.slices={train: [0, 5], validation: [5, 7], test: [7, 9]}"])
        train = open_split(cfg.data, "train")
        assert torch.equal(train.mask(2), torch.from_numpy(truth[2].astype(np.uint8)))
    scans = []
    monkey = S.VolumeSlices._scan

    def counted(self, z0, z1):
        scans.append((z0, z1))
        return monkey(self, z0, z1)

    S.VolumeSlices._scan = counted
    try:
        for _ in range(3):  # every stage of a run opens its splits: the labels read once
            open_split(cfg.data, "validation")
    finally:
        S.VolumeSlices._scan = monkey
    assert scans == [(5, 7)]



def test_data_check_counts_a_volumes_labelled_slices_as_slices(tmp_path):
    """paser data check said '1 image of 16 x 16, 1 channel: the labelled slices 30' of a
    volume's split, and a training range of 2 labelled slices was 'add training images':
    they are labelled slices, and the range of data.slices is where to label more."""
    from paser.data.registry import check_dataset

    vol = np.random.default_rng(0).random((40, 16, 16), dtype=np.float32)
    labels = np.full(vol.shape, 255, np.uint8)
    for z in (2, 5, 8, 30, 35):
        labels[z] = vol[z] > 0.5
    tifffile.imwrite(tmp_path / "v.tif", vol, photometric="minisblack")
    tifffile.imwrite(tmp_path / "l.tif", labels, photometric="minisblack")
    (tmp_path / "classes.yaml").write_text("classes: {0: a, 1: b}\n")
    args = ["data.volume=v.tif", "data.labels=l.tif"]
    out = paser_here("data", "check", tmp_path, *args, "--workers", "0",
                     "data.slices={train: [0, 20], validation: [20, 32], test: [32, 40]}")
    assert out.returncode == 0, out.stderr
    lines = out.stdout.splitlines()
    assert lines[1].split() == "train 3 labelled slices of 16 x 16, 1 channel: 2, 5, 8".split()
    assert lines[2].split() == "validation 1 labelled slice of 16 x 16, 1 channel: 30".split()
    assert "(0.5 / 99.5 percentiles of the training slices;" in out.stdout
    with pytest.raises(DataError, match=r"the training split has 2 labelled slices \(tiles\); "
                       r".* at least 3: label more slices in its range \[0, 8\) of "
                       r"data.slices, or cut them"):
        check_dataset(tmp_path, workers=0, show_progress=False, overrides=[
            *args, "data.slices={train: [0, 8], validation: [20, 32], test: [32, 40]}"])


def test_slices_labelled_since_in_the_same_process_are_in_the_intensity_window(tmp_path):
    """The window was cached by the config alone: a float volume checked, labelled on two
    more training slices and opened again in the same process (a notebook, two runs) had
    those slices in its training split but kept the window of the first two, [0.0044,
    2.99] where the four give [0.0062, 5.99], and a run saved that one as intensity.json."""
    from paser.config import load_config
    from paser.data import data_intensity, open_split

    vol = np.arange(10, dtype=np.float32)[:, None, None] + np.random.default_rng(0).random(
        (10, 8, 8), dtype=np.float32)  # slice z holds z..z+1
    labels = np.full(vol.shape, 255, np.uint8)
    labels[[0, 2]] = 0
    tifffile.imwrite(tmp_path / "v.tif", vol, photometric="minisblack")
    tifffile.imwrite(tmp_path / "l.tif", labels, photometric="minisblack")
    (tmp_path / "classes.yaml").write_text("classes: {0: a, 1: b}\n")
    cfg = load_config(overrides=[
        "data.dataset=volume", f"data.root={tmp_path}", "data.volume=v.tif",
        "data.labels=l.tif", "data.slices={train: [0, 6], validation: [6, 8], test: [8, 10]}"]
    ).data

    def window_of(slices):
        return pytest.approx(tuple(np.percentile(vol[slices].ravel(), [0.5, 99.5])), rel=1e-5)

    assert data_intensity(cfg).window == window_of([0, 2])
    labels[4], labels[5] = 1, 0
    tifffile.imwrite(tmp_path / "l.tif", labels, photometric="minisblack")
    assert open_split(cfg, "train").z == [0, 2, 4, 5]
    assert data_intensity(cfg).window == window_of([0, 2, 4, 5])


def test_a_mistyped_volume_path_names_its_key_and_what_the_root_holds(tmp_path):
    """data.labels=label.tif for labels.tif said 'ROOT/label.tif: no such file' alone: not
    which key, nor that a relative path is read from data.root, nor what lies there."""
    from paser.data.slices import VolumeSlices

    tifffile.imwrite(tmp_path / "v.tif", np.zeros((4, 8, 8), np.uint8), photometric="minisblack")
    tifffile.imwrite(tmp_path / "labels.tif", np.zeros((4, 8, 8), np.uint8),
                     photometric="minisblack")
    (tmp_path / "classes.yaml").write_text("classes: {0: a, 1: b}\n")
    slices = {"train": (0, 2), "validation": (2, 3), "test": (3, 4)}
    with pytest.raises(DataError) as err:
        VolumeSlices(tmp_path, "v.tif", "label.tif", slices, "train")
    assert str(err.value) == (
        f"key 'data.labels': {tmp_path / 'label.tif'}: no such file or folder; a relative "
        "path is read from data.root, which holds labels.tif, v.tif; give the label "
        "volume's path")
    with pytest.raises(DataError) as err:
        VolumeSlices(tmp_path, f"{tmp_path / 'gone.h5'}:/x", "labels.tif", slices, "train")
    assert str(err.value) == (f"key 'data.volume': {tmp_path / 'gone.h5'}: no such file or "
                              "folder; give the image volume's path")
    assert VolumeSlices(tmp_path, "v.tif", "labels.tif", slices, "train").volume.depth == 4


def test_a_volume_of_two_channels_trains_on_both(tmp_path):
    """A zarr volume of two detectors' channels (Z x Y x X x 2) reads as 2-channel slices,
    as a folder's 2-channel images do: its split said 1 channel, and every slice was then
    refused with '2 channels, and the models take 1; give grayscale images'."""
    from paser.data.slices import VolumeSlices

    vol = np.random.default_rng(5).integers(0, 256, (6, 8, 8, 2), dtype=np.uint8)
    labels = np.full((6, 8, 8), 255, np.uint8)
    labels[::2] = vol[::2, ..., 0] > 127
    zarr.open_array(str(tmp_path / "v.zarr"), mode="w", shape=vol.shape,
                    dtype="uint8")[:] = vol
    tifffile.imwrite(tmp_path / "l.tif", labels, photometric="minisblack")
    (tmp_path / "classes.yaml").write_text("classes: {0: pore, 1: solid}\nignore: 255\n")
    train = VolumeSlices(tmp_path, "v.zarr", "l.tif", {"train": (0, 6)}, "train")
    assert train.z == [0, 2, 4] and train.channels == 2
    want = torch.from_numpy(np.moveaxis(vol[2], -1, 0) / 255.0).float()
    assert torch.allclose(train.image(1), want, atol=1e-7)


def test_a_slice_labelled_since_in_a_folder_of_label_slices_is_found_in_the_same_process(
        tmp_path):
    """The labelled slices are found once per process and label volume as its files are: a
    slice file written again in place leaves its folder's time and size as they were (a
    notebook that checks, labels a slice and checks again was told the old slices)."""
    from paser.data.slices import VolumeSlices

    (tmp_path / "classes.yaml").write_text("classes: {0: pore, 1: solid}\nignore: 255\n")
    (tmp_path / "img").mkdir()
    (tmp_path / "lab").mkdir()
    for z in range(6):
        Image.fromarray(np.full((8, 8), 40 * z, np.uint8)).save(tmp_path / "img" / f"s{z}.png")
        labelled = np.eye(8, dtype=np.uint8) if z in (0, 3) else np.full((8, 8), 255, np.uint8)
        Image.fromarray(labelled).save(tmp_path / "lab" / f"s{z}.png")
    slices = {"train": (0, 6)}
    assert VolumeSlices(tmp_path, "img", "lab", slices, "train").z == [0, 3]
    folder = (tmp_path / "lab").stat()
    newest = max(p.stat().st_mtime_ns for p in (tmp_path / "lab").iterdir())
    Image.fromarray(np.eye(8, dtype=np.uint8)[::-1]).save(tmp_path / "lab" / "s2.png")
    os.utime(tmp_path / "lab" / "s2.png", ns=(newest + 10**9, newest + 10**9))
    os.utime(tmp_path / "lab", ns=(folder.st_atime_ns, folder.st_mtime_ns))
    again = VolumeSlices(tmp_path, "img", "lab", slices, "train")
    assert again.z == [0, 2, 3]
    assert torch.equal(again.mask(1), torch.from_numpy(np.eye(8, dtype=np.uint8)[::-1].copy()))


@pytest.mark.parametrize("depth", [3, 4])
def test_a_label_volume_of_three_or_four_slices_saved_as_one_colour_page_is_named(tmp_path,
                                                                                 depth):
    """tifffile.imwrite of a (3 | 4, H, W) stack without photometric stores one colour page
    of planes apart: the error said 'store one class value a voxel', which the user had."""
    from paser.data.slices import VolumeSlices

    (tmp_path / "classes.yaml").write_text("classes: {0: pore, 1: solid}\nignore: 255\n")
    stack = np.zeros((depth, 16, 16), np.uint8)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", DeprecationWarning)
        tifffile.imwrite(tmp_path / "v.tif", stack)
        tifffile.imwrite(tmp_path / "l.tif", stack)
    tifffile.imwrite(tmp_path / "slices.tif", stack, photometric="minisblack")
    note = (f"is one page of {depth} planes stored apart, read as one colour slice: "
            "tifffile.imwrite of 3 or 4 slices without photometric='minisblack' stores them "
            "so; if they are slices, write them again with that argument")
    with pytest.raises(DataError, match=rf"l.tif slice 0: labels of shape \(16, 16, 3\); .*"
                       rf"\(.*l.tif {re.escape(note)}\)"):
        VolumeSlices(tmp_path, "v.tif", "l.tif", {"train": (0, 1)}, "train")
    with pytest.raises(DataError, match=rf"slices.tif: labels of shape \({depth}, 16, 16\), "
                       r"the volume .*v.tif is \(1, 16, 16, 3\); they must match slice for "
                       rf"slice \(.*v.tif {re.escape(note)}\)"):
        VolumeSlices(tmp_path, "v.tif", "slices.tif", {"train": (0, 1)}, "train")
    with pytest.raises(DataError, match=rf"\[1, 2\) is not a range of the 1 slices of "
                       rf".*v.tif \(.*v.tif {re.escape(note)}\)"):
        VolumeSlices(tmp_path, "v.tif", "l.tif", {"train": (0, 1), "test": (1, 2)}, "test")


def test_a_slice_range_past_the_end_says_where_ranges_may_end(tmp_path):
    from paser.data.slices import VolumeSlices

    (tmp_path / "classes.yaml").write_text("classes: {0: a, 1: b}\nignore: null\n")
    stack = np.zeros((5, 16, 16), np.uint8)
    tifffile.imwrite(tmp_path / "v.tif", stack, photometric="minisblack")
    with pytest.raises(DataError, match=r"^data.slices.test: \[4, 9\) is not a range of the 5 "
                       r"slices of .*v.tif \(a range \[start, end\) runs from 0 to at most 5, "
                       r"start before end\)$"):
        VolumeSlices(tmp_path, "v.tif", "v.tif", {"train": (0, 4), "test": (4, 9)}, "test")

def test_an_intensity_window_is_fitted_on_at_most_64_images_spread_over_all():
    from paser.data.images import spread

    assert spread(0) == [] and spread(3) == [0, 1, 2]
    picks = spread(100)
    assert len(picks) == 64 and picks[0] == 0 and picks[-1] == 99
    assert spread(127)[-1] == 126 and len(spread(127)) == 64


def test_data_check_reads_a_volume_and_a_run_without_its_weights_is_refused(tmp_path):
    from paser.config import load_config
    from paser.data import load_stage_data
    from paser.data.registry import check_dataset
    from paser.errors import ConfigError

    vol = np.random.default_rng(2).random((16, 16, 16)).astype(np.float32)
    labels = np.full(vol.shape, 255, np.uint8)
    labels[::2] = np.digitize(vol[::2], [0.4, 0.8]) * 10  # classes 0, 10 and 20
    with h5py.File(tmp_path / "scan.h5", "w") as fh:
        fh["data"], fh["labels"] = vol, labels
    (tmp_path / "classes.yaml").write_text(
        "classes: {0: pore, 10: matrix, 20: particle}\nignore: 255\n")
    data = ["data.volume=scan.h5:/data", "data.labels=scan.h5:/labels",
            "data.slices={train: [0, 10], validation: [10, 13], test: [13, 16]}"]
    r = check_dataset(tmp_path, overrides=data, workers=0, show_progress=False)
    assert r["layout"] == "volume"
    assert {s: v["images"] for s, v in r["splits"].items()} == {
        "train": 5, "validation": 2, "test": 1}  # the labelled slices: 0..8, 10 12, 14
    share = float((vol[0:10:2] >= 0.8).mean())
    assert r["class_fractions"]["particle"] == pytest.approx(share)
    assert r["suggested_overrides"][:5] == ["data.dataset=volume", f"data.root={tmp_path}",
                                            *data]
    assert r["splits"]["validation"]["slices"] == [10, 12] and r["uniform_slices"] is None
    with pytest.raises(ConfigError, match="takes data.. keys"):
        check_dataset(tmp_path, overrides=["stage1.epochs=2"], workers=0, show_progress=False)
    run = ["data.dataset=volume", f"data.root={tmp_path}", *data, "models.num_classes=3"]
    # three classes, and the config's default weights (the battery set's three phases)
    with pytest.raises(ConfigError, match="reference implementation's weights for its battery phases"):
        load_stage_data(load_config(preset="battery-quick", overrides=run), progress=False)
    weights = "stage1.class_weights=[" + ",".join(map(str, r["suggested_class_weights"])) + "]"
    load_stage_data(load_config(preset="battery-quick", overrides=[*run, weights]),
                    progress=False)


def test_data_check_flags_unlabelled_slices_stored_as_a_class(tmp_path):
    """A label volume begun with zeros and labelled on every fourth slice: the slices between
    are all class 0, which data check names; labels as whole floats read; a wrong value
    names its slice; labels of the labelled slices alone say how to write them."""
    from paser.config import load_config
    from paser.data.registry import check_dataset
    from paser.errors import ConfigError

    vol = np.random.default_rng(3).random((20, 16, 16)).astype(np.float32)
    labels = np.zeros(vol.shape, np.float32)  # unlabelled slices left at 0: class 'pore'
    labels[::4] = np.digitize(vol[::4], [0.4, 0.8])
    tifffile.imwrite(tmp_path / "scan.tif", vol)
    tifffile.imwrite(tmp_path / "labels.tif", labels)
    (tmp_path / "classes.yaml").write_text("classes: {0: pore, 1: matrix, 2: particle}\n")
    data = ["data.volume=scan.tif", "data.labels=labels.tif",
            "data.slices={train: [0, 12], validation: [12, 16], test: [16, 20]}"]
    r = check_dataset(tmp_path, overrides=data, workers=0, show_progress=False)
    assert r["splits"]["train"]["slices"] == list(range(12))  # every slice "labelled"
    u = r["uniform_slices"]
    assert u["class"] == "pore" and u["value"] == 0 and u["labelled"] == 20
    assert u["slices"] == [z for z in range(20) if z % 4] and u["between"] == 12
    # stored as the ignore value, they are unlabelled: only every fourth slice trains
    labels[np.arange(20) % 4 != 0] = 255
    tifffile.imwrite(tmp_path / "labels.tif", labels)
    r = check_dataset(tmp_path, overrides=data, workers=0, show_progress=False)
    assert r["splits"]["train"]["slices"] == [0, 4, 8] and r["uniform_slices"] is None
    assert r["missing_in"] == {"validation": [], "test": []}
    labels[12][labels[12] == 2] = 1  # the one validation slice without particle
    tifffile.imwrite(tmp_path / "labels.tif", labels)
    r = check_dataset(tmp_path, overrides=data, workers=0, show_progress=False)
    assert r["missing_in"] == {"validation": ["particle"], "test": []}
    labels[8, :2, :2] = 3
    tifffile.imwrite(tmp_path / "labels.tif", labels)
    with pytest.raises(DataError, match=r"labels.tif slice 8: mask values \[3\] are not in"):
        check_dataset(tmp_path, overrides=data, workers=0, show_progress=False)
    tifffile.imwrite(tmp_path / "labels.tif", labels[::4])
    with pytest.raises(DataError, match="write one of the volume's 20 slices, each labelled "
                       "slice at its place and the others all the ignore value 255"):
        check_dataset(tmp_path, overrides=data, workers=0, show_progress=False)
    for bad, message in (("{train: [0, 12], val: [12, 16], test: [16, 20]}",
                          r"val: not a split; .* \(validation is spelt out\)"),
                         ("{train: [0, 12], validation: [12, 12], test: [16, 20]}",
                          r"validation \[12, 12\) holds no slice"),
                         ("{train: [-4, 12], validation: [12, 16], test: [16, 20]}",
                          r"train \[-4, 12\) starts before slice 0: slices are numbered "
                          "from 0")):
        with pytest.raises(ConfigError, match=message):
            load_config(overrides=["data.dataset=volume", f"data.slices={bad}"])


def test_data_check_names_every_slice_whose_labels_are_not_classes(tmp_path):
    """Values outside classes.yaml on two training slices and a test slice: one check
    names the three, not the first alone; the other slices are read all the same."""
    from paser.data.registry import check_dataset

    vol = np.random.default_rng(4).random((20, 16, 16)).astype(np.float32)
    labels = np.full(vol.shape, 255, np.uint8)
    labels[::2] = np.digitize(vol[::2], [0.4, 0.8])
    labels[2, 0, 0], labels[6, :2, :2], labels[18, 5, 5] = 7, 9, 7
    tifffile.imwrite(tmp_path / "scan.tif", vol)
    tifffile.imwrite(tmp_path / "labels.tif", labels)
    (tmp_path / "classes.yaml").write_text("classes: {0: pore, 1: matrix, 2: particle}\n")
    data = ["data.volume=scan.tif", "data.labels=labels.tif",
            "data.slices={train: [0, 12], validation: [12, 16], test: [16, 20]}"]
    with pytest.raises(DataError) as caught:
        check_dataset(tmp_path, overrides=data, workers=0, show_progress=False)
    assert str(caught.value).startswith("3 problems; fix each and check again:")
    assert [re.search(r"slice (\d+): mask values \[(\d+)\]", p).groups()
            for p in caught.value.problems] == [("2", "7"), ("6", "9"), ("18", "7")]


def test_a_finished_volume_that_cannot_be_read_now_fails_alone(setup, monkeypatch):
    """A --stack folder segmented, then one of its slices broken: a rerun with it and
    another volume (as paser segment opens them) reports the folder and segments the
    other; so does a finished volume whose content cannot be read to compare."""
    m, vol, tmp = setup
    (tmp / "st").mkdir()
    for z in range(3):
        Image.fromarray(vol[z]).save(tmp / "st" / f"s{z}.png")
    tifffile.imwrite(tmp / "scan.tif", vol, photometric="minisblack")
    segment_volumes(m, split_inputs([tmp / "st"], stack=True)[1], tmp / "out")
    (tmp / "st" / "s1.png").write_bytes(b"\x89PNG broken")
    stack, scan = split_inputs([tmp / "st", tmp / "scan.tif"], stack=True,
                               keep_failed=True)[1]
    res = segment_volumes(m, [stack, scan], tmp / "out")
    assert "s1.png: cannot read the image" in res[0].error and res[0].record is None
    assert res[1].record is not None and not res[1].error
    Image.fromarray(vol[1]).save(tmp / "st" / "s1.png")  # written again: its time moved

    def unreadable(volume):
        raise OSError("the file is locked by the writer")

    monkeypatch.setattr("paser.volumes.signature", unreadable)
    stack, scan = split_inputs([tmp / "st", tmp / "scan.tif"], stack=True)[1]
    res = segment_volumes(m, [stack, scan], tmp / "out")
    assert res[0].error == f"{tmp / 'st'}: the file is locked by the writer"
    assert res[1].resumed


def test_a_damaged_chunk_is_done_again_and_a_full_disk_stops_at_the_first_volume(
        setup, monkeypatch):
    """A part cut short (a disk that filled, a copy) or a record cut off is done again, not
    assembled into every later call's failure; a full disk stops the call at once, naming
    the folder, with the finished chunks kept (a helper's audit: it failed every volume in
    turn, and a bad part failed every rerun)."""
    import errno

    import paser.volumes as V

    m, vol, tmp = setup
    for name in ("a", "b"):
        tifffile.imwrite(tmp / f"{name}.tif", vol, photometric="minisblack")
    volumes = split_inputs([tmp / "a.tif", tmp / "b.tif"])[1]
    segment_volumes(m, volumes, tmp / "whole", chunk=4)
    calls = [0]
    chunk = V.segment_chunk

    def full_at_the_fourth(*args, **kwargs):
        calls[0] += 1
        if calls[0] == 4:
            raise OSError(errno.ENOSPC, "No space left on device")
        return chunk(*args, **kwargs)

    monkeypatch.setattr(V, "segment_chunk", full_at_the_fourth)
    with pytest.raises(OSError, match=r"No space left on device \(writing the outputs of "
                       r".*a.tif; what finished is kept") as err:
        segment_volumes(m, volumes, tmp / "out", chunk=4)
    assert err.value.filename == str(tmp / "out") and calls[0] == 4  # b was not begun
    parts = tmp / "out" / ".a.parts"
    assert len(list(parts.glob("0*.json"))) == 3 and not (tmp / "out" / ".b.parts").exists()
    monkeypatch.setattr(V, "segment_chunk", chunk)
    (parts / "00000004.npy").write_bytes((parts / "00000004.npy").read_bytes()[:100])
    (parts / "00000008.json").write_text('[{"slice": 8, "gfl')
    assert V.chunks_to_do(volumes[0], tmp / "out", 4) == [(4, 8), (8, 12), (12, 16),
                                                           (16, 20), (20, 24)]
    segment_volumes(m, volumes, tmp / "out", chunk=4)
    for name in ("a", "b"):
        assert (tmp / "out" / f"{name}_labels.tif").read_bytes() == (
            tmp / "whole" / f"{name}_labels.tif").read_bytes()


@pytest.mark.slow
def test_a_label_volume_cut_short_since_is_done_again(setup):
    """A finished volume's record counts only with its label volume at the size it was
    written (a TIFF cut short, a zarr chunk lost): otherwise it is segmented again."""
    m, vol, tmp = setup
    volumes = _tiff_and_zarr(vol, tmp)
    first = segment_volumes(m, volumes, tmp / "out", chunk=4)
    whole = (tmp / "out" / "scan_labels.tif").read_bytes()
    assert np.array_equal(tifffile.imread(tmp / "out" / "scan_labels.tif"), _alone(m, vol))
    assert first[0].record["output_bytes"] == {"scan_labels.tif": len(whole)}
    (tmp / "out" / "scan_labels.tif").write_bytes(whole[:1000])
    chunk = next(p for p in (tmp / "out" / "z_labels.zarr").rglob("*")
                 if p.is_file() and not p.name.startswith("zarr"))
    chunk.unlink()
    again = segment_volumes(m, volumes, tmp / "out", chunk=4)
    assert [r.resumed for r in again] == [False, False]
    assert (tmp / "out" / "scan_labels.tif").read_bytes() == whole
    assert np.array_equal(zarr.open(str(tmp / "out" / "z_labels.zarr"), mode="r")[:],
                          _alone(m, vol))


def test_a_volume_record_or_volumes_csv_cut_short_is_done_again(setup):
    """A volume's record cut short (a copy, a full disk) is paser's, and the volume is done
    again; a volumes.csv emptied is rewritten (a helper's audit: both were refused as 'not
    paser's (another tool's file)')."""
    m, vol, tmp = setup
    volumes = _tiff_and_zarr(vol, tmp)
    segment_volumes(m, volumes, tmp / "out", chunk=4)
    whole = (tmp / "out" / "scan_labels.tif").read_bytes()
    record = tmp / "out" / "scan.json"
    record.write_text(record.read_text()[:300])
    (tmp / "out" / "volumes.csv").write_text("")
    again = segment_volumes(m, volumes, tmp / "out", chunk=4)
    assert [r.resumed for r in again] == [False, True]
    assert (tmp / "out" / "scan_labels.tif").read_bytes() == whole
    assert json.loads(record.read_text())["shape"] == [DEPTH, SIDE, SIDE]
    rows = list(csv.DictReader(open(tmp / "out" / "volumes.csv")))
    assert [(Path(r["input"]).name, r["status"]) for r in rows] == [("scan.tif", "ok"),
                                                                     ("z.zarr", "ok")]


def test_a_volume_written_again_in_part_is_segmented_again(setup):
    """Two slices rewritten in place keep the file's size and its first, middle and last
    slices: each slice's digest in the records tells it, for a finished volume and for the
    chunks of an interrupted one (a helper's audit: both were taken as they were)."""
    m, vol, tmp = setup
    tifffile.imwrite(tmp / "scan.tif", vol, photometric="minisblack")
    volumes = split_inputs([tmp / "scan.tif"])[1]
    segment_volumes(m, volumes, tmp / "out", chunk=4)
    tifffile.imwrite(tmp / "scan.tif", vol, photometric="minisblack")  # a touch: still done
    assert segment_volumes(m, volumes, tmp / "out", chunk=4)[0].resumed
    edited = vol.copy()
    edited[[5, 17]] = 255 - edited[[5, 17]]
    tifffile.imwrite(tmp / "scan.tif", edited, photometric="minisblack")
    again = segment_volumes(m, volumes, tmp / "out", chunk=4)
    assert not again[0].resumed
    assert np.array_equal(tifffile.imread(tmp / "out" / "scan_labels.tif"), _alone(m, edited))


def test_an_input_that_cannot_be_read_fails_alone_and_zarr_attributes_keep_a_volume_done(
        setup, monkeypatch):
    """Permission denied on reading an input is that volume's failure, not a write that
    stops the call; attributes a user adds to a label zarr (or a .DS_Store) do not make a
    finished volume look damaged; and a slice rewritten in place under an interrupted
    volume's finished chunks is segmented again (a reviewer's finds)."""
    import errno

    m, vol, tmp = setup
    volumes = _tiff_and_zarr(vol, tmp, "a")
    read = type(volumes[0]).read

    def denied(self, z0, z1):
        if self.source.endswith("a.tif"):
            raise PermissionError(errno.EACCES, "Permission denied", self.source)
        return read(self, z0, z1)

    monkeypatch.setattr(type(volumes[0]), "read", denied)
    first = segment_volumes(m, volumes, tmp / "out", chunk=4)
    assert first[0].record is None and "Permission denied" in first[0].error
    assert first[1].record is not None  # the next volume went on
    monkeypatch.setattr(type(volumes[0]), "read", read)
    labels = zarr.open_array(str(tmp / "out" / "z_labels.zarr"), mode="r+")
    labels.attrs["note"] = "checked by hand"
    (tmp / "out" / "z_labels.zarr" / ".DS_Store").write_bytes(b"x")
    again = segment_volumes(m, volumes, tmp / "out", chunk=4)
    assert again[1].resumed and again[0].record is not None
    # interrupted after two chunks, then slice 5 rewritten in place: redone with it
    _stopped_at(monkeypatch, m, 9,
                lambda: segment_volumes(m, volumes[:1], tmp / "part", chunk=4))
    edited = vol.copy()
    edited[5] = 255 - edited[5]
    tifffile.imwrite(tmp / "a.tif", edited, photometric="minisblack")
    segment_volumes(m, volumes[:1], tmp / "part", chunk=4)
    assert np.array_equal(tifffile.imread(tmp / "part" / "a_labels.tif"), _alone(m, edited))


def test_which_errors_stop_the_call_as_writes(tmp_path, monkeypatch):
    """A full disk, a quota or a read-only file system always; permission denied only on a
    file in --out that is not the volume's own (an input may lie in --out), from a relative
    --out too (a reviewer's find: an unreadable input in --out stopped the call)."""
    import errno

    from paser.volumes import Volume, is_write_error

    out = tmp_path / "out"
    out.mkdir()
    vol = Volume(source=str(out / "a.tif"), stem="a", kind="tiff", shape=(2, 4, 4),
                 dtype="uint8", path=str(out / "a.tif"))
    stack = Volume(source=str(tmp_path / "slices"), stem="s", kind="stack", shape=(1, 4, 4),
                   dtype="uint8", path=str(tmp_path / "slices"), files=[str(out / "s0.png")])
    monkeypatch.chdir(tmp_path)
    for code in (errno.ENOSPC, errno.EDQUOT, errno.EROFS):
        assert is_write_error(OSError(code, "x", str(out / "a.tif")), out, vol)
    denied = errno.EACCES
    assert not is_write_error(OSError(denied, "x", str(out / "a.tif")), out, vol)
    assert not is_write_error(OSError(denied, "x", "out/s0.png"), Path("out"), stack)
    assert is_write_error(OSError(denied, "x", "out/a_labels.zarr/c/0/0/0"), Path("out"), vol)
    assert is_write_error(OSError(denied, "x"), out, vol)  # paser's own part: no file named
    assert not is_write_error(OSError(denied, "x", str(tmp_path / "elsewhere")), out, vol)
    # an error no later volume would meet (a damaged input, a bad value) fails its own
    assert not is_write_error(OSError(errno.EIO, "x", str(out / "a_labels.tif")), out, vol)
    assert not is_write_error(ValueError("bad"), out, vol)


def test_a_tiff_read_as_an_image_while_copied_keeps_no_failed_row_once_a_volume(setup):
    """A multi-page TIFF still being copied reads as one page and fails as an image; once
    whole it is segmented as a volume, and summary.csv no longer lists it as failed (a
    helper's audit), while the rows of other images stay."""
    from paser.segment import canonical, segment_files

    m, vol, tmp = setup
    Image.fromarray(vol[0]).save(tmp / "other.png")
    (tmp / "scan.tif").write_bytes(b"II*\x00 cut short")
    segment_files(m, [tmp / "scan.tif", tmp / "other.png"], tmp / "out")
    rows = list(csv.DictReader(open(tmp / "out" / "summary.csv", newline="")))
    assert [r["status"] for r in rows] == ["failed", "ok"]
    tifffile.imwrite(tmp / "scan.tif", vol, photometric="minisblack")
    segment_volumes(m, split_inputs([tmp / "scan.tif"])[1], tmp / "out", chunk=8)
    rows = list(csv.DictReader(open(tmp / "out" / "summary.csv", newline="")))
    assert [r["input path"] for r in rows] == [canonical(str(tmp / "other.png"))]


def test_an_overwrite_of_volumes_alone_or_images_alone_empties_both_summaries(setup):
    """--overwrite starts the folder over, so no record of before counts as done; a call of
    volumes alone kept summary.csv's rows (and one of images alone volumes.csv's), which
    listed inputs as done that the next call segments again."""
    from paser.segment import finished, segment_files

    m, vol, tmp = setup
    Image.fromarray(vol[0]).save(tmp / "img.png")
    tifffile.imwrite(tmp / "scan.tif", vol[:6], photometric="minisblack")
    volume = split_inputs([tmp / "scan.tif"])[1]
    for alone in ("volumes", "images"):
        out = tmp / alone
        segment_files(m, [tmp / "img.png"], out)
        segment_volumes(m, volume, out)
        if alone == "volumes":
            segment_volumes(m, volume, out, overwrite=True)
            assert finished(out, tmp / "img.png") is None  # its record is of before
        else:
            segment_files(m, [tmp / "img.png"], out, overwrite=True)
        rows = {name: [r["input"] for r in csv.DictReader(open(out / name, newline=""))]
                for name in ("summary.csv", "volumes.csv") if (out / name).exists()}
        assert rows == ({"volumes.csv": [str(tmp / "scan.tif")]} if alone == "volumes"
                        else {"summary.csv": [str(tmp / "img.png")]})


def test_a_chunk_counts_as_done_only_whole_and_the_last_short_one_too(setup):
    from paser import volumes as V

    m, vol, tmp = setup
    tifffile.imwrite(tmp / "scan.tif", vol[:5], photometric="minisblack")
    [volume] = split_inputs([tmp / "scan.tif"])[1]
    out = tmp / "out"
    labels, chunk = V.prepare_volume(volume, out, 2, m.intensity)
    assert V.chunks_to_do(volume, out, chunk) == [(0, 2), (2, 4), (4, 5)]
    for z0, z1 in V.chunks_to_do(volume, out, chunk):
        V.segment_chunk(m, volume, z0, z1, out, labels)
    assert V.chunks_to_do(volume, out, chunk) == []  # the short last chunk is done as well
    parts = out / ".scan.parts"
    records = json.loads((parts / "00000000.json").read_text())
    (parts / "00000000.json").write_text(json.dumps(records[:1]))  # a record of one slice
    assert V.chunk_done(volume, out, 0, 2) is None
    np.save(parts / "00000002.npy", np.zeros((1, SIDE, SIDE), np.uint8))  # a part cut short
    assert V.chunk_done(volume, out, 2, 4) is None
    assert V.chunks_to_do(volume, out, chunk) == [(0, 2), (2, 4)]


def test_a_run_that_fills_nonfinite_voxels_fills_them_in_volumes_too(setup):
    import dataclasses

    m, _, tmp = setup
    recon = np.random.default_rng(1).normal(0.5, 0.1, (4, SIDE, SIDE)).astype(np.float32)
    recon[1, 3, 4] = np.nan
    tifffile.imwrite(tmp / "recon.tif", recon, photometric="minisblack")
    # a run trained on 8-bit images: a window fitted on the volume, the run's fill kept
    assert m.intensity.window is None
    m._intensity = dataclasses.replace(m.intensity, nonfinite="fill")
    [res] = segment_volumes(m, split_inputs([tmp / "recon.tif"])[1], tmp / "out", chunk=2)
    assert res.error == "" and res.record["shape"] == [4, SIDE, SIDE]
    m._intensity = dataclasses.replace(m.intensity, nonfinite="error")  # the default refuses
    [res] = segment_volumes(m, split_inputs([tmp / "recon.tif"])[1], tmp / "refused", chunk=2)
    assert "NaN" in res.error


def test_an_8_bit_volume_under_a_run_with_a_window_is_not_said_scaled_as_in_training(setup):
    import dataclasses

    m, vol, tmp = setup
    tifffile.imwrite(tmp / "scan.tif", vol, photometric="minisblack")
    [res] = segment_volumes(m, split_inputs([tmp / "scan.tif"])[1], tmp / "plain", chunk=4)
    assert res.record["intensity"] == {  # a run of 8-bit images: scaled as it trained
        "mode": "type range",
        "says": "uint8 voxels scaled by their type's range (0 to its largest value), as in "
                "training"}
    # a run whose window was fitted on float reconstructions scaled those by it, not these
    m._intensity = dataclasses.replace(m.intensity, window=(0.04, 1.04))
    [res] = segment_volumes(m, split_inputs([tmp / "scan.tif"])[1], tmp / "float_run", chunk=4)
    said = res.record["intensity"]
    assert said["mode"] == "type range" and said["run_window"] == [0.04, 1.04]
    assert "as in training" not in said["says"]
    assert "not by the window [0.04, 1.04] the run fitted" in said["says"]
    # a slice of it segmented as an image gets the same note
    from paser.segment import read_input

    Image.fromarray(vol[0]).save(tmp / "slice.png")
    image, notes = read_input(tmp / "slice.png", 1, m.intensity)
    assert notes == [said["says"]] and np.array_equal(image[0], vol[0] / np.float32(255))
    assert read_input(tmp / "slice.png", 1, dataclasses.replace(m.intensity, window=None)
                      )[1] == []


@pytest.mark.slow
def test_a_volume_s_voxel_size_goes_with_its_labels(setup):
    """The voxel size each format states is read in micrometres, never guessed, and the
    labels carry it: an OME-TIFF (and X and Y resolution) for TIFF outputs, zarr attributes,
    and the record, with each class's volume where the depth is known."""
    from paser.data.voxels import of_tiff

    m, vol, tmp = setup
    ome = {"axes": "ZYX", "PhysicalSizeX": 0.5, "PhysicalSizeY": 0.25, "PhysicalSizeZ": 2.0,
           "PhysicalSizeZUnit": "nm"}
    tifffile.imwrite(tmp / "ome.tif", vol, ome=True, metadata=ome)
    tifffile.imwrite(tmp / "ij65.tif", vol, imagej=True, resolution=(1 / 0.65, 1 / 0.65),
                     metadata={"spacing": 0.65, "unit": "micron", "axes": "ZYX"})
    v = open_volume(tmp / "ij65.tif").voxel
    assert (v.z, v.y, v.x) == (0.65, 0.65, 0.65)  # not 0.6499999999999999 read back
    tifffile.imwrite(tmp / "ij.tif", vol, imagej=True, resolution=(2.0, 4.0),
                     metadata={"spacing": 0.003, "unit": "mm", "axes": "ZYX"})
    tifffile.imwrite(tmp / "cm.tif", vol, resolution=(1e4, 2e4), resolutionunit="CENTIMETER")
    tifffile.imwrite(tmp / "dpi.tif", vol, resolution=(300, 300), resolutionunit="INCH")
    tifffile.imwrite(tmp / "bare.tif", vol)
    group = zarr.open_group(str(tmp / "scan.zarr"), mode="w")
    group.create_array("0", shape=(1, *vol.shape), dtype="uint8", chunks=(1, 8, 16, 16))[:] = (
        vol[None])
    group.attrs["multiscales"] = [{
        "axes": [{"name": "c", "type": "channel"}] + [
            {"name": a, "type": "space", "unit": "micrometer"} for a in "zyx"],
        "datasets": [{"path": "0", "coordinateTransformations": [
            {"type": "scale", "scale": [1.0, 3.0, 0.5, 0.5]}]}]}]
    with h5py.File(tmp / "scan.h5", "w") as fh:
        fh["raw"] = vol
        fh["raw"].attrs["element_size_um"] = [1.5, 0.75, 0.75]
    (tmp / "slices").mkdir()
    for z, s in enumerate(vol[:3]):
        tifffile.imwrite(tmp / "slices" / f"s{z}.tif", s, resolution=(1e4, 1e4),
                         resolutionunit="CENTIMETER")
    sizes = {name: (v.z, v.y, v.x) if (v := open_volume(tmp / name).voxel) else None
             for name in ("ome.tif", "ij.tif", "cm.tif", "dpi.tif", "bare.tif", "scan.zarr/0",
                          "scan.h5", "slices")}
    bad = zarr.open_group(str(tmp / "bad.zarr"), mode="w")  # not as OME-Zarr writes it
    bad.create_array("0", shape=vol.shape, dtype="uint8")[:] = vol
    bad.attrs["multiscales"] = [{"datasets": "0", "axes": "zyx"}]
    assert open_volume(tmp / "bad.zarr/0").voxel is None
    bad.attrs.clear()
    bad.attrs["ome"] = "0.5"
    assert open_volume(tmp / "bad.zarr/0").voxel is None
    assert sizes == {"ome.tif": (0.002, 0.25, 0.5), "ij.tif": (3.0, 250.0, 500.0),
                     "cm.tif": (None, 0.5, 1.0), "dpi.tif": None, "bare.tif": None,
                     "scan.zarr/0": (3.0, 0.5, 0.5), "scan.h5": (1.5, 0.75, 0.75),
                     "slices": (None, 1.0, 1.0)}

    volumes = split_inputs([tmp / "ome.tif", tmp / "cm.tif", tmp / "bare.tif",
                            tmp / "scan.zarr/0", tmp / "scan.h5"])[1]
    segment_volumes(m, volumes, tmp / "out", chunk=8)
    segment_volumes(m, volumes, tmp / "again", chunk=8)
    out = tmp / "out"
    alone = _alone(m, vol)
    for name in ("ome", "cm", "bare"):
        assert np.array_equal(tifffile.imread(out / f"{name}_labels.tif"), alone)
        assert (out / f"{name}_labels.tif").read_bytes() == (
            tmp / "again" / f"{name}_labels.tif").read_bytes()  # the OME UUID too
    with tifffile.TiffFile(out / "ome_labels.tif") as tif:
        assert tif.is_ome and tif.series[0].axes == "ZYX"
        back = of_tiff(tif)
        assert (back.z, back.y, back.x) == (0.002, 0.25, 0.5)
        assert tif.pages[0].resolution == (2e4, 4e4)  # pixels per centimetre
    with tifffile.TiffFile(out / "bare_labels.tif") as tif:
        assert not tif.is_ome and of_tiff(tif) is None
        assert tif.pages[0].compression == tifffile.COMPRESSION.ADOBE_DEFLATE
    record = json.loads((out / "ome.json").read_text())
    assert record["voxel_size"] == {"z": 0.002, "y": 0.25, "x": 0.5, "unit": "micrometre",
                                    "from": "OME-XML"}
    fractions, volumes_um3 = record["class_fractions"], record["class_volume_um3"]
    total = DEPTH * SIDE * SIDE * 0.002 * 0.25 * 0.5
    assert sum(volumes_um3.values()) == pytest.approx(total)
    assert all(volumes_um3[k] == pytest.approx(fractions[k] * total) for k in fractions)
    assert "class_volume_um3" not in json.loads((out / "cm.json").read_text())
    assert "voxel_size" not in json.loads((out / "bare.json").read_text())
    attrs = dict(zarr.open(str(out / "scan_labels.zarr"), mode="r").attrs)
    assert attrs["element_size_um"] == [1.5, 0.75, 0.75]
    assert attrs["voxel_size"]["from"] == "HDF5 element_size_um"
    zattrs = dict(zarr.open(str(out / "scan_0_labels.zarr"), mode="r").attrs)
    assert zattrs["element_size_um"] == [3.0, 0.5, 0.5]


def test_labels_resumed_from_parts_without_a_signature_are_the_same_bytes(setup, monkeypatch):
    """Parts left by a paser before signatures were kept drew the OME UUID from the input's
    path, an uninterrupted run from its content: one input, two files. A label TIFF with no
    voxel size is a ZYX stack too, not tifffile's unknown QYX."""
    m, vol, tmp = setup
    tifffile.imwrite(tmp / "ome.tif", vol, ome=True, metadata={
        "axes": "ZYX", "PhysicalSizeX": 0.5, "PhysicalSizeY": 0.5, "PhysicalSizeZ": 1.0})
    tifffile.imwrite(tmp / "bare.tif", vol, photometric="minisblack")
    volumes = split_inputs([tmp / "ome.tif", tmp / "bare.tif"])[1]
    segment_volumes(m, volumes, tmp / "whole", chunk=4)
    _stopped_at(monkeypatch, m, 9, lambda: segment_volumes(m, volumes[:1], tmp / "out", chunk=4))
    made = tmp / "out" / ".ome.parts" / "volume.json"
    kept = json.loads(made.read_text())
    del kept["volume"]["signature"]
    made.write_text(json.dumps(kept))
    segment_volumes(m, volumes[:1], tmp / "out", chunk=4)
    assert (tmp / "out" / "ome_labels.tif").read_bytes() == (
        tmp / "whole" / "ome_labels.tif").read_bytes()
    with tifffile.TiffFile(tmp / "whole" / "bare_labels.tif") as tif:
        assert (tif.series[0].axes, tif.series[0].shape) == ("ZYX", vol.shape)


def _ome_uuid(path: Path) -> str:
    with tifffile.TiffFile(path) as tif:
        return re.search(r'UUID="urn:uuid:([0-9a-f-]+)"', tif.ome_metadata)[1]


def test_the_ome_uuid_names_the_input_and_the_settings_that_segmented_it(setup):
    """One input under two caps got one OME UUID: two files of other labels claimed to be
    the same. The same input and settings, in another folder, give the same bytes."""
    m, vol, tmp = setup
    tifffile.imwrite(tmp / "ome.tif", vol[:4], ome=True, metadata={
        "axes": "ZYX", "PhysicalSizeX": 0.5, "PhysicalSizeY": 0.5, "PhysicalSizeZ": 1.0})
    volume = split_inputs([tmp / "ome.tif"])[1]
    for out in ("a", "b"):
        segment_volumes(m, volume, tmp / out)
    m.cap(1e6)  # bounds nothing here: the same labels, under other settings
    segment_volumes(m, volume, tmp / "capped")
    assert np.array_equal(tifffile.imread(tmp / "capped" / "ome_labels.tif"),
                          tifffile.imread(tmp / "a" / "ome_labels.tif"))
    assert _ome_uuid(tmp / "capped" / "ome_labels.tif") != _ome_uuid(tmp / "a" / "ome_labels.tif")
    assert (tmp / "a" / "ome_labels.tif").read_bytes() == (tmp / "b" / "ome_labels.tif").read_bytes()


def test_an_ome_tiff_s_labels_are_an_ome_tiff_named_as_one_and_old_names_resume(setup):
    """scan.ome.tif's labels were scan.ome_labels.tif, no OME-TIFF name (and no OME-TIFF
    at all without a voxel size): now scan_labels.ome.tif, an OME-TIFF either way, the same
    bytes in two folders. A folder of before, its labels under the old name, resumes on them;
    segmented again (its input written again), the labels of before go."""
    m, vol, tmp = setup
    tifffile.imwrite(tmp / "scan.ome.tif", vol, ome=True, metadata={
        "axes": "ZYX", "PhysicalSizeX": 0.5, "PhysicalSizeY": 0.5, "PhysicalSizeZ": 1.0})
    tifffile.imwrite(tmp / "bare.ome.tif", vol, ome=True, metadata={"axes": "ZYX"})
    volumes = split_inputs([tmp / "scan.ome.tif", tmp / "bare.ome.tif"])[1]
    for out in ("a", "b"):
        segment_volumes(m, volumes, tmp / out, chunk=8)
    out = tmp / "a"
    assert sorted(p.name for p in out.glob("*.tif")) == ["bare_labels.ome.tif",
                                                         "scan_labels.ome.tif"]
    for name in ("bare_labels.ome.tif", "scan_labels.ome.tif"):
        with tifffile.TiffFile(out / name) as tif:
            assert tif.is_ome and tif.series[0].axes == "ZYX"
        assert np.array_equal(tifffile.imread(out / name), _alone(m, vol))
        assert (out / name).read_bytes() == (tmp / "b" / name).read_bytes()
    assert json.loads((out / "scan.ome.json").read_text())["output"] == "scan_labels.ome.tif"

    # as a paser before 2026-12-07 left it
    (out / "scan_labels.ome.tif").rename(out / "scan.ome_labels.tif")
    record = json.loads((out / "scan.ome.json").read_text())
    record["output"] = "scan.ome_labels.tif"
    record["output_bytes"] = {"scan.ome_labels.tif": record["output_bytes"].pop(
        "scan_labels.ome.tif")}
    (out / "scan.ome.json").write_text(json.dumps(record))
    [res] = segment_volumes(m, volumes[:1], out, chunk=8)
    assert res.resumed and res.record["output"] == "scan.ome_labels.tif"
    assert not (out / "scan_labels.ome.tif").exists()
    tifffile.imwrite(tmp / "scan.ome.tif", vol[::-1], ome=True, metadata={
        "axes": "ZYX", "PhysicalSizeX": 0.5, "PhysicalSizeY": 0.5, "PhysicalSizeZ": 1.0})
    [res] = segment_volumes(m, split_inputs([tmp / "scan.ome.tif"])[1], out, chunk=8)
    assert not res.resumed and res.record["output"] == "scan_labels.ome.tif"
    assert not (out / "scan.ome_labels.tif").exists()
    assert np.array_equal(tifffile.imread(out / "scan_labels.ome.tif"), _alone(m, vol[::-1]))


def test_a_volume_s_record_and_line_name_its_cap_and_gflops_per_megapixel(setup, capsys):
    """A capped call's records say so (a volume's and an image's), and the volume's line
    gives GFLOP per megapixel, the cap's unit, beside GFLOP per slice."""
    from paser.cli.deploy import _volume_lines
    from paser.segment import segment_files

    m, vol, tmp = setup
    tifffile.imwrite(tmp / "scan.tif", vol)
    Image.fromarray(vol[0]).save(tmp / "one.png")
    m.cap(1e6)
    [res] = segment_volumes(m, split_inputs([tmp / "scan.tif"])[1], tmp / "out", chunk=8)
    segment_files(m, [tmp / "one.png"], tmp / "out")
    record = res.record
    assert (record["cap_gflops_per_mp"], record["calibration"]) == (1e6, None)
    assert json.loads((tmp / "out" / "one.json").read_text())["cap_gflops_per_mp"] == 1e6
    _volume_lines([res], tmp / "out")
    per_mp = record["gflops"] / (DEPTH * SIDE * SIDE / 1e6)
    assert (f"{record['gflops_per_slice']:.3f} GFLOP per slice ({per_mp:.2f} GFLOP/MP, "
            "capped at 1e+06; torch.utils.flop_counter") in capsys.readouterr().out
    m.cap(None)
    [res] = segment_volumes(m, split_inputs([tmp / "scan.tif"])[1], tmp / "free", chunk=8)
    assert res.record["cap_gflops_per_mp"] is None


def test_the_bar_hears_each_chunk_of_its_volume_and_when_the_labels_are_written(setup):
    m, vol, tmp = setup
    tifffile.imwrite(tmp / "scan.tif", vol, photometric="minisblack")
    zarr.open_array(str(tmp / "z.zarr"), mode="w", shape=vol.shape, chunks=(8, 16, 16),
                    dtype="uint8")[:] = vol
    heard = []
    segment_volumes(m, split_inputs([tmp / "scan.tif", tmp / "z.zarr"])[1], tmp / "out",
                    chunk=8, on_slices=lambda n, v, what: heard.append((n, v, what)))
    plane = SIDE * SIDE
    assert heard == [(8, 8 * plane, "scan")] * 3 + [(0, 0, "writing scan_labels.tif")] + [
        (8, 8 * plane, "z")] * 3  # zarr labels are whole as the chunks go: nothing to put together


def test_the_field_of_view_record_names_the_slices_it_was_found_on():
    """The fill is found on 16 slices spread through a volume, and on every slice of a
    shorter one: a record of 6 slices does not speak of 16."""
    def says(depth):
        slices = [{"outside_voxels": 2, "class_voxels": [1, 1]}] * depth
        fov = field_of_view_record(0.0, slices)["field_of_view"]
        assert fov["outside_voxels"] == 2 * depth and fov["share_outside"] == 0.5
        return fov["says"].split(", joined")[0]

    assert says(40) == "voxels at this value where 16 slices spread through the volume all hold it"
    assert says(16) == "voxels at this value where every one of the volume's 16 slices holds it"
    assert says(6) == "voxels at this value where every one of the volume's 6 slices holds it"
    assert says(1) == "voxels at this value on the volume's one slice"


def test_class_fractions_count_the_field_of_view_not_the_fill_around_it(setup, capsys):
    """A reconstruction written as -1000 outside its circle: the fill, found at the corners
    of slices spread through it, and the pixels at it on every one of them joined to the
    border are kept with the parts and left out of the class counts (a pore inside at the
    same value stays in, and so does one on the circle's edge on one slice), and the record
    says how many voxels lie outside. A scan with data in its corners has none."""
    m, vol, tmp = setup
    yy, xx = np.mgrid[:SIDE, :SIDE]
    outside = (yy - 7.5) ** 2 + (xx - 7.5) ** 2 > 7.5 ** 2
    recon = vol.astype(np.float32) / 255
    recon[:, outside] = -1000.0
    recon[:, 7:9, 7:9] = -1000.0  # a pore inside the circle at the fill's value
    edge = np.zeros((SIDE, SIDE), bool)
    edge[1:3, 6:10] = True  # inside the circle, on its edge (row 0 is outside)
    assert not (edge & outside).any()
    recon[3, edge] = -1000.0  # a pore there on one slice (clipped to the fill): it stays in
    tifffile.imwrite(tmp / "recon.tif", recon, photometric="minisblack")
    [res] = segment_volumes(m, split_inputs([tmp / "recon.tif"])[1], tmp / "out", chunk=10)
    labels = tifffile.imread(tmp / "out" / "recon_labels.tif")
    codec = m.label_codec
    inside = [int(np.count_nonzero(labels[:, ~outside] == v)) for v in codec.values]
    assert sum(inside) == DEPTH * int((~outside).sum())
    fov = res.record["field_of_view"]
    assert fov["fill"] == -1000.0 and fov["outside_voxels"] == DEPTH * int(outside.sum())
    assert fov["share_outside"] == pytest.approx(outside.mean())
    assert list(res.record["class_fractions"].values()) == pytest.approx(
        [n / sum(inside) for n in inside])
    assert res.record["slices"][3]["outside_voxels"] == int(outside.sum())
    from paser.cli.deploy import _volume_lines

    capsys.readouterr()
    _volume_lines([res], tmp / "out")
    assert "(at the fill -1000 on every slice, joined to the border)" in capsys.readouterr().out
    # the same voxels with data in a corner of one slice: no fill, every voxel counted
    recon[0, 0, 0] = 0.5
    tifffile.imwrite(tmp / "corner.tif", recon, photometric="minisblack")
    [res] = segment_volumes(m, split_inputs([tmp / "corner.tif"])[1], tmp / "out", chunk=10)
    assert "field_of_view" not in res.record and "outside_voxels" not in res.record[
        "slices"][0]
    assert sum(sum(r["class_voxels"]) for r in res.record["slices"]) == recon.size


def test_a_volumes_slices_are_evaluated_as_the_same_slices_in_memory(setup):
    """A split of volume data whose slices are of the run's size (data.tile auto: not cut
    into tiles) goes to PaSeR.evaluate as it is: it was not a torch Dataset, and `paser
    evaluate` on such a run stopped with 'data of type VolumeSlices: give
    paser.data.Tensors(...)'."""
    from tests.test_label_codec import VALUES

    from paser.data import Tensors
    from paser.data.slices import VolumeSlices

    m, vol, tmp = setup
    classes = np.digitize(vol / 255.0, [0.325, 0.675]).astype(np.uint8)  # the Bands models'
    labels = np.full(vol.shape, 255, np.uint8)
    labels[::3] = np.array(list(VALUES), np.uint8)[classes[::3]]
    tifffile.imwrite(tmp / "scan.tif", vol, photometric="minisblack")
    tifffile.imwrite(tmp / "labels.tif", labels, photometric="minisblack")
    (tmp / "classes.yaml").write_text(
        "classes: {0: background, 40: particle, 80: binder}\nignore: 255\n")
    test = VolumeSlices(tmp, "scan.tif", "labels.tif", {"test": (12, 24)}, "test")
    assert test.z == [12, 15, 18, 21]
    held = Tensors(torch.from_numpy(vol[test.z, None] / 255.0).float(),
                   torch.from_numpy(classes[test.z]), test.ids)
    got, want = m.evaluate(test, batch_size=3), m.evaluate(held, batch_size=3)
    assert got["miou"] == want["miou"] == 1.0
    assert got["per_class"] == want["per_class"] and got["gflops"] == want["gflops"]


def test_an_hdf5_dataset_whose_compression_filter_is_missing_says_to_install_hdf5plugin(
        tmp_path):
    """Detector and synchrotron software compress HDF5 with bitshuffle, Blosc or LZ4, which
    h5py lacks: the first slice's read failed with h5py's "can't open directory
    (/usr/local/hdf5/lib/plugin)", naming neither the filter nor what to do. The volume is
    refused when opened, naming the filter and hdf5plugin (loaded when installed)."""
    try:
        import hdf5plugin  # noqa: F401
        pytest.skip("hdf5plugin installed: its filters decode the dataset")
    except ImportError:
        pass
    with h5py.File(tmp_path / "scan.h5", "w") as f:
        data = f.create_dataset("data", shape=(2, 4, 4), dtype="u1", chunks=(1, 4, 4),
                                compression=32008, compression_opts=(0, 2),
                                allow_unknown_filter=True)
        for z in range(2):  # chunks as the filter's writer would leave them
            data.id.write_direct_chunk((z, 0, 0), bytes(16), filter_mask=0)
    with pytest.raises(DataError, match=r"scan.h5:/data: compressed with bitshuffle \(HDF5 "
                                        r"filter 32008\), which this install cannot decode: "
                                        r"pip install hdf5plugin"):
        open_volume(f"{tmp_path / 'scan.h5'}:/data")


def test_a_tiff_volume_cut_short_names_the_slice_and_says_to_copy_it_again(tmp_path):
    """A TIFF copied in part (its pages' offsets there, the last page's bytes not) failed
    with the codec's own words ('libdeflate_zlib_decompress returned LIBDEFLATE_BAD_DATA'),
    naming no slice and nothing to do."""
    vol = np.random.default_rng(0).integers(0, 256, (3, 16, 16), dtype=np.uint8)
    tifffile.imwrite(tmp_path / "whole.tif", vol, photometric="minisblack", compression="zlib")
    data = (tmp_path / "whole.tif").read_bytes()
    last = tifffile.TiffFile(tmp_path / "whole.tif").pages[2].dataoffsets[0]
    (tmp_path / "cut.tif").write_bytes(data[:last + 40])  # the last page's data cut short
    volume = open_volume(tmp_path / "cut.tif")
    assert np.array_equal(volume.read(0, 2), vol[:2])
    with pytest.raises(DataError, match=r"cut.tif: cannot read slices 1 to 2 \(.*\); the file "
                                        r"is damaged or cut short"):
        volume.read(1, 3)


def test_an_ome_zarr_image_given_as_its_group_names_its_full_resolution_level(tmp_path):
    """An OME-Zarr image is a group of resolution levels: refused as any group, it listed
    them ('0', '1', '2') without saying which is the scan at full resolution, the one to
    segment; the refusal now names it, from the multiscales (0.4 and 0.5 alike)."""
    for version, store in (("0.4", "a.ome.zarr"), ("0.5", "b.ome.zarr")):
        root = zarr.open_group(str(tmp_path / store), mode="w")
        for level, side in (("s0", 8), ("s1", 4)):  # levels named as some writers name them
            root.create_array(level, shape=(2, side, side), dtype="uint8")
        ms = [{"version": version, "axes": ["z", "y", "x"],
               "datasets": [{"path": "s0"}, {"path": "s1"}]}]
        root.attrs.update({"multiscales": ms} if version == "0.4" else
                          {"ome": {"version": version, "multiscales": ms}})
        with pytest.raises(DataError, match=rf"{store}: an OME-Zarr image \(a group of "
                                            r"resolution levels\), not an array; give its "
                                            rf"full-resolution level, .*{store}/s0$"):
            open_volume(tmp_path / store)
        assert open_volume(tmp_path / store / "s0").shape == (2, 8, 8)



def test_a_label_volume_compressed_with_jpeg_is_refused_as_jpeg_labels(tmp_path):
    """A label TIFF written with compression='jpeg' was read, and the values JPEG moved
    along every edge were taken for labels resampled by interpolation, with the advice to
    resample by nearest neighbour."""
    from paser.data.slices import VolumeSlices

    labels = np.zeros((2, 16, 16), np.uint8)
    labels[:, 4:12, 4:12] = 1
    tifffile.imwrite(tmp_path / "v.tif", labels * 200, photometric="minisblack")
    tifffile.imwrite(tmp_path / "l.tif", labels, photometric="minisblack", compression="jpeg")
    (tmp_path / "classes.yaml").write_text("classes: {0: pore, 1: solid}\nignore: 255\n")
    with pytest.raises(DataError, match=r"l.tif: labels in a TIFF compressed with JPEG; "
                                        "JPEG's lossy compression changes label values"):
        VolumeSlices(tmp_path, "v.tif", "l.tif", {"train": (0, 2)}, "train")


def test_slices_with_and_without_alpha_are_one_stack_and_other_channels_are_named(tmp_path):
    """Gray + alpha is gray: a gray PNG, an LA PNG and a gray + alpha TIFF read as the same
    [H, W] slice, from each file and from the folder of them (stacked as [H, W] and
    [H, W, 1] they were "damaged or cut short"); a slice of two detectors' channels among
    gray ones is named with its channels before anything is read."""
    gray = np.random.default_rng(0).integers(0, 256, (3, 8, 9), dtype=np.uint8)
    alpha = np.full((8, 9), 255, np.uint8)
    (tmp_path / "s").mkdir()
    Image.fromarray(gray[0]).save(tmp_path / "s" / "s0.png")
    Image.fromarray(np.dstack([gray[1], alpha]), mode="LA").save(tmp_path / "s" / "s1.png")
    tifffile.imwrite(tmp_path / "s" / "s2.tif", np.dstack([gray[2], alpha]),
                     photometric="minisblack", extrasamples=["unassalpha"])
    stack = open_volume(tmp_path / "s")
    assert stack.shape == (3, 8, 9) and np.array_equal(stack.read(0, 3), gray)
    for z, name in enumerate(("s0.png", "s1.png", "s2.tif")):
        assert np.array_equal(read_array(tmp_path / "s" / name), gray[z]), name
    tifffile.imwrite(tmp_path / "s" / "s2.tif", np.dstack([gray[2], alpha]),
                     photometric="minisblack", extrasamples=["unspecified"])
    with pytest.raises(DataError, match=r"s2.tif: 8 x 9 uint8 of 2 channels, but .*s0.png is "
                                        r"8 x 9 uint8; the slices of a stack share one size, "
                                        r"type, colour and number of channels"):
        open_volume(tmp_path / "s")


def test_big_endian_voxels_and_a_last_axis_of_one_read_as_a_tiff_of_them(tmp_path):
    """An HDF5 dataset of big-endian uint16 (written on another machine) and a zarr array
    of slices x height x width x 1 give the slices a TIFF of the same voxels gives: uint16
    in this machine's order, [H, W] (its dtype said '>u2', and planes of [H, W, 1] had no
    field of view looked for on them)."""
    from paser.data.images import field_of_view

    rng = np.random.default_rng(0)
    vol = rng.integers(1, 65536, (3, 12, 12), dtype=np.uint16)
    yy, xx = np.mgrid[:12, :12]
    vol[:, (yy - 5.5) ** 2 + (xx - 5.5) ** 2 > 30] = 0  # outside the reconstruction's circle
    tifffile.imwrite(tmp_path / "scan.tif", vol, photometric="minisblack")
    with h5py.File(tmp_path / "be.h5", "w") as fh:
        fh.create_dataset("data", data=vol.astype(">u2"))
    zarr.open_array(str(tmp_path / "last1.zarr"), mode="w", shape=(3, 12, 12, 1),
                    dtype="uint16")[:] = vol[..., None]
    tiff = open_volume(tmp_path / "scan.tif")
    for spec in (f"{tmp_path / 'be.h5'}:/data", tmp_path / "last1.zarr"):
        v = open_volume(spec)
        assert (v.shape, v.dtype) == ((3, 12, 12), "uint16") == (tiff.shape, tiff.dtype)
        slices = v.read(0, 3)
        assert slices.dtype == np.dtype(np.uint16) and np.array_equal(slices, vol)
        fov = field_of_view(v.read(z, z + 1)[0] for z in range(3))
        assert fov is not None and fov[0] == 0 and fov[1].sum() == (vol[0] == 0).sum()


def test_an_hdf5_path_that_is_a_dangling_link_says_so_and_names_its_target(tmp_path):
    """A soft link to a path not in the file, and an external link to a file not there,
    are named as the links they are, with their targets (it said "no dataset", of a name
    the file lists)."""
    with h5py.File(tmp_path / "scan.h5", "w") as fh:
        fh.create_dataset("entry/data", data=np.zeros((2, 4, 4), np.uint8))
        fh["entry/moved"] = h5py.SoftLink("/entry/raw")
        fh["entry/ext"] = h5py.ExternalLink("detector.h5", "/data")
    with pytest.raises(DataError, match=r"scan.h5:/entry/moved: /entry/moved in .*scan.h5 is a "
                                        r"soft link to /entry/raw, which is not in the file "
                                        r"\(a dangling link\); it has /entry/data$"):
        open_volume(f"{tmp_path / 'scan.h5'}:/entry/moved")
    with pytest.raises(DataError, match=r"/entry/ext in .*scan.h5 is an external link to /data "
                                        r"in detector.h5, which is not there \(no .*detector.h5: "
                                        r"copy it beside scan.h5\)"):
        open_volume(f"{tmp_path / 'scan.h5'}:/entry/ext")
    with h5py.File(tmp_path / "detector.h5", "w") as fh:
        fh.create_dataset("frames", data=np.zeros((2, 4, 4), np.uint8))
    with pytest.raises(DataError, match=r"external link to /data in detector.h5, which holds "
                                        r"no /data; it has /entry/data"):
        open_volume(f"{tmp_path / 'scan.h5'}:/entry/ext")


def test_a_float_volume_in_0_1_under_a_run_without_a_window_is_kept_as_its_slices_are(setup):
    """Floats already in [0, 1] are kept as they are by the image reader where the run has
    no window; a volume of them was stretched to the percentiles of its slices, so its
    slices saved as files and segmented alone gave other labels."""
    from paser.data.images import read_image
    from paser.volumes import volume_window

    m, vol, tmp = setup
    assert m.intensity.window is None
    recon = (vol.astype(np.float32) / 255.0) * 0.6 + 0.2  # [0.2, 0.8]
    tifffile.imwrite(tmp / "recon.tif", recon, photometric="minisblack")
    tifffile.imwrite(tmp / "slice3.tif", recon[3])
    [v] = split_inputs([tmp / "recon.tif"])[1]
    assert volume_window(v) == [0.0, 1.0]
    [res] = segment_volumes(m, [v], tmp / "out", chunk=8)
    assert res.record["intensity"]["window"] == [0.0, 1.0]
    x = read_image(tmp / "slice3.tif", 1, m.intensity)
    assert np.array_equal(x[0], recon[3])  # kept as it is, no note needed
    alone = m.label_codec.encode(m.segment(torch.from_numpy(x)[None]).mask[0].numpy())
    assert np.array_equal(tifffile.imread(tmp / "out" / "recon_labels.tif")[3], alone)
    recon[5, 0, 0] = 1.5  # a value past 1 among the slices read: the percentiles, as before
    tifffile.imwrite(tmp / "past.tif", recon, photometric="minisblack")
    window = volume_window(open_volume(tmp / "past.tif"))
    assert window != [0.0, 1.0] and 0.2 <= window[0] < window[1] <= 0.8


def test_palette_label_slices_are_their_indices_as_the_same_masks_in_a_folder(tmp_path):
    """A label volume of palette slices (a folder of palette PNG masks, a palette TIFF
    stack) was read as its colours and refused as "labels of shape (8, 8, 3)", where a
    folder dataset reads the same masks as their indices, the classes."""
    from paser.data.images import read_mask
    from paser.data.slices import VolumeSlices

    rng = np.random.default_rng(0)
    labels = rng.integers(0, 3, (4, 8, 8), dtype=np.uint8)
    colours = [0, 0, 0, 255, 0, 0, 0, 255, 0] + [0] * 759
    (tmp_path / "classes.yaml").write_text("classes: {0: pore, 1: carbon, 2: nickel}\n")
    tifffile.imwrite(tmp_path / "scan.tif", rng.integers(0, 256, (4, 8, 8), dtype=np.uint8),
                     photometric="minisblack")
    (tmp_path / "masks").mkdir()
    for z in range(4):
        mask = Image.fromarray(labels[z], mode="P")
        mask.putpalette(colours)
        mask.save(tmp_path / "masks" / f"m{z}.png")
    tifffile.imwrite(tmp_path / "masks.tif", labels, photometric="palette",
                     colormap=np.array(colours, np.uint16).reshape(256, 3).T * 257)
    for spec in ("masks", "masks.tif"):
        split = VolumeSlices(tmp_path, "scan.tif", spec, {"train": [0, 4]}, "train")
        for z in range(4):
            assert np.array_equal(split.mask(z).numpy(), labels[z]), (spec, z)
    assert np.array_equal(read_mask(tmp_path / "masks" / "m2.png"), labels[2])
    assert open_volume(tmp_path / "masks").shape == (4, 8, 8, 3)  # an image volume: colours


def test_label_slices_saved_as_rgb_are_read_as_the_same_masks_in_a_folder(tmp_path):
    """Gray masks saved as RGB (equal channels), which a folder dataset reads as their
    values, were refused in a label volume as "labels of shape (8, 8, 3)"; a slice of
    other colours is named as the colour mask it is, with its file."""
    from paser.data.slices import VolumeSlices

    rng = np.random.default_rng(0)
    labels = rng.integers(0, 3, (4, 8, 8), dtype=np.uint8)
    (tmp_path / "classes.yaml").write_text("classes: {0: pore, 1: carbon, 2: nickel}\n")
    tifffile.imwrite(tmp_path / "scan.tif", rng.integers(0, 256, (4, 8, 8), dtype=np.uint8),
                     photometric="minisblack")
    (tmp_path / "masks").mkdir()
    for z in range(4):
        Image.fromarray(np.dstack([labels[z]] * 3)).save(tmp_path / "masks" / f"m{z}.png")
    tifffile.imwrite(tmp_path / "masks.tif", np.stack([labels] * 3, -1), photometric="rgb")
    for spec in ("masks", "masks.tif"):
        split = VolumeSlices(tmp_path, "scan.tif", spec, {"train": [0, 4]}, "train")
        assert all(np.array_equal(split.mask(z).numpy(), labels[z]) for z in range(4)), spec
    Image.fromarray(np.dstack([labels[2], labels[2] * 0, labels[2]])).save(
        tmp_path / "masks" / "m2.png")
    with pytest.raises(DataError, match=r"masks/m2.png: a colour mask \(3 colours"):
        VolumeSlices(tmp_path, "scan.tif", "masks", {"train": [0, 4]}, "train")


def test_a_stack_after_a_thumbnail_is_the_volume(tmp_path):
    """A thumbnail stored first (NewSubfileType 1) is not the volume, nor another image in
    the file that refuses it."""
    stack = np.random.default_rng(0).integers(0, 256, (3, 16, 24), dtype=np.uint8)
    with tifffile.TiffWriter(tmp_path / "s.tif") as tif:
        tif.write(stack[0, ::4, ::4].copy(), subfiletype=1)
        tif.write(stack, photometric="minisblack")
    vol = open_volume(tmp_path / "s.tif")
    assert vol.shape == (3, 16, 24) and np.array_equal(vol.read(0, 3), stack)
