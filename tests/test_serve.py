"""The server, as clients see it: a real `lmforge serve` process (uvicorn on loopback) driven by the official `openai`
client and by raw HTTP. Texts and logprobs equal the library's own (greedy generate, the model's log-softmax), a
seeded request is batch-invariant, bad requests are 4xx with OpenAI's error body (never a 500), a client that leaves
frees its slot, a full server answers 429, and the playground page streams in a real headless Chromium."""

import json
import math
import os
import shutil
import socket
import subprocess
import sys
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import httpx
import openai
import pytest
import torch

import lmforge
from lmforge import GPT, ModelConfig
from lmforge.checkpoint import run_config, save_checkpoint, weights_for_saving, write_json_atomic
from lmforge.tokenizer import CharTokenizer

KEY = "sk-test-key"
TEXT = ("To be, or not to be, that is the question:\nWhether 'tis nobler in the mind to suffer\n"
        "ABCDEFGHIJKLMNOPQRSTUVWXYZ abcdefghijklmnopqrstuvwxyz 0123456789 .,;:!?'\"-()\n")


def save_run(path: Path, tok, cfg: ModelConfig, seed: int = 0) -> Path:
    """A run folder holding a randomly initialised GPT(cfg) (seeded) and tok, as training leaves one."""
    path.mkdir(parents=True)
    write_json_atomic(path / "config.json", run_config(cfg))
    tok.save(path / "tokenizer.json")
    torch.manual_seed(seed)
    save_checkpoint(path, weights_for_saving(GPT(cfg).state_dict(), True), {"step": 1}, run_config(cfg))
    return path


def make_run(path: Path, seed: int = 0, **model) -> Path:
    tok = CharTokenizer.train(TEXT)
    cfg = ModelConfig.preset("tiny", vocab_size=tok.vocab_size, **{"position": "rope", "block_size": 128, **model})
    path.mkdir(parents=True)
    write_json_atomic(path / "config.json", run_config(cfg))
    tok.save(path / "tokenizer.json")
    torch.manual_seed(seed)
    model = GPT(cfg)
    with torch.no_grad():  # sharper distributions than init gives: greedy paths are not near-ties
        model.wte.weight.mul_(5)
    save_checkpoint(path, weights_for_saving(model.state_dict(), True), {"step": 1}, run_config(cfg))
    return path


def metric_of(text: str, name: str, model: str | None = None) -> float:
    """A sample's value in Prometheus text, summed over its labels (or one model's)."""
    from prometheus_client.parser import text_string_to_metric_families
    return sum(sample.value for family in text_string_to_metric_families(text) for sample in family.samples
               if sample.name == name and model in (None, sample.labels.get("model")))


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class ServerProcess:
    def __init__(self, run: Path, *args: str, more_runs: tuple = ()):
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        env = {**os.environ, "OMP_NUM_THREADS": "1"}
        self.log = open(run.parent / f"server-{self.port}.log", "w+")
        self.proc = subprocess.Popen([sys.executable, "-m", "lmforge", "serve", str(run), *map(str, more_runs),
                                      "--port", str(self.port),
                                      "--log-level", "warning", *args], stdout=self.log, stderr=subprocess.STDOUT,
                                     env=env)
        deadline = time.monotonic() + 90
        while time.monotonic() < deadline:
            assert self.proc.poll() is None, self.output()
            try:
                if httpx.get(self.url + "/health").status_code == 200:
                    return
            except httpx.TransportError:
                pass
            time.sleep(0.2)
        raise AssertionError("the server never became healthy:\n" + self.output())

    def output(self) -> str:
        self.log.seek(0)
        return self.log.read()

    def metric(self, name: str, model: str | None = None) -> float:
        """A sample's value in /metrics, summed over its labels (or one model's)."""
        return metric_of(httpx.get(self.url + "/metrics").text, name, model)

    def stop(self):
        self.proc.terminate()
        try:
            self.proc.wait(15)
        except subprocess.TimeoutExpired:
            self.proc.kill()
        self.log.close()


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    return make_run(tmp_path_factory.mktemp("serve") / "tiny")


