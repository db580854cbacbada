"""Chat templates: a Jinja string in Hugging Face's convention (tokenizer_config.json's chat_template), rendered in
jinja2's sandbox with the globals transformers gives it, and conversations turned into token ids with the mask of
the tokens a model learns from (its assistant turns and their end-of-turn token).

    text = render(template, messages, add_generation_prompt=True, bos_token="", eos_token="<|endoftext|>")
    ids, targets = conversation_ids(tokenizer, messages)        # targets[j] = 1: token j is an assistant token
    ids = chat_prompt_ids(tokenizer, messages)                  # what generation (serve, chat) starts from

The template lives with the tokenizer (our tokenizer.json's "chat_template"; an HF tokenizer's tokenizer_config.json),
so the run's one string renders training data, the server's chat route, `lmforge chat` and every export. Runs
trained here get CHATML, whose two special tokens are added to the tokenizer when a run is first tuned on
conversations. A run without a template chats through PAIRS_TEMPLATE: a lone user turn is the prompt, as pair
fine-tuning trains it. The assistant turns are found by rendering: turn i's text is what rendering messages[:i+1]
adds to rendering messages[:i] with the generation prompt, so any template that renders earlier turns the same way
when later ones follow gives an exact mask without markers in the template; one that does not (Qwen3's drops the
thinking of earlier replies) has each reply found in the whole rendering instead.
"""

from __future__ import annotations

import datetime
import functools
import json
import re

from .errors import UserError

ROLES = ("system", "user", "assistant")
CHATML_TOKENS = ("<|im_start|>", "<|im_end|>")
CHATML = (  # the ChatML layout Qwen and SmolLM use, without a default system prompt
    "{% for message in messages %}"
    "{{ '<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>' + '\n' }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}")
PAIRS_TEMPLATE = (  # a run tuned on prompt->completion pairs (or none): the user's words are the prompt
    "{% for message in messages %}"
    "{% if message['role'] == 'system' %}{{ message['content'] + '\n\n' }}"
    "{% elif message['role'] == 'assistant' %}{{ message['content'] + eos_token }}"
    "{% else %}{{ message['content'] }}{% endif %}"
    "{% endfor %}")
END_OF_TURN = ("<|im_end|>", "<|eot_id|>", "<|end|>", "<end_of_turn>", "<|eom_id|>")  # tokens that end a reply


def render(template: str, messages: list[dict], add_generation_prompt: bool = False, bos_token: str = "",
           eos_token: str = "", **variables) -> str:
    """The template rendered as transformers renders it: an immutable sandbox, trim_blocks and lstrip_blocks, the
    loopcontrols extension, tojson, raise_exception and strftime_now. A failure names the template line."""
    compiled = _compiled(template)
    try:
        return compiled.render(messages=messages, add_generation_prompt=add_generation_prompt, bos_token=bos_token,
                               eos_token=eos_token, **variables)
    except UserError:
        raise
    except Exception as e:  # a template's own mistake (an undefined name, a type): where in the template it was
        raise UserError(f"the chat template fails to render{_template_line(e)}: {type(e).__name__}: {e}") from None


@functools.lru_cache(maxsize=16)
def _compiled(template: str):
    """A template compiled once (a conversation renders it once per assistant turn and once whole)."""
    import jinja2
    import jinja2.ext
    from jinja2.sandbox import ImmutableSandboxedEnvironment

    def raise_exception(message):
        raise UserError(f"the chat template refused the messages: {message}")
    env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True,
                                        extensions=[jinja2.ext.loopcontrols, _generation_tag()])
    env.filters["tojson"] = lambda x, indent=None, **_: json.dumps(x, ensure_ascii=False, indent=indent)
    env.globals["raise_exception"] = raise_exception
    env.globals["strftime_now"] = lambda fmt: datetime.datetime.now().strftime(fmt)
    try:
        return env.from_string(template)
    except jinja2.TemplateSyntaxError as e:
        raise UserError(f"the chat template does not parse: line {e.lineno}: {e.message}") from None


