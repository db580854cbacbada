"""Decode speed for the GPT-2 124M shape on this machine, side by side, interleaved: batch 1, a 128-token prompt,
256 new tokens, greedy, fp32, 2 threads.

    lmforge Engine, eager             Engine(model, max_batch=1)
    lmforge Engine, compiled          Engine(model, max_batch=1, compile=True)
    HF transformers                   GPT2LMHeadModel.generate(use_cache=True), the same weights, in a process of
                                      its own (below)
    llama.cpp                         llama-cpp-python, an f32 GGUF of the same weights (from lmforge's exporter),
                                      driven token by token through Llama.eval (no sampler: greedy is an argmax)

All four hold the same (random) weights, so their greedy ids must agree: the benchmark checks that first. This
process runs lmforge as `lmforge generate` and `lmforge serve` do, with glibc keeping freed memory
(lmforge.cpu.keep_freed_memory(), an opt-in of a program that owns its process). HF runs in a process of its own,
driven turn by turn from this one, so that setting never touches it: each side runs as it would alone. It also
measures the machine's memory read bandwidth: decoding one token reads every weight once, so
bandwidth / weight bytes is the ceiling for tokens/s, and we print the fraction of it each side reaches (bandwidth
measured on 4 KB and on 2 MB pages, the ceiling from the faster: the compiled engine moves its weights onto 2 MB
pages, lmforge/cpu/pages.py; measured in every round of the runs, between the sides, so that it sees the machine as they
did). A prefill is mostly matrix
products: its FLOP/s are printed as a fraction of the fastest float32 matrix product here (MatmulRate: MKL's, oneDNN's
or lmforge's own kernel's), measured the same way. Then continuous batching: 8 requests decoded together by one
compiled engine (max_batch=8), aggregate tokens/s against one request alone. Last, the same weights quantized: our
int8 and int4 (lmforge.quantize) against HF with torch's dynamic int8 quantization and llama.cpp's q8_0 and q4_0,
with file sizes and how long each keeps the fp32 model's greedy tokens.

    python benchmarks/generate.py [--new 256] [--prompt 128] [--repeat 3] [--no-llama] [--no-quantized]
"""

import argparse
import shutil
import statistics
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

from lmforge import GPT, Engine, ModelConfig, Request
from lmforge.gguf import write_gguf
from lmforge.hf import hf_state
from lmforge.cpu import keep_freed_memory
from lmforge.cpu.pages import collapse
from lmforge.quantize import quantize_model, quantized_state


