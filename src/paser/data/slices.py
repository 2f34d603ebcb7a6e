"""Training from volumes (``data.dataset: volume``): an image volume and a label volume
(TIFF stack, zarr array or HDF5 dataset, as ``paser segment`` reads them:
:mod:`paser.volumes`), cut into splits by slice ranges. Each labelled slice is an image
of its split; a slice whose labels are all unlabelled (the class map's ``ignore``) is
skipped, so a volume labelled on a few slices trains on those.

::

    <root>/classes.yaml                        # the label volume's values, as for folders
    data.volume: scan.tif                      # or recon.zarr, beamline.h5:/entry/data
    data.labels: scan_labels.tif               # the same shape, uint8 values
    data.slices: {train: [0, 400], validation: [400, 450], test: [450, 500]}

Relative paths are under ``data.root``.
"""

from __future__ import annotations

from collections import Counter
from pathlib import Path

import numpy as np
import torch
from torch.utils.data import Dataset

from paser.data.folders import ClassMap
from paser.data.images import (
    Intensity,
    as_input,
    by_type_range,
    files_now,
    jpeg_mask,
    label_values,
    one_value_a_pixel,
    spread,
    window_of,
)
from paser.errors import DataError

#: label slices read at a time when finding the labelled ones
_CHUNK = 16
#: the labelled slices found, and those of one class alone, by label volume, its
#: modification, class map and range
_LABELLED: dict[tuple, tuple[list[int], dict[int, int], list[str]]] = {}


def _file_of(spec: str) -> Path:
    """The file (or folder) a volume is read from: ``file.h5:/key`` without its key."""
    return Path(spec.partition(":/")[0])


def _stamp(volume) -> tuple[int, ...] | None:
    """The files, bytes and newest modification time of what holds ``volume``
    (:func:`paser.volumes.stat_of`): a slice file of a folder, or a chunk of a zarr array,
    written again in place changes them, where the folder's own time and size stay."""
    from paser.volumes import stat_of

    try:
        return tuple(stat_of(volume))
    except OSError:
        return None


def written(root: str | Path, volume: str | None, labels: str | None) -> tuple | None:
    """What holds the image and the label volume now, from the files' sizes and times alone
    (a zarr array's or a folder's every file; nothing opened): slices labelled or voxels
    written since change the training slices and what they hold, and with them the
    intensity window fitted on them. None where a path is not given or not there (its split
    says why)."""
    out = []
    for spec, key in ((volume, "data.volume"), (labels, "data.labels")):
        if not spec:
            return None
        now = files_now(_file_of(_spec(Path(root), spec, key)))
        if now is None:
            return None
        out.append(now)
    return tuple(out)


def _planes_note(*volumes) -> str:
    """`` (...)`` where a volume is a TIFF of one page of 3 or 4 planes stored apart (axes
    SYX): what tifffile writes for 3 or 4 slices without ``photometric='minisblack'``, read
    as one colour slice, not as the slices they are; else ``""``."""
    for v in volumes:
        if (v.kind == "tiff" and v.planar and v.depth == 1 and len(v.shape) == 4
                and v.shape[3] + v.alpha in (3, 4)):
            return (f" ({v.source} is one page of {v.shape[3] + v.alpha} planes stored "
                    "apart, read as one colour slice: tifffile.imwrite of 3 or 4 slices "
                    "without photometric='minisblack' stores them so; if they are slices, "
                    "write them again with that argument)")
    return ""


def _spec(root: Path, spec: str | None, key: str) -> str:
    if not spec:
        what = "image" if key == "data.volume" else "label"
        raise DataError(f"data.dataset=volume needs {key}: the {what} volume (a TIFF stack, a "
                        ".zarr array or file.h5:/path; docs/volumes.md)")
    return spec if _file_of(spec).is_absolute() else str(root / spec)