def _generation_tag():
    """{% generation %}...{% endgeneration %}, which transformers' templates use to mark assistant text: rendered as
    its body (the mask comes from rendering turn by turn, so the marks are not needed)."""
    import jinja2.ext
    from jinja2 import nodes

    class Generation(jinja2.ext.Extension):
        tags = {"generation"}

        def parse(self, parser):
            lineno = next(parser.stream).lineno
            body = parser.parse_statements(("name:endgeneration",), drop_needle=True)
            return nodes.Scope(body, lineno=lineno)
    return Generation


def _template_line(e: BaseException) -> str:
    tb, line = e.__traceback__, None
    while tb is not None:
        if tb.tb_frame.f_code.co_filename == "<template>":
            line = tb.tb_lineno
        tb = tb.tb_next
    return f" at line {line}" if line else ""


def from_legacy(template: dict) -> str:
    """The old config.json form ({"system": "{content}...", "user": ..., "assistant": ..., "generation": ...}, each
    a string around {content}) as the Jinja template that renders the same text."""
    if not isinstance(template, dict) or set(template) != {*ROLES, "generation"} or not all(
            isinstance(v, str) for v in template.values()):
        raise UserError(f"config.json: chat_template must be a Jinja string (or the old form mapping "
                        f"{sorted({*ROLES, 'generation'})} to strings around {{content}}); write the template as "
                        f"tokenizer_config.json's chat_template")

    def literal(text: str) -> str:
        return "{{ " + json.dumps(text, ensure_ascii=False) + " }}" if text else ""
    parts = ["{% for message in messages %}"]
    for i, role in enumerate(ROLES):
        before, _, after = template[role].partition("{content}")
        parts.append(("{% if" if i == 0 else "{% elif") + f" message['role'] == '{role}' %}}"
                     + literal(before) + "{{ message['content'] }}" + literal(after))
    parts += ["{% endif %}{% endfor %}", "{% if add_generation_prompt %}" + literal(template["generation"])
              + "{% endif %}"]
    return "".join(parts)


def stored_template(tokenizer, run_config: dict | None = None) -> str | None:
    """The template a run was given (its tokenizer's, or config.json's old form converted); None when it has none
    (what exports write)."""
    if getattr(tokenizer, "chat_template", None):
        return tokenizer.chat_template
    legacy = (run_config or {}).get("chat_template")
    if legacy is None or isinstance(legacy, str):
        return legacy
    return from_legacy(legacy)


def end_of_turn_ids(tokenizer) -> list[int]:
    """The tokens a reply ends at besides end-of-text, in id order."""
    return sorted(i for i in getattr(tokenizer, "stop_ids", ()) if i != tokenizer.eot_id)


def template_of(tokenizer, run_config: dict | None = None) -> str:
    """The template a run chats with: its tokenizer's, else config.json's old dict form converted, else
    PAIRS_TEMPLATE."""
    return stored_template(tokenizer, run_config) or PAIRS_TEMPLATE


def check_messages(messages, where: str, need_assistant: bool = True) -> list[dict]:
    """A conversation in OpenAI's shape: a list of {"role", "content"} with roles system, user, assistant."""
    if not isinstance(messages, list) or not messages:
        raise UserError(f'{where}: "messages" must be a non-empty list of {{"role": ..., "content": ...}}')
    out = []
    for i, m in enumerate(messages):
        if not isinstance(m, dict) or not isinstance(m.get("content"), str) or "role" not in m:
            raise UserError(f'{where}: message {i} needs a "role" and a string "content"')
        if m["role"] not in ROLES:
            raise UserError(f"{where}: message {i} has role {m['role']!r}; roles are {', '.join(ROLES)}")
        out.append({"role": m["role"], "content": m["content"]})
    if need_assistant and not any(m["role"] == "assistant" for m in out):
        raise UserError(f"{where}: the conversation has no assistant turn; there would be nothing to learn from it")
    return out


