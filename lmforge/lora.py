"""LoRA: low-rank adapters wrapped around nn.Linear, never a copied model class.

    targets = apply_lora(model, ["attn", "mlp"], rank=8, alpha=16)   # swaps each matched Linear for a LoRALinear
    ... train: only the A and B matrices require grad, the base weights stay bit for bit what they were ...
    lora_state(model)                                                 # the adapter's tensors (adapter.safetensors)
    merge_lora(model)                                                 # W + scale * B @ A folded in, wrappers gone

forward = base(x) + scale * B(A(dropout(x))), scale = alpha / rank, with B zero at the start: the first forward of a
wrapped model equals the base model's exactly. Targets name modules by the pieces of their dotted path: "attn"
matches every Linear under an `attn` module (c_attn and c_proj), "mlp" every MLP Linear, "c_attn" only the fused
qkv projections, "lm_head" the output layer; a target that matches nothing is an error listing the names there are.
A LoRA run (adapter.safetensors + adapter_config.json beside its base) is written by train.py and read by runs.py.
"""

from __future__ import annotations

import contextlib
import json
import math
from pathlib import Path

import torch
import torch.nn as nn
import torch.nn.functional as F

from .errors import UserError

ADAPTER_WEIGHTS, ADAPTER_CONFIG = "adapter.safetensors", "adapter_config.json"


class LoRALinear(nn.Module):
    """A frozen nn.Linear plus a trainable low-rank update."""

    def __init__(self, base: nn.Linear, rank: int, alpha: float, dropout: float = 0.0, init: bool = True):
        """init=False leaves A uninitialised (no random numbers drawn): for an adapter about to be loaded."""
        super().__init__()
        self.base, self.rank, self.scale = base, rank, alpha / rank
        self.lora_A = nn.Parameter(torch.empty(rank, base.in_features, device=base.weight.device,
                                               dtype=base.weight.dtype))
        self.lora_B = nn.Parameter(torch.zeros(base.out_features, rank, device=base.weight.device,
                                               dtype=base.weight.dtype))
        if init:
            nn.init.kaiming_uniform_(self.lora_A, a=math.sqrt(5))  # as nn.Linear's own init (and PEFT's)
        self.dropout = nn.Dropout(dropout) if dropout > 0 else nn.Identity()
        base.weight.requires_grad_(False)
        if base.bias is not None:
            base.bias.requires_grad_(False)

    enabled = True  # False: the base layer alone (adapters_disabled)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not self.enabled:
            return self.base(x)
        return self.base(x) + self.scale * F.linear(F.linear(self.dropout(x), self.lora_A), self.lora_B)

    @torch.no_grad()
    def merged(self) -> nn.Linear:
        """The base Linear with the update folded into its weight (a new module; this one is left as it is)."""
        linear = torch.nn.utils.skip_init(nn.Linear, self.base.in_features, self.base.out_features,  # (no RNG)
                                          bias=self.base.bias is not None, device=self.base.weight.device,
                                          dtype=self.base.weight.dtype)
        linear.weight.copy_(self.base.weight + self.scale * (self.lora_B @ self.lora_A))
        if self.base.bias is not None:
            linear.bias.copy_(self.base.bias)
        return linear


@contextlib.contextmanager
def adapters_disabled(model: nn.Module):
    """Inside: the model computes as its base, every adapter off (DPO's reference without a second copy)."""
    wrapped = [m for m in model.modules() if isinstance(m, LoRALinear)]
    for m in wrapped:
        m.enabled = False
    try:
        yield model
    finally:
        for m in wrapped:
            m.enabled = True


def _linears(model: nn.Module) -> dict[str, nn.Linear]:
    return {name: m for name, m in model.named_modules() if type(m) is nn.Linear}


def _matches(name: str, target: str) -> bool:
    parts = name.split(".")
    return target == name or target in parts


