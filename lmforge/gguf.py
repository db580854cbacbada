"""GGUF export for llama.cpp and the tools built on it (llama-server, ollama): a run as the llama.cpp architecture of
its family (gpt2, llama, qwen2, qwen3; families.py maps the tensors), its tokenizer inside, written with the `gguf`
package one tensor at a time.

    lmforge export runs/base --format gguf --out base.gguf [--type f32|f16|q8_0|q4_0]

Matrices are stored in the type asked for (q8_0: blocks of 32 int8 weights with an f16 scale; q4_0: blocks of 32
4-bit weights with an f16 scale); norms, biases and matrices whose rows are not a multiple of 32 stay f32, as
llama.cpp's own converter writes them. A tied output layer is left out: llama.cpp then multiplies by token_embd.

The tokenizer: a byte-level BPE (ours, GPT-2's) as llama.cpp's `gpt2` model, tokens in GPT-2's byte alphabet with
their merges. A character vocabulary as its `llama` (SentencePiece) model: one piece per character, a space as
U+2581, no space prefix, so llama.cpp splits text into characters and finds each one.
"""

from __future__ import annotations

import os
import tempfile
from pathlib import Path

import numpy as np

from .errors import UserError
from .families import Family, family_of, model_shapes

TYPES = ("f32", "f16", "q8_0", "q4_0")


def _gguf():
    try:
        import gguf
    except ImportError:
        raise UserError("GGUF export needs the gguf package; install the extra: pip install 'lmforge[export]'") \
            from None
    return gguf


def write_gguf(model, tokenizer, path: str | Path, type: str = "f32") -> Path:
    """Write a GPT and its tokenizer as one GGUF file, atomically."""
    state = model.state_dict()
    return write_gguf_tensors(model.config, tokenizer, lambda name: state[name].detach().cpu(), path, type)


def write_gguf_tensors(cfg, tokenizer, tensor, path: str | Path, type: str = "f32", name: str | None = None,
                       chat_template: str | None = None) -> Path:
    """Write a model given as its config, tokenizer and tensor(name) (each tensor made when written) as one GGUF
    file, atomically."""
    gguf = _gguf()
    if type not in TYPES:
        raise UserError(f"unknown GGUF type {type!r}; use one of {', '.join(TYPES)}")
    family = family_of(cfg, "this run")
    _check_tokenizer(tokenizer)
    _check_rope(family, cfg)
    quant = {"f32": gguf.GGMLQuantizationType.F32, "f16": gguf.GGMLQuantizationType.F16,
             "q8_0": gguf.GGMLQuantizationType.Q8_0, "q4_0": gguf.GGMLQuantizationType.Q4_0}[type]
    file_type = {"f32": gguf.LlamaFileType.ALL_F32, "f16": gguf.LlamaFileType.MOSTLY_F16,
                 "q8_0": gguf.LlamaFileType.MOSTLY_Q8_0, "q4_0": gguf.LlamaFileType.MOSTLY_Q4_0}[type]
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", dir=path.parent)
    os.close(fd)
    try:
        w = gguf.GGUFWriter(tmp, family.gguf_arch)
        w.add_name(name or path.stem)
        w.add_file_type(file_type)
        _add_hyperparameters(w, family, cfg)
        _add_tokenizer(w, gguf, tokenizer, cfg.vocab_size, chat_template or tokenizer.chat_template)
        for ours in model_shapes(cfg):
            for gguf_name, t in family.to_family(ours, tensor(ours).float(), cfg, gguf=True):
                data = t.numpy()  # nn.Linear's (out, in) is ggml's {in, out}
                if data.ndim == 2 and quant != gguf.GGMLQuantizationType.F32 and data.shape[1] % 32 == 0:
                    w.add_tensor(gguf_name, gguf.quants.quantize(data, quant), raw_dtype=quant)
                else:
                    w.add_tensor(gguf_name, data.astype(np.float32))
        if cfg.rope_scaling and cfg.rope_scaling["type"] == "llama3":
            import torch

            from .model import rope_factors
            plain = 1.0 / cfg.rope_theta ** (torch.arange(0, cfg.head_dim, 2).float() / cfg.head_dim)
            w.add_tensor("rope_freqs.weight", rope_factors(plain, cfg.rope_scaling).numpy().astype(np.float32))
        w.write_header_to_file()
        w.write_kv_data_to_file()
        w.write_tensors_to_file()
        w.close()
        os.chmod(tmp, 0o644)
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)
    return path


def _add_hyperparameters(w, family: Family, c) -> None:
    w.add_context_length(c.block_size)
    w.add_embedding_length(c.n_embd)
    w.add_feed_forward_length(c.hidden_dim)
    w.add_block_count(c.n_layer)
    w.add_head_count(c.n_head)
    w.add_vocab_size(c.vocab_size)
    if family.name == "gpt2":
        w.add_layer_norm_eps(c.norm_eps)
        return
    w.add_head_count_kv(c.kv_heads)
    w.add_layer_norm_rms_eps(c.norm_eps)
    w.add_rope_freq_base(c.rope_theta)
    w.add_rope_dimension_count(c.head_dim)
    w.add_key_length(c.head_dim)
    w.add_value_length(c.head_dim)
    if c.rope_scaling and c.rope_scaling["type"] == "linear":
        import gguf
        w.add_rope_scaling_type(gguf.RopeScalingType.LINEAR)
        w.add_rope_scaling_factor(float(c.rope_scaling["factor"]))


