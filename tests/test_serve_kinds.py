"""Every kind of run served by a real `lmforge serve` process, through the `openai` client: a plain run, a LoRA run
(its adapter applied: the same greedy text as its merged run), a merged run, int8 and int4 runs, and an imported
Hugging Face run; each answers completions and chat, streamed and not, as the run answers in process."""

import json
import random
import sys
import time
from pathlib import Path

import pytest

openai = pytest.importorskip("openai")
sys.path.insert(0, str(Path(__file__).parent))
from test_serve import ServerProcess  # noqa: E402

import lmforge  # noqa: E402
from lmforge.cli import main  # noqa: E402

WORDS = ["apple", "river", "stone", "light", "music", "green", "table", "cloud"]


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    root = tmp_path_factory.mktemp("kinds")
    rng = random.Random(0)
    (root / "corpus.txt").write_text(" ".join(rng.choice(WORDS) for _ in range(4000)) + " -> ")
    data = lmforge.data.prepare(str(root / "corpus.txt"), root / "data").path
    lmforge.train(lmforge.TrainConfig(
        data=str(data), out=str(root / "plain"), max_steps=30, block_size=48, batch_size=8, eval_interval=30,
        eval_steps=2, progress=False, sample_tokens=0, lr=3e-3,
        model={"preset": "tiny", "position": "rope", "mlp": "swiglu", "norm": "rmsnorm", "bias": False}))
    pairs = [{"prompt": w + " -> ", "completion": w[::-1]} for w in (rng.choice(WORDS) for _ in range(80))]
    (root / "pairs.jsonl").write_text("".join(json.dumps(p) + "\n" for p in pairs))
    args = ["--max_steps=20", "--eval_interval=20", "--batch_size=8", "--progress=false"]
    assert main(["finetune", str(root / "plain"), "--data", str(root / "pairs.jsonl"), "--out", str(root / "lora"),
                 "--lora-rank", "4", *args]) == 0
    assert main(["merge", str(root / "lora"), "--out", str(root / "merged")]) == 0
    for method in ("int8", "int4"):
        assert main(["quantize", str(root / "plain"), "--method", method, "--out", str(root / method),
                     "--force", "--eval-tokens", "1024"]) == 0
    from test_families import _byte_level_tokenizer, hf_model
    hf_model("llama", root / "hf", shard="10MB")
    lmforge.hf.import_hf(root / "hf", root / "imported", tokenizer=_byte_level_tokenizer(root) / "tokenizer.json")
    return root


@pytest.mark.parametrize("kind", ["plain", "lora", "merged", "int8", "int4", "imported"])
def test_each_run_kind_serves_what_it_generates_in_process(runs, kind):
    run = runs / kind
    model, tok = lmforge.load(run)
    prompt = "apple -> " if kind != "imported" else "the cat"
    want = lmforge.generate(model, tok, prompt, max_new_tokens=8, temperature=0.0)
    server = ServerProcess(run)
    try:
        client = openai.OpenAI(base_url=server.url + "/v1", api_key="none")
        assert [m.id for m in client.models.list()] == [kind]
        got = client.completions.create(model=kind, prompt=prompt, max_tokens=8, temperature=0)
        assert got.choices[0].text == want
        streamed = "".join(c.choices[0].text for c in client.completions.create(
            model=kind, prompt=prompt, max_tokens=8, temperature=0, stream=True))
        assert streamed == got.choices[0].text
        chat = client.chat.completions.create(model=kind, messages=[{"role": "user", "content": prompt}],
                                              max_tokens=8, temperature=0)
        assert chat.choices[0].finish_reason in ("stop", "length") and chat.usage.completion_tokens >= 1
        if kind == "lora":  # the adapter is applied: the merged run's text
            merged_model, _ = lmforge.load(runs / "merged")
            assert got.choices[0].text == lmforge.generate(merged_model, tok, prompt, max_new_tokens=8,
                                                           temperature=0.0)
            plain_model, _ = lmforge.load(runs / "plain")  # and it changes what the base says
            assert got.choices[0].text != lmforge.generate(plain_model, tok, prompt, max_new_tokens=8,
                                                           temperature=0.0)
    finally:
        server.stop()


