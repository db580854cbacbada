"""The model against references: nn.MultiheadAttention, the two attention paths, full forward vs KV cache, formulas."""

import math

import pytest
import torch
import torch.nn as nn

from lmforge import GPT, ModelConfig
from lmforge.model import Attention, alibi_slopes, apply_rope, RotaryEmbedding, SinusoidalPositions

POSITIONS = ["learned", "sinusoidal", "alibi", "rope", "none"]
HEADS = {"mha": None, "gqa": 2, "mqa": 1}


def tiny(**kw) -> ModelConfig:
    base = dict(vocab_size=97, block_size=32, n_layer=2, n_head=4, n_embd=32, dropout=0.0)
    return ModelConfig(**{**base, **kw})


def twin(cfg: ModelConfig, **kw) -> GPT:
    """A second model with the same weights and a different (non-shape) setting."""
    a = GPT(cfg).eval()
    b = GPT(ModelConfig(**{**cfg.to_dict(), **kw})).eval()
    b.load_state_dict(a.state_dict())
    return a, b


def left_padded(B=3, T=12, vocab=97):
    idx = torch.randint(0, vocab, (B, T))
    mask = torch.ones(B, T, dtype=torch.long)
    for row, pad in enumerate([0, 3, 7][:B]):
        mask[row, :pad] = 0
    return idx, mask


# ------------------------------------------------------------------------------------------------ attention parity

@pytest.mark.parametrize("position", POSITIONS)
@pytest.mark.parametrize("heads", HEADS)
@pytest.mark.parametrize("padding", [False, True])
def test_sdpa_equals_manual(position, heads, padding):
    cfg = tiny(position=position, n_kv_head=HEADS[heads], attention="sdpa", qk_norm=heads == "gqa")
    fast, slow = twin(cfg, attention="manual")
    idx, mask = left_padded()
    mask = mask if padding else None
    with torch.no_grad():
        a, _ = fast(idx, attention_mask=mask)
        b, _ = slow(idx, attention_mask=mask)
    torch.testing.assert_close(a, b, atol=1e-5, rtol=0)


@pytest.mark.parametrize("attention", ["sdpa", "manual"])
def test_attention_equals_multihead_attention(attention):
    cfg = tiny(position="none", attention=attention, n_embd=48, n_head=6)
    ours = Attention(cfg).eval()
    ref = nn.MultiheadAttention(cfg.n_embd, cfg.n_head, bias=True, batch_first=True).eval()
    with torch.no_grad():
        ref.in_proj_weight.copy_(ours.c_attn.weight)
        ref.in_proj_bias.copy_(ours.c_attn.bias)
        ref.out_proj.weight.copy_(ours.c_proj.weight)
        ref.out_proj.bias.copy_(ours.c_proj.bias)
    x = torch.randn(3, 10, cfg.n_embd)
    blocked = torch.ones(10, 10, dtype=torch.bool).triu(1)  # True = may not attend
    with torch.no_grad():
        expected, _ = ref(x, x, x, attn_mask=blocked, need_weights=False)
        got = ours(x)
    torch.testing.assert_close(got, expected, atol=1e-5, rtol=0)