@pytest.fixture(scope="module")
def server(run):
    s = ServerProcess(run, "--api-key", KEY, "--max-batch", "16", "--max-queue", "8", "--max-tokens-limit", "100")
    yield s
    s.stop()


@pytest.fixture(scope="module")
def client(server):
    return openai.OpenAI(base_url=server.url + "/v1", api_key=KEY, max_retries=0)


@pytest.fixture(scope="module")
def reference(run):
    return lmforge.load(run)


def test_models_lists_the_run(client):
    models = client.models.list().data
    assert [m.id for m in models] == ["tiny"]


def test_greedy_completion_equals_the_library_and_the_stream_joins_to_it(client, reference):
    model, tok = reference
    want = lmforge.generate(model, tok, "To be", max_new_tokens=20, temperature=0.0)
    got = client.completions.create(model="tiny", prompt="To be", max_tokens=20, temperature=0)
    assert got.choices[0].text == want
    assert got.choices[0].finish_reason in ("length", "stop")
    assert got.usage.prompt_tokens == 5 and got.usage.completion_tokens == got.usage.total_tokens - 5 > 0
    chunks = list(client.completions.create(model="tiny", prompt="To be", max_tokens=20, temperature=0, stream=True,
                                            stream_options={"include_usage": True}))
    assert "".join(c.choices[0].text for c in chunks if c.choices) == want
    assert [c.choices[0].finish_reason for c in chunks if c.choices][-1] == got.choices[0].finish_reason
    assert chunks[-1].choices == [] and chunks[-1].usage.completion_tokens == got.usage.completion_tokens


def test_a_list_of_prompts_and_n_choices(client, reference):
    model, tok = reference
    got = client.completions.create(model="tiny", prompt=["To be", "or not"], max_tokens=8, temperature=0, n=2)
    assert [c.index for c in got.choices] == [0, 1, 2, 3]
    texts = [c.text for c in got.choices]
    assert texts[0] == texts[1] == lmforge.generate(model, tok, "To be", max_new_tokens=8, temperature=0.0)
    assert texts[2] == texts[3] == lmforge.generate(model, tok, "or not", max_new_tokens=8, temperature=0.0)
    ids = tok.encode("To be")
    by_ids = client.completions.create(model="tiny", prompt=ids, max_tokens=8, temperature=0)
    assert by_ids.choices[0].text == texts[0]


def test_seeded_sampling_is_reproducible_and_choices_differ(client):
    kw = dict(model="tiny", prompt="Whether", max_tokens=30, temperature=1.0, seed=7, n=3)
    a = [c.text for c in client.completions.create(**kw).choices]
    b = [c.text for c in client.completions.create(**kw).choices]
    assert a == b and len(set(a)) > 1


def test_stop_strings_and_finish_reasons(client, reference):
    model, tok = reference
    full = lmforge.generate(model, tok, "To be", max_new_tokens=40, temperature=0.0)
    stop = full[5:7]
    got = client.completions.create(model="tiny", prompt="To be", max_tokens=40, temperature=0, stop=[stop])
    assert got.choices[0].text == full[:full.index(stop)] and got.choices[0].finish_reason == "stop"
    short = client.completions.create(model="tiny", prompt="To be", max_tokens=3, temperature=0)
    assert short.choices[0].finish_reason == "length" and short.usage.completion_tokens == 3


def test_logprobs_are_the_models_log_softmax_with_top_alternatives(client, reference):
    model, tok = reference
    got = client.completions.create(model="tiny", prompt="To be", max_tokens=6, temperature=0, logprobs=3)
    lp = got.choices[0].logprobs
    ids = tok.encode("To be") + [tok.encode(t)[0] for t in lp.tokens]
    with torch.no_grad():
        logp = torch.log_softmax(model(torch.tensor([ids]))[0][0].float(), dim=-1)
    for i, token in enumerate(lp.tokens):
        row = logp[len(tok.encode("To be")) - 1 + i]
        assert math.isclose(lp.token_logprobs[i], row[ids[5 + i]].item(), abs_tol=1e-4)
        top = row.topk(3)
        assert list(lp.top_logprobs[i]) == [tok.decode([t]) for t in top.indices.tolist()]
        assert max(lp.top_logprobs[i].values()) == pytest.approx(top.values[0].item(), abs=1e-4)
        assert lp.token_logprobs[i] == pytest.approx(top.values[0].item(), abs=1e-4)  # greedy takes the top one
    assert lp.text_offset == list(range(len(lp.tokens)))


