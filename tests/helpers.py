"""What several test modules share: the CLI as a process, tiny configs, and local MNIST files.

Test modules import from here, never from each other."""

from __future__ import annotations

import contextlib
import gzip
import socket
import subprocess
import sys

import numpy as np
import pytest

from paser.data import mnist as mn

#: How far a pinned mIoU may move. Every run with a test's seed gives the same figures to
#: the last digit on one machine (two runs each agreed exactly); a hundredth leaves room for
#: another CPU's float rounding, and is well under the gaps between methods that a change
#: of behaviour (a label codec, a routing or metric bug) opens.
IOU_ABS = 0.01


def paser(*args, cwd=None, timeout=300) -> subprocess.CompletedProcess:
    """``python -m paser ARGS`` as a user runs it: a fresh process, output captured."""
    return subprocess.run([sys.executable, "-m", "paser", *map(str, args)],
                          capture_output=True, text=True, cwd=cwd, timeout=timeout)


@contextlib.contextmanager
def reserved_port(server: bool = False):
    """A port on 127.0.0.1 that is this test's until the block ends: bound here, never
    listened on, so a connection to it is refused, and the kernel gives it to no other
    process's bind to port 0 (a port found free and let go could be taken before the test
    used it, by a server of the other test worker or a Dask cluster). ``server``: the test
    starts a server on it, which binds it with SO_REUSEADDR as uvicorn does; without, no
    other socket can bind it at all."""
    with socket.socket() as held:
        if server:
            held.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        held.bind(("127.0.0.1", 0))
        yield held.getsockname()[1]


def paser_here(*args) -> subprocess.CompletedProcess:
    """``paser ARGS`` through the command's own entry point (its one-line errors and exit
    statuses) in this process: for a test of many calls, each of which would pay a second
    or more of imports in a process of its own. What a call sets for the process is put
    back: the signal handlers, torch's threads, the folders it held (a process holds its
    ``--out`` until it exits) and whether a SIGTERM came, which then goes on to stop this
    process. Not put back: the global random seed and the allocator setting of
    :func:`paser.train.common.setup`. :func:`paser` runs the command as a user does."""
    import contextlib
    import io
    import os
    import signal

    import torch

    from paser import cli, runtime

    out, err = io.StringIO(), io.StringIO()
    command = ["paser", *map(str, args)]
    argv, threads, held = sys.argv, torch.get_num_threads(), set(runtime._HELD)
    handlers = {s: signal.getsignal(s) for s in (signal.SIGTERM, signal.SIGINT)}
    terminated = len(cli._TERMINATED)
    sys.argv, code = command, 0
    try:
        with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
            cli.main()
    except SystemExit as stop:
        code = stop.code if isinstance(stop.code, int) else int(stop.code is not None)
    finally:
        sys.argv = argv
        for sig, handler in handlers.items():
            signal.signal(sig, handler)
        torch.set_num_threads(threads)
        for key in set(runtime._HELD) - held:
            runtime._HELD.pop(key).close()
        came = len(cli._TERMINATED) > terminated
        del cli._TERMINATED[terminated:]
    if came:  # the SIGTERM was for this process (a cancelled CI job): it stops it
        os.kill(os.getpid(), signal.SIGTERM)
    return subprocess.CompletedProcess(command, code, out.getvalue(), err.getvalue())


class InlineClient:
    """A Dask client stand-in for :func:`paser.cluster.segment_on_cluster`: each task runs
    in this process when its outcome is first asked for, in the order submitted (with
    :func:`inline_cluster`'s ``as_completed``), so a test of the cluster path is
    deterministic, and a KeyboardInterrupt in a task reaches the client as Ctrl-C would."""

    class Task:
        def __init__(self, fn, args):
            self.fn, self.args, self.outcome = fn, args, None

        def _run(self):
            if self.outcome is None:
                try:
                    self.outcome = ("finished", self.fn(*self.args))
                except Exception as err:  # noqa: BLE001 - a failed task, as Dask keeps it
                    self.outcome = ("error", err)
            return self.outcome

        @property
        def status(self) -> str:
            return self._run()[0]

        def result(self):
            status, value = self._run()
            if status == "error":
                raise value
            return value

        def cancel(self):
            pass

    def submit(self, fn, *args, pure=True):
        return self.Task(fn, args)

    def scheduler_info(self) -> dict:
        import torch

        return {"workers": {"inline": {"nthreads": torch.get_num_threads()}}}


class InOrder:
    """``distributed.as_completed`` for :class:`InlineClient`'s tasks: in the order given,
    those ``add``-ed later after them."""

    def __init__(self, futures):
        self.queue = list(futures)

    def __iter__(self):
        while self.queue:
            yield self.queue.pop(0)

    def add(self, future) -> None:
        self.queue.append(future)


def inline_cluster(monkeypatch) -> None:
    """``paser segment --scheduler ANY`` and :func:`paser.cluster.segment_on_cluster` on an
    :class:`InlineClient`: no Dask, its tasks run here (their worker named ``inline``, the
    run loaded afresh)."""
    import types

    import paser.cluster

    @contextlib.contextmanager
    def connect(scheduler, timeout=30.0):
        yield InlineClient()

    monkeypatch.setattr(paser.cluster, "connect", connect)
    monkeypatch.setattr(paser.cluster, "_distributed",
                        lambda: types.SimpleNamespace(as_completed=InOrder))
    monkeypatch.setattr(paser.cluster, "worker_name", lambda: "inline")
    monkeypatch.setattr(paser.cluster, "_MODELS", {})


