"""ONNX export: a prefill graph and a decode graph with the KV cache passed in and out, and a generation loop that
runs them in onnxruntime.

    lmforge export runs/base --format onnx --out onnx/base
    onnx/base/prefill.onnx    input_ids (batch, sequence) -> logits (batch, sequence, vocab),
                              present.{i}.key|value (batch, kv_heads, sequence, head_dim)
    onnx/base/decode.onnx     input_ids (batch, sequence),
                              past_key_values.{i}.key|value (batch, kv_heads, past, head_dim) -> logits,
                              present.{i}.key|value (batch, kv_heads, past + sequence, head_dim)
    onnx/base/onnx.json       every input and output with its axes, the model config, and the end-of-text id
    onnx/base/tokenizer.json

The new tokens' positions follow from the cache: past, past + 1, ... (rows of one batch share a length). The graphs
are traced from the model's own modules (embedding, blocks, final norm, output layer), with a cache object that
concatenates instead of writing a static buffer, so the exported computation is the one PyTorch runs.

    model = OnnxModel("onnx/base")                       # needs onnxruntime (pip install 'lmforge[export]')
    ids = model.generate(prompt_ids, max_new_tokens=50)  # greedy by default; temperature/top_k/top_p/seed too
"""

from __future__ import annotations

import json
import logging
import warnings
from pathlib import Path

import numpy as np
import torch
import torch.nn as nn

from .errors import UserError
from .model import GPT, attention_bias

OPSET = 18
FORMAT = "lmforge-onnx"


def _need(module: str):
    try:
        return __import__(module)
    except ImportError:
        raise UserError(f"ONNX export and inference need {module}; install the extra: pip install 'lmforge[export]'") \
            from None


