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
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from paser.config import ExperimentConfig
from paser.runtime import resolve_device, seed_everything


@dataclass
class Dist:
    """The processes training together; ``fabric`` is ``None`` for one plain process."""

    device: torch.device
    fabric: Any = None

    @property
    def rank(self) -> int:
        return 0 if self.fabric is None else self.fabric.global_rank

    @property
    def world(self) -> int:
        return 1 if self.fabric is None else self.fabric.world_size

    @property
    def is_main(self) -> bool:
        return self.rank == 0

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

    def autocast(self):
        return contextlib.nullcontext() if self.fabric is None else self.fabric.autocast()

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


def launch(cfg: ExperimentConfig) -> Dist:
    """Launch the processes ``cfg.distributed`` asks for (none for one 32-bit process) and
    seed them all with ``cfg.seed``, so the models about to be built start alike."""
    d = cfg.distributed
    device = resolve_device(cfg.device)
    if d.devices * d.num_nodes == 1 and d.precision == "32-true":
        seed_everything(cfg.seed)  # as the processes below do: one process starts alike
        return Dist(device)
    from lightning.fabric import Fabric

    strategy = "ddp" if d.strategy == "ddp" or d.devices * d.num_nodes > 1 else "auto"
    fabric = Fabric(accelerator="cuda" if device.type == "cuda" else "cpu", devices=d.devices,
                    num_nodes=d.num_nodes, strategy=strategy, precision=d.precision)
    fabric.launch()
    seed_everything(cfg.seed)  # every process: the same weights, batch order and dropout
    return Dist(fabric.device, fabric)
