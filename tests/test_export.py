"""ONNX export: onnxruntime matches PyTorch on the deterministic parts, and the routing path
runs on onnxruntime models end to end."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from tests.helpers import paser, paser_here

from paser.data import load_stage_data
from paser.errors import CheckpointError, ConfigError, DataError
from paser.export import MonteCarloF0, OnnxMonteCarlo, load_onnx_router

# every test reads one ONNX export of the finished run, made by `paser export` (15 s)
pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def exported_by_cli(mnist_run, tmp_path_factory):
    """`paser export` of the finished run, in a process of its own, and what it printed."""
    out = tmp_path_factory.mktemp("onnx")
    res = paser("export", "--run-dir", str(mnist_run), "--out", str(out))
    assert res.returncode == 0 and "warning" not in res.stderr, res.stderr
    return out, res.stdout


@pytest.fixture(scope="module")
def exported(mnist_run, exported_by_cli):
    from paser import PaSeR

    out, _ = exported_by_cli
    return PaSeR.load(mnist_run, device="cpu"), out, json.loads((out / "manifest.json").read_text())


def test_deterministic_parts_match_torch_within_1e_4(exported):
    model, out, manifest = exported
    assert set(manifest["max_abs_error_vs_torch"]) == {"f0", "policy", "f1", "f2"}
    assert max(manifest["max_abs_error_vs_torch"].values()) < 1e-4
    # relative to each output's size where above 1: never more than the difference itself
    scaled = manifest["max_scaled_error_vs_torch"]
    assert all(0 <= scaled[k] <= v for k, v in manifest["max_abs_error_vs_torch"].items())
    router = load_onnx_router(out)
    x = torch.rand(5, 1, *manifest["patch_input"], generator=torch.Generator().manual_seed(3))
    with torch.inference_mode():
        for ort_model, torch_model in zip(router.pool, model.router.pool, strict=True):
            assert torch.allclose(ort_model(x), torch_model(x), atol=1e-4)


def test_monte_carlo_graph_keeps_dropout_random(exported):
    model, out, manifest = exported
    router = load_onnx_router(out)
    h, w = manifest["padded"]
    x = torch.rand(2, 1, h, w, generator=torch.Generator().manual_seed(4))
    a, b = router.f0(x), router.f0(x)
    assert a.shape == (2, manifest["num_classes"], h, w)
    assert torch.allclose(a.sum(1), torch.ones(2, h, w), atol=1e-5)
    assert not torch.equal(a, b)  # fresh masks each call
    # the export copy's masks are dropout's: with dropout off, the graph is f0 alone
    mc = MonteCarloF0(model.router.f0, 3)
    for m in mc.modules():
        if hasattr(m, "p") and not isinstance(m, torch.nn.Dropout):
            m.p = 0.0
    with torch.inference_mode():
        assert torch.allclose(mc(x), model.router.f0(x).softmax(1), atol=1e-6)


def test_routing_on_onnxruntime_agrees_with_torch(exported, mnist_run):
    from paser import PaSeR

    model, out, manifest = exported
    onnx = PaSeR.load_onnx(mnist_run, out)
    images = load_stage_data(model.config, progress=False).validation.images
    a, b = model.segment(images), onnx.segment(images)
    h, w = manifest["height"], manifest["width"]
    assert torch.equal(b.gflops, model.router.costs(h, w).gflops(b.actions))
    assert (a.mask == b.mask).float().mean() > 0.9  # only f0's dropout masks differ
    with pytest.raises(DataError, match=f"export again with --height {h + 2} --width {w}"):
        onnx.segment(torch.rand(1, 1, h + 2, w))
    with pytest.raises(ConfigError, match="runs 2 Monte Carlo passes, not 7"):
        onnx.router.f0.mc_probs(images[:1], 7)


def test_an_onnx_f0_run_once_says_one_pass_when_asked_for_more():
    f0 = OnnxMonteCarlo.__new__(OnnxMonteCarlo)  # the check runs before any session
    f0.samples, f0.last_only = 1, False
    with pytest.raises(ConfigError, match="^the ONNX f0 runs one pass, not 5; export again "
                       "with mc_samples=5$"):
        f0.mc_probs(torch.zeros(1, 1, 8, 8), 5)


def test_the_monte_carlo_graph_keeps_on_the_dropouts_routing_keeps_on():
    """mc_dropout last keeps f0's last dropout alone on, and channel dropout drops whole
    channels, in the export as in PyTorch: the export turned every nn.Dropout of an f0 that
    is not paser's UNet on (0.49 off PyTorch's probabilities here) and left Dropout2d off
    (the same output at every call)."""
    from torch import nn

    from paser.export import MaskDropout
    from paser.uncertainty import mc_predict

    torch.manual_seed(0)
    x = torch.rand(2, 1, 8, 8)
    # the first dropout would change every pass; the last one (p = 0) changes none
    f0 = nn.Sequential(nn.Conv2d(1, 4, 1), nn.Dropout(0.9), nn.Conv2d(4, 3, 1),
                       nn.Dropout(0.0)).eval()
    with torch.no_grad():
        want = mc_predict(f0, x, 3, "last").probs
        assert torch.allclose(MonteCarloF0(f0, 3, last_only=True)(x), want, atol=1e-6)
        channel = MonteCarloF0(nn.Sequential(nn.Conv2d(1, 4, 1), nn.Dropout2d(0.5),
                                             nn.Conv2d(4, 3, 1)).eval(), 3)
        assert not torch.equal(channel(x), channel(x))
        kept = MaskDropout(0.5, channels=True)(torch.ones(2, 6, 4, 4))
    # each channel of each image kept whole (x 2) or dropped whole
    assert torch.equal(kept, kept[..., :1, :1].expand_as(kept))
    assert set(kept.unique().tolist()) <= {0.0, 2.0}
    alpha = nn.Sequential(nn.Conv2d(1, 3, 1), nn.AlphaDropout(0.5))
    with pytest.raises(ConfigError, match="f0's 1 is an AlphaDropout, which the ONNX export "
                                          "cannot keep on"):
        MonteCarloF0(alpha, 3)


def test_cli_export_and_segment_on_onnxruntime(mnist_run, exported_by_cli, tmp_path):
    from PIL import Image

    onnx, stdout = exported_by_cli
    assert "largest |onnxruntime - PyTorch|" in stdout
    manifest = json.loads((onnx / "manifest.json").read_text())
    assert manifest["flop_convention"].startswith("torch.utils")
    size = (manifest["height"], manifest["width"])
    Image.fromarray(np.zeros(size, np.uint8)).save(tmp_path / "a.png")
    res = paser("segment", str(tmp_path / "a.png"), "--run-dir", str(mnist_run), "--out",
                str(tmp_path / "o"), "--engine", "onnxruntime", "--onnx", str(onnx))
    assert res.returncode == 0, res.stderr
    assert (tmp_path / "o" / "a_labels.png").is_file()
    # onnxruntime's labels may differ from PyTorch's in a pixel: one folder is not both's
    res = paser_here("segment", str(tmp_path / "a.png"), "--run-dir", str(mnist_run), "--out",
                     str(tmp_path / "o"))
    assert res.returncode == 2 and "(--engine: onnxruntime there, torch now)" in res.stderr, (
        res.stderr)
    res = paser_here("segment", str(tmp_path / "a.png"), "--run-dir", str(mnist_run), "--out",
                     str(tmp_path / "o"), "--engine", "onnxruntime", "--onnx",
                     str(tmp_path / "no"))
    assert res.returncode == 2 and "run `paser export` into it first" in res.stderr


def test_an_export_of_other_weights_is_refused(exported, mnist_run, tmp_path):
    """The manifest keeps each model's digest: an export of another run (or of this one
    before it was trained again) is not used with this run's calibration and codec."""
    import shutil

    from paser import PaSeR

    _, out, manifest = exported
    assert set(manifest["digests"]) == {"f0", "f1", "f2"}
    other = tmp_path / "onnx"
    shutil.copytree(out, other)
    manifest["digests"]["f1"] = "0" * 64  # as if f1 had been trained again since
    (other / "manifest.json").write_text(json.dumps(manifest))
    with pytest.raises(CheckpointError, match="exported from other weights than .*; export "
                                              "again: paser export --run-dir"):
        PaSeR.load_onnx(mnist_run, other)
    # an export made before the digests were kept: its policy's digest still tells
    older = {k: v for k, v in manifest.items() if k != "digests"} | {"policy": "0" * 64}
    (other / "manifest.json").write_text(json.dumps(older))
    with pytest.raises(CheckpointError, match="exported from other weights than"):
        PaSeR.load_onnx(mnist_run, other)
    older["policy"] = manifest["policy"]  # of this run's policy: used
    (other / "manifest.json").write_text(json.dumps(older))
    assert PaSeR.load_onnx(mnist_run, other).router.policy_digest == manifest["policy"]


