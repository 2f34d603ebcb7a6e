"""The routing path: batched Monte Carlo passes, dispatch, stitching and its FLOP count."""

import pytest
import torch

from paser.errors import DataError
from paser.models import RoutingPolicy, count_parameters, create_model
from paser.patches import PatchGrid
from paser.routing import CostTable, Router
from paser.uncertainty import entropy, mc_predict


def test_policy_matches_the_reference_size():
    assert count_parameters(RoutingPolicy(16, 3)) == 14_736
    assert RoutingPolicy(4, 5)(torch.rand(2, 2, 32, 48)).shape == (2, 4, 5)


def test_policy_stride_two_keeps_the_parameters_and_quarters_the_flops():
    from torch.utils.flop_counter import FlopCounterMode

    flops = {}
    for stride in (1, 2):
        policy = RoutingPolicy(16, 3, head="local", grid=(4, 4), stride=stride).eval()
        assert count_parameters(policy) == 14_736 + 17 * 3
        with FlopCounterMode(display=False) as counter:
            assert policy(torch.rand(1, 2, 128, 128)).shape == (1, 16, 3)
        flops[stride] = counter.get_total_flops()
    # every convolution runs on a quarter of the positions; only the tiny heads do not
    assert flops[1] == 140_512_256
    assert flops[2] / flops[1] == pytest.approx(0.25, abs=0.001)


def test_mc_passes_share_the_encoder_and_run_the_decoder_t_times():
    torch.manual_seed(0)
    f0 = create_model("unet_tiny").eval()
    calls = {"stem": [], "outconv": []}
    for name in calls:
        getattr(f0, name).register_forward_hook(
            lambda m, inp, out, name=name: calls[name].append(inp[0].shape[0]))
    mc = mc_predict(f0, torch.rand(3, 1, 32, 32), samples=5)
    assert calls == {"stem": [3], "outconv": [3] * 5}  # encoder once, T decoder passes (CPU)
    assert mc.probs.shape == (3, 3, 32, 32)
    assert torch.allclose(mc.probs.sum(1), torch.ones(3, 32, 32), atol=1e-5)
    assert torch.equal(mc.pred, mc.probs.argmax(1))
    assert mc.entropy.max() <= torch.log(torch.tensor(3.0)) + 1e-5
    assert not f0.training  # modes restored


def test_entropy_hand_values():
    p = torch.tensor([[1.0, 0.0], [0.5, 0.5]])
    assert torch.allclose(entropy(p), torch.tensor([0.0, 0.6931472]))


def _router(grid=PatchGrid(2, 2), t=3):  # noqa: B008
    torch.manual_seed(0)
    f0 = create_model("unet_tiny")
    pool = [create_model("unet", c0=2, widths=[4, 4]), create_model("unet", c0=4, widths=[8, 8])]
    policy = RoutingPolicy(grid.num_patches, 3)
    return Router(f0, policy.eval(), [m.eval() for m in pool], grid, t)


@pytest.mark.parametrize("halo", [0, 4])
def test_dispatch_puts_each_models_prediction_on_its_patches(halo):
    router = _router(grid=PatchGrid(2, 2, halo=halo))
    x = torch.rand(2, 1, 32, 32)
    actions = torch.tensor([[0, 1, 2, 0], [2, 2, 1, 0]])
    out = router(x, actions=actions)
    grid = router.grid
    patches = grid.context(grid.pad(x))
    flat = actions.reshape(-1)
    got = grid.split(out.probs)
    base = grid.split(out.mc.probs)
    for i, a in enumerate(flat.tolist()):  # a test may loop: it checks the vectorised code
        want = base[i] if a == 0 else grid.centre(router.pool[a - 1](patches[i:i + 1]))[0].softmax(0)
        assert torch.allclose(got[i], want, atol=1e-5)
    assert torch.equal(out.mask, out.probs.argmax(1))


