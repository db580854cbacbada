"""Weight quantization as module swaps, and the quality report that measures what they change.

    small = quantize_model(model, "int8")                                # or "int4", group_size=32: a quantized copy
    report = quality_report(model, small, held_out_tokens)               # perplexities, ΔPPL, KL

Every nn.Linear of the model (the output layer included) is replaced, for good, by one of:
- Int8Linear: per-output-channel symmetric int8 weights, W ~ scales[:, None] * weight.
- Int4Linear: group-wise asymmetric 4-bit weights, W ~ q * scale + min for each group of group_size inputs, q in
  0..15 packed two to a byte (a group's first half in the low nibbles, its second half in the high ones), scales and
  minimums in float16.
On CPU both also round each input row to int8 steps (one scale per row) and take integer dot products, as llama.cpp
does for q8_0 and q4_0: in one call of the kernels of cpu/csrc/quant_cpu.cpp (AVX-512 VNNI or AVX2, built for the
machine on first use by cpu/kernels.py), or where those cannot be built, the same computation in PyTorch operators. On
an AVX2 CPU, many rows at once (a prefill) take the same products in float instead (cpu/csrc/decode_cpu.cpp's tiled
kernels, on the weight dequantized block by block: see TILED_ROWS), the same results to float rounding. An engine
on an AVX2 CPU runs its int4 layers through a copy of the codes in blocks of 8 rows (Int4Linear.rows8, the engine's
DecodeInt4Linear), which doubles their memory there.
Elsewhere (CUDA) the weight is dequantized on the fly into the input's dtype; inside a compiled step, one input row is
written as sums of products of the stored codes, which inductor fuses into kernels that read the codes once.
A tied token embedding becomes the dequantized output matrix, so the run stores that matrix once, quantized.

The `quantize` verb (quantize_run.py) writes a quantized run behind the quality report; runs.py reads one back.
"""

from __future__ import annotations

import copy
import math

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F

from .cpu.kernels import cpu_kernels
from .errors import UserError
from .model import GPT

METHODS = ("int8", "int4")
DEFAULT_GROUP_SIZE = 32  # int4 inputs per scale (llama.cpp's q4_0 block)
DEFAULT_EVAL_TOKENS = 16_384  # held-out tokens the quality report measures


# ------------------------------------------------------------------------------------------------- the modules

# From how many input rows a CPU layer runs int8_linear_tiled / int4_linear_tiled rather than the integer dot
# products, by the float lanes of the vectors the kernels were built for. Measured with AVX2 (a Zen 3 EPYC, no VNNI:
# each 32 byte pairs of an integer dot product take 3 to 4 instructions, as many as the float FMAs they replace), 2
# threads, on GPT-2's 768 -> 2304 and 3072 -> 768: int8 1.12x and 0.96x at 64 rows, 1.22x and 0.96x at 128; int4
# 1.12x and 0.98x at 16 rows, 1.65x and 1.42x at 32, 2.5x and 2.1x at 128 (a 4-bit weight dequantized once serves
# all the rows, where the dot products unpack it again for each). Untimed with AVX-512 (VNNI's dot products are 4x
# AVX2's), which keeps the integer kernels.
TILED_ROWS = {8: (64, 24)}


def _tiled_rows(which: int) -> float:
    """TILED_ROWS for this machine, int8's (0) or int4's (1); infinity where the kernels did not build."""
    ops = cpu_kernels()
    return math.inf if ops is None else TILED_ROWS.get(ops.vector_lanes(), (math.inf, math.inf))[which]


def _keeping_dtypes(module: nn.Module, names: tuple[str, ...], apply) -> nn.Module:
    """Run nn.Module._apply (a cast or a move) but keep these buffers in the dtype they had: moved, never cast."""
    kept = {name: getattr(module, name) for name in names}
    apply()
    for name, old in kept.items():
        if getattr(module, name).dtype != old.dtype:
            setattr(module, name, old.to(getattr(module, name).device))
    return module


