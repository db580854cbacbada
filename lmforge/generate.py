"""Generation: prefill, decode one token at a time through a preallocated KV cache, and a pure sampling function.

    sample_next_token(logits, ...)       temperature / top-k / top-p / greedy, a pure function of logits
    decode_ids(model, prompts, ...)      token ids out, one step at a time (batched, left-padded, KV cache);
                                         compile=True runs each step through compiled_decode_step()
    beam_search(model, prompt, ...)      num_beams hypotheses with a length penalty
    generate_naive(model, prompt, ...)   full forward every step: slow, kept as the reference for the fast path
    generate(model, tokenizer, ...)      text in, text out (or streamed pieces), stop strings, seeds

The engine knows tokens only; text enters and leaves through the tokenizer in generate().
"""

from __future__ import annotations

import codecs
import contextlib
import math
import os
import shutil
import weakref
from typing import Iterator

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch.overrides import TorchFunctionMode

from .model import GPT

# a torch function mode entered inside a compiled function is traced by dynamo from PyTorch 2.6 on
_MODES_COMPILE = tuple(int(p) for p in torch.__version__.split(".")[:2]) >= (2, 6)


# ----------------------------------------------------------------------------------------------------- sampling

def top_k_mask(logits: torch.Tensor, k: int) -> torch.Tensor:
    """True for tokens whose logit is at least the k-th largest (ties at the boundary are kept)."""
    k = min(k, logits.size(-1))
    kth = torch.topk(logits, k, dim=-1).values[..., -1:]
    return logits >= kth


def top_p_mask(logits: torch.Tensor, p: float) -> torch.Tensor:
    """True for the smallest set of most likely tokens whose probability mass reaches p, plus any token tied with
    the least likely one kept."""
    probs = logits.float().softmax(dim=-1)
    sorted_probs, _ = probs.sort(dim=-1, descending=True)
    mass_before = sorted_probs.cumsum(dim=-1) - sorted_probs
    kept = mass_before < p
    threshold = sorted_probs.masked_fill(~kept, float("inf")).min(dim=-1, keepdim=True).values
    return probs >= threshold


def apply_repetition_penalty(logits: torch.Tensor, context: torch.Tensor, penalty: float) -> torch.Tensor:
    """CTRL's penalty: logits of tokens already in the context are divided by it (multiplied when negative)."""
    score = logits.gather(-1, context)
    score = torch.where(score > 0, score / penalty, score * penalty)
    return logits.scatter(-1, context, score)


def sample_next_token(logits: torch.Tensor, temperature: float = 1.0, top_k: int | None = None,
                      top_p: float | None = None, generator: torch.Generator | None = None) -> torch.Tensor:
    """logits (B, V) -> next token ids (B,). Temperature 0 is greedy (argmax)."""
    if temperature == 0:
        return logits.argmax(dim=-1)
    logits = logits.float() / temperature
    if top_k is not None:
        logits = logits.masked_fill(~top_k_mask(logits, top_k), float("-inf"))
    if top_p is not None and top_p < 1.0:
        logits = logits.masked_fill(~top_p_mask(logits, top_p), float("-inf"))
    probs = logits.softmax(dim=-1)
    return torch.multinomial(probs, 1, generator=generator).squeeze(-1)


def check_sampling(max_new_tokens: int, temperature: float, top_k, top_p, repetition_penalty: float,
                   num_beams: int = 1) -> None:
    """One-line ValueErrors for out-of-range settings (the CLI prints them as they are)."""
    if not isinstance(max_new_tokens, int) or max_new_tokens < 0:
        raise ValueError(f"max_new_tokens={max_new_tokens} must be a non-negative integer")
    if temperature < 0:
        raise ValueError(f"temperature={temperature} must be >= 0 (0 = greedy)")
    if top_k is not None and top_k < 1:
        raise ValueError(f"top_k={top_k} must be at least 1")
    if top_p is not None and not 0.0 < top_p <= 1.0:
        raise ValueError(f"top_p={top_p} must be in (0, 1]")
    if repetition_penalty <= 0:
        raise ValueError(f"repetition_penalty={repetition_penalty} must be positive (1 = off)")
    if num_beams < 1:
        raise ValueError(f"num_beams={num_beams} must be at least 1")