def test_echo_scores_the_prompt_for_evaluation_harnesses(client, reference):
    model, tok = reference
    prompt = "To be, or not to be"
    got = client.completions.create(model="tiny", prompt=prompt, max_tokens=0, echo=True, logprobs=1)
    choice = got.choices[0]
    assert choice.text == prompt and choice.logprobs.tokens == list(prompt)
    ids = tok.encode(prompt)
    with torch.no_grad():
        logp = torch.log_softmax(model(torch.tensor([ids]))[0][0].float(), dim=-1)
    want = logp[:-1].gather(1, torch.tensor(ids[1:])[:, None])[:, 0]
    assert choice.logprobs.token_logprobs[0] is None
    assert choice.logprobs.token_logprobs[1:] == pytest.approx(want.tolist(), abs=1e-4)
    assert got.usage.completion_tokens == 0


def test_chat_uses_the_runs_template_streamed_or_not(client, reference):
    model, tok = reference
    want = lmforge.generate(model, tok, "To be", max_new_tokens=12, temperature=0.0)
    messages = [{"role": "user", "content": "To be"}]
    got = client.chat.completions.create(model="tiny", messages=messages, max_tokens=12, temperature=0,
                                         logprobs=True, top_logprobs=2)
    assert got.choices[0].message.content == want and got.choices[0].message.role == "assistant"
    assert len(got.choices[0].logprobs.content) == got.usage.completion_tokens
    assert all(len(t.top_logprobs) == 2 for t in got.choices[0].logprobs.content)
    chunks = list(client.chat.completions.create(model="tiny", messages=messages, max_tokens=12, temperature=0,
                                                 stream=True))
    assert chunks[0].choices[0].delta.role == "assistant"
    assert "".join(c.choices[0].delta.content or "" for c in chunks) == want
    with_system = [{"role": "system", "content": "To"}] + messages
    got = client.chat.completions.create(model="tiny", messages=with_system, max_tokens=5, temperature=0)
    assert got.usage.prompt_tokens == len("To\n\nTo be")


def test_a_seeded_request_gives_the_same_text_alone_or_beside_15_others(client, server):
    kw = dict(model="tiny", prompt="Whether 'tis", max_tokens=40, temperature=0.9, top_p=0.95, seed=1234)
    alone = client.completions.create(**kw).choices[0].text
    steps, tokens = server.metric("lmforge_engine_steps_total"), server.metric("lmforge_generation_tokens_total")

    def other(i):
        return client.completions.create(model="tiny", prompt="To be, or"[: 2 + i % 7], max_tokens=40,
                                         temperature=1.0, seed=i).choices[0].text
    with ThreadPoolExecutor(16) as pool:
        others = [pool.submit(other, i) for i in range(15)]
        time.sleep(0.05)
        together = pool.submit(lambda: client.completions.create(**kw).choices[0].text)
        assert together.result() == alone
        assert all(isinstance(f.result(), str) for f in others)
    # they ran batched: far fewer engine steps than tokens (each step decodes every running request)
    steps, tokens = server.metric("lmforge_engine_steps_total") - steps, server.metric(
        "lmforge_generation_tokens_total") - tokens
    assert tokens / steps > 4, (tokens, steps)


def test_authentication(server):
    bad = openai.OpenAI(base_url=server.url + "/v1", api_key="wrong", max_retries=0)
    with pytest.raises(openai.AuthenticationError):
        bad.completions.create(model="tiny", prompt="To", max_tokens=2)
    r = httpx.post(server.url + "/v1/completions", json={"model": "tiny", "prompt": "To"})
    assert r.status_code == 401 and r.json()["error"]["code"] == "invalid_api_key"
    assert httpx.get(server.url + "/health").json() == {"status": "ok"}  # health and the page stay open


