"""``paser segment --scheduler``: volumes and folders on a Dask cluster started outside
paser (a scheduler and two worker processes on loopback), the same bytes as a local run,
records that name the workers, a worker killed mid-run, resume, and an input only the
client sees."""

from __future__ import annotations

import csv
import json
import os
import signal
import subprocess
import sys
import time
import uuid
from contextlib import contextmanager
from pathlib import Path

import numpy as np
import pytest
import tifffile
import zarr
from PIL import Image
from tests.helpers import reserved_port

from paser.cluster import RunSpec, connect, segment_on_cluster
from paser.errors import ConfigError
from paser.segment import find_images, segment_files
from paser.volumes import segment_volumes, split_inputs

distributed = pytest.importorskip("distributed")
pytestmark = pytest.mark.slow  # processes of their own

DEPTH, SIDE = 48, 28
RNG = np.random.default_rng(7)


@pytest.fixture(autouse=True)
def _bounded():
    """A test that hangs on the cluster ends the process (traceback printed) after 10
    minutes instead of holding CI. The longest, test_cli_segment_on_local_n, takes 22 s on
    2 idle cores and 56 s with both busy: 4 minutes was too close on a runner 3x slower."""
    import faulthandler

    faulthandler.dump_traceback_later(600, exit=True)
    yield
    faulthandler.cancel_dump_traceback_later()


@pytest.fixture(scope="module")
def scheduler(tmp_path_factory):
    """``dask scheduler`` and two ``dask worker`` processes of one thread (with nannies, which
    replace a worker that dies), all on loopback; the scheduler's address."""
    tmp = tmp_path_factory.mktemp("dask")
    file = tmp / "scheduler.json"
    bin_dir = Path(sys.executable).parent
    procs = [subprocess.Popen([bin_dir / "dask", "scheduler", "--host", "127.0.0.1",
                               "--port", "0", "--no-dashboard", "--scheduler-file", str(file)],
                              stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)]
    try:
        # seconds: a bound on a hang, at least the room the connection and the workers
        # get below (the client's 60 + wait_for_workers' 90)
        deadline = time.monotonic() + 180
        while not file.is_file():  # written once it listens (its own port: no race)
            assert procs[0].poll() is None, "dask scheduler exited"
            assert time.monotonic() < deadline, "dask scheduler did not start"
            time.sleep(0.2)
        for name in ("w0", "w1"):
            procs.append(subprocess.Popen(
                [bin_dir / "dask", "worker", "--scheduler-file", str(file), "--nthreads", "1",
                 "--nworkers", "1", "--name", name, "--host", "127.0.0.1", "--no-dashboard",
                 "--local-directory", str(tmp / name)],
                stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL))
        address = json.loads(file.read_text())["address"]
        with distributed.Client(address, timeout=60) as client:
            client.wait_for_workers(2, timeout=90)
        yield address
    finally:
        for p in procs[::-1]:
            p.send_signal(signal.SIGINT)
        for p in procs[::-1]:
            try:
                p.wait(timeout=20)
            except subprocess.TimeoutExpired:
                p.kill()


@pytest.fixture(scope="module")
def model(mnist_run):
    from paser import PaSeR

    return PaSeR.load(mnist_run, device="cpu")


def _volume(tmp: Path) -> Path:
    vol = RNG.integers(0, 256, (DEPTH, SIDE, SIDE), dtype=np.uint8)
    path = tmp / "scan.zarr"
    zarr.open_array(str(path), mode="w", shape=vol.shape, chunks=(8, SIDE, SIDE),
                    dtype="uint8")[:] = vol
    return path


def _records(out: Path, stem: str) -> dict:
    return json.loads((out / f"{stem}.json").read_text())


@contextmanager
def _both_take_chunks_of(client, stem: str):
    """Each worker's first chunk of volume ``stem`` waits (at most 2 minutes) until the
    other worker has begun one too: both take chunks of it however the cores are shared (on
    a busy runner a worker starved of CPU left the other all of them, and the record one
    name)."""
    key = uuid.uuid4().hex

    def hold(dask_worker):  # on each worker; nested, so sent by value, not imported there
        from distributed import Event

        import paser.cluster as C

        segment_chunk, first = C.segment_chunk, [True]
        other = {"w0": "w1", "w1": "w0"}[dask_worker.name]

        def held(model, volume, *args, **kwargs):
            if volume.stem == stem and first:
                first.clear()
                Event(f"{key} {dask_worker.name}").set()
                Event(f"{key} {other}").wait(timeout=120)
            return segment_chunk(model, volume, *args, **kwargs)

        held.unheld = segment_chunk
        C.segment_chunk = held

    def let_go(dask_worker):
        import paser.cluster as C

        C.segment_chunk = getattr(C.segment_chunk, "unheld", C.segment_chunk)

    client.run(hold)
    try:
        yield
    finally:
        client.run(let_go)


