"""Hugging Face interop for every family in families.py (gpt2, llama, qwen2, qwen3): a checkpoint folder (or hub id)
imported as a run, a run exported as its family's folder (what transformers, vLLM and TGI load), a LoRA run's
adapter in PEFT's format.

    import_hf("hf/SmolLM2-135M", "runs/smol")         # config.json, model.safetensors (or shards + index), tokenizer
    model, tok = load_hf("hf/Qwen2.5-0.5B")           # a hub id downloads through huggingface_hub when online
    model = load_hf_model("hf/weights-only", dtype="auto")   # GPT.from_pretrained's path; auto keeps bf16 as bf16
    export_hf("runs/base", "hf/base")                 # LlamaForCausalLM (or GPT2LMHeadModel, Qwen2/3ForCausalLM)
    save_peft_adapter(model, settings, "runs/tuned/peft")   # adapter_config.json + adapter_model.safetensors

Conversion goes tensor by tensor: each shard is opened for the one tensor read from it (safetensors maps the file,
so nothing else of it comes into memory), and a run or folder is written by stream_safetensors, which takes one
tensor at a time. Only safetensors and JSON are written; transformers is needed to read the folder back, not to
write it.
"""

from __future__ import annotations

import json
import math
import os
import struct
from pathlib import Path
from typing import Callable

import torch

from .config import ModelConfig
from .errors import UserError
from .families import FAMILIES, Family, family_for_hf, family_of, model_shapes  # noqa: F401 (FAMILIES: API)
from .templates import end_of_turn_ids, stored_template

