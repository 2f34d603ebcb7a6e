"""The battery layout (DESIGN 4.2): a loader, the label codec and the three-way split.

``<root>/{train,validation,test}_images/*.png`` (or any image a folder dataset reads:
.tif, .jpg, .bmp, ...) with labels of the same file names in ``<root>/{split}_label/``. Labels are 8-bit grayscale: 0 -> pore (0),
255 -> carbon (1), any other value -> nickel (2). Inputs are read by
:mod:`paser.data.images` (8/16-bit by their range, floats by the run's intensity window).
The synthetic generator writes the same layout.

Every problem a user can cause (missing folder, image without label, corrupt
PNG, mismatched sizes, empty split) is a :class:`DataError` naming the file.
"""

from __future__ import annotations

import functools
import math
import unicodedata
from collections import Counter
from pathlib import Path

import numpy as np
import torch
from torch.utils.data import Dataset, random_split

from paser.data.images import (
    READABLE_SUFFIXES,
    Intensity,
    fit_window,
    gray_in_colour,
    image_files,
    probe,
    read_array,
    read_image,
    read_mask,
    skipped_note,
    spread,
    unread_files,
)
from paser.errors import DataError

SPLITS = ("train", "validation", "test")
#: at most this many of a split's colour image files are read (spread over the split) to
#: tell gray saved as RGB (every one's channels equal) from colour
GRAY_CHECKED = 16
CLASS_NAMES = ("pore", "carbon", "nickel")
#: the image (and label) files a split takes: every format the folder layout and ``paser
#: segment`` read (a .jpg or .bmp slice was left out of the battery layout without a word)
IMAGE_SUFFIXES = READABLE_SUFFIXES


def decode_label(label: np.ndarray) -> np.ndarray:
    """Reference codec: 0 -> pore (0), 255 -> carbon (1), any other value -> nickel (2)."""
    out = np.full(label.shape, 2, dtype=np.int64)
    out[label == 0] = 0
    out[label == 255] = 1
    return out


CODEC = "8-bit grayscale: pore 0, carbon 255, nickel any other value"


def read_label(path: str | Path) -> np.ndarray:
    """A label file as class indices int64 [H, W] (read by
    :func:`paser.data.images.read_mask`: a colour, lossy or 16-bit label outside 0..255 is a
    :class:`DataError`)."""
    try:
        return decode_label(read_mask(path))
    except DataError as err:
        raise DataError(f"{err} (outside the label codec: {CODEC})") from None


def _near_name(label: Path, image: Path) -> str:
    """``; ...img_000_mask.png looks like its label: ...`` where a file beside the missing
    label names the image's stem inside its own (another tool's suffix or prefix), or
    ``; ...Img_000.png differs ... in case alone`` (one file to macOS and Windows); never
    the label of another image beside it (a.png's, beside A.png)."""
    if not label.parent.is_dir():
        return ""
    stem = image.stem
    taken = {p.stem for p in image.parent.iterdir()} - {stem} if image.parent.is_dir() else set()
    # the files beside the label that no other image claims, listed once
    free = sorted(p for p in label.parent.iterdir() if p.is_file() and p.stem not in taken)
    cased = [p for p in free if p.stem != stem and p.stem.lower() == stem.lower()]
    if cased:
        return (f"; {cased[0]} differs from the image's name in case alone: a label has its "
                f"image's file name (stem '{stem}'), letter for letter, so rename it "
                f"'{stem}{cased[0].suffix}'")

    def names_it(other: str) -> bool:  # img_000_mask, mask_img_000, img_000.mask
        return any(other.startswith(stem + sep) or other.endswith(sep + stem)
                   for sep in "_-. ")

    near = [p for p in free if names_it(p.stem)]
    if not near:
        return ""
    return (f"; {near[0]} looks like its label: a label has its image's file name (stem "
            f"'{stem}'), so rename the labels (e.g. strip '{near[0].stem.replace(stem, '', 1)}')")


def pair_name(path: Path) -> str:
    """The name an image and its mask share: the file's stem in Unicode's composed form
    (NFC), an OME-TIFF's ``.ome`` left out. macOS writes an accented letter decomposed
    (NFD: u and a combining diaeresis for u-umlaut) where Linux and Windows tools write it
    as one character; the two names look the same everywhere and are one name to macOS, so
    a mask saved on a Mac pairs with its image. ``.ome.tif`` is one suffix (the OME-TIFF
    convention microscopes and Fiji write), so ``scan.ome.tif`` pairs with ``scan.tif``."""
    stem = path.stem
    if stem.lower().endswith(".ome") and path.suffix.lower() in (".tif", ".tiff"):
        stem = stem[:-4]
    return unicodedata.normalize("NFC", stem)


