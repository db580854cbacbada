"""Hugging Face interop for GPT-2-shaped runs: a run exported as a `GPT2LMHeadModel` folder (what transformers, vLLM
and TGI load), a GPT-2 folder (or hub id) imported as a run, and a LoRA run's adapter in PEFT's format.

    export_hf("runs/base", "hf/base")                 # config.json, model.safetensors, vocab.json + merges.txt
    import_hf("hf/gpt2", "runs/gpt2")                 # the reverse: an ordinary run (generate, eval, finetune, serve)
    model, tok = load_hf("gpt2")                      # a hub id downloads through huggingface_hub when online
    model = load_hf_model("hf/weights-only")          # config.json + model.safetensors: GPT.from_pretrained's path
    save_peft_adapter("runs/tuned", "runs/tuned/peft")   # adapter_config.json + adapter_model.safetensors

GPT-2 stores its projections as Conv1D, (in, out): our (out, in) Linear weights are transposed on the way. A run GPT-2
cannot express (RoPE, RMSNorm, SwiGLU, untied embeddings, ...) is refused with the fields that differ. Only
safetensors and JSON are written; transformers is needed to read the folder back, not to write it.
"""

from __future__ import annotations

import json
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


def check_gpt2_shaped(cfg: ModelConfig, what: str = "this run", fmt: str = "the Hugging Face GPT-2 format") -> None:
    bad = gpt2_mismatches(cfg)
    if bad:
        raise UserError(f"{what} is not GPT-2-shaped, so {fmt} cannot hold it: {', '.join(bad)}")


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

    from .checkpoint import new_folder
    from .lora import merge_lora
    from .runs import check_output, load, read_run_config, refuse_exporting_quantized
    from .tokenizer import BPETokenizer
    refuse_exporting_quantized(run, read_run_config(run), "Hugging Face")
    out = check_output(run, out, force, checkpoint=checkpoint)
    model, tokenizer = load(run, checkpoint=checkpoint)
    check_gpt2_shaped(model.config, str(run))
    merge_lora(model)
    with new_folder(out) as tmp:
        save_file(to_hf_state(model.state_dict()), str(tmp / "model.safetensors"), metadata={"format": "pt"})
        (tmp / "config.json").write_text(json.dumps(hf_config(model.config, tokenizer.eot_id), indent=2) + "\n")
        if isinstance(tokenizer, BPETokenizer):
            _write_gpt2_tokenizer(tokenizer, tmp, model.config.block_size)
        else:
            print(f"note: {run}'s character tokenizer has no Hugging Face equivalent; only the model was written "
                  f"(its token ids follow {Path(run) / 'tokenizer.json'})")
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


# ------------------------------------------------------------------------------------------------------- import

HF_FILES = ["config.json", "model.safetensors", "pytorch_model.bin", "vocab.json", "merges.txt", "tokenizer.json"]


def resolve_hf(path_or_id: str | Path) -> Path:
    """A local folder as it is; otherwise a hub id, downloaded (cached) through huggingface_hub."""
    path = Path(path_or_id)
    if path.is_dir():
        return path
    if path.exists() or str(path_or_id).startswith((".", "/")) or str(path_or_id).count("/") > 1:
        raise UserError(f"{path_or_id} is not a folder of a Hugging Face GPT-2 checkpoint")
    try:
        from huggingface_hub import snapshot_download
    except ImportError:
        raise UserError(f"{path_or_id} is no local folder, and downloading it needs huggingface_hub: "
                        f"pip install 'lmforge[hf]', or pass a local folder") from None
    try:
        return Path(snapshot_download(str(path_or_id), allow_patterns=HF_FILES))
    except Exception as e:  # offline, unknown id, gated: the hub client raises many types
        raise UserError(f"could not download {path_or_id} from the Hugging Face hub ({type(e).__name__}); "
                        f"offline, pass a local folder holding config.json and model.safetensors (or "
                        f"pytorch_model.bin)") from None


def config_from_hf(hf: dict, where: str) -> ModelConfig:
    if hf.get("model_type") != "gpt2":
        raise UserError(f"{where}: model_type {hf.get('model_type')!r} is not gpt2; only GPT-2 checkpoints import")
    if hf.get("activation_function", "gelu_new") not in ("gelu_new", "gelu_pytorch_tanh"):
        raise UserError(f"{where}: activation {hf['activation_function']!r} differs from GPT-2's tanh GELU")
    n_embd = hf["n_embd"]
    if hf.get("n_inner") not in (None, 4 * n_embd):
        raise UserError(f"{where}: n_inner={hf['n_inner']} differs from 4 * n_embd")
    return ModelConfig(vocab_size=hf["vocab_size"], block_size=hf["n_positions"], n_layer=hf["n_layer"],
                       n_head=hf["n_head"], n_embd=n_embd, norm_eps=hf.get("layer_norm_epsilon", 1e-5),
                       init_std=hf.get("initializer_range", 0.02), dropout=0.0)


