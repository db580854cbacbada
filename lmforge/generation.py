"""Generation, text in and text out, as thin layers over the inference engine (engine.py).

    generate(model_or_engine, tokenizer, prompt, ...)   a continuation, a list of them, or streamed text pieces
    decode_ids(model_or_engine, prompts, ...)          token ids out (no text)
    beam_search(model, prompt, ...)                    num_beams hypotheses with a length penalty
    generate_naive(model, prompt, ...)                 full forward every step: slow, the reference for the engine
"""

from __future__ import annotations

from typing import Iterator

import torch

from .engine import Engine, Request, inference_copy, unwrap
from .errors import UserError
from .model import GPT
from .sampling import apply_repetition_penalty, check_sampling, check_stop, sample_next_token

MAX_BATCH = 16  # slots of the engine that generate() builds for a list of prompts


def _engine_for(model, tokenizer, prompts: list[list[int]], max_new_tokens: int, compile: bool,
                eos_id: int | None = None) -> Engine:
    """The caller's engine (it must be idle, and keeps how it was built), or one sized for these prompts."""
    if isinstance(model, Engine):
        if tokenizer is not None and model.tokenizer is None:
            raise UserError("generate() needs text: build the Engine with the tokenizer")
        if model.has_work():
            raise UserError("this engine is busy with other requests; step it to the end, or build another")
        if compile and model._step is None:
            raise UserError("compile=True with an Engine built without it; build it with Engine(..., compile=True)")
        if eos_id is not None and eos_id != model.eos_id:
            raise UserError(f"eos_id={eos_id} differs from the engine's {model.eos_id}")
        return model
    cfg = unwrap(model).config
    if not prompts:
        raise UserError("give at least one prompt")
    longest = max(len(p) for p in prompts) + max(max_new_tokens - 1, 0)
    max_seq_len = longest if cfg.extrapolates else min(longest, cfg.block_size)
    return Engine(model, tokenizer, max_batch=min(len(prompts), MAX_BATCH), max_seq_len=max(max_seq_len, 1),
                  compile=compile, eos_id=eos_id)


def run_requests(engine: Engine, requests: list[Request], text: bool = False) -> list[list[int]] | list[str]:
    """Run requests through the engine to the end: each one's generated ids (end-of-text included when it stopped
    there), or with text=True its text. Should anything fail on the way, the requests leave the engine."""
    rids: list[int] = []
    ids: dict[int, list[int]] = {}
    texts: dict[int, str] = {}
    try:
        for r in requests:
            rids.append(engine.add(r))
            ids[rids[-1]], texts[rids[-1]] = [], ""
        while any(i in engine for i in rids):
            for event in engine.step():
                if event.request_id in ids:
                    texts[event.request_id] += event.text
                    if event.token is not None:
                        ids[event.request_id].append(event.token)
    finally:
        for i in rids:
            engine.cancel(i)
    return [texts[i] for i in rids] if text else [ids[i] for i in rids]