class Int8Linear(nn.Module):
    """y = x W^T + b with W stored as int8 (out, in) and one float scale per output channel."""

    def __init__(self, in_features: int, out_features: int, bias: bool, device=None, dtype=torch.float32):
        super().__init__()
        self.in_features, self.out_features = in_features, out_features
        self.register_buffer("weight", torch.empty(out_features, in_features, dtype=torch.int8, device=device))
        self.register_buffer("scales", torch.empty(out_features, dtype=dtype, device=device))
        self.bias = nn.Parameter(torch.empty(out_features, dtype=dtype, device=device), requires_grad=False) \
            if bias else None
        self.tiled_rows = _tiled_rows(0)  # (kernels built now, never inside a forward)

    @classmethod
    @torch.no_grad()
    def from_linear(cls, linear: nn.Linear) -> Int8Linear:
        w = linear.weight.detach().float()
        q = cls(linear.in_features, linear.out_features, linear.bias is not None, w.device, linear.weight.dtype)
        scales = w.abs().amax(dim=1).clamp(min=1e-12) / 127  # (out,)
        q.weight.copy_(torch.round(w / scales[:, None]).clamp(-127, 127).to(torch.int8))
        q.scales.copy_(scales)
        if linear.bias is not None:
            q.bias.copy_(linear.bias.detach())
        return q

    def _apply(self, fn, recurse=True):
        """model.to(dtype) casts the bias; the scales stay as stored (float32: bfloat16 would round each channel's
        scale by up to 0.4%, and the CPU kernel reads float32), while a move to another device moves them."""
        return _keeping_dtypes(self, ("scales",), lambda: super(Int8Linear, self)._apply(fn, recurse))

    def dequantize(self) -> torch.Tensor:
        return self.weight.to(self.scales.dtype) * self.scales[:, None]  # (out, in)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.device.type != "cpu":
            if torch.compiler.is_compiling() and x.numel() == x.size(-1):  # one row, compiled: see _one_row
                y = self._one_row(x.reshape(-1)).view(*x.shape[:-1], self.out_features).to(x.dtype)
            else:
                y = F.linear(x, self.weight.to(x.dtype)) * self.scales.to(x.dtype)
            return y if self.bias is None else y + self.bias.to(x.dtype)
        rows = x.reshape(-1, self.in_features).float().contiguous()  # (N, in)
        ops = cpu_kernels()
        if ops is not None and self.scales.dtype == torch.float32:  # the same computation, in one call
            bias = None if self.bias is None else self.bias.float()
            kernel = ops.int8_linear_tiled if rows.size(0) >= self.tiled_rows else ops.int8_linear
            y = kernel(rows, self.weight, self.scales, bias)
            return y.to(x.dtype).view(*x.shape[:-1], -1)
        x_scales = rows.abs().amax(dim=-1, keepdim=True).clamp(min=1e-12) / 127  # (N, 1)
        x_int8 = torch.round(rows / x_scales).to(torch.int8)
        y = torch._int_mm(x_int8, self.weight.t()).float() * (x_scales * self.scales.float())  # (N, out)
        y = y if self.bias is None else y + self.bias.float()
        return y.to(x.dtype).view(*x.shape[:-1], self.out_features)

    def _one_row(self, x: torch.Tensor) -> torch.Tensor:
        """One input row (in,) -> (out,) in float32, as sums of products with the int8 codes: inductor compiles it into
        a reduction that reads each code once, where a matrix product would first write the whole dequantized weight
        out (at GPT-2's size on an H100, 1,727 tok/s against 304)."""
        return (x.float() * self.weight).sum(-1) * self.scales.float()

    def extra_repr(self) -> str:
        return f"in_features={self.in_features}, out_features={self.out_features}, bias={self.bias is not None}"


