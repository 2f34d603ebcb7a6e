"""Volumes in and out: what ``paser segment`` does with a stack of slices.

A volume is a multi-page TIFF (BigTIFF, OME-TIFF; tifffile), a zarr array (a path ending
in ``.zarr``), an HDF5 dataset (``file.h5:/path/in/file``; h5py) or a folder of slices
(``--stack``, natural sort). Its first axis is the slice axis. It is segmented slice by
slice with the run's 2D models, each slice alone (the same labels as the slice segmented
as an image), and read and written a chunk of slices at a time: memory does not grow with
the number of slices. Per input volume ``<stem>``, the output folder gets:

- ``<stem>_labels.tif`` (BigTIFF, one page per slice, the run's label codec) for TIFF
  stacks and folders of slices (``scan_labels.ome.tif`` for an OME-TIFF ``scan.ome.tif``),
  or ``<stem>_labels.zarr`` (uint8, chunked by slices) for zarr and HDF5 inputs;
- ``<stem>.json``: per slice and for the whole volume, the volume fraction of every
  class, GFLOP, the share of patches per model, seconds, and with a remote tier
  (``--remote``) the bytes sent against every slice's whole and the degraded patches;

both with the input's voxel size where it states one (:mod:`paser.data.voxels`),

and ``volumes.csv`` one row per volume. Every finished chunk is durable (its labels, then
its record, under ``.<stem>.parts/``): the same command again continues with the chunks
still to do and gives the same bytes; the parts are removed once the volume is whole.
"""

from __future__ import annotations

import contextlib
import errno
import io
import json
import re
import shutil
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Literal

import numpy as np
import torch

from paser.cost import FLOP_CONVENTION
from paser.data.images import (
    READABLE_SUFFIXES,
    Intensity,
    as_input,
    at_fill,
    by_type_range,
    cmyk_to_rgb,
    colour_map,
    field_of_view,
    image_files,
    is_cmyk,
    is_tiff,
    listed,
    main_series,
    missing_codec_advice,
    native,
    other_images,
    page_by_page,
    probe,
    read_array,
    shows_colours,
    spread,
    stack_pages,
    stretched,
    tiff_alpha,
    window_of,
    without_alpha,
)
from paser.data.voxels import VoxelSize, of_hdf5, of_tiff, of_zarr
from paser.errors import DataError, PaserError
from paser.runtime import atomic_write_text, holding_out, release_freed_memory, replaced

#: slices read, segmented and written together (the zarr output's chunk along the slices)
CHUNK = 16
#: the slices, spread through a volume, on which its field of view is found
FOV_SLICES = 16
#: the pixels of a slice outside the field of view, packed bits, kept with a volume's parts
OUTSIDE = "outside.npy"
#: zlib's level for TIFF label volumes. Labels of a few classes deflate 12 to 20 times (a
#: thousand slices of 2,048 x 2,048: 4.2 GB as they are, 0.33 GB), at 25 to 40 ms a slice
#: of 4 megapixels on 2 cores; level 6 saves a third more for twice the time. Deflate is
#: read by libtiff and every tool on it (Fiji, napari, Avizo, Dragonfly, tifffile).
LABEL_DEFLATE = 1
#: the zarr output's chunk across a slice, at most
PLANE_CHUNK = 1024
VOLUMES_CSV = "volumes.csv"
#: a zarr array: ``scan.zarr``, or one inside a group (``scan.zarr/0``, OME-Zarr's levels)
_ZARR = re.compile(r"\.zarr(?:/|$)", re.IGNORECASE)
_H5_FILE = r"(?P<file>.+\.(?:h5|hdf5|hdf|he5|nxs|nx5|cxi))"
_H5 = re.compile(rf"^{_H5_FILE}(?::(?P<key>.*))?$", re.IGNORECASE)
#: paths mistyped the other format's way: ``scan.h5/entry/data``, ``scan.zarr:0``
_H5_SLASH = re.compile(rf"^{_H5_FILE}/(?P<key>.+)$", re.IGNORECASE)
_ZARR_COLON = re.compile(r"^(?P<store>.+\.zarr):/?(?P<inner>.+)$", re.IGNORECASE)


def natural_key(path: Path) -> list:
    """``slice_2`` before ``slice_10``: digits compared as numbers."""
    return [int(t) if t.isdigit() else t.lower() for t in re.split(r"(\d+)", path.name)]


@dataclass
class Volume:
    """A stack of slices to segment, read ``read(z0, z1)`` a chunk at a time:
    ``[z1 - z0, H, W]`` or ``[z1 - z0, H, W, C]`` as stored. Only where it is is kept
    (it pickles: reader processes reopen it)."""

    source: str
    stem: str
    kind: str  # tiff, zarr, hdf5, stack
    shape: tuple[int, ...]
    dtype: str
    path: str = ""
    key: str = ""  # hdf5: the dataset
    files: list[str] = field(default_factory=list, repr=False)  # stack: its slices, in order
    planar: bool = False  # tiff: channels stored first
    lead: int = 0  # zarr, hdf5: leading axes of length 1 before the slices
    #: zarr, hdf5: a last axis of one (one value a voxel), dropped: slices ``[H, W]``, as a
    #: TIFF or a folder of the same voxels gives them
    single: bool = False
    error: str = ""  # why it could not be opened (split_inputs(keep_failed=True)): not read
    alpha: int = 0  # tiff: its last samples that are alpha (ExtraSamples), dropped on read
    #: tiff: written a page at a time (one series a page): its pages are read by index, as
    #: tifffile's series would parse every page of the file for each chunk (2,048 pages:
    #: 0.5 s a chunk, a volume's reading quadratic in its depth)
    paged: bool = False
    #: tiff: palette pages read as their colours (``[..., 3]``), as the image reader reads
    #: one (:func:`paser.data.images.shows_colours`: not an ImageJ lookup table)
    palette: bool = False
    cmyk: bool = False  # tiff: CMYK pages, read as RGB (:func:`paser.data.images.is_cmyk`)
    #: tiff: the bits of a sample read as a value; fewer than their type holds (4, 12) are
    #: stretched to its range as the image reader stretches them
    #: (:func:`paser.data.images.stretched`); 0: indices, as stored
    bits: int = 0
    #: stack: palette slices read as their indices (a label volume's classes), not colours
    indices: bool = False
    #: micrometres a voxel, as the file states it (:mod:`paser.data.voxels`); written with
    #: the labels
    voxel: VoxelSize | None = None

    @property
    def depth(self) -> int:
        return self.shape[0]

    @property
    def plane(self) -> tuple[int, int]:
        return self.shape[1], self.shape[2]

    @property
    def label_format(self) -> str:
        """``zarr`` for zarr and HDF5 inputs, ``tiff`` for TIFF stacks and folders."""
        return "zarr" if self.kind in ("zarr", "hdf5") else "tiff"

    @property
    def labels_name(self) -> str:
        """The label volume's file name: ``<stem>_labels.zarr`` or ``<stem>_labels.tif``
        (:attr:`label_format`), and ``scan_labels.ome.tif`` for an OME-TIFF ``scan.ome.tif``:
        an OME-TIFF too, named as one (``scan.ome_labels.tif`` is no OME-TIFF name, and a
        tool that finds OME-TIFFs by their suffix passes it over). Its record and parts keep
        the stem (``scan.ome.json``), so a folder of a paser before 2026-12-07, whose labels
        have the old name, resumes on them (the record names its labels)."""
        if self.label_format == "zarr":
            return f"{self.stem}_labels.zarr"
        if self.kind == "tiff" and self.stem.lower().endswith(".ome"):
            return f"{self.stem[:-4]}_labels.ome.tif"
        return f"{self.stem}_labels.tif"

    def read(self, z0: int, z1: int) -> np.ndarray:
        """Slices ``z0 .. z1 - 1`` as stored; one that does not decode (a file cut short,
        damaged, or compressed with a codec this install lacks) is a :class:`DataError`
        naming the slices and what to do (a codec's own words, such as 'libdeflate_zlib_
        decompress returned LIBDEFLATE_BAD_DATA', say neither)."""
        try:
            return self._read(z0, z1)
        except DataError:
            raise
        except (OSError, ValueError, RuntimeError, KeyError, IndexError) as err:
            what = f"slice {z0}" if z1 - z0 == 1 else f"slices {z0} to {z1 - 1}"
            raise DataError(f"{self.source}: cannot read {what} ({err}); "
                            + _unread_advice(err)) from None

    def _read(self, z0: int, z1: int) -> np.ndarray:
        if self.kind == "tiff":
            import tifffile

            with tifffile.TiffFile(self.path) as tif:
                pages = stack_pages(tif, self.paged)
                out = np.stack([colour_map(pages[z])[pages[z].asarray()] if self.palette
                                else pages[z].asarray() for z in range(z0, z1)])
            out = np.moveaxis(out, 1, -1) if self.planar else out
            out = without_alpha(out, self.alpha) if self.alpha else out
            out = stretched(out, self.bits)
            return cmyk_to_rgb(out) if self.cmyk else out
        if self.kind == "stack":
            how = "indices" if self.indices else "colours"
            return np.stack([read_array(f, palette=how) for f in self.files[z0:z1]])
        at = (0,) * self.lead + (slice(z0, z1),) + ((slice(None),) * 2 + (0,)
                                                    if self.single else ())
        if self.kind == "zarr":
            import zarr

            out = np.asarray(zarr.open(self.path, mode="r")[at])
        else:
            with _h5py(self.source).File(self.path, "r") as fh:
                out = fh[self.key][at]
        # big-endian (HDF5 written on another machine, zarr of '>u2'): the dtype the image
        # reader gives a TIFF of them
        return native(out)


