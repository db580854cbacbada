"""Tokenizers: characters, and byte-level BPE trained here (or GPT-2's own), and the open families' tokenizer.json
through the `tokenizers` library (HFTokenizer), behind one small interface.

    encode(text) -> list[int]      decode(ids) -> str      vocab_size      special_tokens      save(path) / load(path)

BPE splits text with GPT-2's regex, then merges bytes by rank. Training counts each distinct chunk once with its
frequency and, per merge, rewrites only the chunks that hold the merged pair. Encoding has two implementations that must
agree id for id: `encode_reference` (pure Python, the definition) and `encode` (our ranks handed to tiktoken's core).
Both files of a tokenizer are plain JSON; nothing here knows about models or training.
"""

from __future__ import annotations

import base64
from abc import ABC, abstractmethod
import heapq
import json
from collections import Counter, defaultdict
from pathlib import Path
from typing import Iterable

import numpy as np
import regex

from .errors import MissingFileError, UserError

EOT = "<|endoftext|>"
# GPT-2's pre-split pattern in tiktoken's equivalent, faster spelling (possessive quantifiers).
GPT2_PATTERN = r"""'(?:[sdmt]|ll|ve|re)| ?\p{L}++| ?\p{N}++| ?[^\s\p{L}\p{N}]++|\s++$|\s+(?!\S)|\s"""
FORMAT, VERSION = "lmforge-tokenizer", 1
GPT2_TIKTOKEN_SHA256 = "306cd27f03c1a714eca7108e03d66b7dc042abe8c258b44c199a7ed9838dd930"


def bytes_to_unicode() -> dict[int, str]:
    """GPT-2's reversible map from bytes to printable characters (used in encoder.json and tokenizer.json)."""
    printable = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1)) + list(range(ord("®"), 256))
    chars, extra = {}, 0
    for b in range(256):
        if b in printable:
            chars[b] = chr(b)
        else:
            chars[b] = chr(256 + extra)
            extra += 1
    return chars


_B2U = bytes_to_unicode()
_U2B = {c: b for b, c in _B2U.items()}


def _readable(token: bytes) -> str:
    return "".join(_B2U[b] for b in token)


def _from_readable(text: str) -> bytes:
    return bytes(_U2B[c] for c in text)


class Tokenizer(ABC):
    """What both tokenizers share: special tokens, decoding to str, saving."""

    special_tokens: dict[str, int]
    chat_template: str | None = None  # a Jinja string in Hugging Face's convention (templates.py renders it)

    @property
    def eot_id(self) -> int:
        return self.special_tokens[EOT]

    @property
    def stop_ids(self) -> set[int]:
        """The tokens generation ends at: end-of-text, and the end-of-turn token of a chat template's family."""
        from .templates import END_OF_TURN
        return {self.eot_id} | {self.special_tokens[t] for t in END_OF_TURN if t in self.special_tokens}

    def with_special_tokens(self, names: Iterable[str], chat_template: str | None = None) -> Tokenizer:
        """A copy with the special tokens it lacks appended (ids from vocab_size up) and, when given, this chat
        template: the old ids keep their meaning, so a model grows its embedding by the new rows only."""
        new = [n for n in dict.fromkeys(names) if n not in self.special_tokens]
        copy = self._with_specials({**self.special_tokens, **{n: self.vocab_size + i for i, n in enumerate(new)}})
        copy.chat_template = chat_template if chat_template is not None else self.chat_template
        return copy

    @abstractmethod
    def _with_specials(self, special_tokens: dict[str, int]) -> Tokenizer: ...

    @property
    @abstractmethod
    def vocab_size(self) -> int: ...

    @abstractmethod
    def encode(self, text: str) -> list[int]: ...

    @abstractmethod
    def decode_bytes(self, ids: Iterable[int]) -> bytes: ...

    def encode_with_specials(self, text: str) -> list[int]:
        """encode(text), except that the text of a special token (<|endoftext|>) becomes that token, as the tokenizers
        library, and so AutoTokenizer, reads added tokens in text: what evaluation harnesses and /tokenize expect."""
        if not any(s in text for s in self.special_tokens):
            return self.encode(text)
        names = sorted(self.special_tokens, key=len, reverse=True)
        ids = []
        for i, piece in enumerate(regex.split("(" + "|".join(regex.escape(s) for s in names) + ")", text)):
            if i % 2:
                ids.append(self.special_tokens[piece])
            elif piece:
                ids += self.encode(piece)
        return ids

    def encode_array(self, text: str) -> np.ndarray:
        """encode(text) as a numpy array, without a Python list in between where the tokenizer can (prepare's path)."""
        return np.asarray(self.encode(text), dtype=np.int64)

    @abstractmethod
    def _state(self) -> dict: ...

    def decode(self, ids: Iterable[int]) -> str:
        """Text of the ids; bytes that end mid-character become U+FFFD, never an exception."""
        return self.decode_bytes(ids).decode("utf-8", errors="replace")

    def save(self, path: str | Path) -> None:
        """Write tokenizer.json atomically (a temp file renamed over the target)."""
        path = Path(path)
        tmp = path.with_name(path.name + ".tmp")
        state = {"format": FORMAT, "version": VERSION, **self._state()}
        if self.chat_template is not None:
            state["chat_template"] = self.chat_template
        tmp.write_text(json.dumps(state, indent=1, ensure_ascii=False))
        tmp.replace(path)

    def _check_ids(self, ids) -> list[int]:
        ids = [int(i) for i in ids]
        bad = next((i for i in ids if not 0 <= i < self.vocab_size), None)
        if bad is not None:
            raise UserError(f"token id {bad} is outside this tokenizer's vocabulary [0, {self.vocab_size})")
        return ids


