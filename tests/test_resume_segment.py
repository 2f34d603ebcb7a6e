"""paser segment loses nothing on interruption: the same command continues where it
stopped, with the same result as an uninterrupted call, and refuses a folder made by
another run or other settings."""

from __future__ import annotations

import csv
import json
import shutil
import time
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from tests.helpers import Interrupted, bands_run

from paser.errors import ConfigError, DataError
from paser.segment import MANIFEST, segment_files


@pytest.fixture()
def setup(tmp_path):
    rng = np.random.default_rng(0)
    files = []
    for i in range(5):
        files.append(tmp_path / "in" / f"s{i}.png")
        files[-1].parent.mkdir(exist_ok=True)
        Image.fromarray(rng.integers(0, 256, (16, 16), dtype=np.uint8)).save(files[-1])
    return bands_run(tmp_path), files, tmp_path


def _outputs(out):
    return {p.name: p.read_bytes() for p in sorted(out.iterdir()) if p.suffix == ".png"}


def test_an_interrupted_call_continues_and_equals_an_uninterrupted_one(setup, monkeypatch):
    m, files, tmp = setup
    whole = segment_files(m, files, tmp / "whole")
    seen: list[int] = []
    stop = [3]
    segment = type(m).segment

    def stop_at_third(self, x, *a, **k):
        seen.append(1)
        if len(seen) == stop[0]:
            raise Interrupted  # the user's Ctrl-C, or a killed process, mid-way
        return segment(self, x, *a, **k)

    monkeypatch.setattr(type(m), "segment", stop_at_third)
    with pytest.raises(Interrupted):
        segment_files(m, files, tmp / "out")
    rows = list(csv.reader(open(tmp / "out" / "summary.csv")))
    assert [r[0] for r in rows[1:]] == [str(f) for f in files[:2]]  # kept as it went
    seen.clear()
    stop[0] = 0
    again = segment_files(m, files, tmp / "out")
    assert len(seen) == 3  # s2, s3, s4 only
    assert [r.resumed for r in again] == [True, True, False, False, False]
    assert _outputs(tmp / "out") == _outputs(tmp / "whole")
    rows = list(csv.reader(open(tmp / "out" / "summary.csv")))
    assert [r[0] for r in rows[1:]] == [str(f) for f in files]
    assert [(r.gflops, r.fractions) for r in again] == [(r.gflops, r.fractions) for r in whole]
    seen.clear()
    segment_files(m, files, tmp / "out")
    assert seen == []  # all done: nothing runs


@pytest.mark.slow  # writer processes
def test_stopped_with_writer_processes_every_image_on_disk_is_in_the_summary(setup,
                                                                           monkeypatch):
    m, files, tmp = setup
    seen: list[int] = []
    segment = type(m).segment

    def stop_at_fourth(self, x, *a, **k):
        seen.append(1)
        if len(seen) == 4:  # once the writer has written the first three, before this
            deadline = time.monotonic() + 300  # process has seen the third one done
            while len(list((tmp / "out").glob("s*.json"))) < 3:
                assert time.monotonic() < deadline, "the writer did not write three images"
                time.sleep(0.02)
            raise Interrupted
        return segment(self, x, *a, **k)

    monkeypatch.setattr(type(m), "segment", stop_at_fourth)
    with pytest.raises(Interrupted):
        segment_files(m, files, tmp / "out", workers=1)
    rows = list(csv.DictReader(open(tmp / "out" / "summary.csv")))
    on_disk = sorted(p.stem for p in (tmp / "out").glob("s*.json"))
    assert on_disk == ["s0", "s1", "s2"]  # the writers finish what they were given
    assert sorted(r["input"] for r in rows) == [str(f) for f in files[:3]]
    assert {r["status"] for r in rows} == {"ok"}


@pytest.mark.slow  # writer processes
def test_stopped_while_waiting_for_a_write_that_image_is_in_the_summary(setup, monkeypatch):
    import paser.segment as S

    m, files, tmp = setup
    finish = S._finish

    def stop_once_written(res, future, *a):  # Ctrl-C as segmenting waits for the writer
        if future is not None:
            future.result()
            raise Interrupted
        return finish(res, future, *a)

    monkeypatch.setattr(S, "_finish", stop_once_written)
    with pytest.raises(Interrupted):
        segment_files(m, files, tmp / "out", workers=1)
    rows = list(csv.DictReader(open(tmp / "out" / "summary.csv")))
    on_disk = {p.stem for p in (tmp / "out").glob("s*.json")}
    assert "s0" in on_disk and {Path(r["input"]).stem for r in rows} == on_disk
    assert len(rows) == len(on_disk) and {r["status"] for r in rows} == {"ok"}


