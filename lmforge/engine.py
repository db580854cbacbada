"""The inference engine: decoding as one explicit object, with continuous batching.

    engine = Engine(model, tokenizer, max_batch=8, max_seq_len=512, compile=True)
    rid = engine.add(Request(prompt_ids, max_new_tokens=50, temperature=0.8, seed=1, stop=["\n\n"]))
    while engine.has_work():
        for event in engine.step(): ...        # Event(id, token, text, finished, finish_reason)

It owns, and builds explicitly:
- an inference copy of the model: new module objects in eval mode sharing the model's parameters, with the CPU
  speed-up modules swapped in for good (lmforge/cpu/); the model the caller holds is never touched, so training
  beside an engine computes exactly what it would without;
- a static KV cache of max_batch slots x max_seq_len positions: a request holds one slot from its prefill to its
  last token, its token at position p in cache position p;
- on CPU, when compiled (or huge_pages=True), the weights and the cache moved onto 2 MB pages in place
  (lmforge/cpu/pages.py; huge_page_bytes says how much);
- the decode step: one token per row, for a lone request on its own row of the cache, else for the first 4, 16, ...
  or all slots, the smallest bucket holding every running request; with compile=True each is compiled at
  construction and never recompiled silently (should a step need a new graph, the engine warns and decodes eagerly
  from then on); on CUDA each compiled step is also captured as a CUDA graph and replayed;
- continuous batching: add() queues a request; step() decodes one token for every running request, then prefills
  waiting ones into free slots (each gives its first token); a request leaves as soon as it ends; cancel() frees
  its slot at once.

Each request carries its own sampling settings, stop conditions and seeded generator, and each row is sampled on
its own, so a seeded request gives the same tokens alone or batched. A request may hold its output to a JSON
schema, a regular expression, a grammar or a choice of strings (Request.constraint, structured.py): every
constrained row's mask of allowed tokens is computed in one call per step and applied to its logits. Packed weights are derived when the engine is
built: after the weights change, call refresh() or build a new engine. The engine knows token ids; given a
tokenizer it also yields text pieces (never splitting a character) and checks stop strings. It changes nothing
process-wide, and it is thread-confined: one thread steps it, others talk to it through a queue.
"""

from __future__ import annotations

import copy
import itertools
import operator
import os
import re
import shutil
import threading
import types
import warnings
from collections import deque
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from .cpu.modules import repack, speed_up
from .cpu.pages import collapse, proc_bytes
from .errors import UserError
from .model import GPT
from .request import MAX_LOGPROBS, Event, Logprob, Request, TextStream  # noqa: F401 (MAX_LOGPROBS: the engine's API)
from .sampling import apply_repetition_penalty, check_sampling, check_stop, sample_next_token


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
    matcher: object = None  # the request's constraint, following its tokens (structured.py)


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


def unwrap(model) -> GPT:
    """The GPT inside a torch.compile'd or DDP-wrapped model; a UserError for anything else."""
    model = getattr(model, "_orig_mod", model)
    model = getattr(model, "module", model)
    if not isinstance(model, GPT):
        raise UserError(f"expected a lmforge GPT (or an Engine), got {type(model).__name__}")
    return model


