"""Sampling: pure functions of logits (temperature, top-k, top-p, repetition penalty) and the checks of their
settings. Nothing here holds state: a seed enters as an explicit torch.Generator.
"""

from __future__ import annotations

import math
import numbers

import torch

from .errors import UserError


def top_k_mask(logits: torch.Tensor, k: int) -> torch.Tensor:
    """True for tokens whose logit is at least the k-th largest (ties at the boundary are kept)."""
    k = min(k, logits.size(-1))
    kth = torch.topk(logits, k, dim=-1).values[..., -1:]
    return logits >= kth


def top_p_mask(logits: torch.Tensor, p: float) -> torch.Tensor:
    """True for the smallest set of most likely tokens whose probability mass reaches p, plus any token tied with
    the least likely one kept."""
    probs = logits.float().softmax(dim=-1)
    sorted_probs, _ = probs.sort(dim=-1, descending=True)
    mass_before = sorted_probs.cumsum(dim=-1) - sorted_probs
    kept = mass_before < p
    kept[..., 0] = True  # the most likely token always (a p that float32 rounds to 0 would keep none)
    threshold = sorted_probs.masked_fill(~kept, float("inf")).min(dim=-1, keepdim=True).values
    return probs >= threshold


def apply_repetition_penalty(logits: torch.Tensor, context: torch.Tensor, penalty: float) -> torch.Tensor:
    """CTRL's penalty: logits of tokens already in the context are divided by it (multiplied when negative)."""
    score = logits.gather(-1, context)
    score = torch.where(score > 0, score / penalty, score * penalty)
    return logits.scatter(-1, context, score)


def sample_next_token(logits: torch.Tensor, temperature: float = 1.0, top_k: int | None = None,
                      top_p: float | None = None, generator: torch.Generator | None = None) -> torch.Tensor:
    """logits (B, V) -> next token ids (B,). Temperature 0 is greedy (argmax)."""
    if temperature == 0:
        return logits.argmax(dim=-1)
    logits = logits.float()
    # shifted to <= 0 first, and never divided by a temperature float32 would round to 0: a tiny one stays finite
    logits = (logits - logits.max(dim=-1, keepdim=True).values) / max(temperature, torch.finfo(torch.float32).tiny)
    if top_k is not None:
        logits = logits.masked_fill(~top_k_mask(logits, top_k), float("-inf"))
    if top_p is not None and top_p < 1.0:
        logits = logits.masked_fill(~top_p_mask(logits, top_p), float("-inf"))
    probs = logits.softmax(dim=-1)
    return torch.multinomial(probs, 1, generator=generator).squeeze(-1)


def _is_int(x) -> bool:  # Python and numpy integers, not bools (numpy's bool is no Integral)
    return isinstance(x, numbers.Integral) and not isinstance(x, bool)


def _is_number(x) -> bool:  # finite Python and numpy reals, not bools
    return isinstance(x, numbers.Real) and not isinstance(x, bool) and math.isfinite(x)


def check_sampling(max_new_tokens: int, temperature: float, top_k, top_p, repetition_penalty: float,
                   num_beams: int = 1, seed: int | None = None, length_penalty: float = 1.0) -> None:
    """One-line UserErrors for settings of the wrong type or out of range (the CLI prints them as they are)."""
    if not _is_int(max_new_tokens) or max_new_tokens < 0:
        raise UserError(f"max_new_tokens={max_new_tokens!r} must be a non-negative integer")
    if not _is_number(temperature) or temperature < 0:
        raise UserError(f"temperature={temperature!r} must be a finite number >= 0 (0 = greedy)")
    if top_k is not None and (not _is_int(top_k) or top_k < 1):
        raise UserError(f"top_k={top_k!r} must be an integer of at least 1")
    if top_p is not None and (not _is_number(top_p) or not 0.0 < top_p <= 1.0):
        raise UserError(f"top_p={top_p!r} must be in (0, 1]")
    if not _is_number(repetition_penalty) or not 0.01 <= repetition_penalty <= 100:
        raise UserError(f"repetition_penalty={repetition_penalty!r} must be a number from 0.01 to 100 (1 = off)")
    if not _is_int(num_beams) or num_beams < 1:
        raise UserError(f"num_beams={num_beams!r} must be an integer of at least 1")
    if seed is not None and (not _is_int(seed) or not 0 <= seed < 2**63):
        raise UserError(f"seed={seed!r} must be an integer in [0, 2**63)")
    if not _is_number(length_penalty):
        raise UserError(f"length_penalty={length_penalty!r} must be a finite number")


def check_stop(stop: str | list[str] | None) -> list[str]:
    """Stop strings as a list, refusing empty ones (an empty string would stop before the first character)."""
    if stop is not None and not isinstance(stop, (str, list, tuple)):
        raise UserError(f"stop={stop!r} must be a string or a list of strings")
    stop = [stop] if isinstance(stop, str) else list(stop or [])
    if any(not isinstance(s, str) or not s for s in stop):
        raise UserError("stop strings must be non-empty strings")
    return stop
