"""ONNX and GGUF export: onnxruntime's logits equal PyTorch's for every position type (prefill, then decode steps
on the cache passed in and out, any batch size), the package's onnxruntime loop reproduces our greedy ids, and
GGUF files read back with the gguf package hold the right names, shapes, types, values and tokenizer."""

import json
from pathlib import Path

import numpy as np
import pytest
import torch

from lmforge import GPT, ModelConfig
from lmforge.checkpoint import run_config, save_checkpoint, weights_for_saving, write_json_atomic
from lmforge.runs import load
from lmforge.cli import main
from lmforge.generation import generate_naive
from lmforge.tokenizer import BPETokenizer, CharTokenizer

TEXT = "the quick brown fox jumps over the lazy dog. pack my box with five dozen liquor jugs! " * 20


def make_run(path: Path, tok, seed: int = 0, **model) -> Path:
    cfg = ModelConfig.preset("tiny", vocab_size=tok.vocab_size, **{"block_size": 32, **model})
    path.mkdir(parents=True)
    write_json_atomic(path / "config.json", run_config(cfg))
    tok.save(path / "tokenizer.json")
    torch.manual_seed(seed)
    model = GPT(cfg)
    with torch.no_grad():  # sharper distributions than init gives: greedy paths are not near-ties
        model.wte.weight.mul_(5)
    save_checkpoint(path, weights_for_saving(model.state_dict(), cfg.tie_embeddings), {"step": 1}, run_config(cfg))
    return path


POSITIONS = [dict(position="learned"), dict(position="sinusoidal", n_kv_head=1),
             dict(position="rope", n_kv_head=2, mlp="swiglu", norm="rmsnorm", bias=False, tie_embeddings=False),
             dict(position="alibi", norm_position="post")]


@pytest.mark.parametrize("settings", POSITIONS, ids=lambda s: s["position"])
def test_onnx_prefill_and_decode_equal_pytorch_and_generation_matches(tmp_path, settings):
    import onnxruntime as ort

    from lmforge.onnx import OnnxModel, export_onnx
    tok = CharTokenizer.train(TEXT)
    run = make_run(tmp_path / "run", tok, **settings)
    out = export_onnx(run, tmp_path / "onnx")
    meta = json.loads((out / "onnx.json").read_text())
    model, _ = load(run)
    n = model.config.n_layer
    decode = ort.InferenceSession(str(out / "decode.onnx"))
    names = [i.name for i in decode.get_inputs()]
    assert names == ["input_ids"] + [f"past_key_values.{i}.{kv}" for i in range(n) for kv in ("key", "value")]
    assert [o.name for o in decode.get_outputs()][1:3] == ["present.0.key", "present.0.value"]
    assert [i["name"] for i in meta["graphs"]["decode"]["inputs"]] == names
    assert decode.get_inputs()[1].shape[2] == "past_sequence"
    onnx_model = OnnxModel(out)
    for batch in (1, 3):  # other batch sizes than the export's, prompts of other lengths, steps of 1 and 2 tokens
        x = torch.randint(0, tok.vocab_size, (batch, 12))
        ref = model(x)[0].detach().numpy()
        logits, cache = onnx_model.prefill(x[:, :7].numpy())
        parts = [logits]
        for a, b in ((7, 8), (8, 10), (10, 12)):
            logits, cache = onnx_model.decode(x[:, a:b].numpy(), cache)
            parts.append(logits)
        assert cache[0].shape == (batch, model.config.kv_heads, 12, model.config.head_dim)
        np.testing.assert_allclose(np.concatenate(parts, axis=1), ref, atol=1e-4, rtol=0)
    prompt = tok.encode("the lazy ")
    ids = onnx_model.generate(prompt, 40)  # past block_size=32: learned and sinusoidal slide their window
    assert ids == generate_naive(model, prompt, 40, temperature=0.0)


def test_generate_on_an_onnx_folder_equals_generate_on_the_run(tmp_path, capsys):
    tok = CharTokenizer.train(TEXT)
    run = make_run(tmp_path / "run", tok)
    assert main(["export", str(run), "--format", "onnx", "--out", str(tmp_path / "onnx")]) == 0
    capsys.readouterr()
    common = ["--prompt", "the quick", "--max-new-tokens", "20", "--temperature", "0", "--stop", "zz"]
    assert main(["generate", str(run), *common]) == 0
    ours = capsys.readouterr().out
    assert main(["generate", str(tmp_path / "onnx"), *common]) == 0
    assert capsys.readouterr().out == ours
    assert main(["generate", str(tmp_path / "onnx"), "--num-beams", "2"]) == 2
    assert "--num-beams" in capsys.readouterr().err
    seeded = ["generate", str(tmp_path / "onnx"), "--temperature", "1", "--seed", "3", "--top-k", "5"]
    assert main(seeded) == 0 and main(seeded) == 0
    first, second = capsys.readouterr().out.split("\n", 1)
    assert second == first + "\n"


def _bpe_run(tmp_path, **model):
    tok = BPETokenizer.train(TEXT, 300)
    return make_run(tmp_path / "bpe", tok, **model), tok


