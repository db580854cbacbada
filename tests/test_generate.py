"""Generation against references: the naive full-forward path, exhaustive search, hand-made distributions."""

import itertools

import pytest
import torch

import lmforge
from lmforge import GPT, ModelConfig
from lmforge.cli import main
from lmforge.engine import TextStream
from lmforge.generation import beam_search, decode_ids, generate, generate_naive
from lmforge.sampling import apply_repetition_penalty, sample_next_token, top_k_mask, top_p_mask
from lmforge.tokenizer import BPETokenizer, CharTokenizer

POSITIONS = ["learned", "sinusoidal", "alibi", "rope", "none"]
TEXT = "To be, or not to be: that is the question. 你好, 世界! Привет 🙂 naïve café.\n" * 4


def tiny_model(position="rope", vocab=60, block=16, **kw) -> GPT:
    torch.manual_seed(0)
    cfg = ModelConfig.preset("tiny", vocab_size=vocab, block_size=block, position=position, **kw)
    model = GPT(cfg).eval()
    with torch.no_grad():  # sharper distributions than init gives, so greedy paths are not near-ties
        model.wte.weight.mul_(5)
    return model


def run(model, prompts, n, **kw):
    return decode_ids(model, prompts, n, **kw)


# ------------------------------------------------------------------------------------------- cache vs naive path

@pytest.mark.parametrize("position", POSITIONS)
def test_greedy_with_cache_equals_naive_path_past_the_context(position):
    model = tiny_model(position)
    prompt = [1, 5, 9, 2, 7]
    fast = run(model, [prompt], 30, temperature=0)[0]  # 35 tokens: twice the block size
    assert fast == generate_naive(model, prompt, 30, temperature=0)


@pytest.mark.parametrize("position", POSITIONS)
def test_batched_rows_equal_each_prompt_alone(position):
    model = tiny_model(position, n_kv_head=2)
    prompts = [[3], [4, 8, 15, 16, 23, 42], [1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11], [7, 7]]
    batched = run(model, prompts, 20, temperature=0)
    for prompt, row in zip(prompts, batched):
        assert row == run(model, [prompt], 20, temperature=0)[0] == generate_naive(model, prompt, 20, temperature=0)


def test_sampling_with_cache_equals_naive_path_for_the_same_seed():
    model = tiny_model("alibi")
    opts = dict(temperature=0.9, top_k=20, top_p=0.9, repetition_penalty=1.3)
    assert run(model, [[1, 2, 3]], 25, seed=7, **opts)[0] == generate_naive(
        model, [1, 2, 3], 25, generator=torch.Generator().manual_seed(7), **opts)


def test_one_cache_for_the_whole_generation(monkeypatch):
    model = tiny_model("rope")
    calls = []
    original = GPT.make_kv_cache
    monkeypatch.setattr(GPT, "make_kv_cache", lambda self, *a, **k: calls.append(a) or original(self, *a, **k))
    run(model, [[1, 2, 3], [4]], 40, temperature=0)
    assert calls == [(2, 42)]  # 2 slots; the longest prompt + 40 new, less the last token (never fed back)


# ---------------------------------------------------------------------------------------------------- sampling

def test_top_k_keeps_the_k_best_and_boundary_ties():
    logits = torch.tensor([[1.0, 3.0, 3.0, 2.0, 0.0]])
    assert top_k_mask(logits, 1).tolist() == [[False, True, True, False, False]]  # a tie for first: both stay
    assert top_k_mask(logits, 2).tolist() == [[False, True, True, False, False]]
    assert top_k_mask(logits, 3).tolist() == [[False, True, True, True, False]]
    assert top_k_mask(logits, 10).all()


def test_top_p_keeps_the_smallest_set_reaching_p_and_boundary_ties():
    logits = torch.tensor([[0.5, 0.25, 0.125, 0.125]]).log()
    assert top_p_mask(logits, 0.5).tolist() == [[True, False, False, False]]
    assert top_p_mask(logits, 0.75).tolist() == [[True, True, False, False]]
    assert top_p_mask(logits, 0.76).tolist() == [[True, True, True, True]]  # 0.125 twice: the tie is kept
    assert top_p_mask(logits, 1.0).all()
    shuffled = logits[:, [2, 0, 3, 1]]
    assert top_p_mask(shuffled, 0.75).tolist() == [[False, True, False, True]]
    assert top_p_mask(shuffled, 5e-324).tolist() == [[False, True, False, False]]  # float32 rounds p to 0: one kept


