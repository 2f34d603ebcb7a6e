"""One image reader: every input image of training, evaluation, ``paser segment``, the
server and ``paser data check`` is decoded here, so the same file gives the same tensor
everywhere.

- TIFF (also BigTIFF, OME-TIFF, planar, 16-bit colour) through tifffile; PNG, JPEG and the
  rest through Pillow. A stack of pages or frames gives its first image, with a note
  (volumes: :mod:`paser.volumes`).
- A palette image is its colours (what it shows), not its indices; 1-bit is 0 or 1. But an
  ImageJ (Fiji) TIFF's palette is the lookup table ImageJ shows its values through (Fire,
  Green): its stored values are read, as ImageJ measures them.
- Values become [0, 1] by :class:`Intensity`: 8- and 16-bit unsigned integers (and
  booleans) by their type's range; floats and every other integer type (signed: CT
  reconstructions) by an intensity window the run fits on its training images and keeps
  (``intensity.json``), or per image (min-max) only when asked for.
- Colour becomes grayscale by luminance (scikit-image ``rgb2gray``) for one-channel models,
  unless its channels are equal (a gray scan saved as RGB: one is kept); grayscale is
  repeated for three-channel models; alpha is dropped.

Every problem is a :class:`~paser.errors.DataError` that names the file.
"""

from __future__ import annotations

import io
import json
import os
from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal

import numpy as np
from PIL import Image, UnidentifiedImageError

from paser.errors import DataError

TIFF_SUFFIXES = (".tif", ".tiff")
#: every image file the reader takes, for training folders, ``paser segment`` and stacks
READABLE_SUFFIXES = (".png", *TIFF_SUFFIXES, ".jpg", ".jpeg", ".jpe", ".jfif", ".bmp", ".webp",
                     ".gif", ".pgm", ".ppm")
#: image formats an instrument or a tool writes that the reader does not take: a folder's
#: files of these are named as skipped (:func:`unread_files`), not passed over in silence
UNREAD_SUFFIXES = (".jp2", ".j2k", ".heic", ".heif", ".avif", ".dcm", ".dicom", ".nii", ".mrc",
                   ".rec", ".raw", ".czi", ".nd2", ".lif", ".ims", ".svs", ".ndpi", ".vsi",
                   ".tga", ".psd", ".dng", ".cr2", ".nef")
#: the first bytes of a TIFF (classic and BigTIFF, either byte order) and of a PNG: a file
#: is read by what it holds, not by its name (PNG bytes saved as .tif)
_TIFF_MAGIC = (b"II*\x00", b"MM\x00*", b"II+\x00", b"MM\x00+")
_PNG_MAGIC = b"\x89PNG\r\n\x1a\n"
#: what a run keeps of how its inputs were scaled (:meth:`Intensity.save`)
INTENSITY_FILE = "intensity.json"
#: why a scaling has no window, where nothing says more
NO_WINDOW = ("it trained on 8/16-bit images, was made before 2026-12-04, when runs kept "
             "none, or its intensity.json was removed")
#: percentiles of the training pixels that bound the fitted window
WINDOW_PERCENTILES = (0.5, 99.5)
#: training pixels spanning less than this share of their type's range are called dim, and
#: ``paser data check`` suggests a ``data.window`` of their stored range; an 8/16-bit image
#: scaled by its type's range whose pixels all lie below it gets :data:`DIM_NOTE`
LOW_CONTRAST = 0.125
#: the start of the note of such an image (``paser segment`` counts them by it)
DIM_NOTE = "its pixels fill only the lowest eighth of their type's range"
#: pixels sampled per image, and images read, to fit the window (a bounded pass)
_FIT_PIXELS, _FIT_IMAGES = 1 << 16, 64
_READ_ERRORS = (UnidentifiedImageError, OSError, SyntaxError, ValueError, IndexError,
                KeyError, TypeError, Image.DecompressionBombError)
#: scans are large: Pillow's guard against decompression bombs (89 megapixels) is raised to
#: a gigapixel (4 GiB as float32); a larger image is one file's error, not a crash
Image.MAX_IMAGE_PIXELS = 1 << 30


def by_type_range(dtype: np.dtype) -> bool:
    """Whether values of ``dtype`` scale by the type's range (uint8, uint16, bool); the rest
    (floats, signed and wider integers) need an intensity window."""
    here = np.dtype(dtype).newbyteorder("=")  # big-endian HDF5 or zarr: the same values
    return here in (np.dtype(np.uint8), np.dtype(np.uint16), np.dtype(np.bool_))


def hidden(path: Path, below: Path | None = None) -> bool:
    """Whether ``path`` (or a folder between ``below`` and it) is hidden: a name starting
    with a dot (``.DS_Store``, macOS ``._scan.png`` resource forks, ``.ipynb_checkpoints``)."""
    parts = path.relative_to(below).parts if below is not None else (path.name,)
    return any(part.startswith(".") for part in parts)


def image_files(folder: Path, suffixes: tuple[str, ...] = READABLE_SUFFIXES,
                recursive: bool = False, exclude: Path | None = None) -> list[Path]:
    """The image files of ``folder`` (with ``recursive``, of its subfolders too), sorted;
    hidden files and folders left out, and everything under ``exclude`` (an output folder
    inside the input)."""
    found = _walk(folder) if recursive else folder.iterdir()
    skip = None if exclude is None else exclude.resolve()
    return sorted(f for f in found if f.suffix.lower() in suffixes and f.is_file()
                  and not hidden(f, folder)
                  and not (skip is not None and f.resolve().is_relative_to(skip)))


def _walk(folder: Path):
    """Every file under ``folder`` (hidden folders and linked ones not entered); a folder
    that cannot be listed is a :class:`DataError` naming it (``Path.rglob`` passed over it
    in silence, and its images with it)."""
    def refused(err: OSError) -> None:
        raise DataError(f"{err.filename}: cannot list the folder ({err.strerror}); make it "
                        "readable, or move it out of the inputs")

    for top, dirs, names in os.walk(folder, onerror=refused):
        dirs[:] = sorted(d for d in dirs if not d.startswith("."))
        yield from (Path(top) / n for n in names)


def unread_files(folder: Path, recursive: bool = False) -> list[Path]:
    """The files of ``folder`` in an image format the reader does not take
    (:data:`UNREAD_SUFFIXES`), sorted, hidden ones left out: what a folder's listing
    skips, to be named."""
    return image_files(folder, UNREAD_SUFFIXES, recursive)


def files_now(path: Path) -> tuple[int, int, int] | None:
    """``(files, bytes, newest mtime_ns)`` of what ``path`` holds (the file, or a folder's
    every file below it), from their sizes and times alone, nothing opened: files written,
    added or removed since change it (what a cached intensity window is keyed by). None
    where it is not there."""
    try:
        stats = ([f.stat() for f in path.rglob("*") if f.is_file()] if path.is_dir()
                 else [path.stat()])
    except OSError:
        return None
    return (len(stats), sum(st.st_size for st in stats),
            max((st.st_mtime_ns for st in stats), default=0))


