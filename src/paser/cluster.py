"""``paser segment --scheduler``: the same work as a local ``paser segment``, on a Dask
cluster (the ``dask`` extra: ``pip install 'paser[dask]'``).

- ``local:N`` starts a :class:`distributed.LocalCluster` of N worker processes of one
  thread each on this machine; any other address (``tcp://host:8786``) is a running
  scheduler (``dask scheduler``, ``dask-jobqueue``'s ``SLURMCluster``, ``dask-cuda``'s
  ``LocalCUDACluster``).
- Volumes go out as chunks of :data:`paser.volumes.CHUNK` slices, the output zarr's own
  chunks along the slices, so each task writes its chunk and nothing else; folders of
  images go out as batches of files. Each task writes what a local run writes, the same
  bytes, and its records name the worker (``worker`` per slice or image, ``workers`` per
  volume, a ``worker`` column in ``summary.csv``).
- Each worker process loads the run once (:func:`worker_model`, a per-process cache keyed by
  :class:`RunSpec`) and runs one model call at a time, on its threads (or
  ``RunSpec.threads``); its other threads read and write meanwhile. It routes with the
  client's calibration (``RunSpec.calibration``: a budget calibrated once, by the client),
  the one the output folder's claim names.
- The labels are byte-identical to a local run's whose model calls use as many threads:
  on other thread counts PyTorch's CPU kernels add in another order (its group norm splits
  a channel's sum over threads; a 1 x 1 convolution of a small batch takes another kernel
  on one thread), which can move a few voxels (23 of a 1,024 x 1,024 demo slice between 1
  and 2 threads). ``paser segment --threads N`` fixes them here and on the workers.
- A task is done when its records are written (a chunk's marker, an image's JSON, both
  last), so a worker that dies mid-task leaves nothing half-done that counts: the scheduler
  runs the task again elsewhere, which first looks whether it was finished. The same
  command run again does only what is missing, as locally.

The workers read the inputs and write the outputs at the paths the client gives: they need
one file system (NFS, Lustre, GPFS on a cluster). A worker that cannot read an input fails
that input with a one-line error naming the worker; the other inputs go on.
"""

from __future__ import annotations

import logging
import os
import threading
import time
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager, suppress
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import TYPE_CHECKING

from paser.errors import ConfigError, DataError, PaserError
from paser.runtime import holding_out, keep_freed_memory
from paser.segment import (
    SUMMARY,
    Segmented,
    SummaryLog,
    _Inputs,
    claim_for,
    claim_of,
    finished,
    record_names,
    segment_image,
    write_here,
    write_summary,
)
from paser.volumes import (
    CHUNK,
    VOLUMES_CSV,
    Volume,
    VolumeInterrupted,
    VolumeResult,
    _write_csv,
    chunks_to_do,
    discard,
    failure,
    finish_volume,
    is_write_error,
    prepare_volume,
    segment_chunk,
    started,
)

if TYPE_CHECKING:
    from paser.calibration import Calibration

#: image files per task
BATCH = 8


def _distributed():
    try:
        import distributed
    except ImportError:
        raise ConfigError("--scheduler needs Dask distributed: pip install 'paser[dask]'"
                          ) from None
    return distributed


