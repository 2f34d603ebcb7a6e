"""What every part of paser needs at run time, and nothing of paser but its errors: the
device, seeds, worker processes, progress bars, atomic file writes, and the CPU allocator.

Training, inference, the server and the data readers all import it; it imports only
:mod:`paser.errors`, so it can sit under all of them without a cycle.

The CPU allocator: PyTorch's keeps no cache on CPU. It asks glibc's ``malloc`` for every
tensor and frees it when the tensor dies. glibc serves every block over 32 MiB with a fresh ``mmap``
and gives it back with ``munmap`` on free, so each large activation is page-faulted in,
page by page, on every forward and backward: at the battery-paper shapes on CPU, a third
of f2's whole-image time and half of a stage-2 policy step (docs/benchmarks.md has the
measurements).
:func:`keep_freed_memory` tells glibc to serve large blocks from its heap and to keep
freed memory for the next one: the effect of the jemalloc or tcmalloc preload that
PyTorch's CPU performance guide recommends, with nothing to install. The cost: the
process does not shrink after its largest step, and the heap's fragmentation adds a little
to the peak.
"""

from __future__ import annotations

import contextlib
import ctypes
import os
import platform
import random
import tempfile
from pathlib import Path
from typing import Any

import numpy as np
import torch
from rich.progress import (
    BarColumn,
    MofNCompleteColumn,
    Progress,
    ProgressColumn,
    TextColumn,
    TimeElapsedColumn,
)
from rich.table import Column
from rich.text import Text

from paser.errors import ConfigError, DataError

# glibc's mallopt(3) parameters and the largest value an int can carry.
_M_TRIM_THRESHOLD, _M_MMAP_MAX, _INT_MAX = -1, -4, 2**31 - 1
# Respected when set: the user tunes glibc themselves, or asks for its defaults.
OPT_OUT = ("PASER_SYSTEM_MALLOC", "MALLOC_MMAP_MAX_", "MALLOC_TRIM_THRESHOLD_",
           "MALLOC_MMAP_THRESHOLD_")

_applied: bool | None = None


def keep_freed_memory(ignore: tuple[str, ...] = ()) -> bool:
    """Make glibc reuse freed memory for large tensors instead of unmapping it.

    Called by every training stage, the CLI and :meth:`paser.PaSeR.load`; idempotent.
    Returns whether it is in effect: not on a C library other than glibc (macOS, musl,
    Windows), nor when any of :data:`OPT_OUT` is set in the environment
    (``PASER_SYSTEM_MALLOC=1`` keeps glibc's defaults), except those in ``ignore``: set by
    a launcher, not by the user (:func:`paser.cluster.worker_model`).
    """
    global _applied
    if _applied is None:
        _applied = False
        if not any(os.environ.get(name) for name in OPT_OUT if name not in ignore) and \
                platform.system() == "Linux" and platform.libc_ver()[0] == "glibc":
            try:
                mallopt = ctypes.CDLL(None).mallopt
            except (OSError, AttributeError):
                return False
            mallopt.argtypes, mallopt.restype = [ctypes.c_int, ctypes.c_int], ctypes.c_int
            # no mmap for large blocks (they come from the heap) and no trimming of it
            _applied = bool(mallopt(_M_MMAP_MAX, 0)) and bool(mallopt(_M_TRIM_THRESHOLD,
                                                                       _INT_MAX))
    return _applied


def release_freed_memory() -> None:
    """Give the pages glibc holds free back to the system (``malloc_trim``): with
    :func:`keep_freed_memory` the heap only grows, and a long loop of varying allocations
    (a volume's routed patches) fragments it; called after each slice of a volume, it
    keeps memory bounded at the cost of faulting those pages in again. A no-op elsewhere."""
    if not _applied:
        return
    try:
        ctypes.CDLL(None).malloc_trim(0)
    except (OSError, AttributeError):
        pass


