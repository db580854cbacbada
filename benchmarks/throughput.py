"""Training throughput for the GPT-2 124M shape on this machine: batch 4 x 256, fp32, fused AdamW, against HF
`transformers` GPT2LMHeadModel on the same batches.

Throughput: both models train in one process, their steps interleaved (HF, ours, HF, ours, ...) so that machine noise
hits both alike; we report median tokens/s. Peak memory: each variant runs in a child process of its own (peak RSS
only grows within a process): HF, ours, ours with torch.compile, ours with activation checkpointing.

    python benchmarks/throughput.py [--steps 8] [--no-compile] [--no-children]
"""

import argparse
import json
import statistics
import subprocess
import sys
import time

import torch

B, T, VOCAB = 4, 256, 50257


def make(kind: str):
    torch.manual_seed(0)
    if kind == "hf":
        from transformers import GPT2Config, GPT2LMHeadModel
        cfg = GPT2Config(vocab_size=VOCAB, n_positions=1024, n_embd=768, n_layer=12, n_head=12, resid_pdrop=0.0,
                         embd_pdrop=0.0, attn_pdrop=0.0)
        model = GPT2LMHeadModel(cfg).train()
        step_loss = lambda x, y: model(input_ids=x, labels=x).loss
    else:
        from lmforge import GPT, ModelConfig
        model = GPT(ModelConfig.preset("gpt2", dropout=0.0)).train()
        model.activation_checkpointing = kind == "ours-checkpointing"
        fwd = torch.compile(model) if kind == "ours-compile" else model
        step_loss = lambda x, y: fwd(x, y)[1]
    # fused AdamW on both sides: the default of lmforge's trainer and of HF's Trainer (torch >= 2.8)
    opt = torch.optim.AdamW(model.parameters(), lr=6e-4, weight_decay=0.1, betas=(0.9, 0.95), fused=True)

    def step(x, y):
        loss = step_loss(x, y)
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        return loss.item()
    return model, step


def batches(n):
    g = torch.Generator().manual_seed(1)
    data = torch.randint(0, VOCAB, (n, B, T + 1), generator=g)
    return [(d[:, :-1], d[:, 1:]) for d in data]


def timed(step, x, y):
    t = time.perf_counter()
    step(x, y)
    return time.perf_counter() - t


def peak_rss_mb() -> float:
    """This process's resident-memory high-water mark (VmHWM starts afresh at exec, unlike ru_maxrss)."""
    for line in open("/proc/self/status"):
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) / 1024
    raise RuntimeError("no VmHWM in /proc/self/status")


def child(kind: str, steps: int) -> dict:
    """One variant alone: median tokens/s and peak resident memory."""
    torch.set_num_threads(2)
    _, step = make(kind)
    data = batches(steps + 2)
    t0 = time.perf_counter()
    step(*data[0])  # warmup (and compilation)
    first = time.perf_counter() - t0
    times = [timed(step, *d) for d in data[1:]]
    return {"kind": kind, "tokens_per_s": B * T / statistics.median(times), "first_step_s": first,
            "peak_rss_mb": peak_rss_mb()}


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--steps", type=int, default=8)
    ap.add_argument("--no-compile", action="store_true")
    ap.add_argument("--no-children", action="store_true", help="only the interleaved throughput")
    ap.add_argument("--child", help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.child:
        print(json.dumps(child(args.child, args.steps)))
        return
    torch.set_num_threads(2)
    hf_model, hf_step = make("hf")
    our_model, our_step = make("ours")
    assert sum(p.numel() for p in hf_model.parameters()) == our_model.num_params() == 124_439_808
    data = batches(args.steps + 2)
    for x, y in data[:2]:  # warm up both (HF's first steps are slower)
        hf_step(x, y), our_step(x, y)
    hf_t, our_t = [], []
    for x, y in data[2:]:
        hf_t.append(timed(hf_step, x, y))
        our_t.append(timed(our_step, x, y))
    hf_tps, our_tps = B * T / statistics.median(hf_t), B * T / statistics.median(our_t)
    paired = statistics.median(h / o for h, o in zip(hf_t, our_t))
    del hf_model, our_model
    print(f"interleaved in one process, {args.steps} steps each: HF {hf_tps:,.0f} tok/s, lmforge {our_tps:,.0f} "
          f"tok/s; median of paired step-time ratios {paired:.2f}x (range "
          f"{min(h / o for h, o in zip(hf_t, our_t)):.2f}-{max(h / o for h, o in zip(hf_t, our_t)):.2f})")
    if args.no_children:
        return

    kinds = ["hf", "ours", "ours-checkpointing"] + ([] if args.no_compile else ["ours-compile"])
    rows = []
    for kind in kinds:
        out = subprocess.run([sys.executable, __file__, "--child", kind, "--steps", str(args.steps)],
                             capture_output=True, text=True)
        if out.returncode != 0:
            print(f"{kind} failed: {out.stderr[-2000:]}")
            continue
        rows.append(json.loads(out.stdout.strip().splitlines()[-1]))
    print("\n| variant | tokens/s | vs HF | peak RSS | first step |\n|---|---|---|---|---|")
    hf = next((r for r in rows if r["kind"] == "hf"), None)
    for r in rows:
        ratio = f"{r['tokens_per_s'] / hf['tokens_per_s']:.2f}x" if hf else "-"
        print(f"| {r['kind']} | {r['tokens_per_s']:,.0f} | {ratio} | {r['peak_rss_mb']:,.0f} MB | "
              f"{r['first_step_s']:.1f} s |")


if __name__ == "__main__":
    main()