def test_sampled_tokens_stay_inside_the_kept_set():
    logits = torch.randn(64, 50)
    g = torch.Generator().manual_seed(0)
    for _ in range(20):
        picks = sample_next_token(logits, 1.0, top_k=5, generator=g)
        assert top_k_mask(logits, 5).gather(1, picks[:, None]).all()
        picks = sample_next_token(logits, 1.0, top_p=0.3, generator=g)
        assert top_p_mask(logits, 0.3).gather(1, picks[:, None]).all()


def test_low_temperature_agrees_with_greedy():
    logits = torch.randn(256, 100) * 3
    g = torch.Generator().manual_seed(0)
    assert torch.equal(sample_next_token(logits, 1e-4, generator=g), sample_next_token(logits, 0.0))
    assert torch.equal(sample_next_token(logits, 1.0, top_k=1, generator=g), logits.argmax(-1))


def test_repetition_penalty_follows_ctrl():
    logits = torch.tensor([[2.0, -2.0, 1.0, 0.5]])
    out = apply_repetition_penalty(logits, torch.tensor([[0, 1, 1]]), 2.0)
    assert out.tolist() == [[1.0, -4.0, 1.0, 0.5]]


# -------------------------------------------------------------------------------------------------- beam search

@pytest.mark.parametrize("length_penalty", [0.0, 1.0, 2.0])
def test_beam_search_finds_the_exhaustive_best(length_penalty):
    V, L, eos = 4, 3, 3
    model = tiny_model("rope", vocab=V, block=16)
    with torch.no_grad():
        model.wte.weight.mul_(0.2)  # flatter distributions: a harder search
    prompt = [0, 1]

    def logprob(seq):
        logits, _ = model(torch.tensor([prompt + seq[:-1]]))
        lp = logits[0, len(prompt) - 1:].float().log_softmax(-1)
        return sum(lp[i, t].item() for i, t in enumerate(seq))

    candidates = []
    for n in range(1, L + 1):
        for seq in itertools.product(range(V), repeat=n):
            if eos in seq[:-1] or (n < L and seq[-1] != eos):
                continue  # a finished hypothesis ends at eos or at the length limit
            candidates.append((logprob(list(seq)) / n ** length_penalty, list(seq)))
    best = max(candidates)[1]
    assert beam_search(model, prompt, L, num_beams=V ** L, length_penalty=length_penalty, eos_id=eos) == best


def reference_beam_search(model, prompt, max_new_tokens, num_beams, length_penalty, eos):
    """Plain beam search: a full forward per hypothesis per step, no cache, no early stopping. Each step ranks every
    (hypothesis, token) by summed log-probability, walks the best 2 * num_beams: those ending (end-of-text, or the
    last step) are scored sum / length ** length_penalty, the others fill the num_beams live hypotheses."""
    beams, finished = [([], 0.0)], []
    for step in range(max_new_tokens):
        candidates = []
        for seq, score in beams:
            logits, _ = model(torch.tensor([prompt + seq]))
            logprobs = logits[0, -1].float().log_softmax(-1).tolist()
            candidates += [(score + lp, seq + [token]) for token, lp in enumerate(logprobs)]
        candidates.sort(key=lambda c: -c[0])
        beams = []
        for score, seq in candidates[:2 * num_beams]:
            if seq[-1] == eos or step == max_new_tokens - 1:
                finished.append((score / len(seq) ** length_penalty, seq))
            elif len(beams) < num_beams:
                beams.append((seq, score))
            if len(beams) == num_beams:
                break
        if not beams:
            break
    return max(finished, key=lambda f: f[0])[1]