def _label_files(images: list[Path], lbl_dir: Path) -> list[Path]:
    """Each image's label in ``lbl_dir``: the file of its very name, else the one file of
    its stem that no other image is named as (``s1.png`` for ``s1.tif``), by its very stem
    (``scan.ome.png`` for ``scan.ome.tif``) or the stem in either of Unicode's forms, an
    OME-TIFF's ``.ome`` left out (:func:`pair_name`), as the folder layout pairs masks; else
    the file of its name, to be reported missing. Two such files (``s1.png`` and
    ``s1.tiff`` for ``s1.tif``) are refused, naming both: which is its label is not known."""
    names = {p.name for p in images}
    stems: dict[str, list[Path]] = {}
    named: dict[str, list[Path]] = {}
    for label in image_files(lbl_dir, IMAGE_SUFFIXES):
        if label.name not in names:
            stems.setdefault(label.stem, []).append(label)
            named.setdefault(pair_name(label), []).append(label)
    labels = []
    for image in images:
        found = [] if (lbl_dir / image.name).is_file() else list(dict.fromkeys(
            stems.get(image.stem, []) + named.get(pair_name(image), [])))
        if len(found) > 1:
            raise DataError(f"{found[0]} and {found[1]} are both labels of {image} (an "
                            "image's label is the one file of its name in the label folder): "
                            "keep one")
        labels.append(found[0] if found else lbl_dir / image.name)
    return labels


#: Stored value of unlabelled pixels in uint8 class-index masks (losses and metrics see -1).
MASK_IGNORE = 255


