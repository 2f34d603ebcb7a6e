"""Data-parallel training's bookkeeping, one process standing in for one of several (a
stand-in for Lightning Fabric that answers as the other processes would): what every
process must draw, weigh or keep alike."""

from __future__ import annotations

import contextlib

import pytest
import torch

from paser.train.distributed import Dist
from paser.train.finetune import explore_greedy
from paser.train.policy import explore


class OtherRank:
    """Fabric as rank 1 of 2 sees it: a broadcast from rank 0 gives ``rank0_rng`` (rank
    0's generator state) for a generator state."""

    global_rank, world_size = 1, 2

    def __init__(self, rank0_rng: torch.Tensor):
        self.rank0_rng = rank0_rng

    def broadcast(self, obj, src=0):
        assert src == 0 and obj.dtype == torch.uint8
        return self.rank0_rng.clone()


def _rank0_state(seed: int) -> torch.Tensor:
    return torch.Generator().manual_seed(seed).get_state()


def test_same_draws_are_rank_0s_and_leave_the_process_its_own():
    dist = Dist(torch.device("cpu"), OtherRank(_rank0_state(1)))
    torch.manual_seed(2)  # this process's generator, moved on by its own dropout
    with dist.same_draws():
        drawn = torch.randperm(10)
    assert drawn.tolist() == torch.randperm(10, generator=torch.Generator().manual_seed(1)).tolist()
    assert torch.rand(3).tolist() == torch.rand(3, generator=torch.Generator().manual_seed(2)).tolist()


def test_exploration_on_another_process_is_its_rows_of_rank_0s():
    logits = torch.randn(2, 4, 3, generator=torch.Generator().manual_seed(0))  # [B, P, K+1]
    rank0 = _rank0_state(1)
    for alpha in (0.0, 1.0):  # uniformly at random, then sampled from the policy
        torch.set_rng_state(rank0)
        whole = explore(logits, alpha, torch.arange(2), 2)  # one process, the whole batch
        torch.manual_seed(99)  # rank 1's own generator is elsewhere
        share = explore(logits[1:], alpha, torch.tensor([1]), 2,
                        Dist(torch.device("cpu"), OtherRank(rank0)))
        assert share.tolist() == whole[1:].tolist()
    torch.set_rng_state(rank0)
    whole = explore_greedy(logits, 0.0, torch.arange(2), 2)
    torch.manual_seed(99)
    share = explore_greedy(logits[1:], 0.0, torch.tensor([1]), 2,
                           Dist(torch.device("cpu"), OtherRank(rank0)))
    assert share.tolist() == whole[1:].tolist()


class Rank1Fabric(OtherRank):
    """Rank 1's Fabric for a training loop: no DDP wrapper, its own gradients, sums and
    barriers as one process's (what crosses processes is what the test looks at)."""

    def __init__(self):
        super().__init__(_rank0_state(0))

    def setup(self, model, opt):
        return model, opt

    def backward(self, loss):
        loss.backward()

    def all_reduce(self, value, reduce_op="sum"):
        return value

    def barrier(self):
        pass

    def autocast(self):
        return contextlib.nullcontext()


def test_stage1_validates_rank_0s_batchnorm_statistics_of_the_weight_average(tmp_path,
                                                                             monkeypatch):
    from paser.checkpoints import build_model
    from paser.config import load_config
    from paser.data import Tensors
    from paser.patches import PatchGrid
    from paser.train import pretrain
    from paser.train.common import MetricLog

    cfg = load_config(preset="battery-quick", overrides=[
        "grid=[2, 2]", "halo=0", "stage1.ema=0.9", "stage1.class_weights=null",
        "models.pool.0.kwargs={c0: 2, widths: [4, 4], norm: batch}"])
    spec = cfg.models.pool[0]
    gen = torch.Generator().manual_seed(0)
    data = Tensors(torch.rand(4, cfg.models.in_channels, 16, 16, generator=gen),
                   torch.randint(cfg.models.num_classes, (4, 16, 16), generator=gen,
                                 dtype=torch.uint8), [str(i) for i in range(4)])
    # rank 0's buffers, as a broadcast from it brings them: every value 0.25
    monkeypatch.setattr(torch.distributed, "broadcast", lambda t, src: t.fill_(0.25))
    validated = []

    def evaluate(model, *args, **kwargs):
        validated.append([b.clone() for b in model.buffers() if b.is_floating_point()])
        return 0.5

    monkeypatch.setattr(pretrain, "evaluate_miou", evaluate)
    pretrain.fit("f1", build_model(cfg, spec), pretrain.patchwise(PatchGrid(2, 2)),
                 pretrain.weighted_ce(cfg, torch.device("cpu")), data, data, cfg=cfg, epochs=1,
                 lr=1e-3, run_dir=tmp_path, log=MetricLog(tmp_path / "m.jsonl"), resume=False,
                 device=torch.device("cpu"), show_progress=False, spec=spec,
                 dist=Dist(torch.device("cpu"), Rank1Fabric()))
    # the early stop and the best checkpoint read the model rank 0 keeps, in every process
    # (an average of this process's own statistics could stop one process and not another)
    assert len(validated) == 1 and validated[0]
    assert all(bool((b == 0.25).all()) for b in validated[0])