def resolve_device(name: str) -> torch.device:
    """``auto`` -> CUDA when present, else CPU; otherwise the named device, checked."""
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        device = torch.device(name)
    except RuntimeError:
        raise ConfigError(f"key 'device': unknown device '{name}'; use auto, cpu or cuda") from None
    if device.type == "cuda" and not torch.cuda.is_available():
        raise ConfigError(f"key 'device': '{name}' asked for but CUDA is not available; use auto or cpu")
    if device.type == "cpu":  # "cpu:0" is the CPU; torch.load cannot map storages to it
        return torch.device("cpu")
    if device.type not in ("cuda",):
        raise ConfigError(f"key 'device': '{name}' is not supported; use auto, cpu or cuda")
    return device


def place(model: torch.nn.Module, device: torch.device | str,
          channels_last: bool = True) -> torch.nn.Module:
    """``model`` on ``device``, its convolution weights in the layout fastest there.

    On CPU, channels-last: oneDNN's convolutions then run without converting their input
    and output at every layer, and the UNets' instance norm (a group norm, see
    :class:`paser.models.unet.InstanceNorm`) keeps the layout (``make bench``, part
    ``layout``, measures it on whole images; docs/benchmarks.md). The outputs are then
    channels-last too; the values agree with the default layout to rounding (a few 1e-4
    on the logits). On small patches channels-last was slower, so the router's pool models
    are placed with ``channels_last=False``. Elsewhere the layout is left as it is (not
    measured on a GPU yet).
    """
    model = model.to(device)
    if channels_last and torch.device(device).type == "cpu":
        model = model.to(memory_format=torch.channels_last)
    return model


def figure(x: float) -> str:
    """A figure for a line of output: 4 significant digits, whole and with thousands
    separators from 1,000 on (never ``1.07e+03``)."""
    return f"{x:,.0f}" if abs(x) >= 1000 else f"{x:.4g}"


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


def atomic_save(obj: Any, path: str | Path) -> None:
    """``torch.save`` to a temporary file in the same folder, then rename: never half a file
    (the temporary file of a process killed mid-save is removed when a stage next starts:
    :func:`paser.train.common.prepare_run_dir`).

    Ctrl-C and SIGTERM are held until the file is in place (:func:`interrupts_held`):
    torch's C++ writer turns a KeyboardInterrupt raised in its writes into 'RuntimeError:
    [enforce fail at inline_container.cc:672] . unexpected pos ...', or aborts the process
    as it closes the file ('terminate called after throwing an instance of
    pybind11::error_already_set'), instead of the command saying how to go on; held, the
    epoch's checkpoint is written whole and kept."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    with interrupts_held():
        fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
        try:
            try:
                with os.fdopen(fd, "wb") as fh:
                    torch.save(obj, fh)
                    fh.flush()
                    os.fsync(fh.fileno())
            except (RuntimeError, OSError) as err:  # a full disk: said as one, naming the file
                cause = err if isinstance(err, OSError) else err.__context__ or err.__cause__
                if isinstance(cause, OSError) and cause.filename is None:  # (torch wraps it)
                    raise OSError(cause.errno, cause.strerror, str(path)) from err
                raise
            os.replace(tmp, path)
        except BaseException:
            Path(tmp).unlink(missing_ok=True)
            raise


@contextlib.contextmanager
def replaced(path: str | Path):
    """Write a file whole or not at all: yields a temporary path beside ``path`` (its
    folder made) to write, renamed onto ``path`` when the block ends, removed if it
    raises. Not fsynced: for ``paser segment``'s outputs that cost 23 % of a small image's
    time (docs/deployment.md, "Nothing is lost on interruption")."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp")
    try:
        yield tmp
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise


def file_sha256(path: str | Path) -> str:
    """The SHA-256 of a file's bytes (hex), read a MiB at a time."""
    import hashlib

    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def atomic_write_text(text: str, path: str | Path) -> None:
    with replaced(path) as tmp:
        tmp.write_text(text)


#: the run folders this process holds (:func:`hold_run_dir`), by resolved path
_HELD: dict[str, Any] = {}