def skipped_note(files: list[Path]) -> str | None:
    """One line naming the unread files of a folder by format, or ``None``."""
    if not files:
        return None
    counts: dict[str, int] = {}
    for f in files:
        counts[f.suffix.lower()] = counts.get(f.suffix.lower(), 0) + 1
    kinds = ", ".join(f"{n} {suffix}" for suffix, n in counts.items())
    return (f"skipped {len(files)} file{'s' if len(files) > 1 else ''} in a format paser does "
            f"not read ({kinds}; e.g. {files[0]}): convert them to TIFF or PNG")


def _head(path: Path) -> bytes | None:
    """A file's first bytes (a PNG's header to its colour type), ``None`` where it cannot
    be opened (a folder, a missing file): what :func:`is_tiff` and :func:`_png16` read."""
    try:
        with open(path, "rb") as f:
            return f.read(26)
    except OSError:
        return None


def is_tiff(path: Path, head: bytes | None = None) -> bool:
    """Whether ``path`` holds a TIFF, by its first bytes (``head``: :func:`_head`, read here
    when not given; by its name where it cannot be opened)."""
    head = _head(path) if head is None else head
    return path.suffix.lower() in TIFF_SUFFIXES if head is None else head[:4] in _TIFF_MAGIC


def _png16(head: bytes | None) -> int | None:
    """The colour type of a 16-bit colour or gray + alpha PNG (2 RGB, 4 gray + alpha, 6
    RGBA), which Pillow decodes to 8 bits, from its first bytes (:func:`_head`); ``None``
    for any other file."""
    if (head is not None and head[:8] == _PNG_MAGIC and len(head) == 26 and head[24] == 16
            and head[25] in (2, 4, 6)):
        return head[25]
    return None


#: EXIF orientation (tag 0x0112) -> the array turned upright, as viewers show the image
#: (ImageOps.exif_transpose's transposes; tests/test_images.py checks each against it)
_UPRIGHT = {2: lambda a: a[:, ::-1], 3: lambda a: a[::-1, ::-1], 4: lambda a: a[::-1],
            5: lambda a: a.swapaxes(0, 1), 6: lambda a: np.rot90(a, -1),
            7: lambda a: a[::-1, ::-1].swapaxes(0, 1), 8: lambda a: np.rot90(a, 1)}


def _orientation(img: Image.Image) -> int:
    """An image's EXIF orientation (1: stored upright; anything unknown counts as 1), from
    what its header holds: an EXIF block, ImageMagick's raw profile, XMP. (Pillow's base
    ``getexif``: a PNG's own decodes the pixels to look for a block after them, 56 ms a
    probe of 16 megapixels.)"""
    try:
        value = int(Image.Image.getexif(img).get(0x0112, 1))
    except (TypeError, ValueError, OSError, SyntaxError, KeyError):
        return 1
    return value if value in _UPRIGHT else 1


def shared_stem(named) -> tuple[str, str, str] | None:
    """The first file stem two different sources share, ``(stem, first, second)``, or
    ``None``; ``named`` gives ``(stem, source)`` pairs (one source twice is one input)."""
    seen: dict[str, str] = {}
    for stem, source in named:
        if seen.setdefault(stem, source) != source:
            return stem, seen[stem], source
    return None


def read_array(path: str | Path, notes: list[str] | None = None,
               palette: Literal["colours", "indices"] = "colours") -> np.ndarray:
    """The first image of a file as stored: ``[H, W]`` or ``[H, W, C]``, its own dtype.
    A palette image gives its colours, or with ``palette="indices"`` its stored indices (a
    mask: they are its classes). TIFF values are as stored (a WhiteIsZero mask is not
    inverted as Pillow would). ``notes`` gets what was done beyond decoding."""
    path = Path(path)
    notes = [] if notes is None else notes
    colours = palette == "colours"
    _not_empty(path)
    try:
        head = _head(path)
        arr = (_tiff(path, notes, colours) if is_tiff(path, head)
               else _pillow(path, notes, colours, _png16(head)))
    except DataError:
        raise
    except _READ_ERRORS as err:
        raise DataError(f"{path}: cannot read the image ({err}); "
                        + missing_codec_advice(err)) from None
    if arr.ndim not in (2, 3) or 0 in arr.shape[:2]:
        raise DataError(f"{path}: an image of shape {arr.shape}, expected H x W or H x W x C")
    return arr


def read_png_bytes(body: bytes, notes: list[str] | None = None) -> np.ndarray:
    """A PNG's bytes (a request to ``paser serve``) as :func:`read_array` reads the same
    file: 16-bit colour at its 16 bits, a palette as its colours, alpha dropped, turned
    upright by an EXIF orientation."""
    return _pillow(io.BytesIO(body), [] if notes is None else notes, True, _png16(body[:26]))


def _not_empty(path: Path) -> None:
    if path.is_file() and path.stat().st_size == 0:
        raise DataError(f"{path}: an empty file (0 bytes); replace or remove it")


def missing_codec_advice(err: Exception) -> str:
    """What to do about a file that does not decode: install the codec tifffile names, or
    replace the file."""
    if "imagecodecs" in str(err):
        return ("install tifffile's codecs (pip install imagecodecs) or save the file "
                "uncompressed")
    return "replace or remove the file"


def _tiff(path: Path, notes: list[str], colours: bool = True) -> np.ndarray:
    import tifffile

    with tifffile.TiffFile(path) as tif:
        series = main_series(tif)
        first = series.keyframe
        axes, pages = series.axes, len(series.pages)
        if _channel_pages(series):  # ImageJ / OME: one image, a page per channel
            if series.shape[0] > 2:
                raise _many_channel_pages(path, series)
            notes.append(f"2 channels stored as pages (TIFF axes {axes}), read as the "
                         "image's two channels")
            return np.moveaxis(series.asarray(), 0, -1)
        stack = pages if pages > 1 else len(stack_pages(tif))  # a page a series
        if stack > 1:
            notes.append(f"a stack of {stack} pages (TIFF axes {axes}); the first "
                         "one read (volumes: paser segment reads every page)")
            arr, axes = series.pages[0].asarray(), series.pages[0].axes
        else:
            arr = series.asarray()
        others = other_images(tif)
        if others:  # read alone, they would pass unseen (volumes: refused, named)
            notes.append(f"holds more than one image or stack of pages ({pages} x "
                         f"{' x '.join(map(str, first.shape))} {first.dtype}, then "
                         f"{listed(others)}); the first one read: save each as its own TIFF")
        if colours and first.photometric == tifffile.PHOTOMETRIC.MINISWHITE:
            notes.append("stored WhiteIsZero (viewers show it inverted): read as stored")
        if colours and first.photometric == tifffile.PHOTOMETRIC.PALETTE:
            if shows_colours(tif):
                return colour_map(first)[arr]
            notes.append("an ImageJ TIFF shown through a colour lookup table: its stored "
                         "values read (what ImageJ measures), not the table's colours")
    if arr.ndim > 2:  # an axis of one that is not Y or X (H x W x 1 written as YXQ): gone
        keep = [i for i, (a, n) in enumerate(zip(axes, arr.shape, strict=True))
                if a in "YX" or n > 1]
        arr, axes = arr.reshape([arr.shape[i] for i in keep]), "".join(axes[i] for i in keep)
    while arr.ndim > 2 and len(axes.replace("S", "")) > 2:  # leading axes of one image
        arr, axes = arr[0], axes[1:]
    if axes and axes[0] == "S":  # planar channels first
        arr = np.moveaxis(arr, 0, -1)
        if pages == 1 and arr.shape[-1] in (3, 4):  # tifffile's way with a (3|4, H, W) stack
            notes.append(f"{arr.shape[-1]} planes stored apart (TIFF axes "
                         f"{series.axes}), read as one colour image; a stack of "
                         f"{arr.shape[-1]} slices written by tifffile.imwrite without "
                         "photometric='minisblack' is stored so: if these are slices, write "
                         "them again with that argument")
    alpha = tiff_alpha(first)
    if alpha and arr.ndim == 3 and arr.shape[-1] > alpha:
        arr = without_alpha(arr, alpha)
        notes.append("alpha channel dropped")
    if is_cmyk(first) and arr.ndim == 3 and arr.shape[-1] == 4:
        arr = cmyk_to_rgb(arr)
        notes.append("CMYK converted to RGB, as a CMYK JPEG is")
    if colours and first.photometric != tifffile.PHOTOMETRIC.PALETTE:
        arr = stretched(arr, first.bitspersample, notes)
    return arr


