"""Machine-specific speed for CPU inference, in a room of its own.

    kernels.py   builds csrc/*.cpp for this machine on first use (cached) into torch.ops.lmforge_cpu
    modules.py   the modules the engine swaps into its inference copy, which call those kernels
    pages.py     2 MB pages for what a decode step streams; glibc kept from handing freed memory back (opt-in)

Every kernel has a plain PyTorch path beside it that computes the same thing (tests compare them), and runs where
the kernels cannot be built (no C++ compiler, or LMFORGE_NO_KERNELS=1): oneDNN's packed linear eagerly,
multiply-and-sum loops that inductor vectorises inside a compiled step, PyTorch's SDPA and GELU, and the quantized
layers' PyTorch operators. A kernel stays only while `python benchmarks/kernels.py` shows it ahead of that library
path. What each buys there (AMD EPYC, Zen 3: AVX2 + FMA, 2 threads; GPT-2 124M's shapes):

KERNELS_TABLE

Nothing here changes the process unless asked: `keep_freed_memory()` is a call that a program owning its process
makes (`lmforge generate` and `lmforge serve` do); an engine moves only its own tensors onto huge pages.
"""

from .kernels import cpu_kernels
from .pages import keep_freed_memory

__all__ = ["cpu_kernels", "keep_freed_memory"]
