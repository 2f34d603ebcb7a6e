"""The battery layout (DESIGN 4.2): a loader, the label codec and the three-way split.

``<root>/{train,validation,test}_images/*.png`` with labels of the same file
names in ``<root>/{split}_label/``. Labels are 8-bit grayscale: 0 -> pore (0),
255 -> carbon (1), any other value -> nickel (2). Inputs are 8- or 16-bit
grayscale scaled to [0, 1]. The synthetic generator writes the same layout.

Every problem a user can cause (missing folder, image without label, corrupt
PNG, mismatched sizes, empty split) is a :class:`DataError` naming the file.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch
from PIL import Image, UnidentifiedImageError
from torch.utils.data import Dataset, random_split

from paser.errors import DataError

SPLITS = ("train", "validation", "test")
CLASS_NAMES = ("pore", "carbon", "nickel")
IMAGE_SUFFIXES = (".png", ".tif", ".tiff")


def decode_label(label: np.ndarray) -> np.ndarray:
    """Reference codec: 0 -> pore (0), 255 -> carbon (1), any other value -> nickel (2)."""
    out = np.full(label.shape, 2, dtype=np.int64)
    out[label == 0] = 0
    out[label == 255] = 1
    return out


def encode_label(mask: np.ndarray) -> np.ndarray:
    """Inverse of :func:`decode_label` with nickel written as 128: uint8 [H, W]."""
    lut = np.array([0, 255, 128], dtype=np.uint8)
    return lut[np.asarray(mask, dtype=np.int64)]


def _open(path: Path) -> np.ndarray:
    try:
        with Image.open(path) as img:
            img.load()
            arr = np.asarray(img)
    except (UnidentifiedImageError, OSError, SyntaxError, ValueError) as err:
        raise DataError(f"{path}: cannot read the image ({err}); replace or remove the file") from None
    return arr


def _first_channel(arr: np.ndarray) -> np.ndarray:
    """RGB(A) of a grayscale scan: the channels are equal, keep one."""
    return arr[..., 0] if arr.ndim == 3 else arr


CODEC = "8-bit grayscale: pore 0, carbon 255, nickel any other value"


def read_image(path: str | Path) -> np.ndarray:
    """An input image as float32 [1, H, W] in [0, 1] (8- or 16-bit)."""
    arr = _first_channel(_open(Path(path)))
    scale = 65535.0 if arr.dtype == np.uint16 else 255.0 if arr.dtype == np.uint8 else None
    if scale is None:
        arr = arr.astype(np.float32)
        lo, hi = float(arr.min()), float(arr.max())
        return ((arr - lo) / max(hi - lo, 1e-12))[None]
    return (arr.astype(np.float32) / scale)[None]


def read_label(path: str | Path) -> np.ndarray:
    """A label PNG as class indices int64 [H, W]; a label outside the codec (16-bit, colour
    with unequal channels) is a :class:`DataError`."""
    arr = _open(Path(path))
    if arr.ndim == 3 and arr.shape[-1] >= 3 and not (
            np.array_equal(arr[..., 0], arr[..., 1]) and np.array_equal(arr[..., 0], arr[..., 2])):
        raise DataError(f"{path}: a colour label, outside the label codec ({CODEC}); save the "
                        "classes as those gray values")
    arr = _first_channel(arr)
    if arr.dtype != np.uint8:
        raise DataError(f"{path}: a {arr.dtype} label, outside the label codec ({CODEC}); save "
                        "it as an 8-bit grayscale PNG")
    return decode_label(arr)


class BatteryDataset(Dataset):
    """One split of the battery layout. Item: ``{"image": [1, H, W], "mask": [H, W], "id": str}``.

    The file list and sizes are checked when the dataset is built (headers only);
    pixels are read on access, or all at once with ``in_memory=True`` (small sets).
    """

    def __init__(self, root: str | Path, split: str, in_memory: bool = False):
        if split not in SPLITS:
            raise DataError(f"unknown split '{split}'; use one of {', '.join(SPLITS)}")
        self.root, self.split = Path(root), split
        img_dir, lbl_dir = self.root / f"{split}_images", self.root / f"{split}_label"
        for d in (img_dir, lbl_dir):
            if not d.is_dir():
                raise DataError(
                    f"{d}: folder not found; a dataset root needs "
                    f"{{train,validation,test}}_images/ and _label/ folders (see README, 'Data')"
                )
        self.images = sorted(p for p in img_dir.iterdir() if p.suffix.lower() in IMAGE_SUFFIXES)
        if not self.images:
            raise DataError(f"{img_dir}: no images (.png/.tif) in split '{split}'")
        self.labels = [lbl_dir / p.name for p in self.images]
        missing = [p for p in self.labels if not p.is_file()]
        if missing:
            raise DataError(
                f"{missing[0]}: label not found for image {img_dir / missing[0].name}"
                + (f" (and {len(missing) - 1} more)" if len(missing) > 1 else "")
            )
        self.size = self._check_sizes()
        self._cache: list[dict] | None = None
        if in_memory:
            self._cache = [self._load(i) for i in range(len(self))]

    def _check_sizes(self) -> tuple[int, int]:
        size = None
        for img, lbl in zip(self.images, self.labels, strict=True):
            s_img, s_lbl = _header_size(img), _header_size(lbl)
            if s_img != s_lbl:
                raise DataError(f"{img}: image is {s_img[1]}x{s_img[0]} but its label {lbl} is "
                                f"{s_lbl[1]}x{s_lbl[0]} (HxW); they must match")
            if size is None:
                size, first = s_img, img
            elif s_img != size:
                raise DataError(f"{img}: size {s_img[1]}x{s_img[0]} differs from {first} "
                                f"({size[1]}x{size[0]}); all images of a split must have one size")
        return size[1], size[0]  # (H, W)

    def __len__(self) -> int:
        return len(self.images)

    def image(self, i: int) -> torch.Tensor:
        """Image ``i`` as float32 [1, H, W] in [0, 1]."""
        image = read_image(self.images[i])
        if not np.isfinite(image).all():
            raise DataError(f"{self.images[i]}: image has NaN or Inf values")
        return torch.from_numpy(image)

    def mask(self, i: int) -> torch.Tensor:
        """Label ``i`` as class indices uint8 [H, W]."""
        return torch.from_numpy(read_label(self.labels[i]).astype(np.uint8))

    @property
    def ids(self) -> list[str]:
        return [p.stem for p in self.images]

    @property
    def channels(self) -> int:
        return 1

    def _load(self, i: int) -> dict:
        return {"image": self.image(i), "mask": self.mask(i), "id": self.images[i].stem}

    def __getitem__(self, i: int) -> dict:
        return self._cache[i] if self._cache is not None else self._load(i)


def _header_size(path: Path) -> tuple[int, int]:
    """(W, H) from the file header, without decoding pixels."""
    try:
        with Image.open(path) as img:
            return img.size
    except (UnidentifiedImageError, OSError, SyntaxError) as err:
        raise DataError(f"{path}: cannot read the image ({err}); replace or remove the file") from None


def split_three(
    n: int, proportions: tuple[float, float, float] = (0.34, 0.33, 0.33), seed: int = 42
) -> tuple[list[int], list[int], list[int]]:
    """Seeded cut of ``n`` training indices into D_pre / D_rl / D_ft (stages 1, 2, 3).

    Uses :func:`torch.utils.data.random_split` with a generator seeded by ``seed``,
    as the reference does (proportions 0.34 / 0.33 / 0.33, seed 42).
    """
    if n < 3:
        raise DataError(f"the training split has {n} images; the three-way split needs at least 3")
    parts = random_split(range(n), list(proportions), generator=torch.Generator().manual_seed(seed))
    return tuple(sorted(p.indices) for p in parts)  # type: ignore[return-value]