def signature(volume: Volume) -> str:
    """A digest of ``volume``'s content: its shape, type and first, middle and last slices
    as stored (three slices read). A volume written again in place (reconstructed anew)
    gets another; its finished chunks and labels are then not taken for this one's."""
    import hashlib

    h = hashlib.sha256(f"{volume.shape} {volume.dtype}".encode())
    for z in sorted({0, volume.depth // 2, volume.depth - 1}):
        h.update(np.ascontiguousarray(volume.read(z, z + 1)).tobytes())
    return h.hexdigest()


def stat_of(volume: Volume) -> list[int]:
    """``[files, bytes, newest mtime_ns]`` of what holds ``volume`` (its file, its stack's
    files, its zarr array's folder): whether it was written since, without reading it (its
    :func:`signature` is read only when this differs: a copy or a touch)."""
    from paser.data.images import files_now

    paths = [Path(f) for f in volume.files] if volume.kind == "stack" else [Path(volume.path)]
    parts = [files_now(p) for p in paths]  # (a zarr array's folder: its every file)
    gone = [p for p, part in zip(paths, parts, strict=True) if part is None]
    if gone:
        raise FileNotFoundError(f"{gone[0]}: no such file or folder")
    return [sum(n for n, _, _ in parts), sum(b for _, b, _ in parts),
            max((t for _, _, t in parts), default=0)]


def slice_digest(pixels: np.ndarray) -> str:
    """A digest of one slice as stored, kept in its record (:func:`same_slices`)."""
    import hashlib

    return hashlib.sha256(np.ascontiguousarray(pixels).tobytes()).hexdigest()[:16]


def unchanged(volume: Volume, kept: dict, records: Sequence[dict] = ()) -> bool:
    """Whether ``volume`` is what ``kept`` (a record, or its chunks' ``volume.json``) was
    made of: the same :func:`stat_of`; or else the same :func:`signature` and every slice
    of ``records`` (the slices segmented from it) the same (:func:`same_slices`: the
    volume read once, a chunk at a time). A record older than both is taken as it is."""
    if kept.get("stat") is None or kept["stat"] == stat_of(volume):
        return True
    return (kept.get("signature") is not None and kept["signature"] == signature(volume)
            and same_slices(volume, records))


def same_slices(volume: Volume, records: Sequence[dict], chunk: int = 16) -> bool:
    """Whether every slice of ``records`` that keeps a digest (:func:`slice_digest`) still
    holds what it was segmented from: a volume written again in part, in place, keeps its
    size, its first, middle and last slices, and changes its time alone."""
    digests = {int(r["slice"]): r["digest"] for r in records if "digest" in r}
    for z0 in range(0, volume.depth, chunk):
        z1 = min(z0 + chunk, volume.depth)
        if not any(z in digests for z in range(z0, z1)):
            continue
        raw = volume.read(z0, z1)
        if any(z0 + i in digests and slice_digest(raw[i]) != digests[z0 + i]
               for i in range(z1 - z0)):
            return False
    return True


def is_volume(spec: str | Path, stack: bool = False) -> bool:
    """Whether ``spec`` names a volume: an HDF5 ``file:/key``, a ``.zarr`` path, a TIFF of
    more than one page, or a folder with ``stack``."""
    text = str(spec)
    if _H5.match(text) or _ZARR.search(text):
        return True  # an HDF5 file alone is its only dataset (more are refused, named)
    path = Path(text)
    if path.is_dir():
        return stack
    if path.is_file() and is_tiff(path):
        try:
            return probe(path).pages > 1
        except DataError:
            return False  # reported when read as an image
    return False


def open_volume(spec: str | Path, stack_suffixes: Sequence[str] | None = None,
                palette: Literal["colours", "indices"] = "colours") -> Volume:
    """The volume ``spec`` names (:func:`is_volume`); nothing but headers read. A folder is
    a stack of its image files (``stack_suffixes``, default those ``paser segment``
    reads), natural sort; every problem is a :class:`DataError` naming the input. Palette
    slices (a TIFF's pages, a folder's PNGs) give their colours, or with
    ``palette="indices"`` their indices, as :func:`paser.data.images.read_mask` reads a mask
    (a label volume: its indices are its classes)."""
    stack_suffixes = READABLE_SUFFIXES if stack_suffixes is None else stack_suffixes
    text = str(spec)
    h5 = _H5.match(text)
    if h5:
        key = (h5["key"] or "").strip()
        return _hdf5(Path(h5["file"]), "/" + key.lstrip("/") if key.strip("/") else "", text)
    path = Path(text)
    if _ZARR.search(text):
        return _zarr(path)
    if path.is_dir():
        return _stack(path, stack_suffixes, palette == "indices")
    return _tiff(path, palette == "colours")


def _leading_ones(source: str, shape: tuple) -> int:
    """Leading axes of length 1 (OME-Zarr's t and c of one time point and channel) before
    a volume's slices x height x width; any other array of more than 3 axes whose last is
    not a few channels is refused, naming its shape."""
    lead = 0
    while len(shape) - lead > 3 and shape[lead] == 1:
        lead += 1
    rest = shape[lead:]
    if len(rest) > 4 or (len(rest) == 4 and rest[-1] > 4):
        raise DataError(f"{source}: an array of shape {tuple(shape)}; a volume is slices x "
                        "height x width (x up to 4 channels last): give one channel's 3-D "
                        "array (e.g. save data[:, c] or data[t, c] as its own array)")
    return lead


def _check(source: str, shape: tuple, dtype) -> None:
    if len(shape) in (3, 4) and shape[0] == 0:
        raise DataError(f"{source}: no slices (an array of shape {tuple(shape)}); nothing to "
                        "segment")
    if len(shape) == 2 and 0 not in shape:
        raise DataError(f"{source}: an array of shape {tuple(shape)}, not a volume (slices x "
                        "height x width): save one image as an image file (TIFF, PNG) to "
                        "segment it, or as an array of shape (1, height, width)")
    if len(shape) not in (3, 4) or 0 in shape:
        raise DataError(f"{source}: an array of shape {tuple(shape)}; a volume is slices x "
                        "height x width (x channels)")
    if np.dtype(dtype).kind not in "biuf":
        raise DataError(f"{source}: values of type {dtype}; give integer or float voxels")


def _tiff(path: Path, colours: bool = True) -> Volume:
    import tifffile

    if not path.is_file():
        raise DataError(f"{path}: no such file")
    try:
        with tifffile.TiffFile(path) as tif:
            series = main_series(tif)
            loose = page_by_page(tif)  # written a page at a time: one series a page
            pages, page = len(stack_pages(tif)), series.pages[0]
            shape, dtype = (pages, *page.shape), page.dtype
            planar, cmyk = page.axes.startswith("S"), is_cmyk(page)
            # samples read as values (not a palette's or a label volume's indices)
            bits = (page.bitspersample if colours
                    and page.photometric != tifffile.PHOTOMETRIC.PALETTE else 0)
            palette = (colours and page.photometric == tifffile.PHOTOMETRIC.PALETTE
                       and shows_colours(tif))
            # the axes the pages run along (ZCYX: Z and C), and other stacks in the file
            lead = {} if loose else dict(zip(series.axes[:len(series.axes) - len(page.axes)],
                                             series.shape, strict=False))
            others = other_images(tif)
            voxel = of_tiff(tif)
    except (OSError, ValueError, IndexError, KeyError) as err:
        raise DataError(f"{path}: cannot read the TIFF ({err})") from None
    if lead.get("C", 1) > 1:
        raise DataError(f"{path}: its pages hold {lead['C']} channels (TIFF axes "
                        f"{series.axes}, shape {' x '.join(map(str, series.shape))}), which "
                        "would be segmented as slices; save the channel to segment as a stack "
                        "of its own (tifffile.imwrite(out, data[" + ", ".join(
                            "c" if a == "C" else ":" for a in series.axes) + "]))")
    if others:
        raise DataError(f"{path}: holds more than one stack of pages ({pages} x "
                        f"{' x '.join(map(str, page.shape))} {dtype}, then {listed(others)}); "
                        "paser segments one stack of equal pages per file: save each as its "
                        "own TIFF")
    if planar:
        shape = (pages, *shape[2:], shape[1])
    if palette:
        shape, dtype = (*shape, 3), np.dtype(np.uint8)
    alpha = tiff_alpha(page) if len(shape) == 4 and shape[-1] > 1 else 0
    if alpha:  # gray + alpha: gray slices [H, W], as the image reader reads one
        shape = shape[:3] if shape[3] - alpha == 1 else (*shape[:3], shape[3] - alpha)
    if cmyk:  # read as RGB
        shape = (*shape[:3], 3)
    _check(str(path), shape, dtype)
    return Volume(str(path), path.stem, "tiff", shape, str(dtype), path=str(path),
                  planar=planar, alpha=alpha, paged=loose, palette=palette, cmyk=cmyk,
                  bits=bits, voxel=voxel)


class MissingPackage(DataError):
    """A volume whose format needs a package that is not installed: every volume of its
    format fails alike, so it stops the command before anything loads, not file by file."""


def _optional(module: str, source: str | Path):
    """zarr or h5py (the ``volumes`` extra), or a :class:`MissingPackage` that says to
    install it."""
    import importlib

    try:
        return importlib.import_module(module)
    except ImportError:
        raise MissingPackage(f"{source}: reading it needs the {module} package: pip install "
                             "'paser[volumes]'") from None


def _h5py(source: str | Path):
    """h5py, with hdf5plugin's filters registered where it is installed: Blosc, bitshuffle,
    LZ4, Zstandard, what detector and synchrotron software compress HDF5 datasets with."""
    h5py = _optional("h5py", source)
    try:
        import hdf5plugin  # noqa: F401 (registers its filters with HDF5)
    except ImportError:
        pass
    return h5py


def _dangling(h5py, fh, key: str, file: Path) -> str | None:
    """What the link ``key`` in the open HDF5 file ``fh`` points at where nothing is there
    (a soft link to a path not in the file, an external link to a file or a path that
    cannot be opened), or ``None`` where ``key`` is no such link: a dangling link is there,
    so "no dataset" would send one looking for a name that is in the file."""
    link = fh.get(key, getlink=True)
    if isinstance(link, h5py.SoftLink):
        return (f"{key} in {file} is a soft link to {link.path}, which is not in the file "
                "(a dangling link)")
    if isinstance(link, h5py.ExternalLink):
        beside = file.parent / link.filename
        why = (f"which holds no {link.path}" if beside.is_file() else
               f"which is not there (no {beside}: copy it beside {file.name})")
        return (f"{key} in {file} is an external link to {link.path} in {link.filename}, "
                f"{why}")
    return None


#: HDF5 filters that h5py does not bring, by their registered id (hdf5plugin has them)
_H5_FILTERS = {307: "bzip2", 32001: "Blosc", 32004: "LZ4", 32008: "bitshuffle",
               32013: "ZFP", 32015: "Zstandard", 32017: "SZ", 32026: "Blosc2"}
_NO_FILTER = ("pip install hdf5plugin (paser loads its filters when it is installed), or "
              "save the dataset with gzip or no compression")


def _missing_filters(data) -> list[str]:
    """The compression filters of an HDF5 dataset that this HDF5 cannot decode, by name."""
    import h5py

    plist = data.id.get_create_plist()
    missing = []
    for i in range(plist.get_nfilters()):
        code = plist.get_filter(i)[0]
        if not h5py.h5z.filter_avail(code):
            missing.append(f"{_H5_FILTERS[code]} (HDF5 filter {code})" if code in _H5_FILTERS
                           else f"HDF5 filter {code}")
    return missing


def _unread_advice(err: Exception) -> str:
    """What to do about slices that do not decode (:meth:`Volume.read`)."""
    text = str(err)
    if "plugin" in text or "filter" in text:  # HDF5 without the dataset's filter
        return _NO_FILTER
    if "imagecodecs" in text:
        return missing_codec_advice(err)
    return ("the file is damaged or cut short (a copy or a write not finished?): copy or "
            "write it again")


def _zarr_store(spec: str | Path) -> Path:
    """The ``.zarr`` folder of a zarr path: ``scan.zarr`` of ``scan.zarr/0``."""
    text = str(spec)
    return Path(text[:_ZARR.search(text).start() + len(".zarr")])


def _zarr_arrays(zarr, path: Path) -> list[str]:
    """The paths of the arrays in the zarr group at ``path`` (at most 10, nested ones too:
    bioformats2raw's ``scan.zarr/0/0``), or none where it is no group."""
    names: list[str] = []

    def arrays(group, prefix: str) -> None:
        for name in sorted(getattr(group, "array_keys", lambda: [])()):
            names.append(f"{prefix}{name}")
        for name in sorted(getattr(group, "group_keys", lambda: [])()):
            if len(names) < 10:
                arrays(group[name], f"{prefix}{name}/")

    try:
        arrays(zarr.open(str(path), mode="r"), "")
    except Exception:  # zarr raises many kinds for a folder that is not one
        return []
    return [f"{path}/{n}" for n in names[:10]]


def _zarr_is_array(zarr, path: Path) -> bool:
    """Whether ``path`` opens as a zarr array (not a group, nor a folder of neither)."""
    try:
        return hasattr(zarr.open(str(path), mode="r"), "shape")
    except Exception:  # zarr raises many kinds for a folder that is not one
        return False


def _full_resolution(group) -> str | None:
    """The path of an OME-Zarr group's full-resolution level (the first of its
    ``multiscales`` datasets, 0.4 and 0.5 alike), or ``None`` for any other group."""
    try:
        attrs = dict(group.attrs)
        multiscales = attrs.get("multiscales") or attrs.get("ome", {}).get("multiscales")
        level = str(multiscales[0]["datasets"][0]["path"])
    except (AttributeError, TypeError, KeyError, IndexError):
        return None
    return level if level in getattr(group, "array_keys", lambda: [])() else None


def _zarr(path: Path) -> Volume:
    zarr = _optional("zarr", path)
    if not path.exists():
        store = _zarr_store(path)
        if store.is_dir() and store != path:  # an array its group does not hold
            if _zarr_is_array(zarr, store):  # (an OME-Zarr habit on a plain array)
                raise DataError(f"{path}: {store} is an array itself, not a group of "
                                f"arrays; give {store}")
            raise DataError(f"{path}: no such array in {store}; it has "
                            f"{', '.join(_zarr_arrays(zarr, store)) or 'none'}")
        raise DataError(f"{path}: no such zarr array")
    try:
        arr = zarr.open(str(path), mode="r")
    except Exception as err:  # zarr raises many kinds for a folder that is not one
        raise DataError(f"{path}: not a zarr array ({err})") from None
    if not hasattr(arr, "shape"):
        full = _full_resolution(arr)
        if full is not None:  # OME-Zarr: its levels are arrays of the same scan
            raise DataError(f"{path}: an OME-Zarr image (a group of resolution levels), not "
                            f"an array; give its full-resolution level, {path}/{full}")
        raise DataError(f"{path}: a zarr group, not an array; give one of its arrays "
                        f"({', '.join(_zarr_arrays(zarr, path)) or 'it has none'})")
    lead = _leading_ones(str(path), arr.shape)
    _check(str(path), arr.shape[lead:], arr.dtype)
    shape, single = _one_value_a_voxel(arr.shape[lead:])
    return Volume(str(path), stem_of(path), "zarr", shape, _native(arr.dtype), path=str(path),
                  lead=lead, single=single, voxel=of_zarr(path))


def _one_value_a_voxel(shape: tuple) -> tuple[tuple[int, ...], bool]:
    """A volume's shape without a last axis of one (slices x height x width x 1), and
    whether it had one."""
    single = len(shape) == 4 and shape[-1] == 1
    return tuple(shape[:3] if single else shape), single


def _native(dtype) -> str:
    """``dtype``'s name in this machine's byte order (``uint16`` for HDF5's ``>u2``): what
    :meth:`Volume.read` gives."""
    return str(np.dtype(dtype).newbyteorder("="))


def _hdf5(file: Path, key: str, source: str) -> Volume:
    h5py = _h5py(source)
    if not file.is_file():
        raise DataError(f"{file}: no such file")
    try:
        with h5py.File(file, "r") as fh:
            try:
                data = fh[key] if key else None
            except KeyError:  # not there, or a link to nothing
                data = None
            found: list[str] = []
            if not isinstance(data, h5py.Dataset):
                fh.visititems(lambda n, o: found.append("/" + n)
                              if isinstance(o, h5py.Dataset) else None)
            if not key and len(found) == 1:  # a file of one dataset: that one
                key = found[0]
                data = fh[key]
            if not isinstance(data, h5py.Dataset):
                group = key and isinstance(data, h5py.Group)
                what = (f"{key} in {file} is a group, not a dataset" if group else
                        _dangling(h5py, fh, key, file) or
                        f"no dataset {key} in {file}" if key else
                        f"an HDF5 file of {len(found)} datasets: name one as "
                        f"{file}:/path/in/file" if found else "an HDF5 file with no dataset")
                if not found and not key:  # (an empty file, or groups alone)
                    raise DataError(f"{source}: {what} in it; save the volume in it as a "
                                    "dataset (h5py: create_dataset('data', data=volume))")
                if group:  # the datasets under it first
                    found = [n for n in found if n.startswith(key.rstrip("/") + "/")] + [
                        n for n in found if not n.startswith(key.rstrip("/") + "/")]
                more = f" and {len(found) - 10} more" if len(found) > 10 else ""
                raise DataError(f"{source}: {what}; it has "
                                f"{', '.join(found[:10]) or 'none'}{more}")
            shape, dtype, voxel = data.shape, data.dtype, of_hdf5(data)
            missing = _missing_filters(data)
            if missing:  # found here, not as h5py's "can't open directory" at the first slice
                raise DataError(f"{source}: compressed with {', '.join(missing)}, which this "
                                f"install cannot decode: {_NO_FILTER}")
    except OSError as err:
        raise DataError(f"{file}: cannot read the HDF5 file ({err})") from None
    lead = _leading_ones(source, shape)
    _check(source, shape[lead:], dtype)
    shape, single = _one_value_a_voxel(shape[lead:])
    return Volume(source, stem_of(source), "hdf5", shape, _native(dtype), path=str(file),
                  key=key, lead=lead, single=single, voxel=voxel)


def _stack(folder: Path, suffixes: Sequence[str], indices: bool = False) -> Volume:
    files = sorted(image_files(folder, tuple(suffixes)), key=natural_key)
    if not files:
        raise DataError(f"{folder}: --stack, but no image file in it ({', '.join(suffixes)})")

    def kind(head) -> str:
        return (f"{head.height} x {head.width} {head.dtype}"
                + (" colour" if head.colour else "")
                + ("" if head.channels in (1, 3) else f" of {head.channels} channels"))

    def read(f: Path):  # what the slice gives: a palette's indices are one value a pixel
        head = probe(f)
        return replace(head, colour=False, channels=1) if indices and head.palette else head

    first = read(files[0])
    for f in files:
        head = first if f == files[0] else read(f)
        if head.pages > 1:
            raise DataError(f"{f}: {head.pages} pages in one file of a --stack folder, whose "
                            "files are one slice each; segment that file as a volume of its "
                            "own, or save its pages as files of the folder")
        # (the channels too: two detectors' slices beside gray ones, an RGB slice beside
        # one with a fourth channel, were stacked into "damaged or cut short")
        if (head.height, head.width, head.dtype, head.colour, head.channels) != (
                first.height, first.width, first.dtype, first.colour, first.channels):
            raise DataError(f"{f}: {kind(head)}, but {files[0]} is {kind(first)}; the slices "
                            "of a stack share one size, type, colour and number of channels")
    arr = read_array(files[0], palette="indices" if indices else "colours")
    # `paser segment . --stack`: the folder's own name
    return Volume(str(folder), stem_of(folder), "stack", (len(files), *arr.shape),
                  str(arr.dtype), path=str(folder), files=[str(f) for f in files],
                  indices=indices, voxel=_slice_voxel(files[0]))


def _slice_voxel(path: Path) -> VoxelSize | None:
    """The plane's voxel size of a stack's first slice, where it is a TIFF that states it;
    the distance between slices is not a slice's to say."""
    if not is_tiff(path):
        return None
    import tifffile

    with tifffile.TiffFile(path) as tif:
        found = of_tiff(tif)
    return None if found is None else VoxelSize(None, found.y, found.x, found.source)


def _class_counts(mask: np.ndarray, num_classes: int) -> np.ndarray:
    return np.bincount(mask.reshape(-1), minlength=num_classes)[:num_classes]


class VolumeInterrupted(KeyboardInterrupt):
    """Ctrl-C (or SIGTERM) while a volume was segmented: its finished chunks are kept for the
    same call again; the message says how many of its slices ("12 of 40 slices of scan"; on
    a cluster, of each volume under way, comma-separated)."""

    @classmethod
    def keeping(cls, kept: Sequence[tuple[Volume, int]]) -> VolumeInterrupted:
        """The interruption of the volumes under way, each with its slices finished."""
        return cls(", ".join(f"{done} of {vol.depth} slices of {vol.stem}" for vol, done in kept))


def segment_volume(model, volume: Volume, out_dir: str | Path, only: int | None = None,
                   chunk: int = CHUNK,
                   on_slices: Callable[[int, int, str], None] | None = None) -> dict:
    """Segment ``volume`` with ``model`` (a :class:`paser.PaSeR`) into ``out_dir`` (module
    doc); return its record (also ``<stem>.json``). ``on_slices(n, voxels, what)`` after
    each chunk (``voxels`` 0 for the chunks an earlier call into the same folder finished:
    they are not done again; ``what``: the volume's stem), and ``(0, 0, what)`` before a
    TIFF's slices are put together (:func:`finish_volume`)."""
    out_dir = Path(out_dir)
    start = time.perf_counter()
    labels, chunk = prepare_volume(volume, out_dir, chunk, model.intensity)
    todo = chunks_to_do(volume, out_dir, chunk)
    done = volume.depth - sum(z1 - z0 for z0, z1 in todo)  # by an earlier call
    if done and on_slices is not None:
        on_slices(done, 0, volume.stem)  # by an earlier call: the bar moves, its rates do not
    try:
        for z0, z1 in todo:
            segment_chunk(model, volume, z0, z1, out_dir, labels, only)
            done += z1 - z0
            if on_slices is not None:
                on_slices(z1 - z0, (z1 - z0) * volume.plane[0] * volume.plane[1], volume.stem)
        return finish_volume(model, volume, out_dir, chunk, only, time.perf_counter() - start,
                             on_slices)
    except KeyboardInterrupt as err:  # the chunk under way is lost, those before it are kept
        raise VolumeInterrupted.keeping([(volume, done)]) from err


def _parts(volume: Volume, out_dir: Path) -> Path:
    return out_dir / f".{volume.stem}.parts"


def prepare_volume(volume: Volume, out_dir: Path, chunk: int = CHUNK,
                   intensity: Intensity = Intensity()) -> tuple[object, int]:
    """The folder of ``volume``'s finished chunks, and its zarr label array (``None`` for a
    TIFF output), both kept when an earlier call left chunks done; and the slices per
    chunk: ``chunk``, or the one that call started with (its parts are chunks of it).
    A float or signed volume under a run without an intensity window (``intensity``, the
    run's: it trained on 8/16-bit images) gets one window fitted on the volume itself
    (:func:`volume_window`), kept with the parts, so no slice is scaled by its own range."""
    from paser.segment import canonical, claim_of, recorded_as

    parts = _parts(volume, out_dir)
    made = parts / "volume.json"  # what the parts are of, and their chunk
    mine = {"input": volume.source, "shape": list(volume.shape), "dtype": volume.dtype,
            "claim": claim_of(out_dir)}
    try:
        before = json.loads(made.read_text()) if made.is_file() else None
    except ValueError:
        before = None
    theirs = (before or {}).get("volume") or {}
    own_window = (intensity.mode == "window" and intensity.window is None
                  and not by_type_range(volume.dtype))  # fitted on the volume, kept here
    same = ({k: theirs.get(k) for k in mine if k != "input"} == {
        k: v for k, v in mine.items() if k != "input"}
        and recorded_as(theirs, volume.source)
        and unchanged(volume, theirs, _done_records(parts))
        # parts of a paser that scaled such a volume slice by slice (no window kept), or
        # that counted the classes outside the field of view (no fill kept)
        and not (own_window and "window" not in (before or {}))
        and "fill" in (before or {})
        and ((before or {}).get("fill") is None or (parts / OUTSIDE).is_file()))
    if parts.is_dir() and not same:
        # chunks of another input of this stem (or of unknown origin): not this volume's
        shutil.rmtree(parts)
        before = None
    parts.mkdir(parents=True, exist_ok=True)
    if before is not None and any(parts.glob("0*.json")):
        chunk = int(before["chunk"])
        if theirs.get("stat") is not None and theirs["stat"] != (now := stat_of(volume)):
            theirs["stat"] = now  # copied or touched, its slices as they were: read once
            atomic_write_text(json.dumps(before), made)
    else:
        window = volume_window(volume) if own_window else None
        view = field_of_view(volume.read(z, z + 1)[0]
                             for z in spread(volume.depth, FOV_SLICES))
        if view is not None:  # before the record that says the parts are of this volume
            with replaced(parts / OUTSIDE) as tmp, open(tmp, "wb") as fh:
                np.save(fh, np.packbits(view[1], axis=-1))
        mine.update(input_path=canonical(volume.source), stat=stat_of(volume),
                    signature=signature(volume))
        atomic_write_text(json.dumps({"volume": mine, "chunk": chunk, "window": window,
                                      "fill": None if view is None else view[0]}), made)
    if volume.label_format == "zarr":
        return _labels_zarr(out_dir / f"{volume.stem}_labels.zarr", volume, chunk, parts), chunk
    return None, chunk


def _done_records(parts: Path) -> list[dict]:
    """The slice records of the chunks finished under ``parts`` (the readable ones)."""
    records = []
    for marker in sorted(parts.glob("0*.json")):
        chunk = _chunk_marker(marker)[0]
        records += [r for r in chunk if isinstance(r, dict)] if isinstance(chunk, list) else []
    return records


def volume_window(volume: Volume, slices: int = 16) -> list[float]:
    """The intensity window (:data:`paser.data.images.WINDOW_PERCENTILES`) of ``slices``
    slices spread over ``volume``, read one at a time; ``[0, 1]`` where they are floats
    whose every finite value lies in it, kept as they are, as the image reader keeps such
    an image (its slices saved as files, segmented alone, were not stretched to the
    percentiles a volume of them was)."""
    seen = [np.inf, -np.inf]  # the finite values' range, of float slices

    def planes():
        for z in spread(volume.depth, slices):
            plane = volume.read(z, z + 1)[0]
            if plane.dtype.kind == "f":
                finite = np.isfinite(plane)
                seen[0] = min(seen[0], float(np.min(plane, where=finite, initial=np.inf)))
                seen[1] = max(seen[1], float(np.max(plane, where=finite, initial=-np.inf)))
            yield plane, f"{volume.source} slice {z}"

    window = list(window_of(planes()))
    return [0.0, 1.0] if 0.0 <= seen[0] and seen[1] <= 1.0 else window


def volume_fill(volume: Volume, out_dir: Path) -> float | None:
    """The value ``volume`` is written as outside its field of view, as
    :func:`prepare_volume` found it on slices spread through it and kept with its parts
    (:func:`paser.data.images.field_of_view`), or ``None``."""
    made = _parts(volume, out_dir) / "volume.json"
    return json.loads(made.read_text()).get("fill") if made.is_file() else None


def outside_view(volume: Volume, out_dir: Path) -> tuple[float, np.ndarray] | None:
    """The fill and the pixels of a slice outside ``volume``'s field of view (``[H, W]``
    bool) that :func:`prepare_volume` kept with its parts, or ``None``."""
    fill = volume_fill(volume, out_dir)
    if fill is None:
        return None
    packed = np.load(_parts(volume, out_dir) / OUTSIDE)
    return fill, np.unpackbits(packed, axis=-1, count=volume.plane[1]).astype(bool)


def volume_intensity(model, volume: Volume, out_dir: Path) -> Intensity:
    """How ``volume``'s voxels are scaled: the run's intensity, or the window fitted on the
    volume that :func:`prepare_volume` kept with its parts."""
    made = _parts(volume, out_dir) / "volume.json"
    window = json.loads(made.read_text()).get("window") if made.is_file() else None
    return model.intensity if window is None else Intensity(
        tuple(window), nonfinite=model.intensity.nonfinite)


def chunks_to_do(volume: Volume, out_dir: Path, chunk: int = CHUNK) -> list[tuple[int, int]]:
    """``(z0, z1)`` of the chunks of slices not finished yet (:func:`chunk_done`)."""
    return [(z0, min(z0 + chunk, volume.depth)) for z0 in range(0, volume.depth, chunk)
            if chunk_done(volume, out_dir, z0, min(z0 + chunk, volume.depth)) is None]


def chunk_done(volume: Volume, out_dir: Path, z0: int, z1: int) -> list[dict] | None:
    """The records of the chunk of slices ``z0 .. z1 - 1`` when an earlier call finished
    it: its record under the parts is whole, and so are its labels: a TIFF output's part
    file, a zarr output's chunk files (at the sizes the record keeps). ``None`` otherwise,
    a damaged record or part included (a disk that filled up, a copy cut short, a chunk
    file removed): the chunk is done again, not assembled into every later call's
    failure or into labels with a hole."""
    marker = _parts(volume, out_dir) / f"{z0:08d}.json"
    records, files = _chunk_marker(marker)
    if not isinstance(records, list) or len(records) != z1 - z0:
        return None
    if any(isinstance(r, dict) and r.get("degraded") for r in records):
        return None  # patches kept f0's answer while the remote tier was down: try again
    if files is not None:  # a zarr output's chunk files, at the sizes they were written
        labels = out_dir / volume.labels_name
        if any(not (labels / name).is_file() or (labels / name).stat().st_size != size
               for name, size in files.items()):
            return None  # a chunk file gone or cut short since: it was taken as done
    if volume.label_format == "tiff":
        try:
            part = np.load(marker.with_suffix(".npy"), mmap_mode="r")
        except (OSError, ValueError, EOFError):
            return None
        if part.shape != (z1 - z0, *volume.plane) or part.dtype != np.uint8:
            return None
    return records


def segment_chunk(model, volume: Volume, z0: int, z1: int, out_dir: Path, labels=None,
                  only: int | None = None, worker: str | None = None,
                  before_writing: Callable[[], None] | None = None) -> list[dict]:
    """Slices ``z0 .. z1 - 1`` of ``volume``, each alone: their labels written (into the
    zarr array ``labels``, or a part file for the TIFF), then their records (the chunk's
    done marker). Returns the records; a chunk already done is read, not done again.
    ``worker`` names who did it (a Dask worker) in each record; ``before_writing()`` is
    called once the slices are segmented, before anything is written (it raises to write
    nothing)."""
    marker = _parts(volume, out_dir) / f"{z0:08d}.json"
    done = chunk_done(volume, out_dir, z0, z1)
    if done is not None:
        return done
    from paser.segment import bytes_whole

    router, codec = model.router, model.label_codec
    intensity = volume_intensity(model, volume, out_dir)
    channels, ncls = model.config.models.in_channels, model.config.models.num_classes
    raw = volume.read(z0, z1)
    masks, records = np.empty((z1 - z0, *volume.plane), np.uint8), []
    # the patches that hold slice pixels (padding past the slice runs no model)
    inside = model.grid_for(*volume.plane).inside(*volume.plane).numpy()
    model.cost_table(*volume.plane)  # counted once, outside the slices' ms
    view = outside_view(volume, out_dir)
    for i in range(z1 - z0):
        notes: list[str] = []
        x = as_input(raw[i], channels, intensity, f"{volume.source} slice {z0 + i}", notes)
        # outside the field of view: its pixels of every slice, at the fill on this one too
        outside = None if view is None else view[1] & at_fill(raw[i], view[0])
        if router.remote is not None:
            router.remote.take()  # this slice's transfers only
        tick = time.perf_counter()
        out = model.segment(torch.from_numpy(x)[None], only=only, probs=False)
        ms = 1000 * (time.perf_counter() - tick)
        threads = torch.get_num_threads()  # (a Dask worker's: set for this thread, above)
        # what this slice cost the link, as an image's record says (paser.segment)
        remote = None if router.remote is None else {
            **router.remote.take().to_dict(), "bytes_whole_slice": bytes_whole(x)}
        mask = out.mask[0].cpu().numpy()
        actions = out.actions[0].cpu().numpy()
        # patches the remote tier did not answer for: f0's prediction, done again next call
        degraded = 0 if out.degraded is None else int(out.degraded[0].sum())
        masks[i] = codec.encode(mask)
        release_freed_memory()  # bounded memory over any number of slices
        records.append({"slice": z0 + i, "digest": slice_digest(raw[i]),
                        "gflops": float(out.gflops[0]), "ms": ms,
                        "patches_per_model": np.bincount(
                            actions[inside], minlength=router.num_models).tolist(),
                        # the classes inside the field of view; its outside apart
                        "class_voxels": _class_counts(
                            mask if outside is None else mask[~outside], ncls).tolist(),
                        **({"outside_voxels": int(outside.sum())}
                           if outside is not None else {}),
                        **({"degraded": degraded} if degraded else {}),
                        **({"remote": remote} if remote is not None else {}),
                        # what the labels were computed on: another device or thread
                        # count adds in another order, and can move a few voxels
                        "device": str(model.device), "threads": threads,
                        **({"worker": worker} if worker is not None else {}),
                        **({"notes": notes} if notes else {})})
    if before_writing is not None:
        before_writing()
    files = None
    if labels is not None:
        labels[z0:z1] = masks
        files = zarr_chunk_files(out_dir / volume.labels_name, z0 // labels.chunks[0])
    else:
        buffer = io.BytesIO()
        np.save(buffer, masks)
        # written by Python, not numpy: a full disk is ENOSPC (numpy's write said only
        # "N requested and M written"), which stops the call (paser.segment.FATAL_WRITES)
        with replaced(marker.with_suffix(".npy")) as tmp, open(tmp, "wb") as fh:
            fh.write(buffer.getbuffer())
    # the chunk is done (with a zarr output, its files' sizes: one removed or cut short
    # since is not taken as done)
    atomic_write_text(json.dumps(records if files is None else
                                 {"slices": records, "label_files": files}), marker)
    return records


def _chunk_marker(marker: Path) -> tuple[list | None, dict | None]:
    """A chunk's record under the parts: its slice records and, with a zarr output, its
    chunk files' sizes (name under the array to bytes); ``(None, None)`` where it is not
    there or cannot be read. A paser before 2026-12-07 kept the slice records alone."""
    try:
        kept = json.loads(marker.read_text()) if marker.is_file() else None
    except (OSError, ValueError):
        return None, None
    if isinstance(kept, dict):
        files = kept.get("label_files")
        return kept.get("slices"), files if isinstance(files, dict) else {}
    return kept, None


def zarr_chunk_files(path: Path, k: int) -> dict[str, int]:
    """The files of the zarr array at ``path`` that hold its chunks at index ``k`` along
    the slices (``c/k/i/j`` in zarr 3's layout, ``k.i.j`` or ``k/i/j`` in zarr 2's), name
    to bytes. A chunk all of the fill value (0) has no file: none is not a loss."""
    found = [*(path / "c" / str(k)).rglob("*"), *path.glob(f"{k}.*"),
             *(path / str(k)).rglob("*")]
    return {f.relative_to(path).as_posix(): f.stat().st_size for f in found if f.is_file()}


def finish_volume(model, volume: Volume, out_dir: Path, chunk: int = CHUNK,
                  only: int | None = None, seconds: float = 0.0,
                  on_slices: Callable[[int, int, str], None] | None = None) -> dict:
    """Once every chunk is done: the TIFF assembled from the parts (zarr outputs are whole
    already; ``on_slices(0, 0, "writing <stem>_labels.tif")`` before, a minute for a
    thousand slices of 2,048 x 2,048), the volume's record written (``<stem>.json``), the
    parts removed."""
    parts = _parts(volume, out_dir)
    codec, intensity = model.label_codec, volume_intensity(model, volume, out_dir)
    kept = json.loads((parts / "volume.json").read_text()).get("volume", {})
    h, w = volume.plane
    records = [r for z0 in range(0, volume.depth, chunk)
               for r in _chunk_marker(parts / f"{z0:08d}.json")[0]]
    from paser.segment import output_settings, record_names, routed_by, settings_digest

    output = volume.labels_name
    if volume.label_format == "tiff":
        if on_slices is not None:
            on_slices(0, 0, f"writing {output}")
        # parts of a paser before signatures were kept: the one an uninterrupted run uses
        content = kept.get("signature") or signature(volume)
        _assemble_tiff(parts, volume, chunk, out_dir / output,
                       f"{content} {settings_digest(output_settings(model, only))}")
        if output != f"{volume.stem}_labels.tif":  # an OME-TIFF's labels under the name a
            # paser before 2026-12-07 gave them: of this input's outputs of before, stale
            (out_dir / f"{volume.stem}_labels.tif").unlink(missing_ok=True)

    names = record_names(model)
    voxels = np.sum([r["class_voxels"] for r in records], 0)
    patches = np.sum([r["patches_per_model"] for r in records], 0)
    degraded = sum(r.get("degraded", 0) for r in records)
    workers = sorted({r["worker"] for r in records if "worker" in r})
    devices = sorted({r["device"] for r in records if "device" in r}) or [str(model.device)]
    threads = sorted({r["threads"] for r in records if "threads" in r})
    from paser.segment import claim_of, output_bytes

    record = {
        "input": volume.source, "kind": volume.kind, **({"dataset": volume.key} if volume.key
                                                         else {}),
        "shape": list(volume.shape),
        **{k: kept[k] for k in ("input_path", "stat", "signature") if k in kept},
        "dtype": volume.dtype, "output": output, "label_codec": list(codec.values),
        "models": names, "only": None if only is None else names[only],
        **routed_by(model, only),
        "class_fractions": dict(zip(codec.names, (voxels / max(voxels.sum(), 1)).tolist(),
                                    strict=True)),
        **field_of_view_record(volume_fill(volume, out_dir), records),
        "gflops": float(sum(r["gflops"] for r in records)),
        "gflops_per_slice": float(np.mean([r["gflops"] for r in records])),
        "flop_convention": FLOP_CONVENTION,
        "patch_share": dict(zip(names, (patches / max(patches.sum(), 1)).tolist(), strict=True)),
        **({"degraded_patches": degraded} if degraded else {}),
        **remote_record(model, volume, records),
        "ms_per_slice": float(np.mean([r["ms"] for r in records])),
        "seconds_this_call": seconds,
        "megavoxels": volume.depth * h * w / 1e6,
        **voxel_record(volume, codec.names, voxels),
        "intensity": (type_range_record(model, volume.dtype)
                      if intensity.by_type_range(volume.dtype) else
                      {**intensity.to_dict(), **({"fitted_on": "this volume (the run keeps no "
                       f"window: {model.intensity.why_none})"}
                          if intensity is not model.intensity else {})}),
        "device": ", ".join(devices), **({"threads": threads} if threads else {}),
        **({"workers": workers} if workers else {}),
        "claim": claim_of(out_dir),
        "output_bytes": {output: output_bytes(out_dir / output)},
        "slices": records,
    }
    atomic_write_text(json.dumps(record, indent=1), out_dir / f"{volume.stem}.json")
    shutil.rmtree(parts, ignore_errors=True)  # the volume is whole: its record says so
    return record


def type_range_record(model, dtype: str) -> dict:
    """The record's ``intensity`` of 8/16-bit voxels, scaled by their type's range. A run
    with a window fitted it on float or signed training images, which were scaled by it:
    such voxels are not scaled as those were (``run_window``), and the record says so
    rather than "as in training"."""
    unlike = model.intensity.unlike_training(dtype)
    if unlike is None:
        return {"mode": "type range", "says": f"{dtype} voxels scaled by their type's range "
                "(0 to its largest value), as in training"}
    return {"mode": "type range", "run_window": list(model.intensity.window), "says": unlike}


def _fov_slices(depth: int) -> str:
    """Where :func:`prepare_volume` finds the field of view: on :data:`FOV_SLICES` slices
    spread through the volume, or on every slice of a shorter one, in words."""
    if depth > FOV_SLICES:
        return f"where {FOV_SLICES} slices spread through the volume all hold it"
    return "on the volume's one slice" if depth == 1 else (
        f"where every one of the volume's {depth} slices holds it")


def field_of_view_record(fill: float | None, records: Sequence[dict]) -> dict:
    """``{"field_of_view": ...}``: the value the scan is written as outside its field of
    view and how many voxels lie there, which the class fractions and volumes leave out;
    nothing for a scan without such a fill."""
    if fill is None:
        return {}
    outside = sum(r.get("outside_voxels", 0) for r in records)
    inside = sum(sum(r["class_voxels"]) for r in records)
    return {"field_of_view": {
        # NaN as text: JSON has no NaN, and a reader other than Python's refuses the file
        "fill": fill if np.isfinite(fill) else str(fill), "outside_voxels": outside,
        "share_outside": outside / max(outside + inside, 1),
        "says": f"voxels at this value {_fov_slices(len(records))}, joined to the "
                "border, lie outside the scan's field of view: the class "
                "fractions and volumes count the voxels inside it (the labels outside are "
                "the models' answer on the fill)"}}


def remote_record(model, volume: Volume, records: Sequence[dict]) -> dict:
    """``{"remote": ...}``: the edge/cloud figures of a volume whose slices went to a remote
    tier, as an image's record has them (:func:`paser.segment._remote_record`), summed over
    its slices: bytes sent against sending every slice whole, requests, retries, degraded
    patches. ``slices`` counts the slices that kept figures (all but those of a paser
    before volumes kept them); nothing without a remote tier."""
    from paser.segment import REMOTE_CODEC, edge_gflops

    sent = [r for r in records if isinstance(r.get("remote"), dict)]
    if not sent:
        return {}
    figures = [r["remote"] for r in sent]
    counts = {k: sum(f.get(k, 0) for f in figures) for k, v in figures[0].items()
              if isinstance(v, int) and k != "bytes_whole_slice"}
    whole = sum(f["bytes_whole_slice"] for f in figures)
    edge = edge_gflops(model, *volume.plane) * len(sent)
    remote = model.router.remote
    return {"remote": {
        "url": None if remote is None else remote.url, **counts,
        "errors": list(dict.fromkeys(e for f in figures for e in f.get("errors", []))),
        "slices": len(sent), "bytes_whole_volume": whole,
        "sent_vs_whole_volume": counts.get("bytes_sent", 0) / max(whole, 1),
        "codec": REMOTE_CODEC, "degraded_patches": sum(r.get("degraded", 0) for r in sent),
        "edge_gflops": edge, "cloud_gflops": sum(r["gflops"] for r in sent) - edge}}


def voxel_record(volume: Volume, names: Sequence[str], voxels: np.ndarray) -> dict:
    """The volume's voxel size as its input states it, and each class's volume in cubic
    micrometres where the size is known along all three axes; nothing where it is not."""
    v = volume.voxel
    if v is None:
        return {}
    return {"voxel_size": v.to_dict(), **({} if v.um3 is None else {
        "class_volume_um3": dict(zip(names, (voxels * v.um3).tolist(), strict=True))})}


def _labels_zarr(path: Path, volume: Volume, chunk: int, parts: Path):
    """The zarr label array, created when no chunk of it is done yet (else reopened). One
    made anew while chunks were done (it was removed, or its metadata damaged) takes
    their records away with it: their labels are not in it, they are done again."""
    import zarr

    h, w = volume.plane
    shape = (volume.depth, h, w)
    if path.exists() and any(parts.glob("0*.json")):
        try:
            arr = zarr.open_array(str(path), mode="r+")
        except Exception:  # a zarr.json cut short or gone (zarr raises many kinds): it
            arr = None  # failed the volume on every call, as if its input were unreadable
        if arr is not None and tuple(arr.shape) == shape:
            return arr
    for marker in parts.glob("0*.json"):  # chunks whose labels the new array will not hold
        marker.unlink()
    if path.exists():
        shutil.rmtree(path)
    arr = zarr.open_array(str(path), mode="w", shape=shape, dtype="uint8",
                          chunks=(chunk, min(h, PLANE_CHUNK), min(w, PLANE_CHUNK)))
    v = volume.voxel
    if v is not None:
        arr.attrs["voxel_size"] = v.to_dict()
        if v.z is not None:  # as Fiji's HDF5 plugin and ilastik name it: z, y, x
            arr.attrs["element_size_um"] = [v.z, v.y, v.x]
    return arr


def _assemble_tiff(parts: Path, volume: Volume, chunk: int, path: Path, identity: str) -> None:
    """The label slices, a chunk in memory at a time, as one BigTIFF of one page per slice,
    deflated (:data:`LABEL_DEFLATE`; written to a temporary name, then renamed). Where the input states its voxel size, the
    labels carry it: an OME-TIFF of axes ZYX with its physical sizes (Fiji's Bio-Formats,
    napari, tifffile) and the X and Y resolution in pixels per centimetre (what plain TIFF
    readers take); one named ``.ome.tif`` (:attr:`Volume.labels_name`) is an OME-TIFF without
    it too. Its OME UUID is drawn from ``identity``, the volume's :func:`signature`
    and the digest of the run and settings that segmented it
    (:func:`paser.segment.settings_digest`): one input under two runs, caps or calibrations
    gives two files of two UUIDs, and the same input and settings the same bytes (resumed,
    or into another folder)."""
    import uuid

    import tifffile

    voxel, (h, w) = volume.voxel, volume.plane
    # an OME-TIFF where it carries a voxel size, and where its name says it is one
    ome = voxel is not None or path.name.lower().endswith(".ome.tif")
    # the axes, or tifffile's readers (napari's among them) see a stack of axes QYX
    extra: dict = {"metadata": {"axes": "ZYX"}}
    if voxel is not None:
        sizes = {f"PhysicalSize{a}": v for a, v in zip("ZYX", (voxel.z, voxel.y, voxel.x),
                                                        strict=True) if v is not None}
        extra = {"resolution": (1e4 / voxel.x, 1e4 / voxel.y), "resolutionunit": "CENTIMETER",
                 "metadata": {"axes": "ZYX", **sizes, **{f"{k}Unit": "µm" for k in sizes}}}
    if ome:  # (tifffile would draw a random one: the same input, other bytes)
        extra["metadata"]["UUID"] = str(uuid.uuid5(uuid.NAMESPACE_URL, f"paser:{identity}"))

    def pages():
        for z0 in range(0, volume.depth, chunk):
            yield from np.load(parts / f"{z0:08d}.npy", mmap_mode="r")

    with replaced(path) as tmp, tifffile.TiffWriter(tmp, bigtiff=True, ome=ome) as tif:
        tif.write(pages(), shape=(volume.depth, h, w), dtype=np.uint8,
                  photometric="minisblack", compression="zlib",
                  compressionargs={"level": LABEL_DEFLATE}, **extra)


@dataclass
class VolumeResult:
    """One volume's outcome for ``volumes.csv``: its record, or its error."""

    source: str
    stem: str
    record: dict | None = None
    error: str = ""
    resumed: bool = False


@holding_out
def segment_volumes(model, volumes: Sequence[Volume], out_dir: str | Path,
                    only: int | None = None, chunk: int = CHUNK,
                    on_slices: Callable[[int, int, str], None] | None = None,
                    overwrite: bool = False) -> list[VolumeResult]:
    """Each volume in turn (:func:`segment_volume`); one that fails is recorded with its
    error and the rest go on. A volume whose ``<stem>.json`` is there (an earlier call
    into the same folder, same run and settings: :func:`paser.segment.claim_output`) is
    skipped, and one interrupted continues with its missing chunks; ``overwrite`` starts
    over. ``volumes.csv`` gets one row per volume (beside the rows of the folder's other
    volumes: :func:`paser.segment.write_rows`)."""
    from paser.segment import claim_for, stop_writing

    out_dir = Path(out_dir)
    claim_for(out_dir, model, only, overwrite, volumes=volumes)
    results = []
    for vol in volumes:
        res = started(vol, out_dir, on_slices)
        results.append(res)
        if res.error or res.record is not None:
            continue
        try:
            res.record = segment_volume(model, vol, out_dir, only, chunk, on_slices)
        except (PaserError, OSError, RuntimeError, ValueError) as err:
            res.error = failure(vol, err)
            # the data's fault: a rerun fails the same way, so leave no half label volume
            if isinstance(err, DataError):
                discard(vol, out_dir)
            if is_write_error(err, out_dir, vol):
                # a full disk, a quota, a folder made read-only: every later volume would
                # meet it too; its finished chunks are kept for the same command again
                with contextlib.suppress(OSError):  # (where the disk has room for it)
                    _write_csv(out_dir / VOLUMES_CSV, results)
                raise stop_writing(err, vol.source, out_dir) from err
        # as each volume ends, not once all have: stopped in the next one, the folder's
        # volumes.csv still lists every volume it holds (as summary.csv every image); a
        # file that cannot be written is said by the last write, once the rest are done
        with contextlib.suppress(OSError):
            _write_csv(out_dir / VOLUMES_CSV, results)
    _write_csv(out_dir / VOLUMES_CSV, results)
    return results


def failure(volume: Volume, err: BaseException | str) -> str:
    """``err`` as the line ``volume`` fails with: named by the volume, where it does not
    name it already (a slice too small for the models says its size alone; OSError and
    ValueError say neither). An error naming the volume's file (an HDF5 dataset's
    ``scan.h5``, a stack's folder) names it already."""
    text = str(err)
    named = text.startswith(volume.source) or bool(volume.path) and text.startswith(
        f"{volume.path}:")
    return text if named else f"{volume.source}: {text}"


def is_write_error(err: Exception, out_dir: Path, volume: Volume | None = None) -> bool:
    """Whether ``err`` is a write into ``out_dir`` that every later volume would meet too
    (:data:`paser.segment.FATAL_WRITES`), which stops the call: a full disk, a quota and a
    read-only file system always; permission denied only on a file in ``out_dir`` that is
    not ``volume``'s own (an input this process may not read, wherever it lies, fails its
    volume alone). An error that names no file is paser's own write of a part."""
    from paser.segment import FATAL_WRITES

    if not isinstance(err, OSError) or err.errno not in FATAL_WRITES:
        return False
    if err.errno != errno.EACCES or not err.filename:
        return True
    try:
        name = Path(err.filename).resolve()
        inputs = [] if volume is None else [Path(volume.path or volume.source).resolve(),
                                            *(Path(f).resolve() for f in volume.files)]
        if any(name == f or name.is_relative_to(f) for f in inputs):
            return False
        return name.is_relative_to(out_dir.resolve())
    except (OSError, ValueError):
        return False


def discard(volume: Volume, out_dir: Path) -> None:
    """Remove what a failed ``volume`` left in ``out_dir``: its finished chunks and its
    label output."""
    for path in (_parts(volume, out_dir), out_dir / f"{volume.stem}_labels.zarr"):
        shutil.rmtree(path, ignore_errors=True)
    # (an OME-TIFF's labels under the name of a paser before 2026-12-07 too)
    (out_dir / f"{volume.stem}_labels.tif").unlink(missing_ok=True)
    if volume.label_format == "tiff":
        (out_dir / volume.labels_name).unlink(missing_ok=True)


def volume_markers(out_dir: Path, volumes: Sequence[Volume]) -> list[Path]:
    """What marks ``volumes`` done or begun in ``out_dir`` (the markers of
    :func:`paser.segment.claim_output`): their records, their parts and the summary
    (none without volumes; an ``--overwrite`` removes both summaries all the same,
    :func:`paser.segment.claim_for`)."""
    return [*(m for v in volumes for m in (out_dir / f"{v.stem}.json",
                                           out_dir / f".{v.stem}.parts")),
            out_dir / VOLUMES_CSV] if volumes else []


def read_done(volume: Volume, out_dir: Path) -> dict | None:
    """The record of ``volume`` when an earlier call into ``out_dir`` finished it."""
    done = out_dir / f"{volume.stem}.json"
    if not done.is_file():
        return None
    from paser.segment import claim_of, outputs_whole, recorded_as

    try:
        rec = json.loads(done.read_text())
    except ValueError:
        return None
    if not isinstance(rec, dict) or rec.get("claim", "") != claim_of(out_dir):
        return None  # of the folder before an --overwrite
    if not (recorded_as(rec, volume.source) and unchanged(volume, rec, rec.get("slices", ()))):
        return None  # written again since (or an older record's other spelling): again
    if rec.get("stat") is not None and rec["stat"] != (now := stat_of(volume)):
        # copied or touched, every slice as it was: its time kept, so it is read once
        rec["stat"] = now
        with contextlib.suppress(OSError):  # (a folder only read now: read again next time)
            atomic_write_text(json.dumps(rec, indent=1), done)
    if not outputs_whole(out_dir, rec):
        return None  # its label volume gone or cut short since: again
    if rec.get("degraded_patches"):
        return None  # patches kept f0's answer while the remote tier was down: again
    scaled = rec.get("intensity") or {}
    if scaled.get("mode") == "window" and scaled.get("window") is None:
        return None  # a float volume scaled slice by slice (paser before 2026-12-05): again
    return rec


def started(volume: Volume, out_dir: Path,
            on_slices: Callable[[int, int, str], None] | None = None) -> VolumeResult:
    """``volume``'s result as an earlier call into ``out_dir`` left it (:func:`earlier`):
    finished (``resumed``, its slices reported done to ``on_slices``), failed (``error``),
    or neither: to do."""
    res = VolumeResult(volume.source, volume.stem)
    res.record, res.error = earlier(volume, out_dir)
    if res.record is not None and not res.error:
        res.resumed = True
        # a call stopped between the record and the parts' removal (finish_volume) left
        # them: its labels again, uncompressed, which nothing reads once the record is there
        shutil.rmtree(_parts(volume, out_dir), ignore_errors=True)
        if on_slices is not None:
            on_slices(volume.depth, 0, volume.stem)  # done before
    return res


def earlier(volume: Volume, out_dir: Path) -> tuple[dict | None, str]:
    """What an earlier call into ``out_dir`` left of ``volume``: ``(record, "")`` when it
    finished it (:func:`read_done`), ``(None, why)`` when another input of its stem holds
    the outputs there (:func:`owner`: this one is not segmented), or it could not be
    opened or read now (it alone fails), ``(None, "")`` to do."""
    if volume.error:
        return None, volume.error
    theirs = owner(volume, out_dir)
    if theirs is not None:
        from paser.segment import taken

        return None, taken(out_dir / f"{volume.stem}.json", theirs, volume.source)
    try:
        return read_done(volume, out_dir), ""
    except (PaserError, OSError, ValueError) as err:
        return None, str(err) if isinstance(err, PaserError) else f"{volume.source}: {err}"


def owner(volume: Volume, out_dir: Path) -> str | None:
    """The input whose outputs (finished, or chunks of an interrupted call) ``out_dir``
    holds under ``volume``'s stem, when it is another one than ``volume``: each input
    keeps its own; ``None`` when they are free or this volume's."""
    from paser.segment import claim_of, recorded_as

    for made in (out_dir / f"{volume.stem}.json", _parts(volume, out_dir) / "volume.json"):
        try:
            rec = json.loads(made.read_text()) if made.is_file() else None
        except ValueError:
            continue
        rec = (rec.get("volume") or rec) if isinstance(rec, dict) else None
        if (isinstance(rec, dict) and rec.get("claim", "") == claim_of(out_dir)
                and recorded_as(rec, volume.source) is False):
            return str(rec.get("input"))
    return None


def _write_csv(path: Path, results: Sequence[VolumeResult]) -> None:
    from paser.segment import INPUT_PATH, SUMMARY, canonical, forget_rows, write_rows

    rows = []
    for r in results:
        rec = r.record or {}
        remote = rec.get("remote") or {}  # (--remote; as summary.csv has them for images)
        rows.append([r.source, "ok" if r.record else "failed",
                     "x".join(map(str, rec.get("shape", []))),
                     f"{rec['megavoxels']:.3f}" if rec else "",
                     f"{rec['gflops']:.3f}" if rec else "",
                     f"{rec['ms_per_slice']:.1f}" if rec else "",
                     json.dumps(rec.get("patch_share", {})),
                     json.dumps(rec.get("class_fractions", {})),
                     rec.get("degraded_patches", 0) if rec else "",
                     remote.get("bytes_sent", ""), remote.get("bytes_whole_volume", ""),
                     rec.get("output", ""), r.error, canonical(r.source)])
    # a volumes.csv of an older paser: its rows are kept under these columns (write_rows)
    write_rows(path, ["input", "status", "shape", "megavoxels", "gflops", "ms per slice",
                      "patch share", "class fractions", "degraded patches", "bytes sent",
                      "bytes whole volume", "output", "error", INPUT_PATH], rows)
    forget_rows(path.parent / SUMMARY, {row[-1] for row in rows})  # read as images before


def stem_of(spec: str | Path) -> str:
    """The stem of the outputs of the volume ``spec`` names, as :func:`open_volume` gives
    it (HDF5 ``file_key``, zarr ``store_inner``, a folder its own name), without opening it."""
    text = str(spec)
    h5 = _H5.match(text)
    if h5:
        key = (h5["key"] or "").strip().strip("/")
        return f"{Path(h5['file']).stem}_{key.replace('/', '_')}" if key else Path(
            h5["file"]).stem
    if _ZARR.search(text):
        store, inner = re.split(r"\.zarr", text.rstrip("/"), maxsplit=1, flags=re.IGNORECASE)
        return "_".join([Path(store).name, *Path(inner.strip("/")).parts])
    path = Path(text)
    return path.resolve().name if path.is_dir() else path.stem


def _there(spec: str | Path) -> bool:
    """Whether the file or folder a volume ``spec`` names is there: an HDF5 ``file:/key``'s
    file, a zarr array's ``.zarr`` store (an array missing inside it is the store's to say,
    as an HDF5 dataset missing in its file)."""
    text = str(spec)
    h5 = _H5.match(text)
    if h5:
        return Path(h5["file"]).exists()
    return (_zarr_store(text) if _ZARR.search(text) else Path(text)).exists()


def _meant(spec: str | Path) -> str | None:
    """What a path that is not there was likely meant to name, where it names a dataset in
    an HDF5 file the way of a zarr group (``scan.h5/entry/data``) or an array in a zarr
    group the way of an HDF5 file (``scan.zarr:0``); None otherwise."""
    text = str(spec)
    h5, group = _H5_SLASH.match(text), _ZARR_COLON.match(text)
    if h5 and Path(h5["file"]).is_file():
        return f"a dataset in an HDF5 file is named with a colon: {h5['file']}:/{h5['key']}"
    if group and Path(group["store"]).is_dir():
        return (f"an array in a zarr group is named as a path in it: "
                f"{group['store']}/{group['inner']}")
    return None


def split_inputs(inputs: Sequence[str | Path], stack: bool = False,
                 exclude: str | Path | None = None, keep_failed: bool = False
                 ) -> tuple[list[Path], list[Volume]]:
    """``paser segment``'s inputs as image files and volumes: HDF5 ``file:/key``, ``.zarr``
    paths, TIFFs of more than one page (named or found in a folder) and, with ``stack``,
    folders (:func:`is_volume`); the rest are images (:func:`paser.segment.find_images`).
    Two outputs with one stem are a :class:`DataError`, and so is a path that is not there
    (an HDF5 file, a ``.zarr`` store), as an image's is; ``exclude`` (the output folder) is
    not searched. A volume that cannot be opened is its :class:`DataError`, or with
    ``keep_failed`` a :class:`Volume` whose ``error`` says why (the others go on, as a file
    that cannot be read does)."""
    from paser.segment import canonical, find_images, not_there, once, one_output_each

    def opened(spec) -> Volume:
        try:
            return open_volume(spec)
        except DataError as err:
            if not keep_failed or isinstance(err, MissingPackage):
                raise
            return Volume(str(spec), stem_of(spec), "failed", (0, 0, 0), "", error=str(err))

    for spec in inputs:  # a path mistyped: as find_images, before anything is written
        if is_volume(spec, stack) and not _there(spec):
            raise not_there(spec)
        meant = None if Path(spec).exists() else _meant(spec)
        if meant is not None:
            raise DataError(f"{spec}: no such file or folder; {meant}")
        if (stack and exclude is not None and Path(spec).is_dir()
                and Path(spec).resolve() == Path(exclude).resolve()):
            # its label volume would be a file of the stack: the next call refuses it
            raise DataError(f"{spec}: the --stack folder is --out, where the outputs are "
                            "written; give an --out outside it")
        if exclude is not None and _ZARR.search(str(spec)) and is_volume(spec, stack):
            store, out = _zarr_store(spec).resolve(), Path(exclude).resolve()
            if out == store or store in out.parents:  # its labels would be arrays of it
                raise DataError(f"{spec}: --out {exclude} is the zarr store {store} or "
                                "inside it, where the outputs would lie among its arrays; "
                                "give an --out outside it")
    volumes = [opened(i) for i in inputs if is_volume(i, stack)]
    rest = [i for i in inputs if not is_volume(i, stack)]
    files = []
    for f in find_images(rest, exclude) if rest else []:
        if is_volume(f):
            volumes.append(opened(f))
        else:
            files.append(f)
    volumes = once(volumes, lambda v: canonical(v.source))  # one given twice: one volume
    one_output_each([(f.stem, str(f)) for f in files] + [(v.stem, v.source) for v in volumes],
                    datasets=[Path(i) for i in rest if Path(i).is_dir()])
    return files, volumes
