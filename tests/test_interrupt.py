"""Killing a stage with SIGKILL at a random point and re-running it with --resume leaves no
corrupted file and ends exactly like an uninterrupted run with the same seed."""

from __future__ import annotations

import json
import random
import shutil
import signal
import subprocess
import sys
import time

import pytest
import torch
from tests.helpers import TINY

from paser.config import load_config
from paser.train import policy as policy_stage
from paser.train.common import MetricLog, resume_state, rng_state
from paser.train.policy import train_policy
from paser.train.pretrain import pretrain

LONGER = [*TINY, "stage1.epochs=3", "models.f0.epochs=3", "stage2.epochs=5", "num_threads=1"]


@pytest.fixture(scope="module")
def straight(tmp_path_factory):
    """Stages 1 and 2 uninterrupted (the synthetic data generated into a shared cache)."""
    tmp = tmp_path_factory.mktemp("straight")
    overrides = [*LONGER, f"data.cache_dir={tmp / 'cache'}"]
    cfg = load_config(preset="battery-quick", overrides=overrides)
    s1 = pretrain(cfg, tmp / "run", show_progress=False)
    s2 = train_policy(None, tmp / "run", show_progress=False)
    return tmp, overrides, s1, s2


def _kill_when(cmd: list[str], log, lines: int) -> None:
    """Run ``paser CMD`` and SIGKILL it once ``log`` has ``lines`` lines (plus a random
    few milliseconds, so the kill lands anywhere in the next epoch)."""
    proc = subprocess.Popen([sys.executable, "-m", "paser", *cmd], stdout=subprocess.DEVNULL,
                            stderr=subprocess.PIPE, text=True)
    deadline = time.monotonic() + 240
    while len(MetricLog(log).read()) < lines:
        assert proc.poll() is None, f"finished before the kill: {proc.stderr.read()}"
        assert time.monotonic() < deadline
        time.sleep(0.01)
    time.sleep(random.Random(lines).uniform(0.0, 0.05))
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    assert proc.returncode == -signal.SIGKILL, "it finished before the kill; kill earlier"


def _loads(run) -> None:
    """Every checkpoint and log the killed process left is whole."""
    for path in (run / "checkpoints").glob("*.pt"):  # a killed save leaves only a .tmp
        torch.load(path, weights_only=False)
    for path in run.glob("*.json"):
        json.loads(path.read_text())


def _strip(records):
    return [{k: v for k, v in r.items() if k != "seconds"} for r in records]


def _resume(cmd, run) -> None:
    res = subprocess.run([sys.executable, "-m", "paser", *cmd, "--run-dir", str(run),
                          "--resume"], capture_output=True, text=True, timeout=300)
    assert res.returncode == 0, res.stderr
    assert not list(run.rglob(".*.tmp")), "the resumed run left a killed save's temporary file"


@pytest.mark.slow  # `paser pretrain` in a process, killed and resumed
@pytest.mark.parametrize("lines", [random.Random(0).randint(1, 6)])
def test_sigkill_in_stage1_then_resume(straight, tmp_path, lines):
    tmp, overrides, s1, _ = straight
    run = tmp_path / "run"
    _kill_when(["pretrain", "--preset", "battery-quick", *overrides, "--run-dir", str(run)],
               run / "metrics" / "stage1.jsonl", lines)
    _loads(run)
    _resume(["pretrain"], run)
    assert json.loads((run / "stage1.json").read_text())["models"] == s1["models"]
    assert _strip(MetricLog(run / "metrics" / "stage1.jsonl").read()) == _strip(
        MetricLog(tmp / "run" / "metrics" / "stage1.jsonl").read())
    # a --resume of the finished stage trains nothing (the models' records written again do
    # not count): what was built on it stays, and so do the files it was trained on
    ledger = json.loads((run / "steps.json").read_text())
    (run / "steps.json").write_text(json.dumps({**ledger, "stage2": {"fingerprint": "x"}}))
    _resume(["pretrain"], run)
    again = json.loads((run / "steps.json").read_text())
    assert again["stage2"] == {"fingerprint": "x"}
    assert again["stage1"]["data"] == ledger["stage1"]["data"]


