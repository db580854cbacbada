"""A soak with faults against a running `lmforge serve`: N clients for M minutes, each sending a mix of completions
and chat, streamed and not, seeded and not; 10% of the streams are dropped by their client after the first chunk,
5% of the requests are malformed. Load comes from httpx's async client, one connection pool per client.

At the end it checks what an operator needs to hold: every slot free (/metrics running = 0 and waiting = 0), every
request answered exactly once (each client checks its own: one status, one finish per choice, a fresh response id,
[DONE] once per stream), seeded requests answered alike every time, malformed ones refused in OpenAI's error shape,
and the server's resident memory grown less than 5% after warm-up. Per window (a minute by default) it prints
requests, p95 time to first token and aggregate tokens/s, so drift shows.

    lmforge serve runs/shakespeare-char --max-batch 16 &
    python benchmarks/soak.py --url http://127.0.0.1:8000 --pid $! [--clients 32] [--minutes 10]
    python benchmarks/soak.py --run runs/shakespeare-char [--clients 32] [--minutes 10]   # serves it (--max-batch 16)
    python benchmarks/soak.py --run runs/shakespeare-char --llama-server PATH   # then the same against llama.cpp's

With --llama-server (a llama-server binary built from llama.cpp's sources), the run is also exported to an f32 GGUF
and served by llama-server with as many parallel slots (-np 16, continuous batching), each server alone, one after
the other, under the same load; its /metrics (llamacpp:requests_processing, llamacpp:requests_deferred) stand for
ours. --fresh-connections opens a connection per request (some llama-server builds close a kept-alive connection
after a stream without saying so); the paired run uses it on both sides.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import random
import statistics
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

import httpx

PROMPTS = ["ROMEO:", "To be, or not", "The king", "What light", "Good morrow", "My lord,", "O, ", "Now is the"]
MALFORMED = [  # (body bytes, what the server must answer)
    (b"{not json", 400), (b'{"model": "M", "prompt": 5}', 400), (b'{"model": "M", "prompt": "x", "bogus": 1}', 400),
    (b'{"model": "M", "prompt": "x", "max_tokens": -1}', 400), (b'[]', 400),
    (b'{"model": "M", "messages": [{"role": "robot", "content": "x"}]}', 400),
]


@dataclass
class Report:
    started: float = field(default_factory=time.monotonic)
    done: list = field(default_factory=list)  # (finished at, ttft or None, completion tokens, kind)
    problems: list = field(default_factory=list)
    ids: set = field(default_factory=set)
    seeded: dict = field(default_factory=dict)  # (route, prompt, seed, max_tokens) -> text
    counts: dict = field(default_factory=dict)
    rss: list = field(default_factory=list)  # (seconds, MB)

    def count(self, what: str):
        self.counts[what] = self.counts.get(what, 0) + 1

    def problem(self, text: str):
        kind = text.split(" ")[0].rstrip(":")
        self.counts["problem: " + kind] = self.counts.get("problem: " + kind, 0) + 1
        if len(self.problems) < 50:
            self.problems.append(text)


def _rss_mb(pid: int) -> float | None:
    try:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024
    except OSError:
        return None
    return None


async def _one(http: httpx.AsyncClient, model: str, rng: random.Random, report: Report):
    roll = rng.random()
    if roll < 0.05:
        body, want = rng.choice(MALFORMED)
        route = "/v1/chat/completions" if b"messages" in body else "/v1/completions"
        r = await http.post(route, content=body.replace(b'"M"', json.dumps(model).encode()),
                            headers={"content-type": "application/json"})
        error = r.json().get("error", {}) if r.headers.get("content-type", "").startswith("application/json") else {}
        if r.status_code != want or not isinstance(error.get("message"), str) or "type" not in error:
            report.problem(f"malformed {body[:40]!r}: {r.status_code} {r.text[:120]}")
        report.count("malformed")
        return
    chat, stream = rng.random() < 0.5, rng.random() < 0.6
    seed = rng.randrange(4) if rng.random() < 0.5 else None
    prompt, max_tokens = rng.choice(PROMPTS), rng.choice([8, 16, 32])
    body = {"model": model, "max_tokens": max_tokens, "temperature": 0.8, "stream": stream}
    if seed is not None:
        body["seed"] = seed
    route = "/v1/chat/completions" if chat else "/v1/completions"
    body.update({"messages": [{"role": "user", "content": prompt}]} if chat else {"prompt": prompt})
    start = time.monotonic()
    drop = stream and rng.random() < 0.10
    if not stream:
        r = await http.post(route, json=body)
        if r.status_code != 200:
            report.problem(f"{route}: {r.status_code} {r.text[:120]}")
            return
        out = r.json()
        text = out["choices"][0]["message"]["content"] if chat else out["choices"][0]["text"]
        _answered(report, out["id"], route, prompt, seed, max_tokens, text, out["choices"][0]["finish_reason"])
        report.done.append((time.monotonic(), None, out["usage"]["completion_tokens"], "plain"))
        return
    async with http.stream("POST", route, json=body) as r:
        if r.status_code != 200:
            report.problem(f"{route} stream: {r.status_code}")
            return
        ttft, pieces, finishes, done, rid, tokens = None, [], [], 0, None, 0
        async for line in r.aiter_lines():
            if not line.startswith("data: "):
                continue
            if line == "data: [DONE]":
                done += 1
                continue
            chunk = json.loads(line[6:])
            if "error" in chunk:
                report.problem(f"stream error: {chunk['error']}")
                continue
            rid = rid or chunk["id"]
            if rid != chunk["id"]:
                report.problem("a stream's chunks carry two ids")
            choice = chunk["choices"][0]
            piece = choice["delta"].get("content", "") if chat else choice["text"]
            if piece:
                ttft = ttft if ttft is not None else time.monotonic() - start
                tokens += 1
                pieces.append(piece)
            if choice["finish_reason"]:
                finishes.append(choice["finish_reason"])
            if drop and pieces:  # this client goes away mid-stream
                report.count("dropped")
                return
    if done != 1 or len(finishes) != 1:
        report.problem(f"a stream ended with {done} [DONE] and finish reasons {finishes}")
    _answered(report, rid, route, prompt, seed, max_tokens, "".join(pieces), finishes[-1] if finishes else None)
    report.done.append((time.monotonic(), ttft, tokens, "stream"))


def _answered(report: Report, rid, route, prompt, seed, max_tokens, text, finish):
    if rid in report.ids:
        report.problem(f"response id {rid} came twice")
    report.ids.add(rid)
    if finish not in ("stop", "length"):
        report.problem(f"finish_reason {finish!r}")
    if seed is not None:
        key = (route, prompt, seed, max_tokens)
        if report.seeded.setdefault(key, text) != text:
            report.problem(f"seeded {key} answered differently")
    report.count("answered")


async def _client(base: str, model: str, seed: int, deadline: float, report: Report, fresh: bool = False):
    rng = random.Random(seed)
    limits = httpx.Limits(max_keepalive_connections=0) if fresh else httpx.Limits()
    async with httpx.AsyncClient(base_url=base, timeout=120, limits=limits) as http:
        while time.monotonic() < deadline:
            try:
                await _one(http, model, rng, report)
            except httpx.HTTPError as e:
                report.problem(f"transport: {type(e).__name__}: {e}")
                await asyncio.sleep(0.1)


async def _watch_rss(pid: int | None, deadline: float, report: Report):
    while pid is not None and time.monotonic() < deadline:
        mb = _rss_mb(pid)
        if mb is not None:
            report.rss.append((time.monotonic() - report.started, mb))
        await asyncio.sleep(1.0)


OURS = {"running": "lmforge_requests_running", "waiting": "lmforge_requests_waiting"}
LLAMA_CPP = {"running": "llamacpp:requests_processing", "waiting": "llamacpp:requests_deferred"}


def soak(base: str, pid: int | None, clients: int = 32, seconds: float = 600, window: float = 60,
         warmup: float = 0.2, seed: int = 0, names: dict = OURS, fresh: bool = False) -> dict:
    """Run the soak against a server at base (its process pid, for memory; names: its /metrics names for running
    and waiting generations); returns the summary for print_summary."""
    model = httpx.get(base + "/v1/models").json()["data"][0]["id"]
    report = Report()
    deadline = report.started + seconds

    async def main():
        await asyncio.gather(_watch_rss(pid, deadline, report),
                             *(_client(base, model, seed * 1000 + i, deadline, report, fresh) for i in range(clients)))
    asyncio.run(main())
    time.sleep(1.0)  # dropped streams are cancelled within a step or two
    metrics = httpx.get(base + "/metrics").text

    def metric(name):  # summed over the model label
        from prometheus_client.parser import text_string_to_metric_families
        return sum(sample.value for family in text_string_to_metric_families(metrics) for sample in family.samples
                   if sample.name == name)
    rows = []
    for w in range(int(seconds // window + (seconds % window > 0))):
        lo, hi = report.started + w * window, report.started + min((w + 1) * window, seconds)
        inside = [d for d in report.done if lo <= d[0] < hi]
        ttfts = sorted(d[1] for d in inside if d[1] is not None)
        p95 = ttfts[int(0.95 * (len(ttfts) - 1))] if ttfts else None
        rows.append({"from_s": round(w * window), "requests": len(inside), "p95_ttft_s": p95 and round(p95, 3),
                     "tokens_per_s": round(sum(d[2] for d in inside) / (hi - lo), 1)})
    after = [mb for t, mb in report.rss if t >= warmup * seconds]  # memory after warm-up: its last quarter's
    quarter = max(1, len(after) // 4)  # mean against its first quarter's
    growth = statistics.mean(after[-quarter:]) / statistics.mean(after[:quarter]) - 1 if len(after) >= 4 else None
    return {"clients": clients, "seconds": seconds, "windows": rows, "counts": report.counts,
            "problems": report.problems, "running": metric(names["running"]),
            "waiting": metric(names["waiting"]), "rss_mb_start": after[0] if after else None,
            "rss_mb_end": after[-1] if after else None, "rss_growth": growth}


def print_summary(s: dict) -> None:
    print(f"{s['clients']} clients for {s['seconds']:.0f} s: {s['counts']}")
    print("| from (s) | requests | p95 TTFT (s) | tokens/s |\n|---|---|---|---|")
    for r in s["windows"]:
        print(f"| {r['from_s']} | {r['requests']} | {r['p95_ttft_s']} | {r['tokens_per_s']} |")
    growth = "n/a" if s["rss_growth"] is None else f"{s['rss_growth']:+.1%}"
    print(f"after: running {s['running']:.0f}, waiting {s['waiting']:.0f}; RSS {s['rss_mb_start']} -> "
          f"{s['rss_mb_end']} MB after warm-up ({growth}); problems: {len(s['problems'])}")
    for p in s["problems"][:10]:
        print("  ", p)



def _llama_server(binary: str, run: Path, work: Path, slots: int = 16):
    """llama-server over an f32 GGUF export of the run, as many slots as ours; returns (process, url)."""
    import subprocess

    from lmforge.gguf import export_gguf
    from lmforge.runs import load, model_config_of, model_folder, read_run_config
    from lmforge.templates import template_of
    sys.path.insert(0, str(Path(__file__).resolve().parent))
    from serve import free_port, wait_healthy
    gguf = work / "soak-f32.gguf"
    export_gguf(run, gguf, "f32")
    # chats rendered by the template lmforge serve uses: a run never tuned on conversations exports none, and
    # llama-server's ChatML default holds characters a character vocabulary lacks ("unordered_map::at", a 400)
    template = work / "chat_template.jinja"
    template.write_text(template_of(load(run)[1], read_run_config(run)))
    block = model_config_of(model_folder(run, None), read_run_config(run), run).block_size
    port = free_port()
    log = open(work / "llama-server.log", "w+")
    proc = subprocess.Popen([binary, "-m", str(gguf), "--port", str(port), "-np", str(slots), "-c",
                             str(slots * block), "-t", "2", "-tb", "2", "--no-webui", "--metrics",
                             "--jinja", "--chat-template-file", str(template)],
                            stdout=log, stderr=subprocess.STDOUT)
    url = f"http://127.0.0.1:{port}"
    wait_healthy(proc, url, log)
    return proc, url


def main():
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--url", help="a running server (else --run starts one)")
    p.add_argument("--pid", type=int, help="the server's process id, for its memory")
    p.add_argument("--run", help="a run to serve for the soak (lmforge serve RUN --max-batch 16)")
    p.add_argument("--clients", type=int, default=32)
    p.add_argument("--minutes", type=float, default=10)
    p.add_argument("--window", type=float, default=60, help="seconds per row of the table")
    p.add_argument("--llama-server", help="a llama-server binary: then soak it the same way on the run's GGUF")
    p.add_argument("--fresh-connections", action="store_true", help="a new connection for every request")
    args = p.parse_args()
    if args.llama_server and not args.run:
        p.error("--llama-server needs --run (the run it serves as a GGUF)")
    server = None
    if args.url is None:
        if args.run is None:
            p.error("give --url of a running server, or --run to serve")
        sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))
        from test_serve import ServerProcess  # the suite's: a real `lmforge serve` process, waited for until healthy
        server = ServerProcess(Path(args.run), "--max-batch", "16")
        args.url, args.pid = server.url, server.proc.pid
    try:
        summary = soak(args.url, args.pid, args.clients, args.minutes * 60, args.window,
                       fresh=args.fresh_connections)
    finally:
        if server is not None:
            server.stop()
    print("lmforge serve")
    print_summary(summary)
    print(json.dumps(summary))
    if not args.llama_server:
        return
    import tempfile
    proc, url = _llama_server(args.llama_server, Path(args.run), Path(tempfile.mkdtemp()))
    try:
        theirs = soak(url, proc.pid, args.clients, args.minutes * 60, args.window, names=LLAMA_CPP,
                      fresh=args.fresh_connections)
    finally:
        proc.terminate()
        proc.wait(30)
    print("\nllama.cpp llama-server")
    print_summary(theirs)
    print(json.dumps(theirs))


if __name__ == "__main__":
    main()
