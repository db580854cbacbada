"""Data: from a corpus to token files, and from token files to training batches.

    corpus (sources.py) -> documents -> tokenizer -> train.bin / val.bin (or numbered shards), meta.json
    prompt/completion JSONL -> pairs dataset (tokens + index) -> padded batches with attention and loss masks

prepare streams: documents are read in blocks, grouped into units of a few MB, encoded by a pool of processes (at
most two units per process in flight, results taken in order, so the output equals one process's) and appended to
the output files; no list of the corpus' tokens is ever built, so memory stays bounded whatever the corpus' size. A
learned vocabulary (char, bpe) is gathered in a first streaming pass the same way. Validation is chosen document by
document as they stream past (the last files of a folder, or a hash of a row's name), or is the tail of the tokens,
moved out of train at the end. Outputs are written into a temporary folder next to the target and renamed into
place, so an interrupted prepare never leaves a directory that looks complete. Batches are a pure function of (seed,
step, micro-batch index), across shards as from one file, which makes resume exact and lets N processes draw the
same batches that one process with N accumulation steps would."""

from __future__ import annotations

import hashlib
import itertools
import json
import math
import multiprocessing
import os
import shutil
import signal
import sys
import tempfile
import zlib
from collections import Counter, deque
from concurrent.futures import ProcessPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from .checkpoint import publish_folder
from .download import sha256_file
from .errors import MissingFileError, UserError
from .sources import Corpus, open_corpus, shakespeare_documents  # noqa: F401 (part of this module's API)
from .tokenizer import (EOT, GPT2_PATTERN, BPETokenizer, CharTokenizer, Tokenizer, _specials_after, chunk_counts,
                        load_tokenizer, prompt_ids)

DATA_FORMAT, DATA_VERSION = "lmforge-data", 1
SHARD_TOKENS = 500_000_000  # tokens per output file (1 GB of uint16): smaller corpora get one train.bin


# ------------------------------------------------------------------------------------------------------- sources

def read_text_file(path: Path, errors: str = "strict") -> str:
    """Read UTF-8 text, refusing binary files and naming the byte offset of invalid UTF-8."""
    raw = path.read_bytes()
    if b"\x00" in raw[:8192]:
        raise UserError(f"{path} looks like a binary file (it holds NUL bytes); pass a UTF-8 text file")
    try:
        return raw.decode("utf-8", errors=errors)
    except UnicodeDecodeError as e:
        raise UserError(f"{path} is not valid UTF-8 at byte offset {e.start}; fix the file or pass --errors replace") from None


def load_documents(source: str, errors: str = "strict", text_field: str = "text") -> tuple[list[tuple[str, str]], str]:
    """SOURCE's documents as (name, text) pairs, all in memory, and its description: for small corpora and tests
    (prepare streams instead)."""
    corpus = open_corpus(source, text_field, errors)
    return [(d.name, "".join(d.blocks())) for d in corpus.documents()], corpus.description


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
    if out.exists() and not force:
        raise UserError(f"{out} already exists; pass --force to replace it")
    publish_folder(tmp, out)


def _write_json(path: Path, obj) -> None:
    path.write_text(json.dumps(obj, indent=2, ensure_ascii=False) + "\n")


def prepare(source: str, out: str | Path, tokenizer: str = "char", val_fraction: float = 0.1, split: str = "auto",
            errors: str = "strict", force: bool = False, tokenizer_from: str | None = None, text_field: str = "text",
            workers: int | None = None, shard_tokens: int = SHARD_TOKENS, tokenizer_sample: int | None = None,
            progress: bool = False, val_pairs: str | None = None, max_len: int | None = None) -> Prepared:
    """Tokenize SOURCE into OUT, streaming (see the module docstring). A `.jsonl` file of prompt/completion rows makes
    a pairs dataset; of {"messages": [...]} rows, a conversations dataset; of prompt/chosen/rejected rows, a
    preferences dataset (max_len: refuse a row longer than this many tokens instead of cutting it in training).
    workers: encoding processes (default: every core); shard_tokens: tokens per output file;
    tokenizer_sample: learn a char/BPE vocabulary from the first this-many characters of training text only;
    val_pairs: a .jsonl of pairs to validate on (default: the last val_fraction of the pairs)."""
    out = Path(out)
    if out.exists() and not force:
        raise UserError(f"{out} already exists; pass --force to replace it")
    if not 0.0 < val_fraction < 1.0:
        raise UserError(f"val_fraction={val_fraction} must be between 0 and 1")
    if split not in ("auto", "documents", "tail"):
        raise UserError(f"split={split!r} must be auto, documents or tail")
    if errors not in ("strict", "replace"):
        raise UserError(f"errors={errors!r} must be strict or replace")
    workers = (os.cpu_count() or 1) if workers is None else workers
    if workers < 1:
        raise UserError(f"workers={workers} must be at least 1")
    if shard_tokens < 1:
        raise UserError(f"shard_tokens={shard_tokens} must be at least 1")
    if tokenizer_sample is not None and tokenizer_sample < 1:
        raise UserError(f"tokenizer_sample={tokenizer_sample} must be a positive number of characters")
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.", dir=out.parent))
    tmp.chmod(0o755)
    try:
        rows = _rows_kind(source, text_field)
        if rows == "pairs":
            meta = _prepare_pairs(Path(source), tmp, tokenizer, val_fraction, tokenizer_from,
                                  Path(val_pairs) if val_pairs else None)
        elif rows is not None:
            meta = _prepare_sequences(rows, Path(source), tmp, tokenizer, val_fraction, tokenizer_from,
                                      Path(val_pairs) if val_pairs else None, max_len)
        else:
            meta = _prepare_text(source, tmp, tokenizer, val_fraction, split, errors, tokenizer_from, text_field,
                                 workers, shard_tokens, tokenizer_sample, progress)
        _write_json(tmp / "meta.json", meta)  # written last: a folder with meta.json is complete
        _publish(tmp, out, force)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return Prepared(out, meta)


