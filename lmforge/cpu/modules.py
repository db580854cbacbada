"""The inference engine's CPU modules: swapped into its inference copy of the model for good (never a patched
forward), each calling lmforge's kernels (kernels.py) where they were built and PyTorch's own path elsewhere. The
package docstring (lmforge/cpu/__init__.py) says what each kernel buys.

    inference = speed_up(inference, rows=8)   # DecodeLinear, OneQueryAttention, FastGELU, DecodeInt4Linear swapped in
"""

from __future__ import annotations

import math

import torch
import torch.nn as nn
import torch.nn.functional as F

from ..model import SDPAttention
from ..quantize import Int4Linear
from .kernels import cpu_kernels


def _can_pack(device: torch.device, dtype: torch.dtype) -> bool:
    return (device.type == "cpu" and dtype == torch.float32 and torch.backends.mkldnn.is_available()
            and hasattr(torch.ops.mkldnn, "_reorder_linear_weight") and hasattr(torch.ops.mkldnn, "_linear_pointwise"))


@torch.library.custom_op("lmforge::onednn_linear", mutates_args=())
def onednn_linear(x: torch.Tensor, packed: torch.Tensor, bias: torch.Tensor | None, out_features: int) -> torch.Tensor:
    """x (N, in) @ a oneDNN-packed weight (+ bias) -> (N, out). An op of its own, so that a compiled graph calls the
    oneDNN kernel as it is (inductor would otherwise lower a few-row F.linear to a slower generic matrix product)."""
    return torch.ops.mkldnn._linear_pointwise(x, packed, bias, "none", [], "")


@onednn_linear.register_fake
def _(x, packed, bias, out_features):
    return x.new_empty(x.size(0), out_features)


# Up to how many rows a linear layer streams its weight once with few_row_linear rather than running a packed
# matrix product, by the float lanes of the vectors the kernel was built for: as far as it measures ahead of the
# packed kernel that would run instead, on GPT-2's 49 weight matrices (benchmarks/cpu_kernels.py, docs/benchmarks.md).
# With AVX2 that is lmforge's packed_linear: 1.06x at 2 rows, 1.14x-1.23x at 4, 0.98x-1.06x at 6 to 10, 0.84x-0.99x
# at 12-16. With AVX-512, oneDNN's: ahead at 1 and 2 rows only.
FEW_ROWS = {16: 2, 8: 8}

# Where products of more rows run lmforge's packed_linear kernel rather than oneDNN's packed one, by the float lanes
# of the kernels' vectors: with AVX2, 1.27x-1.33x oneDNN at 17-32 rows and 1.06x-1.17x at 64-512 (benchmarks/
# kernels.py). AVX-512 keeps oneDNN: untimed there.
PACKED_LINEAR_LANES = (8,)

# Where few_row_linear takes the small steps and oneDNN's packed copy the rest, the copy is laid out for at least this
# many rows: laid out for one row, it makes a 128-row prefill's linears 7% to 15% slower and a 16-row step's 23%
# (AVX2, paired). (Without the kernels it also serves one-row steps, laid out for the batch.)
PACK_ROWS = 64


