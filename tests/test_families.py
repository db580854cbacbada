"""The open families in and out, each against transformers built inside the test: Llama (with Llama 3.1's RoPE
scaling, tied), Mistral (untied), Qwen2 (q, k, v biases) and Qwen3 (QK-norm, a head width of its own), saved in
shards. Imported: transformers' logits, its greedy ids, cached decoding equal to the full forward. Exported: the
family's folder gives our logits in AutoModelForCausalLM and the round trip is bit-exact. Runs trained here (the
demo's block, `modern`, Qwen2's) export with their tokenizer; LoRA adapters load in PEFT; GGUF reads back; bad
folders are one-line errors."""

import json
import time

import numpy as np
import pytest
import torch

from lmforge import GPT, BPETokenizer, CharTokenizer, ModelConfig
from lmforge.checkpoint import run_config, save_checkpoint, weights_for_saving, write_json_atomic
from lmforge.cli import main
from lmforge.generation import decode_ids
from lmforge.hf import export_hf, import_hf, load_hf_model
from lmforge.runs import load

transformers = pytest.importorskip("transformers")

COMMON = dict(vocab_size=300, hidden_size=64, intermediate_size=96, num_hidden_layers=2, num_attention_heads=4,
              num_key_value_heads=2, max_position_embeddings=128, bos_token_id=0, eos_token_id=1)
LLAMA3_ROPE = {"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
               "original_max_position_embeddings": 32}
CASES = {
    "llama": lambda: transformers.LlamaConfig(**COMMON, rope_scaling=LLAMA3_ROPE, tie_word_embeddings=True),
    "mistral": lambda: transformers.MistralConfig(**COMMON, sliding_window=None, rope_theta=1e6),
    "qwen2": lambda: transformers.Qwen2Config(**COMMON, tie_word_embeddings=True),
    "qwen3": lambda: transformers.Qwen3Config(**COMMON, head_dim=32),
}
TEXT = "the cat sat on the mat. the dog sat on the log! 12 cats, 3 dogs; é è 🙂\n" * 40


def hf_model(kind: str, folder, dtype=torch.float32, shard="40KB"):
    """A random transformers model of the family, every weight and bias perturbed off its init, saved in shards."""
    torch.manual_seed(0)
    hf = transformers.AutoModelForCausalLM.from_config(CASES[kind]()).eval()
    with torch.no_grad():
        for p in hf.parameters():
            p.add_(torch.randn_like(p) * 0.05)
    hf = hf.to(dtype)
    hf.save_pretrained(folder, max_shard_size=shard)
    return hf


@pytest.mark.parametrize("kind", list(CASES))
def test_each_family_imports_with_transformers_logits_greedy_ids_and_cached_decoding(tmp_path, kind):
    hf = hf_model(kind, tmp_path / "hf")
    assert (tmp_path / "hf" / "model.safetensors.index.json").is_file()  # sharded
    model = GPT.from_pretrained(str(tmp_path / "hf"))
    x = torch.randint(0, 150, (2, 40))
    with torch.no_grad():
        torch.testing.assert_close(model(x)[0], hf(x).logits, atol=1e-4, rtol=0)
        want = hf.generate(x[:1, :6], max_new_tokens=24, do_sample=False, eos_token_id=None,
                           pad_token_id=0)[0, 6:].tolist()
        assert decode_ids(model, [x[0, :6].tolist()], 24, temperature=0)[0] == want
        full = model(x)[0]
        cache = model.make_kv_cache(2, 40)
        stepped = [model(x[:, :10], kv_cache=cache)[0]]
        for t in range(10, 40):
            stepped.append(model(x[:, t:t + 1], kv_cache=cache, positions=torch.tensor([[t]]))[0])
        torch.testing.assert_close(torch.cat(stepped, 1), full, atol=1e-5, rtol=0)


