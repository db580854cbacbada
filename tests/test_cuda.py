"""CUDA: what the CPU tests prove, proven again on a GPU (all skipped where there is none). Flash attention in bf16
equals the explicit path; the engine's cached and compiled decoding (replayed as CUDA graphs) equals the full forward,
also right after real fused-AdamW steps on the GPU; seeded requests are batch-invariant; training in bf16 autocast
with torch.compile learns and resumes like an uninterrupted run; quantized layers decode on the GPU."""

import math
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

import lmforge
from lmforge import GPT, Engine, ModelConfig, Request
from lmforge.config import TrainConfig
from lmforge.data import prepare
from lmforge.generation import generate_naive, run_requests
from lmforge.quantize import Int4Linear, Int8Linear, quantize_model
from lmforge.tokenizer import CharTokenizer
from lmforge.train import make_optimizers, read_metrics, train
from test_engine import drain

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA device")

TEXT = Path(__file__).with_name("test_train.py").read_text() * 3
CUDA = torch.device("cuda")


def model_on_cuda(seed=0, sharpen=True, **kw) -> GPT:
    torch.manual_seed(seed)
    cfg = dict(vocab_size=64, block_size=64, position="rope")
    model = GPT(ModelConfig.preset("tiny", **{**cfg, **kw})).to(CUDA).eval()
    if sharpen:  # sharper distributions than init gives, so greedy paths are not near-ties
        with torch.no_grad():
            model.wte.weight.mul_(5)
    return model


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory):
    src = tmp_path_factory.mktemp("corpus") / "corpus.txt"
    src.write_text(TEXT)
    return str(prepare(str(src), src.parent / "chars", tokenizer="char").path)


# ------------------------------------------------------------------------------------------------------ the model

@pytest.mark.parametrize("position", ["learned", "alibi", "rope"])
def test_cuda_logits_equal_cpu_logits(position):
    model = model_on_cuda(position=position, n_kv_head=2)
    x = torch.randint(0, 64, (3, 40))
    mask = torch.ones(3, 40, dtype=torch.long)
    mask[1, :7] = 0  # left padding
    with torch.no_grad():
        want = model.cpu()(x, attention_mask=mask)[0]
        got = model.to(CUDA)(x.to(CUDA), attention_mask=mask.to(CUDA))[0]
    torch.testing.assert_close(got.cpu(), want, atol=1e-4, rtol=1e-4)


def test_flash_attention_in_bf16_equals_the_explicit_path():
    from torch.nn.attention import SDPBackend, sdpa_kernel
    fast = model_on_cuda(sharpen=False, n_head=4, n_embd=128).to(torch.bfloat16)  # head_dim 32: flash supports it
    explicit = model_on_cuda(sharpen=False, n_head=4, n_embd=128, attention="manual").to(torch.bfloat16)
    explicit.load_state_dict(fast.state_dict())
    x = torch.randint(0, 64, (4, 64), device=CUDA)
    with torch.no_grad(), sdpa_kernel([SDPBackend.FLASH_ATTENTION]):  # flash or an error, never a silent fallback
        a = fast(x)[0].float()
    with torch.no_grad():
        b = explicit(x)[0].float()
        c = fast.float()(x)[0]  # the fp32 reference
    assert (a - c).abs().max() < 0.1 and (b - c).abs().max() < 0.1  # bf16's rounding, not a different function
    assert (a - b).abs().mean() < 0.01


def test_activation_checkpointing_gives_the_same_gradients_on_cuda():
    model = model_on_cuda(sharpen=False).train()
    x = torch.randint(0, 64, (2, 48), device=CUDA)
    grads = []
    for checkpointing in (False, True):
        model.zero_grad()
        model.activation_checkpointing = checkpointing
        model(x, x)[1].backward()
        grads.append({n: p.grad.clone() for n, p in model.named_parameters()})
    for n in grads[0]:
        torch.testing.assert_close(grads[1][n], grads[0][n], atol=1e-6, rtol=1e-5)


# ----------------------------------------------------------------------------------------------------- the engine