def _lock(path: Path, blocking: bool):
    """An exclusive lock on ``path`` (created), held while the returned file stays open;
    ``None`` where another process holds it (``blocking=False``). Where the platform has no
    ``fcntl``, or the folder is read-only, an open ``os.devnull``: nothing is locked. A lock
    file this process may read but not write (another user's) is locked all the same;
    one it cannot open in a folder it can write to, or that the file system will not lock
    (NFS wants a writable handle; some file systems lock nothing), is a
    :class:`ConfigError`: unlocked, two processes would write there at once."""
    try:
        import fcntl
    except ImportError:  # not POSIX: no lock
        return open(os.devnull, "a")
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        fh = open(path, "a+")
    except OSError as err:
        try:  # flock needs no write access (locally): another user's lock file still locks
            fh = open(path)
        except OSError:
            if path.parent.is_dir() and os.access(path.parent, os.W_OK):
                raise ConfigError(f"cannot open the lock file {path} ({err.strerror or err}), "
                                  "so another process could write into the folder at the "
                                  "same time: remove the file, or give another folder") from err
            return open(os.devnull, "a")  # a read-only folder: nothing can write to race
    try:
        fcntl.flock(fh, fcntl.LOCK_EX | (0 if blocking else fcntl.LOCK_NB))
    except BlockingIOError:
        fh.close()
        return None
    except OSError as err:  # NFS wants a writable handle; a file system without locks
        fh.close()
        raise ConfigError(f"cannot lock {path} ({err.strerror or err}), so another process "
                          "could write into the folder at the same time: remove the file "
                          "if it is another user's, or give a folder on a local disk") from err
    return fh


def hold_run_dir(run_dir: str | Path) -> None:
    """Make ``run_dir`` this process's until it exits: a second process training into it
    (a second ``paser run``, a stage command) is refused with who holds it, instead of the
    two overwriting each other's checkpoints and temporary files."""
    hold_folder(run_dir, ".paser.lock", "--run-dir")


def holds_run_dir(run_dir: str | Path) -> bool:
    """Whether this process holds ``run_dir`` (:func:`hold_run_dir`)."""
    return str((Path(run_dir) / ".paser.lock").resolve()) in _HELD


def hold_folder(folder: str | Path, name: str, option: str) -> None:
    """Make ``folder`` this process's until it exits, by the lock file ``name`` in it: a
    second process that would write there is refused with who holds it (``option``: what
    to give instead). A read-only folder is held by no one: nothing can write there."""
    folder = Path(folder)
    key = str((folder / name).resolve())
    if key in _HELD:
        return
    path = folder / name
    fh = _lock(path, blocking=False)
    if fh is None:
        holder = path.read_text().strip() if path.is_file() else ""
        raise ConfigError(f"{folder} is in use by another paser process"
                          + (f" (pid {holder})" if holder else "")
                          + f": wait for it to finish, or give another {option}")
    if fh.name != os.devnull and fh.writable():  # (a read-only folder's: no pid to write)
        fh.seek(0)
        fh.truncate()
        fh.write(str(os.getpid()))
        fh.flush()
    _HELD[key] = fh


@contextlib.contextmanager
def holding(folder: str | Path, name: str, option: str):
    """:func:`hold_folder` for the block, let go at its end unless it was held before: a
    library call holds its output folder while it writes, not for the rest of the process
    (a notebook)."""
    key = str((Path(folder) / name).resolve())
    before = key in _HELD
    hold_folder(folder, name, option)
    try:
        yield
    finally:
        if not before and key in _HELD:
            _HELD.pop(key).close()


#: the lock of a ``paser segment`` output folder, held while a call writes into it
OUT_LOCK = ".paser-segment.lock"


def holding_out(fn):
    """A call that writes into its ``out_dir`` (``paser segment``'s) holds the folder while
    it runs, and lets it go when it returns or fails: two calls writing into one folder
    race on its files and summary, so the second is refused."""
    import functools
    import inspect

    signature = inspect.signature(fn)

    @functools.wraps(fn)
    def call(*args, **kwargs):
        out_dir = signature.bind(*args, **kwargs).arguments["out_dir"]
        with holding(out_dir, OUT_LOCK, "--out"):
            return fn(*args, **kwargs)

    return call


