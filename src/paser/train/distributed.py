"""Data-parallel training on Lightning Fabric: the stages' loops call one small interface,
and with one process (the default) every call is the plain single-process operation.

With ``distributed.devices x distributed.num_nodes`` > 1, Fabric launches the processes
(``ddp``; gloo on CPU, NCCL on GPUs). Every process holds the whole (small) dataset, seeds
identically, walks the same batch order and takes its share of each batch
(:meth:`Dist.shard`); DDP averages the gradients; metrics are summed across processes;
rank 0 alone writes checkpoints, metric lines and reports. BatchNorm statistics stay per
process (``SyncBatchNorm`` needs GPUs; it is used there) and rank 0's buffers are
broadcast before every evaluation, so all processes evaluate, and keep, the same model.
"""

from __future__ import annotations

import contextlib
import os
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from paser.config import ExperimentConfig
from paser.errors import ConfigError
from paser.runtime import place, resolve_device, seed_everything


@dataclass
class Dist:
    """The processes training together; ``fabric`` is ``None`` for one plain process, which
    autocasts itself with ``precision`` ``bf16-mixed``."""

    device: torch.device
    fabric: Any = None
    precision: str = "32-true"

    @property
    def rank(self) -> int:
        return 0 if self.fabric is None else self.fabric.global_rank

    @property
    def world(self) -> int:
        return 1 if self.fabric is None else self.fabric.world_size

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    def place(self, model: nn.Module) -> nn.Module:
        """A model to train on this device, in the default (NCHW) layout in every precision.
        Channels-last pays for inference on whole images (:func:`paser.runtime.place`), not
        for training: a stage-1 step (forward, backward, Adam) ran 1.2 to 1.35 x faster in
        NCHW than channels-last in 32-bit on an AVX2 CPU (f0 on whole images, f1 and f2 on
        their patches), and oneDNN's channels-last bf16 convolutions were 1.1 to 2.4 x
        slower than NCHW's on a CPU with AVX512-BF16 (docs/training.md)."""
        return place(model, self.device, channels_last=False)

    def setup(self, model: nn.Module, opt: torch.optim.Optimizer):
        """Model and optimizer wrapped for data parallelism (as they are for one process)."""
        if self.fabric is None:
            return model, opt
        if self.world > 1 and self.device.type == "cuda":
            model = nn.SyncBatchNorm.convert_sync_batchnorm(model)
        return self.fabric.setup(model, opt)

    @staticmethod
    def unwrap(model: nn.Module) -> nn.Module:
        """The model itself (for its state dict and for evaluation)."""
        return getattr(model, "module", model) if hasattr(model, "_forward_module") else model

    def shard(self, idx: torch.Tensor) -> torch.Tensor:
        """This process's share of a batch's indices."""
        return idx if self.world == 1 else idx[self.rank::self.world]

    def backward(self, loss: torch.Tensor) -> None:
        if self.fabric is None:
            loss.backward()
        else:
            self.fabric.backward(loss)

    def autocast(self, convolutional: bool = True):
        """The forward's precision. ``convolutional=False`` (the policy's small MLPs, which
        regress gains of 1e-3) keeps 32-bit on the CPU, where bf16 pays for convolutions only."""
        if not convolutional and self.device.type == "cpu":
            return contextlib.nullcontext()
        if self.fabric is not None:
            return self.fabric.autocast()
        if self.precision == "bf16-mixed":
            return torch.autocast(self.device.type, dtype=torch.bfloat16)
        return contextlib.nullcontext()

    @contextlib.contextmanager
    def same_draws(self):
        """The block draws from the global generator as rank 0 does, in every process: for
        what the processes must draw alike (stage 3's batch order, the exploration of
        stages 2 and 3). Their own draws (dropout, Monte Carlo passes over a share of its
        size, a pool model run on the patches routed to it there) take different amounts
        from it, so after one batch of stage 3 the generators were no longer alike: the
        processes walked different orders (an image taken twice in an epoch, another not
        at all) and explored with different coins. Rank 0's generator goes on as drawn;
        the others' are left as they were, for their own draws: after a block the
        generators differ, so every later draw that must be alike is in one too (stage 2's
        batch order after its exploration)."""
        if self.world == 1:
            yield
            return
        own = torch.get_rng_state()
        torch.set_rng_state(self.fabric.broadcast(own, src=0))
        try:
            yield
        finally:
            if not self.is_main:
                torch.set_rng_state(own)

    def sum(self, value: torch.Tensor) -> torch.Tensor:
        """``value`` summed over the processes."""
        if self.world == 1:
            return value
        return self.fabric.all_reduce(value.to(self.device), reduce_op="sum").to(value.device)

    def reduce_grads(self, model: nn.Module) -> None:
        """Sum every parameter's gradient over the processes (a missing one counts as 0):
        for updates whose per-process losses already add up to the batch's loss, where
        DDP cannot be used because a process may not run a model at all (stage 3)."""
        if self.world == 1:
            return
        for p in model.parameters():
            if p.grad is None:
                p.grad = torch.zeros_like(p)
            torch.distributed.all_reduce(p.grad)

    def sync_buffers(self, model: nn.Module) -> None:
        """Rank 0's buffers (BatchNorm running statistics) on every process."""
        if self.world > 1:
            for buf in self.unwrap(model).buffers():
                torch.distributed.broadcast(buf.data, src=0)

    def barrier(self) -> None:
        if self.world > 1:
            self.fabric.barrier()