@pytest.mark.slow  # writer processes
def test_a_killed_writer_process_is_an_error_that_says_what_to_do(setup, monkeypatch):
    """A writer process killed (the OOM killer) breaks the pool: the call ended in a bare
    BrokenProcessPool traceback ('A child process terminated abruptly'), where a reader's
    death says what to do. What was written is kept, and the same call goes on."""
    import os
    import signal

    import paser.segment as S

    m, files, tmp = setup
    pools, writer = [], S._writer
    monkeypatch.setattr(S, "_writer", lambda workers: pools.append(writer(workers)) or pools[-1])

    def kill_the_writer(res):
        if res.stem == "s0":  # written and reported: the others are still to write
            for process in list(pools[0]._processes.values()):
                os.kill(process.pid, signal.SIGKILL)

    with pytest.raises(DataError, match=r"the writer processes stopped \(.*\): one ran out of "
                                        r"memory or was killed; what finished is kept"):
        segment_files(m, files, tmp / "out", workers=1, on_done=kill_the_writer)
    assert (tmp / "out" / "s0.json").is_file()
    again = segment_files(m, files, tmp / "out")
    assert again[0].resumed and all(r.ok for r in again)


def test_another_runs_or_other_settings_folder_is_refused_unless_overwritten(setup):
    m, files, tmp = setup
    segment_files(m, files[:2], tmp / "out")
    with pytest.raises(DataError, match=r"other settings \(--model: routed there, f1 \(unet\) now"):
        segment_files(m, files[:2], tmp / "out", only=1)
    alone = segment_files(m, files[:2], tmp / "out", only=1, overwrite=True)
    assert not any(r.resumed for r in alone)
    assert '"only": "f1 (unet)"' in (tmp / "out" / MANIFEST).read_text()
    manifest = json.loads((tmp / "out" / MANIFEST).read_text())
    old = {k: v for k, v in manifest.items() if k != "models"}  # as a folder made before
    (tmp / "out" / MANIFEST).write_text(json.dumps(old))
    assert all(r.resumed for r in segment_files(m, files[:2], tmp / "out", only=1))
    assert json.loads((tmp / "out" / MANIFEST).read_text()) == manifest  # known by them now
    m.run_dir = tmp / "elsewhere"  # the run copied or moved: the same weights, resumed
    assert all(r.resumed for r in segment_files(m, files[:2], tmp / "out", only=1))
    m.router.pool[0].register_buffer("w", torch.ones(1))  # other weights: another run
    with pytest.raises(DataError) as caught:  # named by the run folder that made it
        segment_files(m, files[:2], tmp / "out", only=1)
    assert str(caught.value) == (
        f"{tmp / 'out'} holds the outputs of another run (--run-dir {tmp / 'run'} there, "
        f"{tmp / 'elsewhere'} now; they differ in weights); give another --out, or "
        "--overwrite to start over")
    m.run_dir = tmp / "run"  # the folder that made it, trained again: not 'another run'
    with pytest.raises(DataError) as caught:
        segment_files(m, files[:2], tmp / "out", only=1)
    assert str(caught.value) == (
        f"{tmp / 'out'} holds the outputs of this run before it was trained again (--run-dir "
        f"{tmp / 'run'}; it differs in weights); give another --out, or --overwrite to start "
        "over")
    # outputs with no manifest (an older paser's folder): not taken over, not resumed
    (tmp / "out" / MANIFEST).unlink()
    with pytest.raises(DataError, match=r"holds paser's outputs \(.*\.json and more\) but "
                                        r"no \.paser-segment\.json .* --overwrite to start "
                                        "over"):
        segment_files(m, files[:2], tmp / "out", only=1)
    # a file of the same name from another tool (an annotation beside its image): never
    # offered to --overwrite
    (tmp / "ann").mkdir()
    (tmp / "ann" / "s0.json").write_text('{"shapes": []}')
    for overwrite in (False, True):
        with pytest.raises(DataError, match=r"s0.json is not paser's \(another tool's file of "
                                            r"a name paser writes its outputs under\); give "
                                            r"another --out$"):
            segment_files(m, files[:1], tmp / "ann", overwrite=overwrite)
    assert (tmp / "ann" / "s0.json").read_text() == '{"shapes": []}'  # never removed
    (tmp / "ann" / "s0.json").unlink()
    (tmp / "ann" / "summary.csv").write_text("name,area\n")  # a summary of another tool
    with pytest.raises(DataError, match=r"summary.csv is not paser's"):
        segment_files(m, files[:1], tmp / "ann")
    # and in a folder of paser's own: not written over on resume
    (tmp / "out" / "s2.json").write_text("[]")
    with pytest.raises(DataError, match=r"s2.json is not paser's"):
        segment_files(m, files[:3], tmp / "out")
    assert not any(r.resumed for r in segment_files(m, files[:2], tmp / "out", only=1,
                                                    overwrite=True))


