"""`keep_freed_memory`: glibc keeps freed large blocks for reuse, unless the user opts out."""

from __future__ import annotations

import json
import os
import platform
import subprocess
import sys
from pathlib import Path

import pytest

# every test starts a fresh Python that imports torch (3 s each)
pytestmark = pytest.mark.slow

GLIBC = platform.system() == "Linux" and platform.libc_ver()[0] == "glibc"

# In a fresh process: apply, then fill and free a 256 MiB tensor; report resident memory.
CHILD = """
import json, os, torch
from paser.runtime import keep_freed_memory
def rss_mib():
    return int(open("/proc/self/statm").read().split()[1]) * os.sysconf("SC_PAGE_SIZE") / 2**20
applied = keep_freed_memory()
before = rss_mib()
x = torch.ones(64 * 2**20)  # 256 MiB, every page touched
del x
print(json.dumps({"applied": applied, "again": keep_freed_memory(),
                  "kept_mib": rss_mib() - before}))
"""


def run_child(**env: str) -> dict:
    clean = {k: v for k, v in os.environ.items() if not k.startswith(("MALLOC_", "PASER_"))}
    out = subprocess.run([sys.executable, "-c", CHILD], env={**clean, **env},
                         capture_output=True, text=True, check=True)
    return json.loads(out.stdout.strip().splitlines()[-1])


@pytest.mark.skipif(not GLIBC, reason="mallopt is glibc's; elsewhere it is a no-op")
def test_freed_memory_is_kept_for_reuse():
    res = run_child()
    assert res["applied"] and res["again"]  # idempotent
    assert res["kept_mib"] > 200  # the freed 256 MiB stays in the heap for the next tensor


@pytest.mark.parametrize("name", ["PASER_SYSTEM_MALLOC", "MALLOC_TRIM_THRESHOLD_"])
def test_opt_out_keeps_glibc_defaults(name):
    res = run_child(**{name: "1"})
    assert not res["applied"] and not res["again"]
    assert res["kept_mib"] < 50  # glibc unmapped the block on free


def test_a_file_is_replaced_whole_or_not_at_all(tmp_path):
    from paser.runtime import atomic_write_text, replaced

    target = tmp_path / "sub" / "out.csv"
    atomic_write_text("old", target)
    with pytest.raises(RuntimeError), replaced(target) as tmp:
        tmp.write_text("half")
        raise RuntimeError("killed mid-write")
    assert target.read_text() == "old" and list(target.parent.iterdir()) == [target]
    with replaced(target) as tmp:
        tmp.write_text("new")
    assert target.read_text() == "new" and list(target.parent.iterdir()) == [target]


# A parent with a writer pool: its worker ignores Ctrl-C, then the parent dies by SIGKILL.
POOL_PARENT = """
import os, signal, time
from paser.segment import _writer
def pending(pid, sig):  # sent, not yet taken (an ignored signal is dropped as it is sent)
    try:
        fields = dict(line.split(":", 1) for line in open(f"/proc/{pid}/status"))
    except FileNotFoundError:  # it died of it
        return False
    return any(int(fields[k], 16) >> (sig - 1) & 1 for k in ("SigPnd", "ShdPnd"))
if __name__ == "__main__":
    pool = _writer(1)
    pid = pool.submit(os.getpid).result()
    os.kill(pid, signal.SIGINT)  # Ctrl-C reaches every process of the group
    while pending(pid, signal.SIGINT):  # however loaded the machine: taken before we ask
        time.sleep(0.01)
    print(pid, pool.submit(os.getpid).result() == pid, flush=True)  # still serving
    os.kill(os.getpid(), signal.SIGKILL)
"""


# A parent reading images by a reader process, as paser segment does, then killed.
READER_PARENT = """
import os, signal, sys, numpy as np, torch
from PIL import Image
from paser.data.images import Intensity
from paser.runtime import detached_readers, worker_context
from paser.segment import _Inputs, _as_is
if __name__ == "__main__":
    Image.fromarray(np.zeros((8, 8), np.uint8)).save(sys.argv[1])
    items = iter(torch.utils.data.DataLoader(
        _Inputs([sys.argv[1]] * 50, 1, Intensity()), batch_size=None, num_workers=1,
        collate_fn=_as_is, multiprocessing_context=worker_context(1, ["paser.segment"]),
        worker_init_fn=detached_readers()))
    next(items)
    print(items._workers[0].pid, True, flush=True)
    os.kill(os.getpid(), signal.SIGKILL)
"""