def _rows_kind(source: str, text_field: str) -> str | None:
    """What a plain .jsonl file's first row holds: "pairs" (prompt, completion), "messages" (a conversation),
    "preferences" (prompt, chosen, rejected), or None (text rows, read by the corpus streams)."""
    path = Path(source)
    if path.suffix != ".jsonl" or not path.is_file():
        return None
    with open(path, "rb") as f:
        for line in f:
            if line.strip():
                try:
                    row = json.loads(line)
                except ValueError:
                    return "pairs"  # read_pairs names the line
                if not isinstance(row, dict) or text_field in row:
                    return None
                if "chosen" in row or "rejected" in row:
                    return "preferences"
                if "messages" in row:
                    return "messages"
                return "pairs" if "prompt" in row and "completion" in row else None
    return "pairs"


def _tokenizer_for(spec: str, text: str, tokenizer_from: str | None) -> tuple[Tokenizer, str]:
    if tokenizer_from:
        return load_tokenizer(tokenizer_from), f"from:{tokenizer_from}"
    return make_tokenizer(spec, text), spec


# --- streaming text: documents -> units of work -> a pool of encoders -> shard files

UNIT_CHARS = 1 << 20  # text handed to a worker at a time; about 2 x workers units are in flight
VAL_HASH = "crc32(document name) mod 10^6 < val_fraction x 10^6"


@dataclass
class _Plan:
    """Which documents are validation: the last files (when documents are files), a hash of the name (documents
    are rows), or none (the tail of the tokens is cut off afterwards)."""
    mode: str  # files | hash | tail
    val_files: set[str]
    fraction: float

    def is_val(self, name: str) -> bool:
        if self.mode == "files":
            return name in self.val_files
        return self.mode == "hash" and zlib.crc32(name.encode("utf-8")) % 1_000_000 < self.fraction * 1_000_000

    def describe(self, documents: int) -> str:
        if self.mode == "files":
            return f"documents: last {len(self.val_files)} of {documents} documents are validation"
        if self.mode == "hash":
            return f"documents: a document is validation when {VAL_HASH} (val_fraction {self.fraction})"
        return f"tail: the last {self.fraction:.0%} of tokens are validation"


def _plan(corpus: Corpus, split: str, fraction: float) -> _Plan:
    files = corpus.files
    if files is not None:
        if split == "documents" and len(files) < 2:
            raise UserError("split=documents needs at least two documents; use split=tail")
        if split == "documents" or (split == "auto" and len(files) >= math.ceil(1 / fraction)):
            n_val = max(1, round(len(files) * fraction))
            return _Plan("files", set(files[len(files) - n_val:]), fraction)
        return _Plan("tail", set(), fraction)
    return _Plan("tail" if split == "tail" else "hash", set(), fraction)