class SegmentationFiles(Dataset):
    """Image and mask files of one split. Item: ``{"image": [C, H, W], "mask": [H, W],
    "id": str}``; masks are uint8 class indices, :data:`MASK_IGNORE` where unlabelled.

    File pairs and sizes are checked when the dataset is built (headers only): every bad
    pair of the split is named in one :class:`DataError`, whose ``opened`` is the split
    without them (``paser data check`` reads those for what else is wrong); pixels are
    read on access (:func:`paser.data.images.read_image`, scaled by ``intensity``), or all
    at once with ``in_memory=True`` (small sets). Subclasses give the files and
    :meth:`decode` (a mask file -> class indices); ``channels`` is 3 when any image is
    colour, else 1; colour files whose channels are equal (gray saved as RGB, as image
    exports often are: up to :data:`GRAY_CHECKED` of them read, spread over the split)
    count as gray, and ``gray_colour`` says how many there are. ``dtypes`` counts the images
    by file type and stored dtype.
    """

    class_names: list[str] = []
    #: the image files a split of this layout takes
    suffixes: tuple[str, ...] = IMAGE_SUFFIXES

    def __init__(self, images: list[Path], labels: list[Path], where: str,
                 in_memory: bool = False):
        if not images:
            raise DataError(f"{where}: no images ({', '.join(self.suffixes)})")
        found = [p.is_file() for p in labels]
        missing = [i for i, ok in enumerate(found) if not ok]
        problems = []
        if missing:  # what to do said once, every missing label named (`data check` too)
            i = missing[0]
            problems.append(f"{labels[i]}: label not found for image {images[i]}"
                            + self.missing_label_hint(labels[i], images[i]))
            problems.extend(f"{labels[i]}: label not found for image {images[i]}"
                            for i in missing[1:])
        self.images = [p for p, ok in zip(images, found, strict=True) if ok]
        self.labels = [p for p, ok in zip(labels, found, strict=True) if ok]
        self.intensity = Intensity()
        self.dtypes: Counter[str] = Counter()
        self.sizes, self.channels = self._check_sizes(problems)
        self._cache: list[dict] | None = None  # set before the error: ``opened`` is read too
        if problems:  # every one, not the first alone
            err = DataError.of_every(problems)
            err.opened = self
            raise err
        if in_memory:
            self._cache = [self._load(i) for i in range(len(self))]

    def missing_label_hint(self, label: Path, image: Path) -> str:
        """What to do where ``image``'s label ``label`` is not found (``; ...``): said once
        for the split, with the first missing label."""
        return _near_name(label, image) or ("; save the label there (the image's name, as "
                                            ".png or .tif), or move images without a label "
                                            "out of the dataset")

    @property
    def size(self) -> tuple[int, int] | None:
        """``(H, W)`` of every image, or ``None`` when they differ (``sizes``: each one's;
        such a split is read as tiles of ``data.tile``: :mod:`paser.data.tiles`)."""
        first = self.sizes[0]
        return first if all(s == first for s in self.sizes) else None

    def size_range(self) -> str:
        """``128 x 128``, or ``400 x 400 to 500 x 601`` (smallest to largest area)."""
        small = min(self.sizes, key=lambda s: (s[0] * s[1], s))
        large = max(self.sizes, key=lambda s: (s[0] * s[1], s))
        text = f"{small[0]} x {small[1]}"
        return text if self.size is not None else f"{text} to {large[0]} x {large[1]}"

    def _check_sizes(self, problems: list[str]) -> tuple[list[tuple[int, int]], int]:
        """Each image's size and the split's channels, from the headers. A pair that cannot
        be read or whose sizes differ is added to ``problems`` and left out of the split."""
        sizes, colour, kinds, kept = [], [], {}, []
        for img, lbl in zip(self.images, self.labels, strict=True):
            try:
                head, label = probe(img), probe(lbl)
            except DataError as err:  # an unreadable file: every one named, not the first
                problems.extend(err.each())
                continue
            kinds.setdefault(head.channels, img)
            self.dtypes[f"{head.dtype} {img.suffix.lower().lstrip('.').upper()}"
                        + (" stack" if head.pages > 1 else "")
                        + (" turned upright by EXIF" if head.orientation != 1 else "")] += 1
            if (head.height, head.width) != (label.height, label.width):
                turned = (head.orientation in (5, 6, 7, 8) and label.orientation == 1
                          and (head.width, head.height) == (label.height, label.width))
                problems.append(
                    f"{img}: image is {head.height}x{head.width} but its label {lbl} is "
                    f"{label.height}x{label.width} (HxW); they must match"
                    + ("; the image is read turned upright by its EXIF orientation "
                       f"({head.orientation}), as viewers show it; if the mask follows its "
                       "stored pixels, save the image without the orientation tag"
                       if turned else "; save the mask at its image's size (a resized mask "
                       "resampled by nearest neighbour, not interpolated)"))
                continue
            sizes.append((head.height, head.width))
            kept.append((img, lbl))
            if head.colour:
                colour.append(img)
        self.images, self.labels = [p for p, _ in kept], [m for _, m in kept]
        if 2 in kinds and len(kinds) > 1:  # two detectors' images beside single ones: the
            other = next(c for c in kinds if c != 2)  # split has no one channel count to read
            raise DataError.of_every([*problems, (
                f"{kinds[2]} has 2 channels but {kinds[other]} has {other}; images of 2 "
                "channels (two detectors) train together only")])
        if 2 in kinds:
            return sizes, 2
        if not colour or not self.colour_ok:
            return sizes, 1
        if all(_gray(colour[i]) for i in spread(len(colour), GRAY_CHECKED)):
            self.gray_colour = len(colour)
            return sizes, 1
        return sizes, 3

    def fit_window(self) -> tuple[float, float] | None:
        """The intensity window of these images (:func:`paser.data.images.fit_window`)."""
        return fit_window(self.images)

    #: whether colour images are read as RGB (else their first channel, a grayscale scan)
    colour_ok = True
    #: how many of the split's colour files are gray saved as colour (read as 1 channel)
    gray_colour = 0

    def __len__(self) -> int:
        return len(self.images)

    def image(self, i: int) -> torch.Tensor:
        """Image ``i`` as float32 [C, H, W] in [0, 1]."""
        return torch.from_numpy(read_image(self.images[i], self.channels, self.intensity))

    def decode(self, path: Path) -> np.ndarray:
        raise NotImplementedError

    def mask(self, i: int) -> torch.Tensor:
        """Label ``i`` as class indices uint8 [H, W] (:data:`MASK_IGNORE`: unlabelled)."""
        return torch.from_numpy(np.ascontiguousarray(self.decode(self.labels[i]), dtype=np.uint8))

    @property
    def ids(self) -> list[str]:
        return [p.stem for p in self.images]

    def _load(self, i: int) -> dict:
        return {"image": self.image(i), "mask": self.mask(i), "id": self.images[i].stem}

    def __getitem__(self, i: int) -> dict:
        return self._cache[i] if self._cache is not None else self._load(i)


def rename_note(other: Path | None, name: str) -> str:
    """`` (X is there: rename it NAME/)``, or nothing where there is no ``other``."""
    return "" if other is None else f" ({other} is there: rename it {name}/)"