BAD_REQUESTS = [
    (b'{"model": "tiny", "prompt": "To"', 400, "not valid JSON"),
    (b"[1, 2]", 400, "body"),
    (b"", 400, "body"),
    ({"prompt": "To"}, 400, "model"),
    ({"model": "tiny"}, 400, "prompt"),
    ({"model": "tiny", "prompt": "To", "max_tokens": "5"}, 400, "max_tokens"),
    ({"model": "tiny", "prompt": "To", "max_tokens": 5.5}, 400, "max_tokens"),
    ({"model": "tiny", "prompt": "To", "max_tokens": -1}, 400, "max_tokens"),
    ({"model": "tiny", "prompt": "To", "max_tokens": 101}, 400, "limit of 100"),
    ({"model": "tiny", "prompt": "To", "temperature": "hot"}, 400, "temperature"),
    ({"model": "tiny", "prompt": "To", "temperature": -0.5}, 400, "temperature"),
    ({"model": "tiny", "prompt": "To", "top_p": 0}, 400, "top_p"),
    ({"model": "tiny", "prompt": "To", "top_k": 0}, 400, "top_k"),
    ({"model": "tiny", "prompt": "To", "n": 0}, 400, "n"),
    ({"model": "tiny", "prompt": "To", "n": 17}, 400, "n"),
    ({"model": "tiny", "prompt": "To", "stream": "yes"}, 400, "stream"),
    ({"model": "tiny", "prompt": "To", "logprobs": 21}, 400, "logprobs"),
    ({"model": "tiny", "prompt": "To", "seed": -1}, 400, "seed"),
    ({"model": "tiny", "prompt": "To", "stop": [""]}, 400, "stop"),
    ({"model": "tiny", "prompt": "To", "stop": 5}, 400, "stop"),
    ({"model": "tiny", "prompt": "To", "best_of": 3}, 400, "best_of"),
    ({"model": "tiny", "prompt": "To", "presence_penalty": 0.5}, 400, "repetition_penalty"),
    ({"model": "tiny", "prompt": "To", "logit_bias": {"5": 1}}, 400, "logit_bias"),
    ({"model": "tiny", "prompt": "To", "frobnicate": 1}, 400, "frobnicate"),
    ({"model": "tiny", "prompt": []}, 400, "empty list"),
    ({"model": "tiny", "prompt": [[]]}, 400, "empty"),
    ({"model": "tiny", "prompt": [1, 2, 9999]}, 400, "outside the vocabulary"),
    ({"model": "tiny", "prompt": [1, "a"]}, 400, "prompt"),
    ({"model": "tiny", "prompt": "To" * 70, "max_tokens": 5}, 400, "positions"),
    ({"model": "tiny", "prompt": "\u00e9t\u00e9"}, 400, "not in the character vocabulary"),
    ({"model": "nope", "prompt": "To"}, 404, "not served here"),
    ({"model": "tiny", "prompt": "To", "repetition_penalty": 1e-300}, 400, "repetition_penalty"),
    ({"model": "tiny", "prompt": "To", "stream_options": {"include_usage": True}}, 400, "stream=true"),
    ({"model": "tiny", "prompt": "T\ud800"}, 400, "invalid Unicode"),
    ({"model": "tiny", "prompt": "To", "stop": ["\udfff"]}, 400, "invalid Unicode"),
    ({"model": "tiny", "prompt": "To", "n": 9, "max_tokens": 2, "stream": True, "seed": 2**63 - 3}, 400, "seed"),
]


@pytest.mark.parametrize("body,status,message", BAD_REQUESTS)
def test_bad_completion_requests_are_4xx_with_an_openai_error_body(server, body, status, message):
    headers = {"Authorization": f"Bearer {KEY}", "Content-Type": "application/json"}
    content = body if isinstance(body, bytes) else json.dumps(body).encode()
    r = httpx.post(server.url + "/v1/completions", content=content, headers=headers)
    assert r.status_code == status, r.text
    error = r.json()["error"]
    assert message in error["message"] and error["type"] == "invalid_request_error"