def _units(corpus: Corpus, plan: _Plan, stats: dict, limit: int | None = None, only_train: bool = False):
    """(split, [(text, ends_document), ...]) units of at most about UNIT_CHARS characters, in corpus order; each
    unit holds one split. Whitespace-only documents are skipped. stats gathers documents, characters and the
    sha256 of the text (documents joined by NUL)."""
    pieces, size, unit_split, seen = [], 0, None, 0
    for doc in corpus.documents():
        split = "val" if plan.is_val(doc.name) else "train"
        if only_train and split == "val":
            continue
        blocks, held = doc.blocks(), []
        for block in blocks:  # hold blocks back until the document shows some text
            held.append(block)
            if block.strip():
                break
        else:
            continue
        if stats["documents"]:
            stats["sha256"].update(b"\x00")
        stats["documents"] += 1
        for b in itertools.chain(held, blocks):
            if unit_split not in (None, split) or size >= UNIT_CHARS:
                yield unit_split, pieces
                pieces, size = [], 0
            unit_split = split
            stats["sha256"].update(b.encode("utf-8"))
            stats["characters"] += len(b)
            pieces.append((b, False))
            size += len(b)
            seen += len(b)
            if limit is not None and seen >= limit:
                break
        pieces[-1] = (pieces[-1][0], True)  # the document's last piece: end-of-text follows
        if limit is not None and seen >= limit:
            break
    if pieces:
        yield unit_split, pieces


_worker: dict = {}  # a pool process's own tokenizer, loaded once by _init_worker (one per process, never shared)


def _init_worker(tokenizer_path: str | None, pattern: str | None):
    if sys.platform == "linux" and multiprocessing.parent_process() is not None:  # a pool process dies with prepare
        import ctypes
        signal.signal(signal.SIGTERM, signal.SIG_DFL)
        ctypes.CDLL(None).prctl(1, signal.SIGTERM)  # PR_SET_PDEATHSIG
    _worker.update(tokenizer=load_tokenizer(tokenizer_path) if tokenizer_path else None, pattern=pattern)


def _encode_unit(unit) -> tuple[str, np.ndarray]:
    split, pieces = unit
    tok = _worker["tokenizer"]
    arrays = []
    for text, ends in pieces:
        arrays.append(tok.encode_array(text))
        if ends:
            arrays.append(np.array([tok.eot_id], dtype=arrays[-1].dtype))
    return split, np.concatenate(arrays) if arrays else np.zeros(0, dtype=np.int64)


def _count_unit(unit) -> Counter | set:
    """What a learned vocabulary needs from a unit: pre-split chunk counts (BPE) or the characters (char)."""
    _, pieces = unit
    if _worker["pattern"] is None:
        return set().union(*(set(text) for text, _ in pieces))
    counts = Counter()
    for text, _ in pieces:
        counts.update(chunk_counts(text, _worker["pattern"]))
    return counts


def _ordered_map(fn, units, workers: int, initargs: tuple):
    """fn over units in order, in a pool of processes (in this one for workers=1), never more than 2 x workers
    units in flight: memory stays bounded whatever the corpus, and the output equals one worker's."""
    if workers == 1:
        saved = dict(_worker)
        _init_worker(*initargs)
        try:
            for unit in units:
                yield fn(unit)
        finally:
            _worker.clear()
            _worker.update(saved)
        return
    context = multiprocessing.get_context("fork" if sys.platform == "linux" else "spawn")
    with ProcessPoolExecutor(workers, mp_context=context, initializer=_init_worker, initargs=initargs) as pool:
        pending = deque()
        try:
            for unit in units:
                pending.append(pool.submit(fn, unit))
                if len(pending) >= 2 * workers:
                    yield pending.popleft().result()
            while pending:
                yield pending.popleft().result()
        finally:
            for future in pending:
                future.cancel()


class TokenWriter:
    """Token ids appended to numbered files of at most shard_tokens each (split-00000.bin, ...); a split that fits
    in one file is renamed split.bin."""

    def __init__(self, folder: Path, split: str, dtype, shard_tokens: int):
        self.folder, self.split, self.dtype, self.shard_tokens = folder, split, dtype, shard_tokens
        self.shards: list[list] = []  # [path, tokens]
        self.file = None

    def write(self, ids: np.ndarray):
        while len(ids):
            if self.file is None or self.shards[-1][1] == self.shard_tokens:
                self._next()
            room = self.shard_tokens - self.shards[-1][1]
            part = ids[:room]
            part.astype(self.dtype).tofile(self.file)
            self.shards[-1][1] += len(part)
            ids = ids[room:]

    def _next(self):
        if self.file is not None:
            self.file.close()
        path = self.folder / f"{self.split}-{len(self.shards):05d}.bin"
        self.file = open(path, "wb")
        self.shards.append([path, 0])

    def tokens(self) -> int:
        return sum(n for _, n in self.shards)

    def cut_tail(self, n: int, into: TokenWriter):
        """Move the last n tokens into another writer (the tail split), in blocks, truncating these files."""
        if self.file is not None:
            self.file.close()
            self.file = None
        keep = self.tokens() - n
        seen, size = 0, np.dtype(self.dtype).itemsize
        for shard in list(self.shards):
            path, count = shard
            start = max(0, keep - seen)
            seen += count
            if start >= count:
                continue
            with open(path, "rb") as f:  # plain reads: a map of the whole file would count as memory in use
                f.seek(start * size)
                for i in range(start, count, 1 << 22):
                    into.write(np.fromfile(f, dtype=self.dtype, count=min(1 << 22, count - i)))
            if start == 0:
                path.unlink()
                self.shards.remove(shard)
            else:
                os.truncate(path, start * size)
                shard[1] = start

    def close(self) -> list[dict]:
        if self.file is not None:
            self.file.close()
        if not self.shards:  # an empty split still gets its (empty) file
            self._next()
            self.file.close()
        self.file = None
        if len(self.shards) == 1:
            final = self.folder / f"{self.split}.bin"
            self.shards[0][0].replace(final)
            self.shards[0][0] = final
        return [{"file": p.name, "tokens": n} for p, n in self.shards]