@pytest.mark.parametrize("num_beams", [2, 3])
@pytest.mark.parametrize("length_penalty", [0.0, 0.5, 1.0, 2.0])
def test_beam_search_equals_a_plain_reference_where_it_prunes(num_beams, length_penalty):
    """num_beams far below the number of sequences (12 ** 7): the cached, early-stopping search keeps exactly the
    hypotheses the plain one keeps."""
    model = tiny_model("rope", vocab=12, block=32, tie_embeddings=False)
    with torch.no_grad():
        model.lm_head.weight.mul_(3.0)  # here beam search and greedy disagree in 12 of these 16 cases
    for prompt in ([1, 2], [3, 4, 5, 6]):
        want = reference_beam_search(model, prompt, 7, num_beams, length_penalty, eos=5)  # 5 is frequent: hypotheses end
        assert beam_search(model, prompt, 7, num_beams, length_penalty, eos_id=5) == want, prompt


def test_one_beam_is_greedy():
    model = tiny_model("learned")
    assert beam_search(model, [1, 2], 10, num_beams=1, eos_id=None) == run(model, [[1, 2]], 10, temperature=0)[0]


# ---------------------------------------------------------------------------------------------------- text API

@pytest.fixture(scope="module")
def bpe_model():
    tok = BPETokenizer.train(TEXT, 300)
    torch.manual_seed(0)
    return GPT(ModelConfig.preset("tiny", vocab_size=tok.vocab_size, position="rope")).eval(), tok


def test_stream_pieces_join_to_the_full_text(bpe_model):
    model, tok = bpe_model
    for seed in range(5):
        full = generate(model, tok, "To be", max_new_tokens=60, temperature=1.5, seed=seed)
        pieces = list(generate(model, tok, "To be", max_new_tokens=60, temperature=1.5, seed=seed, stream=True))
        assert "".join(pieces) == full and len(pieces) > 1


def test_stream_never_splits_a_character():
    stream = TextStream(stop=[])
    text = "a你好🙂é"
    pieces = [stream.feed(bytes([b])) for b in text.encode()] + [stream.feed(b"", final=True)]
    assert "".join(pieces) == text and not any("\ufffd" in p for p in pieces)


def test_seeds_reproduce_and_differ(bpe_model):
    model, tok = bpe_model
    a = generate(model, tok, "To", max_new_tokens=30, temperature=1.0, seed=3)
    assert a == generate(model, tok, "To", max_new_tokens=30, temperature=1.0, seed=3)
    assert a != generate(model, tok, "To", max_new_tokens=30, temperature=1.0, seed=4)


def test_stop_strings_end_the_text_and_are_not_returned(bpe_model):
    model, tok = bpe_model
    full = generate(model, tok, "To be", max_new_tokens=60, temperature=0)
    stop = full[10:13]
    expected = full[:full.index(stop)]
    assert generate(model, tok, "To be", max_new_tokens=60, temperature=0, stop=[stop, "\x00never"]) == expected
    assert "".join(generate(model, tok, "To be", max_new_tokens=60, temperature=0, stop=stop, stream=True)) == expected


def test_end_of_text_stops_generation():
    tok = CharTokenizer.train("ab")
    model = GPT(ModelConfig.preset("tiny", vocab_size=tok.vocab_size, tie_embeddings=False)).eval()
    with torch.no_grad():
        model.lm_head.weight.zero_()
        model.lm_head.weight[tok.eot_id] = 1.0  # logits = sum of the final features: eot wins when positive
        model.norm_f.bias.fill_(1.0)
        model.norm_f.weight.zero_()
    assert generate(model, tok, "ab", max_new_tokens=20, temperature=0) == ""
    assert list(generate(model, tok, "ab", max_new_tokens=20, temperature=0, stream=True)) == []


def test_list_of_prompts_gives_a_list(bpe_model):
    model, tok = bpe_model
    prompts = ["To be", "naïve", "你好"]
    outs = generate(model, tok, prompts, max_new_tokens=15, temperature=0)
    assert outs == [generate(model, tok, p, max_new_tokens=15, temperature=0) for p in prompts]


def test_empty_prompt_starts_after_end_of_text(bpe_model):
    model, tok = bpe_model
    assert isinstance(generate(model, tok, "", max_new_tokens=5, temperature=0), str)