def native(arr: np.ndarray) -> np.ndarray:
    """``arr`` in this machine's byte order: the same values (big-endian HDF5 or zarr, FITS,
    an .npz written on another machine), for torch refuses big-endian arrays and a dtype
    check would take ``>u2`` for another type than ``uint16``; ``arr`` itself where it is."""
    return arr if arr.dtype.isnative else arr.astype(arr.dtype.newbyteorder("="))


def stretched(arr: np.ndarray, bits: int, notes: list[str] | None = None) -> np.ndarray:
    """Unsigned samples of ``bits`` bits (a TIFF's BitsPerSample: 4, 10, 12, 14) stored in a
    wider type (tifffile gives 0..15 as uint8, 0..4095 as uint16) stretched to that type's
    range, as Pillow stretches a 4-bit PNG and a PGM of maxval 4095: by the type's range
    they were 1/17 or 1/16 as bright as the same picture in a PNG. Any other array as it is;
    never a mask's classes or a palette's indices (the callers read those apart)."""
    width = 8 * arr.dtype.itemsize
    if arr.dtype.kind != "u" or not 0 < bits < width:
        return arr
    if notes is not None:
        notes.append(f"{bits}-bit samples stretched to {arr.dtype}'s range, as a {bits}-bit "
                     "PNG or PGM is read")
    top = float(np.iinfo(arr.dtype).max)
    return np.rint(arr * (top / (2 ** bits - 1))).astype(arr.dtype)


def is_cmyk(page) -> bool:
    """Whether a TIFF page holds CMYK inks (Photometric Separated, InkSet not 'not CMYK'):
    read as 4 channels, its K was dropped as alpha and its inks taken for red, green and
    blue, where the same picture as a JPEG is converted to RGB."""
    import tifffile

    inkset = page.tags.get(332)
    return (page.photometric == tifffile.PHOTOMETRIC.SEPARATED
            and (inkset is None or inkset.value != 2)
            and tiff_alpha(page) + 4 == (page.samplesperpixel or 0))  # 4 inks (and alpha)


def cmyk_to_rgb(arr: np.ndarray) -> np.ndarray:
    """CMYK ``[..., 4]`` as RGB ``[..., 3]`` of its dtype: 8-bit by Pillow's conversion (what a
    CMYK JPEG is read with), wider integers by the same rule, ``(max - C)(max - K) / max``."""
    if arr.dtype == np.uint8:
        plane = np.ascontiguousarray(arr.reshape(-1, arr.shape[-2], 4))  # Pillow: 2-D images
        rgb = np.asarray(Image.fromarray(plane, "CMYK").convert("RGB"))
        return rgb.reshape(*arr.shape[:-1], 3)
    top = float(np.iinfo(arr.dtype).max) if arr.dtype.kind == "u" else 1.0
    ink = arr.astype(np.float64)
    rgb = (top - ink[..., :3]) * (top - ink[..., 3:]) / top
    return (np.rint(rgb) if arr.dtype.kind == "u" else rgb).astype(arr.dtype)


def without_alpha(arr: np.ndarray, alpha: int) -> np.ndarray:
    """``arr`` ``[..., C]`` without its last ``alpha`` channels; gray + alpha as gray
    ``[...]``, the shape a gray image of the same pixels has (a folder of slices saved with
    and without alpha is one stack; a volume's field of view is looked for on its planes)."""
    arr = arr[..., :-alpha]
    return arr[..., 0] if arr.shape[-1] == 1 else arr


def listed(items: list[str], most: int = 5) -> str:
    """``items`` joined, the first ``most`` of them, then how many more."""
    return ", ".join(items[:most]) + (f" and {len(items) - most} more" if len(items) > most
                                      else "")


def shows_colours(tif) -> bool:
    """Whether a palette TIFF's pixels are the colours of its palette, as for any palette
    image; not for ImageJ's (Fiji's): it saves an 8-bit image it shows through a colour
    lookup table (Fire, Green, Glasbey) as a palette TIFF, and the stored values are the
    data, the table only its display (a green one would make every pixel darker by
    luminance, and a volume of the same pages, read as stored, another tensor)."""
    return not tif.is_imagej


def colour_map(page) -> np.ndarray:
    """A palette TIFF page's colour of each index, ``[2**bits, 3]`` uint8: a 16-bit colour
    map's high bytes (one written in 8-bit values as it is)."""
    cmap = page.colormap  # [3, 2**bits]
    if cmap.max() > 255:
        cmap = cmap >> 8
    return np.ascontiguousarray(cmap.astype(np.uint8).T)


def palette_of(path: str | Path) -> np.ndarray | None:
    """The colour of each index of a palette image, ``[N, 3]`` uint8 (an ImageJ TIFF's
    lookup table too, which :func:`read_array` leaves aside: :func:`shows_colours`); None
    for an image without a palette, or a file neither reader opens. The header alone is
    read, no pixel."""
    import tifffile

    path = Path(path)
    try:
        if is_tiff(path):
            with tifffile.TiffFile(path) as tif:
                page = main_series(tif).keyframe
                return (colour_map(page) if page.photometric == tifffile.PHOTOMETRIC.PALETTE
                        else None)
        with Image.open(path) as img:
            if img.mode not in ("P", "PA"):
                return None
            return np.frombuffer(bytes(img.getpalette() or ()), np.uint8).reshape(-1, 3)
    except _READ_ERRORS:  # not an image: its reading names it
        return None


def _many_channel_pages(path: Path, series) -> DataError:
    """Why a TIFF of 3 or more channels stored as pages is refused: read as channels, three
    or four would be taken for colour (mixed by luminance) and alpha (dropped)."""
    return DataError(
        f"{path}: its pages hold {series.shape[0]} channels (TIFF axes {series.axes}); paser "
        "reads images of one channel, two (two detectors) or colour: save the channel to use "
        "as its own file (data = tifffile.imread(path); tifffile.imwrite(out, data[c]))")


