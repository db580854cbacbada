"""Quantization: int8 and int4 weights within half a quantization step of the original, a trained model's int8
perplexity within 1% (the quality gate measures it and refuses above --max-kl), runs that save, load, generate,
evaluate and serve (compiled decoding equal to eager), and refusals: training a quantized run, bad settings."""

import json
import random

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

import lmforge
from lmforge import GPT, ModelConfig
from lmforge.runs import load
from lmforge.cli import main
from lmforge.data import prepare
from lmforge.engine import Engine, Request
from lmforge.errors import UserError
from lmforge.generation import generate_naive
from lmforge.quantize import Int4Linear, Int8Linear, quantize_model
from lmforge.quantize_run import quantize

WORDS = "the king and queen of a castle by the sea rode out at dawn to meet their people in the green field".split()


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    root = tmp_path_factory.mktemp("quant")
    rng = random.Random(0)
    lines = [" ".join(rng.choice(WORDS) for _ in range(rng.randint(4, 12))).capitalize() + "." for _ in range(3000)]
    (root / "corpus.txt").write_text("\n".join(lines) + "\n")
    data = prepare(str(root / "corpus.txt"), root / "data").path
    cfg = lmforge.TrainConfig(data=str(data), out=str(root / "base"), model={"preset": "tiny"}, max_steps=150,
                              block_size=64, batch_size=16, eval_interval=150, eval_steps=2, progress=False,
                              sample_tokens=0, lr=3e-3)
    lmforge.train(cfg)
    for method in ("int8", "int4"):  # the reports: quality.json
        quantize(root / "base", root / method, method, group_size=32 if method == "int4" else None)
    return root


def _linear(out_features=48, in_features=64, seed=0):
    torch.manual_seed(seed)
    linear = nn.Linear(in_features, out_features)
    with torch.no_grad():
        linear.weight[3, 5] = 0.9  # an outlier: its channel (int8) or group (int4) gets a coarser step
    return linear


def test_int8_weights_are_within_half_a_step_and_the_product_is_close():
    linear = _linear()
    q = Int8Linear.from_linear(linear)
    assert q.weight.dtype == torch.int8 and q.scales.shape == (48,)
    err = (q.dequantize() - linear.weight).abs()
    assert (err <= q.scales[:, None] / 2 + 1e-7).all()
    x = torch.randn(5, 7, 64)
    y, ref = q(x), linear(x)
    assert y.shape == ref.shape
    assert (y - ref).norm() / ref.norm() < 0.01  # activations quantized per row as well