@pytest.mark.parametrize("kwargs,message", [
    (dict(top_p=0.0), r"top_p=0.0 must be in \(0, 1\]"), (dict(top_p=1.5), "top_p"),
    (dict(temperature=-1.0), "temperature=-1.0 must be a finite number >= 0"), (dict(max_new_tokens=-1), "max_new_tokens=-1"),
    (dict(top_k=0), "top_k=0"), (dict(num_beams=0), "num_beams"), (dict(stop=[""]), "stop strings"),
])
def test_bad_settings_raise_value_errors(bpe_model, kwargs, message):
    model, tok = bpe_model
    with pytest.raises(ValueError, match=message):
        generate(model, tok, "x", **{"max_new_tokens": 5, **kwargs})


def test_unknown_characters_with_a_char_tokenizer():
    tok = CharTokenizer.train("abc")
    model = GPT(ModelConfig.preset("tiny", vocab_size=tok.vocab_size))
    with pytest.raises(ValueError, match="character 'z'"):
        generate(model, tok, "abz")


def _eof_at_end(next_line):
    try:
        return next_line()
    except StopIteration:
        raise EOFError from None


def saved_run(folder):
    """A run folder holding an untrained tiny RoPE model and a char tokenizer: (run, tokenizer)."""
    from lmforge.checkpoint import run_config, save_checkpoint, weights_for_saving, write_json_atomic
    tok = CharTokenizer.train(TEXT)
    cfg = ModelConfig.preset("tiny", vocab_size=tok.vocab_size, position="rope")
    model = GPT(cfg)
    run = folder / "run"
    run.mkdir()
    write_json_atomic(run / "config.json", run_config(cfg))
    tok.save(run / "tokenizer.json")
    save_checkpoint(run, weights_for_saving(model.state_dict(), True), {"step": 1}, run_config(cfg))
    return run, tok


def test_generate_cli(tmp_path, capsys, monkeypatch):
    run, tok = saved_run(tmp_path)
    assert main(["generate", str(run), "--prompt", "To be", "--max-new-tokens", "12", "--temperature", "0"]) == 0
    out = capsys.readouterr().out
    assert out == "To be" + generate(lmforge.load(run)[0], tok, "To be", max_new_tokens=12, temperature=0) + "\n"
    assert main(["generate", str(run), "--prompt", "To beQ", "--max-new-tokens", "5"]) == 2
    assert "character 'Q'" in capsys.readouterr().err
    assert main(["generate", str(run), "--top-p", "2", "--max-new-tokens", "5"]) == 2
    import lmforge.generation as generation
    built = []
    class Counted(lmforge.Engine):
        def __init__(self, *args, **kwargs):
            built.append(kwargs)
            super().__init__(*args, **kwargs)

    monkeypatch.setattr(generation, "Engine", Counted)
    assert main(["generate", str(run), "--num-samples", "3", "--seed", "1", "--max-new-tokens", "5"]) == 0
    assert capsys.readouterr().out.count("--- sample") == 3
    assert len(built) == 1  # one engine for every sample (with --compile, one compilation)
    lines = iter(["To be", "To be, or not to be, that is"])
    monkeypatch.setattr("builtins.input", lambda prompt="", _next=lines.__next__: _eof_at_end(_next))
    assert main(["generate", str(run), "--interactive", "--max-new-tokens", "70", "--temperature", "0"]) == 0
    session = capsys.readouterr().out  # RoPE goes past block_size=64: the second, longer line gets a larger engine
    assert session.startswith("To be" + generate(lmforge.load(run)[0], tok, "To be", max_new_tokens=70, temperature=0))
    assert session.count("\n") == 2
    assert main(["generate", str(run), "--prompt", "To be", "--max-new-tokens", "12", "--temperature", "0",
                 "--compile"]) == 0
    assert capsys.readouterr().out == out