@torch.no_grad()
def decode_ids(model, prompts: list[list[int]], max_new_tokens: int, temperature: float = 1.0,
               top_k: int | None = None, top_p: float | None = None, repetition_penalty: float = 1.0,
               eos_id: int | None = None, seed: int | None = None, compile: bool = False) -> list[list[int]]:
    """Generated ids of each prompt (up to and including eos_id, when it comes; None: never stop early). Prompts run
    as requests of one engine (an Engine passed in must have this eos_id); the request of prompt i is seeded with
    seed + i."""
    check_sampling(max_new_tokens, temperature, top_k, top_p, repetition_penalty, seed=seed)
    engine = _engine_for(model, None, prompts, max_new_tokens, compile, eos_id)
    requests = [Request(list(p), max_new_tokens, temperature, top_k, top_p, repetition_penalty,
                        seed=None if seed is None else seed + i, stop_at_eos=eos_id is not None)
                for i, p in enumerate(prompts)]
    return run_requests(engine, requests)


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
                eos_id: int | None = None, early_stopping: bool | str = "exact") -> list[int]:
    """Keep the num_beams best partial sequences by summed log-probability; a hypothesis that ends (end-of-text, or
    max_new_tokens) is scored as sum / length ** length_penalty, length counting generated tokens. Returns the best
    finished hypothesis's generated ids.

    early_stopping="exact" stops only when no live hypothesis can beat the num_beams best finished ones (the result
    of searching to the end). True, False and "never" are Hugging Face's rules, for the same results as its
    generate(num_beams=..., early_stopping=...): only end-of-text among the top num_beams candidates finishes, at
    most num_beams finished hypotheses are kept, and True stops as soon as there are num_beams of them."""
    if early_stopping != "exact":
        return _beam_search_hf(model, prompt, max_new_tokens, num_beams, length_penalty, eos_id, early_stopping)
    cfg = model.config
    device = model.wte.weight.device
    if not cfg.extrapolates and len(prompt) + max_new_tokens > cfg.block_size:
        raise UserError(f"beam search keeps every hypothesis in the cache: prompt + max_new_tokens must fit "
                         f"block_size={cfg.block_size} with position={cfg.position!r}")
    if max_new_tokens == 0:
        return []
    if not prompt:
        raise UserError("beam search needs at least one prompt token")
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
        if len(finished) >= num_beams:
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
        position = torch.tensor([[len(prompt) + step]], device=device)
        logits, _ = model(torch.tensor(tokens, device=device)[:, None], kv_cache=cache, positions=position,
                          kv_len=len(prompt) + step + 1)
    return max(finished, key=lambda f: f[0])[1] if finished else beams[0]


def _start_beams(model: GPT, prompt: list[int], max_new_tokens: int, num_beams: int):
    cfg = model.config
    if not cfg.extrapolates and len(prompt) + max_new_tokens > cfg.block_size:
        raise UserError(f"beam search keeps every hypothesis in the cache: prompt + max_new_tokens must fit "
                        f"block_size={cfg.block_size} with position={cfg.position!r}")
    if not prompt:
        raise UserError("beam search needs at least one prompt token")
    cache = model.make_kv_cache(num_beams, len(prompt) + max_new_tokens)
    logits, _ = model(torch.tensor([prompt] * num_beams, device=model.wte.weight.device), kv_cache=cache,
                      last_only=True)
    return cache, logits


