"""Training precision: ``distributed.precision auto`` resolves to bf16 only where the device
computes it natively, one process autocasts its convolutions itself, the policy's MLPs stay
32-bit on the CPU, and stage 1 in bf16 keeps 32-bit weights and says what it used."""

import inspect
import os

import pytest
import torch
from tests.test_pretrain import TINY
from torch import nn

from paser.config import load_config
from paser.errors import ConfigError
from paser.train import distributed as D
from paser.train import pretrain as stage1
from paser.train.pretrain import pretrain


@pytest.mark.parametrize("forced, expected", [("1", "bf16-mixed"), ("0", "32-true")])
def test_auto_follows_whether_the_cpu_computes_bf16(monkeypatch, forced, expected):
    monkeypatch.setenv("PASER_BF16", forced)
    assert D.resolve_precision("auto", torch.device("cpu")) == expected
    for explicit in ("32-true", "bf16-mixed"):  # an explicit choice is kept as it is
        assert D.resolve_precision(explicit, torch.device("cpu")) == explicit


@pytest.mark.parametrize("flags, native", [("fpu sse2 avx512f avx512_bf16", True),
                                           ("fpu sse2 amx_bf16 amx_tile", True),
                                           ("fpu sse2 avx2 avx512f", False)])
def test_without_the_variable_the_cpus_flags_decide(monkeypatch, tmp_path, flags, native):
    import builtins

    info = tmp_path / "cpuinfo"
    info.write_text(f"processor\t: 0\nmodel name\t: a CPU\nflags\t\t: {flags}\n")
    real = builtins.open

    def cpuinfo(text_file):  # open() with /proc/cpuinfo read from text_file (None: absent)
        def fake(path, *args, **kwargs):
            if str(path) != "/proc/cpuinfo":
                return real(path, *args, **kwargs)
            if text_file is None:
                raise FileNotFoundError(path)
            return real(text_file, *args, **kwargs)
        return fake

    monkeypatch.setattr(builtins, "open", cpuinfo(info))
    monkeypatch.delenv("PASER_BF16")
    assert D.native_bf16(torch.device("cpu")) is native
    assert D.resolve_precision("auto", torch.device("cpu")) == ("bf16-mixed" if native
                                                                else "32-true")
    monkeypatch.setattr(builtins, "open", cpuinfo(None))
    assert D.native_bf16(torch.device("cpu")) is False  # no /proc (macOS, Windows): 32-bit


def test_a_forced_answer_other_than_0_or_1_is_refused(monkeypatch):
    monkeypatch.setenv("PASER_BF16", "yes")
    with pytest.raises(ConfigError, match="PASER_BF16='yes': give 0"):
        D.resolve_precision("auto", torch.device("cpu"))


def test_one_process_autocasts_convolutions_and_keeps_the_policy_32_bit(monkeypatch):
    monkeypatch.setenv("PASER_BF16", "1")
    cfg = load_config(preset="battery-quick", overrides=["device=cpu"])
    dist = D.launch(cfg)
    assert dist.fabric is None and dist.precision == "bf16-mixed"  # no Fabric for one process
    conv, x = nn.Conv2d(1, 2, 3), torch.randn(1, 1, 8, 8)
    with dist.autocast():
        assert conv(x).dtype == torch.bfloat16
    with dist.autocast(convolutional=False):
        assert conv(x).dtype == torch.float32
    monkeypatch.setenv("PASER_BF16", "0")
    with D.launch(cfg).autocast():
        assert conv(x).dtype == torch.float32


@pytest.mark.slow
def test_stage1_in_bf16_keeps_float32_weights_and_records_its_precision(tmp_path, monkeypatch):
    cfg = load_config(preset="battery-quick", overrides=[
        *TINY, "distributed.precision=bf16-mixed", f"data.cache_dir={tmp_path / 'cache'}"])
    # the per-epoch validation runs in training's precision; the reported figures in 32-bit
    seen = {"fit": [], "summary": []}
    evaluate = stage1.evaluate_miou

    def recording(*args, **kwargs):
        caller = "fit" if inspect.stack()[1].function == "fit" else "summary"
        seen[caller].append(torch.is_autocast_enabled("cpu"))
        return evaluate(*args, **kwargs)

    monkeypatch.setattr(stage1, "evaluate_miou", recording)
    summary = pretrain(cfg, tmp_path / "run", show_progress=False)
    assert summary["precision"] == "bf16-mixed"
    assert seen["fit"] and all(seen["fit"]) and seen["summary"] and not any(seen["summary"])
    state = torch.load(tmp_path / "run" / "checkpoints" / "f2.pt", weights_only=False)["model"]
    assert {t.dtype for t in state.values() if t.is_floating_point()} == {torch.float32}
    for role, m in summary["models"].items():
        assert 0.0 < m["test_miou"] <= 1.0, role


def test_models_train_in_the_default_layout_in_every_precision():
    cpu = torch.device("cpu")
    for precision in ("32-true", "bf16-mixed"):
        weight = D.Dist(cpu, precision=precision).place(nn.Conv2d(4, 4, 3)).weight
        assert weight.is_contiguous() and not weight.is_contiguous(
            memory_format=torch.channels_last), precision


def test_the_tests_run_on_avx2s_code_paths_where_the_cpu_has_avx2():
    """conftest keeps oneDNN, ATen and MKL on AVX2's kernels, so that pinned figures do not
    move with a draw's AVX-512 (torch's own reading of the capability, not only the variables)."""
    if "avx2" not in D._cpuinfo().get("flags", "").split():
        pytest.skip("no AVX2: the libraries' own choice")
    assert {k: os.environ.get(k) for k in ("ONEDNN_MAX_CPU_ISA", "ATEN_CPU_CAPABILITY",
                                           "MKL_CBWR")} == {
        "ONEDNN_MAX_CPU_ISA": "AVX2", "ATEN_CPU_CAPABILITY": "avx2", "MKL_CBWR": "AVX2"}
    assert torch.backends.cpu.get_cpu_capability() == "AVX2"
