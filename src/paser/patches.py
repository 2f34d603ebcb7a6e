"""The patch grid: cut images into ``rows x cols`` patches and put them back.

PaSeR routes every patch of an image to one model of the pool, so images, label
maps, predictions and per-patch values all need the same, cheap mapping between
an image and its patches. Everything here is a reshape/permute or an index
gather; nothing loops over patches or pixels.

Conventions:

- Images are ``[B, C, H, W]``; label maps and predictions are ``[B, H, W]``.
  :meth:`PatchGrid.pad`, :meth:`~PatchGrid.crop`, :meth:`~PatchGrid.split` and
  :meth:`~PatchGrid.merge` accept both.
- Patches are numbered row-major: patch ``p`` sits at grid row ``p // cols``
  and grid column ``p % cols``. After :meth:`~PatchGrid.split`, patch ``p`` of
  image ``b`` is at index ``b * num_patches + p``.
- An image whose size is not divisible by the grid is padded at the bottom and
  right (:meth:`~PatchGrid.pad`), processed, and cropped back
  (:meth:`~PatchGrid.crop`). The original pixels keep their coordinates.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor

from paser.errors import ConfigError

__all__ = ["PAD_MODES", "PatchGrid"]

PAD_MODES = ("reflect", "replicate", "constant")


def _ceil_to(n: int, step: int) -> int:
    return -(-n // step) * step


@dataclass(frozen=True)
class PatchGrid:
    """A ``rows x cols`` grid of equal patches over an image.

    Args:
        rows: patches along the height, >= 1.
        cols: patches along the width, >= 1.
    """

    rows: int
    cols: int
    halo: int = 0
    #: ``(h, w)`` of every patch, in pixels: a grid of fixed-size patches (an image cut into
    #: tiles, :mod:`paser.data.tiles`), padded to ``rows * h x cols * w``; ``None``: the
    #: image padded to the least size the grid divides
    patch: tuple[int, int] | None = None

    def __post_init__(self) -> None:
        if isinstance(self.halo, bool) or not isinstance(self.halo, int) or self.halo < 0:
            raise ConfigError(f"PatchGrid halo={self.halo!r}: must be an integer >= 0 (pixels)")
        for name in ("rows", "cols"):
            value = getattr(self, name)
            # bool is an int subclass; PatchGrid(True, 4) is almost certainly a bug.
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ConfigError(
                    f"PatchGrid {name}={value!r}: must be an integer >= 1 (e.g. rows=4, cols=4)"
                )

    def __str__(self) -> str:
        return f"{self.rows}x{self.cols}"

    @property
    def num_patches(self) -> int:
        """Patches per image, ``rows * cols``."""
        return self.rows * self.cols

    # -- sizes ---------------------------------------------------------------------------------

    def _check_fits(self, height: int, width: int) -> None:
        # patches of a fixed size cover any image they reach past (padded)
        if self.patch is None and (height < self.rows or width < self.cols):
            raise ConfigError(
                f"patch grid {self} is larger than the {height}x{width} image: a patch would be "
                f"less than one pixel {'high' if height < self.rows else 'wide'}; use at most "
                f"{min(self.rows, height)} rows and {min(self.cols, width)} cols for this image"
            )

    def padded_size(self, height: int, width: int) -> tuple[int, int]:
        """Smallest ``(Hp, Wp) >= (height, width)`` that the grid divides into equal patches:
        ``Hp`` divisible by ``rows``, ``Wp`` by ``cols``. Sizes are in pixels.

        Raises:
            ConfigError: the grid has more rows (cols) than the image has pixels.
        """
        self._check_fits(height, width)
        if self.patch is not None:
            hp, wp = self.rows * self.patch[0], self.cols * self.patch[1]
            if hp < height or wp < width:
                raise ConfigError(f"a {self} grid of {self.patch[0]} x {self.patch[1]} patches "
                                  f"covers {hp}x{wp}, less than the {height}x{width} image")
            return hp, wp
        return _ceil_to(height, self.rows), _ceil_to(width, self.cols)

    def inside(self, height: int, width: int, top: int = 0, left: int = 0) -> Tensor:
        """``[P]`` bool, row-major: whether each patch holds a pixel of a ``height x width``
        image, the grid's first patch at ``(top, left)`` of it (a tile's origin). Only
        patches of a fixed size reach wholly past an image (the last tiles of a side that is
        not a multiple of the tile); those are padding and need no model of the pool."""
        ph, pw = self.patch if self.patch is not None else self.patch_size(height, width)
        rows = top + ph * torch.arange(self.rows) < height
        cols = left + pw * torch.arange(self.cols) < width
        return (rows[:, None] & cols[None, :]).reshape(-1)

    def patch_size(self, height: int, width: int) -> tuple[int, int]:
        """``(h, w)`` of one patch of the padded image, in pixels (see :meth:`padded_size`)."""
        hp, wp = self.padded_size(height, width)
        return hp // self.rows, wp // self.cols

    # -- pad / crop ----------------------------------------------------------------------------

    def pad(self, x: Tensor, mode: str = "reflect", value: float = 0) -> Tensor:
        """Pad ``x`` at the bottom and right to :meth:`padded_size`.

        Args:
            x: ``[B, C, H, W]`` images or ``[B, H, W]`` label maps, any dtype.
            mode: ``"reflect"`` (default) mirrors the image about its last row/column
              without repeating it (``torch``/``numpy`` "reflect"; a grid's pad is always
              shorter than the side). ``"replicate"`` repeats the last row/column.
              ``"constant"`` fills with ``value``: use it for label maps, with
              ``value=ignore_index``, so padded pixels do not count in the metrics.
            value: fill value for ``mode="constant"``.

        Returns:
            ``[B, C, Hp, Wp]`` or ``[B, Hp, Wp]``; ``x`` itself when no padding is needed.
            Pixel ``(i, j)`` of the original keeps its coordinates.
        """
        if mode not in PAD_MODES:
            raise ConfigError(f"pad mode {mode!r}: use one of {', '.join(PAD_MODES)}")
        height, width = _spatial(x, "pad")
        return pad_to(x, *self.padded_size(height, width), mode, value)

    def crop(self, x: Tensor, height: int, width: int) -> Tensor:
        """Undo :meth:`pad`: keep the top-left ``height x width`` of ``x [..., Hp, Wp]``."""
        hp, wp = _spatial(x, "crop", min_dim=2)
        if height > hp or width > wp:
            raise ConfigError(
                f"crop to {height}x{width}: the tensor is only {hp}x{wp} "
                f"(shape {tuple(x.shape)}); crop undoes pad and cannot enlarge"
            )
        return x[..., :height, :width]

    # -- split / merge -------------------------------------------------------------------------

    def split(self, x: Tensor) -> Tensor:
        """Cut every image into its patches.

        Args:
            x: ``[B, C, H, W]`` or ``[B, H, W]`` with ``H % rows == 0`` and ``W % cols == 0``
              (pad first with :meth:`pad` otherwise).

        Returns:
            ``[B * P, C, h, w]`` or ``[B * P, h, w]`` with ``P = rows * cols``,
            ``h = H // rows``, ``w = W // cols``; patch ``p`` (row-major) of image ``b`` is
            at index ``b * P + p``. A copy, not a view.
        """
        height, width = _spatial(x, "split")
        self._check_fits(height, width)
        if height % self.rows or width % self.cols:
            hp, wp = self.padded_size(height, width)
            raise ConfigError(
                f"cannot split a {height}x{width} image (tensor shape {tuple(x.shape)}) into a "
                f"{self} patch grid: the height must be divisible by {self.rows} and the width "
                f"by {self.cols}; pad it first with grid.pad(x) to {hp}x{wp}"
            )
        squeeze = x.dim() == 3
        if squeeze:
            x = x.unsqueeze(1)
        b, c = x.shape[:2]
        h, w = height // self.rows, width // self.cols
        # [B, C, R*h, K*w] -> [B, C, R, h, K, w] -> [B, R, K, C, h, w]: row-major patch order.
        patches = (
            x.reshape(b, c, self.rows, h, self.cols, w)
            .permute(0, 2, 4, 1, 3, 5)
            .reshape(b * self.num_patches, c, h, w)
        )
        return patches.squeeze(1) if squeeze else patches

    def context(self, x: Tensor) -> Tensor:
        """The inputs of a patch model: every patch of ``x`` [B, C, H, W] (divisible by the
        grid) with ``halo`` pixels of its neighbours on each side, mirrored at the image
        border: ``[B * P, C, h + 2 * halo, w + 2 * halo]``, in :meth:`split`'s order.

        With ``halo = 0`` this is :meth:`split`. The model's output on it goes back through
        :meth:`centre`; only the patch itself is kept, the halo is context.
        """
        m = self.halo
        if not m:
            return self.split(x)
        self.split(x[:1, :1])  # the same checks and errors as split
        b, c, height, width = x.shape
        h, w = height // self.rows, width // self.cols
        mode = "reflect" if m < min(height, width) else "replicate"
        big = torch.nn.functional.pad(x, (m, m, m, m), mode=mode)
        tiles = big.unfold(2, h + 2 * m, h).unfold(3, w + 2 * m, w)  # B C R K h' w'
        return tiles.permute(0, 2, 3, 1, 4, 5).reshape(b * self.num_patches, c, h + 2 * m,
                                                       w + 2 * m)

    def centre(self, y: Tensor) -> Tensor:
        """Drop the halo of per-patch outputs ``[N, K, h + 2 * halo, w + 2 * halo]``."""
        m = self.halo
        return y[..., m:y.shape[-2] - m, m:y.shape[-1] - m] if m else y

    def merge(self, patches: Tensor) -> Tensor:
        """Exact inverse of :meth:`split`.

        Args:
            patches: ``[B * P, C, h, w]`` or ``[B * P, h, w]`` in :meth:`split` order.

        Returns:
            ``[B, C, rows * h, cols * w]`` or ``[B, rows * h, cols * w]``.
        """
        _spatial(patches, "merge")
        n = patches.shape[0]
        if n % self.num_patches:
            raise ConfigError(
                f"cannot merge {n} patches (tensor shape {tuple(patches.shape)}) with a {self} "
                f"grid: the first dimension must be a multiple of {self.num_patches} "
                "(batch size x patches per image)"
            )
        squeeze = patches.dim() == 3
        if squeeze:
            patches = patches.unsqueeze(1)
        c, h, w = patches.shape[1:]
        b = n // self.num_patches
        images = (
            patches.reshape(b, self.rows, self.cols, c, h, w)
            .permute(0, 3, 1, 4, 2, 5)
            .reshape(b, c, self.rows * h, self.cols * w)
        )
        return images.squeeze(1) if squeeze else images

    # -- per-patch values ----------------------------------------------------------------------

    def patch_map(self, values: Tensor, height: int, width: int) -> Tensor:
        """Broadcast one value per patch to the pixels of its patch (e.g. a routing map).

        Args:
            values: ``[B, P]`` in row-major patch order, any dtype.
            height, width: size of the map to return, in pixels. If the grid does not divide
              it, the patches are those of the padded image (:meth:`padded_size`) and the
              map is cropped back, exactly as :meth:`pad`, :meth:`split` and :meth:`crop`
              would place them.

        Returns:
            ``[B, height, width]``; pixel ``(i, j)`` holds ``values[b, p]`` for the patch
            ``p`` that contains it.
        """
        if values.dim() != 2 or values.shape[1] != self.num_patches:
            raise ConfigError(
                f"patch_map: values must be [B, {self.num_patches}] for a {self} grid, "
                f"got shape {tuple(values.shape)}"
            )
        h, w = self.patch_size(height, width)
        grid = values.reshape(values.shape[0], self.rows, self.cols)
        full = grid.repeat_interleave(h, dim=1).repeat_interleave(w, dim=2)
        return full[:, :height, :width]


def _spatial(x: Tensor, op: str, min_dim: int = 3) -> tuple[int, int]:
    """``(H, W)`` of a ``[B, H, W]`` or ``[B, C, H, W]`` tensor, or a ConfigError."""
    if not min_dim <= x.dim() <= 4:
        expected = "[B, C, H, W] or [B, H, W]" if min_dim == 3 else "[..., H, W]"
        raise ConfigError(f"PatchGrid.{op}: expected {expected}, got shape {tuple(x.shape)}")
    return int(x.shape[-2]), int(x.shape[-1])


def pad_to(x: Tensor, height: int, width: int, mode: str = "reflect", value: float = 0
           ) -> Tensor:
    """``x [..., H, W]`` padded at the bottom and right to ``height x width`` (at least its
    size): mirrored (``reflect``, periodically when the pad is longer than the side),
    ``replicate`` or ``constant`` (``value``); any dtype."""
    h, w = x.shape[-2:]
    if (height, width) == (h, w):
        return x
    if mode == "constant":
        out = x.new_full((*x.shape[:-2], height, width), value)
        out[..., :h, :w] = x
        return out
    # A gather along each axis works for every dtype (F.pad's reflect and replicate modes
    # refuse integer label maps).
    return (x.index_select(-2, _pad_index(h, height, mode, x.device))
            .index_select(-1, _pad_index(w, width, mode, x.device)))


def _pad_index(size: int, padded: int, mode: str, device: torch.device) -> Tensor:
    """Source index of every output position ``0..padded-1`` along one axis of length ``size``."""
    idx = torch.arange(padded, device=device)
    if mode == "replicate" or size == 1:
        return idx.clamp(max=size - 1)
    # reflect: the sequence 0, 1, .., size-1, size-2, .., 1 repeats with period 2 * (size - 1).
    period = 2 * (size - 1)
    idx = idx % period
    return torch.where(idx < size, idx, period - idx)
