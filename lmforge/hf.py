"""Hugging Face interop for GPT-2-shaped runs: a run exported as a `GPT2LMHeadModel` folder (what transformers, vLLM
and TGI load), and a LoRA run's adapter in PEFT's format for that folder.

    export_hf("runs/base", "hf/base")                 # config.json, model.safetensors, vocab.json + merges.txt
    save_peft_adapter("runs/tuned", "runs/tuned/peft")   # adapter_config.json + adapter_model.safetensors

GPT-2 stores its projections as Conv1D, (in, out): our (out, in) Linear weights are transposed on the way. A run GPT-2
cannot express (RoPE, RMSNorm, SwiGLU, untied embeddings, ...) is refused with the fields that differ. Only
safetensors and JSON are written; transformers is needed to read the folder back, not to write it.
"""

from __future__ import annotations

import json
import shutil
import tempfile
from pathlib import Path

import torch

from .config import ModelConfig
from .errors import UserError

CONV1D = ("attn.c_attn", "attn.c_proj", "mlp.c_fc", "mlp.c_proj")  # HF GPT-2's Conv1D modules: weights (in, out)


def gpt2_mismatches(cfg: ModelConfig) -> list[str]:
    """The fields that keep cfg from being a GPT-2 architecture, as 'field=value (GPT-2: value)'."""
    want = {"position": "learned", "norm": "layernorm", "norm_position": "pre", "mlp": "gelu", "bias": True,
            "tie_embeddings": True, "qk_norm": False, "scale_embeddings": False}
    out = [f"{k}={getattr(cfg, k)!r} (GPT-2: {v!r})" for k, v in want.items() if getattr(cfg, k) != v]
    if cfg.n_kv_head not in (None, cfg.n_head):
        out.append(f"n_kv_head={cfg.n_kv_head} (GPT-2: n_head={cfg.n_head})")
    if cfg.mlp_hidden not in (None, 4 * cfg.n_embd):
        out.append(f"mlp_hidden={cfg.mlp_hidden} (GPT-2: 4 * n_embd = {4 * cfg.n_embd})")
    return out


def check_gpt2_shaped(cfg: ModelConfig, what: str = "this run") -> None:
    bad = gpt2_mismatches(cfg)
    if bad:
        raise UserError(f"{what} is not GPT-2-shaped, so the Hugging Face GPT-2 format cannot hold it: {', '.join(bad)}")


def hf_name(name: str) -> str:
    """Our parameter name -> GPT2LMHeadModel's."""
    if name.startswith("blocks."):
        name = "transformer.h." + name[len("blocks."):]
        return name.replace(".norm_1.", ".ln_1.").replace(".norm_2.", ".ln_2.")
    return {"wte.weight": "transformer.wte.weight", "wpe.weight": "transformer.wpe.weight",
            "norm_f.weight": "transformer.ln_f.weight", "norm_f.bias": "transformer.ln_f.bias"}.get(name, name)


def to_hf_state(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Our state dict in GPT-2's names and layouts (Conv1D weights transposed; the tied lm_head left out)."""
    out = {}
    for name, tensor in state.items():
        if name == "lm_head.weight":
            continue
        if name.endswith(".weight") and any(f".{m}." in f".{name}" for m in CONV1D):
            tensor = tensor.t()
        out[hf_name(name)] = tensor.detach().to("cpu").contiguous()
    return out


def hf_config(cfg: ModelConfig, eot_id: int | None) -> dict:
    return {"architectures": ["GPT2LMHeadModel"], "model_type": "gpt2", "vocab_size": cfg.vocab_size,
            "n_positions": cfg.block_size, "n_embd": cfg.n_embd, "n_layer": cfg.n_layer, "n_head": cfg.n_head,
            "n_inner": None, "activation_function": "gelu_new", "layer_norm_epsilon": cfg.norm_eps,
            "resid_pdrop": 0.0, "embd_pdrop": 0.0, "attn_pdrop": 0.0, "initializer_range": cfg.init_std,
            "bos_token_id": eot_id, "eos_token_id": eot_id, "tie_word_embeddings": True}


def export_hf(run: str | Path, out: str | Path, force: bool = False, checkpoint: str | None = None) -> Path:
    """A run as a GPT2LMHeadModel folder (a LoRA run exports with its adapter merged). Written atomically."""
    from safetensors.torch import save_file

    from .checkpoint import load
    from .lora import merge_lora
    from .tokenizer import BPETokenizer
    out = Path(out)
    if out.exists() and not force:
        raise UserError(f"{out} already exists; pass --force to replace it")
    model, tokenizer = load(run, checkpoint=checkpoint)
    check_gpt2_shaped(model.config, str(run))
    merge_lora(model)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.", dir=out.parent))
    tmp.chmod(0o755)
    try:
        save_file(to_hf_state(model.state_dict()), str(tmp / "model.safetensors"), metadata={"format": "pt"})
        (tmp / "config.json").write_text(json.dumps(hf_config(model.config, tokenizer.eot_id), indent=2) + "\n")
        if isinstance(tokenizer, BPETokenizer):
            _write_gpt2_tokenizer(tokenizer, tmp, model.config.block_size)
        else:
            print(f"note: {run}'s character tokenizer has no Hugging Face equivalent; only the model was written "
                  f"(its token ids follow {Path(run) / 'tokenizer.json'})")
        if out.exists():
            shutil.rmtree(out)
        tmp.replace(out)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return out


# ------------------------------------------------------------------------------------------------- the tokenizer

def byte_symbols() -> dict[int, str]:
    """GPT-2's printable stand-in for each byte (the alphabet of its vocab.json)."""
    keep = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1)) + list(range(ord("®"), ord("ÿ") + 1))
    table, extra = {b: chr(b) for b in keep}, 0
    for b in range(256):
        if b not in table:
            table[b] = chr(256 + extra)
            extra += 1
    return table