def apply_lora(model: nn.Module, targets: list[str] | str, rank: int, alpha: float,
               dropout: float = 0.0, init: bool = True) -> list[str]:
    """Wrap every nn.Linear whose dotted name holds a target piece; freeze everything else. Returns the wrapped
    names. A tied output layer (lm_head sharing the token embedding) cannot be a target. init=False: A left
    uninitialised, for an adapter loaded next."""
    if isinstance(targets, str):
        targets = [t.strip() for t in targets.split(",") if t.strip()]
    if not isinstance(rank, int) or isinstance(rank, bool) or rank < 1:
        raise UserError(f"lora rank={rank!r} must be an integer of at least 1")
    if not alpha > 0 or not 0 <= dropout < 1:
        raise UserError(f"lora alpha={alpha} must be positive and dropout={dropout} in [0, 1)")
    if not targets:
        raise UserError("give at least one LoRA target, e.g. attn,mlp")
    linears = _linears(model)
    tied = getattr(getattr(model, "config", None), "tie_embeddings", False)
    chosen = []
    for target in targets:
        hits = [n for n in linears if _matches(n, target)]
        if not hits:
            pieces = sorted({p for n in linears for p in n.split(".") if not p.isdigit()})
            raise UserError(f"LoRA target {target!r} matches no linear layer; there are: {', '.join(pieces)}")
        chosen += [n for n in hits if n not in chosen]
    if tied and "lm_head" in chosen:
        raise UserError("lm_head shares its weight with the token embedding (tie_embeddings); it cannot take LoRA")
    for p in model.parameters():
        p.requires_grad_(False)
    for name in chosen:
        parent_name, _, child = name.rpartition(".")
        parent = model.get_submodule(parent_name) if parent_name else model
        setattr(parent, child, LoRALinear(linears[name], rank, alpha, dropout, init))
    return chosen


def lora_state(model: nn.Module) -> dict[str, torch.Tensor]:
    """The adapter's tensors: name.lora_A, name.lora_B of every LoRALinear (where name is the Linear's name)."""
    return {f"{name}.{kind}": getattr(m, kind).detach().contiguous()
            for name, m in model.named_modules() if isinstance(m, LoRALinear) for kind in ("lora_A", "lora_B")}


def base_state(model: nn.Module) -> dict[str, torch.Tensor]:
    """The model's own state dict, under its original names (a wrapped Linear's weights as if unwrapped)."""
    return {k.replace(".base.", "."): v for k, v in model.state_dict().items() if ".lora_" not in k}


def load_lora_state(model: nn.Module, state: dict[str, torch.Tensor], source: str = "the adapter") -> None:
    """Copy adapter tensors into the model's LoRALinears, naming any shape or name that does not fit."""
    mine = lora_state(model)
    missing, unexpected = sorted(set(mine) - set(state)), sorted(set(state) - set(mine))
    if missing or unexpected:
        raise UserError(f"{source} does not fit this model: missing {missing[:3]}, unexpected {unexpected[:3]}")
    wrong = [f"{k} {tuple(state[k].shape)} vs {tuple(v.shape)}" for k, v in mine.items() if state[k].shape != v.shape]
    if wrong:
        raise UserError(f"{source} was made for another base: shapes differ ({'; '.join(wrong[:3])})")
    modules = dict(model.named_modules())
    with torch.no_grad():
        for key, value in state.items():
            name, kind = key.rsplit(".", 1)
            getattr(modules[name], kind).copy_(value)


def merge_lora(model: nn.Module) -> nn.Module:
    """Fold every adapter into its base weight and put plain Linears back (in place; returns the model)."""
    for name, m in list(model.named_modules()):
        if isinstance(m, LoRALinear):
            parent_name, _, child = name.rpartition(".")
            setattr(model.get_submodule(parent_name) if parent_name else model, child, m.merged())
    for p in model.parameters():
        p.requires_grad_(True)
    return model


def adapter_settings(folder: Path) -> dict | None:
    """adapter_config.json of a run or checkpoint folder, or None when it holds a whole model."""
    path = Path(folder) / ADAPTER_CONFIG
    if not path.is_file():
        return None
    try:
        return json.loads(path.read_text())
    except json.JSONDecodeError as e:
        raise UserError(f"{path} is corrupted ({e.msg})") from None
