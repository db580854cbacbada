"""Every kind of run served by a real `lmforge serve` process, through the `openai` client: a plain run, a LoRA run
(its adapter applied: the same greedy text as its merged run), a merged run, int8 and int4 runs, and an imported
Hugging Face run; each answers completions and chat, streamed and not, as the run answers in process."""

import json
import random
import sys
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