@pytest.mark.parametrize("n_kv_head", [1, 2])
def test_grouped_query_equals_multi_head_with_shared_kv(n_kv_head):
    """GQA/MQA is MHA whose key/value heads are copies: build that MHA by hand and compare."""
    cfg = tiny(position="rope", n_kv_head=n_kv_head, attention="manual")
    gqa = Attention(cfg).eval()
    mha = Attention(tiny(position="rope", attention="manual")).eval()
    H, Hkv, D, C = cfg.n_head, n_kv_head, cfg.head_dim, cfg.n_embd
    wq, wk, wv = gqa.c_attn.weight.split([H * D, Hkv * D, Hkv * D])
    bq, bk, bv = gqa.c_attn.bias.split([H * D, Hkv * D, Hkv * D])
    expand = lambda t: t.view(Hkv, D, *t.shape[1:]).repeat_interleave(H // Hkv, 0).reshape(H * D, *t.shape[1:])
    with torch.no_grad():
        mha.c_attn.weight.copy_(torch.cat([wq, expand(wk), expand(wv)]))
        mha.c_attn.bias.copy_(torch.cat([bq, expand(bk), expand(bv)]))
        mha.c_proj.load_state_dict(gqa.c_proj.state_dict())
    x = torch.randn(2, 9, C)
    rope = RotaryEmbedding(cfg)(torch.arange(9)[None])
    with torch.no_grad():
        torch.testing.assert_close(gqa(x, rope=rope), mha(x, rope=rope), atol=1e-6, rtol=0)


# ------------------------------------------------------------------------------------------------------- KV cache

@pytest.mark.parametrize("position", POSITIONS)
@pytest.mark.parametrize("heads", HEADS)
@pytest.mark.parametrize("attention", ["sdpa", "manual"])
def test_kv_cache_decoding_matches_full_forward(position, heads, attention):
    cfg = tiny(position=position, n_kv_head=HEADS[heads], attention=attention)
    model = GPT(cfg).eval()
    idx = torch.randint(0, cfg.vocab_size, (2, 14))
    with torch.no_grad():
        full, _ = model(idx)
        cache = model.make_kv_cache(batch_size=2, max_len=16)
        pieces = [model(idx[:, :5], kv_cache=cache)[0]]  # prefill several tokens (slots 0..4)
        for t in range(5, 14):  # then one token at a time, attending every slot under the mask (static shapes)
            pieces.append(model(idx[:, t:t + 1], kv_cache=cache, positions=torch.tensor([[t]]))[0])
    torch.testing.assert_close(torch.cat(pieces, dim=1), full, atol=1e-5, rtol=0)


@pytest.mark.parametrize("position", POSITIONS)
def test_rows_at_different_positions_share_one_cache(position):
    """Each cache row holds its own sequence at its own positions (what continuous batching needs): a batched step
    of rows at positions 3, 9 and 6 gives each row's logits alone, and reading fewer slots (kv_len) changes nothing."""
    cfg = tiny(position=position, n_kv_head=2)
    model = GPT(cfg).eval()
    lengths = [3, 9, 6]
    seqs = [torch.randint(0, cfg.vocab_size, (1, n + 1)) for n in lengths]
    with torch.no_grad():
        cache = model.make_kv_cache(batch_size=3, max_len=12)
        for row, seq in enumerate(seqs):  # prefill each row alone, through a view of its row
            model(seq[:, :-1], kv_cache=cache.rows(row, row + 1))
        step = torch.cat([s[:, -1:] for s in seqs])  # (3, 1)
        positions = torch.tensor(lengths)[:, None]
        static, _ = model(step, kv_cache=cache, positions=positions)
        sliced, _ = model(step, kv_cache=cache, positions=positions, kv_len=10)
    for row, seq in enumerate(seqs):
        alone, _ = model(seq)
        torch.testing.assert_close(static[row, -1], alone[0, -1], atol=1e-5, rtol=0)
        torch.testing.assert_close(sliced[row, -1], alone[0, -1], atol=1e-5, rtol=0)


@pytest.mark.parametrize("position", POSITIONS)
def test_left_padding_does_not_change_a_sequence(position):
    """A left-padded row gives the logits of the same tokens run alone (positions count real tokens only)."""
    model = GPT(tiny(position=position)).eval()
    idx, mask = left_padded(T=12)
    with torch.no_grad():
        batched, _ = model(idx, attention_mask=mask)
        alone, _ = model(idx[2:3, 7:])
    torch.testing.assert_close(batched[2:3, 7:], alone, atol=1e-5, rtol=0)


def test_kv_cache_reorder_selects_rows():
    model = GPT(tiny(position="rope")).eval()
    idx = torch.randint(0, 97, (3, 6))
    with torch.no_grad():
        cache = model.make_kv_cache(3, 8)
        model(idx, kv_cache=cache)
        cache.reorder(torch.tensor([2, 2, 0]))
        step, _ = model(torch.tensor([[5], [5], [5]]), kv_cache=cache, positions=torch.tensor([[6]]))
        ref, _ = model(torch.cat([idx[[2, 2, 0]], torch.full((3, 1), 5)], dim=1))
    torch.testing.assert_close(step[:, 0], ref[:, -1], atol=1e-5, rtol=0)


# ------------------------------------------------------------------------------------------- structural properties

@pytest.mark.parametrize("position", POSITIONS)
@pytest.mark.parametrize("norm_position", ["pre", "post"])
def test_causality(position, norm_position):
    model = GPT(tiny(position=position, norm_position=norm_position)).eval()
    idx = torch.randint(0, 97, (1, 16))
    changed = idx.clone()
    changed[0, 9] = (idx[0, 9] + 1) % 97
    with torch.no_grad():
        a, _ = model(idx)
        b, _ = model(changed)
    torch.testing.assert_close(a[:, :9], b[:, :9], atol=1e-6, rtol=0)
    assert not torch.allclose(a[:, 9:], b[:, 9:])


@pytest.mark.parametrize("name,count", [("gpt2", 124_439_808), ("gpt2-medium", 354_823_168),
                                        ("gpt2-large", 774_030_080), ("gpt2-xl", 1_557_611_200)])
def test_gpt2_parameter_counts_on_meta_device(name, count):
    with torch.device("meta"):
        model = GPT(ModelConfig.preset(name))
    assert model.num_params() == count
    assert all(p.is_meta for p in model.parameters())


def test_meta_build_then_init_matches_a_normal_build():
    cfg = tiny(position="rope", qk_norm=True, norm="rmsnorm", mlp="swiglu")
    ref = GPT(cfg).eval()
    with torch.device("meta"):
        model = GPT(cfg)
    model.to_empty(device="cpu")
    model.init_weights()
    assert model.lm_head.weight is model.wte.weight
    model.load_state_dict(ref.state_dict())
    idx = torch.randint(0, 97, (2, 20))
    with torch.no_grad():
        torch.testing.assert_close(model.eval()(idx)[0], ref(idx)[0], atol=0, rtol=0)


@pytest.mark.parametrize("position", ["rope", "sinusoidal", "alibi"])
def test_an_empty_model_draws_no_random_numbers_and_loads_to_the_same_logits(position):
    """GPT.empty (what a loader builds): real memory, buffers computed (not saved in checkpoints), tied layers, and
    the global generator left as it was."""
    cfg = tiny(position=position)
    ref = GPT(cfg).eval()
    state = torch.get_rng_state()
    model = GPT.empty(cfg)
    assert torch.equal(torch.get_rng_state(), state) and not any(p.is_meta for p in model.parameters())
    assert model.lm_head.weight is model.wte.weight
    model.load_state_dict(ref.state_dict())
    idx = torch.randint(0, 97, (2, 20))
    with torch.no_grad():
        torch.testing.assert_close(model.eval()(idx)[0], ref(idx)[0], atol=0, rtol=0)


def test_weight_tying_and_untying():
    tied = GPT(tiny())
    assert tied.lm_head.weight is tied.wte.weight
    untied = GPT(tiny(tie_embeddings=False))
    assert untied.lm_head.weight is not untied.wte.weight
    assert untied.num_params() - tied.num_params() == 97 * 32


def test_init_scales_residual_projections():
    cfg = tiny(n_layer=8, n_embd=256, n_head=4)
    model = GPT(cfg)
    expected = 0.02 / math.sqrt(2 * 8)
    for block in model.blocks:
        assert abs(block.attn.c_proj.weight.std().item() - expected) < 0.05 * expected
        assert abs(block.mlp.c_fc.weight.std().item() - 0.02) < 0.05 * 0.02
        assert block.attn.c_attn.bias.abs().max() == 0


def test_post_norm_block_is_normalised_and_has_no_final_norm():
    model = GPT(ModelConfig.preset("gpt1", n_layer=2, n_embd=64, n_head=4, dropout=0.0)).eval()
    assert isinstance(model.norm_f, nn.Identity)
    x = torch.randn(2, 5, 64)
    out = model.blocks[0](x)
    torch.testing.assert_close(out.mean(-1), torch.zeros(2, 5), atol=1e-5, rtol=0)  # LayerNorm output, weight 1 bias 0


def test_sinusoidal_table_matches_the_paper():
    d = 16
    table = SinusoidalPositions(tiny(n_embd=d, n_head=4))(torch.arange(50)[None])[0]
    pos = torch.arange(50).float()[:, None]
    i = torch.arange(0, d, 2).float()
    torch.testing.assert_close(table[:, 0::2], torch.sin(pos / 10000 ** (i / d)))
    torch.testing.assert_close(table[:, 1::2], torch.cos(pos / 10000 ** (i / d)))


def test_rope_scores_depend_only_on_relative_position():
    rope = RotaryEmbedding(tiny(position="rope"))
    q, k = torch.randn(8), torch.randn(8)

    def score(m, n):
        cq, sq = rope(torch.tensor([[m]]))
        ck, sk = rope(torch.tensor([[n]]))
        return (apply_rope(q.view(1, 1, 1, 8), cq, sq) * apply_rope(k.view(1, 1, 1, 8), ck, sk)).sum()

    torch.testing.assert_close(score(7, 3), score(40, 36), atol=1e-5, rtol=0)  # 40 is past the table
    assert not torch.allclose(score(7, 3), score(7, 5))


def test_alibi_slopes_follow_the_paper():
    torch.testing.assert_close(alibi_slopes(8), torch.tensor([2.0 ** -(i + 1) for i in range(8)]))
    six = alibi_slopes(6)  # not a power of two: 4 geometric slopes, then every other of the 8-head series
    torch.testing.assert_close(six, torch.tensor([2 ** -2, 2 ** -4, 2 ** -6, 2 ** -8, 2 ** -1, 2 ** -3]))


@pytest.mark.parametrize("mlp", ["relu", "gelu", "swiglu", "relu2"])
@pytest.mark.parametrize("norm", ["layernorm", "rmsnorm"])
def test_every_mlp_and_norm_trains(mlp, norm):
    model = GPT(tiny(mlp=mlp, norm=norm, bias=norm == "layernorm"))
    idx = torch.randint(0, 97, (2, 8))
    _, loss = model(idx, idx)
    loss.backward()
    assert math.isclose(loss.item(), math.log(97), rel_tol=0.1)  # near-uniform predictions at init
    assert all(p.grad is not None and torch.isfinite(p.grad).all() for p in model.parameters())


def test_loss_mask_counts_only_masked_positions():
    model = GPT(tiny()).eval()
    idx = torch.randint(0, 97, (2, 10))
    targets = torch.randint(0, 97, (2, 10))
    loss_mask = torch.zeros(2, 10, dtype=torch.long)
    loss_mask[0, 4:] = 1
    loss_mask[1, 7:] = 1
    with torch.no_grad():
        logits, loss = model(idx, targets, loss_mask=loss_mask)
    per_token = nn.functional.cross_entropy(logits.transpose(1, 2), targets, reduction="none")
    torch.testing.assert_close(loss, per_token[loss_mask.bool()].mean())


def test_activation_checkpointing_gives_the_same_gradients():
    cfg = tiny(dropout=0.1, position="rope")
    plain = GPT(cfg).train()
    ckpt = GPT(cfg).train()
    ckpt.load_state_dict(plain.state_dict())
    ckpt.activation_checkpointing = True
    idx = torch.randint(0, 97, (4, 16))
    grads = []
    for model in (plain, ckpt):
        torch.manual_seed(123)  # same dropout masks
        model(idx, idx)[1].backward()
        grads.append({n: p.grad for n, p in model.named_parameters()})
    for name in grads[0]:
        torch.testing.assert_close(grads[1][name], grads[0][name], atol=1e-6, rtol=0, msg=name)


def test_tiny_model_overfits_one_batch():
    model = GPT(tiny(n_layer=2, n_embd=64))
    idx = torch.randint(0, 97, (4, 16))
    opt = torch.optim.AdamW(model.parameters(), lr=3e-3, weight_decay=0.0)
    for _ in range(200):
        _, loss = model(idx[:, :-1], idx[:, 1:])
        opt.zero_grad()
        loss.backward()
        opt.step()
    assert loss.item() < 0.05


@pytest.mark.parametrize("position", ["alibi", "rope", "none"])
def test_relative_positions_run_past_block_size(position):
    model = GPT(tiny(position=position, block_size=16)).eval()
    with torch.no_grad():
        logits, _ = model(torch.randint(0, 97, (1, 40)))
        cache = model.make_kv_cache(1, 48)
        model(torch.randint(0, 97, (1, 40)), kv_cache=cache)
        step, _ = model(torch.randint(0, 97, (1, 1)), kv_cache=cache, positions=torch.tensor([[40]]))
    assert logits.shape == (1, 40, 97) and torch.isfinite(logits).all() and torch.isfinite(step).all()


@pytest.mark.parametrize("position", ["learned", "sinusoidal"])
def test_absolute_positions_refuse_long_inputs(position):
    model = GPT(tiny(position=position, block_size=16))
    with pytest.raises(ValueError, match="exceeds block_size=16"):
        model(torch.randint(0, 97, (1, 17)))
    with pytest.raises(ValueError, match="block_size"):
        model.make_kv_cache(1, 32)


@pytest.mark.parametrize("idx,message", [
    (torch.tensor([[1, 2, 97]]), "outside the vocabulary"),
    (torch.tensor([[1, -1]]), "outside the vocabulary"),
    (torch.tensor([[1.0, 2.0]]), "integer token ids"),
    (torch.tensor([1, 2, 3]), "2-D tensor"),
    (torch.zeros(1, 2, 3, dtype=torch.long), "2-D tensor"),
    ([[1, 2, 3]], "2-D tensor"),
    (torch.zeros(1, 0, dtype=torch.long), "empty"),
])
def test_bad_input_gives_clear_errors(idx, message):
    with pytest.raises(ValueError, match=message):
        GPT(tiny())(idx)


def test_bad_companion_tensors_give_clear_errors():
    model = GPT(tiny())
    idx = torch.randint(0, 97, (2, 5))
    with pytest.raises(ValueError, match="targets shape"):
        model(idx, idx[:, :4])
    with pytest.raises(ValueError, match="attention_mask shape"):
        model(idx, attention_mask=torch.ones(2, 4))
    with pytest.raises(ValueError, match="loss_mask shape"):
        model(idx, idx, loss_mask=torch.ones(1, 5))
    cache = model.make_kv_cache(2, 6)
    model(idx, kv_cache=cache)
    with pytest.raises(ValueError, match="KV cache holds 4"):
        model(idx, kv_cache=model.make_kv_cache(2, 4))
    with pytest.raises(ValueError, match="position 6 is outside the 6 cache slots"):
        model(idx[:, :1], kv_cache=cache, positions=torch.tensor([[6]]))
    with pytest.raises(ValueError, match="cache has 2 rows"):
        model(idx[:1], kv_cache=cache)
    with pytest.raises(ValueError, match="uncached batches"):
        model(idx, kv_cache=cache, attention_mask=torch.ones(2, 5))
    with pytest.raises(ValueError, match="kv_len=7 exceeds"):
        model(idx[:, :1], kv_cache=cache, positions=torch.tensor([[5]]), kv_len=7)


def test_cross_entropy_equals_torch_with_ignored_targets():
    from lmforge.model import CrossEntropy
    logits = torch.randn(40, 97, dtype=torch.float64, requires_grad=True)
    targets = torch.randint(0, 97, (40,))
    targets[::3] = -100
    ours = CrossEntropy.apply(logits, targets)
    ref = nn.functional.cross_entropy(logits, targets, ignore_index=-100)
    torch.testing.assert_close(ours, ref, atol=1e-12, rtol=0)
    (g_ours,) = torch.autograd.grad(ours * 3, logits)
    (g_ref,) = torch.autograd.grad(ref * 3, logits)
    torch.testing.assert_close(g_ours, g_ref, atol=1e-12, rtol=0)
    assert g_ours[::3].abs().max() == 0  # ignored rows get no gradient
    assert torch.autograd.gradcheck(lambda x: CrossEntropy.apply(x, targets[:6]), (logits[:6].detach().requires_grad_(),))


def test_sparse_embedding_gradient_equals_dense():
    model = GPT(tiny())
    assert model.sparse_embedding_grad  # tied weights: the embedding's gradient is summed into a dense one
    idx = torch.randint(0, 97, (3, 12))
    grads = []
    for sparse in (True, False):
        model.zero_grad()
        model.sparse_embedding_grad = sparse
        model(idx, idx)[1].backward()
        assert not model.wte.weight.grad.is_sparse
        grads.append(model.wte.weight.grad.clone())
    torch.testing.assert_close(grads[0], grads[1], atol=1e-7, rtol=0)
    assert not GPT(tiny(tie_embeddings=False)).sparse_embedding_grad  # AdamW needs dense gradients