def inference_copy(model: GPT, rows: int = 1) -> GPT:
    """New module objects in eval mode sharing the model's parameters and buffers, with the CPU speed-up modules
    swapped in for fp32 on CPU (lmforge/cpu/modules.py: speed_up)."""
    shared = {id(t): t for t in itertools.chain(model.parameters(), model.buffers())}
    inference = copy.deepcopy(model, memo=shared).eval()
    inference.sparse_embedding_grad = False  # (no gradients here; a dense lookup compiles into the step's own code)
    return speed_up(inference, rows)


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
        # what ends a reply: eos_id alone when given, else the tokenizer's end-of-text and end-of-turn tokens
        self.eos_ids = ({eos_id} if eos_id is not None else set(getattr(tokenizer, "stop_ids", None) or ())
                        or {self.eos_id})
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
        # 2 MB pages under what each CPU decode step streams (lmforge/cpu/pages.py): by default for a compiled engine, the
        # long-lived, speed-first kind
        self.huge_pages = (compile if huge_pages is None else huge_pages) and self.device.type == "cpu"
        self.huge_page_bytes = self._collapse()
        self._rows = [self.cache.rows(i, i + 1) for i in range(max_batch)]  # each slot's row, as a cache of its own
        # Several running requests decode on the first b slots, for the smallest b of these buckets that holds them
        # all (a request takes the lowest free slot, so b follows how many run): powers of 4, then every slot.
        self._buckets = sorted({min(4 ** i, max_batch) for i in range(1, 16) if 4 ** (i - 1) < max_batch})
        self._views = {b: self.cache.rows(0, b) for b in self._buckets if max_batch > 1}
        self.slots: list[_Sequence | None] = [None] * max_batch
        self.waiting: deque[_Sequence] = deque()
        self._ids = itertools.count()
        self._grammars = None  # compiles requests' constraints, when one first comes (structured.py)
        self._grammars_lock = threading.Lock()
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
        if request.constraint is not None:
            seq.matcher = self.grammars.matcher(request.constraint)
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
        if r.constraint is not None:
            self.grammars.matcher(r.constraint)  # (compiled once: add() copies it)
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

    @property
    def grammars(self):
        """What compiles constraints for this engine's tokenizer and vocabulary (built at the first one)."""
        with self._grammars_lock:
            if self._grammars is None:
                if self.tokenizer is None:
                    raise UserError("a constraint needs the tokens' text: give the Engine a tokenizer")
                from .structured import Grammars
                self._grammars = Grammars(self.tokenizer, self.config.vocab_size, self.eos_ids)
            return self._grammars

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
        repack(self.model)
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
        held = [s for s in running if s.matcher is not None]  # every constrained row's mask, computed at once
        allowed = dict(zip((s.id for s in held), self.grammars.allowed([s.matcher for s in held], self.device))) \
            if held else {}
        return [self._advance(s, logits[s.id], allowed.get(s.id)) for s in running]

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

    def _advance(self, seq: _Sequence, logits: torch.Tensor, allowed: torch.Tensor | None = None) -> Event:
        """Sample the request's next token from its logits (V,) and report it; end the request if it is done.
        A constrained request samples among the tokens its matcher allows (allowed: (V,) bool, when computed with
        the batch's), and ends at an end token or where its shape admits nothing more."""
        r = seq.request
        raw, logits = logits, logits[None]
        if r.repetition_penalty != 1.0:
            context = torch.tensor([seq.ids], device=self.device)
            logits = apply_repetition_penalty(logits, context, r.repetition_penalty)
        if seq.matcher is not None:
            if allowed is None:
                allowed = self.grammars.allowed([seq.matcher], self.device)[0]
            if not bool(allowed.any()) or seq.matcher.is_error():  # the shape cannot go on: it ends here, saying so
                return self._finish(seq, Event(seq.id, None), "constraint")
            logits = logits.masked_fill(~allowed, float("-inf"))
        token = int(sample_next_token(logits, r.temperature, r.top_k, r.top_p, seq.generator)[0])
        event = Event(seq.id, token)
        if r.logprobs is not None:  # the model's distribution, before the repetition penalty and sampling settings
            event.logprob = self._score(raw[None], [token], r.logprobs)[0]
        seq.ids.append(token)
        seq.pending = token
        seq.generated += 1
        if (r.stop_at_eos or seq.matcher is not None) and token in self.eos_ids:
            return self._finish(seq, event, "stop")
        if seq.matcher is not None:
            from .structured import consume
            if not consume(seq.matcher, token):
                return self._finish(seq, event, "constraint")
        if seq.stream is not None:
            event.text = seq.stream.feed(self.tokenizer.decode_bytes([token]))
            if seq.stream.stopped:
                return self._finish(seq, event, "stop")
        if seq.matcher is not None and seq.matcher.is_stopped():  # the shape is complete: nothing may follow
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