class Bandwidth:
    """Read bandwidth, GB/s, of a 1 GB sum on 4 KB pages (as PyTorch allocates) and on 2 MB pages (as the compiled
    engine puts its weights), each the median of several (a single fastest one on a shared machine overstates).
    Measured once at the start and again in every round of the runs, between the sides: the machine's speed drifts,
    and the ceiling in the tables is the median of the rounds', taken under the conditions the runs saw."""

    def __init__(self, size_mb=1024):
        self.x = torch.ones(size_mb * 1024 * 1024 // 4)
        self.y = torch.ones_like(self.x)
        if collapse([self.y]) < self.y.numel() * 4 * 0.9:
            print("(2 MB pages: the system moved less than 90% of the buffer onto them; measuring it anyway)")
        self.rounds: list[float] = []

    def measure(self, repeat=9) -> dict[str, float]:
        self.x.sum(), self.y.sum()
        times = {"4 KB": [], "2 MB": []}
        for _ in range(repeat):
            times["4 KB"].append(_time(lambda: self.x.sum()))
            times["2 MB"].append(_time(lambda: self.y.sum()))
        return {pages: self.x.numel() * 4 / statistics.median(ts) / 1e9 for pages, ts in times.items()}

    def round(self):
        """One round's measurement (a side of _interleaved): the faster of the two page sizes."""
        self.rounds.append(max(self.measure(repeat=3).values()))

    def ceiling_gbs(self) -> float:
        return statistics.median(self.rounds)


class MatmulRate:
    """The fastest float32 matrix product here, GFLOP/s: the best of torch.mm on 2048 x 2048 matrices (MKL), oneDNN's
    packed linear and lmforge's packed_linear kernel (what the engine's prefill runs with AVX2), both on 1024
    rows x 2048 -> 2048, each the median of several. A prefill is mostly matrix products, so this is its bound as
    decoding's is the read bandwidth. Measured in every round of the runs, like the bandwidth."""

    def __init__(self, n=2048):
        from lmforge.cpu.kernels import cpu_kernels
        self.a, self.b = torch.randn(n, n), torch.randn(n, n)
        self.x = torch.randn(n // 2, n)
        self.ops = cpu_kernels()
        self.products = {
            "MKL mm": (2 * n ** 3, lambda: self.a @ self.b),
            "oneDNN packed": (n ** 3, lambda p=torch.ops.mkldnn._reorder_linear_weight(self.b, n // 2):
                              torch.ops.mkldnn._linear_pointwise(self.x, p, None, "none", [], "")),
        }
        if self.ops is not None:
            self.products["lmforge packed_linear"] = (
                n ** 3, lambda p=self.ops.pack_linear_weight(self.b): self.ops.packed_linear(self.x, p, None, n))
        self.rounds: list[float] = []
        self.best: dict[str, list[float]] = {name: [] for name in self.products}

    def measure(self, repeat=5) -> float:
        times = {name: [] for name in self.products}
        for _ in range(repeat + 1):
            for name, (_, fn) in self.products.items():
                times[name].append(_time(fn))
        rates = {name: flops / statistics.median(times[name][1:]) / 1e9 for name, (flops, _) in self.products.items()}
        for name, rate in rates.items():
            self.best[name].append(rate)
        return max(rates.values())

    def summary(self) -> str:
        return ", ".join(f"{name} {statistics.median(r):.0f}" for name, r in self.best.items())

    def round(self):
        self.rounds.append(self.measure(repeat=3))

    def gflops(self) -> float:
        return statistics.median(self.rounds)


def prefill_flops(model: GPT, T: int) -> float:
    """Multiply-adds x 2 of a T-token prefill: every block's linears for T tokens, causal attention over the T x T
    triangle (scores and weighted sum), and the output layer for the last token only (as every side computes it)."""
    c = model.config
    block_linears = sum(m.weight.numel() for m in model.blocks.modules() if isinstance(m, torch.nn.Linear))
    attention = c.n_layer * c.n_head * 2 * 2 * c.head_dim * T * (T + 1) / 2
    return 2 * T * block_linears + attention + 2 * c.n_embd * c.vocab_size


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
    state = hf_state(model)  # GPT-2's names, Conv1D weights transposed
    missing, unexpected = hf.load_state_dict(state, strict=False)
    assert not unexpected and all("attn.bias" in m or "masked_bias" in m or m == "lm_head.weight" for m in missing), (
        missing, unexpected)
    return hf.eval()


def hf_int8(model: GPT):
    """The HF twin with its Conv1D swapped for nn.Linear (which quantize_dynamic knows), then torch's dynamic int8."""
    from torch.ao.quantization import quantize_dynamic
    from transformers.pytorch_utils import Conv1D
    twin = hf_twin(model)
    for parent in list(twin.modules()):
        for name, child in parent.named_children():
            if isinstance(child, Conv1D):
                linear = torch.nn.Linear(child.weight.shape[0], child.weight.shape[1])
                linear.weight.data, linear.bias.data = child.weight.data.t().contiguous(), child.bias.data
                setattr(parent, name, linear)
    return quantize_dynamic(twin, {torch.nn.Linear}, dtype=torch.qint8)


class HFProcess:
    """HF transformers in a process of its own (spawned: nothing of this one's state), holding our model's weights;
    run(kind, prompt, new) has it generate there, as _hf_generate does, and returns the result. kind: "fp32", or
    "int8" (hf_int8; save_int8(path) writes its state for the file size)."""

    def __init__(self, model: GPT, threads: int):
        import multiprocessing as mp
        self.folder = Path(tempfile.mkdtemp())
        torch.save(model.state_dict(), self.folder / "model.pt")
        self.conn, theirs = mp.get_context("spawn").Pipe()
        self.process = mp.get_context("spawn").Process(target=_hf_worker, daemon=True,
                                                       args=(theirs, str(self.folder / "model.pt"), threads))
        self.process.start()
        theirs.close()  # (so that a worker that dies makes recv() fail rather than wait)
        try:
            self.conn.recv()  # ready: it holds the weights
        finally:
            shutil.rmtree(self.folder, ignore_errors=True)

    def run(self, kind: str, prompt, new: int):
        self.conn.send((kind, prompt, new))
        return self.conn.recv()

    def save_int8(self, path: Path):
        self.conn.send(("save-int8", str(path), 0))
        self.conn.recv()


def _hf_worker(conn, path: str, threads: int):
    torch.set_num_threads(threads)
    model = GPT(ModelConfig.preset("gpt2"))
    model.load_state_dict(torch.load(path))
    models = {"fp32": hf_twin(model)}
    conn.send("ready")
    while True:
        try:
            kind, prompt, new = conn.recv()
        except EOFError:  # the benchmark ended
            return
        if kind in ("int8", "save-int8") and "int8" not in models:
            models["int8"] = hf_int8(model)
        if kind == "save-int8":
            torch.save(models["int8"].state_dict(), prompt)
            conn.send(None)
        else:
            conn.send(_hf_generate(models[kind], prompt, new))


# ---------------------------------------------------------------------------------------------------- the runs

def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--new", type=int, default=256)
    ap.add_argument("--prompt", type=int, default=128)
    ap.add_argument("--repeat", type=int, default=3)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--batch", type=int, default=8, help="concurrent requests for the continuous-batching run")
    ap.add_argument("--no-llama", action="store_true", help="leave llama.cpp out")
    ap.add_argument("--no-quantized", action="store_true", help="leave out the int8/int4 comparison")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    model = GPT(ModelConfig.preset("gpt2")).eval()
    hf = HFProcess(model, args.threads)
    keep_freed_memory()  # as lmforge generate and lmforge serve run (HF's process is apart, started before)
    prompt = torch.randint(0, 50257, (1, args.prompt))
    ids = prompt[0].tolist()
    weight_bytes = model.num_params() * 4
    probe = Bandwidth()
    bandwidths = probe.measure()
    matmul = MatmulRate()
    flops = prefill_flops(model, args.prompt)
    max_len = args.prompt + args.new

    def engine_run(engine: Engine, prompts):
        return run_engine(engine, prompts, args.new)

    eager = Engine(model, max_batch=1, max_seq_len=max_len)
    t = time.perf_counter()
    compiled = Engine(model, max_batch=1, max_seq_len=max_len, compile=True)
    compile_s = time.perf_counter() - t

    def theirs():
        return hf.run("fp32", prompt, args.new)

    llm = None
    if not args.no_llama:
        from llama_cpp import Llama
        from lmforge import BPETokenizer
        gguf_path = Path(tempfile.mkdtemp()) / "gpt2-random-f32.gguf"
        write_gguf(model, BPETokenizer.gpt2(), gguf_path)
        llm = Llama(model_path=str(gguf_path), n_ctx=max_len, n_batch=args.prompt, n_threads=args.threads,
                    n_threads_batch=args.threads, verbose=False)

    def llama():
        return _llama(llm, ids, args.new)

    sides = {"eager": lambda: _one(engine_run(eager, [ids])), "compiled": lambda: _one(engine_run(compiled, [ids])),
             "hf": theirs}
    if llm is not None:
        sides["llama.cpp"] = llama
    runs = _interleaved({**sides, "bandwidth": probe.round, "matmul": matmul.round}, args.repeat)
    del runs["bandwidth"], runs["matmul"]
    bandwidth = probe.ceiling_gbs()
    ceiling = bandwidth * 1e9 / weight_bytes
    for name in sides:
        assert runs[name][0][0] == runs["hf"][0][0], f"{name}: greedy ids differ from HF's on the same weights"
    print(f"greedy ids identical across {', '.join(sides)} ({args.new} tokens); read bandwidth at the start "
          f"{' / '.join(f'{v:.1f} GB/s on {k} pages' for k, v in bandwidths.items())}, in the rounds "
          f"{' / '.join(f'{v:.1f}' for v in probe.rounds)} GB/s (the faster page size), median {bandwidth:.1f}; "
          f"weights {weight_bytes / 1e6:.0f} MB -> ceiling {ceiling:.1f} tok/s; compiling the engine's decode step "
          f"took {compile_s:.0f} s (with inductor's on-disk cache as it was), and it moved "
          f"{compiled.huge_page_bytes / 1e6:.0f} MB onto 2 MB pages; the fastest float32 matrix product ran at "
          f"{' / '.join(f'{v:.0f}' for v in matmul.rounds)} GFLOP/s in the rounds, median {matmul.gflops():.0f} "
          f"(medians: {matmul.summary()}), "
          f"and a {args.prompt}-token prefill is {flops / 1e9:.1f} GFLOP\n")
    labels = {"eager": "lmforge Engine, eager", "compiled": "lmforge Engine, compile=True", "hf": "HF transformers",
              "llama.cpp": "llama.cpp (llama-cpp-python), f32"}
    print("| | prefill tok/s (median) | prefill, of the matmul rate | decode tok/s (median, range) | "
          "of the bandwidth ceiling |\n|---|---|---|---|---|")
    med = {}
    for name, rs in runs.items():
        prefill = statistics.median(args.prompt / r[1] for r in rs)
        decodes = [(args.new - 1) / r[2] for r in rs]
        med[name] = (prefill, statistics.median(decodes))
        of_matmul = flops * prefill / args.prompt / 1e9 / matmul.gflops()
        print(f"| {labels[name]} | {prefill:,.0f} | {of_matmul:.0%} | {med[name][1]:.1f} "
              f"({min(decodes):.1f}-{max(decodes):.1f}) | {med[name][1] / ceiling:.0%} |")
    for name in [n for n in sides if n != "hf"]:
        print(f"| ratio {name} / HF | {med[name][0] / med['hf'][0]:.2f}x | | {med[name][1] / med['hf'][1]:.2f}x | |")
    if llm is not None:
        print(f"| ratio compiled / llama.cpp | {med['compiled'][0] / med['llama.cpp'][0]:.2f}x | | "
              f"{med['compiled'][1] / med['llama.cpp'][1]:.2f}x | |")

    # continuous batching: one compiled engine of args.batch slots, as many requests at once
    torch.manual_seed(1)
    prompts = [torch.randint(0, 50257, (args.prompt,)).tolist() for _ in range(args.batch)]
    batched = Engine(model, max_batch=args.batch, max_seq_len=max_len, compile=True)
    engine_run(batched, prompts[:1])  # warm up
    alone = engine_run(batched, prompts[:1])
    together = []
    for _ in range(args.repeat):
        together.append(engine_run(batched, prompts))
    agg = statistics.median(args.batch * args.new / (r[1] + r[2]) for r in together)
    agg_decode = statistics.median(args.batch * (args.new - 1) / r[2] for r in together)
    one = med["compiled"][1]
    print(f"\ncontinuous batching, {args.batch} requests in one compiled engine of {args.batch} slots:")
    print(f"| | tok/s | vs one request alone (batch-1 engine, {one:.1f} tok/s) |\n|---|---|---|")
    print(f"| aggregate, end to end (prefill included) | {agg:.1f} | {agg / one:.2f}x |")
    print(f"| aggregate, decode phase | {agg_decode:.1f} | {agg_decode / one:.2f}x |")
    print(f"| one request alone in the {args.batch}-slot engine | {(args.new - 1) / alone[2]:.1f} | "
          f"{(args.new - 1) / alone[2] / one:.2f}x |")
    if not args.no_quantized:
        quantized_table(args, model, hf, prompt, engine_run, probe)


def quantized_table(args, model, hf: HFProcess, prompt, engine_run, probe: Bandwidth):
    """int8 and int4: our engine (compiled and eager) against HF + torch's dynamic int8 quantization and llama.cpp's
    q8_0 and q4_0 on GGUF files of the same weights from our exporter; greedy agreement with the fp32 model's ids."""
    ids = prompt[0].tolist()
    max_len = args.prompt + args.new
    folder = Path(tempfile.mkdtemp())
    sizes, sides = {}, {}
    reference = _one(engine_run(Engine(model, max_batch=1, max_seq_len=max_len), [ids]))[0]
    for method in ("int8", "int4"):
        q = quantize_model(model, method)
        from safetensors.torch import save_file
        save_file(quantized_state(q), str(folder / f"{method}.safetensors"))
        sizes[f"ours-{method}"] = (folder / f"{method}.safetensors").stat().st_size
        compiled = Engine(q, max_batch=1, max_seq_len=max_len, compile=True)
        eager = Engine(q, max_batch=1, max_seq_len=max_len)
        sides[f"ours-{method}"] = lambda e=compiled: _one(engine_run(e, [ids]))
        sides[f"ours-{method}-eager"] = lambda e=eager: _one(engine_run(e, [ids]))
        sizes[f"ours-{method}-eager"] = sizes[f"ours-{method}"]
    hf.save_int8(folder / "hf-int8.pt")  # (made in HF's process, hf_int8)
    sizes["hf-int8"] = (folder / "hf-int8.pt").stat().st_size
    sides["hf-int8"] = lambda: hf.run("int8", prompt, args.new)
    if not args.no_llama:
        from llama_cpp import Llama

        from lmforge import BPETokenizer
        for kind in ("q8_0", "q4_0"):
            path = write_gguf(model, BPETokenizer.gpt2(), folder / f"gpt2-random-{kind}.gguf", kind)
            sizes[f"llama.cpp-{kind}"] = path.stat().st_size
            llm = Llama(model_path=str(path), n_ctx=max_len, n_batch=args.prompt, n_threads=args.threads,
                        n_threads_batch=args.threads, verbose=False)
            sides[f"llama.cpp-{kind}"] = lambda llm=llm: _llama(llm, ids, args.new)
    runs = _interleaved(sides, args.repeat)

    def ceiling_of(nbytes):  # the bandwidth measured in the rounds of the first table
        return probe.ceiling_gbs() * 1e9 / nbytes
    labels = {"ours-int8": "lmforge int8, compile=True", "ours-int8-eager": "lmforge int8, eager",
              "ours-int4": "lmforge int4 (group 32), compile=True", "ours-int4-eager": "lmforge int4, eager",
              "hf-int8": "HF + torch quantize_dynamic int8", "llama.cpp-q8_0": "llama.cpp q8_0 (our GGUF export)",
              "llama.cpp-q4_0": "llama.cpp q4_0 (our GGUF export)"}
    print(f"\nquantized, same weights and settings; 'agrees' = greedy tokens equal to the fp32 model's before the "
          f"first difference (of {args.new}); ceilings from the first table's bandwidth, "
          f"{probe.ceiling_gbs():.1f} GB/s:")
    print("| | file MB | prefill tok/s | decode tok/s (median, range) | of its bandwidth ceiling | agrees |\n"
          "|---|---|---|---|---|---|")
    med = {}
    for name, rs in runs.items():
        prefill = statistics.median(args.prompt / r[1] for r in rs)
        decodes = [(args.new - 1) / r[2] for r in rs]
        med[name] = statistics.median(decodes)
        same = agreement(rs[0][0], reference)
        print(f"| {labels[name]} | {sizes[name] / 1e6:.0f} | {prefill:,.0f} | {med[name]:.1f} "
              f"({min(decodes):.1f}-{max(decodes):.1f}) | {med[name] / ceiling_of(sizes[name]):.0%} | {same} |")
    for ours, theirs in (("ours-int8", "llama.cpp-q8_0"), ("ours-int4", "llama.cpp-q4_0"), ("ours-int8", "hf-int8")):
        if theirs in med:
            print(f"| ratio {ours} / {theirs} | | | {med[ours] / med[theirs]:.2f}x | | |")


def run_engine(engine: Engine, prompts, new):
    """Greedy requests to the end: (ids of each prompt, seconds to the first token of all, seconds of the rest).
    Each step reads its sampled tokens back, so on a GPU the clock sees the device's work too."""
    rids = [engine.add(Request(p, new, temperature=0.0, stop_at_eos=False)) for p in prompts]
    out = {r: [] for r in rids}
    t0 = time.perf_counter()
    first = True
    while engine.has_work():
        for e in engine.step():
            out[e.request_id].append(e.token)
        if first:
            t1, first = time.perf_counter(), False
    return [out[r] for r in rids], t1 - t0, time.perf_counter() - t1


def _interleaved(sides: dict, repeat: int) -> dict:
    """Each side once to warm up, then `repeat` rounds of all sides in turn, so the machine's drift hits all."""
    for run in sides.values():
        run()
    runs = {name: [] for name in sides}
    for _ in range(repeat):
        for name, run in sides.items():
            runs[name].append(run())
    return runs


@torch.no_grad()
def _hf_generate(hf, prompt, new):
    """Greedy through transformers' generate: (ids, prefill seconds, decode seconds); prefill is a 1-token call."""
    kw = dict(do_sample=False, use_cache=True, pad_token_id=0, eos_token_id=None)
    t0 = time.perf_counter()
    hf.generate(prompt, max_new_tokens=1, min_new_tokens=1, **kw)
    t1 = time.perf_counter()
    out = hf.generate(prompt, max_new_tokens=new, min_new_tokens=new, **kw)
    t2 = time.perf_counter()
    return out[0, prompt.size(1):].tolist(), t1 - t0, (t2 - t1) - (t1 - t0)


def _llama(llm, ids, new):
    """Greedy through llama.cpp, token by token: (ids, prefill seconds, decode seconds)."""
    import llama_cpp

    def next_id() -> int:  # the argmax of the last position's logits, read in place
        logits = llama_cpp.llama_get_logits_ith(llm._ctx.ctx, -1)
        return int(np.argmax(np.ctypeslib.as_array(logits, shape=(llm.n_vocab(),))))
    llm.reset()
    t0 = time.perf_counter()
    llm.eval(ids)
    out = [next_id()]
    t1 = time.perf_counter()
    for _ in range(new - 1):
        llm.eval([out[-1]])
        out.append(next_id())
    return out, t1 - t0, time.perf_counter() - t1


def agreement(ids: list[int], reference: list[int]) -> int:
    """How many tokens of ids equal the reference's before the first difference."""
    return next((i for i, (a, b) in enumerate(zip(ids, reference)) if a != b), len(reference))


def _one(result):
    ids, prefill, decode = result
    return ids[0], prefill, decode


if __name__ == "__main__":
    main()