def test_several_runs_from_one_process_each_its_own_model(runs):
    """`lmforge serve A B C`: each run is its own id in /v1/models, a request goes to the model it names (its text
    is what that run generates alone), an unknown id is a 404 in OpenAI's shape, and /metrics counts per model."""
    kinds = ["plain", "lora", "imported"]
    prompts = {"plain": "apple -> ", "lora": "apple -> ", "imported": "the cat"}
    want = {}
    for kind in kinds:
        model, tok = lmforge.load(runs / kind)
        want[kind] = lmforge.generate(model, tok, prompts[kind], max_new_tokens=8, temperature=0.0)
    assert want["plain"] != want["lora"]  # the routing shows
    server = ServerProcess(runs / kinds[0], "--max-batch", "2", more_runs=[runs / k for k in kinds[1:]])
    try:
        client = openai.OpenAI(base_url=server.url + "/v1", api_key="none", max_retries=0)
        assert [m.id for m in client.models.list()] == kinds
        assert client.models.retrieve("lora").id == "lora"
        from concurrent.futures import ThreadPoolExecutor
        order = kinds * 3  # interleaved across models, more at once than the 2 shared slots

        def ask(kind):
            return client.completions.create(model=kind, prompt=prompts[kind], max_tokens=8, temperature=0)
        with ThreadPoolExecutor(len(order)) as pool:
            answers = list(pool.map(ask, order))
        for kind, answer in zip(order, answers):
            assert answer.model == kind and answer.choices[0].text == want[kind]
        chat = client.chat.completions.create(model="imported", messages=[{"role": "user", "content": "hi"}],
                                              max_tokens=4, temperature=0)
        assert chat.model == "imported" and chat.usage.completion_tokens >= 1
        extra = {"imported": chat.usage.completion_tokens}
        with pytest.raises(openai.NotFoundError) as e:
            client.completions.create(model="nope", prompt="x", max_tokens=2)
        assert e.value.body["code"] == "model_not_found" and "'plain', 'lora', 'imported'" in e.value.body["message"]
        for kind in kinds:
            tokens = sum(a.usage.completion_tokens for k, a in zip(order, answers) if k == kind)
            assert server.metric("lmforge_generation_tokens_total", kind) == tokens + extra.get(kind, 0)
        assert server.metric("lmforge_slots") == 2
        assert server.metric("lmforge_requests_running") == 0
    finally:
        server.stop()


def _healthy(http, seconds: float = 60):
    deadline = time.monotonic() + seconds
    while http.get("/health").status_code != 200:
        assert time.monotonic() < deadline, http.get("/health").json()
        time.sleep(0.05)


def test_the_slots_are_one_bound_over_every_model(runs):
    """Two models served with --max-batch 2: however many requests arrive for both, at most 2 generations decode
    at once in total (each engine alone has 2 slots, so without the shared bound 4 would); with no queue, a third
    request for either model while 2 run is a 429."""
    from concurrent.futures import ThreadPoolExecutor

    from fastapi.testclient import TestClient

    from lmforge.serve.app import create_app
    app = create_app([runs / "plain", runs / "merged"], max_batch=2, max_queue=16)
    served = app.state.served
    with TestClient(app) as http:
        _healthy(http)
        engines = [loop.engine for loop in served.loops]
        most = [0]
        for engine in engines:
            def watched(step=engine.step):
                most[0] = max(most[0], sum(e.num_running for e in engines))
                events = step()
                most[0] = max(most[0], sum(e.num_running for e in engines))
                return events
            engine.step = watched

        def ask(i):
            r = http.post("/v1/completions", json={"model": ["plain", "merged"][i % 2], "prompt": "apple -> ",
                                                   "max_tokens": 20, "temperature": 1.0, "seed": i})
            return r.status_code, r.json()["usage"]["completion_tokens"]
        with ThreadPoolExecutor(12) as pool:
            answers = list(pool.map(ask, range(12)))
        assert all(code == 200 for code, _ in answers)
        assert most[0] == 2  # both slots used, never more, across the two engines
        assert served.slots.reserved == served.slots.granted == 0

    app = create_app([runs / "plain", runs / "merged"], max_batch=2, max_queue=0)
    with TestClient(app) as http:
        _healthy(http)
        gate = __import__("threading").Event()
        for loop in app.state.served.loops:  # the engines wait, so two requests hold both slots
            loop.engine.step = lambda step=loop.engine.step: (gate.wait(30), step())[1]
        with ThreadPoolExecutor(2) as pool:
            held = [pool.submit(http.post, "/v1/completions", json={"model": m, "prompt": "apple", "max_tokens": 3})
                    for m in ("plain", "plain")]
            deadline = time.monotonic() + 30
            while app.state.served.slots.reserved < 2:
                assert time.monotonic() < deadline, "the two requests never arrived"
                time.sleep(0.01)
            refused = http.post("/v1/completions", json={"model": "merged", "prompt": "apple", "max_tokens": 3})
            gate.set()
            assert all(f.result().status_code == 200 for f in held)
        assert refused.status_code == 429 and refused.json()["error"]["code"] == "server_busy"


def test_serving_several_runs_refuses_what_is_ambiguous(runs, tmp_path):
    from lmforge.serve.app import create_app
    with pytest.raises(lmforge.UserError, match="both be served as 'plain'"):
        create_app([runs / "plain", runs / "plain"])
    with pytest.raises(lmforge.UserError, match="1 --model-name for 2 runs"):
        create_app([runs / "plain", runs / "merged"], model_names=["a"])
    with pytest.raises(lmforge.UserError, match="--checkpoint names a folder of one run"):
        create_app([runs / "plain", runs / "merged"], checkpoint="best")
    app = create_app([runs / "plain", runs / "merged"], model_names=["a", "b"])
    assert list(app.state.served.servers) == ["a", "b"]