def test_extreme_but_valid_settings_and_nulls_are_served(client, reference, server):
    model, tok = reference
    greedy = lmforge.generate(model, tok, "To be", max_new_tokens=10, temperature=0.0)
    tiny = client.completions.create(model="tiny", prompt="To be", max_tokens=10, temperature=1e-300, seed=1)
    assert tiny.choices[0].text == greedy  # a vanishing temperature is greedy, never a 500
    r = httpx.post(server.url + "/v1/completions", headers={"Authorization": f"Bearer {KEY}"},
                   json={"model": "tiny", "prompt": "To be", "max_tokens": 10, "temperature": 0, "top_p": None,
                         "seed": None, "stop": None, "logprobs": None})
    assert r.status_code == 200 and r.json()["choices"][0]["text"] == greedy
    assert client.models.retrieve("tiny").id == "tiny"


def test_message_text_never_becomes_a_special_token(server):
    body = {"model": "tiny", "messages": [{"role": "user", "content": "To<|endoftext|>be"}], "max_tokens": 2}
    r = httpx.post(server.url + "/v1/chat/completions", json=body, headers={"Authorization": f"Bearer {KEY}"})
    assert r.status_code == 400 and "'<'" in r.json()["error"]["message"]  # plain text, outside this vocabulary


BAD_CHATS = [
    ({"model": "tiny", "messages": []}, "messages"),
    ({"model": "tiny", "messages": [{"role": "robot", "content": "To"}]}, "role"),
    ({"model": "tiny", "messages": [{"role": "user"}]}, "content"),
    ({"model": "tiny", "messages": [{"role": "user", "content": "To"}], "top_logprobs": 2}, "logprobs"),
    ({"model": "tiny", "messages": "To"}, "messages"),
]


@pytest.mark.parametrize("body,message", BAD_CHATS)
def test_bad_chat_requests_are_400s(server, body, message):
    r = httpx.post(server.url + "/v1/chat/completions", json=body, headers={"Authorization": f"Bearer {KEY}"})
    assert r.status_code == 400 and message in r.json()["error"]["message"], r.text


def test_bodies_over_the_limit_are_413_and_unknown_routes_404(server):
    headers = {"Authorization": f"Bearer {KEY}"}
    r = httpx.post(server.url + "/v1/completions", content=b"x" * (1 << 20 + 1), headers=headers)
    assert r.status_code == 413 and "limit" in r.json()["error"]["message"]

    def chunked():
        for _ in range(20):
            yield b"y" * 65536
    r = httpx.post(server.url + "/v1/completions", content=chunked(), headers=headers)  # no Content-Length
    assert r.status_code == 413
    r = httpx.get(server.url + "/v1/nothing", headers=headers)
    assert r.status_code == 404 and "error" in r.json()
    assert httpx.get(server.url + "/v1/completions", headers=headers).status_code == 405
    assert server.proc.poll() is None and "Traceback" not in server.output()


def test_metrics_count_requests_and_tokens(server, client):
    before = server.metric("lmforge_generation_tokens_total")
    got = client.completions.create(model="tiny", prompt="To", max_tokens=7, temperature=0, stop=None)
    assert server.metric("lmforge_generation_tokens_total") - before == got.usage.completion_tokens
    text = httpx.get(server.url + "/metrics").text
    for name in ("lmforge_requests_running", "lmforge_requests_waiting", "lmforge_time_to_first_token_seconds_bucket",
                 "lmforge_time_per_output_token_seconds_bucket", "lmforge_requests_finished_total"):
        assert name in text


# ------------------------------------------------------------------------------------- a server with one slot

@pytest.fixture(scope="module")
def one_slot(tmp_path_factory):
    # wide enough that 1,000 tokens take seconds, so a request is reliably still running while the test acts
    run = make_run(tmp_path_factory.mktemp("serve1") / "slow", n_layer=4, n_embd=256, n_head=4, block_size=1024)
    s = ServerProcess(run, "--max-batch", "1", "--max-queue", "0")
    yield s
    s.stop()


def _open_stream(url: str, **body):
    client = httpx.Client(timeout=30)
    response = client.send(client.build_request("POST", url + "/v1/completions",
                                                json={"model": "slow", "stream": True, **body}), stream=True)
    return client, response