@pytest.mark.skipif(platform.system() != "Linux", reason="signals and /proc as on Linux")
@pytest.mark.parametrize("parent", [POOL_PARENT, READER_PARENT], ids=["writers", "readers"])
def test_pool_workers_leave_ctrl_c_to_the_parent_and_exit_when_it_is_killed(parent, tmp_path):
    import time

    out = subprocess.run([sys.executable, "-c", parent, str(tmp_path / "a.png")],
                         capture_output=True, text=True, timeout=120)
    pid, serving = out.stdout.split()
    assert serving == "True" and "KeyboardInterrupt" not in out.stderr, out.stderr

    def alive(p: int) -> bool:  # a zombie has exited
        try:
            return open(f"/proc/{p}/stat").read().split()[2] != "Z"
        except FileNotFoundError:
            return False

    # it looks once a second; 60 s tells "exits" from "outlives it" on a slow, busy runner
    deadline = time.monotonic() + 60
    while alive(int(pid)) and time.monotonic() < deadline:
        time.sleep(0.2)
    assert not alive(int(pid)), "the worker outlived its killed parent"


# Ctrl-C (to the whole process group) while the fork server imports its preload.
FORKSERVER_PARENT = """
import os, signal, threading, time
from paser.runtime import worker_context
if __name__ == "__main__":
    # as a terminal starts it: a background job of a script (`cmd &`) inherits Ctrl-C ignored
    signal.signal(signal.SIGINT, signal.default_int_handler)
    ctx = worker_context(1, ["paser.data"])
    threading.Timer(0.3, os.killpg, (os.getpgrp(), signal.SIGINT)).start()
    try:
        ctx.Process(target=time.sleep, args=(0,)).start()
        time.sleep(10)
    except KeyboardInterrupt:
        print("interrupted", flush=True)
"""


@pytest.mark.skipif(platform.system() != "Linux", reason="a fork server, process groups")
def test_ctrl_c_while_the_fork_server_starts_prints_no_traceback_of_it():
    out = subprocess.run([sys.executable, "-c", FORKSERVER_PARENT], capture_output=True,
                         text=True, timeout=120, start_new_session=True)
    assert out.stdout == "interrupted\n" and "Traceback" not in out.stderr, out.stderr


@pytest.mark.skipif(platform.system() != "Linux", reason="signal masks")
def test_a_ctrl_c_held_while_code_that_would_swallow_it_runs_is_handled_after_it():
    import signal

    from paser.runtime import interrupts_held

    # torch.utils.flop_counter imports triton, whose C extension turns a KeyboardInterrupt
    # raised while it loads into an ImportError, which torch takes for "no triton"; paser's
    # commands raise one for SIGTERM too
    def terminate(signum, frame):
        raise KeyboardInterrupt

    # both set here: a pytest-xdist worker ignores SIGINT
    handlers = {sig: signal.signal(sig, terminate) for sig in (signal.SIGINT, signal.SIGTERM)}
    try:
        for sig in handlers:
            reached = []
            with pytest.raises(KeyboardInterrupt), interrupts_held():
                try:
                    try:
                        os.kill(os.getpid(), sig)
                        reached.append("after the signal")
                    except KeyboardInterrupt:
                        raise ImportError("initialization failed") from None
                except ImportError:
                    reached.append("taken for no triton")
            assert reached == ["after the signal"], sig
    finally:
        for sig, handler in handlers.items():
            signal.signal(sig, handler)


def test_progress_bars_print_a_line_now_and_then_where_they_cannot_redraw(monkeypatch, capsys):
    """In a pipe or a CI log rich draws a bar only when it stops: paser's print the bar that
    moved every LOG_EVERY_S seconds, on stderr (stdout is a command's results)."""
    import paser.runtime as R

    monkeypatch.setattr(R, "LOG_EVERY_S", 0.0)
    with R.progress() as bar:
        task = bar.add_task("segment", total=3, info="1.0 images/s")
        bar.advance(task)
        bar.update(task, advance=1)
    out = capsys.readouterr()
    lines = out.err.splitlines()
    assert out.out == "" and [line.split()[2] for line in lines] == ["1/3", "2/3", "2/3"]
    assert all(line.startswith("segment") and "1.0 images/s" in line for line in lines)
    with R.progress() as bar:  # a sub-bar that moves prints the whole with it
        bar.add_task("segment", total=2, info="")
        tiles = bar.add_task("  a: tiles", total=4, info="")
        bar.advance(tiles)
    first, second = capsys.readouterr().err.splitlines()[:2]
    assert first.startswith("segment") and "0/2" in first and "a: tiles" in second
    monkeypatch.setattr(R, "LOG_EVERY_S", 3600.0)  # the default's spacing: the end only
    with R.progress() as bar:
        bar.advance(bar.add_task("segment", total=3, info=""))
    assert len(capsys.readouterr().err.splitlines()) == 1
    assert [R.figure(x) for x in (0.0157, 2.5708, 150.4, 1070.4, 12345.6)] == [
        "0.0157", "2.571", "150.4", "1,070", "12,346"]  # never 1.07e+03