def single_model_routes(methods: dict) -> list[str]:
    """Check that a routed method sending every patch to one model scores that model's IoU
    (f0's Monte Carlo mean for action 0); return the names of the methods that did."""
    checked = []
    for name, m in methods.items():
        shares = m.get("fractions") or []
        if 1.0 in shares:
            k = shares.index(1.0)
            alone = methods["f0 (MC)" if k == 0 else f"f{k}"]["iou"]
            assert m["iou"] == pytest.approx(alone, abs=1e-6), (name, k)
            checked.append(name)
    return checked


#: battery-quick's method (the shipped one: one pass of f0, the gain router) on tiny data;
#: one thread, as in every test (see conftest.py)
TINY_DATA = [
    "num_threads=1",
    "data.synthetic.n_train=9", "data.synthetic.n_val=2", "data.synthetic.n_test=2",
    "data.synthetic.height=32", "data.synthetic.width=32", "grid=[2, 2]",
    "stage1.epochs=1", "stage1.batch_size=3", "models.f0.epochs=1",
    "models.pool.0.epochs=null", "models.pool.1.epochs=null",
    "models.pool.0.kwargs={c0: 2, widths: [4, 4]}",
    "models.pool.1.kwargs={c0: 4, widths: [8, 8]}",
    "stage2.epochs=2", "stage2.batch_size=2", "stage3.batch_size=2",
]
#: the paper's method (REINFORCE, T = 2 Monte Carlo passes, f0's prediction and entropy as
#: the state), which the tests of the stages, the TVD budget and the tools exercise
PAPER_METHOD = [
    "mc_samples=2", "mc_dropout=all", "stage2.objective=reinforce", "stage2.policy=cnn",
    "stage2.state=paper", "stage2.gain=patch", "stage2.cost=params", "stage2.lam=0.5",
    "stage2.head=local", "stage2.stride=2", "stage2.train_on=rl", "stage2.members=1",
    "stage3.epochs=2", "operating_point.iou_within_top=null", "baselines.paper=null",
    "baselines.ablation=false",
]
TINY = [*TINY_DATA, *PAPER_METHOD]

#: the mnist-noisy preset on 24 + 6 + 12 local digits with tiny models and schedules, on
#: one thread
MNIST_TINY = [
    "num_threads=1",
    "data.mnist.source=idx", "data.mnist.n_train=24", "data.mnist.n_val=6",
    "data.mnist.n_test=12", "baselines.paper.mc_samples=2", "baselines.paper.stage3.epochs=2",
    "stage1.epochs=1", "models.f0.epochs=1", "models.pool.0.epochs=1", "stage1.batch_size=8",
    "stage2.epochs=2", "stage2.batch_size=8", "stage3.epochs=2", "stage3.batch_size=8",
    "models.pool.0.kwargs={c0: 2, widths: [4, 4]}", "models.pool.1.kwargs={c0: 4, widths: [8, 8]}",
    "baselines.monolithic.EfficientViT.input_size=[32, 32]", "baselines.timing_batch=4",
    "baselines.cascade_points=3", "baselines.curve_points=3",
]


def digits(n: int, seed: int) -> np.ndarray:
    """Fake 28 x 28 digits: a bright blob of random size and place on black."""
    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[:28, :28]
    out = np.zeros((n, 28, 28), np.uint8)
    for i in range(n):
        cy, cx, r = rng.integers(9, 19), rng.integers(9, 19), rng.integers(3, 8)
        out[i] = np.clip(255 * (1.5 - np.hypot(yy - cy, xx - cx) / r), 0, 255).astype(np.uint8)
    return out


def write_idx(path, array: np.ndarray, compress: bool = False) -> None:
    """An IDX (ubyte) file: magic 0x08 0x<ndim>, big-endian sizes, then the bytes."""
    header = bytes([0, 0, 8, array.ndim]) + b"".join(
        int(s).to_bytes(4, "big") for s in array.shape)
    data = header + array.astype(np.uint8).tobytes()
    if compress:
        path = path.with_name(path.name + ".gz")
        data = gzip.compress(data)
    path.write_bytes(data)


def idx_folder(folder, n_train=40, n_test=20, compress=False):
    """MNIST's four IDX files of fake digits in ``folder``; returns (train, test) digits."""
    folder.mkdir(parents=True, exist_ok=True)
    train, test = digits(n_train, 1), digits(n_test, 2)
    for key, arr in (("train_images", train), ("test_images", test),
                     ("train_labels", np.zeros(n_train)), ("test_labels", np.zeros(n_test))):
        write_idx(folder / mn.IDX_FILES[key], arr, compress)
    return train, test


class Interrupted(BaseException):
    """Stands for Ctrl-C or a killed process in tests of resuming (pytest takes a real
    KeyboardInterrupt for its own)."""


def bands_run(tmp_path):
    """A :class:`paser.PaSeR` of intensity-band models (no training; tests.test_label_codec)
    on a 3-class folder dataset's codec: f0 and one pool model, as its config says (a
    config naming more models than the router has wrote summary rows shorter than their
    header, which a later call's reading then dropped)."""
    from tests.test_label_codec import folder, model

    from paser.config import load_config

    root = folder(tmp_path / "data")
    cfg = load_config(preset="battery-quick", overrides=[
        "data.dataset=folder", f"data.root={root}", "grid=[2, 2]", "models.num_classes=3"])
    cfg = cfg.model_copy(update={"models": cfg.models.model_copy(
        update={"pool": cfg.models.pool[:1]})})
    (tmp_path / "run").mkdir()
    return model(cfg, tmp_path / "run")
