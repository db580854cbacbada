"""Exact-match evaluation of prompt->completion pairs: greedy completions through one engine against the expected
ones, and the loss per completion token. `lmforge eval RUN --pairs test.jsonl` prints it; fine-tuning on pairs
writes a few of its examples to samples.txt at each evaluation.

    result = evaluate_pairs(model, tokenizer, [("2+2=", "4"), ...])   # exact_match, loss, pairs, examples
"""

from __future__ import annotations

from pathlib import Path

import torch

from .data import pair_arrays, pair_batch, read_pairs
from .engine import Engine, Request
from .errors import UserError
from .generation import run_requests


@torch.no_grad()
def evaluate_pairs(model, tokenizer, pairs: list[tuple[str, str]], max_batch: int = 16, examples: int = 3) -> dict:
    """Exact match of greedy completions (generated through one engine, max_batch at a time), the mean loss per
    completion token (end-of-text included), and a few examples. A pair longer than the context keeps the end of its
    prompt, as training does."""
    if not pairs:
        raise UserError("no pairs to evaluate")
    block = model.config.block_size
    tokens, index = pair_arrays(tokenizer, pairs)
    prompts, wanted = [], []
    for start, p_len, total in index:
        completion = tokens[start + p_len:start + total].tolist()
        room = max(1, block + 1 - len(completion))  # what training keeps of the prompt (pair_batch)
        prompts.append(tokens[start:start + p_len].tolist()[-room:])
        wanted.append(completion)
    longest = max(len(p) + len(w) - 1 for p, w in zip(prompts, wanted))
    engine = Engine(model, None, max_batch=min(max_batch, len(pairs)), max_seq_len=longest, eos_id=tokenizer.eot_id)
    outs = run_requests(engine, [Request(p, len(w), temperature=0.0) for p, w in zip(prompts, wanted)])
    hits = [out == w for out, w in zip(outs, wanted)]
    losses, counts = [], []
    device = model.wte.weight.device
    for i in range(0, len(index), max_batch):
        x, y, attn, loss_mask = pair_batch(tokens, index, range(i, min(i + max_batch, len(index))), block,
                                           tokenizer.eot_id)
        logits, _ = model(x.to(device), attention_mask=attn.to(device))
        per_token = torch.nn.functional.cross_entropy(logits.float().flatten(0, 1), y.to(device).flatten(),
                                                      reduction="none")
        mask = loss_mask.to(device).flatten().float()
        losses.append(float((per_token * mask).sum()))
        counts.append(float(mask.sum()))
    shown = [{"prompt": p, "expected": c, "generated": tokenizer.decode([t for t in out if t != tokenizer.eot_id]),
              "match": hit} for (p, c), out, hit in list(zip(pairs, outs, hits))[:examples]]
    return {"pairs": len(pairs), "exact_match": sum(hits) / len(hits), "loss": sum(losses) / max(sum(counts), 1),
            "examples": shown}


def eval_pairs_cli(args) -> int:
    from .runs import load
    model, tokenizer = load(args.run, device=args.device, checkpoint=args.checkpoint)
    result = evaluate_pairs(model, tokenizer, read_pairs(Path(args.pairs)))
    print(f"{args.pairs}: exact match {result['exact_match']:.1%} of {result['pairs']} pairs, "
          f"loss {result['loss']:.4f} per completion token")
    for ex in result["examples"]:
        verdict = "ok " if ex["match"] else "BAD"
        expected = "" if ex["match"] else f" (expected {ex['expected']!r})"
        print(f"  {verdict} {ex['prompt']!r} -> {ex['generated']!r}{expected}")
    return 0
