"""Model families as data: for each family Hugging Face and llama.cpp know, what of ModelConfig it fixes, how its
config.json names our fields, and where each of our tensors lives in its checkpoints. hf.py (import, export, PEFT)
and gguf.py read these tables; nothing else here knows a family.

    family = family_of(cfg)                       # the family that holds a run's config, or a UserError naming
                                                  # the fields that differ and the families that came closest
    family = family_for_hf(hf_config, where)      # the family of a Hugging Face config.json
    cfg = family.config_from_hf(hf_config, where)
    hf_config = family.hf_config(cfg, tokenizer_ids)

A tensor map sends one of our per-block names to one or more of the family's: several names are our fused matrix
split along its rows (q, k, v into c_attn; gate, up into c_fc). GPT-2's Conv1D weights are stored transposed.
llama.cpp's `llama` architecture rotates query and key pairs (GPT-J's layout), so its q and k rows are permuted;
qwen2 and qwen3 keep the rotate-half layout our RoPE and Hugging Face use.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch

from .config import ModelConfig
from .errors import UserError


@dataclass(frozen=True)
class Family:
    name: str
    model_types: tuple[str, ...]  # Hugging Face model_type values read as this family
    architecture: str  # the class a written config.json names
    gguf_arch: str  # llama.cpp's architecture name
    fixed: dict  # ModelConfig fields the family holds only at these values
    blocks: dict  # our per-block tensor -> the family's names (in blocks.{i}. / its own layer prefix)
    top: dict  # our top-level tensor -> the family's name
    layer_prefix: str  # the family's prefix of block i, with {i}
    gguf_blocks: dict = field(default_factory=dict)  # our per-block tensor -> llama.cpp's names (blk.{i}.)
    transposed: tuple[str, ...] = ()  # our per-block weights stored (in, out) by the family (GPT-2's Conv1D)
    gguf_permute_qk: bool = False  # llama.cpp's llama: q and k rows in GPT-J's pair layout

    # -------------------------------------------------------------------------------------- config fields

    def mismatches(self, cfg: ModelConfig) -> list[str]:
        """The fields of cfg this family cannot hold, as 'field=value (name: value)'."""
        out = [f"{k}={_value(cfg, k)!r} ({self.name}: {v!r})" for k, v in self.fixed.items()
               if _value(cfg, k) != v]
        if self.name == "gpt2":
            if cfg.kv_heads != cfg.n_head:
                out.append(f"n_kv_head={cfg.n_kv_head} ({self.name}: n_head={cfg.n_head})")
            if cfg.hidden_dim != 4 * cfg.n_embd:
                out.append(f"mlp_hidden={cfg.mlp_hidden} ({self.name}: 4 * n_embd = {4 * cfg.n_embd})")
            if cfg.head_dim * cfg.n_head != cfg.n_embd:
                out.append(f"head_size={cfg.head_size} ({self.name}: n_embd / n_head = {cfg.n_embd // cfg.n_head})")
        return out

    def config_from_hf(self, hf: dict, where: str) -> ModelConfig:
        return (_gpt2_config if self.name == "gpt2" else _llama_config)(self, hf, where)

    def hf_config(self, cfg: ModelConfig, bos_id: int | None, eos_id: int | None, pad_id: int | None = None) -> dict:
        return (_gpt2_hf_config if self.name == "gpt2" else _llama_hf_config)(self, cfg, bos_id, eos_id, pad_id)

    # ------------------------------------------------------------------------------------------ tensor names

    def hf_names(self, ours: str) -> tuple[str, ...]:
        """Our tensor name -> the family's name(s) in a Hugging Face checkpoint."""
        return self._names(ours, self.blocks, self.top, self.layer_prefix)

    def gguf_names(self, ours: str) -> tuple[str, ...]:
        return self._names(ours, self.gguf_blocks, GGUF_TOP, "blk.{i}.")

    def _names(self, ours: str, blocks: dict, top: dict, prefix: str) -> tuple[str, ...]:
        if ours.startswith("blocks."):
            _, i, rest = ours.split(".", 2)
            names = blocks.get(rest)
            if names is None:
                raise UserError(f"the {self.name} family has no place for the tensor {ours}")
            return tuple(prefix.format(i=i) + n for n in ((names,) if isinstance(names, str) else names))
        if ours not in top:
            raise UserError(f"the {self.name} family has no place for the tensor {ours}")
        return (top[ours],)

    def is_transposed(self, ours: str) -> bool:
        return ours.startswith("blocks.") and ours.split(".", 2)[2] in self.transposed

    def family_shapes(self, ours: str, shape: tuple[int, ...], cfg: ModelConfig, gguf: bool = False):
        """[(the family's name, its shape as the family stores it)] for one of our tensors of this shape."""
        names = self.gguf_names(ours) if gguf else self.hf_names(ours)
        rows = self.split_sizes(ours, cfg, len(names)) if len(names) > 1 else [shape[0]]
        flip = not gguf and self.is_transposed(ours)
        return [(n, (r, *shape[1:])[::-1] if flip else (r, *shape[1:])) for n, r in zip(names, rows)]

    def split_sizes(self, ours: str, cfg: ModelConfig, parts: int) -> list[int]:
        """The rows of our fused tensor that each of the family's parts holds."""
        if ".attn.c_attn." in ours:
            return [cfg.n_head * cfg.head_dim, cfg.kv_heads * cfg.head_dim, cfg.kv_heads * cfg.head_dim]
        if ".mlp.c_fc." in ours:
            return [cfg.hidden_dim] * parts
        raise AssertionError(ours)

    # ------------------------------------------------------------------------------------------ conversions

    def to_family(self, ours: str, tensor: torch.Tensor, cfg: ModelConfig, gguf: bool = False):
        """Our tensor -> [(the family's name, its tensor)]: split, then transposed or permuted as the family
        stores it."""
        names = self.gguf_names(ours) if gguf else self.hf_names(ours)
        pieces = [tensor] if len(names) == 1 else list(tensor.split(self.split_sizes(ours, cfg, len(names))))
        if not gguf and self.is_transposed(ours):
            pieces = [p.t() for p in pieces]
        if gguf and self.gguf_permute_qk and ".attn.c_attn." in ours:
            pieces[0] = permute_pairs(pieces[0], cfg.n_head)
            pieces[1] = permute_pairs(pieces[1], cfg.kv_heads)
        return [(n, p.contiguous()) for n, p in zip(names, pieces)]

    def from_family(self, ours: str, pieces: list[torch.Tensor]) -> torch.Tensor:
        """The family's tensor(s) for one of ours (as hf_names orders them) -> our tensor."""
        if self.is_transposed(ours):
            pieces = [p.t() for p in pieces]
        return pieces[0] if len(pieces) == 1 else torch.cat(pieces, dim=0)