@contextlib.contextmanager
def locked(path: str | Path):
    """Hold an exclusive lock on ``path`` for the block, waiting for another process that
    holds it (one process generates a shared cache, the others wait and read it)."""
    fh = _lock(Path(path), blocking=True)
    try:
        yield
    finally:
        fh.close()


#: seconds between the lines a progress bar prints where it cannot redraw itself (a pipe, a
#: file, a CI log): rich draws such a bar once, when it stops, which left a log without a
#: line for as long as a model trained or a folder was segmented
LOG_EVERY_S = 30.0


class _Progress(Progress):
    """rich's bars, which print their unfinished bars, one line each, at most every
    :data:`LOG_EVERY_S` seconds where the console cannot redraw them (not in Jupyter,
    whose widget shows them)."""

    def __init__(self, *columns, **kwargs):
        import time

        super().__init__(*columns, **kwargs)
        self._logged = time.monotonic()

    def update(self, task_id, **kwargs) -> None:
        super().update(task_id, **kwargs)
        self._log(task_id)

    def advance(self, task_id, advance: float = 1) -> None:
        super().advance(task_id, advance)
        self._log(task_id)

    def _log(self, task_id) -> None:
        import time

        if (self.disable or self.console.is_interactive or self.console.is_jupyter
                or not self.live.is_started):
            return
        now = time.monotonic()
        if now - self._logged < LOG_EVERY_S:
            return
        self._logged = now
        with self._lock:  # the whole, not the sub-bar that moved (an image's tiles)
            tasks = [t for t in self._tasks.values() if t.visible and not t.finished]
        if tasks:
            self.console.print(self.make_tasks_table(tasks))


class TimeLeftColumn(ProgressColumn):
    """``~0:12:30 left``: rich's estimate from the bar's recent speed, while it has one and
    the task runs (a model's epochs on large slices run for hours; an early stop may end
    them sooner); nothing before the first estimate or once done. Never wrapped: in an
    80-column log the text beside it wraps instead."""

    def __init__(self):
        super().__init__(table_column=Column(no_wrap=True))

    def render(self, task) -> Text:
        left = task.time_remaining
        if task.finished or left is None or not task.total:
            return Text("")
        minutes, seconds = divmod(int(left), 60)
        hours, minutes = divmod(minutes, 60)
        return Text(f"~{hours}:{minutes:02d}:{seconds:02d} left", style="progress.remaining")


def progress(enabled: bool = True) -> Progress:
    """A rich progress bar group on stderr (stdout is a command's results); disabled bars
    cost nothing. Where stderr is not a terminal, the unfinished bars print a line every
    :data:`LOG_EVERY_S` seconds."""
    import sys

    from rich.console import Console

    return _Progress(
        TextColumn("{task.description}"),
        BarColumn(),
        MofNCompleteColumn(),
        TimeElapsedColumn(),
        TimeLeftColumn(),
        TextColumn("{task.fields[info]}"),
        disable=not enabled,
        console=Console(stderr=True),
        # what is printed to stdout meanwhile goes above the bars on a terminal, and where
        # stdout is a pipe or a file (the bars on a terminal), to stdout still
        redirect_stdout=sys.stdout.isatty(),
    )


def detached_worker(parent: int) -> None:
    """Initializer of a pool's worker processes (``initargs=(os.getpid(),)``): Ctrl-C is the
    parent's to handle (it stops the pool; the workers printed a traceback each), and a
    worker whose parent is gone exits within a second (a parent killed with SIGKILL cannot
    stop its pool, whose workers were left running)."""
    import signal
    import threading
    import time

    signal.signal(signal.SIGINT, signal.SIG_IGN)
    # the parent's SIGTERM handler (paser.cli) is for the parent: a worker signalled with
    # its process group stops as a worker does, the parent says what finished
    signal.signal(signal.SIGTERM, signal.SIG_DFL)

    def gone() -> bool:
        try:
            os.kill(parent, 0)
        except ProcessLookupError:
            return True
        except PermissionError:  # alive, another user's (the pid was reused)
            return False
        try:  # a killed parent that its own parent has not reaped yet is a zombie
            return Path(f"/proc/{parent}/stat").read_text().rsplit(")", 1)[1].split()[0] == "Z"
        except (OSError, IndexError):
            return False

    def watch() -> None:
        while not gone():
            time.sleep(1.0)
        os._exit(1)

    threading.Thread(target=watch, name="paser-parent-watch", daemon=True).start()