def test_a_zarr_volume_and_images_on_two_workers_equal_the_local_run(scheduler, model,
                                                                     mnist_run, tmp_path):
    path = _volume(tmp_path)
    (tmp_path / "imgs").mkdir()
    for i in range(6):
        Image.fromarray(RNG.integers(0, 256, (SIDE, SIDE + i), dtype=np.uint8)).save(
            tmp_path / "imgs" / f"im{i}.png")
    tifffile.imwrite(tmp_path / "stack.tif", RNG.integers(0, 256, (12, SIDE, SIDE),
                                                          dtype=np.uint8))
    files, volumes = split_inputs([str(path), str(tmp_path / "stack.tif")])
    images = find_images([tmp_path / "imgs"])
    segment_volumes(model, volumes, tmp_path / "local", chunk=8)
    segment_files(model, images, tmp_path / "local")
    seen = []
    with connect(scheduler) as client, _both_take_chunks_of(client, "scan"):
        res = segment_on_cluster(client, RunSpec(str(mnist_run), "cpu"), model, images,
                                 volumes, tmp_path / "dask", chunk=8, batch=2,
                                 on_progress=lambda n, v, what: seen.append(n))
    assert [r.error for r in res.volumes] == ["", ""] and all(r.ok for r in res.images)
    local = zarr.open(str(tmp_path / "local" / "scan_labels.zarr"), mode="r")
    dask = zarr.open(str(tmp_path / "dask" / "scan_labels.zarr"), mode="r")
    assert dask.chunks == local.chunks == (8, SIDE, SIDE)
    assert np.array_equal(dask[:], local[:])
    for name in ["stack_labels.tif", *(f"im{i}_{k}.png" for i in range(6)
                                       for k in ("labels", "overlay", "routing"))]:
        assert (tmp_path / "dask" / name).read_bytes() == (tmp_path / "local" / name
                                                           ).read_bytes(), name
    rec = _records(tmp_path / "dask", "scan")
    assert [w.split()[0] for w in rec["workers"]] == ["w0", "w1"]  # both took chunks
    assert {s["worker"] for s in rec["slices"]} == set(rec["workers"])
    assert rec["class_fractions"] == _records(tmp_path / "local", "scan")["class_fractions"]
    assert sum(seen) == DEPTH + 12 + 6  # one bar: every slice and image once
    rows = (tmp_path / "dask" / "summary.csv").read_text().splitlines()
    assert rows[0].endswith(",worker,input path") and len(rows) == 7
    assert {r.worker.split()[0] for r in res.images} <= {"w0", "w1"}
    assert [w.split()[0] for w in res.workers] == ["w0", "w1"]
    # the same call again does nothing: everything is there
    with connect(scheduler) as client:
        again = segment_on_cluster(client, RunSpec(str(mnist_run), "cpu"), model, images,
                                   volumes, tmp_path / "dask", chunk=8)
    assert all(r.resumed for r in again.volumes) and all(r.resumed for r in again.images)


def test_a_worker_killed_mid_run_changes_nothing(scheduler, model, mnist_run, tmp_path):
    path = _volume(tmp_path)
    volumes = split_inputs([str(path)])[1]
    segment_volumes(model, volumes, tmp_path / "local", chunk=4)
    killed: list[int] = []
    with connect(scheduler) as client:
        pids = client.run(os.getpid)  # the worker processes, not their nannies

        def kill_once(n, voxels, what):
            if not killed:  # the first chunk is in: one worker dies with work in hand
                pid = pids[sorted(pids)[0]]
                os.kill(pid, signal.SIGKILL)
                killed.append(pid)

        res = segment_on_cluster(client, RunSpec(str(mnist_run), "cpu"), model, [], volumes,
                                 tmp_path / "dask", chunk=4, on_progress=kill_once)
        client.wait_for_workers(2, timeout=90)  # the nanny brings it back for the next test
    assert killed and res.volumes[0].error == ""
    assert np.array_equal(zarr.open(str(tmp_path / "dask" / "scan_labels.zarr"), mode="r")[:],
                          zarr.open(str(tmp_path / "local" / "scan_labels.zarr"), mode="r")[:])
    assert len(_records(tmp_path / "dask", "scan")["slices"]) == DEPTH  # each slice once


def test_a_volume_stopped_after_its_last_chunk_is_finished_by_the_next_call(
        scheduler, model, mnist_run, tmp_path):
    """Every chunk done, the volume not yet assembled (stopped in between): the next call
    sends nothing and finishes it, the same bytes as a run never stopped."""
    from paser.segment import claim_output, output_settings
    from paser.volumes import prepare_volume, segment_chunk

    path = _volume(tmp_path)
    [vol] = split_inputs([str(path)])[1]
    segment_volumes(model, [vol], tmp_path / "local", chunk=8)
    out = tmp_path / "dask"
    claim_output(out, output_settings(model, None), False, [])  # as the stopped call did
    labels, size = prepare_volume(vol, out, 8)
    for z0 in range(0, DEPTH, size):
        segment_chunk(model, vol, z0, min(z0 + size, DEPTH), out, labels)
    with connect(scheduler) as client:
        res = segment_on_cluster(client, RunSpec(str(mnist_run), "cpu"), model, [], [vol],
                                 out, chunk=8)
    assert res.volumes[0].error == "" and res.volumes[0].record is not None
    assert np.array_equal(zarr.open(str(out / "scan_labels.zarr"), mode="r")[:],
                          zarr.open(str(tmp_path / "local" / "scan_labels.zarr"), mode="r")[:])
    assert len(_records(out, "scan")["slices"]) == DEPTH


