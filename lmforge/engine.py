"""The inference engine: decoding as one explicit object, with continuous batching.

    engine = Engine(model, tokenizer, max_batch=8, max_seq_len=512, compile=True)
    rid = engine.add(Request(prompt_ids, max_new_tokens=50, temperature=0.8, seed=1, stop=["\n\n"]))
    while engine.has_work():
        for event in engine.step(): ...        # Event(id, token, text, finished, finish_reason)

It owns, and builds explicitly:
- an inference copy of the model: new module objects in eval mode that share the model's parameters, with speed-up
  modules swapped in for good (on CPU, linears, one-query attention and GPT-2's GELU that call lmforge's kernels,
  or oneDNN's);
  the model the caller holds is never touched (its values and addresses; a compiled CPU engine may move its memory
  onto 2 MB pages, below), so training beside an engine computes exactly what it would without;
- a static KV cache of max_batch slots x max_seq_len positions: a request holds one slot from its prefill to its
  last token, its token at position p in cache position p;
- on CPU, when compiled (or asked: huge_pages=True; False never), the weights and the KV cache moved onto 2 MB
  pages in place (lmforge/pages.py; huge_page_bytes says how much): a decode step streams every weight once, 1.09x
  faster on 2 MB pages at GPT-2's size, for about 1.4 s once;
- on CPU, glibc asked to keep freed memory for reuse (lmforge/pages.py; process-wide, unless the process has its
  own malloc settings or LMFORGE_KEEP_FREED_MEMORY=0): by default it hands freed activations back and each prefill
  faults them in afresh (a 128-token prefill at GPT-2's size is 1.07x faster with them kept);
- the decode step: one forward of one token per row, for a single running request on its own row of the cache,
  else for the first 4, 16, ... or all slots, whichever is the smallest that holds every running request; when
  asked, each of these is compiled at construction (a warm-up), and never recompiled silently: if a later step
  would need a new graph, the engine warns and decodes eagerly from then on; on CUDA each compiled step is also
  captured as a CUDA graph at construction and replayed (one launch a token instead of hundreds);
- continuous batching: add() queues a request, step() first decodes one token for every running request, then
  prefills waiting ones into free slots (each gives its first token), and a request leaves as soon as it ends;
  cancel() frees a slot at once.

Each request carries its own sampling settings, stop conditions and seeded generator, and each row is sampled on
its own, so a seeded request gives the same tokens alone or batched with others. The packed weights are derived from
the model's weights when the engine is built: after the weights change (a training step, a load), call refresh() or
build a new engine. The engine knows token ids; given a tokenizer it also turns them into text pieces (never splitting
a character) and checks stop strings. It is thread-confined: one thread steps it, others talk to it through a queue.
"""

from __future__ import annotations

import codecs
import copy
import itertools
import math
import operator
import os
import re
import shutil
import types
import warnings
from collections import deque
from dataclasses import dataclass, field

import torch
import torch.nn as nn
import torch.nn.functional as F

from .errors import UserError
from .kernels import cpu_kernels
from .model import GPT, SDPAttention
from .pages import collapse, keep_freed_memory, proc_bytes
from .quantize import Int4Linear
from .sampling import apply_repetition_penalty, check_sampling, check_stop, sample_next_token


# ------------------------------------------------------------------------------------------ requests and events

MAX_LOGPROBS = 20  # top alternatives a request may ask for

@dataclass
class Request:
    """What to generate: prompt token ids, how many new tokens at most, how to sample, and when to stop."""
    prompt: list[int]
    max_new_tokens: int = 100
    temperature: float = 1.0  # 0 = greedy
    top_k: int | None = None
    top_p: float | None = None
    repetition_penalty: float = 1.0  # CTRL's rule; 1 = off
    stop: list[str] = field(default_factory=list)  # stop strings (need the engine's tokenizer); not returned
    seed: int | None = None  # None: drawn from torch's global generator
    stop_at_eos: bool = True  # end at the tokenizer's end-of-text (Engine(eos_id=...))
    logprobs: int | None = None  # report each new token's log-probability and this many top alternatives
    prompt_logprobs: bool = False  # also report the prompt tokens' log-probabilities (in the first event)


