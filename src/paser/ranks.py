"""Which process of a distributed launch this is, from the launcher's environment alone:
the command line asks before it loads anything heavy (torch takes a second to import, and
`paser --help`, `paser presets` or a mistyped option need none of it)."""

from __future__ import annotations

import os


def is_main_process() -> bool:
    """False in the worker processes launched for distributed training (before Fabric is
    set up, only the launcher's environment tells)."""
    return all(os.environ.get(k, "0") == "0" for k in ("RANK", "LOCAL_RANK", "NODE_RANK"))