def test_greedy_is_deterministic_in_actions_and_sample_varies():
    router = _router()
    x = torch.rand(4, 1, 32, 32)
    with torch.no_grad():
        logits = router.policy(router.observe(x).state())
    assert torch.equal(router.choose(logits), logits.argmax(-1))
    torch.manual_seed(1)
    samples = torch.stack([router.choose(logits * 0, "sample") for _ in range(20)])
    assert samples.unique().numel() == 3


@pytest.mark.parametrize("halo", [0, 4])
def test_gflops_from_tables_match_a_direct_count(halo):
    from torch.utils.flop_counter import FlopCounterMode

    router = _router(grid=PatchGrid(2, 2, halo=halo), t=5)
    x = torch.rand(2, 1, 32, 32)
    actions = torch.tensor([[0, 1, 2, 2], [1, 1, 0, 0]])
    costs = router.costs(32, 32)  # counted once per size: keep it out of the direct count
    for b in range(2):
        with FlopCounterMode(display=False) as counter, torch.no_grad():
            router(x[b:b + 1], actions=actions[b:b + 1])
        direct = counter.get_total_flops() / 1e9
        table = costs.gflops(actions[b:b + 1], policy=False).item()
        assert table == pytest.approx(direct, rel=0.01)
    # actions chosen by the policy: the policy ran and is counted
    with FlopCounterMode(display=False) as counter, torch.no_grad():
        out = router(x)
    assert out.gflops.sum().item() == pytest.approx(counter.get_total_flops() / 1e9, rel=0.01)
    assert out.gflops[0].item() == pytest.approx(costs.gflops(out.actions[:1]).item())


def test_cost_table_hand_values():
    costs = CostTable(f0_pass=0.6, mc_samples=5, policy=0.49, patch=[0.0, 0.28, 4.47],
                      params=[16_571, 1_080_595, 17_275_459], num_patches=16)
    assert costs.fixed == pytest.approx(3.49)
    actions = torch.tensor([[0] * 8 + [1] * 6 + [2] * 2])
    assert costs.gflops(actions).item() == pytest.approx(3.49 + 6 * 0.28 + 2 * 4.47)
    total = 16_571 + 1_080_595 + 17_275_459
    assert costs.model_cost("params").tolist() == pytest.approx(
        [0.0, 1_080_595 / total, 17_275_459 / total])
    f0_share = 0.6 / 16
    assert costs.model_cost("flops").tolist() == pytest.approx(
        [0.0, 0.28 / (f0_share + 4.75), 4.47 / (f0_share + 4.75)])


def test_the_parameter_cost_of_a_router_frozen_for_inference_is_paper_eq_3():
    """c(m) = params(f_m) / sum over f0..fK counts every parameter: a router frozen with
    requires_grad_(False) counted none, and its costs were 0 / 0 = NaN."""
    torch.manual_seed(0)
    router = Router(create_model("unet_tiny"), RoutingPolicy(16, 3),
                    [create_model("unet_small"), create_model("unet_small", width_mult=2)],
                    PatchGrid(4, 4), mc_samples=1, mc_dropout="none").requires_grad_(False)
    costs = router.costs(224, 256)  # the paper's 56 x 64 patches
    wide = 4_320_035  # unet_small at twice its widths
    assert costs.params == [16_571, 1_080_595, wide]
    total = 16_571 + 1_080_595 + wide
    assert costs.model_cost("params").tolist() == pytest.approx(
        [0.0, 1_080_595 / total, wide / total])

def test_any_image_size_is_padded_and_cropped_back():
    router = _router()
    out = router(torch.rand(1, 1, 30, 31))
    assert out.mask.shape == (1, 30, 31) and out.actions.shape == (1, 4)