def test_a_folder_begun_under_another_calibration_says_the_run_was_calibrated_again(setup):
    """The run calibrated again (``paser calibrate``) between two calls: the refusal says so
    and how to go on, not the biases alone ('calibration: [0.0, 0.005] there, [0.0, 0.003]
    now')."""
    m, files, tmp = setup
    segment_files(m, files[:2], tmp / "out")
    manifest = tmp / "out" / MANIFEST
    made = json.loads(manifest.read_text())
    manifest.write_text(json.dumps({**made, "calibration_bias": [0.0, 0.005]}))
    with pytest.raises(DataError) as caught:
        segment_files(m, files, tmp / "out")
    assert str(caught.value) == (
        f"{tmp / 'out'} holds the outputs of other settings (calibration: [0.0, 0.005] there, "
        "none now); give another --out, or --overwrite to start over (the run was "
        "calibrated again since this folder was begun, or this call's --budget-gflops "
        "differs from its: calibrated back to the folder's target, it goes on)")


def test_a_folder_made_under_a_cap_is_not_resumed_without_it_nor_one_made_without(setup):
    m, files, tmp = setup
    m.cap(1e6)
    segment_files(m, files[:2], tmp / "capped")
    # one model alone has no cap: the refusal names --model, not the cap it drops
    with pytest.raises(DataError, match=r"other settings \(--model: routed there, f1 \(unet\) "
                                        r"now\); give another --out, or --overwrite to start "
                                        r"over$"):
        segment_files(m, files, tmp / "capped", only=1)
    m.cap(None)  # the rest uncapped would mix two routings in one folder
    with pytest.raises(DataError, match=r"other settings \(--max-gflops-per-mp: 1000000.0 there, "
                                        r"none now\); .* \(--max-gflops-per-mp 1e\+06 goes on "
                                        r"with this folder's cap\)$"):
        segment_files(m, files, tmp / "capped")
    segment_files(m, files[:2], tmp / "free")
    m.cap(1e6)
    with pytest.raises(DataError, match=r"--max-gflops-per-mp: none there, 1000000.0 now\); "
                                        r"give another --out, or --overwrite to start over$"):
        segment_files(m, files, tmp / "free")
    assert [r.resumed for r in segment_files(m, files[:3], tmp / "capped")] == [
        True, True, False]


def test_an_image_with_degraded_patches_is_segmented_again(tmp_path):
    """Its degraded patches kept f0's answer while the remote tier was down: a rerun tries
    them again; an image whose patches all came back is done."""
    import json

    from paser.segment import finished

    image = tmp_path / "a.png"
    image.write_bytes(b"")  # an input older than its record
    record = {"input": str(image), "height": 8, "width": 8, "gflops": 1.0, "ms": 2.0,
              "patches_per_model": [1, 2, 1], "notes": [],
              "remote": {"degraded_patches": 2, "bytes_sent": 10, "bytes_whole_image": 20}}
    (tmp_path / "a.json").write_text(json.dumps(record))
    assert finished(tmp_path, image) is None
    record["remote"]["degraded_patches"] = 0
    (tmp_path / "a.json").write_text(json.dumps(record))
    done = finished(tmp_path, image)
    assert done is not None and done.resumed and done.bytes_sent == 10


