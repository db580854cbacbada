"""The GPT model: one configurable decoder-only Transformer, in dependency order.

    norms -> positions (learned, sinusoidal, RoPE, ALiBi) -> attention mask -> KV cache -> attention -> MLP
    -> Block -> GPT

Every option of ModelConfig maps to one small named piece here. The model imports only torch: it knows nothing about
tokenizers, files or training (GPT.from_pretrained hands over to hf.py when called). One forward path serves
training (no cache), prefill and decoding: the engine owns a static KV cache and passes it to forward() with the
position of every new token, so training never depends on cache state and no decode step changes a shape.
"""

from __future__ import annotations

import math

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch.utils.checkpoint import checkpoint

# ----------------------------------------------------------------------------------------------------------- norms

def make_norm(cfg, dim: int) -> nn.Module:
    if cfg.norm == "rmsnorm":
        return nn.RMSNorm(dim, eps=cfg.norm_eps)
    return nn.LayerNorm(dim, eps=cfg.norm_eps, bias=cfg.bias)


# ------------------------------------------------------------------------------------------------------- positions

class LearnedPositions(nn.Module):
    """A trained vector per position (GPT-1, GPT-2). Cannot go past block_size."""

    def __init__(self, cfg):
        super().__init__()
        self.weight = nn.Parameter(torch.empty(cfg.block_size, cfg.n_embd))

    def forward(self, pos: torch.Tensor) -> torch.Tensor:  # pos (B|1, T) -> (B|1, T, C)
        return F.embedding(pos, self.weight)


class SinusoidalPositions(nn.Module):
    """Fixed sines and cosines of geometric frequencies (Vaswani et al. 2017), computed for any position."""

    def __init__(self, cfg):
        super().__init__()
        inv_freq = 1.0 / (10000.0 ** (torch.arange(0, cfg.n_embd, 2, dtype=torch.float32) / cfg.n_embd))
        self.register_buffer("inv_freq", inv_freq, persistent=False)

    def forward(self, pos: torch.Tensor) -> torch.Tensor:  # pos (B|1, T) -> (B|1, T, C)
        angles = pos.float().unsqueeze(-1) * self.inv_freq  # (B, T, C/2)
        return torch.stack((angles.sin(), angles.cos()), dim=-1).flatten(-2)  # interleaved sin, cos


