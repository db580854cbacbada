"""GGUF export for llama.cpp and the tools built on it: a GPT-2-shaped run as llama.cpp's 'gpt2' architecture,
with its byte-level BPE tokenizer inside, written with the `gguf` package.

    lmforge export runs/base --format gguf --out base.gguf [--type f32|f16|q8_0|q4_0]

Matrices are stored in the type asked for (q8_0: blocks of 32 int8 weights with an f16 scale; q4_0: blocks of 32
4-bit weights with an f16 scale); norms and biases stay f32, as llama.cpp's own converter writes them. A tied output
layer is left out: llama.cpp then multiplies by token_embd.
"""

from __future__ import annotations

import os
import tempfile
from pathlib import Path

import numpy as np

from .errors import UserError

TYPES = ("f32", "f16", "q8_0", "q4_0")
BLOCK_PARTS = {"norm_1": "attn_norm", "attn.c_attn": "attn_qkv", "attn.c_proj": "attn_output", "norm_2": "ffn_norm",
               "mlp.c_fc": "ffn_up", "mlp.c_proj": "ffn_down"}
TOP_LEVEL = {"wte.weight": "token_embd.weight", "wpe.weight": "position_embd.weight",
             "norm_f.weight": "output_norm.weight", "norm_f.bias": "output_norm.bias",
             "lm_head.weight": "output.weight"}


def gguf_name(name: str) -> str:
    """Our parameter name -> llama.cpp's gpt2 tensor name."""
    if name.startswith("blocks."):
        _, i, rest = name.split(".", 2)
        module, kind = rest.rsplit(".", 1)
        return f"blk.{i}.{BLOCK_PARTS[module]}.{kind}"
    return TOP_LEVEL[name]


def _gguf():
    try:
        import gguf
    except ImportError:
        raise UserError("GGUF export needs the gguf package; install the extra: pip install 'lmforge[export]'") \
            from None
    return gguf


def write_gguf(model, tokenizer, path: str | Path, type: str = "f32") -> Path:
    """Write a GPT-2-shaped model and its byte-level BPE tokenizer as one GGUF file (atomically)."""
    from .hf import byte_symbols, check_gpt2_shaped, merge_of
    from .tokenizer import BPETokenizer
    gguf = _gguf()
    if type not in TYPES:
        raise UserError(f"unknown GGUF type {type!r}; use one of {', '.join(TYPES)}")
    c = model.config
    check_gpt2_shaped(c, "this run", "llama.cpp's gpt2 architecture")
    if not isinstance(tokenizer, BPETokenizer):
        raise UserError("GGUF files carry a byte-level BPE tokenizer, and this run's is character-level; train on "
                        "data prepared with --tokenizer bpe:N or gpt2 to export it")
    quant = {"f32": gguf.GGMLQuantizationType.F32, "f16": gguf.GGMLQuantizationType.F16,
             "q8_0": gguf.GGMLQuantizationType.Q8_0, "q4_0": gguf.GGMLQuantizationType.Q4_0}[type]
    file_type = {"f32": gguf.LlamaFileType.ALL_F32, "f16": gguf.LlamaFileType.MOSTLY_F16,
                 "q8_0": gguf.LlamaFileType.MOSTLY_Q8_0, "q4_0": gguf.LlamaFileType.MOSTLY_Q4_0}[type]
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", dir=path.parent)
    os.close(fd)
    try:
        w = gguf.GGUFWriter(tmp, "gpt2")
        w.add_name(path.stem)
        w.add_context_length(c.block_size)
        w.add_embedding_length(c.n_embd)
        w.add_feed_forward_length(c.hidden_dim)
        w.add_block_count(c.n_layer)
        w.add_head_count(c.n_head)
        w.add_layer_norm_eps(c.norm_eps)
        w.add_file_type(file_type)
        _add_tokenizer(w, gguf, tokenizer, byte_symbols(), merge_of)
        for name, tensor in model.state_dict().items():
            if name == "lm_head.weight" and c.tie_embeddings:
                continue
            data = tensor.detach().float().cpu().numpy()  # nn.Linear's (out, in) is ggml's {in, out}
            if data.ndim == 2 and quant != gguf.GGMLQuantizationType.F32 and data.shape[1] % 32 == 0:
                w.add_tensor(gguf_name(name), gguf.quants.quantize(data, quant), raw_dtype=quant)
            else:
                w.add_tensor(gguf_name(name), data.astype(np.float32))
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


def _add_tokenizer(w, gguf, tok, symbols, merge_of) -> None:
    """GPT-2's tokenizer fields: tokens in GPT-2's printable byte alphabet, their types, the merges in rank order."""
    by_id = {i: t for t, i in tok.ranks.items()}
    specials = {i: s for s, i in tok.special_tokens.items()}
    w.add_tokenizer_model("gpt2")
    w.add_tokenizer_pre("gpt-2")
    w.add_token_list([specials[i] if i in specials else "".join(symbols[b] for b in by_id[i])
                      for i in range(tok.vocab_size)])
    w.add_token_types([gguf.TokenType.CONTROL if i in specials else gguf.TokenType.NORMAL
                       for i in range(tok.vocab_size)])
    merges = []
    for token, _ in sorted(((t, i) for t, i in tok.ranks.items() if len(t) > 1), key=lambda x: x[1]):
        a, b = merge_of(tok.ranks, token)
        merges.append("".join(symbols[x] for x in a) + " " + "".join(symbols[x] for x in b))
    w.add_token_merges(merges)
    if tok.eot_id is not None:
        w.add_bos_token_id(tok.eot_id)
        w.add_eos_token_id(tok.eot_id)


def export_gguf(run: str | Path, out: str | Path, type: str = "f32", checkpoint: str | None = None,
                force: bool = False) -> Path:
    from .runs import check_output, load, read_run_config, refuse_exporting_quantized
    from .lora import merge_lora
    run = Path(run)
    refuse_exporting_quantized(run, read_run_config(run), "GGUF")
    out = check_output(run, out, force, checkpoint=checkpoint, folder=False)
    model, tokenizer = load(run, checkpoint=checkpoint)
    return write_gguf(merge_lora(model), tokenizer, out, type)