class DecodeLinear(nn.Module):
    """nn.Linear for fp32 inference on CPU, sharing the original's parameters.

    - Up to FEW_ROWS rows for the kernel's vectors (a decode step's, or a prompt that short) go to lmforge's
      few_row_linear kernel (csrc/decode_cpu.cpp), which reads each weight row once for all of them, about as fast
      as a sum of the same bytes at one row.
    - More rows (prefills, larger batches) go, with AVX2 (PACKED_LINEAR_LANES), to lmforge's packed_linear kernel,
      on a copy of the weight laid out for it (pack_linear_weight).
    - Elsewhere (AVX-512, or where lmforge's kernels cannot be built: no C++ compiler, or neither AVX2 nor AVX-512),
      oneDNN runs on a packed copy of the weight (PyTorch's default kernel for few-row products uses one core: ~8 GB/s
      on an AVX2 machine, 9-13 on an AVX-512 one; the packed one both). Without the kernels, a single row inside the
      compiled decode step is written as multiply-and-sum, which inductor turns into a vectorised loop over all
      cores, fused with its neighbours.
    The packed copy is made by repack() (the engine's refresh()), so it is exactly as current as the last call to it;
    the other paths read the weight itself.
    """

    def __init__(self, linear: nn.Linear, rows: int = 1):
        super().__init__()
        self.in_features, self.out_features = linear.in_features, linear.out_features
        self.weight, self.bias = linear.weight, linear.bias
        # up to how many rows go to lmforge's kernel: 0 where it was not built or the CPU has neither AVX-512 nor AVX2
        ops = cpu_kernels() if self.weight.device.type == "cpu" and self.weight.dtype == torch.float32 else None
        self.few_rows = FEW_ROWS.get(ops.vector_lanes(), 0) if ops is not None else 0
        # (the overloads: no lookup a call)
        self.few_row_linear = ops.few_row_linear.default if self.few_rows else None
        own = self.few_rows and ops.vector_lanes() in PACKED_LINEAR_LANES
        self.packed_linear = ops.packed_linear.default if own else None
        # oneDNN's packing (where it serves) is laid out for products of this many rows
        self.rows = max(rows, PACK_ROWS) if self.few_rows else rows
        self.register_buffer("packed", None, persistent=False)
        self.repack()

    @torch.no_grad()
    def repack(self):
        w = self.weight.detach()
        if self.packed_linear is not None and w.device.type == "cpu" and w.dtype == torch.float32:
            self.packed = cpu_kernels().pack_linear_weight(w)
        elif _can_pack(w.device, w.dtype):
            self.packed = torch.ops.mkldnn._reorder_linear_weight(w, self.rows)
        else:
            self.packed = None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        w, b = self.weight, self.bias  # (each read of a parameter is a module lookup: this runs ~50 times a token)
        if (self.few_rows and x.dtype == w.dtype == torch.float32 and w.is_contiguous()
                and (b is None or b.is_contiguous())):  # (any rank in, the same out)
            if 0 < x.numel() <= self.few_rows * self.in_features:
                return self.few_row_linear(x, w, b)
            if self.packed_linear is not None:
                return self.packed_linear(x, self.packed, b, self.out_features)
        rows = x.reshape(-1, x.size(-1))
        if torch.compiler.is_compiling() and rows.size(0) == 1:
            y = (x.unsqueeze(-2) * self.weight).sum(-1)
            return y if self.bias is None else y + self.bias
        elif self.packed is None or self.packed_linear is not None:  # (the latter: x or the weight not float32)
            return F.linear(x, self.weight, self.bias)
        elif torch.compiler.is_compiling():
            y = onednn_linear(rows, self.packed, self.bias, self.out_features)
        else:  # the same kernel, without a custom op's dispatch (~45 us a call)
            y = torch.ops.mkldnn._linear_pointwise(rows, self.packed, self.bias, "none", [], "")
        return y.view(*x.shape[:-1], self.out_features)


class DecodeInt4Linear(nn.Module):
    """Int4Linear for CPU inference with AVX2, sharing the original's buffers: every product runs lmforge's
    int4_linear_rows8 kernel (csrc/quant_cpu.cpp) on a copy of the codes laid out in blocks of 8 rows
    (Int4Linear.rows8), which reads x's codes once for 8 weight rows and sums them in vector lanes, where int4_linear
    unpacks and sums row by row. On the AVX2 EPYC, GPT-2's shapes, 2 threads: 1.47x int4_linear in a compiled decode
    step (paired); and faster than int4_linear_tiled at 48 to 384 rows (at 128: 2.6 ms against 3.0 for 768 -> 2304,
    3.4 against 4.2 for 3072 -> 768, 57 against 70 for the output layer), so prefills take it too. The copy (made by
    repack(), the engine's refresh()) doubles the memory of the int4 weights."""

    def __init__(self, q: Int4Linear):
        super().__init__()
        self.q = q
        self.rows8 = cpu_kernels().int4_linear_rows8.default
        for name in ("w8", "scales8", "mins8"):
            self.register_buffer(name, None, persistent=False)
        self.repack()

    @torch.no_grad()
    def repack(self):
        self.w8, self.scales8, self.mins8 = self.q.rows8()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        q = self.q
        if x.device.type != "cpu" or x.numel() == 0:
            return q(x)
        rows = x.reshape(-1, q.in_features).float().contiguous()
        bias = None if q.bias is None else q.bias.float()
        y = self.rows8(rows, self.w8, self.scales8, self.mins8, bias, q.group_size, q.out_features)
        return y.to(x.dtype).view(*x.shape[:-1], q.out_features)