# ---------------------------------------------------------------------------------------------------- the engine

def _can_pack(model: GPT) -> bool:
    w = model.wte.weight
    return (w.device.type == "cpu" and w.dtype == torch.float32 and torch.backends.mkldnn.is_available()
            and hasattr(torch.ops.mkldnn, "_reorder_linear_weight") and hasattr(torch.ops.mkldnn, "_linear_pointwise"))


_PACKED: "weakref.WeakKeyDictionary[nn.Linear, tuple]" = weakref.WeakKeyDictionary()


def _packed_weight(module: nn.Linear) -> torch.Tensor:
    """The module's weight packed for oneDNN, made once and again only when the weight changes (an optimizer step
    or a load bumps its version counter; a new tensor changes its address)."""
    w = module.weight
    key = (w._version, w.data_ptr())
    hit = _PACKED.get(module)
    if hit is None or hit[0] != key:
        hit = (key, torch.ops.mkldnn._reorder_linear_weight(w.detach(), 1))
        _PACKED[module] = hit
    return hit[1]


@contextlib.contextmanager
def packed_linears(model: GPT, enabled: bool = True):
    """On CPU in fp32, run every Linear through oneDNN with its weight packed. PyTorch's default kernel for the
    matrix-vector products of decoding uses one core (~13 GB/s here), the packed one both (~21 GB/s), and prefill
    gains too. The packed copies live as long as the model (one extra copy of the weights) and are remade when the
    weights change; the modules are restored on exit, so training never runs through them."""
    if not (enabled and _can_pack(model) and not torch.is_grad_enabled()):
        yield
        return
    swapped = []
    for module in model.modules():
        if type(module) is nn.Linear:
            def forward(x, module=module):
                rows = x.numel() // x.size(-1)
                y = torch.ops.mkldnn._linear_pointwise(x.reshape(rows, x.size(-1)), _packed_weight(module),
                                                       module.bias, "none", [], "")
                return y.view(*x.shape[:-1], module.out_features)
            module.forward = forward
            swapped.append(module)
    try:
        yield
    finally:
        for module in swapped:
            del module.forward


class _OneTokenOps(TorchFunctionMode):
    """Inside the compiled CPU decode step, the matrix products of a single token become multiply-and-sum, which
    inductor turns into plain vectorised loops, split over all cores and fused with their neighbours:

    - F.linear of one row: PyTorch's matrix-vector kernel streams the weight at ~13 GB/s on one core here, the
      loop at ~24-27 GB/s on two;
    - attention of one query: the flash kernel costs ~160 us a call at this size, the loops a fraction of it.
    """

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if func is F.linear:
            x, weight = args[0], args[1]
            bias = args[2] if len(args) > 2 else kwargs.get("bias")
            if x.numel() == x.size(-1):
                y = (x.unsqueeze(-2) * weight).sum(-1)
                return y if bias is None else y + bias
        if func is F.scaled_dot_product_attention:
            q, k, v = args[:3]
            mask = args[3] if len(args) > 3 else kwargs.get("attn_mask")
            if (q.size(-2) == 1 and len(args) <= 4 and (mask is None or mask.dim() == 4)
                    and not kwargs.get("dropout_p") and not kwargs.get("is_causal") and kwargs.get("scale") is None):
                return _one_query_attention(q, k, v, mask)
        return func(*args, **kwargs)


def _one_query_attention(q, k, v, mask):
    """q (B, H, 1, hs), k and v (B, Hkv, S, hs), H a multiple of Hkv; mask: bool (True = attend) or additive,
    broadcastable to (B, H, 1, S). The same as scaled_dot_product_attention, as sums of products."""
    B, H, _, D = q.shape
    Hkv = k.size(1)
    rep = H // Hkv
    q = q.view(B, Hkv, rep, 1, D)  # query head h uses key head h // rep
    scores = (q * k.unsqueeze(2)).sum(-1) / math.sqrt(D)  # (B, Hkv, rep, S)
    if mask is not None:
        mb, mh = mask.size(0), mask.size(1)
        mask = mask.reshape(mb, Hkv if mh == H else 1, rep if mh == H else 1, mask.size(-1))
        scores = scores.masked_fill(~mask, float("-inf")) if mask.dtype == torch.bool else scores + mask
    weights = scores.softmax(dim=-1)
    return (weights.unsqueeze(-1) * v.unsqueeze(2)).sum(-2).view(B, H, 1, D)