def test_after_an_overwrite_no_record_of_before_counts_as_done(setup, monkeypatch):
    """--overwrite with other inputs, then the first inputs again: their records are of the
    folder before the overwrite (another run's labels), so they are segmented again; and a
    relative spelling of an input resumes it."""
    m, files, tmp = setup
    segment_files(m, files[:2], tmp / "out")
    segment_files(m, files[2:4], tmp / "out", only=1, overwrite=True)
    again = segment_files(m, files[:2], tmp / "out", only=1)
    assert [r.resumed for r in again] == [False, False]
    monkeypatch.chdir(tmp)
    relative = segment_files(m, [files[0].relative_to(tmp)], tmp / "out", only=1)
    assert [r.resumed for r in relative] == [True]
    monkeypatch.chdir(files[0].parent)  # and from another folder, spelt from there
    relative = segment_files(m, [files[0].relative_to(files[0].parent)], tmp / "out",
                             only=1)
    assert [r.resumed for r in relative] == [True]


def test_an_image_of_another_folder_with_the_same_name_is_refused_a_changed_one_redone(setup):
    """A later call with in2/s0.png into the folder holding in/s0.png's outputs: refused
    (one input's outputs would silently replace the other's), the rest go on; an input
    written again in place is segmented again, not skipped."""
    m, files, tmp = setup
    first = segment_files(m, files[:2], tmp / "out")
    (tmp / "in2").mkdir()
    shutil.copy(files[1], tmp / "in2" / "s0.png")  # another picture, the same name
    later = segment_files(m, [tmp / "in2" / "s0.png", files[2]], tmp / "out")
    assert [r.ok for r in later] == [False, True]
    assert later[0].error.startswith(f"{tmp / 'in2' / 's0.png'}: {tmp / 'out' / 's0.json'} "
                                     f"holds the outputs of {files[0]}")
    assert json.loads((tmp / "out" / "s0.json").read_text())["input"] == str(files[0])
    shutil.copy(files[1], files[0])  # s0.png written again: its labels are s1's now
    again = segment_files(m, files[:2], tmp / "out")
    assert [r.resumed for r in again] == [False, True]
    assert (tmp / "out" / "s0_labels.png").read_bytes() == (tmp / "out" / "s1_labels.png"
                                                            ).read_bytes()
    assert first[0].ok
    shutil.move(tmp / "in", tmp / "moved")  # the inputs' folder moved: the same bytes, done
    moved = segment_files(m, [tmp / "moved" / f.name for f in files[:2]], tmp / "out")
    assert [(r.ok, r.resumed) for r in moved] == [(True, True), (True, True)]


def test_an_input_written_again_while_it_is_read_is_recorded_as_it_was_and_redone(
        setup, monkeypatch):
    """The record's digest is of the bytes read, taken before the pixels: a file rewritten
    between its reading and its record is not skipped later with labels of the old."""
    import paser.segment as S

    m, files, tmp = setup
    read, new = S.read_input, files[1].read_bytes()

    def rewritten(path, *args):  # the scanner writes s0.png again as it is read
        out = read(path, *args)
        if path == files[0] and path.read_bytes() != new:
            path.write_bytes(new)
        return out

    monkeypatch.setattr(S, "read_input", rewritten)
    [first] = segment_files(m, files[:1], tmp / "out", workers=0)
    monkeypatch.setattr(S, "read_input", read)
    assert first.ok and json.loads((tmp / "out" / "s0.json").read_text())[
        "input_sha256"] != S.file_sha256(files[0])
    [again] = segment_files(m, files[:1], tmp / "out", workers=0)
    assert again.ok and not again.resumed  # done again, now with what the file holds
    segment_files(m, [files[1]], tmp / "s1")
    assert (tmp / "out" / "s0_labels.png").read_bytes() == (tmp / "s1" / "s1_labels.png"
                                                            ).read_bytes()


def test_an_older_record_without_a_digest_is_redone_where_its_input_changed_since(setup):
    import os

    from paser.segment import finished

    m, files, tmp = setup
    segment_files(m, files[:1], tmp / "out")
    record = tmp / "out" / "s0.json"
    rec = json.loads(record.read_text())
    record.write_text(json.dumps({k: v for k, v in rec.items()
                                  if k not in ("input_sha256", "input_stat")}))
    written = record.stat().st_mtime
    os.utime(files[0], (written - 60, written - 60))  # older than its record: done
    assert finished(tmp / "out", files[0]).resumed
    os.utime(files[0], (written + 60, written + 60))  # written again since: redone
    assert finished(tmp / "out", files[0]) is None