@torch.no_grad()
def _beam_search_hf(model: GPT, prompt: list[int], max_new_tokens: int, num_beams: int, length_penalty: float,
                    eos_id: int | None, early_stopping: bool | str) -> list[int]:
    """Hugging Face's beam search (transformers' _beam_search), step for step: the top 2 * num_beams candidates;
    those among the first num_beams that end join the finished set, which keeps its num_beams best; the best
    num_beams that do not end live on."""
    if max_new_tokens == 0:
        return []
    if num_beams == 1:  # transformers decodes greedily then, whatever the length penalty
        _start_beams(model, prompt, max_new_tokens, 1)  # the same checks
        return generate_naive(model, prompt, max_new_tokens, temperature=0.0, eos_id=eos_id)
    device = model.wte.weight.device
    cache, logits = _start_beams(model, prompt, max_new_tokens, num_beams)
    scores = torch.full((num_beams,), -1e9, device=device)
    scores[0] = 0.0  # all beams start identical: expand only the first
    beams: list[list[int]] = [[] for _ in range(num_beams)]
    finished: list[tuple[float, list[int]]] = []  # the num_beams best, best first
    improvable = True
    for step in range(max_new_tokens):
        candidates = (scores[:, None] + logits[:, -1].float().log_softmax(dim=-1)).view(-1)  # (nb * V,)
        top_scores, top_idx = candidates.topk(2 * num_beams)
        V = logits.size(-1)
        ranked = [(sc, *divmod(i, V)) for sc, i in zip(top_scores.tolist(), top_idx.tolist())]
        ends = [token == eos_id or step == max_new_tokens - 1 for _, _, token in ranked]
        full = len(finished) == num_beams and early_stopping is True
        if improvable and not full:
            for rank, (score, beam, token) in enumerate(ranked[:num_beams]):
                if ends[rank]:
                    finished.append((score / (step + 1) ** length_penalty, beams[beam] + [token]))
            finished = sorted(finished, key=lambda f: -f[0])[:num_beams]
        live = sorted(range(len(ranked)), key=lambda r: (ends[r], -ranked[r][0]))[:num_beams]  # ended ones last
        if all(ends):
            break
        beams = [beams[ranked[r][1]] + [ranked[r][2]] for r in live]
        scores = torch.tensor([ranked[r][0] - 1e9 * ends[r] for r in live], device=device)
        best_possible = scores.max().item() / (step + 1 if early_stopping != "never" or length_penalty <= 0
                                               else max_new_tokens) ** length_penalty
        improvable = improvable and (len(finished) < num_beams or best_possible > finished[-1][0])
        if (len(finished) == num_beams and early_stopping is True) or not improvable:
            break
        cache.reorder(torch.tensor([ranked[r][1] for r in live], device=device))
        tokens = torch.tensor([[ranked[r][2]] for r in live], device=device)
        logits, _ = model(tokens, kv_cache=cache, positions=torch.tensor([[len(prompt) + step]], device=device),
                          kv_len=len(prompt) + step + 1)
    return finished[0][1]

# ------------------------------------------------------------------------------------------------------ text API

def _prompt_ids(tokenizer, text: str) -> list[int]:
    from .tokenizer import prompt_ids
    return prompt_ids(tokenizer, text)  # an empty prompt starts after end-of-text (or at begin-of-text)


def _stream(engine: Engine, request: Request) -> Iterator[str]:
    """This request's text pieces; the engine's other requests go on being stepped (their events are theirs). The
    request joins the engine at the first piece asked for, so a stream never iterated holds nothing."""
    rid = engine.add(request)
    try:
        while rid in engine:
            for event in engine.step():
                if event.request_id == rid and event.text:
                    yield event.text
    finally:  # a stream closed early frees its slot
        engine.cancel(rid)


def generate(model, tokenizer, prompt: str | list[str], max_new_tokens: int = 100, temperature: float = 1.0,
             top_k: int | None = None, top_p: float | None = None, repetition_penalty: float = 1.0,
             num_beams: int = 1, length_penalty: float = 1.0, stop: str | list[str] | None = None,
             seed: int | None = None, stream: bool = False, compile: bool = False,
             early_stopping: bool | str = "exact", constraint=None):
    """Continue prompt(s); return the continuation only (a list for a list of prompts), or with stream=True an
    iterator of text pieces. Stops at end-of-text, at any stop string (not returned), or after max_new_tokens.

    model: a GPT, or an Engine to reuse (its compiled step, its packed weights). With a GPT each call builds an
    engine sized for it; compile=True then compiles its decode step first (tens of seconds on a small CPU), which
    pays for long generations; for many calls build one Engine(model, tokenizer, compile=True) and pass it.
    A list of prompts is decoded together (continuous batching); the request of prompt i is seeded with seed + i.
    early_stopping: beam search's rule (see beam_search): "exact", or transformers' True, False or "never".
    constraint: a structured.Constraint (a JSON schema, a regex, a grammar, a choice) every continuation keeps to.
    """
    if early_stopping not in ("exact", True, False, "never"):
        raise UserError(f"early_stopping={early_stopping!r}: use 'exact', True, False or 'never'")
    check_sampling(max_new_tokens, temperature, top_k, top_p, repetition_penalty, num_beams, seed, length_penalty)
    stop = check_stop(stop)
    many = isinstance(prompt, (list, tuple))
    prompts = list(prompt) if many else [prompt]
    if not prompts or not all(isinstance(p, str) for p in prompts):
        raise UserError("prompt must be a string or a non-empty list of strings")
    if stream and many:
        raise UserError("stream=True takes one prompt; call it once per prompt")
    ids = [_prompt_ids(tokenizer, p) for p in prompts]
    if num_beams > 1 and constraint is not None:
        raise UserError("beam search does not take a constraint; sample or decode greedily (num_beams=1)")
    if num_beams > 1:
        inference = model.model if isinstance(model, Engine) else inference_copy(unwrap(model))
        outs = [beam_search(inference, p, max_new_tokens, num_beams, length_penalty, tokenizer.eot_id, early_stopping)
                for p in ids]
        return _texts(tokenizer, outs, stop, many)
    engine = _engine_for(model, tokenizer, ids, max_new_tokens, compile)
    if seed is None:
        seed = int(torch.randint(0, 2**62, (1,)).item())
    requests = [Request(p, max_new_tokens, temperature, top_k, top_p, repetition_penalty, stop, seed + i,
                        constraint=constraint) for i, p in enumerate(ids)]
    if stream:
        engine.check(requests[0])  # a bad request fails here, not at the first next()
        return _stream(engine, requests[0])
    texts = run_requests(engine, requests, text=True)
    return texts if many else texts[0]


