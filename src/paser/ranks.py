"""Which process of a distributed launch this is, from the launcher's environment alone:
the command line asks before it loads anything heavy (torch takes a second to import, and
`paser --help`, `paser presets` or a mistyped option need none of it)."""

from __future__ import annotations

import os


def is_main_process() -> bool:
    """False in the worker processes launched for distributed training (before Fabric is
    set up, only the launcher's environment tells)."""
    return all(os.environ.get(k, "0") == "0" for k in ("RANK", "LOCAL_RANK", "NODE_RANK"))


#: the :class:`paser.data.tiles.Decoded` folder a machine's first process made, for the
#: processes of that machine it launches (they inherit its environment); empty: none kept
DECODED_FOLDER = "PASER_DECODED"


def local_rank() -> int:
    """This process's rank among the training processes of its machine (0 before launch)."""
    return int(os.environ.get("LOCAL_RANK", "0"))


def launches_local_ranks() -> bool:
    """Whether the other training processes of this machine will be this process's children:
    Fabric starts them when this process launches (:func:`paser.train.distributed.launch`),
    each with this process's environment as it is then, unless a launcher started every
    process itself (torchrun, srun, LSF, mpirun: Fabric's own test of the environment) or
    this process is one Fabric started (``LOCAL_RANK`` set)."""
    if "LOCAL_RANK" in os.environ:
        return False
    from lightning.fabric.plugins.environments import (
        LSFEnvironment,
        MPIEnvironment,
        SLURMEnvironment,
        TorchElasticEnvironment,
    )

    return not any(env.detect() for env in (TorchElasticEnvironment, SLURMEnvironment,
                                            LSFEnvironment, MPIEnvironment))