def test_a_full_disk_stops_the_call_at_the_first_image_and_names_the_folder(setup, monkeypatch):
    import errno

    import paser.segment as seg

    m, files, tmp = setup
    write, atomic = seg._write, seg.atomic_write_text
    calls = []

    def full(*args):
        raise OSError(errno.ENOSPC, "No space left on device")

    def full_after_two(out_dir, stem, *args):
        calls.append(stem)
        if len(calls) > 2:  # the disk full once its labels were written: its record fails
            seg.atomic_write_text = full
        try:
            write(out_dir, stem, *args)
        finally:
            seg.atomic_write_text = atomic

    monkeypatch.setattr(seg, "_write", full_after_two)
    with pytest.raises(OSError, match=r"No space left on device \(writing the outputs of "
                       r".*s2.png; what finished is kept") as err:
        segment_files(m, files, tmp / "out")
    assert err.value.filename == str(tmp / "out") and calls == ["s0", "s1", "s2"]  # no more
    assert sorted(p.name for p in (tmp / "out").glob("*_labels.png")) == [
        "s0_labels.png", "s1_labels.png"]  # none of the failed image's files is left
    monkeypatch.setattr(seg, "_write", write)  # room again: the rest, as one call would
    again = segment_files(m, files, tmp / "out")
    assert [r.resumed for r in again] == [True, True, False, False, False]
    segment_files(m, files, tmp / "whole")
    assert _outputs(tmp / "out") == _outputs(tmp / "whole")


def test_an_output_cut_short_or_gone_since_is_done_again(setup):
    """A record counts as done only with its outputs whole: a label PNG truncated (a copy
    cut short, a disk) or removed since is segmented again; the record keeps each output's
    size (a helper's audit: the truncated file stayed, reported as done)."""
    m, files, tmp = setup
    segment_files(m, files, tmp / "out")
    rec = json.loads((tmp / "out" / "s1.json").read_text())
    assert rec["output_bytes"] == {name: (tmp / "out" / name).stat().st_size
                                   for name in rec["outputs"].values()}
    whole = _outputs(tmp / "out")
    labels = tmp / "out" / "s1_labels.png"
    labels.write_bytes(labels.read_bytes()[:40])
    (tmp / "out" / "s3_routing.png").unlink()
    again = segment_files(m, files, tmp / "out")
    assert [r.resumed for r in again] == [True, False, True, False, True]
    assert _outputs(tmp / "out") == whole
    # an output longer than its record says is not the one written either
    (tmp / "out" / "s2_labels.png").write_bytes(whole["s2_labels.png"] + b"\0")
    assert [r.resumed for r in segment_files(m, files, tmp / "out")] == [True, True, False,
                                                                           True, True]


def test_a_record_or_summary_cut_short_is_done_again_not_called_another_tools(setup):
    """A record cut short, emptied or left as NULs (a copy, a full disk, a power cut) is
    paser's and its image is done again; a summary.csv cut off inside its header is
    rewritten (a helper's audit: each was refused as 'not paser's (another tool's file)',
    and the folder could only be started over)."""
    m, files, tmp = setup
    segment_files(m, files, tmp / "whole")
    shutil.copytree(tmp / "whole", tmp / "out")
    out = tmp / "out"
    (out / "s1.json").write_text((out / "s1.json").read_text()[:60])
    (out / "s2.json").write_text("")
    (out / "s3.json").write_bytes(b"\0" * 512)
    (out / "summary.csv").write_text("input,stat")
    again = segment_files(m, files, out)
    assert [r.resumed for r in again] == [True, False, False, False, True]
    assert _outputs(out) == _outputs(tmp / "whole")
    rows = list(csv.DictReader(open(out / "summary.csv")))
    assert [(Path(r["input"]).name, r["status"]) for r in rows] == [
        (f"s{i}.png", "ok") for i in range(5)]
    # another tool's JSON, whole or cut short, is still not taken
    for text in ("[]", '{"shapes": [{"label": "po'):
        (out / "s4.json").write_text(text)
        with pytest.raises(DataError, match=r"s4.json is not paser's"):
            segment_files(m, files, out)


