"""Your own data: a generic folder layout with a class map, and the Cityscapes layout.

Generic folders (``data.dataset: folder``)::

    <root>/classes.yaml                  # classes: {pixel value: name, ...}; ignore: 255
    <root>/{train,validation,test}/images/*.png    (or .jpg, .tif)
    <root>/{train,validation,test}/masks/*.png     (same file stems)

or, without the split folders, ``<root>/images`` and ``<root>/masks``, cut into train /
validation / test by ``data.holdout`` (seeded by ``data.split_seed``). Inputs are
grayscale or RGB (8- or 16-bit); a set with any RGB image is read as RGB. Masks are 8-bit
grayscale or palette PNGs whose values are the class map's keys, in its order the classes
0, 1, ...; pixels equal to ``ignore`` are unlabelled: losses and metrics skip them.

Cityscapes (``data.dataset: cityscapes``): ``leftImg8bit/<split>/<city>/*_leftImg8bit.png``
with ``gtFine/<split>/<city>/*_gtFine_labelIds.png``; label ids map to the 19 train ids of
the benchmark, every other id is unlabelled.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Iterable
from pathlib import Path

import numpy as np
import torch
import yaml

from paser.data.battery import MASK_IGNORE, SegmentationFiles, pair_name, rename_note
from paser.data.images import (
    READABLE_SUFFIXES,
    hidden,
    image_files,
    palette_of,
    read_array,
    read_mask,
    shared_stem,
    skipped_note,
    unread_files,
)
from paser.errors import DataError

#: The marker of a mask value the class map does not know (found when a mask is read).
_UNKNOWN = 254
#: unknown mask values, all between the classes' values and the ignore value and along
#: edges, from which a mask is said to be resampled with interpolation (one or two are more
#: likely a class left out of the map)
_RESAMPLED = 3

#: names a class map is given by mistake for ``classes.yaml`` (compared in lower case)
_CLASS_MAP_NAMES = ("classes.yaml", "classes.yml", "classes.yaml.txt", "classes.yml.txt",
                    "class.yaml", "class.yml")


def misnamed_class_map(folder: Path) -> Path | None:
    """A file of ``folder`` that is its ``classes.yaml`` by another name (``classes.yml``,
    ``Classes.yaml``, ``classes.yaml.txt`` as editors on Windows save it), or ``None``: paser
    reads ``classes.yaml`` alone, and the error names the file to rename."""
    if not folder.is_dir():
        return None
    return next((f for f in sorted(folder.iterdir()) if f.is_file() and f.name != "classes.yaml"
                 and f.name.lower() in _CLASS_MAP_NAMES), None)


#: Cityscapes' 19 evaluation classes (train ids 0..18), and label id -> train id for the
#: labelled ids (every other id, "unlabeled" to "license plate", is ignored).
CITYSCAPES_CLASSES = (
    "road", "sidewalk", "building", "wall", "fence", "pole", "traffic light", "traffic sign",
    "vegetation", "terrain", "sky", "person", "rider", "car", "truck", "bus", "train",
    "motorcycle", "bicycle")
CITYSCAPES_TRAIN_IDS = {7: 0, 8: 1, 11: 2, 12: 3, 13: 4, 17: 5, 19: 6, 20: 7, 21: 8, 22: 9,
                        23: 10, 24: 11, 25: 12, 26: 13, 27: 14, 28: 15, 31: 16, 32: 17, 33: 18}


#: Cityscapes labels read when a split is opened: all of them unlabelled is its test split
_PLACEHOLDERS = 3
#: where Cityscapes' files come from (nothing is downloaded)
_CITYSCAPES_ARCHIVES = ("leftImg8bit_trainvaltest.zip and gtFine_trainvaltest.zip from "
                        "cityscapes-dataset.com")


class ClassMap:
    """Mask value -> class index, from ``classes.yaml``: ``classes`` maps each pixel value
    (0..255) to a class name, in class order; ``ignore`` (default 255) is unlabelled. A
    value not listed is an error, or unlabelled with ``unlisted_ignored``."""

    def __init__(self, values: list[int], names: list[str], ignore: int | None = MASK_IGNORE,
                 where: str = "class map", unlisted_ignored: bool = False):
        self.values, self.names, self.ignore, self.where = values, names, ignore, where
        self.lut = np.full(256, MASK_IGNORE if unlisted_ignored else _UNKNOWN, dtype=np.uint8)
        self.lut[values] = np.arange(len(values), dtype=np.uint8)
        if ignore is not None:
            self.lut[ignore] = MASK_IGNORE

    @classmethod
    def read(cls, path: Path) -> ClassMap:
        if not path.is_file():
            other = misnamed_class_map(path.parent)
            if other is not None:
                raise DataError(f"{path}: no class map ({other} is there: rename it "
                                f"{path.name})")
            above = next((d for d in path.parent.parents[:3] if (d / path.name).is_file()),
                         None)  # data.root=mydata/images, or a split's folder
            if above is not None:
                raise DataError(f"{path}: no class map; {path.parent} is a folder inside the "
                                f"dataset {above} (its {path.name} is there): give the "
                                f"dataset's own folder, data.root={above}")
            raise DataError(f"{path}: no class map; write one, e.g. 'classes: {{0: background, "
                            "1: object}' and optionally 'ignore: 255' (see docs/data.md)")
        try:
            doc = yaml.safe_load(path.read_text(encoding="utf-8"))
        except yaml.YAMLError as err:  # where, as config files say it: the first line alone
            mark = getattr(err, "problem_mark", None)  # was 'while parsing a flow mapping'
            at = f" at line {mark.line + 1}, column {mark.column + 1}" if mark else ""
            problem = getattr(err, "problem", None) or str(err).splitlines()[0]
            raise DataError(f"{path}: not valid YAML{at}: {problem}; fix the file, e.g. "
                            "'classes: {0: background, 1: object}'") from None
        except UnicodeDecodeError:
            raise DataError(f"{path}: not UTF-8 text; save the class map as UTF-8") from None
        classes = doc.get("classes") if isinstance(doc, dict) else None
        unknown = set(doc) - {"classes", "ignore"} if isinstance(doc, dict) else set()
        if not isinstance(classes, dict) or not classes or unknown:
            raise DataError(f"{path}: expected 'classes: {{pixel value: name, ...}}' and optionally "
                            f"'ignore: <value or null>'" + (f"; unknown keys {sorted(unknown)}"
                                                            if unknown else ""))
        ignore = doc.get("ignore", MASK_IGNORE)
        values = list(classes)
        bad = [v for v in [*values, ignore] if v is not None and (
            isinstance(v, bool) or not isinstance(v, int) or not 0 <= v <= 255)]
        if bad:
            raise DataError(f"{path}: mask values must be integers 0..255 (8-bit masks), got {bad}")
        if ignore in values:
            raise DataError(
                f"{path}: value {ignore} is both a class and the ignore value"
                + ("" if "ignore" in doc else f" (unlabelled pixels are {MASK_IGNORE} unless "
                   "the file says otherwise); add 'ignore: null' if no pixel is unlabelled, "
                   "or 'ignore: <value>' for the value that marks them"))
        names = [classes[v] for v in values]
        empty = [v for v, n in zip(values, names, strict=True) if n is None or not str(n).strip()]
        if empty:
            raise DataError(f"{path}: mask value {empty[0]} has no class name; write "
                            f"'{empty[0]}: <name>'")
        names = [str(n) for n in names]
        twice = sorted(n for n, count in Counter(names).items() if count > 1)
        if twice:
            raise DataError(f"{path}: class name {twice[0]!r} is given to more than one mask "
                            "value; a class has one value (relabel the masks to merge them)")
        if len(values) > 254:
            raise DataError(f"{path}: {len(values)} classes; at most 254 are supported")
        return cls(values, names, ignore, str(path))

    def encode(self, classes: np.ndarray) -> np.ndarray:
        """Class indices ``[H, W]`` as the mask values they are stored as: uint8, class k
        written as ``values[k]``; the inverse of :meth:`decode` on those values."""
        classes = np.asarray(classes)
        if classes.dtype.kind not in "iu":
            classes = classes.astype(np.int64)
        if classes.size and not 0 <= int(classes.min()) <= int(classes.max()) < len(self.values):
            raise DataError(f"class indices {int(classes.min())}..{int(classes.max())} outside "
                            f"{self.where}'s {len(self.values)} classes")
        return np.asarray(self.values, dtype=np.uint8)[classes]

    def to_yaml(self) -> str:
        """The class map in the ``classes.yaml`` form :meth:`read` takes, classes in order."""
        return yaml.safe_dump({"classes": dict(zip(self.values, self.names, strict=True)),
                               "ignore": self.ignore}, sort_keys=False)

    def decode(self, arr: np.ndarray, path: Path) -> np.ndarray:
        out = self.lut[arr]
        if (out == _UNKNOWN).any():
            vals = sorted(int(v) for v in np.unique(arr[out == _UNKNOWN]))
            # an unlabelled region's edges are resampled too (classes 0..2 and 255 resized
            # hold 3..254 there), so the ignore value bounds them as a class does
            ends = [*self.values, *([] if self.ignore is None else [self.ignore])]
            between = len(vals) >= _RESAMPLED and all(
                min(ends) < v < max(ends) for v in vals) and _along_edges(arr, out == _UNKNOWN)
            past = between and not all(min(self.values) < v < max(self.values) for v in vals)
            raise DataError(
                f"{path}: mask values {vals[:8]}{' ...' if len(vals) > 8 else ''}"
                f"{_palette_note(path)} are not in "
                f"{self.where} (classes {self.values}, ignore {self.ignore}); "
                + (f"{len(vals)} values between the classes'"
                   f"{' and the ignore value' if past else ''} are what a mask resized or "
                   "turned with interpolation (bilinear, bicubic, antialiased) holds along "
                   "its class edges: resample masks with nearest neighbour (Pillow: "
                   "Image.Resampling.NEAREST), or set those pixels to the ignore value"
                   if between else
                   "add them there or set those pixels to the ignore value"))
        return out


def _along_edges(arr: np.ndarray, unknown: np.ndarray) -> bool:
    """Whether the pixels ``unknown`` (``[H, W]`` bool) of a mask ``arr`` lie along edges,
    as interpolation leaves them (each a step of a ramp between two values), not in regions
    of their own value, as classes the map leaves out or numbered objects do: fewer than one
    in ten has all 8 neighbours of its own value."""
    from scipy import ndimage  # (an error's path: not at import)

    if min(arr.shape) < 3:
        return True
    # a 3 x 3 neighbourhood of one value: its largest and its least are the same (pixels
    # on the border, whose neighbourhood leaves the mask, are not counted)
    uniform = (ndimage.maximum_filter(arr, size=3) == ndimage.minimum_filter(arr, size=3))
    return int((uniform & unknown)[1:-1, 1:-1].sum()) * 10 < int(unknown.sum())


def _palette_note(path: Path) -> str:
    """`` (palette indices, ...)`` for a palette mask: its values are the indices, not the
    colours it shows."""
    from PIL import Image

    try:
        with Image.open(path) as img:
            return (" (palette indices, not the colours the palette shows: classes.yaml names "
                    "the indices)") if img.mode in ("P", "PA") else ""
    except OSError:
        return ""


def palette_conflicts(masks: Iterable[Path]) -> list[str]:
    """The palette masks that show a palette index in another colour than most masks do,
    or a colour at another index (one their own palette shows in another colour), one
    problem each. Masks are read by their indices, so there one colour would be two
    classes, and two colours one: colour masks converted file by file number the colours
    each file holds (Pillow's ``Image.quantize``, an indexed export). Only the indices a
    mask holds count, each shown in its palette's colour (ties: the earlier masks' way);
    masks of one palette (most tools write one) are not read, and masks of several are
    read once each."""
    palettes = {}
    for path in masks:
        palette = palette_of(path)
        if palette is not None:
            palettes[path] = palette
    if len({p.tobytes() for p in palettes.values()}) < 2:
        return []
    shown: dict[Path, tuple[list[tuple[int, tuple[int, ...]]], np.ndarray]] = {}
    for path, palette in palettes.items():
        try:
            indices = read_array(path, palette="indices")
        except DataError:  # named by check's own reading of the masks
            continue
        if indices.ndim == 3:  # an alpha sample left as an axis of one (a PA TIFF)
            indices = indices[..., 0]
        flat = torch.from_numpy(np.require(indices.reshape(-1), requirements="CW"))
        # torch counts bytes as they are (numpy widens them first: 4 times as long)
        held = torch.bincount(flat if flat.dtype == torch.uint8 else flat.long()
                              ).nonzero()[:, 0].numpy()
        table = np.zeros((max(len(palette), int(held[-1]) + 1), 3), np.uint8)
        table[:len(palette)] = palette  # an index past the palette: black, as Pillow shows it
        shown[path] = (list(zip(held.tolist(), map(tuple, table[held].tolist()), strict=True)),
                       table)
    # (index, colour) -> the masks that show it; the most shown colour of each index, and
    # index of each colour, is the reference (one mask numbered otherwise is named, wherever
    # it sorts, not every other mask against it)
    showing: dict[tuple[int, tuple[int, ...]], list[Path]] = {}
    for path, (pairs, _) in shown.items():
        for pair in pairs:
            showing.setdefault(pair, []).append(path)
    colour_at: dict[int, tuple[int, ...]] = {}
    index_of: dict[tuple[int, ...], int] = {}
    for v, colour in sorted(showing, key=lambda pair: -len(showing[pair])):  # stable: ties
        colour_at.setdefault(v, colour)  # keep the earlier masks' way
        index_of.setdefault(colour, v)

    def where(pair) -> str:
        first, more = showing[pair][0], len(showing[pair]) - 1
        return f"{first}" + (f" and {more} other mask{'s' * (more > 1)}" if more else "")

    problems = []
    for path, (pairs, table) in shown.items():
        for v, colour in pairs:
            at = index_of[colour]
            if colour_at[v] != colour:
                problem = (f"palette index {v} shows the colour {colour} here but "
                           f"{colour_at[v]} in {where((v, colour_at[v]))}")
            elif at != v and not (at < len(table) and tuple(table[at].tolist()) == colour):
                # (a palette that shows two indices alike, here as there, numbers them alike)
                problem = (f"the colour {colour} is palette index {v} here but {at} in "
                           f"{where((at, colour))}")
            else:
                continue
            problems.append(
                f"{path}: {problem}; masks are read by their palette indices (classes.yaml "
                "names indices, not colours), so a colour would name one class here and "
                "another there: save every mask with one palette, each colour at one index "
                "(Pillow: rgb.quantize(palette=ref, dither=Image.Dither.NONE), ref a palette "
                "image of the class colours)")
            break
    return problems


def mask_values(root: Path, limit: int = 16) -> list[int]:
    """The values in the first ``limit`` masks of a folder (``train/masks/`` or ``masks/``):
    what its ``classes.yaml`` must name; empty where there are none. A mask that is no
    class-value mask (colour, JPEG) is its :class:`DataError`: what is wrong with it."""
    dirs = [root / "train" / "masks", root / "masks"]
    files = next((image_files(d) for d in dirs if d.is_dir()), [])[:limit]
    return sorted({int(v) for f in files for v in np.unique(read_mask(f))})


class _ClassMapped(SegmentationFiles):
    """Masks decoded by a :class:`ClassMap` (``self.classmap``)."""

    classmap: ClassMap
    suffixes = READABLE_SUFFIXES

    @property
    def class_names(self) -> list[str]:
        return self.classmap.names

    def decode(self, path: Path) -> np.ndarray:
        return self.classmap.decode(read_mask(path), path)


class FolderDataset(_ClassMapped):
    """One split of a generic folder dataset (see the module docstring)."""

    def __init__(self, root: str | Path, split: str, holdout: tuple[float, float] = (0.1, 0.1),
                 seed: int = 42):
        root = Path(root)
        self.classmap = ClassMap.read(root / "classes.yaml")
        if (root / "train" / "images").is_dir():  # split folders: all three
            where = root / split
            if split == "validation" and not (where / "images").is_dir() and (
                    (root / "val" / "images").is_dir()
                    or not where.is_dir() and (root / "val").is_dir()):
                where = root / "val"  # as many tools name it (and its images/ is the error)
            if not (where / "images").is_dir():
                other = (_named_otherwise(where, "images", _IMAGE_FOLDERS) if where.is_dir()
                         else _named_otherwise(root, split, _SPLIT_FOLDERS[split]))
                raise DataError(f"{where / 'images'}: folder not found; with train/ "
                                "there must be validation/ (or val/) and test/ too, each with "
                                "images/ and masks/" + rename_note(other, "images" if
                                                               where.is_dir() else split))
            pairs = _pairs(where / "images", where / "masks")
        elif (root / "images").is_dir():
            pairs = _pairs(root / "images", root / "masks")
            _one_file_per_image([p for p, _ in pairs], root / "masks")
            pairs = [pairs[i] for i in _holdout(len(pairs), holdout, seed, root)[split]]
        else:
            train = _named_otherwise(root, "train", _SPLIT_FOLDERS["train"])
            other = train or _named_otherwise(root, "images", _IMAGE_FOLDERS)
            raise DataError(f"{root}: neither {split}/images/ nor images/ found; a folder dataset "
                            "has images/ and masks/ (optionally under train/, validation/, test/)"
                            + (f" ({train} is there: rename it train/, and the other splits "
                               "validation/ and test/)" if train else rename_note(other, "images"))
                            + "; an image volume with a label volume is data.dataset=volume "
                            "(docs/volumes.md: paser data check DIR data.volume=... "
                            "data.labels=... data.slices=...)")
        super().__init__([p for p, _ in pairs], [m for _, m in pairs], f"{root} ({split})")


class CityscapesDataset(_ClassMapped):
    """One split of the Cityscapes layout; labels are the 19 train ids, 255 elsewhere."""

    # the train ids follow the label ids' order: the listed ids map to 0, 1, ..., 18
    classmap = ClassMap(list(CITYSCAPES_TRAIN_IDS), list(CITYSCAPES_CLASSES), None,
                        "the Cityscapes label ids", unlisted_ignored=True)

    def __init__(self, root: str | Path, split: str):
        root = Path(root)
        img_dir, gt_dir = root / "leftImg8bit" / split, root / "gtFine" / split
        for d, other in ((img_dir, "gtFine"), (gt_dir, "leftImg8bit")):
            if not d.is_dir():
                # data.root one folder above the dataset, or an archive unpacked apart
                below = sorted(p.parent for p in root.glob(f"*/{d.parent.name}/{split}")
                               if p.is_dir() and not hidden(p, root))
                there = "" if not below else (
                    f"; {below[0]} is there: point data.root at {below[0].parent}"
                    + ("" if (below[0].parent / other).is_dir() else
                       f" and put {other}/ beside it"))
                raise DataError(f"{d}: folder not found; the Cityscapes layout has "
                                f"leftImg8bit/{split}/<city>/ and gtFine/{split}/<city>/ in "
                                f"data.root ({_CITYSCAPES_ARCHIVES}, both unpacked there)"
                                + there)
        # not the ._<name>_leftImg8bit.png files macOS leaves on shared drives, nor hidden
        # folders (the other layouts pass over them too)
        images = sorted(p for p in img_dir.glob("*/*_leftImg8bit.png")
                        if not hidden(p, img_dir))
        if not images:  # not "no images (.png, ...)" of a folder of PNGs
            others = sorted(p for p in img_dir.rglob("*") if p.is_file()
                            and p.suffix.lower() in READABLE_SUFFIXES and not hidden(p))
            raise DataError(
                f"{img_dir}: no Cityscapes image in it"
                + (f" ({len(others)} image file{'s' * (len(others) > 1)} there, e.g. "
                   f"{others[0]}, not where or as the layout names them)" if others else "")
                + f"; the layout is leftImg8bit/{split}/<city>/<name>_leftImg8bit.png with "
                f"labels gtFine/{split}/<city>/<name>_gtFine_labelIds.png "
                f"({_CITYSCAPES_ARCHIVES}, unpacked into data.root)")
        labels = [gt_dir / p.parent.name / p.name.replace("_leftImg8bit.png",
                                                          "_gtFine_labelIds.png")
                  for p in images]
        super().__init__(images, labels, f"{img_dir}")
        if self._placeholders():
            raise DataError(
                f"{gt_dir}: its labels hold no pixel of the 19 classes (the first "
                f"{min(len(self), _PLACEHOLDERS)} read: every pixel unlabelled); Cityscapes "
                "withholds its test labels (gtFine/test marks the ego vehicle and the image "
                "border alone), so nothing could be scored on them: read val as the test "
                "split (data.cityscapes_splits.test: val, the default) or give a folder of "
                "labelled images")

    def _placeholders(self) -> bool:
        """Whether the split's first labels are all unlabelled: Cityscapes' test labels,
        on which every method of a run scored nan. A label that cannot be read is left to
        the reading, which names every bad file."""
        try:
            return len(self) > 0 and all((self.decode(self.labels[i]) == MASK_IGNORE).all()
                                         for i in range(min(len(self), _PLACEHOLDERS)))
        except DataError:
            return False

    def missing_label_hint(self, label: Path, image: Path) -> str:
        """Cityscapes' label is no file of the image's name: say which file it is, and name
        the image's other gtFine files (``_gtFine_labelTrainIds.png``, ``_gtFine_color.png``),
        which are not read."""
        stem = label.name.removesuffix("_gtFine_labelIds.png")
        others = sorted(label.parent.glob(f"{stem}_gtFine_*")) if label.parent.is_dir() else []
        return ("; an image's label is gtFine/<split>/<city>/<name>_gtFine_labelIds.png "
                f"({_CITYSCAPES_ARCHIVES}), whose label ids paser maps to the 19 train ids "
                "itself" + (f" ({others[0].name} is there: not read)" if others else "")
                + "; save the labels there, or move images without a label out of the dataset")


#: folder names other tools give masks
_MASK_FOLDERS = ("labels", "label", "annotations", "gt", "ground_truth", "groundtruth",
                 "segmentations", "targets")


#: folder names other tools give images, and a split's folder
_IMAGE_FOLDERS = ("image", "img", "imgs", "inputs", "input", "raw")
_SPLIT_FOLDERS = {"train": ("training",), "validation": ("valid", "val", "validate"),
                  "test": ("testing",)}


def _named_otherwise(parent: Path, name: str, aliases: tuple[str, ...] = ()) -> Path | None:
    """A folder of ``parent`` that is ``name`` by another name: in another case
    (``Images/`` for ``images/``, one folder to macOS and Windows, two to Linux, where a
    folder copied from them lands) or one of ``aliases``; ``None`` where there is none."""
    if not parent.is_dir():
        return None
    return next((d for d in sorted(parent.iterdir()) if d.is_dir() and d.name != name
                 and d.name.lower() in (name, *aliases)), None)


def _pairs(img_dir: Path, mask_dir: Path) -> list[tuple[Path, Path]]:
    if not mask_dir.is_dir():
        other = _named_otherwise(mask_dir.parent, "masks", ("mask", *_MASK_FOLDERS))
        raise DataError(f"{mask_dir}: folder not found; masks go beside images/ with the same "
                        "file names" + rename_note(other, "masks"))
    masks: dict[Path, Path] = {}  # image -> its mask
    images = image_files(img_dir)
    # the image of a mask's very stem, else of its name in Unicode's other form: two images
    # named in either form (two files on Linux) each keep their own mask
    stems = {p.stem: p for p in images}
    named = {pair_name(p): p for p in images}
    for m in image_files(mask_dir):  # two masks of one image: which is its label is not known
        image = stems.get(m.stem) or named.get(pair_name(m))
        if image is not None and masks.setdefault(image, m) != m:
            raise DataError(f"{masks[image]} and {m} are both masks of {image} (an image's "
                            "mask is the one file of its name in masks/): keep one")
    unread = None if images else skipped_note(unread_files(img_dir))
    if unread:
        raise DataError(f"{img_dir}: no image paser reads; {unread}")
    if not images:  # not "0 images are too few for data.holdout", which asks for a share
        below = _below(img_dir)
        raise DataError(f"{img_dir}: no image ({', '.join(READABLE_SUFFIXES)}) in it"
                        + (f" (its sub-folders hold {len(below)}, e.g. {below[0]}, which are "
                           "not read)" if below else "") + "; put "
                        f"the images there, each with its mask of the same name in {mask_dir}")
    # a missing mask is reported by SegmentationFiles, naming the image
    return [(p, masks.get(p, mask_dir / f"{p.stem}.png")) for p in images]


def _parts(root: Path) -> list[Path]:
    """The folders of a folder dataset that hold its ``images/`` and ``masks/``: its split
    folders, or itself."""
    if (root / "train" / "images").is_dir():
        return [root / s for s in ("train", "validation", "val", "test")]
    return [root]


def unread_images(root: str | Path) -> list[Path]:
    """The files of a folder dataset's image folders in a format paser does not read
    (:func:`paser.data.images.unread_files`): training goes on without them, so ``paser
    data check`` names them."""
    return [f for where in _parts(Path(root)) if (where / "images").is_dir()
            for f in unread_files(where / "images")]


def nested_images(root: str | Path) -> list[Path]:
    """The image files in sub-folders of a folder dataset's image folders: training reads
    the files of ``images/`` itself (each paired by name with one in ``masks/``) and goes on
    without them, so ``paser data check`` names them."""
    return [f for where in _parts(Path(root)) if (where / "images").is_dir()
            for f in _below(where / "images")]


def _below(folder: Path) -> list[Path]:
    """The image files in the sub-folders of ``folder`` (hidden ones left out)."""
    return [f for sub in sorted(folder.iterdir()) if sub.is_dir() and not hidden(sub)
            for f in image_files(sub, recursive=True)]


def unused_folders(root: str | Path) -> list[tuple[Path, Path]]:
    """The folders of a folder dataset that hold images it does not read, each with the
    one it reads in its place: ``val/`` beside ``validation/`` (both with ``images/``: the
    validation split is ``validation/``), ``images/`` beside ``train/`` (the split folders
    are read, not the one folder a holdout would cut). Training goes on without them, so
    ``paser data check`` names them."""
    root = Path(root)
    if not (root / "train" / "images").is_dir():
        return []
    unused = []
    if (root / "validation" / "images").is_dir() and (root / "val" / "images").is_dir():
        unused.append((root / "val", root / "validation"))
    if (root / "images").is_dir() and image_files(root / "images"):
        unused.append((root / "images", root / "train"))
    return unused


def unpaired_masks(root: str | Path) -> list[Path]:
    """The masks of a folder dataset with no image of their name beside them: training goes
    on without them, so ``paser data check`` names them (an image missing, or named
    otherwise). A mask pairs as :func:`_pairs` pairs it: by an image's very stem
    (``scan.ome.png`` with ``scan.ome.tif``), or by their :func:`pair_name`."""
    lost = []
    for where in _parts(Path(root)):
        if (where / "images").is_dir() and (where / "masks").is_dir():
            images = image_files(where / "images")
            stems, named = {p.stem for p in images}, {pair_name(p) for p in images}
            lost += [m for m in image_files(where / "masks")
                     if m.stem not in stems and pair_name(m) not in named]
    return lost


def _one_file_per_image(images: list[Path], mask_dir: Path) -> None:
    """Two files of one stem (``scan1.png``, ``scan1.tif``) would share one mask and could
    land in two splits: the test would hold a training image."""
    twice = shared_stem((pair_name(p), str(p)) for p in images)
    if twice is not None:
        stem, first, second = twice
        raise DataError(f"{first} and {second} have the same name '{stem}' (one mask, "
                        f"{mask_dir}/{stem}.*): the holdout could put one in training and the "
                        "other in test; keep one file per image")


def _holdout(n: int, holdout: tuple[float, float], seed: int, root: Path) -> dict[str, list[int]]:
    """Seeded train / validation / test cut of one folder of ``n`` images (at least one
    image in each)."""
    import torch

    n_val, n_test = (max(1, round(n * share)) for share in holdout)
    if n - n_val - n_test < 1:
        raise DataError(f"{root}/images: {n} images are too few for data.holdout "
                        f"{list(holdout)}; train, validation and test need one each at least")
    perm = torch.randperm(n, generator=torch.Generator().manual_seed(seed)).tolist()
    return {"validation": sorted(perm[:n_val]), "test": sorted(perm[n_val:n_val + n_test]),
            "train": sorted(perm[n_val + n_test:])}
