"""2 MB pages for the memory a CPU decode step streams: the weights, their packed copies and the KV cache.

    collapse(model.parameters())   # -> bytes now backed by 2 MB pages (0 where the system cannot)

Decoding one token reads every weight once, so on a CPU it runs at the speed memory is read. With the usual 4 KB
pages that read stalls on a page-table walk every 4 KB; backed by 2 MB pages, the same loops read ~10-15% faster here
(GPT-2 124M decoded 1.10x faster, same process, same weights). Linux backs ordinary allocations with 4 KB pages unless
asked (transparent huge pages in "madvise" mode, the common default), and PyTorch's allocator does not ask. Since
Linux 6.1, madvise(MADV_COLLAPSE) moves memory already in use onto 2 MB pages in place: same addresses, same
contents, nothing for the caller to change. It takes ~1 s for 500 MB, once: memory already collapsed returns at once.

It works on whole 2 MB-aligned stretches of virtual memory, so each tensor's range is widened to the 2 MB boundaries
around it (the neighbours' memory there is moved too, unchanged). Tensors under 2 MB are left as they are. Where the
system cannot (not Linux, a kernel before 6.1, transparent huge pages off), nothing happens and it returns 0.
"""

from __future__ import annotations

import ctypes
import sys
from collections.abc import Iterable

import torch

MADV_COLLAPSE = 25  # <linux/mman.h>, Linux 6.1
HUGE = 2 << 20

_state: dict = {}


def _madvise():
    """libc's madvise, or None off Linux."""
    if "madvise" not in _state:
        fn = None
        if sys.platform.startswith("linux"):
            try:
                fn = ctypes.CDLL(None, use_errno=True).madvise
                fn.argtypes, fn.restype = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int], ctypes.c_int
            except (OSError, AttributeError):
                fn = None
        _state["madvise"] = fn
    return _state["madvise"]


def _pages(tensors: Iterable[torch.Tensor]) -> list[int]:
    """The 2 MB pages (their addresses) that hold part of a CPU storage of 2 MB or more, in address order, each once:
    each storage widened to the 2 MB boundaries around it."""
    pages = set()
    for t in tensors:
        if t is None or t.device.type != "cpu" or t.layout != torch.strided:  # (oneDNN's packed tensors hide theirs)
            continue
        storage = t.untyped_storage()
        start, size = storage.data_ptr(), storage.nbytes()
        if size >= HUGE and start:
            pages.update(range(start // HUGE * HUGE, start + size, HUGE))
    return sorted(pages)


def collapse(tensors: Iterable[torch.Tensor]) -> int:
    """Ask Linux to back these CPU tensors' memory with 2 MB pages, in place. Returns the bytes it moved (or found
    already moved): 0 where the system cannot."""
    madvise = _madvise()
    if madvise is None:
        return 0
    # one 2 MB page a call: a call over a longer stretch reports failure for all of it when one page of it fails
    # (EINVAL: a kernel without MADV_COLLAPSE, huge pages off, a mapping of another kind beside the tensor; EAGAIN or
    # ENOMEM: no free 2 MB page at that moment)
    return sum(HUGE for page in _pages(tensors) if madvise(page, HUGE, MADV_COLLAPSE) == 0)


def huge_page_bytes() -> int:
    """Bytes of this process's anonymous memory on 2 MB pages (AnonHugePages in /proc/self/smaps_rollup); 0 where
    that cannot be read."""
    try:
        with open("/proc/self/smaps_rollup") as f:
            for line in f:
                if line.startswith("AnonHugePages:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return 0
