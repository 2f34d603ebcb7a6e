"""A split as the stages see it: images and labels in memory or read from disk as batches
are asked for (:class:`Tensors`), and the five splits of a run (:class:`StageData`)."""

from __future__ import annotations

from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass

import torch
from torch.utils.data import DataLoader, Dataset

from paser.data.battery import MASK_IGNORE, SegmentationFiles
from paser.errors import DataError
from paser.runtime import detached_readers, from_readers, worker_context

#: Unlabelled pixels: stored as MASK_IGNORE (255) in uint8 masks, IGNORE (-1) in the int64
#: labels that losses (``ignore_index=-1``) and metrics (:class:`paser.metrics.IoUAccumulator`)
#: skip.
IGNORE = -1


def labels(masks: torch.Tensor) -> torch.Tensor:
    """uint8 masks -> int64 labels, :data:`MASK_IGNORE` becoming :data:`IGNORE`."""
    out = masks.long()
    return out.masked_fill_(out == MASK_IGNORE, IGNORE)


class OnDisk:
    """The images or the masks of a split on disk, indexed like the tensor they would make:
    ``column[index]`` (an int, a slice, a list or a tensor of positions) reads those files
    and stacks them; ``shape`` and ``len`` need no reading. ``read(i)`` gives the item at
    the dataset's position ``i``; ``rows`` are this view's positions in the dataset."""

    def __init__(self, read: Callable[[int], torch.Tensor], rows: torch.Tensor,
                 item_shape: tuple[int, ...], dtype: torch.dtype):
        self.read, self.rows = read, rows
        self.item_shape, self.dtype = tuple(item_shape), dtype

    @property
    def shape(self) -> torch.Size:
        return torch.Size((len(self.rows), *self.item_shape))

    def __len__(self) -> int:
        return len(self.rows)

    def take(self, index) -> OnDisk:
        """A view of some rows, nothing read."""
        return OnDisk(self.read, self.rows[index].reshape(-1), self.item_shape, self.dtype)

    def __getitem__(self, index) -> torch.Tensor:
        if isinstance(index, int):
            return self.read(int(self.rows[index]))
        rows = self.rows[torch.as_tensor(index) if isinstance(index, list) else index]
        if not len(rows):
            return torch.empty((0, *self.item_shape), dtype=self.dtype)
        return torch.stack([self.read(int(r)) for r in rows.reshape(-1)]).to(self.dtype)


