"""Segment image files with a trained run: what ``paser segment`` does.

Per input image ``<stem>``, written to the output folder:

- ``<stem>_labels.png``: the label map in the run's own codec (its ``classes.yaml``: the
  values of your folder data's ``classes.yaml``, Cityscapes' label ids, the battery codec
  pore 0, carbon 255, nickel 128), so the dataset's own reader reads it back;
- ``<stem>_overlay.png``: the image with the classes in colour;
- ``<stem>_routing.png``: the image with each patch tinted by the model that segmented it
  (dark: a patch sent to the remote tier that did not answer, which kept f0's prediction);
- ``<stem>.json``: the actions per patch, GFLOP, milliseconds, the FLOP convention,
  notes on any conversion of the input and, with a remote tier, the bytes sent against
  the whole image's and the degraded patches;

and ``summary.csv`` with one row per input, failures included.
"""

from __future__ import annotations

import csv
import difflib
import errno
import hashlib
import itertools
import json
import os
import re
import shutil
import time
import uuid
from collections.abc import Callable, Sequence
from concurrent.futures.process import BrokenProcessPool
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from paser.cost import FLOP_CONVENTION
from paser.data.folders import ClassMap
from paser.data.images import (
    READABLE_SUFFIXES,
    Intensity,
    as_input,
    image_files,
    read_array,
    shared_stem,
    skipped_note,
    unread_files,
)
from paser.data.tiles import narrow
from paser.errors import ConfigError, DataError, PaserError, RemoteAccessError
from paser.patches import PatchGrid
from paser.runtime import (
    atomic_write_text,
    detached_readers,
    detached_worker,
    file_sha256,
    from_readers,
    holding_out,
    replaced,
    worker_context,
)

SUFFIXES = READABLE_SUFFIXES
CLASS_COLOURS = np.array([[31, 119, 180], [255, 200, 40], [214, 39, 40], [44, 160, 44],
                          [148, 103, 189], [140, 86, 75], [227, 119, 194], [127, 127, 127]],
                         dtype=np.float32)  # pore blue, carbon yellow, nickel red, ...
MODEL_COLOURS = np.array([[44, 160, 44], [255, 127, 14], [214, 39, 40], [148, 103, 189],
                          [23, 190, 207]], dtype=np.float32)  # f0 green, f1 orange, f2 red
DEGRADED_COLOUR = np.array([0, 0, 0], dtype=np.float32)  # a remote patch that kept f0's


def find_images(inputs: Sequence[str | Path], exclude: str | Path | None = None) -> list[Path]:
    """Image files named directly or found (recursively) in folders, in order, each once
    however spelt; hidden files and folders, and what lies under ``exclude`` (the output
    folder), left out.

    Raises :class:`DataError` for a path that does not exist, for no image at all, and for
    two inputs with the same file stem (their outputs would overwrite each other).
    """
    files: list[Path] = []
    skip = None if exclude is None else Path(exclude)
    for item in inputs:
        path = Path(item)
        if path.is_dir():
            if skip is not None and (path.resolve() == skip.resolve()
                                     or skip.resolve() in path.resolve().parents):
                raise DataError(f"{path}: the input folder is --out ({skip}) or inside it, where "
                                "the outputs are written; give an --out outside the inputs")
            files += image_files(path, SUFFIXES, recursive=True, exclude=skip)
        elif path.is_file():
            files.append(path)
        else:
            raise not_there(path)
    if not files:
        unread = skipped_note([f for i in inputs if Path(i).is_dir()
                               for f in unread_files(Path(i), recursive=True)])
        raise DataError(f"no image ({', '.join(SUFFIXES)}) in {', '.join(map(str, inputs))}; "
                        + (unread or "give image files or folders that contain them"))
    # each folder resolved once: 50,000 images resolved one by one took 3.6 s, this 0.5 s
    folders: dict[str, str] = {}

    def where(file: Path) -> str:
        folder, name = os.path.split(str(file))
        if folder not in folders:
            folders[folder] = os.path.realpath(folder or ".")
        return os.path.join(folders[folder], name)

    files = once(files, where)
    one_output_each(((f.stem, str(f)) for f in files),
                    datasets=[Path(i) for i in inputs if Path(i).is_dir()])
    return files


def once(items: Sequence, key: Callable) -> list:
    """``items`` in order, each ``key`` once (its first): an input given twice, however
    spelt (relative and absolute, a folder and a file in it), is one input, not two of
    one stem whose outputs would overwrite each other."""
    first: dict = {}
    for item in items:
        first.setdefault(key(item), item)
    return list(first.values())


def not_there(spec: str | Path) -> DataError:
    """The error of an input path that is not there, naming the one beside it that its name
    is closest to, where one is close (``scn.tif`` for ``scan.tif``, ``recon.zar``, an HDF5
    file's name mistyped before its ``:/key``)."""
    file, colon, key = str(spec).partition(":/")
    path = Path(file)
    near = None
    if path.name and path.parent.is_dir():
        names = [p.name for p in path.parent.iterdir() if not p.name.startswith(".")]
        near = next(iter(difflib.get_close_matches(path.name, names, n=1, cutoff=0.85)), None)
    return DataError(f"{spec}: no such file or folder" + (
        f"; did you mean {path.parent / near}{colon}{key}?" if near else ""))


def _images_of(folder: Path) -> Path | None:
    """The images to segment in a training dataset ``folder`` (its masks are images too,
    of the same names: segmented with them, their outputs would clash): ``images/``,
    ``test/images/`` or ``test_images/``; None where ``folder`` is no dataset."""
    if (folder / "masks").is_dir():
        return folder / "images"
    for split in ("test", "validation", "val", "train"):
        if (folder / split / "masks").is_dir():
            return folder / split / "images"
        if (folder / f"{split}_label").is_dir():
            return folder / f"{split}_images"
    return None


def one_output_each(named, datasets: Sequence[Path] = ()) -> None:
    """Inputs as ``(stem, source)``: two sources of one stem are a :class:`DataError` (their
    outputs, named by the stem, would overwrite each other). Where one of the folders given
    (``datasets``) is a training dataset, whose masks share their images' names, the error
    says to give its images instead."""
    named = list(named)
    twice = shared_stem(named)
    if twice is not None:
        stem, first, second = twice
        for folder in datasets:
            images = _images_of(folder)
            if images is not None:
                raise DataError(
                    f"{folder}: a dataset folder, its masks beside its images ({first} and "
                    f"{second} share the stem '{stem}'); paser segment reads every image "
                    f"under a folder, masks included: give the images to segment, e.g. "
                    f"{images}")
        sources: dict[str, set[str]] = {}
        for name, source in named:
            sources.setdefault(name, set()).add(source)
        more = sorted(name for name, of in sources.items() if len(of) > 1 and name != stem)
        also = (f" (so do {len(more)} more stems: {', '.join(repr(m) for m in more[:5])}"
                f"{' ...' if len(more) > 5 else ''})" if more else "")
        raise DataError(f"{first} and {second} have the same stem '{stem}'{also}: their "
                        "outputs would overwrite each other; rename one or segment them "
                        "separately")


