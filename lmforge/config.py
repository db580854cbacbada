"""Configuration dataclasses: the model's shape (ModelConfig, with named presets) and the training run (TrainConfig).

Configs are flat dataclasses with a default and a one-line comment per field. They convert to and from plain dicts,
JSON and TOML, and check themselves at construction: an invalid value raises ValueError with one line that names the
field and says how to fix it. Nothing here imports torch.
"""

from __future__ import annotations

import dataclasses
import difflib
import json
import math
import tomllib
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, get_type_hints

from .errors import UserError

MLP_KINDS = ("relu", "gelu", "swiglu", "relu2")
NORM_KINDS = ("layernorm", "rmsnorm")
NORM_POSITIONS = ("pre", "post")
POSITION_KINDS = ("learned", "sinusoidal", "alibi", "rope", "none")
ATTENTION_KINDS = ("sdpa", "manual")


def _closest(name: str, options) -> str:
    """' (did you mean X?)' when a close option exists, else ''."""
    match = difflib.get_close_matches(name, list(options), n=1, cutoff=0.5)
    return f" (did you mean {match[0]!r}?)" if match else ""


def _check_choice(field_name: str, value: str, options: tuple[str, ...]) -> None:
    if value not in options:
        raise UserError(f"{field_name}={value!r} is not an option{_closest(str(value), options)}; "
                         f"choose one of {', '.join(options)}")


# RoPE scalings the model implements (as transformers computes them), and the keys each needs beside "type".
ROPE_SCALING = {
    "linear": ("factor",),  # every frequency divided by factor (positions interpolated)
    "llama3": ("factor", "low_freq_factor", "high_freq_factor", "original_max_position_embeddings"),  # Llama 3.1+
}


def check_rope_scaling(scaling) -> None:
    kind = scaling.get("type") if isinstance(scaling, dict) else None
    if kind not in ROPE_SCALING:
        raise UserError(f"rope_scaling type {kind!r} is not implemented; lmforge implements "
                        f"{', '.join(ROPE_SCALING)} (as {{'type': ..., 'factor': ...}})")
    missing = [k for k in ROPE_SCALING[kind]
               if isinstance(scaling.get(k), bool) or not isinstance(scaling.get(k), (int, float))]
    if missing:
        raise UserError(f"rope_scaling type {kind!r} needs the number(s) {', '.join(missing)}")
    unknown = sorted(set(scaling) - {"type", *ROPE_SCALING[kind]})
    if unknown:
        raise UserError(f"rope_scaling type {kind!r} takes {', '.join(ROPE_SCALING[kind])}, not {unknown[0]!r}")
    bad = [k for k in ROPE_SCALING[kind] if not (math.isfinite(scaling[k]) and scaling[k] > 0)]
    if bad:
        raise UserError(f"rope_scaling {bad[0]}={scaling[bad[0]]!r} must be a positive number")
    if kind == "llama3" and scaling["high_freq_factor"] <= scaling["low_freq_factor"]:
        raise UserError("rope_scaling llama3 needs high_freq_factor > low_freq_factor (Llama 3.1 uses 4 and 1)")


def _coerce(field_name: str, value: Any, kind: type) -> Any:
    """Convert a value read from text (CLI, TOML) to the field's type, or fail with a one-line message."""
    if value is None or isinstance(value, kind) and not (kind is int and isinstance(value, bool)):
        return value
    try:
        if kind is bool:
            if isinstance(value, str) and value.lower() in ("1", "true", "yes", "on", "0", "false", "no", "off"):
                return value.lower() in ("1", "true", "yes", "on")
            if isinstance(value, int) and value in (0, 1):
                return bool(value)
            raise ValueError
        if kind is int:
            as_float = float(value)
            if not as_float.is_integer():
                raise ValueError
            return int(as_float)
        if kind is float:
            return float(value)
        if kind is str:
            return str(value)
    except (TypeError, ValueError):
        pass
    raise UserError(f"{field_name}={value!r} is not a valid {kind.__name__}")


