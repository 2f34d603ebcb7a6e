"""Images of any size as tiles of one size (``data.tile``): what a run trains, validates
and routes at.

A split whose images are not all ``data.tile`` is cut into tiles of that size, row-major
from the top-left of each image; the last row and column of tiles reach past the image,
mirrored there, with those pixels unlabelled, so each labelled pixel counts once (in the
losses, the metrics and the mIoU). ``paser segment`` cuts any image the same way
(:func:`route_tiled`), so a 1024 x 1024 image under a run trained on 128 x 128 tiles with
a 2 x 2 grid is routed in 16 x 16 patches of 64 x 64, as trained.
"""

from __future__ import annotations

import math
import os
import re
import shutil
import socket
import uuid
import weakref
from collections.abc import Callable, Iterable, Sequence
from pathlib import Path

import numpy as np
import torch
from torch.utils.data import Dataset

from paser.data.battery import MASK_IGNORE, SegmentationFiles
from paser.patches import PatchGrid, pad_to


def tile_origins(height: int, width: int, tile: tuple[int, int]) -> list[tuple[int, int]]:
    """Top-left corners of the tiles of a ``height x width`` image, row-major."""
    th, tw = tile
    return [(y * th, x * tw) for y in range(math.ceil(height / th))
            for x in range(math.ceil(width / tw))]


#: a tile's id: its image's stem, ``@``, its top-left corner (:class:`Tiles`)
TILE_ID = re.compile(r"^(?P<stem>.*)@(?P<y>\d+),(?P<x>\d+)$")


def source_images(ids: Sequence[str]) -> np.ndarray | None:
    """The image each of ``ids`` was cut from, as an index ``[N]`` (in order of first
    appearance), where every id is a tile's (:class:`Tiles`); None for whole images."""
    stems = [TILE_ID.match(i) for i in ids]
    if not ids or not all(stems):
        return None
    index: dict[str, int] = {}
    return np.array([index.setdefault(m["stem"], len(index)) for m in stems], dtype=np.int64)


def counted(ids: Sequence[str], size: tuple[int, int]) -> tuple[str, str]:
    """What a split holds, as a user can match it to their files, and what one item of it
    is: ``('40 images of 128 x 128', 'image')``, or for tiles ``('52 tiles of 128 x 128 from
    10 images', 'tile')``."""
    n, (h, w) = len(ids), size
    sources = source_images(ids)
    if sources is None:
        return f"{n} image{'s' * (n != 1)} of {h} x {w}", "image"
    m = int(sources.max()) + 1
    return f"{n} tile{'s' * (n != 1)} of {h} x {w} from {m} image{'s' * (m != 1)}", "tile"


#: the names of the :class:`Decoded` folders this process made
_MADE: set[str] = set()


class Decoded:
    """A folder, for as long as this object lives in the process that made it (and at its
    exit), where streamed tiles keep each image they read decoded (:func:`decode_into`):
    training draws tiles in random order, so without it each tile decodes its whole image
    again (a 2,048 x 2,048 slice read for each of its 256 tiles of 128 x 128, every epoch).
    A copy in a reader process shares the folder and leaves its removal to the original."""

    def __init__(self, parent: Path):
        parent.mkdir(parents=True, exist_ok=True)
        host = socket.gethostname()
        for old in parent.glob("decoded-*"):  # left by a process killed before it cleaned up
            _, owner, *rest = old.name.split("-", 3)
            if len(rest) == 2 and rest[1] != host:
                continue  # another machine's (a run's cache shared by nodes): its pid is not ours
            pid, _, started = owner.partition(".")  # no start: made before they were recorded
            # a killed run's pid may be another process's now: one started at another time
            # is not the owner; and a folder of this process's pid that it did not make is
            # stale (a container's first process has the same pid each time)
            if pid.isdigit() and (not _alive(int(pid)) or (
                    started and _started(int(pid)) not in (None, started)) or (
                    int(pid) == os.getpid() and old.name not in _MADE)):
                shutil.rmtree(old, ignore_errors=True)
        started = _started(os.getpid())
        owner = f"{os.getpid()}" if started is None else f"{os.getpid()}.{started}"
        self.path = parent / f"decoded-{owner}-{uuid.uuid4().hex[:8]}-{host}"
        self.path.mkdir()
        _MADE.add(self.path.name)
        weakref.finalize(self, shutil.rmtree, self.path, True)

    def __reduce__(self):  # a reader's copy: the folder alone, no finalizer of its own
        return (_shared, (self.path,))

    def within(self, name: str) -> Decoded:
        """A folder in this one, for one split's images (each split numbers its images from
        0): removed with this one, which it keeps alive."""
        out = _shared(self.path / name)
        out.path.mkdir(exist_ok=True)
        out.owner = self
        return out