def test_pool_models_run_in_chunks_of_pixels_on_the_cpu(monkeypatch):
    import paser.routing as routing

    router = _router(PatchGrid(2, 2, halo=4))
    patches = torch.rand(7, 1, 24, 24)  # 16 x 16 patches with a halo of 4: 576 pixels each
    sizes = []
    router.pool[1].register_forward_pre_hook(lambda m, inp: sizes.append(inp[0].shape[0]))
    with torch.inference_mode():
        whole = router.run_local(2, patches)
        assert sizes == [7]  # 2 ** 16 pixels hold 113 such patches
        monkeypatch.setattr(routing, "CPU_CHUNK_PIXELS", 3 * 576)
        chunked = router.run_local(2, patches)
    assert sizes == [7, 3, 3, 1] and chunked.shape == (7, 3, 16, 16)
    assert torch.allclose(chunked, whole, atol=1e-6)
    assert torch.equal(chunked.argmax(1), whole.argmax(1))
    with torch.inference_mode():  # no patch routed to a model: an empty answer, not an error
        assert router.run_local(2, patches[:0]).shape == (0, 3, 16, 16)


class _Elementwise(torch.nn.Module):
    """A model of element-wise operations only (its numbers do not depend on the batch):
    dropout, then three class scores per pixel."""

    def __init__(self):
        super().__init__()
        self.dropout = torch.nn.Dropout(0.5)

    def forward(self, x):
        d = self.dropout(x)
        return torch.cat([d, 1 - d, 0.5 * x], 1)


@pytest.mark.parametrize("model", ["unet", "elementwise"])
def test_seeded_dropout_gives_an_image_its_own_masks_in_a_batch_of_any_size(model):
    from paser.uncertainty import one_mask_per_image, seeded

    torch.manual_seed(0)
    x = torch.rand(5, 1, 8, 8)
    f0 = (create_model("unet_tiny", in_channels=1, num_classes=3) if model == "unet"
          else _Elementwise())
    # before: an image at a time, plain F.dropout; now: the whole batch in one go
    alone = []
    for i in range(len(x)):
        with seeded(3, x.device):
            alone.append(mc_predict(f0, x[i:i + 1], 4, "all").probs)
    alone = torch.cat(alone)
    with seeded(3, x.device), one_mask_per_image(f0, 1, 4):
        assert torch.equal(mc_predict(f0, x[:1], 4, "all").probs, alone[:1])  # as before
    with seeded(3, x.device), one_mask_per_image(f0, len(x), 4):
        batch = mc_predict(f0, x, 4, "all").probs
    if model == "elementwise":  # the same numbers
        assert torch.equal(batch, alone)
    else:  # the same masks; the convolutions of a batch add up in another order
        assert torch.allclose(batch, alone, atol=1e-4)
    with seeded(3, x.device):
        one_pass = mc_predict(f0, x[:1], 1, "all").probs
    assert not torch.allclose(alone[:1], one_pass)  # the passes drew masks of their own
    assert type(f0.dropout).forward is torch.nn.Dropout.forward  # put back


def _batch_and_each(f0: torch.nn.Module, n: int, signal: str = "entropy"):
    """A router on ``f0`` (T = 3, every dropout on), ``n`` images, and f0's probabilities on
    each image observed alone with the same seed."""
    torch.manual_seed(0)
    router = Router(f0, RoutingPolicy(4, 2), [create_model("unet_tiny")], PatchGrid(2, 2), 3,
                    1, "all", signal, "paper", 3)
    x = torch.rand(n, 1, 16, 16)
    return router, x, torch.cat([router.observe(x[i:i + 1], mc_seed=7).probs
                                 for i in range(n)])


def test_a_router_batch_equals_its_images_one_at_a_time_with_monte_carlo_dropout():
    router, x, each = _batch_and_each(_Elementwise(), 4)
    assert torch.equal(router.observe(x, mc_seed=7).probs, each)


class _SequenceFirst(torch.nn.Module):
    """A dropout on a tensor whose first dimension is not the batch's (as a sequence-first
    layer's): its masks cannot be drawn per image in one pass."""

    def __init__(self):
        super().__init__()
        self.dropout = torch.nn.Dropout(0.5)

    def forward(self, x):
        d = self.dropout(x.transpose(0, 1)).transpose(0, 1)
        return torch.cat([d, 1 - d, 0.5 * x], 1)


