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
    cfg = ModelConfig.preset("tiny", vocab_size=tok.vocab_size, position="rope", block_size=256, n_layer=6, n_embd=384,
                             n_head=6)
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
        assert time.monotonic() < deadline and not results, (results, server.output())
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
        # a choice still queued when the time is up ends too, and its echoed prompt keeps a logprob per token
        r = httpx.post(server.url + "/v1/completions", timeout=60, json={
            "model": "slow", "prompt": "To be", "max_tokens": 250, "n": 2, "echo": True, "logprobs": 0})
        choices = r.json()["choices"]
        assert [c["finish_reason"] for c in choices] == ["timeout", "timeout"]
        assert choices[1]["text"] == "To be" and choices[1]["logprobs"]["tokens"] == list("To be")
        assert choices[1]["logprobs"]["token_logprobs"] == [None] * 5
        assert server.metric("lmforge_requests_running") + server.metric("lmforge_requests_waiting") == 0
    finally:
        server.stop()


def _log_lines(server) -> list[dict]:
    return [json.loads(line.split("lmforge.serve.requests: ", 1)[1]) for line in server.output().splitlines()
            if "lmforge.serve.requests: " in line]


def test_the_request_log_counts_each_prompt_once_and_marks_clients_that_left(slow_run):
    server = ServerProcess(slow_run, "--max-batch", "1", "--max-queue", "2", "--log-level", "info")
    try:
        r = httpx.post(server.url + "/v1/completions", json={"model": "slow", "prompt": "To be", "max_tokens": 2,
                                                             "n": 3})
        assert r.status_code == 200 and r.json()["usage"]["prompt_tokens"] == 5
        with httpx.stream("POST", server.url + "/v1/completions", timeout=60, json={
                "model": "slow", "prompt": "To", "max_tokens": 250, "temperature": 0, "stream": True}) as stream:
            lines = stream.iter_lines()
            next(lines)  # one event, then a request that finds every slot taken, then the client goes away
            busy = httpx.post(server.url + "/v1/completions", json={"model": "slow", "prompt": "To be",
                                                                    "max_tokens": 2, "n": 3})  # 1 + 3 > 1 + 2
        assert busy.status_code == 429
        deadline = time.monotonic() + 10
        def logged():
            return [line for line in _log_lines(server) if line["path"] == "/v1/completions"]
        while len(logged()) < 3 and time.monotonic() < deadline:
            time.sleep(0.05)
        done, refused, dropped = logged()  # (the dropped stream's line is written when it ends)
        assert done["prompt_tokens"] == 5 and done["completion_tokens"] == 6 and "client_gone" not in done
        assert dropped["client_gone"] is True and dropped["completion_tokens"] < 250
        assert refused["status"] == 429 and refused["model"] == "slow" and refused["prompt_tokens"] == 5
        assert "completion_tokens" not in refused  # it never reached the engine
    finally:
        server.stop()


def test_a_client_that_stalls_is_dropped_and_frees_its_connection(slow_run):
    server = ServerProcess(slow_run, "--max-connections", "1", "--client-timeout", "4")
    try:
        stalled = socket.create_connection(("127.0.0.1", server.port))
        stalled.sendall(b"POST /v1/completions HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
                        b"Content-Length: 100\r\n\r\n{\"model\": ")  # and the rest never comes
        time.sleep(0.3)
        r = httpx.post(server.url + "/v1/completions", json={"model": "slow", "prompt": "To", "max_tokens": 2})
        assert r.status_code == 503  # the stalled request holds the one connection
        stalled.settimeout(10)
        answer = b""
        while chunk := stalled.recv(65536):  # until the server closes the connection
            answer += chunk
        answer = answer.decode()
        assert answer.startswith("HTTP/1.1 408") and "--client-timeout" in answer
        stalled.close()
        r = httpx.post(server.url + "/v1/completions", json={"model": "slow", "prompt": "To", "max_tokens": 2})
        assert r.status_code == 200
        wrong = httpx.get(server.url + "/v1/completions")  # a wrong method says which is right
        assert wrong.status_code == 405 and wrong.headers["allow"] == "POST" and "error" in wrong.json()
    finally:
        server.stop()