def test_a_run_decodes_in_bfloat16(tmp_path, capsys, monkeypatch):
    run, tok = saved_run(tmp_path)
    full, _ = lmforge.load(run)
    half, _ = lmforge.load(run, dtype="bfloat16")
    assert {p.dtype for p in half.parameters()} == {torch.bfloat16}
    x = torch.tensor([tok.encode("To be, or not")])
    with torch.no_grad():
        torch.testing.assert_close(half(x)[0].float(), full(x)[0], atol=0.05, rtol=0.05)  # bf16's rounding
    import lmforge.generation as generation
    built = []
    class Recorded(lmforge.Engine):
        def __init__(self, model, *args, **kwargs):
            built.append(model.wte.weight.dtype)
            super().__init__(model, *args, **kwargs)

    monkeypatch.setattr(generation, "Engine", Recorded)
    assert main(["generate", str(run), "--prompt", "To be", "--max-new-tokens", "12", "--temperature", "0",
                 "--dtype", "bfloat16"]) == 0
    assert built == [torch.bfloat16]  # the CLI decodes the bfloat16 model
    assert capsys.readouterr().out == "To be" + generate(half, tok, "To be", max_new_tokens=12, temperature=0) + "\n"
    with pytest.raises(lmforge.UserError, match="dtype 'int8' is not one of float32, bfloat16, float16"):
        lmforge.load(run, dtype="int8")


NO_ONEDNN = not (torch.backends.mkldnn.is_available() and hasattr(torch.ops.mkldnn, "_linear_pointwise"))


@pytest.mark.skipif(NO_ONEDNN, reason="this PyTorch build has no oneDNN (mkldnn) linear kernels")
@pytest.mark.parametrize("in_features,bias", [(16, True), (19, False)])  # 19: the vector loop's tail
def test_decode_linear_equals_linear_and_is_as_current_as_its_last_repack(in_features, bias):
    """Few rows (the few_row_linear kernel where it builds), one row, and many (lmforge's packed_linear kernel where
    it builds, else oneDNN's), eagerly and compiled."""
    from lmforge.cpu.modules import DecodeLinear
    linear = torch.nn.Linear(in_features, 24, bias=bias)
    fast = DecodeLinear(linear)
    few, one, many = torch.randn(1, 2, in_features), torch.randn(1, 1, in_features), torch.randn(4, 10, in_features)
    edge = torch.randn(1, max(fast.few_rows, 1), in_features), torch.randn(1, fast.few_rows + 1, in_features)
    with torch.no_grad():
        for x in (few, one, many, *edge):  # (the most rows few_row_linear takes, and one more)
            torch.testing.assert_close(fast(x), linear(x), atol=1e-5, rtol=1e-5)
        linear.weight.mul_(1.5)  # an in-place change, as an optimizer step makes
        if fast.few_rows >= 2:  # few rows read the weight in place: current already
            torch.testing.assert_close(fast(few), linear(few), atol=1e-5, rtol=1e-5)
        fast.repack()
        torch.testing.assert_close(fast(many), linear(many), atol=1e-5, rtol=1e-5)
        torch.testing.assert_close(torch.compile(fast, fullgraph=True)(many), linear(many), atol=1e-5, rtol=1e-5)
    assert fast.weight is linear.weight and fast.bias is linear.bias  # shared, not copied
    linear.to(torch.bfloat16)  # the shared weights cast: no packed copy serves them, and none is needed
    fast.repack()
    with torch.no_grad():
        torch.testing.assert_close(fast(many.bfloat16()), linear(many.bfloat16()))


