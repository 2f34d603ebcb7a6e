"""benchmarks/router_probe.py's dense target: every pixel's first-order effect on the
split's mIoU, which adds up over a patch to the report's patch gain."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from paser.outcomes import PatchOutcomes


@pytest.fixture()
def probe(monkeypatch):
    monkeypatch.syspath_prepend(str(Path(__file__).resolve().parents[1] / "benchmarks"))
    import router_probe

    return router_probe


def test_pixel_gain_by_hand(probe):
    # one 2 x 2 image, classes 0 and 1; f0 gets pixel (0, 1) wrong, f1 gets it right
    label = torch.tensor([[[0, 0], [1, 1]]])
    pred = torch.tensor([[[[0, 1], [1, 1]], [[0, 0], [1, 1]]]])  # [N, K+1, H, W]
    gain = probe.pixel_gain(label, pred, 2)
    # f0's totals: class 0 I = 1, U = 2; class 1 I = 2, U = 3. Pixel (0, 1) adds 1 to
    # class 0's intersection (1 / U_0) and takes 1 from class 1's union (+ I_1 / U_1^2)
    assert gain.shape == (1, 1, 2, 2)
    assert gain[0, 0, 0, 1].item() == pytest.approx(1 / 2 + 2 / 9)
    assert gain[0, 0].flatten()[[0, 2, 3]].tolist() == [0, 0, 0]


def test_pixel_gains_add_up_to_the_patch_gains(probe):
    from paser.metrics import confusion_counts

    g = torch.Generator().manual_seed(0)
    n, ncls, side, k = 3, 3, 8, 2
    label = torch.randint(0, ncls, (n, side, side), generator=g)
    label[0, :2] = -1  # unlabelled pixels count nowhere
    pred = torch.randint(0, ncls, (n, k + 1, side, side), generator=g)
    pred[:, 1:] = torch.where(torch.rand(n, k, side, side, generator=g) < 0.5,
                              label[:, None].clamp_min(0), pred[:, 1:])
    outcomes = probe.block_outcomes({"label": label, "pred": pred}, 4, ncls,
                                    torch.zeros(n, 1, side, side))
    assert outcomes.inter.shape == (n, 4, k + 1, ncls)
    # the block counts are the counts of each 4 x 4 block
    counts = confusion_counts(pred[1, 2, 4:, :4][None], label[1, 4:, :4][None], ncls,
                              ignore_index=-1)
    assert torch.equal(outcomes.inter[1, 2, 2], counts[0][0])
    assert torch.equal(outcomes.union[1, 2, 2], counts[1][0])
    per_patch = probe.block_sums(probe.pixel_gain(label, pred, ncls), 4)  # [N, P, K]
    present = (outcomes.union[:, :, 0].sum((0, 1)) > 0).sum()
    scale = n * 4 / present
    expected = PatchOutcomes.dataset_gain(outcomes)[..., 1:]
    assert torch.allclose(per_patch * scale, expected, atol=1e-5)