def _decode_step(model: GPT, *args) -> torch.Tensor:
    # the loops pay only once compiled: should dynamo ever run this eagerly, the plain kernels are faster
    if torch.compiler.is_compiling() and model.wte.weight.device.type == "cpu" and _MODES_COMPILE:
        with _OneTokenOps():
            return model.decode_step(*args)
    return model.decode_step(*args)


_compiled_step = None


def compiled_decode_step(model: GPT):
    """model.decode_step under torch.compile: one graph serves every step of a generation, since the static cache
    fixes the shapes. The first call for a model configuration compiles (tens of seconds on a small CPU; inductor's
    on-disk cache makes it faster in later processes); models of the same configuration share the graph, and each
    new batch size or cache length compiles another (decode_ids rounds cache lengths up to a few sizes per doubling so
    that few are needed; past torch._dynamo.config.recompile_limit graphs, steps run eagerly). The weights are inputs of
    the graph, so training between generations is seen."""
    global _compiled_step
    cxx = os.environ.get("CXX", "g++")
    if model.wte.weight.device.type == "cpu" and shutil.which(cxx) is None:
        raise ValueError(f"compile=True on CPU needs a C++ compiler ({cxx!r}, or set CXX) for torch.compile's kernels; "
                         f"install one, or generate without compile")
    if _compiled_step is None:
        _compiled_step = torch.compile(_decode_step, dynamic=False, fullgraph=True)
    return lambda *args: _compiled_step(model, *args)


def _left_pad(prompts: list[list[int]], pad_id: int, device) -> tuple[torch.Tensor, torch.Tensor]:
    T = max(len(p) for p in prompts)
    idx = torch.full((len(prompts), T), pad_id, dtype=torch.long, device=device)
    mask = torch.zeros(len(prompts), T, dtype=torch.long, device=device)
    for row, p in enumerate(prompts):
        idx[row, T - len(p):] = torch.tensor(p, dtype=torch.long, device=device)
        mask[row, T - len(p):] = 1
    return idx, mask


@torch.no_grad()
def decode_ids(model: GPT, prompts: list[list[int]], max_new_tokens: int, temperature: float = 1.0,
               top_k: int | None = None, top_p: float | None = None, repetition_penalty: float = 1.0,
               eos_id: int | None = None, generator: torch.Generator | None = None,
               pack: bool = True, compile: bool = False) -> Iterator[torch.Tensor]:
    """Yield the next token of every row, (B,), step by step (see _decode_steps). pack: eager forwards run through
    packed_linears(), swapped in once for the whole generation, or, with compile, around each eager forward only, so
    that the compiled step never sees swapped modules. compile: single-token steps run through
    compiled_decode_step()."""
    with packed_linears(model, pack and not compile):
        yield from _decode_steps(model, prompts, max_new_tokens, temperature, top_k, top_p, repetition_penalty,
                                 eos_id, generator, pack and compile, compile)


