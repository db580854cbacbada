"""Run folders of every kind, read back as (model, tokenizer): a trained run (its latest checkpoint, or the one
named), a weights-only run (imported, merged, exported), a LoRA run (its base run with the adapter applied) and a
quantized run (its quantized modules). Also what the verbs that read a run share: where they may write, which
devices and dtypes they take.

    model, tokenizer = load("runs/NAME")                        # also lmforge.load
    model, tokenizer = load("runs/NAME", checkpoint="runs/NAME/best", device="cuda", dtype="bfloat16")
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file

from .checkpoint import CHECKPOINTS, WEIGHT_FILES, complete_checkpoints, latest_checkpoint, load_weights
from .config import ModelConfig
from .download import sha256_file
from .errors import MissingFileError, UserError
from .families import model_shapes
from .lora import ADAPTER_CONFIG, ADAPTER_WEIGHTS, adapter_settings, apply_lora, load_lora_state
from .model import GPT
from .quantize import empty_quantized
from .tokenizer import added_tokens, load_tokenizer


def read_run_config(run: Path) -> dict:
    path = Path(run) / "config.json"
    if not path.is_file():
        raise MissingFileError(f"{run} is not a run directory (no config.json); train one with lmforge train")
    try:
        config = json.loads(path.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise UserError(f"{path} is corrupted ({getattr(e, 'msg', e)}); it must be JSON") from None
    if not isinstance(config, dict):
        raise UserError(f"{path} holds a {type(config).__name__}, not a run's config object")
    return config


def model_config_of(folder: Path, config: dict, run: str | Path) -> ModelConfig:
    """The ModelConfig a checkpoint folder was saved with (its own config.json), else the run's."""
    path = folder / "config.json"
    if path.is_file():
        try:
            config = json.loads(path.read_text(encoding="utf-8"))
        except (json.JSONDecodeError, UnicodeDecodeError) as e:
            raise UserError(f"{path} is corrupted ({getattr(e, 'msg', e)}); it must be JSON") from None
    else:
        path = Path(run) / "config.json"
    model = config.get("model") if isinstance(config, dict) else None
    if not isinstance(model, dict):
        raise UserError(f"{path} has no model config (its \"model\" object); the run is incomplete")
    return ModelConfig.from_dict(model)


def check_output(run: str | Path, out: str | Path, replace: bool, flag: str = "--force",
                 checkpoint: str | Path | None = None, folder: bool = True) -> Path:
    """Where a verb may write what it makes of a run (a folder, or a file when folder=False): not the run or the
    checkpoint read, not a folder holding either (replacing that would delete it), not inside the run; an existing
    one only when asked (flag). Returns out, resolved."""
    run, out = Path(run).resolve(), Path(out).resolve()
    for source in [run] + ([Path(checkpoint).resolve()] if checkpoint else []):
        if out == source or out in source.parents:
            raise UserError(f"--out {out} is or holds {source}, which this reads; replacing it would delete it: "
                            f"pick a new {'folder' if folder else 'file'}")
    if run in out.parents:
        raise UserError(f"--out {out} is inside the run {run}; write it next to the run instead")
    if out.exists() and folder != out.is_dir():
        raise UserError(f"--out {out} is a {'file' if folder else 'folder'}; this writes a "
                        f"{'folder' if folder else 'file'}: pick another path")
    if out == Path.cwd() or out in Path.cwd().parents:
        raise UserError(f"--out {out} is or holds the current folder; pick a new folder")
    if out.exists() and not replace:
        raise UserError(f"{out} already exists; pass {flag} to replace it")
    return out


def refuse_exporting_quantized(run: str | Path, config: dict, fmt: str) -> None:
    """Exports take full-precision weights: a quantized run is refused, naming the run to export instead."""
    spec = config.get("quantization")
    if spec:
        source = spec.get("source", "the run it came from")
        raise UserError(f"{run} is quantized ({spec['method']}); {fmt} export takes full-precision runs (GGUF "
                        f"quantizes on its own with --type q8_0 or q4_0): export {source} instead")


def refuse_quantized(run: str | Path, config: dict) -> None:
    """Training needs full-precision weights: a quantized run is refused, naming the run to use instead."""
    spec = config.get("quantization")
    if spec:
        raise UserError(f"{run} is quantized ({spec['method']}) and cannot be trained; train or fine-tune the "
                        f"full-precision run ({spec.get('source', 'the one it came from')}) and quantize the result")