def test_a_dropout_off_the_batch_dimension_is_run_an_image_at_a_time():
    router, x, each = _batch_and_each(_SequenceFirst(), 4)
    assert torch.equal(router.observe(x, mc_seed=7).probs, each)
    assert type(router.f0.dropout).forward is torch.nn.Dropout.forward  # put back
    assert "forward" not in vars(router.f0.dropout)


def test_given_actions_alone_and_large_patches_are_paid_for_what_runs():
    router = _router()
    x = torch.rand(2, 1, 32, 32)
    actions = torch.tensor([[0, 1, 2, 0], [2, 2, 1, 0]])
    costs = router.costs(32, 32)
    out = router(x, actions=actions)  # given actions: the policy did not run
    assert torch.allclose(out.gflops, costs.gflops(actions, policy=False))
    assert not torch.allclose(out.gflops, costs.gflops(actions))
    # one pool model alone on two of the four patches pays those two
    alone = router.alone(1, x[:1], inside=torch.tensor([[True, False, True, False]]))
    assert alone.gflops.tolist() == [pytest.approx(2 * costs.patch[1])]
    # a patch larger than the CPU's chunk of pixels runs whole (one patch per chunk)
    big = Router(router.f0, router.policy, list(router.pool), PatchGrid(1, 1), 1).eval()
    assert big.run_local(1, torch.rand(2, 1, 300, 300)).shape == (2, 3, 300, 300)


def test_margin_and_the_policy_states_hand_values():
    from paser.uncertainty import MCOutput

    probs = torch.tensor([0.2, 0.7, 0.1]).view(1, 3, 1, 1)
    mc = MCOutput(probs, probs.argmax(1), entropy(probs))
    assert mc.uncertainty("margin").item() == pytest.approx(0.5)  # 1 - (0.7 - 0.2)
    # paper: the prediction, then the uncertainty; image: the image first, then the probs
    assert mc.state("paper", signal="margin").flatten().tolist() == pytest.approx([1.0, 0.5])
    image = torch.full((1, 1, 1, 1), 9.0)
    assert mc.state("image", image).flatten().tolist() == pytest.approx(
        [9.0, 0.2, 0.7, 0.1, entropy(probs).item()])


class _TwoDropouts(torch.nn.Module):
    """Two element-wise dropouts in a row, then three class scores per pixel."""

    def __init__(self):
        super().__init__()
        self.first, self.last = torch.nn.Dropout(0.5), torch.nn.Dropout(0.5)

    def forward(self, x):
        d = self.last(self.first(x))
        return torch.cat([d, 1 - d, 0.5 * x], 1)


def test_mc_dropout_last_keeps_the_other_dropouts_off_and_one_mask_leaves_them_so():
    from paser.uncertainty import mc_dropout, one_mask_per_image, shares_masks

    torch.manual_seed(0)
    model, x = _TwoDropouts(), torch.ones(2, 1, 4, 4)
    with mc_dropout(model, last_only=True):
        assert [model.first.training, model.last.training] == [False, True]
        with one_mask_per_image(model, 2):
            assert torch.equal(model.first(x), x)  # off: no mask drawn
            assert not torch.equal(model.last(x), x)
    assert shares_masks(model)
    model.first = torch.nn.Dropout2d(0.5)  # channel masks: one element-wise dropout is not enough
    assert not shares_masks(model)


def test_a_router_batch_of_two_is_its_images_and_the_state_reads_its_signal():
    router, x, each = _batch_and_each(_Elementwise(), 2, "margin")
    mc = router.observe(x, mc_seed=7)
    assert torch.equal(mc.probs, each)
    assert torch.equal(router.state(x, mc)[:, 1], mc.uncertainty("margin"))