def _learn_tokenizer(corpus: Corpus, plan: _Plan, spec: str, workers: int, sample: int | None,
                     progress: bool) -> Tokenizer:
    """A char or BPE vocabulary from the corpus, gathered streaming and in parallel (BPE: from training documents
    only; char: from all, so that validation text has its characters)."""
    kind, _, arg = spec.partition(":")
    stats = {"documents": 0, "characters": 0, "sha256": hashlib.sha256()}
    if kind == "char" and sample is not None:
        raise UserError("--tokenizer-sample is for bpe: a character vocabulary must hold every character of the corpus")
    if kind == "char" and not arg:
        chars = set()
        for found in _ordered_map(_count_unit, _units(corpus, plan, stats, sample), workers, (None, None)):
            chars |= found
        if not chars:
            raise _empty(corpus)
        return CharTokenizer(sorted(chars), _specials_after(len(chars), [EOT]))
    if kind == "bpe":
        try:
            vocab = int(arg) if arg else 8192
        except ValueError:
            raise UserError(f"--tokenizer {spec}: the vocabulary size must be a number, e.g. bpe:8192") from None
        counts = Counter()
        units = _units(corpus, plan, stats, sample, only_train=True)
        for found in _ordered_map(_count_unit, units, workers, (None, GPT2_PATTERN)):
            counts.update(found)
        if not counts:
            raise _empty(corpus) if stats["documents"] == 0 else UserError(
                "every document is validation: no training text to learn BPE from; use a smaller val_fraction")
        return BPETokenizer.train_from_counts(counts, vocab, progress=progress)
    return make_tokenizer(spec, "")


def _prepare_text(source, tmp: Path, spec, val_fraction, split, errors, tokenizer_from, text_field, workers,
                  shard_tokens, tokenizer_sample, progress) -> dict:
    corpus = open_corpus(source, text_field, errors)
    plan = _plan(corpus, split, val_fraction)
    if tokenizer_from:
        tok, spec = load_tokenizer(tokenizer_from), f"from:{tokenizer_from}"
    elif spec.startswith(("char", "bpe")):
        tok = _learn_tokenizer(corpus, plan, spec, workers, tokenizer_sample, progress)
    else:
        tok = make_tokenizer(spec, "")
    tok.save(tmp / "tokenizer.json")
    dtype = token_dtype(tok.vocab_size)
    writers = {s: TokenWriter(tmp, s, dtype, shard_tokens) for s in ("train", "val")}
    stats = {"documents": 0, "characters": 0, "sha256": hashlib.sha256()}
    bar = _progress_bar(progress)
    for part, ids in _ordered_map(_encode_unit, _units(corpus, plan, stats), workers,
                                  (str(tmp / "tokenizer.json"), None)):
        writers[part].write(ids)
        bar.update(len(ids))
    bar.close()
    if stats["documents"] == 0:
        raise _empty(corpus)
    if plan.mode != "tail" and 0 in (writers["train"].tokens(), writers["val"].tokens()):
        # the documents rule left a split empty (few rows, or the validation files held no text): use the tail
        writers["val"].cut_tail(writers["val"].tokens(), writers["train"])
        plan = _Plan("tail", set(), val_fraction)
    if plan.mode == "tail":
        total = writers["train"].tokens()
        writers["train"].cut_tail(total - int(total * (1 - val_fraction)), writers["val"])
    shards = {s: w.close() for s, w in writers.items()}
    counts = {s: sum(f["tokens"] for f in files) for s, files in shards.items()}
    return {"format": DATA_FORMAT, "version": DATA_VERSION, "kind": "tokens", "source": corpus.description,
            "source_sha256": stats["sha256"].hexdigest(), "tokenizer": spec,
            "tokenizer_sample": tokenizer_sample if spec.startswith("bpe") else None, "vocab_size": tok.vocab_size,
            "dtype": np.dtype(dtype).name, "train_tokens": counts["train"], "val_tokens": counts["val"],
            "shards": shards, "documents": stats["documents"], "split": plan.describe(stats["documents"]),
            "characters": stats["characters"]}