def test_missing_file_is_a_clear_error(exported, tmp_path):
    _, out, manifest = exported
    (tmp_path / "manifest.json").write_text(json.dumps(manifest))
    with pytest.raises(CheckpointError, match="f0_mc.onnx, f0.onnx, .* missing; export again"):
        load_onnx_router(tmp_path)


def test_a_manifest_cut_short_or_of_another_tool_is_a_clear_error(tmp_path):
    """A manifest.json cut short (a full disk while export wrote it) or not paser's was a
    JSONDecodeError or KeyError traceback."""
    for text in ('{"height": 28, "width": 28, "padded": [28', '{"models": ["a"]}', "[1, 2]"):
        (tmp_path / "manifest.json").write_text(text)
        with pytest.raises(CheckpointError, match="manifest.json: not a manifest `paser "
                                                  "export` wrote .*; export again"):
            load_onnx_router(tmp_path)


def test_files_of_another_export_or_a_damaged_file_are_refused(exported, tmp_path):
    """An export cut short, or files copied in from another export, under this manifest."""
    import shutil

    _, out, manifest = exported
    assert set(manifest["sha256"]) >= {"f0.onnx", "f1.onnx", "f2.onnx", "policy.onnx"}
    mixed = tmp_path / "mixed"
    shutil.copytree(out, mixed)
    (mixed / "f2.onnx").write_bytes((out / "f1.onnx").read_bytes())
    with pytest.raises(CheckpointError, match="f2.onnx not as `paser export` wrote them"):
        load_onnx_router(mixed)
    damaged = tmp_path / "damaged"
    shutil.copytree(out, damaged)
    (damaged / "f2.onnx").write_bytes(b"not onnx")
    manifest = dict(manifest, sha256={})  # an export made before the files' digests
    (damaged / "manifest.json").write_text(json.dumps(manifest))
    with pytest.raises(CheckpointError, match="f2.onnx: onnxruntime cannot load it .*; export "
                                              "again"):
        load_onnx_router(damaged)


