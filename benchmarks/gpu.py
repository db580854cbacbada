"""GPU figures for the GPT-2 124M shape, side by side with HF transformers on the same GPU and the same weights.

    training   batch 16 x 1024, bf16 autocast, fused AdamW, the GPT-2 optimizer settings: our model (eager and
               torch.compile) against HF GPT2LMHeadModel (SDPA attention; eager and torch.compile), the steps of all
               interleaved; tokens/s and MFU (6N + 12 L C T FLOPs a token) against the bf16 matrix-product peak this
               GPU reaches in the same run.
    decode     batch 1, 128-token prompt, 256 new, greedy, fp32 and bf16: our Engine eager, and compiled (the step is
               torch.compile'd and replayed as CUDA graphs), against HF generate as it comes (dynamic cache) and HF's
               own fast setting (static cache, which generate compiles). Fraction of the bandwidth ceiling: this
               GPU's measured copy bandwidth over the bytes of weights a token reads.
    batch      aggregate decode tok/s of 1, 8, 32 and 64 concurrent requests in one compiled bf16 engine.
    quant      our int8 and int4 engines (weights dequantized inside the compiled step) against our bf16 engine.

    python benchmarks/gpu.py [--parts train,decode,batch,quant] [--steps 20] [--repeat 3]
"""

import argparse
import statistics
import time

import torch

from generate import _interleaved, _one, agreement, hf_twin, run_engine
from lmforge import GPT, Engine, ModelConfig
from lmforge.config import TrainConfig
from lmforge.quantize import quantize_model
from lmforge.train import make_optimizers

DEV = torch.device("cuda")


def cuda_time(fn, repeat=1) -> float:
    """Seconds of fn() on the GPU, the median of repeat runs."""
    times = []
    for _ in range(repeat):
        torch.cuda.synchronize()
        t = time.perf_counter()
        fn()
        torch.cuda.synchronize()
        times.append(time.perf_counter() - t)
    return statistics.median(times)


def measured_peaks() -> tuple[float, float]:
    """(copy bandwidth in bytes/s counting reads and writes, bf16 matrix-product FLOP/s) measured here."""
    src = torch.empty(2 ** 30, dtype=torch.uint8, device=DEV)
    dst = torch.empty_like(src)
    dst.copy_(src)
    copy = cuda_time(lambda: dst.copy_(src), repeat=20)
    a = torch.randn(8192, 8192, dtype=torch.bfloat16, device=DEV)
    a @ a
    mm = cuda_time(lambda: a @ a, repeat=10)
    return 2 * src.numel() / copy, 2 * 8192 ** 3 / mm


# ----------------------------------------------------------------------------------------------------- training

def training(args, peak_flops):
    B, T = args.batch_size, 1024
    steps = {}

    def ours(compiled):
        torch.manual_seed(0)
        model = GPT(ModelConfig.preset("gpt2", dropout=0.0)).to(DEV).train()
        opt = make_optimizers(model, TrainConfig(lr=6e-4, weight_decay=0.1, beta2=0.95), DEV)[0]  # fused AdamW
        fwd = torch.compile(model) if compiled else model

        def step(x, y):
            with torch.autocast("cuda", dtype=torch.bfloat16):
                loss = fwd(x, y)[1]
            loss.backward()
            opt.step()
            opt.zero_grad(set_to_none=True)
        return model, step

    def hf(compiled):
        from transformers import GPT2Config, GPT2LMHeadModel
        torch.manual_seed(0)
        cfg = GPT2Config(n_positions=1024, resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0, attn_implementation="sdpa")
        model = GPT2LMHeadModel(cfg).to(DEV).train()
        opt = torch.optim.AdamW(model.parameters(), lr=6e-4, weight_decay=0.1, betas=(0.9, 0.95), fused=True)
        fwd = torch.compile(model) if compiled else model

        def step(x, y):
            with torch.autocast("cuda", dtype=torch.bfloat16):
                loss = fwd(input_ids=x, labels=x).loss  # HF shifts the labels itself
            loss.backward()
            opt.step()
            opt.zero_grad(set_to_none=True)
        return model, step

    for name, make in [("lmforge, eager", lambda: ours(False)), ("lmforge, torch.compile", lambda: ours(True)),
                       ("HF transformers, eager", lambda: hf(False)), ("HF transformers, torch.compile", lambda: hf(True))]:
        model, step = make()
        steps[name] = (model, step)
    g = torch.Generator(device=DEV).manual_seed(1)
    data = torch.randint(0, 50257, (B, T + 1), device=DEV, generator=g)
    x, y = data[:, :-1], data[:, 1:]
    t0 = time.perf_counter()
    for name, (_, step) in steps.items():  # compile and warm up
        for _ in range(3):
            step(x, y)
    torch.cuda.synchronize()
    print(f"training: warm-up and compiling took {time.perf_counter() - t0:.0f} s")
    times = {name: [] for name in steps}
    for _ in range(args.steps):  # interleaved, so that clocks and heat hit all alike
        for name, (_, step) in steps.items():
            times[name].append(cuda_time(lambda: step(x, y)))
    model = steps["lmforge, eager"][0]
    n = model.num_params()  # without position embeddings; the tied output matrix counted once
    flops_per_token = 6 * n + 12 * model.config.n_layer * model.config.n_embd * T
    print(f"\ntraining GPT-2 124M, batch {B} x {T}, bf16 autocast, fused AdamW ({args.steps} interleaved steps each; "
          f"bf16 matrix-product peak measured here {peak_flops / 1e12:.0f} TFLOP/s)\n")
    print("| | step ms (median) | tokens/s | MFU (of the measured peak) | peak memory GB |\n|---|---|---|---|---|")
    for name in steps:
        t = statistics.median(times[name])
        print(f"| {name} | {t * 1e3:.1f} | {B * T / t:,.0f} | {B * T * flops_per_token / t / peak_flops:.1%} | |")
    mine, theirs = statistics.median(times["lmforge, torch.compile"]), statistics.median(times["HF transformers, torch.compile"])
    print(f"| ratio compiled lmforge / HF | | {theirs / mine:.2f}x | | |")
    mine, theirs = statistics.median(times["lmforge, eager"]), statistics.median(times["HF transformers, eager"])
    print(f"| ratio eager lmforge / HF | | {theirs / mine:.2f}x | | |")
    del steps
    torch.cuda.empty_cache()