def _decode_steps(model: GPT, prompts: list[list[int]], max_new_tokens: int, temperature: float, top_k, top_p,
                  repetition_penalty: float, eos_id: int | None, generator, pack_each: bool,
                  compile: bool) -> Iterator[torch.Tensor]:
    """Yield the next token of every row, (B,), step by step. Rows that produced eos_id keep yielding eos_id; the
    caller stops when it has what it wants. Prompts of different lengths are left-padded under an attention mask.

    Learned and sinusoidal positions cannot go past block_size: once the context is full, each step runs on the last
    block_size tokens (a sliding window, recomputed). ALiBi, RoPE and no positions keep decoding through the cache.

    With compile the cache length is rounded up (to 48, 64, 96, 128, 192, 256, ...), so that generations of similar
    length share one compiled graph.
    """
    cfg = model.config
    device = model.wte.weight.device
    if any(len(p) == 0 for p in prompts):
        raise ValueError("every prompt needs at least one token (start from end-of-text for an empty prompt)")
    window = None if cfg.extrapolates else cfg.block_size
    prompts = [p[-window:] if window else p for p in prompts]
    tokens, mask = _left_pad(prompts, eos_id if eos_id is not None else 0, device)
    B, T = tokens.shape
    done = torch.zeros(B, dtype=torch.bool, device=device)
    cache_len = max(T + max_new_tokens, 1)
    if compile:  # 48, 64, 96, 128, 192, 256, 384, ...: two sizes per doubling
        power = 1 << (max(cache_len, 64) - 1).bit_length()
        cache_len = power * 3 // 4 if cache_len <= power * 3 // 4 else power
    cache = model.make_kv_cache(B, min(cache_len, window) if window else cache_len)
    padded = not bool(mask.all())

    def forward(idx, attention_mask, kv_cache):  # eager: (B, t) -> logits of the last position (B, V)
        with packed_linears(model, pack_each):
            return model(idx, attention_mask=attention_mask, kv_cache=kv_cache, last_only=True)[0][:, -1]

    step = compiled_decode_step(model) if compile else None
    if step is not None:  # the static step attends every slot under key_valid and takes position ids as tensors
        key_valid = torch.zeros(B, cache.max_len, dtype=torch.bool, device=device)
        key_valid[:, :T] = mask.bool()
        positions = mask.sum(dim=1, keepdim=True)  # (B, 1) the next position of each row: its real tokens so far
    sliding = False  # becomes True once a fixed-position model has filled its window
    logits = forward(tokens, mask if padded else None, cache)
    for _ in range(max_new_tokens):
        step_logits = logits
        if repetition_penalty != 1.0:
            context = torch.where(mask.bool(), tokens, tokens[:, -1:])  # padding counts as a token already seen
            step_logits = apply_repetition_penalty(step_logits, context, repetition_penalty)
        nxt = sample_next_token(step_logits, temperature, top_k, top_p, generator)
        if eos_id is not None:
            nxt = nxt.masked_fill(done, eos_id)
            done |= nxt == eos_id
        yield nxt
        if eos_id is not None and bool(done.all()):
            return
        tokens = torch.cat([tokens, nxt[:, None]], dim=1)
        mask = torch.cat([mask, torch.ones_like(mask[:, :1])], dim=1)
        sliding = sliding or cache.pos == cache.max_len
        if sliding:  # the window is full: every position shifts, so each step recomputes the last block_size tokens
            win_mask = mask[:, -window:]
            logits = forward(tokens[:, -window:], None if win_mask.all() else win_mask, None)
        elif step is not None:
            key_valid[:, cache.pos] = True
            logits = step(nxt[:, None], cache, torch.tensor([cache.pos], device=device), positions, key_valid)
            positions = positions + 1
            cache.pos += 1
        else:
            logits = forward(nxt[:, None], mask if padded else None, cache)


@torch.no_grad()
def generate_naive(model: GPT, prompt: list[int], max_new_tokens: int, temperature: float = 1.0,
                   top_k: int | None = None, top_p: float | None = None, repetition_penalty: float = 1.0,
                   eos_id: int | None = None, generator: torch.Generator | None = None) -> list[int]:
    """The reference: no cache, one full forward over the (cropped) context per token."""
    cfg = model.config
    device = model.wte.weight.device
    ids = list(prompt)
    out = []
    for _ in range(max_new_tokens):
        context = ids if cfg.extrapolates else ids[-cfg.block_size:]
        logits, _ = model(torch.tensor([context], device=device))
        step_logits = logits[:, -1]
        if repetition_penalty != 1.0:
            step_logits = apply_repetition_penalty(step_logits, torch.tensor([ids], device=device), repetition_penalty)
        nxt = int(sample_next_token(step_logits, temperature, top_k, top_p, generator)[0])
        out.append(nxt)
        ids.append(nxt)
        if nxt == eos_id:
            break
    return out


@torch.no_grad()
def beam_search(model: GPT, prompt: list[int], max_new_tokens: int, num_beams: int, length_penalty: float = 1.0,
                eos_id: int | None = None, early_stopping: bool = True) -> list[int]:
    """Beam search (see _beam_search), with packed_linears()."""
    with packed_linears(model):
        return _beam_search(model, prompt, max_new_tokens, num_beams, length_penalty, eos_id, early_stopping)


