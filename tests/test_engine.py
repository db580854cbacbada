"""The inference engine: continuous batching equals each request alone, seeded requests are batch-invariant, the
weights it decodes with are the model's current ones after real optimizer steps, and it never disturbs training."""

import warnings

import pytest
import torch

import lmforge
from lmforge import GPT, Engine, ModelConfig, Request
from lmforge.config import TrainConfig
from lmforge.generation import generate, generate_naive
from lmforge.tokenizer import CharTokenizer
from lmforge.train import make_optimizers

TEXT = "To be, or not to be, that is the question:\nWhether 'tis nobler in the mind to suffer\n" * 8


def tiny_model(position="rope", vocab=60, block=32, seed=0, **kw) -> GPT:
    torch.manual_seed(seed)
    model = GPT(ModelConfig.preset("tiny", vocab_size=vocab, block_size=block, position=position, **kw)).eval()
    with torch.no_grad():  # sharper distributions than init gives, so greedy paths are not near-ties
        model.wte.weight.mul_(5)
    return model


def drain(engine: Engine) -> dict[int, list[int]]:
    out: dict[int, list[int]] = {}
    while engine.has_work():
        for e in engine.step():
            if e.token is not None:
                out.setdefault(e.request_id, []).append(e.token)
    return out


# ------------------------------------------------------------------------------------------ continuous batching

@pytest.mark.parametrize("position", ["learned", "alibi", "rope"])
def test_requests_joining_at_different_steps_equal_each_request_alone(position):
    model = tiny_model(position, n_kv_head=2, block=16)
    engine = Engine(model, max_batch=3, max_seq_len=16 if position == "learned" else 40)
    prompts = [[1, 5, 9], [4, 8, 15, 16, 23, 42, 7, 7, 3], [2], [9, 9, 9, 1], [3, 1, 4, 1, 5]]
    lengths = [20, 6, 25, 12, 9]  # 9 + 25 and 3 + 20 run past block_size=16: learned positions slide
    ids, out = [], {}
    ids.append(engine.add(Request(prompts[0], lengths[0], temperature=0)))
    for _ in range(3):
        for e in engine.step():
            out.setdefault(e.request_id, []).append(e.token)
    ids.append(engine.add(Request(prompts[1], lengths[1], temperature=0)))
    for e in engine.step():
        out.setdefault(e.request_id, []).append(e.token)
    for p, n in zip(prompts[2:], lengths[2:]):  # more requests than slots: the last ones wait for a free slot
        ids.append(engine.add(Request(p, n, temperature=0)))
    assert engine.num_waiting >= 1
    for rid, tokens in drain(engine).items():
        out.setdefault(rid, []).extend(tokens)
    for rid, p, n in zip(ids, prompts, lengths):
        assert out[rid] == generate_naive(model, p, n, temperature=0), rid


@pytest.mark.parametrize("compile", [False, True])
def test_a_seeded_sampled_request_gives_the_same_text_alone_or_batched(compile):
    tok = CharTokenizer.train(TEXT)
    torch.manual_seed(0)
    model = GPT(ModelConfig.preset("tiny", vocab_size=tok.vocab_size, block_size=64)).eval()  # init: flat, varied
    engine = Engine(model, tok, max_batch=4, max_seq_len=64, compile=compile)
    mine = Request(tok.encode("To be"), 30, temperature=1.0, top_p=0.9, seed=5)
    alone = lmforge.generation.run_requests(engine, [mine])[0]
    others = [Request(tok.encode(p), 25, temperature=t, top_k=k, seed=s)
              for p, t, k, s in [("Whe", 1.3, None, 1), ("the q", 0.7, 5, 2), ("o", 1.0, 20, 3)]]
    got: dict[int, list[int]] = {}

    def step():
        for e in engine.step():
            got.setdefault(e.request_id, []).append(e.token)

    first = engine.add(others[0])
    step()
    step()
    rid = engine.add(mine)  # joins mid-way, beside requests with other settings and seeds
    engine.add(others[1])
    step()
    engine.add(others[2])
    while engine.has_work():
        step()
    assert got[rid] == alone and len(set(alone)) > 5
    assert first in got and len(got) == 4
    assert alone != lmforge.generation.run_requests(engine, [Request(mine.prompt, 30, 1.0, top_p=0.9, seed=6)])[0]