def _check_rope(family: Family, cfg) -> None:
    if cfg.rope_scaling and cfg.rope_scaling["type"] == "llama3" and family.gguf_arch != "llama":
        raise UserError(f"llama.cpp reads llama3 rope_scaling (its rope_freqs tensor) for the llama architecture "
                        f"only, not {family.gguf_arch}; export --format hf instead")


def _check_tokenizer(tok) -> None:
    from .tokenizer import BPETokenizer, CharTokenizer
    if not isinstance(tok, (BPETokenizer, CharTokenizer)):
        raise UserError("this run's tokenizer is a Hugging Face tokenizer.json, whose pre-tokenizer llama.cpp knows "
                        "by name, not by its rules; export --format hf and convert that folder with llama.cpp's "
                        "convert_hf_to_gguf.py")


def _add_tokenizer(w, gguf, tok, n_vocab: int, chat_template: str | None = None) -> None:
    """The tokenizer's fields: ids in order, each token's text and type, and for BPE the merges in rank order. A
    model with more rows than the tokenizer has tokens gets unused [PAD<id>] tokens for the rest, as llama.cpp's
    converter writes them (llama.cpp takes the vocabulary's size from the token list)."""
    from .tokenizer import BPETokenizer, _readable
    if tok.vocab_size > n_vocab:
        raise UserError(f"the tokenizer has {tok.vocab_size} tokens but the model only {n_vocab} rows; they are not "
                        f"of one run")
    specials = {i: s for s, i in tok.special_tokens.items()}
    if isinstance(tok, BPETokenizer):
        by_id = {i: t for t, i in tok.ranks.items()}
        w.add_tokenizer_model("gpt2")
        w.add_tokenizer_pre("gpt-2")  # our split pattern is GPT-2's
        tokens = [specials[i] if i in specials else _readable(by_id[i]) for i in range(tok.vocab_size)]
        w.add_token_merges(tok.vocab_and_merges()[1])
    else:
        w.add_tokenizer_model("llama")
        w.add_tokenizer_pre("default")
        tokens = [specials[i] if i in specials else tok.chars[i].replace(" ", "\u2581") for i in range(tok.vocab_size)]
        if len(set(tokens)) != len(tokens):
            raise UserError("the character vocabulary holds both ' ' and U+2581, which SentencePiece cannot tell "
                            "apart; llama.cpp cannot load it")
        w.add_add_space_prefix(False)
        w.add_unk_token_id(tok.special_tokens.get(tok.unk_token, tok.eot_id) if tok.unk_token else tok.eot_id)
    pads = [f"[PAD{i}]" for i in range(tok.vocab_size, n_vocab)]
    if set(pads) & set(tokens):
        raise UserError("the vocabulary holds a token named like llama.cpp's padding ([PAD<id>]); GGUF cannot pad it")
    w.add_token_list(tokens + pads)
    if not isinstance(tok, BPETokenizer):
        w.add_token_scores([0.0] * n_vocab)
    w.add_token_types([gguf.TokenType.CONTROL if i in specials else gguf.TokenType.NORMAL
                       for i in range(tok.vocab_size)] + [gguf.TokenType.UNUSED] * len(pads))
    w.add_bos_token_id(tok.eot_id)
    w.add_eos_token_id(tok.eot_id)
    from .templates import end_of_turn_ids
    if end_of_turn_ids(tok):  # llama.cpp ends a reply at end-of-turn as at end-of-text
        w.add_eot_token_id(end_of_turn_ids(tok)[0])
    if chat_template:  # the run's template, which llama.cpp's chat (and llama-server --jinja) renders
        w.add_chat_template(chat_template)
    w.add_add_bos_token(False)
    w.add_add_eos_token(False)


def export_gguf(run: str | Path, out: str | Path, type: str = "f32", checkpoint: str | None = None,
                force: bool = False) -> Path:
    from .runs import check_output, read_run_config, refuse_exporting_quantized, run_weights
    run = Path(run)
    refuse_exporting_quantized(run, read_run_config(run), "GGUF")
    out = check_output(run, out, force, checkpoint=checkpoint, folder=False)
    cfg, tokenizer, tensor = run_weights(run, checkpoint)
    _check_rope(family_of(cfg, str(run)), cfg)  # refused before anything is written
    _check_tokenizer(tokenizer)
    from .templates import stored_template
    return write_gguf_tensors(cfg, tokenizer, tensor, out, type, name=run.name,
                              chat_template=stored_template(tokenizer, read_run_config(run)))