@pytest.mark.parametrize("kind", list(CASES))
def test_each_family_exports_to_transformers_and_round_trips_bit_exact(tmp_path, kind):
    from safetensors.torch import load_file
    hf = hf_model(kind, tmp_path / "hf", shard="10MB")
    run = import_hf(tmp_path / "hf", tmp_path / "run", tokenizer=_byte_level_tokenizer(tmp_path))
    out = export_hf(run, tmp_path / "back")
    back = transformers.AutoModelForCausalLM.from_pretrained(out).eval()
    assert type(back).__name__ == ("LlamaForCausalLM" if kind == "mistral" else type(hf).__name__)  # no window
    ours, _ = load(run)
    x = torch.randint(0, 150, (2, 30))
    with torch.no_grad():
        torch.testing.assert_close(back(x).logits, ours(x)[0], atol=1e-4, rtol=0)
    a, b = load_file(str(tmp_path / "hf" / "model.safetensors")), load_file(str(out / "model.safetensors"))
    if hf.config.tie_word_embeddings:
        a.pop("lm_head.weight", None)
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def test_bf16_checkpoints_stay_bf16_with_dtype_auto_and_round_trip_bit_exact(tmp_path, capsys):
    from safetensors.torch import load_file
    hf = hf_model("qwen3", tmp_path / "hf", torch.bfloat16, shard="10MB")
    assert load_hf_model(tmp_path / "hf").wte.weight.dtype == torch.float32  # the default
    model = load_hf_model(tmp_path / "hf", dtype="auto")
    assert {p.dtype for p in model.parameters()} == {torch.bfloat16}
    x = torch.randint(0, 150, (1, 20))
    with torch.no_grad():
        torch.testing.assert_close(model(x)[0].float(), hf(x).logits.float(), atol=0.05, rtol=0)
    tok = _byte_level_tokenizer(tmp_path)
    assert main(["import-hf", str(tmp_path / "hf"), "--out", str(tmp_path / "run"), "--dtype", "auto",
                 "--tokenizer", str(tok)]) == 0
    assert {t.dtype for t in load_file(str(tmp_path / "run" / "model.safetensors")).values()} == {torch.bfloat16}
    a, b = load_file(str(tmp_path / "hf" / "model.safetensors")), load_file(
        str(export_hf(tmp_path / "run", tmp_path / "back") / "model.safetensors"))
    assert a.keys() == b.keys() and all(a[k].dtype == b[k].dtype and torch.equal(a[k], b[k]) for k in a)
    assert json.loads((tmp_path / "back" / "config.json").read_text())["torch_dtype"] == "bfloat16"


# ------------------------------------------------------------------------------------------- runs trained here

def make_run(path, tok, seed=0, **model):
    cfg = ModelConfig.preset("tiny", vocab_size=tok.vocab_size, **model)
    path.mkdir()
    write_json_atomic(path / "config.json", run_config(cfg))
    tok.save(path / "tokenizer.json")
    torch.manual_seed(seed)
    gpt = GPT(cfg)
    with torch.no_grad():
        for p in gpt.parameters():
            p.add_(torch.randn_like(p) * 0.05)  # norms and biases off their init too
    save_checkpoint(path, weights_for_saving(gpt.state_dict(), cfg.tie_embeddings), {"step": 1}, run_config(cfg))
    return path


DEMO = dict(position="rope", mlp="swiglu", norm="rmsnorm", bias=False)  # the Llama block
RUNS = {
    "llama": (DEMO, "char"),
    "qwen3": (dict(preset="modern-tiny"), "bpe"),
    "qwen3-demo": ({**DEMO, "qk_norm": True}, "char"),  # configs/shakespeare-char.toml's block: Llama's with QK-norm
    "qwen2": ({**DEMO, "attn_bias": True, "n_kv_head": 2, "tie_embeddings": False}, "bpe"),
    "llama-scaled": ({**DEMO, "rope_scaling": {"type": "linear", "factor": 2.0}}, "char"),
}


def _run_of(tmp_path, name):
    fields, kind = RUNS[name]
    tok = CharTokenizer.train(TEXT) if kind == "char" else BPETokenizer.train(TEXT, 300)
    if "preset" in fields:
        cfg = ModelConfig.preset(fields["preset"], vocab_size=tok.vocab_size)
        fields = {k: v for k, v in cfg.to_dict().items() if k not in ("vocab_size",)}
    return make_run(tmp_path / "run", tok, **fields), tok


@pytest.mark.parametrize("name", list(RUNS))
def test_a_run_trained_here_exports_as_its_family_with_its_tokenizer(tmp_path, name):
    run, tok = _run_of(tmp_path, name)
    out = export_hf(run, tmp_path / "hf")
    family = name.split("-")[0]
    assert json.loads((out / "config.json").read_text())["model_type"] == family
    hf = transformers.AutoModelForCausalLM.from_pretrained(out).eval()
    ours, _ = load(run)
    x = torch.randint(0, tok.vocab_size, (2, 50))
    with torch.no_grad():
        torch.testing.assert_close(hf(x).logits, ours(x)[0], atol=1e-4, rtol=0)
    # transformers 5's AutoTokenizer gives a qwen2 / qwen3 folder Qwen's own split pattern whatever its
    # tokenizer.json says; PreTrainedTokenizerFast reads the file as written (docs/interop.md says so)
    reader = transformers.AutoTokenizer if family in ("llama", "gpt2") else transformers.PreTrainedTokenizerFast
    hf_tok = reader.from_pretrained(out)
    for text in (TEXT[:300], " the  log ", "cats;\n\n dogs  ", "<|endoftext|>the cat"):
        assert hf_tok(text, add_special_tokens=False).input_ids == (
            tok.encode(text) if "<|" not in text else [tok.eot_id] + tok.encode("the cat"))
        assert hf_tok.decode(tok.encode(text[:40]) if "<|" not in text else []) == (text[:40] if "<|" not in text
                                                                                   else "")
    assert hf_tok.eos_token_id == tok.eot_id