@dataclass(frozen=True)
class RunSpec:
    """What a worker loads: a run (``paser.PaSeR.load`` or ``load_onnx``), on ``device``
    (``auto``: this worker's GPU when it has one), routed with ``calibration`` and capped at
    ``max_gflops_per_mp`` (:meth:`paser.PaSeR.cap`).

    ``calibration`` is the client's, computed there once (a budget of this call) or read
    there (the run's saved one): :func:`segment_on_cluster` puts its model's here, so every
    worker routes with the bias the output folder's claim names, whatever its device, and
    no worker calibrates or reads ``calibration.json`` (``None``: no calibration)."""

    run_dir: str
    device: str = "auto"
    engine: str = "torch"
    onnx: str | None = None
    threads: int | None = None  # of each model call; None: the worker's threads
    max_gflops_per_mp: float | None = None  # the cap (:meth:`paser.PaSeR.cap`)
    # (a Calibration holds lists: compared, not hashed, as a key of the workers' cache)
    calibration: Calibration | None = field(default=None, hash=False)

    def load(self):
        from paser import PaSeR

        if self.engine == "onnxruntime":
            model = PaSeR.load_onnx(self.run_dir, self.onnx, calibrated=False)
        else:
            model = PaSeR.load(self.run_dir, device=self.worker_device(), calibrated=False)
        if self.calibration is not None and self.calibration.policy not in (
                "", model.router.policy_digest):
            raise ConfigError(f"{self.run_dir}: the run this worker reads has another policy "
                              "than the client's (trained again, or another copy): give the "
                              "workers the client's run folder at the same path")
        model.calibration = self.calibration
        model.cap(self.max_gflops_per_mp)
        return model

    def worker_device(self, index: int | None = None, gpus: int | None = None) -> str:
        """``auto`` on a worker that sees several GPUs (``local:N`` on a machine of N GPUs)
        is GPU ``index mod gpus``, ``index`` the worker's number (``local:N`` names them 0 ..
        N-1): one worker per GPU. A worker that sees one (``dask-cuda`` gives each its own)
        takes it; anything else is as asked."""
        if self.device != "auto":
            return self.device
        if gpus is None:
            import torch

            gpus = torch.cuda.device_count()
        if gpus <= 1:
            return "auto"
        if index is None:
            from distributed import get_worker

            name = get_worker().name
            index = name if isinstance(name, int) else sum(map(ord, str(name)))
        return f"cuda:{index % gpus}"


_MODELS: dict[RunSpec, tuple] = {}
_LOADING = threading.Lock()


def worker_model(spec: RunSpec):
    """The run ``spec`` names, loaded once per process (the first task on a worker loads
    it, the others reuse it), and the lock its calls take: one model call at a time per
    worker (f0's Monte Carlo masks are drawn from a seeded global generator), on all of the
    worker's threads."""
    with _LOADING:
        if spec not in _MODELS:
            keep_freed_memory(ignore=_dask_malloc())
            _MODELS[spec] = (spec.load(), threading.Lock())
        return _MODELS[spec]


def _dask_malloc() -> tuple[str, ...]:
    """``MALLOC_TRIM_THRESHOLD_`` when it is what Dask's nanny sets for every worker
    (``distributed.nanny.pre-spawn-environ``), not the user's choice: paser keeps freed
    memory on its workers as it does everywhere (glibc trimming at each free made a worker
    2 x slower on the demo's 1,024 x 1,024 slices) and gives it back between slices
    (:func:`paser.runtime.release_freed_memory`). ``PASER_SYSTEM_MALLOC=1`` opts out."""
    import dask

    value = dask.config.get("distributed.nanny.pre-spawn-environ", {}).get(
        "MALLOC_TRIM_THRESHOLD_")
    if value is not None and os.environ.get("MALLOC_TRIM_THRESHOLD_") == str(value):
        return ("MALLOC_TRIM_THRESHOLD_",)
    return ()


def _worker_threads() -> int:
    try:
        from distributed import get_worker

        return int(get_worker().state.nthreads)
    except (ImportError, ValueError, AttributeError):
        return 1


def worker_name() -> str:
    """This Dask worker's name (``local:N`` workers are 0 .. N-1) and address, or its
    address alone when it has no other name."""
    from distributed import get_worker

    w = get_worker()
    return w.address if str(w.name) == w.address else f"{w.name} ({w.address})"


class _Locked:
    """A model whose ``segment`` and ``cost_table`` take the worker's lock, ``segment``
    on ``threads`` (torch's intra-op threads are set per calling thread, and Dask calls
    from several); all else as the model."""

    def __init__(self, model, lock: threading.Lock, threads: int | None):
        self._model, self._lock = model, lock
        self._threads = threads or max(1, _worker_threads())

    def segment(self, *args, **kwargs):
        import torch

        with self._lock:
            torch.set_num_threads(self._threads)
            return self._model.segment(*args, **kwargs)

    def cost_table(self, *args):  # counting runs the models too (their modes, hooks)
        with self._lock:
            return self._model.cost_table(*args)

    def __getattr__(self, name):
        return getattr(self._model, name)


class _NotReached(DataError):
    """A worker could not read or write a chunk's files (a path it does not see, a full
    disk): not the data's fault, so the volume's finished chunks are kept, as a local run
    keeps them on such an ``OSError``."""