@pytest.mark.slow  # `paser train-policy` in a process, killed and resumed
def test_sigkill_in_stage2_then_resume(straight, tmp_path):
    tmp, _, _, s2 = straight
    run = tmp_path / "run"
    shutil.copytree(tmp / "run", run, ignore=shutil.ignore_patterns(
        "policy*.pt", "stage2.json*", "stage2.jsonl"))
    _kill_when(["train-policy", "--run-dir", str(run)], run / "metrics" / "stage2.jsonl",
               random.Random(1).randint(1, 4))
    _loads(run)
    _resume(["train-policy"], run)
    got = json.loads((run / "stage2.json").read_text())
    assert {k: v for k, v in got.items() if "seconds" not in k} == {
        k: v for k, v in s2.items() if "seconds" not in k}
    assert _strip(MetricLog(run / "metrics" / "stage2.jsonl").read()) == _strip(
        MetricLog(tmp / "run" / "metrics" / "stage2.jsonl").read())


def test_a_half_written_metric_line_is_dropped_on_resume(tmp_path):
    log = MetricLog(tmp_path / "m.jsonl")
    log.write({"model": "f1", "epoch": 0, "loss": 1.0})
    with open(log.path, "a") as fh:
        fh.write('{"model": "f1", "epo')  # SIGKILL mid-write
    assert log.read() == [{"model": "f1", "epoch": 0, "loss": 1.0}]
    log.truncate_after("f1", 0)
    assert log.path.read_text() == '{"model": "f1", "epoch": 0, "loss": 1.0}\n'


def test_a_kill_between_an_epochs_line_and_its_checkpoint_loses_no_line(tmp_path, monkeypatch):
    """The epoch's line is written before its resume checkpoint: killed between the two, the
    run resumes at that epoch, drops the line and writes it again (the other order would
    resume after an epoch whose line is gone)."""
    import paser.train.common as common

    log, last = MetricLog(tmp_path / "m.jsonl"), tmp_path / "last.pt"
    log.end_epoch({"model": "policy", "epoch": 0}, {"epoch": 0}, last)

    def killed(obj, path):
        raise KeyboardInterrupt  # stands for SIGKILL after the line, before the checkpoint

    monkeypatch.setattr(common, "atomic_save", killed)
    with pytest.raises(KeyboardInterrupt):
        log.end_epoch({"model": "policy", "epoch": 1}, {"epoch": 1}, last)
    assert [r["epoch"] for r in log.read()] == [0, 1]
    resumed = torch.load(last)["epoch"] + 1  # what --resume starts from
    log.truncate_after("policy", resumed - 1)
    assert (resumed, [r["epoch"] for r in log.read()]) == (1, [0])


def test_a_resume_on_a_gpu_restores_the_cpu_and_gpu_random_states(tmp_path, monkeypatch):
    """Trained on a GPU, the last-epoch checkpoint keeps that GPU's random state beside the
    CPU's, and a resume there restores both (dropout and exploration draw on the GPU). The
    checkpoint is read onto the CPU: read onto the GPU, the CPU's state (then a GPU tensor)
    stopped every resume ('RNG state must be a torch.ByteTensor'). torch.cuda is stood in
    for, so that the test runs without a GPU."""
    gpu, drawn, restored = torch.device("cuda", 0), torch.arange(16, dtype=torch.uint8), []
    monkeypatch.setattr(torch.cuda, "get_rng_state", lambda device: drawn.clone())
    monkeypatch.setattr(torch.cuda, "set_rng_state",
                        lambda state, device: restored.append((state, device)))
    model, last = torch.nn.Linear(2, 2), tmp_path / "last.pt"
    torch.manual_seed(3)
    torch.save({"model": model.state_dict(), **rng_state(gpu), "epoch": 0}, last)
    expected = torch.rand(3)  # what the next epoch draws
    torch.manual_seed(4)
    assert resume_state(last, True, gpu, {"model": model})["epoch"] == 0
    assert torch.equal(torch.rand(3), expected)
    assert [(state.tolist(), device) for state, device in restored] == [(drawn.tolist(), gpu)]