def _channel_pages(series) -> bool:
    """Whether a TIFF series is one gray image of several channels stored a page each (axes
    CYX, as ImageJ and OME-TIFF write them): one image, not a stack of slices; two are read
    as its channels, more refused (:func:`_many_channel_pages`)."""
    page = series.pages[0]
    return (page is not None and series.axes == "C" + page.axes and page.axes == "YX"
            and series.shape[0] > 1)


def tiff_alpha(page) -> int:
    """How many of a TIFF page's last samples are alpha (its ExtraSamples tag says so; an
    unspecified extra sample is a channel of its own: a second detector, say)."""
    return sum(int(e) in (1, 2) for e in (page.extrasamples or ()))


def _pillow(path: Path | io.BytesIO, notes: list[str], colours: bool = True,
            deep: int | None = None) -> np.ndarray:
    """A file Pillow reads, or its bytes (``deep``: a 16-bit PNG's colour type,
    :func:`_png16`, decoded by imagecodecs instead), turned upright by its EXIF
    orientation."""
    with Image.open(path) as img:
        if getattr(img, "n_frames", 1) > 1:
            notes.append(f"a stack of {img.n_frames} frames; the first one read")
        turn = _orientation(img)
        if deep:  # not decoded by Pillow too
            arr = _png16_array(path, deep, notes)
        elif _pnm16(img) and img.tile[0][0] != "ppm_plain":
            arr = _pnm16_array(img)
        else:
            if img.mode == "RGB" and _pnm_maxval(img) > 255:  # plain (ASCII): 8 bits
                notes.append("a plain (ASCII) PPM of 16-bit samples, read at 8 bits: save it "
                             "as a binary PPM (P6), PNG or TIFF to keep its 16 bits")
            img.load()
            arr = _pillow_array(img, notes, colours)
    if turn != 1:  # a camera's or phone's JPEG: as every viewer (and its annotator) sees it
        arr = np.ascontiguousarray(_UPRIGHT[turn](arr))
        notes.append(f"turned upright by its EXIF orientation ({turn})")
    return arr


def _png16_array(path: Path | io.BytesIO, colour_type: int, notes: list[str]) -> np.ndarray:
    """A 16-bit colour or gray + alpha PNG at its 16 bits (Pillow gives 8), alpha dropped."""
    import imagecodecs

    try:
        arr = imagecodecs.png_decode(path.getvalue() if isinstance(path, io.BytesIO)
                                     else path.read_bytes())
    except (imagecodecs.PngError, RuntimeError, ValueError) as err:  # a broken file
        what = "the PNG" if isinstance(path, io.BytesIO) else path
        raise DataError(f"{what}: cannot read the image ({err}); replace or remove the "
                        "file") from None
    keep = 1 if colour_type == 4 else 3
    if arr.ndim == 3 and arr.shape[-1] > keep:  # alpha, or a transparent colour (tRNS) as one
        arr = arr[..., 0] if keep == 1 else arr[..., :3]
        notes.append("alpha channel dropped")
    return arr


def _pillow_array(img: Image.Image, notes: list[str], colours: bool) -> np.ndarray:
    """One Pillow image's pixels as stored: palette colours (or indices), bilevel as
    booleans, other colour models as RGB, alpha dropped."""
    if img.mode in ("P", "PA"):
        if not colours:  # the indices (PA: without its alpha)
            return np.asarray(img)[..., 0] if img.mode == "PA" else np.asarray(img)
        img = img.convert("RGB")  # its colours; transparency is alpha, dropped
    elif img.mode == "1":  # bilevel: booleans, scaled by their range (0 and 1)
        return np.asarray(img, dtype=bool)
    elif img.mode in ("CMYK", "YCbCr", "HSV", "LAB"):
        img = img.convert("RGB")
    elif img.format == "PPM" and img.mode == "I":  # a plain (ASCII) 16-bit PGM
        return np.asarray(img).astype(np.uint16)
    arr = np.asarray(img)
    if img.mode in ("LA", "La", "RGBA", "RGBa"):  # the format says the last is alpha
        arr = without_alpha(arr, 1)
        notes.append("alpha channel dropped")
    return arr


def _pnm_maxval(img: Image.Image) -> int:
    """A PGM's or PPM's largest sample value (its header's maxval) as Pillow parsed it, before
    its pixels are decoded; 0 for any other image."""
    if img.format != "PPM" or not img.tile:
        return 0
    args = img.tile[0][3]  # (decoder, extents, offset, args): a tuple before Pillow 11
    if isinstance(args, tuple) and len(args) == 2 and isinstance(args[1], int):
        return args[1]  # Pillow's own decoders: (rawmode, maxval)
    return 65535 if args == "I;16B" else 255 if args in ("L", "RGB") else 0


def _pnm16(img: Image.Image) -> bool:
    """Whether ``img`` is a PGM or a binary PPM of 16-bit samples (maxval past 255), before
    its pixels are decoded: Pillow opens a PGM as 32-bit integers (mode I), its values
    stretched from its maxval to 0..65535, and decodes a PPM to 8 bits. uint16 is what it
    holds (as int32 it would be scaled by an intensity window, not as the same 16-bit PNG or
    TIFF). A plain (ASCII) 16-bit PPM is left to Pillow's 8 bits, with a note."""
    maxval = _pnm_maxval(img)
    return maxval > 255 and (img.mode == "I" or img.tile[0][0] == "ppm")


def _pnm16_array(img: Image.Image) -> np.ndarray:
    """A binary 16-bit PGM or PPM (:func:`_pnm16`) at its 16 bits: its big-endian samples
    read with numpy where Pillow's header ends, stretched from its maxval to 0..65535 as
    Pillow stretches a PGM's (``min(65535, round(v / maxval * 65535))``; a PGM's values are
    Pillow's to the bit, and no Python loop a sample at a time)."""
    (w, h), bands, maxval = img.size, len(img.getbands()), _pnm_maxval(img)
    img.fp.seek(img.tile[0][2])
    data = img.fp.read(2 * h * w * bands)
    if len(data) < 2 * h * w * bands:
        raise OSError(f"image file is truncated ({len(data)} of {2 * h * w * bands} bytes "
                      "of pixels)")
    arr = np.frombuffer(data, ">u2").reshape((h, w, bands) if bands > 1 else (h, w))
    if maxval != 65535:
        arr = np.minimum(np.rint(arr / maxval * 65535.0), 65535.0)
    return arr.astype(np.uint16)


#: lossy formats: their compression moves a mask's values at every edge
LOSSY_SUFFIXES = (".jpg", ".jpeg", ".jpe", ".jfif")


#: TIFF compressions that are JPEG's, lossy (OJPEG, JPEG, Adobe's lossy JPEG)
_TIFF_JPEG = (6, 7, 34892)