def _empty(corpus: Corpus) -> UserError:
    return UserError(f"{corpus.description} holds no text (empty corpus); pass a file or folder with text in it")


def _progress_bar(enabled: bool):
    from tqdm import tqdm
    return tqdm(total=None, unit="tok", unit_scale=True, desc="encoding", disable=not enabled)


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
        if not row["completion"]:
            raise UserError(f"{path}:{n}: the completion is empty; there would be nothing to learn from this pair")
        pairs.append((row["prompt"], row["completion"]))
    if not pairs:
        raise UserError(f"{path} holds no prompt/completion pairs")
    return pairs


def encode_pair(tok: Tokenizer, prompt: str, completion: str) -> tuple[list[int], list[int]]:
    """Prompt and completion ids, tokenized apart and then joined, so the loss mask never depends on how BPE would
    merge across the boundary. The prompt starts as generation's does (prompt_ids: begin-of-text where the family has
    one, end-of-text for an empty prompt otherwise); end-of-text closes the completion."""
    return prompt_ids(tok, prompt), tok.encode(completion) + [tok.eot_id]


def pair_arrays(tok: Tokenizer, pairs: list[tuple[str, str]], dtype=np.int64) -> tuple[np.ndarray, np.ndarray]:
    """All pairs' tokens in one array, and an index of (start, prompt length, total length) rows."""
    tokens, index, start = [], [], 0
    for prompt, completion in pairs:
        p, c = encode_pair(tok, prompt, completion)
        index.append((start, len(p), len(p) + len(c)))
        tokens.extend(p + c)
        start += len(p) + len(c)
    return np.asarray(tokens, dtype=dtype), np.asarray(index, dtype=np.int64).reshape(-1, 3)


def _split_rows(rows: list, held_out: list | None, val_fraction: float, val_path, name: str) -> tuple[dict, str]:
    """train and val rows, and the rule stated in meta.json: a separate file's, or the last val_fraction."""
    if held_out is not None:
        return {"train": rows, "val": held_out}, f"validation {name} are {val_path}"
    n_val = min(len(rows) - 1, max(1, round(len(rows) * val_fraction))) if len(rows) > 1 else 0
    return {"train": rows[:len(rows) - n_val], "val": rows[len(rows) - n_val:]}, f"the last {n_val} {name} are validation"


def _prepare_pairs(path: Path, tmp: Path, spec, val_fraction, tokenizer_from, val_path: Path | None = None) -> dict:
    pairs = read_pairs(path)
    held_out = read_pairs(val_path) if val_path is not None else None
    tok, spec = _tokenizer_for(spec, "".join(p + c for p, c in pairs + (held_out or [])), tokenizer_from)
    splits, rule = _split_rows(pairs, held_out, val_fraction, val_path, "pairs")
    dtype = token_dtype(tok.vocab_size)
    for split, rows in splits.items():
        tokens, index = pair_arrays(tok, rows, dtype)
        tokens.tofile(tmp / f"{split}.bin")
        np.save(tmp / f"{split}.idx.npy", index)
    tok.save(tmp / "tokenizer.json")
    return {"format": DATA_FORMAT, "version": DATA_VERSION, "kind": "pairs", "source": str(path.resolve()),
            "source_sha256": sha256_file(path), "tokenizer": spec, "vocab_size": tok.vocab_size,
            "dtype": np.dtype(dtype).name, "train_pairs": len(splits["train"]), "val_pairs": len(splits["val"]),
            "split": rule}


# --- conversations and preferences: token sequences with a per-token target mask (templates.py renders them)

