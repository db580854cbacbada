"""Output held to a shape: any JSON object, a JSON schema, a regular expression, a grammar (Lark, or llama.cpp's
GBNF) or one of a list of strings, through llguidance (`pip install 'lmforge[structured]'`).

    constraint = Constraint.json_schema({"type": "object", "properties": {"name": {"type": "string"}}})
    engine.add(Request(prompt, constraint=constraint))

A Constraint is plain data; the engine turns it into a matcher per generation (Grammars.matcher) that follows the
tokens as they are sampled and says, before each one, which tokens of the vocabulary may come next. Every running
generation's mask is computed in one call (Grammars.allowed, llguidance's executor on its own threads) and applied
to its row of logits before sampling, so requests with different constraints, or none, decode together. Any end
token is allowed where the shape may end, and the generation ends when the shape admits nothing more.
"""

from __future__ import annotations

import json
import threading
from collections import OrderedDict
from dataclasses import dataclass

import torch

from .errors import UserError

KINDS = ("json_object", "json_schema", "regex", "grammar", "choice")
MAX_SPEC_CHARS = 1 << 16  # a schema, expression or grammar longer than this is refused (compile time grows with it)
SPECIAL_MARKER = b"\xff"  # llguidance's prefix for a special token's bytes, which no text can produce
# JSON output without free whitespace between tokens: a model cannot pad an object forever, and the text is what
# json.dumps(separators=(",", ":")) writes
JSON_OPTIONS = {"whitespace_flexible": False, "item_separator": ",", "key_separator": ":"}


@dataclass(frozen=True)
class Constraint:
    """What a generation must be: kind (one of KINDS) and its text: a JSON schema as JSON, a regular expression
    (Rust regex syntax, matched in full), a grammar (Lark or GBNF), a JSON list of strings."""
    kind: str
    spec: str = ""

    @classmethod
    def json_object(cls) -> Constraint:
        return cls("json_object")

    @classmethod
    def json_schema(cls, schema: dict | str) -> Constraint:
        return cls("json_schema", schema if isinstance(schema, str) else json.dumps(schema))

    @classmethod
    def regex(cls, pattern: str) -> Constraint:
        return cls("regex", pattern)

    @classmethod
    def grammar(cls, text: str) -> Constraint:
        return cls("grammar", text)

    @classmethod
    def choice(cls, options: list[str]) -> Constraint:
        if isinstance(options, str):
            raise UserError(f"a choice is a list of strings, got the string {options[:50]!r}")
        return cls("choice", json.dumps(list(options)))


def _llguidance():
    try:
        import llguidance
    except ImportError:
        raise UserError("constrained output needs llguidance: pip install 'lmforge[structured]'") from None
    return llguidance


def grammar_text(constraint: Constraint) -> str:
    """The constraint as an llguidance grammar, or a UserError naming what is wrong with it."""
    llg = _llguidance()
    if not isinstance(constraint, Constraint) or constraint.kind not in KINDS:
        raise UserError(f"constraint must be a Constraint of one of the kinds {', '.join(KINDS)}, got {constraint!r}")
    kind, spec = constraint.kind, constraint.spec
    if not isinstance(spec, str):
        raise UserError(f"the {kind} constraint's text must be a string, got {type(spec).__name__}")
    if len(spec) > MAX_SPEC_CHARS:
        raise UserError(f"the {kind} is {len(spec):,} characters, more than the {MAX_SPEC_CHARS:,} allowed; "
                        f"simplify it")
    try:
        spec.encode("utf-8")
    except UnicodeError:
        raise UserError(f"the {kind} holds a lone surrogate (\\ud800-\\udfff), which is not text") from None
    try:
        return _grammar_text(llg, kind, spec)
    except (ValueError, TypeError, RecursionError) as e:
        if isinstance(e, UserError):
            raise
        raise UserError(f"the {kind}: {_first_line(str(e)) or type(e).__name__}") from None


def _grammar_text(llg, kind: str, spec: str) -> str:
    if kind == "json_object":
        return llg.LLMatcher.grammar_from_json_schema({"type": "object"}, overrides=JSON_OPTIONS)
    if kind == "json_schema":
        try:
            schema = json.loads(spec)
        except ValueError as e:
            raise UserError(f"the JSON schema is not valid JSON: {e}") from None
        if not isinstance(schema, (dict, bool)):
            raise UserError(f"a JSON schema is an object (or true/false), got {type(schema).__name__}")
        return llg.LLMatcher.grammar_from_json_schema(schema if isinstance(schema, dict) else {} if schema else
                                                      {"not": {}}, overrides=JSON_OPTIONS)
    if kind == "regex":
        return llg.LLMatcher.grammar_from_regex(spec)
    if kind == "choice":
        try:
            options = json.loads(spec)
        except ValueError:
            options = None
        if not isinstance(options, list) or not options or not all(isinstance(o, str) and o for o in options):
            raise UserError("a choice is a non-empty list of non-empty strings")
        return llg.LLMatcher.grammar_from_lark("start: " + " | ".join(json.dumps(o) for o in options))
    try:
        return llg.grammar_from("grammar", spec)  # Lark, or GBNF converted to Lark
    except ValueError as e:
        raise UserError(f"the grammar: {_first_line(str(e))}") from None


