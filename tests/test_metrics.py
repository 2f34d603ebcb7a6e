"""IoU: hand-computed examples, patches, ignore_index, and agreement with torchmetrics."""

from __future__ import annotations

import math

import pytest
import torch

from paser.errors import ConfigError, DataError
from paser.metrics import (
    IoUAccumulator,
    confusion_counts,
    dataset_miou,
    iou_per_gflop,
    iou_per_image,
    predicted_classes,
)
from paser.patches import PatchGrid

# torchmetrics is imported in the three tests that compare with it: importing it loads
# torchvision, scipy.signal and its audio metrics (about 2.5 s), which every pytest worker
# paid while collecting, whichever tests it went on to run.

# Image A, 3 classes. Per class (target count, pred count, intersection, union):
#   0: 4, 4, 3, 5 -> 3/5;  1: 6, 6, 5, 7 -> 5/7;  2: 6, 6, 5, 7 -> 5/7.
#   mean = (3/5 + 5/7 + 5/7) / 3 = 71/105.
TARGET_A = [
    [0, 0, 1, 1],
    [0, 0, 1, 1],
    [2, 2, 1, 1],
    [2, 2, 2, 2],
]
PRED_A = [
    [0, 0, 1, 1],
    [0, 1, 1, 1],
    [2, 2, 2, 1],
    [2, 2, 2, 0],
]
# Image B: class 2 is absent from both maps and left out of the mean.
#   0: 15, 16, 15, 16 -> 15/16;  1: 1, 0, 0, 1 -> 0.  mean = (15/16 + 0) / 2 = 15/32.
TARGET_B = [[0] * 4, [0] * 4, [0, 1, 0, 0], [0] * 4]
PRED_B = [[0] * 4] * 4


def _pair() -> tuple[torch.Tensor, torch.Tensor]:
    return torch.tensor([PRED_A, PRED_B]), torch.tensor([TARGET_A, TARGET_B])


def test_confusion_counts_hand_example():
    pred, target = _pair()
    inter, union, present = confusion_counts(pred, target, 3)
    assert inter.tolist() == [[3, 5, 5], [15, 0, 0]]
    assert union.tolist() == [[5, 7, 7], [16, 1, 0]]
    assert present.tolist() == [[True, True, True], [True, True, False]]
    assert inter.dtype == union.dtype == torch.int64


def test_iou_per_image_hand_example():
    pred, target = _pair()
    iou = iou_per_image(pred, target, 3)
    assert iou.shape == (2,)
    assert iou.tolist() == pytest.approx([71 / 105, 15 / 32], abs=1e-7)


def test_iou_per_patch_hand_example():  # a patch's IoU: its image's rule on the patch
    # Image A in a 2x2 grid of 2x2 patches:
    #   p0 target 0000, pred 0001: class 0 3/4, class 1 0/1 -> 3/8
    #   p1 all 1 in both -> 1;  p2 all 2 in both -> 1
    #   p3 target 11/22, pred 21/20: class 0 0/1, class 1 1/2, class 2 1/3 -> 5/18
    pred, target = _pair()
    grid = PatchGrid(2, 2)
    iou = iou_per_image(grid.split(pred[:1]), grid.split(target[:1]), 3)
    assert iou.tolist() == pytest.approx([3 / 8, 1.0, 1.0, 5 / 18], abs=1e-7)
    # A 1x1 grid is the whole image.
    whole = iou_per_image(PatchGrid(1, 1).split(pred), PatchGrid(1, 1).split(target), 3)
    assert whole.tolist() == pytest.approx([71 / 105, 15 / 32], abs=1e-7)


def test_iou_per_patch_matches_explicit_crops_non_divisible():
    gen = torch.Generator().manual_seed(1)
    pred = torch.randint(0, 4, (3, 10, 14), generator=gen)
    target = torch.randint(0, 4, (3, 10, 14), generator=gen)
    target[0, :3, :4] = 255  # patch 0 of image 0 has no valid pixel -> NaN
    grid = PatchGrid(4, 4)  # padded 12 x 16, patches 3 x 4; padding labelled ignored
    split = (grid.split(grid.pad(m, mode="constant", value=255)) for m in (pred, target))
    iou = iou_per_image(*split, 4, ignore_index=255).view(3, 16)
    assert math.isnan(iou[0, 0].item())
    for b in range(3):
        for p in range(16):
            r, k = divmod(p, 4)
            rows, cols = slice(3 * r, min(3 * r + 3, 10)), slice(4 * k, min(4 * k + 4, 14))
            expected = iou_per_image(
                pred[b : b + 1, rows, cols], target[b : b + 1, rows, cols], 4, 255
            )
            torch.testing.assert_close(iou[b, p], expected[0], equal_nan=True)