def added_tokens(base: Tokenizer, tok: Tokenizer) -> list[str] | None:
    """The special tokens tok appends to base when tok is base with tokens added (and perhaps a chat template):
    [] when they are the same tokenizer, None when tok is another one."""
    new = [s for s in tok.special_tokens if s not in base.special_tokens]
    if isinstance(base, HFTokenizer) or isinstance(tok, HFTokenizer):
        if not (isinstance(base, HFTokenizer) and isinstance(tok, HFTokenizer)):
            return None
        grown = base.with_special_tokens(sorted(new, key=tok.special_tokens.get)) if new else base
        # both as the installed tokenizers library writes them: a published file's layout may differ from its own
        tokenizers = _tokenizers()
        same = json.loads(tokenizers.Tokenizer.from_str(grown._json).to_str()) == json.loads(
            tokenizers.Tokenizer.from_str(tok._json).to_str())
        return new if same else None
    grown = base.with_special_tokens(sorted(new, key=tok.special_tokens.get), tok.chat_template)
    return new if type(grown) is type(tok) and grown._state() == tok._state() else None


def prompt_ids(tokenizer: Tokenizer, text: str) -> list[int]:
    """A prompt's ids for generation: the family's begin-of-text token first where it has one (Llama), and an empty
    prompt starts after end-of-text otherwise."""
    ids = tokenizer.encode(text) if text else []
    if getattr(tokenizer, "add_bos", False):
        return [tokenizer.bos_id] + ids
    return ids or [tokenizer.eot_id]


def _specials_after(n: int, special_tokens: Iterable[str]) -> dict[str, int]:
    names = list(dict.fromkeys(special_tokens))
    if not names or any(not isinstance(s, str) or not s for s in names):
        raise UserError("special_tokens must be non-empty strings, e.g. ['<|endoftext|>']")
    return {s: n + i for i, s in enumerate(names)}


# --------------------------------------------------------------------------------------------------- characters

class CharTokenizer(Tokenizer):
    """One id per character seen in training, then the special tokens. Unknown characters are an error unless an
    unknown token was declared."""

    def __init__(self, chars: list[str], special_tokens: dict[str, int], unk_token: str | None = None):
        self.chars = list(chars)
        self.stoi = {c: i for i, c in enumerate(self.chars)}
        self.special_tokens = dict(special_tokens)
        self.unk_token = unk_token
        self._itos = {**dict(enumerate(self.chars)), **{i: s for s, i in self.special_tokens.items()}}
        self._table = None  # code point -> id, made at the first encode_array
        if unk_token is not None and unk_token not in self.special_tokens:
            raise UserError(f"unk_token {unk_token!r} must be one of the special tokens")

    @classmethod
    def train(cls, text: str, special_tokens: Iterable[str] = (EOT,), unk_token: str | None = None) -> CharTokenizer:
        if not text:
            raise UserError("cannot build a character vocabulary from empty text")
        specials = list(special_tokens) + ([unk_token] if unk_token and unk_token not in special_tokens else [])
        chars = sorted(set(text))
        return cls(chars, _specials_after(len(chars), specials), unk_token)

    @property
    def vocab_size(self) -> int:
        return len(self.chars) + len(self.special_tokens)

    def encode(self, text: str) -> list[int]:
        try:
            return [self.stoi[c] for c in text]
        except KeyError:
            pass
        unk = self.special_tokens.get(self.unk_token) if self.unk_token else None
        if unk is not None:
            return [self.stoi.get(c, unk) for c in text]
        raise self._unknown(text, next(i for i, c in enumerate(text) if c not in self.stoi))

    @staticmethod
    def _unknown(text: str, pos: int) -> UserError:
        return UserError(f"character {text[pos]!r} (U+{ord(text[pos]):04X}) at position {pos} is not in the character "
                         f"vocabulary; build the tokenizer with unk_token=... or remove it")

    def encode_array(self, text: str) -> np.ndarray:
        """encode() by table lookup over code points: tens of MB/s instead of one dict lookup per character."""
        if self._table is None:
            points = np.array([ord(c) for c in self.chars], dtype=np.int64)
            self._table = np.full(int(points.max(initial=0)) + 2, -1, dtype=np.int32)  # last entry: beyond the table
            self._table[points] = np.arange(len(points))
        points = np.frombuffer(text.encode("utf-32-le"), dtype=np.uint32)
        ids = self._table[np.minimum(points, len(self._table) - 1)]
        if (ids < 0).any():
            unk = self.special_tokens.get(self.unk_token) if self.unk_token else None
            if unk is None:
                raise self._unknown(text, int(np.argmax(ids < 0)))
            ids[ids < 0] = unk
        return ids

    def decode_bytes(self, ids: Iterable[int]) -> bytes:
        return "".join(self._itos[i] for i in self._check_ids(ids)).encode("utf-8")

    def decode(self, ids: Iterable[int]) -> str:
        return "".join(self._itos[i] for i in self._check_ids(ids))

    def _with_specials(self, special_tokens: dict[str, int]) -> CharTokenizer:
        return CharTokenizer(self.chars, special_tokens, self.unk_token)

    def _state(self) -> dict:
        return {"type": "char", "chars": self.chars, "special_tokens": self.special_tokens, "unk_token": self.unk_token}


