"""What goes into the inference engine and what comes out: a Request (prompt ids, sampling settings, stop
conditions), the Event each step reports for it, the Logprob of a token, and the TextStream that turns a request's
token bytes into text pieces. Plain data: the engine (engine.py) acts on them.
"""

from __future__ import annotations

import codecs
from dataclasses import dataclass, field

MAX_LOGPROBS = 20  # top alternatives a request may ask for

@dataclass
class Request:
    """What to generate: prompt token ids, how many new tokens at most, how to sample, and when to stop."""
    prompt: list[int]
    max_new_tokens: int = 100
    temperature: float = 1.0  # 0 = greedy
    top_k: int | None = None
    top_p: float | None = None
    repetition_penalty: float = 1.0  # CTRL's rule; 1 = off
    stop: list[str] = field(default_factory=list)  # stop strings (need the engine's tokenizer); not returned
    seed: int | None = None  # None: drawn from torch's global generator
    stop_at_eos: bool = True  # end at the tokenizer's end-of-text (Engine(eos_id=...)); always, under a constraint
    logprobs: int | None = None  # report each new token's log-probability and this many top alternatives
    prompt_logprobs: bool = False  # also report the prompt tokens' log-probabilities (in the first event)
    constraint: object = None  # a structured.Constraint: hold the output to a JSON schema, a regex, a grammar


@dataclass
class Logprob:
    """A token's log-probability under the model's own next-token distribution (before temperature, penalties or
    truncation) and the top alternatives at its position, most likely first, as (token, logprob)."""
    token: int
    logprob: float
    top: list[tuple[int, float]] = field(default_factory=list)


@dataclass
class Event:
    """One request's news from a step: its new token (None when it ended without one), the text that token completes
    (with a tokenizer; held back while it may begin a stop string), and whether it ended: finish_reason 'stop' (end
    of text, a stop string, or a constraint's shape complete), 'length' (max_new_tokens) or 'constraint' (the
    constraint could not go on: its grammar past llguidance's parser limits, or needing a token the vocabulary
    lacks). With Request.logprobs, logprob scores the new token; with
    Request.prompt_logprobs, the request's first event scores every prompt token after the first."""
    request_id: int
    token: int | None
    text: str = ""
    finished: bool = False
    finish_reason: str | None = None
    logprob: Logprob | None = None
    prompt_logprobs: list[Logprob] | None = None


class TextStream:
    """Token bytes in, text out: never splits a multi-byte character, and holds back text that may begin a stop
    string until it is known not to."""

    def __init__(self, stop: list[str]):
        self.decoder = codecs.getincrementaldecoder("utf-8")(errors="replace")
        self.stop, self.pending, self.stopped = stop, "", False
        self.hold = max((len(s) for s in stop), default=1) - 1

    def feed(self, data: bytes, final: bool = False) -> str:
        self.pending += self.decoder.decode(data, final=final)
        hits = [self.pending.find(s) for s in self.stop if s in self.pending]
        if hits:
            out, self.pending, self.stopped = self.pending[:min(hits)], "", True
            return out
        cut = len(self.pending) if final else max(0, len(self.pending) - self.hold)
        out, self.pending = self.pending[:cut], self.pending[cut:]
        return out