def test_a_run_folder_in_use_by_another_process_is_refused(tmp_path):
    import fcntl

    from paser.errors import ConfigError
    from paser.runtime import hold_run_dir

    run_dir = tmp_path / "run"
    run_dir.mkdir()
    (run_dir / ".paser.lock").write_text("4242")
    with open(run_dir / ".paser.lock", "a+") as other:  # another process's hold
        fcntl.flock(other, fcntl.LOCK_EX)
        with pytest.raises(ConfigError, match=r"in use by another paser process \(pid 4242\)"):
            hold_run_dir(run_dir)
    hold_run_dir(run_dir)  # free now: this process's, and again at no cost
    hold_run_dir(run_dir)
    assert (run_dir / ".paser.lock").read_text() == str(os.getpid())


def test_an_output_folder_in_use_is_refused_and_a_read_only_one_held_by_no_one(tmp_path):
    import fcntl

    from tests.helpers import bands_run

    from paser.errors import ConfigError
    from paser.runtime import hold_folder
    from paser.segment import segment_files

    out = tmp_path / "out"
    out.mkdir()
    model = bands_run(tmp_path)
    (out / ".paser-segment.lock").write_text("4242")
    with open(out / ".paser-segment.lock", "a+") as other:  # another paser segment's
        fcntl.flock(other, fcntl.LOCK_EX)
        with pytest.raises(ConfigError, match=r"out is in use by another paser process "
                           r"\(pid 4242\): wait for it to finish, or give another --out"):
            segment_files(model, [], out)
    segment_files(model, [], out)  # free now: held while it writes, then let go
    with open(out / ".paser-segment.lock", "a+") as other:  # (a notebook kept it for good)
        fcntl.flock(other, fcntl.LOCK_EX | fcntl.LOCK_NB)
    (tmp_path / "file").write_text("")  # a folder paser cannot write a lock into
    hold_folder(tmp_path / "file", ".lock", "--out")  # (it said: Invalid argument)


def test_a_lock_file_this_process_cannot_write_still_locks_or_is_refused(tmp_path,
                                                                        monkeypatch):
    """Another user's lock file (mode 644 in a shared folder): flock needs no write access,
    so it still keeps two processes out; one that cannot be opened at all is refused, not
    passed over (two paser segment calls then raced and deleted each other's labels)."""
    import builtins
    import fcntl

    from paser.errors import ConfigError
    from paser.runtime import hold_folder

    out = tmp_path / "out"
    out.mkdir()
    lock = out / ".paser-segment.lock"
    lock.write_text("4242")
    opened = builtins.open
    readable = [True]

    def guarded(file, mode="r", *args, **kwargs):
        if Path(file) == lock and (mode != "r" or not readable[0]):
            raise PermissionError(13, "Permission denied", str(file))
        return opened(file, mode, *args, **kwargs)

    with opened(lock) as other:  # the other user's paser segment holds it
        fcntl.flock(other, fcntl.LOCK_EX)
        monkeypatch.setattr(builtins, "open", guarded)
        with pytest.raises(ConfigError, match=r"in use by another paser process \(pid 4242\)"):
            hold_folder(out, lock.name, "--out")
        readable[0] = False
        with pytest.raises(ConfigError, match=r"cannot open the lock file .*Permission denied.*"
                           r"remove the file, or give another folder"):
            hold_folder(out, lock.name, "--out")
    monkeypatch.setattr(builtins, "open", opened)
    assert lock.read_text() == "4242"


def test_an_empty_config_file_is_an_error_not_the_defaults(tmp_path):
    from paser.config import load_config
    from paser.errors import ConfigError

    (tmp_path / "config.yaml").write_text("\n")
    with pytest.raises(ConfigError, match="config.yaml is empty"):
        load_config(config_file=tmp_path / "config.yaml")