def jpeg_mask(path: Path) -> str | None:
    """How a mask or label file holds JPEG's lossy data ("a JPEG file", by its name; "JPEG
    data in a .png file", by its first bytes; "a TIFF compressed with JPEG"), or ``None``:
    such values, moved at every edge, were taken for a mask resized with interpolation."""
    if path.suffix.lower() in LOSSY_SUFFIXES:
        return "a JPEG file"
    head = _head(path)
    if head is not None and head[:3] == b"\xff\xd8\xff":
        return f"JPEG data in a {path.suffix or 'file'} file"
    if head is not None and is_tiff(path, head):
        import tifffile

        try:
            with tifffile.TiffFile(path) as tif:
                compression = int(tif.pages[0].compression)
        except _READ_ERRORS:  # its reading names it
            return None
        if compression in _TIFF_JPEG:
            return "a TIFF compressed with JPEG"
    return None


def read_mask(path: str | Path) -> np.ndarray:
    """A mask file's stored values as uint8 ``[H, W]``: grayscale (any integer type whose
    values lie in 0..255, or bilevel 0 / 1), palette indices, or equal colour channels; an
    alpha channel is left out. A lossy file (JPEG), colours that differ, and values past 255
    are :class:`DataError` s that say what to do."""
    path = Path(path)
    lossy = jpeg_mask(path)
    if lossy:
        how = "" if lossy == "a JPEG file" else f" ({lossy})"
        raise DataError(f"{path}: a JPEG mask{how}; JPEG's lossy compression changes mask "
                        "values along every edge, so they no longer name classes: save masks "
                        "as PNG or TIFF (lossless)")
    arr = read_array(path, palette="indices")  # alpha left out, as the format says
    return label_values(one_value_a_pixel(arr, str(path)), str(path))


def one_value_a_pixel(arr: np.ndarray, where: str) -> np.ndarray:
    """Stored labels ``[H, W]`` or ``[H, W, C]`` as one value a pixel ``[H, W]``: a colour
    mask whose channels are equal (a gray mask saved as RGB) gives its first; other colours,
    and channels other than 1, 3 or 4, are :class:`DataError` s naming ``where`` and what to
    do. A mask file and a label volume's slice alike."""
    if arr.ndim == 3 and arr.shape[-1] not in (1, 3, 4):
        raise DataError(f"{where}: a mask of {arr.shape[-1]} channels; save it as one "
                        "channel of class values (8-bit grayscale or palette)")
    if arr.ndim == 3:
        colour = arr[..., :3]
        if not all(np.array_equal(colour[..., 0], colour[..., c])
                   for c in range(1, colour.shape[-1])):
            found = np.unique(colour.reshape(-1, colour.shape[-1]), axis=0)
            shown = ", ".join(str(tuple(int(v) for v in c)) for c in found[:8])
            raise DataError(
                f"{where}: a colour mask ({len(found)} colours: {shown}"
                f"{' ...' if len(found) > 8 else ''}); masks store classes as values: save it "
                "as 8-bit grayscale or as a palette PNG, every mask with one palette (Pillow: "
                "rgb.quantize(palette=ref, dither=Image.Dither.NONE), ref a palette image of "
                "the class colours; quantize alone numbers each file's colours its own way), "
                "whose indices classes.yaml then names")
        arr = colour[..., 0]
    return arr


def label_values(arr: np.ndarray, where: str) -> np.ndarray:
    """Stored labels as uint8 class values: bilevel (0 / 1), any integer type whose values
    lie in 0..255, or floats that hold whole numbers there (as many tools save a label
    volume). Fractions (labels resampled by interpolation), NaN and values past 255 are
    :class:`DataError` s naming ``where`` and what to do."""
    if arr.dtype == np.bool_:  # bilevel: values 0 and 1
        return arr.astype(np.uint8)
    if arr.dtype.kind not in "iuf":
        raise DataError(f"{where}: {arr.dtype} labels; labels hold integer class values "
                        "(8-bit grayscale or palette)")
    if arr.dtype == np.uint8 or not arr.size:
        return arr.astype(np.uint8, copy=False)
    if arr.dtype.kind == "f":
        with np.errstate(invalid="ignore"):
            bad = ~np.isfinite(arr) | (arr != np.round(arr))
        if bad.any():
            shown = arr[bad][0]
            if not np.isfinite(arr[bad]).any():  # NaN marks what no one labelled, as a rule
                raise DataError(f"{where}: {arr.dtype} labels holding {shown:g} "
                                f"({int(bad.sum())} voxels or pixels), which is no class "
                                f"value: {_UNLABELLED}")
            raise DataError(f"{where}: {arr.dtype} labels holding {shown:g} ({int(bad.sum())} "
                            "voxels or pixels are not whole numbers): labels resampled by "
                            "interpolation, or a probability map? Class labels are whole "
                            "values; resample them by nearest neighbour")
    low, high = arr.min(), arr.max()
    if high > 255:
        raise DataError(f"{where}: {arr.dtype} labels with values {low:g}..{high:g}; a class "
                        "map takes the values 0..255 (an instance label image numbers "
                        "objects, not classes: give one value per class)")
    if low < 0:  # -1: many tools' (and PyTorch's) mark of unlabelled pixels
        raise DataError(f"{where}: {arr.dtype} labels with values {low:g}..{high:g}; a class "
                        f"map takes the values 0..255, and {low:g} is none: {_UNLABELLED}")
    return arr.astype(np.uint8)


#: what to do with label values that mark unlabelled pixels in other tools (NaN, -1)
_UNLABELLED = ("if they mark unlabelled pixels, store those as the ignore value (classes.yaml's "
               "'ignore', 255 unless it says otherwise), which losses and metrics skip")


@dataclass(frozen=True)
class Probe:
    """What a file's header says: its size, whether it is colour, its dtype, its pages."""

    height: int
    width: int
    colour: bool
    dtype: str
    pages: int = 1
    channels: int = 1  # alpha not counted; a palette image has 3 (its colours)
    orientation: int = 1  # EXIF: not 1, the image is read turned upright (height, width too)
    #: a palette image: read as its colours, a mask (``palette="indices"``) as its indices
    palette: bool = False


def page_by_page(tif) -> bool:
    """Whether a TIFF holds one stack written a page at a time (``TiffWriter.write`` in a
    loop): every page its own series, all of one shape and type."""
    series = tif.series
    return (len(series) > 1 and all(len(s.pages) == 1 for s in series)
            and len({(s.pages[0].shape, str(s.pages[0].dtype)) for s in series}) == 1)


def main_series(tif):
    """A TIFF's image: its first series that is not a reduced-resolution copy (a thumbnail
    some scanners and cameras store first, marked so by NewSubfileType; tifffile makes a
    series of it, which was read in place of the image), else its first."""
    return next((s for s in tif.series if len(s.pages) and not s.keyframe.is_reduced),
                tif.series[0])