def test_the_half_written_files_of_a_killed_call_are_removed_by_the_next(setup):
    """A call killed while it wrote an output leaves its temporary ``.<name>.tmp`` (a label
    TIFF's as large as the labels); the next call into the folder removes those of paser's
    outputs, and leaves any other file alone (they were kept for good)."""
    m, files, tmp = setup
    out = tmp / "out"
    segment_files(m, files[:2], out)
    ours = [".s1_labels.png.tmp", ".s1.json.tmp", ".summary.csv.tmp", ".volumes.csv.tmp",
            "..paser-segment.json.tmp", ".scan_labels.tif.tmp", ".scan_labels.ome.tif.tmp",
            ".s0_overlay.png.tmp", ".s0_routing.png.tmp"]
    theirs = [".notes.tmp", "s1_labels.png.tmp", ".scan.tif.tmp"]
    for name in ours + theirs:
        (out / name).write_bytes(b"half")
    assert all(r.resumed for r in segment_files(m, files[:2], out))
    assert sorted(p.name for p in out.glob("*.tmp")) == sorted(theirs)


def test_a_folder_that_cannot_be_written_now_is_refused_before_segmenting(setup,
                                                                        monkeypatch):
    """A folder resumed after it was made read-only (a mount, permissions) stops the call
    before any image is segmented, naming the folder (it segmented the next image, or a
    volume's whole next chunk, before its first write failed)."""
    import errno
    import tempfile

    m, files, tmp = setup
    segment_files(m, files[:2], tmp / "out")

    def read_only(*args, **kwargs):
        raise OSError(errno.EROFS, "Read-only file system")

    monkeypatch.setattr(tempfile, "TemporaryFile", read_only)
    calls = [0]
    segment = type(m).segment

    def counted(self, *args, **kwargs):
        calls[0] += 1
        return segment(self, *args, **kwargs)

    monkeypatch.setattr(type(m), "segment", counted)
    with pytest.raises(OSError) as caught:
        segment_files(m, files, tmp / "out")
    assert caught.value.errno == errno.EROFS and caught.value.filename == str(tmp / "out")
    assert "run the same command again once the folder can be written" in str(caught.value)
    assert calls[0] == 0


def test_a_manifest_cut_short_says_what_is_lost_and_what_to_do(setup):
    """A .paser-segment.json that cannot be read is said to be so, not another run's
    (it was 'another run (--run-dir None there, ...; they differ in policy, ...)')."""
    m, files, tmp = setup
    segment_files(m, files[:2], tmp / "out")
    manifest = tmp / "out" / MANIFEST
    manifest.write_text(manifest.read_text()[:50])
    with pytest.raises(DataError) as caught:
        segment_files(m, files[:2], tmp / "out")
    assert str(caught.value).startswith(f"{manifest} cannot be read (Unterminated string")
    assert str(caught.value).endswith(
        f"): which run and settings made the outputs in {tmp / 'out'} is not known, so they "
        "cannot be resumed; give another --out, or --overwrite to start over")
    manifest.write_text("[]")
    with pytest.raises(DataError, match=r"cannot be read \(not a JSON object\)"):
        segment_files(m, files[:2], tmp / "out")
    assert not any(r.resumed for r in segment_files(m, files[:2], tmp / "out", overwrite=True))


def test_an_overwrite_keeps_no_row_of_before_and_a_row_is_written_once(setup):
    from paser.segment import SummaryLog, record_names

    m, files, tmp = setup
    segment_files(m, files[:2], tmp / "out")
    segment_files(m, files[2:3], tmp / "out", overwrite=True)
    rows = list(csv.DictReader(open(tmp / "out" / "summary.csv")))
    assert [Path(r["input"]).name for r in rows] == ["s2.png"]
    log = SummaryLog(tmp / "log.csv", record_names(m))
    first = segment_files(m, files[:1], tmp / "one")[0]
    log.append(first)
    log.append(first)  # stopped while its writer finished: appended by both paths
    assert len((tmp / "log.csv").read_text().splitlines()) == 2  # the header and one row


def test_an_output_folder_that_links_to_nothing_says_so(setup):
    m, files, tmp = setup
    (tmp / "out").symlink_to(tmp / "gone")
    with pytest.raises(ConfigError, match=r"out is a link to .*gone, which does not exist: "
                       r"create that folder, or give another --out"):
        segment_files(m, files, tmp / "out")