def read_input(path: str | Path, channels: int, intensity: Intensity = Intensity()
               ) -> tuple[np.ndarray, list[str]]:
    """An image file as float32 ``[channels, H, W]`` in [0, 1], and notes on what was done:
    the one reader of training and inference (:func:`paser.data.images.read_image`, scaled
    by the run's ``intensity``), and a note where 8/16-bit pixels are not scaled as a
    run's float training images were (:meth:`Intensity.unlike_training`)."""
    notes: list[str] = []
    arr = read_array(path, notes)
    unlike = intensity.unlike_training(arr.dtype)
    if unlike is not None:
        notes.append(unlike)
    return as_input(arr, channels, intensity, path, notes), notes


@dataclass
class Segmented:
    """One input's outcome: ``ok`` with its figures, or ``error``."""

    input: str
    stem: str
    ok: bool
    error: str = ""
    height: int = 0
    width: int = 0
    gflops: float = 0.0
    ms: float = 0.0
    fractions: list[float] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)
    degraded: int = 0
    bytes_sent: int | None = None
    bytes_whole: int | None = None
    remote_errors: list[str] = field(default_factory=list)  # why patches were degraded
    resumed: bool = False  # segmented by an earlier call into the same folder
    worker: str = ""  # the Dask worker that segmented it (paser.cluster)


#: rows of an overlay blended at a time: a large image's previews hold a few rows of
#: floats at once, not three of the image's planes
_BLEND_ROWS = 256


def _blend(gray: np.ndarray, palette: np.ndarray, index, alpha: float) -> np.ndarray:
    """``gray`` [H, W] in [0, 1] under the colours ``palette[index(r0, r1)]`` of each block
    of rows (``index`` gives ``[r1 - r0, W]`` indices into ``palette`` [n, 3]), as uint8 RGB."""
    h, w = gray.shape
    out = np.empty((h, w, 3), np.uint8)
    for r0 in range(0, h, _BLEND_ROWS):
        r1 = min(h, r0 + _BLEND_ROWS)
        base = gray[r0:r1, :, None] * 255.0
        out[r0:r1] = np.clip((1 - alpha) * base + alpha * palette[index(r0, r1)], 0, 255)
    return out