def other_images(tif) -> list[str]:
    """The images a TIFF holds beyond its stack (:func:`main_series`), ``["1 x 64 x 64
    uint16", ...]``: series of other sizes or types (a stack written a page at a time where
    one page differs, a second image saved into the file); none for one stack
    (:func:`page_by_page` too). Reduced-resolution copies (thumbnails, pyramid levels) are
    not among them."""
    if page_by_page(tif):
        return []
    main = main_series(tif)
    return [f"{len(s.pages)} x {' x '.join(map(str, s.pages[0].shape))} {s.pages[0].dtype}"
            for s in tif.series if s is not main and len(s.pages) and not s.keyframe.is_reduced]


def stack_pages(tif, paged: bool | None = None) -> list:
    """The pages of a TIFF's stack: its first series', or every page where the stack was
    written a page at a time (:func:`page_by_page`; ``paged``: that answer kept from an
    earlier look, for tifffile's series parse every page of such a file)."""
    return tif.pages if (page_by_page(tif) if paged is None else paged) else main_series(tif).pages


def probe(path: str | Path) -> Probe:
    """The header of an image file, no pixels decoded (:class:`DataError` if unreadable)."""
    path = Path(path)
    _not_empty(path)
    try:
        head = _head(path)
        if is_tiff(path, head):
            import tifffile

            with tifffile.TiffFile(path) as tif:
                main = main_series(tif)
                pages, page = stack_pages(tif), main.keyframe
                if other_images(tif):  # more than one stack: a volume, refused, named
                    pages = [p for s in tif.series if not s.keyframe.is_reduced
                             for p in s.pages]
                axes, shape = page.axes, page.shape
                indexed = page.photometric == tifffile.PHOTOMETRIC.PALETTE
                palette = indexed and shows_colours(tif)
                h, w = shape[axes.index("Y")], shape[axes.index("X")]
                samples = shape[axes.index("S")] if "S" in axes else 1
                channels = 3 if palette or is_cmyk(page) else max(1, samples - tiff_alpha(page))
                if _channel_pages(main):
                    if main.shape[0] > 2:
                        raise _many_channel_pages(path, main)
                    pages, channels = [page], 2
                return Probe(h, w, channels >= 3, "uint8" if palette else str(page.dtype),
                             len(pages), channels, palette=indexed)
        with Image.open(path) as img:
            mode, frames = img.mode, getattr(img, "n_frames", 1)
            pnm16 = _pnm16(img)
            w, h = img.size
            turn = _orientation(img)
            if turn in (5, 6, 7, 8):  # shown turned a quarter
                h, w = w, h
        deep = _png16(head)
    except _READ_ERRORS as err:
        raise DataError(f"{path}: cannot read the image ({err}); replace or remove the "
                        "file") from None
    if deep:  # Pillow's mode says 8 bits
        return Probe(h, w, deep != 4, "uint16", frames, 1 if deep == 4 else 3, turn)
    dtype = {"F": "float32", "I": "int32", "1": "bool"}.get(mode, "uint8")
    if mode.startswith("I;16") or pnm16:
        dtype = "uint16" if not mode.endswith("S") else "int16"
    colour = mode in ("RGB", "RGBA", "RGBa", "P", "PA", "CMYK", "YCbCr", "LAB", "HSV")
    return Probe(h, w, colour, dtype, frames, 3 if colour else 1, turn,
                 palette=mode in ("P", "PA"))


@dataclass(frozen=True)
class Intensity:
    """How stored values become [0, 1]. 8- and 16-bit unsigned integers (and booleans) by
    their type's range, unless the user ``given`` the window (``data.window``: 12-bit
    camera data in 16-bit files, say), which then scales every type but booleans. Floats
    and other integers: by ``window`` (``lo`` -> 0, ``hi`` -> 1, clipped) when ``mode`` is
    ``window``, per image (min-max) when it is ``per_image``. Without a window (a run
    trained on 8-bit images, given a float one), floats already in [0, 1] are kept and the
    rest scaled per image, with a note."""

    window: tuple[float, float] | None = None
    mode: Literal["window", "per_image"] = "window"
    given: bool = False
    nonfinite: Literal["error", "fill"] = "error"  # NaN / Inf: refused, or 0 after scaling
    #: why a run's scaling has no window (:meth:`load` knows), for the note on a float image
    why_none: str = field(default=NO_WINDOW, compare=False)

    def by_type_range(self, dtype) -> bool:
        """Whether images of ``dtype`` scale by their type's range here: 8/16-bit unsigned
        and booleans, unless a window the user gave scales them (booleans always)."""
        if np.dtype(dtype) == np.bool_:
            return True
        given = self.given and self.window is not None and self.mode == "window"
        return by_type_range(dtype) and not given

    def unlike_training(self, dtype) -> str | None:
        """What to say of 8/16-bit ``dtype`` scaled by its type's range where the run's
        window was fitted on float or signed-integer training images, which it scaled:
        those pixels are not scaled as the training images were. None elsewhere."""
        if self.window is None or self.mode != "window" or not self.by_type_range(dtype):
            return None
        return (f"{np.dtype(dtype)} pixels scaled by their type's range (0 to its largest "
                f"value), not by the window [{self.window[0]:.6g}, {self.window[1]:.6g}] the "
                "run fitted on its float or signed-integer training images: where it trained "
                "on those, they reach the models at another contrast than training; segment "
                "the data in the type and units the run trained on")

    def scale(self, arr: np.ndarray, source: Path | str = "the image",
              notes: list[str] | None = None) -> np.ndarray:
        """``arr`` as float32 in [0, 1] (same shape)."""
        notes = [] if notes is None else notes
        arr = native(arr)
        if arr.dtype == np.bool_:
            return arr.astype(np.float32)
        for dtype, top in ((np.uint8, 255.0), (np.uint16, 65535.0)):
            if arr.dtype == dtype and self.by_type_range(arr.dtype):
                _dim_note(arr, top, notes)
                x = arr.astype(np.float32)
                return np.divide(x, top, out=x)  # in place: a 4096^2 16-bit image, 64 MB less
        if arr.dtype.kind not in "iuf":
            raise DataError(f"{source}: pixels of type {arr.dtype}; give integer or float "
                            "images")
        # in float64 where float32 would lose levels (integers past 2^24, float64 with an
        # offset) or turn finite values into Inf (float64 past 3.4e38)
        x = arr.astype(np.float32 if arr.dtype.itemsize <= 2 or arr.dtype == np.float32
                       else np.float64)
        finite = np.isfinite(x)
        bad = x.size - int(np.count_nonzero(finite))
        if bad:
            if self.nonfinite != "fill":
                _finite(x, source)
            if bad == x.size:  # nothing to scale (a slice outside the scan): 0, as asked
                notes.append("every pixel NaN or Inf: all set to 0 (data.nonfinite fill)")
                return np.zeros(arr.shape, np.float32)
            notes.append(f"{bad} NaN or Inf pixels set to 0 (data.nonfinite fill)")
        if self.mode == "window" and self.window is not None:
            lo, hi = self.window
        else:
            values = x[finite] if bad else x
            lo, hi = float(values.min()), float(values.max())
            if self.mode == "window" and arr.dtype.kind == "f" and lo >= 0.0 and hi <= 1.0:
                lo, hi = 0.0, 1.0  # floats in [0, 1] are kept as they are
            else:
                notes.append(f"{arr.dtype} values in [{lo:g}, {hi:g}] min-max scaled to "
                             "[0, 1] " + ("(data.intensity per_image)" if self.mode ==
                                          "per_image" else f"(the run keeps no intensity "
                                          f"window: {self.why_none})"))
        if max(abs(lo), abs(hi)) > 1e37 and x.dtype == np.float32:  # x - lo would overflow
            x = x.astype(np.float64)
        with np.errstate(over="ignore", invalid="ignore"):  # a fill far outside: +-inf
            x -= lo  # in place: x is astype's copy
            x /= max(hi - lo, 1e-12)
        if self.mode == "window" and self.window is not None:
            _one_value_note(x, finite if bad else True, self.window, notes)
        np.clip(x, 0.0, 1.0, out=x)
        if bad:
            x[~finite] = 0.0
        return x.astype(np.float32, copy=False)

    def describe(self) -> str:
        fill = "; NaN and Inf pixels become 0" if self.nonfinite == "fill" else ""
        if self.mode == "per_image":
            return "floats and other integers min-max scaled per image" + fill
        if self.window is None:
            return "no window (8/16-bit images only: scaled by their type's range)" + fill
        return (f"{'every image' if self.given else 'floats and other integers'} scaled by "
                f"the window [{self.window[0]:.6g}, {self.window[1]:.6g}]" + fill)

    def to_dict(self) -> dict:
        """As ``intensity.json`` and a ``paser segment`` folder's settings keep it; the keys
        added later only where they differ from what older runs did (their folders and
        runs read as they were)."""
        return {"mode": self.mode, "window": None if self.window is None else list(self.window),
                "percentiles": list(WINDOW_PERCENTILES),
                **({"given": True} if self.given else {}),
                **({"nonfinite": self.nonfinite} if self.nonfinite != "error" else {})}

    def save(self, run_dir: str | Path) -> None:
        from paser.runtime import atomic_write_text

        atomic_write_text(json.dumps(self.to_dict(), indent=2), Path(run_dir) / INTENSITY_FILE)

    @classmethod
    def load(cls, run_dir: str | Path | None) -> Intensity:
        """A run's intensity scaling (a run older than it: none, 8/16-bit by type)."""
        path = None if run_dir is None else Path(run_dir) / INTENSITY_FILE
        if path is None or not path.is_file():
            return cls(why_none=f"it has no {INTENSITY_FILE}: made before 2026-12-04, when "
                       "runs kept none, or the file was removed")
        try:
            d = json.loads(path.read_text())
            return cls(None if d["window"] is None else tuple(map(float, d["window"])),
                       d["mode"], bool(d.get("given", False)),
                       "fill" if d.get("nonfinite") == "fill" else "error",
                       why_none="it trained on 8/16-bit images alone, which need none")
        except (ValueError, KeyError, TypeError) as err:
            raise DataError(f"{path}: not an intensity file ({err}); delete it and re-run "
                            "stage 1, or copy it from the run") from None