class RotaryEmbedding(nn.Module):
    """RoPE (Su et al. 2021), rotate-half layout: (cos, sin) of position x frequency, applied to queries and keys.
    The angles are computed from the positions on each call (cheap next to attention), so any position works and
    no shape depends on data: the compiled decode step needs no table lookups."""

    def __init__(self, cfg):
        super().__init__()
        self.theta, self.head_dim, self.scaling = cfg.rope_theta, cfg.head_dim, cfg.rope_scaling
        self.register_buffer("inv_freq", self.frequencies(), persistent=False)

    def frequencies(self, device=None) -> torch.Tensor:
        inv_freq = 1.0 / (self.theta ** (torch.arange(0, self.head_dim, 2, device=device).float() / self.head_dim))
        return inv_freq / rope_factors(inv_freq, self.scaling) if self.scaling else inv_freq

    def forward(self, pos: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:  # pos (B|1, T) -> 2 x (B|1, 1, T, hs)
        angles = pos.float().unsqueeze(-1) * self.inv_freq  # (B, T, hs/2)
        angles = torch.cat((angles, angles), dim=-1).unsqueeze(1)  # (B, 1, T, hs)
        return angles.cos(), angles.sin()


def rope_factors(inv_freq: torch.Tensor, scaling: dict) -> torch.Tensor:
    """What each RoPE frequency is divided by. linear: factor for all. llama3 (Llama 3.1): 1 for wavelengths under
    original_max_position_embeddings / high_freq_factor, factor above ... / low_freq_factor, a smooth blend between."""
    factor = float(scaling["factor"])
    if scaling["type"] == "linear":
        return torch.full_like(inv_freq, factor)
    context = float(scaling["original_max_position_embeddings"])
    low, high = float(scaling["low_freq_factor"]), float(scaling["high_freq_factor"])
    wavelen = 2 * math.pi / inv_freq
    smooth = ((context / wavelen - low) / (high - low)).clamp(0, 1)  # 0 at long wavelengths, 1 at short
    return 1 / ((1 - smooth) / factor + smooth)


def apply_rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    half = x.size(-1) // 2
    rotated = torch.cat((-x[..., half:], x[..., :half]), dim=-1)
    return (x.float() * cos + rotated.float() * sin).type_as(x)


def alibi_slopes(n_head: int) -> torch.Tensor:
    """Per-head slopes of ALiBi (Press et al. 2021), with the paper's rule for head counts that are not powers of 2."""
    def powers(n):
        start = 2.0 ** (-8.0 / n)
        return [start ** (i + 1) for i in range(n)]
    if math.log2(n_head).is_integer():
        return torch.tensor(powers(n_head))
    closest = 2 ** math.floor(math.log2(n_head))
    return torch.tensor(powers(closest) + powers(2 * closest)[0::2][: n_head - closest])


# -------------------------------------------------------------------------------------------------- attention mask

def attention_bias(query_slots: torch.Tensor, n_keys: int, key_valid: torch.Tensor | None,
                   slopes: torch.Tensor | None) -> torch.Tensor:
    """The mask every layer shares: causal, padding and ALiBi in one tensor.

    query_slots (B|1, T): the key slot each query sits at (its cache slot, or its column without a cache); a query
    may see the keys at slots up to its own. key_valid (B, S) or None: False at padding, which only the padded query
    itself may see, so no softmax row is empty. Returns a bool mask (B|1, 1, T, S), True where a query may attend,
    or with ALiBi a float bias (B|1, H, T, S) holding -inf where it may not.
    """
    q = query_slots[:, None, :, None]  # (B, 1, T, 1)
    k = torch.arange(n_keys, device=query_slots.device)  # (S,)
    allowed = k <= q  # (B, 1, T, S)
    if key_valid is not None:
        allowed = allowed & (key_valid[:, None, None, :].bool() | (k == q))
    if slopes is None:
        return allowed
    bias = -slopes.to(query_slots.device).view(1, -1, 1, 1) * (q - k).clamp(min=0).float()  # (B, H, T, S)
    return bias.masked_fill(~allowed, float("-inf"))


# ------------------------------------------------------------------------------------------------------- KV cache

class LayerKVCache(nn.Module):
    """Keys and values of one layer for every slot; update() writes in place and returns all slots."""

    def __init__(self, k: torch.Tensor, v: torch.Tensor):
        super().__init__()
        self.register_buffer("k", k, persistent=False)  # (B, nkv, S, hs)
        self.register_buffer("v", v, persistent=False)

    def update(self, slots: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """slots (B|1, T): where each row's T new keys and values go (their positions). Returns (B, nkv, S, hs)
        for every slot; the caller's mask hides the ones a query may not see."""
        rows = torch.arange(k.size(0), device=k.device).unsqueeze(1)  # (B, 1)
        self.k[rows, :, slots] = k.transpose(1, 2)  # indexed (B, T, nkv, hs): written in place, also when compiled
        self.v[rows, :, slots] = v.transpose(1, 2)
        return self.k, self.v


class KVCache(nn.Module):
    """One LayerKVCache per block, preallocated: batch rows x max_len slots. Made by GPT.make_kv_cache(); a row
    holds one sequence, the token at position p in slot p."""

    def __init__(self, layers: list[LayerKVCache]):
        super().__init__()
        self.layers = nn.ModuleList(layers)
        self.batch_size, _, self.max_len, _ = layers[0].k.shape

    @classmethod
    def allocate(cls, n_layer: int, batch_size: int, max_len: int, n_kv_head: int, head_dim: int, dtype, device):
        # one allocation, each layer's keys and values a contiguous view of it: a single stretch of memory that the
        # engine can put on 2 MB pages whole (a layer's own tensor is often under 2 MB)
        # (detached: each is a tensor of its own to autograd, as separate allocations would be)
        store = torch.zeros(n_layer, 2, batch_size, n_kv_head, max_len, head_dim, dtype=dtype, device=device)
        return cls([LayerKVCache(store[i, 0].detach(), store[i, 1].detach()) for i in range(n_layer)])

    def rows(self, start: int, stop: int) -> KVCache:
        """A cache over rows [start, stop) of this one, sharing its memory: what it writes lands here."""
        return KVCache([LayerKVCache(layer.k[start:stop], layer.v[start:stop]) for layer in self.layers])

    def reorder(self, index: torch.Tensor):
        """Select batch rows in place (beam search keeps the caches of the surviving beams)."""
        for layer in self.layers:
            layer.k.copy_(layer.k.index_select(0, index))
            layer.v.copy_(layer.v.index_select(0, index))


# ------------------------------------------------------------------------------------------------------ attention

class Attention(nn.Module):
    """Causal self-attention with multi-head, grouped-query (n_kv_head < n_head) or multi-query (n_kv_head = 1)."""

    def __init__(self, cfg):
        super().__init__()
        self.n_head, self.n_kv_head, self.head_dim = cfg.n_head, cfg.kv_heads, cfg.head_dim
        self.c_attn = nn.Linear(cfg.n_embd, (cfg.n_head + 2 * cfg.kv_heads) * cfg.head_dim, bias=cfg.qkv_bias)  # q,k,v
        self.c_proj = nn.Linear(cfg.n_head * cfg.head_dim, cfg.n_embd, bias=cfg.bias)
        self.q_norm = nn.RMSNorm(cfg.head_dim, eps=cfg.norm_eps) if cfg.qk_norm else None
        self.k_norm = nn.RMSNorm(cfg.head_dim, eps=cfg.norm_eps) if cfg.qk_norm else None
        self.dropout = cfg.dropout
        self.resid_dropout = nn.Dropout(cfg.dropout)
        self.kernel = ManualAttention() if cfg.attention == "manual" else SDPAttention()

    def forward(self, x, mask=None, rope=None, cache: LayerKVCache | None = None, slots: torch.Tensor | None = None):
        B, T, C = x.shape
        q, k, v = self.c_attn(x).split([self.n_head * self.head_dim, self.n_kv_head * self.head_dim,
                                        self.n_kv_head * self.head_dim], dim=-1)
        q = q.view(B, T, self.n_head, self.head_dim).transpose(1, 2)  # (B, nh, T, hs)
        k = k.view(B, T, self.n_kv_head, self.head_dim).transpose(1, 2)  # (B, nkv, T, hs)
        v = v.view(B, T, self.n_kv_head, self.head_dim).transpose(1, 2)  # (B, nkv, T, hs)
        if self.q_norm is not None:
            q, k = self.q_norm(q), self.k_norm(k)
        if rope is not None:
            q, k = apply_rope(q, *rope), apply_rope(k, *rope)
        if cache is not None:
            k, v = cache.update(slots, k, v)  # (B, nkv, max_len, hs)
            S = mask.size(-1) if mask is not None else T  # the slots these queries may see start at 0
            k, v = k[:, :, :S], v[:, :, :S]
        y = self.kernel(q, k, v, mask, self.dropout if self.training else 0.0)  # (B, nh, T, hs)
        y = y.transpose(1, 2).reshape(B, T, self.n_head * self.head_dim)
        return self.resid_dropout(self.c_proj(y))


class SDPAttention(nn.Module):
    """The fast path: PyTorch's fused kernels (flash / memory-efficient on GPU). mask None means plain causal."""

    def forward(self, q, k, v, mask, dropout: float) -> torch.Tensor:
        causal = mask is None and q.size(2) > 1
        return F.scaled_dot_product_attention(q, k, v, attn_mask=mask, dropout_p=dropout, is_causal=causal,
                                              enable_gqa=q.size(1) != k.size(1))


class ManualAttention(nn.Module):
    """The readable path: explicit scores, mask and softmax, all in fp32."""

    def forward(self, q, k, v, mask, dropout: float) -> torch.Tensor:
        rep = q.size(1) // k.size(1)
        k, v = k.repeat_interleave(rep, dim=1), v.repeat_interleave(rep, dim=1)  # (B, nh, S, hs)
        scores = (q.float() @ k.float().transpose(-2, -1)) / math.sqrt(q.size(-1))  # (B, nh, T, S)
        if mask is None and q.size(2) > 1:  # plain causal over square scores
            T = q.size(2)
            mask = torch.ones(T, T, dtype=torch.bool, device=q.device).tril()
        if mask is not None:
            scores = scores.masked_fill(~mask, float("-inf")) if mask.dtype == torch.bool else scores + mask
        weights = F.dropout(scores.softmax(dim=-1), p=dropout)
        return (weights @ v.float()).type_as(q)


# ------------------------------------------------------------------------------------------------------------ MLP

class SquaredReLU(nn.Module):
    def forward(self, x):
        return F.relu(x).square()


# an MLP kind's activation, a module of its own (so the inference engine can swap in a faster one): SwiGLU's gates
ACTIVATIONS = {"relu": nn.ReLU, "gelu": lambda: nn.GELU(approximate="tanh"), "relu2": SquaredReLU, "swiglu": nn.SiLU}


class MLP(nn.Module):
    """Position-wise feed-forward: ReLU, GELU (tanh approximation), squared ReLU, or SwiGLU (gate and up fused)."""

    def __init__(self, cfg):
        super().__init__()
        hidden = cfg.hidden_dim
        self.gated = cfg.mlp == "swiglu"
        self.c_fc = nn.Linear(cfg.n_embd, 2 * hidden if self.gated else hidden, bias=cfg.bias)
        self.act = ACTIVATIONS[cfg.mlp]()
        self.c_proj = nn.Linear(hidden, cfg.n_embd, bias=cfg.bias)
        self.dropout = nn.Dropout(cfg.dropout)

    def forward(self, x):
        h = self.c_fc(x)  # (B, T, hidden) or (B, T, 2 * hidden)
        if self.gated:
            gate, up = h.chunk(2, dim=-1)
            h = self.act(gate) * up
        else:
            h = self.act(h)
        return self.dropout(self.c_proj(h))


# ----------------------------------------------------------------------------------------------------------- loss

class CrossEntropy(torch.autograd.Function):
    """Mean cross-entropy of fp32 logits (N, V) against targets (N,), -100 = ignored. Same value as
    F.cross_entropy; the backward builds softmax - onehot in one buffer, in place, instead of the three full-size
    tensors (log-softmax output, zero-filled NLL gradient, log-softmax gradient) of the composite op: on a CPU the
    logits of a 50k vocabulary are the largest tensors of a training step."""

    @staticmethod
    def forward(ctx, logits, targets):
        valid = targets != -100
        safe = targets.masked_fill(~valid, 0)
        lse = torch.cat([torch.logsumexp(chunk, dim=-1) for chunk in logits.split(256)])  # small temporaries
        nll = (lse - logits.gather(1, safe[:, None]).squeeze(1)) * valid.to(logits.dtype)
        count = valid.sum()
        ctx.save_for_backward(logits, lse, safe, valid, count)
        return nll.sum() / count

    @staticmethod
    def backward(ctx, grad_out):
        logits, lse, safe, valid, count = ctx.saved_tensors
        grad = torch.sub(logits, lse[:, None]).exp_()  # softmax
        grad.scatter_add_(1, safe[:, None], torch.full_like(lse[:, None], -1.0))
        grad.mul_((valid.to(grad.dtype) / count * grad_out)[:, None])
        return grad, None


# ---------------------------------------------------------------------------------------------------------- Block

class Block(nn.Module):
    def __init__(self, cfg):
        super().__init__()
        self.pre_norm = cfg.norm_position == "pre"
        self.norm_1, self.attn = make_norm(cfg, cfg.n_embd), Attention(cfg)
        self.norm_2, self.mlp = make_norm(cfg, cfg.n_embd), MLP(cfg)

    def forward(self, x, mask=None, rope=None, cache=None, slots=None):
        if self.pre_norm:
            x = x + self.attn(self.norm_1(x), mask, rope, cache, slots)
            x = x + self.mlp(self.norm_2(x))
        else:  # post-norm: normalise after each residual sum
            x = self.norm_1(x + self.attn(x, mask, rope, cache, slots))
            x = self.norm_2(x + self.mlp(x))
        return x


# ------------------------------------------------------------------------------------------------------------ GPT

class GPT(nn.Module):
    def __init__(self, cfg):
        super().__init__()
        self.config = cfg
        self.wte = nn.Embedding(cfg.vocab_size, cfg.n_embd)
        self.wpe = {"learned": LearnedPositions, "sinusoidal": SinusoidalPositions}.get(cfg.position, lambda c: None)(cfg)
        self.rotary = RotaryEmbedding(cfg) if cfg.position == "rope" else None
        self.register_buffer("alibi", alibi_slopes(cfg.n_head) if cfg.position == "alibi" else None, persistent=False)
        self.drop = nn.Dropout(cfg.dropout)
        self.blocks = nn.ModuleList(Block(cfg) for _ in range(cfg.n_layer))
        self.norm_f = make_norm(cfg, cfg.n_embd) if cfg.norm_position == "pre" else nn.Identity()  # post-norm ends normalised
        self.lm_head = nn.Linear(cfg.n_embd, cfg.vocab_size, bias=False)
        self.embed_scale = math.sqrt(cfg.n_embd) if cfg.scale_embeddings else 1.0
        self.activation_checkpointing = False  # recompute each block in backward to save memory
        # With tied weights the output layer's gradient is dense anyway, so the embedding lookup can hand back only
        # its rows (sparse) and skip a zero-filled vocabulary-sized gradient. FSDP needs it off.
        self.sparse_embedding_grad = cfg.tie_embeddings
        self.init_weights()

    @classmethod
    def from_pretrained(cls, path_or_id: str) -> GPT:
        """A Hugging Face checkpoint of any family in families.py (GPT-2, Llama, Mistral, Qwen2, Qwen3; a folder, or a
        hub id when online) as a GPT, in eval mode: config.json and the weights are enough. The conversion lives in
        hf.py (lmforge.hf.load_hf also gives the tokenizer)."""
        from .hf import load_hf_model
        return load_hf_model(path_or_id)

    @classmethod
    def empty(cls, cfg, device="cpu") -> GPT:
        """A GPT whose weights are uninitialised memory on device, for a loader to fill: built on the meta device, so
        no time goes on an initialisation the weights overwrite, and no random numbers are drawn."""
        with torch.device("meta"):
            model = cls(cfg)
        model.to_empty(device=device)
        model.init_buffers()
        return model

    def tie_weights(self):
        if self.config.tie_embeddings:
            self.lm_head.weight = self.wte.weight

    @torch.no_grad()
    def init_weights(self):
        """GPT-2 initialisation, in one place, drawn from torch's global generator (as nn.Linear's own is):
        - every Linear weight and both embeddings: normal(0, init_std)
        - residual projections (attn.c_proj, mlp.c_proj): normal(0, init_std / sqrt(2 * n_layer)), so the
          residual stream's variance does not grow with depth
        - biases: 0; norm weights: 1, norm biases: 0; the output layer shares the token embedding when tied
        """
        cfg = self.config
        for name, module in self.named_modules():
            if isinstance(module, nn.Linear):
                std = cfg.init_std / math.sqrt(2 * cfg.n_layer) if name.endswith("c_proj") else cfg.init_std
                nn.init.normal_(module.weight, mean=0.0, std=std)
                if module.bias is not None:
                    nn.init.zeros_(module.bias)
            elif isinstance(module, (nn.LayerNorm, nn.RMSNorm)):
                nn.init.ones_(module.weight)
                if getattr(module, "bias", None) is not None:
                    nn.init.zeros_(module.bias)
        nn.init.normal_(self.wte.weight, mean=0.0, std=cfg.init_std)
        if isinstance(self.wpe, LearnedPositions):
            nn.init.normal_(self.wpe.weight, mean=0.0, std=cfg.init_std)
        self.init_buffers()

    @torch.no_grad()
    def init_buffers(self):
        """The output layer tied, and the buffers that are not saved (position frequencies, ALiBi slopes) computed:
        what to_empty() leaves undone. No random numbers."""
        self.tie_weights()
        if isinstance(self.wpe, SinusoidalPositions):
            self.wpe.inv_freq.copy_(SinusoidalPositions(self.config).inv_freq.to(self.wpe.inv_freq.device))
        if self.rotary is not None:
            self.rotary.inv_freq.copy_(self.rotary.frequencies(self.rotary.inv_freq.device))
        if self.alibi is not None:
            self.alibi.copy_(alibi_slopes(self.config.n_head))

    def num_params(self, non_embedding: bool = False) -> int:
        """Parameters counted once (tied ones too); non_embedding leaves out the position embedding."""
        n = sum(p.numel() for p in self.parameters())
        if non_embedding and isinstance(self.wpe, LearnedPositions):
            n -= self.wpe.weight.numel()
        return n

    def make_kv_cache(self, batch_size: int, max_len: int, dtype=None, device=None) -> KVCache:
        cfg = self.config
        if max_len > cfg.block_size and not cfg.extrapolates:
            raise ValueError(f"a cache of {max_len} positions exceeds block_size={cfg.block_size}, which "
                             f"position={cfg.position!r} cannot go past")
        ref = self.wte.weight
        return KVCache.allocate(cfg.n_layer, batch_size, max_len, cfg.kv_heads, cfg.head_dim,
                                dtype or ref.dtype, device or ref.device)

    def forward(self, idx: torch.Tensor, targets: torch.Tensor | None = None,
                attention_mask: torch.Tensor | None = None, kv_cache: KVCache | None = None,
                positions: torch.Tensor | None = None, loss_mask: torch.Tensor | None = None,
                last_only: bool = False, kv_len: int | None = None):
        """idx (B, T) token ids -> (logits (B, T, V), loss or None). loss_mask (B, T): loss only where it is 1;
        last_only: logits of the last position only, (B, 1, V).
        Without a cache (training, evaluation): attention_mask (B, T), 1 = token, 0 = padding; positions count real
        tokens only, so left padding does not shift them.
        With kv_cache (make_kv_cache()): positions (B|1, T) of the new tokens are also their cache slots (default
        0..T-1: a prefill). Queries attend slots [0, kv_len): by default every slot when positions are given (static
        shapes for a compiled decode step), else the T new ones; the mask hides each row's slots past its position.
        """
        self._check_inputs(idx, targets, attention_mask, kv_cache, positions, loss_mask, kv_len)
        B, T = idx.shape
        columns = torch.arange(T, device=idx.device).unsqueeze(0)  # (1, T)
        if kv_cache is None:
            if attention_mask is not None:
                positions = (attention_mask.long().cumsum(-1) - 1).clamp(min=0)  # (B, T)
            slots, n_keys = columns, T
        else:
            n_keys = kv_len or (kv_cache.max_len if positions is not None else T)
            slots = positions = columns if positions is None else positions
        if positions is None:
            positions = columns

        x = self.embed(idx, positions)
        rope = self.rotary(positions) if self.rotary is not None else None
        plain_causal = attention_mask is None and self.alibi is None and n_keys == T and slots is columns
        mask = None if plain_causal else attention_bias(slots, n_keys, attention_mask, self.alibi)
        for i, block in enumerate(self.blocks):
            cache = kv_cache.layers[i] if kv_cache is not None else None
            if self.activation_checkpointing and self.training and torch.is_grad_enabled():
                x = checkpoint(block, x, mask, rope, cache, slots, use_reentrant=False)
            else:
                x = block(x, mask, rope, cache, slots)
        x = self.norm_f(x)
        if last_only:
            x = x[:, -1:]
        logits = self.lm_head(x)  # (B, T, V)

        loss = None
        if targets is not None:
            if loss_mask is not None:
                targets = targets.masked_fill(loss_mask == 0, -100)
            loss = CrossEntropy.apply(logits.float().view(-1, logits.size(-1)), targets.reshape(-1))
        return logits, loss

    def embed(self, idx: torch.Tensor, pos: torch.Tensor) -> torch.Tensor:
        """Token ids (B, T) at positions (B|1, T) -> input vectors (B, T, C)."""
        x = F.embedding(idx, self.wte.weight, sparse=self.sparse_embedding_grad)
        if self.embed_scale != 1.0:
            x = x * self.embed_scale
        if self.wpe is not None:
            x = x + self.wpe(pos).to(x.dtype)
        return self.drop(x)

    def _check_inputs(self, idx, targets, attention_mask, kv_cache, positions, loss_mask, kv_len):
        """Turn user mistakes into one-line ValueErrors instead of index errors deep inside. Checks of values (ids,
        positions) run only on CPU and outside torch.compile: elsewhere they would stall the device queue."""
        cfg = self.config
        if not isinstance(idx, torch.Tensor) or idx.dim() != 2:
            shape = tuple(idx.shape) if isinstance(idx, torch.Tensor) else type(idx).__name__
            raise ValueError(f"idx must be a 2-D tensor of token ids (batch, time), got {shape}; use idx[None] for one sequence")
        if idx.dtype.is_floating_point or idx.dtype.is_complex or idx.dtype == torch.bool:
            raise ValueError(f"idx must hold integer token ids, got dtype {idx.dtype}; convert with idx.long()")
        B, T = idx.shape
        if T == 0:
            raise ValueError("idx is empty along time; give at least one token")
        if kv_cache is None and T > cfg.block_size and not cfg.extrapolates:
            raise ValueError(f"sequence length {T} exceeds block_size={cfg.block_size}, and position="
                             f"{cfg.position!r} cannot go past it; crop the input to the last {cfg.block_size} tokens")
        if kv_cache is not None:
            if attention_mask is not None:
                raise ValueError("attention_mask is for uncached batches; with a kv_cache each row has its own "
                                 "positions (pass positions instead of padding)")
            if kv_cache.batch_size != B:
                raise ValueError(f"the KV cache has {kv_cache.batch_size} rows but idx has {B}; use kv_cache.rows()")
            if positions is not None and (positions.dim() != 2 or positions.size(1) != T or positions.size(0) not in (1, B)):
                raise ValueError(f"positions must be (batch or 1, {T}), got {tuple(positions.shape)}")
            if positions is None and T > kv_cache.max_len:
                raise ValueError(f"the KV cache holds {kv_cache.max_len} positions but {T} are needed; make a larger one")
            if kv_len is not None and not 0 < kv_len <= kv_cache.max_len:
                raise ValueError(f"kv_len={kv_len} exceeds the cache's {kv_cache.max_len} slots (or is not positive)")
            limit = kv_len or (kv_cache.max_len if positions is not None else T)
        elif positions is not None:
            raise ValueError("positions are for cached decoding; without a kv_cache they follow from attention_mask")
        if idx.device.type == "cpu" and not torch.compiler.is_compiling():
            lo, hi = int(idx.min()), int(idx.max())
            if lo < 0 or hi >= cfg.vocab_size:
                raise ValueError(f"token id {hi if hi >= cfg.vocab_size else lo} is outside the vocabulary "
                                 f"[0, {cfg.vocab_size}); check the tokenizer matches the model")
            if kv_cache is not None and positions is not None:
                low, top = int(positions.min()), int(positions.max())
                if low < 0 or top >= limit:
                    raise ValueError(f"position {low if low < 0 else top} is outside the {limit} cache slots the "
                                     f"queries may see")
                if top >= cfg.block_size and not cfg.extrapolates:
                    raise ValueError(f"position {top} exceeds block_size={cfg.block_size}, which position="
                                     f"{cfg.position!r} cannot go past")
        for name, t in (("targets", targets), ("loss_mask", loss_mask), ("attention_mask", attention_mask)):
            if t is not None and tuple(t.shape) != (B, T):
                raise ValueError(f"{name} shape {tuple(t.shape)} must equal idx shape (batch, time) = {(B, T)}")
