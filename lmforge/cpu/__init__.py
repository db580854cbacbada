"""Machine-specific speed for CPU inference, in a room of its own.

    kernels.py   builds csrc/*.cpp for this machine on first use (cached) into torch.ops.lmforge_cpu
    modules.py   the modules the engine swaps into its inference copy, which call those kernels (speed_up)
    pages.py     2 MB pages for what a decode step streams; glibc kept from handing freed memory back (opt-in)

Every kernel has a plain PyTorch path beside it that computes the same thing (tests compare them), and runs where
the kernels cannot be built (no C++ compiler, or LMFORGE_NO_KERNELS=1): oneDNN's packed linear eagerly,
multiply-and-sum loops that inductor vectorises inside a compiled step, PyTorch's SDPA and GELU, and the quantized
layers' PyTorch operators. A kernel stays only while `python benchmarks/cpu_kernels.py` shows it ahead of that library
path. What each buys there (AMD EPYC, Zen 3: AVX2 + FMA, 2 threads; GPT-2 124M's shapes; 2026-12-07):

    kernel (csrc/)                  runs                                   ahead of the library path it replaces
    few_row_linear (decode_cpu)     decode steps' linears, up to 8 rows    1.3x-1.8x oneDNN's packed kernel at 1-8 rows;
                                    with AVX2 (FEW_ROWS), eager/compiled   1.1x-1.2x packed_linear at 2-4 rows, even
                                                                           at 6-10, behind from 12
    packed_linear (decode_cpu)      linears of more rows (prefill, large   1.2x-1.3x oneDNN at 17 rows, 1.06x-1.17x
                                    batches), AVX2                         at 64; at 128-512, 0.87x-1.17x (drift);
                                                                           a row's bits independent of the others
    decode_attention (decode_cpu)   one query per row over the KV cache    6.7x-9.5x inductor's loops over every slot
                                                                           in the compiled step (it reads only the
                                                                           slots in use); 1.1x-2.3x SDPA eagerly
    gelu_tanh (decode_cpu)          GPT-2's GELU outside compiled graphs   3.5x-4.6x PyTorch's (a polynomial exp in
                                                                           vectors where PyTorch's tanh is scalar)
    int8_linear, int4_linear        the quantized layers (quant_cpu)       7x-9x and 28x-46x their PyTorch paths at
                                                                           one row
    int4_linear_rows8 (quant_cpu)   the engine's int4 layers, AVX2         1.4x-1.7x int4_linear at 1 row, 2.4x-2.7x
                                                                           at 8, 1.8x-2.2x the PyTorch path at 128
    int8_linear_tiled,              quantized layers of many rows, AVX2    int8 1.03x-1.24x int8_linear at 64-256 rows;
    int4_linear_tiled               (TILED_ROWS)                           int4 2.0x-2.2x the PyTorch path at 128

(three runs on 2026-12-07; docs/benchmarks.md has the table.)

Memory (pages.py): a compiled engine's weights and KV cache on 2 MB pages decode GPT-2 1.09x faster (paired, same
weights), for ~1.4 s once; freed memory kept by glibc makes a 128-token GPT-2 prefill 1.07x faster (1.02x-1.09x, five
paired runs). With AVX-512 the engine keeps oneDNN for products of many rows (PACKED_LINEAR_LANES: untimed there).

Nothing here changes the process unless asked: `keep_freed_memory()` is a call that a program owning its process
makes (`lmforge generate` and `lmforge serve` do); an engine moves only its own tensors onto huge pages.
"""

from .kernels import cpu_kernels
from .pages import keep_freed_memory

__all__ = ["cpu_kernels", "keep_freed_memory"]