def test_an_input_the_workers_cannot_read_fails_alone_with_one_line(scheduler, model,
                                                                    mnist_run, tmp_path):
    path = _volume(tmp_path)
    volumes = split_inputs([str(path)])[1]
    volumes[0].path = str(tmp_path / "only-on-the-client.zarr")  # as a worker would see it
    Image.fromarray(RNG.integers(0, 256, (SIDE, SIDE), dtype=np.uint8)).save(tmp_path / "a.png")
    gone = tmp_path / "b.png"
    Image.fromarray(RNG.integers(0, 256, (SIDE, SIDE), dtype=np.uint8)).save(gone)
    images = find_images([tmp_path / "a.png", gone])
    gone.unlink()
    start = time.monotonic()
    with connect(scheduler) as client:
        res = segment_on_cluster(client, RunSpec(str(mnist_run), "cpu"), model, images,
                                 volumes, tmp_path / "out", chunk=16)
    # failed, not hung: 0.1 s with the workers warm; 7 s on 2 idle cores, 9 s on 2 busy ones
    # where a worker loads the run first (after the kill test): 60 was close on a runner 3x
    # slower
    assert time.monotonic() - start < 180
    err = res.volumes[0].error
    assert err.startswith(str(path)) and "worker" in err and "\n" not in err, err
    assert [r.ok for r in res.images] == [True, False]
    assert "cannot see this file" in res.images[1].error
    assert "failed" in (tmp_path / "out" / "volumes.csv").read_text()


def test_local_n_and_a_scheduler_that_does_not_answer():
    with pytest.raises(ConfigError, match="local:N with N >= 1"), connect("local:0"):
        pass
    with reserved_port() as port, \
            pytest.raises(ConfigError, match="no Dask scheduler answered"), \
            connect(f"tcp://127.0.0.1:{port}", timeout=2):  # refused, for 2 s of retries
        pass



def test_an_address_where_a_web_server_listens_is_refused_not_waited_on():
    """`--scheduler tcp://host:PORT` at a port that accepts and says nothing (a `paser serve`,
    Dask's dashboard) waited past the Client's timeout: 10 minutes and on, at the demo's
    server. A Dask scheduler speaks first; this one is refused once `timeout` has passed."""
    import socket

    with socket.socket() as listening:
        listening.bind(("127.0.0.1", 0))
        listening.listen()
        port = listening.getsockname()[1]
        start = time.monotonic()
        with pytest.raises(ConfigError, match=r"--scheduler tcp://127.0.0.1:\d+: something "
                                              r"listens there but it is not a Dask scheduler "
                                              r"\(it said nothing in 1 s: a web server"), \
                connect(f"tcp://127.0.0.1:{port}", timeout=1):
            pass
        assert time.monotonic() - start < 5

def test_local_n_logs_no_traceback_of_a_failure_paser_says_in_one_line():
    """A volume failing on its data (NaN voxels) printed Dask's ten lines of "Compute
    Failed", key, task and traceback, from a local:N worker onto the command's terminal,
    before paser's one line; a failure that is not paser's keeps them (its traceback is
    nowhere else)."""
    from paser.errors import DataError

    def nan_voxels():
        raise DataError("scan.tif slice 1: the image contains NaN or Inf values")

    def a_bug():
        raise RuntimeError("a bug")

    with connect("local:1") as client:
        for task in (nan_voxels, a_bug):
            with pytest.raises((DataError, RuntimeError)):
                client.submit(task, pure=False).result()
        logs = [text for logs in client.get_worker_logs().values() for _, text in logs]
    failed = [text for text in logs if "Compute Failed" in text]
    assert len(failed) == 1 and "RuntimeError('a bug')" in failed[0]


def test_one_worker_per_gpu():
    spec = RunSpec("run")
    assert [spec.worker_device(i, 4) for i in range(5)] == ["cuda:0", "cuda:1", "cuda:2",
                                                            "cuda:3", "cuda:0"]
    assert spec.worker_device(3, 1) == "auto"  # dask-cuda: each worker sees its own GPU
    assert RunSpec("run", "cpu").worker_device(3, 4) == "cpu"


def test_paser_keeps_freed_memory_on_dask_workers_unless_the_user_said_otherwise(monkeypatch):
    """Dask's nanny sets MALLOC_TRIM_THRESHOLD_ for every worker; that is not the user's
    opt-out (PASER_SYSTEM_MALLOC, or another value) and does not turn paser's off."""
    from paser.cluster import _dask_malloc

    monkeypatch.setenv("MALLOC_TRIM_THRESHOLD_", "65536")
    assert _dask_malloc() == ("MALLOC_TRIM_THRESHOLD_",)
    monkeypatch.setenv("MALLOC_TRIM_THRESHOLD_", "1000")
    assert _dask_malloc() == ()


