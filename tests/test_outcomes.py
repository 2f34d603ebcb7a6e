"""PatchOutcomes' cache of the pool's outcomes: stage 2, calibration and the report score
the same frozen pool on the same splits, and compute it once."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from paser.data import Tensors
from paser.outcomes import PatchOutcomes, viewed
from paser.patches import PatchGrid
from paser.routing import Router

CPU = torch.device("cpu")


def _router(cache) -> Router:
    torch.manual_seed(0)
    pool = [nn.Conv2d(1, 3, 3, padding=1), nn.Conv2d(1, 3, 1)]
    router = Router(nn.Conv2d(1, 3, 1), nn.Identity(), pool, PatchGrid(2, 2), 1,
                    mc_dropout="none").eval()
    router.outcome_cache = cache
    return router


def _split() -> Tensors:
    gen = torch.Generator().manual_seed(1)
    return Tensors(torch.rand(3, 1, 8, 8, generator=gen),
                   torch.randint(0, 3, (3, 8, 8), generator=gen).byte(), ["a", "b", "c"])


def _fields(o: PatchOutcomes) -> list[torch.Tensor]:
    return [o.state, o.inter, o.union, o.entropy, o.nll]


def test_the_pool_runs_once_per_pool_and_split(tmp_path, monkeypatch):
    router, split = _router(tmp_path), _split()
    uncached = _fields(PatchOutcomes.build(_router(None), split, 3, 2, CPU, mc_seed=0))
    first = PatchOutcomes.build(router, split, 3, 2, CPU, mc_seed=0)
    assert len(list(tmp_path.iterdir())) == 1
    for a, b in zip(_fields(first), uncached, strict=True):
        assert torch.equal(a, b)

    def refuse(*_):
        raise AssertionError("the pool ran although its outcomes were kept")

    monkeypatch.setattr(router, "run_local", refuse)
    again = PatchOutcomes.build(router, split, 3, 2, CPU, mc_seed=0)
    for a, b in zip(_fields(again), uncached, strict=True):
        assert torch.equal(a, b)  # f0 still runs: its entries (and the state) are its own
    monkeypatch.undo()

    # another view of the images, or other weights, are other outcomes: computed, kept apart
    PatchOutcomes.build(router, viewed(split, 1), 3, 2, CPU, mc_seed=0)
    with torch.no_grad():
        router.pool[0].bias[0].add_(1.0)  # one class's logit: the same on all would cancel
    changed = PatchOutcomes.build(router, split, 3, 2, CPU, mc_seed=0)
    assert len(list(tmp_path.iterdir())) == 3
    assert not torch.equal(changed.nll[:, :, 1], first.nll[:, :, 1])
    assert torch.equal(changed.nll[:, :, 2], first.nll[:, :, 2])


def test_a_folder_one_cannot_write_to_only_costs_time(tmp_path):
    blocked = tmp_path / "file"
    blocked.write_text("not a folder")
    out = PatchOutcomes.build(_router(blocked / "cache"), _split(), 3, 2, CPU, mc_seed=0)
    assert out.inter.shape == (3, 4, 3, 3)


def test_the_papers_run_in_a_run_shares_its_outcome_cache(tmp_path):
    """PaSeR (paper) trains on the run's own stage-1 pool in ``<run>/paper``: it reads the
    pool's outcomes the run computed (named by the pool's weights and the images, so a
    pool fine-tuned there names others); a folder called paper that is not in a run keeps
    its own."""
    from paser.checkpoints import outcome_cache

    run = tmp_path / "run"
    (run / "checkpoints").mkdir(parents=True)
    (run / "config.yaml").write_text("seed: 0\n")
    assert outcome_cache(run) == run / "cache" / "outcomes"
    assert outcome_cache(run / "paper") == run / "cache" / "outcomes"
    assert outcome_cache(tmp_path / "paper") == tmp_path / "paper" / "cache" / "outcomes"
    assert outcome_cache(run / "other") == run / "other" / "cache" / "outcomes"


class _Constant(nn.Module):
    """Logits ``logits`` [C] at every pixel, whatever the image."""

    def __init__(self, logits: list[float]):
        super().__init__()
        self.register_buffer("logits", torch.tensor(logits))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.logits[None, :, None, None].expand(x.shape[0], -1, *x.shape[-2:])


def test_outcomes_by_hand_on_an_image_the_grid_does_not_divide():
    # f0 says class 0 everywhere, f1 class 1, f2 class 2, with known probabilities; a 5 x 7
    # image on a 2 x 2 grid is padded to 6 x 8 (patches of 3 x 4): the padding is no label
    logits = [[2.0, 0.0, 0.0], [0.0, 1.0, 0.0], [0.0, 0.0, 3.0]]
    router = Router(_Constant(logits[0]), nn.Identity(), [_Constant(v) for v in logits[1:]],
                    PatchGrid(2, 2), 1, mc_dropout="none").eval()
    mask = torch.tensor([[0, 0, 1, 1, 2, 2, 2],
                         [0, 0, 1, 1, 2, 2, 2],
                         [255, 255, 255, 1, 2, 2, 2],  # unlabelled pixels (MASK_IGNORE)
                         [0, 1, 2, 0, 1, 2, 0],
                         [255, 255, 255, 255, 255, 255, 255]], dtype=torch.uint8)
    split = Tensors(torch.zeros(1, 1, 5, 7), mask[None], ["a"])
    out = PatchOutcomes.build(router, split, 3, 1, CPU, mc_seed=0)
    log_p = torch.log_softmax(torch.tensor(logits), 1)  # [action, class]
    padded = torch.full((6, 8), -1)
    padded[:5, :7] = mask.long().masked_fill(mask == 255, -1)
    for p, (r, c) in enumerate([(0, 0), (0, 4), (3, 0), (3, 4)]):
        y = padded[r:r + 3, c:c + 4]
        y = y[y >= 0]
        for a in range(3):
            for cls in range(3):
                truth = (y == cls).sum()  # a model that says cls everywhere: all is union
                assert out.inter[0, p, a, cls] == (truth if cls == a else 0)
                assert out.union[0, p, a, cls] == (len(y) if cls == a else truth)
            nll = -log_p[a][y].mean() if len(y) else torch.tensor(0.0)
            assert out.nll[0, p, a] == pytest.approx(float(nll), abs=1e-6)
    # patch 3 (rows 3-5, columns 4-7) holds 3 labelled pixels of row 3: 1, 2, 0
    assert out.union[0, 3, 0].tolist() == [3, 1, 1] and out.inter[0, 3, 0].tolist() == [1, 0, 0]


def test_a_patch_with_no_labelled_pixel_scores_zero_under_every_action():
    router = _router(None)
    gen = torch.Generator().manual_seed(2)
    masks = torch.randint(0, 3, (2, 8, 8), generator=gen).byte()
    masks[1, :4, :4] = 255  # image 1's first patch is all unlabelled
    out = PatchOutcomes.build(router, Tensors(torch.rand(2, 1, 8, 8, generator=gen), masks,
                                              ["a", "b"]), 3, 2, CPU, mc_seed=0)
    assert out.union[1, 0].sum() == 0
    assert out.patch_iou()[1, 0].tolist() == [0.0, 0.0, 0.0]
    assert out.gain()[1, 0].tolist() == [0.0, 0.0, 0.0]
    assert out.nll[1, 0].tolist() == [0.0, 0.0, 0.0]
    assert torch.isfinite(out.patch_iou()).all() and (out.patch_iou()[0] > 0).all()