def _beam_search(model: GPT, prompt: list[int], max_new_tokens: int, num_beams: int, length_penalty: float,
                 eos_id: int | None, early_stopping: bool) -> list[int]:
    """Keep the num_beams best partial sequences by summed log-probability; a hypothesis that ends (end-of-text, or
    max_new_tokens) is scored as sum / length ** length_penalty, length counting generated tokens. Returns the best
    finished hypothesis's generated ids."""
    cfg = model.config
    device = model.wte.weight.device
    if not cfg.extrapolates and len(prompt) + max_new_tokens > cfg.block_size:
        raise ValueError(f"beam search keeps every hypothesis in the cache: prompt + max_new_tokens must fit "
                         f"block_size={cfg.block_size} with position={cfg.position!r}")
    if max_new_tokens == 0:
        return []
    cache = model.make_kv_cache(num_beams, len(prompt) + max_new_tokens)
    idx = torch.tensor([prompt] * num_beams, device=device)
    logits, _ = model(idx, kv_cache=cache, last_only=True)
    scores = torch.full((num_beams,), float("-inf"), device=device)
    scores[0] = 0.0  # all beams start identical: expand only the first
    beams: list[list[int]] = [[] for _ in range(num_beams)]
    finished: list[tuple[float, list[int]]] = []
    V = logits.size(-1)
    for step in range(max_new_tokens):
        logprobs = logits[:, -1].float().log_softmax(dim=-1)  # (nb, V)
        candidates = (scores[:, None] + logprobs).view(-1)
        top_scores, top_idx = candidates.topk(min(2 * num_beams, candidates.numel()))
        next_beams, next_scores, origins, tokens = [], [], [], []
        for score, flat in zip(top_scores.tolist(), top_idx.tolist()):
            if score == float("-inf"):
                break
            beam, token = divmod(flat, V)
            seq = beams[beam] + [token]
            if token == eos_id or step == max_new_tokens - 1:
                finished.append((score / len(seq) ** length_penalty, seq))
                continue
            next_beams.append(seq)
            next_scores.append(score)
            origins.append(beam)
            tokens.append(token)
            if len(next_beams) == num_beams:
                break
        if not next_beams:
            break
        if early_stopping and len(finished) >= num_beams:
            # sums of log-probs only fall, so a live beam's best final score is its sum divided by the longest
            # length (length_penalty > 0) or by the shortest one it can still have (otherwise)
            longest, shortest = max_new_tokens, step + 2
            bound = max(next_scores) / (longest if length_penalty > 0 else shortest) ** length_penalty
            if bound <= sorted(sc for sc, _ in finished)[-num_beams]:
                break
        while len(next_beams) < num_beams:  # pad with dead beams so the cache keeps its shape
            next_beams.append([])
            next_scores.append(float("-inf"))
            origins.append(origins[0])
            tokens.append(tokens[0])
        beams, scores = next_beams, torch.tensor(next_scores, device=device)
        cache.reorder(torch.tensor(origins, device=device))
        logits, _ = model(torch.tensor(tokens, device=device)[:, None], kv_cache=cache, last_only=True)
    return max(finished, key=lambda f: f[0])[1] if finished else beams[0]


# ------------------------------------------------------------------------------------------------------ text API

def _prompt_ids(tokenizer, text: str) -> list[int]:
    ids = tokenizer.encode(text) if text else []
    return ids or [tokenizer.eot_id]  # an empty prompt starts after end-of-text


class _TextStream:
    """Bytes in, text out: never splits a multi-byte character, and holds back text that may begin a stop string."""

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


def _stream_one(model, tokenizer, ids: list[int], max_new_tokens: int, sampling: dict, stop: list[str],
                generator, compile: bool) -> Iterator[str]:
    stream = _TextStream(stop)
    eos = tokenizer.eot_id
    steps = decode_ids(model, [ids], max_new_tokens, eos_id=eos, generator=generator, compile=compile, **sampling)
    with contextlib.closing(steps):  # stopping early restores the model's modules at once
        for nxt in steps:
            token = int(nxt[0])
            if token == eos:
                break
            piece = stream.feed(tokenizer.decode_bytes([token]))
            if piece:
                yield piece
            if stream.stopped:
                return
    tail = stream.feed(b"", final=True)
    if tail:
        yield tail