class Int4Linear(nn.Module):
    """y = x W^T + b with W stored as 4-bit codes in groups of group_size inputs, each with a scale and a minimum."""

    def __init__(self, in_features: int, out_features: int, bias: bool, group_size: int, device=None,
                 dtype=torch.float32):
        super().__init__()
        if group_size % 2 or in_features % group_size:
            raise UserError(f"int4 groups of {group_size} do not divide a layer's {in_features} inputs; pick a "
                            f"--group-size that divides {in_features} (and is even)")
        self.in_features, self.out_features, self.group_size = in_features, out_features, group_size
        groups = in_features // group_size
        self.register_buffer("weight", torch.empty(out_features, in_features // 2, dtype=torch.uint8, device=device))
        # float16, as llama.cpp's q4_0 keeps its scales: 5 bits a weight in all, where float32 would make it 6
        self.register_buffer("scales", torch.empty(out_features, groups, dtype=torch.float16, device=device))
        self.register_buffer("mins", torch.empty(out_features, groups, dtype=torch.float16, device=device))
        self.bias = nn.Parameter(torch.empty(out_features, dtype=dtype, device=device), requires_grad=False) \
            if bias else None
        self.tiled_rows = _tiled_rows(1)  # (kernels built now, never inside a forward)

    @classmethod
    @torch.no_grad()
    def from_linear(cls, linear: nn.Linear, group_size: int) -> Int4Linear:
        w = linear.weight.detach().float()
        if not w.isfinite().all():
            raise UserError("a layer's weights hold NaN or infinity: the model is broken; quantize a healthy checkpoint")
        q = cls(linear.in_features, linear.out_features, linear.bias is not None, group_size, w.device,
                linear.weight.dtype)
        groups = w.view(q.out_features, -1, group_size)  # (out, groups, G)
        low, high = groups.amin(dim=-1).half(), groups.amax(dim=-1)  # the minimum as stored, then the step from it
        scales = ((high - low.float()) / 15).clamp(min=2 ** -24).half()  # (the smallest float16 above 0)
        if not (scales.isfinite().all() and low.isfinite().all()):
            raise UserError(f"a layer's weights reach {w.abs().max().item():.3g}, past what int4's float16 scales "
                            f"hold (65504); quantize this model with int8")
        codes = torch.round((groups - low.float()[..., None]) / scales.float()[..., None]).clamp(0, 15).to(torch.uint8)
        half = group_size // 2
        q.weight.copy_((codes[..., :half] | (codes[..., half:] << 4)).view(q.out_features, -1))
        q.scales.copy_(scales)
        q.mins.copy_(low)
        if linear.bias is not None:
            q.bias.copy_(linear.bias.detach())
        return q

    def _apply(self, fn, recurse=True):
        """model.to(dtype) casts the bias; the scales and minimums stay float16 as stored (bfloat16 would round them,
        float32 would only take more room), while a move to another device moves them."""
        return _keeping_dtypes(self, ("scales", "mins"), lambda: super(Int4Linear, self)._apply(fn, recurse))

    def codes(self, dtype) -> tuple[torch.Tensor, torch.Tensor]:
        """The low and high halves of every group as numbers, each (out, groups, group_size / 2)."""
        packed = self.weight.view(self.out_features, -1, self.group_size // 2)
        return (packed & 15).to(dtype), (packed >> 4).to(dtype)

    def dequantize(self) -> torch.Tensor:
        """W as float32 (out, in)."""
        low, high = self.codes(torch.float32)
        codes = torch.cat([low, high], dim=-1)  # (out, groups, G)
        scales, mins = self.scales.float(), self.mins.float()
        return (codes * scales[..., None] + mins[..., None]).view(self.out_features, self.in_features)

    @torch.no_grad()
    def rows8(self) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """The codes, scales and minimums laid out for lmforge_cpu::int4_linear_rows8 (cpu/csrc/quant_cpu.cpp): rows in
        blocks of 8 (the last padded with zeros), each block's packed bytes as (K / 8, 8, 4), 4 bytes of each of
        its rows side by side, and its scales and minimums as (groups, 8)."""
        pad = -self.out_features % 8
        blocks = (self.out_features + pad) // 8
        w8 = F.pad(self.weight, (0, 0, 0, pad)).view(blocks, 8, -1, 4).transpose(1, 2).contiguous()
        scales8, mins8 = (F.pad(t, (0, 0, 0, pad)).view(blocks, 8, -1).transpose(1, 2).contiguous()
                          for t in (self.scales, self.mins))
        return w8, scales8, mins8

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.device.type != "cpu":
            if torch.compiler.is_compiling() and x.numel() == x.size(-1):  # one row, compiled: see _one_row
                y = self._one_row(x.reshape(-1)).view(*x.shape[:-1], self.out_features).to(x.dtype)
            else:
                y = F.linear(x, self.dequantize().to(x.dtype))
            return y if self.bias is None else y + self.bias.to(x.dtype)
        rows = x.reshape(-1, self.in_features).float().contiguous()  # (N, in)
        ops = cpu_kernels()
        bias = None if self.bias is None else self.bias.float()
        if ops is not None:  # the same computation, in one call
            kernel = ops.int4_linear_tiled if rows.size(0) >= self.tiled_rows else ops.int4_linear
            y = kernel(rows, self.weight, self.scales, self.mins, bias, self.group_size)
        else:  # the input rounded to int8 steps as the kernel does, then the dequantized weight
            x_scales = rows.abs().amax(dim=-1, keepdim=True).clamp(min=1e-12) / 127  # (N, 1)
            y = F.linear(torch.round(rows / x_scales) * x_scales, self.dequantize(), bias)
        return y.to(x.dtype).view(*x.shape[:-1], self.out_features)

    def _one_row(self, x: torch.Tensor) -> torch.Tensor:
        """One input row (in,) -> (out,) in float32, as sums of products with the codes, which inductor compiles into
        reductions that read the packed bytes once (see Int8Linear._one_row). float32, since the sums of codes times
        inputs run ~1/scale times larger than the output (past float16's range for inputs of a few hundred)."""
        x = x.float().view(-1, self.group_size)  # (groups, G)
        low, high = self.codes(torch.float32)  # (out, groups, G/2) each
        half = self.group_size // 2
        dots = (low * x[:, :half] + high * x[:, half:]).sum(-1)  # (out, groups): code . input, per group
        return (dots * self.scales.float() + self.mins.float() * x.sum(-1)).sum(-1)

    def extra_repr(self) -> str:
        return (f"in_features={self.in_features}, out_features={self.out_features}, bias={self.bias is not None}, "
                f"group_size={self.group_size}")


QUANTIZED = (Int8Linear, Int4Linear)


# ----------------------------------------------------------------------------------------------- the swapping

def check_method(method: str, group_size: int | None) -> int | None:
    if method not in METHODS:
        raise UserError(f"unknown quantization method {method!r}; use one of {', '.join(METHODS)}")
    if method == "int8":
        return None
    group_size = DEFAULT_GROUP_SIZE if group_size is None else group_size
    if isinstance(group_size, bool) or not isinstance(group_size, int) or group_size < 2 or group_size % 2:
        raise UserError(f"--group-size {group_size!r} must be an even number of inputs (32, 64 or 128 are usual)")
    return group_size


def _linears(model: nn.Module) -> list[tuple[nn.Module, str, nn.Linear]]:
    return [(parent, name, child) for parent in model.modules() for name, child in parent.named_children()
            if type(child) is nn.Linear]


def _untie(model: GPT) -> None:
    """Give the output layer a weight of its own, so that it can be replaced while the embedding stays."""
    if model.lm_head.weight is model.wte.weight:
        model.lm_head.weight = nn.Parameter(model.wte.weight.detach().clone(), requires_grad=False)


def quantize_model(model: GPT, method: str, group_size: int | None = None) -> GPT:
    """A quantized copy of model (eval mode, no gradients): every nn.Linear replaced by Int8Linear or Int4Linear;
    a tied embedding becomes the dequantized output matrix. The model passed in is not changed."""
    group_size = check_method(method, group_size)
    from .lora import LoRALinear, merge_lora
    model = copy.deepcopy(model).eval().requires_grad_(False)
    if any(isinstance(m, LoRALinear) for m in model.modules()):
        merge_lora(model)
    if any(isinstance(m, QUANTIZED) for m in model.modules()):
        raise UserError("this model is already quantized; quantize the full-precision run it came from")
    tied = model.config.tie_embeddings
    _untie(model)
    for parent, name, linear in _linears(model):
        new = Int8Linear.from_linear(linear) if method == "int8" else Int4Linear.from_linear(linear, group_size)
        setattr(parent, name, new)
    if tied:
        model.wte.weight = nn.Parameter(model.lm_head.dequantize().to(model.wte.weight.dtype), requires_grad=False)
    return model


def empty_quantized(model: GPT, method: str, group_size: int | None) -> GPT:
    """Swap model's nn.Linears (in place) for quantized modules of the same shapes, to load a quantized state into."""
    group_size = check_method(method, group_size)
    _untie(model)
    for parent, name, linear in _linears(model):
        args = (linear.in_features, linear.out_features, linear.bias is not None)
        kw = {"device": linear.weight.device, "dtype": linear.weight.dtype}
        setattr(parent, name, Int8Linear(*args, **kw) if method == "int8" else Int4Linear(*args, group_size, **kw))
    return model.requires_grad_(False)


def quantized_state(model: GPT) -> dict[str, torch.Tensor]:
    """What a quantized run stores: the quantized modules' buffers and the rest, the tied embedding left out."""
    state = model.state_dict()
    if model.config.tie_embeddings:
        state.pop("wte.weight")
    return {k: v.detach().to("cpu").contiguous() for k, v in state.items()}


# ---------------------------------------------------------------------------------------------- the quality gate

@torch.no_grad()
def quality_report(original: GPT, quantized: GPT, tokens: np.ndarray, max_tokens: int = DEFAULT_EVAL_TOKENS,
                   batch_size: int = 4) -> dict:
    """Both models on consecutive windows of held-out tokens: perplexity of each, ΔPPL in percent, and the mean
    (and largest per-window) KL(original || quantized) of next-token distributions, in nats."""
    T = original.config.block_size
    windows = min((len(tokens) - 1) // T, max(1, max_tokens // T))
    if windows < 1:
        raise UserError(f"the held-out split has {len(tokens)} tokens, fewer than one window of {T + 1}; "
                        f"pass --data with more held-out text")
    device = original.wte.weight.device
    nll_a = nll_b = kl = 0.0
    worst, n = 0.0, 0
    for start in range(0, windows, batch_size):
        rows = range(start, min(start + batch_size, windows))
        chunk = np.stack([np.asarray(tokens[r * T:(r + 1) * T + 1], dtype=np.int64) for r in rows])
        x, y = torch.from_numpy(chunk[:, :-1]).to(device), torch.from_numpy(chunk[:, 1:]).to(device)
        lp_a = F.log_softmax(original(x)[0].float(), dim=-1)  # (B, T, V)
        lp_b = F.log_softmax(quantized(x)[0].float(), dim=-1)
        nll_a += -lp_a.gather(-1, y[..., None]).sum().item()
        nll_b += -lp_b.gather(-1, y[..., None]).sum().item()
        per_position = (lp_a.exp() * (lp_a - lp_b)).sum(-1)  # (B, T)
        kl += per_position.sum().item()
        worst = max(worst, per_position.mean(-1).max().item())
        n += y.numel()
    ppl_a, ppl_b = math.exp(nll_a / n), math.exp(nll_b / n)
    return {"tokens": n, "ppl": ppl_a, "ppl_quantized": ppl_b, "delta_ppl_percent": 100 * (ppl_b / ppl_a - 1),
            "kl_mean": kl / n, "kl_worst_window": worst}