def test_a_client_that_never_reads_its_stream_is_cut_off(slow_run):
    """A streamed answer larger than the socket's buffers, to a client that reads nothing: after --client-timeout
    the server cuts the connection (a reset, not a close waiting on the client), cancels the generations, logs the
    request as the client's doing (no server error), and the connection's place goes to the next request."""
    server = ServerProcess(slow_run, "--max-connections", "1", "--client-timeout", "2", "--max-batch", "16",
                           "--log-level", "info")
    try:
        reader = socket.socket()
        reader.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
        reader.connect(("127.0.0.1", server.port))
        body = json.dumps({"model": "slow", "prompt": "To be", "max_tokens": 250, "n": 16, "stream": True,
                           "temperature": 1.0, "logprobs": 20, "echo": True}).encode()
        reader.sendall(b"POST /v1/completions HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
                       b"Content-Length: " + str(len(body)).encode() + b"\r\n\r\n" + body)
        deadline = time.monotonic() + 60
        while "client_gone" not in server.output() and time.monotonic() < deadline:
            time.sleep(0.2)
        r = httpx.post(server.url + "/v1/completions", json={"model": "slow", "prompt": "To", "max_tokens": 2})
        assert r.status_code == 200  # the place is free again
        assert server.metric("lmforge_requests_running") == 0
        reader.settimeout(10)
        with pytest.raises(ConnectionResetError):  # the buffered part can be read, then the reset shows
            while reader.recv(1 << 16):
                pass
        reader.close()
        out = server.output()
        assert "ERROR" not in out and "Traceback" not in out, out[-2000:]
    finally:
        server.stop()


def test_a_client_that_stops_reading_is_dropped_after_the_timeout(slow_run):
    """The answer's next part waits at most client_timeout for the client to take it (here an ASGI send that
    never returns, as a socket whose buffers are full): the request ends, its connection count is given back."""
    import asyncio

    from lmforge.serve.app import Front
    from lmforge.serve.app import create_app
    front = create_app(slow_run, client_timeout=0.2)
    assert isinstance(front, Front)
    app = front.app

    async def scenario():
        async def endless_app(scope, receive, send):
            await send({"type": "http.response.start", "status": 200, "headers": []})
            while True:
                await send({"type": "http.response.body", "body": b"x" * 1024, "more_body": True})
        front.app = endless_app
        sent = []

        async def full_socket(message):
            sent.append(message)
            if len(sent) > 3:
                await asyncio.Event().wait()  # never drains
        scope = {"type": "http", "method": "GET", "path": "/v1/models", "headers": [], "state": {}}
        started = time.monotonic()
        await asyncio.wait_for(front(scope, None, full_socket), 5)
        return time.monotonic() - started
    try:
        took = asyncio.run(scenario())
    finally:
        front.app = app
    assert 0.2 <= took < 2 and front.active == 0


def test_requests_past_the_connection_cap_get_503_in_openais_shape(slow_run):
    """The held request is one whose body is still arriving: it counts against the cap from its headers on, and
    stays held for as long as the test keeps its last byte back, however fast the machine generates."""
    server = ServerProcess(slow_run, "--max-connections", "1", "--max-batch", "1")
    body = json.dumps({"model": "slow", "prompt": "To", "max_tokens": 2}).encode()
    try:
        held = socket.create_connection(("127.0.0.1", server.port))
        held.sendall(b"POST /v1/completions HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
                     b"Content-Length: %d\r\n\r\n" % len(body) + body[:-1])
        deadline = time.monotonic() + 30
        while True:  # (until the server has read the held request's headers)
            r = httpx.post(server.url + "/v1/completions", json={"model": "slow", "prompt": "To", "max_tokens": 2})
            if r.status_code == 503 or time.monotonic() > deadline:
                break
            time.sleep(0.02)
        assert r.status_code == 503 and r.json()["error"]["code"] == "too_many_connections"
        assert r.headers["retry-after"] == "1"
        assert httpx.get(server.url + "/health").status_code == 200  # health is never refused
        held.sendall(body[-1:])
        held.settimeout(60)
        assert held.recv(64).startswith(b"HTTP/1.1 200")
        held.close()
        r = httpx.post(server.url + "/v1/completions", json={"model": "slow", "prompt": "To", "max_tokens": 2})
        assert r.status_code == 200
    finally:
        server.stop()