def test_a_run_no_family_holds_is_refused_with_the_closest_families(tmp_path, capsys):
    run = make_run(tmp_path / "run", CharTokenizer.train(TEXT), **{**DEMO, "norm_position": "post"})
    for fmt, out in (("hf", "hf"), ("gguf", "m.gguf")):
        assert main(["export", str(run), "--format", fmt, "--out", str(tmp_path / out)]) == 2
        err = capsys.readouterr().err
        assert err.count("\n") == 1 and "fits none of the families" in err, err
        assert "llama differs in norm_position='post' (llama: 'pre')" in err
        assert not (tmp_path / out).exists()


def test_lora_adapters_of_every_family_load_in_peft_with_our_logits(tmp_path):
    peft = pytest.importorskip("peft")
    from lmforge.hf import save_peft_adapter
    from lmforge.lora import apply_lora
    for name in ("llama", "qwen2", "qwen3"):
        folder = tmp_path / name
        folder.mkdir()
        run, tok = _run_of(folder, name)
        base = export_hf(run, folder / "hf")
        model, _ = load(run)
        apply_lora(model, "attn,mlp", 4, 8.0)
        torch.manual_seed(1)
        with torch.no_grad():
            for n, p in model.named_parameters():
                if "lora_B" in n:
                    p.normal_(0, 0.1)
        modules = [n for n, m in model.named_modules() if type(m).__name__ == "LoRALinear"]
        save_peft_adapter(model, {"modules": modules, "rank": 4, "alpha": 8.0}, folder / "peft")
        hf = peft.PeftModel.from_pretrained(transformers.AutoModelForCausalLM.from_pretrained(base),
                                            folder / "peft").eval()
        x = torch.randint(0, tok.vocab_size, (2, 24))
        with torch.no_grad():
            torch.testing.assert_close(hf(x).logits, model.eval()(x)[0], atol=1e-4, rtol=0)


# ------------------------------------------------------------------------------------------------------- GGUF

@pytest.mark.parametrize("name", ["llama", "qwen3", "qwen2"])
def test_gguf_of_each_family_reads_back_with_permuted_heads_and_the_tokenizer(tmp_path, name):
    gguf = pytest.importorskip("gguf")
    from lmforge.families import permute_pairs
    from lmforge.gguf import export_gguf
    run, tok = _run_of(tmp_path, name)
    path = export_gguf(run, tmp_path / "m.gguf", "f32")
    reader = gguf.GGUFReader(str(path))
    field = lambda key: reader.fields[key].parts[-1]
    arch = bytes(field("general.architecture")).decode()
    assert arch == name
    model, _ = load(run)
    c = model.config
    assert int(field(f"{arch}.attention.head_count_kv")[0]) == c.kv_heads
    assert int(field(f"{arch}.rope.dimension_count")[0]) == c.head_dim
    assert float(field(f"{arch}.rope.freq_base")[0]) == c.rope_theta
    tensors = {t.name: t for t in reader.tensors}
    data = lambda n: np.asarray(tensors[n].data).reshape([int(d) for d in reversed(tensors[n].shape)])
    q, k, _ = model.blocks[1].attn.c_attn.weight.detach().split([c.n_head * c.head_dim, c.kv_heads * c.head_dim,
                                                                 c.kv_heads * c.head_dim])
    if name == "llama":  # llama.cpp's llama rotates GPT-J's pairs: rows permuted as its own converter does
        q, k = permute_pairs(q, c.n_head), permute_pairs(k, c.kv_heads)
    np.testing.assert_array_equal(data("blk.1.attn_q.weight"), q.numpy())
    np.testing.assert_array_equal(data("blk.1.attn_k.weight"), k.numpy())
    gate, up = model.blocks[0].mlp.c_fc.weight.detach().chunk(2)
    np.testing.assert_array_equal(data("blk.0.ffn_gate.weight"), gate.numpy())
    np.testing.assert_array_equal(data("blk.0.ffn_up.weight"), up.numpy())
    assert ("blk.0.attn_q_norm.weight" in tensors) == (name == "qwen3")
    assert ("blk.0.attn_q.bias" in tensors) == (name == "qwen2")
    assert ("output.weight" in tensors) == (not c.tie_embeddings)
    tokens = [bytes(reader.fields["tokenizer.ggml.tokens"].parts[i]).decode()
              for i in reader.fields["tokenizer.ggml.tokens"].data]
    model_kind = bytes(field("tokenizer.ggml.model")).decode()
    if isinstance(tok, CharTokenizer):  # SentencePiece pieces: one per character, a space as U+2581
        assert model_kind == "llama" and tokens[:len(tok.chars)] == [ch.replace(" ", "\u2581") for ch in tok.chars]
        assert not bool(field("tokenizer.ggml.add_space_prefix")[0])
    else:
        vocab, _ = tok.vocab_and_merges()
        assert model_kind == "gpt2" and tokens == sorted(vocab, key=vocab.get)