def test_segmenting_waits_for_the_writers_past_four_images_each_or_256_mb():
    from concurrent.futures import Future

    from paser.segment import PENDING_BYTES, _first_now

    written, busy = Future(), Future()
    written.set_result(None)
    small, big = 2**20, PENDING_BYTES // 2 + 1
    assert _first_now([("a", written, small), ("b", busy, small)], 1)  # written: reported
    assert _first_now([("a", None, 0), ("b", busy, small)], 1)  # failed: nothing to write
    assert not _first_now([("a", busy, small)] * 4, 1)
    assert _first_now([("a", busy, small)] * 5, 1)  # more than 4 per writer
    assert not _first_now([("a", busy, small)] * 8, 2)
    assert not _first_now([("a", busy, big)], 1)  # alone, past the bound: not its own write
    assert _first_now([("a", busy, big), ("b", busy, big)], 1)  # the two past the bound


def test_previews_asked_for_over_a_folder_made_without_them_are_made(setup):
    m, files, tmp = setup
    whole = segment_files(m, files, tmp / "whole")
    lean = segment_files(m, files, tmp / "out", previews=False)
    assert [p.name for p in (tmp / "out").glob("*_overlay.png")] == []
    # the same folder with previews: each image again (not skipped as done without them)
    again = segment_files(m, files, tmp / "out")
    assert [r.resumed for r in again] == [False] * 5
    assert _outputs(tmp / "out") == _outputs(tmp / "whole")
    assert len(_outputs(tmp / "out")) == 15  # labels, overlay and routing map of each
    assert [r.gflops for r in again] == [r.gflops for r in whole] == [r.gflops for r in lean]
    # done with previews: both a call with them and one without skip every image
    assert [r.resumed for r in segment_files(m, files, tmp / "out")] == [True] * 5
    assert [r.resumed for r in segment_files(m, files, tmp / "out", previews=False)] == [True] * 5
    assert _outputs(tmp / "out") == _outputs(tmp / "whole")


def test_a_folder_that_recorded_no_engine_is_not_said_to_be_torchs(tmp_path):
    """A folder made before the engine was recorded may be onnxruntime's: resumed with
    --engine onnxruntime, it is refused (which engine made it is not known), but not with
    'torch there', which its user knows to be wrong."""
    from paser.segment import claim_output

    settings = {"run": "/runs/demo", "models": "m", "policy": "p", "calibration_bias": None,
                "only": None, "intensity": {}, "mc_samples": 1}
    claim_output(tmp_path, settings, False, [])  # as a paser of before made it, either engine
    with pytest.raises(DataError, match=r"\(--engine: torch or not recorded \(a paser before "
                       r"2026-12-07\) there, onnxruntime now\)"):
        claim_output(tmp_path, {**settings, "engine": "onnxruntime"}, False, [])
    claim_output(tmp_path, {**settings, "engine": "onnxruntime"}, True, [])  # recorded now
    with pytest.raises(DataError, match=r"\(--engine: onnxruntime there, torch now\)"):
        claim_output(tmp_path, settings, False, [])


def test_ctrl_c_before_overwrite_started_the_folder_over_says_to_run_it_again(mnist_run,
                                                                               tmp_path,
                                                                               monkeypatch):
    """Stopped before --overwrite made the folder a new one (loading the run), "run the same
    command again without --overwrite" would take its old outputs as done, and start nothing
    over; once it has, that is the way on."""
    from tests.helpers import paser_here

    import paser.segment
    from paser import PaSeR

    Image.fromarray(np.zeros((28, 28), np.uint8)).save(tmp_path / "a.png")
    args = ("segment", tmp_path / "a.png", "--run-dir", mnist_run, "--out", tmp_path / "out")
    assert paser_here(*args).returncode == 0
    claim = json.loads((tmp_path / "out" / MANIFEST).read_text())["claim"]
    load = PaSeR.load

    def stopped(*a, **k):
        raise KeyboardInterrupt

    monkeypatch.setattr(PaSeR, "load", stopped)
    res = paser_here(*args, "--overwrite")
    assert res.returncode == 130
    assert res.stderr.strip().splitlines()[-1] == (
        "interrupted before --overwrite started the folder over: run the same command again")
    assert json.loads((tmp_path / "out" / MANIFEST).read_text())["claim"] == claim
    monkeypatch.setattr(PaSeR, "load", load)
    monkeypatch.setattr(paser.segment, "segment_files", stopped)  # started over, then
    res = paser_here(*args, "--overwrite")
    assert res.returncode == 130 and res.stderr.strip().splitlines()[-1] == (
        "interrupted; what finished is kept: run the same command again without --overwrite "
        "to continue where it stopped")
    assert json.loads((tmp_path / "out" / MANIFEST).read_text())["claim"] != claim