def _shared(path: Path) -> Decoded:
    out = Decoded.__new__(Decoded)
    out.path = path
    return out


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except OSError:  # another user's: alive
        return True
    return True


def _started(pid: int) -> str | None:
    """When process ``pid`` started, as Linux's ``/proc/<pid>/stat`` writes it (field 22:
    clock ticks after the machine booted): with the pid, it names one process, where the
    pid alone may name a later one. None where unknown (no such process; not Linux)."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    # field 3 on: after the command's name, which may hold spaces and parentheses
    fields = stat.rpartition(")")[2].split()
    return fields[19] if len(fields) > 19 else None


def decode_into(parent: Path, splits: Iterable, spare: float = 2.0, ranks: int = 1
                ) -> Decoded | None:
    """Let the :class:`Tiles` among ``splits`` keep the images they read decoded in a
    :class:`Decoded` folder under ``parent`` (a run's cache); None, and nothing kept, where
    none is tiled or the disk has less room than ``spare`` times their decoded size
    (float32 images, byte masks) and a gibibyte.

    ``ranks``: the training processes on this machine (``distributed.devices``). Each keeps
    a copy of its own and checks before any writes, so each checks the room for ``ranks``
    copies."""
    tiled = [s for s in splits if isinstance(s, Tiles)]
    if not tiled:
        return None
    need = sum(h * w * (4 * t.files.channels + 1) for t in {id(t.files): t for t in tiled}.values()
               for h, w in t.files.sizes)
    parent.mkdir(parents=True, exist_ok=True)
    if shutil.disk_usage(parent).free < ranks * spare * need + 2**30:
        return None
    decoded = Decoded(parent)
    each: dict[int, Decoded] = {}  # a folder per split: image i of one is not image i of another
    for t in tiled:
        if id(t.files) not in each:
            each[id(t.files)] = decoded.within(str(len(each)))
        t.decoded = each[id(t.files)]
    return decoded


class Tiles(Dataset):
    """A split of :class:`SegmentationFiles` as tiles of ``tile`` (``(H, W)``); item ``j`` is
    tile ``j`` of the row-major tiles of every image in turn. It reads like the split it
    wraps (``image``, ``mask``, ``ids``, ``size``, ``channels``), so it is held in memory
    or streamed the same way, and is a Dataset as that split is (``PaSeR.evaluate`` and
    ``paser evaluate`` take it). A reader keeps the last image it read: tiles of one image
    come one after another."""

    def __init__(self, files: SegmentationFiles, tile: tuple[int, int], margin: int = 0,
                 decoded: Decoded | None = None):
        self.files, self.tile, self.margin = files, tuple(tile), margin
        #: where each image read is kept decoded (:func:`decode_into`; streamed splits)
        self.decoded = decoded
        self.index = [(i, y, x) for i, (h, w) in enumerate(files.sizes)
                      for y, x in tile_origins(h, w, self.tile)]
        stems = files.ids
        #: ``<stem>@<y>,<x>``: the tile's image and its top-left corner
        self.ids = [f"{stems[i]}@{y},{x}" for i, y, x in self.index]
        self._last: tuple[int, torch.Tensor, torch.Tensor] | None = None

    size = property(lambda self: (self.tile[0] + 2 * self.margin, self.tile[1] + 2 * self.margin))
    channels = property(lambda self: self.files.channels)
    class_names = property(lambda self: self.files.class_names)

    def __len__(self) -> int:
        return len(self.index)

    def around(self, margin: int) -> Tiles:
        """The same tiles, each with ``margin`` pixels of its image on every side (mirrored
        past the image's edges, those pixels unlabelled): the windows stage 1 crops a tile
        from at a random offset (:func:`paser.train.pretrain.crop`); a window's centre is
        the tile, exactly."""
        out = Tiles(self.files, self.tile, margin, self.decoded)
        out.index, out.ids = self.index, self.ids
        return out

    def _source(self, i: int) -> tuple[torch.Tensor | np.ndarray, torch.Tensor | np.ndarray]:
        if self._last is None or self._last[0] != i:
            self._last = (i, *self._read(i))
        return self._last[1], self._last[2]

    def _read(self, i: int) -> tuple[torch.Tensor | np.ndarray, torch.Tensor | np.ndarray]:
        """Image ``i`` and its mask, decoded; with :attr:`decoded`, memory-mapped from the
        copies kept there, which the first reading writes (the mask after the image: a mask
        there means both are whole)."""
        if self.decoded is not None:
            image, mask = (self.decoded.path / f"{i}.{part}.npy" for part in ("image", "mask"))
            try:  # the mask first: where it is, the image is whole
                y = np.load(mask, mmap_mode="r")
                return np.load(image, mmap_mode="r"), y
            except OSError:  # not written yet, or removed meanwhile by the process that owns it
                pass
        x, y = self.files.image(i), self.files.mask(i)
        if self.decoded is not None:
            try:
                for path, arr in ((image, x), (mask, y)):
                    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
                    with open(tmp, "wb") as fh:
                        np.save(fh, arr.numpy())
                    os.replace(tmp, path)  # another reader may have written it: the same
            except OSError:  # no room after all, or the folder gone: read as without it
                self.decoded = None
        return x, y

    def _crop(self, x: torch.Tensor, y0: int, x0: int, fill: int | None) -> torch.Tensor:
        """The window of tile ``(y0, x0)`` with its margin: ``x`` padded by the margin
        above and left (mirrored, or ``fill``), then below and right as far as the window
        reaches (:func:`pad_to`), and cut there; only the window's pixels are gathered,
        so a tile of a large image costs its own size, not the image's."""
        th, tw = self.size
        h, w = x.shape[-2:]
        rows = _window_index(h, self.margin, y0, th, fill is None)
        cols = _window_index(w, self.margin, x0, tw, fill is None)
        if isinstance(x, np.ndarray):  # memory-mapped: only the window's rows are read
            out = torch.from_numpy(np.ascontiguousarray(
                x[..., rows.clamp(min=0).numpy(), :][..., cols.clamp(min=0).numpy()]))
        else:
            rows, cols = rows.to(x.device), cols.to(x.device)
            out = x.index_select(-2, rows.clamp(min=0)).index_select(-1, cols.clamp(min=0))
        if fill is not None:  # outside the image: unlabelled
            out[..., rows < 0, :] = fill
            out[..., cols < 0] = fill
        return out

    def image(self, j: int) -> torch.Tensor:
        i, y, x = self.index[j]
        return self._crop(self._source(i)[0], y, x, None)

    def mask(self, j: int) -> torch.Tensor:
        i, y, x = self.index[j]
        return self._crop(self._source(i)[1][None], y, x, MASK_IGNORE)[0]

    def __getitem__(self, j: int) -> dict:
        return {"image": self.image(j), "mask": self.mask(j), "id": self.ids[j]}

    def __getstate__(self) -> dict:  # reader processes start without the cached image
        return {**self.__dict__, "_last": None}


def _window_index(size: int, margin: int, start: int, length: int, mirror: bool
                  ) -> torch.Tensor:
    """Along one axis of ``size`` pixels: the source pixel of each of a window's ``length``
    positions from ``start``, in the axis padded by ``margin`` before it (mirrored, as the
    axis flipped and padded at its end by :func:`pad_to`) and after it as far as needed (by
    :func:`pad_to` again, mirrored across the whole padded axis); -1 where ``mirror`` is
    False and the position lies outside the axis (a constant fill)."""
    from paser.patches import _pad_index

    if not mirror:
        idx = torch.arange(start - margin, start - margin + length)
        return torch.where((idx >= 0) & (idx < size), idx, -1)
    # the axis with the margin before it: position p holds pixel size - 1 - I[size + m - 1 - p]
    before = size - 1 - _pad_index(size, size + margin, "reflect", torch.device("cpu")).flip(0)
    padded = max(size + margin, start + length)
    after = _pad_index(size + margin, padded, "reflect", torch.device("cpu"))
    return before[after[start:start + length]]


def narrow(mask: torch.Tensor) -> torch.Tensor:
    """Class indices as bytes where they fit (every index under 256), else as they are."""
    return mask.to(torch.uint8) if mask.numel() and int(mask.max()) < 256 else mask


def route_tiled(route: Callable, x: torch.Tensor, tile: tuple[int, int], grid,
                batch: int = 8, probs: bool = True,
                on_batch: Callable[[int, int], None] | None = None):
    """``route`` (a batch of ``tile``-sized images and which of their patches hold image
    pixels ``[n, P]`` -> :class:`paser.routing.RoutingOutput`) on every tile of
    ``x [B, C, H, W]``, ``batch`` tiles at a time (8: a 1024 x 1024 slice peaks under
    1.7 GB with the demo's models), stitched back: the
    labels and probabilities cropped to ``H x W``, the actions (and logits, degraded
    patches) of the tiles' patches as one row-major grid of the image's patches, GFLOP
    summed over each image's tiles. ``grid`` is the run's patch grid of one tile.
    ``probs=False`` keeps each tile's labels only (``probs`` is then None): what is held
    beside the image is a byte a pixel while stitched (then the int64 labels returned),
    not the class probabilities and their stitching
    (about 110 bytes a pixel with the demo's three classes). ``on_batch(done, total)``
    is called with the tiles done after each batch (a progress bar's)."""
    from paser.metrics import predicted_classes
    from paser.routing import RoutingOutput

    b, _, h, w = x.shape
    th, tw = tile
    rows, cols = math.ceil(h / th), math.ceil(w / tw)
    xp = pad_to(x, rows * th, cols * tw, "reflect")
    tiles = (xp.unfold(2, th, th).unfold(3, tw, tw)  # B C R K th tw
             .permute(0, 2, 3, 1, 4, 5).reshape(b * rows * cols, x.shape[1], th, tw))
    # the patches of each tile that hold pixels of the image, not only its mirrored padding
    fixed = PatchGrid(grid.rows, grid.cols, patch=(th // grid.rows, tw // grid.cols))
    inside = torch.stack([fixed.inside(h, w, y, x0) for y, x0 in tile_origins(h, w, tile)])
    inside = inside.repeat(b, 1)  # [B * R * K, P]
    kept = ("probs" if probs else "mask", "actions", "gflops", "logits", "degraded")
    outs = []  # each batch's fields that are stitched, nothing else (f0's passes, ...)
    for i in range(0, len(tiles), batch):
        out = route(tiles[i:i + batch], inside[i:i + batch])
        outs.append({name: narrow(getattr(out, name)) if name == "mask" else getattr(out, name)
                     for name in kept})
        del out
        if on_batch is not None:
            on_batch(min(i + batch, len(tiles)), len(tiles))

    def cat(name):
        parts = [o[name] for o in outs]
        if all(p is None for p in parts):
            return None
        if name == "mask" and len({p.dtype for p in parts}) > 1:  # a batch past 255
            parts = [p.long() for p in parts]
        if name == "degraded":  # a batch whose every model ran has none: no patch failed
            parts = [torch.zeros_like(o["actions"], dtype=torch.bool) if p is None else p
                     for p, o in zip(parts, outs, strict=True)]
        return torch.cat(parts)

    def image(t):  # [B*R*K, ..., th, tw] -> [B, ..., H, W]: the tiles put back, cropped
        rest = t.shape[1:-2]
        d = len(rest)
        t = t.reshape(b, rows, cols, *rest, th, tw).permute(
            0, *range(3, 3 + d), 1, 3 + d, 2, 4 + d)
        return t.reshape(b, *rest, rows * th, cols * tw)[..., :h, :w]

    def patches(t):  # [B*R*K, P, ...] -> [B, (R * gr) * (K * gc), ...], row-major
        if t is None:
            return None
        rest = t.shape[2:]
        t = t.reshape(b, rows, cols, grid.rows, grid.cols, *rest).transpose(2, 3)
        return t.reshape(b, rows * grid.rows * cols * grid.cols, *rest)

    gflops = cat("gflops").reshape(b, rows * cols).sum(1)
    if probs:
        stitched = image(cat("probs"))
        mask = predicted_classes(stitched)
    else:  # stitched in bytes, then class indices (int64) once: 16 MB a copy at 4096^2
        stitched, mask = None, image(cat("mask")).long()
    return RoutingOutput(mask, stitched, patches(cat("actions")), gflops,
                         patches(cat("logits")), None, patches(cat("degraded")))