def test_ignore_index_out_of_range():
    # Ignoring A's pixels (1,1) (target 0, pred 1) and (3,3) (target 2, pred 0):
    #   0: 3/3;  1: 5/6;  2: 5/6  -> (1 + 5/6 + 5/6) / 3 = 8/9.
    pred = torch.tensor([PRED_A])
    target = torch.tensor([TARGET_A])
    target[0, 1, 1] = target[0, 3, 3] = 255
    inter, union, _ = confusion_counts(pred, target, 3, ignore_index=255)
    assert inter.tolist() == [[3, 5, 5]] and union.tolist() == [[3, 6, 6]]
    assert iou_per_image(pred, target, 3, ignore_index=255).item() == pytest.approx(8 / 9)
    # Without ignore_index the 255 is an invalid class.
    with pytest.raises(DataError, match=r"\[0, 2\].*255"):
        iou_per_image(pred, target, 3)


def test_ignore_index_that_is_a_class():
    from torchmetrics.functional.classification import multiclass_jaccard_index

    # ignore_index=0 on A: target-0 pixels are dropped and class 0 leaves the mean;
    #   1: 5/6;  2: 5/7 (the valid pixel (3,3) predicted 0 still misses class 2) -> 65/84.
    pred, target = torch.tensor([PRED_A]), torch.tensor([TARGET_A])
    inter, union, present = confusion_counts(pred, target, 3, ignore_index=0)
    assert inter.tolist() == [[0, 5, 5]] and union.tolist() == [[0, 6, 7]]
    assert present.tolist() == [[False, True, True]]
    iou = iou_per_image(pred, target, 3, ignore_index=0)
    assert iou.item() == pytest.approx(65 / 84)
    ref = multiclass_jaccard_index(pred, target, 3, average="macro", ignore_index=0)
    assert iou.item() == pytest.approx(ref.item(), abs=1e-6)


def test_region_without_valid_pixels_is_nan():
    pred = torch.zeros(2, 4, 4, dtype=torch.long)
    target = torch.zeros(2, 4, 4, dtype=torch.long)
    target[1] = 255
    iou = iou_per_image(pred, target, 3, ignore_index=255)
    assert iou[0].item() == 1.0 and math.isnan(iou[1].item())


def _random_batch(gen, n, c, size=(16, 20), ignore_index=None):
    # Each image uses only its first k classes so that some classes are absent.
    k = torch.randint(1, c + 1, (n, 1, 1), generator=gen)
    pred = (torch.rand(n, *size, generator=gen) * k).long()
    target = (torch.rand(n, *size, generator=gen) * k).long()
    if ignore_index is not None:
        target[torch.rand(n, *size, generator=gen) < 0.2] = ignore_index
    return pred, target


@pytest.mark.parametrize(("num_classes", "ignore_index"), [(3, None), (5, None), (4, 255), (4, 1)])
def test_per_image_matches_torchmetrics_macro(num_classes, ignore_index):
    """``iou_per_image`` == multiclass_jaccard_index(average="macro") on each image."""
    from torchmetrics.functional.classification import multiclass_jaccard_index

    gen = torch.Generator().manual_seed(num_classes)
    pred, target = _random_batch(gen, 8, num_classes, ignore_index=ignore_index)
    ours = iou_per_image(pred, target, num_classes, ignore_index=ignore_index)
    ref = torch.stack(
        [
            multiclass_jaccard_index(p, t, num_classes, average="macro", ignore_index=ignore_index)
            for p, t in zip(pred, target, strict=True)
        ]
    )
    torch.testing.assert_close(ours, ref, atol=1e-6, rtol=0)