def _special(tokenizer, name: str) -> str:
    config = getattr(tokenizer, "config", None) or {}
    token = config.get(name)
    return (token.get("content") if isinstance(token, dict) else token) or ""


def render_for(tokenizer, messages: list[dict], add_generation_prompt: bool, template: str) -> str:
    """render() with the tokenizer's begin- and end-of-text tokens as bos_token and eos_token."""
    bos = _special(tokenizer, "bos_token")
    eos = getattr(tokenizer, "eos_token", None) or next(
        (s for s, i in tokenizer.special_tokens.items() if i == tokenizer.eot_id), "")
    return render(template, messages, add_generation_prompt, bos_token=bos, eos_token=eos)


def chat_ids(tokenizer, messages: list[dict], template: str | None = None,
             add_generation_prompt: bool = True) -> list[int]:
    """The messages rendered and tokenized as transformers' apply_chat_template does (the template's special-token
    text read as those tokens), except that a message's own text never becomes a special token."""
    text, plain = _rendered(tokenizer, messages, add_generation_prompt, template or template_of(tokenizer))
    return token_starts(tokenizer, text, plain)[0]


def chat_prompt_ids(tokenizer, messages: list[dict], template: str | None = None) -> list[int]:
    """The ids generation starts from: the messages with the generation prompt (end-of-text when that is empty)."""
    return chat_ids(tokenizer, messages, template, True) or [tokenizer.eot_id]


def conversation_ids(tokenizer, messages: list[dict], template: str | None = None, learn_from: int = 0,
                     where: str = "the conversation") -> tuple[list[int], list[int]]:
    """A conversation's ids (the whole rendering tokenized at once, as the server tokenizes a prompt) and its
    targets: 1 for each token that overlaps an assistant turn's text (turns from message learn_from on), its
    end-of-turn token included and the whitespace the template puts after it left out. A template that renders an
    earlier turn differently once later turns follow (Qwen3 drops the thinking block of earlier replies) has each
    reply found in the whole rendering instead, in order, with the special token right after it."""
    template = template or template_of(tokenizer)

    def text(part, generation):
        return _rendered(tokenizer, part, generation, template)[0]
    full, plain = _rendered(tokenizer, messages, False, template)
    spans, stable = [], True
    for i, m in enumerate(messages):
        if m["role"] != "assistant" or i < learn_from:
            continue
        try:  # (a template may index messages[0], which an empty prefix lacks)
            before, upto = text(messages[:i], True), text(messages[:i + 1], False)
        except UserError:
            before, upto = None, ""
        if before is None or not upto.startswith(before) or not full.startswith(upto):
            stable = False
            break
        spans.append((len(before), len(upto.rstrip())))
    if not stable:
        spans = _found_replies(tokenizer, full, messages, learn_from, template, where)
    ids, starts = token_starts(tokenizer, full, plain)
    ends = starts[1:] + [len(full)]  # a token is a target when it overlaps a reply (BPE may join a space to it)
    targets = [int(any(s < b and e > a for a, b in spans)) for s, e in zip(starts, ends)]
    return ids, targets


def _found_replies(tokenizer, full: str, messages: list[dict], learn_from: int, template: str,
                   where: str) -> list[tuple[int, int]]:
    """Each reply's place in the whole rendering, from a rendering with every message a placeholder, and the special
    token right after it (its end of turn)."""
    specials = sorted((t for t in tokenizer.special_tokens if t), key=len, reverse=True)
    replies = {i for i, m in enumerate(messages) if m["role"] == "assistant" and i >= learn_from and m["content"]}
    text, places = _substituted(tokenizer, messages, False, template, set(range(len(messages))))
    missing = next((i for i in sorted(replies) if not places.get(i)), None)
    if text != full or missing is not None:
        raise UserError(f"{where}: the chat template renders turn {missing if missing is not None else 0} "
                        f"differently once later turns follow, and changes the messages' text; its tokens cannot "
                        f"be found")
    spans = []
    for i in sorted(replies):
        a, b = places[i][0]
        b += len(next((t for t in specials if full.startswith(t, b)), ""))  # the end-of-turn token after it
        spans.append((a, b))
    return spans