def test_gguf_of_llama3_scaling_carries_its_rope_factors(tmp_path):
    gguf = pytest.importorskip("gguf")
    from lmforge.gguf import write_gguf
    from lmforge.hf import load_hf_model
    hf_model("llama", tmp_path / "hf")
    model = load_hf_model(tmp_path / "hf")
    tok = CharTokenizer([chr(0x4E00 + i) for i in range(299)], {"<|endoftext|>": 299})  # the model's 300 ids
    path = write_gguf(model, tok, tmp_path / "m.gguf")
    reader = gguf.GGUFReader(str(path))
    factors = np.asarray(next(t for t in reader.tensors if t.name == "rope_freqs.weight").data)
    plain = 1.0 / 10000.0 ** (torch.arange(0, 16, 2).float() / 16)
    np.testing.assert_allclose(plain.numpy() / factors, model.rotary.inv_freq.numpy(), rtol=1e-6)
    assert factors.min() == 1.0 and factors.max() == 8.0  # short wavelengths kept, long ones divided by factor



def test_gguf_pads_a_vocabulary_smaller_than_the_model_and_refuses_what_llama_cpp_cannot_read(tmp_path, capsys):
    """A model with more rows than its tokenizer has tokens (a vocabulary rounded up for speed) gets unused
    [PAD<id>] tokens, so llama.cpp's vocabulary matches token_embd; llama3 RoPE factors outside llama, refused."""
    gguf = pytest.importorskip("gguf")
    from lmforge.errors import UserError
    from lmforge.gguf import write_gguf
    tok = CharTokenizer.train(TEXT)
    model = GPT(ModelConfig.preset("tiny", vocab_size=tok.vocab_size + 5, **DEMO))
    reader = gguf.GGUFReader(str(write_gguf(model, tok, tmp_path / "m.gguf")))
    field = reader.fields["tokenizer.ggml.tokens"]
    tokens = [bytes(field.parts[i]).decode() for i in field.data]
    types = [int(reader.fields["tokenizer.ggml.token_type"].parts[i][0])
             for i in reader.fields["tokenizer.ggml.token_type"].data]
    assert len(tokens) == model.config.vocab_size == next(t for t in reader.tensors
                                                          if t.name == "token_embd.weight").shape[1]
    assert tokens[-5:] == [f"[PAD{i}]" for i in range(tok.vocab_size, tok.vocab_size + 5)]
    assert types[-5:] == [int(gguf.TokenType.UNUSED)] * 5 and types[0] == int(gguf.TokenType.NORMAL)
    with pytest.raises(UserError, match="rows"):
        write_gguf(GPT(ModelConfig.preset("tiny", vocab_size=tok.vocab_size - 1, **DEMO)), tok, tmp_path / "x.gguf")
    scaled = {"type": "llama3", "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
              "original_max_position_embeddings": 32}
    qwen3 = ModelConfig.preset("modern-tiny", vocab_size=tok.vocab_size, rope_scaling=scaled)
    with pytest.raises(UserError, match="llama architecture only, not qwen3"):
        write_gguf(GPT(qwen3), tok, tmp_path / "y.gguf")
    assert not (tmp_path / "x.gguf").exists() and not (tmp_path / "y.gguf").exists()


# ------------------------------------------------------------------------------------------------- tokenizers

MIXED = [
    "Hello, world! Ünïcödé ñ café naïve façade", "日本語のテキストと中文字符，还有한국어도 있어요。",
    "emoji 🙂🚀👩‍👩‍👧 and flags 🇫🇷", "def f(x):\n    return x ** 2  # code\n\tindented", "   spaces   and\n\nnewlines",
    "numbers 1234567 3.14159 1e-10", "mixed-CASE words, it's they're we'll", "Ελληνικά и русский текст",
    "  leading spaces", "trailing spaces   ", "", "a",
]