def test_ctrl_c_says_how_to_go_on():
    from paser.cli import interrupted

    assert "again to continue" in interrupted(["run", "--run-dir", "r"])
    assert "without --force" in interrupted(["run", "--run-dir", "r", "--force"])
    assert "without --overwrite" in interrupted(["segment", "x", "--overwrite"])
    assert "--resume" in interrupted(["pretrain", "--run-dir", "r"])
    # nothing to continue: a server stopped, a command that only reads
    assert interrupted(["serve", "--run-dir", "r"]) == "paser serve stopped"
    assert interrupted(["evaluate", "--run-dir", "r"]) == "interrupted"
    assert interrupted(["data", "check", "folder"]) == "interrupted"
    assert interrupted(["data", "synth", "--out", "check"]).startswith(
        "interrupted; --out holds part of the set")
    assert "incomplete" in interrupted(["export", "--run-dir", "r"])
    assert "again to continue" in interrupted([])


def test_a_reader_that_died_is_a_data_error_that_says_what_to_do():
    """Both reader loaders (a split streamed from disk, paser segment's inputs) go through
    from_readers: a script without a __main__ guard kills every reader at its start."""
    from paser.errors import DataError
    from paser.runtime import from_readers

    def loader(error):
        yield 1
        raise error

    items = from_readers(loader(RuntimeError("DataLoader worker (pid(s) 7) exited unexpectedly")),
                         2, without="--workers 0")
    assert next(items) == 1
    with pytest.raises(DataError, match=r'2 reader processes stopped .*__name__ == "__main__".*'
                                        r"--workers 0 reads in this process"):
        next(items)
    with pytest.raises(RuntimeError, match="other"):  # any other error is left as it is
        list(from_readers(loader(RuntimeError("other")), 2))
    assert list(from_readers(iter([1, 2]), 2)) == [1, 2]


@pytest.mark.skipif(platform.system() != "Linux", reason="signal masks")
def test_readers_stopped_as_they_start_start_whole_before_the_ctrl_c_is_handled():
    """A Ctrl-C as a loader starts its reader processes is handled once they have all
    started: a command stopped between two of them left readers that printed a traceback
    after its message (FileNotFoundError from SemLock._rebuild, the queue's lock gone with
    the command: paser run stopped at 10 moments of its calibration printed it 4 times,
    and at 18 moments none once the readers start held)."""
    import signal

    from paser.runtime import from_readers

    started = []

    class Readers:
        def __iter__(self):
            os.kill(os.getpid(), signal.SIGINT)  # Ctrl-C after the first reader started
            started.append("the last reader")
            return iter([1, 2])

    before = signal.signal(signal.SIGINT, signal.default_int_handler)  # (xdist ignores it)
    try:
        with pytest.raises(KeyboardInterrupt):
            next(from_readers(Readers(), 2))
    finally:
        signal.signal(signal.SIGINT, before)
    assert started == ["the last reader"]


def test_a_checkpoint_on_a_full_disk_is_an_os_error_naming_it(tmp_path, monkeypatch):
    import errno

    import torch

    from paser.runtime import atomic_save

    def full(obj, fh):  # as torch's zip writer fails on a full disk
        try:
            raise OSError(errno.ENOSPC, "No space left on device")
        except OSError:
            raise RuntimeError("[enforce fail at inline_container.cc:672] . unexpected pos "
                               "1326272 vs 1326160") from None

    monkeypatch.setattr(torch, "save", full)
    with pytest.raises(OSError, match="No space left on device") as err:
        atomic_save({"w": 1}, tmp_path / "f1.pt")
    assert err.value.filename == str(tmp_path / "f1.pt") and not list(tmp_path.iterdir())


@pytest.mark.skipif(not hasattr(__import__("signal"), "raise_signal"), reason="signals")
def test_a_ctrl_c_while_a_checkpoint_is_written_is_a_ctrl_c_once_it_is_whole(tmp_path,
                                                                             monkeypatch):
    """torch's C++ writer turned a KeyboardInterrupt raised in one of its writes into
    'RuntimeError: [enforce fail at inline_container.cc:672] . unexpected pos 46 vs 0' (or
    aborted the process): a stage stopped by Ctrl-C as it saved an epoch ended with a
    traceback and exit status 1, not 130 and how to go on."""
    import signal

    import torch

    from paser import runtime

    fdopen, writes = os.fdopen, []

    class Interrupted:  # the file torch writes to: Ctrl-C comes during its third write
        def __init__(self, fh):
            self.fh = fh

        def write(self, data):
            writes.append(len(data))
            if len(writes) == 3:
                signal.raise_signal(signal.SIGINT)
            return self.fh.write(data)

        def __getattr__(self, name):
            return getattr(self.fh, name)

        def __enter__(self):
            return self

        def __exit__(self, *exc):
            return self.fh.__exit__(*exc)

    def ctrl_c(signum, frame):
        raise KeyboardInterrupt

    monkeypatch.setattr(runtime.os, "fdopen", lambda *a, **k: Interrupted(fdopen(*a, **k)))
    before = signal.signal(signal.SIGINT, ctrl_c)  # a pytest-xdist worker ignores SIGINT
    try:
        with pytest.raises(KeyboardInterrupt):
            runtime.atomic_save({"w": torch.arange(1000)}, tmp_path / "f1.pt")
    finally:
        signal.signal(signal.SIGINT, before)
    assert len(writes) > 3 and [p.name for p in tmp_path.iterdir()] == ["f1.pt"]
    assert torch.equal(torch.load(tmp_path / "f1.pt")["w"], torch.arange(1000))