def merge_of(ranks: dict[bytes, int], token: bytes) -> tuple[bytes, bytes]:
    """The pair whose merge made this token: BPE on its bytes with only the merges ranked before it."""
    rank, parts = ranks[token], [bytes([b]) for b in token]
    while len(parts) > 2:
        pairs = [(ranks.get(parts[i] + parts[i + 1], rank), i) for i in range(len(parts) - 1)]
        best, i = min(pairs)
        assert best < rank, token
        parts[i:i + 2] = [parts[i] + parts[i + 1]]
    return parts[0], parts[1]


def gpt2_vocab_and_merges(tok) -> tuple[dict[str, int], list[str]]:
    """A byte-level BPE tokenizer as GPT-2's vocab.json mapping and merges.txt lines."""
    symbols = byte_symbols()
    vocab = {"".join(symbols[b] for b in token): i for token, i in tok.ranks.items()}
    vocab.update(tok.special_tokens)
    merges = []
    for token, _ in sorted(((t, i) for t, i in tok.ranks.items() if len(t) > 1), key=lambda x: x[1]):
        a, b = merge_of(tok.ranks, token)
        merges.append("".join(symbols[x] for x in a) + " " + "".join(symbols[x] for x in b))
    return vocab, merges


def _write_gpt2_tokenizer(tok, folder: Path, context: int) -> None:
    vocab, merges = gpt2_vocab_and_merges(tok)
    (folder / "vocab.json").write_text(json.dumps(vocab, ensure_ascii=False))
    (folder / "merges.txt").write_text("#version: 0.2\n" + "\n".join(merges) + "\n", encoding="utf-8")
    eot = "<|endoftext|>"
    (folder / "tokenizer_config.json").write_text(json.dumps(
        {"tokenizer_class": "GPT2Tokenizer", "bos_token": eot, "eos_token": eot, "unk_token": eot,
         "model_max_length": context, "add_prefix_space": False}, indent=2) + "\n")


# --------------------------------------------------------------------------------------------------- PEFT adapters

def save_peft_adapter(model, settings: dict, out: str | Path) -> Path:
    """A LoRA model's adapter as PEFT saves one for GPT2LMHeadModel: adapter_model.safetensors with
    base_model.model.<hf name>.lora_A/B.weight, and an adapter_config.json (fan_in_fan_out: GPT-2's Conv1D)."""
    from safetensors.torch import save_file

    from .lora import lora_state
    check_gpt2_shaped(model.config, "the adapter's base")
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    tensors = {}
    for key, tensor in lora_state(model).items():
        name, kind = key.rsplit(".", 1)
        tensors[f"base_model.model.{hf_name(name + '.weight')[:-len('.weight')]}.{kind}.weight"] = tensor.cpu()
    targets = sorted(hf_name(m + ".weight")[:-len(".weight")] for m in settings["modules"])  # exact module names
    config = {"peft_type": "LORA", "task_type": "CAUSAL_LM", "r": settings["rank"], "lora_alpha": settings["alpha"],
              "lora_dropout": settings.get("dropout", 0.0), "target_modules": targets, "fan_in_fan_out": True,
              "bias": "none", "base_model_name_or_path": None, "inference_mode": True, "modules_to_save": None,
              "init_lora_weights": True}
    save_file(tensors, str(out / "adapter_model.safetensors"), metadata={"format": "pt"})
    (out / "adapter_config.json").write_text(json.dumps(config, indent=2) + "\n")
    return out


def export_cli(args) -> int:
    out = export_hf(args.run, args.out, force=args.force, checkpoint=args.checkpoint)
    print(f"exported {args.run} to {out} (GPT2LMHeadModel; load it with transformers' from_pretrained)")
    return 0