def test_an_export_on_a_machine_without_onnxruntime_says_what_to_install(exported,
                                                                           monkeypatch):
    """An export copied to a machine without the ONNX packages: the missing package is
    named, not the files (which are fine); running it needs onnxruntime alone."""
    import sys

    from paser.export import OnnxModel

    _, out, _ = exported
    monkeypatch.setitem(sys.modules, "onnx", None)  # neither exporter package: still loads
    monkeypatch.setitem(sys.modules, "onnxscript", None)
    assert OnnxModel(out / "f1.onnx").session is not None
    monkeypatch.setitem(sys.modules, "onnxruntime", None)  # import onnxruntime fails
    for folder in (out, out / "not exported yet"):  # said before "run paser export"
        with pytest.raises(ConfigError, match=r"running an ONNX export needs onnxruntime .*"
                                              r"pip install onnxruntime"):
            load_onnx_router(folder)


def test_an_export_off_by_more_than_float32_rounding_is_a_warning(mnist_run, tmp_path,
                                                                   monkeypatch):
    import paser.export

    nan = float("nan")
    manifest = {"files": {"f1": "f1.onnx"}, "onnxruntime": "1.0", "torch": "2.0",
                "max_abs_error_vs_torch": {"f0": nan, "f1": 0.5, "f2": 1e-5},
                "max_scaled_error_vs_torch": {"f0": nan, "f1": 0.01, "f2": 1e-5}}
    monkeypatch.setattr(paser.export, "export_run", lambda *a: manifest)
    res = paser_here("export", "--run-dir", mnist_run, "--out", tmp_path)
    assert res.returncode == 0 and "f1 5.00e-01 (1.0e-02), f2 1.00e-05\n" in res.stdout
    assert ("warning: f0 and f1 on onnxruntime differ from PyTorch by more than float32 "
            "rounding explains (onnxruntime 1.0, torch 2.0)") in res.stderr