def _dim_note(arr: np.ndarray, top: float, notes: list[str]) -> None:
    """A note where every pixel of an 8/16-bit image scaled by its type's range lies in the
    lowest eighth of it (12-bit camera data in a 16-bit file, say): it reaches the models
    nearly black, which is right only for a run trained on such files. An image of zeros
    alone (fill outside a scan) gets none."""
    peak = int(arr.max()) if arr.size else 0
    if 0 < peak < LOW_CONTRAST * (top + 1):
        say = ("12-bit camera data in a 16-bit file" if arr.dtype == np.uint16 else
               "an underexposed image")
        notes.append(f"{DIM_NOTE} ({arr.dtype} values up to {peak}, {100 * peak / top:.1f} % "
                     f"of it: {say}, say), so it reaches the "
                     "models nearly black: right for a run trained on such files, wrong for "
                     f"one trained on full-range images; a run trained with data.window=[0,"
                     f"{peak}] (paser data check suggests one) sees them at full contrast")


def _one_value_note(scaled: np.ndarray, finite, window: tuple[float, float],
                    notes: list[str]) -> None:
    """A note where every pixel of an image (``scaled`` by ``window``, before clipping; its
    ``finite`` ones) lies on one side of the window: clipped, it reaches the models as one
    value."""
    if np.min(scaled, where=finite, initial=np.inf) > 1:
        side = "above"
    elif np.max(scaled, where=finite, initial=-np.inf) < 0:
        side = "below"
    else:
        return
    notes.append(f"every pixel lies {side} the intensity window [{window[0]:.6g}, "
                 f"{window[1]:.6g}], so the image reaches the models as one value (an image "
                 "of another kind or scale than the window was fitted on, or a slice of fill "
                 "only)")


def _finite(x: np.ndarray, source: Path | str) -> None:
    """A :class:`DataError` where ``x`` holds NaN or Inf: how many, and what to do."""
    bad = int(x.size - np.count_nonzero(np.isfinite(x)))
    if bad:
        raise DataError(f"{source}: the image contains NaN or Inf values ({bad} of {x.size} "
                        f"pixels, {100 * bad / x.size:.1f} %; outside a reconstruction's "
                        "field of view, say): replace them with a value the scan's background "
                        "has (numpy.nan_to_num(image, nan=..., posinf=..., neginf=...)) and "
                        "label those pixels with the ignore value, or train the run with "
                        "data.nonfinite=fill (they become 0 after scaling, in paser segment "
                        "too)")


def fit_window(paths: list[Path], percentiles: tuple[float, float] = WINDOW_PERCENTILES
               ) -> tuple[float, float] | None:
    """The intensity window of a training set of files: :func:`window_of` their images that
    need one (floats, signed integers). ``None`` when every image is 8/16-bit unsigned."""
    need = [p for p in paths if not by_type_range(probe(p).dtype)]
    if not need:
        return None
    return window_of(((read_array(need[i]), need[i]) for i in spread(len(need))), percentiles)


def spread(n: int, most: int = _FIT_IMAGES) -> list[int]:
    """At most ``most`` of the indices ``0 .. n - 1``, evenly spaced from the first to the
    last (the images an intensity window is fitted on)."""
    return sorted({round(i) for i in np.linspace(0, n - 1, min(n, most))}) if n else []