# ----------------------------------------------------------------------------------------------------- decoding

@torch.no_grad()
def hf_run(hf, prompt, new, **kw):
    """Greedy through transformers' generate: (ids, prefill seconds, decode seconds); prefill is a 1-token call."""
    kw = dict(do_sample=False, use_cache=True, pad_token_id=0, eos_token_id=None, **kw)
    first = cuda_time(lambda: hf.generate(prompt, max_new_tokens=1, min_new_tokens=1, **kw))
    out = []
    whole = cuda_time(lambda: out.append(hf.generate(prompt, max_new_tokens=new, min_new_tokens=new, **kw)))
    return out[0][0, prompt.size(1):].tolist(), first, whole - first


def decoding(args, bandwidth):
    torch.manual_seed(0)
    base = GPT(ModelConfig.preset("gpt2")).to(DEV).eval()
    prompt = torch.randint(0, 50257, (1, args.prompt), device=DEV)
    ids = prompt[0].tolist()
    max_len = args.prompt + args.new
    for dtype in (torch.float32, torch.bfloat16):
        hf = hf_twin(base.float()).to(DEV, dtype)
        model = base.to(dtype)  # in place: the engines below are built on it and gone before the next dtype
        weight_bytes = model.num_params() * model.wte.weight.element_size()
        ceiling = bandwidth / weight_bytes
        t = time.perf_counter()
        compiled = Engine(model, max_batch=1, max_seq_len=max_len, compile=True)
        compile_s = time.perf_counter() - t
        eager = Engine(model, max_batch=1, max_seq_len=max_len)
        sides = {"lmforge Engine, eager": lambda: _one(run_engine(eager, [ids], args.new)),
                 "lmforge Engine, compile=True (CUDA graphs)": lambda: _one(run_engine(compiled, [ids], args.new)),
                 "HF generate (default: dynamic cache)": lambda: hf_run(hf, prompt, args.new),
                 "HF generate, static cache (compiled by generate)":
                     lambda: hf_run(hf, prompt, args.new, cache_implementation="static")}
        runs = _interleaved(sides, args.repeat)
        ref = runs["lmforge Engine, eager"][0][0]
        print(f"\ndecoding GPT-2 124M, {str(dtype).split('.')[-1]}, batch 1, {args.prompt}-token prompt, {args.new} new, "
              f"greedy; copy bandwidth {bandwidth / 1e12:.2f} TB/s, weights {weight_bytes / 1e6:.0f} MB -> ceiling "
              f"{ceiling:,.0f} tok/s; our compile + capture took {compile_s:.0f} s\n")
        print("| | prefill ms | decode tok/s (median, range) | of the ceiling | ids equal to ours (eager) |\n"
              "|---|---|---|---|---|")
        med = {}
        for name, rs in runs.items():
            decodes = [(args.new - 1) / r[2] for r in rs]
            med[name] = statistics.median(decodes)
            same = agreement(rs[0][0], ref)
            print(f"| {name} | {statistics.median(r[1] for r in rs) * 1e3:.1f} | {med[name]:,.0f} "
                  f"({min(decodes):,.0f}-{max(decodes):,.0f}) | {med[name] / ceiling:.0%} | first {same} |")
        ours = med["lmforge Engine, compile=True (CUDA graphs)"]
        for name in [n for n in sides if n.startswith("HF")]:
            print(f"| ratio compiled lmforge / {name} | | {ours / med[name]:.2f}x | | |")
        graph = compiled._graphs[id(compiled._rows[0])].graph  # the step alone: no sampling, no Python per token
        step = cuda_time(lambda: [graph.replay() for _ in range(200)]) / 200
        print(f"| the captured decode step alone, replayed back to back | | {1 / step:,.0f} | {1 / step / ceiling:.0%} | |")
        del compiled, eager, hf
        torch.cuda.empty_cache()


