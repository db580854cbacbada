"""Decode speed for the GPT-2 124M shape on this machine, side by side in one process: batch 1, a 128-token prompt,
256 new tokens, greedy, fp32, 2 threads, lmforge (eager, and with compile=True) vs HF `transformers`
generate(use_cache=True).

Both models hold the same (random) weights, so their greedy ids must agree: the benchmark checks that first. It also
measures the machine's memory read bandwidth: decoding one token reads every weight once, so bandwidth / weight bytes
is the ceiling for tokens/s, and we print the fraction of it each side reaches.

    python benchmarks/generate.py [--new 256] [--prompt 128] [--repeat 3]
"""

import argparse
import statistics
import time

import torch

from lmforge import GPT, ModelConfig
from lmforge.generate import decode_ids


def read_bandwidth_gbs(size_mb=1024, repeat=9) -> float:
    """Read bandwidth of a 1 GB sum, the median of several (a single fastest one on a shared machine overstates)."""
    x = torch.ones(size_mb * 1024 * 1024 // 4)
    x.sum()
    return x.numel() * 4 / statistics.median(_time(lambda: x.sum()) for _ in range(repeat)) / 1e9


def _time(fn) -> float:
    t = time.perf_counter()
    fn()
    return time.perf_counter() - t


def hf_twin(model: GPT):
    """HF GPT2LMHeadModel holding our weights (HF's Conv1D stores matrices transposed)."""
    from transformers import GPT2Config, GPT2LMHeadModel
    c = model.config
    hf = GPT2LMHeadModel(GPT2Config(vocab_size=c.vocab_size, n_positions=c.block_size, n_embd=c.n_embd,
                                    n_layer=c.n_layer, n_head=c.n_head, resid_pdrop=0, embd_pdrop=0, attn_pdrop=0))
    state = {}
    for k, v in model.state_dict().items():
        name = (k.replace("blocks.", "transformer.h.").replace("norm_1", "ln_1").replace("norm_2", "ln_2")
                .replace("norm_f", "transformer.ln_f").replace("wte", "transformer.wte").replace("wpe", "transformer.wpe"))
        conv1d = name.endswith(("c_attn.weight", "c_proj.weight", "c_fc.weight"))
        state[name] = v.t().contiguous() if conv1d else v
    missing, unexpected = hf.load_state_dict(state, strict=False)
    assert not unexpected and all("attn.bias" in m or "masked_bias" in m for m in missing), (missing, unexpected)
    return hf.eval()


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--new", type=int, default=256)
    ap.add_argument("--prompt", type=int, default=128)
    ap.add_argument("--repeat", type=int, default=3)
    ap.add_argument("--threads", type=int, default=2)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    model = GPT(ModelConfig.preset("gpt2")).eval()
    hf = hf_twin(model)
    prompt = torch.randint(0, 50257, (1, args.prompt))
    weight_bytes = model.num_params() * 4
    bandwidth = read_bandwidth_gbs()
    ceiling = bandwidth * 1e9 / weight_bytes

    def ours(compile=False):
        t0 = time.perf_counter()
        steps = decode_ids(model, [prompt[0].tolist()], args.new, temperature=0.0, compile=compile)
        ids = [int(next(steps)[0])]
        t1 = time.perf_counter()
        ids += [int(t[0]) for t in steps]
        return ids, t1 - t0, time.perf_counter() - t1

    @torch.no_grad()
    def theirs():
        kw = dict(do_sample=False, use_cache=True, pad_token_id=0, eos_token_id=None)
        t0 = time.perf_counter()
        hf.generate(prompt, max_new_tokens=1, min_new_tokens=1, **kw)
        t1 = time.perf_counter()
        out = hf.generate(prompt, max_new_tokens=args.new, min_new_tokens=args.new, **kw)
        t2 = time.perf_counter()
        return out[0, args.prompt:].tolist(), t1 - t0, (t2 - t1) - (t1 - t0)

    t = time.perf_counter()
    ours(compile=True)  # compiles the decode step
    compile_s = time.perf_counter() - t
    ours(), theirs()  # warm up
    runs = {"ours": [], "compiled": [], "hf": []}
    for _ in range(args.repeat):  # interleaved, so noise hits all
        runs["ours"].append(ours())
        runs["compiled"].append(ours(compile=True))
        runs["hf"].append(theirs())
    assert runs["ours"][0][0] == runs["hf"][0][0], "greedy ids differ from HF's on the same weights"
    assert runs["compiled"][0][0] == runs["hf"][0][0], "compiled greedy ids differ from HF's on the same weights"
    print(f"greedy ids identical to HF's ({args.new} tokens); read bandwidth {bandwidth:.1f} GB/s, "
          f"weights {weight_bytes / 1e6:.0f} MB -> ceiling {ceiling:.1f} tok/s; compiling the decode step took "
          f"{compile_s:.0f} s (first call, with inductor's on-disk cache as it was)\n")
    print("| | prefill tok/s | decode tok/s | of the bandwidth ceiling |\n|---|---|---|---|")
    best = {}
    for name, rs in runs.items():
        prefill = max(args.prompt / r[1] for r in rs)
        decode = max((args.new - 1) / r[2] for r in rs)
        best[name] = (prefill, decode)
        label = {"ours": "lmforge", "compiled": "lmforge, compile=True", "hf": "HF transformers"}[name]
        print(f"| {label} | {prefill:,.0f} | {decode:.1f} | {decode / ceiling:.0%} |")
    for name in ("ours", "compiled"):
        print(f"| ratio {name} / HF | {best[name][0] / best['hf'][0]:.2f}x | {best[name][1] / best['hf'][1]:.2f}x | |")


if __name__ == "__main__":
    main()