@pytest.mark.skipif(NO_ONEDNN, reason="this PyTorch build has no oneDNN (mkldnn) linear kernels")
@pytest.mark.parametrize("kernels", [True, False])
def test_decode_linear_takes_no_rows_with_or_without_lmforge_kernels(kernels, monkeypatch):
    from lmforge.cpu import kernels as k
    from lmforge.cpu.modules import DecodeLinear
    if not kernels:
        monkeypatch.setitem(k._state, "ops", None)  # as where they cannot be built
    linear = torch.nn.Linear(16, 24)
    fast = DecodeLinear(linear)
    assert (fast.few_rows > 0) == (kernels and k.cpu_kernels() is not None and k.cpu_kernels().vector_lanes() > 1)
    with torch.no_grad():
        for x in (torch.randn(0, 16), torch.randn(2, 0, 16), torch.randn(3, 16)):
            torch.testing.assert_close(fast(x), linear(x), atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("K", [8, 19, 64, 200])  # whole vectors (AVX2's 8, AVX-512's 16), and tails
def test_the_few_row_kernel_equals_a_matrix_product_for_every_row_count(K, kernel_ops):
    """lmforge_cpu::few_row_linear against torch.addmm for 1 to 19 rows of x: the tiles that share a weight vector
    (up to 8 rows with AVX-512, 4 with AVX2), the rows past them that find the weight rows in cache, and weight
    matrices of a few rows (fewer than a thread's share, and odd shares: a pair of streams and a row left over)."""
    ops = kernel_ops
    torch.manual_seed(0)
    for N in (1, 3, 130):
        w, b = torch.randn(N, K), torch.randn(N)
        for M in range(1, 20):
            x = torch.randn(M, K)
            torch.testing.assert_close(ops.few_row_linear(x, w, b), torch.addmm(b, x, w.T), atol=1e-5, rtol=1e-5)
            torch.testing.assert_close(ops.few_row_linear(x, w, None), x @ w.T, atol=1e-5, rtol=1e-5)
    x = torch.randn(2, 3, 2 * K)[..., ::2]  # any rank, and strided (the kernel makes x contiguous itself)
    torch.testing.assert_close(ops.few_row_linear(x, w, b), torch.nn.functional.linear(x, w, b), atol=1e-5, rtol=1e-5)


def test_the_packed_kernel_equals_a_float64_product_and_each_row_is_computed_alone(kernel_ops):
    """lmforge_cpu::packed_linear on pack_linear_weight's copy, against float64: output columns that fill the last
    panel or not (16 a panel with AVX2, 32 with AVX-512), inputs within one block of 384 or past it with a remainder,
    rows in whole tiles or not (6 or 12) and past a block of 144 rows; with and without bias. Its results are the same
    bits with one thread or two, and for a row alone or among others (each output sums in one fixed order)."""
    ops = kernel_ops
    torch.manual_seed(0)
    for M, K, N in [(1, 1, 1), (7, 5, 3), (13, 385, 16), (40, 384, 50), (150, 800, 33), (290, 64, 64)]:
        x, w, b = torch.randn(M, K), torch.randn(N, K), torch.randn(N)
        packed = ops.pack_linear_weight(w)
        for bias in (b, None):
            y = ops.packed_linear(x, packed, bias, N)
            want = x.double() @ w.double().T + (0 if bias is None else bias.double())
            scale = x.double().abs() @ w.double().abs().T + 1  # (float32's rounding grows with the terms' sizes)
            assert ((y.double() - want).abs() / scale).max() < 1e-6, (M, K, N)
            threads = torch.get_num_threads()
            torch.set_num_threads(1)
            try:
                assert torch.equal(ops.packed_linear(x, packed, bias, N), y)
            finally:
                torch.set_num_threads(threads)
            for i in {0, M // 2, M - 1}:
                assert torch.equal(ops.packed_linear(x[i:i + 1], packed, bias, N), y[i:i + 1])
    x = torch.randn(2, 3, 2 * K)[..., ::2]  # any rank, and strided (the kernel makes x contiguous itself)
    torch.testing.assert_close(ops.packed_linear(x, packed, b, N), torch.nn.functional.linear(x, w, b),
                               atol=1e-5, rtol=1e-5)
    assert ops.packed_linear(torch.randn(0, K), packed, b, N).shape == (0, N)
    with pytest.raises(RuntimeError, match="packed: pack_linear_weight of a float32"):
        ops.packed_linear(torch.randn(2, K + 1), packed, b, N)  # a copy packed for other sizes
    square = ops.pack_linear_weight(torch.randn(32, 48))  # as many floats as a (48, 32) weight's copy
    with pytest.raises(RuntimeError, match="packed: pack_linear_weight of a float32"):
        ops.packed_linear(torch.randn(2, 32), square, None, 48)


@pytest.mark.parametrize("compiled", [True, False])
@pytest.mark.parametrize("kv_heads,alibi", [(4, False), (2, True), (1, False)])
def test_one_query_attention_equals_sdpa_compiled_or_not(kv_heads, alibi, compiled):
    """Compiled: lmforge's kernel for a bool mask, sums of products for ALiBi's bias; eagerly: the kernel, or SDPA."""
    import torch.nn.functional as F
    from lmforge.cpu.modules import OneQueryAttention
    from lmforge.model import alibi_slopes
    torch.manual_seed(0)
    q, k, v = torch.randn(3, 4, 1, 8), torch.randn(3, kv_heads, 10, 8), torch.randn(3, kv_heads, 10, 8)
    valid = torch.rand(3, 1, 1, 10) > 0.3
    valid[..., -1] = True
    mask = valid
    if alibi:
        mask = (-alibi_slopes(4).view(1, 4, 1, 1) * torch.arange(9, -1, -1.0)).masked_fill(~valid, float("-inf"))
    gqa = {"enable_gqa": True} if kv_heads != 4 else {}
    with torch.no_grad():
        want = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, **gqa)
        attention = OneQueryAttention()
        got = (torch.compile(attention, fullgraph=True) if compiled else attention)(q, k, v, mask, 0.0)
    torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("n", [1, 7, 8, 16, 16387, 40000])  # below a vector, whole vectors, tails, several threads
def test_the_gelu_kernel_equals_torchs_tanh_gelu(n, kernel_ops):
    """lmforge_cpu::gelu_tanh against GPT-2's GELU in float64 (as x / (1 + e^(-2u)): 1 + tanh(u) cancels for negative
    x), within float32 rounding; against PyTorch's float32 GELU to 1e-6; NaN, infinities and huge values as PyTorch
    gives them, in the vector path and the tail; and the same bits with one thread as with two."""
    import torch.nn.functional as F
    ops = kernel_ops
    x = torch.linspace(-12, 12, n) if n > 16 else torch.randn(n) * 4
    d = x.double()
    exact = d / (1 + torch.exp(-1.5957691216057308 * (d + 0.044715 * d ** 3)))
    assert (ops.gelu_tanh(x).double() - exact).abs().max() <= 6e-7  # |GELU| <= 12 here: a few float32 ulps
    torch.testing.assert_close(ops.gelu_tanh(x), F.gelu(x, approximate="tanh"), atol=1e-6, rtol=1e-6)
    threads = torch.get_num_threads()
    try:
        torch.set_num_threads(1)
        alone = ops.gelu_tanh(x)
    finally:
        torch.set_num_threads(threads)
    assert torch.equal(alone, ops.gelu_tanh(x))
    special = torch.tensor([float("nan"), float("inf"), -float("inf"), 0.0, -0.0, -1e38, -1e30, -20.0, 1e38, 20.0])
    special = torch.cat([special, torch.randn(7), special, special[:3]])  # in vectors of 8 or 16, and in the tail
    torch.testing.assert_close(ops.gelu_tanh(special), F.gelu(special, approximate="tanh"), equal_nan=True,
                               atol=0, rtol=1e-6)
    with torch.no_grad():
        from lmforge.cpu.modules import FastGELU
        y = torch.randn(3, 5, 19)
        torch.testing.assert_close(FastGELU()(y), F.gelu(y, approximate="tanh"), atol=1e-6, rtol=1e-6)
        strided = y.transpose(0, 2)  # not contiguous: FastGELU copies it first
        torch.testing.assert_close(FastGELU()(strided), F.gelu(strided, approximate="tanh"), atol=1e-6, rtol=1e-6)


@pytest.mark.parametrize("batch,heads,kv_heads,D", [(1, 12, 12, 16), (3, 4, 2, 19), (2, 4, 1, 8), (2, 4, 2, 64),
                                                    (1, 2, 2, 128), (1, 2, 1, 144)])
def test_the_attention_kernel_reads_only_the_slots_the_mask_allows(batch, heads, kv_heads, D, kernel_ops):
    """lmforge_cpu::decode_attention equals SDPA, on rows of a larger cache (strided views), with the slots the mask
    hides holding NaN: had the kernel read any of them, its output would be NaN. A row with nothing allowed gives NaN,
    as SDPA does."""
    import torch.nn.functional as F
    ops = kernel_ops
    torch.manual_seed(0)
    S = 40  # D: multiples of 16 (held in registers up to 128), one with a tail (19), one below 16 (8), one past 128
    q = torch.randn(batch, heads, 1, D)
    cache = torch.randn(batch + 2, 2, kv_heads, S, D)  # (rows, k|v, heads, slots, dim)
    k, v = cache[1:batch + 1, 0], cache[1:batch + 1, 1]
    positions = torch.tensor([7, 39, 0][:batch])
    mask = (torch.arange(S) <= positions[:, None])[:, None, None, :]  # a causal prefix per row
    mask[0, ..., 3] = False  # and a hole
    want = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, enable_gqa=heads != kv_heads)
    k.masked_fill_(~mask[:, :, 0, :, None], float("nan"))
    v.masked_fill_(~mask[:, :, 0, :, None], float("nan"))
    got = ops.decode_attention(q, k, v, mask, D ** -0.5)
    torch.testing.assert_close(got, want, atol=1e-6, rtol=1e-5)
    nothing = torch.zeros_like(mask)
    assert ops.decode_attention(q, k, v, nothing, D ** -0.5).isnan().all()