def detached_readers():
    """A DataLoader's ``worker_init_fn`` that makes its reader processes
    :func:`detached_worker` s of this process: a ``paser`` killed with SIGKILL does not
    leave them running (they held hundreds of MB each, for good)."""
    import functools

    return functools.partial(_detached_reader, os.getpid())


def _detached_reader(parent: int, worker_id: int) -> None:
    detached_worker(parent)


def _main_guard(node) -> bool:
    """Whether a statement is ``if __name__ == "__main__":`` (either way round)."""
    import ast

    test = getattr(node, "test", None)
    if not isinstance(node, ast.If) or not isinstance(test, ast.Compare) or len(test.ops) != 1:
        return False
    sides = [test.left, *test.comparators]
    return (isinstance(test.ops[0], ast.Eq)
            and any(isinstance(x, ast.Name) and x.id == "__name__" for x in sides)
            and any(isinstance(x, ast.Constant) and x.value == "__main__" for x in sides))


def unguarded_main() -> tuple[str, int] | None:
    """Where the main script's top-level code called what is starting worker processes
    now, outside ``if __name__ == "__main__":`` (its path and line), where the processes
    would run that code again: a process started from a fork server or spawned imports the
    main script (as multiprocessing's ``spawn.prepare`` does: the file, or the module run
    with ``-m`` unless it is a package's ``__main__``), and there it would start processes
    again, which Python refuses, and each stops. ``None`` elsewhere: a guarded call, an
    interactive session, ``python -c``."""
    import ast
    import sys

    main = sys.modules.get("__main__")
    path = getattr(main, "__file__", None)
    name = getattr(getattr(main, "__spec__", None), "name", None)
    if main is None or not path or (name is not None and (
            name == "__main__" or name.endswith(".__main__"))):
        return None
    frame = sys._getframe(1)
    while frame is not None and not (frame.f_code.co_name == "<module>"
                                     and frame.f_globals is vars(main)):
        frame = frame.f_back
    if frame is None:
        return None
    line = frame.f_lineno
    try:
        tree = ast.parse(Path(path).read_text(encoding="utf-8"))
    except (OSError, SyntaxError, ValueError, UnicodeDecodeError):
        return None
    top = next((n for n in tree.body if n.lineno <= line <= (n.end_lineno or n.lineno)), None)
    return None if top is None or _main_guard(top) else (path, line)


def check_main_guard(without: str) -> None:
    """A :class:`DataError` at once where worker processes started now would run the
    calling script again (:func:`unguarded_main`): each would stop, and the readers'
    failure would surface only seconds later. ``without``: the setting that needs no
    processes."""
    where = unguarded_main()
    if where is not None:
        raise DataError(
            f"{where[0]}, line {where[1]}: called at the script's top level; paser's worker "
            "processes start by importing the script, and would run it again. Call paser "
            "under `if __name__ == \"__main__\":`, or set " + without + " (no worker "
            "processes)")


def from_readers(loader, workers: int, without: str = "data.workers=0"):
    """The items of ``loader`` (a DataLoader whose ``workers`` reader processes start from
    :func:`worker_context`); a reader that died is a :class:`DataError` that says what to
    do, not "DataLoader worker exited unexpectedly". ``without``: the setting that reads
    in this process instead.

    The readers start with Ctrl-C and SIGTERM held (:func:`interrupts_held`): stopped
    as they started, the command exited with readers not yet started whole, and each
    printed a traceback after its message (FileNotFoundError from SemLock._rebuild: the
    queue's lock it was given was gone with the command). Started, they are shut down
    as the loader is (its iterator's ``__del__``), which waits for them."""
    with interrupts_held():
        items = iter(loader)
    while True:
        try:
            item = next(items)
        except StopIteration:
            return
        except RuntimeError as err:
            if "exited unexpectedly" not in str(err):
                raise
            raise DataError(
                f"the {workers} reader processes stopped ({err}). In a Python script, call "
                "paser under `if __name__ == \"__main__\":` (each reader starts by importing "
                "the script, and must not run it); otherwise a reader ran out of memory or was "
                f"killed. {without} reads in this process") from None
        yield item


