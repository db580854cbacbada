"""Hugging Face interop: a GPT-2-shaped run exported as a GPT2LMHeadModel folder gives our logits in transformers, its
tokenizer loads with AutoTokenizer and encodes as ours; a LoRA adapter in PEFT's format gives our logits through
peft.PeftModel; a run GPT-2 cannot express is refused with the fields that differ."""

import json

import pytest
import torch

import lmforge
import lmforge.data
from lmforge import GPT, BPETokenizer, ModelConfig
from lmforge.checkpoint import run_config, save_checkpoint, weights_for_saving, write_json_atomic
from lmforge.runs import load
from lmforge.cli import main
from lmforge.hf import export_hf

transformers = pytest.importorskip("transformers")

TEXT = "the cat sat on the mat. the dog sat on the log! 12 cats, 3 dogs; é è 🙂\n" * 40


def make_run(path, tok, **model):
    cfg = ModelConfig.preset("tiny", vocab_size=tok.vocab_size, **model)
    path.mkdir()
    write_json_atomic(path / "config.json", run_config(cfg))
    tok.save(path / "tokenizer.json")
    torch.manual_seed(0)
    save_checkpoint(path, weights_for_saving(GPT(cfg).state_dict(), cfg.tie_embeddings), {"step": 1}, run_config(cfg))
    return path


def test_an_exported_run_gives_our_logits_and_tokens_in_transformers(tmp_path):
    tok = BPETokenizer.train(TEXT, 300)
    run = make_run(tmp_path / "run", tok)
    out = export_hf(run, tmp_path / "hf")
    hf = transformers.GPT2LMHeadModel.from_pretrained(out).eval()
    model, _ = load(run)
    x = torch.randint(0, tok.vocab_size, (2, 40))
    with torch.no_grad():
        torch.testing.assert_close(hf(x).logits, model(x)[0], atol=1e-4, rtol=0)
    hf_tok = transformers.AutoTokenizer.from_pretrained(out)
    for text in (TEXT[:200], " leading space", "tabs\tand\nnewlines  "):
        assert hf_tok.encode(text) == tok.encode(text)
    assert hf_tok.eos_token_id == tok.eot_id