@dataclass
class Tensors:
    """A split: ``images`` float32 [N, C, H, W], ``masks`` uint8 [N, H, W]; optionally
    ``groups`` int64 [N], a known condition of each sample (noisy MNIST: its blur type)
    named by ``group_names``.

    ``images`` and ``masks`` are tensors in memory, or :class:`OnDisk` columns read when
    indexed (:func:`on_disk`). Either way, :meth:`batches` and :meth:`gather` give the
    batches to train and evaluate on; on disk, ``workers`` reader processes read them
    ahead of use, so only the batches in flight are in memory.
    """

    images: torch.Tensor | OnDisk
    masks: torch.Tensor | OnDisk
    ids: list[str]
    groups: torch.Tensor | None = None
    group_names: tuple[str, ...] = ()
    workers: int = 0

    def __len__(self) -> int:
        return len(self.ids)

    @property
    def streamed(self) -> bool:
        return isinstance(self.images, OnDisk)

    def subset(self, idx: list[int] | torch.Tensor) -> Tensors:
        index = torch.as_tensor(idx, dtype=torch.long)
        images, masks = ((c.take(index) if isinstance(c, OnDisk) else c[index])
                         for c in (self.images, self.masks))
        return Tensors(images, masks, [self.ids[i] for i in index.tolist()],
                       None if self.groups is None else self.groups[index], self.group_names,
                       self.workers)

    def in_groups(self, groups: list[int] | None, key: str = "groups") -> Tensors:
        """The samples whose group is in ``groups`` (all of them for ``None``)."""
        if groups is None:
            return self
        if self.groups is None:
            raise DataError(f"key '{key}': this dataset has no sample groups (noisy MNIST has: "
                            "its blur types); set it to null")
        bad = [g for g in groups if not 0 <= g < len(self.group_names)]
        if bad:
            raise DataError(f"key '{key}': groups {bad} do not exist; this dataset has "
                            + ", ".join(f"{i} {n}" for i, n in enumerate(self.group_names)))
        return self.subset(torch.isin(self.groups, torch.tensor(groups)).nonzero()[:, 0])

    def in_memory(self) -> Tensors:
        """The same split with every image and mask read (for code that edits pixels)."""
        if not self.streamed:
            return self
        return Tensors(self.images[:], self.masks[:], self.ids, self.groups, self.group_names)

    def batches(self, batch_size: int) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        """``(images [B, C, H, W], labels [B, H, W])`` in order; see :meth:`gather`."""
        return self.gather(torch.arange(len(self)).split(batch_size))

    def gather(self, index_batches: Iterable[torch.Tensor]
               ) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        """``(images, labels)`` of each batch of positions, in the order given: labels are
        int64 class indices with :data:`IGNORE` (-1) where the mask is unlabelled."""
        if not self.streamed:
            for idx in index_batches:
                yield self.images[idx], labels(self.masks[idx])
            return
        # A generator of its own: the loader's worker seed must not consume the global
        # generator, or streaming would change the dropout draws of what follows.
        # Readers start from a fork server, not a fork of this process: a fork taken
        # while another thread (gloo's, under multi-process training) holds a lock can
        # leave the reader waiting on that lock forever (seen: stage 1 on 2 processes hung).
        loader = DataLoader(_Columns(self.images, self.masks),
                            batch_sampler=[idx.tolist() for idx in index_batches],
                            num_workers=self.workers, collate_fn=_as_is,
                            generator=torch.Generator(), worker_init_fn=detached_readers(),
                            multiprocessing_context=worker_context(self.workers, ["paser.data"]))
        for batch in from_readers(loader, self.workers):
            if isinstance(batch, DataError):  # a bad file, found by a reader process
                raise batch
            yield batch[0], labels(batch[1])


class _Columns:
    """A map-style dataset whose batches :class:`OnDisk` columns read in one call."""

    def __init__(self, images: OnDisk, masks: OnDisk):
        self.images, self.masks = images, masks

    def __len__(self) -> int:
        return len(self.images)

    def __getitems__(self, idx: list[int]) -> tuple[torch.Tensor, torch.Tensor] | DataError:
        try:
            return self.images[idx], self.masks[idx]
        except DataError as err:  # handed back whole: the loader would wrap it in a traceback
            return err


def _as_is(batch):
    return batch


def to_tensors(dataset: Dataset) -> Tensors:
    """Stack a dataset into memory (masks as uint8: class indices < 256)."""
    items = [dataset[i] for i in range(len(dataset))]
    if not items:
        raise DataError("empty dataset")
    return Tensors(
        torch.stack([it["image"] for it in items]),
        torch.stack([it["mask"] for it in items]).to(torch.uint8),
        [it["id"] for it in items],
    )


def on_disk(dataset: SegmentationFiles, workers: int = 2) -> Tensors:
    """A dataset's split read from disk when its batches are asked for (nothing read now)."""
    rows = torch.arange(len(dataset))
    h, w = dataset.size
    return Tensors(OnDisk(dataset.image, rows, (dataset.channels, h, w), torch.float32),
                   OnDisk(dataset.mask, rows, (h, w), torch.uint8), dataset.ids,
                   workers=workers)


@dataclass
class StageData:
    """D_pre, D_rl, D_ft (three cuts of the training split), validation and test; and,
    where stage 1 crops its tiles at random (``stage1.crop_margin``), D_pre's tiles with
    ``margin`` pixels of their image around them (``pre_around``); where the router learns
    from random crops too (``stage2.crops``), D_rl's and D_ft's with ``router_margin``."""

    pre: Tensors
    rl: Tensors
    ft: Tensors
    validation: Tensors
    test: Tensors
    pre_around: Tensors | None = None
    margin: int = 0
    rl_around: Tensors | None = None
    ft_around: Tensors | None = None
    router_margin: int = 0