def test_one_deterministic_pass_routes_on_f0_alone(exported):
    """With mc_dropout none the ONNX router's f0 is f0.onnx (logits, no dropout), and routing
    matches PyTorch up to float rounding: no dropout masks to differ."""
    import copy

    from paser.export import OnnxRouter

    model, out, manifest = exported
    one_pass = dict(manifest, mc_dropout="none", mc_samples=1)
    router = OnnxRouter(out, one_pass)
    torch_router = copy.copy(model.router)
    torch_router.mc_samples, torch_router.mc_dropout = 1, "none"
    images = load_stage_data(model.config, progress=False).validation.images[:8]
    with torch.inference_mode():
        a, b = torch_router(images, mc_seed=0), router(images)
    assert torch.allclose(a.probs, b.probs, atol=1e-4) and torch.equal(a.actions, b.actions)


def test_a_large_output_off_by_float32_rounding_is_no_warning(mnist_run, tmp_path,
                                                              monkeypatch):
    """Logits of 1e4 off by 8e-3 are a few ulp: their scaled error decides, not the raw one."""
    import paser.export

    manifest = {"files": {"policy": "policy.onnx"}, "onnxruntime": "1.0", "torch": "2.0",
                "max_abs_error_vs_torch": {"policy": 8e-3, "f1": 1e-6},
                "max_scaled_error_vs_torch": {"policy": 8e-7, "f1": 1e-6}}
    monkeypatch.setattr(paser.export, "export_run", lambda *a: manifest)
    res = paser_here("export", "--run-dir", mnist_run, "--out", tmp_path)
    assert res.returncode == 0 and "policy 8.00e-03 (8.0e-07), f1 1.00e-06\n" in res.stdout
    assert "warning" not in res.stderr


def test_each_outputs_error_is_scaled_by_its_own_size(mnist_run, tmp_path, monkeypatch):
    """f1's logits are 1000 and 0.25 and onnxruntime (a fake) puts the 0.25 off by 0.5:
    scaled 0.5, not hidden as 0.5 / 1000 by the large logit beside it."""
    import types

    import paser.export
    from paser import PaSeR

    class Fixed(torch.nn.Module):
        def forward(self, x):
            return torch.cat([x[:, :1] * 0 + 1000.0, x[:, :1] * 0 + 0.25], 1)

    model = PaSeR.load(mnist_run, device="cpu", calibrated=False)
    router = model.router.eval()
    router.pool[0] = Fixed()
    parts = {"f0": router.f0, "policy": router.policy, "f1": router.pool[0],
             "f2": router.pool[1]}

    def session(path, providers):  # onnxruntime as PyTorch, but f1's class 1 off by 0.5
        module = parts[Path(path).stem]

        def run(names, feed):
            with torch.inference_mode():
                out = module(torch.from_numpy(feed["input"])).float().numpy()
            out[:, 1:] += 0.5 if module is parts["f1"] else 0.0
            return [out]
        return types.SimpleNamespace(run=run)

    monkeypatch.setattr(paser.export, "_onnx", lambda m, x, path: path.write_bytes(b"onnx"))
    monkeypatch.setattr(paser.export, "_onnxruntime", lambda *a: types.SimpleNamespace(
        InferenceSession=session, __version__="fake"))
    manifest = paser.export.export_run(model, tmp_path, 28, 28)
    assert manifest["max_abs_error_vs_torch"]["f1"] == pytest.approx(0.5)
    assert manifest["max_scaled_error_vs_torch"]["f1"] == pytest.approx(0.5)
    assert manifest["max_abs_error_vs_torch"]["f2"] == 0.0