def misnamed_split_folder(folder: Path) -> Path | None:
    """A folder beside ``folder`` (a battery split's ``test_label``) that is its name in
    another case or mistyped (``Test_label``, ``test_labels``), not another of the layout's
    six; ``None`` where there is none."""
    import difflib

    layout = {f"{s}_{kind}" for s in SPLITS for kind in ("images", "label")}
    if not folder.parent.is_dir():
        return None
    others = sorted(d for d in folder.parent.iterdir() if d.is_dir() and d.name not in layout)
    return next((d for d in others if d.name.lower() == folder.name or difflib.SequenceMatcher(
        None, d.name.lower(), folder.name).ratio() >= 0.85), None)


def _gray(path: Path) -> bool:
    """Whether a colour image file is gray saved as colour; one that cannot be read is not
    (reading it for training names it). Read once per version of the file in a process
    (a run opens each split several times: its identity, its window, its stages)."""
    try:
        stat = path.stat()
    except OSError:
        return False
    return _gray_file(str(path), stat.st_mtime_ns, stat.st_size)


@functools.lru_cache(maxsize=4096)
def _gray_file(path: str, mtime_ns: int, size: int) -> bool:
    try:
        return gray_in_colour(read_array(path))
    except DataError:
        return False


class BatteryDataset(SegmentationFiles):
    """One split of the battery layout (module docstring); grayscale, 3 classes."""

    class_names = list(CLASS_NAMES)
    colour_ok = False

    def __init__(self, root: str | Path, split: str, in_memory: bool = False):
        if split not in SPLITS:
            raise DataError(f"unknown split '{split}'; use one of {', '.join(SPLITS)}")
        self.root, self.split = Path(root), split
        img_dir, lbl_dir = self.root / f"{split}_images", self.root / f"{split}_label"
        for d in (img_dir, lbl_dir):
            if not d.is_dir():
                raise DataError(
                    f"{d}: folder not found; a dataset root needs "
                    f"{{train,validation,test}}_images/ and _label/ folders (see docs/data.md)"
                    + rename_note(misnamed_split_folder(d), d.name))
        images = image_files(img_dir, IMAGE_SUFFIXES)
        unread = None if images else skipped_note(unread_files(img_dir))
        if unread:
            raise DataError(f"{img_dir}: no image paser reads; {unread}")
        super().__init__(images, _label_files(images, lbl_dir),
                         f"{img_dir} (split '{split}')", in_memory)

    def decode(self, path: Path) -> np.ndarray:
        return read_label(path)


def unread_battery_images(root: str | Path) -> list[Path]:
    """The files of a battery layout's image folders in a format paser does not read
    (:func:`paser.data.images.unread_files`): training goes on without them, so ``paser
    data check`` names them."""
    return [f for split in SPLITS if (Path(root) / f"{split}_images").is_dir()
            for f in unread_files(Path(root) / f"{split}_images")]


def split_three(
    n: int, proportions: tuple[float, float, float] = (0.34, 0.33, 0.33), seed: int = 42,
    slices: tuple[int, int] | None = None,
) -> tuple[list[int], list[int], list[int]]:
    """Seeded cut of ``n`` training indices into D_pre / D_rl / D_ft (stages 1, 2, 3);
    ``slices``: the training range ``[z0, z1)`` of a volume, whose labelled slices they are
    (for the error, where there are too few).

    Uses :func:`torch.utils.data.random_split` with a generator seeded by ``seed``,
    as the reference does (proportions 0.34 / 0.33 / 0.33, seed 42).
    """
    if n < 3:
        what, more = ((f"labelled slice{'s' if n != 1 else ''}", "label more slices in its "
                       f"range [{slices[0]}, {slices[1]}) of data.slices") if slices is not None
                      else (f"image{'s' if n != 1 else ''}", "add training images"))
        raise DataError(f"the training split has {n} {what} (tiles); "
                        "training cuts it into D_pre, D_rl and D_ft (data.split: stage 1, the "
                        f"policy and fine-tuning), so it needs at least 3: {more}, "
                        "or cut them into tiles (data.tile)")
    # random_split's own lengths (floors, the rest one by one from the first), where none
    # is empty: 3 images gave 2 / 1 / 0 and torch's warning; then one each
    lengths = [math.floor(n * p) for p in proportions]
    for i in range(n - sum(lengths)):
        lengths[i % 3] += 1
    while 0 in lengths:
        lengths[lengths.index(max(lengths))] -= 1
        lengths[lengths.index(0)] += 1
    parts = random_split(range(n), lengths, generator=torch.Generator().manual_seed(seed))
    return tuple(sorted(p.indices) for p in parts)  # type: ignore[return-value]