def check_device(name: str | torch.device) -> torch.device:
    """A device this process can use, or a one-line UserError naming what to pass instead."""
    try:
        device = torch.device(name)
    except (RuntimeError, TypeError):
        raise UserError(f"unknown device {name!r}; use cpu, cuda or cuda:N") from None
    if device.type == "cuda":
        if not torch.cuda.is_available():
            build = f"CUDA {torch.version.cuda}" if torch.version.cuda else "a CPU-only build"
            raise UserError(f"device {name!r}: no CUDA device is available (this PyTorch is {build}); use cpu")
        if device.index is not None and device.index >= torch.cuda.device_count():
            raise UserError(f"device {name!r}: there are {torch.cuda.device_count()} CUDA devices")
    elif device.type == "mps" and not torch.backends.mps.is_available():
        raise UserError(f"device {name!r}: MPS is not available here; use cpu")
    elif device.type not in ("cpu", "cuda", "mps"):
        raise UserError(f"device {name!r} is not supported; use cpu, cuda or cuda:N")
    return device


def model_folder(run: str | Path, checkpoint: str | Path | None = None) -> Path:
    """The folder whose weights a run stands for: the checkpoint given, else its latest, else the run folder itself
    when it holds weights only (imported, exported or merged)."""
    run = Path(run)
    if not run.is_dir():
        raise MissingFileError(f"no run directory at {run}")
    read_run_config(run)
    if checkpoint:
        folder = Path(checkpoint)
        if not any((folder / w).is_file() for w in WEIGHT_FILES):
            raise MissingFileError(f"no checkpoint at {folder} (no model.safetensors); pick one under {run / CHECKPOINTS}")
        return folder
    if complete_checkpoints(run) or not any((run / w).is_file() for w in WEIGHT_FILES):
        return latest_checkpoint(run)
    return run


INFERENCE_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def check_dtype(dtype: str | torch.dtype) -> torch.dtype:
    """A dtype to run a model in, by name or as a torch.dtype; a UserError for anything else."""
    if dtype in INFERENCE_DTYPES.values():
        return dtype
    if dtype not in INFERENCE_DTYPES:
        raise UserError(f"dtype {dtype!r} is not one of {', '.join(INFERENCE_DTYPES)}")
    return INFERENCE_DTYPES[dtype]


def load(run: str | Path, device: str | torch.device = "cpu", checkpoint: str | Path | None = None,
         dtype: str | torch.dtype = "float32"):
    """(model, tokenizer) of a run: its latest checkpoint (or the one given, e.g. runs/NAME/best), in eval mode.
    A LoRA run loads its base run and applies its adapter. dtype: what the weights are cast to after loading;
    bfloat16 halves the memory and, on a GPU, about halves the time a token takes (quantized layers keep their
    scales as stored)."""
    dtype = check_dtype(dtype)
    model, tokenizer = _load(run, check_device(device), checkpoint)
    return (model if dtype == torch.float32 else model.to(dtype)), tokenizer


def _load(run: str | Path, device: torch.device, checkpoint: str | Path | None):
    run = Path(run)
    folder = model_folder(run, checkpoint)
    if (folder / ADAPTER_WEIGHTS).is_file():
        return _load_adapter_run(folder, run, adapter_settings(folder) or adapter_settings(run), device)
    config = read_run_config(run)
    if config.get("quantization"):
        return _load_quantized(folder, run, config, device)
    model_config = model_config_of(folder, config, run)
    model = GPT.empty(model_config, device)
    load_weights(model, folder / "model.safetensors")
    return model.eval(), load_tokenizer(run / "tokenizer.json")


def run_weights(run: str | Path, checkpoint: str | Path | None = None):
    """(ModelConfig, tokenizer, tensor(name)) of a run, for an exporter that writes tensor by tensor: a whole-model
    run's tensors are read one at a time from its safetensors file; a LoRA run is loaded with its adapter merged.
    The tied output layer has no name of its own (it is wte.weight)."""
    from safetensors import safe_open

    from .lora import merge_lora
    run = Path(run)
    folder = model_folder(run, checkpoint)
    config = read_run_config(run)
    if (folder / ADAPTER_WEIGHTS).is_file():
        model, tokenizer = _load(run, torch.device("cpu"), checkpoint)
        state = merge_lora(model).state_dict()
        return model.config, tokenizer, lambda name: state[name].detach()
    cfg = model_config_of(folder, config, run)
    path = folder / "model.safetensors"
    try:
        with safe_open(path, "pt") as f:
            names = set(f.keys())
    except (SafetensorError, OSError) as e:
        raise UserError(f"{path} is corrupted or not a safetensors file ({e})") from None

    shapes = model_shapes(cfg)

    def tensor(name: str) -> torch.Tensor:
        stored = name
        if stored not in names and stored in ("wte.weight", "lm_head.weight") and cfg.tie_embeddings:
            stored = "lm_head.weight" if stored == "wte.weight" else "wte.weight"
        if stored not in names:
            raise UserError(f"{path} lacks the tensor {name}; the run is incomplete")
        with safe_open(path, "pt") as f:
            t = f.get_tensor(stored)
        expect = shapes.get(name, shapes.get("wte.weight"))
        if tuple(t.shape) != tuple(expect):
            raise UserError(f"{path}: {stored} has shape {tuple(t.shape)}, but the run's config implies "
                            f"{tuple(expect)}; the weights and config.json are of different models")
        return t
    return cfg, load_tokenizer(run / "tokenizer.json"), tensor


