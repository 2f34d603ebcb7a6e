"""A volume's voxel size, as its file states it, in micrometres.

A tomography user measures particles and layers in micrometres, and opens the labels over
the scan in Fiji, napari, Avizo or Dragonfly: the label volume must carry the scan's voxel
size, or it opens at one pixel a unit and lies beside the scan, not on it. Each format
states it its own way; what is read here, first match wins:

- OME-TIFF: ``PhysicalSizeX/Y/Z`` (and their units, micrometres by default) of the first
  image's ``Pixels``;
- ImageJ TIFF: the X and Y resolution in pixels per ``unit``, and ``spacing`` along Z;
- other TIFF: the X and Y resolution where its unit is a length (centimetre, millimetre,
  micrometre), not inch: a resolution in dots per inch is a page's, not a scan's;
- OME-Zarr: the ``scale`` of the array's level in its group's ``multiscales`` (times the
  multiscale's own), on axes that are space, in their units;
- HDF5: the dataset's ``element_size_um`` (z, y, x), as Fiji's HDF5 plugin and ilastik write.

A size that is missing, not positive, not finite or in a unit that is not a length is
not known (``None``): nothing is ever guessed.
"""

from __future__ import annotations

import math
import xml.etree.ElementTree as ET
from dataclasses import dataclass
from pathlib import Path

#: micrometres per unit, as OME, ImageJ and OME-Zarr spell their units of length
_MICROMETRES = {
    **dict.fromkeys(("µm", "μm", "um", "micron", "microns", "micrometer", "micrometre",
                     "\\u00b5m"), 1.0),
    **dict.fromkeys(("nm", "nanometer", "nanometre"), 1e-3),
    **dict.fromkeys(("mm", "millimeter", "millimetre"), 1e3),
    **dict.fromkeys(("cm", "centimeter", "centimetre"), 1e4),
    **dict.fromkeys(("m", "meter", "metre"), 1e6),
    **dict.fromkeys(("å", "angstrom", "ångström"), 1e-4),
    **dict.fromkeys(("pm", "picometer", "picometre"), 1e-6),
}
#: a TIFF's ResolutionUnit that is a length: micrometres per unit
_TIFF_UNITS = {3: 1e4, 4: 1e3, 5: 1.0}  # centimetre, millimetre, micrometre


def micrometres(value, unit: str | None = "µm") -> float | None:
    """``value`` in ``unit`` as micrometres; ``None`` if either says nothing."""
    factor = _MICROMETRES.get(str(unit).strip().lower()) if unit is not None else None
    try:
        size = float(value) * factor if factor is not None else math.nan
    except (TypeError, ValueError):
        return None
    return size if math.isfinite(size) and size > 0 else None


@dataclass(frozen=True)
class VoxelSize:
    """Micrometres a voxel along z (between slices; ``None`` where the file says only the
    plane's), y and x, and what said so."""

    z: float | None
    y: float
    x: float
    source: str

    def to_dict(self) -> dict:
        return {"z": self.z, "y": self.y, "x": self.x, "unit": "micrometre",
                "from": self.source}

    @property
    def um3(self) -> float | None:
        """A voxel's volume in cubic micrometres, where its depth is known."""
        return None if self.z is None else self.z * self.y * self.x


def _made(z, y, x, source: str) -> VoxelSize | None:
    """The size, each figure to 10 significant digits: ImageJ keeps 0.65 um as 1 / (1 /
    0.65) pixels per unit, 0.6499999999999999 read back."""
    def tidy(v: float | None) -> float | None:
        return None if v is None else float(f"{v:.10g}")

    return (VoxelSize(tidy(z), tidy(y), tidy(x), source) if y is not None and x is not None
            else None)