HF_FILES = ["config.json", "model*.safetensors", "model.safetensors.index.json", "pytorch_model.bin", "vocab.json",
            "merges.txt", "tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "chat_template.jinja"]
DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
SAFETENSORS_DTYPES = {torch.float32: "F32", torch.bfloat16: "BF16", torch.float16: "F16", torch.int64: "I64",
                      torch.int32: "I32", torch.int8: "I8", torch.uint8: "U8", torch.bool: "BOOL"}
BUFFERS = (".attn.bias", ".attn.masked_bias", ".rotary_emb.inv_freq")  # saved by older transformers; not weights


# ------------------------------------------------------------------------------------------------ tensor files

class Checkpoint:
    """The weights of a Hugging Face folder: model.safetensors, shards named by model.safetensors.index.json, or
    pytorch_model.bin (read with weights_only=True). get() reads one tensor."""

    def __init__(self, folder: Path):
        self.folder, self._bin = folder, None
        index = folder / "model.safetensors.index.json"
        if (folder / "model.safetensors").is_file():
            self.files = dict.fromkeys(_safetensors_names(folder / "model.safetensors"), folder / "model.safetensors")
        elif index.is_file():
            self.files = {name: folder / file for name, file in _weight_map(index).items()}
            missing = sorted({str(p.name) for p in self.files.values() if not p.is_file()})
            if missing:
                raise UserError(f"{index} names {missing[0]}, which is not in {folder}"
                                f"{f' (nor {len(missing) - 1} more shards)' if len(missing) > 1 else ''}; download "
                                f"every shard")
        elif (folder / "pytorch_model.bin").is_file():
            self._bin = _torch_bin(folder / "pytorch_model.bin")
            self.files = dict.fromkeys(self._bin, folder / "pytorch_model.bin")
        else:
            shards = sorted(p.name for p in folder.glob("model-*-of-*.safetensors"))
            raise UserError(f"{folder} has no model.safetensors, model.safetensors.index.json or pytorch_model.bin"
                            + (f" (shards {', '.join(shards[:2])}... without their index)" if shards else ""))

    def get(self, name: str) -> torch.Tensor:
        from safetensors import SafetensorError, safe_open
        if self._bin is not None:
            return self._bin[name]
        try:
            with safe_open(self.files[name], "pt") as f:
                return f.get_tensor(name)
        except (SafetensorError, OSError) as e:
            raise UserError(f"{self.files[name]} cannot be read ({e}); download it again") from None

    def dtype(self) -> torch.dtype:
        first = next(n for n in self.files if not n.endswith(BUFFERS))
        return self.get(first).dtype


def _safetensors_names(path: Path) -> list[str]:
    from safetensors import SafetensorError, safe_open
    try:
        with safe_open(path, "pt") as f:
            return list(f.keys())
    except (SafetensorError, OSError) as e:
        raise UserError(f"{path} is not a readable safetensors file ({e}); download it again") from None


def _weight_map(index: Path) -> dict[str, str]:
    try:
        weight_map = json.loads(index.read_text())["weight_map"]
    except (UnicodeDecodeError, json.JSONDecodeError, KeyError, TypeError):
        weight_map = None
    if not (isinstance(weight_map, dict) and all(isinstance(v, str) for v in weight_map.values())):
        raise UserError(f"{index} is not a shard index (its weight_map must map each tensor to a file name); "
                        f"download it again")
    return weight_map


def _torch_bin(path: Path) -> dict[str, torch.Tensor]:
    """pytorch_model.bin's tensors, memory-mapped when the file is in torch's zip format (every save since torch 1.6),
    read whole when it is older."""
    import pickle
    try:
        try:
            state = torch.load(path, map_location="cpu", weights_only=True, mmap=True)
        except RuntimeError as e:
            if "zip" not in str(e).lower():
                raise
            state = torch.load(path, map_location="cpu", weights_only=True)
    except (RuntimeError, pickle.UnpicklingError, EOFError, ValueError, OSError) as e:
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise UserError(f"{path} cannot be read as a torch state dict ({first}); download it again, or convert it "
                        f"to safetensors") from None
    if not (isinstance(state, dict) and all(isinstance(k, str) and isinstance(v, torch.Tensor)
                                            for k, v in state.items())):
        raise UserError(f"{path} holds no state dict of tensors by name")
    return state


def stream_safetensors(path: Path, specs: list[tuple[str, tuple[int, ...], torch.dtype]],
                       tensor: Callable[[str], torch.Tensor], metadata: dict | None = None) -> Path:
    """Write a safetensors file one tensor at a time, in the format's own layout (a little-endian u64 header size, the
    JSON header padded to 8 bytes, the data in header order): specs name every tensor, its shape and dtype up front;
    tensor(name) makes each when its turn comes, so no more than one is in memory. safetensors' own save_file takes
    the whole dict at once."""
    header, offset = {}, 0
    for name, shape, dtype in specs:
        size = math.prod(shape) * dtype.itemsize
        header[name] = {"dtype": SAFETENSORS_DTYPES[dtype], "shape": list(shape),
                        "data_offsets": [offset, offset + size]}
        offset += size
    if metadata:
        header["__metadata__"] = metadata
    blob = json.dumps(header, separators=(",", ":")).encode()
    blob += b" " * (-len(blob) % 8)
    tmp = path.with_name(f".{path.name}.tmp")
    with open(tmp, "wb") as f:
        f.write(struct.pack("<Q", len(blob)) + blob)
        for name, shape, dtype in specs:
            t = tensor(name)
            assert tuple(t.shape) == tuple(shape) and t.dtype == dtype, (name, t.shape, shape, t.dtype, dtype)
            f.write(t.detach().cpu().contiguous().view(-1).view(torch.uint8).numpy().data)
        f.flush()
        os.fsync(f.fileno())
    tmp.replace(path)
    return path


# ------------------------------------------------------------------------------------------------------- import

def resolve_hf(path_or_id: str | Path) -> Path:
    """A local folder as it is; otherwise a hub id, downloaded (cached) through huggingface_hub."""
    path = Path(path_or_id)
    if path.is_dir():
        return path
    if path.exists() or str(path_or_id).startswith((".", "/")) or str(path_or_id).count("/") > 1:
        raise UserError(f"{path_or_id} is not a folder of a Hugging Face checkpoint")
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


def read_hf_config(folder: Path) -> tuple[Family, ModelConfig]:
    path = folder / "config.json"
    if not path.is_file():
        raise UserError(f"{folder} is not a Hugging Face checkpoint: it has no config.json")
    try:
        hf = json.loads(path.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise UserError(f"{path} is not valid JSON ({e})") from None
    if not isinstance(hf, dict):
        raise UserError(f"{path} holds a {type(hf).__name__}, not the config object of a Hugging Face model")
    family = family_for_hf(hf, str(folder))
    try:
        return family, family.config_from_hf(hf, str(folder))
    except KeyError as e:
        raise UserError(f"{path} lacks {e.args[0]!r}, which a {family.name} config.json has") from None
    except UserError:
        raise
    except (TypeError, ValueError) as e:
        raise UserError(f"{path} has a field of the wrong kind ({e})") from None


def converted(files: Checkpoint, family: Family, cfg: ModelConfig, shapes: dict[str, torch.Size],
              dtype: torch.dtype | None) -> Callable[[str], torch.Tensor]:
    """tensor(our name) for a checkpoint: the family's tensors read, shape-checked (named when wrong), joined and
    cast. Checks first that every tensor is there and none is left over."""
    present = {n for n in files.files if not n.endswith(BUFFERS)}
    if cfg.tie_embeddings:  # some tied checkpoints store the output layer too: the embedding's copy, not read
        present.discard("lm_head.weight")
    alias = {}
    for n in list(present):  # GPT-2's own files name tensors without the transformer. prefix, some with model.
        if family.name == "gpt2" and not n.startswith(("transformer.", "lm_head.")):
            bare = n.removeprefix("model.")
            alias[bare if bare.startswith(("transformer.", "lm_head.")) else "transformer." + bare] = n
    wanted = {ours: family.hf_names(ours) for ours in shapes}
    found = present | set(alias)
    missing = [n for names in wanted.values() for n in names if n not in found]
    if missing:  # (a tied output layer is not wanted: it is the embedding)
        raise UserError(f"{files.folder}: the {family.name} checkpoint lacks the tensor {missing[0]}")
    used = {alias.get(n, n) for names in wanted.values() for n in names}
    extra = sorted(present - used)
    if extra:
        raise UserError(f"{files.folder}: the tensor {extra[0]} has no place in a {family.name} model of this "
                        f"config.json{f' (nor {len(extra) - 1} more)' if len(extra) > 1 else ''}")

    def tensor(ours: str) -> torch.Tensor:
        parts = family.family_shapes(ours, tuple(shapes[ours]), cfg)
        pieces = [files.get(alias.get(n, n)) for n, _ in parts]
        for (n, expect), p in zip(parts, pieces):
            if tuple(p.shape) != tuple(expect):
                raise UserError(f"{files.folder}: {n} has shape {tuple(p.shape)}, but config.json implies "
                                f"{tuple(expect)}")
        out = family.from_family(ours, pieces).contiguous()
        return out if dtype is None else out.to(dtype)
    return tensor


def _check_dtype(dtype: str, files: Checkpoint) -> torch.dtype:
    if dtype == "auto":
        found = files.dtype()
        return found if found in DTYPES.values() else torch.float32
    if dtype not in DTYPES:
        raise UserError(f"dtype {dtype!r} is not one of auto, {', '.join(DTYPES)}")
    return DTYPES[dtype]


def load_hf_model(path_or_id: str | Path, device: str = "cpu", dtype: str = "float32"):
    """The GPT of a Hugging Face folder or hub id of any family, in eval mode: config.json and the weights are
    enough. dtype: float32 (default), bfloat16, float16, or auto (the checkpoint's own)."""
    from .model import GPT
    folder = resolve_hf(path_or_id)
    family, cfg = read_hf_config(folder)
    files = Checkpoint(folder)
    target = _check_dtype(dtype, files)
    model = GPT.empty(cfg, device).to(target)
    shapes = model_shapes(cfg)
    tensor = converted(files, family, cfg, shapes, target)
    params = model.state_dict()
    with torch.no_grad():
        for name in shapes:
            params[name].copy_(tensor(name))
    model.tie_weights()
    return model.eval()


def load_hf(path_or_id: str | Path, device: str = "cpu", tokenizer: str | Path | None = None, dtype: str = "float32"):
    """(GPT, tokenizer) of a Hugging Face folder or hub id. tokenizer: the folder's own when None; otherwise what
    tokenizer_from takes ("gpt2", or a path)."""
    folder = resolve_hf(path_or_id)
    model = load_hf_model(folder, device, dtype)
    return model, folder_tokenizer(folder, tokenizer)


def folder_tokenizer(folder: Path, tokenizer: str | Path | None):
    if tokenizer is not None:
        return tokenizer_from(tokenizer)
    if not (((folder / "vocab.json").is_file() and (folder / "merges.txt").is_file())
            or (folder / "tokenizer.json").is_file()):
        raise UserError(f"{folder} holds the model's weights but no tokenizer (tokenizer.json, or vocab.json + "
                        f"merges.txt); name one: --tokenizer gpt2 for GPT-2's own, or --tokenizer PATH "
                        f"(tokenizer= in Python)")
    return tokenizer_from(folder, what=str(folder))


def tokenizer_from(spec: str | Path, what: str | None = None):
    """A tokenizer by name or path: "gpt2" (GPT-2's own ranks, unless a folder of that name is here), an lmforge
    tokenizer.json or a folder holding one, a folder with vocab.json + merges.txt (GPT-2's files, read into our
    byte-exact BPETokenizer), or any Hugging Face tokenizer.json (an HFTokenizer, with the tokenizer_config.json
    beside it). In that order for a folder."""
    from .tokenizer import BPETokenizer, HFTokenizer, load_tokenizer
    what = what or f"--tokenizer {spec}"
    path = Path(spec)
    if str(spec) == "gpt2" and not path.exists():
        return BPETokenizer.gpt2()
    if not path.exists():
        raise UserError(f"{what}: no such file or folder; give gpt2, a tokenizer.json, or a folder with "
                        f"tokenizer.json or vocab.json + merges.txt")
    file = path / "tokenizer.json" if path.is_dir() else path
    if file.is_file() and _is_lmforge_tokenizer(file):
        return load_tokenizer(file)
    gpt2_files = path.is_dir() and (path / "vocab.json").is_file() and (path / "merges.txt").is_file()
    if gpt2_files and file.is_file():  # Qwen and SmolLM ship both: their tokenizer.json is the tokenizer
        gpt2_files = _model_type(path) in (None, "gpt2")
    if gpt2_files:
        return BPETokenizer.from_gpt2_files(path / "vocab.json", path / "merges.txt")
    if file.is_file():
        try:
            json.loads(file.read_text(encoding="utf-8"))
        except (UnicodeDecodeError, json.JSONDecodeError) as e:
            raise UserError(f"{file} is not a tokenizer.json ({e})") from None
        return HFTokenizer.load(file)
    raise UserError(f"{what}: the folder holds no tokenizer.json, nor vocab.json + merges.txt")


def _model_type(folder: Path) -> str | None:
    """config.json's model_type, or None when the folder has no readable one."""
    try:
        hf = json.loads((folder / "config.json").read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError):
        return None
    return hf.get("model_type") if isinstance(hf, dict) else None


def _is_lmforge_tokenizer(path: Path) -> bool:
    from .tokenizer import FORMAT
    try:
        return json.loads(path.read_text(encoding="utf-8")).get("format") == FORMAT
    except (OSError, UnicodeDecodeError, json.JSONDecodeError, AttributeError):
        return False


def import_hf(path_or_id: str | Path, out: str | Path, force: bool = False, tokenizer: str | Path | None = None,
              dtype: str = "float32") -> Path:
    """A Hugging Face checkpoint of any family as an ordinary run folder (config.json, model.safetensors,
    tokenizer.json), converted tensor by tensor. tokenizer: see load_hf (needed when the folder holds weights only);
    dtype: see load_hf_model."""
    from .checkpoint import new_folder, run_config, write_json_atomic
    from .runs import check_output
    out = Path(out)
    if out.exists() and not force:  # before a download
        raise UserError(f"{out} already exists; pass --force to replace it")
    folder = resolve_hf(path_or_id)
    out = check_output(folder, out, force)  # neither the checkpoint read, nor a folder holding it, nor the cwd
    family, cfg = read_hf_config(folder)
    files = Checkpoint(folder)
    target = _check_dtype(dtype, files)
    tok = folder_tokenizer(folder, tokenizer)
    if tok.vocab_size > cfg.vocab_size:
        raise UserError(f"{path_or_id}: the tokenizer has {tok.vocab_size} tokens, the model {cfg.vocab_size}; "
                        f"pass the tokenizer the model was trained with")
    shapes = model_shapes(cfg)
    tensor = converted(files, family, cfg, shapes, target)
    with new_folder(out) as tmp:
        stream_safetensors(tmp / "model.safetensors", [(k, tuple(s), target) for k, s in shapes.items()], tensor,
                           {"format": "pt"})
        config = run_config(cfg)
        config.update(imported_from=str(path_or_id), family=family.name)
        write_json_atomic(tmp / "config.json", config)
        tok.save(tmp / "tokenizer.json")
    return out


def import_cli(args) -> int:
    out = import_hf(args.source, args.out, force=args.force, tokenizer=args.tokenizer, dtype=args.dtype)
    print(f"imported {args.source} into {out}: an ordinary run (lmforge generate {out} ...)")
    return 0


# ------------------------------------------------------------------------------------------------------- export

def export_hf(run: str | Path, out: str | Path, force: bool = False, checkpoint: str | None = None) -> Path:
    """A run as its family's Hugging Face folder (a LoRA run exports with its adapter merged): config.json,
    model.safetensors, generation_config.json and the tokenizer. Written atomically, tensor by tensor."""
    from .checkpoint import new_folder
    from .runs import check_output, read_run_config, refuse_exporting_quantized, run_weights
    refuse_exporting_quantized(run, read_run_config(run), "Hugging Face")
    out = check_output(run, out, force, checkpoint=checkpoint)
    cfg, tokenizer, tensor = run_weights(run, checkpoint)
    family = family_of(cfg, str(run))
    shapes = model_shapes(cfg)
    dtype = tensor(next(iter(shapes))).dtype  # the run's own: a float32 run exports float32, a bf16 import bf16
    stored = {ours: family.family_shapes(ours, tuple(shape), cfg) for ours, shape in shapes.items()}
    owner = {name: ours for ours, parts in stored.items() for name, _ in parts}
    specs = [(name, shape, dtype) for parts in stored.values() for name, shape in parts]
    cache: dict[str, dict] = {}

    def hf_tensor(name: str) -> torch.Tensor:  # each of ours is read once, split, and its pieces handed out in turn
        ours = owner[name]
        if ours not in cache:
            cache.clear()
            cache[ours] = dict(family.to_family(ours, tensor(ours).to(dtype), cfg))
        return cache[ours].pop(name)

    with new_folder(out) as tmp:
        stream_safetensors(tmp / "model.safetensors", specs, hf_tensor, {"format": "pt"})
        eos = tokenizer.eot_id
        bos = getattr(tokenizer, "bos_id", None)
        hf = family.hf_config(cfg, bos if bos is not None else eos, eos, getattr(tokenizer, "pad_id", None))
        hf["torch_dtype"] = str(dtype).removeprefix("torch.")
        (tmp / "config.json").write_text(json.dumps(hf, indent=2) + "\n")
        turn_ends = end_of_turn_ids(tokenizer)  # generate() stops at any of them, as our engine does
        (tmp / "generation_config.json").write_text(json.dumps(
            {"bos_token_id": hf["bos_token_id"], "eos_token_id": [eos, *turn_ends] if turn_ends else eos,
             "pad_token_id": hf["pad_token_id"]}, indent=2) + "\n")
        write_hf_tokenizer(tokenizer, tmp, cfg.block_size, stored_template(tokenizer, read_run_config(run)))
    return out


def hf_state(model) -> dict[str, torch.Tensor]:
    """A GPT's weights in its family's names and layouts (the tied output layer left out), in memory."""
    family, state = family_of(model.config), model.state_dict()
    return {name: t for ours in model_shapes(model.config)
            for name, t in family.to_family(ours, state[ours].detach().cpu(), model.config)}


def write_hf_tokenizer(tok, folder: Path, context: int, chat_template: str | None = None) -> None:
    """tokenizer.json + tokenizer_config.json (AutoTokenizer loads them; the chat template in it); a BPE also as
    GPT-2's vocab.json + merges.txt, which GPT2Tokenizer and older tools read."""
    from .tokenizer import BPETokenizer, HFTokenizer, tokenizer_config, tokenizer_json
    if isinstance(tok, HFTokenizer):
        if chat_template and tok.chat_template != chat_template:  # the old config.json form, converted
            tok = HFTokenizer(tok._json, {**tok.config, "chat_template": chat_template})
        tok.save(folder / "tokenizer.json")
        return
    (folder / "tokenizer.json").write_text(tokenizer_json(tok), encoding="utf-8")
    config = tokenizer_config(tok, context)
    if chat_template:
        config["chat_template"] = chat_template
    (folder / "tokenizer_config.json").write_text(json.dumps(config, indent=2) + "\n")
    if isinstance(tok, BPETokenizer):
        vocab, merges = tok.vocab_and_merges()
        (folder / "vocab.json").write_text(json.dumps(vocab, ensure_ascii=False))
        (folder / "merges.txt").write_text("#version: 0.2\n" + "\n".join(merges) + "\n", encoding="utf-8")


# --------------------------------------------------------------------------------------------------- PEFT adapters

def save_peft_adapter(model, settings: dict, out: str | Path) -> Path:
    """A LoRA model's adapter as PEFT saves one for the family's Hugging Face model: adapter_model.safetensors with
    base_model.model.<name>.lora_A/B.weight, and an adapter_config.json. Our fused c_attn (q, k, v) and c_fc (gate,
    up) carry one adapter each; its A is shared, so each of the family's projections gets A and its rows of B, the
    same update exactly. GPT-2's Conv1D modules take fan_in_fan_out."""
    from safetensors.torch import save_file

    from .lora import lora_state
    family = family_of(model.config, "the adapter's base")
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    tensors, targets = {}, set()
    state = lora_state(model)
    for module in settings["modules"]:
        names = [n.removesuffix(".weight") for n in family.hf_names(module + ".weight")]
        a, b = state[f"{module}.lora_A"].cpu(), state[f"{module}.lora_B"].cpu()
        rows = family.split_sizes(module + ".weight", model.config, len(names)) if len(names) > 1 else [b.shape[0]]
        for name, piece in zip(names, b.split(rows)):
            tensors[f"base_model.model.{name}.lora_A.weight"] = a.clone()
            tensors[f"base_model.model.{name}.lora_B.weight"] = piece.contiguous()
            targets.add(name)
    config = {"peft_type": "LORA", "task_type": "CAUSAL_LM", "r": settings["rank"], "lora_alpha": settings["alpha"],
              "lora_dropout": settings.get("dropout", 0.0), "target_modules": sorted(targets),
              "fan_in_fan_out": family.name == "gpt2", "bias": "none", "base_model_name_or_path": None,
              "inference_mode": True, "modules_to_save": None, "init_lora_weights": True}
    for name, write in (("adapter_model.safetensors",
                         lambda tmp: save_file(tensors, str(tmp), metadata={"format": "pt"})),
                        ("adapter_config.json", lambda tmp: tmp.write_text(json.dumps(config, indent=2) + "\n"))):
        tmp = out / f".{name}.tmp"
        write(tmp)
        tmp.replace(out / name)  # each file whole or not at all
    return out


__all__ = ["FAMILIES", "Checkpoint", "export_hf", "import_hf", "load_hf", "load_hf_model", "save_peft_adapter",
           "stream_safetensors", "tokenizer_from"]