def test_a_cap_holds_each_image_and_moves_only_the_dearest_patches_down():
    class Drawn(torch.nn.Module):  # logits of its own per image and patch, f2 favoured
        def forward(self, state):
            gen = torch.Generator().manual_seed(3)
            return torch.randn(len(state), 16, 3, generator=gen) + torch.tensor(
                [0.0, 0.3, 0.6]) * torch.rand(len(state), 1, 1, generator=gen) * 4

    router = _router(PatchGrid(4, 4), t=1)
    router.policy = Drawn()
    x = torch.rand(8, 1, 64, 64, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        free = router(x, mc_seed=0)
        costs = router.costs(64, 64)
        patch = torch.tensor(costs.patch, dtype=torch.float64)
        spent = free.gflops - costs.fixed
        room = float(spent.median())  # a cap some images are over
        router.cap_per_mp = (costs.fixed + room) / (64 * 64 / 1e6)
        capped = router(x, mc_seed=0)
    assert (capped.gflops <= costs.fixed + room + 1e-9).all()
    under = spent <= room
    assert under.any() and (~under).any()
    assert torch.equal(capped.actions[under], free.actions[under])  # within it: unchanged
    # over it: no patch moves to a dearer model, and the image spends as much as fits
    assert (patch[capped.actions] <= patch[free.actions]).all()
    assert (capped.gflops[~under] > costs.fixed + room - max(costs.patch)).all()
    router.cap_per_mp = costs.fixed / (64 * 64 / 1e6) / 2  # under what f0 and the policy cost
    with pytest.raises(DataError, match=r"under the .* it pays before any patch is routed"):
        router(x, mc_seed=0)
    router.cap_per_mp = None


def test_a_cap_keeps_the_dear_model_where_the_policy_values_it_most():
    class Fixed(torch.nn.Module):  # f2 over f0 by 4, 3, 2, 1 on the four patches; f1 as f0
        def forward(self, state):
            return torch.tensor([[0.0, 0.0, m] for m in (1.0, 4.0, 2.0, 3.0)]).expand(
                len(state), 4, 3)

    router = _router(PatchGrid(2, 2), t=1)
    router.policy = Fixed()
    x = torch.rand(2, 1, 32, 32, generator=torch.Generator().manual_seed(0))
    costs = router.costs(32, 32)
    with torch.no_grad():
        assert router(x, mc_seed=0).actions.tolist() == [[2, 2, 2, 2]] * 2
        router.cap_per_mp = (costs.fixed + 2 * costs.patch[2]) / (32 * 32 / 1e6)
        out = router(x, mc_seed=0)
    assert out.actions.tolist() == [[0, 2, 0, 2]] * 2  # the margins 4 and 3 keep f2
    assert out.gflops.tolist() == pytest.approx([costs.fixed + 2 * costs.patch[2]] * 2)


def test_cost_tables_are_kept_for_the_next_process_by_the_models_structure(tmp_path,
                                                                           monkeypatch):
    """Counting FLOPs loads torch._dynamo (3 s of every `paser segment`): a run's tables
    are kept in its cache and read by the next router of the same structure, whatever its
    weights; a router of another structure counts its own, beside them."""
    import json

    file = tmp_path / "cache" / "costs.json"
    first = _router()
    first.cost_cache = file
    table = first.costs(32, 40)
    kept = json.loads(file.read_text())
    assert [list(v) for v in kept.values()] == [["32x40"]]
    again = _router()
    with torch.no_grad():
        for p in again.parameters():
            p.add_(1.0)  # other weights, the same structure
    again.cost_cache = file

    def counted(*args, **kwargs):
        raise AssertionError("counted again")

    with monkeypatch.context() as m:
        m.setattr(CostTable, "measure", counted)
        assert again.costs(32, 40) == table
    other = _router(t=1)  # f0 once: another table
    other.cost_cache = file
    assert other.costs(32, 40).f0_mc < table.f0_mc
    assert len(json.loads(file.read_text())) == 2
    # a table of other fields (another version of paser wrote it) is counted again
    file.write_text(json.dumps({first._structure(): {"32x40": {"f0": 1.0}}}))
    older = _router()
    older.cost_cache = file
    assert older.costs(32, 40) == table
    file.write_text("{not json")  # a file cut short is counted again, and written whole
    late = _router()
    late.cost_cache = file
    assert late.costs(32, 40) == table and "32x40" in file.read_text()