class Summing(OtherRank):
    """Fabric whose sums over the processes add ``others``, what the other processes hold."""

    def __init__(self, others: torch.Tensor):
        super().__init__(_rank0_state(0))
        self.others = others

    def all_reduce(self, value, reduce_op="sum"):
        return value + self.others


def test_class_weighted_loss_of_unequal_shares_averages_to_the_batch_loss():
    from paser.train.pretrain import masked_ce

    gen = torch.Generator().manual_seed(0)
    weight = torch.tensor([0.2, 1.0, 3.0])
    logits = torch.randn(3, 3, 4, 4, generator=gen)
    y = torch.randint(3, (3, 4, 4), generator=gen)
    y[0, :2] = 2  # the shares' class mix differs, and
    y[2, 1:] = -1  # one share's image is mostly unlabelled
    shares = [torch.tensor([0, 2]), torch.tensor([1])]  # a batch of 3 on 2 processes

    def grad(fn) -> torch.Tensor:
        x = logits.clone().requires_grad_(True)
        fn(x).backward()
        return x.grad

    whole = grad(lambda x: masked_ce(x, y, weight))  # one process
    mass = [float(weight[y[s][y[s] >= 0]].sum()) for s in shares]

    def averaged(x):  # as DDP averages fit's share losses, each weighed by its share's images
        loss = 0
        for r, s in enumerate(shares):
            others = torch.tensor([mass[1 - r], float(len(shares[1 - r]))], dtype=torch.float64)
            dist = Dist(torch.device("cpu"), Summing(others))
            loss = loss + masked_ce(x[s], y[s], weight, dist) * (len(s) * 2 / 3) / 2
        return loss

    assert torch.allclose(grad(averaged), whole, atol=1e-7)
    assert masked_ce(logits, y, weight, Dist(torch.device("cpu"))) == masked_ce(logits, y, weight)


class Recording:
    """Fabric as rank ``rank`` of 2 sees it in stage 2's loop: rank 0 records the generator
    states it broadcasts, rank 1 gets them back in the same order; sums and gradients are
    the process's own (what crosses processes here is the generator)."""

    world_size = 2

    def __init__(self, rank: int, sent: list[torch.Tensor]):
        self.global_rank, self.sent = rank, sent

    def broadcast(self, obj, src=0):
        if self.global_rank == 0:
            self.sent.append(obj.clone())
            return obj
        return self.sent.pop(0)

    def backward(self, loss):
        loss.backward()

    def all_reduce(self, value, reduce_op="sum"):
        return value