@pytest.mark.parametrize("compile", [False, True])
def test_engine_on_cuda_equals_the_full_forward(compile):
    model = model_on_cuda(n_kv_head=2)
    engine = Engine(model, max_batch=5, max_seq_len=64, compile=compile)
    assert bool(engine._graphs) == compile  # compiled on CUDA: replayed as captured graphs
    prompts = [[1, 5, 9], [4, 8, 15, 16, 23, 42, 7], [2], [9, 9, 9, 1], [3, 1, 4, 1, 5], [6, 6]]
    lengths = [30, 8, 25, 12, 9, 20]
    ids = [engine.add(Request(prompts[0], lengths[0], temperature=0))]
    out = {ids[0]: [e.token for e in engine.step()]}
    for p, n in zip(prompts[1:], lengths[1:]):  # join between steps; one more than the slots waits
        ids.append(engine.add(Request(p, n, temperature=0)))
        for e in engine.step():
            out.setdefault(e.request_id, []).append(e.token)
    for rid, tokens in drain(engine).items():
        out.setdefault(rid, []).extend(tokens)
    for rid, p, n in zip(ids, prompts, lengths):
        assert out[rid] == generate_naive(model, p, n, temperature=0), rid


def test_a_seeded_request_gives_the_same_tokens_alone_or_batched_on_cuda():
    model = model_on_cuda(sharpen=False)
    engine = Engine(model, max_batch=4, max_seq_len=64, compile=True)
    mine = Request([5, 6, 7], 30, temperature=1.0, top_p=0.9, seed=5)
    alone = run_requests(engine, [mine])[0]
    others = [Request([1, 2], 25, temperature=1.3, seed=1), Request([3], 28, temperature=0.7, top_k=5, seed=2)]
    first = engine.add(others[0])
    engine.step()
    rid = engine.add(mine)
    engine.add(others[1])
    got = drain(engine)
    assert got[rid] == alone and first in got


@pytest.mark.parametrize("optimizer", ["adamw", "muon"])
def test_the_graphs_decode_with_the_weights_of_each_fused_optimizer_step(optimizer):
    """The captured graphs hold the weights' addresses; the real optimizers update those tensors in place (fused
    AdamW on CUDA), so each step's greedy decode equals the full forward of the model as it now is."""
    tok = CharTokenizer.train(TEXT[:2000])
    torch.manual_seed(0)
    model = GPT(ModelConfig.preset("tiny", vocab_size=tok.vocab_size, block_size=64)).to(CUDA)
    cfg = TrainConfig(optimizer=optimizer, lr=3e-2, warmup_steps=0)
    optimizers = make_optimizers(model, cfg, CUDA)
    engine = Engine(model, tok, max_batch=2, max_seq_len=64, compile=True)
    data = torch.tensor(tok.encode(TEXT[:2000]), device=CUDA)
    seen = set()
    for step in range(4):
        x = torch.stack([data[i:i + 33] for i in (0, 500, 1000, 1500)])
        model.train()
        model(x[:, :-1], x[:, 1:])[1].backward()
        for opt in optimizers:
            opt.step()
            opt.zero_grad(set_to_none=True)
        model.eval()
        prompt = tok.encode("def ")
        ids = run_requests(engine, [Request(prompt, 20, temperature=0, stop_at_eos=False)])[0]
        assert ids == generate_naive(model, prompt, 20, temperature=0), step
        seen.add(tuple(ids))
    assert len(seen) > 1  # the weights moved, and the decodes with them


def test_an_engine_on_a_bf16_model_decodes_like_its_full_forward():
    model = model_on_cuda(n_kv_head=2).to(torch.bfloat16)
    engine = Engine(model, max_batch=2, max_seq_len=64, compile=True)
    assert engine.cache.layers[0].k.dtype == torch.bfloat16
    prompt = [3, 1, 4, 1, 5, 9, 2, 6]
    ids = run_requests(engine, [Request(prompt, 16, temperature=0, logprobs=0)])[0]
    with torch.no_grad():  # each chosen token is the full forward's top choice, or within bf16 rounding of it
        logits = model(torch.tensor([prompt + ids], device=CUDA))[0][0, len(prompt) - 1:-1].float()
    chosen = logits.gather(1, torch.tensor(ids, device=CUDA)[:, None])[:, 0]
    assert (logits.max(-1).values - chosen).max() < 0.1


# --------------------------------------------------------------------------------------------------- training

