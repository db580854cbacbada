"""What structured output costs a token: the engine decoding under a JSON schema against the same requests
unconstrained, on GPT-2's tokenizer (50,257 tokens, the vocabulary the mask covers) and a model of GPT-2's shape.

    python benchmarks/structured.py [--preset gpt2] [--batches 1,8] [--tokens 96]

For each batch size, seeded requests (temperature 1) run under the schema, then the same requests unconstrained,
each as many tokens as its constrained twin (so every step holds the same rows): milliseconds a generated token,
the mask's share (Grammars.allowed, timed where the engine calls it: every constrained row's mask in one call a
step), and how many constrained outputs finished within --tokens (each one that did must validate). The model's weights are random:
its tokens are not a trained model's, but the mask's cost depends on the grammar's state and the vocabulary, not
on the weights.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

SCHEMA = {"type": "object", "additionalProperties": False, "required": ["name", "age", "city", "tags"],
          "properties": {"name": {"type": "string", "maxLength": 16}, "age": {"type": "integer", "maximum": 999},
                         "city": {"type": "string", "maxLength": 16},
                         "tags": {"type": "array", "items": {"type": "string", "maxLength": 8}, "maxItems": 3}}}


def decode(engine, requests) -> tuple[float, int, list[list[int]]]:
    ids = [engine.add(r) for r in requests]
    tokens = {i: [] for i in ids}
    start = time.perf_counter()
    while engine.has_work():
        for event in engine.step():
            if event.token is not None:
                tokens[event.request_id].append(event.token)
    return time.perf_counter() - start, sum(map(len, tokens.values())), [tokens[i] for i in ids]


def main() -> int:
    import jsonschema
    import torch
    from lmforge import GPT, ModelConfig
    from lmforge.engine import Engine
    from lmforge.request import Request
    from lmforge.structured import Constraint
    from lmforge.tokenizer import BPETokenizer

    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--preset", default="gpt2")
    ap.add_argument("--batches", default="1,8")
    ap.add_argument("--tokens", type=int, default=96, help="max new tokens a request")
    args = ap.parse_args()
    tok = BPETokenizer.gpt2()
    torch.manual_seed(0)
    model = GPT(ModelConfig.preset(args.preset, vocab_size=tok.vocab_size)).eval()
    prompt = tok.encode("A person, as JSON:")
    constraint = Constraint.json_schema(SCHEMA)
    print(f"{args.preset}, vocabulary {tok.vocab_size:,}, {torch.get_num_threads()} threads\n")
    print("| batch | free: ms a token | schema: ms a token | the mask: ms a step | mask share | finished, all valid |\n"
          "|---|---|---|---|---|---|")
    for batch in [int(b) for b in args.batches.split(",")]:
        engine = Engine(model, tok, max_batch=batch)
        grammars = engine.grammars
        spent = {"mask": 0.0, "calls": 0}
        allowed = grammars.allowed

        def timed_allowed(matchers, device="cpu"):
            start = time.perf_counter()
            out = allowed(matchers, device)
            spent["mask"] += time.perf_counter() - start
            spent["calls"] += 1
            return out
        grammars.allowed = timed_allowed
        held = [Request(prompt, args.tokens, temperature=1.0, seed=i, constraint=constraint) for i in range(batch)]
        decode(engine, held[:1])  # (warm-up)
        spent.update(mask=0.0, calls=0)
        held_s, held_n, outputs = decode(engine, held)
        # the same requests free, each as long as its constrained one: the same rows in every step
        free = [Request(prompt, len(out), temperature=1.0, seed=i, stop_at_eos=False) for i, out in enumerate(outputs)]
        free_s, free_n, _ = decode(engine, free)
        finished = 0
        for tokens in outputs:
            try:
                value = json.loads(tok.decode([t for t in tokens if t != tok.eot_id]))
            except ValueError:
                continue  # max_tokens came first
            jsonschema.validate(value, SCHEMA)  # (a finished output that does not validate is a failure)
            finished += 1
        per_step = spent["mask"] / max(spent["calls"], 1)
        print(f"| {batch} | {free_s / free_n * 1e3:.1f} | {held_s / held_n * 1e3:.1f} | {per_step * 1e3:.2f} "
              f"| {spent['mask'] / held_s:.1%} | {finished}/{batch} |", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
