"""Serving throughput and latency for the GPT-2 124M shape: `lmforge serve` in its own process, driven by 1, 4 and 16
concurrent streaming clients over loopback.

Each client sends its requests one after another (a closed loop), each on a new connection: a prompt of --prompt
random token ids, --new new tokens, greedy, streamed. We report aggregate generated tokens/s over the whole run of each concurrency, and time to
first token (from sending the request to its first streamed token) at the median and the 95th percentile. The server
runs with its defaults for this model size (the decode step compiled at startup), --max-batch 16 and --max-seq-len
sized to prompt + new tokens. Clients and server share this machine's cores; the clients are one asyncio loop.

With --llama-server PATH (a llama-server binary built from llama.cpp), the same load also runs against llama.cpp's
own server on an f32 GGUF of the same weights, alone afterwards, with 16 parallel slots (-np 16) of the same size and
continuous batching (its default); its greedy text for one prompt is checked against ours first.

    python benchmarks/serve.py [--prompt 64] [--new 128] [--requests 3] [--clients 1 4 16] [--threads 2]
                               [--llama-server PATH]
"""

import argparse
import asyncio
import collections
import json
import os
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import httpx
import torch

from lmforge import GPT, BPETokenizer, ModelConfig
from lmforge.checkpoint import run_config, save_checkpoint, weights_for_saving, write_json_atomic


def make_run(root: Path) -> Path:
    torch.manual_seed(0)
    cfg = ModelConfig.preset("gpt2")
    run = root / "gpt2-random"
    run.mkdir()
    write_json_atomic(run / "config.json", run_config(cfg))
    BPETokenizer.gpt2().save(run / "tokenizer.json")
    save_checkpoint(run, weights_for_saving(GPT(cfg).state_dict(), cfg.tie_embeddings), {"step": 0}, run_config(cfg))
    return run


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


async def one_request(http: httpx.AsyncClient, url: str, prompt: list[int], new: int) -> tuple[float, int, float]:
    """(time to first token, tokens generated, total time) of one streamed request."""
    body = {"model": "gpt2-random", "prompt": prompt, "max_tokens": new, "temperature": 0, "stream": True,
            "stream_options": {"include_usage": True}}
    t0 = time.perf_counter()
    first, tokens, pieces = None, None, 0
    async with http.stream("POST", url + "/v1/completions", json=body) as r:
        assert r.status_code == 200, await r.aread()
        async for line in r.aiter_lines():
            if not line.startswith("data: ") or line == "data: [DONE]":
                continue
            chunk = json.loads(line[6:])
            if chunk["choices"] and first is None:
                first = time.perf_counter() - t0
            pieces += bool(chunk["choices"])
            if chunk.get("usage"):
                tokens = chunk["usage"]["completion_tokens"]
    return first, pieces if tokens is None else tokens, time.perf_counter() - t0


async def load(url: str, clients: int, requests: int, prompt_len: int, new: int, seed: int) -> dict:
    g = torch.Generator().manual_seed(seed)
    prompts = [torch.randint(0, 50257, (prompt_len,), generator=g).tolist() for _ in range(clients * requests)]
    results = []

    async def client(i: int):
        for j in range(requests):
            results.append(await one_request(http, url, prompts[i * requests + j], new))

    # a new connection for every request: the llama-server of llama-cpp-python 0.3.36 closes a kept-alive connection
    # after a streamed response without saying so, and the next request on it failed (the same for both servers)
    limits = httpx.Limits(max_connections=clients + 4, max_keepalive_connections=0)
    async with httpx.AsyncClient(timeout=600, limits=limits) as http:
        t0 = time.perf_counter()
        await asyncio.gather(*(client(i) for i in range(clients)))
        wall = time.perf_counter() - t0
    ttft = sorted(r[0] for r in results)
    return {"clients": clients, "requests": len(results), "tokens": sum(r[1] for r in results), "wall_s": wall,
            "tok_s": sum(r[1] for r in results) / wall, "ttft_p50": statistics.median(ttft),
            "ttft_p95": ttft[min(len(ttft) - 1, round(0.95 * (len(ttft) - 1)))]}


def wait_healthy(proc: subprocess.Popen, url: str, log) -> None:
    while True:
        if proc.poll() is not None:
            log.seek(0)
            raise SystemExit("the server exited:\n" + log.read())
        try:
            if httpx.get(url + "/health").status_code == 200:
                return
        except httpx.TransportError:
            pass
        time.sleep(0.5)


def greedy_text(url: str, prompt: list[int], new: int) -> str:
    body = {"model": "gpt2-random", "prompt": prompt, "max_tokens": new, "temperature": 0}
    return httpx.post(url + "/v1/completions", json=body, timeout=600).json()["choices"][0]["text"]