def test_cancel_frees_the_slot_at_once():
    model = tiny_model()
    engine = Engine(model, max_batch=1)
    a = engine.add(Request([1, 2, 3], 20, temperature=0))
    engine.step()
    b = engine.add(Request([4, 5], 5, temperature=0))
    engine.step()
    assert engine.num_running == 1 and engine.num_waiting == 1
    assert engine.cancel(a)
    assert engine.num_running == 0 and not engine.cancel(a)
    events = engine.step()  # b takes the freed slot in this very step
    assert [e.request_id for e in events] == [b] and engine.num_running == 1
    c = engine.add(Request([6], 5))
    assert engine.cancel(c) and engine.num_waiting == 0  # a waiting request leaves the queue
    assert drain(engine)[b] == generate_naive(model, [4, 5], 5, temperature=0)[1:]


def test_each_request_stops_on_its_own_terms():
    tok = CharTokenizer.train(TEXT)
    model = tiny_model("rope", vocab=tok.vocab_size, block=64)
    full = generate(model, tok, "To be", max_new_tokens=40, temperature=0)
    stop = full[8:10]
    engine = Engine(model, tok, max_batch=3, max_seq_len=64)
    a = engine.add(Request(tok.encode("To be"), 40, temperature=0, stop=[stop]))
    b = engine.add(Request(tok.encode("To be"), 7, temperature=0))
    c = engine.add(Request(tok.encode("To be"), 0))
    text, reasons = {}, {}
    while engine.has_work():
        for e in engine.step():
            text[e.request_id] = text.get(e.request_id, "") + e.text
            if e.finished:
                reasons[e.request_id] = e.finish_reason
    assert text[a] == full[:full.index(stop)] and reasons[a] == "stop"
    assert text[b] == full[:7] and reasons[b] == "length"
    assert text.get(c, "") == "" and reasons[c] == "length"


@pytest.mark.parametrize("request_kw,message", [
    (dict(prompt=[]), "at least one prompt token"),
    (dict(prompt=[1, 60]), "outside the vocabulary"),
    (dict(prompt=[1], max_new_tokens=40), "need 40 positions"),
    (dict(prompt=[1], stop=["x"]), "give the Engine a tokenizer"),
    (dict(prompt=[1], top_p=0.0), "top_p"),
    (dict(prompt=[1], temperature=-1.0), "temperature"),
    (dict(prompt=[1], temperature=float("nan")), "temperature"),
    (dict(prompt=[1], temperature="0.5"), "temperature"),
    (dict(prompt=[1], top_k=2.5), "top_k"),
    (dict(prompt=[1], repetition_penalty=float("nan")), "repetition_penalty"),
    (dict(prompt=[True, False]), "not a token id"),
    (dict(prompt=[1.0]), "not an integer token id"),
    (dict(prompt=[1], seed=2**64), "seed"),
    (dict(prompt=[1], max_new_tokens=True), "max_new_tokens"),
    (dict(prompt=[1], logprobs=21), "logprobs"),
    (dict(prompt=[1], logprobs=True), "logprobs"),
    (dict(prompt=[1], prompt_logprobs=1), "prompt_logprobs"),
    (dict(prompt=list(range(40)), prompt_logprobs=True, max_new_tokens=0), "one window"),
])
def test_bad_requests_are_refused_at_add_and_the_engine_goes_on(request_kw, message):
    model = tiny_model("rope")
    engine = Engine(model, max_batch=1, max_seq_len=32)
    running = engine.add(Request([1, 2], 8, temperature=0))
    engine.step()
    with pytest.raises(lmforge.UserError, match=message):
        engine.add(Request(**{"max_new_tokens": 5, **request_kw}))
    assert drain(engine)[running] == generate_naive(model, [1, 2], 8, temperature=0)[1:]


def test_numpy_and_tensor_token_ids_are_token_ids():
    import numpy as np
    model = tiny_model("rope")
    prompt = [np.int64(1), torch.tensor(5), 9]
    assert lmforge.generation.decode_ids(model, [prompt], 6, temperature=0)[0] == generate_naive(
        model, [1, 5, 9], 6, temperature=0)