class _ConcatCache:
    """A layer's cache for tracing: the keys and values so far (or none), extended by concatenation."""

    def __init__(self, k: torch.Tensor | None = None, v: torch.Tensor | None = None):
        self.k, self.v = k, v

    def update(self, slots, k: torch.Tensor, v: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        if self.k is not None:
            k, v = torch.cat([self.k, k], dim=2), torch.cat([self.v, v], dim=2)  # (B, nkv, past + T, hs)
        self.k, self.v = k, v
        return k, v


class _Decoder(nn.Module):
    """input_ids (B, T) [+ past keys and values, two per layer] -> logits (B, T, V) + present keys and values."""

    def __init__(self, model: GPT, with_past: bool):
        super().__init__()
        self.model, self.with_past = model, with_past

    def forward(self, input_ids: torch.Tensor, *past: torch.Tensor):
        m = self.model
        B, T = input_ids.shape
        past_len = past[0].size(2) if self.with_past else 0
        positions = (torch.arange(T, device=input_ids.device) + past_len).unsqueeze(0)  # (1, T)
        caches = [_ConcatCache(*past[2 * i:2 * i + 2]) if self.with_past else _ConcatCache()
                  for i in range(len(m.blocks))]
        x = m.embed(input_ids, positions)
        rope = m.rotary(positions) if m.rotary is not None else None
        mask = attention_bias(positions, past_len + T, None, m.alibi)
        for block, cache in zip(m.blocks, caches):
            x = block(x, mask, rope, cache, positions)
        logits = m.lm_head(m.norm_f(x))
        return (logits, *[t for c in caches for t in (c.k, c.v)])


def io_names(n_layer: int, with_past: bool) -> tuple[list[str], list[str]]:
    past = [f"past_key_values.{i}.{kv}" for i in range(n_layer) for kv in ("key", "value")]
    present = [f"present.{i}.{kv}" for i in range(n_layer) for kv in ("key", "value")]
    return ["input_ids"] + (past if with_past else []), ["logits"] + present


def _export_graph(model: GPT, path: Path, with_past: bool) -> dict:
    cfg = model.config
    inputs, outputs = io_names(cfg.n_layer, with_past)
    T = 3
    args = [torch.randint(0, cfg.vocab_size, (2, T))]
    past_len = 4 if with_past else 0
    if with_past:
        args += [torch.randn(2, cfg.kv_heads, past_len, cfg.head_dim) for _ in range(2 * cfg.n_layer)]
    batch, seq, past = torch.export.Dim("batch"), torch.export.Dim("sequence"), torch.export.Dim("past_sequence")
    shapes = [{0: batch, 1: seq}] + [{0: batch, 2: past}] * (len(args) - 1)
    dynamic = (shapes[0], tuple(shapes[1:])) if with_past else (shapes[0],)
    quiet = logging.getLogger("torch.onnx")
    level = quiet.level
    quiet.setLevel(logging.ERROR)  # the exporter's notes on operators of other libraries it skips
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            torch.onnx.export(_Decoder(model, with_past).eval(), tuple(args), str(path), input_names=inputs,
                              output_names=outputs, dynamic_shapes=dynamic, opset_version=OPSET, dynamo=True,
                              external_data=False, verbose=False)
    finally:
        quiet.setLevel(level)
    kv = ["batch", "kv_heads", "past_sequence", "head_dim"]
    present_axes = ["batch", "kv_heads", "past_sequence + sequence" if with_past else "sequence", "head_dim"]
    return {"file": path.name,
            "inputs": [{"name": "input_ids", "dtype": "int64", "shape": ["batch", "sequence"]}] +
                      [{"name": n, "dtype": "float32", "shape": kv} for n in inputs[1:]],
            "outputs": [{"name": "logits", "dtype": "float32", "shape": ["batch", "sequence", "vocab"]}] +
                       [{"name": n, "dtype": "float32", "shape": present_axes} for n in outputs[1:]]}


def export_onnx(run: str | Path, out: str | Path, checkpoint: str | None = None, force: bool = False) -> Path:
    """Write prefill.onnx, decode.onnx, onnx.json and tokenizer.json for a run (fp32, CPU)."""
    from .checkpoint import new_folder
    from .runs import check_output, load, read_run_config, refuse_exporting_quantized
    from .lora import merge_lora
    _need("onnx"), _need("onnxscript")
    run = Path(run)
    refuse_exporting_quantized(run, read_run_config(run), "ONNX")
    out = check_output(run, out, force, checkpoint=checkpoint)
    model, tokenizer = load(run, checkpoint=checkpoint)
    model = merge_lora(model).float().eval()
    model.sparse_embedding_grad = False
    with new_folder(out) as tmp, torch.no_grad():
        graphs = {"prefill": _export_graph(model, tmp / "prefill.onnx", False),
                  "decode": _export_graph(model, tmp / "decode.onnx", True)}
        meta = {"format": FORMAT, "opset": OPSET, "graphs": graphs, "model": model.config.to_dict(),
                "n_layer": model.config.n_layer, "eos_id": getattr(tokenizer, "eot_id", None),
                "positions": "the new tokens sit at past_sequence, past_sequence + 1, ...; rows share a length",
                "source": str(run)}
        (tmp / "onnx.json").write_text(json.dumps(meta, indent=2) + "\n")
        tokenizer.save(tmp / "tokenizer.json")
    return out


# ----------------------------------------------------------------------------------------- running the graphs

def is_onnx_dir(path: str | Path) -> bool:
    return (Path(path) / "onnx.json").is_file()


class OnnxModel:
    """An exported folder in onnxruntime: logits of a prefill and of decode steps, and a generation loop."""

    def __init__(self, path: str | Path, threads: int | None = None):
        ort = _need("onnxruntime")
        from .config import ModelConfig
        from .tokenizer import load_tokenizer
        self.path = Path(path)
        try:
            self.meta = json.loads((self.path / "onnx.json").read_text())
        except (OSError, json.JSONDecodeError) as e:
            raise UserError(f"{self.path} is not an lmforge ONNX export ({e}); make one with lmforge export "
                            f"--format onnx") from None
        if self.meta.get("format") != FORMAT:
            raise UserError(f"{self.path / 'onnx.json'} is not an lmforge ONNX description")
        self.config = ModelConfig.from_dict(self.meta["model"])
        self.eos_id = self.meta.get("eos_id")
        self.tokenizer = load_tokenizer(self.path / "tokenizer.json")
        # replies end at end-of-text and at a chat template's end-of-turn token, as the engine's do
        self.eos_ids = set(self.tokenizer.stop_ids) | ({self.eos_id} if self.eos_id is not None else set())
        options = ort.SessionOptions()
        if threads:
            options.intra_op_num_threads = threads
        self.sessions = {name: ort.InferenceSession(str(self.path / g["file"]), options,
                                                    providers=["CPUExecutionProvider"])
                         for name, g in self.meta["graphs"].items()}
        self.past_names, self.present_names = (io_names(self.config.n_layer, True)[0][1:],
                                               io_names(self.config.n_layer, True)[1][1:])

    def prefill(self, input_ids: np.ndarray) -> tuple[np.ndarray, list[np.ndarray]]:
        """input_ids (B, T) -> logits (B, T, V) and the cache: 2 x n_layer arrays (B, kv_heads, T, head_dim)."""
        logits, *cache = self.sessions["prefill"].run(None, {"input_ids": np.asarray(input_ids, dtype=np.int64)})
        return logits, cache

    def decode(self, input_ids: np.ndarray, cache: list[np.ndarray]) -> tuple[np.ndarray, list[np.ndarray]]:
        """input_ids (B, T) after the cached positions -> logits (B, T, V) and the extended cache."""
        feed = {"input_ids": np.asarray(input_ids, dtype=np.int64), **dict(zip(self.past_names, cache))}
        logits, *cache = self.sessions["decode"].run(None, feed)
        return logits, cache

    def generate(self, prompt: list[int], max_new_tokens: int, temperature: float = 0.0, top_k: int | None = None,
                 top_p: float | None = None, seed: int | None = None, stop_at_eos: bool = True) -> list[int]:
        """New token ids after prompt, sampled as the engine samples (temperature 0: greedy). A model whose
        positions cannot extrapolate recomputes its last block_size tokens once the context is full, as the engine
        does."""
        from .sampling import check_sampling, sample_next_token
        check_sampling(max_new_tokens, temperature, top_k, top_p, 1.0, 1, seed)
        if not prompt:
            raise UserError("the prompt is empty; give at least one token")
        if min(prompt) < 0 or max(prompt) >= self.config.vocab_size:
            raise UserError(f"prompt token ids must be in [0, {self.config.vocab_size})")
        block = self.config.block_size
        generator = torch.Generator().manual_seed(seed if seed is not None else int(torch.randint(0, 2**62, (1,))))
        ids = list(prompt)
        window = ids if self.config.extrapolates else ids[-block:]
        logits, cache = self.prefill(np.array([window]))
        out: list[int] = []
        while len(out) < max_new_tokens:
            token = int(sample_next_token(torch.from_numpy(logits[:, -1].copy()), temperature, top_k, top_p,
                                          generator)[0])
            out.append(token)
            ids.append(token)
            if (stop_at_eos and token in self.eos_ids) or len(out) == max_new_tokens:
                break
            if self.config.extrapolates or len(ids) <= block:
                logits, cache = self.decode(np.array([[token]]), cache)
            else:  # every position shifts: recompute the last window without a cache
                logits, _ = self.prefill(np.array([ids[-block:]]))
        return out