def read_rows(path: Path, kind: str, lines: list[int] | None = None) -> list:
    """The rows of a conversations (kind "messages") or preferences file, each checked, naming the line of a bad one
    (lines, when given, gets each row's line number). A preference row's prompt, chosen and rejected are text, or
    messages (then text parts become messages: the prompt a user turn, a reply an assistant turn), as TRL's
    DPOTrainer takes them; replies that repeat the prompt's messages first (whole conversations) lose them."""
    from .templates import check_messages
    if not path.is_file():
        raise MissingFileError(f"no such file: {path}")
    shape = ('{"messages": [{"role": "user", "content": ...}, {"role": "assistant", "content": ...}]}'
             if kind == "messages" else '{"prompt": ..., "chosen": ..., "rejected": ...}')
    rows = []
    for n, line in enumerate(read_text_file(path).splitlines(), 1):
        if not line.strip():
            continue
        where = f"{path}:{n}"
        try:
            row = json.loads(line)
        except json.JSONDecodeError as e:
            raise UserError(f"{where}: not valid JSON ({e.msg}); each line must be {shape}") from None
        if not isinstance(row, dict):
            raise UserError(f"{where}: each line must be {shape}")
        if lines is not None:
            lines.append(n)
        if kind == "messages":
            rows.append(check_messages(row.get("messages"), where))
            continue
        missing = [k for k in ("prompt", "chosen", "rejected") if k not in row]
        if missing:
            raise UserError(f"{where}: the preference row has no {' or '.join(repr(k) for k in missing)}; each line "
                            f"must be {shape}")
        if not all(isinstance(row[k], (str, list)) for k in ("prompt", "chosen", "rejected")):
            raise UserError(f"{where}: prompt, chosen and rejected must each be text or a list of messages")
        if all(isinstance(row[k], str) for k in ("prompt", "chosen", "rejected")):
            if not row["chosen"] or not row["rejected"]:
                raise UserError(f"{where}: chosen and rejected must not be empty")
            rows.append((row["prompt"], row["chosen"], row["rejected"]))
            continue
        as_messages = {k: row[k] if isinstance(row[k], list) else
                       [{"role": "user" if k == "prompt" else "assistant", "content": row[k]}]
                       for k in ("prompt", "chosen", "rejected")}
        prompt = check_messages(as_messages["prompt"], f"{where}: prompt", need_assistant=False)
        replies = []
        for k in ("chosen", "rejected"):
            reply = check_messages(as_messages[k], f"{where}: {k}")
            if reply[:len(prompt)] == prompt:  # a whole conversation, as ultrafeedback_binarized gives them
                reply = reply[len(prompt):]
            if not any(m["role"] == "assistant" and m["content"] for m in reply):
                raise UserError(f"{where}: {k} has no assistant reply after the prompt; give it one")
            replies.append(reply)
        rows.append((prompt, *replies))
    if not rows:
        raise UserError(f"{path} holds no rows; each line must be {shape}")
    return rows


def sequence_arrays(tok: Tokenizer, kind: str, rows: list, dtype=np.int64, wheres: list[str] | None = None,
                    max_len: int | None = None) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """All rows' token sequences in one array, their targets (1 = a token the loss covers) and an index of
    (start, first target, length) rows: one sequence per conversation, two per preference row (chosen, rejected)."""
    tokens, targets, index, start = [], [], [], 0

    def add(ids: list[int], mask: list[int], where: str):
        nonlocal start
        if max_len is not None and len(ids) > max_len:
            raise UserError(f"{where}: {len(ids)} tokens, more than --max-len {max_len}; shorten it or raise "
                            f"--max-len")
        if 1 not in mask:
            raise UserError(f"{where}: no token of it is learned from (its replies are empty, or the template leaves "
                            f"them out); give it a reply")
        index.append((start, mask.index(1) if 1 in mask else len(mask), len(ids)))
        tokens.extend(ids)
        targets.extend(mask)
        start += len(ids)

    for n, row in enumerate(rows, 1):
        where = wheres[n - 1] if wheres else f"row {n}"
        try:
            _add_row(tok, kind, row, where, add)
        except UserError as e:
            message = str(e)
            raise UserError(message if message.startswith(where) else f"{where}: {message}") from None
    return (np.asarray(tokens, dtype=dtype), np.asarray(targets, dtype=np.uint8),
            np.asarray(index, dtype=np.int64).reshape(-1, 3))


def _add_row(tok: Tokenizer, kind: str, row, where: str, add) -> None:
    from .templates import conversation_ids
    if kind == "messages":
        add(*conversation_ids(tok, row, where=where), where)
        return
    prompt, *replies = row
    for reply in replies:
        if isinstance(prompt, str):
            p, c = encode_pair(tok, prompt, reply)
            add(p + c, [0] * len(p) + [1] * len(c), where)
        else:
            add(*conversation_ids(tok, prompt + reply, learn_from=len(prompt), where=where), where)


def chat_tokenizer(tok: Tokenizer) -> Tokenizer:
    """tok as conversations need it: its own chat template, or ChatML with ChatML's two special tokens added."""
    from .templates import CHATML, CHATML_TOKENS
    if tok.chat_template is not None:
        return tok
    return tok.with_special_tokens(CHATML_TOKENS, CHATML)