def generate(model: GPT, tokenizer, prompt: str | list[str], max_new_tokens: int = 100, temperature: float = 1.0,
             top_k: int | None = None, top_p: float | None = None, repetition_penalty: float = 1.0,
             num_beams: int = 1, length_penalty: float = 1.0, stop: str | list[str] | None = None,
             seed: int | None = None, stream: bool = False, compile: bool = False):
    """Continue prompt(s); return the continuation only (a list for a list of prompts), or with stream=True an
    iterator of text pieces. Stops at end-of-text, at any stop string (not returned), or after max_new_tokens.
    compile=True decodes through compiled_decode_step() (not beam search): faster per token once compiled."""
    check_sampling(max_new_tokens, temperature, top_k, top_p, repetition_penalty, num_beams)
    stop = [stop] if isinstance(stop, str) else list(stop or [])
    if any(not s for s in stop):
        raise ValueError("stop strings must not be empty")
    many = isinstance(prompt, (list, tuple))
    prompts = list(prompt) if many else [prompt]
    if not prompts or not all(isinstance(p, str) for p in prompts):
        raise ValueError("prompt must be a string or a non-empty list of strings")
    device = model.wte.weight.device
    generator = torch.Generator(device=device)
    generator.manual_seed(seed if seed is not None else int(torch.randint(0, 2**62, (1,)).item()))
    ids = [_prompt_ids(tokenizer, p) for p in prompts]
    sampling = dict(temperature=temperature, top_k=top_k, top_p=top_p, repetition_penalty=repetition_penalty)
    was_training = model.training
    model.eval()
    try:
        if stream:
            if many:
                raise ValueError("stream=True takes one prompt; call it once per prompt")
            return _restoring(_stream_one(model, tokenizer, ids[0], max_new_tokens, sampling, stop, generator,
                                          compile), model, was_training)
        if num_beams > 1:
            outs = [beam_search(model, p, max_new_tokens, num_beams, length_penalty, tokenizer.eot_id) for p in ids]
        else:
            rows = [[] for _ in ids]
            steps = decode_ids(model, ids, max_new_tokens, eos_id=tokenizer.eot_id, generator=generator,
                               compile=compile, **sampling)
            for nxt in steps:
                for row, token in zip(rows, nxt.tolist()):
                    row.append(token)
            outs = rows
        texts = []
        for out in outs:
            if tokenizer.eot_id in out:
                out = out[:out.index(tokenizer.eot_id)]
            text = tokenizer.decode(out)
            hits = [text.find(s) for s in stop if s in text]
            texts.append(text[:min(hits)] if hits else text)
        return texts if many else texts[0]
    finally:
        if not stream:
            model.train(was_training)


def _restoring(pieces: Iterator[str], model, was_training: bool) -> Iterator[str]:
    try:
        yield from pieces
    finally:
        model.train(was_training)


# ------------------------------------------------------------------------------------------------------------ CLI

def generate_cli(args) -> int:
    import sys
    from pathlib import Path
    from .checkpoint import load
    model, tokenizer = load(args.run, device=args.device, checkpoint=args.checkpoint)
    options = dict(max_new_tokens=args.max_new_tokens, temperature=args.temperature, top_k=args.top_k,
                   top_p=args.top_p, repetition_penalty=args.repetition_penalty, num_beams=args.num_beams,
                   length_penalty=args.length_penalty, stop=args.stop, compile=args.compile)

    def one(prompt: str, seed) -> None:
        if args.num_beams > 1:
            print(prompt + generate(model, tokenizer, prompt, seed=seed, **options), flush=True)
            return
        pieces = generate(model, tokenizer, prompt, seed=seed, stream=True, **options)  # checks settings and prompt
        sys.stdout.write(prompt)
        for piece in pieces:
            sys.stdout.write(piece)
            sys.stdout.flush()
        sys.stdout.write("\n")

    prompt = Path(args.prompt_file).read_text() if args.prompt_file else args.prompt
    if not args.interactive:
        for i in range(args.num_samples):
            if args.num_samples > 1:
                print(f"--- sample {i + 1} ---")
            one(prompt, None if args.seed is None else args.seed + i)
        return 0
    print("Type a prompt and press Enter (Ctrl-D to quit).", file=sys.stderr)
    while True:
        try:
            line = input("> ")
        except EOFError:
            return 0
        try:
            one(line, args.seed)
        except ValueError as e:
            print(f"error: {e}", file=sys.stderr)