def test_cli_segment_on_local_n(mnist_run, tmp_path):
    """`paser segment --scheduler local:2`: one line per volume, the workers named, the
    same labels as `paser segment` here at one thread per model call."""
    from tests.helpers import paser, paser_here

    path = _volume(tmp_path)
    res = paser("segment", str(path), "--run-dir", str(mnist_run), "--out",
                str(tmp_path / "dask"), "--scheduler", "local:2", "--chunk", "8")
    assert res.returncode == 0, res.stderr
    assert "Dask cluster local:2: 2 workers; 1 volume, 0 images" in res.stdout
    assert "segmented by 2 workers: 0 (tcp://127.0.0.1:" in res.stdout
    # the rest in this process: a fresh one would add a second or more of imports each
    res = paser_here("segment", str(path), "--run-dir", str(mnist_run), "--out",
                     str(tmp_path / "here"), "--threads", "1")
    assert res.returncode == 0, res.stderr
    assert np.array_equal(zarr.open(str(tmp_path / "dask" / "scan_labels.zarr"), mode="r")[:],
                          zarr.open(str(tmp_path / "here" / "scan_labels.zarr"), mode="r")[:])
    # the same command again: everything was done, and it says so instead of "0 workers"
    res = paser_here("segment", str(path), "--run-dir", str(mnist_run), "--out",
                     str(tmp_path / "dask"), "--scheduler", "local:1", "--chunk", "8")
    assert res.returncode == 0, res.stderr
    assert "no worker had anything to do: every image and slice was segmented before" in \
        res.stdout and "segmented by" not in res.stdout
    res = paser_here("segment", str(path), "--run-dir", str(mnist_run), "--out",
                     str(tmp_path / "x"), "--scheduler", "local:2", "--remote", "http://h:1")
    assert res.returncode == 2 and "use one of them" in res.stderr


def test_a_worker_counts_an_image_size_s_flops_under_its_lock():
    """Counting runs the models (their modes, hooks): on a worker of several threads it must
    not overlap another thread's segmenting, which holds the same lock."""
    from paser.cluster import _Locked

    class Lock:
        held = 0

        def __enter__(self):
            Lock.held += 1

        def __exit__(self, *exc):
            Lock.held -= 1

    class Model:
        def cost_table(self, h, w):
            return (Lock.held, h, w)

    assert _Locked(Model(), Lock(), 1).cost_table(64, 32) == (1, 64, 32)


def test_a_worker_says_cannot_see_only_of_a_missing_file(mnist_run, tmp_path, monkeypatch):
    """A file the worker sees but cannot decode is a bad image, not a path problem."""
    import paser.cluster

    monkeypatch.setattr(paser.cluster, "worker_name", lambda: "w9")
    (tmp_path / "bad.png").write_bytes(b"\x89PNG\r\n\x1a\n broken")
    [res] = paser.cluster._image_batch(RunSpec(str(mnist_run), "cpu"),
                                       [str(tmp_path / "bad.png")], str(tmp_path / "out"), None)
    assert not res.ok and "cannot read the image" in res.error
    assert "cannot see this file" not in res.error


def test_a_task_of_a_stopped_call_writes_nothing_into_a_folder_started_over(mnist_run, model,
                                                                           tmp_path,
                                                                           monkeypatch):
    """Dask cannot stop a task under way: the client stopped, its chunk or images went on and
    wrote, after `--overwrite --model ...` had made the folder anew, labels of the old
    settings that the new call then took as done (on an external cluster of one worker: all
    8 slices of a volume segmented by f2 alone in a folder that says routed). A task writes
    only while the folder is still the one it was sent for."""
    import paser.cluster
    from paser.segment import MANIFEST, claim_for, claim_of
    from paser.volumes import prepare_volume

    monkeypatch.setattr(paser.cluster, "worker_name", lambda: "w1")
    tifffile.imwrite(tmp_path / "a.tif", RNG.integers(0, 256, (4, SIDE, SIDE), dtype=np.uint8),
                     photometric="minisblack")
    Image.fromarray(RNG.integers(0, 256, (SIDE, SIDE), dtype=np.uint8)).save(tmp_path / "b.png")
    [vol] = split_inputs([str(tmp_path / "a.tif")])[1]
    out, spec = tmp_path / "out", RunSpec(str(mnist_run), "cpu")
    claim_for(out, model, None, False, [tmp_path / "b.png"], [vol])
    old = claim_of(out)
    prepare_volume(vol, out, 4, model.intensity)
    claim_for(out, model, 0, True, [tmp_path / "b.png"], [vol])  # --overwrite --model f0
    prepare_volume(vol, out, 4, model.intensity)
    assert claim_of(out) != old
    with pytest.raises(paser.cluster.StartedOver, match="started over by another call"):
        paser.cluster._volume_chunk(spec, vol, 0, 4, str(out), None, old)
    with pytest.raises(paser.cluster.StartedOver):
        paser.cluster._image_batch(spec, [str(tmp_path / "b.png")], str(out), None, True, old)
    assert sorted(p.name for p in (out / ".a.parts").iterdir()) == ["volume.json"]
    assert sorted(p.name for p in out.iterdir()) == [".a.parts", MANIFEST]
    # the call that holds the folder writes as before
    records = paser.cluster._volume_chunk(spec, vol, 0, 4, str(out), 0, claim_of(out))
    assert len(records) == 4 and (out / ".a.parts" / "00000000.json").is_file()
    [res] = paser.cluster._image_batch(spec, [str(tmp_path / "b.png")], str(out), 0, True,
                                       claim_of(out))
    assert res.ok and (out / "b.json").is_file()