def measure(url: str, args) -> list[dict]:
    asyncio.run(load(url, 1, 1, args.prompt, args.new, seed=99))  # one request first: nothing cold is timed
    return [asyncio.run(load(url, c, args.requests, args.prompt, args.new, seed=c)) for c in args.clients]


def table(name: str, rows: list[dict]) -> None:
    base = rows[0]["tok_s"]
    print(f"\n{name}\n| concurrent clients | requests | generated tok/s | vs 1 client | TTFT p50 | TTFT p95 |")
    print("|---|---|---|---|---|---|")
    for r in rows:
        print(f"| {r['clients']} | {r['requests']} | {r['tok_s']:.1f} | {r['tok_s'] / base:.2f}x | "
              f"{r['ttft_p50']:.2f} s | {r['ttft_p95']:.2f} s |")


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--prompt", type=int, default=64)
    ap.add_argument("--new", type=int, default=128)
    ap.add_argument("--requests", type=int, default=3, help="requests per client, one after another")
    ap.add_argument("--clients", type=int, nargs="+", default=[1, 4, 16])
    ap.add_argument("--threads", type=int, default=2, help="torch threads of the server")
    ap.add_argument("--max-batch", type=int, default=16)
    ap.add_argument("--compile", default="auto", choices=["auto", "on", "off"])
    ap.add_argument("--llama-server", help="a llama-server binary: also measure llama.cpp's server")
    args = ap.parse_args()
    root = Path(tempfile.mkdtemp())
    run = make_run(root)
    check = torch.randint(0, 50257, (args.prompt,), generator=torch.Generator().manual_seed(5)).tolist()
    env = {**os.environ, "OMP_NUM_THREADS": str(args.threads)}
    slots = args.prompt + args.new

    port = free_port()
    url = f"http://127.0.0.1:{port}"
    log = open(root / "server.log", "w+")
    t0 = time.perf_counter()
    server = subprocess.Popen([sys.executable, "-m", "lmforge", "serve", str(run), "--port", str(port),
                               "--max-batch", str(args.max_batch), "--max-seq-len", str(slots),
                               "--compile", args.compile, "--log-level", "warning"],
                              stdout=log, stderr=subprocess.STDOUT, env=env)
    try:
        wait_healthy(server, url, log)
        print(f"lmforge serve healthy after {time.perf_counter() - t0:.1f} s (load + warm-up). GPT-2 124M shape, fp32, "
              f"{args.threads} threads, {args.max_batch} slots, prompt {args.prompt} tokens, {args.new} new, greedy, "
              f"streamed, {args.requests} requests per client")
        ours_text = greedy_text(url, check, 32)
        ours = measure(url, args)
        from prometheus_client.parser import text_string_to_metric_families
        metric = collections.Counter()
        for family in text_string_to_metric_families(httpx.get(url + "/metrics").text):
            for sample in family.samples:
                metric[sample.name] += sample.value
    finally:
        server.terminate()
        server.wait(30)
    table("lmforge serve", ours)
    print(f"mean batch: {metric['lmforge_generation_tokens_total'] / metric['lmforge_engine_steps_total']:.1f} "
          f"tokens per engine step")
    if not args.llama_server:
        return

    sys.path.insert(0, str(Path(__file__).parent))
    from generate import write_gguf  # noqa: E402  (the f32 GGUF writer of the decode benchmark)
    model, tok = __import__("lmforge").load(run)
    gguf_path = root / "gpt2-random-f32.gguf"
    write_gguf(model, tok, gguf_path)
    del model
    port = free_port()
    url = f"http://127.0.0.1:{port}"
    log = open(root / "llama-server.log", "w+")
    t0 = time.perf_counter()
    server = subprocess.Popen([args.llama_server, "-m", str(gguf_path), "--port", str(port), "-np",
                               str(args.max_batch), "-c", str(args.max_batch * slots), "-t", str(args.threads),
                               "-tb", str(args.threads), "--no-webui"], stdout=log, stderr=subprocess.STDOUT)
    try:
        wait_healthy(server, url, log)
        print(f"\nllama-server healthy after {time.perf_counter() - t0:.1f} s")
        theirs_text = greedy_text(url, check, 32)
        print(f"greedy text of one prompt, 32 tokens: {'equal' if theirs_text == ours_text else 'DIFFERENT'}")
        theirs = measure(url, args)
    finally:
        server.terminate()
        server.wait(30)
    table("llama.cpp llama-server", theirs)
    print("\n| concurrent clients | lmforge tok/s | llama.cpp tok/s | ratio |\n|---|---|---|---|")
    for a, b in zip(ours, theirs):
        print(f"| {a['clients']} | {a['tok_s']:.1f} | {b['tok_s']:.1f} | {a['tok_s'] / b['tok_s']:.2f}x |")


if __name__ == "__main__":
    main()