def _field_types(cls) -> dict[str, type]:
    """Map each field to the plain type it holds (int, float, str, bool), unwrapping `X | None`."""
    hints = get_type_hints(cls)
    out = {}
    for f in dataclasses.fields(cls):
        hint = hints[f.name]
        args = [a for a in getattr(hint, "__args__", ()) if a is not type(None)]
        out[f.name] = args[0] if args and isinstance(args[0], type) else hint
    return out


class _ConfigMixin:
    """Dict / JSON / TOML conversion shared by the config dataclasses."""

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    def to_json(self, path: str | Path | None = None) -> str:
        text = json.dumps(self.to_dict(), indent=2, sort_keys=False) + "\n"
        if path is not None:
            Path(path).write_text(text)
        return text

    @classmethod
    def from_dict(cls, values: dict[str, Any]):
        types = _field_types(cls)
        unknown = [k for k in values if k not in types]
        if unknown:
            key = unknown[0]
            raise UserError(f"unknown {cls.__name__} field {key!r}{_closest(key, types)}")
        kwargs = {}
        for k, v in values.items():
            kind = types[k]
            kwargs[k] = _coerce(k, v, kind) if isinstance(kind, type) and kind in (int, float, str, bool) else v
        return cls(**kwargs)

    @classmethod
    def from_json(cls, text_or_path: str | Path):
        text = str(text_or_path)
        if not text.lstrip().startswith("{"):
            text = Path(text_or_path).read_text()
        return cls.from_dict(json.loads(text))

    @classmethod
    def from_toml(cls, path: str | Path):
        with open(path, "rb") as f:
            return cls.from_dict(tomllib.load(f))