def _volume_chunk(spec: RunSpec, volume: Volume, z0: int, z1: int, out_dir: str,
                  only: int | None, claim: str | None = None) -> list[dict]:
    """A task: slices ``z0 .. z1 - 1`` of ``volume`` segmented on this worker, written only
    while ``out_dir`` is still the folder of ``claim`` (:func:`_still_claimed`)."""
    model, lock = worker_model(spec)
    name = worker_name()
    labels = None
    _still_claimed(Path(out_dir), claim)
    try:
        if volume.label_format == "zarr":
            import zarr

            labels = zarr.open_array(str(Path(out_dir) / f"{volume.stem}_labels.zarr"),
                                     mode="r+")
        return segment_chunk(_Locked(model, lock, spec.threads), volume, z0, z1,
                             Path(out_dir), labels, only, worker=name,
                             before_writing=lambda: _still_claimed(Path(out_dir), claim))
    except StartedOver:
        raise
    except DataError:
        unseen = [f for f in volume.files[z0:z1] if not Path(f).exists()]
        if unseen:  # a --stack slice this worker does not see: not the data's fault
            raise _NotReached(f"{volume.source}: worker {name} cannot see {unseen[0]}; the "
                              "workers need the inputs at the same paths as the client"
                              ) from None
        raise
    except OSError as err:
        if is_write_error(err, Path(out_dir), volume):
            raise _NotReached(f"{volume.source}: worker {name} could not write slices "
                              f"{z0}..{z1 - 1} into {out_dir} ({err.strerror or err}); the "
                              "chunks finished are kept: run the same command again once the "
                              "folder can be written") from None
        raise _NotReached(f"{volume.source}: worker {name} cannot read or write slices "
                          f"{z0}..{z1 - 1} ({err}); the workers need the inputs and --out at "
                          "the same paths as the client") from None


class StartedOver(_NotReached):
    """A task of a call whose output folder another call has started over since
    (``--overwrite``): what it made is not written there."""


def _still_claimed(out_dir: Path, claim: str | None) -> None:
    """Raise :class:`StartedOver` where ``out_dir`` is no longer the folder of ``claim`` (the
    claim the task was sent under; ``None``: not checked). A Dask worker cannot stop a task
    under way: stopped, its client is gone and the task runs on, and ``--overwrite`` at once
    with other settings took its labels (old settings, written into the new folder after its
    claim) as done; every chunk and image is checked before it is written."""
    if claim is not None and claim_of(out_dir) != claim:
        raise StartedOver(f"{out_dir} was started over by another call since this task was "
                          "sent (--overwrite); its outputs are not written there")


def _image_batch(spec: RunSpec, files: list[str], out_dir: str, only: int | None,
                 previews: bool = True, claim: str | None = None) -> list[Segmented]:
    """A task: image files segmented on this worker, their outputs written as locally,
    while ``out_dir`` is still the folder of ``claim`` (:func:`_still_claimed`)."""
    model, lock = worker_model(spec)
    name = worker_name()
    data = _Inputs([Path(f) for f in files], model.config.models.in_channels,
                   model.intensity)
    out = []
    for i, f in enumerate(files):
        before = finished(Path(out_dir), Path(f), previews)
        if before is not None:  # this task run again (a worker died in it): done already
            before.resumed = False  # (by this call)
            out.append(before)
            continue
        item = data[i]
        if isinstance(item, DataError) and not Path(f).exists():
            item = DataError(f"{f}: worker {name} cannot see this file; the workers need "
                             "the inputs at the same paths as the client")
        res, args = segment_image(_Locked(model, lock, spec.threads), Path(f), item,
                                  Path(out_dir), only, worker=name, previews=previews)
        if args is not None:
            _still_claimed(Path(out_dir), claim)
            write_here(res, args)
        res.ok = not res.error
        out.append(res)
    return out