class OneQueryAttention(SDPAttention):
    """Attention of one query per row over the KV cache, on CPU. With a causal (bool) mask it calls lmforge's kernel
    (csrc/decode_cpu.cpp), which reads only the slots the mask allows: each row's positions so far. Inside the
    compiled decode step, a static graph reads every slot of the cache (at GPT-2's size, 145 us a layer for a
    384-slot cache became ~50 us at 256 positions); eagerly, PyTorch's fused kernel cost ~160 us a call over the
    slots in use. Compiled without the kernel (or with ALiBi's float bias) it is written as sums of products, which
    inductor fuses into loops (a fraction of the fused kernel's cost). Everywhere else (prefill, training shapes, no
    kernel eagerly) it is SDPAttention."""

    def __init__(self):
        super().__init__()
        cpu_kernels()  # built (once, cached) now: a compiled trace cannot build them

    def forward(self, q, k, v, mask, dropout: float) -> torch.Tensor:
        if not (q.size(-2) == 1 and mask is not None and dropout == 0.0):
            return super().forward(q, k, v, mask, dropout)
        ops = cpu_kernels()
        if (ops is not None and mask.dtype == torch.bool and q.dtype == k.dtype == v.dtype == torch.float32
                and q.stride(-1) == k.stride(-1) == v.stride(-1) == 1):
            return ops.decode_attention(q, k, v, mask, 1 / math.sqrt(q.size(-1)))
        if not torch.compiler.is_compiling():
            return super().forward(q, k, v, mask, dropout)
        B, H, _, D = q.shape
        Hkv = k.size(1)
        rep = H // Hkv
        q = q.view(B, Hkv, rep, 1, D)  # query head h uses key head h // rep
        scores = (q * k.unsqueeze(2)).sum(-1) / math.sqrt(D)  # (B, Hkv, rep, S)
        mb, mh = mask.size(0), mask.size(1)
        mask = mask.reshape(mb, Hkv if mh == H else 1, rep if mh == H else 1, mask.size(-1))
        scores = scores.masked_fill(~mask, float("-inf")) if mask.dtype == torch.bool else scores + mask
        weights = scores.softmax(dim=-1)
        return (weights.unsqueeze(-1) * v.unsqueeze(2)).sum(-2).view(B, H, 1, D)


class FastGELU(nn.GELU):
    """nn.GELU (tanh approximation) computed by lmforge's gelu_tanh kernel (csrc/decode_cpu.cpp) for float32 on CPU,
    outside compiled code: one pass with a polynomial exp in vectors, where PyTorch's tanh costs ~9 cycles an element
    (at GPT-2's size, a 128-token prefill spent ~10 ms of ~210 in it on an AVX2 EPYC). It is within 5.2e-7 of the
    exact function on [-12, 12], and nearer than PyTorch's float32 GELU for negative x, where 1 + tanh cancels; the
    same whatever the number of threads. Inside a compiled graph, inductor writes its own loop."""

    def __init__(self):
        super().__init__(approximate="tanh")

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        ops = cpu_kernels()
        if ops is None or torch.compiler.is_compiling() or x.dtype != torch.float32 or x.device.type != "cpu":
            return super().forward(x)
        return ops.gelu_tanh(x.contiguous())



def speed_up(model: nn.Module, rows: int = 1) -> nn.Module:
    """Swap the CPU modules into model (an inference copy, in place; fp32 on CPU, else unchanged): DecodeLinear for
    every nn.Linear (its packed copy laid out for `rows` rows), OneQueryAttention for SDPA, FastGELU for GPT-2's
    GELU, and with AVX2 DecodeInt4Linear for int4 layers whose groups are a multiple of 32."""
    w = model.wte.weight
    if w.device.type != "cpu" or w.dtype != torch.float32:
        return model
    ops = cpu_kernels()  # the modules below call lmforge's kernels: built (once, cached) now, never in a compiled trace
    vectors = ops is not None and ops.vector_lanes() > 1  # (without vectors, PyTorch's GELU is the faster)
    for parent in list(model.modules()):
        for name, child in parent.named_children():
            if type(child) is nn.Linear:
                setattr(parent, name, DecodeLinear(child, rows))
            elif type(child) is SDPAttention:
                setattr(parent, name, OneQueryAttention())
            elif type(child) is nn.GELU and child.approximate == "tanh" and vectors:
                setattr(parent, name, FastGELU())
            elif (type(child) is Int4Linear and child.group_size % 32 == 0 and vectors and ops.vector_lanes() == 8
                  and child.weight.device.type == "cpu"):
                setattr(parent, name, DecodeInt4Linear(child))
    return model


def repack(model: nn.Module) -> None:
    """Remake every packed copy these modules derived from the weights (after the weights change)."""
    for module in model.modules():
        if isinstance(module, (DecodeLinear, DecodeInt4Linear)):
            module.repack()
