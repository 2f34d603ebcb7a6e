import ipaddress
import os
import socket
from pathlib import Path

import pytest


def _cpu_flags() -> set[str]:
    """The x86 CPU's feature flags (empty elsewhere). Read here, not by
    ``paser.train.distributed``'s reader of ``/proc/cpuinfo``: that module loads torch,
    and the variables below must be set before it does."""
    try:
        text = Path("/proc/cpuinfo").read_text()
    except OSError:
        return set()
    return next((set(line.split(":", 1)[1].split()) for line in text.splitlines()
                 if line.startswith("flags")), set())


# The tests pin figures of tiny 32-bit trainings, and one epoch amplifies rounding: where the
# CPU has AVX-512, oneDNN, ATen and MKL pick wider kernels that round otherwise than AVX2's
# (a calibrated point pinned on an AVX-512 CPU moved by 0.025 on an AVX2 one). Every CPU with
# AVX2 runs the tests on AVX2's code paths in all three, so the pins (made on an AVX2 CPU) hold
# on any such draw; on an AVX2 CPU the three settings change no bit. Set before torch loads
# (the processes the tests start inherit them); a variable set already is kept.
if "avx2" in _cpu_flags():
    for _name, _value in (("ONEDNN_MAX_CPU_ISA", "AVX2"), ("ATEN_CPU_CAPABILITY", "avx2"),
                          ("MKL_CBWR", "AVX2")):
        os.environ.setdefault(_name, _value)

# `distributed.precision: auto` (battery-quick) trains in bf16 where the CPU computes it
# natively: the tests' figures must not depend on the machine, so they train in 32-bit, and
# so do the processes they start (the variable is inherited). Tests of bf16 ask for it.
os.environ["PASER_BF16"] = "0"


# Tests use tiny tensors: one thread avoids oversubscription when other work shares the cores.
# Two threads on two busy cores are 20 to 60 times slower on these tensors (OpenMP waits for
# a thread that is not scheduled), so the tiny configs ask for one thread too (num_threads=1).
# Set as the session starts, before any module's fixtures (a finished run) train; torch is
# loaded there, not here: under pytest-xdist this file is loaded by the process that hands
# out the tests too, which runs none (3 s of torch before the workers start).
@pytest.fixture(scope="session", autouse=True)
def _torch_on_one_thread():
    import torch

    torch.set_num_threads(1)


@pytest.fixture(autouse=True)
def _one_thread():
    """Every test starts on one thread, whatever the test before it set (a run sets its
    config's num_threads): the same numbers in any order, and no test slowed by another."""
    import torch

    torch.set_num_threads(1)
    yield


def _loopback(address) -> bool:
    host = address[0] if isinstance(address, tuple) else None
    if host is None or host == "localhost":
        return True  # a Unix socket, or this machine by name
    try:
        return ipaddress.ip_address(host.split("%")[0]).is_loopback
    except ValueError:
        return False  # a host name: resolving it would reach out too


@pytest.fixture(autouse=True)
def _no_network(monkeypatch):
    """Tests never reach the network (no data or weights downloaded): a connection from this
    process to anything but this machine's loopback fails the test. Servers and clusters the
    tests start listen on 127.0.0.1."""
    connect, connect_ex = socket.socket.connect, socket.socket.connect_ex

    def refuse(address):
        if not _loopback(address):
            raise AssertionError(f"a test tried to reach the network: {address!r}")

    def guarded(self, address):
        refuse(address)
        return connect(self, address)

    def guarded_ex(self, address):
        refuse(address)
        return connect_ex(self, address)

    monkeypatch.setattr(socket.socket, "connect", guarded)
    monkeypatch.setattr(socket.socket, "connect_ex", guarded_ex)
    yield


@pytest.fixture(scope="module")
def server_port():
    """A port on 127.0.0.1 for the module's `paser serve`, held by this process from before
    the server starts until after it stops (tests.helpers.reserved_port): no other process
    takes it first, and nothing else answers there once the server is stopped."""
    from tests.helpers import reserved_port

    with reserved_port(server=True) as port:
        yield port


def built_once(tmp_path_factory, name: str, build) -> Path:
    """A folder ``build(folder)`` makes, made once for the session's pytest-xdist workers
    where they can share it: the first to ask builds it in their shared base folder, under
    a lock, and each worker gets its own copy, which its tests may write into. A worker
    that asks while another builds it builds its own (waiting would leave its core idle as
    long), and so does one without xdist (or fcntl)."""
    import shutil

    mine = tmp_path_factory.mktemp(name)
    try:
        import fcntl
    except ImportError:  # not POSIX
        fcntl = None
    if fcntl is None or os.environ.get("PYTEST_XDIST_WORKER") is None:
        build(mine)
        return mine
    shared = tmp_path_factory.getbasetemp().parent / f"{name}-shared"
    with open(f"{shared}.lock", "a") as lock:
        try:
            fcntl.flock(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            build(mine)
            return mine
        if not (shared / ".built").exists():
            shutil.rmtree(shared, ignore_errors=True)
            build(shared)
            (shared / ".built").touch()
    shutil.copytree(shared, mine, dirs_exist_ok=True)
    return mine


@pytest.fixture(scope="session")
def mnist_run(tmp_path_factory):
    """A finished tiny noisy-MNIST run (no monolithic baselines, no TVD sweep) for the
    further experiments, which add their entries to its results.json and report (about
    3 s to build; a worker copies one another worker built where it can, built_once)."""
    from tests.helpers import MNIST_TINY, idx_folder

    from paser.config import load_config
    from paser.run import run

    def build(tmp):
        idx_folder(tmp / "idx")
        cfg = load_config(preset="mnist-noisy", overrides=[
            *MNIST_TINY, f"data.mnist.root={tmp / 'idx'}", "stage3.tvd_sweep=[]",
            "baselines.monolithic={}", "baselines.paper=null", "operating_point.max_tvd=null",
            "mc_samples=2", "mc_dropout=all"])  # Monte Carlo on: the export tests check its graph
        run(cfg, tmp / "run", show_progress=False, echo=lambda line: None)

    return built_once(tmp_path_factory, "finished", build) / "run"