@dataclass
class ModelConfig(_ConfigMixin):
    """The shape of a decoder-only Transformer. Defaults are GPT-2 small (124M)."""

    vocab_size: int = 50257  # number of token ids; the embedding and output layer have this many rows
    block_size: int = 1024  # context length the model is trained for (and the limit for learned positions)
    n_layer: int = 12  # number of Transformer blocks
    n_head: int = 12  # number of query heads
    n_kv_head: int | None = None  # key/value heads: None = n_head (multi-head), 1 = multi-query, else grouped-query
    n_embd: int = 768  # width of the residual stream
    head_size: int | None = None  # width of each attention head: None = n_embd // n_head (Qwen3 sets its own)
    mlp: str = "gelu"  # MLP kind: relu | gelu (tanh approximation, as GPT/GPT-2) | swiglu | relu2 (squared ReLU)
    mlp_hidden: int | None = None  # MLP hidden width: None = 4 * n_embd (swiglu: 8/3 * n_embd, rounded up to 64)
    norm: str = "layernorm"  # normalisation: layernorm | rmsnorm
    norm_position: str = "pre"  # pre-norm (GPT-2, modern) or post-norm (original Transformer, GPT-1)
    norm_eps: float = 1e-5  # epsilon inside every norm
    qk_norm: bool = False  # RMS-normalise queries and keys per head before attention scores
    position: str = "learned"  # positions: learned | sinusoidal | alibi | rope | none
    rope_theta: float = 10000.0  # RoPE base frequency
    rope_scaling: dict | None = None  # RoPE frequencies rescaled for long context: see ROPE_SCALING; None = as trained
    attention: str = "sdpa"  # sdpa (F.scaled_dot_product_attention, fast) | manual (explicit fp32 softmax, readable)
    dropout: float = 0.0  # dropout on embeddings, attention weights and residual branches
    bias: bool = True  # biases in Linear layers and LayerNorm
    attn_bias: bool | None = None  # biases on the query, key and value projections: None = as bias (Qwen2: True)
    tie_embeddings: bool = True  # share the token embedding matrix with the output layer
    scale_embeddings: bool = False  # multiply token embeddings by sqrt(n_embd) (original Transformer)
    init_std: float = 0.02  # std of the normal init; residual projections get init_std / sqrt(2 * n_layer)

    def __post_init__(self):
        for name in ("vocab_size", "block_size", "n_layer", "n_head", "n_embd"):
            value = getattr(self, name)
            if not isinstance(value, int) or isinstance(value, bool) or value < 1:
                raise UserError(f"{name}={value!r} must be a positive integer")
        _check_choice("mlp", self.mlp, MLP_KINDS)
        _check_choice("norm", self.norm, NORM_KINDS)
        _check_choice("norm_position", self.norm_position, NORM_POSITIONS)
        _check_choice("position", self.position, POSITION_KINDS)
        _check_choice("attention", self.attention, ATTENTION_KINDS)
        if self.head_size is not None and (not isinstance(self.head_size, int) or self.head_size < 1):
            raise UserError(f"head_size={self.head_size!r} must be a positive integer or None (= n_embd // n_head)")
        if self.head_size is None and self.n_embd % self.n_head:
            raise UserError(f"n_embd={self.n_embd} is not divisible by n_head={self.n_head}; "
                             f"pick n_embd as a multiple of n_head (e.g. {self.n_head * max(1, round(self.n_embd / self.n_head))})")
        if self.n_kv_head is not None:
            if not isinstance(self.n_kv_head, int) or self.n_kv_head < 1:
                raise UserError(f"n_kv_head={self.n_kv_head!r} must be a positive integer or None (= n_head)")
            if self.n_head % self.n_kv_head:
                raise UserError(f"n_head={self.n_head} is not divisible by n_kv_head={self.n_kv_head}; "
                                 "use a divisor of n_head (1 = multi-query, n_head = multi-head)")
        if self.position == "rope" and self.head_dim % 2:
            raise UserError(f"position='rope' needs an even head size, but it is {self.head_dim}; "
                             "change n_embd, n_head or head_size")
        if self.rope_scaling is not None:
            check_rope_scaling(self.rope_scaling)
            if self.position != "rope":
                raise UserError(f"rope_scaling applies to position='rope', not {self.position!r}; drop it")
        if self.position == "sinusoidal" and self.n_embd % 2:
            raise UserError(f"position='sinusoidal' needs an even n_embd, got {self.n_embd}")
        if self.mlp_hidden is not None and (not isinstance(self.mlp_hidden, int) or self.mlp_hidden < 1):
            raise UserError(f"mlp_hidden={self.mlp_hidden!r} must be a positive integer or None (automatic)")
        if not 0.0 <= self.dropout < 1.0:
            raise UserError(f"dropout={self.dropout} must be in [0, 1)")
        if self.rope_theta <= 0:
            raise UserError(f"rope_theta={self.rope_theta} must be positive")
        if self.norm_eps <= 0 or self.init_std <= 0:
            raise UserError("norm_eps and init_std must be positive")

    @property
    def head_dim(self) -> int:
        return self.head_size if self.head_size is not None else self.n_embd // self.n_head

    @property
    def qkv_bias(self) -> bool:
        return self.bias if self.attn_bias is None else self.attn_bias

    @property
    def kv_heads(self) -> int:
        return self.n_head if self.n_kv_head is None else self.n_kv_head

    @property
    def hidden_dim(self) -> int:
        if self.mlp_hidden is not None:
            return self.mlp_hidden
        if self.mlp == "swiglu":  # keeps the parameter count of a 4x MLP with two input matrices
            return 64 * math.ceil(8 * self.n_embd / 3 / 64)
        return 4 * self.n_embd

    @property
    def extrapolates(self) -> bool:
        """Whether the model can attend over more than block_size tokens (relative or no positions)."""
        return self.position in ("alibi", "rope", "none")

    @classmethod
    def presets(cls) -> list[str]:
        return list(PRESETS)

    @classmethod
    def preset(cls, name: str, **overrides) -> ModelConfig:
        if name not in PRESETS:
            raise UserError(f"unknown model preset {name!r}{_closest(name, PRESETS)}; "
                             f"available: {', '.join(PRESETS)}")
        return cls.from_dict({**PRESETS[name], **overrides})