@pytest.mark.slow  # a process of its own
def test_sigterm_is_handled_as_ctrl_c_and_ends_the_process_by_it(tmp_path):
    import signal
    import subprocess
    import sys

    def signalled_once_it_writes(out, stop, call):
        # signalled once the command writes (its handler is in place by then: a fixed 2 s,
        # then a 60 s wait that signalled anyway, could run out before it on a loaded
        # machine, and the process died unhandled)
        return ("import os, signal, sys, threading, time\n"
                "from pathlib import Path\n"
                "from paser.cli import entry, main\n"
                f"out = Path({str(out)!r})\n"
                "sys.argv = ['paser', 'data', 'synth', '--out', str(out), "
                f"'--n-train', '100000', '--workers', '{1 if stop == 'kill' else 2}']\n"
                "def later():\n"  # no deadline of its own: the run's timeout is one
                "    while not any(out.rglob('*.png')):\n"
                "        time.sleep(0.05)\n"
                f"    os.{stop}(os.getpid(), signal.SIGTERM)\n"
                "threading.Thread(target=later, daemon=True).start()\n"
                f"{call}\n")

    def run(script):
        return subprocess.run([sys.executable, "-c", script], capture_output=True, text=True,
                              timeout=120, start_new_session=True)

    # signalled alone; with its pool, as systemd signals a group
    for stop in ("kill", "killpg"):
        res = run(signalled_once_it_writes(tmp_path / stop, stop, "entry()"))
        # ended by the signal once it said so, as a service manager expects
        assert res.returncode == -signal.SIGTERM, res.stderr
        assert "terminated (SIGTERM); --out holds part of the set" in res.stderr
        assert "Traceback" not in res.stderr
    # main() in a caller's own process (benchmarks/gpu.py): its status, and its finally runs
    res = run(signalled_once_it_writes(
        tmp_path / "m", "kill",
        f"try:\n    main()\nfinally:\n    open({str(tmp_path / 'finally')!r}, 'w').write('ran')"))
    assert res.returncode == 143 and (tmp_path / "finally").read_text() == "ran", res.stderr


def test_an_os_error_names_the_file_paser_was_writing_not_its_temporary_name():
    from paser.cli import _written

    assert _written("RUN/.calibration.json.tmp") == "RUN/calibration.json"
    assert _written("out/.a_labels.png.tmp") == "out/a_labels.png"
    assert _written("RUN/checkpoints/.f1.pt.k3j_a9zq.tmp") == "RUN/checkpoints/f1.pt"
    assert _written("in/.hidden.png") == "in/.hidden.png"  # not one of paser's


def test_a_lock_the_file_system_refuses_is_a_clear_error(tmp_path, monkeypatch):
    """flock on NFS wants a writable handle, and some file systems lock nothing: that is a
    ConfigError saying what to do, not a raw OSError (a reviewer's find)."""
    import errno
    import fcntl

    from paser.errors import ConfigError
    from paser.runtime import hold_folder

    def refused(fh, op):
        raise OSError(errno.EBADF, "Bad file descriptor")

    monkeypatch.setattr(fcntl, "flock", refused)
    with pytest.raises(ConfigError, match=r"cannot lock .*Bad file descriptor.*a local disk"):
        hold_folder(tmp_path, ".lock", "--out")


def test_a_bar_says_how_long_is_left_while_it_knows():
    from types import SimpleNamespace

    import paser.runtime as R

    column = R.TimeLeftColumn()
    task = SimpleNamespace(time_remaining=3725.9, finished=False, total=40)
    assert column.render(task).plain == "~1:02:05 left"
    assert column.get_table_column().no_wrap  # one line in an 80-column log, not two
    for done in ({"finished": True}, {"time_remaining": None}, {"total": None}):
        assert column.render(SimpleNamespace(**{**vars(task), **done})).plain == ""