def test_a_stream_on_a_shared_engine_yields_its_own_text_and_ends_when_cancelled():
    tok = CharTokenizer.train(TEXT)
    model = tiny_model("rope", vocab=tok.vocab_size, block=64)
    want = generate(model, tok, "To be", max_new_tokens=10, temperature=0)
    engine = Engine(model, tok, max_batch=2, max_seq_len=64)
    stream = generate(engine, tok, "To be", max_new_tokens=10, temperature=0, stream=True)
    other = engine.add(Request(tok.encode("Whether"), 30, temperature=0))
    assert "".join(stream) == want
    assert other in engine  # the other request goes on
    engine.cancel(other)
    stream = generate(engine, tok, "To be", max_new_tokens=10, temperature=0, stream=True)
    next(stream)
    assert engine.cancel(2)  # ids count up: 0 and 1 above, this stream's request is 2
    assert list(stream) == []  # cancelled elsewhere: the stream ends instead of waiting forever


def test_a_stream_never_iterated_holds_nothing_and_numpy_settings_are_numbers():
    import numpy as np
    tok = CharTokenizer.train(TEXT)
    model = tiny_model("rope", vocab=tok.vocab_size, block=64)
    engine = Engine(model, tok, max_batch=1, max_seq_len=64)
    stream = generate(engine, tok, "To be", max_new_tokens=5, stream=True)
    del stream
    assert not engine.has_work()
    with pytest.raises(lmforge.UserError, match="top_p"):
        generate(engine, tok, "To be", max_new_tokens=5, top_p=2.0, stream=True)  # checked at the call
    got = generate(engine, tok, "To be", max_new_tokens=8, temperature=np.float32(0.7), top_k=np.int64(5), seed=1)
    assert got == generate(engine, tok, "To be", max_new_tokens=8, temperature=0.7, top_k=5, seed=1)


def test_a_failing_generate_leaves_the_engine_idle():
    tok = CharTokenizer.train("abc")
    engine = Engine(tiny_model("rope", vocab=tok.vocab_size), tok, max_batch=2, max_seq_len=32)
    with pytest.raises(lmforge.UserError, match="need 44 positions"):
        generate(engine, tok, ["ab", "abc" * 10], max_new_tokens=15)
    assert not engine.has_work()
    assert isinstance(generate(engine, tok, "ab", max_new_tokens=5), str)


# ------------------------------------------------------------------------------------------------- compilation

def test_the_compiled_step_compiles_once_per_engine():
    from torch._dynamo.utils import counters
    model = tiny_model("alibi", vocab=61, block=128)
    engine = Engine(model, max_batch=5, max_seq_len=128, compile=True)  # compiles now: the warm-up
    graphs = counters["stats"]["unique_graphs"]
    short = lmforge.generation.decode_ids(engine, [[1, 2, 3]], 8, temperature=0)[0]
    long = lmforge.generation.decode_ids(engine, [[5] * 40, [1, 2]], 64, temperature=0)  # the 4-slot bucket
    full = lmforge.generation.decode_ids(engine, [[i + 1, 2] for i in range(5)], 12, temperature=0)  # all 5 slots
    assert counters["stats"]["unique_graphs"] == graphs  # other lengths and batch fill: no new graph
    assert short == generate_naive(model, [1, 2, 3], 8, temperature=0)
    assert long[0] == generate_naive(model, [5] * 40, 64, temperature=0)
    assert full[4] == generate_naive(model, [5, 2], 12, temperature=0)


def test_a_step_that_would_recompile_says_so_and_runs_eagerly():
    model = tiny_model("rope", vocab=62)
    engine = Engine(model, max_batch=1, max_seq_len=32, compile=True)
    engine.cache = model.make_kv_cache(1, 24)  # another shape: the compiled graph's guards fail
    engine._rows, engine.max_seq_len = [engine.cache], 24
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        out = lmforge.generation.decode_ids(engine, [[1, 2, 3]], 10, temperature=0)[0]
    assert any("decodes eagerly" in str(w.message) for w in caught)
    assert out == generate_naive(model, [1, 2, 3], 10, temperature=0)


# ---------------------------------------------------------------------------------- always the current weights

