"""Decode speed for the GPT-2 124M shape on this machine, side by side in one process: batch 1, a 128-token prompt,
256 new tokens, greedy, fp32, 2 threads.

    lmforge Engine, eager             Engine(model, max_batch=1)
    lmforge Engine, compiled          Engine(model, max_batch=1, compile=True)
    HF transformers                   GPT2LMHeadModel.generate(use_cache=True), the same weights
    llama.cpp                         llama-cpp-python, an f32 GGUF of the same weights (written here with `gguf`),
                                      driven token by token through Llama.eval (no sampler: greedy is an argmax)

All four hold the same (random) weights, so their greedy ids must agree: the benchmark checks that first. It also
measures the machine's memory read bandwidth: decoding one token reads every weight once, so bandwidth / weight bytes
is the ceiling for tokens/s, and we print the fraction of it each side reaches. Then continuous batching: 8 requests
decoded together by one compiled engine (max_batch=8), aggregate tokens/s against one request alone.

    python benchmarks/generate.py [--new 256] [--prompt 128] [--repeat 3] [--no-llama]
"""

import argparse
import statistics
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

from lmforge import GPT, Engine, ModelConfig, Request
from lmforge.hf import byte_symbols, merge_of, to_hf_state


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
    state = to_hf_state(model.state_dict())  # GPT-2's names, Conv1D weights transposed
    missing, unexpected = hf.load_state_dict(state, strict=False)
    assert not unexpected and all("attn.bias" in m or "masked_bias" in m or m == "lm_head.weight" for m in missing), (
        missing, unexpected)
    return hf.eval()


# ------------------------------------------------------------------------------------------------ llama.cpp's file

def write_gguf(model: GPT, tok, path: Path) -> None:
    """An f32 GGUF (llama.cpp's 'gpt2' architecture) of a GPT-2-shaped model, with GPT-2's tokenizer inside."""
    import gguf
    c = model.config
    w = gguf.GGUFWriter(str(path), "gpt2")
    w.add_context_length(c.block_size)
    w.add_embedding_length(c.n_embd)
    w.add_feed_forward_length(c.hidden_dim)
    w.add_block_count(c.n_layer)
    w.add_head_count(c.n_head)
    w.add_layer_norm_eps(c.norm_eps)
    w.add_file_type(gguf.LlamaFileType.ALL_F32)
    symbols = byte_symbols()
    by_id = {i: t for t, i in tok.ranks.items()}
    w.add_tokenizer_model("gpt2")
    w.add_tokenizer_pre("gpt-2")
    specials = {i: s for s, i in tok.special_tokens.items()}
    names = [specials[i] if i in specials else "".join(symbols[b] for b in by_id[i]) for i in range(tok.vocab_size)]
    w.add_token_list(names)
    w.add_token_types([gguf.TokenType.CONTROL if i in specials else gguf.TokenType.NORMAL
                       for i in range(tok.vocab_size)])
    merges = []
    for token, _ in sorted(((t, i) for t, i in tok.ranks.items() if len(t) > 1), key=lambda x: x[1]):
        a, b = merge_of(tok.ranks, token)
        merges.append("".join(symbols[x] for x in a) + " " + "".join(symbols[x] for x in b))
    w.add_token_merges(merges)
    w.add_bos_token_id(tok.eot_id)
    w.add_eos_token_id(tok.eot_id)
    rename = {"wte.weight": "token_embd.weight", "wpe.weight": "position_embd.weight",
              "norm_f.weight": "output_norm.weight", "norm_f.bias": "output_norm.bias"}
    parts = {"norm_1": "attn_norm", "attn.c_attn": "attn_qkv", "attn.c_proj": "attn_output", "norm_2": "ffn_norm",
             "mlp.c_fc": "ffn_up", "mlp.c_proj": "ffn_down"}
    for name, tensor in model.state_dict().items():
        if name == "lm_head.weight" and c.tie_embeddings:
            continue  # llama.cpp reuses token_embd when there is no output.weight
        if name.startswith("blocks."):
            _, i, rest = name.split(".", 2)
            module, kind = rest.rsplit(".", 1)
            name = f"blk.{i}.{parts[module]}.{kind}"
        else:
            name = rename.get(name, "output.weight" if name == "lm_head.weight" else name)
        w.add_tensor(name, tensor.detach().float().numpy())  # nn.Linear's (out, in) is ggml's {in, out}
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()


# ---------------------------------------------------------------------------------------------------- the runs

