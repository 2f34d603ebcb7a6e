"""Process-wide settings that make PyTorch fast on CPU.

PyTorch's CPU allocator keeps no cache: it asks glibc's ``malloc`` for every tensor and
frees it when the tensor dies. glibc serves every block over 32 MiB with a fresh ``mmap``
and gives it back with ``munmap`` on free, so each large activation is page-faulted in,
page by page, on every forward and backward. At the battery-paper shapes on 2 cores that
was a third of f2's whole-image time (863 -> 568 ms per image, batch 8) and half of a
stage-2 policy step (3.35 -> 1.59 s per 32 states), measured side by side.
:func:`keep_freed_memory` tells glibc to serve large blocks from its heap and to keep
freed memory for the next one: the effect of the jemalloc or tcmalloc preload that
PyTorch's CPU performance guide recommends, with nothing to install. The cost: the
process does not shrink after its largest step, and the heap's fragmentation adds a little
to the peak (evaluating 1,000 streamed test images: 1,191 -> 1,233 to 1,416 MiB).
"""

from __future__ import annotations

import ctypes
import os
import platform

# glibc's mallopt(3) parameters and the largest value an int can carry.
_M_TRIM_THRESHOLD, _M_MMAP_MAX, _INT_MAX = -1, -4, 2**31 - 1
# Respected when set: the user tunes glibc themselves, or asks for its defaults.
OPT_OUT = ("PASER_SYSTEM_MALLOC", "MALLOC_MMAP_MAX_", "MALLOC_TRIM_THRESHOLD_",
           "MALLOC_MMAP_THRESHOLD_")

_applied: bool | None = None


def keep_freed_memory() -> bool:
    """Make glibc reuse freed memory for large tensors instead of unmapping it.

    Called by every training stage, the CLI and :meth:`paser.PaSeR.load`; idempotent.
    Returns whether it is in effect: not on a C library other than glibc (macOS, musl,
    Windows), nor when any of :data:`OPT_OUT` is set in the environment
    (``PASER_SYSTEM_MALLOC=1`` keeps glibc's defaults).
    """
    global _applied
    if _applied is None:
        _applied = False
        if not any(os.environ.get(name) for name in OPT_OUT) and \
                platform.system() == "Linux" and platform.libc_ver()[0] == "glibc":
            try:
                mallopt = ctypes.CDLL(None).mallopt
            except (OSError, AttributeError):
                return False
            mallopt.argtypes, mallopt.restype = [ctypes.c_int, ctypes.c_int], ctypes.c_int
            # no mmap for large blocks (they come from the heap) and no trimming of it
            _applied = bool(mallopt(_M_MMAP_MAX, 0)) and bool(mallopt(_M_TRIM_THRESHOLD,
                                                                       _INT_MAX))
    return _applied