def test_a_full_server_answers_429_and_a_client_that_leaves_frees_its_slot(one_slot):
    client, stream = _open_stream(one_slot.url, prompt="To be", max_tokens=1000)
    lines = stream.iter_lines()
    assert next(line for line in lines if line.startswith("data:"))  # it is running
    r = httpx.post(one_slot.url + "/v1/completions", json={"model": "slow", "prompt": "To", "max_tokens": 2})
    assert r.status_code == 429 and r.json()["error"]["type"] == "rate_limit_error"
    assert one_slot.metric("lmforge_requests_rejected_total") == 1
    stream.close()
    client.close()
    deadline = time.monotonic() + 5
    while one_slot.metric("lmforge_requests_running") and time.monotonic() < deadline:
        time.sleep(0.02)
    assert one_slot.metric("lmforge_requests_running") == 0
    generated = one_slot.metric("lmforge_generation_tokens_total")
    assert generated < 900  # it stopped when the client left, far from its 1,000 tokens
    r = httpx.post(one_slot.url + "/v1/completions", json={"model": "slow", "prompt": "To", "max_tokens": 2},
                   timeout=30)
    assert r.status_code == 200 and r.json()["usage"]["completion_tokens"] == 2


def test_a_non_streamed_client_that_leaves_is_cancelled_too(one_slot):
    before = one_slot.metric("lmforge_generation_tokens_total")
    with pytest.raises(httpx.ReadTimeout):
        httpx.post(one_slot.url + "/v1/completions", json={"model": "slow", "prompt": "To", "max_tokens": 1000},
                   timeout=0.5)
    deadline = time.monotonic() + 5
    while one_slot.metric("lmforge_requests_running") and time.monotonic() < deadline:
        time.sleep(0.05)
    assert one_slot.metric("lmforge_requests_running") == 0
    assert one_slot.metric("lmforge_generation_tokens_total") - before < 900


# --------------------------------------------------------------------------------------------- in-process parts

def test_health_is_503_until_the_engine_is_warm(run):
    from fastapi.testclient import TestClient

    from lmforge.serve.app import create_app
    app = create_app(run)
    loop = app.state.server.loop
    gate, build = threading.Event(), loop.build
    loop.build = lambda: (gate.wait(30), build())[1]
    with TestClient(app) as http:
        assert http.get("/health").status_code == 503 and http.get("/health").json()["status"] == "loading"
        r = http.post("/v1/completions", json={"model": "tiny", "prompt": "To"})
        assert r.status_code == 503 and "loading" in r.json()["error"]["message"]
        gate.set()
        deadline = time.monotonic() + 30
        while http.get("/health").status_code != 200 and time.monotonic() < deadline:
            time.sleep(0.05)
        assert http.get("/health").json() == {"status": "ok"}
        r = http.post("/v1/completions", json={"model": "tiny", "prompt": "To", "max_tokens": 3})
        assert r.status_code == 200 and r.json()["usage"]["completion_tokens"] == 3


def test_a_failing_step_fails_its_requests_frees_their_slots_and_serving_goes_on(run):
    from fastapi.testclient import TestClient

    from lmforge.serve.app import create_app
    app = create_app(run, max_batch=2, max_queue=0)
    loop = app.state.server.loop
    account, failures = loop._account, []

    def once(*args):  # the bookkeeping after a step breaks, once
        if not failures:
            failures.append(1)
            raise RuntimeError("broken bookkeeping")
        return account(*args)
    loop._account = once
    with TestClient(app) as http:
        deadline = time.monotonic() + 30
        while http.get("/health").status_code != 200 and time.monotonic() < deadline:
            time.sleep(0.05)
        r = http.post("/v1/completions", json={"model": "tiny", "prompt": "To", "max_tokens": 4, "n": 2})
        assert r.status_code == 500 and "broken bookkeeping" in r.json()["error"]["message"]
        assert loop.slots.reserved == loop.slots.granted == 0 and loop.in_flight == 0
        r = http.post("/v1/completions", json={"model": "tiny", "prompt": "To", "max_tokens": 4, "n": 2})
        assert r.status_code == 200 and r.json()["usage"]["completion_tokens"] == 8  # both slots are free again