def _prepare_sequences(kind: str, path: Path, tmp: Path, spec, val_fraction, tokenizer_from, val_path, max_len):
    lines, val_lines = [], []
    rows = read_rows(path, kind, lines)
    held_out = read_rows(val_path, kind, val_lines) if val_path is not None else None
    conversational = kind == "messages" or any(not isinstance(r[0], str) for r in rows + (held_out or []))
    if tokenizer_from:
        tok, spec = load_tokenizer(tokenizer_from), f"from:{tokenizer_from}"
        config = Path(tokenizer_from) / "config.json" if Path(tokenizer_from).is_dir() else \
            Path(tokenizer_from).with_name("config.json")
        if tok.chat_template is None and config.is_file():  # a run's template in the old config.json form
            from .templates import stored_template
            try:
                tok.chat_template = stored_template(tok, json.loads(config.read_text()))
            except (json.JSONDecodeError, UnicodeDecodeError, AttributeError):
                pass
    else:  # a vocabulary learned from the text the rows render to
        from .templates import CHATML, CHATML_TOKENS, render
        texts = []
        for r in rows + (held_out or []):
            if kind == "messages" or not isinstance(r[0], str):
                for messages in ([r] if kind == "messages" else [r[0] + r[1], r[0] + r[2]]):
                    texts.append(render(CHATML, messages, eos_token=EOT))
            else:
                texts.append("".join(r))
        text = "".join(texts)
        for special in (*CHATML_TOKENS, EOT):
            text = text.replace(special, "")
        tok = make_tokenizer(spec, text)
    if conversational:
        tok = chat_tokenizer(tok)
    numbered = list(zip((f"{path}:{n}" for n in lines), rows))
    held = list(zip((f"{val_path}:{n}" for n in val_lines), held_out)) if held_out is not None else None
    splits, rule = _split_rows(numbered, held, val_fraction, val_path, "rows")
    dtype = token_dtype(tok.vocab_size)
    for split, part in splits.items():
        wheres, part = [w for w, _ in part], [r for _, r in part]
        tokens, targets, index = sequence_arrays(tok, kind, part, dtype, wheres, max_len)
        tokens.tofile(tmp / f"{split}.bin")
        targets.tofile(tmp / f"{split}.targets.bin")
        np.save(tmp / f"{split}.idx.npy", index)
    tok.save(tmp / "tokenizer.json")
    name = "conversations" if kind == "messages" else "preference rows"
    return {"format": DATA_FORMAT, "version": DATA_VERSION, "kind": "pairs" if kind == "messages" else "preferences",
            "rows": kind, "source": str(path.resolve()), "source_sha256": sha256_file(path), "tokenizer": spec,
            "vocab_size": tok.vocab_size, "dtype": np.dtype(dtype).name, "train_pairs": len(splits["train"]),
            "val_pairs": len(splits["val"]), "split": rule, "describe": name}


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

    def tokens(self, split: str) -> np.ndarray | ShardedTokens:
        """A split's token ids, memory-mapped: one array, or its shards read as one sequence."""
        if split not in self._splits:
            files = [f["file"] for f in self.meta.get("shards", {}).get(split, [])] or [f"{split}.bin"]
            paths = [self.path / f for f in files]
            missing = next((p for p in paths if not p.is_file()), None)
            if missing is not None:
                raise MissingFileError(f"{missing} is missing; prepare the data again")
            parts = [np.memmap(p, dtype=self.dtype, mode="r") if p.stat().st_size else np.zeros(0, self.dtype)
                     for p in paths]
            self._splits[split] = parts[0] if len(parts) == 1 else ShardedTokens(parts)
        return self._splits[split]

    def index(self, split: str) -> np.ndarray:
        return np.load(self.path / f"{split}.idx.npy")

    def targets(self, split: str) -> np.ndarray | None:
        """A conversations or preferences split's per-token targets (1 = the loss covers it); None for pairs,
        whose targets are everything after the prompt."""
        path = self.path / f"{split}.targets.bin"
        if not path.is_file():
            return None
        return np.memmap(path, dtype=np.uint8, mode="r") if path.stat().st_size else np.zeros(0, np.uint8)

    def __len__(self) -> int:
        return self.meta.get("train_tokens") or self.meta.get("train_pairs")