def batching(args):
    torch.manual_seed(0)
    model = GPT(ModelConfig.preset("gpt2")).to(DEV, torch.bfloat16).eval()
    sizes = [1, 8, 32, 64]
    t = time.perf_counter()
    engine = Engine(model, max_batch=max(sizes), max_seq_len=args.prompt + args.new, compile=True)
    print(f"\ncontinuous batching, bf16, one compiled engine of {max(sizes)} slots (compiling and capturing took "
          f"{time.perf_counter() - t:.0f} s); each request {args.prompt}-token prompt, {args.new} new\n")
    print("| concurrent requests | aggregate decode tok/s | per request | vs one alone |\n|---|---|---|---|")
    g = torch.Generator().manual_seed(1)
    prompts = [torch.randint(0, 50257, (args.prompt,), generator=g).tolist() for _ in range(max(sizes))]
    run_engine(engine, prompts[:1], 8)  # warm up
    one = None
    for n in sizes:
        rates = [n * (args.new - 1) / run_engine(engine, prompts[:n], args.new)[2] for _ in range(args.repeat)]
        rate = statistics.median(rates)
        one = one or rate
        print(f"| {n} | {rate:,.0f} | {rate / n:,.0f} | {rate / one:.1f}x |")


def quantized(args, bandwidth):
    torch.manual_seed(0)
    model = GPT(ModelConfig.preset("gpt2")).to(DEV).eval()
    prompt = torch.randint(0, 50257, (args.prompt,)).tolist()
    max_len = args.prompt + args.new
    sides = {method: quantize_model(model, method).to(torch.bfloat16) for method in ("int8", "int4")}
    sides = {"bf16": model.to(torch.bfloat16), **sides}  # int8's scales in bf16; int4 keeps float16 ones
    print(f"\nquantized decoding on the GPU, batch 1, {args.prompt}-token prompt, {args.new} new, greedy\n")
    print("| | decode tok/s | MB of weights a token reads | of the ceiling | ids equal to bf16 |\n|---|---|---|---|---|")
    ref = None
    for name, m in sides.items():
        engine = Engine(m, max_batch=1, max_seq_len=max_len, compile=True)
        run_engine(engine, [prompt], 8)
        rs = [run_engine(engine, [prompt], args.new) for _ in range(args.repeat)]
        rate = statistics.median((args.new - 1) / r[2] for r in rs)
        nbytes = sum(t.numel() * t.element_size() for t in list(m.parameters()) + list(m.buffers())
                     if t is not m.wpe.weight)
        ids = rs[0][0][0]
        ref = ref or ids
        same = agreement(ids, ref)
        print(f"| {name} | {rate:,.0f} | {nbytes / 1e6:.0f} | {rate / (bandwidth / nbytes):.0%} | first {same} |")
        del engine


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--parts", default="train,decode,batch,quant")
    ap.add_argument("--steps", type=int, default=20, help="timed training steps of each side")
    ap.add_argument("--batch-size", type=int, default=16)
    ap.add_argument("--new", type=int, default=256)
    ap.add_argument("--prompt", type=int, default=128)
    ap.add_argument("--repeat", type=int, default=3)
    args = ap.parse_args()
    parts = args.parts.split(",")
    bandwidth, peak = measured_peaks()
    print(f"{torch.cuda.get_device_name()}: torch {torch.__version__}; measured copy bandwidth "
          f"{bandwidth / 1e12:.2f} TB/s, bf16 matrix products {peak / 1e12:.0f} TFLOP/s")
    if "train" in parts:
        training(args, peak)
    if "decode" in parts:
        decoding(args, bandwidth)
    if "batch" in parts:
        batching(args)
    if "quant" in parts:
        quantized(args, bandwidth)


if __name__ == "__main__":
    main()
