"""Memory for CPU inference: 2 MB pages for what a decode step streams (the weights and the KV cache), and freed
memory kept for reuse rather than handed back to the system.

    collapse(model.parameters())   # -> bytes moved onto 2 MB pages (0 where the system cannot or should not)
    keep_freed_memory()            # -> whether glibc now keeps freed memory in the process (an opt-in, once)

Decoding one token reads every weight once, so on a CPU it runs at the speed memory is read. With the usual 4 KB
pages that read stalls on a page-table walk every 4 KB; on 2 MB pages the same step decoded GPT-2 124M 1.09x faster
here (paired, same process, same weights). Linux backs ordinary allocations with 4 KB pages unless asked (transparent
huge pages in "madvise" mode, the common default), and PyTorch's allocator does not ask. Since Linux 6.1,
madvise(MADV_COLLAPSE) moves memory already in use onto huge pages in place: same addresses, same contents, nothing
for the caller to change. It takes about 1.4 s for 500 MB, once: memory already moved returns at once.

It moves whole huge pages only, so it is asked for the pages that lie wholly inside the tensors given, where tensors
that sit next to each other (a model's weights, allocated one after another) count as one stretch across the few
bytes of allocator padding between them. Nothing else is touched. It does nothing where transparent huge pages are
turned off ("never"), off Linux, before Linux 6.1, and for tensors in shared memory.
"""

from __future__ import annotations

import ctypes
import os
import platform
import sys
from collections.abc import Iterable
from pathlib import Path

import torch

MADV_COLLAPSE = 25  # <linux/mman.h>, Linux 6.1
GAP = 8192  # allocator padding between neighbouring allocations (a header and the rest of a 4 KB page) bridged
THP = Path("/sys/kernel/mm/transparent_hugepage")

_state: dict = {}


def huge_page_size() -> int:
    """The size of a transparent huge page here (2 MB on x86-64), or 0 where they are off or unknown."""
    if "size" not in _state:
        size = 0
        if sys.platform.startswith("linux"):
            try:
                if "[never]" not in (THP / "enabled").read_text():
                    size = int((THP / "hpage_pmd_size").read_text())
            except (OSError, ValueError):
                size = 0
        _state["size"] = size
    return _state["size"]


def _madvise():
    """libc's madvise, or None where huge pages are off or not Linux."""
    if "madvise" not in _state:
        fn = None
        if huge_page_size():
            try:
                fn = ctypes.CDLL(None, use_errno=True).madvise
                fn.argtypes, fn.restype = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int], ctypes.c_int
            except (OSError, AttributeError):
                fn = None
        _state["madvise"] = fn
    return _state["madvise"]