# ---------------------------------------------------------------------------------------------------------- BPE

def chunk_counts(text: str, pattern: str = GPT2_PATTERN) -> Counter:
    """How often each pre-split chunk occurs in text: what BPE training learns from."""
    return Counter(regex.findall(pattern, text))


def bpe_reference(piece: bytes, ranks: dict[bytes, int]) -> list[int]:
    """Encode one pre-split chunk: a chunk that is a token stays whole; otherwise repeatedly merge the adjacent pair
    whose concatenation has the lowest rank (leftmost on ties). This is tiktoken's rule, written plainly."""
    if piece in ranks:
        return [ranks[piece]]
    parts = [piece[i:i + 1] for i in range(len(piece))]
    while len(parts) > 1:
        best_rank, best_i = None, -1
        for i in range(len(parts) - 1):
            rank = ranks.get(parts[i] + parts[i + 1])
            if rank is not None and (best_rank is None or rank < best_rank):
                best_rank, best_i = rank, i
        if best_rank is None:
            break
        parts[best_i:best_i + 2] = [parts[best_i] + parts[best_i + 1]]
    return [ranks[p] for p in parts]


class BPETokenizer(Tokenizer):
    """Byte-level BPE: ranks map byte strings to ids (ids 0..n-1), special tokens follow."""

    def __init__(self, ranks: dict[bytes, int], special_tokens: dict[str, int], pattern: str = GPT2_PATTERN,
                 name: str = "lmforge-bpe"):
        self.ranks = dict(ranks)
        self.special_tokens = dict(special_tokens)
        self.pattern, self.name = pattern, name
        self.vocab = {i: t for t, i in self.ranks.items()}
        if len(self.vocab) != len(self.ranks) or set(self.vocab) != set(range(len(self.ranks))):
            raise UserError("BPE ranks must be the ids 0..n-1, each used once")
        self._split = regex.compile(pattern)
        self._special_bytes = {i: s.encode("utf-8") for s, i in self.special_tokens.items()}
        self._tiktoken = None

    # --- training
    @classmethod
    def train(cls, text: str, vocab_size: int, special_tokens: Iterable[str] = (EOT,), pattern: str = GPT2_PATTERN,
              progress: bool | None = None) -> BPETokenizer:
        """Learn vocab_size - 256 - len(special_tokens) merges from text. Deterministic: equal counts break towards
        the smallest pair of ids."""
        return cls.train_from_counts(chunk_counts(text, pattern), vocab_size, special_tokens, pattern,
                                     len(text) > 1_000_000 if progress is None else progress)

    @classmethod
    def train_from_counts(cls, chunks: Counter, vocab_size: int, special_tokens: Iterable[str] = (EOT,),
                          pattern: str = GPT2_PATTERN, progress: bool = False) -> BPETokenizer:
        """train() from the counts of pre-split chunks (chunk_counts), which can be gathered from a corpus in pieces
        and in parallel and added up: the result is the same as train() on the whole text."""
        specials = list(dict.fromkeys(special_tokens))
        if vocab_size < 256 + len(specials):
            raise UserError(f"vocab_size={vocab_size} is too small: byte-level BPE needs at least 256 + "
                             f"{len(specials)} special tokens = {256 + len(specials)}")
        if not chunks:
            raise UserError("cannot train BPE on empty text")
        n_merges = vocab_size - 256 - len(specials)
        chunks = dict(sorted(chunks.items()))  # the same merges whatever order the counts were gathered in
        words = [list(chunk.encode("utf-8")) for chunk in chunks]
        freqs = list(chunks.values())
        tokens = [bytes([b]) for b in range(256)]
        ranks = {t: i for i, t in enumerate(tokens)}

        counts: dict[tuple[int, int], int] = defaultdict(int)
        where: dict[tuple[int, int], set[int]] = defaultdict(set)  # pair -> words that may hold it (superset)
        for w, (word, freq) in enumerate(zip(words, freqs)):
            for pair in zip(word, word[1:]):
                counts[pair] += freq
                where[pair].add(w)
        heap = [(-c, pair) for pair, c in counts.items()]
        heapq.heapify(heap)

        bar = _progress(n_merges, "training BPE", progress)
        merges = 0
        while merges < n_merges and heap:
            neg, pair = heapq.heappop(heap)
            if counts.get(pair, 0) != -neg or -neg <= 0:  # stale heap entry: the count changed since it was pushed
                continue
            merged = tokens[pair[0]] + tokens[pair[1]]
            new_id = ranks.get(merged)
            if new_id is None:  # the usual case; a byte string reachable by two splits keeps its first id
                new_id = len(tokens)
                tokens.append(merged)
                ranks[merged] = new_id
                merges += 1
                bar.update(1)
            changed: dict[tuple[int, int], int] = {}
            for w in where.pop(pair):
                word = words[w]
                if len(word) < 2:
                    continue
                new_word = _merge_word(word, pair, new_id)
                if len(new_word) == len(word):
                    continue
                freq = freqs[w]
                for p in zip(word, word[1:]):
                    counts[p] -= freq
                    changed[p] = counts[p]
                for p in zip(new_word, new_word[1:]):
                    counts[p] += freq
                    changed[p] = counts[p]
                    where[p].add(w)
                words[w] = new_word
            counts.pop(pair, None)
            for p, c in changed.items():
                if p == pair:
                    continue
                if c > 0:
                    heapq.heappush(heap, (-c, p))
                else:
                    counts.pop(p, None)
        bar.close()
        return cls(ranks, _specials_after(len(tokens), specials), pattern)

    # --- GPT-2's files
    @classmethod
    def from_tiktoken_file(cls, path: str | Path, special_tokens: dict[str, int] | None = None) -> BPETokenizer:
        """Load a `.tiktoken` rank file (base64 token, space, rank per line), e.g. GPT-2's. <|endoftext|> follows
        the ranks unless special_tokens says otherwise."""
        path = Path(path)
        if not path.is_file():
            raise MissingFileError(f"no rank file at {path}")
        ranks = {}
        for n, line in enumerate(path.read_text().splitlines(), 1):
            if not line.strip():
                continue
            try:
                token, rank = line.split()
                ranks[base64.b64decode(token, validate=True)] = int(rank)
            except ValueError:
                raise UserError(f"{path}:{n}: expected 'BASE64TOKEN RANK', got {line[:40]!r}") from None
        return cls(ranks, special_tokens or {EOT: len(ranks)}, GPT2_PATTERN, name=path.stem)

    @classmethod
    def from_gpt2_files(cls, encoder_json: str | Path, vocab_bpe: str | Path) -> BPETokenizer:
        """Load GPT-2's original `encoder.json` (token -> id) and `vocab.bpe` (merges, checked against the ids)."""
        for p in (encoder_json, vocab_bpe):
            if not Path(p).is_file():
                raise MissingFileError(f"no such file: {p}")
        encoder = json.loads(Path(encoder_json).read_text(encoding="utf-8"))
        specials = {t: i for t, i in encoder.items() if t.startswith("<|") and t.endswith("|>")}
        ranks = {_from_readable(t): i for t, i in encoder.items() if t not in specials}
        lines = Path(vocab_bpe).read_text(encoding="utf-8").splitlines()
        merges = [ln.split() for ln in lines if ln and not ln.startswith("#version")]
        for n, (a, b) in enumerate(merges):
            merged = _from_readable(a + b)
            if ranks.get(merged) != 256 + n:
                raise UserError(f"{vocab_bpe}: merge {n} ({a} {b}) does not match encoder.json; the files are not a pair")
        return cls(ranks, specials or {EOT: len(ranks)}, GPT2_PATTERN, name="gpt2")

    @classmethod
    def gpt2(cls) -> BPETokenizer:
        """GPT-2's tokenizer, its ranks taken from a PyPI package (fetched once into the cache)."""
        from .download import file_from_pypi_sdist
        path = file_from_pypi_sdist("openai-whisper", "20250625", "whisper/assets/gpt2.tiktoken", GPT2_TIKTOKEN_SHA256)
        return cls.from_tiktoken_file(path, {EOT: 50256})

    # --- encoding and decoding
    @property
    def vocab_size(self) -> int:
        return len(self.ranks) + len(self.special_tokens)

    def _allowed(self, allowed_special) -> set[str]:
        return set(self.special_tokens) if allowed_special == "all" else set(allowed_special)

    def encode_reference(self, text: str, allowed_special: Iterable[str] | str = ()) -> list[int]:
        """Pure-Python encoder: the definition the fast path is tested against."""
        allowed = self._allowed(allowed_special)
        ids = []
        pieces = regex.split("(" + "|".join(regex.escape(s) for s in sorted(allowed, key=len, reverse=True)) + ")",
                             text) if allowed else [text]
        for piece in pieces:
            if piece in allowed:
                ids.append(self.special_tokens[piece])
                continue
            for chunk in self._split.findall(piece):
                ids.extend(bpe_reference(chunk.encode("utf-8"), self.ranks))
        return ids

    def encode(self, text: str, allowed_special: Iterable[str] | str = ()) -> list[int]:
        """Fast path: the same ranks and pattern, run by tiktoken's core. Special-token text is ordinary text unless
        listed in allowed_special ("all" for every one)."""
        return self._fast().encode(text, allowed_special=self._allowed(allowed_special), disallowed_special=())

    def encode_with_specials(self, text: str) -> list[int]:
        return self.encode(text, "all")

    def encode_array(self, text: str) -> np.ndarray:
        return self._fast().encode_to_numpy(text, disallowed_special=())  # special-token text is ordinary text

    def encode_batch(self, texts: list[str], num_threads: int = 2) -> list[list[int]]:
        return self._fast().encode_ordinary_batch(texts, num_threads=num_threads)

    def _fast(self):
        if self._tiktoken is None:
            import tiktoken
            self._tiktoken = tiktoken.Encoding(self.name, pat_str=self.pattern, mergeable_ranks=self.ranks,
                                               special_tokens=self.special_tokens)
        return self._tiktoken

    def decode_bytes(self, ids: Iterable[int]) -> bytes:
        ids = self._check_ids(ids)
        return b"".join(self.vocab[i] if i in self.vocab else self._special_bytes[i] for i in ids)

    def vocab_and_merges(self) -> tuple[dict[str, int], list[str]]:
        """GPT-2's vocab.json mapping (tokens in its printable byte alphabet, special tokens too) and its merges.txt
        lines in rank order, as Hugging Face and llama.cpp store a byte-level BPE."""
        vocab = {_readable(token): i for token, i in self.ranks.items()}
        vocab.update(self.special_tokens)
        merged = sorted((i, t) for t, i in self.ranks.items() if len(t) > 1)
        return vocab, [" ".join(_readable(part) for part in self.merge_of(token)) for _, token in merged]

    def merge_of(self, token: bytes) -> tuple[bytes, bytes]:
        """The pair whose merge made this token: BPE on its bytes with only the merges ranked before it."""
        rank, parts = self.ranks[token], [bytes([b]) for b in token]
        while len(parts) > 2:
            best, i = min((self.ranks.get(parts[i] + parts[i + 1], rank), i) for i in range(len(parts) - 1))
            assert best < rank, token
            parts[i:i + 2] = [parts[i] + parts[i + 1]]
        return parts[0], parts[1]

    def _with_specials(self, special_tokens: dict[str, int]) -> BPETokenizer:
        return BPETokenizer(self.ranks, special_tokens, self.pattern, self.name)

    def _state(self) -> dict:
        return {"type": "bpe", "name": self.name, "pattern": self.pattern, "special_tokens": self.special_tokens,
                "vocab": [_readable(self.vocab[i]) for i in range(len(self.vocab))]}