def test_a_size_given_to_a_run_routed_in_tiles_is_refused_naming_what_was_given(
        tmp_path, monkeypatch):
    """`paser export --height 64` of a run routed in 32 x 32 tiles said '--height 64 --width
    None', an option the user did not give."""
    from types import SimpleNamespace

    from paser import PaSeR

    monkeypatch.setattr(PaSeR, "load", lambda *a, **k: SimpleNamespace(tile=(32, 32)))
    res = paser_here("export", "--run-dir", str(tmp_path), "--height", "64")
    assert res.returncode == 2
    assert ("--height 64: this run routes every image in tiles of 32 x 32 (data.tile), so its "
            "export runs at that size; leave --height and --width out") in res.stderr, res.stderr
    assert "None" not in res.stderr


def test_a_run_without_monte_carlo_passes_exports_an_f0_with_an_alpha_dropout(mnist_run,
                                                                                tmp_path):
    """With mc_dropout none no dropout is kept on (f0_mc.onnx is not even run), so an f0
    with an nn.AlphaDropout exports as it routes; the export refused it ('... cannot keep on
    for Monte Carlo passes; export a run with mc_dropout none'), which this run is."""
    from torch import nn

    from paser import PaSeR
    from paser.export import export_run

    model = PaSeR.load(mnist_run, device="cpu")
    router = model.router
    router.f0 = nn.Sequential(router.f0, nn.AlphaDropout(0.5)).eval()
    router.mc_dropout, router.mc_samples = "none", 1
    router._costs.clear()
    manifest = export_run(model, tmp_path / "onnx", 28, 28)
    assert manifest["mc_dropout"] == "none" and (tmp_path / "onnx" / "f0_mc.onnx").is_file()
    x = torch.rand(2, 1, 28, 28, generator=torch.Generator().manual_seed(0))
    with torch.inference_mode():  # its graph: f0's one deterministic pass (the dropout off)
        assert torch.allclose(MonteCarloF0(router.f0, 1, active=False)(x),
                              router.f0(x).softmax(1), atol=1e-6)


def test_an_export_copied_without_its_weight_files_says_so(tmp_path):
    """The exporter keeps each graph's weights in `<part>.onnx.data` beside it; an export
    copied without them (the .onnx files and the manifest alone) was refused as 'files of
    another export, or an export cut short', not as the incomplete copy it is."""
    from paser.runtime import file_sha256

    files = {"f0": "f0.onnx", "f1": "f1.onnx"}
    for name in files.values():
        (tmp_path / name).write_bytes(b"graph " + name.encode())
    sha = {name: file_sha256(tmp_path / name) for name in files.values()}
    sha["f1.onnx.data"] = "0" * 64  # written by the export, not copied
    (tmp_path / "manifest.json").write_text(json.dumps({"files": files, "sha256": sha}))
    with pytest.raises(CheckpointError, match=r"f1.onnx.data missing \(the weights `paser "
                                              r"export` writes beside each .onnx file\); copy "
                                              r"the export folder whole, or export again"):
        load_onnx_router(tmp_path)
