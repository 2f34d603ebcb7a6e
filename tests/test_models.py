import pytest
import torch

from paser.errors import ConfigError
from paser.models import UNet, count_parameters, create_model


@pytest.mark.parametrize(
    ("name", "params"),
    [("unet_tiny", 16_571), ("unet_small", 1_080_595), ("unet_large", 17_275_459)],
)
def test_reference_unet_parameter_counts(name, params):
    assert count_parameters(create_model(name, in_channels=1, num_classes=3)) == params


def test_unet_output_shape_and_odd_sizes():
    model = create_model("unet_small").eval()
    for h, w in [(56, 64), (28, 32), (30, 34)]:
        assert model(torch.rand(2, 1, h, w)).shape == (2, 3, h, w)


def test_dropout_is_the_only_randomness_and_can_stay_on():
    torch.manual_seed(0)
    model = create_model("unet_tiny").eval()
    x = torch.rand(1, 1, 32, 32)
    assert torch.equal(model(x), model(x))  # eval: deterministic
    for m in model.modules():
        if isinstance(m, torch.nn.Dropout):
            m.train()
    assert not torch.equal(model(x), model(x))  # Monte Carlo dropout: samples differ


def test_width_options_and_explicit_unet():
    narrow = create_model("unet_large", width_mult=0.25)
    assert isinstance(narrow, UNet) and narrow.levels == 4
    assert count_parameters(narrow) < count_parameters(create_model("unet_large")) / 10
    explicit = create_model("unet", c0=4, widths=[8, 16, 16])
    assert count_parameters(explicit) == 16_571


def test_smp_models_build_without_download():
    model = create_model("smp:DeepLabV3Plus:resnet18", in_channels=1, num_classes=3).eval()
    assert model(torch.rand(1, 1, 64, 64)).shape == (1, 3, 64, 64)


@pytest.mark.parametrize(
    ("name", "kwargs", "fragment"),
    [
        ("resnet", {}, "unknown model name 'resnet'"),
        ("smp:Unet", {}, "expected 'smp:<Arch>:<encoder>'"),
        ("smp:NoSuchArch:resnet18", {}, "segmentation-models-pytorch refused"),
        ("unet", {"c0": 4}, "needs ['widths']"),
        ("unet", {"c0": 4, "widths": [8, 16, 32]}, "last two equal"),
        ("unet", {"c0": 8, "width_mult": 0.5}, "needs ['widths']"),
        # built before, as UNets of empty or one-channel layers, or a raw ValueError
        ("unet", {"c0": 0, "widths": [16, 32, 32]}, "UNet c0=0, widths=[16, 32, 32]: channel "
         "counts must be integers >= 1"),
        ("unet", {"c0": 8, "widths": [8, 0, 0]}, "channel counts must be integers >= 1"),
        ("unet", {"c0": 2.5, "widths": [8, 16, 16]}, "channel counts must be integers >= 1"),
        ("unet", {"c0": 8, "widths": "16,32,32"}, "widths='16,32,32': channel counts"),
        ("unet", {"c0": 8, "widths": 16}, "widths=16: channel counts"),
        ("unet_large", {"width_mult": 0}, "width_mult=0 must be a number > 0"),
        ("unet_large", {"width_mult": -0.5}, "width_mult=-0.5 must be a number > 0"),
        # importlib's own ValueError and TypeError before
        (":small_net", {}, "model ':small_net': an import path is 'package.module:factory'"),
        (".nets:small_net", {}, "an import path is 'package.module:factory'"),
        ("mylab.nets:", {}, "an import path is 'package.module:factory'"),
        # smp would download these, or drop the misspelt key, or raise timm's RuntimeError
        ("smp:Unet:resnet18", {"encoder_weights": "imagenet"},
         "kwargs encoder_weights='imagenet' would download weights"),
        ("smp:Unet:resnet18", {"decoder_chanels": [8]}, "Unet takes no decoder_chanels; its "
         "keyword arguments are activation, aux_params, decoder_attention_type, "
         "decoder_channels"),
        ("smp:Unet:tu-notamodel", {}, "refused it: Unknown model (notamodel)"),
    ],
)
def test_bad_model_specs_are_clear(name, kwargs, fragment):
    with pytest.raises(ConfigError, match=None) as err:
        create_model(name, **kwargs)
    assert fragment in str(err.value)