def _merge_word(word: list[int], pair: tuple[int, int], new_id: int) -> list[int]:
    a, b = pair
    out, i, n = [], 0, len(word)
    while i < n:
        if i < n - 1 and word[i] == a and word[i + 1] == b:
            out.append(new_id)
            i += 2
        else:
            out.append(word[i])
            i += 1
    return out


def _progress(total: int, desc: str, enabled: bool):
    from tqdm.auto import tqdm
    return tqdm(total=total, desc=desc, disable=not enabled, unit="merge")


# ------------------------------------------------------------------------------------------------------- files

def load_tokenizer(path: str | Path) -> Tokenizer:
    """Load a tokenizer.json written by save() (any kind; a Hugging Face one with the tokenizer_config.json beside
    it), or a run or data directory that holds one."""
    path = Path(path)
    if path.is_dir():
        path = path / "tokenizer.json"
    if not path.is_file():
        raise MissingFileError(f"no tokenizer at {path}; prepare data first (lmforge prepare) or pass a tokenizer.json")
    try:
        state = json.loads(path.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise UserError(f"{path} is not valid JSON ({e}); re-create it with lmforge prepare") from None
    if isinstance(state, dict) and isinstance(state.get("model"), dict) and "pre_tokenizer" in state:
        return HFTokenizer.load(path)
    if not isinstance(state, dict) or state.get("format") != FORMAT:
        raise UserError(f"{path} is not an lmforge tokenizer file (no \"format\": \"{FORMAT}\")")
    if state.get("version") != VERSION:
        raise UserError(f"{path} has tokenizer format version {state.get('version')}; this lmforge reads "
                         f"version {VERSION}; upgrade lmforge or re-create the file")
    if state.get("type") == "char":
        tok = CharTokenizer(state["chars"], state["special_tokens"], state.get("unk_token"))
    elif state.get("type") == "bpe":
        ranks = {_from_readable(t): i for i, t in enumerate(state["vocab"])}
        tok = BPETokenizer(ranks, state["special_tokens"], state["pattern"], state.get("name", "lmforge-bpe"))
    else:
        raise UserError(f"{path}: unknown tokenizer type {state.get('type')!r} (expected 'char' or 'bpe')")
    template = state.get("chat_template")
    if template is not None and not isinstance(template, str):
        raise UserError(f"{path}: chat_template must be a Jinja string, not a {type(template).__name__}")
    tok.chat_template = template
    return tok


# ------------------------------------------------------------------------------- Hugging Face's tokenizer.json
# The open families' tokenizers (Llama 3, Qwen, SmolLM, TinyLlama / Llama 2, Mistral, ...) through the library
# transformers uses, and lmforge's own written as a tokenizer.json that library (and so AutoTokenizer) loads.
# HFTokenizer.encode() gives the text's tokens only, as AutoTokenizer(text, add_special_tokens=False): pieces that
# concatenate. A family that starts every sequence with its begin-of-text token (Llama, TinyLlama) says so in
# add_bos, and prompt_ids() puts it first. In a run folder it is the family's tokenizer.json as it came, with its
# tokenizer_config.json (bos, eos, pad, chat template) beside it.

TOKENIZER_CONFIG = "tokenizer_config.json"
_EOS_GUESSES = ("<|endoftext|>", "<|end_of_text|>", "</s>", "<|im_end|>", "<eos>")


def _tokenizers():
    try:
        import tokenizers
    except ImportError:
        raise UserError("this tokenizer is a Hugging Face tokenizer.json, read by the tokenizers library: "
                        "pip install 'lmforge[hf]'") from None
    return tokenizers


def _content(token, field: str = "a special token") -> str | None:
    """tokenizer_config.json spells a special token as a string or as {"content": ...}."""
    text = token.get("content") if isinstance(token, dict) else token
    if text is not None and not isinstance(text, str):
        raise UserError(f"{TOKENIZER_CONFIG}: {field} is {token!r}, not a token's text (a string, or "
                        f"{{\"content\": \"...\"}})")
    return text


class HFTokenizer(Tokenizer):
    """A tokenizers.Tokenizer and its tokenizer_config.json (which names bos, eos, pad and the chat template).
    Whether a prompt starts with begin-of-text follows the tokenizer's post-processor, as AutoTokenizer does."""

    def __init__(self, tokenizer_json: str, config: dict | None = None, where: str = "tokenizer.json"):
        tokenizers = _tokenizers()
        try:
            self._tok = tokenizers.Tokenizer.from_str(tokenizer_json)
        except Exception as e:  # the library raises its own exception type for every malformed file
            raise UserError(f"{where} is not a tokenizer.json the tokenizers library reads ({e})") from None
        self._json, self.config = tokenizer_json, dict(config or {})
        self._plain = None
        added = self._tok.get_added_tokens_decoder()
        self.special_tokens = {t.content: i for i, t in added.items() if t.special}
        self._added = {i: t.content for i, t in added.items()}
        self._bytes = self._token_bytes()
        eos = _content(self.config.get("eos_token"), "eos_token")
        eos = eos if eos in self.special_tokens or self._tok.token_to_id(eos or "") is not None else None
        eos = eos or next((t for t in _EOS_GUESSES if self._tok.token_to_id(t) is not None), None)
        if eos is None:
            raise UserError(f"{where}: no end-of-sequence token (tokenizer_config.json's eos_token, or one of "
                            f"{', '.join(_EOS_GUESSES)}); add eos_token to {TOKENIZER_CONFIG}")
        self.eos_token = eos
        bos = _content(self.config.get("bos_token"), "bos_token")
        self.bos_id = self._tok.token_to_id(bos) if bos else None
        # whether sequences start with begin-of-text is the post-processor's to say, as AutoTokenizer follows it
        marked, plain = (self._tok.encode("a", add_special_tokens=s).ids for s in (True, False))
        self.add_bos = len(marked) > len(plain) and marked[1:1 + len(plain)] == plain  # one token ahead of the text
        if self.add_bos:
            self.bos_id = marked[0]
        pad = _content(self.config.get("pad_token"), "pad_token")
        self.pad_id = self._tok.token_to_id(pad) if pad else None
        template = self.config.get("chat_template")
        if isinstance(template, list):  # several named templates: the default one is the chat's
            template = next((t.get("template") for t in template if isinstance(t, dict)
                             and t.get("name") == "default"), None)
        self.chat_template = template if isinstance(template, str) else None
        if template is not None and self.chat_template is None and not isinstance(template, list):
            raise UserError(f"{TOKENIZER_CONFIG}: chat_template must be a Jinja string, not a "
                            f"{type(template).__name__}")

    @classmethod
    def load(cls, path: str | Path) -> HFTokenizer:
        """tokenizer.json, with tokenizer_config.json from the same folder when there is one, and the folder's
        chat_template.jinja (where newer transformers saves the template) when the config holds none."""
        path = Path(path)
        config_path = path.with_name(TOKENIZER_CONFIG)
        config = {}
        if config_path.is_file():
            try:
                config = json.loads(config_path.read_text(encoding="utf-8"))
            except (json.JSONDecodeError, UnicodeDecodeError) as e:
                raise UserError(f"{config_path} is not valid JSON ({e})") from None
            if not isinstance(config, dict):
                raise UserError(f"{config_path} holds a {type(config).__name__}, not an object of settings")
        jinja = path.with_name("chat_template.jinja")
        if not config.get("chat_template") and jinja.is_file():
            config["chat_template"] = jinja.read_text(encoding="utf-8")
        return cls(path.read_text(encoding="utf-8"), config, str(path))

    @property
    def eot_id(self) -> int:
        return self._tok.token_to_id(self.eos_token)

    @property
    def vocab_size(self) -> int:
        return self._tok.get_vocab_size(with_added_tokens=True)

    def encode(self, text: str) -> list[int]:
        return self._tok.encode(text, add_special_tokens=False).ids

    def encode_with_specials(self, text: str) -> list[int]:
        return self.encode(text)  # the library reads every added token in text as that token

    def encode_offsets(self, text: str, plain: bool = False) -> tuple[list[int], list[int]]:
        """encode_with_specials(text) (plain: special-token text as plain text) and where each token starts."""
        if plain and self._plain is None:  # a second tokenizer that reads special-token text as text
            self._plain = _tokenizers().Tokenizer.from_str(self._json)
            self._plain.encode_special_tokens = True
        enc = (self._plain if plain else self._tok).encode(text, add_special_tokens=False)
        return enc.ids, [start for start, _ in enc.offsets]

    def _with_specials(self, special_tokens: dict[str, int]) -> HFTokenizer:
        tokenizers = _tokenizers()
        tok = tokenizers.Tokenizer.from_str(self._json)
        new = [s for s in special_tokens if s not in self.special_tokens]
        tok.add_special_tokens([tokenizers.AddedToken(s, special=True, normalized=False) for s in new])
        for s, i in special_tokens.items():
            if tok.token_to_id(s) != i:
                raise UserError(f"the tokenizer gave {s!r} the id {tok.token_to_id(s)}, not {i}")
        return HFTokenizer(tok.to_str(), self.config)

    def with_special_tokens(self, names: Iterable[str], chat_template: str | None = None) -> HFTokenizer:
        copy = super().with_special_tokens(names, chat_template)
        copy.config = {**copy.config, "chat_template": copy.chat_template}
        return copy

    def encode_batch(self, texts: list[str], num_threads: int = 2) -> list[list[int]]:
        return [e.ids for e in self._tok.encode_batch(texts, add_special_tokens=False)]

    def decode(self, ids: Iterable[int]) -> str:
        return self._tok.decode(self._check_ids(ids), skip_special_tokens=False)

    def decode_bytes(self, ids: Iterable[int]) -> bytes:
        """The bytes of each token, joined: what streaming needs (a token may end mid-character)."""
        return b"".join(self._bytes[i] for i in self._check_ids(ids))

    def _token_bytes(self) -> list[bytes]:
        """Each id's bytes: byte-level BPE maps its printable alphabet back to bytes; SentencePiece-style pieces
        turn U+2581 into a space and <0xNN> into byte NN; added tokens are their text."""
        decoder = json.dumps(json.loads(self._json).get("decoder"), ensure_ascii=False)
        byte_level, byte_fallback = "ByteLevel" in decoder, "ByteFallback" in decoder
        out = []
        for i in range(self.vocab_size):
            piece = self._tok.id_to_token(i)
            if piece is None:
                out.append(b"")
            elif i in self._added:
                out.append(self._added[i].encode())
            elif byte_level and all(c in _U2B for c in piece):
                out.append(bytes(_U2B[c] for c in piece))
            elif byte_fallback and len(piece) == 6 and piece.startswith("<0x") and piece.endswith(">"):
                out.append(bytes([int(piece[3:5], 16)]))
            elif "Metaspace" in decoder or "\u2581" in decoder:
                out.append(piece.replace("\u2581", " ").encode())
            else:
                out.append(self._tok.decode([i]).encode())
        return out

    def save(self, path: str | Path) -> None:
        """tokenizer.json as it came, and tokenizer_config.json beside it (each written atomically)."""
        path = Path(path)
        for file, text in ((path, self._json), (path.with_name(TOKENIZER_CONFIG),
                                                json.dumps(self.config, indent=2, ensure_ascii=False) + "\n")):
            tmp = file.with_name(file.name + ".tmp")
            tmp.write_text(text, encoding="utf-8")
            tmp.replace(file)

    def _state(self) -> dict:
        raise AssertionError("HFTokenizer saves the family's own tokenizer.json")

    def apply_chat_template(self, messages: list[dict], add_generation_prompt: bool = True) -> list[int]:
        """The ids of messages rendered by the tokenizer's chat template (templates.py renders as transformers does)."""
        from .templates import chat_ids, chat_prompt_ids
        if self.chat_template is None:
            raise UserError("this tokenizer has no chat template (tokenizer_config.json's chat_template)")
        if add_generation_prompt:
            return chat_prompt_ids(self, messages, self.chat_template)
        return chat_ids(self, messages, self.chat_template, False)


def is_hf_tokenizer_json(path: Path) -> bool:
    """Whether path looks like a Hugging Face tokenizer.json (a model and the library's other parts)."""
    try:
        spec = json.loads(Path(path).read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError):
        return False
    return isinstance(spec, dict) and isinstance(spec.get("model"), dict) and "pre_tokenizer" in spec


# ------------------------------------------------------------------------------ lmforge's tokenizers, written out

def tokenizer_json(tok) -> str:
    """lmforge's CharTokenizer or BPETokenizer as a tokenizer.json with the same ids, built with the tokenizers
    library: characters as a WordLevel vocabulary over single characters (joined back without spaces), BPE as a
    byte-level BPE with our split pattern."""
    tokenizers = _tokenizers()
    from tokenizers import Regex, decoders, models, pre_tokenizers
    if isinstance(tok, CharTokenizer):
        vocab = {c: i for i, c in enumerate(tok.chars)}
        unk = tok.unk_token
        hf = tokenizers.Tokenizer(models.WordLevel({**vocab, **tok.special_tokens}, unk_token=unk or EOT))
        hf.pre_tokenizer = pre_tokenizers.Split(Regex(r"[\s\S]"), behavior="isolated")
        hf.decoder = decoders.Fuse()
    elif isinstance(tok, BPETokenizer):
        vocab, merges = tok.vocab_and_merges()
        vocab = {t: i for t, i in vocab.items() if t not in tok.special_tokens}
        hf = tokenizers.Tokenizer(models.BPE(vocab, [tuple(m.split(" ")) for m in merges], fuse_unk=False,
                                             byte_fallback=False))
        if tok.pattern == GPT2_PATTERN:  # ByteLevel's own split is GPT-2's
            hf.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)
        else:  # the library's Oniguruma reads $ as the end of a line; the end of the text is \z
            hf.pre_tokenizer = pre_tokenizers.Sequence([
                pre_tokenizers.Split(Regex(tok.pattern.replace("$", r"\z")), behavior="isolated"),
                pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)])
        hf.decoder = decoders.ByteLevel()
    else:
        raise UserError(f"no tokenizer.json for a {type(tok).__name__}")
    hf.add_special_tokens([tokenizers.AddedToken(s, special=True, normalized=False)
                           for s, _ in sorted(tok.special_tokens.items(), key=lambda x: x[1])])
    for s, i in tok.special_tokens.items():
        assert hf.token_to_id(s) == i, (s, i, hf.token_to_id(s))
    return hf.to_str()


def tokenizer_config(tok, context: int) -> dict:
    """tokenizer_config.json for a tokenizer written by tokenizer_json (or an HFTokenizer's own, kept)."""
    if isinstance(tok, HFTokenizer):
        return tok.config
    eot = next((s for s, i in tok.special_tokens.items() if i == tok.eot_id), EOT)
    return {"tokenizer_class": "PreTrainedTokenizerFast", "bos_token": eot, "eos_token": eot,
            "unk_token": getattr(tok, "unk_token", None) or eot, "model_max_length": context,
            "clean_up_tokenization_spaces": False, "add_bos_token": False, "add_eos_token": False}