def test_a_volume_keeps_the_first_failed_chunks_error(model, mnist_run, tmp_path, monkeypatch):
    """Every chunk fails (a fake client; tasks finish in order): the volume's error is the
    first one's, not the last one's."""
    import types

    import paser.cluster
    from paser.errors import DataError

    class Failed:  # a finished task that raised, as distributed's future
        status = "error"

        def __init__(self, fn, spec, vol, z0, z1, *rest, pure):
            self.err = DataError(f"{vol.source}: slices {z0}..{z1 - 1} failed")

        def result(self):
            raise self.err

        def cancel(self):
            pass

    monkeypatch.setattr(paser.cluster, "_distributed",
                        lambda: types.SimpleNamespace(as_completed=iter))
    path = _volume(tmp_path)
    res = segment_on_cluster(types.SimpleNamespace(submit=Failed), RunSpec(str(mnist_run)),
                             model, [], split_inputs([str(path)])[1], tmp_path / "out", chunk=16)
    assert res.volumes[0].error == f"{path}: slices 0..15 failed"


def _two_volumes(tmp_path, depth: int) -> list:
    """Volumes a.tif and b.tif of ``depth`` random slices."""
    for stem in ("a", "b"):
        tifffile.imwrite(tmp_path / f"{stem}.tif", RNG.integers(0, 256, (depth, SIDE, SIDE),
                                                                  dtype=np.uint8))
    return split_inputs([str(tmp_path / "a.tif"), str(tmp_path / "b.tif")])[1]


def _ctrl_c_in_call(monkeypatch, call: int) -> None:
    """Ctrl-C in PaSeR.segment's ``call``-th call (a slice, counted from 1)."""
    from paser import PaSeR

    calls, segment = [0], PaSeR.segment

    def counted(self, *args, **kwargs):
        calls[0] += 1
        if calls[0] == call:
            raise KeyboardInterrupt
        return segment(self, *args, **kwargs)

    monkeypatch.setattr(PaSeR, "segment", counted)


def test_ctrl_c_says_how_many_slices_of_each_volume_under_way_are_kept(model, mnist_run,
                                                                      tmp_path, monkeypatch):
    """Every volume's chunks go out at once: stopped in a's third chunk of 4 slices, a keeps
    8 and b, sent but not begun, none (tasks run here in order: InlineClient)."""
    from tests.helpers import InlineClient, inline_cluster

    from paser.volumes import VolumeInterrupted

    inline_cluster(monkeypatch)
    volumes = _two_volumes(tmp_path, 12)
    _ctrl_c_in_call(monkeypatch, 9)  # a's slice 8, the first of its third chunk
    with pytest.raises(KeyboardInterrupt) as stopped:  # (not one that stops pytest itself)
        segment_on_cluster(InlineClient(), RunSpec(str(mnist_run), "cpu"), model, [], volumes,
                           tmp_path / "out", chunk=4)
    assert isinstance(stopped.value, VolumeInterrupted)
    assert str(stopped.value) == "8 of 12 slices of a, 0 of 12 slices of b"


def test_ctrl_c_in_the_second_volume_leaves_the_first_in_volumes_csv(model, mnist_run,
                                                                    tmp_path, monkeypatch):
    """volumes.csv lists a volume as it is finished, as locally: stopped in b, a is there."""
    from tests.helpers import InlineClient, inline_cluster

    inline_cluster(monkeypatch)
    volumes = _two_volumes(tmp_path, 8)
    _ctrl_c_in_call(monkeypatch, 10)  # b's slice 1
    with pytest.raises(KeyboardInterrupt):
        segment_on_cluster(InlineClient(), RunSpec(str(mnist_run), "cpu"), model, [], volumes,
                           tmp_path / "out", chunk=4)
    rows = list(csv.DictReader(open(tmp_path / "out" / "volumes.csv")))
    assert [(r["input"], r["status"], r["output"]) for r in rows] == [
        (str(tmp_path / "a.tif"), "ok", "a_labels.tif")]


def test_ctrl_c_in_the_assembly_of_a_volume_done_before_says_its_slices_are_kept(
        model, mnist_run, tmp_path, monkeypatch):
    """A volume whose chunks an earlier call finished is assembled before any task goes out:
    Ctrl-C there got the bare message, without the slices kept."""
    from tests.helpers import InlineClient, inline_cluster

    import paser.cluster
    from paser.volumes import VolumeInterrupted

    inline_cluster(monkeypatch)
    tifffile.imwrite(tmp_path / "a.tif", RNG.integers(0, 256, (6, SIDE, SIDE), dtype=np.uint8))
    volumes = split_inputs([str(tmp_path / "a.tif")])[1]

    def stopped(*args, **kwargs):
        raise KeyboardInterrupt

    monkeypatch.setattr(paser.cluster, "finish_volume", stopped)
    for call in ("its chunks run", "its chunks done before"):
        with pytest.raises(KeyboardInterrupt) as caught:
            segment_on_cluster(InlineClient(), RunSpec(str(mnist_run), "cpu"), model, [],
                               volumes, tmp_path / "out", chunk=4)
        assert isinstance(caught.value, VolumeInterrupted), call
        assert str(caught.value) == "6 of 6 slices of a", call