@pytest.mark.parametrize("optimizer", ["adamw", "muon"])
def test_generation_after_each_real_optimizer_step_uses_the_new_weights(optimizer):
    """The trainer's own optimizers (fused AdamW on CPU, Muon) write weights in place without bumping what a cache
    of derived weights could key on: every generation must still see them."""
    tok = CharTokenizer.train(TEXT)
    model = GPT(ModelConfig.preset("tiny", vocab_size=tok.vocab_size, block_size=32))
    cfg = TrainConfig(optimizer=optimizer, lr=3e-2, weight_decay=0.0)
    optimizers = make_optimizers(model, cfg, torch.device("cpu"))
    data = torch.tensor(tok.encode(TEXT[:400]))
    for step in range(4):
        before = model.lm_head.weight.detach().clone()
        model.train()
        x = torch.stack([data[i:i + 32] for i in range(0, 320, 40)])
        y = torch.stack([data[i + 1:i + 33] for i in range(0, 320, 40)])
        _, loss = model(x, y)
        loss.backward()
        for opt in optimizers:
            opt.step()
            opt.zero_grad(set_to_none=True)
        text = generate(model, tok, "To be", max_new_tokens=20, temperature=0)
        model.eval()
        naive = tok.decode(generate_naive(model, tok.encode("To be"), 20, temperature=0, eos_id=tok.eot_id))
        assert text == naive.split("<|endoftext|>")[0], step
        assert not torch.equal(model.lm_head.weight, before)  # the step did write the weights


def test_a_long_lived_engine_decodes_with_new_weights_after_refresh():
    """An engine built once (a server's) derives packed weights when built; refresh() remakes them after training,
    and its greedy ids are the naive path's again, through the one-row and the all-slots steps, and a prefill long
    enough to read the packed copy."""
    tok = CharTokenizer.train(TEXT)
    model = GPT(ModelConfig.preset("tiny", vocab_size=tok.vocab_size, block_size=32))
    engine = Engine(model, tok, max_batch=2, max_seq_len=32)
    (opt,) = make_optimizers(model, TrainConfig(lr=5e-2, weight_decay=0.0), torch.device("cpu"))
    data = torch.tensor(tok.encode(TEXT[:200]))
    for _ in range(3):
        model.train()
        _, loss = model(data[None, :32], data[None, 1:33])
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        model.eval()
        engine.refresh()
        prompts = [tok.encode("To be"), tok.encode(TEXT[:18])]  # (18 rows: past few_row_linear, the packed copy's)
        alone = lmforge.generation.decode_ids(engine, prompts[:1], 12, temperature=0)
        both = lmforge.generation.decode_ids(engine, prompts, 12, temperature=0)
        for p, got in zip(prompts, both):
            assert got == generate_naive(model, p, 12, temperature=0)
        assert alone[0] == both[0]


def test_generating_never_changes_what_backward_computes():
    tok = CharTokenizer.train(TEXT)
    model = tiny_model("rope", vocab=tok.vocab_size, block=64)
    model.train()
    x = torch.randint(0, tok.vocab_size, (2, 12))
    _, loss = model(x, x)
    loss.backward()
    want = {n: p.grad.clone() for n, p in model.named_parameters()}
    model.zero_grad()
    stream = generate(model, tok, "To be", max_new_tokens=10, temperature=0, stream=True)
    next(stream)  # a stream open across the whole forward and backward
    engine = Engine(model, tok, max_batch=2)
    engine.add(Request([1, 2, 3], 5))
    engine.step()  # and an engine mid-request
    _, loss = model(x, x)
    loss.backward()
    for n, p in model.named_parameters():
        assert p.grad is not None and torch.equal(p.grad, want[n]), n
    assert model.training  # the caller's mode is the caller's
    list(stream)


def test_two_interleaved_streams_on_one_model_both_finish_correctly():
    tok = CharTokenizer.train(TEXT)
    model = tiny_model("rope", vocab=tok.vocab_size, block=64)
    want_a = generate(model, tok, "To be", max_new_tokens=25, temperature=0)
    want_b = generate(model, tok, "Whether", max_new_tokens=20, temperature=1.0, seed=3)
    a = generate(model, tok, "To be", max_new_tokens=25, temperature=0, stream=True)
    b = generate(model, tok, "Whether", max_new_tokens=20, temperature=1.0, seed=3, stream=True)
    pieces_a, pieces_b = [], []
    live = [(a, pieces_a), (b, pieces_b)]
    while live:  # one piece from each in turn
        for stream, pieces in list(live):
            piece = next(stream, None)
            if piece is None:
                live.remove((stream, pieces))
            else:
                pieces.append(piece)
    assert "".join(pieces_a) == want_a and "".join(pieces_b) == want_b


