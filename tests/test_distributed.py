"""Data-parallel training on Lightning Fabric, 2 CPU processes over gloo: stages 1 and 2
end where one process with the same global batch ends, and only rank 0 writes."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys

import pytest
import torch

from paser.config import load_config
from paser.train.common import MetricLog
from paser.train.policy import train_policy
from paser.train.pretrain import pretrain

# every test launches 2 training processes over gloo
pytestmark = pytest.mark.slow

# No dropout and no class weights: with those, the 2 processes' averaged gradient is the
# global batch's, so stage 1 differs from one process only by float summation order.
TINY = [
    "data.synthetic.n_train=9", "data.synthetic.n_val=2", "data.synthetic.n_test=2",
    "data.synthetic.height=32", "data.synthetic.width=32", "grid=[2, 2]", "mc_samples=2",
    "mc_dropout=all", "stage1.epochs=2", "stage1.batch_size=4", "models.f0.epochs=2",
    "models.pool.0.epochs=null", "models.pool.1.epochs=null", "stage1.class_weights=null",
    "models.f0.kwargs={dropout: 0.0}",
    "models.pool.0.kwargs={c0: 2, widths: [4, 4], dropout: 0.0}",
    "models.pool.1.kwargs={c0: 4, widths: [8, 8], dropout: 0.0}",
    "stage2.epochs=3", "stage2.batch_size=4", "stage3.epochs=2", "stage3.batch_size=4",
    "stage2.train_on=rl",
    "num_threads=1", "baselines.monolithic={}",
    "baselines.matphase.members=[{name: unet_tiny, kwargs: {dropout: 0.0}}]",
    "baselines.matphase.fusion_channels=4",
]
#: stage 1: |mIoU difference| allowed (measured: 0); stage 2: the policy's BatchNorm sees
#: each process's share on CPU (SyncBatchNorm needs GPUs), so a looser one (measured: 0)
STAGE1_TOL, STAGE2_TOL = 0.01, 0.05


def _paser(*args):
    res = subprocess.run([sys.executable, "-m", "paser", *map(str, args)], capture_output=True,
                         text=True, timeout=300)
    assert res.returncode == 0, res.stderr
    return res


def _files(run):
    """The run's files, but the ledger that only the CLI's stage commands write."""
    return sorted(str(p.relative_to(run)) for p in run.rglob("*")
                  if p.is_file() and p.name != "steps.json")


@pytest.fixture(scope="module")
def single(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("dist")
    overrides = [*TINY, f"data.cache_dir={tmp / 'cache'}"]
    cfg = load_config(preset="battery-quick", overrides=overrides)
    pretrain(cfg, tmp / "one", show_progress=False)
    return tmp, overrides


def test_stage1_on_two_processes_matches_one(single):
    tmp, overrides = single
    # the two processes also read their shares from disk, each with a reader process
    res = _paser("pretrain", "--preset", "battery-quick", *overrides, "data.stream=always",
                 "data.workers=1", "--devices", 2, "--run-dir", tmp / "two")
    assert res.stdout.count("summary:") == 1  # the worker process says nothing
    one, two = (json.loads((tmp / r / "stage1.json").read_text())["models"]
                for r in ("one", "two"))
    for role in one:
        for split in ("validation_miou", "test_miou"):
            assert abs(one[role][split] - two[role][split]) <= STAGE1_TOL, (role, split)
    # only rank 0 wrote: the same files, one metric line per model and epoch
    assert _files(tmp / "two") == _files(tmp / "one")
    strip = [{k: v for k, v in r.items() if k not in ("seconds", "loss", "train_miou")}
             for r in MetricLog(tmp / "two" / "metrics" / "stage1.jsonl").read()]
    assert [(r["model"], r["epoch"]) for r in strip] == [
        ("f1", 0), ("f1", 1), ("f2", 0), ("f2", 1), ("f0", 0), ("f0", 1)]
    # the same weights up to Adam's amplification of summation-order noise
    for role in one:
        a = torch.load(tmp / "one" / "checkpoints" / f"{role}_last.pt", weights_only=False)
        b = torch.load(tmp / "two" / "checkpoints" / f"{role}_last.pt", weights_only=False)
        assert max((a["model"][k] - b["model"][k]).abs().max().item() for k in a["model"]) < 0.05


def test_stage2_on_two_processes_matches_one(single):
    tmp, _ = single
    for name in ("s2one", "s2two"):
        shutil.copytree(tmp / "one", tmp / name)
    one = train_policy(None, tmp / "s2one", show_progress=False)["best_val"]
    res = _paser("train-policy", "--run-dir", tmp / "s2two", "--devices", 2, "--precision",
                 "bf16-mixed")
    assert res.stdout.count("stage 2 done") == 1
    # the policy trains in 32-bit on the CPU however stage 1 did (Fabric autocasts what it
    # sets up: it is launched in 32-bit); so does stage 3, below
    assert "bfloat16" not in res.stdout + res.stderr
    two = json.loads((tmp / "s2two" / "stage2.json").read_text())["best_val"]
    assert abs(one["miou"] - two["miou"]) <= STAGE2_TOL
    assert abs(one["reward"] - two["reward"]) <= STAGE2_TOL
    assert _files(tmp / "s2two") == _files(tmp / "s2one")
    assert len(MetricLog(tmp / "s2two" / "metrics" / "stage2.jsonl").read()) == 3
    saved = load_config(config_file=tmp / "s2two" / "config.yaml")
    assert saved.distributed.devices == 2  # how it was trained is recorded
    # stage 3 on top: no DDP there (a process may route no patch to a model), the gradients
    # of every process's losses, sums over the whole batch's count, are summed instead
    from paser.train.finetune import finetune

    one3 = finetune(None, tmp / "s2one", show_progress=False)["best"]
    res = _paser("finetune", "--run-dir", tmp / "s2two", "--devices", 2, "--precision",
                 "bf16-mixed")
    assert res.stdout.count("stage 3 done") == 1 and "bfloat16" not in res.stdout + res.stderr
    two3 = json.loads((tmp / "s2two" / "stage3.json").read_text())["best"]
    if one3 is None or two3 is None:
        assert one3 == two3
    else:
        assert abs(one3["miou"] - two3["miou"]) <= STAGE2_TOL
    # the stage commands record themselves: `paser run` skips them, and runs in one process
    steps = json.loads((tmp / "s2two" / "steps.json").read_text())
    assert set(steps) == {"stage2", "stage3"}  # stage 1 was trained in-process
    from paser.run import fingerprints, record_stage

    record_stage(tmp / "s2two", saved, "stage2", changed=False)  # a resume with nothing to do
    assert set(json.loads((tmp / "s2two" / "steps.json").read_text())) == {"stage2", "stage3"}
    record_stage(tmp / "s2two", saved, "stage1")  # as `paser pretrain` does
    steps = json.loads((tmp / "s2two" / "steps.json").read_text())
    assert set(steps) == {"stage1"}  # a new stage 1 strikes off the stage 2 that read it
    assert steps["stage1"]["fingerprint"] == fingerprints(saved)["stage1"]


def test_baselines_on_two_processes(single):
    tmp, overrides = single
    res = _paser("baselines", "--preset", "battery-quick", *overrides, "--devices", 2,
                 "--run-dir", tmp / "b2")
    assert res.stdout.count("baselines trained: matphase") == 1
    lines = MetricLog(tmp / "b2" / "metrics" / "baselines.jsonl").read()
    assert [(r["model"], r["epoch"]) for r in lines] == [("base_matphase_m0", 0),
                                                          ("base_matphase_m0", 1)]
    # a gate chosen among the candidates: -1 fuses every pixel, inf none, else a quantile
    assert torch.load(tmp / "b2" / "checkpoints" / "base_matphase.pt",
                      weights_only=False)["tau"] >= -1
    assert json.loads((tmp / "b2" / "steps.json").read_text()).keys() == {"baselines"}
