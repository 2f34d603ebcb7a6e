"""FLOP counting: hand-computed layers, the reference UNet figures, batch linearity."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from paser import cost
from paser.errors import ConfigError
from paser.models import create_model, registry


def test_conv2d_hand_computed():
    # 2 * Cin * Cout * k * k * Hout * Wout; the bias is not counted.
    conv = nn.Conv2d(3, 8, 3, padding=1)
    assert cost.count_flops(conv, (1, 3, 10, 12)) == 2 * 3 * 8 * 9 * 10 * 12 == 51840
    strided = nn.Conv2d(3, 8, 3, stride=2)  # Hout = (10 - 3) // 2 + 1 = 4, Wout = 5
    assert cost.count_flops(strided, (1, 3, 10, 12)) == 2 * 3 * 8 * 9 * 4 * 5 == 8640
    # An example tensor works like its shape.
    assert cost.count_flops(conv, torch.randn(1, 3, 10, 12)) == 51840


def test_linear_hand_computed_and_norms_not_counted():
    model = nn.Sequential(nn.Linear(10, 4), nn.ReLU(), nn.LayerNorm(4))
    assert cost.count_flops(model, (5, 10)) == 2 * 10 * 4 * 5


@pytest.mark.parametrize(
    ("name", "height", "width", "reference"),
    [
        ("unet_tiny", 224, 256, 0.60),
        ("unet_small", 56, 64, 0.28),
        ("unet_large", 56, 64, 4.47),
    ],
)
def test_reference_unet_gflops(name, height, width, reference):
    # Measured with torch 2.14: 0.597754, 0.279978, 4.474831 GFLOP.
    gflops = cost.gflops_per_sample(create_model(name), 1, height, width)
    assert gflops == pytest.approx(reference, rel=0.03)


def test_flops_scale_linearly_with_batch():
    model = create_model("unet_small")
    one = cost.count_flops(model, (1, 1, 56, 64))
    assert one == pytest.approx(0.28e9, rel=0.03)
    assert cost.count_flops(model, (4, 1, 56, 64)) == 4 * one


def test_modes_are_restored():
    model = create_model("unet_tiny")
    model.train()
    model.stem.eval()  # a frozen part must stay frozen
    before = {name: m.training for name, m in model.named_modules()}
    cost.count_flops(model, (1, 1, 32, 32))
    assert {name: m.training for name, m in model.named_modules()} == before
    assert model.training and not model.stem.training
    model.eval()
    cost.count_flops(model, (1, 1, 32, 32))
    assert not model.training


def test_meta_and_real_forward_agree_and_weights_untouched():
    model = create_model("unet_tiny")
    weights = {k: v.clone() for k, v in model.state_dict().items()}
    on_meta = cost.count_flops(model, (2, 1, 40, 48))
    assert on_meta == cost.count_flops(model, (2, 1, 40, 48), meta=False)
    assert all(torch.equal(v, weights[k]) for k, v in model.state_dict().items())
    assert next(model.parameters()).device.type == "cpu"


class _ValueDependent(nn.Module):
    """A forward that reads a tensor value, which the meta device cannot do."""

    def __init__(self):
        super().__init__()
        self.a, self.b = nn.Linear(4, 4), nn.Linear(4, 2)

    def forward(self, x):
        return self.b(x) if float(x.sum()) >= 0 else self.a(x)


def test_value_dependent_forward_falls_back_to_real_run():
    assert cost.count_flops(_ValueDependent(), (3, 4)) == 2 * 4 * 2 * 3


def test_no_autograd_graph():
    conv = nn.Conv2d(1, 2, 3)
    outputs = []
    conv.register_forward_hook(lambda _m, _i, out: outputs.append(out))
    cost.count_flops(conv, (1, 1, 8, 8), meta=False)
    assert not outputs[0].requires_grad


def test_count_parameters_is_the_registry_one():
    assert cost.count_parameters is registry.count_parameters
    assert cost.count_parameters(create_model("unet_tiny")) == 16571


def test_convention_and_bad_shape():
    assert "2 FLOPs" in cost.FLOP_CONVENTION
    with pytest.raises(ConfigError, match="positive integers"):
        cost.count_flops(nn.Conv2d(1, 1, 1), (1, 0, 4, 4))


def test_gflops_per_sample_counts_a_module_once_per_shape(monkeypatch):
    counted = []
    count = cost.count_flops
    monkeypatch.setattr(cost, "count_flops", lambda m, s: counted.append(s) or count(m, s))
    conv = nn.Conv2d(3, 8, 3, padding=1)
    first = cost.gflops_per_sample(conv, 3, 10, 12)
    torch.nn.init.zeros_(conv.weight)  # other weights: the same count, not counted again
    assert cost.gflops_per_sample(conv, 3, 10, 12) == first == 51840 / 1e9
    assert cost.gflops_per_sample(conv, 3, 20, 12) == 2 * first  # another shape: counted
    # replaced by a wider one: counted
    conv.weight, conv.bias = nn.Parameter(torch.zeros(16, 3, 3, 3)), nn.Parameter(torch.zeros(16))
    assert cost.gflops_per_sample(conv, 3, 10, 12) == 2 * first
    assert counted == [(1, 3, 10, 12), (1, 3, 20, 12), (1, 3, 10, 12)]
    # another module of the same structure has its own count
    assert cost.gflops_per_sample(nn.Conv2d(3, 8, 3, padding=1), 3, 10, 12) == first
    assert len(counted) == 4


def test_the_least_a_message_asks_for_is_rounded_up_so_that_figure_is_taken():
    # 10.43612 to 6 digits is 10.4361, which a cap or budget of 'at least 10.4361' refuses
    assert cost.at_least(10.43612) == "10.4362" and float("10.4362") >= 10.43612
    assert cost.at_least(10.4361875) == "10.4362"
    assert cost.at_least(0.171) == "0.171"  # exact in 6 digits: as it is
    assert cost.at_least(99.99995) == "100"
    assert cost.at_least(0.17099839) == "0.170999"