# ------------------------------------------------------------------------------------------------ LoRA runs

def base_identity(base: Path, run: Path) -> dict:
    """What an adapter records of its base: where it is (relative to the adapter's run, and absolute), which
    weights file it was trained on (relative to the base) and that file's sha256, so a base that changed since is
    refused rather than silently used."""
    folder = model_folder(base)
    weights = folder / "model.safetensors"
    return {"base": os.path.relpath(base.resolve(), run.resolve()), "base_absolute": str(base.resolve()),
            "base_weights": os.path.relpath(weights.resolve(), base.resolve()), "base_sha256": sha256_file(weights)}


def _find_base(run: Path, settings: dict) -> Path:
    for candidate in (run / settings["base"], Path(settings.get("base_absolute", settings["base"]))):
        if candidate.is_dir():
            return candidate
    raise MissingFileError(f"{run} is a LoRA adapter on {settings['base']} (relative to the run) or "
                           f"{settings.get('base_absolute')}, which are not there; restore the base run")


def _load_adapter_run(folder: Path, run: Path, settings: dict | None, device):
    """(model, tokenizer) of a LoRA run: its base run loaded (the exact weights it was trained on), the adapter
    applied and filled from `folder`."""
    if settings is None:
        raise UserError(f"{folder} holds an adapter but no {ADAPTER_CONFIG}; the run is incomplete")
    base = _find_base(run, settings)
    weights = base / settings.get("base_weights", "model.safetensors")
    changed = UserError(f"the base {base} has changed since this adapter was trained on it ({weights} is gone or "
                        f"differs); restore that base or fine-tune again")
    if not weights.is_file():
        raise changed
    model, tokenizer = load(base, device=device, checkpoint=str(weights.parent) if weights.parent != base else None)
    apply_lora(model, settings["targets"], settings["rank"], settings["alpha"], settings.get("dropout", 0.0),
               init=False)  # (filled from the adapter next: no random numbers drawn)
    load_lora_state(model, load_file(str(Path(folder) / ADAPTER_WEIGHTS), device=str(device)),
                    f"the adapter in {folder}")  # another base's shapes are named here
    if "base_sha256" in settings and sha256_file(weights) != settings["base_sha256"]:
        raise changed
    own = run / "tokenizer.json"  # the run's own: the base's ids, perhaps with a chat template the base lacks
    if own.is_file():
        mine = load_tokenizer(own)
        if added_tokens(tokenizer, mine) == []:
            tokenizer = mine
    return model.eval(), tokenizer


# ------------------------------------------------------------------------------------------- quantized runs

def _load_quantized(folder: Path, run: Path, config: dict, device: torch.device):
    """(model, tokenizer) of a quantized run: the quantized modules swapped in empty, then filled."""
    spec = config["quantization"]
    model_config = model_config_of(folder, config, run)
    model = GPT.empty(model_config, device)
    empty_quantized(model, spec["method"], spec.get("group_size"))
    path = folder / "model.safetensors"
    try:
        state = load_file(str(path), device=str(device))
    except (SafetensorError, OSError, ValueError) as e:
        raise UserError(f"{path} is corrupted or not a safetensors file ({e}); quantize the run again") from None
    if model_config.tie_embeddings:
        state["wte.weight"] = model.wte.weight  # placeholder: rebuilt from the output matrix below
    expected = model.state_dict()
    wrong = [f"{k} {tuple(v.shape)} {v.dtype} vs {tuple(expected[k].shape)} {expected[k].dtype}"
             for k, v in state.items()
             if k in expected and (v.shape != expected[k].shape or v.dtype != expected[k].dtype)]
    missing, unexpected = sorted(set(expected) - set(state)), sorted(set(state) - set(expected))
    if wrong or missing or unexpected:
        fix = ("quantize the run again" if folder == run
               else f"{folder} is not one of {run}'s folders: drop --checkpoint")
        raise UserError(f"{path} does not hold the {spec['method']} model of this configuration "
                        f"({'; '.join(wrong[:2]) or f'missing {missing[:3]}, unexpected {unexpected[:3]}'}); {fix}")
    model.load_state_dict(state)
    if model_config.tie_embeddings:
        with torch.no_grad():
            model.wte.weight.copy_(model.lm_head.dequantize())
    return model.eval(), load_tokenizer(run / "tokenizer.json")