@pytest.mark.parametrize("kind", ["f32", "f16", "q8_0", "q4_0"])
def test_gguf_reads_back_with_names_shapes_types_and_tokenizer(tmp_path, kind):
    import gguf

    from lmforge.families import FAMILIES
    from lmforge.gguf import export_gguf
    gguf_name = lambda name: FAMILIES["gpt2"].gguf_names(name)[0]
    run, tok = _bpe_run(tmp_path)
    path = export_gguf(run, tmp_path / "model.gguf", kind)
    reader = gguf.GGUFReader(str(path))
    model, _ = load(run)
    field = lambda name: reader.fields[name]
    assert bytes(field("general.architecture").parts[-1]).decode() == "gpt2"
    assert int(field("gpt2.block_count").parts[-1][0]) == model.config.n_layer
    assert int(field("gpt2.context_length").parts[-1][0]) == model.config.block_size
    tokens = [bytes(field("tokenizer.ggml.tokens").parts[i]).decode() for i in field("tokenizer.ggml.tokens").data]
    merges = [bytes(field("tokenizer.ggml.merges").parts[i]).decode() for i in field("tokenizer.ggml.merges").data]
    vocab, expected_merges = tok.vocab_and_merges()
    assert tokens == sorted(vocab, key=vocab.get) and merges == expected_merges
    assert int(field("tokenizer.ggml.eos_token_id").parts[-1][0]) == tok.eot_id
    tensors = {t.name: t for t in reader.tensors}
    state = {k: v for k, v in model.state_dict().items() if k != "lm_head.weight"}
    assert set(tensors) == {gguf_name(k) for k in state}
    quant = {"f32": gguf.GGMLQuantizationType.F32, "f16": gguf.GGMLQuantizationType.F16,
             "q8_0": gguf.GGMLQuantizationType.Q8_0, "q4_0": gguf.GGMLQuantizationType.Q4_0}[kind]
    for name, value in state.items():
        t = tensors[gguf_name(name)]
        assert tuple(int(d) for d in t.shape) == tuple(reversed(value.shape))  # ggml lists the fastest axis first
        matrix = value.dim() == 2 and value.shape[1] % 32 == 0
        assert t.tensor_type == (quant if matrix else gguf.GGMLQuantizationType.F32)
        data = gguf.quants.dequantize(t.data, t.tensor_type).reshape(value.shape)
        step = {"f32": 0, "f16": 2 ** -10, "q8_0": 1 / 127, "q4_0": 1 / 7}[kind] * value.abs().max().item()
        np.testing.assert_allclose(data, value.numpy(), atol=step + 1e-7, rtol=0)


def test_exports_refuse_what_they_cannot_hold(tmp_path, capsys):
    run, _ = _bpe_run(tmp_path, position="rope")
    assert main(["export", str(run), "--format", "gguf", "--out", str(tmp_path / "m.gguf")]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "position='rope' (gpt2: 'learned')" in err and "llama.cpp" in err
    char = make_run(tmp_path / "char", CharTokenizer.train(TEXT))
    assert main(["export", str(char), "--format", "onnx", "--type", "q8_0", "--out", str(tmp_path / "o")]) == 2
    assert "--type is for --format gguf" in capsys.readouterr().err
    assert not (tmp_path / "m.gguf").exists() and not (tmp_path / "c.gguf").exists()


def test_quantized_runs_are_not_exported_to_onnx_or_gguf(tmp_path, capsys):
    run = make_run(tmp_path / "run", CharTokenizer.train(TEXT))
    config = json.loads((run / "config.json").read_text())
    config["quantization"] = {"method": "int8", "group_size": None, "source": "runs/base"}
    (run / "config.json").write_text(json.dumps(config))
    for fmt, out in (("onnx", "o"), ("gguf", "g.gguf"), ("hf", "h")):
        assert main(["export", str(run), "--format", fmt, "--out", str(tmp_path / out)]) == 2
        err = capsys.readouterr().err
        assert err.count("\n") == 1 and "quantized (int8)" in err and "runs/base" in err


def test_without_the_export_extra_the_error_names_it(tmp_path, capsys, monkeypatch):
    import sys
    run = make_run(tmp_path / "run", CharTokenizer.train(TEXT))
    bpe, _ = _bpe_run(tmp_path)
    for module, argv in (("onnxscript", [str(run), "--format", "onnx", "--out", str(tmp_path / "o")]),
                         ("gguf", [str(bpe), "--format", "gguf", "--out", str(tmp_path / "g.gguf")])):
        monkeypatch.setitem(sys.modules, module, None)  # import fails as if it were not installed
        assert main(["export", *argv]) == 2
        err = capsys.readouterr().err
        assert err.count("\n") == 1 and "pip install 'lmforge[export]'" in err
        monkeypatch.delitem(sys.modules, module)


def test_force_replaces_the_output_and_never_a_run_named_like_its_backup(tmp_path):
    from lmforge.onnx import export_onnx
    tok = CharTokenizer.train(TEXT)
    run = make_run(tmp_path / "m.old", tok)  # the name a careless replace would move the old output to
    (tmp_path / "m").mkdir()
    (tmp_path / "m" / "stale.txt").write_text("old output")
    export_onnx(run, tmp_path / "m", force=True)
    assert (tmp_path / "m" / "decode.onnx").is_file() and not (tmp_path / "m" / "stale.txt").exists()
    assert (run / "config.json").is_file() and load(run)[0] is not None
    assert sorted(p.name for p in tmp_path.iterdir()) == ["m", "m.old"]