def test_unet_norm_option_keeps_the_parameter_count():
    inst = create_model("unet_small")
    batch = create_model("unet_small", norm="batch")
    assert count_parameters(batch) == count_parameters(inst) == 1_080_595
    assert any(isinstance(m, torch.nn.BatchNorm2d) for m in batch.modules())
    with pytest.raises(ConfigError, match="norm='group'"):
        create_model("unet_small", norm="group")


@pytest.mark.parametrize("size", ["tiny", "small"])
def test_unet_shares_its_deterministic_encoder_across_monte_carlo_passes(size):
    from paser.uncertainty import mc_dropout, mc_predict

    torch.manual_seed(0)
    model = create_model(f"unet_{size}", 1, 3)
    x = torch.rand(2, 1, 32, 32)
    with torch.inference_mode(), mc_dropout(model):
        torch.manual_seed(5)
        whole = model(x)
        torch.manual_seed(5)  # the split path draws the same dropout masks in the same order
        assert torch.equal(model.decode(model.encode(x)), whole)
        torch.manual_seed(7)
        by_hand = torch.stack([model(x).softmax(1) for _ in range(4)]).mean(0)
        torch.manual_seed(7)
        shared = mc_predict(model, x, samples=4).probs
    assert torch.allclose(shared, by_hand, atol=1e-6)
    with torch.inference_mode(), mc_dropout(model, active=False):  # dropout off: one pass
        assert torch.allclose(model.mc_probs(x, 3), model(x).softmax(1), atol=1e-6)


def test_the_tests_cannot_reach_the_network():
    """conftest's guard: a download any code under test tries fails its test at once."""
    import socket

    with pytest.raises(AssertionError, match="reach the network"):
        socket.create_connection(("203.0.113.1", 443), timeout=0.5)  # TEST-NET-3
    with socket.socket() as sock, pytest.raises(AssertionError, match="reach the network"):
        sock.connect_ex(("download.pytorch.org", 443))
    server = socket.socket()
    server.bind(("127.0.0.1", 0))
    server.listen(1)
    socket.create_connection(server.getsockname(), timeout=1).close()  # loopback: allowed
    server.close()


def test_mc_dropout_last_runs_only_the_last_dropout_on_a_deterministic_trunk():
    from paser.uncertainty import mc_dropout, mc_predict

    torch.manual_seed(0)
    model, x, seen = create_model("unet_small", 1, 3), torch.rand(1, 1, 32, 32), []
    model.dropout.register_forward_hook(lambda m, inp, out: seen.append(inp[0]))
    with torch.inference_mode(), mc_dropout(model, active=False):
        model(x)
    assert len(seen) == 4  # after down blocks 2, 3, 4 and the first up block
    off = seen.pop()
    seen.clear()
    with torch.inference_mode():
        mc_predict(model, x, samples=3, dropout="last")
    assert len(seen) == 3  # once a pass, on what the others give when off
    assert all(torch.allclose(s, off, atol=1e-6) for s in seen)


def test_an_up_block_puts_the_skip_first_and_pads_the_upsampled_map_right_and_below():
    from paser.models.unet import Up

    up, seen = Up(4, 2), []
    up.conv.register_forward_pre_hook(lambda m, inp: seen.append(inp[0]))
    skip = torch.full((1, 2, 5, 5), 3.0)
    up(torch.ones(1, 2, 2, 2), skip)
    assert torch.equal(seen[0][:, :2], skip)  # the skip's channels first
    upsampled = seen[0][0, 2]  # 4 x 4 ones, then a zero row and column (dx // 2 = 0 before)
    assert torch.allclose(upsampled[:4, :4], torch.ones(4, 4))
    assert upsampled[4].eq(0).all() and upsampled[:, 4].eq(0).all()