def test_a_budget_is_calibrated_once_by_the_client_and_the_workers_route_with_it(
        mnist_run, tmp_path, monkeypatch):
    """`--budget-gflops` with --scheduler: the client calibrates, the workers route with its
    bias (they do not calibrate: on another device or process they could find another), the
    folder's claim names that bias, and the labels are a local run's with the same budget
    (tasks run here: tests.helpers.inline_cluster)."""
    from tests.helpers import inline_cluster, paser_here

    import paser.api
    import paser.cluster

    inline_cluster(monkeypatch)
    in_worker, load, calibrate = [], RunSpec.load, paser.api.calibrate

    def worker_load(spec):
        in_worker.append(spec)
        try:
            return load(spec)
        finally:
            in_worker.pop()

    def client_only(*args, **kwargs):
        assert not in_worker, "a worker calibrated"
        return calibrate(*args, **kwargs)

    monkeypatch.setattr(RunSpec, "load", worker_load)
    monkeypatch.setattr(paser.api, "calibrate", client_only)
    for i in range(4):
        Image.fromarray(RNG.integers(0, 256, (SIDE, SIDE), dtype=np.uint8)).save(
            tmp_path / f"im{i}.png")
    images = [tmp_path / f"im{i}.png" for i in range(4)]
    budget = ["--budget-gflops", "0.0312", "--workers", "0", "--no-previews"]  # f0 alone: 0.0283
    res = paser_here("segment", *images, "--run-dir", mnist_run, "--out", tmp_path / "dask",
                     "--scheduler", "inline", *budget)
    assert res.returncode == 0, res.stderr
    [(worker, _lock)] = paser.cluster._MODELS.values()
    claim = json.loads((tmp_path / "dask" / ".paser-segment.json").read_text())
    assert claim["calibration_bias"] == [round(b, 8) for b in worker.calibration.bias]
    assert claim["calibration_bias"][2] > 0  # the budget sends patches to f2 (not uncalibrated)
    res = paser_here("segment", *images, "--run-dir", mnist_run, "--out", tmp_path / "here",
                     *budget)
    assert res.returncode == 0, res.stderr
    local = json.loads((tmp_path / "here" / ".paser-segment.json").read_text())
    assert local["calibration_bias"] == claim["calibration_bias"]
    for i in range(4):
        assert (tmp_path / "dask" / f"im{i}_labels.png").read_bytes() == (
            tmp_path / "here" / f"im{i}_labels.png").read_bytes()
    assert sum(_records(tmp_path / "dask", f"im{i}")["patches_per_model"][2]
               for i in range(4)) > 0


def test_the_workers_route_with_the_client_models_cap(mnist_run, tmp_path, monkeypatch):
    """From Python, a capped model with a RunSpec that names no cap: the folder's claim
    names the model's cap, and so do the workers (they ran uncapped under a capped claim)."""
    from tests.helpers import InlineClient, inline_cluster

    import paser.cluster
    from paser import PaSeR

    inline_cluster(monkeypatch)
    model = PaSeR.load(mnist_run, device="cpu")
    model.cap(1e6)
    Image.fromarray(RNG.integers(0, 256, (SIDE, SIDE), dtype=np.uint8)).save(tmp_path / "a.png")
    res = segment_on_cluster(InlineClient(), RunSpec(str(mnist_run), "cpu"), model,
                             [tmp_path / "a.png"], [], tmp_path / "out", previews=False)
    assert [r.ok for r in res.images] == [True]
    [(worker, _lock)] = paser.cluster._MODELS.values()
    claim = json.loads((tmp_path / "out" / ".paser-segment.json").read_text())
    assert worker.router.cap_per_mp == claim["cap_gflops_per_mp"] == 1e6


def test_a_worker_refuses_a_calibration_made_for_another_policy(mnist_run):
    """The client's calibration is for the policy it read: a worker that reads another run
    at that path (trained again, another copy) says so instead of routing with it."""
    import dataclasses

    from paser import PaSeR

    cal = PaSeR.load(mnist_run, device="cpu", calibrated=False).calibrate(
        budget_gflops=0.0312, save=False)
    assert RunSpec(str(mnist_run), "cpu", calibration=cal).load().calibration == cal
    other = dataclasses.replace(cal, policy="0" * 16)
    with pytest.raises(ConfigError, match="has another policy than the client's"):
        RunSpec(str(mnist_run), "cpu", calibration=other).load()