def test_a_resume_on_the_cpu_leaves_cuda_alone(tmp_path, monkeypatch):
    """On the CPU the checkpoint holds the CPU's random state alone, and a resume restores
    it without a call into torch.cuda (from a GPU run's checkpoint too: continued on the
    CPU, its GPU state is not used)."""
    def no_cuda(*args):
        raise AssertionError("torch.cuda was called on the CPU")

    monkeypatch.setattr(torch.cuda, "get_rng_state", no_cuda)
    monkeypatch.setattr(torch.cuda, "set_rng_state", no_cuda)
    cpu, last = torch.device("cpu"), tmp_path / "last.pt"
    assert list(rng_state(cpu)) == ["rng"]
    torch.save({**rng_state(cpu), "cuda_rng": torch.zeros(16, dtype=torch.uint8)}, last)
    expected = torch.rand(3)
    resume_state(last, True, cpu, {})
    assert torch.equal(torch.rand(3), expected)


@pytest.mark.slow
def test_stage2_resumed_after_a_new_config_was_cut_short_trains_that_config(tmp_path,
                                                                           monkeypatch):
    """Stage 2 again with another lam, cut short before its first epoch ended, then
    --resume: the policy of the lam before (its last checkpoint at its last epoch) must not
    be taken for the new one's; it ends as a fresh stage 2 with the new lam."""
    def cfg_with(*extra):
        return load_config(preset="battery-quick", overrides=[
            *TINY, *extra, f"data.cache_dir={tmp_path / 'cache'}"])

    run, fresh = tmp_path / "run", tmp_path / "fresh"
    pretrain(cfg_with(), run, show_progress=False)
    shutil.copytree(run, fresh)
    train_policy(None, run, show_progress=False)
    changed = cfg_with("stage2.lam=0.1")

    def interrupted(*args, **kwargs):
        raise KeyboardInterrupt  # in the first epoch of the new settings

    monkeypatch.setattr(policy_stage, "validate", interrupted)
    with pytest.raises(KeyboardInterrupt):
        train_policy(changed, run, show_progress=False)
    monkeypatch.undo()
    resumed = train_policy(None, run, resume=True, show_progress=False)
    straight = train_policy(changed, fresh, show_progress=False)
    assert resumed["lam"] == straight["lam"] == 0.1
    assert resumed["best_val"] == straight["best_val"]
    a = torch.load(run / "checkpoints" / "policy.pt", weights_only=False)["policy"]
    b = torch.load(fresh / "checkpoints" / "policy.pt", weights_only=False)["policy"]
    assert all(torch.equal(v, b[k]) for k, v in a.items() if isinstance(v, torch.Tensor))


@pytest.mark.slow
def test_stage3_resumed_after_a_new_config_was_cut_short_trains_that_config(tmp_path,
                                                                           monkeypatch):
    """Stage 3 again with another learning rate, cut short in its first epoch, then
    --resume: the fine-tuning of the settings before must not be taken for the new one's."""
    from paser.train import finetune as stage3

    def cfg_with(*extra):
        return load_config(preset="battery-quick", overrides=[
            *TINY, *extra, f"data.cache_dir={tmp_path / 'cache'}"])

    run, fresh = tmp_path / "run", tmp_path / "fresh"
    pretrain(cfg_with(), run, show_progress=False)
    train_policy(None, run, show_progress=False)
    shutil.copytree(run, fresh)
    stage3.finetune(None, run, show_progress=False)
    changed = cfg_with("stage3.lr=0.01")

    def interrupted(*args, **kwargs):
        raise KeyboardInterrupt  # in the first batch of the new settings

    monkeypatch.setattr(stage3, "_joint_step", interrupted)
    with pytest.raises(KeyboardInterrupt):
        stage3.finetune(changed, run, show_progress=False)
    monkeypatch.undo()
    resumed = stage3.finetune(None, run, resume=True, show_progress=False)
    straight = stage3.finetune(changed, fresh, show_progress=False)
    assert resumed["best"] == straight["best"]
    a = torch.load(run / "checkpoints" / "stage3.pt", weights_only=False)
    b = torch.load(fresh / "checkpoints" / "stage3.pt", weights_only=False)
    assert a["epoch"] == b["epoch"]
    assert all(torch.equal(v, b["policy"][k]) for k, v in a["policy"].items()
               if isinstance(v, torch.Tensor))