def _there(root: Path, spec: str | None, key: str) -> str:
    """``spec`` of ``key`` resolved by :func:`_spec`; a file that is not there is a
    :class:`DataError` naming the key and what ``data.root`` holds (a name mistyped)."""
    path = _spec(root, spec, key)
    file = _file_of(path)
    if file.exists():
        return path
    held = sorted(p.name for p in root.iterdir() if not p.name.startswith(".")
                  and p.name != "classes.yaml") if root.is_dir() else []
    where = "" if _file_of(spec).is_absolute() else (
        "; a relative path is read from data.root, which holds "
        + (", ".join(held[:8]) + (", ..." if len(held) > 8 else "") if held else "nothing else"))
    what = "image" if key == "data.volume" else "label"
    raise DataError(f"key '{key}': {file}: no such file or folder{where}; give the {what} "
                    "volume's path")


class VolumeSlices(Dataset):
    """One split of a volume dataset: the labelled slices of its slice range. Reads like a
    folder split (``image``, ``mask``, ``ids``, ``sizes``, ``channels``, ``intensity``)."""

    colour_ok = False

    def __init__(self, root: str | Path, volume: str | None, labels: str | None,
                 slices: dict[str, tuple[int, int]] | None, split: str):
        from paser.volumes import open_volume

        root = Path(root)
        self.classmap = ClassMap.read(root / "classes.yaml")
        self.volume = open_volume(_there(root, volume, "data.volume"))
        # palette label slices (a folder of palette PNGs, a palette TIFF stack): their
        # indices, as a folder dataset reads the same masks (read_mask), not their colours
        self.labels = open_volume(_there(root, labels, "data.labels"), palette="indices")
        lossy = (jpeg_mask(Path(self.labels.files[0] if self.labels.files else self.labels.path))
                 if self.labels.kind in ("tiff", "stack") else None)
        if lossy:  # its edge values would be taken for labels resampled by interpolation
            raise DataError(f"{self.labels.source}: labels in {lossy}; JPEG's lossy "
                            "compression changes label values along every edge, so they no "
                            "longer name classes: save the labels losslessly (TIFF deflated, "
                            "or no compression)")
        if self.labels.shape[:3] != self.volume.shape[:3]:
            fewer = (self.labels.shape[1:3] == self.volume.shape[1:3]
                     and self.labels.depth < self.volume.depth)
            raise DataError(f"{self.labels.source}: labels of shape {self.labels.shape}, the "
                            f"volume {self.volume.source} is {self.volume.shape}; they must "
                            "match slice for slice" + (
                                f" (a label volume of the labelled slices alone: write one "
                                f"of the volume's {self.volume.depth} slices, each labelled "
                                "slice at its place and the others all the ignore value "
                                f"{self.classmap.ignore}, classes.yaml's 'ignore')"
                                if fewer else _planes_note(self.volume, self.labels)))
        if not slices or split not in slices:
            raise DataError(f"data.slices: give the slice range of {split}, e.g. "
                            "{train: [0, 400], validation: [400, 450], test: [450, 500]}")
        z0, z1 = slices[split]
        if not 0 <= z0 < z1 <= self.volume.depth:
            raise DataError(f"data.slices.{split}: [{z0}, {z1}) is not a range of the "
                            f"{self.volume.depth} slices of {self.volume.source}"
                            + (_planes_note(self.volume) or (
                                f" (a range [start, end) runs from 0 to at most "
                                f"{self.volume.depth}, start before end)")))
        self.z, self.uniform, problems = self._labelled(z0, z1)
        if not self.z and not problems:
            raise DataError(f"{self.labels.source}: no labelled slice in {split}'s range "
                            f"[{z0}, {z1}) (every voxel is the ignore value "
                            f"{self.classmap.ignore}); label some, or move the range")
        h, w = self.volume.plane
        self.sizes = [(h, w)] * len(self.z)
        lanes = self.volume.shape[3] if len(self.volume.shape) == 4 else 1
        # two detectors' channels stay two, as a folder's 2-channel images do
        self.channels = 2 if lanes == 2 else 3 if lanes >= 3 else 1
        self.dtypes = Counter({f"{self.volume.dtype} {self.volume.kind} slices": len(self.z)})
        self.intensity = Intensity()
        self.images = [Path(f"{self.volume.source}#{z}") for z in self.z]  # for messages
        self.ids = [f"{self.volume.stem}_z{z:05d}" for z in self.z]
        if problems:  # every bad slice, not the first alone; the split opened without them
            err = DataError.of_every(problems)
            err.opened = self
            raise err

    def _labelled(self, z0: int, z1: int) -> tuple[list[int], dict[int, int], list[str]]:
        """The slices of ``[z0, z1)`` with a labelled voxel, those of them whose every
        labelled voxel is one class (slice -> class), and what is wrong with each slice
        whose labels cannot be read as classes (left out of the first two); found once per
        process for the same label volume, class map and range (every stage of a run opens
        its splits)."""
        key = (self.labels.source, _stamp(self.labels), z0, z1,
               self.classmap.lut.tobytes())
        if key not in _LABELLED:
            _LABELLED[key] = self._scan(z0, z1)
        found, uniform, problems = _LABELLED[key]
        return list(found), dict(uniform), list(problems)

    def _scan(self, z0: int, z1: int) -> tuple[list[int], dict[int, int], list[str]]:
        out, uniform, problems = [], {}, []
        for start in range(z0, z1, _CHUNK):
            lab = self.labels.read(start, min(start + _CHUNK, z1))
            for i, plane in enumerate(lab):
                self._plane(plane, start + i)  # a layout of the whole volume: stops at once
                try:
                    classes = self._decoded(plane, start + i)
                except DataError as err:  # a value not in classes.yaml, a fraction: each
                    problems += err.each()
                    continue
                present = np.flatnonzero(np.bincount(classes.reshape(-1), minlength=256)[:255])
                if len(present):
                    out.append(start + i)
                if len(present) == 1:
                    uniform[start + i] = int(present[0])
        return out, uniform, problems

    def _plane(self, plane: np.ndarray, z: int) -> np.ndarray:
        """Slice ``z``'s labels as one value a pixel."""
        if plane.ndim == 3 and plane.shape[-1] == 1:  # (Z, Y, X, 1): one value a voxel
            plane = plane[..., 0]
        if plane.ndim == 3 and plane.shape[-1] in (3, 4) and not _planes_note(self.labels):
            # gray masks saved as RGB (equal channels): read as a folder dataset reads each
            # (read_mask); other colours are a colour mask, named (3 or 4 slices saved as
            # one page of planes apart are named as such, below)
            plane = one_value_a_pixel(plane, self.labels.files[z] if self.labels.files
                                      else f"{self.labels.source} slice {z}")
        if plane.ndim != 2:
            raise DataError(f"{self.labels.source} slice {z}: labels of shape {plane.shape}; "
                            "store one class value a voxel, the values of classes.yaml"
                            + _planes_note(self.labels))
        return plane

    def _decoded(self, plane: np.ndarray, z: int) -> np.ndarray:
        """Slice ``z``'s labels as class indices (the ignore value :data:`MASK_IGNORE`)."""
        where = f"{self.labels.source} slice {z}"
        return self.classmap.decode(label_values(self._plane(plane, z), where), where)

    class_names = property(lambda self: self.classmap.names)

    @property
    def size(self) -> tuple[int, int]:
        return self.sizes[0]

    def size_range(self) -> str:
        return f"{self.size[0]} x {self.size[1]}"

    def __len__(self) -> int:
        return len(self.z)

    def raw(self, i: int) -> np.ndarray:
        """Slice ``i`` of the split as stored."""
        return self.volume.read(self.z[i], self.z[i] + 1)[0]

    def image(self, i: int) -> torch.Tensor:
        return torch.from_numpy(as_input(self.raw(i), self.channels, self.intensity,
                                         f"{self.volume.source} slice {self.z[i]}"))

    def mask(self, i: int) -> torch.Tensor:
        return torch.from_numpy(np.ascontiguousarray(
            self._decoded(self.labels.read(self.z[i], self.z[i] + 1)[0], self.z[i]),
            dtype=np.uint8))

    def __getitem__(self, i: int) -> dict:
        return {"image": self.image(i), "mask": self.mask(i), "id": self.ids[i]}

    def fit_window(self) -> tuple[float, float] | None:
        """The intensity window of the split's slices (at most 64, evenly spaced)."""
        if by_type_range(np.dtype(self.volume.dtype)):
            return None
        return window_of((self.raw(i), f"{self.volume.source} slice {self.z[i]}")
                         for i in spread(len(self)))