def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--new", type=int, default=256)
    ap.add_argument("--prompt", type=int, default=128)
    ap.add_argument("--repeat", type=int, default=3)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--batch", type=int, default=8, help="concurrent requests for the continuous-batching run")
    ap.add_argument("--no-llama", action="store_true", help="leave llama.cpp out")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    model = GPT(ModelConfig.preset("gpt2")).eval()
    hf = hf_twin(model)
    prompt = torch.randint(0, 50257, (1, args.prompt))
    ids = prompt[0].tolist()
    weight_bytes = model.num_params() * 4
    bandwidth = read_bandwidth_gbs()
    ceiling = bandwidth * 1e9 / weight_bytes
    max_len = args.prompt + args.new

    def engine_run(engine: Engine, prompts):
        """(ids of each prompt, time to the first token of all, time of the rest)."""
        rids = [engine.add(Request(p, args.new, temperature=0.0, stop_at_eos=False)) for p in prompts]
        out = {r: [] for r in rids}
        t0 = time.perf_counter()
        first = True
        while engine.has_work():
            for e in engine.step():
                out[e.request_id].append(e.token)
            if first:
                t1, first = time.perf_counter(), False
        return [out[r] for r in rids], t1 - t0, time.perf_counter() - t1

    eager = Engine(model, max_batch=1, max_seq_len=max_len)
    t = time.perf_counter()
    compiled = Engine(model, max_batch=1, max_seq_len=max_len, compile=True)
    compile_s = time.perf_counter() - t

    @torch.no_grad()
    def theirs():
        kw = dict(do_sample=False, use_cache=True, pad_token_id=0, eos_token_id=None)
        t0 = time.perf_counter()
        hf.generate(prompt, max_new_tokens=1, min_new_tokens=1, **kw)
        t1 = time.perf_counter()
        out = hf.generate(prompt, max_new_tokens=args.new, min_new_tokens=args.new, **kw)
        t2 = time.perf_counter()
        return out[0, args.prompt:].tolist(), t1 - t0, (t2 - t1) - (t1 - t0)

    llm = None
    if not args.no_llama:
        from llama_cpp import Llama
        from lmforge import BPETokenizer
        gguf_path = Path(tempfile.mkdtemp()) / "gpt2-random-f32.gguf"
        write_gguf(model, BPETokenizer.gpt2(), gguf_path)
        llm = Llama(model_path=str(gguf_path), n_ctx=max_len, n_batch=args.prompt, n_threads=args.threads,
                    n_threads_batch=args.threads, verbose=False)

    def llama_next() -> int:  # greedy: the argmax of the last position's logits, read in place
        import llama_cpp
        logits = llama_cpp.llama_get_logits_ith(llm._ctx.ctx, -1)
        return int(np.argmax(np.ctypeslib.as_array(logits, shape=(llm.n_vocab(),))))

    def llama():
        llm.reset()
        t0 = time.perf_counter()
        llm.eval(ids)
        out = [llama_next()]
        t1 = time.perf_counter()
        for _ in range(args.new - 1):
            llm.eval([out[-1]])
            out.append(llama_next())
        return out, t1 - t0, time.perf_counter() - t1

    sides = {"eager": lambda: _one(engine_run(eager, [ids])), "compiled": lambda: _one(engine_run(compiled, [ids])),
             "hf": theirs}
    if llm is not None:
        sides["llama.cpp"] = llama
    for run in sides.values():  # warm up
        run()
    runs = {name: [] for name in sides}
    for _ in range(args.repeat):  # interleaved, so noise hits all
        for name, run in sides.items():
            runs[name].append(run())
    for name in sides:
        assert runs[name][0][0] == runs["hf"][0][0], f"{name}: greedy ids differ from HF's on the same weights"
    print(f"greedy ids identical across {', '.join(sides)} ({args.new} tokens); read bandwidth {bandwidth:.1f} GB/s, "
          f"weights {weight_bytes / 1e6:.0f} MB -> ceiling {ceiling:.1f} tok/s; compiling the engine's decode step "
          f"took {compile_s:.0f} s (with inductor's on-disk cache as it was)\n")
    labels = {"eager": "lmforge Engine, eager", "compiled": "lmforge Engine, compile=True", "hf": "HF transformers",
              "llama.cpp": "llama.cpp (llama-cpp-python), f32"}
    print("| | prefill tok/s (median) | decode tok/s (median, range) | of the bandwidth ceiling |\n|---|---|---|---|")
    med = {}
    for name, rs in runs.items():
        prefill = statistics.median(args.prompt / r[1] for r in rs)
        decodes = [(args.new - 1) / r[2] for r in rs]
        med[name] = (prefill, statistics.median(decodes))
        print(f"| {labels[name]} | {prefill:,.0f} | {med[name][1]:.1f} ({min(decodes):.1f}-{max(decodes):.1f}) | "
              f"{med[name][1] / ceiling:.0%} |")
    for name in [n for n in sides if n != "hf"]:
        print(f"| ratio {name} / HF | {med[name][0] / med['hf'][0]:.2f}x | {med[name][1] / med['hf'][1]:.2f}x | |")
    if llm is not None:
        print(f"| ratio compiled / llama.cpp | {med['compiled'][0] / med['llama.cpp'][0]:.2f}x | "
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


def _one(result):
    ids, prefill, decode = result
    return ids[0], prefill, decode


if __name__ == "__main__":
    main()