@dataclass
class Logprob:
    """A token's log-probability under the model's own next-token distribution (before temperature, penalties or
    truncation) and the top alternatives at its position, most likely first, as (token, logprob)."""
    token: int
    logprob: float
    top: list[tuple[int, float]] = field(default_factory=list)


@dataclass
class Event:
    """One request's news from a step: its new token (None when it ended without one), the text that token completes
    (with a tokenizer; held back while it may begin a stop string), and whether it ended: finish_reason 'stop' (end
    of text or a stop string) or 'length' (max_new_tokens). With Request.logprobs, logprob scores the new token; with
    Request.prompt_logprobs, the request's first event scores every prompt token after the first."""
    request_id: int
    token: int | None
    text: str = ""
    finished: bool = False
    finish_reason: str | None = None
    logprob: Logprob | None = None
    prompt_logprobs: list[Logprob] | None = None


class TextStream:
    """Token bytes in, text out: never splits a multi-byte character, and holds back text that may begin a stop
    string until it is known not to."""

    def __init__(self, stop: list[str]):
        self.decoder = codecs.getincrementaldecoder("utf-8")(errors="replace")
        self.stop, self.pending, self.stopped = stop, "", False
        self.hold = max((len(s) for s in stop), default=1) - 1

    def feed(self, data: bytes, final: bool = False) -> str:
        self.pending += self.decoder.decode(data, final=final)
        hits = [self.pending.find(s) for s in self.stop if s in self.pending]
        if hits:
            out, self.pending, self.stopped = self.pending[:min(hits)], "", True
            return out
        cut = len(self.pending) if final else max(0, len(self.pending) - self.hold)
        out, self.pending = self.pending[:cut], self.pending[cut:]
        return out


@dataclass(eq=False)
class _Sequence:
    """A request in flight: its tokens so far, its slot and how many positions of it the cache holds."""
    id: int
    request: Request
    generator: torch.Generator
    ids: list[int]  # the whole prompt, then every token generated
    stream: TextStream | None
    slot: int = -1
    cached: int = 0  # positions written to the cache (the token at position p sits in slot position p)
    generated: int = 0
    pending: int | None = None  # the last sampled token: not in the cache yet
    sliding: bool = False  # a learned/sinusoidal model past block_size: recompute the last window every step


def _token_id(t) -> int:
    """A token id as a plain int (numpy and 0-d tensor ints too); a UserError for anything else, bools included."""
    if isinstance(t, bool) or isinstance(t, torch.Tensor) and (t.dim() != 0 or t.dtype == torch.bool):
        raise UserError(f"prompt token {t!r} is not a token id")
    try:
        return operator.index(t)
    except TypeError:
        raise UserError(f"prompt token {t!r} is not an integer token id") from None


def _available_memory() -> float:
    """Bytes this machine can still give (MemAvailable in /proc/meminfo); infinite where that cannot be read."""
    available = proc_bytes("/proc/meminfo", "MemAvailable")
    return float("inf") if available is None else available


# ---------------------------------------------------------------------------------------------- speed-up modules

def _can_pack(device: torch.device, dtype: torch.dtype) -> bool:
    return (device.type == "cpu" and dtype == torch.float32 and torch.backends.mkldnn.is_available()
            and hasattr(torch.ops.mkldnn, "_reorder_linear_weight") and hasattr(torch.ops.mkldnn, "_linear_pointwise"))


@torch.library.custom_op("lmforge::packed_linear", mutates_args=())
def packed_linear(x: torch.Tensor, packed: torch.Tensor, bias: torch.Tensor | None, out_features: int) -> torch.Tensor:
    """x (N, in) @ a oneDNN-packed weight (+ bias) -> (N, out). An op of its own, so that a compiled graph calls the
    oneDNN kernel as it is (inductor would otherwise lower a few-row F.linear to a slower generic matrix product)."""
    return torch.ops.mkldnn._linear_pointwise(x, packed, bias, "none", [], "")


@packed_linear.register_fake
def _(x, packed, bias, out_features):
    return x.new_empty(x.size(0), out_features)


