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


def test_rows_and_concat_are_exact_inverses():
    gen = torch.Generator().manual_seed(0)
    out = PatchOutcomes(*(torch.rand(5, 4, *shape, generator=gen)
                          for shape in ((2, 2), (3, 2), (3, 2), (3,), (3,))))
    back = PatchOutcomes.concat([out.rows(slice(0, 2)), out.rows(torch.tensor([2, 3, 4]))])
    for name in ("state", "inter", "union", "entropy", "nll"):
        assert torch.equal(getattr(back, name), getattr(out, name))
    picked = out.rows(torch.tensor([4, 1]))
    assert torch.equal(picked.inter, out.inter[[4, 1]]) and picked.nll.shape == (2, 4, 3)


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


@pytest.mark.slow
def test_small_lam_sends_only_the_hard_half_up():
    # f2 gains 0.8 IoU on hard patches and nothing elsewhere; at lam = 0.2 it pays off only
    # where it helps, so a patch-aware policy must tell the halves apart in every image.
    torch.manual_seed(0)
    states, patch_iou, is_hard = _constructed()
    actions = _train(RoutingPolicy(4, 3, head="local", grid=(2, 2)), states, patch_iou, lam=0.2,
                     epochs=40)
    correct = torch.where(is_hard, actions == 2, actions == 0)
    assert correct.float().mean() >= 0.9


def _fit_full_information(policy, states, patch_iou, lam, objective, epochs=60, lr=1e-2):
    from paser.train.policy import full_information_epoch, prepare

    gain = patch_iou - patch_iou[..., :1]
    cost = torch.tensor([0.0, 0.06, 0.94])
    prepare(policy, states)
    opt = torch.optim.Adam(policy.parameters(), lr=lr)
    for _ in range(epochs):
        full_information_epoch(policy, opt, states, gain, cost, lam, 16, objective)
    policy.eval()
    with torch.inference_mode():
        out = policy(states)
    if objective == "gain":  # trained unpriced: out is the predicted gain
        return ((1 - lam) * out - lam * cost).argmax(-1), out
    return out.argmax(-1), out


@pytest.mark.parametrize("objective", ["expected", "gain"])
@pytest.mark.slow
def test_full_information_learns_the_oracle_where_it_is_learnable(objective):
    # f2 gains 0.8 on the hard half; at lam 0.2 only there does it pay (0.64 > 0.188), and
    # the oracle sends exactly the hard half up. Both objectives must find it in every image.
    from paser.baselines.routed import oracle_actions
    from paser.models import PooledPolicy

    torch.manual_seed(0)
    states, patch_iou, is_hard = _constructed()
    oracle = oracle_actions(patch_iou, torch.tensor([0.0, 0.06, 0.94]), 0.2)
    assert torch.equal(oracle, torch.where(is_hard, 2, 0))
    policy = PooledPolicy((2, 2), 3, 2, hidden=16, gain_head=objective == "gain")
    actions, out = _fit_full_information(policy, states, patch_iou, 0.2, objective)
    assert (actions == oracle).float().mean() >= 0.98
    if objective == "gain":  # the gains themselves are learnt: 0.8 up on the hard half
        assert out[..., 2][is_hard].mean() == pytest.approx(0.8, abs=0.05)
        assert out[..., 2][~is_hard].abs().mean() < 0.05
        assert torch.equal(out[..., 0], torch.zeros_like(out[..., 0]))


def test_expected_reward_trains_the_reference_policy_too():
    torch.manual_seed(0)
    states, patch_iou, is_hard = _constructed()
    policy = RoutingPolicy(4, 3, head="local", grid=(2, 2))
    actions, _ = _fit_full_information(policy, states, patch_iou, 0.0, "expected", epochs=20)
    assert (actions[is_hard] == 2).float().mean() >= 0.9


