"""Stage 2 learns: reward, TVD and schedules by hand, and policies that really change routing."""

import pytest
import torch

from paser.models import RoutingPolicy
from paser.outcomes import PatchOutcomes
from paser.train.policy import (
    fractions,
    greedy_actions,
    linear,
    policy_epoch,
    reward,
    tvd,
)


def test_reward_hand_values():
    patch_iou = torch.tensor([[[0.5, 0.7, 0.9], [0.8, 0.6, 0.8]]])  # [B=1, P=2, K+1=3]
    actions = torch.tensor([[2, 1]])
    cost = torch.tensor([0.0, 0.1, 0.8])
    r, gain, paid = reward(patch_iou, actions, cost, lam=0.5)
    assert gain[0].tolist() == pytest.approx([0.4, -0.2])
    assert paid[0].tolist() == pytest.approx([0.8, 0.1])
    assert r[0].tolist() == pytest.approx([0.5 * 0.4 - 0.5 * 0.8, 0.5 * -0.2 - 0.5 * 0.1])


def test_tvd_fractions_and_schedule_hand_values():
    assert tvd([0.5, 0.3, 0.2], [0.4, 0.4, 0.2]) == pytest.approx(0.1)
    assert tvd([1, 0, 0], [0, 0, 1]) == pytest.approx(1.0)
    assert fractions(torch.tensor([[0, 0, 2, 1]]), 3) == [0.5, 0.25, 0.25]
    assert [linear(0.7, 0.95, e, 3) for e in range(3)] == pytest.approx([0.7, 0.825, 0.95])


def test_cache_gives_exact_dataset_miou_and_patch_iou():
    # one image, two patches, two actions, two classes: counts chosen by hand
    inter = torch.tensor([[[[3, 1], [4, 0]], [[2, 2], [2, 2]]]])  # [N, P, K+1, C]
    union = torch.tensor([[[[4, 2], [4, 0]], [[2, 4], [4, 2]]]])
    zeros = torch.zeros(1, 2, 2)
    cache = PatchOutcomes(torch.zeros(1, 2, 4, 4), inter, union, zeros, zeros)
    expected = torch.tensor([[[(3 / 4 + 1 / 2) / 2, 1.0], [(1 + 1 / 2) / 2, (1 / 2 + 1) / 2]]])
    torch.testing.assert_close(cache.patch_iou(), expected)
    # actions: patch 0 -> 1, patch 1 -> 0: class 0 = (4 + 2) / (4 + 2), class 1 = 2 / 4
    assert cache.miou(torch.tensor([[1, 0]])) == pytest.approx((1.0 + 0.5) / 2)
    # all on action 0: class 0 = (3 + 2) / (4 + 2), class 1 = (1 + 2) / (2 + 4); batched
    many = cache.miou_many(torch.tensor([[[1, 0]], [[0, 0]]]))
    torch.testing.assert_close(many, torch.tensor([0.75, (5 / 6 + 0.5) / 2], dtype=torch.float64))


def _constructed(n=64, seed=0, rows=2, cols=2, size=8):
    """States whose entropy channel is high on a random half of each image's patches, where
    f0 scores 0.2 and f2 scores 1.0; elsewhere every model scores 1.0. f1 never helps."""
    g = torch.Generator().manual_seed(seed)
    p = rows * cols
    hard = torch.stack([torch.randperm(p, generator=g)[: p // 2] for _ in range(n)])
    is_hard = torch.zeros(n, p, dtype=torch.bool).scatter_(1, hard, True)
    ph, pw = size // rows, size // cols
    entropy = is_hard.float().view(n, rows, cols).repeat_interleave(ph, 1).repeat_interleave(pw, 2)
    pred = torch.randint(0, 3, (n, size, size), generator=g).float()
    states = torch.stack([pred, entropy], 1)
    patch_iou = torch.ones(n, p, 3)
    patch_iou[..., 0] = torch.where(is_hard, 0.2, 1.0)
    patch_iou[..., 1] = patch_iou[..., 0]
    return states, patch_iou, is_hard


def _train(policy, states, patch_iou, lam, epochs=20, lr=1e-2):
    cost = torch.tensor([0.0, 0.06, 0.94])
    opt = torch.optim.Adam(policy.parameters(), lr=lr)
    for epoch in range(epochs):
        policy_epoch(policy, opt, states, patch_iou, cost, lam, linear(0.7, 0.95, epoch, epochs),
                     16)
    return greedy_actions(policy, states, 32)


def test_lam_one_keeps_almost_every_patch_on_f0():
    torch.manual_seed(0)
    states, patch_iou, _ = _constructed()
    actions = _train(RoutingPolicy(4, 3), states, patch_iou, lam=1.0)
    assert (actions == 0).float().mean() >= 0.95


def test_lam_zero_sends_the_hard_half_to_the_large_model():
    torch.manual_seed(0)
    states, patch_iou, is_hard = _constructed()
    policy = RoutingPolicy(4, 3, head="local", grid=(2, 2))
    before = greedy_actions(policy, states, 32)
    actions = _train(policy, states, patch_iou, lam=0.0)
    routed_up = actions[is_hard] == 2
    assert routed_up.float().mean() >= 0.9  # routing accuracy on the known hard half
    assert not torch.equal(before, actions)


def test_small_lam_sends_only_the_hard_half_up():
    # f2 gains 0.8 IoU on hard patches and nothing elsewhere; at lam = 0.2 it pays off only
    # where it helps, so a patch-aware policy must tell the halves apart in every image.
    torch.manual_seed(0)
    states, patch_iou, is_hard = _constructed()
    actions = _train(RoutingPolicy(4, 3, head="local", grid=(2, 2)), states, patch_iou, lam=0.2,
                     epochs=40)
    correct = torch.where(is_hard, actions == 2, actions == 0)
    assert correct.float().mean() >= 0.9