@contextmanager
def connect(scheduler: str, timeout: float = 30.0) -> Iterator:
    """A :class:`distributed.Client` on ``scheduler``: ``local:N`` starts (and at the end
    stops) a local cluster of N processes of one thread; else the address of a running
    scheduler, which must answer within ``timeout`` seconds."""
    distributed = _distributed()
    if scheduler.startswith("local:"):
        n = scheduler.split(":", 1)[1]
        if not n.isdigit() or int(n) < 1:
            raise ConfigError(f"--scheduler {scheduler}: give local:N with N >= 1 workers")
        with distributed.LocalCluster(n_workers=int(n), threads_per_worker=1, processes=True,
                                      dashboard_address=None) as cluster, \
                distributed.Client(cluster) as client:
            # the workers paser starts print to this terminal: paser's own failures once
            client.register_plugin(quiet_paser_failures())
            yield client
        return
    _speaks_dask(scheduler, timeout)
    try:
        client = distributed.Client(scheduler, timeout=timeout)
    except (OSError, TimeoutError, ValueError) as err:
        raise ConfigError(f"--scheduler {scheduler}: no Dask scheduler answered ({err}); "
                          "start one (`dask scheduler`), or use local:N") from None
    with client:
        yield client


def _speaks_dask(scheduler: str, timeout: float) -> None:
    """Refuse a plain-TCP address where something listens but says nothing: a Dask scheduler
    sends its handshake as soon as it accepts a connection, while a web server (a `paser
    serve`, the dashboard) waits for a request, and ``distributed.Client`` then waited on it
    for good, past its ``timeout``. Nothing listening is left to the Client (a scheduler may
    be starting); ``tls://`` and other transports are left to it too."""
    import socket

    from distributed.comm import parse_address, parse_host_port

    try:
        scheme, where = parse_address(scheduler)
        host, port = parse_host_port(where)
    except ValueError:
        return  # the Client says what is wrong with it
    if scheme != "tcp":
        return
    try:
        with socket.create_connection((host, port), timeout=timeout) as sock:
            sock.settimeout(timeout)
            if sock.recv(1):
                return
            said = "closed the connection without a word"
    except TimeoutError:
        said = f"said nothing in {timeout:g} s"
    except OSError:
        return
    raise ConfigError(f"--scheduler {scheduler}: something listens there but it is not a Dask "
                      f"scheduler (it {said}: a web server, the dashboard's port?); give the "
                      "address `dask scheduler` prints (tcp://host:8786 by default)")


class _PaserFailures(logging.Filter):
    """Drops Dask's "Compute Failed" record of a task that raised a :class:`PaserError`: a
    volume's NaN voxels, a path a worker cannot see. The client says each in one line;
    Dask's record adds ten lines of key, task and traceback before it. A task that raised
    anything else keeps its record: its traceback is nowhere else."""

    def filter(self, record: logging.LogRecord) -> bool:
        args = record.args if isinstance(record.args, tuple) else ()
        if not str(record.msg).startswith("Compute Failed") or len(args) < 4:
            return True
        # (Dask logs the exception as its repr: ClassName(...))
        return not str(args[3]).startswith(tuple(f"{name}(" for name in _paser_errors()))


def _paser_errors(kind: type = PaserError) -> set[str]:
    """The names of :class:`PaserError` and every subclass of it."""
    return {kind.__name__, *(n for sub in kind.__subclasses__() for n in _paser_errors(sub))}


def quiet_paser_failures():
    """A Dask worker plugin (``client.register_plugin``) that puts :class:`_PaserFailures`
    on the worker's ``distributed.worker`` logger, also of a worker its nanny starts again.
    ``local:N`` registers it: its workers print to the terminal of the command. A running
    scheduler's workers log as their operator set them. (Made here, not at import: Dask is
    an extra, and a plugin must be a :class:`distributed.WorkerPlugin`.)"""
    from distributed import WorkerPlugin

    class QuietPaserFailures(WorkerPlugin):
        name = "paser-quiet-failures"
        idempotent = True

        def setup(self, worker) -> None:
            logger = logging.getLogger("distributed.worker")
            if not any(isinstance(f, _PaserFailures) for f in logger.filters):
                logger.addFilter(_PaserFailures())

        def teardown(self, worker) -> None:
            logger = logging.getLogger("distributed.worker")
            for f in [f for f in logger.filters if isinstance(f, _PaserFailures)]:
                logger.removeFilter(f)

    return QuietPaserFailures()