def test_a_priced_gain_head_routes_by_predicted_reward():
    from paser.models import PooledPolicy
    from paser.train.policy import priced

    policy = PooledPolicy((1, 1), 3, 2, hidden=4, gain_head=True)
    torch.nn.init.zeros_(policy.mlp[-1].weight)
    with torch.no_grad():
        policy.mlp[-1].bias.copy_(torch.tensor([[0.1, 0.3]]))  # gains of f1, f2
    state = torch.zeros(1, 2, 4, 4)
    assert policy(state)[0, 0].tolist() == pytest.approx([0.0, 0.1, 0.3])  # unpriced
    policy.load_state_dict(priced(policy, 0.5, torch.tensor([0.0, 0.05, 0.5])))
    # (1 - lam) * gain - lam * cost: 0, 0.05 - 0.025, 0.15 - 0.25 -> f1
    assert policy(state)[0, 0].tolist() == pytest.approx([0.0, 0.025, -0.1])


def test_dataset_gain_is_the_first_order_change_of_the_split_miou():
    # two patches, two actions, two classes; totals under f0: I = (3 + 2, 1 + 2), U = (4 + 2, 2 + 4)
    inter = torch.tensor([[[[3, 1], [4, 0]], [[2, 2], [2, 2]]]])  # [N, P, K+1, C]
    union = torch.tensor([[[[4, 2], [4, 0]], [[2, 4], [2, 3]]]])
    zeros = torch.zeros(1, 2, 2)
    out = PatchOutcomes(torch.zeros(1, 2, 4, 4), inter, union, zeros, zeros)
    gain = out.dataset_gain()
    # patch 0 to action 1: dI = (1, -1), dU = (0, -2)
    by_hand = ((1 / 6 - 5 * 0 / 36) + (-1 / 6 - 3 * -2 / 36)) / 2 * 2  # mean over C, x N*P
    assert gain[0, 0].tolist() == pytest.approx([0.0, by_hand])
    # patch 1 to action 1: dI = 0, dU = (0, -1): only the union shrinks
    assert gain[0, 1, 1].item() == pytest.approx((3 / 36) / 2 * 2)
    # first order: the exact change of the split's mIoU for a small move is close to it
    exact = out.miou(torch.tensor([[0, 1]])) - out.miou(torch.tensor([[0, 0]]))
    assert exact == pytest.approx(gain[0, 1, 1].item() / 2, rel=0.2)
    assert torch.equal(out.gain("patch")[..., 0], torch.zeros(1, 2))


@pytest.mark.slow
def test_the_reference_policy_learns_gains_too():
    torch.manual_seed(0)
    states, patch_iou, is_hard = _constructed()
    policy = RoutingPolicy(4, 3, head="local", grid=(2, 2), gain_head=True)
    actions, out = _fit_full_information(policy, states, patch_iou, 0.2, "gain", epochs=60)
    assert (actions == torch.where(is_hard, 2, 0)).float().mean() >= 0.9
    assert torch.equal(out[..., 0], torch.zeros_like(out[..., 0]))


def test_pooled_statistics_members_and_their_mean():
    from paser.models import PooledPolicy

    torch.manual_seed(0)
    policy = PooledPolicy((2, 2), 3, 2, hidden=8, gain_head=True, members=3)
    state = torch.arange(2 * 4 * 4, dtype=torch.float32).view(1, 2, 4, 4)
    stats = policy.statistics(state)  # [B, P, 3S]: mean, std, max of each channel per patch
    assert stats.shape == (1, 4, 6)
    top_left = state[0, :, :2, :2].reshape(2, -1)
    assert stats[0, 0].tolist() == pytest.approx(
        [*top_left.mean(1).tolist(), *top_left.std(1, unbiased=False).tolist(),
         *top_left.amax(1).tolist()])
    policy.eval()
    assert torch.equal(policy(state), policy(stats))  # a state or its statistics
    members = policy.raw(state)  # [M, B, P, K]
    assert members.shape == (3, 1, 4, 2) and not torch.equal(members[0], members[1])
    assert torch.allclose(policy(state)[..., 1:], members.mean(0))
    policy.train()
    assert policy(state).shape == (3, 1, 4, 3)  # training: each member on its own


