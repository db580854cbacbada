"""Serving throughput and latency for the GPT-2 124M shape: `lmforge serve` in its own process, driven by 1, 4 and 16
concurrent streaming clients over loopback.

Each client sends its requests one after another (a closed loop): a prompt of --prompt random token ids, --new new
tokens, greedy, streamed. We report aggregate generated tokens/s over the whole run of each concurrency, and time to
first token (from sending the request to its first streamed token) at the median and the 95th percentile. The server
runs with its defaults for this model size (the decode step compiled at startup), --max-batch 16 and --max-seq-len
sized to prompt + new tokens. Clients and server share this machine's cores; the clients are one asyncio loop.

    python benchmarks/serve.py [--prompt 64] [--new 128] [--requests 3] [--clients 1 4 16] [--threads 2]
"""

import argparse
import asyncio
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
    first, tokens = None, 0
    async with http.stream("POST", url + "/v1/completions", json=body) as r:
        assert r.status_code == 200, await r.aread()
        async for line in r.aiter_lines():
            if not line.startswith("data: ") or line == "data: [DONE]":
                continue
            chunk = json.loads(line[6:])
            if chunk["choices"] and first is None:
                first = time.perf_counter() - t0
            if chunk.get("usage"):
                tokens = chunk["usage"]["completion_tokens"]
    return first, tokens, time.perf_counter() - t0


async def load(url: str, clients: int, requests: int, prompt_len: int, new: int, seed: int) -> dict:
    g = torch.Generator().manual_seed(seed)
    prompts = [torch.randint(0, 50257, (prompt_len,), generator=g).tolist() for _ in range(clients * requests)]
    results = []

    async def client(i: int):
        for j in range(requests):
            results.append(await one_request(http, url, prompts[i * requests + j], new))

    async with httpx.AsyncClient(timeout=600, limits=httpx.Limits(max_connections=clients + 4)) as http:
        t0 = time.perf_counter()
        await asyncio.gather(*(client(i) for i in range(clients)))
        wall = time.perf_counter() - t0
    ttft = sorted(r[0] for r in results)
    return {"clients": clients, "requests": len(results), "tokens": sum(r[1] for r in results), "wall_s": wall,
            "tok_s": sum(r[1] for r in results) / wall, "ttft_p50": statistics.median(ttft),
            "ttft_p95": ttft[min(len(ttft) - 1, round(0.95 * (len(ttft) - 1)))]}


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--prompt", type=int, default=64)
    ap.add_argument("--new", type=int, default=128)
    ap.add_argument("--requests", type=int, default=3, help="requests per client, one after another")
    ap.add_argument("--clients", type=int, nargs="+", default=[1, 4, 16])
    ap.add_argument("--threads", type=int, default=2, help="torch threads of the server")
    ap.add_argument("--max-batch", type=int, default=16)
    ap.add_argument("--compile", default="auto", choices=["auto", "on", "off"])
    args = ap.parse_args()
    root = Path(tempfile.mkdtemp())
    run = make_run(root)
    port = free_port()
    url = f"http://127.0.0.1:{port}"
    log = open(root / "server.log", "w+")
    env = {**os.environ, "OMP_NUM_THREADS": str(args.threads)}
    t0 = time.perf_counter()
    server = subprocess.Popen([sys.executable, "-m", "lmforge", "serve", str(run), "--port", str(port),
                               "--max-batch", str(args.max_batch), "--max-seq-len", str(args.prompt + args.new),
                               "--compile", args.compile, "--log-level", "warning"],
                              stdout=log, stderr=subprocess.STDOUT, env=env)
    try:
        while True:
            if server.poll() is not None:
                log.seek(0)
                raise SystemExit("the server exited:\n" + log.read())
            try:
                if httpx.get(url + "/health").status_code == 200:
                    break
            except httpx.TransportError:
                pass
            time.sleep(0.5)
        print(f"server healthy after {time.perf_counter() - t0:.1f} s (load + warm-up); GPT-2 124M shape, fp32, "
              f"{args.threads} threads, --max-batch {args.max_batch}, prompt {args.prompt} tokens, {args.new} new, "
              f"greedy, streamed, {args.requests} requests per client\n")
        asyncio.run(load(url, 1, 1, args.prompt, args.new, seed=99))  # one request first: nothing cold is timed
        rows = [asyncio.run(load(url, c, args.requests, args.prompt, args.new, seed=c)) for c in args.clients]
        steps = httpx.get(url + "/metrics").text
    finally:
        server.terminate()
        server.wait(30)
    base = rows[0]["tok_s"]
    print("| concurrent clients | requests | generated tok/s | vs 1 client | TTFT p50 | TTFT p95 |")
    print("|---|---|---|---|---|---|")
    for r in rows:
        print(f"| {r['clients']} | {r['requests']} | {r['tok_s']:.1f} | {r['tok_s'] / base:.2f}x | "
              f"{r['ttft_p50']:.2f} s | {r['ttft_p95']:.2f} s |")
    metric = {line.split()[0]: float(line.split()[1]) for line in steps.splitlines()
              if line and not line.startswith("#") and "{" not in line}
    print(f"\nmean batch over the run: {metric['lmforge_generation_tokens_total'] / metric['lmforge_engine_steps_total']:.1f}"
          f" tokens per engine step")


if __name__ == "__main__":
    main()