def from_hf_state(state: dict[str, torch.Tensor], cfg: ModelConfig, where: str) -> dict[str, torch.Tensor]:
    """GPT-2's state dict in our names and layouts; every tensor's shape is checked (and named when wrong)."""
    from .model import GPT
    with torch.device("meta"):
        shapes = {k: v.shape for k, v in GPT(cfg).state_dict().items()}
    by_hf = {hf_name(k): k for k in shapes}
    out = {}
    for name, tensor in state.items():
        name = name[len("model."):] if name.startswith("model.") else name
        name = name if name.startswith(("transformer.", "lm_head.")) else "transformer." + name
        if name.endswith((".attn.bias", ".attn.masked_bias")) or name == "lm_head.weight":
            continue  # causal-mask buffers, and the output layer tied to the embedding
        key = by_hf.get(name)
        if key is None:
            raise UserError(f"{where}: unexpected tensor {name}; this is not a GPT-2 checkpoint")
        conv1d = key.endswith(".weight") and any(f".{m}." in f".{key}" for m in CONV1D)
        want = tuple(shapes[key])[::-1] if conv1d else tuple(shapes[key])  # in GPT-2's own layout
        if tuple(tensor.shape) != want:
            raise UserError(f"{where}: {name} has shape {tuple(tensor.shape)}, but config.json implies {want}")
        out[key] = (tensor.t() if conv1d else tensor).contiguous()
    missing = sorted(set(shapes) - set(out) - {"lm_head.weight"})
    if missing:
        raise UserError(f"{where}: missing tensors {', '.join(hf_name(m) for m in missing[:3])}")
    return out


def load_hf_model(path_or_id: str | Path, device: str = "cpu"):
    """The GPT of a Hugging Face GPT-2 folder or hub id, in eval mode: config.json and model.safetensors (or
    pytorch_model.bin, read with weights_only=True). Tokenizer files are not needed."""
    from .checkpoint import load_weights
    from .model import GPT
    folder = resolve_hf(path_or_id)
    config_path = folder / "config.json"
    if not config_path.is_file():
        raise UserError(f"{folder} is not a GPT-2 checkpoint: it has no config.json")
    cfg = config_from_hf(json.loads(config_path.read_text()), str(folder))
    if (folder / "model.safetensors").is_file():
        from safetensors.torch import load_file
        state = load_file(str(folder / "model.safetensors"))
    elif (folder / "pytorch_model.bin").is_file():
        state = torch.load(folder / "pytorch_model.bin", map_location="cpu", weights_only=True)
    else:
        raise UserError(f"{folder} has no model.safetensors or pytorch_model.bin")
    state = from_hf_state(state, cfg, str(folder))
    with tempfile.TemporaryDirectory() as tmp:  # one weights loader for every path (tied weights, checks)
        from safetensors.torch import save_file
        save_file(state, f"{tmp}/model.safetensors")
        model = GPT.empty(cfg)
        load_weights(model, Path(tmp) / "model.safetensors")
    return model.to(device).eval()


def load_hf(path_or_id: str | Path, device: str = "cpu", tokenizer: str | Path | None = None):
    """(GPT, tokenizer) of a Hugging Face GPT-2 folder or hub id. tokenizer: the folder's own when None (read as
    tokenizer_from reads a folder); otherwise what tokenizer_from takes ("gpt2", or a path)."""
    folder = resolve_hf(path_or_id)
    model = load_hf_model(folder, device)
    if tokenizer is not None:
        return model, tokenizer_from(tokenizer)
    if not (_has_gpt2_tokenizer(folder) or _is_lmforge_tokenizer(folder / "tokenizer.json")):
        raise UserError(f"{folder} holds the model's weights but no tokenizer (vocab.json + merges.txt, or "
                        f"tokenizer.json); name one: --tokenizer gpt2 for GPT-2's own, or --tokenizer PATH "
                        f"(tokenizer= in Python)")
    return model, tokenizer_from(folder, what=str(folder))


def _has_gpt2_tokenizer(folder: Path) -> bool:
    return ((folder / "vocab.json").is_file() and (folder / "merges.txt").is_file()) or (
        folder / "tokenizer.json").is_file()