_MARK = "\ue000{}\ue001"  # a private-use placeholder for a message's text while the template renders


def _substituted(tokenizer, messages: list[dict], add_generation_prompt: bool, template: str,
                 marked: set[int]) -> tuple[str, dict[int, list[tuple[int, int]]]]:
    """The rendering with the marked messages' text rendered as placeholders and then put back, and where each
    marked message's text is in it (never found by searching for the text)."""
    if any("\ue000" in m["content"] or "\ue001" in m["content"] for m in messages):
        raise UserError("a message holds the characters U+E000/U+E001, which the chat template's rendering reserves; "
                        "remove them")
    shown = [{**m, "content": _MARK.format(i)} if i in marked else m for i, m in enumerate(messages)]
    text = render_for(tokenizer, shown, add_generation_prompt, template)
    out, places, pos, at = [], {}, 0, 0
    for match in re.finditer("\ue000(\\d+)\ue001", text):
        i = int(match.group(1))
        out.append(text[pos:match.start()])
        at += match.start() - pos
        content = messages[i]["content"] if i < len(messages) else match.group(0)
        out.append(content)
        places.setdefault(i, []).append((at, at + len(content)))
        at += len(content)
        pos = match.end()
    out.append(text[pos:])
    return "".join(out), places


def _rendered(tokenizer, messages: list[dict], add_generation_prompt: bool,
              template: str) -> tuple[str, list[tuple[int, int]]]:
    """The rendering, and the spans of it that are messages' own text holding a special token's text: those are
    tokenized as plain text, so no message can end a turn or forge one."""
    specials = [t for t in tokenizer.special_tokens if t]
    risky = {i for i, m in enumerate(messages) if any(t in m["content"] for t in specials)}
    if not risky:
        return render_for(tokenizer, messages, add_generation_prompt, template), []
    text, places = _substituted(tokenizer, messages, add_generation_prompt, template, risky)
    missing = next((i for i in sorted(risky) if i not in places), None)
    if missing is not None:
        raise UserError(f"message {missing} holds a special token's text, and the chat template changes the message "
                        f"so it cannot be kept as plain text; remove the token's text")
    return text, sorted(span for spans in places.values() for span in spans)


def token_starts(tokenizer, text: str, plain: list[tuple[int, int]] = ()) -> tuple[list[int], list[int]]:
    """text's ids, its special-token text read as those tokens except inside the plain spans, and the character
    offset where each token starts."""
    ids, starts, pos = [], [], 0
    for a, b in list(plain) + [(len(text), len(text))]:
        for piece, is_plain, at in ((text[pos:a], False, pos), (text[a:b], True, a)):
            if piece:
                piece_ids, piece_starts = _piece_starts(tokenizer, piece, is_plain)
                ids += piece_ids
                starts += [at + s for s in piece_starts]
        pos = b
    return ids, starts


def _piece_starts(tokenizer, text: str, plain: bool) -> tuple[list[int], list[int]]:
    if hasattr(tokenizer, "encode_offsets"):
        return tokenizer.encode_offsets(text, plain)
    ids = tokenizer.encode(text) if plain else tokenizer.encode_with_specials(text)
    data = text.encode("utf-8")
    char_of = []  # byte offset -> character offset
    for c, ch in enumerate(text):
        char_of += [c] * len(ch.encode("utf-8"))
    starts, at = [], 0
    for i in ids:
        starts.append(char_of[at] if at < len(char_of) else len(text))
        at += len(tokenizer.decode_bytes([i]))
    if at != len(data):
        raise UserError("the tokenizer does not give back the rendered text byte for byte (unknown characters?); "
                        "the assistant tokens cannot be found")
    return ids, starts