# Up to how many rows a linear layer streams its weight once with lmforge's few_row_linear kernel rather than running
# oneDNN's packed kernel, by the float lanes of the vectors the kernel was built for (paired runs over GPT-2's 49 weight
# matrices, 2 threads):
# - 16, AVX-512 (the machine before): 1.36x oneDNN at one row, 1.40x at two, 0.74x at three, with the kernel's
#   earlier form, which read each weight row once per row of x;
# - 8, AVX2 (an AMD EPYC, Zen 3): 1.37x at one row, 1.41x at two, 1.59x at four, 1.33x at eight, 0.99x at twelve,
#   0.83x at sixteen, in a minute when memory was fast (a sum at ~29 GB/s); in a slow one, and before the kernel read
#   two streams for up to four rows, 1.19x, 1.48x, 1.49x, 1.47x, 1.12x and 1.00x. Both with the kernel's form before
#   its present one, which is 1.02x to 1.07x faster at 1, 2, 4, 7 and 8 rows; with it, in two runs, 1.35x and 1.26x
#   at eight rows, 1.11x and 1.08x at twelve, 1.09x and 1.03x at sixteen (a 16-slot engine's full step), 1.00x and
#   0.96x at twenty (the second run with a sum at 31-35 GB/s, a fast minute).
FEW_ROWS = {16: 2, 8: 16}

# Where products of more rows run lmforge's packed_linear kernel rather than oneDNN's packed one, by the float lanes
# of the kernels' vectors: with AVX2 (a Zen 3 EPYC, 2 threads), 180-189 GFLOP/s on GPT-2's four weight shapes at 17
# to 512 rows against oneDNN's 129-155. AVX-512 keeps oneDNN: untimed (this machine has none).
PACKED_LINEAR_LANES = (8,)

# Where few_row_linear takes the small steps and oneDNN's packed copy the rest, the copy is laid out for at least this
# many rows: laid out for one row, it made a 128-row prefill's linears 7% to 15% slower and a 16-row step's 23% (AVX2,
# paired, when oneDNN ran such steps). (Without the kernels it also serves one-row steps, laid out for the batch.)
PACK_ROWS = 64


class DecodeLinear(nn.Module):
    """nn.Linear for fp32 inference on CPU, sharing the original's parameters.

    - Up to FEW_ROWS rows for the kernel's vectors (a decode step's, or a prompt that short) go to lmforge's
      few_row_linear kernel (csrc/decode_cpu.cpp), which reads each weight row once for all of them, about as fast
      as a sum of the same bytes at one row (on an AVX-512 machine, in a paired run, the compiled step decoded 1.15x
      faster with it than with inductor's loops, and 1.25x faster again with a prefetch ahead of its reads).
    - More rows (prefills, larger batches) go, with AVX2 (PACKED_LINEAR_LANES), to lmforge's packed_linear kernel,
      on a copy of the weight laid out for it (pack_linear_weight): on the AVX2 EPYC, 1.2x to 1.4x oneDNN's packed
      kernel on GPT-2's shapes at 17 to 512 rows, near the FMA units' peak.
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
            y = packed_linear(rows, self.packed, self.bias, self.out_features)
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


def unwrap(model) -> GPT:
    """The GPT inside a torch.compile'd or DDP-wrapped model; a UserError for anything else."""
    model = getattr(model, "_orig_mod", model)
    model = getattr(model, "module", model)
    if not isinstance(model, GPT):
        raise UserError(f"expected a lmforge GPT (or an Engine), got {type(model).__name__}")
    return model


def inference_copy(model: GPT, rows: int = 1) -> GPT:
    """New module objects in eval mode sharing the model's parameters and buffers, with the CPU speed-up modules
    swapped in (fp32 on CPU): DecodeLinear for every nn.Linear, OneQueryAttention for SDPA, FastGELU for GPT-2's
    GELU, and with AVX2 DecodeInt4Linear for int4 layers whose groups are a multiple of 32."""
    shared = {id(t): t for t in itertools.chain(model.parameters(), model.buffers())}
    inference = copy.deepcopy(model, memo=shared).eval()
    inference.sparse_embedding_grad = False  # (no gradients here; a dense lookup compiles into the step's own code)
    w = inference.wte.weight
    if w.device.type != "cpu" or w.dtype != torch.float32:
        return inference
    ops = cpu_kernels()  # the modules below call lmforge's kernels: built (once, cached) now, never in a compiled trace
    vectors = ops is not None and ops.vector_lanes() > 1  # (without vectors, PyTorch's GELU is the faster)
    for parent in list(inference.modules()):
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
    return inference