def test_stage2_walks_one_batch_order_in_every_process_epoch_after_epoch():
    """Stage 2's exploration draws rank 0's numbers in every process (Dist.same_draws), which
    moves rank 0's generator on and leaves the others' where they were: the next epoch's
    batch order, drawn outside it, then differed (an image trained twice, another not at all)."""
    from torch import nn

    from paser.train.policy import policy_epoch

    n, patches, actions = 6, 4, 3
    states = torch.arange(n, dtype=torch.float32).view(n, 1, 1, 1).expand(n, 1, 2, 2)
    patch_iou = torch.rand(n, patches, actions, generator=torch.Generator().manual_seed(0))

    class Policy(nn.Module):  # logits [b, P, K+1]; records the images each process trains
        def __init__(self):
            super().__init__()
            self.head = nn.Linear(4, patches * actions)
            self.seen: list[int] = []

        def forward(self, x):
            self.seen += x[:, 0, 0, 0].long().tolist()
            return self.head(x.flatten(1)).view(len(x), patches, actions)

    sent: list[torch.Tensor] = []
    seen = []
    for rank in (0, 1):  # each process seeded alike, as Fabric's processes are
        torch.manual_seed(0)
        policy = Policy()
        opt = torch.optim.SGD(policy.parameters(), lr=0.1)
        dist = Dist(torch.device("cpu"), Recording(rank, sent))
        epochs = []
        for _ in range(3):
            policy.seen = []
            policy_epoch(policy, opt, states, patch_iou, torch.tensor([0.0, 0.3, 0.7]), 0.1,
                         0.5, 2, dist)
            epochs.append(policy.seen)
        seen.append(epochs)
    for epoch in range(3):  # each batch of 2 split 1 + 1: every image once an epoch
        assert sorted(seen[0][epoch] + seen[1][epoch]) == list(range(n)), epoch


def _main_raising(monkeypatch, error: BaseException, argv: list[str]) -> int:
    """The exit status of ``paser.cli.main()`` for ``argv`` where the command raises
    ``error`` (its SIGTERM handler put back after)."""
    import signal
    import sys

    import paser.cli

    def app(**_):
        raise error

    monkeypatch.setattr(paser.cli, "app", app)
    monkeypatch.setattr(sys, "argv", argv)
    before = signal.getsignal(signal.SIGTERM)
    try:
        with pytest.raises(SystemExit) as stopped:
            paser.cli.main()
    finally:
        signal.signal(signal.SIGTERM, before)
    return stopped.value.code


def test_a_process_whose_peer_stopped_says_so_in_one_line(monkeypatch, capsys):
    """Rank 1 fails (its own error, one line); rank 0's next collective then fails with
    gloo's "Connection closed by peer": that is one line too, pointing at the error above,
    not a traceback of 150 lines. Outside a process group of several, a RuntimeError is
    not taken for it."""
    import sys
    import types

    import paser.cli

    class Backend(RuntimeError):
        pass

    group = types.SimpleNamespace(is_available=lambda: True, is_initialized=lambda: True,
                                  get_world_size=lambda: 2, DistBackendError=Backend)
    monkeypatch.setitem(sys.modules, "torch.distributed", group)
    gone = RuntimeError("[pair.cc:561] Connection closed by peer [127.0.0.1]:59527. This is "
                        "typically caused by a remote worker crashing.\nmore")
    assert paser.cli._peer_stopped(gone) and paser.cli._peer_stopped(Backend("NCCL aborted"))
    assert not paser.cli._peer_stopped(RuntimeError("shapes do not match"))
    group.get_world_size = lambda: 1
    assert not paser.cli._peer_stopped(gone)
    group.get_world_size = lambda: 2

    assert _main_raising(monkeypatch, gone, ["paser", "pretrain"]) == 1
    assert capsys.readouterr().err == (
        "error: another process of this distributed training stopped, so this one stops too; "
        "its error is above (the connection to it: [pair.cc:561] Connection closed by peer "
        "[127.0.0.1]:59527. This is typically caused by a remote worker crashing.; --debug "
        "shows this process's traceback)\n")


@pytest.mark.parametrize("rank", [0, 1])
def test_ctrl_c_of_a_distributed_stage_says_how_to_go_on_once(rank, monkeypatch, capsys):
    """Ctrl-C reaches every process of the terminal's group, the launched ones too: rank 0
    says how to go on, the others stop with the same status and say nothing (2 processes
    printed the line twice)."""
    import sys


    monkeypatch.setattr(sys, "stdout", sys.stdout)  # a worker's main() silences its stdout
    for key in ("RANK", "LOCAL_RANK", "NODE_RANK"):
        monkeypatch.delenv(key, raising=False)
    if rank:
        monkeypatch.setenv("RANK", str(rank))
        monkeypatch.setenv("LOCAL_RANK", str(rank))
    assert _main_raising(monkeypatch, KeyboardInterrupt(),
                         ["paser", "pretrain", "--run-dir", "r", "--devices", "2"]) == 130
    assert capsys.readouterr().err == ("" if rank else "interrupted; re-run with --resume to "
                                       "continue from the last epoch\n")


