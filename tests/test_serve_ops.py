"""The server as an operator runs it: SIGTERM drains (new requests 503 with Retry-After, running ones finish or end
with finish_reason "shutdown", exit 0, the port released), a per-request time limit, a cap on requests handled at
once, and one structured log line per request. Each against a real `lmforge serve` process."""

import json
import signal
import socket
import sys
import threading
import time
from pathlib import Path

import httpx
import pytest
import torch

sys.path.insert(0, str(Path(__file__).parent))
from test_serve import ServerProcess  # noqa: E402

from lmforge import GPT, ModelConfig  # noqa: E402
from lmforge.checkpoint import run_config, save_checkpoint, weights_for_saving, write_json_atomic  # noqa: E402
from lmforge.tokenizer import CharTokenizer  # noqa: E402

TEXT = "To be, or not to be, that is the question: whether 'tis nobler in the mind to suffer\n"


@pytest.fixture(scope="module")
def slow_run(tmp_path_factory):
    """A model wide enough that a long generation takes a while on one thread, which never ends a text early (its
    end-of-text row is zero, so greedy decoding never picks it)."""
    path = tmp_path_factory.mktemp("ops") / "slow"
    tok = CharTokenizer.train(TEXT)
    cfg = ModelConfig.preset("tiny", vocab_size=tok.vocab_size, position="rope", block_size=256, n_layer=4, n_embd=256,
                             n_head=4)
    path.mkdir()
    write_json_atomic(path / "config.json", run_config(cfg))
    tok.save(path / "tokenizer.json")
    torch.manual_seed(0)
    model = GPT(cfg)
    with torch.no_grad():
        model.wte.weight.mul_(5)
        model.wte.weight[tok.eot_id] = -20 * model.wte.weight.mean(0)
    save_checkpoint(path, weights_for_saving(model.state_dict(), True), {"step": 1}, run_config(cfg))
    return path


def _stream(url: str, out: list, max_tokens: int = 200, **extra):
    """A streaming completion; appends (finish_reason, tokens) or the exception."""
    try:
        with httpx.stream("POST", url + "/v1/completions", timeout=120, json={
                "model": "slow", "prompt": "To be", "max_tokens": max_tokens, "temperature": 0, "stream": True,
                **extra}) as r:
            if r.status_code != 200:
                out.append(("status", r.status_code))
                return
            reason, n = None, 0
            for line in r.iter_lines():
                if line.startswith("data: {"):
                    choice = json.loads(line[6:])["choices"][0]
                    n += 1
                    reason = choice["finish_reason"] or reason
            out.append((reason, n))
    except Exception as e:  # noqa: BLE001 - the test reports it
        out.append(("error", repr(e)))


def _in_flight(server: ServerProcess, n: int, **extra) -> tuple[list, list]:
    results = []
    threads = [threading.Thread(target=_stream, args=(server.url, results), kwargs=extra) for _ in range(n)]
    for t in threads:
        t.start()
    deadline = time.monotonic() + 30
    while server.metric("lmforge_requests_running") + server.metric("lmforge_requests_waiting") < n:
        assert time.monotonic() < deadline, server.output()
        time.sleep(0.02)
    return results, threads


def _port_free(port: int) -> bool:
    with socket.socket() as s:
        try:
            s.bind(("127.0.0.1", port))
            return True
        except OSError:
            return False


@pytest.mark.parametrize("drain", ["30", "0"])
def test_sigterm_drains_then_exits_cleanly(slow_run, drain):
    server = ServerProcess(slow_run, "--max-batch", "2", "--drain-seconds", drain)
    try:
        _drain(server, drain)
    finally:
        if server.proc.poll() is None:
            server.proc.kill()
        server.log.close()


def _drain(server: ServerProcess, drain: str):
    results, threads = _in_flight(server, 4)
    server.proc.send_signal(signal.SIGTERM)
    deadline = time.monotonic() + 5
    while True:  # the drain starts at once: new work is refused with a hint to come back
        r = httpx.post(server.url + "/v1/completions", json={"model": "slow", "prompt": "To", "max_tokens": 2})
        if r.status_code == 503 or time.monotonic() > deadline:
            break
        time.sleep(0.01)
    assert r.status_code == 503 and r.headers["retry-after"] and r.json()["error"]["code"] == "shutting_down"
    if drain == "30":  # (with no drain time the port may already be closed)
        assert httpx.get(server.url + "/health").json()["status"] == "draining"
    for t in threads:
        t.join(60)
    assert server.proc.wait(60) == 0, server.output()
    reasons = [reason for reason, _ in results]
    if drain == "30":
        assert reasons == ["length"] * 4, results  # every accepted request completed
    else:
        assert set(reasons) == {"shutdown"}, results  # ended at once, each saying why
    assert _port_free(server.port)


def test_a_request_past_its_time_limit_ends_with_timeout(slow_run):
    server = ServerProcess(slow_run, "--request-timeout", "0.1", "--max-batch", "1", "--log-level", "info")
    try:
        results = []
        _stream(server.url, results, max_tokens=250)
        assert results[0][0] == "timeout" and results[0][1] < 250, results  # (250 tokens take ~0.5 s here)
        r = httpx.post(server.url + "/v1/completions", json={"model": "slow", "prompt": "To", "max_tokens": 3})
        assert r.json()["choices"][0]["finish_reason"] == "length"
        assert server.metric("lmforge_requests_running") == 0
        lines = [json.loads(line.split("lmforge.serve.requests: ", 1)[1]) for line in server.output().splitlines()
                 if "lmforge.serve.requests: " in line]
        generated = [line for line in lines if line["path"] == "/v1/completions"]
        assert [g["finish_reasons"] for g in generated] == [["timeout"], ["length"]]
        assert generated[1]["completion_tokens"] == 3 and generated[1]["prompt_tokens"] == 2
        assert generated[1]["status"] == 200 and generated[1]["id"].startswith("cmpl-") and generated[1]["ttft"] > 0
        assert all("prompt" not in g for g in generated)  # no prompt text unless --log-prompts
    finally:
        server.stop()


def test_requests_past_the_connection_cap_get_503_in_openais_shape(slow_run):
    server = ServerProcess(slow_run, "--max-connections", "1", "--max-batch", "1")
    try:
        results, threads = _in_flight(server, 1)
        r = httpx.post(server.url + "/v1/completions", json={"model": "slow", "prompt": "To", "max_tokens": 2})
        assert r.status_code == 503 and r.json()["error"]["code"] == "too_many_connections"
        assert r.headers["retry-after"] == "1"
        assert httpx.get(server.url + "/health").status_code == 200  # health is never refused
        for t in threads:
            t.join(60)
        r = httpx.post(server.url + "/v1/completions", json={"model": "slow", "prompt": "To", "max_tokens": 2})
        assert r.status_code == 200
    finally:
        server.stop()