def _pages(tensors: Iterable[torch.Tensor], huge: int) -> list[int]:
    """The huge pages (their addresses) lying wholly inside the tensors' bytes, neighbours joined across small gaps."""
    spans = []
    for t in tensors:
        if (t is None or t.device.type != "cpu" or t.layout != torch.strided or t.numel() == 0  # (oneDNN's packed
                or t.is_shared()):  # tensors hide their memory; shared memory is other processes' too)
            continue
        spans.append(_extent(t))
    pages: list[int] = []
    merged: list[list[int]] = []
    for start, end in sorted(spans):
        if merged and start <= merged[-1][1] + GAP:
            merged[-1][1] = max(merged[-1][1], end)
        else:
            merged.append([start, end])
    for start, end in merged:
        pages.extend(range(-(-start // huge) * huge, end // huge * huge, huge))
    return pages


def _extent(t: torch.Tensor) -> tuple[int, int]:
    """The bytes a strided tensor spans, from its first element to its last (strides taken as non-negative)."""
    last = sum((size - 1) * stride for size, stride in zip(t.shape, t.stride()))
    return t.data_ptr(), t.data_ptr() + (last + 1) * t.element_size()


def collapse(tensors: Iterable[torch.Tensor]) -> int:
    """Ask Linux to move these CPU tensors' memory onto huge pages, in place. Returns the bytes moved (or found
    already moved): 0 where the system cannot or should not."""
    madvise, huge = _madvise(), huge_page_size()
    if madvise is None:
        return 0
    # one huge page a call: a call over a longer stretch reports failure for all of it when one page of it fails
    # (EINVAL: a kernel without MADV_COLLAPSE; EAGAIN or ENOMEM: no free huge page at that moment)
    return sum(huge for page in _pages(tensors, huge) if madvise(page, huge, MADV_COLLAPSE) == 0)


def proc_bytes(path: str, field: str) -> int | None:
    """A size from a /proc file of "Field:  N kB" lines, in bytes; None where it cannot be read."""
    try:
        with open(path) as f:
            for line in f:
                if line.startswith(field + ":"):
                    return int(line.split()[1]) * 1024
    except (OSError, ValueError, IndexError):
        pass
    return None


def huge_page_bytes() -> int:
    """Bytes of this process's anonymous memory on huge pages (AnonHugePages); 0 where that cannot be read."""
    return proc_bytes("/proc/self/smaps_rollup", "AnonHugePages") or 0


# glibc's mallopt parameters (<malloc.h>)
M_TRIM_THRESHOLD, M_MMAP_THRESHOLD = -1, -3
KEEP_BELOW = 32 << 20  # allocations up to this size come from the heap (glibc's largest mmap threshold on 64-bit)
TRIM_ABOVE = 1 << 30  # and freed heap memory goes back to the system only past this much


def keep_freed_memory() -> bool:
    """Have glibc keep the memory a forward pass frees for the next one. Process-wide, so no library call makes it:
    a program that owns its process opts in (`lmforge generate` and `lmforge serve` do, on CPU). Allocations up to
    32 MB come from the heap, and the heap goes back to the system only past 1 GB free. By default glibc returns the top of the
    heap whenever more than about twice its largest recent allocation lies free there, so every prefill asked the
    system for its activations again, and each page of them was a page fault that zeroes 4 KB: a 128-token GPT-2
    prefill faulted in 11-22 MB each time (~3 us a page under this machine's hypervisor) and was 1.07x faster
    without (1.02x-1.09x, five paired runs). The cost: the process holds on to freed heap memory (up to 1 GB of it,
    and allocations of many sizes can fragment the heap past their peak). Returns whether it applied: not off
    glibc, not under a preloaded malloc (tcmalloc, jemalloc, mimalloc), not with LMFORGE_KEEP_FREED_MEMORY=0, and
    not where the process was started with its own malloc settings (MALLOC_TRIM_THRESHOLD_, MALLOC_MMAP_THRESHOLD_
    or glibc.malloc tunables in GLIBC_TUNABLES), which are left as they are. Done once; later calls return the
    answer."""
    if "kept" not in _state:
        _state["kept"] = _set_mallopt()
    return _state["kept"]


def _set_mallopt() -> bool:
    if os.environ.get("LMFORGE_KEEP_FREED_MEMORY", "1") == "0":
        return False
    if any(name in os.environ for name in ("MALLOC_TRIM_THRESHOLD_", "MALLOC_MMAP_THRESHOLD_")):
        return False
    if "glibc.malloc." in os.environ.get("GLIBC_TUNABLES", "") or "malloc" in os.environ.get("LD_PRELOAD", ""):
        return False
    if not sys.platform.startswith("linux") or platform.libc_ver()[0] != "glibc":
        return False
    try:
        mallopt = ctypes.CDLL(None).mallopt
    except (OSError, AttributeError):
        return False
    mallopt.argtypes, mallopt.restype = [ctypes.c_int, ctypes.c_int], ctypes.c_int
    return mallopt(M_MMAP_THRESHOLD, KEEP_BELOW) == 1 and mallopt(M_TRIM_THRESHOLD, TRIM_ABOVE) == 1