def _or_none(fn, *args):
    try:
        return fn(*args)
    except UserError:
        return None


def _first_line(message: str) -> str:
    return " ".join(message.strip().split("\n")[:3])[:500]


class Grammars:
    """Compiles constraints for one tokenizer and vocabulary (the model's rows: ids past the tokenizer's are never
    allowed), keeps the last few compiled, and computes masks. Safe to share between threads: request threads check
    constraints while the engine's thread decodes."""

    def __init__(self, tokenizer, vocab_size: int, eos_ids: set[int], cache_size: int = 16):
        llg = _llguidance()
        specials = {i: name for name, i in tokenizer.special_tokens.items()}

        class _Wrapper:  # what llguidance reads a tokenizer from: each id's bytes, the special ids, an encoder
            eos_token_id = min(eos_ids)
            bos_token_id = None
            special_token_ids = sorted(i for i in specials if i < vocab_size)
            tokens = [SPECIAL_MARKER + specials[i].encode() if i in specials else
                      tokenizer.decode_bytes([i]) if i < tokenizer.vocab_size else b""
                      for i in range(vocab_size)]

            def __call__(self, text):  # (never raises: a character the vocabulary lacks is left out)
                text = text.decode("utf-8", errors="replace") if isinstance(text, bytes) else text
                try:
                    return tokenizer.encode(text)
                except UserError:
                    return [t for c in text for t in _or_none(tokenizer.encode, c) or ()]

        self.vocab_size = vocab_size
        self.tokenizer = llg.LLTokenizer(llg.TokenizerWrapper(_Wrapper()), n_vocab=vocab_size,
                                         eos_token=sorted(e for e in eos_ids if e < vocab_size))
        # mask threads: as many as torch computes with, at most 8 (llguidance's default is 80% of the machine's)
        self._executor = llg.LLExecutor(num_threads=max(1, min(8, torch.get_num_threads())))
        # ids a grammar may name directly (<[id]>) but no text is: rows past the tokenizer's, never sampled
        self._usable = torch.arange(vocab_size) < tokenizer.vocab_size
        self._compiled: OrderedDict[Constraint, object] = OrderedDict()  # a fresh matcher of each, to copy
        self._lock = threading.Lock()
        self._cache_size = cache_size

    def matcher(self, constraint: Constraint):
        """A new matcher for one generation under constraint, or a UserError naming what is wrong with it (one
        that does not compile, or that no token of the vocabulary can begin)."""
        if not isinstance(constraint, Constraint):
            raise UserError(f"constraint must be a structured.Constraint, got {type(constraint).__name__}")
        with self._lock:
            fresh = self._compiled.get(constraint)
            if fresh is not None:
                self._compiled.move_to_end(constraint)
                return fresh.deep_copy()
        llg = _llguidance()
        grammar = grammar_text(constraint)
        fresh = llg.LLMatcher(self.tokenizer, grammar, log_level=0)
        if fresh.is_error():
            raise UserError(f"the {constraint.kind.replace('_', ' ')} cannot be compiled: "
                            f"{_first_line(fresh.get_error())}")
        if not bool(self.allowed([fresh])[0].any()) or fresh.is_error():
            raise UserError(f"the {constraint.kind.replace('_', ' ')} cannot begin with any token of this model's "
                            f"vocabulary")
        with self._lock:
            self._compiled[constraint] = fresh
            while len(self._compiled) > self._cache_size:
                self._compiled.popitem(last=False)
        return fresh.deep_copy()

    def allowed(self, matchers: list, device: torch.device | str = "cpu") -> torch.Tensor:
        """(len(matchers), vocab_size) bool: the tokens each matcher allows next, computed together."""
        words = (self.vocab_size + 31) // 32
        bits = torch.empty(len(matchers), words, dtype=torch.int32)
        self._executor.unsafe_compute_mask_ptr([(m, i) for i, m in enumerate(matchers)], bits.data_ptr(), words * 4,
                                               len(matchers))
        shifts = torch.arange(32, dtype=torch.int32)
        allowed = ((bits[:, :, None] >> shifts) & 1).view(len(matchers), words * 32)[:, :self.vocab_size]
        return (allowed.bool() & self._usable).to(device, non_blocking=True)


def consume(matcher, token: int) -> bool:
    """Advance the matcher past a sampled token (one its mask allowed). False when it cannot go on: llguidance's
    parser limits (a deeply recursive or ambiguous grammar, a lexer past its states) stop it."""
    return bool(matcher.consume_token(token)) and not matcher.is_error()