def write_outputs(out_dir: Path, stem: str, image: np.ndarray | None, mask: np.ndarray,
                  actions: np.ndarray, grid: PatchGrid, codec: ClassMap,
                  degraded: np.ndarray | None = None, previews: bool = True) -> dict:
    """The label PNG (class indices ``mask`` written in ``codec``), the overlay and the
    routing map of one image (not with ``previews`` False, when ``image`` may be None:
    only the previews draw it); their file names. Degraded
    patches (``degraded``, bool per patch) are dark in the routing map."""
    h, w = mask.shape
    labels = codec.encode(mask)
    if not previews:
        save_png(labels, out_dir / f"{stem}_labels.png")
        for kind in ("overlay", "routing"):  # an earlier call's, which no longer match
            (out_dir / f"{stem}_{kind}.png").unlink(missing_ok=True)
        return {"labels": f"{stem}_labels.png"}
    gray = image.mean(0)
    overlay = _blend(gray, CLASS_COLOURS, lambda r0, r1: mask[r0:r1] % len(CLASS_COLOURS),
                     0.45)
    ph, pw = grid.patch_size(h, w)  # of the padded image, as routing placed them
    colours = MODEL_COLOURS[actions % len(MODEL_COLOURS)]
    if degraded is not None:
        colours[degraded] = DEGRADED_COLOUR
    columns = np.arange(w) // pw  # each pixel's patch, row-major as grid.patch_map puts it
    routing = _blend(gray, colours, lambda r0, r1: (np.arange(r0, r1) // ph)[:, None]
                     * grid.cols + columns, 0.4)
    routing[np.arange(ph, h, ph)] = 255  # patch borders
    routing[:, np.arange(pw, w, pw)] = 255
    names = {"labels": f"{stem}_labels.png", "overlay": f"{stem}_overlay.png",
             "routing": f"{stem}_routing.png"}
    save_png(labels, out_dir / names["labels"])
    for key, pixels in (("overlay", overlay), ("routing", routing)):  # previews: fast zlib
        save_png(pixels, out_dir / names[key], level=PREVIEW_ZLIB)
    return names


#: zlib level of the previews (overlay, routing map): Pillow's default 6 took 410 to 430 ms
#: for a 1,500 x 1,100 overlay against 100 to 120 ms at 1, for a file at most 13 % larger
#: (a noisy overlay; some came out smaller); the labels keep the default (40 % smaller)
PREVIEW_ZLIB = 1


def save_png(pixels: np.ndarray, path: Path, level: int = 6) -> None:
    """A PNG written whole or not at all (a temporary file renamed into place), at zlib
    ``level``."""
    with replaced(path) as tmp:
        Image.fromarray(pixels).save(tmp, format="PNG", compress_level=level)


class _Inputs(torch.utils.data.Dataset):
    """The input files, read by :func:`read_input` (in reader processes when asked for): an
    item is ``(image, notes, seen)``, or the :class:`DataError` that reading raised.
    ``seen``: the file's :func:`file_stat` and SHA-256, taken before its pixels are read, so
    that a file written again meanwhile is recorded as what it was before (and done again
    by the next call), never as what it is after (and skipped with labels of the old)."""

    def __init__(self, files: Sequence[Path], channels: int, intensity: Intensity):
        self.files, self.channels, self.intensity = list(files), channels, intensity

    def __len__(self) -> int:
        return len(self.files)

    def __getitem__(self, i: int):
        path = self.files[i]
        try:
            try:
                seen = (file_stat(path), file_sha256(path))
            except OSError as err:  # the reader says what is wrong with it; else this does
                read_input(path, self.channels, self.intensity)
                raise DataError(f"{path}: cannot read the file ({err})") from None
            return (*read_input(path, self.channels, self.intensity), seen)
        except DataError as err:  # handed back whole: the loader would wrap it in a traceback
            return err


#: the setting that reads and writes in this process, no worker processes
WITHOUT_WORKERS = "--workers 0 (workers=0 in Python)"


def _inputs(files: Sequence[Path], channels: int, intensity: Intensity, workers: int):
    """The files' ``(image, notes)`` in order, read ahead by ``workers`` processes."""
    data = _Inputs(files, channels, intensity)
    if not workers:
        return (data[i] for i in range(len(data)))
    ctx = worker_context(workers, ["paser.segment"], WITHOUT_WORKERS)
    return from_readers(torch.utils.data.DataLoader(
        data, batch_size=None, num_workers=workers, prefetch_factor=4,
        multiprocessing_context=ctx, collate_fn=_as_is, generator=torch.Generator(),
        worker_init_fn=detached_readers()), workers,
        without=WITHOUT_WORKERS)


def _as_is(item):
    """The loader's conversion of an item: none (images stay numpy)."""
    return item


def _write(out_dir: Path, stem: str, image: np.ndarray, mask: np.ndarray, actions: np.ndarray,
           grid: PatchGrid, codec: ClassMap, degraded: np.ndarray | None, record: dict,
           previews: bool = True) -> None:
    """One image's PNGs and JSON (in a writer process when there are any); where a write
    fails, none of its files is left (a tool that globs ``*_labels.png`` would take a
    failed image's for done)."""
    done, text = out_dir / f"{stem}.json", None
    try:
        record["outputs"] = write_outputs(out_dir, stem, image, mask, actions, grid, codec,
                                          degraded, previews)
        record["output_bytes"] = {name: output_bytes(out_dir / name)
                                  for name in record["outputs"].values()}
        # the record last: an image is done when its JSON is there (resume reads it)
        text = json.dumps(record, indent=2)
        atomic_write_text(text, done)
    except BaseException:
        try:  # stopped after its record was in place (Ctrl-C): done, kept
            finished_here = text is not None and done.read_text() == text
        except OSError:
            finished_here = False
        if not finished_here:
            for kind in ("labels", "overlay", "routing"):
                (out_dir / f"{stem}_{kind}.png").unlink(missing_ok=True)
        raise


@holding_out
def segment_files(model, files: Sequence[Path], out_dir: str | Path,
                  on_done: Callable[[Segmented], None] | None = None, workers: int = 0,
                  only: int | None = None, overwrite: bool = False,
                  previews: bool = True,
                  on_tiles: Callable[[str, int, int], None] | None = None) -> list[Segmented]:
    """Segment each file with ``model`` (a :class:`paser.PaSeR`), one image at a time; write
    the outputs (the label PNGs and JSONs alone without ``previews``) and ``summary.csv``
    into ``out_dir``. A file that cannot be read or
    segmented is recorded with its error and the rest go on; a remote tier that refuses
    this edge (:class:`paser.errors.RemoteAccessError`) stops them all.

    ``workers`` processes read the next images and others write the finished ones while
    the models run (0: all in this process). ``only=k`` runs model k alone on every image
    instead of routing (:meth:`paser.PaSeR.segment`), to compare on your own data.

    Nothing is lost on interruption: each image's files are written whole (renamed into
    place, its JSON last) and its row is appended to ``summary.csv`` as it finishes. Run
    again on the same ``out_dir``, it skips the images whose JSON is there and segments
    the rest (failed ones again); the folder's ``.paser-segment.json`` says which run and
    settings made it, and other ones are refused (:func:`claim_output`). ``overwrite``
    starts over.
    """
    out_dir = Path(out_dir)
    names = record_names(model)
    claim_for(out_dir, model, only, overwrite, files=files)
    results: list[Segmented | None] = [finished(out_dir, f, previews) for f in files]
    todo = [f for f, r in zip(files, results, strict=True) if r is None]
    for r in results:
        if r is not None and on_done is not None:
            on_done(r)
    summary = SummaryLog(out_dir / SUMMARY, names)
    # one image to do has nothing to overlap with: processes would only cost their memory
    workers = min(workers, len(todo) - 1) if todo else 0
    writer = _writer(workers)
    pending: list = []
    slots = iter([i for i, r in enumerate(results) if r is None])
    try:
        for path, item in zip(todo, _inputs(todo, model.config.models.in_channels,
                                            model.intensity, workers), strict=True):
            res, args = segment_image(model, path, item, out_dir, only, previews=previews,
                                      on_tiles=on_tiles)
            results[next(slots)] = res
            if args is not None and writer is None:
                fatal = write_here(res, args)
                if fatal is not None:
                    raise stop_writing(fatal, res.input, out_dir) from fatal
            held = 0 if args is None or writer is None else sum(
                a.nbytes for a in args[2:4] if a is not None)
            pending.append((res, None if args is None or writer is None
                            else writer.submit(_write, *args), held))
            _report(pending, on_done, summary, workers)  # those written, in order
        _report(pending, on_done, summary)  # the rest, once written
    except BrokenProcessPool as err:  # a writer killed (the OOM killer): said as a reader's is
        raise DataError(f"the writer processes stopped ({err}): one ran out of memory or was "
                        "killed; what finished is kept: run the same command again (with "
                        "--workers 0, workers=0 in Python, this process writes)") from None
    finally:
        if writer is not None:
            writer.shutdown(wait=True, cancel_futures=True)
            try:  # stopped: what the writers finished meanwhile is in the summary too
                for res, future, _ in pending:
                    if future is None or (future.done() and not future.cancelled()
                                          and future.exception() is None):
                        res.ok = future is not None  # (None: it failed, and says why)
                        summary.append(res)
            except OSError:  # a full or read-only disk: the error that stopped it says so
                pass
    write_summary(out_dir / SUMMARY, results, names)  # whole, in the inputs' order
    return results


def routed_by(model, only: int | None) -> dict:
    """What an output's record says routed it: the calibration's target (the run's saved
    one, or this call's budget) and the cap in GFLOP per megapixel (``None`` where there
    is none, and both with one model alone)."""
    routed = only is None
    return {"calibration": model.calibration.target if routed and model.calibration
            is not None else None,
            "cap_gflops_per_mp": model.router.cap_per_mp if routed else None}


def segment_image(model, path: Path, item, out_dir: Path, only: int | None = None,
                  worker: str | None = None, previews: bool = True,
                  on_tiles: Callable[[str, int, int], None] | None = None
                  ) -> tuple[Segmented, tuple | None]:
    """One input read as ``item`` (``(image, notes, seen)`` from :class:`_Inputs`, or the
    :class:`DataError` of its reading) segmented with ``model``: its :class:`Segmented`,
    and the arguments of :func:`_write` for its outputs (``None`` when it failed; ``res.error`` says why). A
    remote tier that refuses this edge (:class:`RemoteAccessError`) is raised: it is the
    same for every image. ``worker`` names the Dask worker in the record."""
    router, cfg = model.router, model.config
    names = record_names(model)
    res = Segmented(str(path), path.stem, ok=False, worker=worker or "")
    try:
        if isinstance(item, DataError):
            raise item
        image, res.notes, seen = item
        res.height, res.width = image.shape[-2:]
        grid = model.grid_for(res.height, res.width)  # the patches it is routed in
        if router.remote is not None:
            router.remote.take()  # this image's transfers only
        # the FLOP table of a new size is counted once (0.7 s on 2 cores), before the timer:
        # `ms` is the image's own compute, not the first image's share of the set-up
        model.cost_table(res.height, res.width)
        start = time.perf_counter()
        out = model.segment(torch.from_numpy(image)[None], only=only, probs=False,
                            on_tiles=None if on_tiles is None else
                            lambda done, total: on_tiles(path.stem, done, total))
        if out.mask.device.type == "cuda":
            torch.cuda.synchronize()
        res.ms = 1000 * (time.perf_counter() - start)
        actions = out.actions[0].cpu().numpy()
        degraded = None if out.degraded is None else out.degraded[0].cpu().numpy()
        res.degraded = 0 if degraded is None else int(degraded.sum())
        res.gflops = float(out.gflops[0])
        # shares of the patches that hold image pixels (padding past it runs no model)
        counts = np.bincount(actions[grid.inside(res.height, res.width).numpy()],
                             minlength=router.num_models)
        res.fractions = (counts / max(counts.sum(), 1)).tolist()
        record = {"input": str(path), "input_path": canonical(str(path)),
                  "input_stat": seen[0], "input_sha256": seen[1],
                  "height": res.height, "width": res.width,
                  "notes": res.notes, "grid": [grid.rows, grid.cols],
                  "patch": list(grid.patch_size(res.height, res.width)),
                  "models": names, "only": None if only is None else names[only],
                  "actions": actions.reshape(grid.rows, grid.cols).tolist(),
                  "patches_per_model": counts.tolist(),
                  "gflops": res.gflops, "flop_convention": FLOP_CONVENTION,
                  "ms": res.ms, "device": str(model.device),
                  "mc_samples": cfg.mc_samples, **routed_by(model, only),
                  "claim": claim_of(out_dir),
                  **({"worker": worker} if worker is not None else {})}
        if router.remote is not None:
            record["remote"] = _remote_record(model, grid, image, out, degraded, res)
        # to the writer process: the labels as bytes (8 times less to copy and hold), the
        # image only where the previews draw it
        return res, (out_dir, path.stem, image if previews else None,
                     narrow(out.mask[0]).cpu().numpy(), actions, grid, model.label_codec,
                     degraded, record, previews)
    except RemoteAccessError:  # the same for every image: stop, and say it once
        raise
    except (PaserError, OSError, RuntimeError, ValueError) as err:
        res.error = str(err) if str(path) in str(err) else f"{path}: {err}"  # name the file
        return res, None


def record_names(model) -> list[str]:
    """``f0 (unet_tiny)``, ``f1 (unet)``, ...: the run's models as records name them."""
    cfg = model.config
    return [f"f0 ({cfg.models.f0.name})"] + [f"f{k} ({m.name})"
                                             for k, m in enumerate(cfg.models.pool, start=1)]


#: what an output folder of ``paser segment`` was made by (:func:`claim_output`)
MANIFEST = ".paser-segment.json"

SUMMARY = "summary.csv"

#: the most bytes of finished images (pixels and labels) waiting for the writer processes
#: before segmenting waits for them: eight 4096 x 4096 images would hold 640 MB
PENDING_BYTES = 256 * 2**20


#: settings :func:`output_settings` gives only where set, so that a folder made before they
#: existed is still resumed: one made with them is not resumed without them
OPTIONAL_SETTINGS = ("cap_gflops_per_mp", "engine")


def output_settings(model, only: int | None) -> dict:
    """What decides an output folder's labels: the run's models and policy (their weights,
    wherever the run folder lies now; ``run`` is its path, kept for the reader), the
    calibration in use and the cap, a single model instead of routing, how inputs are
    scaled, and the engine where it is not PyTorch."""
    from paser.routing import model_digests

    calibration = model.calibration
    manifest = getattr(model.router, "manifest", None)  # an export: its record of them
    digests = model_digests(model.router) if manifest is None else manifest.get("digests")
    models = None if digests is None else hashlib.sha256(
        json.dumps(digests, sort_keys=True).encode()).hexdigest()[:16]
    return {"run": str(Path(model.run_dir).resolve()), "models": models,
            "policy": model.router.policy_digest,
            "calibration_bias": None if calibration is None or only is not None
            else [round(float(b), 8) for b in calibration.bias],
            "only": None if only is None else record_names(model)[only],
            "intensity": model.intensity.to_dict(), "mc_samples": model.config.mc_samples,
            # only where set: a folder of before, made without a cap, is still this one's
            **({"cap_gflops_per_mp": model.router.cap_per_mp}
               if model.router.cap_per_mp is not None and only is None else {}),
            # only where not PyTorch: onnxruntime's outputs differ from it in the last bits
            # (a pixel's class can), so one folder is not made by both
            **({"engine": "onnxruntime"} if manifest is not None else {})}


def settings_digest(settings: dict) -> str:
    """SHA-256 of :func:`output_settings`: what made an output, the run known by its
    weights where they are recorded (wherever its folder lies), else by its path, as
    :func:`claim_output` knows it; two folders of the same run and settings get the same."""
    kept = {k: v for k, v in settings.items()
            if k != "run" or settings.get("models") is None}
    return hashlib.sha256(json.dumps(kept, sort_keys=True).encode()).hexdigest()


def image_markers(out_dir: Path, files: Sequence[Path]) -> list[Path]:
    """What marks ``files`` done in ``out_dir`` (:func:`claim_output`'s markers): their
    records and the summary (none without files: a call of volumes alone keeps it)."""
    return [*(out_dir / f"{Path(f).stem}.json" for f in files), out_dir / SUMMARY] if files else []


def claim_for(out_dir: Path, model, only: int | None, overwrite: bool,
              files: Sequence[Path] = (), volumes: Sequence = ()) -> None:
    """:func:`claim_output` of ``out_dir`` for a call that writes the outputs of ``files``
    and ``volumes`` (one claim over both's markers) with ``model`` (``only``: one model);
    ``overwrite`` removes both summaries, also where the call has no input of their kind.
    The run's classes.yaml is read first: a bad one is refused once, before anything."""
    from paser.volumes import VOLUMES_CSV, volume_markers

    model.label_codec  # noqa: B018  (read once, kept)

    markers = image_markers(out_dir, files) + volume_markers(out_dir, volumes)
    if overwrite:  # both summaries, whatever this call's inputs: the folder starts over,
        # and a row of before lists an input as done that no longer counts as done
        markers += [m for m in (out_dir / SUMMARY, out_dir / VOLUMES_CSV) if m not in markers]
    claim_output(out_dir, output_settings(model, only), overwrite, markers)
    remove_half_written(out_dir)


#: the temporary name an output of paser segment is written under before it is renamed into
#: place (:func:`paser.runtime.replaced`): ``.<name>.tmp``
HALF_WRITTEN = re.compile(
    r"\.(.+(\.json|\.csv|_labels\.png|_overlay\.png|_routing\.png|_labels(\.ome)?\.tif))\.tmp")


def remove_half_written(out_dir: Path) -> None:
    """Remove the temporary files of outputs (:data:`HALF_WRITTEN`) that a killed call left
    half written in ``out_dir``: the call that holds the folder is the only one writing
    there (a label TIFF's, as large as the labels, was kept until the same input was done
    again). Other files are not paser's to remove."""
    for path in out_dir.glob(".*.tmp"):
        if HALF_WRITTEN.fullmatch(path.name) and path.is_file():
            path.unlink(missing_ok=True)


#: a folder's settings by the names a user gives them (``paser segment``'s options), and
#: what an unset one means (and, third, what one unset there may also be), for the refusal
#: of a folder made with other settings
SETTING_NAMES = {"only": ("--model", "routed"), "cap_gflops_per_mp": ("--max-gflops-per-mp", "none"),
                 "calibration_bias": ("calibration", "none"), "mc_samples": ("Monte Carlo samples", None),
                 "intensity": ("intensity window", None),
                 # a folder of before 2026-12-07 recorded no engine, onnxruntime's neither
                 "engine": ("--engine", "torch", "torch or not recorded (a paser before "
                            "2026-12-07)")}


def _differs(key: str, before, now) -> str:
    """``key: <before> there, <now> now``, in the user's words (:data:`SETTING_NAMES`)."""
    name, unset, *there = SETTING_NAMES.get(key, (key, None))
    shown = [unset if v is None and unset is not None else v for v in (before, now)]
    if before is None and there:  # what an unset value there may also be
        shown[0] = there[0]
    return f"{name}: {shown[0]} there, {shown[1]} now"


def claim_output(out_dir: Path, settings: dict, overwrite: bool, markers: Sequence[Path]
                 ) -> None:
    """Make ``out_dir`` this call's: a new folder, or one made with the same ``settings``
    (resume). Another run's or other settings' is refused with what differs; ``overwrite``
    removes the ``markers`` (files and folders: the records that mark an input or a chunk
    done, the summary) first, so that an interrupted overwrite never resumes on the old
    outputs. A new folder and ``overwrite`` get a new claim (:func:`claim_of`), so that no
    record of before (of inputs this call was not given either) counts as done after it."""
    if out_dir.is_symlink() and not out_dir.exists():
        raise ConfigError(f"--out {out_dir} is a link to {os.readlink(out_dir)}, which does "
                          "not exist: create that folder, or give another --out")
    out_dir.mkdir(parents=True, exist_ok=True)
    foreign = next((m for m in markers if m.exists() and not _ours(m)), None)
    if foreign is not None:  # resumed over, written over or removed, it would be lost
        raise DataError(f"{foreign} is not paser's (another tool's file of a name paser "
                        "writes its outputs under); give another --out")
    path = out_dir / MANIFEST
    if path.is_file() and not overwrite:
        try:
            before = json.loads(path.read_text())
            if not isinstance(before, dict):
                raise ValueError("not a JSON object")
        except ValueError as err:  # cut short (a copy, a full disk): what made it is lost
            # (read as empty, it was 'another run (--run-dir None there, ...)')
            raise DataError(f"{path} cannot be read ({err}): which run and settings made "
                            f"the outputs in {out_dir} is not known, so they cannot be "
                            "resumed; give another --out, or --overwrite to start over"
                            ) from None
        # a run is known by its weights (a run folder copied or moved is the same run); a
        # folder made before they were recorded, or by an export that does not record
        # them, by the run's path
        by_weights = settings.get("models") is not None and before.get("models") is not None
        # a setting recorded only where set (the cap) differs where it was set before too
        keys = [*settings, *(k for k in OPTIONAL_SETTINGS if k in before and k not in settings)]
        differ = [k for k in keys if k != ("run" if by_weights else "models")
                  and before.get(k) != settings.get(k)]
        if "only" in differ:  # one model alone has no calibration or cap: said by --model
            differ = [k for k in differ if k not in ("calibration_bias", "cap_gflops_per_mp")]
        if differ:
            other = ("another run" if {"run", "models"} & set(differ) else
                     "this run before its policy was trained again" if "policy" in differ else
                     "other settings")
            if other == "another run":  # its path says which; digests of weights do not
                what = [SETTING_NAMES.get(k, ({"models": "weights"}.get(k, k),))[0]
                        for k in differ if k != "run"]
                again = before.get("run") == settings.get("run")  # one folder, retrained
                if again:
                    other = "this run before it was trained again"
                said = (f"--run-dir {before.get('run')}"
                        + ("" if again else f" there, {settings.get('run')} now")
                        + (f"; {'it differs' if again else 'they differ'} in "
                           f"{', '.join(what)}" if what else ""))
            else:
                said = ", ".join(_differs(k, before.get(k), settings.get(k)) for k in differ)
            raise DataError(
                f"{out_dir} holds the outputs of {other} ({said}"
                "); give another --out, or --overwrite to start over"
                + (f" (--max-gflops-per-mp {before['cap_gflops_per_mp']:g} goes on with this "
                   "folder's cap)" if differ == ["cap_gflops_per_mp"]
                   and before.get("cap_gflops_per_mp") is not None else "")
                # the biases alone do not say why: a recalibration between two calls
                + (" (the run was calibrated again since this folder was begun, or this "
                   "call's --budget-gflops differs from its: calibrated back to the "
                   "folder's target, it goes on)" if differ == ["calibration_bias"] else ""))
        if not by_weights and settings.get("models") is not None:  # made before they were
            atomic_write_text(json.dumps({**before, "models": settings["models"]}, indent=2),
                              path)  # recorded: known by them from now on (its claim kept)
        can_write(out_dir)
        return
    found = [m for m in markers if m.exists()]
    if found and not overwrite:  # paser's outputs, and no record of what made them
        raise DataError(
            f"{out_dir} holds paser's outputs ({found[0].name}"
            f"{' and more' if len(found) > 1 else ''}) but no {MANIFEST} saying which run and "
            "settings made them (an older paser), so they cannot be resumed; give another "
            "--out, or --overwrite to start over")
    if overwrite:
        for marker in markers:
            if marker.is_dir():
                shutil.rmtree(marker)
            else:
                marker.unlink(missing_ok=True)
    atomic_write_text(json.dumps({**settings, "claim": uuid.uuid4().hex}, indent=2), path)


#: how a record of paser's (an image's, a volume's) begins, whatever its indent: a record
#: cut short (a full disk, a copy) still does, and is paser's to do again
RECORD_START = re.compile(r'\{\s*"input"\s*:')

#: how summary.csv and volumes.csv begin (their header's first columns)
SUMMARY_START = "input,status,"


def can_write(out_dir: Path) -> None:
    """Raise the :class:`OSError` of a folder resumed that can no longer be written (made
    read-only, a read-only mount, another user's), before anything is segmented: a call
    resumed into it segmented a whole volume chunk (minutes of a large one) or an image
    before its first write failed. A new folder needs no probe: its manifest is written."""
    import tempfile

    try:
        tempfile.TemporaryFile(dir=out_dir).close()
    except OSError as err:
        raise OSError(err.errno, f"{err.strerror} (what earlier calls finished is kept: run "
                      "the same command again once the folder can be written, or give "
                      "another --out)", str(out_dir)) from None


def _ours(path: Path) -> bool:
    """Whether ``path``, where paser segment writes an output, holds one of paser's: a
    record (of an image or a volume), a summary, a volume's parts; also one of them cut
    short (a full disk, a copy, a power cut), down to an empty file, which holds nothing
    of another tool's to lose and is done again."""
    try:
        if path.suffix == ".json":
            text = path.read_text()
            try:
                return "flop_convention" in json.loads(text)
            except ValueError:  # not whole: paser's where it begins as a record does
                text = text.strip("\0 \t\r\n")  # (a power cut can leave NULs)
                return not text or RECORD_START.match(text) is not None
        if path.suffix == ".csv":
            with open(path, **CSV_TEXT) as fh:
                first = fh.readline()
            # the header whole, or cut off inside it (no line after it)
            return first.startswith(SUMMARY_START) or (
                not first.endswith("\n") and SUMMARY_START.startswith(first))
    except (OSError, ValueError, TypeError):
        return False
    return True


def claim_of(out_dir: Path) -> str:
    """The claim of the call that made ``out_dir`` this run's and settings' (its manifest's;
    ``""`` for a folder made before claims). Every record written into the folder carries
    it, and only records of the folder's claim count as done."""
    try:
        return str(json.loads((out_dir / MANIFEST).read_text()).get("claim", ""))
    except (OSError, ValueError, AttributeError):
        return ""


def taken(record: Path, theirs: str, mine: str) -> str:
    """Why input ``mine`` is not segmented into the folder of ``record``: another input of
    its stem, ``theirs``, has its outputs there (each is kept, not overwritten)."""
    return (f"{mine}: {record} holds the outputs of {theirs}, another input named "
            f"'{Path(record).stem}'; segment this one into another --out (or rename it), "
            "or start the folder over with --overwrite")


def canonical(source: str) -> str:
    """An input's spelling (``file``, ``file.h5:/key``) as an absolute path from here: what
    records keep (``input_path``), so a later call from another folder knows it."""
    text = str(source)
    drive = 2 if len(text) > 2 and text[0].isalpha() and text[1] == ":" and text[2] in "/\\" \
        else 0  # C:/data/f.h5:/entry: the key's ':/' is not the drive's
    at = text.find(":/", drive)
    path, sep, key = (text, "", "") if at < 0 else (text[:at], ":/", text[at + 2:])
    try:
        return str(Path(path).resolve()) + sep + key
    except (OSError, RuntimeError):
        return str(source)


def same_input(a: str, b: str) -> bool:
    """Whether two spellings of an input (``file``, ``file.h5:/key``) name the same one:
    relative or absolute (relative ones from this working folder)."""
    return a == b or canonical(a) == canonical(b)


def recorded_as(rec: dict, source: str) -> bool | None:
    """Whether record ``rec`` is of input ``source``: by the absolute path it keeps, from
    any working folder; a record older than that (``None`` when its relative path does not
    resolve to ``source`` from here: then it is not known, and is done again)."""
    if rec.get("input_path") is not None:
        return rec["input_path"] == canonical(source)
    return True if same_input(str(rec.get("input")), str(source)) else None


def file_stat(path: str | Path) -> list[int]:
    """``[size, mtime_ns]`` of a file: a changed input, cheaply (its content digest is read
    only when this differs)."""
    st = os.stat(path)
    return [st.st_size, st.st_mtime_ns]


def output_bytes(path: Path) -> int:
    """The bytes of an output: a file's size, a folder's (a zarr array) sum of its chunk
    files' (``c/0/1/2`` in zarr 3's layout, ``0.1.2`` in zarr 2's), not its metadata,
    attributes a user added or any other file left there."""
    if path.is_dir():
        def chunk(f: Path) -> bool:
            parts = f.relative_to(path).parts
            parts = parts[1:] if parts[0] == "c" and len(parts) > 1 else parts
            return all(re.fullmatch(r"\d+(\.\d+)*", part) for part in parts)

        return sum(f.stat().st_size for f in path.rglob("*") if f.is_file() and chunk(f))
    return path.stat().st_size


def outputs_whole(out_dir: Path, record: dict) -> bool:
    """Whether the outputs a record lists (``output_bytes``, name to size) are in
    ``out_dir`` at the size they were written: a record is taken for done only then. A
    record of a paser before it kept sizes is taken as it is."""
    for name, size in (record.get("output_bytes") or {}).items():
        try:
            if output_bytes(out_dir / name) != size:
                return False
        except OSError:
            return False
    return True


def finished(out_dir: Path, path: Path, previews: bool = False) -> Segmented | None:
    """An input segmented before into ``out_dir`` (its JSON is there and names it), as its
    record says; ``None`` when it is still to do (also when some of its patches were
    degraded: the remote tier did not answer for them, and, asked for ``previews``, when
    an earlier call wrote its labels without them)."""
    record_path = out_dir / f"{path.stem}.json"
    if not record_path.is_file():
        return None
    try:
        rec = json.loads(record_path.read_text())
        if rec.get("claim", "") != claim_of(out_dir):
            return None  # of the folder before an --overwrite
        mine = recorded_as(rec, str(path))
        if mine is None:
            return None  # an older record of another spelling: segmented again
        digest = rec.get("input_sha256")
        if not mine and (digest is None or digest != file_sha256(path)):
            return Segmented(str(path), path.stem, ok=False, error=taken(
                record_path, str(rec.get("input")), str(path)))
        # (another path with the same bytes: the inputs' folder moved, and this is done)
        if mine and digest is not None and rec.get("input_stat") != file_stat(path) and (
                digest != file_sha256(path)):
            return None  # the file changed since: segmented again
        if mine and digest is None and path.stat().st_mtime > record_path.stat().st_mtime:
            return None  # an older paser's record (no digest) of a file changed since
        if not outputs_whole(out_dir, rec):
            return None  # an output gone or cut short since (a copy, a disk): again
        if previews and "overlay" not in rec.get("outputs", {"overlay": None}):
            return None  # written with --no-previews: the previews asked for now are made
        counts = rec["patches_per_model"]
        res = Segmented(str(path), path.stem, ok=True, height=rec["height"], width=rec["width"],
                        gflops=rec["gflops"], ms=rec["ms"],
                        fractions=[c / max(sum(counts), 1) for c in counts], notes=rec["notes"],
                        worker=rec.get("worker", ""))
    except (ValueError, KeyError, TypeError, OSError):
        return None  # a record of something else (or an input gone): segmented again
    remote = rec.get("remote")
    if remote is not None and remote.get("degraded_patches"):
        return None  # patches kept f0's answer while the remote tier was down: try again
    if remote is not None:
        res.degraded, res.bytes_sent = remote["degraded_patches"], remote["bytes_sent"]
        res.bytes_whole = remote["bytes_whole_image"]
    res.resumed = True
    return res


#: write errors every later image would meet too (a full disk, a quota, a folder made
#: read-only): :func:`segment_files` stops at the first, naming the output folder
FATAL_WRITES = (errno.ENOSPC, errno.EDQUOT, errno.EROFS, errno.EACCES)


def write_error(res: Segmented, err: Exception) -> OSError | None:
    """A failed write of ``res``'s outputs recorded as its error; returned where no later
    image could be written either (:data:`FATAL_WRITES`)."""
    res.error = str(err) if isinstance(err, PaserError) else f"{res.input}: {err}"
    return err if isinstance(err, OSError) and err.errno in FATAL_WRITES else None


def stop_writing(err: OSError, source: str, out_dir: Path) -> OSError:
    """The error that stops a call whose outputs cannot be written (:data:`FATAL_WRITES`),
    ``source`` the input it was writing."""
    return OSError(err.errno, f"{err.strerror} (writing the outputs of {source}; what "
                   "finished is kept: run the same command again once the folder can be "
                   "written)", str(out_dir))


def write_here(res: Segmented, args: tuple) -> OSError | None:
    """:func:`_write` in this process; a failed write is the input's error, returned where
    it would be every later input's too (:func:`write_error`)."""
    try:
        _write(*args)
    except (PaserError, OSError, ValueError) as err:
        return write_error(res, err)
    return None


def _writer(workers: int):
    """Processes that write the outputs (``None``: this process writes them)."""
    if not workers:
        return None
    from concurrent.futures import ProcessPoolExecutor

    return ProcessPoolExecutor(workers, mp_context=worker_context(workers, ["paser.segment"],
                                                                  WITHOUT_WORKERS),
                               initializer=detached_worker, initargs=(os.getpid(),))


def _first_now(pending: list, workers: int) -> bool:
    """Whether the first of the ``pending`` images ``(result, future of its write or None,
    bytes it holds)`` is reported now: it is written (or had nothing to write), or more than
    4 per writer process, or more than :data:`PENDING_BYTES` of images, wait to be written,
    so that segmenting waits for it (one image alone never waits for its own write)."""
    future = pending[0][1]
    return (future is None or future.done() or len(pending) > 4 * workers
            or (len(pending) > 1 and sum(p[2] for p in pending) > PENDING_BYTES))


def _report(pending: list, on_done: Callable[[Segmented], None] | None,
            summary: SummaryLog, workers: int | None = None) -> None:
    """The ``pending`` images finished (:func:`_finish`) in the inputs' order: while the
    first is reported now (:func:`_first_now` with ``workers`` writer processes), or all
    of them (``workers`` None: the last ones, each waited for). An image leaves ``pending``
    once reported: one stopped while it waits for its write (Ctrl-C) is still there for
    :func:`segment_files` to put in the summary if the writer finished it."""
    while pending and (workers is None or _first_now(pending, workers)):
        _finish(*pending[0][:2], on_done, summary)
        pending.pop(0)


def _finish(res: Segmented, future, on_done: Callable[[Segmented], None] | None,
            summary: SummaryLog) -> None:
    """An image done: its outputs written (a failed write is its error), then its summary
    row appended, then reported."""
    if future is not None:
        try:
            future.result()
            res.ok = True
        except (PaserError, OSError, ValueError) as err:
            fatal = write_error(res, err)
            if fatal is not None:
                raise stop_writing(fatal, res.input, summary.path.parent) from fatal
    elif not res.error:
        res.ok = True
    summary.append(res)
    if on_done is not None:
        on_done(res)


#: how the remote tier is sent pixels, as the records of ``--remote`` outputs say
REMOTE_CODEC = ("npz (numpy savez_compressed), pixels as uint8 = x * 255 when that is exact "
                "(8-bit sources), else uint16 = round(x * 65535)")


def bytes_whole(image: np.ndarray) -> int:
    """Bytes of sending the whole ``image`` [C, H, W] to the remote tier in its codec
    (:data:`REMOTE_CODEC`): what a ``--remote`` record weighs its bytes sent against."""
    from paser.serve.codec import encode_npz, quantise

    return len(encode_npz(patches=quantise(image[None])))


def edge_gflops(model, height: int, width: int) -> float:
    """GFLOP an image of ``height x width`` spends here whatever the routing (f0 and the
    policy, on every tile of it); the rest of its GFLOP ran on the remote tier."""
    tiles = model.grid_for(height, width).num_patches // model.router.grid.num_patches
    return model.cost_table(height, width).fixed * tiles


def _remote_record(model, grid: PatchGrid, image: np.ndarray, out,
                   degraded: np.ndarray | None, res: Segmented) -> dict:
    """The edge/cloud figures of one image: bytes sent against sending the whole image in
    the same codec (:func:`bytes_whole`), requests, retries, degraded patches."""
    router = model.router
    transfer = router.remote.take()
    res.bytes_sent, res.remote_errors = transfer.bytes_sent, list(transfer.errors)
    res.bytes_whole = bytes_whole(image)
    edge = edge_gflops(model, res.height, res.width)
    return {"url": router.remote.url, **transfer.to_dict(),
            "bytes_whole_image": res.bytes_whole,
            "sent_vs_whole_image": transfer.bytes_sent / res.bytes_whole,
            "codec": REMOTE_CODEC,
            "degraded_patches": res.degraded,
            "degraded": (np.zeros_like(out.actions[0].cpu().numpy(), dtype=bool)
                         if degraded is None else degraded).reshape(
                grid.rows, grid.cols).tolist(),
            "edge_gflops": edge, "cloud_gflops": res.gflops - edge}


def _header(names: Sequence[str]) -> list[str]:
    return ["input", "status", "height", "width", "gflops", "ms",
            *[f"share {n}" for n in names], "degraded patches", "bytes sent",
            "bytes whole image", "notes", "error", "worker", INPUT_PATH]


def _row(r: Segmented, names: Sequence[str]) -> list:
    shares = [f"{f:.4f}" for f in r.fractions] or [""] * len(names)
    return [r.input, "ok" if r.ok else "failed", r.height or "", r.width or "",
            f"{r.gflops:.4f}" if r.ok else "", f"{r.ms:.1f}" if r.ok else "",
            *shares, r.degraded if r.ok else "",
            "" if r.bytes_sent is None else r.bytes_sent,
            "" if r.bytes_whole is None else r.bytes_whole,
            "; ".join(r.notes), r.error, r.worker, canonical(r.input)]


def write_summary(path: Path, results: Sequence[Segmented], names: Sequence[str]) -> None:
    """One CSV row per input: status, size, GFLOP, ms, share of patches per model, the
    degraded patches and bytes sent (``--remote``), error. Written whole (renamed into
    place), after the rows of the folder's other inputs (:func:`write_rows`)."""
    write_rows(path, _header(names), [_row(r, names) for r in results])


#: how summary.csv and volumes.csv are read and written: UTF-8, and a file name that is
#: not (bytes of another encoding, which Python keeps as surrogates) as its own bytes
CSV_TEXT = {"encoding": "utf-8", "errors": "surrogateescape"}


def write_rows(path: Path, header: list[str], rows: list[list]) -> None:
    """A summary CSV (first column the input as given, last :data:`INPUT_PATH`) written
    whole: ``rows`` after the rows that earlier calls into the folder wrote for other
    inputs, so a folder filled over several calls lists every input it holds, each once
    (its latest row). Inputs match by their absolute path, columns by name (a file of an
    older version: its inputs resolved from here); a line cut off by a crash is dropped;
    ``--overwrite`` removed the file."""
    kept: dict[str, list] = {}
    old = _read_rows(path)
    mine = {row[-1] for row in rows}
    for row in old:
        key = row.get(INPUT_PATH) or canonical(row.get(header[0], ""))
        if row.get(header[0]) and key not in mine:
            kept.pop(key, None)  # the latest row last: an interrupted call appended it
            kept[key] = [row.get(h, "") for h in header[:-1]] + [key]
    _write_lines(path, [header, *kept.values(), *rows])


def _write_lines(path: Path, lines: list[list]) -> None:
    """A summary CSV written whole (renamed into place)."""
    with replaced(path) as tmp, open(tmp, "w", newline="", **CSV_TEXT) as fh:
        csv.writer(fh).writerows(lines)


def forget_rows(path: Path, inputs: set[str]) -> None:
    """Drop the rows of ``inputs`` (absolute paths, :data:`INPUT_PATH`) from a summary CSV:
    a volume's input keeps no row in ``summary.csv`` from an earlier call that read it as
    an image (a multi-page TIFF still being copied, then read as one page and failed)."""
    lines = _lines(path)
    if not lines or lines[0][-1:] != [INPUT_PATH]:
        return
    keep = [line for line in lines[1:] if len(line) == len(lines[0])
            and line[-1] not in inputs]
    if len(keep) < len(lines) - 1:
        _write_lines(path, [lines[0], *keep])


#: the last column of summary.csv and volumes.csv: the input's absolute path, by which a
#: later call from another working folder knows it (:func:`canonical`)
INPUT_PATH = "input path"


def _lines(path: Path, limit: int | None = None) -> list[list[str]]:
    """The first ``limit`` lines of a CSV file (all without it); none where it cannot be
    read as one."""
    try:
        with open(path, newline="", **CSV_TEXT) as fh:
            return list(itertools.islice(csv.reader(fh), limit))
    except (OSError, UnicodeDecodeError, csv.Error):
        return []


def _read_rows(path: Path) -> list[dict[str, str]]:
    """The rows of a summary CSV as dicts by column name; none when there is no such file
    (or it is not one); lines of another length than its header (cut off) left out."""
    lines = _lines(path)
    if not lines or not lines[0] or lines[0][0] != "input":
        return []
    return [dict(zip(lines[0], line, strict=True)) for line in lines[1:]
            if len(line) == len(lines[0])]


class SummaryLog:
    """``summary.csv`` as it goes: a row appended as each input finishes, so an interrupted
    call leaves the rows of what it did; the header once. The end of the call rewrites it
    whole, in the inputs' order (:func:`write_summary`). Not fsynced, as the images'
    outputs are not (:func:`paser.runtime.replaced`): a killed process's rows are in the
    file, and a resume reads each image's record (a power cut may lose rows of other
    calls' inputs, which the next call's summary then lacks); the fsync cost 6.6 ms of a
    128 x 128 image's 50.6 ms (13 %)."""

    def __init__(self, path: Path, names: Sequence[str]):
        self.path, self.names = path, names
        self.appended: set[str] = set()  # each input's row once, however it is stopped
        # a new file gets the header; an older version's, its rows under our columns
        if _lines(path, 1) != [_header(names)]:
            write_rows(path, _header(names), [])

    def append(self, r: Segmented) -> None:
        if r.input in self.appended:
            return
        self.appended.add(r.input)
        with open(self.path, "a", newline="", **CSV_TEXT) as fh:
            csv.writer(fh).writerow(_row(r, self.names))