@contextlib.contextmanager
def interrupts_held():
    """Ctrl-C (SIGINT) and SIGTERM (which paser's commands take as Ctrl-C) held back while
    the block runs, and handled as it ends: for code that would lose them (code that
    catches the KeyboardInterrupt in another guise). Their handlers are swapped for one
    that notes the signal, and the first noted is given to its own handler after the
    block. (A signal mask did not do: under pytest-xdist the signal got through inside the
    block in 2 of 4 runs, likely given to another thread that does not block it, after
    which Python runs its handler in the main thread at once.) Only in the main thread,
    where handlers can be set; a no-op elsewhere."""
    import signal
    import threading

    if threading.current_thread() is not threading.main_thread():
        yield
        return
    noted: list[int] = []
    before = {sig: signal.signal(sig, lambda signum, frame: noted.append(signum))
              for sig in (signal.SIGINT, signal.SIGTERM)}
    try:
        yield
    finally:
        for sig, handler in before.items():
            signal.signal(sig, handler)
        if noted:
            handler = before[noted[0]]
            if callable(handler):
                handler(noted[0], None)
            elif handler == signal.SIG_DFL:
                signal.raise_signal(noted[0])


def _start_forkserver() -> None:
    """Start the fork server with Ctrl-C ignored: the server shares the terminal's process
    group, and it ignores SIGINT itself only once its preload (torch: seconds) is imported,
    so a Ctrl-C in those seconds printed its traceback after paser's own message. An
    ignored signal stays ignored in the new process, and in the processes it forks:
    paser's readers and writers ignore it anyway (:func:`detached_worker`), Ctrl-C is the
    parent's to handle; another pool on this process's fork server inherits it too."""
    import signal
    import threading
    from multiprocessing import forkserver

    if threading.current_thread() is not threading.main_thread():
        return  # signals are the main thread's; the server starts when first used
    before = signal.signal(signal.SIGINT, signal.SIG_IGN)
    try:
        forkserver.ensure_running()
    finally:  # (None: a handler not set from Python, as in an embedding program)
        signal.signal(signal.SIGINT, signal.SIG_DFL if before is None else before)


def default_workers() -> int:
    """The reader (and writer) processes of ``paser segment`` and ``paser evaluate`` where
    ``--workers`` is not given: 0 on a machine of 2 cores or fewer, else 2. On 2 cores they
    share the cores with the models: ``segment`` took 19.8 s for 200 images of 224 x 256 in
    one process against 20.5 s with 2 readers and 2 writers, and 66.8 against 66.1 s for
    three of 4096 x 4096, its processes holding 0.9 and 1.4 GiB between them against 2.3 and
    3.2 GiB; ``evaluate`` on the demo's test split took 6.2 against 7.2 s."""
    try:
        cores = len(os.sched_getaffinity(0))
    except AttributeError:  # not on Linux
        cores = os.cpu_count() or 1
    return 0 if cores <= 2 else 2


def worker_context(workers: int, preload: list[str], without: str = "data.workers=0"):
    """How worker processes start: from a fork server where the platform has one (``None``:
    the platform's default; also with no workers). The server imports ``preload`` once, so
    each worker starts as a cheap fork; a fork of this process itself could inherit a lock
    another thread holds (seen: gloo's, under multi-process training). Workers that would
    run the calling script again are refused first (:func:`check_main_guard`; ``without``:
    the setting that needs none)."""
    import multiprocessing

    if workers and ("forkserver" in multiprocessing.get_all_start_methods()
                    or multiprocessing.get_start_method() != "fork"):
        check_main_guard(without)
    if workers and "forkserver" in multiprocessing.get_all_start_methods():
        ctx = multiprocessing.get_context("forkserver")
        ctx.set_forkserver_preload(preload)  # no effect once the server runs
        _start_forkserver()
        return ctx
    return None