def tokenizer_from(spec: str | Path, what: str | None = None):
    """A tokenizer by name or path: "gpt2" (GPT-2's own ranks, BPETokenizer.gpt2(), unless a folder of that name is
    here), an lmforge tokenizer.json or a run or data folder holding one, a Hugging Face tokenizer.json of a
    byte-level BPE in GPT-2's layout, or a folder with vocab.json + merges.txt. In that order for a folder."""
    from .tokenizer import BPETokenizer, load_tokenizer
    what = what or f"--tokenizer {spec}"
    path = Path(spec)
    if str(spec) == "gpt2" and not path.exists():
        return BPETokenizer.gpt2()
    if not path.exists():
        raise UserError(f"{what}: no such file or folder; give gpt2, a tokenizer.json, or a folder with vocab.json "
                        f"+ merges.txt")
    file = path / "tokenizer.json" if path.is_dir() else path
    if file.is_file() and _is_lmforge_tokenizer(file):
        return load_tokenizer(file)
    if path.is_dir() and (path / "vocab.json").is_file() and (path / "merges.txt").is_file():
        return BPETokenizer.from_gpt2_files(path / "vocab.json", path / "merges.txt")
    if file.is_file():
        return _read_hf_tokenizer_json(file)
    raise UserError(f"{what}: the folder holds no tokenizer.json, nor vocab.json + merges.txt")


def _is_lmforge_tokenizer(path: Path) -> bool:
    from .tokenizer import FORMAT
    try:
        return json.loads(path.read_text(encoding="utf-8")).get("format") == FORMAT
    except (OSError, UnicodeDecodeError, json.JSONDecodeError, AttributeError):
        return False


def _read_hf_tokenizer_json(path: Path):
    """A Hugging Face tokenizer.json of a byte-level BPE in GPT-2's layout (the 256 byte tokens, then one token per
    merge, in merge order) as our BPETokenizer. Other families' tokenizers are not read here."""
    from .tokenizer import BPETokenizer
    try:
        spec = json.loads(path.read_text(encoding="utf-8"))
        model = spec.get("model", {})
    except (UnicodeDecodeError, json.JSONDecodeError, AttributeError) as e:
        raise UserError(f"{path} is not a tokenizer.json ({e})") from None
    byte_level = "ByteLevel" in json.dumps(spec.get("pre_tokenizer"))
    if not (isinstance(model, dict) and model.get("type") == "BPE" and byte_level
            and isinstance(model.get("vocab"), dict) and isinstance(model.get("merges"), list)):
        raise UserError(f"{path} is not a byte-level BPE tokenizer (a BPE model with vocab and merges, pre-tokenized "
                        f"by ByteLevel); only GPT-2's kind is read here")
    with tempfile.TemporaryDirectory() as tmp:
        merges = [m if isinstance(m, str) else " ".join(m) for m in model["merges"]]
        Path(tmp, "vocab.json").write_text(json.dumps(model["vocab"]), encoding="utf-8")
        Path(tmp, "merges.txt").write_text("\n".join(merges) + "\n", encoding="utf-8")
        try:
            return BPETokenizer.from_gpt2_files(Path(tmp, "vocab.json"), Path(tmp, "merges.txt"))
        except UserError:
            raise UserError(f"{path}: its ids do not follow GPT-2's layout (the 256 byte tokens, then one token per "
                            f"merge in merge order), the only one read here") from None


def import_hf(path_or_id: str | Path, out: str | Path, force: bool = False,
              tokenizer: str | Path | None = None) -> Path:
    """A Hugging Face GPT-2 checkpoint as an ordinary run folder (config.json, model.safetensors, tokenizer.json).
    tokenizer: see load_hf (needed when the folder holds weights only)."""
    from safetensors.torch import save_file

    from .checkpoint import new_folder, run_config, weights_for_saving, write_json_atomic
    out = Path(out)
    if out.exists() and not force:
        raise UserError(f"{out} already exists; pass --force to replace it")
    model, tok = load_hf(path_or_id, tokenizer=tokenizer)
    if tok.vocab_size > model.config.vocab_size:
        raise UserError(f"{path_or_id}: the tokenizer has {tok.vocab_size} tokens, the model "
                        f"{model.config.vocab_size}; pass the tokenizer the model was trained with")
    with new_folder(out) as tmp:
        save_file(weights_for_saving(model.state_dict(), True), str(tmp / "model.safetensors"))
        config = run_config(model.config)
        config["imported_from"] = str(path_or_id)
        write_json_atomic(tmp / "config.json", config)
        tok.save(tmp / "tokenizer.json")
    return out


def import_cli(args) -> int:
    out = import_hf(args.source, args.out, force=args.force, tokenizer=args.tokenizer)
    print(f"imported {args.source} into {out}: an ordinary run (lmforge generate {out} ...)")
    return 0