def test_samples_written_during_training_equal_the_naive_path(tmp_path):
    from lmforge.runs import load
    from lmforge.data import prepare
    src = tmp_path / "corpus.txt"
    src.write_text(TEXT * 20)
    data = prepare(str(src), tmp_path / "data", tokenizer="char").path
    cfg = TrainConfig(data=str(data), out=str(tmp_path / "run"), model={"preset": "tiny"}, max_steps=9,
                      batch_size=4, block_size=32, eval_interval=3, eval_steps=1, keep_last=5, sample_tokens=24,
                      sample_prompt="To", progress=False, lr=1e-2, seed=4, device="cpu")
    lmforge.train(cfg)
    samples = (tmp_path / "run" / "samples.txt").read_text().split("=== step ")[1:]
    assert len(samples) == 3
    for sample in samples:
        step = int(sample.split(",")[0])
        model, tok = load(tmp_path / "run", checkpoint=str(tmp_path / "run" / "checkpoints" / f"step-{step:06d}"))
        ids = generate_naive(model, tok.encode("To"), 24, temperature=0.8, top_k=200, eos_id=tok.eot_id,
                             generator=torch.Generator().manual_seed(4))
        text = tok.decode([t for t in ids if t != tok.eot_id][:ids.index(tok.eot_id) if tok.eot_id in ids else None])
        assert sample.split("\n", 1)[1].rstrip("\n") == "To" + text, step


@pytest.mark.parametrize("position", ["learned", "rope"])
def test_logprobs_are_the_models_own_distribution_whatever_the_sampling(position):
    model = tiny_model(position)
    engine = Engine(model, max_batch=3, max_seq_len=32)
    prompt = [3, 1, 4, 1, 5, 9, 2, 6]
    rids = [engine.add(Request(prompt, 6, temperature=t, top_k=k, seed=1, logprobs=4, prompt_logprobs=True))
            for t, k in ((0.0, None), (1.3, 5), (0.7, None))]
    events: dict[int, list] = {}
    while engine.has_work():
        for e in engine.step():
            events.setdefault(e.request_id, []).append(e)
    for rid in rids:
        ids = prompt + [e.token for e in events[rid] if e.token is not None]
        with torch.no_grad():
            logp = torch.log_softmax(model(torch.tensor([ids]))[0][0], dim=-1)  # (T, V): the naive reference
        scored = events[rid][0].prompt_logprobs + [e.logprob for e in events[rid] if e.token is not None]
        assert [s.token for s in scored] == ids[1:]
        for pos, s in enumerate(scored):
            assert s.logprob == pytest.approx(logp[pos, ids[pos + 1]].item(), abs=1e-5)
            top = logp[pos].topk(4)
            assert [t for t, _ in s.top] == top.indices.tolist()
            assert [v for _, v in s.top] == pytest.approx(top.values.tolist(), abs=1e-5)


def test_scoring_a_prompt_alone_takes_no_slot():
    model = tiny_model("rope")
    engine = Engine(model, max_batch=1, max_seq_len=32)
    running = engine.add(Request([1, 2], 8, temperature=0))
    engine.step()
    scored = engine.add(Request([5, 6, 7], 0, logprobs=0, prompt_logprobs=True))
    events = [e for e in engine.step() if e.request_id == scored]
    assert events[0].finished and events[0].finish_reason == "length" and events[0].token is None
    with torch.no_grad():
        logp = torch.log_softmax(model(torch.tensor([[5, 6, 7]]))[0][0], dim=-1)
    assert [s.logprob for s in events[0].prompt_logprobs] == pytest.approx([logp[0, 6].item(), logp[1, 7].item()])
    assert all(s.top == [] for s in events[0].prompt_logprobs)
    assert drain(engine)[running] == generate_naive(model, [1, 2], 8, temperature=0)[2:]


def test_running_requests_decode_on_the_smallest_bucket_of_slots_that_holds_them():
    model = tiny_model("rope")
    engine = Engine(model, max_batch=8, max_seq_len=32)
    assert engine._buckets == [4, 8]
    prompts = [[i + 1, 3, 5] for i in range(7)]
    lengths = [3, 12, 5, 9, 14, 2, 10]
    rids = [engine.add(Request(p, n, temperature=0)) for p, n in zip(prompts[:5], lengths)]
    out = {}
    for step in range(30):  # two more join after a few steps, into the slots the short ones leave
        if step == 4:
            rids += [engine.add(Request(p, n, temperature=0)) for p, n in zip(prompts[5:], lengths[5:])]
        for e in engine.step():
            out.setdefault(e.request_id, []).append(e.token)
    assert not engine.has_work()
    for rid, p, n in zip(rids, prompts, lengths):
        assert out[rid] == generate_naive(model, p, n, temperature=0), rid