@pytest.mark.parametrize(("num_classes", "ignore_index"), [(3, None), (5, 255), (4, 0)])
def test_accumulator_matches_torchmetrics_streaming(num_classes, ignore_index):
    """Dataset mIoU == MulticlassJaccardIndex(average="macro") over the stream; per class ==
    average="none" on the classes seen (torchmetrics gives 0 where we give NaN)."""
    from torchmetrics.classification import MulticlassJaccardIndex

    gen = torch.Generator().manual_seed(10 + num_classes)
    acc = IoUAccumulator(num_classes, ignore_index=ignore_index)
    macro = MulticlassJaccardIndex(num_classes, average="macro", ignore_index=ignore_index)
    per_class = MulticlassJaccardIndex(num_classes, average="none", ignore_index=ignore_index)
    for _ in range(4):
        pred, target = _random_batch(gen, 3, num_classes, ignore_index=ignore_index)
        acc.update(pred, target)
        macro.update(pred, target)
        per_class.update(pred, target)
    result = acc.compute()
    assert result["miou"] == pytest.approx(macro.compute().item(), abs=1e-6)
    ref = per_class.compute().tolist()
    for ours, theirs, union in zip(result["per_class"], ref, result["union"], strict=True):
        if union > 0:
            assert ours == pytest.approx(theirs, abs=1e-6)
        else:
            assert math.isnan(ours) and theirs == 0.0
    assert result["images"] == 12


def test_accumulator_hand_example_and_reset():
    # A + B: class 0 (3+15)/(5+16) = 6/7, class 1 5/8, class 2 5/7 -> 41/56.
    pred, target = _pair()
    acc = IoUAccumulator(3)
    acc.update(pred[:1], target[:1])
    acc.update(pred[1:], target[1:])
    result = acc.compute()
    assert result["intersection"] == [18, 5, 5] and result["union"] == [21, 8, 7]
    assert result["miou"] == pytest.approx(41 / 56)
    assert result["per_class"] == pytest.approx([6 / 7, 5 / 8, 5 / 7])
    assert result["image_miou"] == pytest.approx((71 / 105 + 15 / 32) / 2)
    # an image with no labelled pixel adds to no count, and its NaN IoU is skipped
    acc.update(pred[:1], torch.full_like(target[:1], -1))
    again = acc.compute()
    assert again["union"] == [21, 8, 7] and again["images"] == 3
    assert again["image_miou"] == pytest.approx((71 / 105 + 15 / 32) / 2)
    assert dataset_miou(torch.tensor([18, 5, 5]), torch.tensor([21, 8, 7])) == pytest.approx(
        41 / 56
    )
    acc.reset()
    empty = acc.compute()
    assert math.isnan(empty["miou"]) and empty["images"] == 0


def test_dataset_miou_skips_classes_without_union():
    assert dataset_miou([1, 0, 3], [2, 0, 4]) == pytest.approx((0.5 + 0.75) / 2)
    assert math.isnan(dataset_miou([0, 0], [0, 0]))
    with pytest.raises(DataError):
        dataset_miou([1, 2], [3])


def test_iou_per_gflop():
    assert iou_per_gflop(0.9, 0.6) == pytest.approx(1.5)
    with pytest.raises(ConfigError):
        iou_per_gflop(0.9, 0.0)


def test_input_errors():
    pred, target = _pair()
    with pytest.raises(DataError, match="argmax"):
        iou_per_image(torch.zeros(2, 3, 4, 4), target, 3)
    with pytest.raises(DataError, match="same shape"):
        iou_per_image(pred[:1], target, 3)
    with pytest.raises(DataError, match="class indices"):
        iou_per_image(pred, target, 2)
    with pytest.raises(ConfigError):
        iou_per_image(pred, target, 0)
    # uint8 labels are fine.
    assert iou_per_image(pred.to(torch.uint8), target.to(torch.uint8), 3).tolist() == pytest.approx(
        [71 / 105, 15 / 32]
    )


def test_predicted_classes_is_argmax_with_first_class_on_ties():
    scores = torch.randn(2, 3, 5, 7, generator=torch.Generator().manual_seed(0))
    assert torch.equal(predicted_classes(scores), scores.argmax(1))
    ties = torch.tensor([[1.0, 1.0, 0.0], [0.0, 2.0, 2.0], [3.0, 3.0, 3.0]])  # [B=3, C=3]
    assert predicted_classes(ties[..., None, None]).flatten().tolist() == [0, 1, 0]