def test_a_run_gpt2_cannot_express_is_refused_with_its_fields(tmp_path, capsys):
    tok = BPETokenizer.train(TEXT, 300)
    run = make_run(tmp_path / "run", tok, position="rope", norm="rmsnorm")
    assert main(["export", str(run), "--format", "hf", "--out", str(tmp_path / "hf")]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "position='rope' (gpt2: 'learned')" in err and "norm='rmsnorm'" in err
    assert not (tmp_path / "hf").exists()


def test_a_lora_adapter_in_peft_format_gives_our_logits(tmp_path):
    peft = pytest.importorskip("peft")
    from lmforge.finetune import finetune
    (tmp_path / "corpus.txt").write_text(TEXT * 5)
    prepared = lmforge.data.prepare(str(tmp_path / "corpus.txt"), tmp_path / "data", tokenizer="bpe:300").path
    lmforge.train(lmforge.TrainConfig(data=str(prepared), out=str(tmp_path / "base"), model={"preset": "tiny"},
                                      max_steps=2, block_size=32, batch_size=2, eval_interval=2, eval_steps=1,
                                      progress=False, sample_tokens=0))
    pairs = [{"prompt": f"the cat {i} ", "completion": "sat on the mat."} for i in range(20)]
    (tmp_path / "pairs.jsonl").write_text("".join(json.dumps(p) + "\n" for p in pairs))
    finetune(tmp_path / "base", str(tmp_path / "pairs.jsonl"), str(tmp_path / "tuned"),
             overrides={"max_steps": "3", "eval_interval": "3", "progress": "false", "lr": "1e-2"},
             lora={"rank": 4, "alpha": 8, "targets": "c_attn,mlp", "dropout": 0.0})
    export_hf(tmp_path / "base", tmp_path / "hf")
    hf = peft.PeftModel.from_pretrained(transformers.GPT2LMHeadModel.from_pretrained(tmp_path / "hf"),
                                        tmp_path / "tuned" / "peft").eval()
    ours, _ = load(tmp_path / "tuned")
    base, _ = load(tmp_path / "base")
    x = torch.randint(0, ours.config.vocab_size, (2, 24))
    with torch.no_grad():
        assert not torch.allclose(ours(x)[0], base(x)[0], atol=1e-3)  # the adapter does something
        torch.testing.assert_close(hf(x).logits, ours(x)[0], atol=1e-4, rtol=0)


def _hf_checkpoint(folder, tok, safe=True):
    """A random GPT-2 made and saved by transformers itself, with our BPE tokenizer's files beside it."""
    from lmforge.hf import write_hf_tokenizer
    torch.manual_seed(1)
    cfg = transformers.GPT2Config(vocab_size=tok.vocab_size, n_positions=64, n_embd=48, n_layer=2, n_head=4,
                                  bos_token_id=tok.eot_id, eos_token_id=tok.eot_id)
    hf = transformers.GPT2LMHeadModel(cfg).eval()
    hf.save_pretrained(folder, safe_serialization=safe)
    write_hf_tokenizer(tok, folder, 64)
    return hf


@pytest.mark.parametrize("safe", [True, False])
def test_a_transformers_gpt2_imports_with_its_logits_and_greedy_ids(tmp_path, safe):
    from lmforge.generation import decode_ids
    from lmforge.hf import import_hf
    tok = BPETokenizer.train(TEXT, 300)
    hf = _hf_checkpoint(tmp_path / "hf", tok, safe)
    run = import_hf(tmp_path / "hf", tmp_path / "run")
    model, loaded_tok = load(run)
    assert loaded_tok.ranks == tok.ranks and loaded_tok.eot_id == tok.eot_id
    x = torch.randint(0, tok.vocab_size, (2, 30))
    with torch.no_grad():
        torch.testing.assert_close(model(x)[0], hf(x).logits, atol=1e-4, rtol=0)
        want = hf.generate(x[:1, :8], max_new_tokens=20, do_sample=False, pad_token_id=tok.eot_id,
                           eos_token_id=None)[0, 8:].tolist()
    assert decode_ids(model, [x[0, :8].tolist()], 20, temperature=0)[0] == want


def test_hf_to_lmforge_to_hf_is_bit_exact(tmp_path):
    from safetensors.torch import load_file

    from lmforge.hf import import_hf
    tok = BPETokenizer.train(TEXT, 300)
    _hf_checkpoint(tmp_path / "hf", tok)
    export_hf(import_hf(tmp_path / "hf", tmp_path / "run"), tmp_path / "back")
    a, b = load_file(str(tmp_path / "hf" / "model.safetensors")), load_file(str(tmp_path / "back" / "model.safetensors"))
    a = {k: v for k, v in a.items() if not k.endswith((".attn.bias", ".attn.masked_bias")) and k != "lm_head.weight"}
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    assert (tmp_path / "hf" / "merges.txt").read_text() == (tmp_path / "back" / "merges.txt").read_text()


def test_bad_imports_are_one_line_errors(tmp_path, capsys, monkeypatch):
    from safetensors.torch import load_file, save_file
    tok = BPETokenizer.train(TEXT, 300)
    (tmp_path / "empty").mkdir()
    assert main(["import-hf", str(tmp_path / "empty"), "--out", str(tmp_path / "o")]) == 2
    assert "has no config.json" in capsys.readouterr().err
    _hf_checkpoint(tmp_path / "hf", tok)
    capsys.readouterr()  # transformers' own progress output while saving
    state = load_file(str(tmp_path / "hf" / "model.safetensors"))
    state["transformer.h.1.mlp.c_fc.weight"] = state["transformer.h.1.mlp.c_fc.weight"][:, :-1].contiguous()
    save_file(state, str(tmp_path / "hf" / "model.safetensors"))
    assert main(["import-hf", str(tmp_path / "hf"), "--out", str(tmp_path / "o")]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "transformer.h.1.mlp.c_fc.weight has shape" in err
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    assert main(["import-hf", "some-user/not-a-cached-model", "--out", str(tmp_path / "o")]) == 2
    assert "pass a local folder" in capsys.readouterr().err
    assert not (tmp_path / "o").exists()


@pytest.mark.parametrize("num_beams, early_stopping, length_penalty", [
    (4, True, 0.5), (4, True, 1.0), (4, True, 2.0), (2, False, 1.0), (3, "never", 2.0), (1, "never", 2.0)])
def test_beam_search_equals_transformers_generate_with_early_stopping(tmp_path, num_beams, early_stopping,
                                                                      length_penalty):
    from lmforge.generation import beam_search
    from lmforge.hf import import_hf
    tok = BPETokenizer.train(TEXT, 300)
    hf = _hf_checkpoint(tmp_path / "hf", tok)
    with torch.no_grad():  # sharper, and end-of-text likely: hypotheses end at different lengths and beams prune
        hf.transformer.wte.weight.mul_(8)
        hf.transformer.wte.weight[tok.eot_id] *= 6
    hf.save_pretrained(tmp_path / "hf")
    model = GPT.from_pretrained(str(tmp_path / "hf"))
    assert load(import_hf(tmp_path / "hf", tmp_path / "run"))[0].state_dict().keys() == model.state_dict().keys()
    g = torch.Generator().manual_seed(0)
    ended, checked_cli = 0, False
    hf_tok = transformers.AutoTokenizer.from_pretrained(tmp_path / "hf")
    for _ in range(6):
        prompt = torch.randint(0, tok.vocab_size, (1, 5), generator=g)
        with torch.no_grad():
            want = hf.generate(prompt, num_beams=num_beams, early_stopping=early_stopping, length_penalty=length_penalty,
                               max_new_tokens=10, do_sample=False, eos_token_id=tok.eot_id,
                               pad_token_id=tok.eot_id)[0, 5:].tolist()
        if tok.eot_id in want:
            want, ended = want[:want.index(tok.eot_id) + 1], ended + 1
        got = beam_search(model, prompt[0].tolist(), 10, num_beams, length_penalty, tok.eot_id,
                          early_stopping=early_stopping)
        assert got == want
        prompt_text = hf_tok.decode(prompt[0].tolist())
        if num_beams > 1 and not checked_cli and hf_tok.encode(prompt_text) == prompt[0].tolist():
            checked_cli = True  # the same through lmforge generate, once per setting (a prompt whose text encodes
            import contextlib   # back to its ids)
            import io
            text = io.StringIO()
            with contextlib.redirect_stdout(text):
                assert main(["generate", str(tmp_path / "run"), "--prompt", prompt_text, "--num-beams",
                             str(num_beams), "--length-penalty", str(length_penalty), "--max-new-tokens", "10",
                             "--early-stopping", str(early_stopping).lower()]) == 0
            assert text.getvalue() == prompt_text + hf_tok.decode([t for t in want if t != tok.eot_id]) + "\n"
    if early_stopping is True:  # the comparison covers hypotheses that end early, not only full-length ones
        assert ended >= 2
    assert checked_cli or num_beams == 1


def test_the_full_gpt2_shape_imports_with_transformers_logits(tmp_path):
    """GPT-2 124M's exact shape (random weights made by transformers): logits and the tied output layer."""
    from lmforge.hf import import_hf
    tok = BPETokenizer.train(TEXT, 300)
    torch.manual_seed(0)
    hf = transformers.GPT2LMHeadModel(transformers.GPT2Config()).eval()  # vocab 50257, 12 x 768, 1024 positions
    hf.save_pretrained(tmp_path / "hf")
    from lmforge.hf import write_hf_tokenizer
    write_hf_tokenizer(tok, tmp_path / "hf", 1024)
    model, _ = load(import_hf(tmp_path / "hf", tmp_path / "run"))
    assert model.config.n_layer == 12 and model.config.n_embd == 768 and model.config.vocab_size == 50257
    assert model.num_params() == sum(p.numel() for p in hf.parameters())
    x = torch.randint(0, 50257, (1, 64))
    with torch.no_grad():
        torch.testing.assert_close(model(x)[0], hf(x).logits, atol=1e-4, rtol=0)


def test_a_weights_only_folder_loads_as_a_model_and_imports_with_a_named_tokenizer(tmp_path, capsys):
    """config.json + model.safetensors, what save_pretrained of a model alone writes: from_pretrained gives the model
    (transformers' logits); import-hf asks for --tokenizer with a one-line error, and takes a tokenizer folder, our
    tokenizer.json, or GPT-2's own ranks (gpt2); a tokenizer larger than the model's vocabulary is refused."""
    from lmforge.hf import import_hf
    tok = BPETokenizer.train(TEXT, 300)
    torch.manual_seed(0)
    hf = transformers.GPT2LMHeadModel(transformers.GPT2Config(
        vocab_size=tok.vocab_size, n_positions=64, n_embd=32, n_layer=2, n_head=2)).eval()
    hf.save_pretrained(tmp_path / "weights")
    assert not any((tmp_path / "weights" / f).exists() for f in ("vocab.json", "merges.txt", "tokenizer.json"))
    model = GPT.from_pretrained(str(tmp_path / "weights"))
    x = torch.randint(0, tok.vocab_size, (2, 20))
    with torch.no_grad():
        torch.testing.assert_close(model(x)[0], hf(x).logits, atol=1e-4, rtol=0)
    capsys.readouterr()

    assert main(["import-hf", str(tmp_path / "weights"), "--out", str(tmp_path / "run")]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "--tokenizer gpt2" in err and "--tokenizer PATH" in err, err
    assert not (tmp_path / "run").exists()

    from lmforge.hf import write_hf_tokenizer
    (tmp_path / "tok").mkdir()
    write_hf_tokenizer(tok, tmp_path / "tok", 64)  # vocab.json + merges.txt
    tok.save(tmp_path / "ours.json")
    for i, spec in enumerate([tmp_path / "tok", tmp_path / "ours.json"]):
        assert main(["import-hf", str(tmp_path / "weights"), "--out", str(tmp_path / f"run{i}"),
                     "--tokenizer", str(spec)]) == 0
        loaded, loaded_tok = load(tmp_path / f"run{i}")
        assert loaded_tok.ranks == tok.ranks and loaded_tok.encode(TEXT) == tok.encode(TEXT)
        with torch.no_grad():
            torch.testing.assert_close(loaded(x)[0], hf(x).logits, atol=1e-4, rtol=0)

    gpt2_shaped = tmp_path / "gpt2-vocab"  # GPT-2's vocabulary size, so its own tokenizer fits
    transformers.GPT2LMHeadModel(transformers.GPT2Config(n_positions=32, n_embd=16, n_layer=1, n_head=2)
                                 ).save_pretrained(gpt2_shaped)
    run = import_hf(gpt2_shaped, tmp_path / "gpt2-run", tokenizer="gpt2")
    assert load(run)[1].encode("Hello world") == [15496, 995]  # GPT-2's own ids
    capsys.readouterr()
    assert main(["import-hf", str(tmp_path / "weights"), "--out", str(tmp_path / "bad"), "--tokenizer", "gpt2"]) == 2
    assert f"50257 tokens, the model {tok.vocab_size}" in capsys.readouterr().err
    assert main(["import-hf", str(tmp_path / "weights"), "--out", str(tmp_path / "bad"),
                 "--tokenizer", str(tmp_path / "missing.json")]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "no such file" in err and not (tmp_path / "bad").exists()

    import tokenizers  # tokenizer.json files of other layouts come in through the tokenizers library itself
    from tokenizers import models, pre_tokenizers, trainers
    words = tokenizers.Tokenizer(models.BPE())
    words.pre_tokenizer = pre_tokenizers.Whitespace()
    words.train_from_iterator([TEXT], trainers.BpeTrainer(vocab_size=100))
    words.save(str(tmp_path / "words.json"))
    assert main(["import-hf", str(tmp_path / "weights"), "--out", str(tmp_path / "bad"),
                 "--tokenizer", str(tmp_path / "words.json")]) == 2
    err = capsys.readouterr().err  # no end-of-sequence token: named, with the fix
    assert err.count("\n") == 1 and "no end-of-sequence token" in err and str(tmp_path / "words.json") in err, err
    other_layout = tokenizers.Tokenizer(models.BPE())
    other_layout.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    other_layout.decoder = tokenizers.decoders.ByteLevel()
    other_layout.train_from_iterator([TEXT], trainers.BpeTrainer(vocab_size=300, special_tokens=["<|endoftext|>"],
                                                                 initial_alphabet=pre_tokenizers.ByteLevel.alphabet()))
    other_layout.save(str(tmp_path / "other.json"))
    assert main(["import-hf", str(tmp_path / "weights"), "--out", str(tmp_path / "other-run"),
                 "--tokenizer", str(tmp_path / "other.json")]) == 0
    theirs = load(tmp_path / "other-run")[1]
    assert type(theirs).__name__ == "HFTokenizer" and theirs.eot_id == other_layout.token_to_id("<|endoftext|>")
    assert theirs.encode(TEXT) == other_layout.encode(TEXT).ids and theirs.decode(theirs.encode(TEXT)) == TEXT