@pytest.mark.parametrize("D,padded", [(128, 144), (64, 72)])
def test_the_attention_kernel_in_registers_is_bit_equal_to_its_general_loop(D, padded, kernel_ops):
    """Head sizes up to 8 vectors (128 with AVX-512, 64 with AVX2) run the register path, 144 and 72 the general loop;
    padded with zeros, D becomes the padded size with every score and output bit for bit the same (zero products add
    nothing), so the two paths must agree exactly."""
    ops = kernel_ops
    torch.manual_seed(0)
    q, k, v = torch.randn(2, 4, 1, D), torch.randn(2, 2, 30, D), torch.randn(2, 2, 30, D)
    mask = (torch.arange(30) <= torch.tensor([11, 29])[:, None])[:, None, None, :]
    pad = [0, padded - D]
    fast = ops.decode_attention(q, k, v, mask, 0.1)
    general = ops.decode_attention(*(torch.nn.functional.pad(t, pad) for t in (q, k, v)), mask, 0.1)
    assert torch.equal(fast, general[..., :D]) and not general[..., D:].any()


# ---------------------------------------------------------------------------------------- compiled decode step

@pytest.mark.parametrize("position", POSITIONS)
def test_compiled_greedy_equals_naive_path_past_the_context(position):
    from torch._dynamo.utils import counters
    model = tiny_model(position)
    graphs = counters["stats"]["unique_graphs"]
    prompt = [1, 5, 9, 2, 7]
    fast = run(model, [prompt], 30, temperature=0, compile=True)[0]
    assert fast == generate_naive(model, prompt, 30, temperature=0)
    assert counters["stats"]["unique_graphs"] > graphs  # the steps ran through a compiled graph


def test_compiled_batched_rows_equal_each_prompt_alone():
    model = tiny_model("alibi", n_kv_head=2, block=64)
    prompts = [[3], [4, 8, 15, 16, 23, 42], [1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11], [7, 7]]
    batched = run(model, prompts, 20, temperature=0, compile=True)
    for prompt, row in zip(prompts, batched):
        assert row == generate_naive(model, prompt, 20, temperature=0)


def test_compiled_sampling_equals_naive_path_for_the_same_seed():
    model = tiny_model("rope", block=64)
    opts = dict(temperature=0.9, top_k=20, top_p=0.9, repetition_penalty=1.3)
    assert run(model, [[1, 2, 3]], 25, seed=7, compile=True, **opts)[0] == generate_naive(
        model, [1, 2, 3], 25, generator=torch.Generator().manual_seed(7), **opts)


def test_compile_without_a_cpu_compiler_is_a_one_line_error(monkeypatch):
    monkeypatch.setenv("CXX", "no-such-compiler")
    with pytest.raises(ValueError, match="needs a C.. compiler"):
        run(tiny_model("rope"), [[1, 2]], 3, compile=True)