@dataclass
class ClusterResults:
    """What a cluster call gives back: the images' and the volumes' outcomes, and the
    workers that took part."""

    images: list[Segmented]
    volumes: list[VolumeResult]
    workers: list[str]
    #: seconds from the first task sent to the last image back: the images' time, the
    #: workers' loading of the run included (the cluster's start and the volumes' chunks,
    #: sent after them, are not theirs)
    image_seconds: float = 0.0


def _slices_done(vol: Volume, todo: Sequence[tuple[int, int]]) -> int:
    """How many of ``vol``'s slices are done: those outside the chunks ``todo``
    (:func:`paser.volumes.chunks_to_do`: the chunks whose records are not on disk)."""
    return vol.depth - sum(z1 - z0 for z0, z1 in todo)


@holding_out
def segment_on_cluster(client, spec: RunSpec, model, files: Sequence[Path],
                       volumes: Sequence[Volume], out_dir: str | Path,
                       only: int | None = None, overwrite: bool = False, chunk: int = CHUNK,
                       batch: int = BATCH,
                       on_progress: Callable[[int, int, str], None] | None = None,
                       previews: bool = True) -> ClusterResults:
    """Segment ``files`` and ``volumes`` into ``out_dir`` on the cluster of ``client``, as
    :func:`paser.segment.segment_files` and :func:`paser.volumes.segment_volumes` do here:
    the same outputs, records and resume (module doc). ``model`` is the run loaded here
    (for the folder's settings and the volumes' records; it segments nothing): its
    calibration and cap go to the workers in ``spec`` (:class:`RunSpec`, whose own are
    replaced), so they route as the folder's claim says. ``on_progress(slices, voxels,
    what)`` as each task finishes (an image is one slice; ``voxels`` 0 for what an earlier
    call did)."""
    distributed = _distributed()
    out_dir = Path(out_dir)
    spec = replace(spec, calibration=model.calibration, max_gflops_per_mp=model.router.cap_per_mp)
    names = record_names(model)
    claim_for(out_dir, model, only, overwrite, files, volumes)
    claim = claim_of(out_dir)  # each task writes only while the folder is this call's
    start = time.perf_counter()
    futures: dict = {}
    vols: list[VolumeResult] = []
    sizes: list[int] = []  # slices per chunk of each volume
    waiting: dict[str, set] = {}
    spoilt: set[int] = set()  # volumes a chunk of which failed on its data
    workers: set[str] = set()
    last_image = start
    # Ctrl-C from here on (a volume's preparation or assembly as well): what finished is
    # kept, said with its slices, and what went out is cancelled
    try:
        # images: those finished before are reported, the rest go out in batches
        images: list[Segmented | None] = [finished(out_dir, f, previews) for f in files]
        slot = {str(f): i for i, f in enumerate(files)}
        for r in images:
            if r is not None and on_progress is not None:
                on_progress(1, 0, r.stem)  # done before
        todo = [str(f) for f, r in zip(files, images, strict=True) if r is None]
        summary = SummaryLog(out_dir / SUMMARY, names) if files else None
        for i in range(0, len(todo), batch):
            part = todo[i:i + batch]
            fut = client.submit(_image_batch, spec, part, str(out_dir), only, previews,
                                claim, pure=False)
            futures[fut] = ("images", part)

        def volume_done(index: int) -> None:
            vol, res = volumes[index], vols[index]
            if res.error:
                return
            try:
                res.record = finish_volume(model, vol, out_dir, sizes[index], only,
                                           time.perf_counter() - start, on_progress)
                workers.update(res.record.get("workers", []))
            except (PaserError, OSError, ValueError) as err:
                res.error = failure(vol, err)
                if isinstance(err, DataError):
                    discard(vol, out_dir)  # as segment_volumes: no half label volume
            # as segment_volumes: the volumes that ended so far, should the call be stopped
            with suppress(OSError):  # (the last write says it)
                _write_csv(out_dir / VOLUMES_CSV, [v for v in vols if v.record is not None
                                                   or v.error])

        # volumes: the finished ones are read, the chunks still to do go out
        for vol in volumes:
            res = started(vol, out_dir, on_progress)
            vols.append(res)
            sizes.append(chunk)
            if res.error or res.record is not None:
                continue
            try:
                size = prepare_volume(vol, out_dir, chunk, model.intensity)[1]
            except (PaserError, OSError, ValueError) as err:
                res.error = failure(vol, err)
                continue
            sizes[-1] = size
            todo_chunks = chunks_to_do(vol, out_dir, size)
            done_slices = _slices_done(vol, todo_chunks)
            if done_slices and on_progress is not None:
                on_progress(done_slices, 0, vol.stem)  # done before
            waiting[vol.stem] = set()
            for z0, z1 in todo_chunks:
                fut = client.submit(_volume_chunk, spec, vol, z0, z1, str(out_dir), only,
                                    claim, pure=False)
                futures[fut] = ("chunk", (len(vols) - 1, z0, z1))
                waiting[vol.stem].add(fut)
            if not todo_chunks:  # stopped after its last chunk: only the assembly is left
                volume_done(len(vols) - 1)
        running = distributed.as_completed(list(futures))
        for fut in running:
            kind, what = futures.pop(fut)
            error, raised = _error(fut)
            if kind == "images":
                done = fut.result() if error is None else []
                for f in what if error is not None else ():
                    # a task that failed whole (its workers killed by one of its images, say):
                    # what it finished is kept, and the rest go out one by one, so that only
                    # the image at fault fails, named (a PaserError is every image's: the run)
                    res = finished(out_dir, Path(f), previews)
                    if res is not None:
                        res.resumed = False  # (by this call)
                        done.append(res)
                    elif len(what) > 1 and not isinstance(raised, PaserError):
                        alone = client.submit(_image_batch, spec, [f], str(out_dir), only,
                                              previews, claim, pure=False)
                        futures[alone] = ("images", [f])
                        running.add(alone)
                    else:
                        done.append(Segmented(f, Path(f).stem, ok=False, error=f"{f}: {error}"))
                last_image = time.perf_counter()
                for res in done:
                    images[slot[res.input]] = res
                    if res.worker:
                        workers.add(res.worker)
                    summary.append(res)
                    if on_progress is not None:
                        on_progress(1, res.height * res.width, res.stem)
                continue
            index, z0, z1 = what
            vol, res = volumes[index], vols[index]
            if error is not None and not res.error:
                res.error = failure(vol, error)
            if isinstance(raised, DataError) and not isinstance(raised, _NotReached):
                spoilt.add(index)
            waiting[vol.stem].discard(fut)
            if on_progress is not None:
                on_progress(z1 - z0, (z1 - z0) * vol.plane[0] * vol.plane[1], vol.stem)
            if not waiting[vol.stem]:
                if index in spoilt:  # its data's fault (NaN voxels, say): a rerun fails the
                    # same way, so, as segment_volumes, no half label volume is left (once
                    # every chunk is back: none of them writes after this)
                    discard(vol, out_dir)
                volume_done(index)
    except KeyboardInterrupt as err:  # Ctrl-C here: the chunks the workers finished are kept
        kept = [(vol, _slices_done(vol, chunks_to_do(vol, out_dir, size)))
                for vol, res, size in zip(volumes, vols, sizes, strict=False)
                if vol.stem in waiting and res.record is None]  # (their records, on disk)
        if kept:
            raise VolumeInterrupted.keeping(kept) from err
        raise
    finally:
        for fut in futures:
            fut.cancel()
    if files:
        write_summary(out_dir / SUMMARY, images, names)
    if volumes:
        _write_csv(out_dir / VOLUMES_CSV, vols)
    return ClusterResults(images, vols, sorted(workers), last_image - start)


def _error(fut) -> tuple[str | None, Exception | None]:
    """A finished future's failure as one line (``None``: it succeeded), and what it raised.
    A task whose workers died too often (``KilledWorker``) says so."""
    if fut.status == "finished":
        return None, None
    try:
        fut.result()
    except PaserError as err:
        return str(err), err
    except Exception as err:  # noqa: BLE001 - anything a task raised, reported as its input's
        kind = type(err).__name__
        if kind == "KilledWorker":
            return ("its worker died each time it ran (KilledWorker); see the workers' logs, "
                    "for example for memory"), err
        return f"{kind}: {err}".splitlines()[0], err
    return f"task {fut.status}", None