def test_a_volume_that_fails_on_its_data_leaves_no_half_label_volume_as_locally(
        model, mnist_run, tmp_path, monkeypatch):
    """NaN voxels in one chunk fail the volume, and, as a local run, nothing of it is left
    (a rerun fails the same way); a chunk a worker could not read is not the data's fault:
    the chunks finished are kept (tasks run here in order: InlineClient)."""
    from tests.helpers import InlineClient, inline_cluster

    import paser.cluster

    inline_cluster(monkeypatch)
    nan = RNG.random((24, SIDE, SIDE)).astype(np.float32)
    nan[20, 3, 3] = np.nan
    zarr.open_array(str(tmp_path / "nan.zarr"), mode="w", shape=nan.shape, chunks=(8, SIDE, SIDE),
                    dtype="float32")[:] = nan
    tifffile.imwrite(tmp_path / "gone.tif", RNG.integers(0, 256, (24, SIDE, SIDE),
                                                         dtype=np.uint8))
    segment_chunk = paser.cluster.segment_chunk

    def unseen_after_8(model, volume, z0, *args, **kwargs):  # as a worker without the file
        if volume.stem == "gone" and z0 >= 8:
            raise FileNotFoundError(2, "No such file or directory", volume.path)
        return segment_chunk(model, volume, z0, *args, **kwargs)

    monkeypatch.setattr(paser.cluster, "segment_chunk", unseen_after_8)
    volumes = split_inputs([str(tmp_path / "nan.zarr"), str(tmp_path / "gone.tif")])[1]
    res = segment_on_cluster(InlineClient(), RunSpec(str(mnist_run), "cpu"), model, [], volumes,
                             tmp_path / "dask", chunk=8)
    assert "slice 20: the image contains NaN" in res.volumes[0].error
    assert "worker inline cannot read or write slices 8..15" in res.volumes[1].error
    local = segment_volumes(model, volumes[:1], tmp_path / "local", chunk=8)
    assert local[0].error == res.volumes[0].error
    for out in ("local", "dask"):
        assert not (tmp_path / out / ".nan.parts").exists(), out
        assert not (tmp_path / out / "nan_labels.zarr").exists(), out
    assert sorted(p.name for p in (tmp_path / "dask" / ".gone.parts").glob("0*")) == [
        "00000000.json", "00000000.npy"]


def test_an_image_that_kills_its_workers_fails_alone_and_its_batch_goes_on(
        model, mnist_run, tmp_path, monkeypatch):
    """A batch whose workers die on one of its images (KilledWorker): the images it finished
    are kept, not failed, and the rest go out one at a time, so only that image fails, named,
    and no image is segmented twice (before, the batch's images after it failed on every
    call into the folder). Tasks run here in order: InlineClient."""
    from tests.helpers import InlineClient, inline_cluster

    import paser.cluster

    class KilledWorker(Exception):  # as distributed names it
        pass

    inline_cluster(monkeypatch)
    segment_image, calls = paser.cluster.segment_image, []

    def dies_on_bad(model, path, *args, **kwargs):
        calls.append(path.stem)
        if path.stem == "bad":
            raise KilledWorker("attempted to run task 3 times and all workers died")
        return segment_image(model, path, *args, **kwargs)

    monkeypatch.setattr(paser.cluster, "segment_image", dies_on_bad)
    for stem in ("a", "b", "bad", "c", "d"):
        Image.fromarray(RNG.integers(0, 256, (SIDE, SIDE), dtype=np.uint8)).save(
            tmp_path / f"{stem}.png")
    images = [tmp_path / f"{stem}.png" for stem in ("a", "b", "bad", "c", "d")]
    res = segment_on_cluster(InlineClient(), RunSpec(str(mnist_run), "cpu"), model, images, [],
                             tmp_path / "out", batch=4, previews=False)
    assert [r.ok for r in res.images] == [True, True, False, True, True]
    assert res.images[2].error == (f"{images[2]}: its worker died each time it ran "
                                   "(KilledWorker); see the workers' logs, for example for "
                                   "memory")
    assert not any(r.resumed for r in res.images)
    assert sorted(calls) == ["a", "b", "bad", "bad", "c", "d"]  # the batch, then bad and c
    rows = (tmp_path / "out" / "summary.csv").read_text().splitlines()[1:]
    assert [row.split(",")[1] for row in rows] == ["ok", "ok", "failed", "ok", "ok"]


def test_a_batch_that_fails_for_every_image_is_not_sent_again_one_by_one(
        model, mnist_run, tmp_path, monkeypatch):
    """A PaserError of the task itself (the run cannot be loaded there) is every image's:
    its images fail with it, and no task is sent per image."""
    from tests.helpers import InlineClient, inline_cluster

    import paser.cluster

    inline_cluster(monkeypatch)
    loads = []

    def unloadable(spec):
        loads.append(spec)
        raise ConfigError("the run this worker reads has another policy")

    monkeypatch.setattr(paser.cluster, "worker_model", unloadable)
    for i in range(3):
        Image.fromarray(RNG.integers(0, 256, (SIDE, SIDE), dtype=np.uint8)).save(
            tmp_path / f"im{i}.png")
    images = [tmp_path / f"im{i}.png" for i in range(3)]
    res = segment_on_cluster(InlineClient(), RunSpec(str(mnist_run), "cpu"), model, images, [],
                             tmp_path / "out", batch=2, previews=False)
    assert [r.error for r in res.images] == [
        f"{f}: the run this worker reads has another policy" for f in images]
    assert len(loads) == 2  # one per batch