def native_bf16(device: torch.device) -> bool:
    """Whether ``device`` computes bf16 natively: a CUDA GPU that supports it, or a CPU with
    AVX512-BF16 or AMX (Linux's ``/proc/cpuinfo``; elsewhere the CPU counts as without),
    where bf16 autocast makes convolutions faster; elsewhere it emulates bf16, slower.
    The environment variable ``PASER_BF16`` (0 or 1), when set, answers instead; any other
    value is refused rather than read as the CPU's answer."""
    forced = os.environ.get("PASER_BF16")
    if forced in ("0", "1"):
        return forced == "1"
    if forced is not None:
        raise ConfigError(f"environment variable PASER_BF16={forced!r}: give 0 (32-bit) or "
                          "1 (bf16), or unset it to follow the device")
    if device.type == "cuda":
        return torch.cuda.is_available() and torch.cuda.is_bf16_supported()
    if device.type != "cpu":
        return False
    return bool({"avx512_bf16", "amx_bf16"} & set(_cpuinfo().get("flags", "").split()))


def _cpuinfo() -> dict[str, str]:
    """The first processor's fields in Linux's ``/proc/cpuinfo`` (empty elsewhere)."""
    try:
        with open("/proc/cpuinfo") as f:
            head = f.read().split("\n\n", 1)[0]
    except OSError:
        return {}
    return {k.strip(): v.strip() for k, _, v in (line.partition(":") for line in
                                                  head.splitlines()) if k.strip()}


def machine(device: torch.device) -> dict:
    """What computed on ``device``, for the records: the processor (or GPU), the threads,
    torch's version and, where the CPU computed, how it does bf16 (``bf16``: ``AMX``,
    ``AVX512-BF16``, or ``None``: emulated; a GPU's bf16 is its own, which its name says).
    Runs of one seed repeat to the last digit on one kind of machine; another CPU's bf16
    kernels give other pools (DESIGN's noise: one run is one draw), and the report says
    which machine made which figures."""
    import platform

    info = _cpuinfo()
    flags = set(info.get("flags", "").split())
    out = {"cpu": info.get("model name") or platform.processor() or platform.machine(),
           "threads": torch.get_num_threads(), "torch": torch.__version__.split("+")[0]}
    if device.type == "cpu":
        out["bf16"] = ("AMX" if "amx_bf16" in flags else "AVX512-BF16" if "avx512_bf16" in
                       flags else None)
    if device.type == "cuda" and torch.cuda.is_available():
        out["gpu"] = torch.cuda.get_device_name(device)
    return out


def machine_kind(m: dict | None) -> dict | None:
    """A machine record (:func:`machine`) as one written now: records of GPU runs from
    before kept the CPU's ``bf16`` too, which says nothing of how the GPU computed; without
    it they read, and compare with today's, as the same kind of machine."""
    if not m or not m.get("gpu"):
        return m
    return {k: v for k, v in m.items() if k != "bf16"}