def permute_pairs(w: torch.Tensor, n_head: int) -> torch.Tensor:
    """Rows of a q or k projection from rotate-half order (each head: first halves, then second halves) to GPT-J's
    interleaved pairs, as llama.cpp's converter writes a Llama for its `llama` architecture."""
    return w.reshape(n_head, 2, w.shape[0] // n_head // 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


def _value(cfg: ModelConfig, name: str):
    return cfg.qkv_bias if name == "attn_bias" else getattr(cfg, name)


# ----------------------------------------------------------------------------------------------- the families

_LLAMA_FIXED = dict(position="rope", norm="rmsnorm", norm_position="pre", mlp="swiglu", bias=False, attn_bias=False,
                    qk_norm=False, scale_embeddings=False)
_LLAMA_BLOCKS = {
    "norm_1.weight": "input_layernorm.weight",
    "attn.c_attn.weight": ("self_attn.q_proj.weight", "self_attn.k_proj.weight", "self_attn.v_proj.weight"),
    "attn.c_attn.bias": ("self_attn.q_proj.bias", "self_attn.k_proj.bias", "self_attn.v_proj.bias"),
    "attn.q_norm.weight": "self_attn.q_norm.weight",
    "attn.k_norm.weight": "self_attn.k_norm.weight",
    "attn.c_proj.weight": "self_attn.o_proj.weight",
    "norm_2.weight": "post_attention_layernorm.weight",
    "mlp.c_fc.weight": ("mlp.gate_proj.weight", "mlp.up_proj.weight"),
    "mlp.c_proj.weight": "mlp.down_proj.weight",
}
_LLAMA_TOP = {"wte.weight": "model.embed_tokens.weight", "norm_f.weight": "model.norm.weight",
              "lm_head.weight": "lm_head.weight"}
_LLAMA_GGUF = {
    "norm_1.weight": "attn_norm.weight",
    "attn.c_attn.weight": ("attn_q.weight", "attn_k.weight", "attn_v.weight"),
    "attn.c_attn.bias": ("attn_q.bias", "attn_k.bias", "attn_v.bias"),
    "attn.q_norm.weight": "attn_q_norm.weight",
    "attn.k_norm.weight": "attn_k_norm.weight",
    "attn.c_proj.weight": "attn_output.weight",
    "norm_2.weight": "ffn_norm.weight",
    "mlp.c_fc.weight": ("ffn_gate.weight", "ffn_up.weight"),
    "mlp.c_proj.weight": "ffn_down.weight",
}
GGUF_TOP = {"wte.weight": "token_embd.weight", "wpe.weight": "position_embd.weight",
            "norm_f.weight": "output_norm.weight", "norm_f.bias": "output_norm.bias", "lm_head.weight": "output.weight"}

FAMILIES: dict[str, Family] = {
    "gpt2": Family(
        "gpt2", ("gpt2",), "GPT2LMHeadModel", "gpt2",
        fixed=dict(position="learned", norm="layernorm", norm_position="pre", mlp="gelu", bias=True, attn_bias=True,
                   tie_embeddings=True, qk_norm=False, scale_embeddings=False),
        blocks={"norm_1.weight": "ln_1.weight", "norm_1.bias": "ln_1.bias",
                "attn.c_attn.weight": "attn.c_attn.weight", "attn.c_attn.bias": "attn.c_attn.bias",
                "attn.c_proj.weight": "attn.c_proj.weight", "attn.c_proj.bias": "attn.c_proj.bias",
                "norm_2.weight": "ln_2.weight", "norm_2.bias": "ln_2.bias",
                "mlp.c_fc.weight": "mlp.c_fc.weight", "mlp.c_fc.bias": "mlp.c_fc.bias",
                "mlp.c_proj.weight": "mlp.c_proj.weight", "mlp.c_proj.bias": "mlp.c_proj.bias"},
        top={"wte.weight": "transformer.wte.weight", "wpe.weight": "transformer.wpe.weight",
             "norm_f.weight": "transformer.ln_f.weight", "norm_f.bias": "transformer.ln_f.bias",
             "lm_head.weight": "lm_head.weight"},
        layer_prefix="transformer.h.{i}.",
        gguf_blocks={"norm_1.weight": "attn_norm.weight", "norm_1.bias": "attn_norm.bias",
                     "attn.c_attn.weight": "attn_qkv.weight", "attn.c_attn.bias": "attn_qkv.bias",
                     "attn.c_proj.weight": "attn_output.weight", "attn.c_proj.bias": "attn_output.bias",
                     "norm_2.weight": "ffn_norm.weight", "norm_2.bias": "ffn_norm.bias",
                     "mlp.c_fc.weight": "ffn_up.weight", "mlp.c_fc.bias": "ffn_up.bias",
                     "mlp.c_proj.weight": "ffn_down.weight", "mlp.c_proj.bias": "ffn_down.bias"},
        transposed=("attn.c_attn.weight", "attn.c_proj.weight", "mlp.c_fc.weight", "mlp.c_proj.weight")),
    # Llama 2 / 3.x, SmolLM / SmolLM2, TinyLlama, Mistral (without a sliding window)
    "llama": Family("llama", ("llama", "mistral"), "LlamaForCausalLM", "llama", fixed=_LLAMA_FIXED,
                    blocks=_LLAMA_BLOCKS, top=_LLAMA_TOP, layer_prefix="model.layers.{i}.", gguf_blocks=_LLAMA_GGUF,
                    gguf_permute_qk=True),
    # Qwen2 / Qwen2.5: Llama's block with biases on q, k and v
    "qwen2": Family("qwen2", ("qwen2",), "Qwen2ForCausalLM", "qwen2", fixed={**_LLAMA_FIXED, "attn_bias": True},
                    blocks=_LLAMA_BLOCKS, top=_LLAMA_TOP, layer_prefix="model.layers.{i}.", gguf_blocks=_LLAMA_GGUF),
    # Qwen3 (dense): Llama's block with RMSNorm on each query and key head (the `modern` preset)
    "qwen3": Family("qwen3", ("qwen3",), "Qwen3ForCausalLM", "qwen3", fixed={**_LLAMA_FIXED, "qk_norm": True},
                    blocks=_LLAMA_BLOCKS, top=_LLAMA_TOP, layer_prefix="model.layers.{i}.", gguf_blocks=_LLAMA_GGUF),
}


def family_of(cfg: ModelConfig, what: str = "this run") -> Family:
    """The family that holds cfg (the first whose fixed fields all match), else a one-line UserError with the
    fields that differ for the closest families."""
    ranked = sorted(FAMILIES.values(), key=lambda f: len(f.mismatches(cfg)))
    if not ranked[0].mismatches(cfg):
        return ranked[0]
    fewest = len(ranked[0].mismatches(cfg))
    closest = [f for f in ranked if len(f.mismatches(cfg)) == fewest]
    said = "; ".join(f"{f.name} differs in {', '.join(f.mismatches(cfg))}" for f in closest)
    raise UserError(f"{what} fits none of the families Hugging Face and llama.cpp load ({', '.join(FAMILIES)}): "
                    f"the closest, {said}")


def model_shapes(cfg: ModelConfig) -> dict[str, torch.Size]:
    """Every tensor of a GPT of this config and its shape, in the model's order; a tied output layer is wte's."""
    from .model import GPT
    with torch.device("meta"):
        state = GPT(cfg).state_dict()
    return {k: v.shape for k, v in state.items() if not (cfg.tie_embeddings and k == "lm_head.weight")}


def holds(cfg: ModelConfig) -> bool:
    """Whether some family holds cfg."""
    return any(not f.mismatches(cfg) for f in FAMILIES.values())


def family_for_hf(hf: dict, where: str) -> Family:
    kind = hf.get("model_type")
    for family in FAMILIES.values():
        if kind in family.model_types:
            return family
    types = sorted(t for f in FAMILIES.values() for t in f.model_types)
    raise UserError(f"{where}: model_type {kind!r} is not a family lmforge converts; supported: {', '.join(types)}")


# ------------------------------------------------------------------------------------------ GPT-2's config.json

def _flag(hf: dict, name: str, default: bool, where: str) -> bool:
    value = hf.get(name, default)
    if not isinstance(value, bool):
        raise UserError(f"{where}: config.json's {name} is {value!r}; it must be true or false")
    return value


def _gpt2_config(family: Family, hf: dict, where: str) -> ModelConfig:
    if hf.get("activation_function", "gelu_new") not in ("gelu_new", "gelu_pytorch_tanh"):
        raise UserError(f"{where}: activation {hf['activation_function']!r} differs from GPT-2's tanh GELU")
    for flag, plain in (("scale_attn_weights", True), ("scale_attn_by_inverse_layer_idx", False),
                        ("tie_word_embeddings", True)):
        if hf.get(flag, plain) is not plain:
            raise UserError(f"{where}: {flag}={hf[flag]!r} is not implemented; GPT-2's blocks have {flag}={plain}")
    n_embd = hf["n_embd"]
    if hf.get("n_inner") not in (None, 4 * n_embd):
        raise UserError(f"{where}: n_inner={hf['n_inner']} differs from 4 * n_embd, which GPT-2 blocks use")
    return ModelConfig(vocab_size=hf["vocab_size"], block_size=hf["n_positions"], n_layer=hf["n_layer"],
                       n_head=hf["n_head"], n_embd=n_embd, norm_eps=hf.get("layer_norm_epsilon", 1e-5),
                       init_std=hf.get("initializer_range", 0.02), dropout=0.0)


def _gpt2_hf_config(family, cfg, bos_id, eos_id, pad_id) -> dict:
    return {"architectures": [family.architecture], "model_type": "gpt2", "vocab_size": cfg.vocab_size,
            "n_positions": cfg.block_size, "n_embd": cfg.n_embd, "n_layer": cfg.n_layer, "n_head": cfg.n_head,
            "n_inner": None, "activation_function": "gelu_new", "layer_norm_epsilon": cfg.norm_eps,
            "resid_pdrop": 0.0, "embd_pdrop": 0.0, "attn_pdrop": 0.0, "initializer_range": cfg.init_std,
            "bos_token_id": bos_id, "eos_token_id": eos_id, "pad_token_id": pad_id, "tie_word_embeddings": True,
            "torch_dtype": "float32"}


# ------------------------------------------------------------------------- Llama, Qwen2 and Qwen3's config.json

def rope_of(hf: dict, where: str) -> tuple[float, dict | None]:
    """(rope_theta, our rope_scaling) of a config.json in transformers 4's layout (rope_theta, rope_scaling) or 5's
    (rope_parameters). A scaling we do not implement is refused by name."""
    from .config import ROPE_SCALING
    params = dict(hf.get("rope_parameters") or {})
    theta = params.pop("rope_theta", hf.get("rope_theta", 10000.0))
    scaling = dict(hf.get("rope_scaling") or params)
    kind = scaling.pop("rope_type", scaling.pop("type", "default"))
    if kind == "default":
        return float(theta), None
    if kind not in ROPE_SCALING:
        raise UserError(f"{where}: rope_scaling type {kind!r} is not implemented; lmforge implements "
                        f"{', '.join(ROPE_SCALING)} (or none)")
    return float(theta), {"type": kind, **{k: scaling[k] for k in ROPE_SCALING[kind] if k in scaling}}


def _llama_config(family: Family, hf: dict, where: str) -> ModelConfig:
    if hf.get("hidden_act", "silu") != "silu":
        raise UserError(f"{where}: hidden_act {hf['hidden_act']!r} is not SwiGLU's silu")
    if family.name == "llama" and (hf.get("attention_bias") or hf.get("mlp_bias")):
        raise UserError(f"{where}: attention_bias / mlp_bias (biases on every projection) are not implemented for "
                        f"{hf.get('model_type')}; Qwen2's q, k, v biases are")
    window = hf.get("sliding_window")
    if window and (hf.get("use_sliding_window", family.name != "qwen2") and window < hf["max_position_embeddings"]):
        raise UserError(f"{where}: a sliding window of {window} tokens is not implemented; only full attention is")
    if any(t != "full_attention" for t in hf.get("layer_types") or ()):
        raise UserError(f"{where}: layer_types other than full_attention are not implemented")
    theta, scaling = rope_of(hf, where)
    n_embd, n_head = hf["hidden_size"], hf["num_attention_heads"]
    head_dim = hf.get("head_dim") or n_embd // n_head
    return ModelConfig(
        vocab_size=hf["vocab_size"], block_size=hf.get("max_position_embeddings", 2048),
        n_layer=hf["num_hidden_layers"], n_head=n_head, n_kv_head=hf.get("num_key_value_heads") or n_head,
        n_embd=n_embd, head_size=None if head_dim * n_head == n_embd else head_dim,
        mlp="swiglu", mlp_hidden=hf["intermediate_size"], norm="rmsnorm", norm_eps=hf.get("rms_norm_eps", 1e-6),
        qk_norm=family.name == "qwen3", position="rope", rope_theta=theta, rope_scaling=scaling, bias=False,
        attn_bias=True if family.name == "qwen2" else None, tie_embeddings=_flag(hf, "tie_word_embeddings", False, where),
        init_std=hf.get("initializer_range", 0.02), dropout=0.0)


def _llama_hf_config(family, cfg, bos_id, eos_id, pad_id) -> dict:
    out = {"architectures": [family.architecture], "model_type": family.name, "vocab_size": cfg.vocab_size,
           "hidden_size": cfg.n_embd, "intermediate_size": cfg.hidden_dim, "num_hidden_layers": cfg.n_layer,
           "num_attention_heads": cfg.n_head, "num_key_value_heads": cfg.kv_heads, "head_dim": cfg.head_dim,
           "hidden_act": "silu", "max_position_embeddings": cfg.block_size, "rms_norm_eps": cfg.norm_eps,
           "rope_theta": cfg.rope_theta, "rope_scaling": _hf_rope_scaling(cfg.rope_scaling),
           "attention_bias": False, "attention_dropout": 0.0, "initializer_range": cfg.init_std,
           "tie_word_embeddings": cfg.tie_embeddings, "bos_token_id": bos_id, "eos_token_id": eos_id,
           "pad_token_id": pad_id, "use_cache": True, "torch_dtype": "float32"}
    if family.name == "llama":
        out["mlp_bias"] = False
    else:
        out.update(use_sliding_window=False, sliding_window=None, max_window_layers=cfg.n_layer)
    return out


def _hf_rope_scaling(scaling: dict | None) -> dict | None:
    if scaling is None:
        return None
    return {"rope_type": scaling["type"], **{k: v for k, v in scaling.items() if k != "type"}}