def _byte_level_tokenizer(tmp_path):
    """A Llama-3-style tokenizer folder: a Split by a regex, then ByteLevel; trained by the tokenizers library."""
    import tokenizers
    from tokenizers import Regex, decoders, models, pre_tokenizers, processors, trainers
    tok = tokenizers.Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.Sequence([
        pre_tokenizers.Split(Regex(r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+"
                                   r"[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"), behavior="isolated"),
        pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)])
    tok.decoder = decoders.ByteLevel()
    tok.train_from_iterator(MIXED * 20 + [TEXT], trainers.BpeTrainer(
        vocab_size=300, special_tokens=["<|begin_of_text|>", "<|end_of_text|>"],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet()))
    tok.post_processor = processors.TemplateProcessing(single="<|begin_of_text|> $A",
                                                       special_tokens=[("<|begin_of_text|>", 0)])
    folder = tmp_path / "bytelevel"
    folder.mkdir(exist_ok=True)
    tok.save(str(folder / "tokenizer.json"))
    (folder / "tokenizer_config.json").write_text(json.dumps(
        {"tokenizer_class": "PreTrainedTokenizerFast", "bos_token": "<|begin_of_text|>",
         "eos_token": "<|end_of_text|>", "add_bos_token": True, "clean_up_tokenization_spaces": False,
         "chat_template": "{% for m in messages %}{{ m['role'] }}: {{ m['content'] }}\n{% endfor %}"}))
    return folder


def _sentencepiece_tokenizer(tmp_path):
    """A Llama-2 / TinyLlama-style tokenizer folder: Metaspace pieces, BPE with byte fallback."""
    import tokenizers
    from tokenizers import decoders, models, normalizers, processors, trainers
    tok = tokenizers.Tokenizer(models.BPE(byte_fallback=True, unk_token="<unk>", fuse_unk=True))
    tok.normalizer = normalizers.Sequence([normalizers.Prepend("\u2581"), normalizers.Replace(" ", "\u2581")])
    tok.pre_tokenizer = None
    tok.decoder = decoders.Sequence([decoders.Replace("\u2581", " "), decoders.ByteFallback(), decoders.Fuse(),
                                     decoders.Strip(" ", 1, 0)])
    tok.train_from_iterator(MIXED * 20 + [TEXT], trainers.BpeTrainer(
        vocab_size=400, special_tokens=["<unk>", "<s>", "</s>"] + [f"<0x{b:02X}>" for b in range(256)]))
    tok.post_processor = processors.TemplateProcessing(single="<s> $A", special_tokens=[("<s>", 1)])
    folder = tmp_path / "spm"
    folder.mkdir()
    tok.save(str(folder / "tokenizer.json"))
    (folder / "tokenizer_config.json").write_text(json.dumps(
        {"tokenizer_class": "PreTrainedTokenizerFast", "bos_token": "<s>", "eos_token": "</s>", "unk_token": "<unk>",
         "add_bos_token": True, "clean_up_tokenization_spaces": False}))
    return folder


@pytest.mark.parametrize("style", ["byte-level", "sentencepiece"])
def test_hf_tokenizers_give_autotokenizers_ids_on_mixed_text(tmp_path, style):
    from lmforge.tokenizer import HFTokenizer, load_tokenizer, prompt_ids
    folder = (_byte_level_tokenizer if style == "byte-level" else _sentencepiece_tokenizer)(tmp_path)
    ours = HFTokenizer.load(folder / "tokenizer.json")
    theirs = transformers.AutoTokenizer.from_pretrained(folder)
    rng = np.random.default_rng(0)
    lines = [" ".join(rng.choice(MIXED, 3)) for _ in range(300)] + MIXED
    for line in lines:
        ids = ours.encode(line)
        assert ids == theirs(line, add_special_tokens=False).input_ids, line
        assert ours.decode(ids) == theirs.decode(ids)
        if style == "byte-level":  # every token's bytes, joined, are the text: what streaming relies on
            assert ours.decode_bytes(ids) == line.encode()
    assert ours.eot_id == theirs.eos_token_id and ours.bos_id == theirs.bos_token_id
    assert prompt_ids(ours, "Hello") == theirs("Hello").input_ids  # the begin-of-text token first, as theirs
    (tmp_path / "copy").mkdir()
    ours.save(tmp_path / "copy" / "tokenizer.json")
    again = load_tokenizer(tmp_path / "copy")
    assert again.encode(lines[0]) == ours.encode(lines[0]) and again.config == ours.config



def test_sentencepiece_pieces_stream_as_their_bytes_and_a_jinja_file_is_the_chat_template(tmp_path):
    """decode_bytes of Metaspace pieces with byte fallback: U+2581 is a space (the leading one the normalizer
    prepends included), <0xNN> pieces are bytes, so an emoji split over four pieces comes out whole."""
    from lmforge.tokenizer import HFTokenizer
    folder = _sentencepiece_tokenizer(tmp_path)
    ours = HFTokenizer.load(folder / "tokenizer.json")
    for line in MIXED:
        assert ours.decode_bytes(ours.encode(line)) == ((" " + line).encode() if line else b""), line
    assert ours.chat_template is None
    (folder / "chat_template.jinja").write_text("{% for m in messages %}<s>{{ m['content'] }}{% endfor %}")
    again = HFTokenizer.load(folder / "tokenizer.json")
    assert again.apply_chat_template([{"role": "user", "content": "a"}], add_generation_prompt=False) == \
        [again.bos_id] + again.encode("a")