def _decode_step(model: GPT, cache, tokens: torch.Tensor, positions: torch.Tensor) -> torch.Tensor:
    """tokens, positions (B, 1) -> logits (B, V): one token per slot through the whole static cache."""
    return model(tokens, kv_cache=cache, positions=positions)[0][:, -1]


def _guards_off_the_model(entries) -> list[bool]:
    """Which of the compiled step's guards to check on each call: not the ~1,000 on the inference copy of the model,
    which the engine owns and never changes (checking them cost ~0.8 ms a token at GPT-2's size); every one on the
    cache, tokens and positions, so a cache of another shape still fails a guard and is reported."""
    return [re.match(r"^(\w+\()*model\b", entry.name) is None for entry in entries]


class CapturedStep:
    """One compiled decode step on one view of the cache, captured as a CUDA graph: a call runs every kernel of the
    step in one launch, reading tokens and positions from its own input tensors and writing the logits to its own
    output tensor, which the next replay of any of the engine's graphs may overwrite (they share one memory pool):
    use them before the next step. The graph holds the addresses of the weights and the cache, so in-place changes
    (an optimizer step, load_state_dict) are seen; the engine recaptures when a weight moves to new memory."""

    def __init__(self, step, model: GPT, cache, pool):
        self.device = cache.layers[0].k.device
        with torch.cuda.device(self.device):  # streams and the capture on the model's GPU, whichever is current
            self.tokens = torch.zeros(cache.batch_size, 1, dtype=torch.long, device=self.device)
            self.positions = torch.zeros_like(self.tokens)
            side = torch.cuda.Stream()
            side.wait_stream(torch.cuda.current_stream())
            with torch.cuda.stream(side):  # the compiled code runs once outside the capture first (CUDA's rule)
                step(model, cache, self.tokens, self.positions)
            torch.cuda.current_stream().wait_stream(side)
            self.graph = torch.cuda.CUDAGraph()
            with torch.cuda.graph(self.graph, pool=pool, stream=side):
                self.logits = step(model, cache, self.tokens, self.positions)

    def __call__(self, tokens: torch.Tensor, positions: torch.Tensor) -> torch.Tensor:
        with torch.cuda.device(self.device):
            self.tokens.copy_(tokens)
            self.positions.copy_(positions)
            self.graph.replay()
        return self.logits


def _fresh_function(fn):
    """A copy of fn with its own code object. Dynamo keeps compiled graphs on the code object, up to a recompile limit
    shared by everything compiled from it: with its own, each engine's graph neither evicts nor counts against
    another engine's (models of other sizes, other batch shapes)."""
    return types.FunctionType(fn.__code__.replace(), fn.__globals__, fn.__name__, fn.__defaults__, fn.__closure__)


# ------------------------------------------------------------------------------------------------------ the engine