def _tiny(tmp_path) -> list[str]:
    """Overrides of a stage that, were it not refused, would train in seconds."""
    return ["data.synthetic.n_train=4", "data.synthetic.n_val=2", "data.synthetic.n_test=2",
            "data.synthetic.height=32", "data.synthetic.width=32", "grid=[2, 2]",
            "models.pool.0.epochs=1", "models.pool.1.epochs=1", "models.f0.epochs=1",
            "num_threads=1",
            f"data.cache_dir={tmp_path / 'cache'}"]


def test_16_mixed_on_the_cpu_is_refused_before_any_work(tmp_path):
    """Fabric trains 16-mixed on the CPU in bf16-mixed (with a warning), while stage1.json
    recorded 16-mixed and the bar showed 'val mIoU (16)': refused, before the data is read,
    and the run folder the command made is gone. Stage 3 trains in 32-bit: no refusal."""
    from tests.helpers import paser_here

    run = tmp_path / "r"
    res = paser_here("pretrain", "--preset", "battery-quick", *_tiny(tmp_path), "device=cpu",
                     "--run-dir", run, "--precision", "16-mixed")
    assert res.returncode == 2 and not run.exists() and not (tmp_path / "cache").exists()
    assert res.stderr == ("error: precision 16-mixed (--precision, distributed.precision) "
                          "needs CUDA, and this stage trains on the cpu, where Fabric would "
                          "train in bf16-mixed instead; give bf16-mixed, 32-true or auto\n")
    from paser.config import load_config
    from paser.train.distributed import check_devices

    cfg = load_config(preset="battery-quick", overrides=["device=cpu",
                                                         "distributed.precision=16-mixed"])
    check_devices(cfg, "32-true")


def test_more_gpus_than_cuda_sees_are_refused_before_any_work(tmp_path, monkeypatch):
    """--devices 2 on a machine whose CUDA sees one GPU: Fabric's MisconfigurationException
    came as a traceback once the stage had read its data; refused first, in one line."""
    from tests.helpers import paser_here

    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 1)
    run = tmp_path / "r"
    res = paser_here("pretrain", "--preset", "battery-quick", *_tiny(tmp_path), "device=cuda",
                     "--run-dir", run, "--devices", 2)
    assert res.returncode == 2 and not run.exists() and not (tmp_path / "cache").exists()
    assert res.stderr == ("error: --devices 2 (distributed.devices) asks for 2 GPUs on this "
                          "machine, and CUDA sees 1: give --devices 1 or fewer "
                          "(CUDA_VISIBLE_DEVICES says which GPUs it sees)\n")


def test_rank_0_stopped_alone_stops_the_processes_it_launched(monkeypatch, capsys):
    """SIGTERM (or SIGINT) to rank 0 alone, as `kill PID` or a service manager sends it: the
    worker went on until its next exchange failed, then said 'another process ... stopped
    ... its error is above' of a run with no error, and ended with status 1. Rank 0 now
    passes SIGTERM on to the processes it launched, which end on it at once, silently."""
    import signal
    import subprocess
    import sys

    import paser.cli
    from paser.train import distributed

    worker = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
    monkeypatch.setattr(distributed, "WORKERS", [worker])

    def app(**_):
        raise KeyboardInterrupt

    monkeypatch.setattr(paser.cli, "app", app)
    monkeypatch.setattr(sys, "argv", ["paser", "pretrain", "--run-dir", "r", "--devices", "2"])
    for key in ("RANK", "LOCAL_RANK", "NODE_RANK"):
        monkeypatch.delenv(key, raising=False)
    before = signal.getsignal(signal.SIGTERM)
    try:
        with pytest.raises(SystemExit) as stopped:
            paser.cli.main()
        assert worker.wait(timeout=10) == -signal.SIGTERM
    finally:
        signal.signal(signal.SIGTERM, before)
        worker.kill()
        worker.wait()
    assert stopped.value.code == 130
    assert capsys.readouterr().err == ("interrupted; re-run with --resume to continue from "
                                       "the last epoch\n")