def test_a_gain_ensemble_routes_by_its_members_mean_at_the_price_and_keeps_least_error():
    from paser.models import PooledPolicy
    from paser.train.policy import full_information_epoch, validate

    def const(gains):  # members predicting fixed gains of f1, f2 everywhere
        p = PooledPolicy((1, 1), 3, 2, hidden=4, gain_head=True, members=len(gains))
        torch.nn.init.zeros_(p.mlp[-1].weight)
        p.mlp[-1].bias.data.copy_(torch.tensor(gains))
        return p

    states = torch.zeros(4, 2, 4, 4)
    ens = const([[0.3, 0.0], [0.0, 0.4]])  # member 0 alone: f1; their mean: f2
    _, counts = full_information_epoch(ens, torch.optim.SGD(ens.parameters(), lr=0.0), states,
                                       torch.zeros(4, 1, 3), torch.zeros(3), 0.0, 4, "gain")
    assert counts.tolist() == [0.0, 0.0, 4.0]
    u, z = torch.tensor([[[[4, 2], [4, 1], [4, 4]]]]), torch.zeros(1, 1, 3)
    val = (states[:1], torch.tensor([[[0.0, 0.1, 0.3]]]), PatchOutcomes(states[:1], u, u, z, z),
           torch.tensor([0.0, 0.05, 0.5]), 0.5, 1, "gain")
    exact, off = validate(const([[0.1, 0.3]]), *val), validate(const([[0.3, 0.0]]), *val)
    assert exact["fractions"] == [0.0, 1.0, 0.0]  # priced at lam 0.5: (0, 0.025, -0.1)
    assert off["loss"] == pytest.approx(0.13) and exact["score"] > off["score"]


def test_train_on_rl_ft_trains_the_router_on_d_rl_then_d_ft(monkeypatch):
    from types import SimpleNamespace

    from paser.config import load_config
    from paser.data import Tensors
    from paser.patches import PatchGrid
    from paser.train import policy as stage2

    def build(router, split, *args, **kwargs):  # each image's id as its state
        z = torch.zeros(len(split), 4, 3, 3)
        return PatchOutcomes(
            torch.tensor([float(i) for i in split.ids]).view(-1, 1, 1, 1),
            z,
            z,
            z[..., 0],
            z[..., 0],
        )

    monkeypatch.setattr(stage2.PatchOutcomes, "build", build)
    cfg = load_config(
        preset="battery-quick",
        overrides=["stage2.train_on=rl+ft", "stage2.views=1", "stage2.crops=0"],
    )
    rl, ft = (
        Tensors(torch.zeros(len(i), 1, 8, 8), torch.zeros(len(i), 8, 8).byte(), i)
        for i in (["1", "2"], ["7", "8", "9"])
    )
    data = SimpleNamespace(rl=rl, ft=ft, rl_around=None, ft_around=None)
    out = stage2.training_outcomes(cfg, SimpleNamespace(grid=PatchGrid(2, 2)), data, "cpu")
    assert out.state.flatten().tolist() == [1, 2, 7, 8, 9]


def test_the_pooled_mlp_sees_standardised_statistics_and_their_patch_mean():
    from paser.models import PooledPolicy

    torch.manual_seed(0)
    policy, seen = PooledPolicy((2, 2), 3, 2, hidden=8), []
    states = torch.rand(5, 2, 4, 4) * torch.tensor([3.0, 0.1]).view(1, 2, 1, 1)
    policy.standardise_on(states)
    f = (policy.all_statistics(states) - policy.shift) / policy.scale  # [N, P, 6]
    assert torch.allclose(f.flatten(0, 1).mean(0), torch.zeros(6), atol=1e-5)
    assert torch.allclose(f.flatten(0, 1).std(0), torch.ones(6), atol=1e-5)
    policy.mlp[0].register_forward_pre_hook(lambda m, inp: seen.append(inp[0]))
    policy(states[:1])
    context = f[0].mean(0).expand(4, 6)  # the image's mean over its 4 patches
    assert torch.allclose(seen[0][0, 0], torch.cat([f[0], context], -1), atol=1e-5)