def test_a_bfloat16_server_serves_the_bfloat16_model(run):
    from fastapi.testclient import TestClient

    from lmforge.serve.app import create_app
    model, tok = lmforge.load(run, dtype="bfloat16")
    want = lmforge.generate(model, tok, "To", max_new_tokens=12, temperature=0)
    with TestClient(create_app(run, dtype="bfloat16")) as http:
        deadline = time.monotonic() + 30
        while http.get("/health").status_code != 200 and time.monotonic() < deadline:
            time.sleep(0.05)
        r = http.post("/v1/completions", json={"model": "tiny", "prompt": "To", "max_tokens": 12, "temperature": 0})
        assert r.json()["choices"][0]["text"] == want
        assert http.app.state.server.loop.engine.model.wte.weight.dtype == torch.bfloat16
    with pytest.raises(lmforge.UserError, match="dtype 'int8'"):
        create_app(run, dtype="int8")


def test_a_run_that_fails_to_load_reports_it_and_the_cli_exits(tmp_path):
    run = make_run(tmp_path / "broken")
    for f in run.rglob("model.safetensors"):
        f.write_bytes(b"not safetensors")
    proc = subprocess.run([sys.executable, "-m", "lmforge", "serve", str(run), "--port", str(free_port())],
                          capture_output=True, text=True, timeout=60)
    assert proc.returncode == 1 and "loading" in proc.stderr and "failed" in proc.stderr
    proc = subprocess.run([sys.executable, "-m", "lmforge", "serve", str(tmp_path / "nowhere")],
                          capture_output=True, text=True, timeout=60)
    assert proc.returncode == 2 and proc.stderr.count("\n") == 1 and "run directory" in proc.stderr


# ------------------------------------------------------------------------------------------ the playground page

def _chromium():
    binary = shutil.which("chromium") or shutil.which("chromium-browser") or shutil.which("google-chrome")
    driver = shutil.which("chromedriver")
    if not binary or not driver:
        pytest.skip("no Chromium and chromedriver here (Debian: apt-get install chromium chromium-driver)")
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service
    options = webdriver.ChromeOptions()
    options.binary_location = binary
    for flag in ("--headless=new", "--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage", "--disable-quic",
                 "--no-first-run", "--disable-background-networking", "--disable-component-update", "--disable-sync"):
        options.add_argument(flag)
    return webdriver.Chrome(service=Service(driver), options=options)


def test_the_playground_streams_text_with_alternatives_on_hover(server):
    from selenium.webdriver.common.action_chains import ActionChains
    from selenium.webdriver.common.by import By
    from selenium.webdriver.support.ui import WebDriverWait
    browser = _chromium()
    try:
        browser.get(server.url + "/")
        browser.find_element(By.ID, "api_key").send_keys(KEY)
        browser.find_element(By.ID, "prompt").send_keys("To be")
        browser.find_element(By.ID, "max_tokens").clear()
        browser.find_element(By.ID, "max_tokens").send_keys("40")
        browser.find_element(By.ID, "generate").click()
        wait = WebDriverWait(browser, 30)
        wait.until(lambda b: "tokens/s" in b.find_element(By.ID, "stats").text)
        wait.until(lambda b: b.find_element(By.ID, "generate").is_enabled())
        output = browser.find_element(By.ID, "output").text
        assert output.startswith("To be") and len(output) > len("To be")
        assert "error" not in browser.find_element(By.ID, "status").get_attribute("class")
        tokens = [t for t in browser.find_elements(By.CSS_SELECTOR, "#output .tok") if t.text.strip()]
        assert tokens
        ActionChains(browser).move_to_element(tokens[0]).perform()
        tip = browser.find_element(By.ID, "tip")
        wait.until(lambda b: tip.is_displayed())
        rows = [r.text for r in tip.find_elements(By.TAG_NAME, "tr")]
        assert "%" in tip.text and len(rows) in (5, 6), rows
        if len(rows) == 6:  # a sampled token outside the top 5 is listed too, as OpenAI's top_logprobs list it
            chosen = tip.text.split('"')[1]
            assert any(r.startswith(f'"{chosen}"') for r in rows), (chosen, rows)
        assert "tiny" in browser.find_element(By.ID, "model").text
    finally:
        browser.quit()