class ShardedTokens:
    """Token files read as one sequence: len() and [start:stop] across shard boundaries, nothing loaded up front.
    Batches drawn from it equal those drawn from the same tokens in one file."""

    def __init__(self, parts: list[np.ndarray]):
        self.parts = parts
        self.starts = np.cumsum([0] + [len(p) for p in parts])  # where each shard begins

    def __len__(self) -> int:
        return int(self.starts[-1])

    def __getitem__(self, key: slice) -> np.ndarray:
        if not isinstance(key, slice):
            raise TypeError("ShardedTokens takes slices: tokens[start:stop]")
        start, stop, step = key.indices(len(self))
        if step != 1:
            raise TypeError("ShardedTokens takes contiguous slices")
        out, i = [], int(np.searchsorted(self.starts, start, side="right")) - 1
        while start < stop and i < len(self.parts):
            lo = start - self.starts[i]
            hi = min(stop, self.starts[i + 1]) - self.starts[i]
            out.append(np.asarray(self.parts[i][lo:hi]))
            start, i = self.starts[i] + hi, i + 1
        return np.concatenate(out) if out else np.zeros(0, self.parts[0].dtype)


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


def pair_batch(tokens: np.ndarray, index: np.ndarray, rows, block_size: int, pad_id: int,
               targets: np.ndarray | None = None):
    """Right-padded sequences: x, y (B, T), attention_mask (1 = token) and loss_mask (1 where y is a target: a
    completion token, or with targets given, a token targets marks). Too-long examples: a pair keeps the end of its
    prompt and the start of its completion; a conversation is cut from the left (after its last target)."""
    seqs, masks = [], []
    for r in rows:
        start, first, total = (int(v) for v in index[r])
        ids = np.asarray(tokens[start:start + total], dtype=np.int64)
        if targets is None:
            mask = np.zeros(total, dtype=np.int64)
            mask[first:] = 1
            over = len(ids) - (block_size + 1)
            if over > 0:  # cut the prompt's start first, then the completion's end
                cut = min(over, max(first - 1, 0))
                ids, mask = ids[cut:][:block_size + 1], mask[cut:][:block_size + 1]
        else:
            mask = np.asarray(targets[start:start + total], dtype=np.int64)
            last = int(np.flatnonzero(mask)[-1]) + 1 if mask.any() else len(mask)
            ids, mask = ids[:last][-(block_size + 1):], mask[:last][-(block_size + 1):]  # what follows teaches nothing
        seqs.append(ids)
        masks.append(mask)
    T = max(len(s) for s in seqs) - 1
    x = torch.full((len(seqs), T), pad_id, dtype=torch.long)
    y = torch.full((len(seqs), T), pad_id, dtype=torch.long)
    attention_mask = torch.zeros(len(seqs), T, dtype=torch.long)
    loss_mask = torch.zeros(len(seqs), T, dtype=torch.long)
    for b, (ids, mask) in enumerate(zip(seqs, masks)):
        n = len(ids) - 1
        x[b, :n] = torch.from_numpy(ids[:-1])
        y[b, :n] = torch.from_numpy(ids[1:])
        attention_mask[b, :n] = 1
        loss_mask[b, :n] = torch.from_numpy(mask[1:])  # target j is token j+1
    return x, y, attention_mask, loss_mask


def get_pair_batch(data: Dataset, split: str, batch_size: int, block_size: int, seed: int, step: int, micro: int = 0):
    """A batch of pairs or conversations; of a preferences dataset, batch_size rows as 2 x batch_size sequences:
    the chosen replies first, then the rejected ones in the same order."""
    index = data.index(split)
    if data.kind == "preferences":
        picked = batch_rng(seed, step, micro).integers(0, len(index) // 2, size=batch_size)
        rows = [2 * int(r) for r in picked] + [2 * int(r) + 1 for r in picked]
    else:
        rows = batch_rng(seed, step, micro).integers(0, len(index), size=batch_size)
    return pair_batch(data.tokens(split), index, rows, block_size, data.tokenizer.eot_id, data.targets(split))


def prepare_cli(args) -> int:
    result = prepare(args.source, args.out, tokenizer=args.tokenizer, val_fraction=args.val_fraction, split=args.split,
                     errors=args.errors, force=args.force, tokenizer_from=args.tokenizer_from,
                     text_field=args.text_field, workers=args.workers, shard_tokens=args.shard_tokens,
                     tokenizer_sample=args.tokenizer_sample, progress=sys.stderr.isatty(), max_len=args.max_len)
    m = result.meta
    sizes = (f"{m['train_tokens']:,} train / {m['val_tokens']:,} val tokens" if m["kind"] == "tokens"
             else f"{m['train_pairs']:,} train / {m['val_pairs']:,} val {m.get('describe', 'pairs')}")
    files = sum(len(f) for f in m.get("shards", {}).values())
    print(f"prepared {result.path}: {sizes}{f' in {files} files' if files > 2 else ''}, vocabulary "
          f"{m['vocab_size']:,} ({m['tokenizer']}), {m['split']}")
    return 0