def test_fine_tuning_pairs_start_as_generation_prompts_do(tmp_path):
    """With a tokenizer whose post-processor adds begin-of-text, a fine-tuning prompt starts with it, as the
    prompt the model will get at generation does; without one, an empty prompt is end-of-text."""
    from lmforge.data import encode_pair
    from lmforge.tokenizer import HFTokenizer, prompt_ids
    llama = HFTokenizer.load(_byte_level_tokenizer(tmp_path) / "tokenizer.json")
    p, c = encode_pair(llama, "the cat", " sat")
    assert p == prompt_ids(llama, "the cat") == [llama.bos_id] + llama.encode("the cat")
    assert c == llama.encode(" sat") + [llama.eot_id]
    char = CharTokenizer.train(TEXT)
    assert encode_pair(char, "", "a")[0] == [char.eot_id] and encode_pair(char, "at", "c")[0] == char.encode("at")


def test_a_qwen_folder_imports_with_its_tokenizer_json_though_it_ships_gpt2_files_too(tmp_path):
    """Qwen and SmolLM folders carry vocab.json + merges.txt beside tokenizer.json; the tokenizer.json (with its
    special tokens and template) is the one imported when no --tokenizer is given."""
    import shutil

    from lmforge.tokenizer import HFTokenizer, load_tokenizer
    hf_model("qwen2", tmp_path / "hf", shard="10MB")
    folder = _byte_level_tokenizer(tmp_path)
    for name in ("tokenizer.json", "tokenizer_config.json"):
        shutil.copy(folder / name, tmp_path / "hf" / name)
    (tmp_path / "hf" / "vocab.json").write_text(json.dumps({"a": 0, "b": 1, "ab": 2}))
    (tmp_path / "hf" / "merges.txt").write_text("#version: 0.2\na b\n")
    tok = load_tokenizer(import_hf(tmp_path / "hf", tmp_path / "run"))
    want = HFTokenizer.load(folder / "tokenizer.json")
    assert isinstance(tok, HFTokenizer) and tok.chat_template == want.chat_template
    assert tok.encode(MIXED[0]) == want.encode(MIXED[0]) and tok.eot_id == want.eot_id


