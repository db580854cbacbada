"""Each of lmforge's CPU kernels (lmforge/cpu/csrc) against the library path that runs in its place where the kernels
are not built, on GPT-2 124M's shapes, interleaved in one process (2 threads by default). A kernel stays in the
project only while it is ahead here by a margin worth its lines.

    few_row_linear      a decode step's linears (1-24 rows) over GPT-2's 49 weight matrices, against oneDNN's packed
                        kernel (the engine's path without lmforge's kernels), MKL's F.linear and, with AVX2,
                        lmforge's packed_linear (what the engine runs past FEW_ROWS)
    packed_linear       a prefill's linears (17-512 rows) over the 48 block matrices, against oneDNN and MKL
    decode_attention    one query per row over a 1024-slot cache with 256 positions filled, 12 heads of 64, against
                        PyTorch's SDPA over the slots in use (the eager path without the kernel) and against the
                        multiply-and-sum over every slot that inductor compiles (the compiled step's path without it)
    gelu_tanh           GPT-2's GELU on a 128-token prefill's (128, 3072), against F.gelu(approximate="tanh")
    int8_linear, int4_linear, int4_linear_rows8, int8_linear_tiled, int4_linear_tiled
                        the quantized layers over the 48 block matrices, against their PyTorch paths (the same
                        computation in PyTorch operators: int8 through torch._int_mm, int4 through the dequantized
                        weight and MKL)

Each figure is the median of --repeat interleaved timings of the whole set of matrices; "ahead" is the library
path's time over the kernel's.

    python benchmarks/cpu_kernels.py [--threads 2] [--repeat 15] [--only few_row,packed,attention,gelu,quantized]
"""

import argparse
import platform
import statistics
import time

import torch
import torch.nn.functional as F

from lmforge.cpu import kernels
from lmforge.quantize import Int4Linear, Int8Linear

BLOCK = [(2304, 768), (768, 768), (3072, 768), (768, 3072)]  # (out, in) of c_attn, attn.c_proj, c_fc, mlp.c_proj
LAYERS = 12
VOCAB = 50257


def timed(fn) -> float:
    start = time.perf_counter()
    fn()
    return time.perf_counter() - start


def compare(name: str, sides: dict, repeat: int) -> dict[str, float]:
    """Median seconds of each side, timed in turn round after round (after one warm-up of each)."""
    for fn in sides.values():
        fn()
    times = {side: [] for side in sides}
    for _ in range(repeat):
        for side, fn in sides.items():
            times[side].append(timed(fn))
    return {side: statistics.median(ts) for side, ts in times.items()}


def row(name: str, shape: str, result: dict[str, float], ours: str = "lmforge"):
    best_other = min((t, side) for side, t in result.items() if side != ours)
    cells = "  ".join(f"{side} {t * 1e3:8.3f} ms" for side, t in result.items())
    print(f"{name:<20} {shape:<24} {cells}   ahead {best_other[0] / result[ours]:.2f}x ({best_other[1]})")
    return best_other[0] / result[ours]