def test_the_images_rate_is_of_the_images_not_of_the_volumes_beside_them(
        mnist_run, tmp_path, monkeypatch):
    """`paser segment --scheduler` on images and a volume: the images' line gives their rate
    over their own time on the cluster (they go out first), not over the whole call's, its
    cluster's start and the volume's chunks included (a clock here: each task of images
    takes 1 s, each chunk 50 s; tasks run here in order: InlineClient)."""
    import types

    from tests.helpers import inline_cluster, paser_here

    import paser.cluster

    inline_cluster(monkeypatch)
    clock = [0.0]
    monkeypatch.setattr(paser.cluster, "time", types.SimpleNamespace(
        perf_counter=lambda: clock[0]))
    image_batch, segment_chunk = paser.cluster._image_batch, paser.cluster.segment_chunk

    def timed(seconds, task):
        def run(*args, **kwargs):
            clock[0] += seconds
            return task(*args, **kwargs)
        return run

    monkeypatch.setattr(paser.cluster, "_image_batch", timed(1.0, image_batch))
    monkeypatch.setattr(paser.cluster, "segment_chunk", timed(50.0, segment_chunk))
    for i in range(4):
        Image.fromarray(RNG.integers(0, 256, (SIDE, SIDE), dtype=np.uint8)).save(
            tmp_path / f"im{i}.png")
    tifffile.imwrite(tmp_path / "vol.tif", RNG.integers(0, 256, (16, SIDE, SIDE),
                                                        dtype=np.uint8))
    res = paser_here("segment", *(tmp_path / f"im{i}.png" for i in range(4)), tmp_path / "vol.tif",
                     "--run-dir", mnist_run, "--out", tmp_path / "out", "--scheduler", "inline",
                     "--chunk", "8", "--no-previews")
    assert res.returncode == 0, res.stderr
    assert clock[0] == 101.0  # one task of 4 images, two chunks
    assert "; 4.0 images/s with reading and writing;" in res.stdout, res.stdout


def test_a_scheduler_without_workers_is_said_to_wait_for_them(mnist_run, tmp_path,
                                                               monkeypatch):
    """A scheduler whose workers have not joined yet: the command says the tasks wait for
    them, and no thread note of no threads ('run on  thread(s) there')."""
    from tests.helpers import InlineClient, inline_cluster, paser_here

    inline_cluster(monkeypatch)
    monkeypatch.setattr(InlineClient, "scheduler_info", lambda self: {"workers": {}})
    Image.fromarray(RNG.integers(0, 256, (SIDE, SIDE), dtype=np.uint8)).save(tmp_path / "a.png")
    res = paser_here("segment", tmp_path / "a.png", "--run-dir", mnist_run, "--out",
                     tmp_path / "out", "--scheduler", "tcp://127.0.0.1:8786", "--no-previews")
    assert res.returncode == 0, res.stderr
    lines = res.stdout.splitlines()
    assert lines[:2] == [
        "Dask cluster tcp://127.0.0.1:8786: 0 workers; 0 volumes, 1 image",
        "the scheduler has no workers yet: the tasks wait for them (`dask worker "
        "tcp://127.0.0.1:8786`, or scale the cluster); Ctrl-C stops, and the same command "
        "goes on from there"]
    assert "thread(s) there" not in res.stdout


def test_a_stack_slice_a_worker_does_not_see_is_named_and_keeps_the_chunks_done(
        model, mnist_run, tmp_path, monkeypatch):
    """A --stack folder whose second chunk's slices a worker does not see (mounted
    elsewhere): the error names the worker and the path, not 'replace or remove the file'
    (the file is fine), and the first chunk is kept, as for any input a worker cannot read
    (tasks run here in order: InlineClient)."""
    import dataclasses

    from tests.helpers import InlineClient, inline_cluster

    import paser.cluster

    inline_cluster(monkeypatch)
    (tmp_path / "slices").mkdir()
    for i in range(16):
        Image.fromarray(RNG.integers(0, 256, (SIDE, SIDE), dtype=np.uint8)).save(
            tmp_path / "slices" / f"s{i}.png")
    [vol] = split_inputs([str(tmp_path / "slices")], stack=True)[1]
    volume_chunk = paser.cluster._volume_chunk

    def elsewhere(spec, volume, z0, *rest):  # this worker mounts the slices elsewhere
        if z0 >= 8:
            volume = dataclasses.replace(volume, files=[
                f.replace(str(tmp_path), "/not/mounted") for f in volume.files])
        return volume_chunk(spec, volume, z0, *rest)

    monkeypatch.setattr(paser.cluster, "_volume_chunk", elsewhere)
    res = segment_on_cluster(InlineClient(), RunSpec(str(mnist_run), "cpu"), model, [], [vol],
                             tmp_path / "out", chunk=8)
    assert res.volumes[0].error == (
        f"{vol.source}: worker inline cannot see /not/mounted/slices/s8.png; the workers "
        "need the inputs at the same paths as the client")
    assert sorted(p.name for p in (tmp_path / "out" / ".slices.parts").glob("0*")) == [
        "00000000.json", "00000000.npy"]