def test_the_skip_of_a_dropped_map_carries_its_mask():
    from paser.uncertainty import mc_dropout

    torch.manual_seed(0)
    model, x, seen = create_model("unet_small", 1, 3), torch.rand(1, 1, 32, 32), []
    model.ups[1].register_forward_hook(lambda m, inp, out: seen.append(inp[1]))  # its skip
    with torch.inference_mode(), mc_dropout(model):
        below = model.encode(x)[-1]  # the map the first dropout drops
        model(x)
    kept = seen[0] != 0
    assert torch.allclose(seen[0][kept], 2 * below[kept])  # p = 0.5: kept ones doubled
    assert (below[~kept] != 0).any()  # and some dropped


def test_a_weights_file_of_a_pickled_model_says_to_save_its_state_dict(tmp_path):
    """torch's refusal advised weights_only=False, which paser does not do (it ran code from
    the file), and printed terminal escapes; a file that is no pickle at all was advised the
    same."""
    from paser.models.registry import load_weights

    model = create_model("unet_tiny")
    whole, junk = tmp_path / "whole.pt", tmp_path / "junk.pt"
    torch.save(model, whole)
    junk.write_bytes(b"xx")
    with pytest.raises(ConfigError) as err:
        load_weights(model, whole)
    assert str(err.value) == (
        f"{whole}: cannot read weights: it holds a pickled paser.models.unet.UNet, not "
        "tensors alone, and paser loads no pickled code; save the weights alone, "
        "torch.save(model.state_dict(), path), or as a .safetensors file")
    with pytest.raises(ConfigError, match=r"junk.pt: cannot read weights: not a PyTorch file "
                                          r"of tensors alone \(a whole model"):
        load_weights(model, junk)


def test_weights_of_another_class_count_name_both_shapes(tmp_path):
    """A file trained for 3 classes, loaded into a model of 2: the error named the tensors
    of another shape, not their shapes, which are what tell the class count apart."""
    from paser.models.registry import load_weights

    path = tmp_path / "three.pt"
    torch.save(create_model("unet_tiny", num_classes=3).state_dict(), path)
    with pytest.raises(ConfigError) as err:
        load_weights(create_model("unet_tiny", num_classes=2), path)
    assert str(err.value) == (
        f"{path}: the weights do not fit the model: 0 missing (e.g. []), 0 unexpected (e.g. "
        "[]), 2 of another shape (e.g. ['outconv.weight', 'outconv.bias']); outconv.weight "
        "is [3, 8, 1, 1] in the file, [2, 8, 1, 1] in the model")


def test_the_policys_basic_block_is_torchvisions():
    """paser.models.policy.BasicBlock stands in for torchvision's (whose import loads
    torch._dynamo): the same keys, the same initial weights from one seed, the same output."""
    from torch import nn
    from torchvision.models.resnet import BasicBlock as Theirs

    from paser.models.policy import BasicBlock as Ours

    def made(block):
        torch.manual_seed(0)
        project = nn.Sequential(nn.Conv2d(64, 16, 1, bias=False), nn.BatchNorm2d(16))
        return block(64, 16, downsample=project)

    ours, theirs = made(Ours), made(Theirs)
    a, b = ours.state_dict(), theirs.state_dict()
    assert list(a) == list(b) and all(torch.equal(a[k], b[k]) for k in a)
    x = torch.randn(2, 64, 9, 7)
    for mode in (True, False):  # batch statistics, then the running ones
        ours.train(mode), theirs.train(mode)
        assert torch.equal(ours(x.clone()), theirs(x.clone()))
