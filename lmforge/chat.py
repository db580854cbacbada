"""`lmforge chat RUN`: a conversation in the terminal with a run, through the engine and the run's one chat template
(templates.py), its replies streamed as they are decoded.

    lmforge chat runs/chat --system "You are terse." --temperature 0.7
    > hello                 a user turn; the reply streams, and both join the history
    > /reset                forget the history (the system message stays)
    > /system TEXT          a new system message (and a fresh history)
    > /exit                 (or Ctrl-D) leave

Every turn renders the whole history again, as the server's chat route does with the messages a client re-sends;
when the history no longer fits the context, the oldest turns leave it first (and a line says so).
"""

from __future__ import annotations

import sys

from .engine import Engine, Request
from .errors import UserError
from .templates import chat_prompt_ids, template_of

HELP = "/reset forgets the history, /system TEXT sets the system message, /exit (or Ctrl-D) leaves"


class Chat:
    """A conversation with a run: history in, streamed reply out. Used by the verb; usable from Python."""

    def __init__(self, model, tokenizer, run_config: dict | None = None, system: str | None = None,
                 max_new_tokens: int | None = None, temperature: float = 0.7, top_k: int | None = None,
                 top_p: float | None = None, seed: int | None = None, engine: Engine | None = None):
        self.tokenizer, self.template = tokenizer, template_of(tokenizer, run_config)
        self.engine = engine or Engine(model, tokenizer, max_batch=1)
        if max_new_tokens is None:  # room for a reply and for the history
            max_new_tokens = min(256, self.engine.max_seq_len // 2)
        if max_new_tokens < 1 or max_new_tokens >= self.engine.max_seq_len:
            raise UserError(f"--max-new-tokens {max_new_tokens} must be between 1 and the context less one "
                            f"({self.engine.max_seq_len - 1})")
        self.settings = dict(max_new_tokens=max_new_tokens, temperature=temperature, top_k=top_k, top_p=top_p)
        self.seed, self.turn, self.system = seed, 0, system
        self.history: list[dict] = []
        self.engine.check(Request([tokenizer.eot_id], **self.settings))  # bad settings fail now, not at a reply

    def reset(self, system: str | None = None) -> None:
        self.history = []
        if system is not None:
            self.system = system or None

    def messages(self) -> list[dict]:
        return ([{"role": "system", "content": self.system}] if self.system else []) + self.history

    def prompt(self, user: str) -> tuple[list[int], int]:
        """The ids of the history plus this user turn, with the generation prompt; and how many old turns were left
        out to leave room for the reply."""
        turns = self.history + [{"role": "user", "content": user}]
        room = self.engine.max_seq_len - self.settings["max_new_tokens"]
        dropped = 0
        while True:
            system = [{"role": "system", "content": self.system}] if self.system else []
            ids = chat_prompt_ids(self.tokenizer, system + turns, self.template)
            if len(ids) <= room:
                return ids, dropped
            if len(turns) == 1:
                raise UserError(f"this message and the system message need {len(ids)} tokens; the context leaves "
                                f"{room} after room for the reply (--max-new-tokens)")
            turns = turns[2:] if len(turns) > 2 else turns[1:]  # the oldest exchange leaves first
            dropped += 2

    def reply(self, user: str):
        """Stream the reply to user, piece by piece; afterwards, the turn and the reply are in the history."""
        ids, dropped = self.prompt(user)
        if dropped:
            self.history = self.history[dropped:]
            print(f"(the {dropped} oldest turns left the history to fit the context)", file=sys.stderr)
        seed = None if self.seed is None else self.seed + self.turn
        rid = self.engine.add(Request(ids, seed=seed, **self.settings))
        text, specials = [], set(self.tokenizer.special_tokens.values())
        try:
            while rid in self.engine:
                for event in self.engine.step():  # a special token the model emits is neither shown nor kept
                    if event.request_id == rid and event.text and event.token not in specials:
                        text.append(event.text)
                        yield event.text
        finally:
            if rid in self.engine:
                self.engine.cancel(rid)
        self.turn += 1
        self.history += [{"role": "user", "content": user}, {"role": "assistant", "content": "".join(text)}]


def chat_cli(args) -> int:
    from .runs import load, read_run_config
    model, tokenizer = load(args.run, device=args.device, checkpoint=args.checkpoint, dtype=args.dtype)
    chat = Chat(model, tokenizer, read_run_config(args.run), args.system, args.max_new_tokens, args.temperature,
                args.top_k, args.top_p, args.seed)
    print(f"Chatting with {args.run} ({HELP}).", file=sys.stderr)
    while True:
        try:
            line = input("> ")
        except EOFError:
            print(file=sys.stderr)
            return 0
        command, _, rest = line.strip().partition(" ")
        if command in ("/exit", "/quit"):
            return 0
        if command == "/reset":
            chat.reset()
            print("(history cleared)", file=sys.stderr)
            continue
        if command == "/system":
            chat.reset(rest.strip())
            print("(system message set; history cleared)", file=sys.stderr)
            continue
        if command.startswith("/"):
            print(f"unknown command {command}; {HELP}", file=sys.stderr)
            continue
        if not line.strip():
            continue
        try:
            for piece in chat.reply(line):
                sys.stdout.write(piece)
                sys.stdout.flush()
            sys.stdout.write("\n")
        except UserError as e:
            print(f"error: {e}", file=sys.stderr)
