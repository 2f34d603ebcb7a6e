"""Vectorised intersection-over-union for images, patches and whole datasets.

Definitions (the same at every level):

- For a region (an image or a patch) and a class ``c``, over the region's *valid*
  pixels (those whose target is not ``ignore_index``):
  ``intersection = #(pred == c and target == c)`` and
  ``union = #(pred == c or target == c)``.
- A class is *present* in a region when its union is > 0, i.e. it occurs in the
  prediction or in the label there. The IoU of a region is the mean of
  ``intersection / union`` over its present classes; classes absent from both
  are left out of the mean (they are neither right nor wrong).
- A region with no valid pixel has no present class: its IoU is **NaN**. That
  only happens with ``ignore_index`` (a patch of the padding, labelled so, too); callers
  aggregate with ``nanmean`` or filter. A patch's IoU is its image's rule on the patch:
  ``iou_per_image(grid.split(pred), grid.split(target), ...)``.
- ``ignore_index`` drops the pixels whose *target* equals it, whatever was
  predicted there. If it is also a class index (``0 <= ignore_index < C``) that
  class is dropped too: its counts are zero and it is never present. This is
  ``torchmetrics``' convention; ``iou_per_image`` equals
  ``torchmetrics.functional.classification.multiclass_jaccard_index(...,
  average="macro")`` applied to each image, and :class:`IoUAccumulator` equals
  ``MulticlassJaccardIndex(average="macro")`` over the whole stream.

Everything is one ``torch.bincount`` over ``image * C * C + target * C + pred``:
no Python loop over images, patches or pixels.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch
from torch import Tensor

from paser.errors import ConfigError, DataError

__all__ = [
    "IoUAccumulator",
    "confusion_counts",
    "dataset_miou",
    "iou_per_gflop",
    "iou_per_image",
    "predicted_classes",
]


def predicted_classes(scores: Tensor) -> Tensor:
    """The class map ``[B, H, W]`` of scores (probabilities or logits) ``[B, C, H, W]``.

    ``scores.max(1).indices``, which is ``scores.argmax(1)`` (ties go to the first class
    in both) but much faster on CPU, where ``argmax`` over a non-innermost dimension takes
    a slow generic path (measured in docs/benchmarks.md).
    """
    return scores.max(1).indices


def _check_inputs(pred: Tensor, target: Tensor, num_classes: int) -> None:
    if isinstance(num_classes, bool) or not isinstance(num_classes, int) or num_classes < 1:
        raise ConfigError(f"num_classes={num_classes!r}: must be an integer >= 1")
    # dtype first: float logits [N, C, H, W] also have the wrong shape, the dtype says why.
    for name, t in (("pred", pred), ("target", target)):
        if t.is_floating_point() or t.is_complex() or t.dtype == torch.bool:
            hint = "; for logits [N, C, H, W] pass logits.argmax(1)" if name == "pred" else ""
            raise DataError(f"{name} must hold integer class indices, got dtype {t.dtype}{hint}")
    if pred.shape != target.shape or pred.dim() < 2:
        raise DataError(
            f"pred and target must both be class-index maps [N, H, W] of the same shape, got "
            f"pred {tuple(pred.shape)} and target {tuple(target.shape)}"
        )


def _counts(
    pred: Tensor, target: Tensor, num_classes: int, valid: Tensor | None
) -> tuple[Tensor, Tensor]:
    """Per-region intersection and union ``[N, C]`` (int64) over the pixels where ``valid``.

    ``pred``, ``target``, ``valid``: ``[N, ...]``; ``valid`` is bool or None (all valid).
    """
    n, c = pred.shape[0], num_classes
    pred = pred.reshape(n, -1).long()
    target = target.reshape(n, -1).long()
    bad = (pred < 0) | (pred >= c) | (target < 0) | (target >= c)
    if valid is not None:
        valid = valid.reshape(n, -1)
        bad &= valid
    if bool(bad.any()):
        found = torch.cat([pred[bad], target[bad]]).unique()[:10].tolist()
        raise DataError(
            f"class indices must be in [0, {c - 1}] (num_classes={c}), found {found} "
            "(pass ignore_index for an unlabelled value)"
        )
    # One bincount over (region, target, pred) triples gives every per-region confusion matrix.
    region = torch.arange(n, device=pred.device).unsqueeze(1)
    code = (region * c + target) * c + pred
    if valid is not None:
        code = code[valid]
    conf = torch.bincount(code.reshape(-1), minlength=n * c * c).reshape(n, c, c)
    intersection = conf.diagonal(dim1=1, dim2=2).clone()
    union = conf.sum(dim=1) + conf.sum(dim=2) - intersection
    return intersection, union


def confusion_counts(
    pred: Tensor, target: Tensor, num_classes: int, ignore_index: int | None = None
) -> tuple[Tensor, Tensor, Tensor]:
    """Per-image, per-class intersection and union pixel counts.

    Args:
        pred: ``[N, H, W]`` predicted class indices (any integer dtype).
        target: ``[N, H, W]`` label class indices, or ``ignore_index``.
        num_classes: ``C``; indices must lie in ``[0, C)`` wherever the target is valid.
        ignore_index: target value whose pixels are dropped (see the module docstring).

    Returns:
        ``(intersection, union, present)``, each ``[N, C]``: int64 pixel counts and a bool
        mask ``union > 0``.

    Raises:
        DataError: shapes differ, float inputs (logits), or an index outside ``[0, C)``.
    """
    _check_inputs(pred, target, num_classes)
    valid = None if ignore_index is None else target != ignore_index
    intersection, union = _counts(pred, target, num_classes, valid)
    if ignore_index is not None and 0 <= ignore_index < num_classes:
        # Its target pixels are gone but predictions of it remain in the union; drop the class.
        intersection[:, ignore_index] = 0
        union[:, ignore_index] = 0
    return intersection, union, union > 0


def _region_iou(intersection: Tensor, union: Tensor) -> Tensor:
    """``[N, C]`` counts -> ``[N]`` mean IoU over present classes; NaN where none is present."""
    present = union > 0
    ratio = intersection.double() / union.clamp(min=1).double()
    # 0 / 0 -> NaN for a region without any present class, as documented.
    mean = (ratio * present).sum(dim=1) / present.sum(dim=1)
    return mean.to(torch.get_default_dtype())


def iou_per_image(
    pred: Tensor, target: Tensor, num_classes: int, ignore_index: int | None = None
) -> Tensor:
    """Mean IoU of each image over the classes present in its prediction or label.

    Args: as :func:`confusion_counts`.

    Returns:
        ``[N]`` floats (default dtype) in ``[0, 1]``; NaN for an image without valid pixels.
    """
    intersection, union, _ = confusion_counts(pred, target, num_classes, ignore_index)
    return _region_iou(intersection, union)


def dataset_miou(
    intersection_sum: Tensor | Sequence[int], union_sum: Tensor | Sequence[int]
) -> float:
    """Dataset-level mIoU from per-class counts summed over all images (or batches).

    Args:
        intersection_sum, union_sum: ``[C]`` pixel counts, e.g. ``confusion_counts(...)[0]
            .sum(0)`` accumulated over a stream. Counts add up across images, so this is the
            IoU of the dataset seen as one big image.

    Returns:
        Mean of ``intersection / union`` over the classes with ``union > 0``; NaN if none.
    """
    inter = torch.as_tensor(intersection_sum, dtype=torch.float64).reshape(-1)
    union = torch.as_tensor(union_sum, dtype=torch.float64).reshape(-1)
    if inter.shape != union.shape:
        raise DataError(
            f"dataset_miou: intersection has {inter.numel()} classes, union {union.numel()}"
        )
    present = union > 0
    if not bool(present.any()):
        return math.nan
    return float((inter[present] / union[present]).mean())


class IoUAccumulator:
    """Streaming IoU: add batches with :meth:`update`, read the result with :meth:`compute`.

    Counts are kept as int64 on the CPU, so memory does not grow with the dataset.

    Args:
        num_classes, ignore_index: as :func:`confusion_counts`; by default -1, the label
            of unlabelled pixels (:data:`paser.data.IGNORE`).
        keep_images: also keep each image's counts (:meth:`image_counts`), ``[N, C]``
            integers, for resampling the images (:func:`paser.frontier.bootstrap`).
    """

    def __init__(self, num_classes: int, ignore_index: int | None = -1,
                 keep_images: bool = False):
        if isinstance(num_classes, bool) or not isinstance(num_classes, int) or num_classes < 1:
            raise ConfigError(f"num_classes={num_classes!r}: must be an integer >= 1")
        self.num_classes = num_classes
        self.ignore_index = ignore_index
        self.keep_images = keep_images
        self.reset()

    def reset(self) -> None:
        """Forget everything seen so far."""
        self.intersection = torch.zeros(self.num_classes, dtype=torch.int64)
        self.union = torch.zeros(self.num_classes, dtype=torch.int64)
        self.images = 0
        self._image_iou_sum = 0.0
        self._image_iou_count = 0
        self._per_image: list[tuple[Tensor, Tensor]] = []

    def update(self, pred: Tensor, target: Tensor) -> None:
        """Add a batch: ``pred``, ``target`` ``[N, H, W]`` class indices."""
        inter, union, _ = confusion_counts(pred, target, self.num_classes, self.ignore_index)
        self.intersection += inter.sum(dim=0).cpu()
        self.union += union.sum(dim=0).cpu()
        if self.keep_images:
            self._per_image.append((inter.cpu(), union.cpu()))
        per_image = _region_iou(inter, union)
        finite = ~per_image.isnan()
        self._image_iou_sum += float(per_image[finite].double().sum())
        self._image_iou_count += int(finite.sum())
        self.images += pred.shape[0]

    def compute(self) -> dict:
        """Return the metrics of everything seen since the last :meth:`reset`.

        Returns:
            ``miou``: dataset-level mIoU (:func:`dataset_miou`);
            ``per_class``: ``C`` IoUs, NaN for a class never present;
            ``image_miou``: mean of the per-image IoUs (:func:`iou_per_image`), images without
            valid pixels skipped; ``intersection``, ``union``: the ``C`` summed pixel counts;
            ``images``: images seen. NaN values where nothing was seen.
        """
        union = self.union.double()
        per_class = torch.where(
            union > 0, self.intersection.double() / union.clamp(min=1), math.nan
        )
        image_miou = (
            self._image_iou_sum / self._image_iou_count if self._image_iou_count else math.nan
        )
        return {
            "miou": dataset_miou(self.intersection, self.union),
            "per_class": per_class.tolist(),
            "image_miou": image_miou,
            "intersection": self.intersection.tolist(),
            "union": self.union.tolist(),
            "images": self.images,
        }


    def image_counts(self) -> tuple[Tensor, Tensor]:
        """Each image's intersection and union counts ``[N, C]`` (``keep_images``)."""
        if not self.keep_images:
            raise RuntimeError("image_counts needs IoUAccumulator(keep_images=True)")
        if not self._per_image:
            empty = torch.zeros(0, self.num_classes, dtype=torch.int64)
            return empty, empty.clone()
        inter, union = zip(*self._per_image, strict=True)
        return torch.cat(inter), torch.cat(union)


def iou_per_gflop(iou: float, gflops: float) -> float:
    """Efficiency: IoU points per GFLOP (``iou / gflops``), e.g. ``0.9 / 0.6 = 1.5``.

    ``gflops`` is the forward cost in GFLOP (1e9 FLOPs, :data:`paser.cost.FLOP_CONVENTION`).
    """
    if not math.isfinite(gflops) or gflops <= 0:
        raise ConfigError(f"iou_per_gflop: gflops={gflops} must be a finite number > 0")
    return float(iou) / float(gflops)


def reward(gain: torch.Tensor, cost: torch.Tensor | float, lam: float) -> torch.Tensor:
    """The paper's per-patch reward ``R = (1 - lam) * gain - lam * cost``, elementwise: an
    action's IoU gain over f0 on a patch and its cost ``c`` (``c(0) = 0``). Every reward,
    price and greedy choice of paser (stage 2, stage 3, the oracle, evaluation, a gain head
    at its price) is this function."""
    return (1 - lam) * gain - lam * cost