def test_chat_templates_render_in_a_process_without_transformers_and_odd_configs_are_handled(tmp_path):
    """The server's process never imports transformers (which loads jinja2.ext as a side effect); templates get
    strftime_now; a post-processor adding begin- and end-of-text still means begin-of-text first; a special token
    that is not text is a one-line error."""
    import subprocess
    import sys

    from lmforge.errors import UserError
    from lmforge.tokenizer import HFTokenizer, prompt_ids
    folder = _byte_level_tokenizer(tmp_path)
    config = json.loads((folder / "tokenizer_config.json").read_text())
    config["chat_template"] = "{{ bos_token }}{{ strftime_now('%Y') }}{% for m in messages %}{{ m['content'] }}" \
                              "{% endfor %}"
    (folder / "tokenizer_config.json").write_text(json.dumps(config))
    code = (f"import sys; from lmforge.tokenizer import HFTokenizer; t = HFTokenizer.load({str(folder / 'tokenizer.json')!r}); "
            "ids = t.apply_chat_template([{'role': 'user', 'content': 'hi'}]); "
            "assert 'transformers' not in sys.modules; print(t.decode(ids))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert out.returncode == 0 and out.stdout.strip() == f"<|begin_of_text|>{time.strftime('%Y')}hi", out.stderr

    import tokenizers
    from tokenizers import processors
    tok = tokenizers.Tokenizer.from_file(str(folder / "tokenizer.json"))
    tok.post_processor = processors.TemplateProcessing(
        single="<|begin_of_text|> $A <|end_of_text|>", special_tokens=[("<|begin_of_text|>", 0), ("<|end_of_text|>", 1)])
    tok.save(str(folder / "tokenizer.json"))
    both = HFTokenizer.load(folder / "tokenizer.json")
    theirs = transformers.PreTrainedTokenizerFast(tokenizer_file=str(folder / "tokenizer.json"))
    assert both.add_bos and prompt_ids(both, "the cat") == theirs("the cat").input_ids[:-1]
    for field, value in (("eos_token", 1), ("bos_token", ["<s>"]), ("pad_token", {"content": 5})):
        (folder / "tokenizer_config.json").write_text(json.dumps({**config, field: value}))
        with pytest.raises(UserError, match=f"{field} is"):
            HFTokenizer.load(folder / "tokenizer.json")


# ---------------------------------------------------------------------------------------------------- bad input

def test_bad_folders_are_one_line_errors_naming_the_problem(tmp_path, capsys):
    hf_model("llama", tmp_path / "hf")
    tok = str(_byte_level_tokenizer(tmp_path))
    capsys.readouterr()  # transformers' progress output while saving

    def fails(folder, *words):
        assert main(["import-hf", str(folder), "--out", str(tmp_path / "out"), "--tokenizer", tok]) == 2
        err = capsys.readouterr().err
        assert err.count("\n") == 1 and all(w in err for w in words), err
        assert not (tmp_path / "out").exists()
        return err

    def edited(name, change):
        import shutil
        folder = tmp_path / name
        shutil.copytree(tmp_path / "hf", folder)
        change(folder)
        return folder

    def config(folder, **fields):
        hf = json.loads((folder / "config.json").read_text())
        hf.update(fields)
        (folder / "config.json").write_text(json.dumps(hf))

    fails(edited("gemma", lambda f: config(f, model_type="gemma")), "'gemma'", "llama", "qwen2", "qwen3", "gpt2")
    shards = sorted((tmp_path / "hf").glob("model-*.safetensors"))
    fails(edited("missing", lambda f: (f / shards[1].name).unlink()), shards[1].name, "download every shard")
    fails(edited("no-index", lambda f: (f / "model.safetensors.index.json").unlink()), "without their index")
    fails(edited("yarn", lambda f: config(f, rope_scaling={"rope_type": "yarn", "factor": 4.0},
                                          rope_parameters={"rope_type": "yarn", "factor": 4.0})),
          "'yarn'", "linear", "llama3")
    fails(edited("window", lambda f: config(f, model_type="mistral", sliding_window=16)), "sliding window")

    def narrow(folder):
        from safetensors.torch import load_file, save_file
        index = json.loads((folder / "model.safetensors.index.json").read_text())["weight_map"]
        name = "model.layers.1.mlp.up_proj.weight"
        state = load_file(str(folder / index[name]))
        state[name] = state[name][:-1].contiguous()
        save_file(state, str(folder / index[name]), metadata={"format": "pt"})
    fails(edited("shape", narrow), "model.layers.1.mlp.up_proj.weight has shape (95, 64)", "(96, 64)")
    fails(edited("list-config", lambda f: (f / "config.json").write_text("[1, 2]")), "config.json holds a list")
    fails(edited("latin1", lambda f: (f / "config.json").write_bytes(b'{"model_type": "llama", "x": "\xff"}')),
          "is not valid JSON")
    fails(edited("tie-text", lambda f: config(f, tie_word_embeddings="false")), "tie_word_embeddings is 'false'")
    assert "wrong kind" not in fails(edited("window-2", lambda f: config(f, model_type="mistral", sliding_window=16)),
                                     "sliding window")  # a refusal is not re-labelled
    for flag, value in (("scale_attn_by_inverse_layer_idx", True), ("scale_attn_weights", False)):
        hf2 = transformers.GPT2Config(vocab_size=300, n_positions=64, n_embd=32, n_layer=1, n_head=2, **{flag: value})
        transformers.GPT2LMHeadModel(hf2).save_pretrained(tmp_path / f"gpt2-{flag}")
        capsys.readouterr()  # transformers' progress output while saving
        fails(tmp_path / f"gpt2-{flag}", f"{flag}={value}", "not implemented")
    fails(edited("list-map", lambda f: (f / "model.safetensors.index.json").write_text('{"weight_map": [1]}')),
          "not a shard index")

    def single(folder, data: bytes, name="model.safetensors"):
        for p in list(folder.glob("model*.safetensors*")):
            p.unlink()
        (folder / name).write_bytes(data)
    fails(edited("corrupt", lambda f: single(f, b"\x10\x00\x00\x00\x00\x00\x00\x00{not json")),
          "model.safetensors is not a readable safetensors file", "download it again")
    (tmp_path / "parent").mkdir()
    edited("parent/llama", lambda f: None)
    assert main(["import-hf", str(tmp_path / "parent" / "llama"), "--out", str(tmp_path / "parent"), "--force",
                 "--tokenizer", tok]) == 2  # replacing the folder that holds the checkpoint would delete it
    assert "is or holds" in capsys.readouterr().err and (tmp_path / "parent" / "llama" / "config.json").is_file()
    good = torch.save({"a": torch.zeros(4)}, tmp_path / "good.bin") or (tmp_path / "good.bin").read_bytes()
    fails(edited("truncated", lambda f: single(f, good[:len(good) // 2], "pytorch_model.bin")),
          "pytorch_model.bin cannot be read", "download it again")


def test_tied_checkpoints_that_store_the_output_layer_and_legacy_bin_files_import(tmp_path):
    """Some tied checkpoints store lm_head.weight too (a copy of the embedding): it is not read, not refused.
    pytorch_model.bin in torch's pre-1.6 (non-zip) format loads without memory mapping."""
    from safetensors.torch import load_file, save_file
    hf = hf_model("llama", tmp_path / "hf", shard="10MB")
    state = load_file(str(tmp_path / "hf" / "model.safetensors"))
    assert "lm_head.weight" not in state
    save_file({**state, "lm_head.weight": state["model.embed_tokens.weight"].clone()},
              str(tmp_path / "hf" / "model.safetensors"), metadata={"format": "pt"})
    x = torch.randint(0, 300, (1, 20))
    with torch.no_grad():
        want = hf(x).logits
        torch.testing.assert_close(GPT.from_pretrained(str(tmp_path / "hf"))(x)[0], want, atol=1e-4, rtol=0)
        (tmp_path / "hf" / "model.safetensors").unlink()
        torch.save(state, tmp_path / "hf" / "pytorch_model.bin", _use_new_zipfile_serialization=False)
        torch.testing.assert_close(GPT.from_pretrained(str(tmp_path / "hf"))(x)[0], want, atol=1e-4, rtol=0)


def test_rope_scaling_is_checked_by_value_and_a_run_with_wrong_shapes_is_not_exported(tmp_path, capsys):
    from safetensors.torch import load_file, save_file

    from lmforge.errors import UserError
    for scaling, words in [({"type": "linear", "factor": 0}, "factor=0 must be a positive number"),
                           ({"type": "linear", "factor": True}, "needs the number(s) factor"),
                           ({"type": "linear", "factor": 2.0, "beta": 1}, "not 'beta'"),
                           ({"type": "ntk", "factor": 2.0}, "'ntk' is not implemented")]:
        with pytest.raises(UserError, match=words.replace("(", r"\(").replace(")", r"\)")):
            ModelConfig(position="rope", rope_scaling=scaling)
    with pytest.raises(UserError, match="applies to position='rope', not 'learned'"):
        ModelConfig(position="learned", rope_scaling={"type": "linear", "factor": 2.0})
    from lmforge.runs import model_folder
    run, _ = _run_of(tmp_path, "llama")
    weights = model_folder(run) / "model.safetensors"  # the latest checkpoint's, which export reads
    state = load_file(str(weights))
    state["blocks.0.mlp.c_proj.weight"] = state["blocks.0.mlp.c_proj.weight"][:, :-2].contiguous()
    weights.unlink()
    save_file(state, str(weights))
    for fmt in ("hf", "gguf"):
        assert main(["export", str(run), "--format", fmt, "--out", str(tmp_path / f"out-{fmt}")]) == 2
        err = capsys.readouterr().err
        assert err.count("\n") == 1 and "blocks.0.mlp.c_proj.weight has shape" in err, err
        assert not (tmp_path / f"out-{fmt}").exists()
    config = json.loads((run / "config.json").read_text())
    del config["model"]
    (run / "config.json").write_text(json.dumps(config))
    (weights.parent / "config.json").unlink(missing_ok=True)  # the checkpoint's own copy, which would be read first
    assert main(["export", str(run), "--format", "hf", "--out", str(tmp_path / "out-x")]) == 2
    assert 'has no model config' in capsys.readouterr().err


def test_an_imported_run_serves_with_its_chat_template_and_begin_of_text(tmp_path):
    """The family's chat template (tokenizer_config.json) renders the chat route's prompt, as transformers'
    apply_chat_template does; a completion prompt starts with begin-of-text where the tokenizer's post-processor
    adds it."""
    pytest.importorskip("fastapi")
    from fastapi.testclient import TestClient

    from lmforge.serve.app import create_app
    from lmforge.tokenizer import load_tokenizer
    hf_model("llama", tmp_path / "hf", shard="10MB")
    folder = _byte_level_tokenizer(tmp_path)
    run = import_hf(tmp_path / "hf", tmp_path / "run", tokenizer=folder / "tokenizer.json")
    theirs = transformers.AutoTokenizer.from_pretrained(folder)
    messages = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "the cat? 🙂"}]
    want = theirs.apply_chat_template(messages, add_generation_prompt=True, tokenize=True)
    want = want["input_ids"] if isinstance(want, dict) or hasattr(want, "keys") else want
    assert load_tokenizer(run).apply_chat_template(messages) == list(want)
    with TestClient(create_app(run, compile="off")) as http:
        deadline = time.monotonic() + 60
        while http.get("/health").status_code != 200 and time.monotonic() < deadline:
            time.sleep(0.05)
        r = http.post("/v1/chat/completions", json={"model": "run", "messages": messages, "max_tokens": 2})
        assert r.status_code == 200 and r.json()["usage"]["prompt_tokens"] == len(want), r.text
        r = http.post("/v1/completions", json={"model": "run", "prompt": "the cat", "max_tokens": 2})
        assert r.json()["usage"]["prompt_tokens"] == len(theirs("the cat").input_ids)