def machine_text(m: dict) -> str:
    """``AMD EPYC, AVX512-BF16, 2 threads, torch 2.14.1`` (a GPU first where there is one,
    and then no CPU's bf16: :func:`machine_kind`)."""
    m = machine_kind(m)
    return ", ".join([*([m["gpu"]] if m.get("gpu") else []), m.get("cpu") or "unknown CPU",
                      *([m["bf16"]] if m.get("bf16") else []),
                      f"{m.get('threads')} thread{'s' * (m.get('threads') != 1)}",
                      f"torch {m.get('torch')}"])


def resolve_precision(precision: str, device: torch.device) -> str:
    """``distributed.precision`` with ``auto`` resolved for ``device``."""
    if precision != "auto":
        return precision
    return "bf16-mixed" if native_bf16(device) else "32-true"


def check_devices(cfg: ExperimentConfig, precision: str | None = None) -> None:
    """Refuse what ``cfg.distributed`` asks of this machine and Fabric cannot give, before a
    stage reads its data: more GPUs a node than CUDA sees (Fabric's own error came once the
    data was read, as a traceback), and 16-mixed off CUDA, which Fabric trains in bf16-mixed
    instead while the stage records and shows 16-mixed. ``precision``: the stage's own, as
    :func:`launch` takes it (a stage that trains in 32-bit on the CPU ignores the config's)."""
    d = cfg.distributed
    device = resolve_device(cfg.device)
    if device.type == "cuda" and d.devices > torch.cuda.device_count():
        seen = torch.cuda.device_count()
        raise ConfigError(f"--devices {d.devices} (distributed.devices) asks for {d.devices} "
                          f"GPUs on this machine, and CUDA sees {seen}: give --devices {seen} "
                          "or fewer (CUDA_VISIBLE_DEVICES says which GPUs it sees)")
    if (precision or d.precision) == "16-mixed" and device.type != "cuda":
        raise ConfigError(f"precision 16-mixed (--precision, distributed.precision) needs "
                          f"CUDA, and this stage trains on the {device.type}, where Fabric "
                          "would train in bf16-mixed instead; give bf16-mixed, 32-true or auto")


#: the processes this one launched for distributed training (Fabric's launcher, in rank 0)
WORKERS: list = []


def stop_workers() -> None:
    """SIGTERM to the processes this one launched that still run, as this one stops: stopped
    alone (``kill`` of its process id, a service manager's SIGTERM to the main process),
    it left them to fail at their next exchange with it, each saying 'another process of
    this distributed training stopped ... its error is above' of a run stopped on purpose,
    and ending with status 1. A worker ends on SIGTERM at once and says nothing; one that
    Ctrl-C has stopped already is stopped again, as quietly."""
    import signal

    for proc in WORKERS:
        if proc.poll() is None:
            proc.send_signal(signal.SIGTERM)


def launch(cfg: ExperimentConfig, precision: str | None = None) -> Dist:
    """Launch the processes ``cfg.distributed`` asks for (none for one process, which
    autocasts itself, except with 16-mixed, which needs Fabric's gradient scaler) and
    seed them all with ``cfg.seed``, so the models about to be built start alike.
    ``precision``: the stage's own instead of ``distributed.precision`` (a stage that
    trains in 32-bit says so: Fabric autocasts the forward of every module it sets up).
    Its callers refuse what the devices cannot give first (:func:`check_devices`), before
    they read any data."""
    d = cfg.distributed
    device = resolve_device(cfg.device)
    precision = precision or resolve_precision(d.precision, device)
    if d.devices * d.num_nodes == 1 and precision != "16-mixed":
        seed_everything(cfg.seed)  # as the processes below do: one process starts alike
        return Dist(device, precision=precision)
    from lightning.fabric import Fabric

    strategy = "ddp" if d.strategy == "ddp" or d.devices * d.num_nodes > 1 else "auto"
    fabric = Fabric(accelerator="cuda" if device.type == "cuda" else "cpu", devices=d.devices,
                    num_nodes=d.num_nodes, strategy=strategy, precision=precision)
    fabric.launch()
    WORKERS[:] = getattr(fabric.strategy.launcher, "procs", [])  # (none in the others)
    seed_everything(cfg.seed)  # every process: the same weights, batch order and dropout
    return Dist(fabric.device, fabric, precision)