# Named sizes are overrides of the defaults above (which are GPT-2 small). The model never looks at these names.
PRESETS: dict[str, dict[str, Any]] = {
    # The original GPT (Radford et al. 2018): post-norm, learned positions, GELU, 12 x 768, context 512.
    "gpt1": dict(vocab_size=40478, block_size=512, norm_position="post", dropout=0.1),
    "gpt2": dict(),
    "gpt2-medium": dict(n_layer=24, n_head=16, n_embd=1024),
    "gpt2-large": dict(n_layer=36, n_head=20, n_embd=1280),
    "gpt2-xl": dict(n_layer=48, n_head=25, n_embd=1600),
    # "Attention is all you need", decoder only: sinusoidal positions, post-norm, ReLU, embeddings x sqrt(d).
    "vanilla": dict(vocab_size=32000, block_size=512, n_layer=6, n_head=8, n_embd=512, mlp="relu",
                    position="sinusoidal", norm_position="post", scale_embeddings=True, dropout=0.1),
    # A modern small model: RoPE, grouped-query attention, RMSNorm, SwiGLU, pre-norm, no biases.
    "modern": dict(vocab_size=32768, block_size=2048, n_layer=12, n_head=12, n_kv_head=4, n_embd=768,
                   mlp="swiglu", norm="rmsnorm", position="rope", bias=False, qk_norm=True, norm_eps=1e-6),
    # Small ones for CPU runs and tests.
    "tiny": dict(vocab_size=256, block_size=64, n_layer=2, n_head=4, n_embd=64),
    "nano": dict(vocab_size=256, block_size=64, n_layer=4, n_head=4, n_embd=128),  # nanoGPT's CPU recipe
    "baby": dict(vocab_size=256, block_size=256, n_layer=6, n_head=6, n_embd=384, dropout=0.2),  # nanoGPT char
    "modern-tiny": dict(vocab_size=256, block_size=128, n_layer=4, n_head=4, n_kv_head=2, n_embd=128,
                        mlp="swiglu", norm="rmsnorm", position="rope", bias=False, qk_norm=True, norm_eps=1e-6),
}


SCHEDULES = ("cosine", "linear", "wsd", "constant")
OPTIMIZERS = ("adamw", "muon")
DTYPES = ("float32", "bfloat16", "float16")