def cuda_config(data, out, **kw) -> TrainConfig:
    base = dict(data=data, out=str(out), model={"preset": "tiny"}, max_steps=40, batch_size=8, block_size=64,
                eval_interval=20, eval_steps=2, log_interval=1, sample_tokens=0, progress=False, warmup_steps=4,
                lr=3e-3, device="cuda")
    return TrainConfig(**{**base, **kw})


def test_bf16_autocast_with_compile_learns_and_its_samples_are_current(data_dir, tmp_path):
    run = tmp_path / "run"
    summary = train(cuda_config(data_dir, run, dtype="bfloat16", compile=True, sample_tokens=24, sample_prompt="de",
                                seed=4, keep_last=5))
    vals = [r["val_loss"] for r in read_metrics(run) if "val_loss" in r]
    vocab = lmforge.load_tokenizer(Path(data_dir) / "tokenizer.json").vocab_size
    assert vals[0] > vals[1] and summary["val_loss"] < math.log(vocab) - 1.0  # well below a uniform guess
    for sample in (run / "samples.txt").read_text().split("=== step ")[1:]:
        step = int(sample.split(",")[0])
        model, tok = lmforge.load(run, device="cuda", checkpoint=str(run / "checkpoints" / f"step-{step:06d}"))
        ids = generate_naive(model, tok.encode("de"), 24, temperature=0.8, top_k=200, eos_id=tok.eot_id,
                             generator=torch.Generator(device="cuda").manual_seed(4))  # samples are fp32
        cut = ids.index(tok.eot_id) if tok.eot_id in ids else None
        assert sample.split("\n", 1)[1].rstrip("\n") == "de" + tok.decode(ids[:cut]), step


def test_resume_on_cuda_continues_the_uninterrupted_run(data_dir, tmp_path):
    """fp32 with fused AdamW on the GPU. Embedding gradients are summed with atomics on CUDA, so two runs agree to
    rounding rather than to the bit: the resumed run must stay within what the uninterrupted one drifts by itself."""
    train(cuda_config(data_dir, tmp_path / "full", max_steps=20))
    train(cuda_config(data_dir, tmp_path / "again", max_steps=20))
    train(cuda_config(data_dir, tmp_path / "part", max_steps=20, stop_at=10))
    train(cuda_config(data_dir, tmp_path / "part", max_steps=20, stop_at=0), resume=True)
    full, again, part = (load_file(str(tmp_path / r / "model.safetensors")) for r in ("full", "again", "part"))
    drift = max((full[k] - again[k]).abs().max().item() for k in full)
    gap = max((full[k] - part[k]).abs().max().item() for k in full)
    assert gap <= max(10 * drift, 1e-4), (gap, drift)  # a lost optimizer state moves weights by ~lr = 3e-3
    loss = {r["step"]: r["loss"] for r in read_metrics(tmp_path / "full") if "loss" in r}
    resumed = {r["step"]: r["loss"] for r in read_metrics(tmp_path / "part") if "loss" in r}
    assert resumed.keys() == loss.keys()
    assert all(abs(resumed[s] - loss[s]) < 1e-3 for s in loss)


# ----------------------------------------------------------------------------------------------- quantization

@pytest.mark.parametrize("method", ["int8", "int4"])
def test_quantized_layers_decode_on_cuda(method):
    reference = model_on_cuda(n_embd=128, n_head=4)
    model = quantize_model(reference, method, group_size=32 if method == "int4" else None)
    kind = Int8Linear if method == "int8" else Int4Linear
    assert isinstance(model.lm_head, kind) and model.lm_head.weight.is_cuda
    x = torch.randint(0, 64, (2, 40), device=CUDA)
    with torch.no_grad():
        p = reference(x)[0].float().log_softmax(-1)
        q = model(x)[0].float().log_softmax(-1)
    kl = (p.exp() * (p - q)).sum(-1).mean().item()
    assert kl < (1e-3 if method == "int8" else 2e-2), kl
    engine = Engine(model, max_batch=2, max_seq_len=64, compile=True)
    prompts, lengths = [[1, 2, 3], [7, 7, 8, 9]], [15, 4]  # two rows together, then the first alone (one-row form)
    got = run_requests(engine, [Request(p, n, temperature=0, stop_at_eos=False) for p, n in zip(prompts, lengths)])
    assert got == [generate_naive(model, p, n, temperature=0) for p, n in zip(prompts, lengths)]