def _texts(tokenizer, outs: list[list[int]], stop: list[str], many: bool):
    texts = []
    for out in outs:
        if tokenizer.eot_id in out:
            out = out[:out.index(tokenizer.eot_id)]
        text = tokenizer.decode(out)
        hits = [text.find(s) for s in stop if s in text]
        texts.append(text[:min(hits)] if hits else text)
    return texts if many else texts[0]


# ------------------------------------------------------------------------------------------------------------ CLI

def generate_cli(args) -> int:
    import sys
    from pathlib import Path
    from .runs import load
    if args.num_samples < 1:
        raise UserError(f"--num-samples {args.num_samples} must be at least 1")
    options = dict(max_new_tokens=args.max_new_tokens, temperature=args.temperature, top_k=args.top_k,
                   top_p=args.top_p, repetition_penalty=args.repetition_penalty, num_beams=args.num_beams,
                   length_penalty=args.length_penalty, stop=args.stop,
                   early_stopping={"true": True, "false": False}.get(args.early_stopping, args.early_stopping),
                   constraint=_constraint_of(args))
    check_sampling(args.max_new_tokens, args.temperature, args.top_k, args.top_p, args.repetition_penalty,
                   args.num_beams, args.seed, args.length_penalty)
    if args.seed is not None and args.seed + args.num_samples > 2**63:
        raise UserError(f"--seed {args.seed} + --num-samples {args.num_samples} runs past 2**63; use a smaller seed")
    if args.prompt_file:
        try:
            prompt = Path(args.prompt_file).read_text(encoding="utf-8")
        except UnicodeDecodeError as e:
            raise UserError(f"{args.prompt_file} is not UTF-8 text (byte {e.start}); save it as UTF-8") from None
    else:
        prompt = args.prompt
    from .onnx import is_onnx_dir
    if is_onnx_dir(args.run):
        return _generate_onnx(args, prompt)
    model, tokenizer = load(args.run, device=args.device, checkpoint=args.checkpoint, dtype=args.dtype)
    if model.wte.weight.device.type == "cpu":  # this command owns its process: freed activations are reused
        from .cpu import keep_freed_memory
        keep_freed_memory()
    cfg = model.config
    compile = args.compile and args.num_beams == 1  # beam search decodes eagerly
    # one engine for every sample and every interactive line, so --compile compiles once; a model that goes past
    # block_size gets room for the prompt and the new tokens, and a longer interactive line gets a larger engine
    engines: list[Engine] = []

    def engine_for(text: str) -> Engine:
        needed = len(tokenizer.encode(text) or [0]) + args.max_new_tokens
        if engines and (not cfg.extrapolates or needed <= engines[0].max_seq_len):
            return engines[0]
        size = max(cfg.block_size, needed, 2 * engines[0].max_seq_len if engines else 0) if cfg.extrapolates \
            else cfg.block_size
        if engines and compile:
            print(f"(a longer context: compiling the decode step for {size} positions)", file=sys.stderr)
        engines[:] = [Engine(model, tokenizer, max_batch=1, max_seq_len=size, compile=compile)]
        return engines[0]

    def one(prompt: str, seed) -> None:
        engine = engine_for(prompt)
        if args.num_beams > 1:
            print(prompt + generate(engine, tokenizer, prompt, seed=seed, **options), flush=True)
            return
        pieces = generate(engine, tokenizer, prompt, seed=seed, stream=True, **options)  # checks settings and prompt
        sys.stdout.write(prompt)
        for piece in pieces:
            sys.stdout.write(piece)
            sys.stdout.flush()
        sys.stdout.write("\n")

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
        except UserError as e:
            print(f"error: {e}", file=sys.stderr)