def test_int4_packs_two_weights_a_byte_within_half_a_step():
    linear = _linear()
    q = Int4Linear.from_linear(linear, group_size=16)
    assert q.weight.dtype == torch.uint8 and q.weight.shape == (48, 32) and q.scales.shape == (48, 4)
    assert q.scales.dtype == q.mins.dtype == torch.float16  # as q4_0 keeps its scales: 5 bits a weight in all
    err = (q.dequantize() - linear.weight).abs().view(48, 4, 16)
    # half a step, plus what rounding the minimum to float16 moves the group's ends by
    assert (err <= q.scales.float()[..., None] / 2 + 2 ** -11 * q.mins.float().abs()[..., None] + 1e-7).all()
    x = torch.randn(3, 64)
    steps = x.abs().amax(-1, keepdim=True) / 127  # the input is rounded to int8 steps, as llama.cpp's q4_0 does
    torch.testing.assert_close(q(x), F.linear(torch.round(x / steps) * steps, q.dequantize(), linear.bias),
                               atol=1e-5, rtol=1e-5)
    assert (q(x) - linear(x)).norm() / linear(x).norm() < 0.1
    compiled = torch.compile(q.forward, fullgraph=True, dynamic=False)
    torch.testing.assert_close(compiled(x), q(x), atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("shape", [(300, 768, 1), (301, 768, 3), (7, 96, 17), (33, 200, 2), (16, 3072, 4), (11, 640, 2),
                                   (5, 64, 2), (9, 192, 1)])  # 2 and 6 groups of 32: the paired path; 640: a quad left over
@pytest.mark.parametrize("bias", [True, False])
def test_the_cpu_kernels_compute_what_the_pytorch_path_computes(shape, bias, monkeypatch, kernel_ops):
    """int8: bit for bit (integer dot products, the same float steps), or to float rounding where the rows take the
    tiled float kernel (TILED_ROWS); int4: to float rounding, for group sizes the vector path takes (multiples of 32)
    and those it leaves to plain loops."""
    from lmforge.cpu import kernels
    ops = kernel_ops
    N, K, M = shape
    linear = nn.Linear(K, N, bias=bias)
    x = torch.randn(M, K)
    if M > 2:  # rows holding NaN or infinity come out NaN on both paths (and leave the other rows alone)
        x[1, K // 3], x[2, K - 1] = float("nan"), float("inf")
    q8 = Int8Linear.from_linear(linear)
    fast = q8(x)
    monkeypatch.setitem(kernels._state, "ops", None)  # the PyTorch path
    exact = 0 if M < q8.tiled_rows else 1e-5
    torch.testing.assert_close(fast, q8(x), rtol=exact, atol=exact, equal_nan=True)
    nan_rows = fast.isnan().any(dim=1).tolist()
    assert nan_rows == [0 < i < 3 and M > 2 for i in range(M)]
    for group in (32, 64, 8):
        if K % group == 0:
            q4 = Int4Linear.from_linear(linear, group)
            monkeypatch.setitem(kernels._state, "ops", ops)
            fast = q4(x)
            monkeypatch.setitem(kernels._state, "ops", None)
            torch.testing.assert_close(fast, q4(x), atol=1e-5, rtol=1e-5, equal_nan=True)


@pytest.mark.parametrize("M,K,N,group", [(1, 64, 3, 32), (7, 96, 50, 32), (150, 768, 33, 256), (40, 800, 16, 32),
                                         (13, 384, 17, 128), (70, 1536, 20, 64), (30, 800, 20, 160)])
def test_the_tiled_quantized_kernels_equal_the_integer_ones_to_float_rounding(M, K, N, group, kernel_ops):
    """int8_linear_tiled and int4_linear_tiled (many rows: float products on the weight dequantized block by block)
    against int8_linear and int4_linear (integer dot products) on the same codes: inputs in one block of 384 or
    several, with a remainder, and int4 groups that straddle two blocks (256: a block starts at a group's half; 160:
    one starts in a group's high half, another ends in a low half); output columns that fill the last
    panel or not; rows past a block of 144. Rows holding NaN or infinity come out NaN, leaving the others alone; a
    row's outputs are the same bits alone or among others, with one thread or two."""
    ops = kernel_ops
    torch.manual_seed(0)
    linear = nn.Linear(K, N)
    x = torch.randn(M, K)
    if M > 2:
        x[1, K // 3], x[2, K - 1] = float("nan"), float("inf")
    q8, q4 = Int8Linear.from_linear(linear), Int4Linear.from_linear(linear, group)
    for tiled, integer in (
            (lambda x, b: ops.int8_linear_tiled(x, q8.weight, q8.scales, b),
             lambda x, b: ops.int8_linear(x, q8.weight, q8.scales, b)),
            (lambda x, b: ops.int4_linear_tiled(x, q4.weight, q4.scales, q4.mins, b, group),
             lambda x, b: ops.int4_linear(x, q4.weight, q4.scales, q4.mins, b, group))):
        for bias in (linear.bias.detach(), None):
            y = tiled(x, bias)
            torch.testing.assert_close(y, integer(x, bias), atol=1e-5, rtol=1e-5, equal_nan=True)
            assert y.isnan().any(dim=1).tolist() == [0 < i < 3 and M > 2 for i in range(M)]
            threads = torch.get_num_threads()
            torch.set_num_threads(1)
            try:
                torch.testing.assert_close(tiled(x, bias), y, rtol=0, atol=0, equal_nan=True)
            finally:
                torch.set_num_threads(threads)
            i = M - 1
            torch.testing.assert_close(tiled(x[i:i + 1], bias), y[i:i + 1], rtol=0, atol=0, equal_nan=True)
    with pytest.raises(RuntimeError, match="group: an even size dividing K"):
        ops.int4_linear_tiled(x, q4.weight, q4.scales, q4.mins, None, 3)


@pytest.mark.parametrize("K,N,group", [(64, 3, 32), (96, 50, 32), (768, 24, 64), (256, 17, 128), (32, 200, 32),
                                       (256, 9, 256)])
def test_the_8_row_int4_kernel_equals_int4_linear(K, N, group, kernel_ops):
    """int4_linear_rows8 on Int4Linear.rows8's copy (8 weight rows a block, the last padded; 200 rows: 25 blocks, more
    than one thread's share) against int4_linear, to float rounding: 1 to 20 rows of x, bias or none, a row holding
    NaN, K a single group; and through DecodeInt4Linear, which the engine swaps in (with AVX2), eagerly and
    compiled. The copy is checked for its shape, not only its size."""
    from lmforge.cpu.modules import DecodeInt4Linear
    ops = kernel_ops
    torch.manual_seed(0)
    q4 = Int4Linear.from_linear(nn.Linear(K, N), group)
    w8, s8, m8 = q4.rows8()
    for M in (1, 2, 5, 8, 20):
        x = torch.randn(M, K) * 3
        if M > 2:
            x[1, 0] = float("nan")
        for bias in (q4.bias, None):
            torch.testing.assert_close(ops.int4_linear_rows8(x, w8, s8, m8, bias, group, N),
                                       ops.int4_linear(x, q4.weight, q4.scales, q4.mins, bias, group),
                                       atol=1e-5, rtol=1e-5, equal_nan=True)
    fast = DecodeInt4Linear(q4)
    with torch.no_grad():
        for x in (torch.randn(1, 1, K), torch.randn(3, K), torch.randn(2, 40, K)):
            torch.testing.assert_close(fast(x), q4(x), atol=1e-5, rtol=1e-5)
        torch._dynamo.reset()  # (one compiled form for each of these layers, not a pile-up past dynamo's limit)
        x = torch.randn(3, K)
        torch.testing.assert_close(torch.compile(fast, fullgraph=True)(x), q4(x), atol=1e-5, rtol=1e-5)
    with pytest.raises(RuntimeError, match="w8: Int4Linear.rows8's"):
        ops.int4_linear_rows8(torch.randn(1, K), w8, s8, m8, None, group, N + 8)
    if N % 8 == 0:  # the layer's own buffers hold as many values as the copy: refused by their shapes
        with pytest.raises(RuntimeError, match="Int4Linear.rows8's"):
            ops.int4_linear_rows8(torch.randn(1, K), q4.weight, q4.scales, q4.mins, None, group, N)


@pytest.mark.parametrize("group", [32, 64, 256])
def test_the_8_row_int4_kernel_is_exact_at_its_largest_sums(group, kernel_ops):
    """Every code 15 against x's largest codes (+127 or -127 everywhere): the 16-bit lanes of int4_linear_rows8 reach
    their largest sums (8 pair sums of 2 * 15 * 127) and must not wrap, for groups past 32 too."""
    ops = kernel_ops
    K, N = 2 * group, 16
    q4 = Int4Linear.from_linear(nn.Linear(K, N), group)
    q4.weight.fill_(0xFF)  # both nibbles 15
    q4.scales.fill_(1.0)
    q4.mins.fill_(0.0)
    w8, s8, m8 = q4.rows8()
    for sign in (1.0, -1.0):
        x = torch.full((2, K), sign)
        want = torch.full((2, N), sign * 15.0 * K)  # x's codes +-127 at scale 1/127: W . x exactly
        torch.testing.assert_close(ops.int4_linear_rows8(x, w8, s8, m8, None, group, N), want, rtol=1e-6, atol=0)


def test_the_int8_kernel_takes_every_int8_code_minus_128_included(monkeypatch, kernel_ops):
    """Quantizing never writes -128, but a loaded state may hold it: the kernel's vector trick (multiplying unsigned by
    signed bytes) must not negate it, so the product stays bit for bit the PyTorch path's. (kernel_ops: skipped where
    the kernels cannot be built.)"""
    from lmforge.cpu import kernels
    torch.manual_seed(0)
    q8 = Int8Linear.from_linear(nn.Linear(200, 9))
    q8.weight.copy_(torch.randint(-128, 128, q8.weight.shape, dtype=torch.int8))
    q8.weight[0] = -128  # a whole row of it, and -128 against x's largest codes
    x = torch.randn(3, 200)
    x[1] = -1.0
    fast = q8(x)
    monkeypatch.setitem(kernels._state, "ops", None)  # the PyTorch path
    torch.testing.assert_close(fast, q8(x), rtol=0, atol=0)


def test_an_int4_layer_cast_to_another_dtype_keeps_its_float16_scales():
    q = Int4Linear.from_linear(_linear(), 32)
    x = torch.randn(3, 64)
    before, scales = q(x), q.scales.clone()
    q.float()  # what model.float() does to every buffer
    assert torch.equal(q(x), before)
    for dtype in (torch.float32, torch.bfloat16):
        q.to(dtype)
        assert q.scales.dtype == q.mins.dtype == torch.float16 and torch.equal(q.scales, scales)
        assert q.bias.dtype == dtype


def test_an_int8_layer_cast_to_bfloat16_keeps_its_float32_scales():
    q = Int8Linear.from_linear(_linear())
    scales = q.scales.clone()
    q.to(torch.bfloat16)
    assert q.scales.dtype == torch.float32 and torch.equal(q.scales, scales) and q.bias.dtype == torch.bfloat16


def test_weights_past_float16_are_refused_for_int4():
    linear = _linear()
    with torch.no_grad():
        linear.weight[0, 0] = 1e6
    with pytest.raises(UserError, match="int8"):
        Int4Linear.from_linear(linear, 16)
    assert Int8Linear.from_linear(linear).dequantize()[0, 0] == pytest.approx(1e6, rel=1e-6)


def test_bad_group_sizes_are_refused():
    with pytest.raises(UserError, match="divide"):
        Int4Linear.from_linear(_linear(), group_size=48)
    model = GPT(ModelConfig.preset("tiny"))
    for bad in (7, 0, True):
        with pytest.raises(UserError, match="group-size"):
            quantize_model(model, "int4", bad)
    with pytest.raises(UserError, match="int8, int4"):
        quantize_model(model, "int3")


def test_quantizing_swaps_every_linear_and_leaves_the_model_alone():
    model = GPT(ModelConfig.preset("tiny")).eval()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    q = quantize_model(model, "int8")
    assert not any(type(m) is nn.Linear for m in q.modules())
    assert sum(isinstance(m, Int8Linear) for m in q.modules()) == 4 * 2 + 1  # 4 a block, and the output layer
    assert torch.equal(q.wte.weight, q.lm_head.dequantize())  # the tied embedding is the stored output matrix
    assert all(torch.equal(v, before[k]) for k, v in model.state_dict().items())
    assert model.lm_head.weight is model.wte.weight and type(model.lm_head) is nn.Linear
    with pytest.raises(UserError, match="already quantized"):
        quantize_model(q, "int4")


def test_int8_changes_a_trained_models_perplexity_by_under_one_percent(trained, capsys):
    report = json.loads((trained / "int8" / "quality.json").read_text())
    assert abs(report["delta_ppl_percent"]) < 1.0 and report["kl_mean"] < 1e-3
    assert report["tokens"] >= 1000
    config = json.loads((trained / "int8" / "config.json").read_text())
    assert config["quantization"] == {"method": "int8", "group_size": None, "source": str(trained / "base")}
    int4 = json.loads((trained / "int4" / "quality.json").read_text())
    assert int4["kl_mean"] > report["kl_mean"] and abs(int4["delta_ppl_percent"]) < 10
    quantize(trained / "base", trained / "int8-again", "int8", eval_tokens=640)
    out = capsys.readouterr().out
    assert "perplexity" in out and "640 held-out tokens" in out
    sizes = {m: (trained / m / "model.safetensors").stat().st_size for m in ("base", "int8", "int4")}
    assert sizes["int4"] < sizes["int8"] < sizes["base"] / 2.5


def test_a_quantized_run_loads_to_the_model_that_was_measured(trained):
    original, _ = load(trained / "base")
    x = torch.randint(0, original.config.vocab_size, (2, 40))
    for method, group in (("int8", None), ("int4", 32)):
        loaded, tok = load(trained / method)
        assert isinstance(loaded.lm_head, Int8Linear if method == "int8" else Int4Linear)
        assert torch.equal(loaded(x)[0], quantize_model(original, method, group)(x)[0])


@pytest.mark.parametrize("method", ["int8", "int4"])
def test_compiled_and_eager_decoding_of_a_quantized_run_equal_the_naive_path(trained, method):
    model, tok = load(trained / method)
    prompt = tok.encode("The king")
    naive = generate_naive(model, prompt, max_new_tokens=12, temperature=0.0)
    for compile in (False, True):
        engine = Engine(model, max_batch=2, max_seq_len=64, compile=compile)
        engine.add(Request(prompt, max_new_tokens=12, temperature=0.0, stop_at_eos=False))
        engine.add(Request(tok.encode("Their people"), max_new_tokens=5, temperature=0.0, stop_at_eos=False))
        ids = {}
        while engine.has_work():
            for e in engine.step():
                ids.setdefault(e.request_id, []).append(e.token)
        assert ids[0] == naive, compile
        assert ids[1] == generate_naive(model, tok.encode("Their people"), max_new_tokens=5, temperature=0.0)


def test_generate_eval_and_serve_work_on_a_quantized_run(trained, capsys):
    assert main(["generate", str(trained / "int8"), "--prompt", "The", "--max-new-tokens", "10",
                 "--temperature", "0"]) == 0
    assert capsys.readouterr().out.startswith("The")
    assert main(["eval", str(trained / "int4"), "--batches", "2"]) == 0
    assert "perplexity" in capsys.readouterr().out
    from fastapi.testclient import TestClient

    from lmforge.serve.app import create_app
    with TestClient(create_app(trained / "int8", compile="off")) as http:
        for _ in range(300):
            if http.get("/health").status_code == 200:
                break
            import time
            time.sleep(0.1)
        r = http.post("/v1/completions", json={"model": "int8", "prompt": "The", "max_tokens": 4,
                                               "temperature": 0})
        assert r.status_code == 200 and r.json()["usage"]["completion_tokens"] == 4


def test_the_gate_refuses_above_max_kl_unless_forced(trained, capsys):
    out = trained / "gated"
    assert main(["quantize", str(trained / "base"), "--method", "int4", "--out", str(out), "--max-kl", "0"]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "--max-kl" in err and "--force" in err and not out.exists()
    assert main(["quantize", str(trained / "base"), "--method", "int4", "--out", str(out), "--max-kl", "0",
                 "--force"]) == 0
    assert (out / "quality.json").is_file()


@pytest.mark.parametrize("args, message", [
    (["--method", "int4", "--group-size", "7"], "group-size"),
    (["--method", "int8", "--data", "nowhere"], "no prepared data"),
    (["--method", "int8", "--eval-tokens", "0"], "eval-tokens"),
    (["--method", "int8", "--group-size", "64"], "--group-size is for int4"),
])
def test_bad_quantize_inputs_are_one_line_errors(trained, capsys, args, message):
    out = trained / "bad"
    assert main(["quantize", str(trained / "base"), "--out", str(out), *args]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and message in err and not out.exists()


def test_quantized_runs_are_not_trained_or_quantized_again(trained, capsys):
    assert main(["quantize", str(trained / "int8"), "--method", "int4", "--out", str(trained / "again")]) == 2
    assert "already quantized" in capsys.readouterr().err
    assert main(["quantize", str(trained / "base"), "--method", "int8", "--out", str(trained / "int8")]) == 2
    assert "--overwrite" in capsys.readouterr().err
    (trained / "pairs.jsonl").write_text('{"prompt": "The king ", "completion": "rode out."}\n' * 20)
    assert main(["finetune", str(trained / "int8"), "--data", str(trained / "pairs.jsonl"),
                 "--out", str(trained / "tuned")]) == 2
    assert "cannot be trained" in capsys.readouterr().err
    data = json.loads((trained / "base" / "config.json").read_text())["train"]["data"]
    assert main(["train", f"--data={data}", f"--out={trained / 'tuned2'}", f"--init_from={trained / 'int8'}",
                 "--model=tiny", "--max_steps=1", "--progress=false"]) == 2
    assert "cannot be trained" in capsys.readouterr().err


def test_outputs_that_would_replace_the_run_or_the_current_folder_are_refused(trained, capsys, monkeypatch):
    before = sorted(p.name for p in trained.iterdir())
    for out in (trained, trained / "base", trained / "base" / "inner"):
        assert main(["quantize", str(trained / "base"), "--method", "int8", "--out", str(out), "--overwrite"]) == 2
        assert "--out" in capsys.readouterr().err
        assert main(["export", str(trained / "base"), "--format", "onnx", "--out", str(out), "--force"]) == 2
        assert "--out" in capsys.readouterr().err
    for out in (trained / "base", trained):  # nor a checkpoint read, nor for GGUF and Hugging Face folders
        assert main(["export", str(trained / "int8"), "--format", "hf", "--out", str(out), "--force"]) == 2
        assert main(["export", str(trained / "int4"), "--format", "gguf", "--out", str(out), "--force"]) == 2
        capsys.readouterr()
    checkpoint = next((trained / "base" / "checkpoints").iterdir())
    assert main(["export", str(trained / "base"), "--format", "onnx", "--checkpoint", str(checkpoint),
                 "--out", str(checkpoint), "--force"]) == 2
    assert "which this reads" in capsys.readouterr().err
    monkeypatch.chdir(trained / "int4")
    assert main(["quantize", str(trained / "base"), "--method", "int8", "--out", ".", "--overwrite"]) == 2
    assert "current folder" in capsys.readouterr().err
    assert sorted(p.name for p in trained.iterdir()) == before and (trained / "base" / "model.safetensors").is_file()


@pytest.mark.parametrize("method,group_size", [("int8", None), ("int4", 32), ("int4", 2), ("int4", 64)])
def test_the_one_row_form_of_the_compiled_gpu_step_equals_the_dequantized_product(method, group_size):
    """On CUDA, one row inside the compiled step is computed by _one_row (sums over the stored codes); here it is held
    to the dequantized weight on CPU, for inputs in float32, bfloat16 and float16 large enough that sums of codes
    times inputs would pass float16's range if they were kept in it."""
    torch.manual_seed(0)
    linear = torch.nn.Linear(128, 48, bias=False)
    q = Int8Linear.from_linear(linear) if method == "int8" else Int4Linear.from_linear(linear, group_size)
    for dtype, size in ((torch.float32, 1.0), (torch.bfloat16, 1.0), (torch.float16, 300.0)):
        x = (torch.randn(128) * size).to(dtype)
        want = F.linear(x.double(), q.dequantize().double())
        got = q._one_row(x)
        assert got.dtype == torch.float32 and got.isfinite().all()
        torch.testing.assert_close(got.double(), want, atol=1e-5 * size, rtol=1e-5)


def test_kernel_cache_key_tells_cpus_apart_on_x86_and_arm():
    """The kernels' build folder is keyed by the CPU: two ARM cores of different parts (no "model name" line on ARM)
    or two x86 CPUs with different flags get different keys; the per-core repeats of a line do not matter."""
    from lmforge.cpu.kernels import _cpu_id
    arm = "processor\t: {i}\nFeatures\t: fp asimd {f}\nCPU implementer\t: 0x41\nCPU part\t: {p}\n\n"
    a72 = "".join(arm.format(i=i, f="crc32", p="0xd08") for i in range(4))
    n1 = "".join(arm.format(i=i, f="crc32 sve", p="0xd0c") for i in range(4))
    assert _cpu_id(a72) != _cpu_id(n1)
    assert "0xd08" in _cpu_id(a72) and _cpu_id(a72).count("CPU part") == 1
    x86 = "processor\t: 0\nmodel name\t: AMD EPYC\nflags\t\t: fpu sse2 {f}\n\n"
    assert _cpu_id(x86.format(f="avx2")) != _cpu_id(x86.format(f="avx2 avx512f"))


def test_a_run_that_names_no_data_is_measured_on_the_built_in_held_out_text(tmp_path, capsys):
    """An imported run has no prepared data: the gate measures it on the built-in held-out text (Shakespeare's last
    texts, tokenized with the run's tokenizer) and says so; --data still overrides; a tokenizer that cannot encode
    that text is a one-line error naming --data."""
    from lmforge import BPETokenizer, CharTokenizer
    from lmforge.checkpoint import run_config, save_checkpoint, weights_for_saving, write_json_atomic

    def weights_only_run(path, tok):
        cfg = ModelConfig.preset("tiny", vocab_size=tok.vocab_size)
        path.mkdir()
        write_json_atomic(path / "config.json", run_config(cfg))  # no training config: no data named
        tok.save(path / "tokenizer.json")
        save_checkpoint(path, weights_for_saving(GPT(cfg).state_dict(), True), {"step": 1}, run_config(cfg))
        return path

    run = weights_only_run(tmp_path / "imported", BPETokenizer.train(" ".join(WORDS) * 20, 300))
    assert main(["quantize", str(run), "--method", "int8", "--out", str(tmp_path / "q"), "--eval-tokens", "2048"]) == 0
    out = capsys.readouterr().out
    assert "names no data: measuring on the built-in held-out text" in out and "--data DIR" in out
    report = json.loads((tmp_path / "q" / "quality.json").read_text())
    assert report["data"].startswith("built-in held-out text") and report["tokens"] >= 2048 - 64
    assert 0 <= report["kl_mean"] < 0.05 and lmforge.load(tmp_path / "q")[0].config == lmforge.load(run)[0].config
    (tmp_path / "mine.txt").write_text(" ".join(WORDS) * 200)
    data = prepare(str(tmp_path / "mine.txt"), tmp_path / "mine", tokenizer_from=str(run / "tokenizer.json")).path
    assert main(["quantize", str(run), "--method", "int8", "--out", str(tmp_path / "q3"), "--data", str(data)]) == 0
    assert "names no data" not in capsys.readouterr().out  # --data overrides the built-in text
    assert json.loads((tmp_path / "q3" / "quality.json").read_text())["data"] == str(data)

    chars = weights_only_run(tmp_path / "chars", CharTokenizer.train("abc "))
    assert main(["quantize", str(chars), "--method", "int8", "--out", str(tmp_path / "q2")]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "cannot encode the built-in held-out text" in err and "--data" in err
    assert not (tmp_path / "q2").exists()