def of_tiff(tif) -> VoxelSize | None:
    """What an open ``tifffile.TiffFile`` says of its voxels."""
    if tif.is_ome:
        found = _ome(tif.ome_metadata)
        if found is not None:
            return found
    page = tif.pages[0]
    try:
        xres, yres = (float(v) for v in page.resolution)
    except (AttributeError, TypeError, ValueError):
        return None
    if tif.is_imagej:
        meta = tif.imagej_metadata or {}
        unit = meta.get("unit")
        return _made(micrometres(meta.get("spacing"), unit) if "spacing" in meta else None,
                     micrometres(1 / yres, unit) if yres > 0 else None,
                     micrometres(1 / xres, unit) if xres > 0 else None, "ImageJ metadata")
    per = _TIFF_UNITS.get(int(getattr(page, "resolutionunit", 1) or 1))
    if per is None or xres <= 0 or yres <= 0:
        return None
    return _made(None, micrometres(per / yres), micrometres(per / xres), "TIFF resolution")


def _ome(xml: str | None) -> VoxelSize | None:
    try:
        root = ET.fromstring(xml or "")
    except ET.ParseError:
        return None
    pixels = next((e for e in root.iter() if e.tag.rsplit("}", 1)[-1] == "Pixels"), None)
    if pixels is None:
        return None

    def size(axis: str) -> float | None:
        value = pixels.get(f"PhysicalSize{axis}")
        return None if value is None else micrometres(
            value, pixels.get(f"PhysicalSize{axis}Unit", "µm"))

    return _made(size("Z"), size("Y"), size("X"), "OME-XML")


def of_zarr(path: str | Path) -> VoxelSize | None:
    """An OME-Zarr level's voxels (``scan.zarr/0``: the ``multiscales`` of ``scan.zarr``)."""
    import zarr

    path = Path(path)
    roots = [p for p in (path, *path.parents) if p.name.lower().endswith(".zarr")]
    if not roots:
        return None
    root = roots[-1]  # the store; the groups between it and the array may hold levels
    for group_path in path.parents:
        if group_path != root and root not in group_path.parents:
            break
        try:
            attrs = dict(zarr.open_group(str(group_path), mode="r").attrs)
        except Exception:  # zarr raises many kinds for what is not a group
            continue
        try:
            multiscales = attrs.get("multiscales") or attrs.get("ome", {}).get("multiscales")
            if multiscales:
                level = path.relative_to(group_path).as_posix()
                return next((found for ms in multiscales
                             if (found := _level(ms, level)) is not None), None)
        except (AttributeError, TypeError, ValueError):  # not as OME-Zarr writes it
            return None
    return None


def _scale(transforms) -> list[float] | None:
    for t in transforms or []:
        if isinstance(t, dict) and t.get("type") == "scale":
            return list(t.get("scale") or [])
    return None


def _level(ms: dict, level: str) -> VoxelSize | None:
    dataset = next((d for d in ms.get("datasets", []) if d.get("path") == level), None)
    scale = _scale(dataset.get("coordinateTransformations")) if dataset else None
    axes = ms.get("axes") or []
    if not scale or len(scale) < 3 or len(axes) != len(scale):
        return None
    outer = _scale(ms.get("coordinateTransformations"))
    if outer and len(outer) == len(scale):
        scale = [a * b for a, b in zip(scale, outer, strict=True)]
    spatial = [a if isinstance(a, dict) else {"name": a} for a in axes[-3:]]
    if [a.get("name", "").lower() for a in spatial] != ["z", "y", "x"] or any(
            a.get("type", "space") != "space" for a in spatial):
        return None
    z, y, x = (micrometres(s, a.get("unit")) for s, a in zip(scale[-3:], spatial, strict=True))
    return _made(z, y, x, "OME-Zarr multiscales")


def of_hdf5(dataset) -> VoxelSize | None:
    """An h5py dataset's ``element_size_um`` (z, y, x)."""
    try:
        sizes = [float(v) for v in dataset.attrs["element_size_um"]]
    except (KeyError, TypeError, ValueError):
        return None
    if len(sizes) < 3:
        return None
    z, y, x = (micrometres(s) for s in sizes[-3:])
    return _made(z, y, x, "HDF5 element_size_um")