def window_of(images, percentiles: tuple[float, float] = WINDOW_PERCENTILES
              ) -> tuple[float, float]:
    """The ``percentiles`` of the pixels of ``images`` (``(array, source)`` pairs, at most
    64 of them; 65,536 pixels of each, sampled evenly). Constant images (a saturated or a
    dark frame, a slice outside the sample) are left out where any image is not: two such
    frames at the type's ends would otherwise be the window's ends and squeeze every other
    image into a sliver of [0, 1]."""
    samples, flat_ones = [], []
    for arr, source in images:
        if arr.dtype.kind not in "biuf":  # complex (a reconstruction's raw FFT), strings
            raise DataError(f"{source}: values of type {arr.dtype}; give integer or float "
                            "pixels")
        flat = arr.reshape(-1)
        if flat.dtype.kind == "f":  # NaN / Inf: refused or filled when images are read
            flat = flat[np.isfinite(flat)]
        flat = flat[::max(1, flat.size // _FIT_PIXELS)].astype(np.float64)  # every level kept
        if flat.size:
            (flat_ones if flat.min() == flat.max() else samples).append(flat)
    samples = samples or flat_ones
    pixels = np.concatenate(samples) if samples else np.zeros(0, np.float64)
    if not pixels.size:
        raise DataError("no finite pixel to fit an intensity window on (every pixel NaN or "
                        "Inf); give data.window=[lo,hi]")
    pixels = _without_fill(pixels)
    lo, hi = np.percentile(pixels, percentiles)
    if hi <= lo:  # constant images: any window keeps them constant
        hi = lo + 1.0
    return float(lo), float(hi)


#: a value that many of the fitted pixels hold, at their least or most, is a fill
_FILL_SHARE = 0.05


def _without_fill(pixels: np.ndarray) -> np.ndarray:
    """``pixels`` without a fill value: one value that holds more than :data:`_FILL_SHARE`
    of them and ten times as many as any other (a reconstruction's outside of its field of
    view, written as 0, -1000 or float32's least value). Left in, a fill below the scan's
    values would be the window's end and squeeze its contrast into a sliver of [0, 1], and
    one among them would move the window with the size of the field of view; left out, it
    is scaled as any value is."""
    fill = fill_value(pixels)
    return pixels if fill is None else pixels[pixels != fill]


def fill_value(pixels: np.ndarray) -> float | None:
    """The value that more than :data:`_FILL_SHARE` of ``pixels`` hold, ten times as many as
    any other, or ``None`` (:func:`_without_fill`)."""
    values, counts = np.unique(pixels, return_counts=True)
    if len(values) < 3:
        return None
    top = int(counts.argmax())
    if counts[top] > _FILL_SHARE * pixels.size and counts[top] >= 10 * np.delete(
            counts, top).max():
        return values[top].item()
    return None


def at_fill(x: np.ndarray, fill: float) -> np.ndarray:
    """Where ``x`` holds the value ``fill``; NaN where ``fill`` is NaN (a reconstruction
    written as NaN outside its field of view, read with ``data.nonfinite fill``)."""
    return np.isnan(x) if isinstance(fill, float) and np.isnan(fill) else x == fill


def same_fill(a: float | None, b: float | None) -> bool:
    """Whether two fills are one value, NaN the same as NaN."""
    if a is None or b is None:
        return a is b
    return a == b or bool(np.isnan(a) and np.isnan(b))


def field_of_view(planes: Iterable[np.ndarray]) -> tuple[float, np.ndarray] | None:
    """Where a scan lies outside its field of view, from ``planes`` (slices spread through
    it, taken one at a time): the value it is written as there, and the pixels at that value
    in every one of them that are joined to the border (``[H, W]`` bool); or ``None``. The
    four corners of every plane must hold the value, and so must a fill's share of their
    pixels (:func:`fill_value`). A reconstruction's circle is the same on every slice and
    leaves its corners out; a pore at the fill's value (clipped to 0) moves from slice to
    slice and stays in; a scan cropped inside the sample has data in its corners, which
    every slice rarely shares to the last bit."""
    from scipy import ndimage

    fill, every, pixels = None, None, []
    for plane in planes:
        if plane.ndim != 2:  # channels: no field of view is looked for
            return None
        corner = plane[0, 0].item()
        if not at_fill(plane[[0, 0, -1, -1], [0, -1, 0, -1]], corner).all() or (
                fill is not None and not same_fill(corner, fill)):
            return None
        fill = corner
        at = at_fill(plane, fill)
        every = at if every is None else np.logical_and(every, at, out=every)
        pixels.append(plane.reshape(-1)[::max(1, plane.size >> 16)])  # np.unique sorts them
    if every is None or not same_fill(fill_value(np.concatenate(pixels)), fill):
        return None
    regions, _ = ndimage.label(every)
    edge = np.unique(np.concatenate([regions[0], regions[-1], regions[:, 0], regions[:, -1]]))
    return fill, np.isin(regions, edge[edge > 0])


def gray_in_colour(arr: np.ndarray) -> bool:
    """Whether an image ``[H, W, C]`` of 3 or 4 channels (alpha last, not compared) is gray
    saved as colour: its red, green and blue equal in every pixel."""
    return (arr.ndim == 3 and arr.shape[-1] in (3, 4)
            and all(np.array_equal(arr[..., 0], arr[..., c]) for c in (1, 2)))


def to_channels(arr: np.ndarray, channels: int, source: Path | str = "the image",
                notes: list[str] | None = None) -> np.ndarray:
    """``[H, W]`` or ``[H, W, C]`` as ``[channels, H, W]`` float32: a fourth channel taken
    for alpha and dropped, colour to luminance or gray repeated (with a note), any other
    mismatch an error (two channels are two channels: models of ``in_channels=2``)."""
    notes = [] if notes is None else notes
    if arr.ndim == 2:
        arr = arr[..., None]
    have = arr.shape[-1]
    if have == 4 and channels != 4:  # an RGBA array (files drop alpha as their format says)
        arr, have = arr[..., :3], 3
        notes.append("alpha channel dropped")
    if have == channels:
        pass
    elif channels == 1 and have == 3:
        if gray_in_colour(arr):
            arr = arr[..., :1]
        else:
            from skimage.color import rgb2gray

            arr = rgb2gray(arr).astype(np.float32)[..., None]
            notes.append("RGB converted to grayscale (luminance) for 1-channel models")
    elif channels == 3 and have == 1:
        arr = np.repeat(arr, 3, axis=-1)
        notes.append("grayscale repeated to 3 channels for RGB models")
    elif channels == 1 and have == 2:  # two detectors, or an ImageJ / OME hyperstack's C
        raise DataError(f"{source}: 2 channels (two detectors, or channels stored as pages), "
                        "and the models take 1; give grayscale images: save the channel to "
                        "segment as its own file (tifffile.imwrite(out, channel)), or train "
                        "models of models.in_channels=2 on such images")
    else:
        raise DataError(f"{source}: {have} channels, and the models take {channels}; give "
                        f"{'grayscale' if channels == 1 else f'{channels}-channel'} images")
    return np.ascontiguousarray(np.moveaxis(arr, -1, 0), dtype=np.float32)


def read_image(path: str | Path, channels: int, intensity: Intensity = Intensity(),
               notes: list[str] | None = None) -> np.ndarray:
    """An image file as the models see it: float32 ``[channels, H, W]`` in [0, 1]."""
    notes = [] if notes is None else notes
    return as_input(read_array(path, notes), channels, intensity, path, notes)


def as_input(arr: np.ndarray, channels: int, intensity: Intensity,
             source: Path | str = "the image", notes: list[str] | None = None) -> np.ndarray:
    """A stored image ``[H, W]`` or ``[H, W, C]`` as the models see it: scaled by
    ``intensity``, then :func:`to_channels`; what every reader (files, volume slices) ends
    with."""
    notes = [] if notes is None else notes
    return to_channels(intensity.scale(arr, source, notes), channels, source, notes)