def _constraint_of(args):
    """--json-schema FILE (or `object`), --regex, --grammar FILE or --choice: the structured.Constraint, or None."""
    from pathlib import Path
    from .structured import Constraint
    given = [f for f, v in (("--json-schema", args.json_schema), ("--regex", args.regex), ("--grammar", args.grammar),
                            ("--choice", args.choice)) if v]
    if len(given) > 1:
        raise UserError(f"{' and '.join(given)} each constrain the output; give one")
    def text(flag: str, path: str) -> str:
        try:
            return Path(path).read_text(encoding="utf-8")
        except (OSError, UnicodeDecodeError) as e:
            raise UserError(f"{flag} {path}: cannot read it as UTF-8 text ({type(e).__name__})") from None
    if args.json_schema == "object":
        return Constraint.json_object()
    if args.json_schema:
        return Constraint.json_schema(text("--json-schema", args.json_schema))
    if args.regex:
        return Constraint.regex(args.regex)
    if args.grammar:
        return Constraint.grammar(text("--grammar", args.grammar))
    return Constraint.choice(args.choice) if args.choice else None


def _generate_onnx(args, prompt: str) -> int:
    """`lmforge generate ONNX_DIR`: the exported graphs in onnxruntime, sampled as the engine samples."""
    from .onnx import OnnxModel
    unsupported = [flag for flag, on in (("--num-beams", args.num_beams != 1), ("--interactive", args.interactive),
                                         ("--json-schema / --regex / --grammar / --choice",
                                          any((args.json_schema, args.regex, args.grammar, args.choice))),
                                         ("--repetition-penalty", args.repetition_penalty != 1.0),
                                         ("--compile", args.compile), ("--checkpoint", args.checkpoint),
                                         ("--device", args.device != "cpu"), ("--dtype", args.dtype != "float32"))
                   if on]
    if unsupported:
        raise UserError(f"{args.run} is an ONNX export, which generates with temperature, top-k, top-p, seeds and "
                        f"stop strings; drop {', '.join(unsupported)} or generate from the run itself")
    model = OnnxModel(args.run)
    ids = model.tokenizer.encode(prompt) or [model.eos_id if model.eos_id is not None else 0]
    for i in range(args.num_samples):
        if args.num_samples > 1:
            print(f"--- sample {i + 1} ---")
        new = model.generate(ids, args.max_new_tokens, args.temperature, args.top_k, args.top_p,
                             None if args.seed is None else args.seed + i)
        if new and new[-1] in model.eos_ids:
            new = new[:-1]
        text = model.tokenizer.decode(new)
        cuts = [text.find(s) for s in args.stop if s and s in text]
        print(prompt + (text[:min(cuts)] if cuts else text), flush=True)
    return 0