@dataclass
class TrainConfig(_ConfigMixin):
    """One training run. On the command line every field is --field=value; model fields are --model.field=value."""

    data: str = "data/shakespeare-char"  # prepared data directory (lmforge prepare)
    out: str = "runs/shakespeare-char"  # run directory: checkpoints, metrics, curves, samples
    model: dict = field(default_factory=lambda: {"preset": "nano"})  # a preset name plus ModelConfig field overrides
    max_steps: int = 2000  # optimizer steps (the LR schedule spans these)
    max_seconds: float = 0.0  # wall-clock budget for training (eval and saving excluded); 0 = none
    stop_at: int = 0  # end this invocation at step N and save (the schedule still spans max_steps); 0 = off
    batch_size: int = 32  # sequences per micro-batch, per process
    block_size: int = 128  # tokens per sequence (the model's context length)
    grad_accum: int = 1  # micro-batches per optimizer step
    lr: float = 1e-3  # peak learning rate
    min_lr: float = 1e-4  # learning rate at the end of the decay
    warmup_steps: int = 100  # linear warmup from 0 to lr
    warmup_fraction: float = 0.0  # > 0: warm up over this fraction of the run instead (of max_steps or max_seconds)
    schedule: str = "cosine"  # decay after warmup: cosine | linear | wsd (stable, then linear) | constant
    decay_fraction: float = 0.4  # wsd: the last fraction of the run, decaying linearly to min_lr
    weight_decay: float = 0.1  # AdamW decay, on matrices only (never on norms or biases)
    beta1: float = 0.9  # AdamW beta1
    beta2: float = 0.95  # AdamW beta2
    grad_clip: float = 1.0  # clip the global gradient norm to this; 0 = off
    optimizer: str = "adamw"  # adamw | muon (Muon on hidden matrices, AdamW on the rest)
    muon_lr: float = 0.0  # Muon's peak learning rate, scheduled like lr; 0 = lr
    eval_interval: int = 250  # evaluate (and save) every N steps, and at the end
    eval_steps: int = 20  # validation batches per evaluation (fixed across evaluations)
    log_interval: int = 10  # write a metrics line every N steps
    save_interval: int = 0  # save every N steps; 0 = at each evaluation
    keep_last: int = 2  # checkpoints kept besides the best one
    sample_tokens: int = 200  # length of the sample written to samples.txt at each evaluation; 0 = none
    sample_prompt: str = ""  # prompt of those samples ("" = start after end-of-text)
    seed: int = 1337  # seeds weights, dropout and batches
    device: str = "auto"  # auto (cuda if present) | cpu | cuda | cuda:N | mps
    dtype: str = "float32"  # autocast dtype: float32 (off) | bfloat16 | float16 (with a grad scaler)
    compile: bool = False  # torch.compile the model
    activation_checkpointing: bool = False  # recompute activations in backward: less memory, more compute
    fsdp: bool = False  # under torchrun: shard parameters with FSDP2 instead of replicating with DDP
    init_from: str = ""  # start from the weights of another run (fine-tuning); "" = random init
    lora_rank: int = 0  # > 0: train LoRA adapters of this rank on init_from's frozen weights; 0 = all weights
    lora_alpha: float = 16.0  # LoRA scale numerator: the update is (alpha / rank) * B @ A
    lora_targets: str = "attn,mlp"  # comma-separated module names that take LoRA (attn, mlp, c_attn, c_fc, ...)
    lora_dropout: float = 0.0  # dropout on the LoRA path's input
    method: str = "sft"  # sft: learn the data's targets | dpo: preference tuning against init_from as reference
    dpo_beta: float = 0.1  # DPO's beta: how far from the reference the policy may move (larger = closer)
    overwrite: bool = False  # allow training into a run directory that already holds checkpoints
    progress: bool = True  # show a progress bar

    def __post_init__(self):
        if isinstance(self.model, str):
            self.model = {"preset": self.model}
        if not isinstance(self.model, dict):
            raise UserError(f"model must be a preset name or a table of ModelConfig fields, got {self.model!r}")
        types = _field_types(ModelConfig)
        self.model = {k: _coerce(f"model.{k}", v, types[k]) if k in types and types[k] in (int, float, str, bool) else v
                      for k, v in self.model.items()}
        for name in ("max_steps", "batch_size", "block_size", "grad_accum", "eval_interval", "eval_steps",
                     "log_interval"):
            if getattr(self, name) < 1:
                raise UserError(f"{name}={getattr(self, name)} must be at least 1")
        if self.keep_last < 1:
            raise UserError(f"keep_last={self.keep_last} must be at least 1 (the latest checkpoint is what resumes)")
        for field in dataclasses.fields(self):
            value = getattr(self, field.name)
            if isinstance(value, float) and not math.isfinite(value):
                raise UserError(f"{field.name}={value} must be a finite number")
        for name in ("warmup_steps", "save_interval", "sample_tokens", "stop_at"):
            if getattr(self, name) < 0:
                raise UserError(f"{name}={getattr(self, name)} must not be negative")
        _check_choice("schedule", self.schedule, SCHEDULES)
        _check_choice("optimizer", self.optimizer, OPTIMIZERS)
        _check_choice("dtype", self.dtype, DTYPES)
        if self.lr <= 0 or self.min_lr < 0 or self.min_lr > self.lr:
            raise UserError(f"need 0 <= min_lr <= lr and lr > 0, got lr={self.lr}, min_lr={self.min_lr}")
        if not 0 <= self.warmup_fraction < 1 or not 0 < self.decay_fraction <= 1:
            raise UserError(f"need 0 <= warmup_fraction < 1 and 0 < decay_fraction <= 1, got {self.warmup_fraction} "
                            f"and {self.decay_fraction}")
        if self.schedule == "wsd" and self.warmup_fraction + self.decay_fraction > 1:
            raise UserError(f"warmup_fraction={self.warmup_fraction} and decay_fraction={self.decay_fraction} overlap: "
                            f"wsd decays after the warmup, so their sum must be at most 1")
        if self.muon_lr < 0:
            raise UserError(f"muon_lr={self.muon_lr} must not be negative (0: the same as lr)")
        if self.max_seconds < 0 or self.grad_clip < 0 or self.weight_decay < 0:
            raise UserError("max_seconds, grad_clip and weight_decay must not be negative")
        if self.lora_rank < 0 or self.lora_alpha <= 0 or not 0 <= self.lora_dropout < 1:
            raise UserError(f"need lora_rank >= 0, lora_alpha > 0 and 0 <= lora_dropout < 1, got {self.lora_rank}, "
                            f"{self.lora_alpha}, {self.lora_dropout}")
        _check_choice("method", self.method, ("sft", "dpo"))
        if self.dpo_beta <= 0:
            raise UserError(f"dpo_beta={self.dpo_beta} must be positive")
        if self.method == "dpo" and not self.init_from:
            raise UserError("method=dpo tunes a base run against itself as the reference: set init_from "
                            "(lmforge finetune BASE --method dpo does)")
        if self.lora_rank and not self.init_from:
            raise UserError("lora_rank > 0 trains adapters on a base run: set init_from (lmforge finetune does)")
        self.model_config({"vocab_size": 256})  # fail now, not after loading data, on a bad model table

    def model_config(self, extra: dict | None = None) -> ModelConfig:
        """The ModelConfig of this run: the preset, then the model table's fields, then block_size and extra."""
        fields = dict(self.model)
        preset = fields.pop("preset", None)
        unknown = [k for k in fields if k not in ModelConfig.__dataclass_fields__]
        if unknown:
            raise UserError(f"unknown model field {unknown[0]!r}{_closest(unknown[0], ModelConfig.__dataclass_fields__)}")
        fields = {**fields, "block_size": self.block_size, **(extra or {})}
        return ModelConfig.preset(preset, **fields) if preset else ModelConfig.from_dict(fields)

    def with_overrides(self, overrides: dict[str, Any]) -> TrainConfig:
        """A copy with dotted overrides applied ("lr", "model.n_layer", "model" for the preset)."""
        values = self.to_dict()
        values["model"] = dict(values["model"])
        for key, value in overrides.items():
            if key.startswith("model."):
                values["model"][key[len("model."):]] = value
            elif key == "model":
                values["model"] = {**{k: v for k, v in values["model"].items() if k != "preset"}, "preset": value}
            else:
                values[key] = value
        return TrainConfig.from_dict(values)


def parse_overrides(args: list[str]) -> dict[str, str]:
    """['--lr=3e-4', '--model.n_layer', '4', '--compile'] -> {'lr': '3e-4', 'model.n_layer': '4', 'compile': 'true'}."""
    out, i = {}, 0
    while i < len(args):
        arg = args[i]
        if not arg.startswith("--") or len(arg) == 2:
            raise UserError(f"expected --field=value, got {arg!r}")
        key, eq, value = arg[2:].partition("=")
        if not eq:
            if i + 1 < len(args) and not args[i + 1].startswith("--"):
                value, i = args[i + 1], i + 1
            else:
                value = "true"
        out[key.replace("-", "_")] = value
        i += 1
    return out