class Engine:
    """See the module docstring. model: a GPT (its weights are shared, not copied); tokenizer: optional, for text
    pieces and stop strings (needs decode_bytes and eot_id); max_batch: slots decoded together; max_seq_len: cache
    positions per slot (default block_size); compile: compile the decode step now (a warm-up)."""

    def __init__(self, model: GPT, tokenizer=None, max_batch: int = 8, max_seq_len: int | None = None,
                 compile: bool = False, eos_id: int | None = None, huge_pages: bool | None = None):
        model = unwrap(model)
        cfg = model.config
        max_seq_len = cfg.block_size if max_seq_len is None else max_seq_len
        if max_batch < 1 or max_seq_len < 1:
            raise UserError(f"max_batch={max_batch} and max_seq_len={max_seq_len} must be at least 1")
        if max_seq_len > cfg.block_size and not cfg.extrapolates:
            raise UserError(f"max_seq_len={max_seq_len} exceeds block_size={cfg.block_size}, which "
                            f"position={cfg.position!r} cannot go past")
        self.device = model.wte.weight.device
        if compile and self.device.type == "cpu":
            cxx = os.environ.get("CXX", "g++")
            if shutil.which(cxx) is None:
                raise UserError(f"compile=True on CPU needs a C++ compiler ({cxx!r}, or set CXX) for torch.compile's "
                                f"kernels; install one, or decode without compile")
        self.config, self.tokenizer = cfg, tokenizer
        self.eos_id = eos_id if eos_id is not None else getattr(tokenizer, "eot_id", None)
        self.max_batch, self.max_seq_len = max_batch, max_seq_len
        self.model = inference_copy(model, rows=max_batch)
        size = 2 * cfg.n_layer * max_batch * max_seq_len * cfg.kv_heads * cfg.head_dim * model.wte.weight.element_size()
        too_big = UserError(f"the KV cache for {max_batch} x {max_seq_len} positions needs {size / 1e9:.1f} GB, more "
                            f"than this machine has free; ask for fewer tokens or slots")
        if self.device.type == "cpu" and size > _available_memory():
            raise too_big  # fail now, with a message, rather than be killed for memory while zeroing the cache
        try:
            self.cache = self.model.make_kv_cache(max_batch, max_seq_len)
        except (torch.OutOfMemoryError, MemoryError):
            raise too_big from None
        except RuntimeError as e:  # CPU allocation failures are plain RuntimeErrors
            if "alloc" not in str(e):
                raise
            raise too_big from None
        # 2 MB pages under what each CPU decode step streams (lmforge/pages.py): by default for a compiled engine, the
        # long-lived, speed-first kind
        self.huge_pages = (compile if huge_pages is None else huge_pages) and self.device.type == "cpu"
        self.huge_page_bytes = self._collapse()
        if self.device.type == "cpu":  # freed activations reused, not faulted in again (pages.py; process-wide)
            keep_freed_memory()
        self._rows = [self.cache.rows(i, i + 1) for i in range(max_batch)]  # each slot's row, as a cache of its own
        # Several running requests decode on the first b slots, for the smallest b of these buckets that holds them
        # all (a request takes the lowest free slot, so b follows how many run): powers of 4, then every slot.
        self._buckets = sorted({min(4 ** i, max_batch) for i in range(1, 16) if 4 ** (i - 1) < max_batch})
        self._views = {b: self.cache.rows(0, b) for b in self._buckets if max_batch > 1}
        self.slots: list[_Sequence | None] = [None] * max_batch
        self.waiting: deque[_Sequence] = deque()
        self._ids = itertools.count()
        self._step = None  # the compiled decode step, when asked for: graphs for one row and for each bucket
        if compile:  # on CPU the code that calls the step's kernels is C++ too (cpp_wrapper: ~7% faster at GPT-2's
            # size, where Python spent ~1 ms a token calling ~100 kernels)
            self._step = torch.compile(_fresh_function(_decode_step), fullgraph=True, dynamic=False,
                                       options={"guard_filter_fn": _guards_off_the_model,
                                                "cpp_wrapper": self.device.type == "cpu"})
            with torch.no_grad():
                self._warm_up()
        self._graphs: dict[int, CapturedStep] = {}  # id(cache view) -> its captured step (CUDA, compiled)
        self._weights: list[torch.Tensor] = []  # what the graphs read, and the addresses they read it at
        self._captured_at: tuple[int, ...] = ()
        self._capture()

    # --- the public API
    def add(self, request: Request) -> int:
        """Queue a request; it joins the batch at the next step() with a free slot. Returns its id."""
        prompt, stop = self.check(request)
        generator = torch.Generator(device=self.device)
        generator.manual_seed(request.seed if request.seed is not None else int(torch.randint(0, 2**62, (1,)).item()))
        stream = TextStream(stop) if self.tokenizer is not None else None
        seq = _Sequence(next(self._ids), request, generator, prompt, stream)
        self.waiting.append(seq)
        return seq.id

    def check(self, request: Request) -> tuple[list[int], list[str]]:
        """What add() checks, without adding: the request's prompt as ints and its stop strings, or a UserError
        naming the problem."""
        r = request
        if not isinstance(r, Request):
            raise UserError(f"expected a Request, got {type(r).__name__}")
        if not isinstance(r.prompt, (list, tuple)) and not (isinstance(r.prompt, torch.Tensor) and r.prompt.dim() == 1):
            raise UserError(f"prompt must be a list of token ids, got {type(r.prompt).__name__}")
        if not isinstance(r.stop_at_eos, bool):
            raise UserError(f"stop_at_eos={r.stop_at_eos!r} must be True or False")
        check_sampling(r.max_new_tokens, r.temperature, r.top_k, r.top_p, r.repetition_penalty, seed=r.seed)
        if r.logprobs is not None and (isinstance(r.logprobs, bool) or not isinstance(r.logprobs, int)
                                       or not 0 <= r.logprobs <= MAX_LOGPROBS):
            raise UserError(f"logprobs={r.logprobs!r} must be None or a number of alternatives from 0 to {MAX_LOGPROBS}")
        if not isinstance(r.prompt_logprobs, bool):
            raise UserError(f"prompt_logprobs={r.prompt_logprobs!r} must be True or False")
        prompt = [_token_id(t) for t in r.prompt]
        if not prompt:
            raise UserError("a request needs at least one prompt token (start from end-of-text for an empty prompt)")
        bad = next((t for t in prompt if not 0 <= t < self.config.vocab_size), None)
        if bad is not None:
            raise UserError(f"prompt token {bad} is outside the vocabulary [0, {self.config.vocab_size})")
        stop = check_stop(r.stop)
        if stop and self.tokenizer is None:
            raise UserError("stop strings need text: give the Engine a tokenizer")
        cfg = self.config
        slides = not cfg.extrapolates and self.max_seq_len == cfg.block_size  # a full window slides on
        needed = (min(len(prompt), cfg.block_size) if slides else len(prompt)) + max(r.max_new_tokens - 1, 0)
        if r.prompt_logprobs and len(prompt) > (self.max_seq_len if cfg.extrapolates else cfg.block_size):
            raise UserError(f"scoring a prompt of {len(prompt)} tokens needs it to fit in one window of "
                            f"{self.max_seq_len if cfg.extrapolates else cfg.block_size} positions; shorten it")
        if not slides and needed > self.max_seq_len:
            raise UserError(f"the prompt ({len(prompt)} tokens) and max_new_tokens={r.max_new_tokens} need "
                            f"{needed} positions, but the engine holds {self.max_seq_len} per request; shorten them "
                            f"or build the Engine with a larger max_seq_len")
        return prompt, stop

    def cancel(self, request_id: int) -> bool:
        """Drop a request, waiting or running; its slot is free for the next step. False if it is not here."""
        for i, seq in enumerate(self.slots):
            if seq is not None and seq.id == request_id:
                self.slots[i] = None
                return True
        for seq in self.waiting:
            if seq.id == request_id:
                self.waiting.remove(seq)
                return True
        return False

    def __contains__(self, request_id: int) -> bool:
        """Whether this request is still here (waiting or running)."""
        return any(s is not None and s.id == request_id for s in self.slots) or any(
            s.id == request_id for s in self.waiting)

    def has_work(self) -> bool:
        return bool(self.waiting) or any(s is not None for s in self.slots)

    @property
    def num_running(self) -> int:
        return sum(s is not None for s in self.slots)

    @property
    def num_waiting(self) -> int:
        return len(self.waiting)

    @torch.no_grad()
    def refresh(self):
        """Remake what the engine derived from the weights (the packed copies on CPU): call it after they change.
        (The CUDA graphs need no call: they read the weights in place, and are recaptured when one moves.)"""
        for module in self.model.modules():
            if isinstance(module, (DecodeLinear, DecodeInt4Linear)):
                module.repack()
        self.huge_page_bytes = self._collapse()  # (weights given new memory since are moved too)

    @torch.no_grad()
    def step(self) -> list[Event]:
        """Decode one token for every running request, then prefill waiting requests into free slots (each gives
        its first token). Returns one Event per request that produced a token or ended."""
        events = []
        running = [s for s in self.slots if s is not None]
        if running:
            events += self._decode(running)
        for seq in [s for s in self.waiting if s.request.max_new_tokens == 0]:  # nothing to decode: no slot needed
            self.waiting.remove(seq)
            events.append(self._prefill(seq, -1))
        for slot in range(self.max_batch):
            if not self.waiting:
                break
            if self.slots[slot] is None:
                events.append(self._prefill(self.waiting.popleft(), slot))
        return events

    # --- inside a step
    def _prefill(self, seq: _Sequence, slot: int) -> Event:
        r = seq.request
        ids = seq.ids if self.config.extrapolates else seq.ids[-self.config.block_size:]
        idx = torch.tensor([ids], device=self.device)
        if r.max_new_tokens == 0:
            event = Event(seq.id, None)
            if r.prompt_logprobs:  # scoring only: no cache slot needed
                event.prompt_logprobs = self._score(self.model(idx)[0][0, :-1], ids[1:], r.logprobs or 0)
            return self._finish(seq, event, "length")
        logits = self.model(idx, kv_cache=self._rows[slot], last_only=not r.prompt_logprobs)[0][0]
        self.slots[slot], seq.slot, seq.cached = seq, slot, len(ids)
        scores = self._score(logits[:-1], ids[1:], r.logprobs or 0) if r.prompt_logprobs else None
        event = self._advance(seq, logits[-1])  # (appends to seq.ids, which ids may be)
        event.prompt_logprobs = scores
        return event

    @staticmethod
    def _score(logits: torch.Tensor, targets: list[int], top: int) -> list[Logprob]:
        """Each target's logprob under its row of logits (N, V), with that row's top alternatives."""
        logp = F.log_softmax(logits.float(), dim=-1)  # (N, V)
        chosen = logp.gather(1, torch.tensor(targets, device=logp.device)[:, None])[:, 0].tolist()
        values, tokens = logp.topk(min(top, logp.size(-1)), dim=-1)
        return [Logprob(t, lp, list(zip(tk, v))) for t, lp, tk, v in zip(targets, chosen, tokens.tolist(),
                                                                         values.tolist())]

    def _decode(self, running: list[_Sequence]) -> list[Event]:
        for seq in running:  # a window that is full slides from now on (learned and sinusoidal positions)
            seq.sliding = seq.sliding or seq.cached == self.max_seq_len
        cached = [s for s in running if not s.sliding]
        logits: dict[int, torch.Tensor] = {}
        if len(cached) == 1:  # one row: its own view of the cache (the single-row graph when compiled)
            s = cached[0]
            tokens = torch.tensor([[s.pending]], device=self.device)
            positions = torch.tensor([[s.cached]], device=self.device)
            logits[s.id] = self._forward(self._rows[s.slot], tokens, positions, s.cached + 1)[0]
        elif cached:  # the bucket's slots step together; free and sliding ones write a throwaway key at position 0
            rows = next(b for b in self._buckets if b > max(s.slot for s in cached))
            tokens = torch.zeros(rows, 1, dtype=torch.long)
            positions = torch.zeros(rows, 1, dtype=torch.long)
            for s in cached:
                tokens[s.slot, 0], positions[s.slot, 0] = s.pending, s.cached
            kv_len = max(s.cached for s in cached) + 1
            out = self._forward(self._views[rows], tokens.to(self.device), positions.to(self.device), kv_len)
            for s in cached:
                logits[s.id] = out[s.slot]
        for s in cached:
            s.cached += 1
        for s in running:
            if s.sliding:  # every position shifts: recompute the last block_size tokens without the cache
                window = torch.tensor([s.ids[-self.config.block_size:]], device=self.device)
                logits[s.id] = self.model(window, last_only=True)[0][0, -1]
        return [self._advance(s, logits[s.id]) for s in running]

    def _forward(self, cache, tokens, positions, kv_len: int) -> torch.Tensor:
        """Logits (B, V) of one token per row of this cache: the compiled step (static: it reads every slot), or
        eagerly reading only the first kv_len slots."""
        if self._step is None:
            return self.model(tokens, kv_cache=cache, positions=positions, kv_len=kv_len)[0][:, -1]
        if self._graphs and self._weight_addresses() != self._captured_at:  # a weight got new memory (p.data = ...)
            self._capture()  # (leaves no graphs, should capturing now fail)
        if self._graphs:
            return self._graphs[id(cache)](tokens, positions)
        try:
            with torch.compiler.set_stance("fail_on_recompile"):
                return self._step(self.model, cache, tokens, positions)
        except RuntimeError as e:
            if "recompil" not in str(e).lower():
                raise
            warnings.warn(f"the compiled decode step would have to recompile ({str(e).splitlines()[0][:200]}); "
                          f"this engine decodes eagerly from now on", RuntimeWarning, stacklevel=4)
            self._step = None
            return self._forward(cache, tokens, positions, kv_len)

    def _warm_up(self):
        """Compile the decode step for one row and for each bucket of slots, on throwaway tokens at position 0 (a
        prefill overwrites them)."""
        for cache in self._rows[:1] + list(self._views.values()):
            tokens = torch.zeros(cache.batch_size, 1, dtype=torch.long, device=self.device)
            self._step(self.model, cache, tokens, tokens.clone())

    @torch.no_grad()
    def _capture(self):
        """On CUDA, capture the compiled step on every view of the cache it runs on (each slot's row, each bucket) as
        CUDA graphs sharing one memory pool. Each capture first runs the step once, which writes a throwaway key and
        value at position 0 of every row: what running requests hold there is put back. Should capturing fail (out
        of memory, say), the engine warns and goes on with the compiled step alone."""
        self._graphs = {}
        if self._step is None or self.device.type != "cuda":
            return
        held = [(layer.k[:, :, 0].clone(), layer.v[:, :, 0].clone()) for layer in self.cache.layers]
        graphs = {}
        try:
            with torch.cuda.device(self.device), torch.compiler.set_stance("fail_on_recompile"):
                pool = torch.cuda.graph_pool_handle()
                for cache in self._rows + list(self._views.values()):  # (compiled at warm-up: nothing new)
                    graphs[id(cache)] = CapturedStep(self._step, self.model, cache, pool)
        except (RuntimeError, torch.OutOfMemoryError) as e:
            warnings.warn(f"the compiled decode step could not be captured as CUDA graphs "
                          f"({str(e).splitlines()[0][:200]}); it runs without them", RuntimeWarning, stacklevel=3)
            graphs = {}
        finally:
            for layer, (k, v) in zip(self.cache.layers, held):
                layer.k[:, :, 0], layer.v[:, :, 0] = k, v
        self._graphs = graphs
        self._weights = list(itertools.chain(self.model.parameters(), self.model.buffers()))
        self._captured_at = self._weight_addresses()

    def _collapse(self) -> int:
        """Move the weights, their packed copies (lmforge's; oneDNN's keep their memory to themselves) and the KV cache
        onto 2 MB pages, when asked: the bytes moved (0 where the system cannot)."""
        if not self.huge_pages:
            return 0
        return collapse(itertools.chain(self.model.parameters(), self.model.buffers(), self.cache.buffers()))

    def _weight_addresses(self) -> tuple[int, ...]:
        return tuple(t.data_ptr() for t in self._weights)  # (~150 tensors for GPT-2: some 20 us)

    def _advance(self, seq: _Sequence, logits: torch.Tensor) -> Event:
        """Sample the request's next token from its logits (V,) and report it; end the request if it is done."""
        r = seq.request
        raw, logits = logits, logits[None]
        if r.repetition_penalty != 1.0:
            context = torch.tensor([seq.ids], device=self.device)
            logits = apply_repetition_penalty(logits, context, r.repetition_penalty)
        token = int(sample_next_token(logits, r.temperature, r.top_k, r.top_p, seq.generator)[0])
        event = Event(seq.id, token)
        if r.logprobs is not None:  # the model's distribution, before the repetition penalty and sampling settings
            event.logprob = self._score(raw[None], [token], r.logprobs)[0]
        seq.ids.append(token)
        seq.pending = token
        seq.generated += 1
        if r.stop_at_eos and token == self.eos_id:
            return self._finish(seq, event, "stop")
        if seq.stream is not None:
            event.text = seq.stream.feed(self.tokenizer.decode_bytes([token]))
            if seq.stream.stopped:
                return self._finish(seq, event, "stop")
        if seq.generated >= r.max_new_tokens:
            return self._finish(seq, event, "length")
        return event

    def _finish(self, seq: _Sequence, event: Event, reason: str) -> Event:
        if seq.stream is not None and not seq.stream.stopped:
            event.text += seq.stream.feed(b"", final=True)
        event.finished, event.finish_reason = True, reason
        if seq.slot >= 0 and self.slots[seq.slot] is seq:
            self.slots[seq.slot] = None
        return event