def without_kernels(fn):
    """fn run on the PyTorch path: the layers ask for the kernels on every call."""
    def run():
        ops = kernels._state.get("ops")
        kernels._state["ops"] = None
        try:
            return fn()
        finally:
            kernels._state["ops"] = ops
    return run


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--repeat", type=int, default=15)
    ap.add_argument("--only", default="few_row,packed,attention,gelu,quantized", help="the sections to run")
    args = ap.parse_args()
    only = set(args.only.split(","))
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    ops = kernels.cpu_kernels()
    if ops is None:
        print("lmforge's CPU kernels cannot be built here (no C++ compiler?): nothing to compare")
        return
    print(f"{platform.processor() or platform.machine()}, vector lanes {ops.vector_lanes()}, {args.threads} threads, "
          f"torch {torch.__version__}\n")
    mats = [(torch.randn(o, i) * 0.02, torch.zeros(o)) for o, i in BLOCK for _ in range(LAYERS)]
    head = torch.randn(VOCAB, 768) * 0.02
    dnn = [torch.ops.mkldnn._reorder_linear_weight(w, 64) for w, _ in mats]
    dnn_head = torch.ops.mkldnn._reorder_linear_weight(head, 64)
    packed = [ops.pack_linear_weight(w) for w, _ in mats]
    packed_head = ops.pack_linear_weight(head)

    print("few_row_linear: GPT-2's 49 weight matrices (48 blocks + the output layer), one step's rows")
    for rows in (1, 2, 4, 6, 8, 10, 12, 16, 20, 24) if "few_row" in only else ():
        xs = {i: torch.randn(rows, i) for i in (768, 3072)}
        sides = {
            "lmforge": lambda: ([ops.few_row_linear(xs[w.size(1)], w, b) for w, b in mats],
                                ops.few_row_linear(xs[768], head, None)),
            "oneDNN": lambda: ([torch.ops.mkldnn._linear_pointwise(xs[w.size(1)], p, b, "none", [], "")
                                for (w, b), p in zip(mats, dnn)],
                               torch.ops.mkldnn._linear_pointwise(xs[768], dnn_head, None, "none", [], "")),
            "MKL": lambda: ([F.linear(xs[w.size(1)], w, b) for w, b in mats], F.linear(xs[768], head)),
        }
        if rows >= 2 and ops.vector_lanes() == 8:  # (with AVX2, past FEW_ROWS the engine runs packed_linear)
            sides["packed_linear"] = lambda: ([ops.packed_linear(xs[w.size(1)], p, b, w.size(0))
                                               for (w, b), p in zip(mats, packed)],
                                              ops.packed_linear(xs[768], packed_head, None, VOCAB))
        row("few_row_linear", f"{rows} rows", compare("few", sides, args.repeat))

    print("\npacked_linear: the 48 block matrices, a prefill's rows")
    for rows in (17, 32, 64, 128, 512) if "packed" in only else ():
        xs = {i: torch.randn(rows, i) for i in (768, 3072)}
        sides = {
            "lmforge": lambda: [ops.packed_linear(xs[w.size(1)], p, b, w.size(0)) for (w, b), p in zip(mats, packed)],
            "oneDNN": lambda: [torch.ops.mkldnn._linear_pointwise(xs[w.size(1)], p, b, "none", [], "")
                               for (w, b), p in zip(mats, dnn)],
            "MKL": lambda: [F.linear(xs[w.size(1)], w, b) for w, b in mats],
        }
        row("packed_linear", f"{rows} rows", compare("packed", sides, args.repeat))

    print("\ndecode_attention: one query per row, 12 heads of 64, a 1024-slot cache with 256 positions filled, "
          "x 12 layers")
    from lmforge.cpu.modules import OneQueryAttention
    # without the kernel, OneQueryAttention inside a compiled step is a multiply-and-sum over every slot
    fallback = torch.compile(OneQueryAttention(), dynamic=False)
    for batch in (1, 8) if "attention" in only else ():
        q = torch.randn(batch, 12, 1, 64)
        k, v = torch.randn(batch, 12, 1024, 64), torch.randn(batch, 12, 1024, 64)
        mask = (torch.arange(1024) < 256).view(1, 1, 1, 1024).expand(batch, 1, 1, 1024).contiguous()
        used = mask[..., :256]
        sides = {
            "lmforge": lambda: [ops.decode_attention(q, k, v, mask, 0.125) for _ in range(LAYERS)],
            "SDPA": lambda: [F.scaled_dot_product_attention(q, k[:, :, :256], v[:, :, :256], attn_mask=used)
                             for _ in range(LAYERS)],
            "inductor": without_kernels(lambda: [fallback(q, k, v, mask, 0.0) for _ in range(LAYERS)]),
        }
        row("decode_attention", f"batch {batch}", compare("attn", sides, args.repeat))

    print("\ngelu_tanh: a 128-token prefill's MLP activations, x 12 layers")
    x = torch.randn(128, 3072)
    sides = {"lmforge": lambda: [ops.gelu_tanh(x) for _ in range(LAYERS)],
             "PyTorch": lambda: [F.gelu(x, approximate="tanh") for _ in range(LAYERS)]}
    if "gelu" in only:
        row("gelu_tanh", "(128, 3072)", compare("gelu", sides, args.repeat))

    print("\nquantized layers: the 48 block matrices")
    int8 = [Int8Linear.from_linear(torch.nn.Linear(i, o).requires_grad_(False)) for o, i in BLOCK
            for _ in range(LAYERS)]
    int4 = [Int4Linear.from_linear(torch.nn.Linear(i, o).requires_grad_(False), 32) for o, i in BLOCK
            for _ in range(LAYERS)]
    rows8 = [q.rows8() for q in int4]
    for rows in (1, 8, 128) if "quantized" in only else ():
        xs = {i: torch.randn(rows, i) for i in (768, 3072)}
        sides = {
            "lmforge": lambda: [ops.int8_linear(xs[q.in_features], q.weight, q.scales, q.bias) for q in int8],
            "PyTorch": without_kernels(lambda: [q(xs[q.in_features]) for q in int8]),
        }
        if rows >= 64:
            sides["lmforge tiled"] = lambda: [ops.int8_linear_tiled(xs[q.in_features], q.weight, q.scales, q.bias)
                                              for q in int8]
        result = compare("int8", sides, max(5, args.repeat // (3 if rows > 8 else 1)))
        row("int8_linear", f"{rows} rows", {k: result[k] for k in ("lmforge", "PyTorch")})
        if "lmforge tiled" in result:
            row("int8_linear_tiled", f"{rows} rows", result, ours="lmforge tiled")
        sides = {
            "lmforge": lambda: [ops.int4_linear(xs[q.in_features], q.weight, q.scales, q.mins, q.bias, 32)
                                for q in int4],
            "lmforge rows8": lambda: [ops.int4_linear_rows8(xs[q.in_features], w8, s8, m8, q.bias, 32, q.out_features)
                                      for q, (w8, s8, m8) in zip(int4, rows8)],
            "PyTorch": without_kernels(lambda: [q(xs[q.in_features]) for q in int4]),
        }
        if rows >= 24:
            sides["lmforge tiled"] = lambda: [ops.int4_linear_tiled(xs[q.in_features], q.weight, q.scales, q.mins,
                                                                    q.bias, 32) for q in int4]
        result = compare("int4", sides, max(5, args.repeat // (3 if rows > 8 else 1)))
        row("int4_linear", f"{rows} rows", {k: result[k] for k in ("lmforge", "PyTorch")})
        row("int4_linear_rows8", f"{rows} rows", {k: result[k] for k in ("lmforge rows8", "PyTorch", "lmforge")},
            ours="lmforge rows8")
        if "lmforge tiled" in result:
            row("int4_linear_tiled", f"{rows} rows", {k: result[k] for k in ("lmforge tiled", "PyTorch", "lmforge")},
                ours="lmforge tiled")


if __name__ == "__main__":
    main()
